"""Nystromformer: fast op vs per-row reference, landmarks and padding, pseudo-inverse, approximation."""

import pytest
import torch

import amlp
from amlp.ops import softmax_attention
from amlp.ops._segments import landmark_valid, segment_ids
from amlp.ops.nystrom import iterative_pinv, nystrom_attention, nystrom_attention_reference

F64 = torch.float64


def _inputs(B=2, Tq=7, Tk=9, H=3, D=5, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((scale * torch.randn(B, T, H, D, generator=g, dtype=F64)).requires_grad_() for T in (Tq, Tk, Tk))


def _masks(B, Tq, Tk):
    q_mask = torch.ones(B, Tq, dtype=torch.bool)
    kv_mask = torch.ones(B, Tk, dtype=torch.bool)
    q_mask[0, -2:] = False
    q_mask[1, 0] = False
    kv_mask[0, -3:] = False
    kv_mask[0, 1] = False
    return q_mask, kv_mask


@pytest.mark.parametrize("lengths, landmarks, masked", [
    ((13, 13), 4, True),
    ((13, 13), 16, False),
    ((13, 13), 1, True),
    ((7, 11), 4, True),
    ((7, 11), 16, True),
    ((11, 5), 3, False),
])
def test_fast_equals_reference_outputs_and_gradients(lengths, landmarks, masked):
    Tq, Tk = lengths
    q, k, v = _inputs(2, Tq, Tk)
    q_mask, kv_mask = _masks(2, Tq, Tk) if masked else (None, None)
    kw = dict(q_mask=q_mask, kv_mask=kv_mask, landmarks=landmarks)
    fast = nystrom_attention(q, k, v, **kw)
    ref = nystrom_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    probe = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * probe).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_convolution_skip_equals_reference_with_gradients():
    q, k, v = _inputs(2, 9, 9)
    _, kv_mask = _masks(2, 9, 9)
    w = torch.randn(3, 5, dtype=F64, requires_grad=True)
    kw = dict(q_mask=kv_mask, kv_mask=kv_mask, landmarks=3, conv_weight=w)
    fast = nystrom_attention(q, k, v, **kw)
    ref = nystrom_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    g_fast = torch.autograd.grad(fast.square().sum(), (v, w))
    g_ref = torch.autograd.grad(ref.square().sum(), (v, w))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(fast, nystrom_attention(q, k, v, q_mask=kv_mask, kv_mask=kv_mask, landmarks=3))


@pytest.mark.parametrize("n, c", [(13, 4), (12, 4), (5, 5), (7, 3), (16, 16)])
def test_segments_follow_tensor_split_over_real_tokens(n, c):
    T = n + 3
    mask = torch.zeros(1, T, dtype=torch.bool)
    real = torch.randperm(T, generator=torch.Generator().manual_seed(n))[:n].sort().values
    mask[0, real] = True
    seg = segment_ids(mask, torch.tensor([c]), 1, T, "cpu")
    assert (seg[0, ~mask[0]] == -1).all()
    expected = torch.cat([torch.full((len(p),), i) for i, p in enumerate(torch.tensor_split(torch.arange(n), c))])
    assert torch.equal(seg[0, mask[0]], expected)
    assert landmark_valid(torch.tensor([c, 1]), c).sum() == c + 1


def test_padding_anywhere_matches_the_sequence_alone():
    q, k, v = (t.detach() for t in _inputs(1, 10, 10, 2, 4))
    alone = nystrom_attention(q, k, v, landmarks=4)
    junk = lambda n: 50 * torch.randn(1, n, 2, 4, dtype=F64)  # noqa: E731
    qp, kp, vp = (torch.cat([t[:, :3], junk(2), t[:, 3:], junk(3)], 1) for t in (q, k, v))
    mask = torch.tensor([[True] * 3 + [False] * 2 + [True] * 7 + [False] * 3])
    batch_q = torch.cat([qp, torch.randn_like(qp)])
    batch_k = torch.cat([kp, torch.randn_like(kp)])
    batch_v = torch.cat([vp, torch.randn_like(vp)])
    batch_mask = torch.cat([mask, torch.ones_like(mask)])  # the neighbour has more landmarks
    out = nystrom_attention(batch_q, batch_k, batch_v, q_mask=batch_mask, kv_mask=batch_mask, landmarks=4)
    torch.testing.assert_close(out[0][mask[0]], alone[0], rtol=1e-10, atol=1e-12)
    assert (out[0][~mask[0]] == 0).all()


def test_rows_without_keys_are_zero():
    q, k, v = _inputs(2, 4, 5, 2, 3)
    kv_mask = torch.ones(2, 5, dtype=torch.bool)
    kv_mask[1] = False
    out = nystrom_attention(q, k, v, kv_mask=kv_mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(2, 6, 6, generator=g, dtype=F64), -1)
    exact = torch.linalg.pinv(a)
    torch.testing.assert_close(iterative_pinv(a, 40), exact, rtol=1e-7, atol=1e-8)
    assert (iterative_pinv(a, 6) - exact).abs().max() < (iterative_pinv(a, 1) - exact).abs().max()


def test_one_landmark_per_token_with_exact_pinv_is_softmax_attention():
    # with c = T every segment is one token, so F = A = B and F A^+ B V = A V exactly
    q, k, v = (t.detach() for t in _inputs(2, 8, 8, 2, 4))
    ref = nystrom_attention_reference(q, k, v, landmarks=8, pinv="exact")
    torch.testing.assert_close(ref, softmax_attention(q, k, v), rtol=1e-7, atol=1e-8)


def _approx_error(c, seeds=range(3)):
    errs = []
    for s in seeds:
        q, k, v = (t.detach() for t in _inputs(1, 128, 128, 2, 16, scale=1.0, seed=10 + s))
        errs.append((nystrom_attention(q, k, v, landmarks=c) - softmax_attention(q, k, v)).abs().mean())
    return torch.stack(errs).mean()


def test_error_against_softmax_shrinks_with_more_landmarks():
    small, large = _approx_error(16), _approx_error(128)
    assert large < 0.5 * small


def test_bad_options_raise():
    q, k, v = _inputs(1, 4, 6, 2, 3)
    with pytest.raises(ValueError, match="landmarks"):
        nystrom_attention(q, k, v, landmarks=0)
    with pytest.raises(ValueError, match="Tq == Tk"):
        nystrom_attention(q, k, v, conv_weight=torch.randn(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="conv_weight"):
        nystrom_attention(q, k[:, :4], v[:, :4], conv_weight=torch.randn(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="conv_kernel"):
        amlp.build_mixer("nystrom", dim=8, heads=2, conv_kernel=4)
    with pytest.raises(ValueError, match="conv_kernel"):
        amlp.build_mixer("nystrom", dim=8, heads=2, cross=True, conv_kernel=3)
    with pytest.raises(ValueError, match="pinv"):
        nystrom_attention_reference(q, k, v, pinv="svd")


def test_layer_with_convolution_skip_matches_its_reference():
    m = amlp.build_mixer("nystrom", dim=12, heads=2, landmarks=3, conv_kernel=5).double()
    x = torch.randn(2, 9, 12, dtype=F64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    torch.testing.assert_close(m(x, x_mask=mask), m.reference(x, x_mask=mask), rtol=1e-9, atol=1e-11)
