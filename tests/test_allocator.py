"""The allocator setting of training processes (amlp.train.allocator): it keeps freed memory for reuse,
it can be turned off, and `amlp train` / `amlp study` apply it. Each check that sets it runs in a
subprocess, so that the rest of the suite keeps the default allocator."""

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from amlp.cli import app
from amlp.train import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="the setting applies to glibc only")

# page faults of ten rounds of allocating, filling and freeing a 64 MiB tensor, after three rounds
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from amlp.train.allocator import retain_freed_memory
    print(retain_freed_memory() if sys.argv[1] == "retain" else None)
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        x = torch.ones(16 << 20); del x
    before = faults()
    for _ in range(10):
        x = torch.ones(16 << 20); del x
    print(faults() - before)
""")


def _faults(mode: str, env: dict | None = None) -> tuple[str, int]:
    import os

    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    applied, faults = out.stdout.split()
    return applied, int(faults)


@glibc
def test_freed_memory_is_reused_without_new_page_faults():
    applied, retained = _faults("retain")
    assert applied == "True"
    _, default = _faults("default")
    pages = (64 << 20) // 4096
    assert default >= 9 * pages  # each round maps and faults in its 16,384 pages afresh
    assert retained <= pages  # the heap keeps them (here none of the ten rounds faults)


@glibc
def test_the_environment_turns_it_off():
    applied, faults = _faults("retain", {allocator.ENV: "0"})
    assert applied == "False" and faults >= 9 * (64 << 20) // 4096


def test_train_and_study_apply_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(1) or True)
    res = CliRunner().invoke(app, ["train", "toy-regression", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code != 0 and calls == [1]
    res = CliRunner().invoke(app, ["study", "lm", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code != 0 and calls == [1, 1]
    CliRunner().invoke(app, ["list"])
    assert calls == [1, 1]  # other commands leave the allocator as it is
