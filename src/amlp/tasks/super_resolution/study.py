"""The super-resolution study: SR3 with each attention mechanism x seeds on ORL faces, in the layout of the
AMLP paper's Table 3, with bicubic upsampling as a reference row and sampling time and memory beside.

Every cell is one ``amlp train sr`` run in ``<run_root>/<mechanism>/seed<s>``; finished cells are recorded
in ``<run_root>/results.json`` and skipped when the study runs again (an unfinished cell continues from
its last checkpoint). After training, each cell is scored on the test people (PSNR, SSIM; the bicubic
scores come with every cell and are the same for all), its sampling is timed (seconds per image at a
batch of ``timing.batch_size``, peak memory added) and its samples of the first ``figure_faces`` test
images are kept for the figure.

A study file::

    title: "..."
    config: configs/sr/cpu/sr3.yaml
    mechanisms: [softmax, local, gmlp, xca, abc, "amlp-cov:form=official,landmarks=16", ...]
    seeds: [0]
    more_seeds: {seeds: [0, 1, 2], mechanisms: [softmax, "amlp-cov:form=official,landmarks=16"]}
    timing: {batch_size: 8, images: 8}
    figure_faces: 6
    run_root: runs/study/sr-cpu
    doc: docs/results/super_resolution.md
    overrides: []
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...train.config import from_dict, load_config, read_study_file
from ...train.study_common import (cell_record, check_doc_selection, fmt_seeds, load_note, machine, report_path,
                                   torch_threads)
from ...train.study_forecasting import _mean_std, _read_results, _record, mechanism_dir, parse_mechanism

#: the paper's CelebA-HQ (PSNR, SSIM) (AMLP paper Table 3; "vanilla" is softmax), quoted beside our rows
PAPER = {"softmax": (23.18, 0.675), "local": (23.33, 0.682), "gmlp": (23.24, 0.679), "xca": (23.08, 0.670),
         "abc": (22.54, 0.635), "amlp-cov": (23.28, 0.684)}
LABELS = {"softmax": "softmax", "local": "local", "gmlp": "gMLP", "xca": "XCA", "abc": "ABC",
          "amlp-cov": "AMLP-Cov", "amlp-pquery": "AMLP-PQuery"}


@dataclass
class MoreSeeds:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    mechanisms: list[str] = field(default_factory=list)


@dataclass
class Timing:
    batch_size: int = 8
    images: int = 8


@dataclass
class SRStudyConfig:
    config: str
    mechanisms: list[str]
    title: str = "Super-resolution on ORL faces: SR3 with efficient attention"
    seeds: list[int] = field(default_factory=lambda: [0])
    more_seeds: MoreSeeds | None = None
    timing: Timing = field(default_factory=Timing)
    figure_faces: int = 6
    run_root: str = "runs/study/sr-cpu"
    doc: str = "docs/results/super_resolution.md"
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if len(set(self.mechanisms)) != len(self.mechanisms) or not self.mechanisms:
            raise ValueError(f"study key 'mechanisms' must list distinct mechanisms, got {self.mechanisms}")
        for mech in self.mechanisms:
            parse_mechanism(mech, "noncausal")
        if self.more_seeds:
            missing = [m for m in self.more_seeds.mechanisms if m not in self.mechanisms]
            if missing:
                raise ValueError(f"study key 'more_seeds.mechanisms' names mechanisms not in 'mechanisms': {missing}")
        if self.timing.batch_size < 1 or self.timing.images < 1 or self.figure_faces < 0:
            raise ValueError("study keys 'timing.batch_size', 'timing.images' must be >= 1 and 'figure_faces' >= 0")


def load_sr_study(path: str | Path) -> SRStudyConfig:
    return from_dict(SRStudyConfig, read_study_file(path))


def study_cells(study: SRStudyConfig) -> list[tuple[str, int]]:
    cells = []
    for mech in study.mechanisms:
        seeds = list(study.seeds)
        if study.more_seeds and mech in study.more_seeds.mechanisms:
            seeds = sorted(set(seeds) | set(study.more_seeds.seeds))
        cells += [(mech, s) for s in seeds]
    return cells


def cell_key(mechanism: str, seed: int) -> str:
    return f"{mechanism}/seed{seed}"


def measure_sampling(checkpoint: Path, batch_size: int, images: int, threads: int | None,
                     keep: int, out: Path) -> dict:
    """Seconds per sampled image and peak added memory (MiB) over the first ``images`` test images at
    ``batch_size``; the samples of the first ``keep`` test images are saved to ``out`` (``.npy``)."""
    from ...bench.memory import timed_peak
    from ...train.loop import load_trained_model

    with torch_threads(threads):
        config, task, model = load_trained_model(checkpoint, device="auto")
        device = next(model.parameters()).device
        data = task.dataset("test")
        n = min(images, len(data))
        lr_up = torch.stack([data[i]["lr_up"] for i in range(max(n, keep))]).to(device)
        task.super_resolve(model, lr_up[:1])  # warm-up

        def run():
            for start in range(0, n, batch_size):
                task.super_resolve(model, lr_up[start:start + batch_size])

        elapsed, peak = timed_peak(run, device)
        if keep:
            samples = torch.cat([task.super_resolve(model, lr_up[i:i + 1], seed=i) for i in range(keep)])
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, samples.float().cpu().numpy())
        return {"device": str(device), "threads": torch.get_num_threads(), "images": n, "batch_size": batch_size,
                "seconds_per_image": elapsed / n, "peak_mib": peak, **machine()}


def missing_cells(study: SRStudyConfig, results: dict) -> list[str]:
    return [cell_key(m, s) for m, s in study_cells(study) if not results.get(cell_key(m, s), {}).get("finished")]


def run_sr_study(study: SRStudyConfig, *, command: str, mechanisms: list[str] | None = None,
                 seeds: list[int] | None = None, extra_overrides: list[str] | None = None, root: Path | None = None,
                 log: Callable[[str], None] = print, doc_only: bool = False, write_doc: bool = False) -> Path:
    """Run every unfinished cell (restricted to ``mechanisms`` / ``seeds`` when given), then write the report
    to ``<run_root>/report.md``, or with ``write_doc`` to the study's ``doc`` and its figure, only from a
    complete grid (else ``ValueError`` listing the missing cells, before any work)."""
    from ...train.loop import run_experiment
    from ..translation.study import _tested_checkpoint

    study.validate()
    root = Path(root or ".")
    run_root = root / study.run_root
    results_path = run_root / "results.json"
    overrides = list(study.overrides) + list(extra_overrides or [])
    unknown = [m for m in mechanisms or [] if m not in study.mechanisms]
    if unknown:
        raise ValueError(f"--mechanisms: {', '.join(map(repr, unknown))} not in this study "
                         f"(it has {'; '.join(study.mechanisms)})")
    cells = [(m, s) for m, s in study_cells(study) if (not mechanisms or m in mechanisms) and (not seeds or s in seeds)]
    if write_doc:
        check_doc_selection(study.doc, missing_cells(study, _read_results(results_path)),
                            (cell_key(m, s) for m, s in cells))
    if not doc_only:
        for i, (mech, seed) in enumerate(cells, 1):
            key = cell_key(mech, seed)
            if _read_results(results_path).get(key, {}).get("finished"):
                log(f"({i}/{len(cells)}) {key}: done before, skipped")
                continue
            mixer, options = parse_mechanism(mech, "noncausal")
            cell_overrides = [f"seed={seed}", f"model.mixer={mixer}", f"model.mixer_options={json.dumps(options)}"]
            cfg = load_config(root / study.config, overrides + cell_overrides)
            run_dir = run_root / mechanism_dir(mech) / f"seed{seed}"
            log(f"({i}/{len(cells)}) {key}: training in {run_dir}")
            result = run_experiment(cfg, run_dir, resume="auto", same_config=True)
            ckpt = _tested_checkpoint(run_dir, cfg)
            log(f"    timing sampling at batch {study.timing.batch_size}")
            timing = measure_sampling(ckpt, study.timing.batch_size, study.timing.images, cfg.train.threads,
                                      study.figure_faces, run_dir / "figure_samples.npy")
            samples = run_dir / "figure_samples.npy"
            record = cell_record(cfg, result, root=root, config=study.config, overrides=overrides + cell_overrides,
                                 run_dir=run_dir, checkpoint=ckpt, mechanism=mech, seed=seed,
                                 test=result.test_metrics, timing=timing,
                                 samples=str(samples.relative_to(root)) if study.figure_faces else None)
            _record(results_path, key, record)
            t = result.test_metrics or {}
            log(f"    {key}: PSNR {t.get('psnr', float('nan')):.2f}, SSIM {t.get('ssim', float('nan')):.3f}")
    results = _read_results(results_path)
    doc = report_path(root, run_root, study.doc, missing_cells(study, results), write_doc)
    write_sr_report(doc, results, study=study, command=command, figure=write_doc, root=root)
    log(f"report written to {doc}")
    return doc


# -- the report ---------------------------------------------------------------------------------------------
def _recs(results: dict, mech: str) -> list[dict]:
    return [r for r in results.values() if r.get("finished") and r.get("mechanism") == mech]


def _label(mech: str) -> str:
    name, _, options = mech.partition(":")
    return LABELS.get(name, name) + (f" `{options}`" if options else "")


def write_sr_report(path: Path, results: dict, *, study: SRStudyConfig, command: str, figure: bool,
                    root: Path) -> None:
    lines = [f"# {study.title}", "",
             f"Generated by `{command}` from `{study.run_root}/results.json`. PSNR (dB) and SSIM on the test "
             "people's 64x64 grey faces (uint8, data range 255; scikit-image), super-resolved from 16x16; mean ± "
             "std over seeds, ¹ marks a single seed. Sampling time is per image at the batch size below, model "
             "only. The paper's numbers are CelebA-HQ 16→128 RGB (Table 3), quoted for their ranking: another "
             "data set, scale and protocol.", "",
             "| model | PSNR | SSIM | seeds | s / image | peak MiB | paper PSNR | paper SSIM |",
             "|---|---|---|---|---|---|---|---|"]
    any_rec = [r for r in results.values() if r.get("finished")]
    if any_rec:
        r = any_rec[0]["test"]
        lines.append(f"| bicubic upsampling | {r['bicubic_psnr']:.2f} | {r['bicubic_ssim']:.3f} | — | — | — | — | — |")
    for mech in study.mechanisms:
        recs = _recs(results, mech)
        paper = PAPER.get(mech.split(":")[0])
        cells = [_label(mech), fmt_seeds([r["test"]["psnr"] for r in recs], 2), fmt_seeds([r["test"]["ssim"] for r in recs], 3),
                 str(len(recs)) if recs else "—",
                 fmt_seeds([r["timing"]["seconds_per_image"] for r in recs], 2),
                 fmt_seeds([r["timing"]["peak_mib"] for r in recs if r["timing"]["peak_mib"] is not None], 0)]
        cells += [f"{paper[0]:.2f}", f"{paper[1]:.3f}"] if paper else ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _checks(results, study)
    if figure:
        lines += _figure(results, study, root / "docs" / "figures" / "sr_faces.png", path)
    lines += _protocol(any_rec, study)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _checks(results: dict, study: SRStudyConfig) -> list[str]:
    """The protocol's requirement (softmax above bicubic on SSIM) and the paper's claim (AMLP-Cov above
    softmax in PSNR and SSIM), each from the means over the finished seeds; nothing before a softmax cell."""
    by_name = {m.split(":")[0]: m for m in study.mechanisms}
    if "softmax" not in by_name or not _recs(results, by_name["softmax"]):
        return []
    soft = _recs(results, by_name["softmax"])
    ssim = float(np.mean([r["test"]["ssim"] for r in soft]))
    bicubic = float(np.mean([r["test"]["bicubic_ssim"] for r in soft]))
    held = "holds" if ssim > bicubic else "does not hold"
    lines = ["## Checks", "",
             f"- SR3 with softmax against bicubic upsampling, SSIM on the test people: {ssim:.3f} against "
             f"{bicubic:.3f} ({len(soft)} seed(s)); the CPU protocol must beat bicubic: {held}."]
    cov = _recs(results, by_name["amlp-cov"]) if "amlp-cov" in by_name else []
    if cov:
        parts = []
        for metric, digits in (("psnr", 2), ("ssim", 3)):
            a = [r["test"][metric] for r in cov]
            b = [r["test"][metric] for r in soft]
            (mean_a, std_a), (mean_b, std_b) = _mean_std(a), _mean_std(b)
            diff = mean_a - mean_b
            spread = max(std_a, std_b) if len(a) > 1 and len(b) > 1 else None
            within = "" if spread is None else (
                f", {'within' if abs(diff) <= spread else 'beyond'} the larger seed std ({spread:.{digits}f})")
            parts.append(f"{metric.upper()} {diff:+.{digits}f}{within}")
        paper = PAPER["amlp-cov"][0] - PAPER["softmax"][0], PAPER["amlp-cov"][1] - PAPER["softmax"][1]
        lines.append(f"- AMLP-Cov minus softmax ({len(cov)} and {len(soft)} seed(s)): {'; '.join(parts)}. The "
                     f"paper has AMLP-Cov above softmax in both (PSNR {paper[0]:+.2f}, SSIM {paper[1]:+.3f}).")
    return lines + [""]


def _figure(results: dict, study: SRStudyConfig, out: Path, doc: Path) -> list[str]:
    """Test faces: low resolution, bicubic, softmax, AMLP-Cov, truth (seed-0 cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import FaceSRDataset, load_orl

    columns = [m for m in study.mechanisms if m.split(":")[0] in ("softmax", "amlp-cov")]
    samples = {}
    for m in columns:
        recs = [r for r in _recs(results, m) if r["seed"] == study.seeds[0] and r.get("samples")]
        if recs and Path(recs[0]["samples"]).is_file():
            samples[m] = np.load(recs[0]["samples"])
    recs = [r for r in results.values() if r.get("finished")]
    if not samples or not recs:
        return []
    d = recs[0]["data"]
    data = FaceSRDataset(load_orl(d["data_dir"]), d["test_people"], train=False)
    n = min(study.figure_faces, min(len(s) for s in samples.values()))
    titles = ["16x16 input", "bicubic"] + [_label(m).split(" `")[0] for m in samples] + ["truth"]
    fig, axes = plt.subplots(n, len(titles), figsize=(1.6 * len(titles), 1.6 * n))
    axes = np.atleast_2d(axes)
    for i in range(n):
        item = data[i]
        images = [item["lr"][0], item["lr_up"][0]] + [torch.as_tensor(s[i][0]) for s in samples.values()] + [item["hr"][0]]
        for j, img in enumerate(images):
            ax = axes[i, j]
            ax.imshow(np.asarray(img).clip(-1, 1), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [f"![test faces]({os.path.relpath(out, doc.parent)})", ""]


def _protocol(recs: list[dict], study: SRStudyConfig) -> list[str]:
    if not recs:
        return ["No finished cells yet."]
    r = recs[0]
    m, t, tm = r["model"], r["train"], r["timing"]
    load = load_note(x["timing"] for x in recs)
    return ["## Protocol", "",
            f"- Config `{r['config']}`: SR3 U-Net with base width {m['base_channels']}, channel multipliers "
            f"{m['channel_mults']}, {m['res_blocks']} residual block(s) per level, attention after the residual "
            f"blocks at the {m['attention_resolutions']} feature maps and in the middle; {m['timesteps']} noise "
            f"levels ({m['beta_start']} → {m['beta_end']}), {m['loss']} noise loss; {t['max_steps']} steps of "
            f"{t['batch_size']} images, {t['optimizer']} lr {t['lr']}; tested on checkpoint `{t['test_checkpoint']}`"
            + (f" of the last {t['average_last']}" if t["test_checkpoint"] == "average" else "")
            + f"; sampling: {m['sampler']}" + (f" with {m['sample_steps']} steps" if m["sampler"] == "ddim" else "") + ".",
            f"- Sampling time: {tm['images']} test images at batch {tm['batch_size']} on {tm['device']} with "
            f"{tm['threads']} thread(s); peak memory is what sampling added (resident-set high-water mark on CPU, "
            f"max_memory_allocated on CUDA).{load}", ""]
