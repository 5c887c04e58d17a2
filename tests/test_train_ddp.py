"""Two CPU processes (gloo, DistributedDataParallel) follow the same trajectory as one process with
the same global batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from amlp.train import Trainer, load_config
from amlp.train.checkpoint import latest_checkpoint

RAW = {"task": "toy-regression", "seed": 5, "model": {"dropout": 0.0},
       "train": {"batch_size": 16, "max_steps": 6, "lr": 1e-2, "progress": False, "device": "cpu",
                 "schedule": "exponential", "decay_every": 3}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recording_task(config, path: str):
    """The toy task, writing the input rows of every training batch it sees to ``path`` (one line per
    step: the rows' first features, which tell the examples apart)."""
    from amlp.train.tasks import build_task

    task = build_task(config)
    original = task.loss

    def loss(model, batch):
        with open(path, "a") as f:
            f.write(" ".join(f"{v:.6f}" for v in batch[0][:, 0].tolist()) + "\n")
        return original(model, batch)
    task.loss = loss
    return task


def _batches(path) -> list[list[str]]:
    return [line.split() for line in open(path).read().splitlines()]


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = load_config(raw=RAW)
    Trainer(config, run_dir, task=_recording_task(config, os.path.join(run_dir + "-batches", f"rank{rank}"))).fit()


def test_two_gloo_processes_match_one(tmp_path):
    ctx_dir = str(tmp_path / "ddp")
    (tmp_path / "ddp-batches").mkdir()
    mp.spawn(_worker, args=(2, _free_port(), ctx_dir), nprocs=2, join=True)
    config = load_config(raw=RAW)
    single = Trainer(config, tmp_path / "single", task=_recording_task(config, str(tmp_path / "single-batches"))).fit()
    assert single.step == 6
    # each process took its own half of every global batch: disjoint halves that make up the batch
    whole, r0, r1 = (_batches(p) for p in (tmp_path / "single-batches", tmp_path / "ddp-batches" / "rank0",
                                           tmp_path / "ddp-batches" / "rank1"))
    assert len(whole) == len(r0) == len(r1) == 6
    for step, (a, b, c) in enumerate(zip(whole, r0, r1)):
        assert len(b) == len(c) == 8 and not set(b) & set(c), step
        assert sorted(b + c) == sorted(a), step
    a = load_file(str(latest_checkpoint(tmp_path / "single" / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ddp" / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = False
    init = Trainer(load_config(raw=RAW), tmp_path / "init").model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        moved |= not torch.allclose(a[k], init[k])
    assert moved  # training changed the weights, so the comparison means something
    # rank 0 alone wrote the log, one row per step
    rows = (tmp_path / "ddp" / "train_log.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 6


def test_batch_must_divide_among_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    import torch.distributed as dist

    monkeypatch.setattr(dist, "init_process_group", lambda **kw: None)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        Trainer(load_config(raw=RAW), "unused")
