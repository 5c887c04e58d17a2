"""Causal AMLP-Cov (Appendix A, eqs. 13-14): chunked prefix sums against the per-token reference,
the recurrent step, causality, and agreement with the non-causal op at the last position."""

import pytest
import torch

import amlp
from amlp.layers import AMLP
from amlp.ops.amlp import amlp_cov
from amlp.ops.amlp_causal import (
    CovPrefixState,
    amlp_cov_causal,
    amlp_cov_causal_init_state,
    amlp_cov_causal_reference,
    amlp_cov_causal_step,
)

F64 = torch.float64
B, T, H, D, C = 2, 9, 2, 5, 4


def inputs(seed=0, T=T, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (scale * torch.randn(B, T, H, D, generator=g, dtype=F64) for _ in range(3))
    cq = torch.randn(H, C, D, generator=g, dtype=F64)
    ck = torch.randn(H, C, D, generator=g, dtype=F64)
    tau = 1.0 + 0.5 * torch.randn(H, 3, generator=g, dtype=F64)
    return [t.requires_grad_() for t in (q, k, v, cq, ck, tau)]


def right_padded(T=T):
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T - 4:] = False
    return mask


def grads(out, tensors, weight):
    return torch.autograd.grad((out * weight).sum(), tensors)


@pytest.mark.parametrize("form, activation, padded", [
    ("paper", "softmax", True), ("stable", "softmax", True), ("stable", "relu", False), ("paper", "identity", False),
])
def test_chunked_equals_per_token_reference(form, activation, padded):
    q, k, v, cq, ck, tau = inputs()
    mask = right_padded() if padded else None
    opts = dict(q_mask=mask, kv_mask=mask, form=form, activation=activation, temperature=tau)
    fast = amlp_cov_causal(q, k, v, cq, ck, chunk_size=4, **opts)
    ref = amlp_cov_causal_reference(q, k, v, cq, ck, **opts)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(ref)
    every = (q, k, v, cq, ck, tau)
    for gf, gr in zip(grads(fast, every, w), grads(ref, every, w)):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-11)


def test_separate_query_and_key_masks():
    q, k, v, cq, ck, tau = inputs(seed=1)
    gen = torch.Generator().manual_seed(5)
    q_mask = torch.rand(B, T, generator=gen) > 0.3
    kv_mask = torch.rand(B, T, generator=gen) > 0.3
    kv_mask[0, :3] = False  # the first queries of row 0 have no real key yet: zero output
    opts = dict(q_mask=q_mask, kv_mask=kv_mask, temperature=tau)
    fast = amlp_cov_causal(q, k, v, cq, ck, chunk_size=3, **opts)
    ref = amlp_cov_causal_reference(q, k, v, cq, ck, **opts)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(fast[0, :3], torch.zeros_like(fast[0, :3]))
    assert torch.equal(fast[~q_mask], torch.zeros_like(fast[~q_mask]))


@pytest.mark.parametrize("chunk_size, recompute", [(1, True), (2, False), (4, True), (64, False)])
def test_chunk_size_and_recompute_do_not_change_the_result(chunk_size, recompute):
    q, k, v, cq, ck, tau = inputs()
    mask = right_padded()
    whole = amlp_cov_causal(q, k, v, cq, ck, q_mask=mask, kv_mask=mask, temperature=tau, chunk_size=T,
                            recompute=False)
    out = amlp_cov_causal(q, k, v, cq, ck, q_mask=mask, kv_mask=mask, temperature=tau, chunk_size=chunk_size,
                          recompute=recompute)
    torch.testing.assert_close(out, whole, rtol=1e-12, atol=1e-13)
    w = torch.randn_like(whole)
    every = (q, k, v, cq, ck, tau)
    for a, b in zip(grads(out, every, w), grads(whole, every, w)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_batch_rows_in_groups_give_the_same_outputs_state_and_gradients(monkeypatch):
    """A memory budget smaller than one block of the batch runs the rows in groups (here one row at a
    time): outputs, the final state and every gradient equal the whole batch at once."""
    from amlp.ops import amlp_causal

    q, k, v, cq, ck, tau = inputs(seed=4)
    mask = right_padded()
    with torch.no_grad():
        start = amlp_cov_causal(q[:, :3], k[:, :3], v[:, :3], cq, ck, temperature=tau, return_state=True)[1]
    opts = dict(q_mask=mask, kv_mask=mask, temperature=tau, initial_state=start, return_state=True)
    whole, whole_state = amlp_cov_causal(q, k, v, cq, ck, chunk_size=T, **opts)
    assert amlp_causal._group_rows(B, H, D, 8, amlp_causal.BLOCK_TOKENS) == B
    monkeypatch.setattr(amlp_causal, "CHUNK_BYTES", 1)
    assert amlp_causal._group_rows(B, H, D, 8, amlp_causal.BLOCK_TOKENS) == 1
    grouped, grouped_state = amlp_cov_causal(q, k, v, cq, ck, **opts)
    torch.testing.assert_close(grouped, whole, rtol=1e-12, atol=1e-13)
    for a, b in zip(grouped_state, whole_state):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    w = torch.randn_like(whole)
    every = (q, k, v, cq, ck, tau)
    for a, b in zip(grads(grouped, every, w), grads(whole, every, w)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("form", ["paper", "stable"])
def test_every_position_equals_the_non_causal_op_on_its_prefix(form):
    q, k, v, cq, ck, tau = inputs(seed=2)
    causal = amlp_cov_causal(q, k, v, cq, ck, form=form, temperature=tau, chunk_size=4)
    for t in range(1, T + 1):
        prefix = amlp_cov(q[:, :t], k[:, :t], v[:, :t], cq, ck, form=form, temperature=tau)
        torch.testing.assert_close(causal[:, t - 1], prefix[:, -1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["paper", "stable"])
def test_last_position_equals_non_causal_output_with_padding(form):
    q, k, v, cq, ck, tau = inputs(seed=3)
    mask = right_padded()
    causal = amlp_cov_causal(q, k, v, cq, ck, q_mask=mask, kv_mask=mask, form=form, temperature=tau)
    full = amlp_cov(q, k, v, cq, ck, q_mask=mask, kv_mask=mask, form=form, temperature=tau)
    torch.testing.assert_close(causal[0, -1], full[0, -1], rtol=1e-10, atol=1e-12)
    last_real = int(mask[1].sum()) - 1
    torch.testing.assert_close(causal[1, last_real], full[1, last_real], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(causal[0, :-1], full[0, :-1])  # earlier positions see only their prefix


def test_state_carries_across_calls_and_step_by_step():
    q, k, v, cq, ck, tau = inputs(seed=4)
    opts = dict(temperature=tau, chunk_size=4)
    whole, final = amlp_cov_causal(q, k, v, cq, ck, return_state=True, **opts)
    first, mid = amlp_cov_causal(q[:, :6], k[:, :6], v[:, :6], cq, ck, return_state=True, **opts)
    second, end = amlp_cov_causal(q[:, 6:], k[:, 6:], v[:, 6:], cq, ck, initial_state=mid, return_state=True, **opts)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-13)
    state = amlp_cov_causal_init_state(B, H, D, dtype=F64)
    steps = []
    for t in range(T):
        y, state = amlp_cov_causal(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cq, ck, initial_state=state,
                                   return_state=True, **opts)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-10, atol=1e-12)
    for a, b, c in zip(final, end, state):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    # the statistics are the plain sums of eqs. 13-14
    torch.testing.assert_close(final.s_q, torch.einsum("bthd,bthe->bhde", q, q))
    torch.testing.assert_close(final.z, torch.einsum("bthd,bthe->bhde", k, v))


@pytest.mark.parametrize("form, activation", [("stable", "softmax"), ("paper", "relu"), ("stable", "sigmoid")])
def test_step_op_equals_the_parallel_form(form, activation):
    q, k, v, cq, ck, tau = inputs(seed=11)
    opts = dict(temperature=tau, form=form, activation=activation)
    whole, final = amlp_cov_causal(q, k, v, cq, ck, return_state=True, **opts)
    state = amlp_cov_causal_init_state(B, H, D, dtype=F64)
    outs = []
    for t in range(T):
        before = [x.clone() for x in state]
        y, new_state = amlp_cov_causal_step(q[:, t], k[:, t], v[:, t], cq, ck, state, **opts)
        for a, b in zip(before, state):
            assert torch.equal(a, b)  # the state passed in is left as it was
        outs.append(y)
        state = new_state
    torch.testing.assert_close(torch.stack(outs, 1), whole, rtol=1e-10, atol=1e-12)
    for a, b in zip(final, state):
        torch.testing.assert_close(a, b)
    # gradients flow through the step to the inputs and the landmarks
    g = torch.autograd.grad(outs[-1].sum(), (q, cq, tau))
    assert all(x.abs().sum() > 0 for x in g)


def test_step_op_errors():
    q, k, v, cq, ck, tau = inputs()
    state = amlp_cov_causal_init_state(B, H, D, dtype=F64)
    with pytest.raises(ValueError, match=r"\[B, H, D\]"):
        amlp_cov_causal_step(q[:, :2], k[:, 0], v[:, 0], cq, ck, state)
    with pytest.raises(ValueError, match="initial_state.s_q"):
        amlp_cov_causal_step(q[:, 0], k[:, 0], v[:, 0], cq, ck, amlp_cov_causal_init_state(B, H, D + 1, dtype=F64))
    with pytest.raises(ValueError, match="official"):
        amlp_cov_causal_step(q[:, 0], k[:, 0], v[:, 0], cq, ck, state, form="official")


@pytest.mark.parametrize("form", ["paper", "stable"])
def test_gradients_cross_the_carried_state(form):
    """Two calls joined by the state give the gradients of one call: the backward of a chunk
    passes the gradient of its final state (all four statistics) back to the tokens before it."""
    q, k, v, cq, ck, tau = inputs(seed=12, T=11)
    mask = torch.ones(B, 11, dtype=torch.bool)
    mask[0, 2] = False  # a padded token in the first half
    opts = dict(temperature=tau, form=form, chunk_size=4)
    whole = amlp_cov_causal(q, k, v, cq, ck, q_mask=mask, kv_mask=mask, **opts)
    first, mid = amlp_cov_causal(q[:, :5], k[:, :5], v[:, :5], cq, ck, q_mask=mask[:, :5], kv_mask=mask[:, :5],
                                 return_state=True, **opts)
    second = amlp_cov_causal(q[:, 5:], k[:, 5:], v[:, 5:], cq, ck, q_mask=mask[:, 5:], kv_mask=mask[:, 5:],
                             initial_state=mid, **opts)
    joined = torch.cat([first, second], 1)
    torch.testing.assert_close(joined, whole, rtol=1e-11, atol=1e-12)
    w = torch.randn_like(whole)
    # the second call's outputs alone reach the first half of the tokens through the state
    g_q = torch.autograd.grad((second * w[:, 5:]).sum(), q, retain_graph=True)[0]
    assert g_q[:, :5].abs().sum() > 0
    every = (q, k, v, cq, ck, tau)
    for a, b in zip(grads(joined, every, w), grads(whole, every, w)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_outputs_ignore_the_future_jacobian():
    q, k, v, cq, ck, tau = inputs(seed=5, T=7)
    x = torch.cat([q, k, v], -1).detach().requires_grad_()
    out = amlp_cov_causal(x[..., :D], x[..., D:2 * D], x[..., 2 * D:], cq, ck, temperature=tau, chunk_size=3)
    w = torch.randn_like(out)
    for t in range(7):  # one row of the Jacobian per output position, contracted with random weights
        (g,) = torch.autograd.grad((out[:, t] * w[:, t]).sum(), x, retain_graph=True)
        per_input = g.abs().sum(dim=(0, 2, 3))
        assert torch.equal(per_input[t + 1:], torch.zeros_like(per_input[t + 1:]))
        assert (per_input[: t + 1] > 0).all()


def test_half_precision_and_large_inputs_stay_finite():
    g = torch.Generator().manual_seed(6)
    q, k, v = (50 * torch.randn(1, 300, 2, 8, generator=g) for _ in range(3))
    cq, ck = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        qd, kd, vd = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out = amlp_cov_causal(qd, kd, vd, cq, ck, chunk_size=64)
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
        gq, gk, gv = torch.autograd.grad(out.float().square().sum(), (qd, kd, vd))
        assert all(torch.isfinite(t.float()).all() for t in (gq, gk, gv))


def test_op_errors():
    q, k, v, cq, ck, tau = inputs()
    with pytest.raises(ValueError, match="same length"):
        amlp_cov_causal(q, k[:, :5], v[:, :5], cq, ck)
    with pytest.raises(ValueError, match="chunk_size"):
        amlp_cov_causal(q, k, v, cq, ck, chunk_size=0)
    with pytest.raises(ValueError, match="form"):
        amlp_cov_causal(q, k, v, cq, ck, form="fast")
    with pytest.raises(ValueError, match="initial_state.s_k"):
        bad = amlp_cov_causal_init_state(B, H, D)._replace(s_k=torch.zeros(B, H, D))
        amlp_cov_causal(q, k, v, cq, ck, initial_state=bad)
    with pytest.raises(ValueError, match="CovPrefixState"):
        amlp_cov_causal(q, k, v, cq, ck, initial_state=(1, 2))
    with pytest.raises(ValueError, match="q_mask"):
        amlp_cov_causal(q, k, v, cq, ck, q_mask=torch.ones(B, T - 1, dtype=torch.bool))
    assert isinstance(amlp_cov_causal_init_state(1, 1, 2), CovPrefixState)


# -- the layer -------------------------------------------------------------------------------


def test_pquery_refuses_causal_and_says_why():
    with pytest.raises(ValueError, match="PQuery has no causal form"):
        AMLP(16, 2, variant="pquery", causal=True, form="stable")
    with pytest.raises(ValueError, match="amlp-pquery.*causal"):
        amlp.build_mixer("amlp-pquery", dim=16, heads=2, causal=True, form="stable")
    with pytest.raises(ValueError, match="cross=True"):
        amlp.build_mixer("amlp-cov", dim=16, heads=2, causal=True, cross=True, form="stable")


@pytest.mark.parametrize("form", ["paper", "stable"])
def test_causal_layer_matches_reference_and_steps(form):
    torch.manual_seed(0)
    m = amlp.build_mixer("amlp-cov", dim=12, heads=2, causal=True, form=form, landmarks=3, chunk_size=4).double()
    assert m.capabilities.causal and m.capabilities.recurrent
    x = torch.randn(2, 9, 12, dtype=F64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    torch.testing.assert_close(m(x, x_mask=mask), m.reference(x, x_mask=mask), rtol=1e-10, atol=1e-12)
    full = m(x)
    state = m.init_state(2)
    outs = []
    for t in range(9):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)
    assert m.state_size(100) == m.state_size(1) == 2 * (3 * 36 + 6) + 2
    # the non-causal layer with the same parameters agrees at the last position
    nc = amlp.build_mixer("amlp-cov", dim=12, heads=2, form=form, landmarks=3).double()
    nc.load_state_dict(m.state_dict())
    torch.testing.assert_close(nc(x)[:, -1], full[:, -1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="causal=True"):
        nc.init_state(2)
