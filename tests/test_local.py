"""Local (windowed) attention: blocked fast form against a per-query reference, the window itself,
the rolling-cache step and the refusal of cross-attention."""

import pytest
import torch

import amlp
from amlp.ops import local_attention, local_attention_reference


def _qkv(B, T, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def _grads(out, inputs):
    return torch.autograd.grad(out.square().sum(), inputs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("wsize,T", [(15, 13), (5, 13), (4, 13), (3, 7), (1, 5), (40, 13)])
def test_fast_equals_reference_with_padding(causal, wsize, T):
    q, k, v = _qkv(2, T, 3, 6)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, T - T // 3:] = False
    mask[0, 2] = False  # a hole in the middle
    fast = local_attention(q, k, v, wsize=wsize, causal=causal, q_mask=mask, kv_mask=mask)
    ref = local_attention_reference(q, k, v, wsize=wsize, causal=causal, q_mask=mask, kv_mask=mask)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(fast, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_larger_block_size_gives_the_same_result():
    q, k, v = _qkv(1, 13, 2, 6)
    a = local_attention(q, k, v, wsize=5)
    b = local_attention(q, k, v, wsize=5, block_size=6)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="block_size"):
        local_attention(q, k, v, wsize=5, block_size=1)


@pytest.mark.parametrize("wsize", [4, 5, 6])
@pytest.mark.parametrize("causal", [False, True])
def test_window_is_exactly_the_documented_one(causal, wsize):
    """The gradient of output i reaches exactly the keys of i's window (written here, independent of
    the package's window_offsets), for odd and even window sizes."""
    T = 13
    q, k, v = _qkv(1, T, 1, 4)
    out = local_attention(q, k, v, wsize=wsize, causal=causal)
    for i in range(T):
        (gk,) = torch.autograd.grad(out[0, i].sum(), k, retain_graph=True)
        seen = set(torch.nonzero(gk[0].abs().sum((1, 2)) > 0).flatten().tolist())
        if causal:
            window = {j for j in range(T) if i - wsize < j <= i}
        else:
            window = {j for j in range(T) if abs(i - j) <= wsize // 2}
        assert seen == window - {i} or seen == window  # key i itself may cancel for a lone key
        assert seen <= window


def test_keys_without_real_neighbours_give_zero_not_nan():
    q, k, v = _qkv(1, 9, 2, 4)
    q_mask = torch.ones(1, 9, dtype=torch.bool)
    kv_mask = torch.zeros(1, 9, dtype=torch.bool)
    kv_mask[0, 8] = True  # only the last key is real: early queries see none
    out = local_attention(q, k, v, wsize=3, q_mask=q_mask, kv_mask=kv_mask)
    assert torch.isfinite(out).all()
    assert out[0, :7].abs().max() == 0 and out[0, 7:].abs().min() > 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_half_precision_and_shape_errors():
    q, k, v = (torch.randn(2, 10, 2, 4, dtype=torch.bfloat16) for _ in range(3))
    out = local_attention(q, k, v, wsize=3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="same length"):
        local_attention(q, k[:, :5], v[:, :5])
    with pytest.raises(ValueError, match="wsize"):
        local_attention(q, k, v, wsize=0)
    with pytest.raises(ValueError, match="kv_mask"):
        local_attention(q, k, v, kv_mask=torch.ones(2, 9, dtype=torch.bool))


def test_layer_future_invariance_and_step_with_a_short_window():
    torch.manual_seed(1)
    m = amlp.build_mixer("local", dim=12, heads=2, causal=True, wsize=4).double().eval()
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 4, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x)[:, :7], m(x2)[:, :7], rtol=1e-12, atol=1e-12)
    full = m(x)
    state = m.init_state(2, dtype=torch.float64)
    outs = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        outs.append(y)
        assert state["k"].shape[1] == min(t + 1, 4)  # the cache never grows past the window
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)
    assert m.state_size(100) == 2 * 4 * 12


def test_noncausal_output_depends_only_on_the_window():
    torch.manual_seed(2)
    m = amlp.build_mixer("local", dim=12, heads=2, wsize=5).double().eval()
    x = torch.randn(1, 13, 12, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(1, 4, 12, dtype=torch.float64)  # outside the window of positions <= 6
    torch.testing.assert_close(m(x)[:, :7], m(x2)[:, :7], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(m(x)[:, 7], m(x2)[:, 7])


def test_cross_attention_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="local.*cross"):
        amlp.build_mixer("local", dim=12, heads=2, cross=True)
    with pytest.raises(ValueError, match="alignment"):
        amlp.layers.LocalAttention(12, 2, cross=True)
    m = amlp.build_mixer("local", dim=12, heads=2)
    with pytest.raises(ValueError, match="alignment"):
        m(torch.randn(1, 5, 12), torch.randn(1, 7, 12))
    with pytest.raises(ValueError, match="causal"):
        m.init_state(1)


@pytest.mark.parametrize("causal", [False, True])
def test_fast_form_never_builds_t_by_t_logits(monkeypatch, causal):
    import amlp.ops.local as local_module

    seen = []
    real_sdpa = local_module.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(local_module.F, "scaled_dot_product_attention", recording_sdpa)
    T, wsize = 200, 7
    q, k, v = (torch.randn(1, T, 2, 4) for _ in range(3))
    local_attention(q, k, v, wsize=wsize, causal=causal)
    (q_shape, k_shape), = seen
    assert q_shape[-2] <= wsize and k_shape[-2] <= 3 * wsize  # queries per block x keys per window


def test_a_non_finite_token_reaches_only_the_causal_window():
    import amlp

    torch.manual_seed(0)
    m = amlp.build_mixer("local", dim=8, heads=2, causal=True, wsize=3).double().eval()
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    x[0, 4] = float("nan")
    y = m(x)
    assert torch.isnan(y[0, 4:7]).all()  # positions 4, 5, 6 see position 4
    assert torch.isfinite(y[0, :4]).all() and torch.isfinite(y[0, 7:]).all()
    clean = x.clone()
    clean[0, :5] = torch.randn(5, 8, dtype=torch.float64)  # the past beyond the window does not matter
    torch.testing.assert_close(m(clean)[0, 7:], y[0, 7:])
