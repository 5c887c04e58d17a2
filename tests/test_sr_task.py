"""The super-resolution task end to end on ORL faces: training a tiny SR3, evaluation with PSNR/SSIM and
the bicubic reference, checkpoints, `amlp upscale` and its errors, config errors, and the study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from amlp.cli import app
from amlp.tasks.super_resolution.study import (SRStudyConfig, _checks, load_sr_study, run_sr_study,
                                                 study_cells)
from amlp.train import load_config, run_experiment
from amlp.train.config import from_dict
from amlp.train.loop import evaluate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
needs_orl = pytest.mark.skipif(not (DATA / "orl_faces" / "s1" / "1.pgm").is_file(),
                               reason=f"ORL faces not found under {DATA} (set AMLP_DATA_DIR)")
runner = CliRunner()


def _raw(steps: int, **model) -> dict:
    return {
        "task": "sr", "seed": 0,
        "data": {"data_dir": str(DATA), "train_people": [1, 2], "val_people": [3], "test_people": [4],
                 "val_sample_examples": 2},
        "model": {"base_channels": 8, "channel_mults": [1, 2], "res_blocks": 1, "attention_resolutions": [32],
                  "timesteps": 100, "beta_start": 1e-4, "beta_end": 0.05, "sample_steps": 4, **model},
        "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 4, "max_steps": steps, "threads": 1,
                  "progress": False, "eval_every": steps, "checkpoint_every": max(steps // 2, 1), "keep_last": 2,
                  "precision": "fp32", "test_checkpoint": "average", "average_last": 2},
    }


def test_config_errors():
    with pytest.raises(ValueError, match="share people"):
        load_config(raw={"task": "sr", "data": {"train_people": [1, 2], "val_people": [2], "test_people": [3]}})
    with pytest.raises(ValueError, match="model.mixer"):
        load_config(raw={"task": "sr", "model": {"mixer": "hyper-mlp"}})
    with pytest.raises(ValueError, match="model.sample_steps"):
        load_config(raw={"task": "sr", "model": {"timesteps": 10, "sample_steps": 20}})
    with pytest.raises(ValueError, match="data.test_people"):
        load_config(raw={"task": "sr", "data": {"test_people": [41]}})


@needs_orl
def test_train_evaluate_checkpoint_and_upscale(tmp_path):
    torch.manual_seed(0)
    result = run_experiment(load_config(raw=_raw(6)), tmp_path / "run")
    test = result.test_metrics
    for key in ("loss", "psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "seconds_per_image", "params"):
        assert np.isfinite(test[key]), (key, test)
    assert test["sampled_images"] == 10  # person 4's ten faces, all sampled on the test split
    assert 20 < test["bicubic_psnr"] < 35 and 0.5 < test["bicubic_ssim"] < 1
    # the bicubic baseline, worked out here from the pixels: the mean over the ten faces of
    # 10 log10(255^2 / MSE) of the upsampled LR image against the HR image
    from amlp.tasks.super_resolution.data import load_orl as _load, make_triplet as _triplet

    by_hand = []
    for face in _load(DATA, persons=[4])[4]:
        hr, _, lr_up = _triplet(face)
        mse = np.mean((hr.astype(np.float64) - lr_up.astype(np.float64)) ** 2)
        by_hand.append(10 * np.log10(255.0 ** 2 / mse))
    assert test["bicubic_psnr"] == pytest.approx(float(np.mean(by_hand)), rel=1e-9)
    assert test["psnr"] != test["bicubic_psnr"]  # the samples are scored, not the conditioning
    ckpt = tmp_path / "run" / "checkpoints" / "averaged"
    again = evaluate_checkpoint(ckpt, "test", device="cpu")
    for key in ("loss", "psnr", "ssim"):  # an evaluation repeats exactly (fixed seeds)
        assert again[key] == pytest.approx(test[key], rel=1e-5)

    from amlp.tasks.super_resolution.data import load_orl, make_triplet, save_image

    face = load_orl(DATA, persons=[4])[4][0]
    _, lr, _ = make_triplet(face)
    small = tmp_path / "small.png"
    save_image(small, lr)
    out = tmp_path / "out" / "big.png"
    res = runner.invoke(app, ["upscale", str(small), str(out), "--checkpoint", str(ckpt), "--threads", "1"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (64, 64) and img.mode == "L"
    # a 64x64 image is refused without --resize, accepted (and said so) with it
    save_image(tmp_path / "big_in.png", make_triplet(face)[0])
    res = runner.invoke(app, ["upscale", str(tmp_path / "big_in.png"), str(out), "--checkpoint", str(ckpt)])
    assert res.exit_code == 1 and "16x16" in res.output and "--resize" in res.output
    res = runner.invoke(app, ["upscale", str(tmp_path / "big_in.png"), str(out), "--checkpoint", str(ckpt),
                              "--resize"])
    assert res.exit_code == 0 and "16x16" in res.output and "64x64" in res.output, res.output
    res = runner.invoke(app, ["upscale", str(tmp_path / "missing.png"), str(out), "--checkpoint", str(ckpt)])
    assert res.exit_code == 1 and "missing.png" in res.output


def test_study_grid_of_the_cpu_study():
    study = load_sr_study(ROOT / "configs" / "sr" / "study" / "cpu.yaml")
    study.validate()
    cells = study_cells(study)
    assert len(cells) == 7 + 2 * 2  # 7 mechanisms, 2 more seeds for softmax and AMLP-Cov
    assert ("amlp-cov:form=official,landmarks=16", 2) in cells
    with pytest.raises(ValueError, match="more_seeds"):
        from_dict(SRStudyConfig, {"config": "x.yaml", "mechanisms": ["softmax"],
                                  "more_seeds": {"mechanisms": ["abc"]}}).validate()


def test_report_checks_compare_softmax_with_bicubic_and_amlp_cov_with_softmax():
    study = from_dict(SRStudyConfig, {"config": "x.yaml", "mechanisms": ["softmax", "amlp-cov:form=official"]})

    def rec(mech, seed, psnr, ssim, bicubic_ssim=0.76):
        return {"finished": True, "mechanism": mech, "seed": seed,
                "test": {"psnr": psnr, "ssim": ssim, "bicubic_ssim": bicubic_ssim}}

    assert _checks({}, study) == []  # nothing before a softmax cell
    results = {"a": rec("softmax", 0, 26.0, 0.80), "b": rec("softmax", 1, 26.2, 0.82)}
    lines = "\n".join(_checks(results, study))
    assert "0.810 against 0.760 (2 seed(s))" in lines and "holds" in lines and "does not hold" not in lines
    assert "AMLP-Cov" not in lines  # no AMLP-Cov cell yet
    results.update(c=rec("amlp-cov:form=official", 0, 26.5, 0.79), d=rec("amlp-cov:form=official", 1, 26.7, 0.81))
    lines = "\n".join(_checks(results, study))
    # PSNR +0.50 against seed stds of 0.14 each: beyond; SSIM -0.010 against 0.014: within
    assert "PSNR +0.50, beyond the larger seed std (0.14)" in lines
    assert "SSIM -0.010, within the larger seed std (0.014)" in lines
    assert "PSNR +0.10, SSIM +0.009" in lines  # the paper's differences, Table 3
    worse = {"a": rec("softmax", 0, 25.0, 0.70)}
    assert "does not hold" in "\n".join(_checks(worse, study))


@needs_orl
def test_study_runs_a_cell_writes_a_report_and_refuses_the_doc(tmp_path):
    (tmp_path / "sr.yaml").write_text(json.dumps(_raw(2)))
    study = from_dict(SRStudyConfig, {"config": "sr.yaml", "mechanisms": ["softmax", "amlp-cov:form=official,landmarks=4"],
                                      "run_root": "runs/sr", "doc": "docs/sr.md", "figure_faces": 2,
                                      "timing": {"batch_size": 2, "images": 2}})
    logs = []
    report = run_sr_study(study, command="amlp study sr", mechanisms=["softmax"], root=tmp_path, log=logs.append)
    results = json.loads((tmp_path / "runs/sr/results.json").read_text())
    record = results["softmax/seed0"]
    assert record["finished"] and np.isfinite(record["test"]["psnr"]) and record["timing"]["seconds_per_image"] > 0
    assert np.load(tmp_path / record["samples"]).shape == (2, 1, 64, 64)
    text = report.read_text()
    assert "| bicubic upsampling |" in text and "23.18" in text and "| softmax |" in text
    run_sr_study(study, command="amlp study sr", mechanisms=["softmax"], root=tmp_path, log=logs.append)
    assert any("done before" in line for line in logs)
    with pytest.raises(ValueError, match="amlp-cov:form=official,landmarks=4/seed0"):
        run_sr_study(study, command="amlp study sr", write_doc=True, doc_only=True, root=tmp_path)
    assert not (tmp_path / "docs" / "sr.md").exists()


@needs_orl
def test_tiny_model_overfits_one_face():
    """One real face (person 37, 32x32 from 8x8 with the dataset's own resampling): a tiny SR3 learns it,
    and its samples are closer to the face than the bicubic input is, in PSNR and SSIM."""
    import torch.nn.functional as F

    from amlp.models.sr3 import Diffusion, SR3UNet
    from amlp.tasks.super_resolution.data import from_image, load_orl, make_triplet
    from amlp.tasks.super_resolution.metrics import psnr, ssim

    torch.manual_seed(0)
    torch.set_num_threads(1)  # small convolutions: one thread is far faster on a busy machine
    hr, _, lr_up = (from_image(a)[None] for a in make_triplet(load_orl(DATA, persons=[37])[37][0], 32, 8))
    model = SR3UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(16,), image_size=32)
    d = Diffusion(steps=100, beta_start=1e-4, beta_end=0.05, loss="l1")
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        opt.zero_grad()
        d.training_loss(model, hr.expand(8, -1, -1, -1), lr_up.expand(8, -1, -1, -1), g).backward()
        opt.step()
    model.eval()
    samples = d.ddim_sample(model, lr_up.expand(4, -1, -1, -1), steps=20, eta=1.0,
                            generator=torch.Generator().manual_seed(1))
    assert F.mse_loss(samples, hr.expand_as(samples)).item() < F.mse_loss(lr_up, hr).item()
    assert np.mean([psnr(s, hr[0]) for s in samples]) > psnr(lr_up[0], hr[0])
    assert np.mean([ssim(s, hr[0]) for s in samples]) > ssim(lr_up[0], hr[0])
