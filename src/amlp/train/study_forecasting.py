"""The forecasting study: decoder cross-attention mechanisms x ETT datasets x settings x seeds.

The AMLP paper's cross-attention study (Jiang et al. 2023, section 3.3, Tables 4 and 6) swaps the
decoder cross-attention of an Informer-style forecaster and reports test MSE / MAE on ETTh1, ETTh2
and ETTm1 in the multivariate (M) and univariate (S) settings. :func:`run_study` runs that grid
from a study file, records each finished cell in ``<run_root>/results.json`` (so an interrupted
study resumes where it stopped: finished cells are skipped, an unfinished one continues from its
last checkpoint) and writes the Markdown report with :func:`write_report`.

A study file::

    mechanisms: [softmax, abc, performer, cosformer, amlp-pquery, amlp-cov]
    seeds: [0, 1, 2]
    configs: [configs/forecasting/cpu/etth1_M.yaml, ...]   # one per dataset and setting
    run_root: runs/study/forecasting-cpu
    doc: docs/results/forecasting.md
    overrides: []                                          # key=value applied to every run
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import from_dict, load_config, read_yaml, to_plain

#: the paper's Table 6 (test MSE / MAE), quoted; "vanilla" is softmax attention, "AMLP" is AMLP-Cov
PAPER_TABLE6 = {
    "M": {
        "vanilla": {"ETTh1": (1.257, 0.905), "ETTh2": (3.548, 1.652), "ETTm1": (1.028, 0.813)},
        "ABC": {"ETTh1": (1.332, 0.934), "ETTh2": (3.430, 1.585), "ETTm1": (1.037, 0.784)},
        "Performer": {"ETTh1": (1.455, 0.966), "ETTh2": (4.018, 1.770), "ETTm1": (1.203, 0.832)},
        "cosFormer": {"ETTh1": (1.384, 0.963), "ETTh2": (3.912, 1.707), "ETTm1": (1.021, 0.792)},
        "AMLP": {"ETTh1": (1.247, 0.894), "ETTh2": (2.748, 1.312), "ETTm1": (1.015, 0.792)},
    },
    "S": {
        "vanilla": {"ETTh1": (0.251, 0.240), "ETTh2": (0.266, 0.419), "ETTm1": (0.479, 0.619)},
        "ABC": {"ETTh1": (0.357, 0.522), "ETTh2": (0.294, 0.44), "ETTm1": (0.430, 0.586)},
        "Performer": {"ETTh1": (0.267, 0.440), "ETTh2": (0.255, 0.411), "ETTm1": (0.325, 0.493)},
        "cosFormer": {"ETTh1": (0.311, 0.483), "ETTh2": (0.276, 0.426), "ETTm1": (0.408, 0.568)},
        "AMLP": {"ETTh1": (0.346, 0.509), "ETTh2": (0.260, 0.415), "ETTm1": (0.420, 0.575)},
    },
}
#: the paper's Table 4 (average over ETTh1, ETTh2, ETTm1 and both settings), quoted
PAPER_TABLE4 = {"vanilla": (1.138, 0.775), "ABC": (1.147, 0.809), "Performer": (1.254, 0.819),
                "cosFormer": (1.219, 0.823), "AMLP": (1.006, 0.750)}
PAPER_NAMES = {"softmax": "vanilla", "abc": "ABC", "performer": "Performer", "cosformer": "cosFormer",
               "amlp-cov": "AMLP"}
SETTING_TITLES = {"M": "Multivariate", "S": "Univariate", "MS": "Multivariate to univariate"}


@dataclass
class StudyConfig:
    configs: list[str]
    mechanisms: list[str] = field(default_factory=lambda: ["softmax", "abc", "performer", "cosformer",
                                                           "amlp-pquery", "amlp-cov"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    run_root: str = "runs/study/forecasting"
    doc: str = "docs/results/forecasting.md"
    overrides: list[str] = field(default_factory=list)
    title: str = "Forecasting on ETT: the cross-attention study"

    def validate(self) -> None:
        if not self.configs:
            raise ValueError("config key 'configs' must list at least one forecasting config")
        if not self.mechanisms:
            raise ValueError("config key 'mechanisms' must list at least one mixer name")
        if not self.seeds:
            raise ValueError("config key 'seeds' must list at least one seed")


def load_study(path: str | Path) -> StudyConfig:
    return from_dict(StudyConfig, read_yaml(path))


def cell_key(dataset: str, features: str, mechanism: str, seed: int) -> str:
    return f"{dataset}/{features}/{mechanism}/seed{seed}"


def _read_results(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"the study results file {str(path)!r} is corrupt ({err}); move it away to start over")


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def run_study(study: StudyConfig, *, command: str, mechanisms: list[str] | None = None,
              datasets: list[str] | None = None, settings: list[str] | None = None, seeds: list[int] | None = None,
              extra_overrides: list[str] | None = None, root: Path | None = None,
              log: Callable[[str], None] = print, doc_only: bool = False) -> Path:
    """Run every unfinished cell of the grid, then write the report; returns the report's path.

    ``mechanisms``, ``datasets``, ``settings`` and ``seeds`` restrict the grid. Mechanisms that are
    not registered in this installation are skipped (and shown as missing in the report).
    """
    from ..layers import mixer_names
    from .loop import run_experiment

    root = Path(root or ".")
    run_root = root / study.run_root
    results_path = run_root / "results.json"
    results = _read_results(results_path)
    overrides = list(study.overrides) + list(extra_overrides or [])
    mechs = mechanisms or study.mechanisms
    available = set(mixer_names(cross=True))
    cells = []
    for cfg_path in study.configs:
        base = load_config(root / cfg_path, overrides)
        if datasets and base.data.dataset not in datasets:
            continue
        if settings and base.data.features not in settings:
            continue
        for mech in mechs:
            if mech not in available:
                continue
            for seed in seeds or study.seeds:
                cells.append((cfg_path, base.data.dataset, base.data.features, mech, seed))
    skipped = [m for m in mechs if m not in available]
    if skipped:
        log(f"not registered in this installation, skipped: {', '.join(skipped)}")
    if not doc_only:
        for i, (cfg_path, dataset, features, mech, seed) in enumerate(cells, 1):
            key = cell_key(dataset, features, mech, seed)
            if key in results and results[key].get("finished"):
                log(f"[{i}/{len(cells)}] {key}: done before, skipped")
                continue
            log(f"[{i}/{len(cells)}] {key}: training")
            cfg = load_config(root / cfg_path, overrides + [f"model.cross_mixer={mech}", f"seed={seed}"])
            run_dir = run_root / f"{dataset}_{features}" / mech / f"seed{seed}"
            result = run_experiment(cfg, run_dir, resume="auto")
            record = {"finished": True, "dataset": dataset, "features": features, "mechanism": mech,
                            "seed": seed, "config": str(cfg_path), "overrides": overrides, "steps": result.step,
                            "test": result.test_metrics, "val": result.val_metrics,
                            "run_dir": str(run_dir.relative_to(root) if run_dir.is_relative_to(root) else run_dir),
                            "train": to_plain(cfg.train), "model": to_plain(cfg.model),
                            "data": to_plain(cfg.data)}
            # re-read before writing, so that studies of other cells running at the same time
            # (separate processes sharing run_root) do not drop each other's records
            results = _read_results(results_path)
            results[key] = record
            _write_json_atomic(results_path, results)
            log(f"    test mse {result.test_metrics['mse']:.4f}  mae {result.test_metrics['mae']:.4f}")
    doc = root / study.doc
    results = _read_results(results_path)
    write_report(doc, results, study=study, command=command, requested=mechs, unavailable=skipped)
    log(f"report written to {doc}")
    return doc


# -- the report ---------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = _mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def summarise(results: dict) -> dict:
    """{(features, mechanism, dataset): {"mse": [...], "mae": [...], "seeds": [...]}} over finished cells."""
    table: dict = {}
    for rec in results.values():
        if not rec.get("finished") or not rec.get("test"):
            continue
        entry = table.setdefault((rec["features"], rec["mechanism"], rec["dataset"]), {"mse": [], "mae": [], "seeds": []})
        entry["mse"].append(rec["test"]["mse"])
        entry["mae"].append(rec["test"]["mae"])
        entry["seeds"].append(rec["seed"])
    return table


def write_report(path: Path, results: dict, *, study: StudyConfig, command: str, requested: list[str],
                 unavailable: list[str]) -> None:
    table = summarise(results)
    datasets = [d for d in ("ETTh1", "ETTh2", "ETTm1", "ETTm2") if any(k[2] == d for k in table)]
    settings = [s for s in ("M", "S", "MS") if any(k[0] == s for k in table)]
    mechanisms = [m for m in requested if any(k[1] == m for k in table)]
    mechanisms += sorted({k[1] for k in table} - set(mechanisms))
    configs = sorted({rec["config"] for rec in results.values() if rec.get("finished")})
    example = next((rec for rec in results.values() if rec.get("finished")), None)
    lines = [f"# {study.title}", "",
             "<!-- generated by `amlp study forecasting`; do not edit by hand -->", "",
             "Produced by:", "", "```", command, "```", "",
             f"Written {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
             f"`{study.run_root}/results.json` ({sum(1 for r in results.values() if r.get('finished'))} finished runs).",
             "", "Only the decoder cross-attention changes between rows; encoder self-attention and decoder "
             "self-attention are softmax attention (the decoder's causal, as in Informer). Scores are test MSE and "
             "MAE on the standardised scale (scaler fitted on the training split), mean ± sample standard "
             "deviation over seeds.", ""]
    if example is not None:
        d, m, t = example["data"], example["model"], example["train"]
        steps = f"{t['max_steps']} steps" if t.get("max_steps") else f"{t['epochs']} epochs"
        lines += [f"Protocol: configs {', '.join(f'`{c}`' for c in configs)}; d_model {m['d_model']}, {m['heads']} heads, "
                  f"{m['e_layers']} encoder / {m['d_layers']} decoder layers, d_ff {m['d_ff']}; windows "
                  f"(seq_len/label_len/pred_len) as in each config (e.g. {d['seq_len']}/{d['label_len']}/{d['pred_len']}); "
                  f"batch {t['batch_size']}, {steps}, {t['optimizer']} at {t['lr']:g}, {t['schedule']} schedule; "
                  f"mechanism options {json.dumps({k: v for k, v in m['mixer_options'].items() if k in mechanisms})}.",
                  ""]
    if unavailable:
        lines += [f"Not registered in the installation that ran the study (no rows): {', '.join(unavailable)}.", ""]
    lines += ["## Results of this implementation (layout of the paper's Table 6)", ""]
    header = "| Setting | Cross-attention | " + " | ".join(f"{d} MSE | {d} MAE" for d in datasets) + \
        f" | seeds ({' / '.join(datasets)}) |"
    lines += [header, "|" + "---|" * (3 + 2 * len(datasets))]
    for s in settings:
        for mech in mechanisms:
            cells, seeds = [], []
            for d in datasets:
                entry = table.get((s, mech, d), {"mse": [], "mae": [], "seeds": []})
                cells += [_fmt(entry["mse"]), _fmt(entry["mae"])]
                seeds.append(str(len(entry["seeds"])))
            if all(c == "—" for c in cells):
                continue
            lines.append(f"| {SETTING_TITLES[s]} | {mech} | " + " | ".join(cells) + f" | {' / '.join(seeds)} |")
    # the overall average uses only the (dataset, setting) cells every mechanism above has
    common = sorted({(s, d) for (s, m, d) in table}, key=lambda c: (c[1], c[0]))
    common = [c for c in common if all((c[0], m, c[1]) in table for m in mechanisms)]
    lines += ["", "## Overall (layout of the paper's Table 4)", "",
              "Mean of the per-cell seed means over the dataset × setting cells that every mechanism above has: "
              + (", ".join(f"{d} {s}" for s, d in common) or "none") + ".", "",
              "| Cross-attention | MSE | MAE |", "|---|---|---|"]
    for mech in mechanisms if common else []:
        cell_means = [(statistics.fmean(table[(s, mech, d)]["mse"]), statistics.fmean(table[(s, mech, d)]["mae"]))
                      for s, d in common]
        lines.append(f"| {mech} | {statistics.fmean(c[0] for c in cell_means):.3f} | "
                     f"{statistics.fmean(c[1] for c in cell_means):.3f} |")
    lines += ["", "## Reference: the paper's numbers (quoted, not produced by this code)", "",
              "Jiang et al. 2023, *Attentive MLP for Non-Autoregressive Generation*, Table 6 (full protocol: "
              "Informer backbone, windows of spec section 2.9, 6 epochs, 5 runs). \"vanilla\" is softmax "
              "attention (`softmax` here); \"AMLP\" is AMLP-Cov (`amlp-cov`); ABC, Performer and cosFormer are "
              "`abc`, `performer`, `cosformer`. The paper reports no AMLP-PQuery row for this task.", "",
              "| Setting | Model | ETTh1 MSE | ETTh1 MAE | ETTh2 MSE | ETTh2 MAE | ETTm1 MSE | ETTm1 MAE |",
              "|---|---|---|---|---|---|---|---|"]
    for s, rows in PAPER_TABLE6.items():
        for model, vals in rows.items():
            lines.append(f"| {SETTING_TITLES[s]} | {model} | " + " | ".join(
                f"{vals[d][0]:.3f} | {vals[d][1]:.3f}" for d in ("ETTh1", "ETTh2", "ETTm1")) + " |")
    lines += ["", "Table 4 (average over ETTh1, ETTh2, ETTm1 and both settings):", "",
              "| Model | MSE | MAE |", "|---|---|---|"]
    for model, (mse, mae) in PAPER_TABLE4.items():
        lines.append(f"| {model} | {mse:.3f} | {mae:.3f} |")
    lines += [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
