"""CausalRN: the stable linear and chunked quadratic forms against plain pairwise references,
recurrence, causality, stability at long lengths and large inputs, and the block."""

import pytest
import torch

import amlp
from amlp.models import CausalRNBlock
from amlp.ops.causal_rn import (
    causal_rn_linear,
    causal_rn_linear_init_state,
    causal_rn_linear_reference,
    causal_rn_linear_step,
    causal_rn_quadratic,
    causal_rn_quadratic_reference,
    layer_norm0,
    layer_norm0_reference,
)
from amlp.ops.causal_rn import _prefix_log_sum_exp

F64 = torch.float64


def pair_inputs(B=2, T=11, h=7, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (scale * torch.randn(B, T, h, generator=g, dtype=F64)).requires_grad_()
    b = (scale * torch.randn(B, T, h, generator=g, dtype=F64)).requires_grad_()
    return a, b


def ragged_mask(B, T):
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, T - 4:] = False  # right padding
    return mask


def assert_same_with_grads(fast_fn, ref_fn, a, b, mask, rtol=1e-10, atol=1e-12):
    weight = torch.randn(a.shape, dtype=a.dtype)
    fast = fast_fn(a, b)
    ref = ref_fn(a, b)
    torch.testing.assert_close(fast, ref, rtol=rtol, atol=atol)
    g_fast = torch.autograd.grad((fast * weight).sum(), (a, b))
    g_ref = torch.autograd.grad((ref * weight).sum(), (a, b))
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-11)


# -- the parameter-free layer norm ------------------------------------------------------------


def test_layer_norm0_matches_torch_and_guards_constant_rows():
    x = torch.randn(4, 9, dtype=F64)
    torch.testing.assert_close(layer_norm0(x), torch.nn.functional.layer_norm(x, (9,), eps=0.0))
    const = torch.full((2, 5), 3.0, dtype=F64, requires_grad=True)
    out = layer_norm0(const)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(const.grad).all()
    # eps = 0: exactly invariant to a positive scale
    torch.testing.assert_close(layer_norm0(1e-30 * x), layer_norm0(x))


@pytest.mark.parametrize("dim", [-1, 1])
def test_layer_norm0_equals_its_definition_in_value_and_gradient(dim):
    """The written-out backward against autograd through the definition, with constant rows (whose
    gradient is that of centring), tiny and huge scales and another reduction axis."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 8, generator=g, dtype=F64)
    x[0, 2] = 5.0  # constant rows along the last axis
    x[1, :, 3] = -2.0  # and along axis 1
    x[2] *= 1e-200
    x[1, 4] *= 1e200
    weight = torch.randn(x.shape, generator=g, dtype=F64)
    fast_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast, ref = layer_norm0(fast_in, dim), layer_norm0_reference(ref_in, dim)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    (fast * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(fast_in.grad, ref_in.grad, rtol=1e-9, atol=1e-9)


def test_layer_norm0_gradcheck():
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(layer_norm0, (x,))


@pytest.mark.parametrize("h,dtype", [(2, F64), (7, torch.float32), (1601, torch.float32),
                                     (1700, torch.float32), (4096, F64)])
def test_prefix_log_sum_exp_equals_logcumsumexp(h, dtype):
    """Exact for LN0 outputs at every width, including spiky rows that reach +-sqrt(h - 1) (past
    h = 1,601 float32 inputs are summed in float64, which must not underflow either)."""
    g = torch.Generator().manual_seed(h)
    x = torch.randn(2, 9, h, generator=g, dtype=F64)
    x[0, 3, 0] = 1e6  # a one-hot row: LN0 puts sqrt(h - 1) and -1 / sqrt(h - 1) in it
    x[1, 0, 1] = -1e6  # a row with its most negative entry at the first position
    b_hat = layer_norm0_reference(x).to(dtype)
    assert float(b_hat.abs().max()) > 0.99 * (h - 1) ** 0.5
    ours_in, ref_in = b_hat.clone().requires_grad_(), b_hat.double().requires_grad_()
    ours, ref = _prefix_log_sum_exp(ours_in, h), torch.logcumsumexp(ref_in, dim=1)
    assert ours.dtype == dtype
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
    weight = torch.randn(ours.shape, generator=g, dtype=F64)
    (ours.double() * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(ours_in.grad.double(), ref_in.grad, rtol=tol, atol=tol)


def test_prefix_log_sum_exp_is_finite_before_the_first_real_key():
    """Left padding: the prefixes of padded keys alone stay finite, in value and gradient, and the
    later ones equal logcumsumexp."""
    real = torch.tensor([False, False, True, True, True])[None, :, None]
    b_hat = layer_norm0(torch.randn(1, 5, 4, dtype=F64)).masked_fill(~real, -1.0e4).requires_grad_()
    out = _prefix_log_sum_exp(b_hat, 4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2:], torch.logcumsumexp(b_hat, dim=1)[:, 2:], rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(b_hat.grad).all()


# -- linear ("approx") form ------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_linear_stable_equals_explicit_pairwise_form(causal, padded):
    a, b = pair_inputs()
    mask = ragged_mask(2, 11) if padded else None
    assert_same_with_grads(
        lambda a, b: causal_rn_linear(a, b, mask=mask, causal=causal),
        lambda a, b: causal_rn_linear_reference(a, b, mask=mask, causal=causal),
        a, b, mask,
    )


def test_linear_form_with_an_arbitrary_mask():
    a, b = pair_inputs(B=3, T=9, h=5)
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, 0] = False  # left padding too
    for causal in (True, False):
        fast = causal_rn_linear(a, b, mask=mask, causal=causal)
        ref = causal_rn_linear_reference(a, b, mask=mask, causal=causal)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
        assert torch.equal(fast[~mask], torch.zeros_like(fast[~mask]))


def test_bidirectional_linear_pool_is_the_mean_over_real_tokens():
    a, b = pair_inputs(B=1, T=6, h=5)
    mask = torch.tensor([[True, True, True, True, False, False]])
    out = causal_rn_linear(a, b, mask=mask, causal=False)
    alone = causal_rn_linear(a[:, :4], b[:, :4], causal=False)
    torch.testing.assert_close(out[:, :4], alone)
    # by hand: every real query pools the same four keys
    a_hat, b_hat = layer_norm0(a[0, :4]), layer_norm0(b[0, :4])
    u = torch.exp(a_hat) * torch.exp(b_hat).mean(0)
    torch.testing.assert_close(out[0, :4], layer_norm0(u))


def test_linear_step_equals_forward():
    a, b = pair_inputs(B=2, T=10, h=6)
    full = causal_rn_linear(a, b, causal=True)
    state = causal_rn_linear_init_state(2, 6, dtype=F64)
    outs = []
    for t in range(10):
        y, state = causal_rn_linear_step(a[:, t], b[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)


# -- quadratic ("exact") form ----------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_quadratic_stable_equals_naive(causal, padded):
    a, b = pair_inputs()
    mask = ragged_mask(2, 11) if padded else None
    assert_same_with_grads(
        lambda a, b: causal_rn_quadratic(a, b, mask=mask, causal=causal, chunk_size=4),
        lambda a, b: causal_rn_quadratic_reference(a, b, mask=mask, causal=causal),
        a, b, mask,
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cell", [("exact", "exp"), ("none", "exp"), ("approx", "gelu"), ("exact", "relu"),
                                  ("none", "elu")])
def test_quadratic_float32_matches_float64_reference_with_left_padding_and_holes(causal, cell):
    """The float32 path (pairs scaled for a base-2 power, variances from small products) against the
    float64 reference: left padding (the first real queries of a causal row see no real key before
    themselves only through their own position), a padded key in the middle of a row, and NaN in
    every padded position, which must reach no output and no gradient."""
    B, T, h = 3, 13, 24
    a64, b64 = pair_inputs(B=B, T=T, h=h, scale=2.0, seed=5)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :5] = False  # left padding
    mask[1, 6] = False  # a hole
    mask[2, 9:] = False  # right padding
    clean64 = [torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=F64)).detach().requires_grad_()
               for x in (a64, b64)]
    dirty = [torch.where(mask.unsqueeze(-1), x.detach().float(), torch.tensor(float("nan"))).requires_grad_()
             for x in (a64, b64)]
    prenorm, activation = cell
    fast = causal_rn_quadratic(*dirty, mask=mask, causal=causal, chunk_size=4, prenorm=prenorm, activation=activation)
    ref = causal_rn_quadratic_reference(*clean64, mask=mask, causal=causal, prenorm=prenorm, activation=activation)
    assert torch.isfinite(fast).all()
    assert (fast[~mask] == 0).all()
    torch.testing.assert_close(fast.double(), ref, rtol=2e-5, atol=2e-5)
    w = torch.randn(B, T, h, dtype=F64)
    g_fast = torch.autograd.grad((fast.double() * w).sum(), dirty)
    g_ref = torch.autograd.grad((ref * w).sum(), clean64)
    for gf, gr in zip(g_fast, g_ref):
        assert torch.isfinite(gf).all()
        assert (gf[~mask] == 0).all()
        torch.testing.assert_close(gf.double(), gr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_quadratic_constant_pairs_follow_layer_norm0(causal):
    """b_j = -a_j makes every pair (j, j) the zero vector: LN0 maps it to zeros with its gradient
    passed through unscaled (:func:`layer_norm0`), whatever rounding the variance picks up."""
    a, b = pair_inputs(T=8, h=5, seed=3)
    b = (-a.detach()).clone()
    b[:, 3] = torch.randn(2, 5, dtype=F64)  # and some pairs that are not constant
    b.requires_grad_()
    assert_same_with_grads(
        lambda a, b: causal_rn_quadratic(a, b, causal=causal, chunk_size=3),
        lambda a, b: causal_rn_quadratic_reference(a, b, causal=causal),
        a, b, None,
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 11, 50])
@pytest.mark.parametrize("recompute", [False, True])
def test_quadratic_chunked_equals_unchunked(chunk_size, recompute):
    a, b = pair_inputs(T=11)
    mask = ragged_mask(2, 11)
    whole = causal_rn_quadratic(a, b, mask=mask, chunk_size=11, recompute=False)
    g_whole = torch.autograd.grad(whole.square().sum(), (a, b))
    chunked = causal_rn_quadratic(a, b, mask=mask, chunk_size=chunk_size, recompute=recompute)
    g_chunked = torch.autograd.grad(chunked.square().sum(), (a, b))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-13)
    for gc, gw in zip(g_chunked, g_whole):
        torch.testing.assert_close(gc, gw, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("budget, rows", [(None, None), (2 * 11 * 7 * 8 * 3, 3)])
def test_quadratic_auto_blocks_follow_the_memory_budget(monkeypatch, budget, rows):
    """``chunk_size="auto"`` (the default): blocks of as many queries as the budget allows, the same
    result as one block."""
    import amlp.ops.causal_rn as ops

    a, b = pair_inputs(T=11)
    mask = ragged_mask(2, 11)
    if budget is not None:
        monkeypatch.setattr(ops, "AUTO_BLOCK_BYTES", budget)
    assert ops.auto_block_rows(2, 11, a.shape[-1], 8) == (rows or ops.AUTO_BLOCK_BYTES // (2 * 11 * a.shape[-1] * 8))
    whole = causal_rn_quadratic(a, b, mask=mask, chunk_size=11, recompute=False)
    seen = []
    real = ops._pair_pool_block
    monkeypatch.setattr(ops, "_pair_pool_block", lambda a_block, *rest: seen.append(a_block.shape[1]) or real(a_block, *rest))
    auto = causal_rn_quadratic(a, b, mask=mask)
    torch.testing.assert_close(auto, whole, rtol=1e-12, atol=1e-13)
    assert seen == ([3, 3, 3, 2] if rows else [11])
    with pytest.raises(ValueError, match="'auto'"):
        causal_rn_quadratic(a, b, chunk_size="fast")


def test_quadratic_never_builds_the_full_pair_tensor(monkeypatch):
    import amlp.ops.causal_rn as ops

    seen = []
    original = ops._pair_pool_block

    def spy(a_block, b_all, *rest):
        seen.append((a_block.shape[1], b_all.shape[1]))
        return original(a_block, b_all, *rest)

    monkeypatch.setattr(ops, "_pair_pool_block", spy)
    a, b = pair_inputs(B=1, T=10, h=3)
    ops.causal_rn_quadratic(a, b, chunk_size=4)
    assert seen == [(4, 4), (4, 8), (2, 10)]  # causal blocks meet only the keys they may see


def test_exact_prenorm_differs_from_approx():
    a, b = pair_inputs(T=9, h=6)
    exact = causal_rn_quadratic(a, b)
    approx = causal_rn_linear(a, b)
    # the first position pools a single pair; afterwards the two normalisations disagree
    assert (exact[:, 1:] - approx[:, 1:]).abs().max() > 0.05


# -- the mixers ------------------------------------------------------------------------------


def build(name, causal=True, **kw):
    torch.manual_seed(0)
    kw.setdefault("hidden", 10)
    return amlp.build_mixer(name, dim=8, heads=1, causal=causal, **kw).double()


@pytest.mark.parametrize("name", ["causal-rn", "causal-rn-quadratic"])
def test_heads_is_ignored_one_head(name):
    one = build(name)
    torch.manual_seed(0)
    four = amlp.build_mixer(name, dim=8, heads=4, causal=True, hidden=10).double()
    assert four.heads == 1 and one.heads == 1
    x = torch.randn(2, 7, 8, dtype=F64)
    torch.testing.assert_close(four(x), one(x))


@pytest.mark.parametrize("name", ["causal-rn", "causal-rn-quadratic"])
def test_future_inputs_have_zero_jacobian(name):
    m = build(name)
    T = 7
    x = torch.randn(1, T, 8, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda inp: m(inp), x)  # [1, T, E, 1, T, E]
    per_pair = jac[0, :, :, 0].abs().sum(dim=(1, 3))  # [t_out, t_in]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    assert torch.equal(per_pair[future], torch.zeros_like(per_pair[future]))
    assert (per_pair[~future] > 0).all()


@pytest.mark.parametrize("name", ["causal-rn", "causal-rn-quadratic"])
def test_mixer_step_equals_forward_in_float32(name):
    m = build(name).float()
    x = torch.randn(3, 12, 8)
    full = m(x)
    state = m.init_state(3)
    outs = []
    for t in range(12):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-5, atol=1e-6)
    assert m.state_size(12) == (10 if name == "causal-rn" else 120)


@pytest.mark.parametrize("name", ["causal-rn", "causal-rn-quadratic"])
def test_hidden_ratio_sets_the_relation_width_from_the_model_width(name):
    m = amlp.build_mixer(name, dim=8, heads=1, causal=True, hidden_ratio=4)
    assert m.hidden == 32 and m.in_query.out_features == m.in_key.out_features == m.out_proj.in_features == 32
    assert amlp.build_mixer(name, dim=10, heads=1, hidden_ratio=1.5).hidden == 15
    assert amlp.build_mixer(name, dim=8, heads=1).hidden == 8  # the default: h = E
    with pytest.raises(ValueError, match="hidden .* or hidden_ratio .*, not both"):
        amlp.build_mixer(name, dim=8, heads=1, hidden=16, hidden_ratio=2)
    for bad in (0, -1.0, "4", True):
        with pytest.raises(ValueError, match="hidden_ratio must be a number > 0"):
            amlp.build_mixer(name, dim=8, heads=1, hidden_ratio=bad)
    with pytest.raises(ValueError, match="hidden must be an int >= 2"):
        amlp.build_mixer(name, dim=8, heads=1, hidden_ratio=0.1)  # round(0.8) = 1 feature


@pytest.mark.parametrize("name", ["causal-rn", "causal-rn-quadratic"])
def test_mixer_errors(name):
    with pytest.raises(ValueError, match="hidden"):
        amlp.build_mixer(name, dim=8, heads=1, hidden=0)
    m = build(name, causal=False)
    with pytest.raises(ValueError, match="causal=True"):
        m.init_state(2)
    c = build(name)
    with pytest.raises(ValueError, match="x_t must be shaped"):
        c.step(torch.randn(2, 9, dtype=F64), c.init_state(2, dtype=F64))
    if name == "causal-rn-quadratic":
        with pytest.raises(ValueError, match="chunk_size"):
            amlp.build_mixer(name, dim=8, heads=1, chunk_size=0)


def test_op_errors():
    a = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="b must be shaped"):
        causal_rn_linear(a, torch.randn(2, 5))
    with pytest.raises(ValueError, match="same shape"):
        causal_rn_quadratic(a, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="mask"):
        causal_rn_linear(a, a, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        causal_rn_quadratic(a, a, chunk_size=0)


# -- stability -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_linear_mixer_is_finite_at_65536_tokens_with_large_inputs(dtype, causal):
    torch.manual_seed(0)
    m = amlp.build_mixer("causal-rn", dim=4, heads=1, causal=causal, hidden=4, init_std=1.0).to(dtype)
    x = (50 * torch.randn(1, 65536, 4)).to(dtype).requires_grad_()
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_op_is_finite_at_65536_tokens_with_large_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    a = (50 * torch.randn(1, 65536, 6, generator=g)).to(dtype).requires_grad_()
    b = (50 * torch.randn(1, 65536, 6, generator=g)).to(dtype).requires_grad_()
    for causal in (True, False):
        out = causal_rn_linear(a, b, causal=causal)
        assert torch.isfinite(out.float()).all()
        ga, gb = torch.autograd.grad(out.float().square().mean(), (a, b))
        assert torch.isfinite(ga.float()).all() and torch.isfinite(gb.float()).all()


def spike_inputs(h, T, dtype):
    """Every a_i and b_j a one-hot spike: LN0 maps it to a feature of sqrt(h - 1), so the naive
    exp(a^ + b^) = exp(2 sqrt(h - 1)) overflows float32 for h = 4096."""
    a = torch.zeros(1, T, h, dtype=dtype)
    a[..., 0] = 1.0
    b = a.clone()
    b[0, ::2, 0] = 0.0
    b[0, ::2, 1] = 1.0
    return a.requires_grad_(), b.requires_grad_()


def assert_finite_and_close_to_float64(fast_fn, ref_fn, inputs32, inputs64, grad_atol):
    """``fast_fn`` in float32 is finite and matches ``ref_fn`` in float64, in value and gradient
    (``grad_atol`` None: 1e-5 of the largest reference gradient)."""
    stable = fast_fn(*inputs32)
    assert torch.isfinite(stable).all()
    ref64 = ref_fn(*inputs64)
    torch.testing.assert_close(stable.double(), ref64, rtol=1e-4, atol=1e-4)
    w = torch.randn(ref64.shape, dtype=F64)
    g32 = torch.autograd.grad((stable.double() * w).sum(), inputs32)
    g64 = torch.autograd.grad((ref64 * w).sum(), inputs64)
    for x32, x64 in zip(g32, g64):
        assert torch.isfinite(x32).all()
        atol = 1e-5 * float(x64.abs().max()) if grad_atol is None else grad_atol
        torch.testing.assert_close(x32.double(), x64, rtol=1e-3, atol=atol)


def test_stable_forms_survive_where_the_naive_exp_overflows():
    h, T = 4096, 5
    a32, b32 = spike_inputs(h, T, torch.float32)
    naive = causal_rn_linear_reference(a32, b32)
    assert not torch.isfinite(naive).all()  # the reference overflows ...
    a64, b64 = spike_inputs(h, T, F64)
    for fast_fn, ref_fn in ((causal_rn_linear, causal_rn_linear_reference),
                            (causal_rn_quadratic, causal_rn_quadratic_reference)):
        # ... the stable form does not, and agrees with float64
        assert_finite_and_close_to_float64(fast_fn, ref_fn, (a32, b32), (a64, b64), grad_atol=1e-3)


def test_quadratic_survives_terms_that_underflow_float32():
    """Negative spikes: LN0(a_i + b_j) puts -sqrt(h - 1) = -64 on feature 0 of every pair, so every
    term of that feature's sum, exp(-64) shifted by the bound 64, rounds to 0 in float32. The pool is
    still finite and agrees with float64, in value and gradient."""
    h, T = 4096, 5
    a32, b32 = (-x.detach() for x in spike_inputs(h, T, torch.float32))
    a32.requires_grad_(), b32.requires_grad_()
    a64, b64 = (x.detach().double().requires_grad_() for x in (a32, b32))
    # float32 rounding of pairs of size ~64 against gradients of size ~10^4: a relative tolerance
    assert_finite_and_close_to_float64(causal_rn_quadratic, causal_rn_quadratic_reference, (a32, b32), (a64, b64),
                                       grad_atol=None)


def test_quadratic_is_finite_with_large_inputs_in_bfloat16():
    g = torch.Generator().manual_seed(2)
    a = (50 * torch.randn(2, 40, 8, generator=g)).bfloat16().requires_grad_()
    b = (50 * torch.randn(2, 40, 8, generator=g)).bfloat16().requires_grad_()
    out = causal_rn_quadratic(a, b, chunk_size=16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    ga, gb = torch.autograd.grad(out.float().sum(), (a, b))
    assert torch.isfinite(ga.float()).all() and torch.isfinite(gb.float()).all()


# -- the block -------------------------------------------------------------------------------


@pytest.mark.parametrize("quadratic", [False, True])
def test_block_adds_the_residual_and_steps(quadratic):
    torch.manual_seed(0)
    block = CausalRNBlock(8, 12, quadratic=quadratic).double()
    name = "causal-rn-quadratic" if quadratic else "causal-rn"
    assert block.mixer.mixer_name == name and block.mixer.causal and block.mixer.hidden == 12
    x = torch.randn(2, 9, 8, dtype=F64)
    mask = ragged_mask(2, 9)
    torch.testing.assert_close(block(x, x_mask=mask), x + block.mixer(x, x_mask=mask))
    full = block(x)
    state = block.init_state(2, dtype=F64)
    outs = []
    for t in range(9):
        y, state = block.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-9, atol=1e-11)
    n_params = sum(p.numel() for p in block.parameters())
    assert n_params == 3 * 8 * 12 + 12 + 8  # 3 E h + h + E, as in the CausalRN code's block
