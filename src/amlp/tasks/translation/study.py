"""The translation study: AR and NAR (GLAT) models x mechanisms x directions x seeds on Multi30k, in the
layout of the AMLP paper's Table 2 and Table 10, with decoding speed beside the scores.

Every cell is one ``amlp train translation`` run (:func:`amlp.train.run_experiment`) in
``<run_root>/<direction>/<arch>/<mechanism>/seed<s>``; finished cells are recorded in
``<run_root>/results.json`` and, when the study names one (``records``), in a tracked file that travels
with the repository, and are skipped when the study runs again (an unfinished cell continues from its
last checkpoint). Each record keeps what the report needs (scores, speeds, the example translations), so
the report is written from the records alone. A row's mechanism is put at the decoder self and cross
sites (the encoder keeps the config's mixer, softmax in the paper's recipe); a row may name another
cross mixer (``cross``) where the mechanism has no cross form (local attention).

The NAR rows train on sequence-level distillation: the targets of the training split are the beam
outputs of the study's teacher row (the AR softmax Transformer, seed ``teacher_seed``, same direction),
so teacher cells run first. With ``records``, the teacher's beam outputs on the training split are saved
beside that file (``<records stem>-distilled-<direction>.txt.gz``) as soon as the teacher is trained,
and the NAR cells train on that file (``data.distill_file``), so that they run on a machine that does
not have the teacher's checkpoint. After training, each cell is scored on every test set of the study
(BLEU and chrF from sacrebleu; the signature is printed in the report) and its decoding is timed on the
first ``latency.sentences`` sentences of the test split (test2016) at every batch size of
``latency.batch_sizes`` (sentences per second, wall clock, with the run's threads; peak memory the
decoding added: resident-set high-water mark on CPU, ``max_memory_allocated`` on CUDA). Cells timed as
they finish share the machine with whatever else runs; ``--retime`` times every finished cell again in
one pass, so that the rows' speeds compare under one load.

A study file::

    title: "..."
    directions: [en-de, de-en]
    configs: {transformer: configs/translation/cpu/transformer.yaml, glat: configs/translation/cpu/glat.yaml}
    rows:
      - {arch: transformer, mechanism: softmax}
      - {arch: transformer, mechanism: local, cross: softmax}
      - {arch: glat, mechanism: "amlp-pquery:form=official,landmarks=16,ema=0.99"}
    seeds: [0]
    more_seeds: {seeds: [0, 1, 2], directions: [en-de], rows: [transformer/softmax, glat/softmax]}
    teacher: transformer/softmax
    teacher_seed: 0
    test_sets: [test2016, test2017]
    latency: {batch_sizes: [1, 64], sentences: 200}
    run_root: runs/study/translation-cpu
    records: docs/results/records/translation-cpu.json   # tracked finished cells (optional)
    doc: docs/results/translation.md
    overrides: []
    examples: 3                  # test sentences shown translated by every row in the tracked document
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ...train.config import from_dict, load_config, read_study_file, to_plain
from ...train.study_common import (CellStore, EarlierProtocol, cell_store, check_protocols, earlier_section, fmt_seeds,
                                   load_earlier, load_note, machine, start_timing_pass, timing_passes, torch_threads)
from ...train.study_forecasting import grid_refusal, mechanism_dir, parse_mechanism

ARCHS = ("transformer", "glat")
#: the paper's WMT14 BLEU (AMLP paper Table 2 and Table 10: En-De, De-En), quoted beside our rows;
#: "fails" where the paper marks that the attention failed on the data set
PAPER_BLEU: dict[str, tuple[Any, Any]] = {
    "transformer/softmax": (27.38, 31.26),
    "transformer/local": (24.77, 28.21),
    "transformer/abc": (25.86, 29.09),
    "glat/softmax": (26.24, 30.10),
    "glat/local": (18.19, 21.36),
    "glat/cosformer": ("fails", "fails"),
    "glat/performer": (17.81, "fails"),
    "glat/abc": (21.98, 24.78),
    "glat/amlp-pquery": (25.00, 28.42),
}


@dataclass
class StudyRow:
    arch: str
    mechanism: str
    #: the cross site's mixer when it is not the mechanism (a mixer with no cross form), with options
    cross: str | None = None

    @property
    def key(self) -> str:
        return f"{self.arch}/{self.mechanism}"

    @property
    def name(self) -> str:
        """The key without the mechanism's options: ``glat/abc`` for ``glat/abc:landmarks=16``."""
        return f"{self.arch}/{self.mechanism.split(':')[0]}"

    def check_mechanism(self) -> None:
        """Parse the mechanism for its site (``ValueError`` from the registry when it cannot serve it)."""
        parse_mechanism(self.mechanism, "causal" if self.arch == "transformer" and not self.cross else "noncausal")


@dataclass
class MoreSeeds:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    directions: list[str] = field(default_factory=lambda: ["en-de"])
    rows: list[str] = field(default_factory=list)


@dataclass
class Latency:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    sentences: int = 200


@dataclass
class TranslationStudyConfig:
    configs: dict[str, str]
    rows: list[StudyRow]
    title: str = "Translation on Multi30k: AR and NAR models with efficient attention"
    directions: list[str] = field(default_factory=lambda: ["en-de", "de-en"])
    seeds: list[int] = field(default_factory=lambda: [0])
    more_seeds: MoreSeeds | None = None
    teacher: str = "transformer/softmax"
    teacher_seed: int = 0
    test_sets: list[str] = field(default_factory=lambda: ["test2016", "test2017"])
    latency: Latency = field(default_factory=Latency)
    run_root: str = "runs/study/translation-cpu"
    #: a tracked file of the finished cells' records (beside it, the teachers' distilled targets), so
    #: that the grid continues on another machine; None: only ``<run_root>/results.json``
    records: str | None = None
    doc: str = "docs/results/translation.md"
    overrides: list[str] = field(default_factory=list)
    #: sentences of the first test set shown in the tracked document as every row translates them (the
    #: first direction, each row's first seed), evenly spaced through the set; 0 shows none
    examples: int = 3
    #: earlier protocols whose records the report compares with this one's
    earlier: list[EarlierProtocol] = field(default_factory=list)
    #: rows outside the grid (never trained by the study) whose finished cells in the records the report
    #: shows in a table of their own, beside the grid's row of the same arch and mechanism; e.g. the
    #: same mechanisms at other sizes
    other_rows: list[StudyRow] = field(default_factory=list)
    #: what the other rows are, printed above their table
    other_rows_note: str = ""

    def validate(self) -> None:
        unknown = sorted(set(self.configs) - set(ARCHS))
        if unknown or not self.configs:
            raise ValueError(f"study key 'configs' maps an arch ({', '.join(ARCHS)}) to a config file, got "
                             f"{sorted(self.configs)}")
        for d in self.directions:
            if d not in ("en-de", "de-en"):
                raise ValueError(f"study key 'directions': {d!r} is not en-de or de-en")
        keys = [r.key for r in self.rows]
        if len(set(keys)) != len(keys):
            raise ValueError(f"study key 'rows' repeats a row: {keys}")
        for r in self.rows:
            if r.arch not in self.configs:
                raise ValueError(f"study row {r.key!r}: no config for arch {r.arch!r} under 'configs'")
            r.check_mechanism()
        if self.teacher not in keys or not self.teacher.startswith("transformer/"):
            raise ValueError(f"study key 'teacher' must name an AR row (transformer/...), got {self.teacher!r}")
        if self.more_seeds:
            missing = [k for k in self.more_seeds.rows if k not in keys]
            if missing:
                raise ValueError(f"study key 'more_seeds.rows' names rows that are not in 'rows': {missing}")
        for r in self.other_rows:
            if r.key in keys:
                raise ValueError(f"study key 'other_rows': {r.key!r} is a row of the grid ('rows')")
            if r.arch not in ARCHS:
                raise ValueError(f"study key 'other_rows': {r.key!r} has no arch of {', '.join(ARCHS)}")
            r.check_mechanism()
        if any(b < 1 for b in self.latency.batch_sizes) or self.latency.sentences < 1:
            raise ValueError("study key 'latency': batch sizes and sentences must be >= 1")
        if self.examples < 0:
            raise ValueError(f"study key 'examples' must be >= 0, got {self.examples}")


def load_translation_study(path: str | Path) -> TranslationStudyConfig:
    return from_dict(TranslationStudyConfig, read_study_file(path))


def cell_key(direction: str, row: str, seed: int) -> str:
    return f"{direction}/{row}/seed{seed}"


@dataclass
class _Cell:
    direction: str
    row: StudyRow
    seed: int

    @property
    def key(self) -> str:
        return cell_key(self.direction, self.row.key, self.seed)


def study_cells(study: TranslationStudyConfig) -> list[_Cell]:
    """Every cell of the study's grid, teacher cells first (the NAR cells distil from them)."""
    cells = []
    for d in study.directions:
        for row in study.rows:
            seeds = list(study.seeds)
            more = study.more_seeds
            if more and row.key in more.rows and d in more.directions:
                seeds = sorted(set(seeds) | set(more.seeds))
            cells += [_Cell(d, row, s) for s in seeds]
    teacher = [c for c in cells if c.row.key == study.teacher and c.seed == study.teacher_seed]
    return teacher + [c for c in cells if c not in teacher]


def _site_overrides(row: StudyRow) -> list[str]:
    mixer, options = parse_mechanism(row.mechanism, "noncausal" if row.arch == "glat" else "causal")
    out = [f"model.self_mixer={mixer}", f"model.self_options={json.dumps(options)}"]
    cross_mixer, cross_options = (mixer, options) if row.cross is None else parse_mechanism(row.cross, "cross")
    out += [f"model.cross_mixer={cross_mixer}", f"model.cross_options={json.dumps(cross_options)}"]
    return out


def _cell_overrides(cell) -> list[str]:
    """The overrides that make a cell of its row's config: direction, seed and the mixers of the sites (the
    GLAT rows add their distilled targets)."""
    source, target = cell.direction.split("-")
    return [f"data.source={source}", f"data.target={target}", f"seed={cell.seed}"] + _site_overrides(cell.row)


def _config_now(study: TranslationStudyConfig, root: Path, overrides: list[str], cell, record: dict):
    """The experiment config a finished cell would run with now (its distilled targets as its record
    names them)."""
    distill = [o for o in record.get("overrides", []) if o.startswith("data.distill_")]
    return load_config(root / study.configs[cell.row.arch], overrides + _cell_overrides(cell) + distill)


def _tested_checkpoint(run_dir: Path, cfg) -> Path:
    name = {"average": "averaged", "best": "best"}.get(cfg.train.test_checkpoint)
    if name and (run_dir / "checkpoints" / name).is_dir():
        return run_dir / "checkpoints" / name
    from ...train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise ValueError(f"no checkpoint in {str(run_dir)!r}")
    return path


def measure_latency(checkpoint: Path, batch_sizes: list[int], sentences: int, threads: int | None) -> dict:
    """Sentences per second and peak added memory (MiB) of decoding the first ``sentences`` sentences of
    test2016 with the checkpoint's decoding settings, per batch size."""
    from ...bench.memory import timed_peak
    from ...train.loop import load_trained_model
    from .task import translate_lines

    with torch_threads(threads):
        config, task, model = load_trained_model(checkpoint, device="auto")
        device = next(model.parameters()).device
        lines = task.dataset("test").sources[:sentences]
        out = {}
        translate_lines(task, model, lines[:8], batch_size=8)  # warm-up
        for bs in batch_sizes:
            elapsed, peak = timed_peak(lambda: translate_lines(task, model, lines, batch_size=bs), device)
            out[str(bs)] = {"sentences_per_s": len(lines) / elapsed, "peak_mib": peak}
        return {"device": str(device), "threads": torch.get_num_threads(), "sentences": len(lines),
                "batch_sizes": out, **machine()}


def missing_cells(study: TranslationStudyConfig, results: dict) -> list[str]:
    return [c.key for c in study_cells(study) if not results.get(c.key, {}).get("finished")]


def run_translation_study(study: TranslationStudyConfig, *, command: str, rows: list[str] | None = None,
                          directions: list[str] | None = None, seeds: list[int] | None = None,
                          extra_overrides: list[str] | None = None, root: Path | None = None,
                          log: Callable[[str], None] = print, doc_only: bool = False,
                          write_doc: bool = False, rescore: bool = False, retime: bool = False) -> Path:
    """Run every unfinished cell (restricted to ``rows`` / ``directions`` / ``seeds`` when given), then
    write the report to ``<run_root>/report.md``, or with ``write_doc`` to the study's ``doc``, only
    from a complete grid (else ``ValueError`` listing the missing cells, before any work).

    ``rescore`` scores the finished cells of the selection again on every test set from their tested
    checkpoints, with the code as it is now (after a change to decoding), instead of training.
    ``retime`` times the decoding of the finished cells of the selection again, one after another in
    this one process, instead of training: run it on a quiet machine once the grid is complete, so
    that every row's speed (and the NAR-against-beam ratios) comes from one pass under one load."""
    from ...train.loop import evaluate_checkpoint, run_experiment

    study.validate()
    root = Path(root or ".")
    run_root = root / study.run_root
    overrides = list(study.overrides) + list(extra_overrides or [])
    keys = [r.key for r in study.rows]
    for name, wanted, known in (("--rows", rows, keys), ("--directions", directions, study.directions)):
        unknown = [w for w in wanted or [] if w not in known]
        if unknown:
            raise ValueError(f"{name}: {', '.join(map(repr, unknown))} not in this study (it has {', '.join(known)})")
    cells = [c for c in study_cells(study) if (not rows or c.row.key in rows)
             and (not directions or c.direction in directions) and (not seeds or c.seed in seeds)]
    if rescore and retime:
        raise ValueError("--rescore and --retime are separate passes: run one, then the other")
    store = cell_store(root, run_root, study.records, extra_overrides or [], log)
    if write_doc:
        outside = [k for k in missing_cells(study, store.read()) if k not in {c.key for c in cells}]
        if outside:
            raise ValueError(_refusal(study, outside))
    check_protocols(store.read(), ((c.key, functools.partial(_config_now, study, root, overrides, c))
                                   for c in (study_cells(study) if write_doc else cells)), store.source(root))
    if retime and not doc_only:
        started = start_timing_pass(log)
        for i, cell, record, ckpt in _finished(cells, store, root, log, "time"):
            log(f"({i}/{len(cells)}) {cell.key}: timing decoding again at batch sizes {study.latency.batch_sizes}")
            latency = measure_latency(ckpt, study.latency.batch_sizes, study.latency.sentences,
                                      record.get("train", {}).get("threads"))
            record.update(latency={**latency, "pass": started})
            store.record(cell.key, record)
            log(f"    {cell.key}: " + ", ".join(f"{v['sentences_per_s']:.1f} sentences/s at batch {b}"
                                               for b, v in latency["batch_sizes"].items()))
    elif rescore and not doc_only:
        for i, cell, record, ckpt in _finished(cells, store, root, log, "rescore"):
            log(f"({i}/{len(cells)}) {cell.key}: scoring {ckpt} again")
            tests = {name: evaluate_checkpoint(ckpt, name) for name in record["tests"]}
            for name in study.test_sets:
                if name not in tests:
                    tests[name] = evaluate_checkpoint(ckpt, name)
            record.update(tests=tests, rescored_at=_dt.datetime.now().isoformat(timespec="seconds"))
            if cell.row.arch == "glat":
                record["tests_collapsed"] = _collapsed_tests(evaluate_checkpoint, ckpt, tests)
            record["examples"] = cell_examples(ckpt, study, cell.direction)
            store.record(cell.key, record)
            log(f"    {cell.key}: " + ", ".join(f"{k} BLEU {v['bleu']:.2f}" for k, v in tests.items()))
    elif not doc_only:
        for i, cell in enumerate(cells, 1):
            is_teacher = cell.row.key == study.teacher and cell.seed == study.teacher_seed
            if store.finished(cell.key):
                log(f"({i}/{len(cells)}) {cell.key}: done before, skipped")
                _add_examples(study, store, root, cell)
                if is_teacher:
                    _save_distilled(study, store, root, cell.direction, overrides, log)
                continue
            distill = [_distill_override(study, store, root, cell, overrides, log)] if cell.row.arch == "glat" else []
            cell_overrides = _cell_overrides(cell) + distill
            cfg = load_config(root / study.configs[cell.row.arch], overrides + cell_overrides)
            run_dir = run_root / cell.direction / cell.row.arch / mechanism_dir(cell.row.mechanism) / f"seed{cell.seed}"
            log(f"({i}/{len(cells)}) {cell.key}: training in {run_dir}")
            result = run_experiment(cfg, run_dir, resume="auto", same_config=True)
            ckpt = _tested_checkpoint(run_dir, cfg)
            tests = {cfg.data.test_split: result.test_metrics}
            for name in study.test_sets:
                if name not in tests:
                    tests[name] = evaluate_checkpoint(ckpt, name)
            collapsed = _collapsed_tests(evaluate_checkpoint, ckpt, tests) if cell.row.arch == "glat" else None
            log(f"    timing decoding at batch sizes {study.latency.batch_sizes}")
            latency = measure_latency(ckpt, study.latency.batch_sizes, study.latency.sentences, cfg.train.threads)
            rel = lambda p: str(p.relative_to(root) if p.is_relative_to(root) else p)  # noqa: E731
            record = {"finished": True, "direction": cell.direction, "row": cell.row.key, "arch": cell.row.arch,
                      "mechanism": cell.row.mechanism, "cross": cell.row.cross, "seed": cell.seed,
                      "config": study.configs[cell.row.arch], "overrides": overrides + cell_overrides,
                      "steps": result.step, "tested_step": result.tested_step, "tests": tests,
                      "val": result.val_metrics, "latency": latency, "run_dir": rel(run_dir),
                      **({"tests_collapsed": collapsed} if collapsed is not None else {}),
                      "checkpoint": rel(ckpt), "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
                      "examples": cell_examples(ckpt, study, cell.direction),
                      "train": to_plain(cfg.train), "model": to_plain(cfg.model), "data": to_plain(cfg.data)}
            store.record(cell.key, record)
            log(f"    {cell.key}: " + ", ".join(f"{k} BLEU {v['bleu']:.2f}" for k, v in tests.items()))
            if is_teacher:
                _save_distilled(study, store, root, cell.direction, overrides, log)
    results = store.read()
    if write_doc:
        missing = missing_cells(study, results)
        if missing:
            raise ValueError(_refusal(study, missing))
        doc = root / study.doc
    else:
        doc = run_root / "report.md"
    write_translation_report(doc, results, study=study, command=command, examples_root=root if write_doc else None,
                             source=store.source(root), earlier=load_earlier(root, study.earlier))
    log(f"report written to {doc}")
    return doc


def _finished(cells: list, store: CellStore, root: Path, log: Callable[[str], None], verb: str):
    """``(i, cell, record, checkpoint)`` for the finished cells of ``cells`` (numbered from 1) whose
    checkpoint is on this machine, saying which are not."""
    for i, cell in enumerate(cells, 1):
        record = store.read().get(cell.key, {})
        if not record.get("finished"):
            log(f"({i}/{len(cells)}) {cell.key}: not finished, nothing to {verb}")
            continue
        ckpt = store.checkpoint(root, record)
        if ckpt is None:
            log(f"({i}/{len(cells)}) {cell.key}: its checkpoint {record.get('checkpoint')} is not on this machine "
                f"(the cell finished elsewhere), nothing to {verb}")
            continue
        yield i, cell, record, ckpt


def _add_examples(study: TranslationStudyConfig, store: CellStore, root: Path, cell) -> None:
    """Give a finished cell's record its example translations when it has none (it finished before
    records kept them) and its checkpoint is here."""
    record = store.read()[cell.key]
    ckpt = store.checkpoint(root, record)
    if "examples" not in record and ckpt is not None:
        record["examples"] = cell_examples(ckpt, study, cell.direction)
        store.record(cell.key, record)


def distilled_path(study: TranslationStudyConfig, root: Path, direction: str) -> Path | None:
    """Where the study keeps a direction's distilled training targets (beside its ``records``; None
    without them)."""
    if not study.records:
        return None
    records = root / study.records
    return records.with_name(f"{records.stem}-distilled-{direction}.txt.gz")


def _teacher_checkpoint(study, store: CellStore, root: Path, direction: str) -> tuple[str, dict, Path | None]:
    key = cell_key(direction, study.teacher, study.teacher_seed)
    record = store.read().get(key, {})
    return key, record, (store.checkpoint(root, record) if record.get("finished") else None)


def _save_distilled(study, store: CellStore, root: Path, direction: str, overrides: list[str],
                    log: Callable[[str], None]) -> Path | None:
    """Save the teacher's beam outputs on the training split (:func:`distilled_path`) when the study has
    NAR rows, keeps ``records`` and has not saved them yet, and the teacher's checkpoint is here."""
    from .data import read_split
    from .task import distilled_targets, write_distill_file

    path = distilled_path(study, root, direction)
    if path is None or path.is_file() or not any(r.arch == "glat" for r in study.rows):
        return path
    key, _, ckpt = _teacher_checkpoint(study, store, root, direction)
    if ckpt is None:
        return None
    source, target = direction.split("-")
    cfg = load_config(root / study.configs["glat"], overrides + [f"data.source={source}", f"data.target={target}"])
    log(f"    distilling the training split with {key} into {path}")
    sources, _ = read_split("train", source, target, cfg.data.data_dir, cfg.data.files)
    write_distill_file(path, distilled_targets(ckpt, sources, cfg))
    return path


def _distill_override(study, store: CellStore, root: Path, cell, overrides: list[str],
                      log: Callable[[str], None]) -> str:
    """The override that gives a NAR cell its distilled targets: the saved file, else the teacher's
    checkpoint (``ValueError`` when neither is here)."""
    key, record, ckpt = _teacher_checkpoint(study, store, root, cell.direction)
    if not record.get("finished"):
        raise ValueError(f"{cell.key} distils from {key}, which has no finished run; run the teacher first (it "
                         "is the first cell)")
    path = _save_distilled(study, store, root, cell.direction, overrides, log)
    if path is not None and path.is_file():
        return f"data.distill_file={path}"
    if ckpt is None:
        raise ValueError(f"{cell.key} distils from {key}, but its checkpoint {record.get('checkpoint')} is not on "
                         "this machine and the study saved no distilled targets"
                         + (f" at {distilled_path(study, root, cell.direction)}" if study.records else "")
                         + f"; train the teacher here again (`--rows {study.teacher} --seeds {study.teacher_seed}` "
                         "after removing its record)")
    return f"data.distill_from={ckpt}"


def example_picks(count: int, sentences: int) -> list[int]:
    """``count`` indices evenly spaced through ``sentences`` sentences (first and last included)."""
    count = min(count, sentences)
    return [round(i * (sentences - 1) / max(1, count - 1)) for i in range(count)]


def cell_examples(checkpoint: Path, study: TranslationStudyConfig, direction: str) -> dict:
    """The study's example sentences of the first test set (:func:`example_picks`) as the checkpoint
    translates them, decoded as the scores are (beam search for AR, the single parallel pass for GLAT
    without post-processing): ``{"split": ..., "lines": {"<index>": translation}}``."""
    from ...train.loop import load_trained_model
    from .task import translate_lines

    split = study.test_sets[0]
    with torch_threads(1):
        _, task, model = load_trained_model(checkpoint, device="cpu")
        sources = task.dataset(split).sources
        picks = example_picks(study.examples, len(sources))
        chosen = [sources[i] for i in picks]
        outputs = translate_lines(task, model, chosen, batch_size=len(chosen)) if chosen else []
    return {"split": split, "direction": direction, "lines": {str(i): out for i, out in zip(picks, outputs)}}


def _collapsed_tests(evaluate, ckpt: Path, tests: dict) -> dict:
    """A NAR cell's scores on the same test sets with ``model.collapse_repeats`` on."""
    return {name: evaluate(ckpt, name, ["model.collapse_repeats=true"]) for name in tests}


def _refusal(study: TranslationStudyConfig, missing: list[str]) -> str:
    return grid_refusal(study.doc, missing)


# -- the report -----------------------------------------------------------------------------------------------
def _label(row: StudyRow) -> str:
    """``Tr (ABC)``, ``GLAT (AMLP-PQuery `form=official,landmarks=16`)``, ``Tr (local, cross softmax)``."""
    from ..lm.study import mechanism_label

    name = "Tr" if row.arch == "transformer" else "GLAT"
    cross = f", cross {mechanism_label(row.cross)}" if row.cross else ""
    return f"{name} ({mechanism_label(row.mechanism)}{cross})"


def _cell_values(results: dict, direction: str, row: str, get) -> list[float]:
    out = []
    for rec in results.values():
        if rec.get("finished") and rec.get("direction") == direction and rec.get("row") == row:
            value = get(rec)
            if value is not None:
                out.append(value)
    return out


def write_translation_report(path: Path, results: dict, *, study: TranslationStudyConfig, command: str,
                             examples_root: Path | None = None, source: str | None = None,
                             earlier: list[tuple[EarlierProtocol, dict]] = ()) -> None:
    """The report in the layout of the paper's Tables 2 and 10, generated from the records in ``source``
    (default ``<run_root>/results.json``); with ``examples_root`` (the folder the recorded checkpoint
    paths are relative to) also the example translations (:func:`example_translations`); with
    ``earlier`` ((protocol, its records) pairs) a section per earlier protocol (:func:`_earlier`)."""
    from .task import bleu_signature, chrf_signature

    source = source or f"{study.run_root}/results.json"
    lines = [f"# {study.title}", "",
             f"Generated by `{command}` from `{source}`. BLEU and chrF are sacrebleu's on "
             "detokenised output against the raw references:", "",
             f"- BLEU: `{bleu_signature()}`", f"- chrF: `{chrf_signature()}`", "",
             "Scores are mean ± std over seeds; ¹ marks a single seed. The paper's numbers are WMT14 "
             "(transformer-base; 100k updates for AR, 300k on distilled data for GLAT; \"fails\" where the paper "
             "says the attention failed), quoted for their ranking, not comparable in value with Multi30k.", ""]
    for direction in study.directions:
        column = 0 if direction == "en-de" else 1
        test_names = list(dict.fromkeys(study.test_sets))
        lines += [f"## {direction.replace('-', ' → ')}", ""]
        head = ["arch", "model"] + [f"{t} BLEU" for t in test_names] + [f"{test_names[0]} chrF",
                                                                         f"{test_names[0]} BLEU, runs collapsed²",
                                                                         "seeds"]
        head += [f"sent/s @ {b}" for b in study.latency.batch_sizes] + [f"peak MiB @ {study.latency.batch_sizes[-1]}",
                                                                         "paper WMT14 BLEU"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in study.rows:
            key = row.key
            recs = [r for r in results.values() if r.get("finished") and r.get("direction") == direction
                    and r.get("row") == key]
            cells = ["AR" if row.arch == "transformer" else "NAR", _label(row)]
            for t in test_names:
                cells.append(fmt_seeds(_cell_values(results, direction, key,
                                                    lambda r, t=t: (r["tests"].get(t) or {}).get("bleu")), 2))
            cells.append(fmt_seeds(_cell_values(results, direction, key,
                                                lambda r: (r["tests"].get(test_names[0]) or {}).get("chrf")), 2))
            cells.append("n/a" if row.arch == "transformer" else fmt_seeds(_cell_values(
                results, direction, key, lambda r: (r.get("tests_collapsed", {}).get(test_names[0]) or {}).get("bleu")), 2))
            cells.append(str(len(recs)) if recs else "—")
            for b in study.latency.batch_sizes:
                cells.append(fmt_seeds(_cell_values(results, direction, key,
                                               lambda r, b=b: r["latency"]["batch_sizes"].get(str(b), {}).get("sentences_per_s")), 1))
            last = str(study.latency.batch_sizes[-1])
            cells.append(fmt_seeds(_cell_values(results, direction, key,
                                           lambda r: r["latency"]["batch_sizes"].get(last, {}).get("peak_mib")), 0))
            paper = PAPER_BLEU.get(row.name)
            value = paper[column] if paper else None
            cells.append("—" if value is None else value if isinstance(value, str) else f"{value:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["² NAR output with every run of one repeated subword reduced to one (`model.collapse_repeats`, the "
              "post-processing of Lee et al. 2018 and later NAR work); the other columns are the single pass "
              "as decoded, as the GLAT and AMLP papers report it.", ""]
    lines += _requirements(results, study)
    lines += _paper_comparisons(results, study)
    lines += _other_rows(results, study)
    for protocol, records in earlier:
        lines += _earlier(protocol, records, results, study)
    if examples_root is not None:
        lines += example_translations(results, study, examples_root)
    lines += _protocol(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _cell(text: str) -> str:
    """Text for a markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|") or "(empty)"


def example_translations(results: dict, study: TranslationStudyConfig, root: Path) -> list[str]:
    """The "Examples" section: ``study.examples`` sentences of the first test set, evenly spaced through
    it, as each row's model of the first direction translates them (its first finished seed, the tested
    checkpoint, decoded as the scores were: beam search for AR, the single parallel pass for GLAT with
    no post-processing), under the source and the reference. The translations come from the records
    (:func:`cell_examples`), else from the checkpoint when it is on this machine; a row with neither is
    left out. Empty when no row has a finished cell."""
    from .data import read_split

    direction, split = study.directions[0], study.test_sets[0]
    chosen = {}
    for row in study.rows:
        recs = sorted((r for r in results.values() if r.get("finished") and r.get("direction") == direction
                       and r.get("row") == row.key), key=lambda r: r["seed"])
        if recs:
            chosen[row.key] = recs[0]
    if study.examples < 1 or not chosen:
        return []
    data = next(iter(chosen.values()))["data"]
    sources, references = read_split(split, *direction.split("-"), data.get("data_dir"), data.get("files"))
    picks = example_picks(study.examples, len(sources))
    outputs = {}
    for key, rec in chosen.items():
        saved = rec.get("examples") or {}
        if saved.get("split") == split and all(str(i) in saved.get("lines", {}) for i in picks):
            outputs[key] = [saved["lines"][str(i)] for i in picks]
            continue
        ckpt = CellStore.checkpoint(root, rec)
        if ckpt is not None:
            lines_ = cell_examples(ckpt, study, direction)["lines"]
            outputs[key] = [lines_[str(i)] for i in picks]
    lines = ["## Examples", "",
             f"Sentences of {split} ({direction.replace('-', ' → ')}), evenly spaced through it, as each row's "
             "model translates them (its first seed; beam search for AR, the single parallel pass for GLAT as "
             "decoded, without collapsing repeats).", ""]
    for n, i in enumerate(picks):
        lines += [f"Sentence {i + 1} of {len(sources)}:", "", "| | translation |", "|---|---|",
                  f"| source | {_cell(sources[i])} |", f"| reference | {_cell(references[i])} |"]
        lines += [f"| {_label(row)} | {_cell(outputs[row.key][n])} |" for row in study.rows if row.key in outputs]
        lines.append("")
    return lines


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _requirements(results: dict, study: TranslationStudyConfig) -> list[str]:
    """The protocol's checks on En→De: AR softmax BLEU, the GLAT (softmax) gap to it, NAR decoding speed."""
    direction, test = "en-de", study.test_sets[0]
    keys = {r.key for r in study.rows}
    if direction not in study.directions or not {"transformer/softmax", "glat/softmax"} <= keys:
        return []
    bleu = lambda field: lambda r: (r.get(field, {}).get(test) or {}).get("bleu")  # noqa: E731
    ar = _mean(_cell_values(results, direction, "transformer/softmax", bleu("tests")))
    nar = _mean(_cell_values(results, direction, "glat/softmax", bleu("tests")))
    nar_c = _mean(_cell_values(results, direction, "glat/softmax", bleu("tests_collapsed")))
    if ar is None or nar is None:
        return []
    out = ["## Checks (En→De, " + test + ", means over seeds)", "",
           f"- AR Transformer (softmax): {ar:.2f} BLEU ({'at least' if ar >= 30 else 'below'} the 30 the CPU "
           "protocol must reach).",
           f"- GLAT (softmax), distilled: {nar:.2f} BLEU, {ar - nar:.2f} below the AR model "
           f"({'within' if ar - nar <= 6 else 'more than'} 6)" +
           (f"; with runs collapsed {nar_c:.2f}, {ar - nar_c:.2f} below ({'within' if ar - nar_c <= 6 else 'more than'} 6)"
            if nar_c is not None else "") + "."]
    for b in study.latency.batch_sizes:
        speed = lambda r, b=b: r["latency"]["batch_sizes"].get(str(b), {}).get("sentences_per_s")  # noqa: E731
        ar_s = _mean(_cell_values(results, direction, "transformer/softmax", speed))
        nar_s = _mean(_cell_values(results, direction, "glat/softmax", speed))
        if ar_s and nar_s:
            out.append(f"- Decoding at batch {b}: GLAT {nar_s:.1f} sentences/s against beam search {ar_s:.1f} "
                       f"({nar_s / ar_s:.1f}×).")
    return out + [""]


def _rows_by_name(study: TranslationStudyConfig) -> dict[str, StudyRow]:
    """The grid's row of each arch and mechanism name without options (``glat/abc`` for
    ``glat/abc:landmarks=16``); the first one where several rows differ only in options."""
    out: dict[str, StudyRow] = {}
    for row in study.rows:
        out.setdefault(row.name, row)
    return out


#: the AMLP paper's claims about its MT rows (Table 2): (row, row it is compared with), the paper's
#: WMT14 BLEU of each from PAPER_BLEU
PAPER_COMPARISONS = (("glat/amlp-pquery", "glat/softmax"), ("glat/amlp-pquery", "glat/abc"))


def _paper_comparisons(results: dict, study: TranslationStudyConfig) -> list[str]:
    """The paper's MT comparisons (GLAT with AMLP-PQuery against GLAT with softmax, about 1.2-1.7 BLEU
    behind, and against GLAT with ABC, about 3 BLEU ahead) on this study's test2016 means, beside
    the paper's WMT14 differences; empty until both rows of a pair have a finished cell."""
    test = study.test_sets[0]
    by_name = _rows_by_name(study)
    lines = []
    for direction in study.directions:
        column = 0 if direction == "en-de" else 1
        for a, b in PAPER_COMPARISONS:
            if a not in by_name or b not in by_name:
                continue
            ra, rb = by_name[a], by_name[b]
            bleu = lambda r: (r["tests"].get(test) or {}).get("bleu")  # noqa: E731
            va, vb = (_cell_values(results, direction, r.key, bleu) for r in (ra, rb))
            if not va or not vb:
                continue
            ma, mb = _mean(va), _mean(vb)
            pa, pb = PAPER_BLEU[a][column], PAPER_BLEU[b][column]
            lines.append(f"- {direction.replace('-', ' → ')}: {_label(ra)} {ma:.2f} against {_label(rb)} {mb:.2f} "
                         f"({ma - mb:+.2f}; {len(va)} and {len(vb)} seed(s)); the paper on WMT14: {pa:.2f} against "
                         f"{pb:.2f} ({pa - pb:+.2f}).")
    if not lines:
        return []
    return [f"## The paper's comparisons ({test} BLEU, means over seeds)", ""] + lines + [""]


def _other_rows(results: dict, study: TranslationStudyConfig) -> list[str]:
    """The study's ``other_rows`` that have finished cells: their test BLEU per test set beside the grid's
    row of the same arch and mechanism (the first one, when several differ only in options)."""
    tests = list(dict.fromkeys(study.test_sets))
    grid = _rows_by_name(study)
    bleu = lambda t: lambda r: (r["tests"].get(t) or {}).get("bleu")  # noqa: E731
    body = []
    for direction in study.directions:
        for row in study.other_rows:
            own = [_cell_values(results, direction, row.key, bleu(t)) for t in tests]
            if not own[0]:
                continue
            match = grid.get(row.name)
            cells = [direction.replace('-', ' → '), _label(row)] + [fmt_seeds(v, 2) for v in own]
            cells.append(str(len(own[0])))
            if match is None:
                cells += ["—"] * 2
            else:
                theirs = _cell_values(results, direction, match.key, bleu(tests[0]))
                cells += [_label(match), fmt_seeds(theirs, 2)]
            body.append("| " + " | ".join(cells) + " |")
    if not body:
        return []
    head = ["direction", "model"] + [f"{t} BLEU" for t in tests] + ["seeds", "row of the grid", f"its {tests[0]} BLEU"]
    lines = ["## Rows outside the grid", ""]
    if study.other_rows_note:
        lines += [study.other_rows_note.strip(), ""]
    return lines + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + body + [""]


def _earlier(protocol: EarlierProtocol, records: dict, results: dict, study: TranslationStudyConfig) -> list[str]:
    """The rows an earlier protocol has cells of: its test BLEU beside this protocol's, and its GLAT
    (softmax) gap to this protocol's AR softmax model (the AR rows are the same in both)."""
    test = study.test_sets[0]
    bleu = lambda r: (r["tests"].get(test) or {}).get("bleu")  # noqa: E731
    rows = (([direction.replace('-', ' → '), _label(row)], _cell_values(records, direction, row.key, bleu),
             _cell_values(results, direction, row.key, bleu))
            for direction in study.directions for row in study.rows)
    lines = earlier_section(protocol, f"{test} BLEU", ["direction", "model"], rows, 2)
    if not lines:
        return []
    ar = _mean(_cell_values(results, "en-de", "transformer/softmax", bleu))
    nar = _mean(_cell_values(records, "en-de", "glat/softmax", bleu))
    if ar is not None and nar is not None:
        lines += [f"Under the earlier protocol GLAT (softmax) was {ar - nar:.2f} BLEU below the AR Transformer "
                  f"(softmax) on En→De {test} (means over seeds).", ""]
    return lines


def _protocol(results: dict) -> list[str]:
    recs = [r for r in results.values() if r.get("finished")]
    if not recs:
        return ["No finished cells yet."]
    out = ["## Protocol", ""]
    seen = set()
    for r in recs:
        arch = r["arch"]
        if arch in seen:
            continue
        seen.add(arch)
        m, t, d = r["model"], r["train"], r["data"]
        out.append(f"- {arch}: config `{r['config']}`; width {m['dim']}, {m['heads']} heads, FFN {m['ffn_dim']}, "
                   f"{m['encoder_layers']}+{m['decoder_layers']} layers, dropout {m['dropout']}, label smoothing "
                   f"{m['label_smoothing']}; {t['max_steps']} steps of {d['max_tokens']} tokens, {t['optimizer']} lr "
                   f"{t['lr']} ({t['schedule']}, warm-up {t['warmup_steps']}); test on checkpoint "
                   f"`{t['test_checkpoint']}`" + (f" of the last {t['average_last']}" if t['test_checkpoint'] == "average"
                                                   else "") + "; decoding: " +
                   (f"beam {m['beam']}, length penalty {m['length_penalty']}" if arch == "transformer" else
                    f"length beam {m['length_beam']}, {m['iterations']} iteration(s), glancing ratio "
                    f"{m['glance_start']} → {m['glance_end']}, distilled from the teacher row"))
    lat = recs[0]["latency"]
    load = load_note(r["latency"] for r in recs)
    out += [f"- Decoding speed: the first {lat['sentences']} sentences of the test split on {lat['device']} with "
            f"{lat['threads']} thread(s), wall clock including subword encoding and decoding; peak memory is "
            f"what decoding added (resident-set high-water mark on CPU, max_memory_allocated on CUDA). "
            f"{_timing_passes(recs)}{load}", ""]
    return out


def _timing_passes(recs: list[dict]) -> str:
    """How the rows' decoding was timed: in one ``--retime`` pass, or as each cell finished."""
    return timing_passes((r["latency"].get("pass") for r in recs), "amlp study translation --retime")
