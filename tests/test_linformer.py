"""Linformer: fast form against per-head matrices, shared and per-head projections, the use of the
first T columns, padding, and the maximum length."""

import pytest
import torch

import amlp
from amlp.ops import linformer_attention, linformer_attention_reference

H, D, K, N = 3, 6, 4, 17


def _inputs(B, T, per_head=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    shape = (H, K, N) if per_head else (K, N)
    e, f = (torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    return (*qkv, e, f)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("T", [13, 1, 17])
def test_fast_equals_reference_outputs_and_gradients(per_head, T):
    q, k, v, e, f = _inputs(2, T, per_head)
    mask = None
    if T > 1:
        mask = torch.ones(2, T, dtype=torch.bool)
        mask[1, T - T // 3:] = False
    fast = linformer_attention(q, k, v, e, f, q_mask=mask, kv_mask=mask)
    ref = linformer_attention_reference(q, k, v, e, f, q_mask=mask, kv_mask=mask)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    if mask is not None:  # a key padded where its query is real, and a query padded where its key is real
        kv_mask, q_mask = mask.clone(), mask.clone()
        kv_mask[0, 2], q_mask[0, 5] = False, False
        torch.testing.assert_close(linformer_attention(q, k, v, e, f, q_mask=q_mask, kv_mask=kv_mask),
                                   linformer_attention_reference(q, k, v, e, f, q_mask=q_mask, kv_mask=kv_mask),
                                   rtol=1e-10, atol=1e-12)
    inputs = (q, k, v, e, f)
    for a, b in zip(torch.autograd.grad(fast.square().sum(), inputs), torch.autograd.grad(ref.square().sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_short_sequences_use_the_first_columns_only():
    q, k, v, e, f = (t.detach() for t in _inputs(1, 9))
    a = linformer_attention(q, k, v, e, f)
    e2, f2 = e.clone(), f.clone()
    e2[:, 9:] = 1e3
    f2[:, 9:] = -1e3
    torch.testing.assert_close(linformer_attention(q, k, v, e2, f2), a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linformer_attention(q, k, v, e[:, :9], f[:, :9]), a, rtol=1e-12, atol=1e-12)


def test_padded_keys_contribute_nothing():
    q, k, v, e, f = (t.detach() for t in _inputs(1, 10))
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 3] = False  # a hole: the projection simply skips that token
    a = linformer_attention(q, k, v, e, f, q_mask=mask, kv_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[0, 3], v2[0, 3] = 1e3, -1e3
    torch.testing.assert_close(linformer_attention(q, k2, v2, e, f, q_mask=mask, kv_mask=mask), a)
    assert a[0, 3].abs().max() == 0
    empty = torch.zeros(1, 10, dtype=torch.bool)
    out = linformer_attention(q, k, v, e, f, kv_mask=empty)
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_errors():
    q, k, v, e, f = _inputs(1, 5)
    with pytest.raises(ValueError, match="e_proj must be shaped"):
        linformer_attention(q, k, v, e[0], f)
    with pytest.raises(ValueError, match="f_proj covers n = 4"):
        linformer_attention(q, k, v, e, f[:, :4])
    with pytest.raises(ValueError, match="same k"):
        linformer_attention(q, k, v, e, f[:2])
    with pytest.raises(ValueError, match="same length"):
        linformer_attention(q, k[:, :3], v[:, :3], e, f)
    with pytest.raises(ValueError, match="linformer.*causal"):
        amlp.build_mixer("linformer", dim=12, heads=2, causal=True)
    with pytest.raises(ValueError, match="linformer.*cross"):
        amlp.build_mixer("linformer", dim=12, heads=2, cross=True)
    with pytest.raises(ValueError, match="recurrent"):
        amlp.build_mixer("linformer", dim=12, heads=2).step(torch.randn(1, 12), None)
    with pytest.raises(ValueError, match="proj_len"):
        amlp.build_mixer("linformer", dim=12, heads=2, proj_len=0)


def test_layer_maximum_length_is_the_option():
    info = amlp.layers.get_mixer_info("linformer")
    assert info.capabilities.max_length_option == "max_length"
    m = amlp.build_mixer("linformer", dim=12, heads=2, max_length=20, proj_len=8)
    assert m.max_length == 20 and m.e_proj.shape == (8, 20)
    assert m(torch.randn(2, 20, 12)).shape == (2, 20, 12)
    with pytest.raises(ValueError, match="linformer.*maximum length of 20"):
        m(torch.randn(1, 21, 12))
