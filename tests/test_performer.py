"""Performer (FAVOR+): fast op vs dense reference, causality, recurrent step, seeding, approximation."""

import pytest
import torch

import amlp
from amlp.ops import softmax_attention
from amlp.ops.performer import orthogonal_gaussian_features, performer_attention, performer_attention_reference

F64 = torch.float64


def _inputs(B=2, Tq=7, Tk=9, H=3, D=5, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(B, Tq, H, D, generator=g, dtype=F64)).requires_grad_()
    k = (scale * torch.randn(B, Tk, H, D, generator=g, dtype=F64)).requires_grad_()
    v = torch.randn(B, Tk, H, D, generator=g, dtype=F64).requires_grad_()
    return q, k, v


def _features(m, D, H=None, seed=1):
    w = orthogonal_gaussian_features(m, D, generator=torch.Generator().manual_seed(seed), dtype=F64)
    if H is not None:
        w = torch.stack([orthogonal_gaussian_features(m, D, generator=torch.Generator().manual_seed(seed + h),
                                                      dtype=F64) for h in range(H)])
    return w


def _masks(B, Tq, Tk):
    q_mask = torch.ones(B, Tq, dtype=torch.bool)
    kv_mask = torch.ones(B, Tk, dtype=torch.bool)
    q_mask[0, -2:] = False
    kv_mask[0, -3:] = False
    kv_mask[0, 1] = False
    return q_mask, kv_mask


@pytest.mark.parametrize("causal, chunk", [(False, 64), (True, 64), (True, 3), (True, 4)])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_equals_reference_outputs_and_gradients(causal, chunk, per_head, masked):
    B, Tq, Tk, H, D, m = 2, 7, 9, 3, 5, 11
    q, k, v = _inputs(B, Tq, Tk, H, D)
    w = _features(m, D, H if per_head else None)
    q_mask, kv_mask = _masks(B, Tq, Tk) if masked else (None, None)
    fast = performer_attention(q, k, v, w, q_mask=q_mask, kv_mask=kv_mask, causal=causal, chunk=chunk)
    ref = performer_attention_reference(q, k, v, w, q_mask=q_mask, kv_mask=kv_mask, causal=causal)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * probe).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_all_padded_keys_give_zeros_and_padded_queries_are_zero():
    q, k, v = _inputs(2, 5, 6, 2, 4)
    kv_mask = torch.ones(2, 6, dtype=torch.bool)
    kv_mask[1] = False
    q_mask = torch.ones(2, 5, dtype=torch.bool)
    q_mask[0, 3:] = False
    out = performer_attention(q, k, v, _features(8, 4), q_mask=q_mask, kv_mask=kv_mask)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[0, 3:] == 0).all()


def test_causal_output_ignores_later_tokens():
    q, k, v = _inputs(2, 10, 10, 2, 4)
    w = _features(16, 4)
    out = performer_attention(q, k, v, w, causal=True, chunk=4)
    q2, k2, v2 = q.detach().clone(), k.detach().clone(), v.detach().clone()
    for t in (q2, k2, v2):
        t[:, 6:] = torch.randn_like(t[:, 6:])
    out2 = performer_attention(q2, k2, v2, w, causal=True, chunk=4)
    torch.testing.assert_close(out[:, :6], out2[:, :6], rtol=1e-9, atol=1e-11)
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


def test_large_inputs_stay_finite_in_float32():
    q, k, v = _inputs(1, 33, 33, 2, 16, scale=20.0)
    w = _features(32, 16).float()
    for causal in (False, True):
        out = performer_attention(q.float(), k.float(), v.float(), w, causal=causal)
        assert torch.isfinite(out).all()


def test_step_equals_forward_with_growing_stabiliser():
    torch.manual_seed(3)
    m = amlp.build_mixer("performer", dim=12, heads=2, causal=True, approx_attn_dim=8).double().eval()
    x = torch.randn(2, 11, 12, dtype=F64)
    x[:, 5] *= 6.0  # a large key part-way through forces the running max to grow
    full = m(x)
    state = m.init_state(2, dtype=F64)
    outs = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-9, atol=1e-11)
    assert m.state_size(11) == 2 * (8 * 6 + 8 + 1)


def test_orthogonal_features_are_orthogonal_within_blocks_and_seeded():
    D = 6
    w1 = orthogonal_gaussian_features(15, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    w2 = orthogonal_gaussian_features(15, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    w3 = orthogonal_gaussian_features(15, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert w1.shape == (15, D)
    assert torch.equal(w1, w2) and not torch.allclose(w1, w3)
    for block in (w1[:D], w1[D:2 * D], w1[2 * D:]):
        gram = block @ block.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-10
    # norms are chi-distributed (not all equal to sqrt(D))
    assert w1.norm(dim=1).std() > 1e-3


def test_layer_construction_is_reproducible_and_redraw_only_in_training():
    a = amlp.build_mixer("performer", dim=16, heads=2, approx_attn_dim=8, seed=7)
    b = amlp.build_mixer("performer", dim=16, heads=2, approx_attn_dim=8, seed=7)
    c = amlp.build_mixer("performer", dim=16, heads=2, approx_attn_dim=8, seed=8)
    assert torch.equal(a.features, b.features) and not torch.equal(a.features, c.features)
    r = amlp.build_mixer("performer", dim=16, heads=2, approx_attn_dim=8, seed=7, redraw=True)
    x = torch.randn(2, 5, 16)
    r.eval()
    before = r.features.clone()
    y1, y2 = r(x), r(x)
    assert torch.equal(y1, y2) and torch.equal(r.features, before)
    r.train()
    r(x)
    assert not torch.equal(r.features, before)
    # without redraw, training mode keeps the features
    a.train()
    a(x)
    assert torch.equal(a.features, b.features)


def test_bad_features_raise():
    q, k, v = _inputs(1, 4, 4, 2, 4)
    with pytest.raises(ValueError, match="features"):
        performer_attention(q, k, v, torch.randn(8, 5, dtype=F64))
    with pytest.raises(ValueError, match="features"):
        performer_attention(q, k, v, torch.randn(3, 8, 4, dtype=F64))
    with pytest.raises(ValueError, match="Tq <= Tk"):
        performer_attention(q, k[:, :2], v[:, :2], torch.randn(8, 4, dtype=F64), causal=True)
    with pytest.raises(ValueError, match="chunk"):
        performer_attention(q, k, v, torch.randn(8, 4, dtype=F64), causal=True, chunk=0)
    with pytest.raises(ValueError, match="approx_attn_dim"):
        amlp.build_mixer("performer", dim=8, heads=2, approx_attn_dim=0)


def _approx_error(m, seeds=range(4)):
    errs = []
    for s in seeds:
        q, k, v = (t.detach() for t in _inputs(1, 64, 64, 2, 16, scale=0.5, seed=100 + s))
        exact = softmax_attention(q, k, v)
        w = orthogonal_gaussian_features(m, 16, generator=torch.Generator().manual_seed(s), dtype=F64)
        errs.append((performer_attention(q, k, v, w) - exact).abs().mean())
    return torch.stack(errs).mean()


def test_error_against_softmax_shrinks_with_more_features():
    small, large = _approx_error(16), _approx_error(256)
    assert large < 0.6 * small


def test_a_padded_key_far_above_the_real_ones_gives_no_inf_times_zero():
    # in float32, exp(logit - stabiliser) overflows when a padded key's logit exceeds the real keys'
    # maximum by about 88; padded keys must be selected out, not multiplied by zero. The logit
    # w.k' - |k'|^2/2 (k' = k D^-1/4) peaks at k' = w with |w|^2/2, about 128 for D = 256.
    D = 256
    g = torch.Generator().manual_seed(0)
    w = orthogonal_gaussian_features(8, D, generator=g)
    q, k, v = (torch.randn(1, 6, 1, D, generator=g) for _ in range(3))
    kv_mask = torch.tensor([[True, True, True, True, False, False]])
    far = k.clone()
    far[0, 4:, 0] = w[0] * D ** 0.25
    out = performer_attention(q, far, v, w, kv_mask=kv_mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, performer_attention(q, k[:, :4], v[:, :4], w), rtol=1e-4, atol=1e-5)
