"""XCA: Gram-based fast form against XCiT's transposed formulation, the D x D attention map,
padding, and the refusals (no causal form, no cross-attention)."""

import pytest
import torch

import amlp
from amlp.ops import cross_covariance_attention, cross_covariance_attention_reference

H, D = 3, 6


def _inputs(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    tau = (torch.rand(H, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    return (*qkv, tau)


@pytest.mark.parametrize("T", [13, 1, 2])
def test_fast_equals_reference_outputs_and_gradients(T):
    q, k, v, tau = _inputs(2, T)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, T - max(1, T // 3):] = False
    if T == 1:
        mask = None
    fast = cross_covariance_attention(q, k, v, tau, q_mask=mask, kv_mask=mask)
    ref = cross_covariance_attention_reference(q, k, v, tau, q_mask=mask, kv_mask=mask)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    if T > 2:  # a key padded where its query is real, and a query padded where its key is real
        kv_mask, q_mask = mask.clone(), mask.clone()
        kv_mask[0, 2], q_mask[0, 5] = False, False
        torch.testing.assert_close(cross_covariance_attention(q, k, v, tau, q_mask=q_mask, kv_mask=kv_mask),
                                   cross_covariance_attention_reference(q, k, v, tau, q_mask=q_mask, kv_mask=kv_mask),
                                   rtol=1e-10, atol=1e-12)
    inputs = (q, k, v, tau)
    for a, b in zip(torch.autograd.grad(fast.square().sum(), inputs), torch.autograd.grad(ref.square().sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_output_is_values_times_a_column_stochastic_channel_map():
    """out = V A with A = softmax over the key channels of tau * k^_j . q^_i: recover A from V = I."""
    T = D
    q, k, _, tau = (t.detach() for t in _inputs(1, T))
    v = torch.eye(D, dtype=torch.float64).view(1, T, 1, D).expand(1, T, H, D)
    out = cross_covariance_attention(q, k, v, tau)  # V = I, so out[:, :, h] = A_h
    for h in range(H):
        a = out[0, :, h]
        torch.testing.assert_close(a.sum(0), torch.ones(D, dtype=torch.float64))
        qn = q[0, :, h] / q[0, :, h].norm(dim=0)
        kn = k[0, :, h] / k[0, :, h].norm(dim=0)
        expected = torch.softmax(tau[h] * (kn.T @ qn), dim=0)  # [key channel, query channel]
        torch.testing.assert_close(a, expected, rtol=1e-12, atol=1e-12)


def test_output_is_invariant_to_the_scale_of_q_and_k():
    q, k, v, tau = (t.detach() for t in _inputs(2, 9))
    a = cross_covariance_attention(q, k, v, tau)
    b = cross_covariance_attention(50 * q, 0.01 * k, v, tau)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_zero_columns_and_fully_padded_rows_are_finite():
    q, k, v, tau = _inputs(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = cross_covariance_attention(q, k, v, tau, q_mask=mask, kv_mask=mask)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, tau))


def test_errors():
    q, k, v, tau = _inputs(1, 5)
    with pytest.raises(ValueError, match="temperature"):
        cross_covariance_attention(q, k, v, tau[:2])
    with pytest.raises(ValueError, match="same length"):
        cross_covariance_attention(q, k[:, :3], v[:, :3], tau)
    with pytest.raises(ValueError, match="xca.*causal"):
        amlp.build_mixer("xca", dim=12, heads=2, causal=True)
    with pytest.raises(ValueError, match="xca.*cross"):
        amlp.build_mixer("xca", dim=12, heads=2, cross=True)
    with pytest.raises(ValueError, match="recurrent"):
        amlp.build_mixer("xca", dim=12, heads=2).init_state(1)


def test_layer_has_a_learned_temperature_per_head():
    m = amlp.build_mixer("xca", dim=12, heads=3)
    assert m.temperature.shape == (3,) and m.temperature.requires_grad
    m(torch.randn(2, 7, 12)).sum().backward()
    assert m.temperature.grad is not None and torch.isfinite(m.temperature.grad).all()
