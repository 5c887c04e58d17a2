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


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    Trainer(load_config(raw=RAW), run_dir).fit()


def test_two_gloo_processes_match_one(tmp_path):
    ctx_dir = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, _free_port(), ctx_dir), nprocs=2, join=True)
    single = Trainer(load_config(raw=RAW), tmp_path / "single").fit()
    assert single.step == 6
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
