"""Writing results: CSV (with a ``#`` header block), JSON, rich tables and PNG plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from rich.markup import escape
from rich.table import Table


def _flatten(header: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in header.items():
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_csv(path: str, header: dict, rows: list[dict], columns: list[str]) -> None:
    """CSV of ``rows`` preceded by ``# key: value`` lines (read back with
    ``pandas.read_csv(path, comment="#")``)."""
    import pandas as pd

    with open(path, "w", newline="") as fh:
        for key, value in _flatten(header):
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            fh.write(f"# {key}: {text}\n")
        pd.DataFrame(rows, columns=columns).to_csv(fh, index=False)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as fh:
        json.dump(_clean(payload), fh, indent=2)
        fh.write("\n")


def read_csv(path: str):
    """A results CSV as a pandas DataFrame and its header block as a dict of strings."""
    import pandas as pd

    header = {}
    with open(path) as fh:
        for line in fh:
            if not line.startswith("# "):
                break
            key, _, value = line[2:].rstrip("\n").partition(": ")
            header[key] = value
    return pd.read_csv(path, comment="#"), header


# -- formatting ---------------------------------------------------------------------------------

def fmt_time(seconds) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_bytes(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def fmt_ratio(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}x"


def fmt_pct(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.0f}%"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_share(x) -> str:
    """A fraction as a percentage with two significant digits below 10% (``0.27%``, ``3.4%``, ``41%``)."""
    if _missing(x):
        return "-"
    pct = 100 * x
    if pct >= 10:
        return f"{pct:.0f}%"
    if pct >= 1:
        return f"{pct:.1f}%"
    return f"{pct:.2f}%"


def fmt_count(n) -> str:
    """A count (float from a CSV column with gaps included) as an integer with thousands separators."""
    if _missing(n):
        return "-"
    return f"{int(n):,}"


def ops_table(rows: list[dict], baseline: str) -> Table:
    padding = next((r.get("padding") for r in rows if r.get("padding")), 0)
    padded = f", {padding:.0%} of positions padded" if padding else ""
    table = Table(title=f"sequence mixers: time and peak memory (speed-up and memory ratio vs {baseline}){padded}")
    for col in ("mixer", "T", "fwd", "fwd+bwd", "fwd mem", "fwd+bwd mem", f"x faster (fwd+bwd)",
                "mem / base (fwd+bwd)", "fwd x floor", "% of peak (fwd+bwd)", "aten calls (fwd+bwd)", "status"):
        table.add_column(col, justify="left" if col in ("mixer", "status") else "right")
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"[red]{escape(r['status'])}[/]: {escape(r['message'])}"
        table.add_row(escape(r["mixer"]), str(r["length"]), fmt_time(r.get("fwd_time_s")), fmt_time(r.get("fwdbwd_time_s")),
                      fmt_bytes(r.get("fwd_peak_bytes")), fmt_bytes(r.get("fwdbwd_peak_bytes")),
                      fmt_ratio(r.get("fwdbwd_speedup_vs_baseline")),
                      fmt_ratio(r.get("fwdbwd_memory_ratio_vs_baseline"), 2), fmt_ratio(r.get("fwd_x_floor")),
                      fmt_share(r.get("fwdbwd_peak_fraction")), fmt_count(r.get("fwdbwd_aten_calls")), status)
    return table


def crossover_table(crossovers: list[dict]) -> Table:
    table = Table(title="crossover: shortest length from which the mixer beats the baseline")
    for col in ("mixer", "baseline", "metric", "crossover length"):
        table.add_column(col)
    for c in crossovers:
        text = f"{c['length']:,.0f}" if c["status"] == "at" else c["status"]
        table.add_row(escape(c["mixer"]), escape(c["baseline"]), c["metric"], text)
    return table


def generation_table(rows: list[dict]) -> Table:
    table = Table(title="producing n tokens: AR (one token per step) vs one NAR pass")
    for col in ("method", "mixer", "n", "time", "peak mem", "time / AR", "x faster than AR", "mem / AR",
                "mem saved vs NAR", "status"):
        table.add_column(col, justify="left" if col in ("method", "mixer", "status") else "right")
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"[red]{escape(r['status'])}[/]: {escape(r['message'])}"
        table.add_row(escape(r["method"]), escape(r["mixer"]), str(r["length"]), fmt_time(r.get("time_s")),
                      fmt_bytes(r.get("peak_bytes")), fmt_ratio(r.get("time_ratio_to_ar"), 4),
                      fmt_ratio(r.get("speedup_vs_ar")), fmt_ratio(r.get("memory_ratio_to_ar"), 2),
                      fmt_pct(r.get("memory_saving_vs_nar")), status)
    return table


def headline_table(headline: list[dict]) -> Table:
    table = Table(title="headline (paper, 8,192 tokens on an A100: NAR 116x, NAR-AMLP 590x faster than AR; "
                        "NAR-AMLP saves 89% of NAR's memory)")
    for col in ("method", "n", "x faster than AR", "memory saved vs NAR"):
        table.add_column(col)
    for h in headline:
        table.add_row(h["method"], "-" if h["length"] is None else f"{h['length']:,}",
                      fmt_ratio(h.get("speedup_vs_ar")), fmt_pct(h.get("memory_saving_vs_nar")))
    return table


def peers_table(rows: list[dict]) -> Table:
    """``amlp bench peers``: both sides' times, the ratio peer / amlp (> 1: amlp faster) and its range
    over the rounds (compact, for the terminal; ``peers.md`` has the long form)."""
    from .markdown import fmt_diff

    def span(r, mode):
        lo, hi = r.get(f"{mode}_ratio_min"), r.get(f"{mode}_ratio_max")
        return "-" if lo is None or hi is None else f"{lo:.2f}-{hi:.2f}"

    memory = any(r.get(f"{side}_fwdbwd_peak_bytes") is not None for r in rows for side in ("amlp", "peer"))
    table = Table(title=escape("amlp vs other implementations: ratio = peer time / amlp time (> 1: amlp faster), "
                               "range = smallest-largest per-round ratio, f+b = forward + backward"))
    cols = ["pair", "level", "T", "amlp fwd", "peer fwd", "ratio", "range", "amlp f+b", "peer f+b", "ratio",
            "range"]
    if memory:
        cols += ["amlp mem f+b", "peer mem f+b"]
    cols += ["max |diff|", "status"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("pair", "level", "status") else "right",
                         overflow="fold" if col in ("pair", "level", "status") else "ellipsis")
    for r in rows:
        if r["status"] == "ok":
            status = "ok"
        elif r["status"] in ("not installed", "not measured"):  # the message (how to measure it) follows the table
            status = f"[yellow]{escape(r['status'])}[/]"
        else:
            status = f"[red]{escape(r['status'])}[/]: {escape(r.get('message') or '')}"
        cells = [escape(r["pair"]), escape(r.get("level") or "-"), "-" if r.get("length") is None else str(r["length"]),
                 fmt_time(r.get("amlp_fwd_s")), fmt_time(r.get("peer_fwd_s")), fmt_ratio(r.get("fwd_ratio"), 2),
                 span(r, "fwd"), fmt_time(r.get("amlp_fwdbwd_s")), fmt_time(r.get("peer_fwdbwd_s")),
                 fmt_ratio(r.get("fwdbwd_ratio"), 2), span(r, "fwdbwd")]
        if memory:
            cells += [fmt_bytes(r.get("amlp_fwdbwd_peak_bytes")), fmt_bytes(r.get("peer_fwdbwd_peak_bytes"))]
        table.add_row(*cells, fmt_diff(r.get("max_abs_diff")), status)
    return table


def peers_setup_table(rows: list[dict]) -> Table:
    """What each pair compares: the two sides, the level and the hyper-parameters."""
    table = Table(title="pairs: what is compared")
    for col in ("pair", "amlp side", "peer side", "package (version)", "level", "hyper-parameters", "outputs"):
        table.add_column(col, overflow="fold")
    for described in pair_descriptions(rows):
        table.add_row(*(escape(x) for x in described))
    return table


# -- plots --------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise RuntimeError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows, key, group):
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        v = r.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)) or v <= 0:
            continue
        xs, ys = out.setdefault(r[group], ([], []))
        xs.append(r["length"])
        ys.append(v)
    return out


def plot_ops(rows: list[dict], out_dir: str, title: str) -> list[str]:
    """``ops_time.png`` and ``ops_memory.png``: fwd and fwd+bwd against length, log-log."""
    plt = _pyplot()
    paths = []
    for what, keys, ylabel, scale in (
        ("time", ("fwd_time_s", "fwdbwd_time_s"), "time per call (ms)", 1e3),
        ("memory", ("fwd_peak_bytes", "fwdbwd_peak_bytes"), "peak memory added (MiB)", 1 / 2**20),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        drawn = False
        for ax, key, name in zip(axes, keys, ("forward", "forward + backward")):
            for mixer, (xs, ys) in _series(rows, key, "mixer").items():
                ax.plot(xs, [y * scale for y in ys], marker="o", label=mixer)
                drawn = True
            if what == "time":  # the bandwidth floor: reading the inputs and writing the output once
                floor = {}
                for r in rows:
                    f = r.get(key.replace("time_s", "floor_s"))
                    if f is not None and not (isinstance(f, float) and math.isnan(f)):
                        floor[r["length"]] = min(f, floor.get(r["length"], math.inf))
                if floor:
                    xs = sorted(floor)
                    ax.plot(xs, [floor[x] * scale for x in xs], linestyle="--", color="grey",
                            label="bandwidth floor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_title(name)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(ylabel)
        if drawn and axes[0].get_legend_handles_labels()[0]:  # the forward panel may have no series
            axes[0].legend()
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"ops_{what}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_generation(rows: list[dict], out_dir: str, title: str) -> list[str]:
    """``generation_ratio.png``: time and memory of each method as a ratio to AR (log scale), as the
    paper's Fig. 3; ``generation_absolute.png``: the raw figures."""
    plt = _pyplot()
    paths = []
    for name, keys, ylabels in (
        ("ratio", ("time_ratio_to_ar", "memory_ratio_to_ar"), ("time / AR time", "peak memory / AR peak memory")),
        ("absolute", ("time_s", "peak_bytes"), ("time to produce n tokens (s)", "peak memory added (bytes)")),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, ylabel in zip(axes, keys, ylabels):
            series = _series(rows, key, "method")
            for method, (xs, ys) in series.items():
                ax.plot(xs, ys, marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens produced (n)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"generation_{name}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def pair_descriptions(rows: list[dict]) -> list[tuple[str, ...]]:
    """One line per pair of ``amlp bench peers`` results: the pair, the amlp side, the peer side, the
    package and its version, the level, the hyper-parameters and what is known of the outputs."""
    lines, seen = [], set()
    for r in rows:
        if r["pair"] in seen:
            continue
        seen.add(r["pair"])
        package = r.get("package") or "-"
        if r.get("peer_version"):
            package = f"{package} ({r['peer_version']})"
        lines.append(tuple(str(x) for x in (r["pair"], r.get("amlp") or "-", r.get("peer") or "-", package,
                                             r.get("level") or "-", r.get("hyper") or "-", r.get("notes") or "-")))
    return lines
