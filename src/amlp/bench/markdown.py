"""Markdown reports of saved benchmark results, so that the numbers in the documentation are
written by a command (``amlp bench report``) rather than typed."""

from __future__ import annotations

import json
import os
import re

from .report import fmt_bytes, fmt_count, fmt_pct, fmt_ratio, fmt_share, fmt_time, pair_descriptions

BEGIN = "<!-- amlp bench report: begin -->"
END = "<!-- amlp bench report: end -->"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _machine(header: dict) -> str:
    bw = header.get("bandwidth_bytes_per_s")
    gpu = header.get("gpu_model")
    device = gpu if gpu and gpu != "none" else f"{header.get('cpu_model')} ({header.get('cpu_count')} cores)"
    parts = [f"`{header.get('command')}`", f"{device}", f"torch {header.get('torch')}",
             f"{header.get('torch_threads')} threads", f"load average {header.get('load_average_1m')}",
             f"{header.get('timestamp_utc')}"]
    if bw:
        parts.append(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    mm = header.get("matmul_flops_per_s")
    if mm:
        parts.append(f"matmul rate {mm / 1e9:.1f} GFLOP/s")
    return "; ".join(str(p) for p in parts)


def ops_markdown(payload: dict) -> str:
    header, rows = payload["header"], payload["rows"]
    s = header.get("settings", {})
    padded = f", {s['padding']:.0%} of positions padded" if s.get("padding") else ""
    lines = [f"**ops** ({s.get('level', 'op')} level, {s.get('dtype')}, B = {s.get('batch')}, H = {s.get('heads')}, "
             f"D = {s.get('head_dim')}, c = {s.get('landmarks')}{padded}): {_machine(header)}", "",
             _row(["mixer", "T", "fwd", "fwd+bwd", "fwd mem", "fwd+bwd mem", "x faster (fwd+bwd)",
                   "mem / softmax (fwd+bwd)", "fwd x floor", "% of peak (fwd+bwd)", "aten calls (fwd+bwd)",
                   "status"]),
             _row(["---"] + ["---:"] * 10 + ["---"])]
    for r in rows:
        lines.append(_row([r["mixer"], r["length"], fmt_time(r.get("fwd_time_s")), fmt_time(r.get("fwdbwd_time_s")),
                           fmt_bytes(r.get("fwd_peak_bytes")), fmt_bytes(r.get("fwdbwd_peak_bytes")),
                           fmt_ratio(r.get("fwdbwd_speedup_vs_baseline")),
                           fmt_ratio(r.get("fwdbwd_memory_ratio_vs_baseline"), 3),
                           fmt_ratio(r.get("fwd_x_floor")), fmt_share(r.get("fwdbwd_peak_fraction")),
                           fmt_count(r.get("fwdbwd_aten_calls")), r["status"]]))
    lines += ["", _row(["mixer", "baseline", "metric", "crossover length"]), _row(["---"] * 3 + ["---:"])]
    for c in payload.get("crossovers", []):
        lines.append(_row([c["mixer"], c["baseline"], c["metric"],
                           f"{c['length']:,.0f}" if c["status"] == "at" else c["status"]]))
    return "\n".join(lines)


def generation_markdown(payload: dict) -> str:
    header, rows = payload["header"], payload["rows"]
    s = header.get("settings", {})
    lines = [f"**generation** (B = {s.get('batch')}, E = {s.get('dim')}, H = {s.get('heads')}, "
             f"{s.get('layers')} layer(s), c = {s.get('landmarks')}, sigma_1 = {s.get('activation')}, "
             f"{s.get('dtype')}): {_machine(header)}", "",
             _row(["method", "n", "time", "peak mem", "x faster than AR", "mem / AR", "mem saved vs NAR", "status"]),
             _row(["---"] + ["---:"] * 6 + ["---"])]
    for r in rows:
        lines.append(_row([r["method"], r["length"], fmt_time(r.get("time_s")), fmt_bytes(r.get("peak_bytes")),
                           fmt_ratio(r.get("speedup_vs_ar")), fmt_ratio(r.get("memory_ratio_to_ar"), 2),
                           fmt_pct(r.get("memory_saving_vs_nar")), r["status"]]))
    headline = payload.get("headline", [])
    if headline:
        lines += ["", _row(["headline", "n", "x faster than AR", "memory saved vs NAR"]), _row(["---", "---:", "---:", "---:"])]
        for h in headline:
            lines.append(_row([h["method"], "-" if h["length"] is None else f"{h['length']:,}",
                               fmt_ratio(h.get("speedup_vs_ar")), fmt_pct(h.get("memory_saving_vs_nar"))]))
    return "\n".join(lines)


def step_markdown(payload: dict) -> str:
    header, rows = payload["header"], payload["rows"]
    s = header.get("settings", {})
    lines = [f"**step** (B = {s.get('batch')}, E = {s.get('dim')}, H = {s.get('heads')}, {s.get('dtype')}, "
             f"{s.get('steps')} steps timed per position): {_machine(header)}", "",
             _row(["mixer", "t", "time per step", "vs first t", "state floats", "status"]),
             _row(["---", "---:", "---:", "---:", "---:", "---"])]
    for r in rows:
        lines.append(_row([r["mixer"], r["position"], fmt_time(r.get("seconds_per_step")),
                           fmt_ratio(r.get("ratio_to_first_position"), 2), r.get("state_floats", "-"), r["status"]]))
    return "\n".join(lines)


def _ratio_cell(r: dict, mode: str) -> str:
    """``peer / amlp`` time with the smallest and largest per-round ratio: ``1.23x [1.18, 1.30]``."""
    ratio = r.get(f"{mode}_ratio")
    if ratio is None:
        return "-"
    lo, hi = r.get(f"{mode}_ratio_min"), r.get(f"{mode}_ratio_max")
    spread = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{fmt_ratio(ratio, 2)}{spread}"


def fmt_diff(x) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.1e}"


def peers_markdown(payload: dict) -> str:
    """The ``amlp bench peers`` section: machine, command, the timing table and the pairs' set-up."""
    header, rows = payload["header"], payload["rows"]
    s = header.get("settings", {})
    memory = any(r.get(f"{side}_{mode}_peak_bytes") is not None for r in rows for side in ("amlp", "peer")
                 for mode in ("fwd", "fwdbwd"))
    lines = [f"**peers** ({s.get('dtype')}, B = {s.get('batch')}, H = {s.get('heads')}, D = {s.get('head_dim')}, "
             f"{s.get('rounds')} alternating rounds per point, ratio = peer time / amlp time, > 1: amlp faster, "
             f"[smallest, largest] per-round ratio): {_machine(header)}", ""]
    cols = ["pair", "level", "T", "amlp fwd", "peer fwd", "peer / amlp (fwd)", "amlp fwd+bwd", "peer fwd+bwd",
            "peer / amlp (fwd+bwd)"]
    if memory:
        cols += ["amlp mem (fwd+bwd)", "peer mem (fwd+bwd)"]
    cols += ["max abs diff", "status"]
    lines += [_row(cols), _row(["---", "---"] + ["---:"] * (len(cols) - 3) + ["---"])]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('message') or ''}".rstrip(": ")
        if r["status"] in ("not installed", "not measured"):
            status = r.get("message") or r["status"]
        cells = [r["pair"], r.get("level") or "-", "-" if r.get("length") is None else r["length"],
                 fmt_time(r.get("amlp_fwd_s")), fmt_time(r.get("peer_fwd_s")), _ratio_cell(r, "fwd"),
                 fmt_time(r.get("amlp_fwdbwd_s")), fmt_time(r.get("peer_fwdbwd_s")), _ratio_cell(r, "fwdbwd")]
        if memory:
            cells += [fmt_bytes(r.get("amlp_fwdbwd_peak_bytes")), fmt_bytes(r.get("peer_fwdbwd_peak_bytes"))]
        cells += [fmt_diff(r.get("max_abs_diff")), status.replace("|", "\\|")]
        lines.append(_row(cells))
    lines += ["", _row(["pair", "amlp side", "peer side", "package (version)", "level", "hyper-parameters",
                        "outputs"]), _row(["---"] * 7)]
    for described in pair_descriptions(rows):
        lines.append(_row([x.replace("|", "\\|") for x in described]))
    lines += ["", f"Timing: {header.get('timing_method')}. Peak memory: {header.get('memory_method')}."]
    if header.get("released_stubs_used"):
        lines.append(f"Released code imported with stubs for: {', '.join(header['released_stubs_used'])}.")
    return "\n".join(lines)


def report_markdown(folder: str) -> str:
    """Markdown for every result file (``ops.json``, ``generation.json``, ``step.json``,
    ``peers.json``) found in ``folder``."""
    parts = []
    for name, render in (("ops.json", ops_markdown), ("generation.json", generation_markdown),
                         ("step.json", step_markdown), ("peers.json", peers_markdown)):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as fh:
                parts.append(render(json.load(fh)))
    if not parts:
        raise FileNotFoundError(f"no ops.json, generation.json, step.json or peers.json in {folder}")
    return "\n\n".join(parts)


def update_document(doc_path: str, section: str, body: str) -> None:
    """Replace the generated block named ``section`` in ``doc_path`` (between
    ``<!-- amlp bench report: begin SECTION -->`` and the matching end marker), or append it."""
    begin, end = f"{BEGIN[:-4]} {section} -->", f"{END[:-4]} {section} -->"
    block = f"{begin}\n{body}\n{end}"
    text = open(doc_path).read() if os.path.exists(doc_path) else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with open(doc_path, "w") as fh:
        fh.write(text)
