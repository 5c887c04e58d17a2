"""The speech study: FastSpeech 2 (NAR) and Transformer-TTS (AR) x mechanisms x seeds, in the layout of
the AMLP paper's Table 1 and Table 9, with synthesis speed (Figure 2a) and the rank ablation of
AMLP-Cov (Figure 2b).

Every cell is one ``amlp train tts`` run in ``<run_root>/<arch>/<mechanism>/seed<s>``; finished cells
are recorded in ``<run_root>/results.json`` and skipped when the study runs again (an unfinished cell
continues from its last checkpoint). A row's mechanism is put at every attention site of its model
(FastSpeech 2: encoder and decoder; Transformer-TTS: encoder, causal decoder self and decoder cross),
as the paper replaces every softmax attention. The rank ablation adds cells of its row with the rank
option set to each value (a value equal to the row's own is the row's cell).

After training, each cell is scored on the test split (MCD, MSD, and for FastSpeech 2 the trivial
baseline, :mod:`amlp.tasks.tts.task`), its synthesis is timed on the first ``latency.utterances`` test
utterances at every batch size of ``latency.batch_sizes`` (mel spectrograms per second, wall clock,
model only: the vocoder is the same for every row; peak memory added), and ``wavs`` test sentences are
written as wav files under the run folder.

A study file::

    title: "..."
    configs: {fastspeech2: configs/tts/cpu/fastspeech2.yaml, transformer-tts: configs/tts/cpu/transformer_tts.yaml}
    rows:
      - {arch: fastspeech2, mechanism: softmax}
      - {arch: fastspeech2, mechanism: "amlp-cov:form=official,landmarks=64,activation=relu"}
      - {arch: transformer-tts, mechanism: softmax}
    seeds: [0]
    more_seeds: {seeds: [0, 1, 2], rows: [fastspeech2/softmax]}
    rank_ablation: {row: "fastspeech2/amlp-cov:...", option: landmarks, values: [8, 16, 32, 64, 128]}
    latency: {batch_sizes: [1, 16], utterances: 50}
    wavs: 3
    run_root: runs/study/tts-cpu
    doc: docs/results/tts.md
    overrides: []
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...train.config import from_dict, load_config, read_study_file
from ...train.study_common import cell_record, check_doc_selection, machine, report_path, torch_threads
from ...train.study_forecasting import _read_results, _record, mechanism_dir, parse_mechanism

ARCHS = ("fastspeech2", "transformer-tts")
#: the paper's LJSpeech (MCD, MSD) (AMLP paper Table 1 and Table 9), quoted beside our rows
PAPER: dict[str, tuple[float, float]] = {
    "transformer-tts/softmax": (4.0953, 2.1985),
    "transformer-tts/abc": (5.1302, 2.5957),
    "fastspeech2/softmax": (3.4748, 1.9735),
    "fastspeech2/local": (3.4189, 1.9704),
    "fastspeech2/abc": (3.3925, 1.9658),
    "fastspeech2/xca": (3.5003, 2.0239),
    "fastspeech2/gmlp": (3.4025, 1.9641),
    "fastspeech2/cosformer": (3.3998, 1.9561),
    "fastspeech2/performer": (3.4374, 1.9830),
    "fastspeech2/amlp-cov": (3.3274, 1.9396),
}
LABELS = {"softmax": "softmax", "local": "local", "abc": "ABC", "xca": "XCA", "gmlp": "gMLP",
          "cosformer": "cosFormer", "performer": "Performer", "amlp-cov": "AMLP-Cov", "amlp-pquery": "AMLP-PQuery"}


@dataclass
class StudyRow:
    arch: str
    mechanism: str

    @property
    def key(self) -> str:
        return f"{self.arch}/{self.mechanism}"


@dataclass
class MoreSeeds:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rows: list[str] = field(default_factory=list)


@dataclass
class RankAblation:
    row: str
    option: str = "landmarks"
    values: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])


@dataclass
class Latency:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    utterances: int = 50


@dataclass
class TTSStudyConfig:
    configs: dict[str, str]
    rows: list[StudyRow]
    title: str = "Text-to-speech: FastSpeech 2 and Transformer-TTS with efficient attention"
    seeds: list[int] = field(default_factory=lambda: [0])
    more_seeds: MoreSeeds | None = None
    rank_ablation: RankAblation | None = None
    latency: Latency = field(default_factory=Latency)
    wavs: int = 3
    run_root: str = "runs/study/tts-cpu"
    doc: str = "docs/results/tts.md"
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        unknown = sorted(set(self.configs) - set(ARCHS))
        if unknown or not self.configs:
            raise ValueError(f"study key 'configs' maps an arch ({', '.join(ARCHS)}) to a config file, got "
                             f"{sorted(self.configs)}")
        keys = [r.key for r in self.rows]
        if len(set(keys)) != len(keys):
            raise ValueError(f"study key 'rows' repeats a row: {keys}")
        for r in self.rows:
            if r.arch not in self.configs:
                raise ValueError(f"study row {r.key!r}: no config for arch {r.arch!r} under 'configs'")
            parse_mechanism(r.mechanism, "causal" if r.arch == "transformer-tts" else "noncausal")
        if self.more_seeds:
            missing = [k for k in self.more_seeds.rows if k not in keys]
            if missing:
                raise ValueError(f"study key 'more_seeds.rows' names rows that are not in 'rows': {missing}")
        if self.rank_ablation:
            if self.rank_ablation.row not in keys:
                raise ValueError(f"study key 'rank_ablation.row' is not a row: {self.rank_ablation.row!r}")
            if not self.rank_ablation.values or any(v < 1 for v in self.rank_ablation.values):
                raise ValueError("study key 'rank_ablation.values' must be positive integers")
        if any(b < 1 for b in self.latency.batch_sizes) or self.latency.utterances < 1:
            raise ValueError("study key 'latency': batch sizes and utterances must be >= 1")
        if self.wavs < 0:
            raise ValueError(f"study key 'wavs' must be >= 0, got {self.wavs}")


def load_tts_study(path: str | Path) -> TTSStudyConfig:
    return from_dict(TTSStudyConfig, read_study_file(path))


def with_option(mechanism: str, option: str, value: Any) -> str:
    """``mechanism`` with ``option`` set to ``value`` (added if absent), options kept in their order."""
    name, _, rest = mechanism.partition(":")
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    out, seen = [], False
    for p in parts:
        if p.partition("=")[0].strip() == option:
            out.append(f"{option}={value}")
            seen = True
        else:
            out.append(p)
    if not seen:
        out.append(f"{option}={value}")
    return f"{name}:{','.join(out)}"


@dataclass
class _Cell:
    row: StudyRow
    seed: int

    @property
    def key(self) -> str:
        return f"{self.row.key}/seed{self.seed}"


def study_cells(study: TTSStudyConfig) -> list[_Cell]:
    """Every cell of the grid: the rows (with their extra seeds), then the rank ablation's other values."""
    cells = []
    for row in study.rows:
        seeds = list(study.seeds)
        if study.more_seeds and row.key in study.more_seeds.rows:
            seeds = sorted(set(seeds) | set(study.more_seeds.seeds))
        cells += [_Cell(row, s) for s in seeds]
    if study.rank_ablation:
        base = next(r for r in study.rows if r.key == study.rank_ablation.row)
        known = {c.key for c in cells}
        for value in study.rank_ablation.values:
            cell = _Cell(StudyRow(base.arch, with_option(base.mechanism, study.rank_ablation.option, value)),
                         study.seeds[0])
            if cell.key not in known:
                cells.append(cell)
                known.add(cell.key)
    return cells


def site_overrides(row: StudyRow) -> list[str]:
    need = "causal" if row.arch == "transformer-tts" else "noncausal"
    mixer, options = parse_mechanism(row.mechanism, need)
    opts = json.dumps(options)
    out = [f"model.encoder_mixer={mixer}", f"model.encoder_options={opts}",
           f"model.decoder_mixer={mixer}", f"model.decoder_options={opts}"]
    if row.arch == "transformer-tts":
        out += [f"model.cross_mixer={mixer}", f"model.cross_options={opts}"]
    return out


def measure_synthesis(checkpoint: Path, batch_sizes: list[int], utterances: int, threads: int | None) -> dict:
    """Mel spectrograms per second (model only) and peak added memory (MiB) of synthesising the first
    ``utterances`` test utterances from their phones, per batch size."""
    from ...bench.memory import timed_peak
    from ...train.loop import load_trained_model
    from .task import collate_utterances

    with torch_threads(threads):
        config, task, model = load_trained_model(checkpoint, device="auto")
        device = next(model.parameters()).device
        data = task.dataset("test")
        n = min(utterances, len(data))

        def run(bs: int) -> int:
            frames = 0
            for start in range(0, n, bs):
                batch = collate_utterances([data[i] for i in range(start, min(start + bs, n))])
                mels = task.synthesize_mels(model, batch["phones"].to(device), batch["phone_mask"].to(device))
                frames += sum(m.shape[0] for m in mels)
            return frames

        run(min(4, n))  # warm-up
        out = {}
        for bs in batch_sizes:
            elapsed, peak = timed_peak(lambda: run(bs), device)
            out[str(bs)] = {"utterances_per_s": n / elapsed, "seconds": elapsed, "peak_mib": peak}
        return {"device": str(device), "threads": torch.get_num_threads(), "utterances": n, "batch_sizes": out,
                **machine()}


def write_wavs(checkpoint: Path, out_dir: Path, count: int) -> list[str]:
    """The first ``count`` test utterances synthesised (Griffin-Lim) as wav files in ``out_dir``."""
    from ...train.loop import load_trained_model
    from .audio import save_wav
    from .task import collate_utterances

    if count < 1:
        return []
    config, task, model = load_trained_model(checkpoint, device="auto")
    device = next(model.parameters()).device
    data = task.dataset("test")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(count, len(data))):
        batch = collate_utterances([data[i]])
        mel = task.synthesize_mels(model, batch["phones"].to(device), batch["phone_mask"].to(device))[0]
        path = out_dir / f"{data.utterances[i].id}.wav"
        save_wav(path, task.vocode(mel))
        np.save(path.with_suffix(".mel.npy"), mel)
        written.append(str(path))
    return written


def missing_cells(study: TTSStudyConfig, results: dict) -> list[str]:
    return [c.key for c in study_cells(study) if not results.get(c.key, {}).get("finished")]


def run_tts_study(study: TTSStudyConfig, *, command: str, rows: list[str] | None = None,
                  seeds: list[int] | None = None, extra_overrides: list[str] | None = None, root: Path | None = None,
                  log: Callable[[str], None] = print, doc_only: bool = False, write_doc: bool = False) -> Path:
    """Run every unfinished cell (restricted to ``rows`` / ``seeds`` when given), then write the report to
    ``<run_root>/report.md``, or with ``write_doc`` to the study's ``doc`` (with its figures), only from a
    complete grid (else ``ValueError`` listing the missing cells, before any work)."""
    from ...train.loop import run_experiment
    from ..translation.study import _tested_checkpoint

    study.validate()
    root = Path(root or ".")
    run_root = root / study.run_root
    results_path = run_root / "results.json"
    overrides = list(study.overrides) + list(extra_overrides or [])
    all_cells = study_cells(study)
    known = list(dict.fromkeys(c.row.key for c in all_cells))
    unknown = [w for w in rows or [] if w not in known]
    if unknown:
        raise ValueError(f"--rows: {', '.join(map(repr, unknown))} not in this study (it has {'; '.join(known)})")
    cells = [c for c in all_cells if (not rows or c.row.key in rows) and (not seeds or c.seed in seeds)]
    if write_doc:
        check_doc_selection(study.doc, missing_cells(study, _read_results(results_path)), (c.key for c in cells))
    if not doc_only:
        for i, cell in enumerate(cells, 1):
            if _read_results(results_path).get(cell.key, {}).get("finished"):
                log(f"({i}/{len(cells)}) {cell.key}: done before, skipped")
                continue
            cell_overrides = [f"seed={cell.seed}"] + site_overrides(cell.row)
            cfg = load_config(root / study.configs[cell.row.arch], overrides + cell_overrides)
            run_dir = run_root / cell.row.arch / mechanism_dir(cell.row.mechanism) / f"seed{cell.seed}"
            log(f"({i}/{len(cells)}) {cell.key}: training in {run_dir}")
            result = run_experiment(cfg, run_dir, resume="auto", same_config=True)
            ckpt = _tested_checkpoint(run_dir, cfg)
            log(f"    timing synthesis at batch sizes {study.latency.batch_sizes}")
            latency = measure_synthesis(ckpt, study.latency.batch_sizes, study.latency.utterances, cfg.train.threads)
            wavs = write_wavs(ckpt, run_dir / "wavs", study.wavs)
            record = cell_record(cfg, result, root=root, config=study.configs[cell.row.arch],
                                 overrides=overrides + cell_overrides, run_dir=run_dir, checkpoint=ckpt,
                                 row=cell.row.key, arch=cell.row.arch, mechanism=cell.row.mechanism, seed=cell.seed,
                                 test=result.test_metrics, latency=latency,
                                 wavs=[str(Path(w).relative_to(root)) if Path(w).is_relative_to(root) else w
                                       for w in wavs])
            _record(results_path, cell.key, record)
            t = result.test_metrics or {}
            log(f"    {cell.key}: MCD {t.get('mcd', float('nan')):.3f}, MSD {t.get('msd', float('nan')):.3f}")
    results = _read_results(results_path)
    doc = report_path(root, run_root, study.doc, missing_cells(study, results), write_doc)
    from .report import write_tts_report

    write_tts_report(doc, results, study=study, command=command, figures=write_doc, root=root)
    log(f"report written to {doc}")
    return doc
