"""The language-modelling study: character-level models on tiny Shakespeare, one per causal mixer, at
matched parameter budgets, with validation bits per character, training throughput and generation speed.

Every cell is one ``amlp train lm`` run of the study's config in ``<run_root>/p<size>/<mechanism>/seed<s>``,
with ``model.mixer`` set to the row's mixer (its ``:key=value`` options merged into the config's options
for that mixer) and ``model.match_params`` set to the size (:func:`amlp.tasks.lm.matching.match_params`
sizes the model to that many parameters). Finished cells are recorded in ``<run_root>/results.json``
(and, when the study names one, in its tracked ``records`` file, so that the grid continues on another
machine) and skipped when the study runs again (an unfinished cell continues from its last checkpoint;
studies of other cells may run at the same time on the same ``run_root``).

After training, each cell records

* the validation bits per character of the last step (the whole validation text),
* the parameter count the matched-parameter rule reached,
* the training throughput: characters per second, the median over the logged windows of the run's
  ``train_log.csv`` (samples per second times ``data.seq_len``),
* the generation speed: ``generation.new_tokens`` characters decoded greedily from
  ``generation.prompt`` through :func:`amlp.models.generation.generate` (each mixer's recurrent step)
  with ``generation.threads`` thread(s) on the CPU, after a short warm-up,
* the validation curve (step, bits per character) of its ``eval_log.csv``, and the machine's load.

Both speeds are measured beside whatever else the machine runs; ``amlp study lm --retime`` times
every finished cell again in one pass (training steps of its config, and the generation), so that
the mixers' speeds compare under one load.

``--set train.threads=N`` keeps a cell in the study's protocol (:data:`SPEED_ONLY_KEYS`): the thread
count changes how fast a cell trains, not what it learns, so a long cell may train with every core of
an otherwise idle machine. Its training speed is then not comparable; the report names such cells
until ``--retime`` has timed them again, which it does with the study config's own threads.

A study file::

    title: "..."
    config: configs/lm/cpu/softmax.yaml
    mechanisms: [softmax, linear, "amlp-cov:form=stable,landmarks=16", hyper-glu]
    sizes: [400000, 830000]                       # parameter budgets (model.match_params)
    seeds: [0]
    more_seeds: {seeds: [0, 1, 2], mechanisms: [softmax, hyper-glu]}
    generation: {prompt: "ROMEO:", new_tokens: 200, threads: 1, warmup_tokens: 8}
    run_root: runs/study/lm-cpu
    records: docs/results/records/lm-cpu.json   # tracked finished cells (optional)
    doc: docs/results/lm.md
    overrides: []
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ...train.config import from_dict, load_config, read_study_file
from ...train.study_common import (CellStore, EarlierProtocol, cell_record, cell_store, check_doc_selection,
                                   check_protocols, earlier_section, fmt_seeds, load_earlier, load_note, machine,
                                   measure_training, record_values, report_path, start_timing_pass, timing_passes,
                                   torch_threads)
from ...train.study_forecasting import _mean_std, mechanism_dir, parse_mechanism

LABELS = {"softmax": "softmax", "linear": "linear attention", "performer": "Performer", "cosformer": "cosFormer",
          "local": "local", "abc": "ABC", "gmlp": "gMLP", "amlp-cov": "AMLP-Cov", "amlp-pquery": "AMLP-PQuery",
          "causal-rn": "CausalRN", "causal-rn-quadratic": "CausalRN (quadratic)", "hyper-mlp": "HyperMLP",
          "hyper-glu": "HyperGLU"}
FIGURE = "lm_learning_curves.png"
#: ``--set`` keys that change a cell's speed only: a cell run with them stays in the study's protocol
SPEED_ONLY_KEYS = ("train.threads",)
#: the CPU protocol's target for softmax: a validation loss per character of at most this, in nats
SOFTMAX_TARGET = 1.6
NATS_PER_BIT = math.log(2)


def check_causal_mechanism(label: str) -> tuple[str, dict]:
    """(mixer, options) of a causal mechanism label, after building the mixer once in its causal form
    at a small size: a label whose options cannot build (an unknown option, AMLP-Cov in a form with
    no causal version, a bad value) raises ``ValueError`` naming the label."""
    from ...layers.registry import build_mixer

    mixer, options = parse_mechanism(label, "causal")
    try:
        with torch.random.fork_rng(devices=[]):
            build_mixer(mixer, dim=16, heads=2, causal=True, **options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"mechanism {label!r} does not build as a causal mixer: {err}") from None
    return mixer, options


def mechanism_label(mech: str) -> str:
    """``hyper-glu:sequence_mixing=none`` -> ``HyperGLU `sequence_mixing=none```."""
    name, _, options = mech.partition(":")
    return LABELS.get(name, name) + (f" `{options}`" if options else "")


def mechanism_overrides(mech: str) -> list[str]:
    """Config overrides that make the model's mixer ``mech`` (its options merged into the config's
    options for that mixer)."""
    mixer, options = parse_mechanism(mech, "causal")
    return [f"model.mixer={mixer}"] + [f"model.mixer_options.{mixer}.{k}={json.dumps(v)}" for k, v in options.items()]


def _cell_overrides(size: int, mech: str, seed: int) -> list[str]:
    """The overrides that make a cell of the study's config: seed, parameter budget and mixer."""
    return [f"seed={seed}", f"model.match_params={size}"] + mechanism_overrides(mech)


@dataclass
class MoreSeeds:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    mechanisms: list[str] = field(default_factory=list)


@dataclass
class Generation:
    prompt: str = "ROMEO:"
    new_tokens: int = 200
    threads: int = 1
    #: tokens decoded (and discarded) before the timed run
    warmup_tokens: int = 8


@dataclass
class LMStudyConfig:
    config: str
    mechanisms: list[str]
    sizes: list[int]
    title: str = "Character-level language modelling on tiny Shakespeare: causal mixers at matched sizes"
    seeds: list[int] = field(default_factory=lambda: [0])
    more_seeds: MoreSeeds | None = None
    generation: Generation = field(default_factory=Generation)
    run_root: str = "runs/study/lm-cpu"
    #: a tracked file of the finished cells' records, so that the grid continues on another machine;
    #: None: only ``<run_root>/results.json``
    records: str | None = None
    doc: str = "docs/results/lm.md"
    overrides: list[str] = field(default_factory=list)
    #: earlier protocols whose records the report compares with this one's
    earlier: list[EarlierProtocol] = field(default_factory=list)

    def validate(self) -> None:
        if not self.mechanisms or len(set(self.mechanisms)) != len(self.mechanisms):
            raise ValueError(f"study key 'mechanisms' must list distinct mechanisms, got {self.mechanisms}")
        for mech in self.mechanisms:
            check_causal_mechanism(mech)
        if not self.sizes or len(set(self.sizes)) != len(self.sizes) or any(s < 1 for s in self.sizes):
            raise ValueError(f"study key 'sizes' must list distinct positive parameter budgets, got {self.sizes}")
        if not self.seeds:
            raise ValueError("study key 'seeds' must list at least one seed")
        if self.more_seeds:
            missing = [m for m in self.more_seeds.mechanisms if m not in self.mechanisms]
            if missing:
                raise ValueError(f"study key 'more_seeds.mechanisms' names mechanisms not in 'mechanisms': {missing}")
        g = self.generation
        if not g.prompt or g.new_tokens < 1 or g.threads < 1 or g.warmup_tokens < 0:
            raise ValueError("study key 'generation': the prompt must not be empty, new_tokens and threads must be "
                             ">= 1 and warmup_tokens >= 0")


def load_lm_study(path: str | Path) -> LMStudyConfig:
    return from_dict(LMStudyConfig, read_study_file(path))


def cell_key(size: int, mechanism: str, seed: int) -> str:
    return f"{size}/{mechanism}/seed{seed}"


def mechanism_seeds(study: LMStudyConfig, mech: str) -> list[int]:
    seeds = list(study.seeds)
    if study.more_seeds and mech in study.more_seeds.mechanisms:
        seeds = sorted(set(seeds) | set(study.more_seeds.seeds))
    return seeds


def study_cells(study: LMStudyConfig) -> list[tuple[int, str, int]]:
    """Every (size, mechanism, seed) of the grid: sizes in order, then mechanisms, then seeds."""
    return [(size, mech, s) for size in study.sizes for mech in study.mechanisms for s in mechanism_seeds(study, mech)]


def missing_cells(study: LMStudyConfig, results: dict) -> list[str]:
    keys = [cell_key(*c) for c in study_cells(study)]
    return [k for k in keys if not results.get(k, {}).get("finished")]


# -- measurements ------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def training_throughput(run_dir: Path, seq_len: int, log_every: int) -> float | None:
    """Characters per second of training: the median, over the logged windows of ``train_log.csv``
    (the rows at multiples of ``log_every`` and the last), of samples per second times ``seq_len``."""
    rows = _read_csv(run_dir / "train_log.csv")
    if not rows:
        return None
    last = max(int(r["step"]) for r in rows)
    rates = [_float(r.get("samples_per_s")) for r in rows
             if int(r["step"]) % max(log_every, 1) == 0 or int(r["step"]) == last]
    rates = [r for r in rates if r is not None and r > 0]
    return statistics.median(rates) * seq_len if rates else None


def validation_curve(run_dir: Path, metric: str = "bpc") -> list[list[float]]:
    """[[step, value], ...] of the validation rows of the run's ``eval_log.csv``."""
    out = []
    for row in _read_csv(run_dir / "eval_log.csv"):
        value = _float(row.get(metric))
        if row.get("split") == "val" and value is not None:
            out.append([int(float(row["step"])), value])
    return out


def measure_generation(checkpoint: Path | Any, prompt: str, new_tokens: int, threads: int, warmup_tokens: int) -> dict:
    """Greedy decoding of ``new_tokens`` characters after ``prompt`` on the CPU with ``threads``
    thread(s): new tokens per second (the prompt excluded), the seconds, and the text. ``checkpoint``
    may be a config instead: its model, untrained (the speed of decoding a fixed number of characters
    does not depend on the weights; the text does)."""
    from ...models.generation import generate
    from .text import load_lm

    with torch_threads(threads):
        if isinstance(checkpoint, (str, Path)):
            model, vocab = load_lm(checkpoint, device="cpu")
        else:
            from ...train.tasks import build_task

            task = build_task(checkpoint)
            torch.manual_seed(checkpoint.seed)
            model, vocab = task.build_model().eval(), task.vocab
        ids = vocab.encode_tensor(prompt, "the study's generation prompt")
        if warmup_tokens:
            generate(model, ids, warmup_tokens, temperature=0.0)
        out = generate(model, ids, new_tokens, temperature=0.0)
        return {"tokens_per_second": out.tokens_per_second, "seconds": out.seconds,
                "prompt_seconds": out.prompt_seconds, "new_tokens": new_tokens, "prompt": prompt,
                "text": vocab.decode(out.ids), "device": "cpu", "threads": torch.get_num_threads(), **machine()}


# -- the study -----------------------------------------------------------------------------------------------
def run_lm_study(study: LMStudyConfig, *, command: str, mechanisms: list[str] | None = None,
                 sizes: list[int] | None = None, seeds: list[int] | None = None,
                 extra_overrides: list[str] | None = None, root: Path | None = None,
                 log: Callable[[str], None] = print, doc_only: bool = False, write_doc: bool = False,
                 retime: bool = False) -> Path:
    """Run every unfinished cell (restricted to ``mechanisms`` / ``sizes`` / ``seeds`` when given), then
    write the report to ``<run_root>/report.md``, or with ``write_doc`` to the study's ``doc`` and its
    learning-curve figure, only from a complete grid (else ``ValueError`` listing the missing cells,
    before any work).

    ``retime`` measures the speeds of the finished cells of the selection again, one after another in
    this one process, instead of training: :data:`TIMING_STEPS` training steps of the cell's config
    from a fresh model (:func:`amlp.train.study_common.measure_training`) and the generation. Run it
    on a quiet machine once the grid is complete, so that every mixer's speeds come from one pass
    under one load; the numbers measured during training are kept in the record."""
    from ...train.loop import run_experiment
    from ..translation.study import _tested_checkpoint

    study.validate()
    root = Path(root or ".")
    run_root = root / study.run_root
    store = cell_store(root, run_root, study.records, extra_overrides or [], log, free=SPEED_ONLY_KEYS)
    overrides = list(study.overrides) + list(extra_overrides or [])
    for name, wanted, known in (("--mechanisms", mechanisms, study.mechanisms), ("--sizes", sizes, study.sizes)):
        unknown = [w for w in wanted or [] if w not in known]
        if unknown:
            raise ValueError(f"{name}: {', '.join(map(repr, unknown))} not in this study "
                             f"(it has {'; '.join(map(str, known))})")
    cells = [(n, m, s) for n, m, s in study_cells(study)
             if (not mechanisms or m in mechanisms) and (not sizes or n in sizes) and (not seeds or s in seeds)]
    if write_doc:
        check_doc_selection(study.doc, missing_cells(study, store.read()),
                            (cell_key(*c) for c in cells))

    def config_now(size: int, mech: str, seed: int):
        return lambda record: load_config(root / study.config, overrides + _cell_overrides(size, mech, seed))

    checked = study_cells(study) if write_doc else cells
    check_protocols(store.read(), ((cell_key(*c), config_now(*c)) for c in checked), store.source(root),
                    free=SPEED_ONLY_KEYS)
    if retime and not doc_only:
        _retime(study, cells, root, store, log)
    elif not doc_only:
        g = study.generation
        for i, (size, mech, seed) in enumerate(cells, 1):
            key = cell_key(size, mech, seed)
            if store.finished(key):
                log(f"({i}/{len(cells)}) {key}: done before, skipped")
                continue
            cell_overrides = _cell_overrides(size, mech, seed)
            cfg = load_config(root / study.config, overrides + cell_overrides)
            run_dir = run_root / f"p{size}" / mechanism_dir(mech) / f"seed{seed}"
            log(f"({i}/{len(cells)}) {key}: training in {run_dir}")
            result = run_experiment(cfg, run_dir, resume="auto", same_config=True)
            trained = machine()
            ckpt = _tested_checkpoint(run_dir, cfg)
            log(f"    generating {g.new_tokens} characters with {g.threads} thread(s)")
            generation = measure_generation(ckpt, g.prompt, g.new_tokens, g.threads, g.warmup_tokens)
            val = result.val_metrics or {}
            record = cell_record(cfg, result, root=root, config=study.config, overrides=overrides + cell_overrides,
                                 run_dir=run_dir, checkpoint=ckpt, size=size, mechanism=mech, seed=seed,
                                 bpc=val.get("bpc"), params=val.get("params"),
                                 matched={k[len("matched_"):]: v for k, v in val.items() if k.startswith("matched_")},
                                 train_chars_per_s=training_throughput(run_dir, cfg.data.seq_len, cfg.train.log_every),
                                 train_machine=trained, generation=generation, curve=validation_curve(run_dir))
            store.record(key, record)
            log(f"    {key}: {val.get('bpc', float('nan')):.3f} bits per character, "
                f"{generation['tokens_per_second']:.1f} tokens/s generating")
    results = store.read()
    doc = report_path(root, run_root, study.doc, missing_cells(study, results), write_doc)
    write_lm_report(doc, results, study=study, command=command, figure=write_doc, root=root,
                    source=store.source(root), earlier=load_earlier(root, study.earlier))
    log(f"report written to {doc}")
    return doc


def _speed_only(override: str) -> bool:
    return override.split("=", 1)[0].strip() in SPEED_ONLY_KEYS


def protocol_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` without the :data:`SPEED_ONLY_KEYS`: the cell's config as the study's protocol times it."""
    return [o for o in overrides if not _speed_only(o)]


#: training steps timed by ``--retime``, after the warm-up steps
TIMING_STEPS, TIMING_WARMUP = 20, 3


def _retime(study: LMStudyConfig, cells, root: Path, store: CellStore, log: Callable[[str], None]) -> None:
    g = study.generation
    started = start_timing_pass(log)
    for i, (size, mech, seed) in enumerate(cells, 1):
        key = cell_key(size, mech, seed)
        record = store.read().get(key, {})
        if not record.get("finished"):
            log(f"({i}/{len(cells)}) {key}: not finished, nothing to time")
            continue
        log(f"({i}/{len(cells)}) {key}: timing {TIMING_STEPS} training steps and {g.new_tokens} generated characters")
        # the study's own speed-only overrides are its protocol; the command line's are not
        cfg = load_config(root / study.config, protocol_overrides(record["overrides"])
                          + [o for o in study.overrides if _speed_only(o)])
        timing = measure_training(cfg, TIMING_STEPS, TIMING_WARMUP)
        # a cell finished on another machine has no checkpoint here: its untrained model decodes as fast
        ckpt = store.checkpoint(root, record)
        generation = measure_generation(ckpt if ckpt is not None else cfg, g.prompt, g.new_tokens, g.threads,
                                        g.warmup_tokens)
        if ckpt is None:
            generation.update(text=record.get("generation", {}).get("text"), untrained=True)
        record.setdefault("during_training", {
            "train_chars_per_s": record.get("train_chars_per_s"), "train_machine": record.get("train_machine"),
            "generation": record.get("generation")})
        record.update(train_chars_per_s=cfg.train.batch_size * cfg.data.seq_len / timing["seconds_per_step"],
                      train_machine=timing, generation=generation, timing_pass=started)
        store.record(key, record)
        log(f"    {key}: {record['train_chars_per_s']:.0f} characters/s training, "
            f"{generation['tokens_per_second']:.1f} tokens/s generating")


# -- the report ------------------------------------------------------------------------------------------------
def _recs(results: dict, size: int, mech: str) -> list[dict]:
    return sorted((r for r in results.values() if r.get("finished") and r.get("size") == size
                   and r.get("mechanism") == mech), key=lambda r: r["seed"])


def _params(recs: list[dict]) -> str:
    if not recs or recs[0].get("params") is None:
        return "—"
    r = recs[0]
    matched = r.get("matched") or {}
    how = [f"{k.replace('_', ' ')} {int(v)}" for k, v in matched.items()]
    return f"{int(r['params']):,}" + (f" ({', '.join(how)})" if how else "")


def write_lm_report(path: Path, results: dict, *, study: LMStudyConfig, command: str, figure: bool,
                    root: Path, source: str | None = None,
                    earlier: list[tuple[EarlierProtocol, dict]] = ()) -> None:
    finished = [r for r in results.values() if r.get("finished")]
    g = study.generation
    source = source or f"{study.run_root}/results.json"
    lines = [f"# {study.title}", "",
             f"Generated by `{command}` from `{source}` ({len(finished)} finished runs). "
             "Validation bits per character over the whole validation text at the last step, mean ± sample "
             "standard deviation over seeds (¹: a single seed). Every model of a table is sized to the same "
             "parameter budget by the matched-parameter rule (`model.match_params`; the count reached and how "
             "are in the parameters column). Training throughput is characters per second of training (as the "
             "Protocol says how it was timed); generation is "
             f"{g.new_tokens} characters decoded greedily after the prompt {json.dumps(g.prompt)} through each "
             f"mixer's recurrent step, on the CPU with {g.threads} thread(s), in new characters per second.", ""]
    more = set(study.more_seeds.mechanisms) if study.more_seeds else set()
    for size in study.sizes:
        lines += [f"## {size:,} parameters", "",
                  "| mixer | validation bpc | seeds | parameters | training chars / s | generation tokens / s |",
                  "|---|---|---|---|---|---|"]
        for mech in study.mechanisms:
            recs = _recs(results, size, mech)
            mark = "" if mech in more else " ¹"
            lines.append("| " + " | ".join([
                mechanism_label(mech) + mark, fmt_seeds(record_values(recs, lambda r: r["bpc"]), 3),
                f"{len(recs)} of {len(mechanism_seeds(study, mech))}", _params(recs),
                fmt_seeds(record_values(recs, lambda r: r["train_chars_per_s"]), 0),
                fmt_seeds(record_values(recs, lambda r: r["generation"]["tokens_per_second"]), 1)]) + " |")
        lines.append("")
    extra = f"seeds {', '.join(map(str, study.more_seeds.seeds))}" if more else ""
    lines += [f"A mixer marked ¹ runs one seed ({', '.join(map(str, study.seeds))})"
              + (f"; the others run {extra}." if more else ".")
              + " No numbers are quoted from the papers: the HyperMLP paper's language-modelling numbers "
              "(NanoGPT on OpenWebText2, pre-training on FineWeb-Edu) are another data set and scale, and their "
              "per-model values are not in the project's sources.", ""]
    lines += report_checks(results, study)
    for protocol, records in earlier:
        lines += _earlier(protocol, records, results, study)
    lines += _samples(results, study)
    if figure:
        lines += _figure(results, study, root / "docs" / "figures" / FIGURE, path, root)
    lines += _protocol(finished, study, load_config(root / study.config, list(study.overrides)).train.threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _earlier(protocol: EarlierProtocol, records: dict, results: dict, study: LMStudyConfig) -> list[str]:
    """The cells an earlier protocol has: their validation bpc beside this protocol's."""
    rows = (([f"{size:,}", mechanism_label(mech)], _bpcs(records, size, mech), _bpcs(results, size, mech))
            for size in study.sizes for mech in study.mechanisms)
    return earlier_section(protocol, "validation bits per character", ["parameters", "mixer"], rows, 3)


def _by_name(study: LMStudyConfig, name: str) -> str | None:
    """The study's mechanism whose mixer is ``name`` (the first, if several), or None."""
    return next((m for m in study.mechanisms if m.partition(":")[0] == name), None)


def _bpcs(results: dict, size: int, mech: str | None) -> list[float]:
    return record_values(_recs(results, size, mech), lambda r: r["bpc"]) if mech else []


def _difference(a: list[float], b: list[float], scale: float, unit: str, digits: int = 3) -> str:
    """``mean(a) - mean(b)`` times ``scale`` in ``unit``, with the seeds behind each side and, when both
    sides have several seeds, whether the difference is within the larger of their standard deviations."""
    (mean_a, std_a), (mean_b, std_b) = _mean_std(a), _mean_std(b)
    text = f"{(mean_a - mean_b) * scale:+.{digits}f} {unit} ({len(a)} and {len(b)} seed(s)"
    if len(a) > 1 and len(b) > 1:
        spread = max(std_a, std_b) * scale
        text += f"; {'within' if abs(mean_a - mean_b) * scale <= spread else 'beyond'} the larger seed std, " \
                f"{spread:.{digits}f}"
    return text + ")"


def report_checks(results: dict, study: LMStudyConfig) -> list[str]:
    """The report's "Checks" section: the softmax target of the CPU protocol, and the two papers' claims
    about language modelling at each size (what the recorded cells say; empty when softmax has no
    finished cell)."""
    soft = _by_name(study, "softmax")
    if not any(_bpcs(results, size, soft) for size in study.sizes):
        return []
    lines = ["## Checks", "",
             f"Softmax target: a validation loss of at most {SOFTMAX_TARGET} per character, where small character "
             "models on tiny Shakespeare reach about 1.5. Those published values are natural-log losses (nats per "
             "character: nanoGPT's character model of 10.7 million parameters reports about 1.47, which is "
             f"{1.47 / NATS_PER_BIT:.2f} bits), so the target is checked in nats; the tables above are in bits "
             "(nats = bits x ln 2).", ""]
    for size in study.sizes:
        values = _bpcs(results, size, soft)
        if not values:
            continue
        bits = _mean_std(values)[0]
        nats = bits * NATS_PER_BIT
        lines.append(f"- Softmax at {size:,} parameters: {nats:.3f} nats per character ({bits:.3f} bits, "
                     f"{len(values)} seed(s)): {'held' if nats <= SOFTMAX_TARGET else 'not held'} in nats, "
                     f"{'held' if bits <= SOFTMAX_TARGET else 'not held'} in bits.")
    claims = (("causal-rn", "linear", "CausalRN (linear form) minus linear attention",
               "CausalRN v2 has its linear form comparable to linear Transformers on byte-level language modelling"),
              ("hyper-mlp", "softmax", "HyperMLP minus softmax",
               "the HyperMLP paper has HyperMLP and HyperGLU below softmax at matched parameter budgets "
               "(about 0.06 lower next-token loss at its scale, by a summary of the paper)"),
              ("hyper-glu", "softmax", "HyperGLU minus softmax", None))
    for name, other, what, paper in claims:
        a_mech, b_mech = _by_name(study, name), _by_name(study, other)
        parts = [f"{size:,}: {_difference(a, b, NATS_PER_BIT, 'nats')}" for size in study.sizes
                 if (a := _bpcs(results, size, a_mech)) and (b := _bpcs(results, size, b_mech))]
        if parts:
            lines.append(f"- {what}, validation loss per character: {'; '.join(parts)}."
                         + (f" For comparison, {paper}." if paper else ""))
    return lines + [""]


def _samples(results: dict, study: LMStudyConfig) -> list[str]:
    """The "Generated text" section: the text each mixer's model of the largest size (first seed) wrote in
    the generation measurement, after its prompt; empty when no such cell has finished."""
    size, seed = max(study.sizes), study.seeds[0]
    shown = [(mech, rec) for mech in study.mechanisms for rec in _recs(results, size, mech)
             if rec["seed"] == seed and rec.get("generation", {}).get("text") is not None]
    if not shown:
        return []
    g = study.generation
    lines = ["## Generated text", "",
             f"What each model of {size:,} parameters (seed {seed}) wrote in the generation measurement: "
             f"{g.new_tokens} characters, greedy, after the prompt {json.dumps(g.prompt)} (shown first).", ""]
    for mech, rec in shown:
        lines += [f"{mechanism_label(mech)}:", "", "```text", rec["generation"].get("prompt", g.prompt)
                  + rec["generation"]["text"], "```", ""]
    return lines


def _curve(rec: dict, root: Path) -> list[list[float]]:
    """The cell's validation curve from its run's eval log (the recorded copy if the log is gone)."""
    run_dir = Path(rec["run_dir"])
    run_dir = run_dir if run_dir.is_absolute() else root / run_dir
    return validation_curve(run_dir) or rec.get("curve") or []


def _figure(results: dict, study: LMStudyConfig, out: Path, doc: Path, root: Path) -> list[str]:
    """Validation bits per character against step, one line per mixer (the first seed), one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = study.seeds[0]
    fig, axes = plt.subplots(1, len(study.sizes), figsize=(6 * len(study.sizes), 4.5), squeeze=False)
    drawn = False
    for ax, size in zip(axes[0], study.sizes):
        for mech in study.mechanisms:
            recs = [r for r in _recs(results, size, mech) if r["seed"] == seed]
            curve = _curve(recs[0], root) if recs else []
            if curve:
                ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", markersize=3,
                        label=mechanism_label(mech).replace("`", ""))
                drawn = True
        ax.set_title(f"{size:,} parameters (seed {seed})", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation bits per character")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return []
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    rel = os.path.relpath(out, doc.parent)
    return ["## Learning curves", "", f"![validation bits per character against step]({rel})", ""]


def _protocol(recs: list[dict], study: LMStudyConfig, threads: int | None) -> list[str]:
    """The report's protocol section; ``threads`` is the protocol's training thread count."""
    if not recs:
        return ["No finished cells yet."]
    # the protocol as a cell trained with the protocol's threads gives it
    r = next((x for x in recs if x["train"].get("threads") == threads), recs[0])
    m, t, d = r["model"], r["train"], r["data"]
    options = {k: v for k, v in m["mixer_options"].items()
               if k in {parse_mechanism(x, "causal")[0] for x in study.mechanisms}}
    load = load_note([x["train_machine"] for x in recs if x.get("train_machine")] + [x["generation"] for x in recs])
    passes = [x.get("timing_pass") for x in recs]
    if None in passes:
        how = ("the median, over the logged windows of a run's train log, of its samples per second times the "
               "window length")
    else:
        how = (f"{TIMING_STEPS} steps of each cell's config from a fresh model after {TIMING_WARMUP} warm-up steps "
               "(`amlp.train.study_common.measure_training`)")
    speed = f"- Speeds: training characters per second are {how}. {timing_passes(passes, 'amlp study lm --retime')}"
    if set(passes) != {None} and None in passes:
        speed += " Cells not yet timed again keep the speeds measured during their training."
    threaded = [f"{x['size']:,} {mechanism_label(x['mechanism'])} seed {x['seed']}" for x in recs
                if x.get("timing_pass") is None and x["train"].get("threads") != threads]
    if threaded:
        speed += (f" {len(threaded)} cell(s) trained with another thread count than the protocol's "
                  f"({'; '.join(threaded)}): their training speeds compare with no other cell's until "
                  "`amlp study lm --retime` times them again.")
    untrained = sum(bool(x["generation"].get("untrained")) for x in recs)
    if untrained:
        speed += (f" The generation of {untrained} cell(s) trained on another machine was timed with the cell's model "
                  "untrained (its checkpoint was not there; decoding a fixed number of characters costs the same "
                  "whatever the weights); their sample text is the trained model's.")
    return ["## Protocol", "",
            f"- Config `{r['config']}` with `model.mixer` and `model.match_params` set per cell: {m['n_layers']} "
            f"decoder blocks, {m['heads']} heads, windows of {d['seq_len']} characters (the first "
            f"{d['train_fraction']:.0%} of the text is training text, the rest validation text), dropout "
            f"{m['dropout']}; batch {t['batch_size']}, {t['max_steps']} steps of {t['optimizer']} at {t['lr']:g} "
            f"({t['schedule']} schedule, {t['warmup_steps']} warm-up steps), clip {t['clip_norm']}, "
            f"{t.get('threads') or 'all'} training thread(s); validation every {t['eval_every']} steps.",
            f"- Sizes {', '.join(f'{s:,}' for s in study.sizes)} parameters, each within "
            f"{m['match_tolerance']:.0%} by `model.match_by: {m['match_by']}` (the width for most mixers, the QK "
            "rank for HyperMLP and HyperGLU where a rank reaches the budget; the MLP's width where the width's "
            f"steps are too coarse). Mixer options (a row's own options are merged in, replacing the same keys): "
            f"{json.dumps(options, sort_keys=True)}.",
            f"- Generation: {study.generation.new_tokens} new characters, greedy, after a "
            f"{study.generation.warmup_tokens}-character warm-up; past the model's "
            f"{m.get('max_length') or d['seq_len']} learned positions the context is cut to its last half and "
            f"fed again (`amlp.models.generation.generate`), for every mixer alike.",
            speed + load, ""]
