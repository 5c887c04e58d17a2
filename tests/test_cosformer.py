"""cosFormer: fast op vs dense reference, horizon and positions, causality, recurrent step."""

import math

import pytest
import torch

import amlp
from amlp.ops.cosformer import cosformer_attention, cosformer_attention_reference

F64 = torch.float64


def _inputs(B=2, Tq=7, Tk=9, H=3, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, D, generator=g, dtype=F64).requires_grad_() for T in (Tq, Tk, Tk))


def _masks(B, Tq, Tk):
    q_mask = torch.ones(B, Tq, dtype=torch.bool)
    kv_mask = torch.ones(B, Tk, dtype=torch.bool)
    q_mask[0, -2:] = False
    kv_mask[0, -3:] = False
    kv_mask[0, 1] = False  # a hole in the middle: positions are ranks among real tokens
    return q_mask, kv_mask


@pytest.mark.parametrize("causal, max_length, chunk", [(False, None, 64), (False, 20, 64), (True, 20, 64),
                                                       (True, 20, 4)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("lengths", [(7, 9), (9, 9)])
def test_fast_equals_reference_outputs_and_gradients(causal, max_length, chunk, masked, lengths):
    Tq, Tk = lengths
    q, k, v = _inputs(2, Tq, Tk)
    q_mask, kv_mask = _masks(2, Tq, Tk) if masked else (None, None)
    kw = dict(q_mask=q_mask, kv_mask=kv_mask, causal=causal, max_length=max_length)
    fast = cosformer_attention(q, k, v, chunk=chunk, **kw)
    ref = cosformer_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * probe).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_reweighting_matches_eq_9_on_one_pair():
    # one query, two keys: the weights are relu(q).relu(k_j) cos(pi/2 (i - j)/M) with M = max(Tq, Tk)
    q = torch.tensor([[[[1.0, 2.0]]]], dtype=F64)
    k = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 1.0]]]], dtype=F64).view(1, 2, 1, 2)
    v = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]], dtype=F64).view(1, 2, 1, 2)
    out = cosformer_attention(q, k, v)
    M = 2.0
    s1 = 1.0 * math.cos(math.pi / 2 * (1 - 1) / M)
    s2 = 2.5 * math.cos(math.pi / 2 * (1 - 2) / M)
    expected = torch.tensor([s1, s2], dtype=F64) / (s1 + s2)
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_padding_anywhere_matches_the_unpadded_sequence():
    q, k, v = (t.detach() for t in _inputs(1, 6, 8, 2, 4))
    alone = cosformer_attention(q, k, v)
    # left-pad queries and pad keys in the middle: real tokens keep their ranks and M
    qp = torch.cat([torch.randn(1, 2, 2, 4, dtype=F64) * 50, q], 1)
    kp = torch.cat([k[:, :3], torch.randn(1, 3, 2, 4, dtype=F64) * 50, k[:, 3:]], 1)
    vp = torch.cat([v[:, :3], torch.randn(1, 3, 2, 4, dtype=F64) * 50, v[:, 3:]], 1)
    q_mask = torch.tensor([[False, False] + [True] * 6])
    kv_mask = torch.tensor([[True] * 3 + [False] * 3 + [True] * 5])
    out = cosformer_attention(qp, kp, vp, q_mask=q_mask, kv_mask=kv_mask)
    torch.testing.assert_close(out[:, 2:], alone)
    assert (out[:, :2] == 0).all()


def test_rows_without_keys_are_zero():
    q, k, v = _inputs(2, 4, 5, 2, 3)
    kv_mask = torch.ones(2, 5, dtype=torch.bool)
    kv_mask[1] = False
    out = cosformer_attention(q, k, v, kv_mask=kv_mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_causal_output_ignores_later_tokens():
    q, k, v = (t.detach() for t in _inputs(2, 10, 10, 2, 4))
    out = cosformer_attention(q, k, v, causal=True, max_length=16, chunk=3)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, 6:] = torch.randn_like(t[:, 6:])
    out2 = cosformer_attention(q2, k2, v2, causal=True, max_length=16, chunk=3)
    torch.testing.assert_close(out[:, :6], out2[:, :6], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


def test_step_equals_forward_and_horizon_is_enforced():
    m = amlp.build_mixer("cosformer", dim=12, heads=2, causal=True, max_length=12).double().eval()
    assert m.max_length == 12
    x = torch.randn(2, 12, 12, dtype=F64)
    full = m(x)
    state = m.init_state(2, dtype=F64)
    outs = []
    for t in range(12):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="maximum length"):
        m.step(x[:, 0], state)
    with pytest.raises(ValueError, match="maximum length"):
        m(torch.randn(1, 13, 12, dtype=F64))
    assert m.state_size(5) == 2 * (2 * 36 + 2 * 6) + 1


def test_horizon_options():
    assert amlp.build_mixer("cosformer", dim=8, heads=2).max_length is None
    assert amlp.build_mixer("cosformer", dim=8, heads=2, causal=True).max_length == 2048
    with pytest.raises(ValueError, match="max_length"):
        amlp.build_mixer("cosformer", dim=8, heads=2, max_length=0)
    q, k, v = _inputs(1, 4, 4, 1, 2)
    with pytest.raises(ValueError, match="max_length"):
        cosformer_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="max_length=3"):
        cosformer_attention(q, k, v, max_length=3)
    # a fixed horizon changes the weights of a non-causal layer
    assert not torch.allclose(cosformer_attention(q, k, v), cosformer_attention(q, k, v, max_length=8))


def test_positions_count_real_tokens_from_one_with_or_without_a_mask():
    from amlp.ops.cosformer import positions

    assert positions(None, 1, 4, None, torch.float64).tolist() == [[1, 2, 3, 4]]
    mask = torch.tensor([[True, False, True, True]])
    assert positions(mask, 1, 4, None, torch.float64).tolist() == [[1, 1, 2, 3]]


@pytest.mark.parametrize("causal", [False, True])
def test_an_all_true_mask_on_one_side_changes_nothing(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ones = torch.ones(2, 7, dtype=torch.bool)
    horizon = {"max_length": 9} if causal else {}  # the causal form needs a fixed horizon
    plain = cosformer_attention(q, k, v, causal=causal, **horizon)
    for kw in ({"q_mask": ones}, {"kv_mask": ones}, {"q_mask": ones, "kv_mask": ones}):
        torch.testing.assert_close(cosformer_attention(q, k, v, causal=causal, **horizon, **kw), plain)
        torch.testing.assert_close(cosformer_attention_reference(q, k, v, causal=causal, **horizon, **kw), plain)
