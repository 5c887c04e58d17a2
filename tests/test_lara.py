"""LARA: fast op vs per-row reference with explicit densities, padding, seeding, approximation."""

import pytest
import torch

import amlp
from amlp.ops import softmax_attention
from amlp.ops.lara import lara_attention, lara_attention_reference

F64 = torch.float64


def _inputs(B=2, Tq=7, Tk=9, H=3, D=5, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(B, Tq, H, D, generator=g, dtype=F64)).requires_grad_()
    k = (scale * torch.randn(B, Tk, H, D, generator=g, dtype=F64)).requires_grad_()
    v = torch.randn(B, Tk, H, D, generator=g, dtype=F64).requires_grad_()
    return q, k, v


def _noise(H, C, D, seed=1):
    return torch.randn(H, C, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _masks(B, Tq, Tk):
    q_mask = torch.ones(B, Tq, dtype=torch.bool)
    kv_mask = torch.ones(B, Tk, dtype=torch.bool)
    q_mask[0, -2:] = False
    q_mask[1, 0] = False
    kv_mask[0, -3:] = False
    kv_mask[0, 1] = False
    return q_mask, kv_mask


@pytest.mark.parametrize("lengths, landmarks, masked, mis_weights", [
    ((11, 11), 4, True, "query"),
    ((11, 11), 16, False, "query"),
    ((7, 10), 4, True, "query"),
    ((7, 10), 1, False, "query"),
    ((11, 11), 3, True, "balance"),
    ((10, 7), 16, True, "balance"),
])
def test_fast_equals_reference_outputs_and_gradients(lengths, landmarks, masked, mis_weights):
    Tq, Tk = lengths
    q, k, v = _inputs(2, Tq, Tk)
    q_mask, kv_mask = _masks(2, Tq, Tk) if masked else (None, None)
    noise = _noise(3, landmarks, 5)
    kw = dict(q_mask=q_mask, kv_mask=kv_mask, mis_weights=mis_weights)
    fast = lara_attention(q, k, v, noise, **kw)
    ref = lara_attention_reference(q, k, v, noise, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    probe = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * probe).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_padding_anywhere_matches_the_sequence_alone():
    q, k, v = (t.detach() for t in _inputs(1, 10, 10, 2, 4))
    noise = _noise(2, 4, 4)
    alone = lara_attention(q, k, v, noise)
    junk = lambda n: 50 * torch.randn(1, n, 2, 4, dtype=F64)  # noqa: E731
    qp, kp, vp = (torch.cat([t[:, :3], junk(2), t[:, 3:], junk(3)], 1) for t in (q, k, v))
    mask = torch.tensor([[True] * 3 + [False] * 2 + [True] * 7 + [False] * 3])
    batch = [torch.cat([t, torch.randn_like(t)]) for t in (qp, kp, vp)]
    batch_mask = torch.cat([mask, torch.ones_like(mask)])
    out = lara_attention(*batch, noise, q_mask=batch_mask, kv_mask=batch_mask)
    torch.testing.assert_close(out[0][mask[0]], alone[0], rtol=1e-10, atol=1e-12)
    assert (out[0][~mask[0]] == 0).all()


def test_rows_without_keys_are_zero_and_large_inputs_finite():
    q, k, v = _inputs(2, 4, 5, 2, 3)
    kv_mask = torch.ones(2, 5, dtype=torch.bool)
    kv_mask[1] = False
    out = lara_attention(q, k, v, _noise(2, 3, 3), kv_mask=kv_mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    q, k, v = (t.detach().float() for t in _inputs(1, 40, 40, 2, 16, scale=20.0))
    assert torch.isfinite(lara_attention(q, k, v, _noise(2, 8, 16).float())).all()


def test_bad_options_raise():
    q, k, v = _inputs(1, 4, 4, 2, 3)
    with pytest.raises(ValueError, match="noise"):
        lara_attention(q, k, v, torch.randn(2, 4, 5, dtype=F64))
    with pytest.raises(ValueError, match="noise"):
        lara_attention(q, k, v, torch.randn(4, 3, dtype=F64))
    with pytest.raises(ValueError, match="mis_weights"):
        lara_attention(q, k, v, _noise(2, 2, 3), mis_weights="uniform")
    with pytest.raises(ValueError, match="landmarks"):
        amlp.build_mixer("lara", dim=8, heads=2, landmarks=0)


def test_layer_is_reproducible_under_a_seed_and_deterministic_in_eval():
    x = torch.randn(2, 9, 16)
    a = amlp.build_mixer("lara", dim=16, heads=2, landmarks=4, seed=3)
    b = amlp.build_mixer("lara", dim=16, heads=2, landmarks=4, seed=3)
    c = amlp.build_mixer("lara", dim=16, heads=2, landmarks=4, seed=4)
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, c.noise)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))
    r = amlp.build_mixer("lara", dim=16, heads=2, landmarks=4, seed=3, redraw=True)
    before = r.noise.clone()
    r.eval()
    r(x)
    assert torch.equal(r.noise, before)
    r.train()
    r(x)
    assert not torch.equal(r.noise, before)


def _approx_error(C, mis_weights, seeds=range(3)):
    errs = []
    for s in seeds:
        q, k, v = (t.detach() for t in _inputs(1, 256, 256, 2, 16, scale=0.5, seed=20 + s))
        out = lara_attention(q, k, v, _noise(2, C, 16, seed=s), mis_weights=mis_weights)
        errs.append((out - softmax_attention(q, k, v)).abs().mean())
    return torch.stack(errs).mean()


@pytest.mark.parametrize("mis_weights", ["query", "balance"])
def test_error_against_softmax_shrinks_with_more_proposals(mis_weights):
    small, large = _approx_error(16, mis_weights), _approx_error(256, mis_weights)
    assert large < 0.6 * small


@pytest.mark.parametrize("mis_weights", ["query", "balance"])
def test_one_proposal_gives_the_same_output_for_every_query(mis_weights):
    # with C = 1 the weights are 1 and xi(q_n, w) cancels: out_n = sum_m xi(k_m, w) v_m / sum_m xi(k_m, w)
    q, k, v = (t.detach() for t in _inputs(1, 6, 8, 2, 4))
    noise = _noise(2, 1, 4)
    out = lara_attention(q, k, v, noise, mis_weights=mis_weights)
    s = 4 ** -0.25
    omega = (q * s).mean(1) + (k * s).mean(1) + noise[:, 0]  # [1, H, D]
    xi_k = torch.exp(torch.einsum("bthd,bhd->bth", k * s, omega) - 0.5 * (k * s).square().sum(-1))
    expected = torch.einsum("bth,bthd->bhd", xi_k, v) / xi_k.sum(1)[..., None]
    torch.testing.assert_close(out, expected.unsqueeze(1).expand_as(out))
