"""gMLP spatial gating unit: fast form against the written-out sum, the top-left block for short
sequences, the causal triangle, padding, the step, and the maximum length."""

import pytest
import torch

import amlp
from amlp.ops import spatial_gating_unit, spatial_gating_unit_reference

H, D, N = 3, 6, 17


def _inputs(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, z = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(H, N, N, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(H, N, generator=g, dtype=torch.float64).requires_grad_()
    return u, z, w, b


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [13, 1, 17])
def test_fast_equals_reference_outputs_and_gradients(causal, T):
    u, z, w, b = _inputs(2, T)
    mask = None
    if T > 1:
        mask = torch.ones(2, T, dtype=torch.bool)
        mask[1, T - T // 3:] = False
        mask[0, 1] = False
    fast = spatial_gating_unit(u, z, w, b, mask=mask, causal=causal)
    ref = spatial_gating_unit_reference(u, z, w, b, mask=mask, causal=causal)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    inputs = (u, z, w, b)
    for a, r in zip(torch.autograd.grad(fast.square().sum(), inputs), torch.autograd.grad(ref.square().sum(), inputs)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_short_sequences_use_the_top_left_block():
    u, z, w, b = (t.detach() for t in _inputs(1, 7))
    a = spatial_gating_unit(u, z, w, b)
    w2, b2 = w.clone(), b.clone()
    w2[:, 7:, :] = 1e3
    w2[:, :, 7:] = 1e3
    b2[:, 7:] = 1e3
    torch.testing.assert_close(spatial_gating_unit(u, z, w2, b2), a, rtol=1e-12, atol=1e-12)


def test_causal_gate_uses_the_lower_triangle_only():
    u, z, w, b = (t.detach() for t in _inputs(1, 9))
    a = spatial_gating_unit(u, z, w, b, causal=True)
    torch.testing.assert_close(spatial_gating_unit(u, z, w.tril(), b, causal=False), a, rtol=1e-12, atol=1e-12)
    z2 = z.clone()
    z2[:, 5:] = torch.randn(1, 4, H, D, dtype=torch.float64)
    torch.testing.assert_close(spatial_gating_unit(u, z2, w, b, causal=True)[:, :5], a[:, :5], rtol=0, atol=0)


def test_padded_positions_contribute_nothing():
    u, z, w, b = (t.detach() for t in _inputs(1, 9))
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 4] = False
    a = spatial_gating_unit(u, z, w, b, mask=mask)
    z2 = z.clone()
    z2[0, 4] = 1e3
    torch.testing.assert_close(spatial_gating_unit(u, z2, w, b, mask=mask), a, rtol=1e-12, atol=1e-12)
    assert a[0, 4].abs().max() == 0


def test_errors():
    u, z, w, b = _inputs(1, 5)
    with pytest.raises(ValueError, match="weight must be shaped"):
        spatial_gating_unit(u, z, w[:, :, :4], b)
    with pytest.raises(ValueError, match="bias must be shaped"):
        spatial_gating_unit(u, z, w, b[:, :4])
    with pytest.raises(ValueError, match="covers n = 4"):
        spatial_gating_unit(u, z, w[:, :4, :4], b[:, :4])
    with pytest.raises(ValueError, match="u and z must have the same shape"):
        spatial_gating_unit(u, z[:, :4], w, b)
    with pytest.raises(ValueError, match="u must be"):
        spatial_gating_unit(u[0], z, w, b)
    with pytest.raises(ValueError, match="gmlp.*cross"):
        amlp.build_mixer("gmlp", dim=12, heads=2, cross=True)


def _layer(**kw):
    torch.manual_seed(5)
    m = amlp.build_mixer("gmlp", dim=12, heads=2, max_length=16, **kw).double().eval()
    with torch.no_grad():
        m.spatial_weight.normal_()  # away from the near-zero start, so every position matters
    return m


def test_layer_init_is_near_identity_gate():
    m = amlp.build_mixer("gmlp", dim=12, heads=2, max_length=10)
    assert m.spatial_weight.abs().max() <= 1e-3 and bool((m.spatial_bias == 1).all())
    assert m.spatial_weight.shape == (2, 10, 10)


def test_layer_fast_equals_reference_and_step_equals_forward():
    m = _layer(causal=True)
    x = torch.randn(2, 13, 12, dtype=torch.float64)
    full = m(x)
    torch.testing.assert_close(full, m.reference(x), rtol=1e-10, atol=1e-12)
    state = m.init_state(2, dtype=torch.float64)
    outs = []
    for t in range(13):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(2, 4, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :9], full[:, :9], rtol=1e-12, atol=1e-12)


def test_layer_maximum_length_in_forward_and_step():
    m = _layer(causal=True)
    assert m.max_length == 16
    assert amlp.layers.get_mixer_info("gmlp").capabilities.max_length_option == "max_length"
    with pytest.raises(ValueError, match="gmlp.*maximum length of 16"):
        m(torch.randn(1, 17, 12, dtype=torch.float64))
    state = m.init_state(1, dtype=torch.float64)
    for _ in range(16):
        _, state = m.step(torch.randn(1, 12, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="maximum length"):
        m.step(torch.randn(1, 12, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="causal"):
        _layer().init_state(1)
