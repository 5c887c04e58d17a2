"""The recall study: causal mixers x (string length S for copying | key-value pairs for MQAR) x model
width x seeds, with a resumable grid and a generated report with plots.

What it measures is where the causal mixers differ most: copying a string of S letters (CausalRN
paper and code, ``src_copying``; Jelassi et al. 2024) and multi-query associative recall (zoology, Arora et al.
2023). Every cell is one ``amlp train copying|mqar`` run through :func:`amlp.train.run_experiment`;
finished cells are recorded in ``<run_root>/results.json`` (and, when the study names one, in its
tracked ``records`` file, so that the grid continues on another machine) and skipped when the study runs again
(an unfinished cell continues from its last checkpoint). The report goes to
``<run_root>/report.md`` (plots in ``<run_root>/figures``), or, when asked (``write_doc``,
``--write-doc``), to the tracked ``doc`` and ``figures``, only from a complete grid. The report has one table per task, the
plots accuracy vs S, accuracy vs number of pairs, and accuracy vs recurrent state size (floats of
mixer state per sequence, summed over blocks, from each mixer's ``state_size(length)`` at the
task's longest input; the layout of zoology's state-size plots).

When the copying config sizes its models to a parameter budget (``model.match_params``, the
language model's matched-parameter rule), the copying table gives each row's width (and QK rank
where the rule chose one) and parameter count at the longest S. When the mechanisms include several
cells of the CausalRN ablation (``causal-rn-quadratic:prenorm=...,activation=...``; the plain
``causal-rn-quadratic`` is the exact + exp cell), the report adds one pre-norm x activation table
per S. A "Checks" section puts the CausalRN paper's copying claims beside the recorded accuracies
at the longest S (:func:`copying_checks`).

A study file::

    title: "..."
    mechanisms: [softmax, causal-rn, causal-rn-quadratic, hyper-mlp, hyper-glu, amlp-cov, ...]
    seeds: [0]
    dims: []                      # model widths to sweep (empty: each config's model.dim)
    copying: {config: configs/recall/copying_cpu.yaml, string_lens: [4, 8]}    # or null
    mqar: {config: configs/recall/mqar_cpu.yaml, num_pairs: [4, 8]}            # or null
    run_root: runs/study/recall-cpu
    records: docs/results/records/recall-cpu.json   # tracked finished cells (optional)
    doc: docs/results/recall.md
    figures: docs/figures         # PNGs, linked from the report
    overrides: []                 # key=value applied to every run
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import from_dict, load_config, read_study_file, to_plain
from .study_common import cell_store, check_protocols
from .study_forecasting import _fmt, grid_refusal, _mean_std, mechanism_dir, parse_mechanism

TASK_AXES = {"copying": ("data.string_len", "S"), "mqar": ("data.num_pairs", "pairs")}
TASK_METRIC = {"copying": "hard_acc", "mqar": "acc"}


@dataclass
class CopyingStudy:
    config: str
    string_lens: list[int] = field(default_factory=lambda: [4, 8])


@dataclass
class MQARStudy:
    config: str
    num_pairs: list[int] = field(default_factory=lambda: [4, 8])


@dataclass
class RecallStudyConfig:
    mechanisms: list[str] = field(default_factory=lambda: [
        "softmax", "causal-rn", "causal-rn-quadratic", "hyper-mlp", "hyper-glu", "amlp-cov", "performer",
        "cosformer", "abc", "local"])
    seeds: list[int] = field(default_factory=lambda: [0])
    dims: list[int] = field(default_factory=list)
    copying: CopyingStudy | None = None
    mqar: MQARStudy | None = None
    run_root: str = "runs/study/recall"
    #: a tracked file of the finished cells' records, so that the grid continues on another machine;
    #: None: only ``<run_root>/results.json``
    records: str | None = None
    doc: str = "docs/results/recall.md"
    figures: str = "docs/figures"
    overrides: list[str] = field(default_factory=list)
    title: str = "In-context recall: copying and MQAR"

    def validate(self) -> None:
        if not self.mechanisms:
            raise ValueError("config key 'mechanisms' must list at least one mixer name")
        if not self.seeds:
            raise ValueError("config key 'seeds' must list at least one seed")
        if self.copying is None and self.mqar is None:
            raise ValueError("the study needs a 'copying' or an 'mqar' section (or both)")
        if any(d < 1 for d in self.dims):
            raise ValueError(f"config key 'dims' must hold positive ints, got {self.dims}")


def load_recall_study(path: str | Path) -> RecallStudyConfig:
    return from_dict(RecallStudyConfig, read_study_file(path))


def recall_cell_key(task: str, mechanism: str, value: int, dim: int, seed: int) -> str:
    return f"{task}/{mechanism}/{TASK_AXES[task][1]}{value}/dim{dim}/seed{seed}"


def _task_grid(study: RecallStudyConfig, tasks, values: dict[str, list[int]] | None):
    out = []
    for task, section in (("copying", study.copying), ("mqar", study.mqar)):
        if section is None or (tasks and task not in tasks):
            continue
        own = section.string_lens if task == "copying" else section.num_pairs
        out.append((task, section.config, (values or {}).get(task) or own))
    return out


def _cells(study: RecallStudyConfig, root: Path, overrides, mechs, tasks, values, dims, seeds):
    cells = []
    for task, cfg_path, task_values in _task_grid(study, tasks, values):
        base = load_config(root / cfg_path, overrides)
        if base.task != task:
            raise ValueError(f"the study's {task} section names {cfg_path!r}, a config for task {base.task!r}")
        for mech in mechs:
            for value in task_values:
                for dim in (dims or study.dims or [base.model.dim]):
                    for seed in seeds or study.seeds:
                        cells.append((task, cfg_path, mech, value, dim, seed))
    return cells


def _check_mechanisms(mechs: list[str]) -> dict[str, tuple[str, dict]]:
    """{label: (mixer, options)}; a label is a causal mixer's name, optionally ``name:key=value,...``
    with options the mixer takes."""
    from ..layers.registry import accepted_options

    parsed = {m: parse_mechanism(m, need="causal") for m in mechs}
    for label, (mixer, options) in parsed.items():
        accepted = accepted_options(mixer)
        unknown = sorted(set(options) - accepted) if accepted is not None else []
        if unknown:
            own = sorted(accepted - {"dim", "heads", "causal", "cross"})
            raise ValueError(f"mechanism {label!r}: mixer {mixer!r} takes no option(s) "
                             f"{', '.join(map(repr, unknown))}; its options: {', '.join(own) or 'none'}")
    return parsed


def recall_cell_config(root: Path, cfg_path: str, task: str, mechanism: str, value: int, dim: int, seed: int,
                       overrides: list[str]):
    """The experiment config of one cell: the task's config with the study's ``overrides``, then the
    cell's mixer (and the mechanism's options), S or number of pairs, width and seed."""
    mixer, options = _check_mechanisms([mechanism])[mechanism]
    cell_overrides = [f"model.mixer={mixer}", f"{TASK_AXES[task][0]}={value}", f"model.dim={dim}", f"seed={seed}"]
    cell_overrides += [f"model.mixer_options.{mixer}.{k}={json.dumps(v)}" for k, v in options.items()]
    if task == "mqar":
        cell_overrides.append(f"data.test_pairs=[{value}]")
    return load_config(root / cfg_path, list(overrides) + cell_overrides)


def run_recall_study(study: RecallStudyConfig, *, command: str, mechanisms: list[str] | None = None,
                     tasks: list[str] | None = None, values: dict[str, list[int]] | None = None,
                     dims: list[int] | None = None, seeds: list[int] | None = None,
                     extra_overrides: list[str] | None = None, root: Path | None = None,
                     log: Callable[[str], None] = print, doc_only: bool = False, write_doc: bool = False) -> Path:
    """Run every unfinished cell of the grid, then write the report and plots; returns the report's path.

    ``mechanisms``, ``tasks`` (copying, mqar), ``values`` ({task: [S or pairs]}), ``dims`` and
    ``seeds`` restrict or replace the grid; an unknown mechanism or task is an error. The report goes
    beside the results unless ``write_doc``, which writes the study's ``doc`` (and ``figures``) only
    when every cell of the study file's grid is finished (else a ``ValueError`` lists the missing).
    """
    from .loop import run_experiment

    study.validate()
    root = Path(root or ".")
    run_root = root / study.run_root
    store = cell_store(root, run_root, study.records, extra_overrides or [], log)
    overrides = list(study.overrides) + list(extra_overrides or [])
    mechs = list(mechanisms or study.mechanisms)
    _check_mechanisms(mechs)
    known_tasks = [t for t, sec in (("copying", study.copying), ("mqar", study.mqar)) if sec is not None]
    bad_tasks = [t for t in tasks or [] if t not in known_tasks]
    if bad_tasks:
        raise ValueError(f"--tasks: {', '.join(map(repr, bad_tasks))} not in this study (it has "
                         f"{', '.join(known_tasks)})")
    cells = _cells(study, root, overrides, mechs, tasks, values, dims, seeds)

    def missing() -> list[str]:
        done = store.read()
        full = _cells(study, root, overrides, study.mechanisms, None, None, None, None)
        return [k for k in (recall_cell_key(t, m, v, d, s) for t, _, m, v, d, s in full)
                if not done.get(k, {}).get("finished")]

    if write_doc:
        mine = {recall_cell_key(t, m, v, d, s) for t, _, m, v, d, s in cells}
        outside = [k for k in missing() if k not in mine]
        if outside:
            raise ValueError(_refusal(study, outside))

    def config_now(task, cfg_path, mech, value, dim, seed):
        return lambda record: recall_cell_config(root, cfg_path, task, mech, value, dim, seed, overrides)

    checked = _cells(study, root, overrides, study.mechanisms, None, None, None, None) if write_doc else cells
    check_protocols(store.read(), ((recall_cell_key(t, m, v, d, s), config_now(t, p, m, v, d, s))
                                   for t, p, m, v, d, s in checked), store.source(root))
    if not doc_only:
        # every cell's config is checked before the first trains: a bad value fails now, not hours in
        for task, cfg_path, mech, value, dim, seed in cells:
            try:
                recall_cell_config(root, cfg_path, task, mech, value, dim, seed, overrides)
            except ValueError as err:
                raise ValueError(f"{recall_cell_key(task, mech, value, dim, seed)}: {err}") from None
        for i, (task, cfg_path, mech, value, dim, seed) in enumerate(cells, 1):
            key = recall_cell_key(task, mech, value, dim, seed)
            if store.finished(key):
                log(f"({i}/{len(cells)}) {key}: done before, skipped")
                continue
            log(f"({i}/{len(cells)}) {key}: training")
            cfg = recall_cell_config(root, cfg_path, task, mech, value, dim, seed, overrides)
            run_dir = run_root / task / mechanism_dir(mech) / f"{TASK_AXES[task][1]}{value}-dim{dim}" / f"seed{seed}"
            result = run_experiment(cfg, run_dir, resume="auto", same_config=True)
            test = result.test_metrics or {}
            record = {"finished": True, "task": task, "mechanism": mech, "value": value, "dim": dim, "seed": seed,
                      "config": str(cfg_path), "overrides": overrides, "steps": result.step, "test": test,
                      "val": result.val_metrics, "params": test.get("params"), "state_size": test.get("state_size"),
                      "run_dir": str(run_dir.relative_to(root) if run_dir.is_relative_to(root) else run_dir),
                      "train": to_plain(cfg.train), "model": to_plain(cfg.model), "data": to_plain(cfg.data)}
            store.record(key, record)
            log(f"    test {TASK_METRIC[task]} {test.get(TASK_METRIC[task], float('nan')):.3f}")
    results = store.read()
    if write_doc:
        gaps = missing()
        if gaps:
            raise ValueError(_refusal(study, gaps))
        doc, figures = root / study.doc, root / study.figures
    else:
        doc, figures = run_root / "report.md", run_root / "figures"
    write_recall_report(doc, results, study=study, command=command,
                        requested=study.mechanisms if write_doc else mechs, unavailable=[], figures_dir=figures,
                        source=store.source(root))
    log(f"report written to {doc}")
    return doc


def _refusal(study: RecallStudyConfig, missing: list[str]) -> str:
    return grid_refusal(study.doc, missing)


# -- the report ---------------------------------------------------------------------------------------
def summarise_recall(results: dict) -> dict:
    """{(task, mechanism, value, dim): {"acc": [...], "soft": [...], "params": p, "state": s}} over finished cells."""
    table: dict = {}
    for rec in results.values():
        if not rec.get("finished") or not rec.get("test"):
            continue
        task = rec["task"]
        entry = table.setdefault((task, rec["mechanism"], rec["value"], rec["dim"]),
                                 {"acc": [], "soft": [], "params": rec.get("params"), "state": rec.get("state_size")})
        test = rec["test"]
        if "matched_dim" in test or "matched_qk_rank" in test:  # sized by the matched-parameter rule
            entry["width"] = int(test.get("matched_dim", rec["dim"]))
            entry["qk_rank"] = int(test["matched_qk_rank"]) if "matched_qk_rank" in test else None
        entry["acc"].append(rec["test"][TASK_METRIC[task]])
        if task == "copying":
            entry["soft"].append(rec["test"]["soft_acc"])
    return table


def _order(requested: list[str], present: set[str]) -> list[str]:
    return [m for m in requested if m in present] + sorted(present - set(requested))


def _plots(table: dict, mechanisms: list[str], figures_dir: Path, doc: Path) -> list[str]:
    """Write the PNGs; returns Markdown image lines (paths relative to the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    colour = {m: f"C{i % 10}" for i, m in enumerate(mechanisms)}
    # past ten mechanisms the colours repeat: the line style tells them apart
    style = {m: ("-", "--", ":", "-.")[(i // 10) % 4] for i, m in enumerate(mechanisms)}
    for task, title, fname in (("copying", "Copying: hard accuracy vs string length S", "recall_copying_vs_S.png"),
                               ("mqar", "MQAR: accuracy vs number of key-value pairs", "recall_mqar_vs_pairs.png")):
        keys = [k for k in table if k[0] == task]
        if not keys:
            continue
        dims = sorted({k[3] for k in keys})
        fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4), squeeze=False)
        for ax, dim in zip(axes[0], dims):
            for mech in mechanisms:
                pts = sorted((k[2], _mean_std(table[k]["acc"])[0]) for k in keys if k[1] == mech and k[3] == dim)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mech, color=colour[mech],
                            linestyle=style[mech])
            ax.set_xlabel("string length S" if task == "copying" else "key-value pairs")
            ax.set_ylabel("hard accuracy" if task == "copying" else "query accuracy")
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"model dim {dim}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(figures_dir / fname, dpi=110)
        plt.close(fig)
        lines.append(f"![{title}]({os.path.relpath(figures_dir / fname, doc.parent)})")
    state_keys = [k for k in table if table[k]["state"] is not None and math.isfinite(table[k]["state"])]
    tasks = [t for t in ("copying", "mqar") if any(k[0] == t for k in state_keys)]
    if tasks:
        from matplotlib.lines import Line2D

        colours = {m: f"C{i % 10}" for i, m in enumerate(mechanisms)}
        shapes = "osD^vPX*"
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.3), squeeze=False)
        handles = []
        for ax, task in zip(axes[0], tasks):
            values = sorted({k[2] for k in state_keys if k[0] == task})
            for mech in mechanisms:
                for j, value in enumerate(values):
                    # one line per mechanism and S (or pairs) across model widths, as zoology draws it
                    pts = sorted((table[k]["state"], _mean_std(table[k]["acc"])[0]) for k in state_keys
                                 if k[0] == task and k[1] == mech and k[2] == value)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colours[mech],
                                marker=shapes[j % len(shapes)], linestyle="-" if len(pts) > 1 else "none")
            ax.set_xscale("log")
            ax.set_xlabel("recurrent state size (floats per sequence)")
            ax.set_ylabel("hard accuracy" if task == "copying" else "query accuracy")
            ax.set_ylim(-0.03, 1.03)
            axis = "S" if task == "copying" else "pairs"
            ax.set_title(f"{task} (marker: {axis} = " + ", ".join(
                f"{v} {shapes[j % len(shapes)]}" for j, v in enumerate(values)) + ")", fontsize=9)
            ax.grid(alpha=0.3)
        present = [m for m in mechanisms if any(k[1] == m for k in state_keys)]
        handles = [Line2D([], [], color=colours[m], marker="o", label=m) for m in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8)
        fig.suptitle("Accuracy vs recurrent state size (lines join model widths)")
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        fname = "recall_accuracy_vs_state_size.png"
        fig.savefig(figures_dir / fname, dpi=110)
        plt.close(fig)
        lines.append(f"![Accuracy vs recurrent state size]({os.path.relpath(figures_dir / fname, doc.parent)})")
    return lines


def _protocol(results: dict, task: str) -> str | None:
    rec = next((r for r in results.values() if r.get("finished") and r.get("task") == task), None)
    if rec is None:
        return None
    m, t = rec["model"], rec["train"]
    steps = f"{t['max_steps']} steps" if t.get("max_steps") else f"{t['epochs']} epochs"
    if task == "copying":
        d = rec["data"]
        data = (f"fresh random strings every batch, {d['val_examples']} validation and {d['test_examples']} test "
                f"strings per length")
    else:
        d = rec["data"]
        data = (f"vocabulary {d['vocab_size']}, sequences of {d['seq_len']} tokens, power_a {d['power_a']}, "
                f"{d['test_examples']} test sequences")
    sized = ""
    if m.get("match_params"):
        sized = (f"; every model sized to {m['match_params']:,} parameters (within "
                 f"{100 * m.get('match_tolerance', 0.02):g} %) by the matched-parameter rule (`model.match_params`, "
                 f"by {m.get('match_by', 'auto')}: the width, or the QK rank for HyperMLP/HyperGLU), cell by cell")
    return (f"config `{rec['config']}`: {m['n_layers']} blocks, {m['heads']} head(s), MLP ratio {m['mlp_ratio']} "
            f"(Transformer blocks; the CausalRN mixers use the CausalRN block){sized}; {data}; batch "
            f"{t['batch_size']}, {steps}, {t['optimizer']} at {t['lr']:g} ({t['warmup_steps']} warm-up steps, clip "
            f"{t['clip_norm']:g}); mixer options {json.dumps(m['mixer_options'], sort_keys=True)} (each used only by "
            f"the mixer it names).")


def _ablation_cell(mechanism: str) -> tuple[str, str] | None:
    """(prenorm, activation) of a quadratic CausalRN mechanism label, None for any other label."""
    name, _, rest = mechanism.partition(":")
    if name != "causal-rn-quadratic":
        return None
    options = parse_mechanism(mechanism, need="causal")[1] if rest else {}
    if set(options) - {"prenorm", "activation"}:
        return None
    return str(options.get("prenorm", "exact")), str(options.get("activation", "exp"))


def _ablation_lines(table: dict, task: str) -> list[str]:
    """Pre-norm x activation tables of the CausalRN ablation, one per S (or pairs) and width, when the
    study has at least two of its cells."""
    from ..ops.causal_rn import ACTIVATIONS, PRENORMS

    cells = {}
    for key in table:
        if key[0] == task:
            cell = _ablation_cell(key[1])
            if cell is not None:
                cells[(cell, key[2], key[3])] = table[key]
    present = {c for c, _, _ in cells}
    if len(present) < 2:
        return []
    prenorms = [p for p in PRENORMS if any(c[0] == p for c in present)]
    activations = [a for a in ACTIVATIONS if any(c[1] == a for c in present)]
    axis = TASK_AXES[task][1]
    lines = ["CausalRN ablation (quadratic mixer, `causal-rn-quadratic:prenorm=...,activation=...`; the plain "
             "`causal-rn-quadratic` row is the exact + exp cell): test "
             f"{'hard accuracy' if task == 'copying' else 'accuracy'} by pre-activation normalisation and activation.",
             ""]
    several_dims = len({d for _, _, d in cells}) > 1
    for value, dim in sorted({(v, d) for _, v, d in cells}):
        lines += [f"{axis} = {value}" + (f", dim {dim}" if several_dims else "") + ":", "",
                  "| pre-norm | " + " | ".join(activations) + " |",
                  "|" + "---|" * (len(activations) + 1)]
        for prenorm in prenorms:
            row = [_fmt(cells[((prenorm, act), value, dim)]["acc"]) if ((prenorm, act), value, dim) in cells else "—"
                   for act in activations]
            lines.append(f"| {prenorm} | " + " | ".join(row) + " |")
        lines += [""]
    return lines


def copying_checks(table: dict) -> list[str]:
    """The "Checks" section: the CausalRN paper's copying claims against the recorded cells at the longest
    S that softmax reached (the widest model when there are several): the quadratic form copies like a
    Transformer, the linear form and linear attention do not, and copying needs both the exp
    activation and exact pre-activation normalisation. Numbers only; empty without a softmax cell."""
    soft_keys = [k for k in table if k[0] == "copying" and k[1] == "softmax"]
    if not soft_keys:
        return []
    value = max(k[2] for k in soft_keys)
    dim = max(k[3] for k in soft_keys if k[2] == value)

    def acc(mech: str) -> str | None:
        entry = table.get(("copying", mech, value, dim))
        if entry is None or not entry["acc"]:
            return None
        mean, std = _mean_std(entry["acc"])
        return f"{mean:.3f}" + (f" ± {std:.3f}" if len(entry["acc"]) > 1 else "") + f" ({len(entry['acc'])} seed(s))"

    lines = [f"## Checks (copying, S = {value}, test hard accuracy)", "",
             f"- softmax: {acc('softmax')}."]
    quadratic = acc("causal-rn-quadratic")
    if quadratic:
        lines.append(f"- CausalRN: its quadratic form copies like a Transformer. causal-rn-quadratic: {quadratic}.")
    weak = [f"{m}: {a}" for m in ("causal-rn", "linear") if (a := acc(m))]
    if weak:
        lines.append("- CausalRN: its linear form and linear attention do not. " + "; ".join(weak) + ".")
    cells = {}
    for key, entry in table.items():
        cell = _ablation_cell(key[1]) if key[0] == "copying" and key[2] == value and key[3] == dim else None
        if cell is not None and entry["acc"]:
            cells[cell] = _mean_std(entry["acc"])[0]
    others = {c: a for c, a in cells.items() if c != ("exact", "exp")}
    if ("exact", "exp") in cells and others:
        best = max(others, key=others.get)
        lines.append(f"- CausalRN: copying needs both the exp activation and exact pre-activation normalisation. "
                     f"exact + exp: {cells[('exact', 'exp')]:.3f}; the best of the other {len(others)} ablation "
                     f"cells: {best[0]} + {best[1]}, {others[best]:.3f} (means over seeds).")
    return lines + [""]


def write_recall_report(path: Path, results: dict, *, study: RecallStudyConfig, command: str, requested: list[str],
                        unavailable: list[str], figures_dir: Path, source: str | None = None) -> None:
    table = summarise_recall(results)
    source = source or f"{study.run_root}/results.json"
    mechanisms = _order(requested, {k[1] for k in table})
    finished = sum(1 for r in results.values() if r.get("finished"))
    lines = [f"# {study.title}", "", "<!-- generated by `amlp study recall`; do not edit by hand -->", "",
             "Produced by:", "", "```", command, "```", "",
             f"Written {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
             f"`{source}` ({finished} finished runs). Scores are on the test split, mean ± "
             "sample standard deviation over seeds (± 0.000 with one seed). Every model is the same decoder-only "
             "stack (`amlp.models.decoder.DecoderLM`) with only the causal mixer changed.", ""]
    if unavailable:
        lines += [f"Without a causal form in the installation that ran the study (no rows): {', '.join(unavailable)}.",
                  ""]
    for task, heading in (("copying", "Copying"), ("mqar", "Multi-query associative recall (MQAR)")):
        keys = [k for k in table if k[0] == task]
        if not keys:
            continue
        values = sorted({k[2] for k in keys})
        dims = sorted({k[3] for k in keys})
        axis = "S" if task == "copying" else "pairs"
        lines += [f"## {heading}", "", f"Protocol: {_protocol(results, task)}", ""]
        if task == "copying":
            lines += ["Hard accuracy: greedy decoding from `[BOS, s, SEP]` through every mixer's recurrent `step`; "
                      "per string the fraction of correctly copied letters, 0 if EOS is missing at the end or comes "
                      "early. Soft accuracy: teacher-forced argmax over the copy span and EOS.", ""]
        else:
            lines += ["Accuracy: argmax at every query position of the test split.", ""]
        metric = "hard accuracy (soft accuracy)" if task == "copying" else "accuracy"
        matched = any("width" in table[k] for k in keys)
        if matched:
            lines += [f"Width and parameters are those of the row's model at its longest {axis} (the rule sizes every "
                      f"cell on its own: the learned positions grow with {axis}); `dim` in the cell names is the "
                      "config's width, where the rule starts.", ""]
        header = f"| Mixer | {'width' if matched else 'dim'} | params | " + \
            " | ".join(f"{axis} = {v}" for v in values) + f" | state size at {axis} = {values[-1]} | seeds |"
        lines += [f"Test {metric}:", "", header, "|" + "---|" * (len(values) + 5)]
        for mech in mechanisms:
            for dim in dims:
                row_keys = [(task, mech, v, dim) for v in values]
                if not any(k in table for k in row_keys):
                    continue
                cells = []
                for k in row_keys:
                    if k not in table:
                        cells.append("—")
                        continue
                    text = _fmt(table[k]["acc"])
                    if task == "copying":
                        text += f" ({_mean_std(table[k]['soft'])[0]:.3f})"
                    cells.append(text)
                present = [k for k in row_keys if k in table]
                params = table[present[-1]]["params"]
                width = str(dim)
                if "width" in table[present[-1]]:
                    qk = table[present[-1]].get("qk_rank")
                    width = f"{table[present[-1]]['width']}" + (f" (QK rank {qk})" if qk is not None else "")
                state = table[row_keys[-1]]["state"] if row_keys[-1] in table else None
                seeds = "/".join(str(len(table[k]["acc"])) if k in table else "0" for k in row_keys)
                lines.append(f"| {mech} | {width} | {int(params):,} | " + " | ".join(cells) +
                             f" | {'—' if state is None or not math.isfinite(state) else f'{int(state):,}'} | {seeds} |")
        lines += [""]
        lines += _ablation_lines(table, task)
        if task == "copying":
            lines += copying_checks(table)
    if table:
        lines += ["## Plots", "", "State size is the number of floats a mixer keeps per sequence to decode the next "
                  "token (its `state_size(length)` at the task's longest input, summed over blocks): it grows with the "
                  "length for caches (softmax, quadratic CausalRN, HyperMLP/HyperGLU, local up to its window) and is "
                  "fixed for the recurrent forms (linear CausalRN, AMLP-Cov, Performer, cosFormer, ABC).", ""]
        lines += [f"{line}\n" for line in _plots(table, mechanisms, figures_dir, path)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
