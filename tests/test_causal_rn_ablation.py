"""The CausalRN ablation grid on the quadratic mixer (CausalRN paper; the authors' ``block_r_ablation.py``):
pre-norm {exact, approx, none} x activation {exp, relu, gelu, elu}, each cell against a plain pairwise
reference, step against forward, causality, and non-finite values in padded or future positions."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import amlp
from amlp.layers.check import check_mixer
from amlp.models import CausalRNBlock
from amlp.ops.causal_rn import (
    ACTIVATIONS,
    PRENORMS,
    causal_rn_linear,
    causal_rn_quadratic,
    causal_rn_quadratic_reference,
    causal_rn_quadratic_step,
    layer_norm0,
)

F64 = torch.float64
CELLS = list(itertools.product(PRENORMS, ACTIVATIONS))
CELL_IDS = [f"{p}-{a}" for p, a in CELLS]


def pair_inputs(B=2, T=11, h=7, scale=1.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    a = (scale * torch.randn(B, T, h, generator=g, dtype=F64)).to(dtype).requires_grad_()
    b = (scale * torch.randn(B, T, h, generator=g, dtype=F64)).to(dtype).requires_grad_()
    return a, b


def ragged_mask(B, T, n_pad=4):
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, T - n_pad:] = False
    return mask


def by_hand(a, b, mask, causal, prenorm, activation):
    """The definition, one query and one key at a time: LN0 of the mean of act(N_pre(a_i, b_j))
    over the keys query i may see (written independently of the ops)."""
    act = {"exp": torch.exp, "relu": F.relu, "gelu": F.gelu, "elu": F.elu}[activation]
    B, T, h = a.shape
    out = torch.zeros(B, T, h, dtype=a.dtype)
    for n in range(B):
        for i in range(T):
            if mask is not None and not mask[n, i]:
                continue
            terms = []
            for j in range(T):
                if (causal and j > i) or (mask is not None and not mask[n, j]):
                    continue
                if prenorm == "exact":
                    p = layer_norm0(a[n, i] + b[n, j])
                elif prenorm == "approx":
                    p = layer_norm0(a[n, i]) + layer_norm0(b[n, j])
                else:
                    p = a[n, i] + b[n, j]
                terms.append(act(p))
            out[n, i] = layer_norm0(torch.stack(terms).mean(0))
    return out


# -- the op against the plain references ------------------------------------------------------------


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
def test_reference_is_the_definition(prenorm, activation):
    a, b = pair_inputs(B=2, T=6, h=5)
    mask = ragged_mask(2, 6, n_pad=2)
    for causal in (True, False):
        ref = causal_rn_quadratic_reference(a, b, mask=mask, causal=causal, prenorm=prenorm, activation=activation)
        torch.testing.assert_close(ref, by_hand(a, b, mask, causal, prenorm, activation), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_op_equals_plain_reference_with_gradients(prenorm, activation, causal, padded):
    a, b = pair_inputs()
    mask = ragged_mask(2, 11) if padded else None
    opts = dict(mask=mask, causal=causal, prenorm=prenorm, activation=activation)
    fast = causal_rn_quadratic(a, b, chunk_size=4, **opts)
    ref = causal_rn_quadratic_reference(a, b, **opts)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(a.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    g_fast = torch.autograd.grad((fast * w).sum(), (a, b))
    g_ref = torch.autograd.grad((ref * w).sum(), (a, b))
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-11)
    if padded:
        assert torch.equal(fast[~mask], torch.zeros_like(fast[~mask]))


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
def test_chunk_size_and_recompute_do_not_change_the_result(prenorm, activation):
    a, b = pair_inputs(T=10, h=5)
    mask = ragged_mask(2, 10, n_pad=3)
    opts = dict(mask=mask, prenorm=prenorm, activation=activation)
    whole = causal_rn_quadratic(a, b, chunk_size=10, recompute=False, **opts)
    g_whole = torch.autograd.grad(whole.square().sum(), (a, b))
    for chunk_size, recompute in ((1, True), (3, False), (50, True)):
        part = causal_rn_quadratic(a, b, chunk_size=chunk_size, recompute=recompute, **opts)
        torch.testing.assert_close(part, whole, rtol=1e-12, atol=1e-13)
        for gp, gw in zip(torch.autograd.grad(part.square().sum(), (a, b)), g_whole):
            torch.testing.assert_close(gp, gw, rtol=1e-11, atol=1e-12)


def test_default_cell_is_unchanged_and_approx_exp_is_the_linear_form():
    a, b = pair_inputs()
    mask = ragged_mask(2, 11)
    for causal in (True, False):
        default = causal_rn_quadratic(a, b, mask=mask, causal=causal)
        explicit = causal_rn_quadratic(a, b, mask=mask, causal=causal, prenorm="exact", activation="exp")
        assert torch.equal(default, explicit)
        # the separable pre-norm with exp, computed pair by pair, is the linear-time causal-rn
        approx = causal_rn_quadratic(a, b, mask=mask, causal=causal, prenorm="approx", activation="exp")
        torch.testing.assert_close(approx, causal_rn_linear(a, b, mask=mask, causal=causal), rtol=1e-10, atol=1e-12)


def test_the_cells_compute_different_functions():
    a, b = pair_inputs(T=9, h=6)
    outs = {cell: causal_rn_quadratic(a, b, prenorm=cell[0], activation=cell[1]) for cell in CELLS}
    for c1, c2 in itertools.combinations(CELLS, 2):
        # the first position pools a single pair; after it every two cells disagree
        assert (outs[c1][:, 1:] - outs[c2][:, 1:]).abs().max() > 1e-3, (c1, c2)


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
def test_op_step_equals_forward(prenorm, activation):
    a, b = pair_inputs(T=8, h=5)
    full = causal_rn_quadratic(a, b, prenorm=prenorm, activation=activation)
    steps = [causal_rn_quadratic_step(a[:, t], b[:, :t + 1], prenorm=prenorm, activation=activation)
             for t in range(8)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-10, atol=1e-12)


# -- masking by selection: nothing in a padded or future slot reaches a real output ------------------


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_padding_reaches_no_real_output_or_gradient(prenorm, activation, poison):
    a, b = pair_inputs(T=9, h=5)
    mask = ragged_mask(2, 9, n_pad=3)
    a_bad, b_bad = a.detach().clone(), b.detach().clone()
    a_bad[~mask], b_bad[~mask] = poison, poison
    a_bad.requires_grad_(), b_bad.requires_grad_()
    for causal in (True, False):
        opts = dict(mask=mask, causal=causal, prenorm=prenorm, activation=activation, chunk_size=4)
        clean = causal_rn_quadratic(a, b, **opts)
        dirty = causal_rn_quadratic(a_bad, b_bad, **opts)
        assert torch.isfinite(dirty).all() and torch.equal(dirty[~mask], torch.zeros_like(dirty[~mask]))
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
        w = torch.randn(clean.shape, dtype=F64)
        g_clean = torch.autograd.grad((clean * w).sum(), (a, b))
        g_dirty = torch.autograd.grad((dirty * w).sum(), (a_bad, b_bad))
        for gd, gc in zip(g_dirty, g_clean):
            assert torch.isfinite(gd[mask]).all()
            torch.testing.assert_close(gd[mask], gc[mask], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_future_key_reaches_no_earlier_output(prenorm, activation, poison):
    a, b = pair_inputs(T=9, h=5)
    t = 5
    b_bad = b.detach().clone()
    b_bad[:, t] = poison
    b_bad.requires_grad_()
    opts = dict(prenorm=prenorm, activation=activation, chunk_size=4)  # t shares a block with earlier queries
    clean = causal_rn_quadratic(a, b, **opts)
    dirty = causal_rn_quadratic(a, b_bad, **opts)
    assert torch.isfinite(dirty[:, :t]).all()
    torch.testing.assert_close(dirty[:, :t], clean[:, :t], rtol=0, atol=0)
    # (gradients: the op cannot know which later queries are bad; the mixer selects non-finite
    # tokens out before mixing, see test_mixer_poisoned_padding_and_future)


@pytest.mark.parametrize("activation", ["elu", "gelu"])
def test_no_count_of_the_future_leaks_into_the_pool(activation):
    # filling future pairs with -inf before the activation would add ELU(-inf) = -1 per future key,
    # or GELU(-inf) = NaN; a prefix must give the same outputs as the whole sequence
    a, b = pair_inputs(B=1, T=12, h=6)
    for prenorm in PRENORMS:
        full = causal_rn_quadratic(a, b, prenorm=prenorm, activation=activation, chunk_size=12)
        for t in (1, 4, 7):
            head = causal_rn_quadratic(a[:, :t], b[:, :t], prenorm=prenorm, activation=activation)
            torch.testing.assert_close(full[:, :t], head, rtol=1e-12, atol=1e-13)


# -- stability ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prenorm", PRENORMS)
def test_exp_cells_are_finite_where_the_naive_exp_overflows(prenorm):
    # without the exact pre-norm the pre-activation grows with the inputs: a_i + b_j reaches
    # hundreds at scale 60, far beyond the float32 exp range
    a64, b64 = pair_inputs(B=1, T=12, h=6, scale=60.0)
    a32, b32 = (t.detach().float().requires_grad_() for t in (a64, b64))
    out = causal_rn_quadratic(a32, b32, prenorm=prenorm, activation="exp", chunk_size=5)
    assert torch.isfinite(out).all()
    ref = causal_rn_quadratic_reference(a64, b64, prenorm=prenorm, activation="exp")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    if prenorm == "none":
        assert not torch.isfinite(causal_rn_quadratic_reference(a32, b32, prenorm=prenorm)).all()
    ga, gb = torch.autograd.grad(out.sum(), (a32, b32))
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
def test_bfloat16_in_bfloat16_out(prenorm, activation):
    a, b = pair_inputs(B=2, T=10, h=6, dtype=torch.bfloat16, scale=20.0)
    out = causal_rn_quadratic(a, b, prenorm=prenorm, activation=activation, mask=ragged_mask(2, 10, 2))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bad_cells_are_value_errors():
    a, b = pair_inputs(T=4, h=3)
    with pytest.raises(ValueError, match="prenorm must be one of 'exact', 'approx', 'none'"):
        causal_rn_quadratic(a, b, prenorm="no")
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_rn_quadratic(a, b, activation="silu")
    with pytest.raises(ValueError, match="activation"):
        causal_rn_quadratic_step(a[:, 0], b, activation="tanh")
    with pytest.raises(ValueError, match="prenorm"):
        causal_rn_quadratic_reference(a, b, prenorm=None)
    with pytest.raises(ValueError, match="prenorm"):
        amlp.build_mixer("causal-rn-quadratic", dim=8, heads=1, prenorm="separate")
    with pytest.raises(ValueError, match="activation"):
        amlp.build_mixer("causal-rn-quadratic", dim=8, heads=1, causal=True, activation="softmax")


# -- the mixer ----------------------------------------------------------------------------------------


def build(prenorm, activation, causal=True):
    torch.manual_seed(0)
    return amlp.build_mixer("causal-rn-quadratic", dim=8, heads=1, causal=causal, hidden=10, chunk_size=3,
                            prenorm=prenorm, activation=activation).double()


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
def test_registry_gate_passes_for_every_cell(prenorm, activation):
    res = check_mixer("causal-rn-quadratic", dim=12, heads=1, length=9, prenorm=prenorm, activation=activation)
    assert res.passed, res.message


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
def test_mixer_step_equals_forward_and_future_has_zero_jacobian(prenorm, activation):
    m = build(prenorm, activation)
    assert (m.prenorm, m.activation) == (prenorm, activation)
    T = 7
    x = torch.randn(2, T, 8, dtype=F64)
    full = m(x)
    state = m.init_state(2, dtype=F64)
    outs = []
    for t in range(T):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda inp: m(inp), x[:1])  # [1, T, E, 1, T, E]
    per_pair = jac[0, :, :, 0].abs().sum(dim=(1, 3))  # [t_out, t_in]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    assert torch.equal(per_pair[future], torch.zeros_like(per_pair[future]))
    assert (per_pair.diagonal() > 0).all()


def _grads(m, y, x, keep):
    w = torch.randn(y[keep].shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((y[keep] * w).sum(), [x] + list(m.parameters()))


@pytest.mark.parametrize("prenorm, activation", CELLS, ids=CELL_IDS)
def test_mixer_poisoned_padding_and_future(prenorm, activation):
    m = build(prenorm, activation)
    T, t = 9, 4
    x = torch.randn(2, T, 8, dtype=F64)
    mask = ragged_mask(2, T, n_pad=3)
    for keep, poison, x_mask in ((mask, ~mask, mask), (torch.arange(T).expand(2, T) < t, (slice(None), t), None)):
        bad = x.clone()
        bad[poison] = float("nan")
        clean, bad = x.clone().requires_grad_(), bad.requires_grad_()
        y_clean, y_bad = m(clean, x_mask=x_mask), m(bad, x_mask=x_mask)
        assert torch.isfinite(y_bad[keep]).all()
        torch.testing.assert_close(y_bad[keep], y_clean[keep], rtol=1e-12, atol=1e-13)
        g_clean, g_bad = _grads(m, y_clean, clean, keep), _grads(m, y_bad, bad, keep)
        assert torch.isfinite(g_bad[0][keep]).all()
        torch.testing.assert_close(g_bad[0][keep], g_clean[0][keep], rtol=1e-10, atol=1e-12)
        for gb, gc in zip(g_bad[1:], g_clean[1:]):
            assert torch.isfinite(gb).all()
            torch.testing.assert_close(gb, gc, rtol=1e-10, atol=1e-12)
    assert torch.isnan(y_bad[:, t:]).all()  # the outputs a bad token reaches say so


def test_block_passes_the_cell_on_and_steps():
    torch.manual_seed(0)
    block = CausalRNBlock(8, 12, quadratic=True, prenorm="none", activation="gelu").double()
    assert block.mixer.prenorm == "none" and block.mixer.activation == "gelu"
    assert "prenorm=none, activation=gelu" in repr(block.mixer)
    assert "prenorm" not in repr(CausalRNBlock(8, 12, quadratic=True).mixer)
    x = torch.randn(2, 6, 8, dtype=F64)
    full = block(x)
    state = block.init_state(2, dtype=F64)
    outs = []
    for t in range(6):
        y, state = block.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)
    # every cell has the parameters of the default block
    assert sum(p.numel() for p in block.parameters()) == 3 * 8 * 12 + 12 + 8
