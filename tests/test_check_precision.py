"""The low-precision gate: every mixer in bfloat16 against itself in float32 (``amlp check --dtype``)."""

import pytest
import torch
from typer.testing import CliRunner

from amlp.cli import app
from amlp.layers import list_mixers
from amlp.layers.base import Capabilities, Mixer
from amlp.layers.check import check_mixer_precision
from amlp.layers.registry import _REGISTRY, register_mixer


#: the input gradient's bound for the mixers whose ReLU-type selections flip under a rounding (the
#: gate's default, which only catches gross errors); every other mixer is held to GRADIENT_BOUND, a
#: few times the 0.4-1.4 % that bfloat16 gives them on this input
KINKED = {"hyper-mlp", "hyper-glu"}
GRADIENT_BOUND = 0.05


@pytest.mark.parametrize("name", [info.name for info in list_mixers()])
def test_every_mixer_runs_in_bfloat16_close_to_float32(name):
    bounds = {} if name in KINKED else {"input gradient": GRADIENT_BOUND}
    res = check_mixer_precision(name, dtype=torch.bfloat16, length=40, dim=32, heads=2, tolerance=bounds)
    assert res.passed, res.message
    assert res.max_abs_error > 0  # bfloat16 did run: it cannot equal float32 exactly


@pytest.fixture
def wrong_gradient_mixer():
    """Right output, but an input gradient 20 % too large in bfloat16 only: a wrong low-precision backward."""
    name = "bf16-wrong-gradient-for-check-test"

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return 1.2 * grad

    @register_mixer(name, description="y = x with a wrong bfloat16 backward (test only)")
    class WrongGradient(Mixer):
        capabilities = Capabilities()

        def mix_tokens(self, x, context, x_mask, context_mask):
            return Scale.apply(x) if x.dtype == torch.bfloat16 else x

        def reference_tokens(self, x, context, x_mask, context_mask):
            return x

    yield name
    _REGISTRY.pop(name, None)


def test_a_wrong_low_precision_gradient_fails(wrong_gradient_mixer):
    res = check_mixer_precision(wrong_gradient_mixer, length=8, dim=8, heads=2,
                                tolerance={"input gradient": GRADIENT_BOUND})
    assert not res.passed and "input gradient" in res.message and res.max_abs_error == pytest.approx(0.2, rel=0.05)


@pytest.fixture
def dtype_dependent_mixer():
    """Doubles its input in bfloat16 only: a wrong low-precision path."""
    name = "bf16-doubler-for-check-test"

    @register_mixer(name, description="y = x, or 2 x in bfloat16 (test only)")
    class Doubler(Mixer):
        capabilities = Capabilities()

        def mix_tokens(self, x, context, x_mask, context_mask):
            return 2 * x if x.dtype == torch.bfloat16 else x

        def reference_tokens(self, x, context, x_mask, context_mask):
            return x

    yield name
    _REGISTRY.pop(name, None)


def test_a_wrong_low_precision_path_fails(dtype_dependent_mixer):
    res = check_mixer_precision(dtype_dependent_mixer, length=8, dim=8, heads=2)
    assert not res.passed and "output" in res.message and res.max_abs_error == pytest.approx(1.0, rel=0.05)


def test_cli_low_precision_check_and_its_errors():
    runner = CliRunner()
    res = runner.invoke(app, ["check", "softmax", "amlp-cov", "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert "bfloat16 vs float32" in res.output and "pass" in res.output
    res = runner.invoke(app, ["check", "softmax", "--dtype", "int8"])
    assert res.exit_code == 2 and "--dtype must be" in res.output
    if not torch.cuda.is_available():
        res = runner.invoke(app, ["check", "softmax", "--dtype", "bfloat16", "--device", "cuda"])
        assert res.exit_code == 2 and "not available" in res.output


def test_gpu_script_refuses_without_a_cuda_device(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run the checks")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks.sh"
    res = subprocess.run(["bash", str(script)], env={**os.environ, "OUT": str(tmp_path)}, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stdout
    assert (tmp_path / "torch.txt").exists()
