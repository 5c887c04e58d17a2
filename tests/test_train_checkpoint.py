"""Checkpoints of the training loop: exact resume, interrupts, corrupt and mismatched checkpoints."""

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from amlp.train import CheckpointError, Trainer, evaluate_checkpoint, load_checkpoint, load_config
from amlp.train.checkpoint import latest_checkpoint, list_step_checkpoints


def toy_config(*overrides, **train):
    base = {"task": "toy-regression", "seed": 3,
            "train": {"batch_size": 16, "lr": 1e-2, "progress": False, "schedule": "exponential",
                      "decay_every": 5, "decay_gamma": 0.7, "clip_norm": 1.0, **train}}
    return load_config(raw=base, overrides=list(overrides))


def weights(run_dir, name=None):
    path = latest_checkpoint(run_dir / "checkpoints") if name is None else run_dir / "checkpoints" / name
    return load_file(str(path / "model.safetensors"))


def _steps_seen():
    """An ``on_step_end`` that records the steps the run takes (a resumed run must start after its
    checkpoint's step: seeded training restarted from step 0 would reach the same weights)."""
    seen = []

    def on_step_end(trainer, step, loss):
        seen.append(step)
    on_step_end.seen = seen
    return on_step_end


def test_resume_continues_exactly(tmp_path):
    # 22 steps straight vs 9 steps, then resumed for 13 more (crossing an epoch boundary at 16);
    # the model has dropout, so the torch RNG must be restored too
    full = Trainer(toy_config(max_steps=22), tmp_path / "full").fit()
    Trainer(toy_config(max_steps=9), tmp_path / "split").fit()
    assert latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-00000009"
    seen = _steps_seen()
    resumed = Trainer(toy_config(max_steps=22), tmp_path / "split", resume=True, on_step_end=seen).fit()
    assert seen.seen == list(range(10, 23))
    assert full.step == resumed.step == 22
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.test_metrics == resumed.test_metrics
    # the logs of the resumed run have one row per step, no duplicates
    rows = (tmp_path / "split" / "train_log.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 23))
    # the optimizer state went through safetensors
    state = json.loads((latest_checkpoint(tmp_path / "split" / "checkpoints") / "state.json").read_text())
    assert state["step"] == 22 and state["epoch"] == 1 and state["batch_in_epoch"] == 6
    opt = load_file(str(latest_checkpoint(tmp_path / "split" / "checkpoints") / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq") for k in opt) and "rng.torch" in opt


def test_keep_last_best_and_no_temporary_files(tmp_path):
    Trainer(toy_config(max_steps=20, checkpoint_every=4, keep_last=2, eval_every=4), tmp_path / "r").fit()
    steps = [s for s, _ in list_step_checkpoints(tmp_path / "r" / "checkpoints")]
    assert steps == [16, 20]
    names = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    assert names == ["best", "step-00000016", "step-00000020"]
    best = load_checkpoint(tmp_path / "r" / "checkpoints" / "best")
    history = [line.split(",") for line in (tmp_path / "r" / "eval_log.csv").read_text().splitlines()[1:]]
    val = [(int(r[0]), float(r[3])) for r in history if r[2] == "val"]
    assert best.step == min(val, key=lambda x: x[1])[0]
    assert best.state["best"]["value"] == pytest.approx(min(v for _, v in val), rel=1e-5)


def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path):
    def interrupt(trainer, step, loss):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        Trainer(toy_config(max_steps=12), tmp_path / "r", on_step_end=interrupt).fit()
    assert latest_checkpoint(tmp_path / "r" / "checkpoints").name == "step-00000005"
    # the interrupted run resumes to the same weights as an uninterrupted one
    seen = _steps_seen()
    Trainer(toy_config(max_steps=12), tmp_path / "r", resume=True, on_step_end=seen).fit()
    assert seen.seen == list(range(6, 13))
    Trainer(toy_config(max_steps=12), tmp_path / "ref").fit()
    a, b = weights(tmp_path / "r"), weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keyboard_interrupt_inside_the_loop_saves(tmp_path):
    def boom(trainer, step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(toy_config(max_steps=12), tmp_path / "r", on_step_end=boom).fit()
    assert load_checkpoint(latest_checkpoint(tmp_path / "r" / "checkpoints")).step == 3


@pytest.fixture
def finished_run(tmp_path):
    Trainer(toy_config(max_steps=4), tmp_path / "run").fit()
    return tmp_path / "run", latest_checkpoint(tmp_path / "run" / "checkpoints")


def _fresh_trainer(tmp_path, *overrides, **train):
    t = Trainer(toy_config(*overrides, max_steps=8, **train), tmp_path / "other")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    return t, before


def _unchanged(trainer, before):
    return all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("damage, message", [
    ("truncate-model", "model.safetensors cannot be read"),
    ("garbage-optimizer", "optimizer.safetensors cannot be read"),
    ("bad-json", "not valid JSON"),
    ("wrong-format", "unknown format"),
    ("missing-file", "incomplete"),
])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, finished_run, damage, message):
    _, ckpt = finished_run
    if damage == "truncate-model":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage-optimizer":
        (ckpt / "optimizer.safetensors").write_bytes(b"\x00" * 40)
    elif damage == "bad-json":
        (ckpt / "state.json").write_text("{ not json")
    elif damage == "wrong-format":
        state = json.loads((ckpt / "state.json").read_text())
        state["format"] = "something-else"
        (ckpt / "state.json").write_text(json.dumps(state))
    else:
        (ckpt / "optimizer.safetensors").unlink()
    trainer, before = _fresh_trainer(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        trainer.restore(ckpt)
    assert _unchanged(trainer, before) and trainer.step == 0
    with pytest.raises(CheckpointError):
        evaluate_checkpoint(ckpt)


def test_mismatched_checkpoint_names_the_keys(tmp_path, finished_run):
    _, ckpt = finished_run
    trainer, before = _fresh_trainer(tmp_path, "model.hidden=9")
    with pytest.raises(CheckpointError, match=r"0.weight: checkpoint \(16, 5\) vs model \(9, 5\)"):
        trainer.restore(ckpt)
    assert _unchanged(trainer, before)
    # optimiser state that does not fit: same model, one tensor reshaped in the file
    from safetensors.torch import save_file

    from amlp.train.checkpoint import FORMAT
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    opt["optimizer.0.exp_avg"] = opt["optimizer.0.exp_avg"].flatten()[:3].clone()
    save_file(opt, str(ckpt / "optimizer.safetensors"))
    trainer, before = _fresh_trainer(tmp_path)
    with pytest.raises(CheckpointError, match="exp_avg of parameter 0"):
        trainer.restore(ckpt)
    assert _unchanged(trainer, before)


def test_resume_without_checkpoint_and_changed_batch(tmp_path, finished_run):
    run, ckpt = finished_run
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(toy_config(max_steps=4), run).fit()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(toy_config(max_steps=4), tmp_path / "empty", resume=True).fit()
    with pytest.raises(CheckpointError, match="steps per epoch"):
        Trainer(toy_config(max_steps=8, batch_size=8), run, resume=True).fit()


def test_evaluate_checkpoint_matches_the_run(finished_run):
    run, ckpt = finished_run
    result = json.loads((run / "results.json").read_text())
    got = evaluate_checkpoint(ckpt, "test", device="cpu")
    assert got["mse"] == pytest.approx(result["test"]["mse"], rel=1e-6)


def test_test_checkpoint_best_tests_the_best_validation_weights(tmp_path):
    # a high rate makes the validation loss wander, so the best step is not the last one
    result = Trainer(toy_config(max_steps=20, eval_every=1, lr=1.0, schedule="constant", clip_norm=0.0,
                                test_checkpoint="best"), tmp_path / "r").fit()
    best = load_checkpoint(tmp_path / "r" / "checkpoints" / "best")
    assert result.tested_step == best.step == result.best["step"] and best.step != 20
    expect = evaluate_checkpoint(tmp_path / "r" / "checkpoints" / "best", "test")
    assert result.test_metrics == pytest.approx(expect, rel=1e-6)
    last = evaluate_checkpoint(latest_checkpoint(tmp_path / "r" / "checkpoints"), "test")
    assert result.test_metrics["loss"] != pytest.approx(last["loss"], rel=1e-6)
    recorded = json.loads((tmp_path / "r" / "results.json").read_text())
    assert recorded["tested_step"] == best.step
    test_row = (tmp_path / "r" / "eval_log.csv").read_text().strip().splitlines()[-1].split(",")
    assert test_row[2] == "test" and int(test_row[0]) == best.step
    with pytest.raises(ValueError, match="keep_best"):
        toy_config(test_checkpoint="best", keep_best=False)


def _write(path, value):
    from amlp.train.checkpoint import save_checkpoint

    return save_checkpoint(path, model_state={"w": torch.full((2,), float(value))}, optimizer_tensors={},
                           state={"step": value, "config": {}})


def test_a_failed_write_keeps_the_old_checkpoint_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import amlp.train.checkpoint as ck

    best = tmp_path / "checkpoints" / "best"
    _write(best, 1)
    real_replace = os.replace
    calls = []

    def failing_swap(src, dst):  # the rename of the new checkpoint into place fails
        calls.append((src, dst))
        if ".tmp-" in str(src):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", failing_swap)
    with pytest.raises(OSError, match="disk full"):
        _write(best, 2)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert load_checkpoint(best).state["step"] == 1 and torch.equal(weights(tmp_path, "best")["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best"]  # no temporary or old folder left

    def failing_save(*args, **kwargs):  # the new checkpoint cannot even be written
        raise OSError("no space")

    monkeypatch.setattr(ck, "save_file", failing_save)
    with pytest.raises(OSError, match="no space"):
        _write(best, 3)
    assert load_checkpoint(best).state["step"] == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best"]


def test_old_best_stays_until_the_new_one_is_complete(tmp_path, monkeypatch):
    import amlp.train.checkpoint as ck

    best = tmp_path / "checkpoints" / "best"
    _write(best, 1)
    seen = []
    real_save = ck.save_file

    def spying_save(tensors, filename, **kw):  # while the new files are written, the old best is intact
        seen.append(load_checkpoint(best).state["step"])
        return real_save(tensors, filename, **kw)

    monkeypatch.setattr(ck, "save_file", spying_save)
    _write(best, 2)
    assert seen == [1, 1] and load_checkpoint(best).state["step"] == 2


def test_resume_keeps_the_best_so_far(tmp_path):
    # a high rate makes validation wander; after resuming, a worse model must not replace best
    cfg = dict(eval_every=1, lr=1.0, schedule="constant", clip_norm=0.0)
    full = Trainer(toy_config(max_steps=20, **cfg), tmp_path / "full").fit()
    assert full.best["step"] == 17  # the resume below happens after it
    Trainer(toy_config(max_steps=18, **cfg), tmp_path / "split").fit()
    seen = _steps_seen()
    resumed = Trainer(toy_config(max_steps=20, **cfg), tmp_path / "split", resume=True, on_step_end=seen).fit()
    assert seen.seen == [19, 20]
    assert resumed.best == full.best
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "best").step == full.best["step"]


def test_grad_norm_is_logged_with_and_without_clipping(tmp_path):
    for clip in (1.0, 0.0):
        Trainer(toy_config(max_steps=4, clip_norm=clip), tmp_path / f"c{clip}").fit()
        rows = (tmp_path / f"c{clip}" / "train_log.csv").read_text().strip().splitlines()
        col = rows[0].split(",").index("grad_norm")
        norms = [float(r.split(",")[col]) for r in rows[1:]]
        assert len(norms) == 4 and all(math.isfinite(n) and n > 0 for n in norms), norms


def test_eval_of_a_checkpoint_with_nan_weights_is_an_error(tmp_path, finished_run):
    import shutil

    from safetensors.torch import save_file

    from amlp.train.checkpoint import FORMAT

    _, ckpt = finished_run
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": FORMAT})
    with pytest.raises(CheckpointError, match=f"NaN or infinite weights \\(in {name}"):
        evaluate_checkpoint(bad)
    from typer.testing import CliRunner

    from amlp.cli import app

    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(bad)])
    assert res.exit_code == 1 and "NaN or infinite weights" in res.output and "Traceback" not in res.output


class _PlannedToyTask:
    """The toy task with its own batches of uneven sizes, and a file in every checkpoint."""

    def __new__(cls, config):
        from amlp.train.toy import ToyRegressionTask

        task = ToyRegressionTask(config)
        n = len(task.dataset("train"))
        sizes = [5, 11, 7, 16, 3]
        plan, start = [], 0
        while start + max(sizes) <= n:
            for s in sizes:
                plan.append(list(range(start, start + s)))
                start += s
        task.batches = lambda split: plan if split == "train" else [list(range(len(task.dataset(split))))]
        task.checkpoint_files = lambda: {"notes.txt": b"kept with the weights"}
        task.seen = []
        original = task.loss

        def loss(model, batch):
            task.seen.append(len(batch[0]) if isinstance(batch, (list, tuple)) else None)
            return original(model, batch)
        task.loss = loss
        return task


def test_task_batches_are_used_and_resume_exactly(tmp_path):
    cfg = toy_config(max_steps=13)
    full_task = _PlannedToyTask(cfg)
    full = Trainer(cfg, tmp_path / "full", task=full_task).fit()
    assert set(full_task.seen) == {3, 5, 7, 11, 16}  # the task's batches, not train.batch_size
    assert (latest_checkpoint(tmp_path / "full" / "checkpoints") / "notes.txt").read_bytes() == b"kept with the weights"
    Trainer(toy_config(max_steps=6), tmp_path / "split", task=_PlannedToyTask(cfg)).fit()
    seen = _steps_seen()
    resumed = Trainer(cfg, tmp_path / "split", resume=True, task=_PlannedToyTask(cfg), on_step_end=seen).fit()
    assert seen.seen == list(range(7, 14))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.test_metrics == resumed.test_metrics


def test_test_on_averaged_checkpoints(tmp_path):
    from amlp.train.checkpoint import average_checkpoints

    cfg = toy_config(max_steps=12, checkpoint_every=3, keep_last=3, test_checkpoint="average", average_last=3)
    result = Trainer(cfg, tmp_path / "r").fit()
    ckpts = [p for _, p in list_step_checkpoints(tmp_path / "r" / "checkpoints")]
    assert [p.name for p in ckpts] == ["step-00000006", "step-00000009", "step-00000012"]
    averaged = weights(tmp_path / "r", "averaged")
    parts = [load_file(str(p / "model.safetensors")) for p in ckpts]
    for k, v in averaged.items():
        assert torch.allclose(v, sum(p[k] for p in parts) / 3, atol=1e-6), k
    assert result.tested_step == 12
    assert evaluate_checkpoint(tmp_path / "r" / "checkpoints" / "averaged", "test") == result.test_metrics
    assert average_checkpoints(ckpts)[1].step == 12
    with pytest.raises(ValueError, match="average_last"):
        toy_config(test_checkpoint="average", average_last=4, keep_last=2)


def test_a_bad_override_or_split_is_blamed_on_the_caller(finished_run):
    _, ckpt = finished_run
    with pytest.raises(ValueError, match=r"train.lr=abc cannot apply to checkpoint .*'train.lr'") as info:
        evaluate_checkpoint(ckpt, "test", ["train.lr=abc"])
    assert not isinstance(info.value, CheckpointError)  # the checkpoint itself is fine
    with pytest.raises(ValueError, match="has no 'nope' split; it has train, val, test"):
        evaluate_checkpoint(ckpt, "nope")


def test_same_config_refuses_to_continue_a_run_of_another_protocol(tmp_path):
    Trainer(toy_config(max_steps=9), tmp_path / "r").fit()
    # a longer max_steps changes the protocol (schedules that anneal over training would differ from a
    # fresh run): refused, naming the key, and the run folder is left as it was
    with pytest.raises(CheckpointError, match=r"another config \(train\.max_steps: 9 -> 22\).*move its run folder"):
        Trainer(toy_config(max_steps=22), tmp_path / "r", resume="auto", same_config=True).fit()
    assert latest_checkpoint(tmp_path / "r" / "checkpoints").name == "step-00000009"
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.01 -> 0\.02"):
        Trainer(toy_config(max_steps=9, lr=2e-2), tmp_path / "r", resume="auto", same_config=True).fit()
    # keys that do not change what the run computes may differ
    seen = _steps_seen()
    Trainer(toy_config(max_steps=11, log_every=3, threads=1), tmp_path / "r", resume="auto", on_step_end=seen).fit()
    assert seen.seen == [10, 11]  # without same_config a run may continue under a changed config
    seen = _steps_seen()
    Trainer(toy_config(max_steps=11, log_every=5), tmp_path / "r", resume="auto", same_config=True,
            on_step_end=seen).fit()
    assert seen.seen == []


def test_config_differences():
    from amlp.train.loop import config_differences

    saved = {"seed": 0, "model": {"dim": 8, "sizes": [1, 2], "opts": {"b": 1}}, "train": {"lr": 1e-3, "progress": True},
             "old": 1}
    current = {"seed": 0, "model": {"dim": 16, "sizes": (1, 2), "opts": {"a": 2}}, "train": {"lr": 1e-3,
                                                                                         "progress": False}}
    assert config_differences(saved, current) == [("model.dim", 8, 16), ("model.opts.a", None, 2),
                                                  ("model.opts.b", 1, None), ("old", 1, None)]
    assert config_differences(saved, saved) == []
    assert ("train.progress", True, False) in config_differences(saved, current, ignore=frozenset())
