"""The MAD study: test accuracy on the six MAD tasks for every causal mixer, the MAD score (the mean of
the six), and ablations of HyperMLP / HyperGLU through the switches of :mod:`amlp.layers.hypermlp`.

Every cell is one ``amlp train mad`` run of one task's config in ``<run_root>/<task>/<mechanism>/seed<s>``
with ``model.mixer`` set to the row's mixer (its ``:key=value`` options merged into the config's options
for that mixer). Finished cells are recorded in ``<run_root>/results.json`` (and, when the study names
one, in its tracked ``records`` file, so that the grid continues on another machine) and skipped when
the study runs again (an unfinished cell continues from its last checkpoint; studies of other cells may run at the
same time on the same ``run_root``). Cells run row by row, so a row's MAD score is complete early.

A study file::

    title: "..."
    configs: [configs/mad/cpu/in-context-recall.yaml, ...]      # one per MAD task
    mechanisms: [softmax, linear, "amlp-cov:form=stable,landmarks=16", hyper-mlp, hyper-glu]
    ablations: ["hyper-mlp:sequence_mixing=none", "hyper-glu:sequence_mixing=qk"]
    seeds: [0]
    run_root: runs/study/mad-cpu
    records: docs/results/records/mad-cpu.json   # tracked finished cells (optional)
    doc: docs/results/mad.md
    overrides: []
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...train.config import from_dict, load_config, read_study_file
from ...train.study_common import (cell_record, cell_store, check_doc_selection, check_protocols, fmt_seeds,
                                   report_path)
from ...train.study_forecasting import mechanism_dir
from ..lm.study import check_causal_mechanism, mechanism_label, mechanism_overrides
from .data import MAD_TASK_NAMES

TASK_TITLES = {"in-context-recall": "in-context recall", "fuzzy-in-context-recall": "fuzzy recall",
               "noisy-in-context-recall": "noisy recall", "selective-copying": "selective copying",
               "compression": "compression", "memorization": "memorization"}

#: the HyperMLP paper's MAD averages (Table 1, %), as reported for that table; the variant names are
#: the paper's
PAPER_TABLE1_MAD = {"R-cg-q": 66.78, "R-cg-q-12o": 81.01}
#: this study's rows that correspond to those variants (R: ReLU base, i.e. HyperMLP; c, g: the KV
#: convolution and the gates, on by default; q: compressed QK rank, the default; 12o: both
#: sequence-mixing operators in the lag layout)
PAPER_ROWS = {"hyper-mlp:sequence_mixing=none": "R-cg-q", "hyper-mlp": "R-cg-q-12o"}


@dataclass
class MADStudyConfig:
    configs: list[str]
    mechanisms: list[str]
    ablations: list[str] = field(default_factory=list)
    title: str = "MAD synthetic tasks: causal mixers and HyperMLP ablations"
    seeds: list[int] = field(default_factory=lambda: [0])
    run_root: str = "runs/study/mad-cpu"
    #: a tracked file of the finished cells' records, so that the grid continues on another machine;
    #: None: only ``<run_root>/results.json``
    records: str | None = None
    doc: str = "docs/results/mad.md"
    overrides: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[str]:
        return list(self.mechanisms) + list(self.ablations)

    def validate(self) -> None:
        if not self.configs:
            raise ValueError("study key 'configs' must list at least one MAD config")
        if not self.mechanisms:
            raise ValueError("study key 'mechanisms' must list at least one mechanism")
        if len(set(self.rows)) != len(self.rows):
            raise ValueError(f"study keys 'mechanisms' and 'ablations' must list distinct mechanisms, got {self.rows}")
        for mech in self.rows:
            check_causal_mechanism(mech)
        if not self.seeds:
            raise ValueError("study key 'seeds' must list at least one seed")


def load_mad_study(path: str | Path) -> MADStudyConfig:
    return from_dict(MADStudyConfig, read_study_file(path))


def cell_key(task: str, mechanism: str, seed: int) -> str:
    return f"{task}/{mechanism}/seed{seed}"


def study_tasks(study: MADStudyConfig, root: Path, overrides: list[str] | None = None) -> dict[str, str]:
    """{MAD task: config path} of the study's configs, in MAD's order; each config must be a ``mad``
    config and each task appear once."""
    out: dict[str, str] = {}
    for path in study.configs:
        cfg = load_config(root / path, list(overrides or []))
        if cfg.task != "mad":
            raise ValueError(f"study config {path!r} is a {cfg.task!r} config, not a MAD one")
        if cfg.data.task in out:
            raise ValueError(f"study configs {out[cfg.data.task]!r} and {path!r} are both {cfg.data.task}")
        out[cfg.data.task] = path
    return {t: out[t] for t in MAD_TASK_NAMES if t in out}


def study_cells(study: MADStudyConfig, tasks: list[str]) -> list[tuple[str, str, int]]:
    """Every (mechanism, task, seed) of the grid, row by row."""
    return [(mech, task, s) for mech in study.rows for task in tasks for s in study.seeds]


def missing_cells(study: MADStudyConfig, tasks: list[str], results: dict) -> list[str]:
    keys = [cell_key(t, m, s) for m, t, s in study_cells(study, tasks)]
    return [k for k in keys if not results.get(k, {}).get("finished")]


def _cell_overrides(mech: str, seed: int) -> list[str]:
    """The overrides that make a cell of its task's config: seed and mixer."""
    return [f"seed={seed}"] + mechanism_overrides(mech)


def run_mad_study(study: MADStudyConfig, *, command: str, mechanisms: list[str] | None = None,
                  tasks: list[str] | None = None, seeds: list[int] | None = None,
                  extra_overrides: list[str] | None = None, root: Path | None = None,
                  log: Callable[[str], None] = print, doc_only: bool = False, write_doc: bool = False) -> Path:
    """Run every unfinished cell (restricted to ``mechanisms`` (rows, ablations included) / ``tasks`` /
    ``seeds`` when given), then write the report to ``<run_root>/report.md``, or with ``write_doc`` to
    the study's ``doc``, only from a complete grid (else ``ValueError`` listing the missing cells,
    before any work)."""
    from ...train.loop import run_experiment
    from ..translation.study import _tested_checkpoint

    study.validate()
    root = Path(root or ".")
    run_root = root / study.run_root
    store = cell_store(root, run_root, study.records, extra_overrides or [], log)
    overrides = list(study.overrides) + list(extra_overrides or [])
    configs = study_tasks(study, root, overrides)
    for name, wanted, known in (("--mechanisms", mechanisms, study.rows), ("--tasks", tasks, list(configs))):
        unknown = [w for w in wanted or [] if w not in known]
        if unknown:
            raise ValueError(f"{name}: {', '.join(map(repr, unknown))} not in this study (it has {'; '.join(known)})")
    cells = [(m, t, s) for m, t, s in study_cells(study, list(configs))
             if (not mechanisms or m in mechanisms) and (not tasks or t in tasks) and (not seeds or s in seeds)]
    if write_doc:
        check_doc_selection(study.doc, missing_cells(study, list(configs), store.read()),
                            (cell_key(t, m, s) for m, t, s in cells))

    def config_now(mech: str, task: str, seed: int):
        return lambda record: load_config(root / configs[task], overrides + _cell_overrides(mech, seed))

    checked = study_cells(study, list(configs)) if write_doc else cells
    check_protocols(store.read(), ((cell_key(t, m, s), config_now(m, t, s)) for m, t, s in checked),
                    store.source(root))
    if not doc_only:
        for i, (mech, task, seed) in enumerate(cells, 1):
            key = cell_key(task, mech, seed)
            if store.finished(key):
                log(f"({i}/{len(cells)}) {key}: done before, skipped")
                continue
            cell_overrides = _cell_overrides(mech, seed)
            cfg = load_config(root / configs[task], overrides + cell_overrides)
            run_dir = run_root / task / mechanism_dir(mech) / f"seed{seed}"
            log(f"({i}/{len(cells)}) {key}: training in {run_dir}")
            result = run_experiment(cfg, run_dir, resume="auto", same_config=True)
            ckpt = _tested_checkpoint(run_dir, cfg)
            record = cell_record(cfg, result, root=root, config=configs[task], overrides=overrides + cell_overrides,
                                 run_dir=run_dir, checkpoint=ckpt, task=task, mechanism=mech, seed=seed,
                                 test=result.test_metrics)
            store.record(key, record)
            log(f"    {key}: test accuracy {(result.test_metrics or {}).get('acc', float('nan')):.4f}")
    results = store.read()
    doc = report_path(root, run_root, study.doc, missing_cells(study, list(configs), results), write_doc)
    write_mad_report(doc, results, study=study, tasks=list(configs), command=command, source=store.source(root))
    log(f"report written to {doc}")
    return doc


# -- the report ------------------------------------------------------------------------------------------------
def _accs(results: dict, mech: str, task: str) -> list[float]:
    return [100.0 * r["test"]["acc"] for r in results.values()
            if r.get("finished") and r.get("mechanism") == mech and r.get("task") == task
            and (r.get("test") or {}).get("acc") is not None]


def mad_row_score(results: dict, mech: str, tasks: list[str]) -> float | None:
    """The MAD score of a row in %: the mean over the six tasks of the mean over seeds; None unless
    every one of the six has a finished cell."""
    from .data import mad_score

    if set(tasks) != set(MAD_TASK_NAMES):
        return None
    means = {}
    for task in tasks:
        accs = _accs(results, mech, task)
        if not accs:
            return None
        means[task] = statistics.fmean(accs)
    return mad_score(means)


def _params(results: dict, mech: str, task: str) -> str:
    recs = [r for r in results.values() if r.get("finished") and r.get("mechanism") == mech and r.get("task") == task]
    value = (recs[0].get("test") or {}).get("params") if recs else None
    return f"{int(value):,}" if value is not None else "—"


def _table(results: dict, rows: list[str], tasks: list[str], paper: bool) -> list[str]:
    ptask = "in-context-recall" if "in-context-recall" in tasks else tasks[0]
    header = ("| mixer | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " | MAD score | seeds | "
              f"parameters ({TASK_TITLES.get(ptask, ptask)}) |" + (" paper MAD average (Table 1) |" if paper else ""))
    lines = [header, "|" + "---|" * (len(tasks) + 4 + (1 if paper else 0))]
    for mech in rows:
        score = mad_row_score(results, mech, tasks)
        seeds = sorted({len(_accs(results, mech, t)) for t in tasks})
        cells = [mechanism_label(mech)] + [fmt_seeds(_accs(results, mech, t), 2) for t in tasks]
        cells += [f"{score:.2f}" if score is not None else "—", "/".join(map(str, seeds)),
                  _params(results, mech, ptask)]
        if paper:
            variant = PAPER_ROWS.get(mech)
            cells.append(f"{PAPER_TABLE1_MAD[variant]:.2f} ({variant})" if variant else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


#: the HyperMLP paper's Table 1 findings that this study's rows can test: (finding, [(row, row it is
#: compared with)]); the first row of a pair is the paper's better variant
PAPER_FINDINGS = (
    ("sequence mixing is the dominant gain (R-cg-q 66.78 to R-cg-q-12o 81.01)",
     [("hyper-mlp", "hyper-mlp:sequence_mixing=none"), ("hyper-glu", "hyper-glu:sequence_mixing=none")]),
    ("removing the lag layout collapses performance",
     [("hyper-mlp", "hyper-mlp:layout=absolute"), ("hyper-glu", "hyper-glu:layout=absolute")]),
    ("two-sided mixing beats one-sided (G-cg-q-12o against G-cg-q-1o)",
     [("hyper-glu", "hyper-glu:sequence_mixing=qk"), ("hyper-glu", "hyper-glu:sequence_mixing=vo")]),
    ("variants without the convolution (R-g-q-12o) still beat the baselines",
     [("hyper-mlp:kv_conv=false", "softmax")]),
)


def mad_checks(results: dict, study: MADStudyConfig, tasks: list[str]) -> list[str]:
    """The "Checks" section: each finding of the paper's Table 1 that the study's rows can test, with
    the MAD scores of the rows it compares (pairs whose two rows both have a score; empty when none)."""
    rows = set(study.rows)
    lines = []
    for finding, pairs in PAPER_FINDINGS:
        parts = []
        for better, other in pairs:
            if better not in rows or other not in rows:
                continue
            a, b = mad_row_score(results, better, tasks), mad_row_score(results, other, tasks)
            if a is not None and b is not None:
                parts.append(f"{mechanism_label(better)} {a:.2f} against {mechanism_label(other)} {b:.2f} "
                             f"({a - b:+.2f})")
        if parts:
            lines.append(f"- The paper: {finding}. Here: {'; '.join(parts)}.")
    if not lines:
        return []
    return ["## Checks", "", "MAD scores (%) of the rows each finding of the paper's Table 1 compares, the paper's "
            "better variant first:", ""] + lines + [""]


def write_mad_report(path: Path, results: dict, *, study: MADStudyConfig, tasks: list[str], command: str,
                     source: str | None = None) -> None:
    finished = [r for r in results.values() if r.get("finished")]
    source = source or f"{study.run_root}/results.json"
    lines = [f"# {study.title}", "",
             f"Generated by `{command}` from `{source}` ({len(finished)} finished runs). Test "
             "accuracy (%) on each MAD task: the fraction of scored positions predicted exactly (argmax), MAD's "
             "score of a task; ¹ marks a single seed, otherwise mean ± sample standard deviation over seeds. The MAD "
             "score is the mean of the six task accuracies (`amlp.tasks.mad.mad_score`), given only when all six "
             "are there. One setting per task (the config's) and one learning rate: not MAD's full protocol, which "
             "averages each task over its harder settings and takes the best run of a learning-rate x "
             "weight-decay sweep, so these numbers rank the mixers against each other under this protocol.", "",
             "## Causal mixers", ""]
    lines += _table(results, study.mechanisms, tasks, paper=False)
    hyper = [m for m in study.mechanisms if m.split(":")[0] in ("hyper-mlp", "hyper-glu")]
    lines += ["## HyperMLP / HyperGLU ablations", ""]
    if study.ablations:
        lines += ["Each row turns off a piece of the layer through its options (`amlp.layers.hypermlp.HyperHead`): "
                  "`sequence_mixing` chooses which lag-indexed sequence-mixing operators are learned (`both`, the "
                  "default; `qk`: R^(1) only; `vo`: R^(2) only; `none`: neither, leaving ReLU / GLU attention with "
                  "the gates and convolutions), `kv_conv=false` drops the causal convolutions on the key and "
                  "value inputs, `qk_gate` / `vo_gate` the gates, and `layout=absolute` indexes the operators' "
                  "slots by key position instead of by lag (the paper's variants without `o`; at a full window, "
                  "as here, it equals the identity aligner of the paper's code). The models are not re-matched: "
                  "a row without sequence mixing has fewer parameters than the full layer.", ""]
        lines += _table(results, hyper + list(study.ablations), tasks, paper=True)
    else:
        lines += ["No ablation rows in this study.", ""]
    lines += ["The paper reports that removing the lag layout collapses performance (`R-12!` against `R-12o!` in "
              "its Table 1, numbers not available here); the `layout=absolute` rows are that ablation on this "
              "protocol.", "",
              "### The paper's numbers", "",
              "The HyperMLP paper (arXiv 2602.12601) reports its design study on MAD in Table 1. Two of its "
              "numbers are quoted here, the MAD averages of R-cg-q (66.78) and of R-cg-q-12o (81.01), as they are "
              "reported for that table (its per-task numbers and other rows were not available to this project, "
              "so none are quoted). Reading the variant names (R: the ReLU base, HyperMLP; c, g: the key/value "
              "convolution and the gates; q: the compressed query/key rank, this "
              "layer's default; 12o: both operators in the lag layout), R-cg-q-12o is `hyper-mlp` and R-cg-q is "
              "`hyper-mlp:sequence_mixing=none`. The paper's protocol (sizes, settings, sweep) differs from this "
              "one.", ""]
    lines += mad_checks(results, study, tasks)
    lines += _protocol(finished, tasks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _protocol(recs: list[dict], tasks: list[str]) -> list[str]:
    if not recs:
        return ["No finished cells yet."]
    lines = ["## Protocol", ""]
    for task in tasks:
        r = next((x for x in recs if x.get("task") == task), None)
        if r is None:
            continue
        d, m, t = r["data"], r["model"], r["train"]
        settings = ", ".join(f"{k} {d[k]}" for k in ("vocab_size", "seq_len", "noise_vocab_size", "frac_noise",
                                                     "k_motif_size", "v_motif_size", "num_tokens_to_copy")
                             if d.get(k) is not None)
        train = d["train_examples"] or "the default number of"
        lines.append(f"- {TASK_TITLES.get(task, task)} (`{r['config']}`): {settings}; {train} "
                     f"training and {d['test_examples']} test examples; width {m['dim']}, {m['n_layers']} blocks, "
                     f"{m['heads']} head(s); batch {t['batch_size']}, {t['max_steps']} steps of {t['optimizer']} at "
                     f"{t['lr']:g}; tested on the {t['test_checkpoint']} checkpoint.")
    return lines + [""]
