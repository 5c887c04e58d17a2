"""The forecasting study: decoder cross-attention mechanisms x ETT datasets x settings x seeds.

The AMLP paper's cross-attention study (Jiang et al. 2023, section 3.3, Tables 4 and 6) swaps the
decoder cross-attention of an Informer-style forecaster and reports test MSE / MAE on ETTh1, ETTh2
and ETTm1 in the multivariate (M) and univariate (S) settings. :func:`run_study` runs that grid
from a study file, records each finished cell in ``<run_root>/results.json`` (so an interrupted
study resumes where it stopped: finished cells are skipped, an unfinished one continues from its
last checkpoint) and writes the Markdown report with :func:`write_report`: to
``<run_root>/report.md``, or, when asked (``write_doc``, ``--write-doc``), to the tracked document
``doc``, which it writes only from a complete grid.

A study file::

    mechanisms: [softmax, abc, amlp-cov:form=official]     # mixer[:key=value,...] (cross-attention only)
    seeds: [0, 1, 2]
    configs: [configs/forecasting/cpu/etth1_M.yaml, ...]   # one per dataset and setting
    run_root: runs/study/forecasting-cpu
    doc: docs/results/forecasting.md
    overrides: []                                          # key=value applied to every run
    references: true                                       # trivial forecasts as reference rows
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import from_dict, load_config, read_study_file, to_plain

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
    #: the tracked results document, written only with ``write_doc`` and from a complete grid
    doc: str = "docs/results/forecasting.md"
    overrides: list[str] = field(default_factory=list)
    title: str = "Forecasting on ETT: the cross-attention study"
    #: trivial forecasts (repeat the last observed value; the training mean) as reference rows
    references: bool = True

    def validate(self) -> None:
        if not self.configs:
            raise ValueError("config key 'configs' must list at least one forecasting config")
        if not self.mechanisms:
            raise ValueError("config key 'mechanisms' must list at least one mixer name")
        if not self.seeds:
            raise ValueError("config key 'seeds' must list at least one seed")
        for label in self.mechanisms:
            parse_mechanism(label)


def load_study(path: str | Path) -> StudyConfig:
    return from_dict(StudyConfig, read_study_file(path))


def parse_mechanism(label: str, need: str = "cross") -> tuple[str, dict]:
    """``"amlp-cov"`` -> ("amlp-cov", {}); ``"amlp-cov:form=official,landmarks=8"`` -> ("amlp-cov",
    {"form": "official", "landmarks": 8}): a registered mixer with the form a study needs (``need``:
    ``cross`` or ``causal``) and options for it (values parsed as YAML). Raises ``ValueError``
    naming the label. ``need="noncausal"`` asks for a non-causal form."""
    from ..layers import mixer_names
    from .config import yaml_load

    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"a mechanism must be a mixer name, optionally with :key=value options, got {label!r}")
    name, colon, rest = label.strip().partition(":")
    available = mixer_names(causal=False) if need == "noncausal" else mixer_names(**{need: True})
    if name not in available:
        form = "non-causal" if need == "noncausal" else need
        raise ValueError(f"unknown mechanism {label!r}: {name!r} is not a registered mixer with a {form} form; "
                         f"available: {', '.join(available)}")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"mechanism {label!r}: option {item!r} must look like key=value")
        options[key.strip()] = yaml_load(raw) if raw.strip() else None
    if colon and not options:
        raise ValueError(f"mechanism {label!r}: nothing after ':'; give options as key=value,key=value")
    return name, options


def mechanism_dir(label: str) -> str:
    """A folder name for a mechanism label (``amlp-cov:form=official`` -> ``amlp-cov_form-official``)."""
    return label.replace(":", "_").replace("=", "-").replace(",", "_").replace("/", "-")


def cell_key(dataset: str, features: str, mechanism: str, seed: int) -> str:
    return f"{dataset}/{features}/{mechanism}/seed{seed}"


def reference_key(dataset: str, features: str) -> str:
    return f"reference/{dataset}/{features}"


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


def _record(results_path: Path, key: str, record: dict) -> dict:
    # read, update and write under a lock, so that studies of other cells running at the same time
    # (separate processes sharing run_root) do not drop each other's records
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with open(results_path.with_name(results_path.name + ".lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - no flock on this platform
            pass
        results = _read_results(results_path)
        results[key] = record
        _write_json_atomic(results_path, results)
    return results


def trivial_forecasts(cfg) -> dict[str, dict[str, float]]:
    """Test MSE / MAE (standardised scale, every window) of two forecasts that learn nothing:
    ``repeat-last`` (the last observed value of each output column, for every future step) and
    ``train-mean`` (the training mean, 0 after standardisation)."""
    import torch

    from ..tasks.forecasting.task import ForecastingTask

    task = ForecastingTask(cfg)
    windows = task.dataset("test")
    d = cfg.data
    cols = slice(None) if d.features == "M" else slice(task.data.target_index, task.data.target_index + 1)
    starts = torch.as_tensor(windows.starts)
    future = starts[:, None] + d.seq_len + torch.arange(d.pred_len)[None, :]  # [N, pred_len]
    target = windows.data[future][..., cols].double()
    last = windows.data[starts + d.seq_len - 1][:, None, cols].double()
    out = {}
    for name, pred in (("repeat-last", last.expand_as(target)), ("train-mean", torch.zeros_like(target))):
        err = pred - target
        out[name] = {"mse": float(err.square().mean()), "mae": float(err.abs().mean())}
    return out


@dataclass
class _Cell:
    config: str
    dataset: str
    features: str
    mechanism: str
    seed: int

    @property
    def key(self) -> str:
        return cell_key(self.dataset, self.features, self.mechanism, self.seed)


def _grid(study: StudyConfig, root: Path, overrides: list[str], mechanisms: list[str], datasets, settings, seeds):
    bases = [(cfg_path, load_config(root / cfg_path, overrides)) for cfg_path in study.configs]
    known_datasets = sorted({b.data.dataset for _, b in bases})
    known_settings = sorted({b.data.features for _, b in bases})
    for name, wanted, known in (("--datasets", datasets, known_datasets), ("--settings", settings, known_settings)):
        unknown = [w for w in wanted or [] if w not in known]
        if unknown:
            raise ValueError(f"{name}: {', '.join(map(repr, unknown))} not in this study (it has "
                             f"{', '.join(known)})")
    cells = [_Cell(p, b.data.dataset, b.data.features, m, s) for p, b in bases
             if (not datasets or b.data.dataset in datasets) and (not settings or b.data.features in settings)
             for m in mechanisms for s in seeds]
    return bases, cells


def missing_cells(study: StudyConfig, results: dict, root: Path, overrides: list[str]) -> list[str]:
    """Keys of the study's full grid (every config, mechanism and seed of the study file) that have
    no finished record."""
    _, cells = _grid(study, root, overrides, study.mechanisms, None, None, study.seeds)
    return [c.key for c in cells if not results.get(c.key, {}).get("finished")]


def run_study(study: StudyConfig, *, command: str, mechanisms: list[str] | None = None,
              datasets: list[str] | None = None, settings: list[str] | None = None, seeds: list[int] | None = None,
              extra_overrides: list[str] | None = None, root: Path | None = None,
              log: Callable[[str], None] = print, doc_only: bool = False, write_doc: bool = False) -> Path:
    """Run every unfinished cell of the grid, then write the report; returns the report's path.

    ``mechanisms``, ``datasets``, ``settings`` and ``seeds`` restrict the grid; an unknown one is an
    error. The report goes to ``<run_root>/report.md``; with ``write_doc`` it goes to the study's
    tracked ``doc`` instead, and only when every cell of the study's full grid is finished (else a
    ``ValueError`` lists the missing cells and nothing is written).
    """
    from .loop import run_experiment

    study.validate()
    root = Path(root or ".")
    run_root = root / study.run_root
    results_path = run_root / "results.json"
    overrides = list(study.overrides) + list(extra_overrides or [])
    mechs = list(mechanisms or study.mechanisms)
    parsed = {m: parse_mechanism(m) for m in mechs}
    bases, cells = _grid(study, root, overrides, mechs, datasets, settings, list(seeds or study.seeds))
    if write_doc:
        # refuse before any work when the grid this call covers cannot complete the document
        outside = [k for k in missing_cells(study, _read_results(results_path), root, overrides)
                   if k not in {c.key for c in cells}]
        if outside:
            raise ValueError(_refusal(study, outside))
    if not doc_only:
        if study.references:
            for cfg_path, base in bases:
                key = reference_key(base.data.dataset, base.data.features)
                if (datasets and base.data.dataset not in datasets) or (settings and base.data.features not in settings):
                    continue
                if key not in _read_results(results_path):
                    _record(results_path, key, {"reference": True, "dataset": base.data.dataset,
                                                "features": base.data.features, "config": str(cfg_path),
                                                "test": trivial_forecasts(base), "data": to_plain(base.data)})
        for i, cell in enumerate(cells, 1):
            results = _read_results(results_path)
            if results.get(cell.key, {}).get("finished"):
                log(f"({i}/{len(cells)}) {cell.key}: done before, skipped")
                continue
            log(f"({i}/{len(cells)}) {cell.key}: training")
            mixer, options = parsed[cell.mechanism]
            cell_overrides = [f"model.cross_mixer={mixer}", f"seed={cell.seed}"]
            cell_overrides += [f"model.cross_options.{k}={json.dumps(v)}" for k, v in options.items()]
            cfg = load_config(root / cell.config, overrides + cell_overrides)
            run_dir = run_root / f"{cell.dataset}_{cell.features}" / mechanism_dir(cell.mechanism) / f"seed{cell.seed}"
            result = run_experiment(cfg, run_dir, resume="auto", same_config=True)
            record = {"finished": True, "dataset": cell.dataset, "features": cell.features,
                      "mechanism": cell.mechanism, "seed": cell.seed, "config": str(cell.config),
                      "overrides": overrides, "steps": result.step, "tested_step": result.tested_step,
                      "best": result.best, "test": result.test_metrics, "val": result.val_metrics,
                      "run_dir": str(run_dir.relative_to(root) if run_dir.is_relative_to(root) else run_dir),
                      "train": to_plain(cfg.train), "model": to_plain(cfg.model), "data": to_plain(cfg.data)}
            _record(results_path, cell.key, record)
            log(f"    test mse {result.test_metrics['mse']:.4f}  mae {result.test_metrics['mae']:.4f}")
    results = _read_results(results_path)
    if write_doc:
        missing = missing_cells(study, results, root, overrides)
        if missing:
            raise ValueError(_refusal(study, missing))
        doc = root / study.doc
    else:
        doc = run_root / "report.md"
    write_report(doc, results, study=study, command=command, requested=study.mechanisms if write_doc else mechs)
    log(f"report written to {doc}")
    return doc


def grid_refusal(doc: str, missing: list[str]) -> str:
    """Why a study's tracked document is not written: the cells of its grid with no finished run."""
    shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
    return (f"not writing {doc}: {len(missing)} cell(s) of the study's grid have no finished run ({shown}); "
            "run the whole grid first (drop --write-doc to get a report of what is there)")


def _refusal(study: StudyConfig, missing: list[str]) -> str:
    return grid_refusal(study.doc, missing)


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


REFERENCE_ROWS = {"repeat-last": "*repeat the last value*", "train-mean": "*training mean*"}


def _protocol(results: dict, mechanisms: list[str]) -> list[str]:
    example = next((rec for rec in results.values() if rec.get("finished")), None)
    if example is None:
        return []
    configs = sorted({rec["config"] for rec in results.values() if rec.get("finished")})
    d, m, t = example["data"], example["model"], example["train"]
    steps = f"{t['max_steps']} steps" if t.get("max_steps") else f"{t['epochs']} epochs"
    evals = f"every {t['eval_every']} steps" if t.get("eval_every") else "at the end of every epoch"
    val = "every validation window" if d.get("val_stride", 1) == 1 else f"every {d['val_stride']}th validation window"
    tested = ("the weights of the best validation MSE (as Informer)" if t.get("test_checkpoint") == "best"
              else "the last step's weights")
    options = {k: v for k, v in m["mixer_options"].items() if k in {parse_mechanism(x)[0] for x in mechanisms}
               or k == m.get("self_mixer")}
    return [f"Protocol: configs {', '.join(f'`{c}`' for c in configs)}; d_model {m['d_model']}, {m['heads']} heads "
            f"(head width {m['d_model'] // m['heads']}), {m['e_layers']} encoder / {m['d_layers']} decoder layers, "
            f"d_ff {m['d_ff']}, dropout {m['dropout']}, embedding biases {'on' if m.get('embedding_bias') else 'off'}; "
            f"windows (seq_len/label_len/pred_len) as in each config (e.g. {d['seq_len']}/{d['label_len']}/"
            f"{d['pred_len']}); batch {t['batch_size']}, {steps}, {t['optimizer']} at {t['lr']:g}, {t['schedule']} "
            f"schedule; validation {evals} on {val}; the test uses {tested}; mixer options "
            f"{json.dumps(options, sort_keys=True)}.", ""]


def write_report(path: Path, results: dict, *, study: StudyConfig, command: str, requested: list[str]) -> None:
    table = summarise(results)
    refs = {(rec["features"], rec["dataset"]): rec["test"] for rec in results.values() if rec.get("reference")}
    datasets = [d for d in ("ETTh1", "ETTh2", "ETTm1", "ETTm2") if any(k[2] == d for k in table)]
    datasets += sorted({k[2] for k in table} - set(datasets))
    settings = [s for s in ("M", "S", "MS") if any(k[0] == s for k in table)]
    mechanisms = [m for m in requested if any(k[1] == m for k in table)]
    mechanisms += sorted({k[1] for k in table} - set(mechanisms))
    finished = sum(1 for r in results.values() if r.get("finished"))
    lines = [f"# {study.title}", "",
             "<!-- generated by `amlp study forecasting`; do not edit by hand -->", "",
             "Produced by:", "", "```", command, "```", "",
             f"Written {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
             f"`{study.run_root}/results.json` ({finished} finished runs).",
             "", "Only the decoder cross-attention changes between rows; encoder self-attention and decoder "
             "self-attention are softmax attention (the decoder's causal, as in Informer). A row named "
             "`mixer:key=value` is that mixer with those options in the cross-attention only (for AMLP, "
             "`form=paper`, `form=official` or `form=stable`: docs/amlp_forms.md). Scores are test MSE and "
             "MAE on the standardised scale (scaler fitted on the training split), mean ± sample standard "
             "deviation over seeds. The rows in italics are forecasts that learn nothing, computed on the same "
             "test windows: repeating the last observed value, and the training mean (0 after scaling).", ""]
    lines += _protocol(results, mechanisms)
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
        for name, title in REFERENCE_ROWS.items():
            cells = []
            for d in datasets:
                ref = refs.get((s, d))
                cells += ([f"{ref[name]['mse']:.3f}", f"{ref[name]['mae']:.3f}"] if ref else ["—", "—"])
            if any(c != "—" for c in cells):
                lines.append(f"| {SETTING_TITLES[s]} | {title} | " + " | ".join(cells) + " | — |")
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
    if common and all((s, d) in refs for s, d in common):
        for name, title in REFERENCE_ROWS.items():
            lines.append(f"| {title} | {statistics.fmean(refs[c][name]['mse'] for c in common):.3f} | "
                         f"{statistics.fmean(refs[c][name]['mae'] for c in common):.3f} |")
    lines += ["", "## Reference: the paper's numbers (quoted, not produced by this code)", "",
              "Jiang et al. 2023, *Attentive MLP for Non-Autoregressive Generation*, Table 6 (full protocol: "
              "Informer backbone, windows of the CAB LSTF scripts, 6 epochs, 5 runs). \"vanilla\" is softmax "
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
