"""The AMLP layer: options, errors, reference equivalence, torch.compile."""

import pytest
import torch

import amlp
from amlp.layers import AMLP
from amlp.layers.check import randomise_affine_parameters
from amlp.ops.amlp import FORMS


@pytest.mark.parametrize("variant", ["cov", "pquery"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("options", [{}, {"activation": "relu", "landmarks": 5}, {"shared_w": False}, {"out_norm": True}])
def test_layer_equals_its_reference(variant, form, options):
    if variant == "cov" and "shared_w" in options:
        pytest.skip("W exists only in PQuery")
    m = AMLP(24, 3, variant=variant, form=form, **options).double().eval()
    randomise_affine_parameters(m, torch.Generator().manual_seed(1))  # padded keys project to nonzero k, v
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    ctx = torch.randn(2, 6, 24, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    torch.testing.assert_close(m(x, ctx, context_mask=mask), m.reference(x, ctx, context_mask=mask))


def test_stable_form_has_temperatures_and_output_norm_paper_form_has_neither():
    stable, paper = AMLP(16, 2, form="stable"), AMLP(16, 2, form="paper")
    assert stable.temperature.shape == (2, 3) and stable.out_norm is not None
    assert paper.temperature is None and paper.out_norm is None


def test_parameters_receive_gradients():
    m = amlp.build_mixer("amlp-pquery", dim=16, heads=2, form="stable")
    m(torch.randn(2, 9, 16)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dropout_is_active_in_training_only():
    m = amlp.build_mixer("amlp-cov", dim=16, heads=2, dropout=0.5, form="stable")
    x = torch.randn(2, 9, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


@pytest.mark.parametrize("kwargs,message", [
    (dict(landmarks=0), "landmarks"),
    (dict(variant="lowrank"), "variant"),
    (dict(activation="gelu"), "activation"),
    (dict(form="exact"), "form"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AMLP(16, 2, **{"form": "stable", **kwargs})


def test_dim_must_divide_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        amlp.build_mixer("amlp-cov", dim=30, heads=4, form="stable")


def test_context_of_another_batch_size_is_refused():
    m = amlp.build_mixer("amlp-pquery", dim=16, heads=2, cross=True, form="stable")
    with pytest.raises(ValueError, match="batch size"):
        m(torch.randn(2, 5, 16), torch.randn(3, 5, 16))


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    m = amlp.build_mixer("amlp-cov", dim=32, heads=4, form="stable").eval()
    x = torch.randn(2, 17, 32, requires_grad=True)
    eager = m(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(m, backend="aot_eager")
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_comp, g_eager)
