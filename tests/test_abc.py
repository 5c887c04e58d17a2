"""ABC: chunked prefix-sum fast form against a per-query reference, the running-total
normalisation of the causal form, stability of the log-space sums, and the recurrent step."""

import pytest
import torch

import amlp
from amlp.ops import abc_attention, abc_attention_reference, abc_step
from amlp.ops.abc import SENTINEL

H, D, N = 3, 6, 5


def _inputs(B, Tq, Tk, seed=0, control_scale=3.0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    return rand(B, Tq, H, D), rand(B, Tk, H, D), rand(B, Tk, H, D), rand(B, Tk, H, N, s=control_scale)


def _masks(B, Tq, Tk):
    qm = torch.ones(B, Tq, dtype=torch.bool)
    qm[-1, Tq - max(1, Tq // 3):] = False
    km = torch.ones(B, Tk, dtype=torch.bool)
    km[-1, Tk - max(1, Tk // 3):] = False
    km[0, 0] = False  # a leading padded key: causal queries at 0 read nothing
    return qm, km


def _close_with_grads(fast, ref, inputs):
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    g_fast = torch.autograd.grad(fast.square().sum(), inputs)
    g_ref = torch.autograd.grad(ref.square().sum(), inputs)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.fixture(params=[1, 3, 16])
def causal_form(request, monkeypatch):
    """The causal form with one position per chunk, a few, and the whole sequence in one chunk."""
    import amlp.ops.abc as ops_abc

    forward = ops_abc._causal_chunked
    monkeypatch.setattr(ops_abc, "_causal_chunked", lambda q, k, v, c, scale, chunk: forward(q, k, v, c, scale,
                                                                                            request.param))
    return request.param


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq,Tk,chunk", [(13, 13, 4), (13, 13, 16), (13, 13, 1), (5, 13, 3), (1, 1, 16)])
def test_fast_equals_reference(causal, Tq, Tk, chunk):
    q, k, v, c = _inputs(2, Tq, Tk)
    qm, km = _masks(2, Tq, Tk) if Tk > 1 else (None, None)
    fast = abc_attention(q, k, v, c, q_mask=qm, kv_mask=km, causal=causal, chunk_size=chunk)
    ref = abc_attention_reference(q, k, v, c, q_mask=qm, kv_mask=km, causal=causal)
    _close_with_grads(fast, ref, (q, k, v, c))


def test_chunk_size_reaches_the_chunked_form(monkeypatch):
    import amlp.ops.abc as ops_abc

    seen = []
    forward = ops_abc._causal_chunked

    def spy(q, k, v, c, scale, chunk):
        seen.append(chunk)
        return forward(q, k, v, c, scale, chunk)
    monkeypatch.setattr(ops_abc, "_causal_chunked", spy)
    q, k, v, c = _inputs(1, 9, 9)
    abc_attention(q, k, v, c, causal=True, chunk_size=3)
    assert seen == [3]


def test_noncausal_cross_with_longer_queries():
    q, k, v, c = _inputs(2, 9, 4)
    fast = abc_attention(q, k, v, c)
    _close_with_grads(fast, abc_attention_reference(q, k, v, c), (q, k, v, c))


def test_causal_memory_is_normalised_by_the_running_total(causal_form):
    """With one slot, the memory at t is the phi-weighted mean of k_0..k_t; with a single query
    dimension of zero the read-out is exactly that mean of the values."""
    T = 7
    q = torch.zeros(1, T, 1, 2, dtype=torch.float64)
    k = torch.randn(1, T, 1, 2, dtype=torch.float64)
    v = torch.randn(1, T, 1, 2, dtype=torch.float64)
    c = torch.randn(1, T, 1, 1, dtype=torch.float64)
    out = abc_attention(q, k, v, c, causal=True, chunk_size=3)
    phi = c.exp()[0, :, 0, 0]
    for t in range(T):
        expected = (phi[: t + 1, None] * v[0, : t + 1, 0]).sum(0) / phi[: t + 1].sum()
        torch.testing.assert_close(out[0, t, 0], expected, rtol=1e-12, atol=1e-12)


def test_huge_control_logits_stay_finite(causal_form):
    q, k, v, _ = _inputs(1, 20, 20)
    c = (1e4 * torch.randn(1, 20, H, N, dtype=torch.float64)).requires_grad_()
    for causal in (False, True):
        out = abc_attention(q, k, v, c, causal=causal, chunk_size=6)
        assert torch.isfinite(out).all()
        ref = abc_attention_reference(q, k, v, c, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
        (gc,) = torch.autograd.grad(out.sum(), c)
        assert torch.isfinite(gc).all()
    out32 = abc_attention(*(t.detach().float() for t in (q, k, v, c)), causal=True)
    assert torch.isfinite(out32).all()


def test_fully_padded_rows_are_zero(causal_form):
    q, k, v, c = _inputs(2, 6, 6)
    km = torch.zeros(2, 6, dtype=torch.bool)
    km[0] = True
    for causal in (False, True):
        out = abc_attention(q, k, v, c, kv_mask=km, causal=causal)
        assert torch.isfinite(out).all() and out[1].abs().max() == 0
        out.sum().backward()
        assert torch.isfinite(c.grad).all()
        c.grad = None


def test_step_equals_causal_op(causal_form):
    q, k, v, c = (t.detach() for t in _inputs(2, 11, 11, control_scale=30.0))
    full = abc_attention(q, k, v, c, causal=True, chunk_size=4)
    state = {"lse": torch.full((2, H, N), SENTINEL, dtype=torch.float64),
             "k": torch.zeros(2, H, N, D, dtype=torch.float64), "v": torch.zeros(2, H, N, D, dtype=torch.float64)}
    outs = []
    for t in range(11):
        out, state = abc_step(q[:, t], k[:, t], v[:, t], c[:, t], state)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)


def test_bad_control_and_options():
    q, k, v, c = _inputs(1, 5, 5)
    with pytest.raises(ValueError, match="control must be shaped"):
        abc_attention(q, k, v, c[:, :4])
    with pytest.raises(ValueError, match="chunk_size"):
        abc_attention(q, k, v, c, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        abc_attention(*_inputs(1, 6, 5)[:3], _inputs(1, 6, 5)[3], causal=True)
    with pytest.raises(ValueError, match="landmarks"):
        amlp.build_mixer("abc", dim=12, heads=2, landmarks=0)


def test_layer_state_is_bounded_and_step_matches():
    torch.manual_seed(3)
    m = amlp.build_mixer("abc", dim=12, heads=2, causal=True, landmarks=4).double().eval()
    assert m.state_size(10) == m.state_size(10_000) == 2 * 4 * (2 * 6 + 1)
    x = torch.randn(2, 13, 12, dtype=torch.float64)
    full = m(x)
    state = m.init_state(2, dtype=torch.float64)
    outs = []
    for t in range(13):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :8], full[:, :8], rtol=1e-12, atol=1e-12)


def test_layer_cross_attention_against_reference():
    torch.manual_seed(4)
    m = amlp.build_mixer("abc", dim=12, heads=2, cross=True, landmarks=3).double().eval()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    ctx = torch.randn(2, 10, 12, dtype=torch.float64)
    cm = torch.ones(2, 10, dtype=torch.bool)
    cm[1, 6:] = False
    torch.testing.assert_close(m(x, ctx, context_mask=cm), m.reference(x, ctx, context_mask=cm),
                               rtol=1e-10, atol=1e-12)
    # padded context positions do not matter
    ctx2 = ctx.clone()
    ctx2[1, 6:] = 100.0
    torch.testing.assert_close(m(x, ctx2, context_mask=cm), m(x, ctx, context_mask=cm), rtol=1e-10, atol=1e-12)


def test_causal_layer_right_padding_matches_the_unpadded_sequence():
    torch.manual_seed(6)
    m = amlp.build_mixer("abc", dim=12, heads=2, causal=True, landmarks=4, chunk_size=3).double().eval()
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    x[1, 7:] = 100.0
    y = m(x, x_mask=mask)
    torch.testing.assert_close(y[1, :7], m(x[1:, :7])[0], rtol=1e-10, atol=1e-12)
    assert y[1, 7:].abs().max() == 0
