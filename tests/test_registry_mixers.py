"""The registry-wide suite: every registered mixer goes through the same checks, driven by its
capability record."""

import pytest
import torch

import amlp
from amlp.layers import get_mixer_info
from amlp.layers.check import check_mixer, randomise_affine_parameters

from conftest import ALL_MIXERS, chosen, default_causal

DIM, HEADS = 24, 3


def build(name, **kw):
    """The mixer in float64, with random biases and norm parameters (so that padded tokens project
    to nonzero queries, keys and values, as in a trained model)."""
    kw.setdefault("causal", default_causal(name))
    m = amlp.build_mixer(name, dim=DIM, heads=HEADS, **{**chosen(name), **kw}).double().eval()
    return randomise_affine_parameters(m, torch.Generator().manual_seed(1))


def caps(name):
    return get_mixer_info(name).capabilities


def test_at_least_the_foundation_is_registered():
    assert {"softmax", "amlp-cov", "amlp-pquery"} <= set(ALL_MIXERS)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_shape_dtype_and_backward(name):
    m = build(name)
    x = torch.randn(2, 11, DIM, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_single_token(name):
    m = build(name)
    y = m(torch.randn(3, 1, DIM, dtype=torch.float64))
    assert y.shape == (3, 1, DIM) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_fast_path_equals_reference(name):
    res = check_mixer(name, dim=DIM, heads=HEADS)
    assert res.passed, res.message


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_half_precision_returns_input_dtype(name):
    m = amlp.build_mixer(name, dim=DIM, heads=HEADS, causal=default_causal(name), **chosen(name)).eval()
    m = m.to(torch.bfloat16)
    x = torch.randn(2, 9, DIM).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_cross_mixing_or_refusal(name):
    if caps(name).cross:
        m = build(name, cross=True)
        x = torch.randn(2, 7, DIM, dtype=torch.float64, requires_grad=True)
        ctx = torch.randn(2, 12, DIM, dtype=torch.float64, requires_grad=True)
        y = m(x, ctx)
        assert y.shape == x.shape and torch.isfinite(y).all()
        # against the reference, with a padded context (and a padded query row) ...
        x_mask, ctx_mask = torch.ones(2, 7, dtype=torch.bool), torch.ones(2, 12, dtype=torch.bool)
        x_mask[1, 5:], ctx_mask[0, 8:] = False, False
        fast = m(x, ctx, x_mask=x_mask, context_mask=ctx_mask)
        ref = m.reference(x, ctx, x_mask=x_mask, context_mask=ctx_mask)
        torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-10)
        probe = torch.randn_like(fast)
        for a, b in zip(torch.autograd.grad((fast * probe).sum(), (x, ctx)),
                        torch.autograd.grad((ref * probe).sum(), (x, ctx))):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
        # ... whose padded rows (NaN) reach no real output, and the context is not the queries
        junk = ctx.detach().clone()
        junk[0, 8:] = float("nan")
        torch.testing.assert_close(m(x, junk, x_mask=x_mask, context_mask=ctx_mask)[x_mask], fast[x_mask])
        assert not torch.allclose(m(x, x.detach())[x_mask], m(x, ctx)[x_mask])
    else:
        with pytest.raises(ValueError, match=rf"{name}.*cross"):
            amlp.build_mixer(name, dim=DIM, heads=HEADS, cross=True, causal=default_causal(name), **chosen(name))
        m = build(name)
        with pytest.raises(ValueError, match="cross"):
            m(torch.randn(2, 7, DIM, dtype=torch.float64), torch.randn(2, 5, DIM, dtype=torch.float64))


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_causal_refusal(name):
    if not caps(name).causal:
        with pytest.raises(ValueError, match=rf"{name}.*causal"):
            amlp.build_mixer(name, dim=DIM, heads=HEADS, causal=True, **chosen(name))


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_right_padding_does_not_change_real_outputs(name):
    if not caps(name).padding:
        pytest.skip("mixer takes no padding masks")
    m = build(name)
    T, n_real = 12, 8
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, n_real:] = False
    y = m(x, x_mask=mask)
    alone = m(x[1:, :n_real])
    torch.testing.assert_close(y[1, :n_real], alone[0], rtol=1e-7, atol=1e-9)
    junk = x.clone()
    junk[1, n_real:] = 100 * torch.randn(T - n_real, DIM, dtype=torch.float64)
    torch.testing.assert_close(m(junk, x_mask=mask)[1, :n_real], y[1, :n_real], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_causal_form_ignores_the_future(name):
    if not caps(name).causal:
        pytest.skip("no causal form")
    m = build(name, causal=True)
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, DIM, dtype=torch.float64)
    torch.testing.assert_close(m(x)[:, :6], m(x2)[:, :6], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_step_equals_forward(name):
    if not caps(name).recurrent:
        pytest.skip("no recurrent step")
    m = build(name, causal=True)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    full = m(x)
    state = m.init_state(2, dtype=torch.float64)
    outs = []
    for t in range(x.shape[1]):
        y_t, state = m.step(x[:, t], state)
        outs.append(y_t)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_bad_inputs_raise_value_error(name):
    m = build(name)
    with pytest.raises(ValueError, match="x must be shaped"):
        m(torch.randn(2, 5, DIM + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be shaped"):
        m(torch.randn(5, DIM, dtype=torch.float64))
    if caps(name).padding:
        x = torch.randn(2, 5, DIM, dtype=torch.float64)
        with pytest.raises(ValueError, match="x_mask"):
            m(x, x_mask=torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="x_mask"):
            m(x, x_mask=torch.ones(2, 5))


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_maximum_length_is_enforced(name):
    m = build(name)
    limit = m.max_length
    if limit is None:
        pytest.skip("no maximum length")
    with pytest.raises(ValueError, match="maximum length"):
        m(torch.randn(1, limit + 1, DIM, dtype=torch.float64))


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        amlp.build_mixer("softmax", dim=10, heads=3)


def test_unknown_mixer_lists_the_names():
    with pytest.raises(ValueError, match="amlp-cov"):
        amlp.build_mixer("nope", dim=8, heads=2)


def test_softmax_attention_dropout_acts_in_training_only():
    torch.manual_seed(0)
    m = amlp.build_mixer("softmax", dim=16, heads=2, attn_dropout=0.5)
    x = torch.randn(2, 9, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    torch.testing.assert_close(m(x), m.reference(x))
    m.train()
    assert not torch.allclose(m(x), m(x))
    with pytest.raises(ValueError, match="attn_dropout"):
        amlp.build_mixer("softmax", dim=16, heads=2, attn_dropout=1.0)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_step_refuses_a_missing_or_mismatched_state(name):
    if not caps(name).recurrent:
        pytest.skip("no recurrent step")
    m = build(name, causal=True)
    x_t = torch.randn(2, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="state is None"):
        m.step(x_t, None)
    with pytest.raises(ValueError, match=r"made for batch size 3, but x_t has batch size 2"):
        m.step(x_t, m.init_state(3, dtype=torch.float64))
    for bad in (-1, 0, True, 2.0):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            m.init_state(bad)
    with pytest.raises(ValueError, match="x_t must be shaped"):
        m.step(torch.randn(2, DIM + 1, dtype=torch.float64), m.init_state(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="x_t has dtype torch.float32 but the mixer's parameters are torch.float64"):
        m.step(x_t.float(), m.init_state(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_an_input_of_another_dtype_is_a_clear_error(name):
    m = amlp.build_mixer(name, dim=DIM, heads=HEADS, causal=default_causal(name), **chosen(name))  # float32
    with pytest.raises(ValueError, match="x has dtype torch.float64 but the mixer's parameters are torch.float32"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast a mismatch is expected
        assert m(torch.randn(2, 5, DIM, dtype=torch.float64).float()).shape == (2, 5, DIM)


@pytest.mark.parametrize("name,option", [("amlp-cov", "landmarks"), ("amlp-pquery", "landmarks"),
                                         ("nystrom", "landmarks"), ("abc", "landmarks"), ("lara", "landmarks"),
                                         ("performer", "approx_attn_dim"), ("linformer", "proj_len")])
def test_a_boolean_is_not_a_size(name, option):
    with pytest.raises(ValueError, match=option):
        amlp.build_mixer(name, dim=DIM, heads=HEADS, **{**chosen(name), option: True})


def test_an_unknown_option_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"mixer 'linformer' takes no option\(s\) 'k'; its options: bias, dropout"):
        amlp.build_mixer("linformer", dim=DIM, heads=HEADS, k=8)
    with pytest.raises(ValueError, match="'landmark'"):
        amlp.build_mixer("amlp-cov", dim=DIM, heads=HEADS, form="paper", landmark=8)


# --- NaN poisoning: padding and the future are selected out, never multiplied by zero ---------------
POISONS = (float("nan"), float("inf"))


def _clean_and_poisoned(x, where, poison):
    """Two leaf copies of ``x``: as it is, and with ``x[where]`` set to ``poison``."""
    bad = x.clone()
    bad[where] = poison
    return x.clone().requires_grad_(True), bad.requires_grad_(True)


def _same_finite_gradients(m, y_bad, y_clean, bad, clean, keep):
    """The gradients of ``y_bad[keep]`` (input at ``keep`` and every parameter) are finite and equal
    those of the clean run."""
    grad = torch.randn_like(y_clean[keep])
    params = [p for p in m.parameters() if p.requires_grad]
    g_clean = torch.autograd.grad(y_clean[keep], [clean] + params, grad, allow_unused=True)
    g_bad = torch.autograd.grad(y_bad[keep], [bad] + params, grad, allow_unused=True)
    assert torch.isfinite(g_bad[0][keep]).all()
    torch.testing.assert_close(g_bad[0][keep], g_clean[0][keep], rtol=1e-8, atol=1e-10)
    for (pname, _), a, b in zip(m.named_parameters(), g_bad[1:], g_clean[1:]):
        if a is not None:
            assert torch.isfinite(a).all(), pname
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=pname)


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf"])
@pytest.mark.parametrize("name", ALL_MIXERS)
def test_poisoned_padding_reaches_no_real_output_or_gradient(name, poison):
    if not caps(name).padding:
        pytest.skip("mixer takes no padding masks")
    torch.manual_seed(0)
    m = build(name)
    T, n_real = 12, 8
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, n_real:] = False
    clean, bad = _clean_and_poisoned(x, (1, slice(n_real, None)), poison)
    y_clean, y_bad = m(clean, x_mask=mask), m(bad, x_mask=mask)
    real = mask
    assert torch.isfinite(y_bad[real]).all()
    torch.testing.assert_close(y_bad[real], y_clean[real], rtol=1e-9, atol=1e-10)
    _same_finite_gradients(m, y_bad, y_clean, bad, clean, real)


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf"])
@pytest.mark.parametrize("name", ALL_MIXERS)
def test_a_poisoned_future_reaches_no_past_output_or_gradient(name, poison):
    if not caps(name).causal:
        pytest.skip("no causal form")
    torch.manual_seed(0)
    m = build(name, causal=True)
    T, t = 10, 5
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    clean, bad = _clean_and_poisoned(x, (slice(None), t), poison)
    y_clean, y_bad = m(clean), m(bad)
    assert torch.isfinite(y_bad[:, :t]).all()
    torch.testing.assert_close(y_bad[:, :t], y_clean[:, :t], rtol=1e-9, atol=1e-10)
    # the outputs the bad token can reach are NaN, not a finite value computed without it
    reach = T if name != "local" else min(T, t + m.wsize)
    assert torch.isnan(y_bad[:, t:reach]).all() and torch.isfinite(y_bad[:, reach:]).all()
    past = torch.zeros(2, T, dtype=torch.bool)
    past[:, :t] = True
    _same_finite_gradients(m, y_bad, y_clean, bad, clean, past)
    if caps(name).recurrent:  # the step sees only the clean past, and agrees with the poisoned forward
        state = m.init_state(2, dtype=torch.float64)
        for i in range(t):
            y_i, state = m.step(x[:, i], state)
            torch.testing.assert_close(y_i, y_bad[:, i].detach(), rtol=1e-7, atol=1e-9)


# --- the correctness gate fails on what it is there to catch -----------------------------------------
def _patched_gate(monkeypatch, change):
    from amlp.layers.softmax import SoftmaxAttention

    original = SoftmaxAttention.mix_heads

    def broken(self, q, k, v, q_mask, kv_mask):
        return change(self, original(self, q, k, v, q_mask, kv_mask), q_mask)

    monkeypatch.setattr(SoftmaxAttention, "mix_heads", broken)
    return check_mixer("softmax")


def test_gate_catches_a_leak_into_padded_outputs(monkeypatch):
    res = _patched_gate(monkeypatch, lambda self, out, m: out + (0.0 if m is None else (~m)[:, :, None, None] * 0.1))
    assert not res.passed and res.message.startswith("non-causal:")


def test_gate_catches_a_wrong_parameter_gradient(monkeypatch):
    def change(self, out, m):  # the same value, a different gradient for q_proj.weight
        w = self.q_proj.weight
        return out + 1e-3 * (w - w.detach()).sum()

    res = _patched_gate(monkeypatch, change)
    assert not res.passed and "gradient of q_proj.weight" in res.message


def test_gate_checks_the_causal_form_too(monkeypatch):
    res = _patched_gate(monkeypatch, lambda self, out, m: out + (1e-3 if self.causal else 0.0))
    assert not res.passed and res.message.startswith("causal:")
    assert check_mixer("softmax", causal=False).passed  # only the given form is checked
    monkeypatch.undo()
    assert check_mixer("softmax").passed


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_bfloat16_module_stays_within_the_mixers_own_conditioning(name):
    # A bfloat16 module (weights, input and every intermediate rounded to 8 bits) differs from the
    # float32 one by the rounding, amplified by how sensitive the function itself is. That
    # sensitivity is measured in float32, by perturbing the input relatively by 2**-8 (the size of
    # bfloat16 rounding); the bfloat16 error must stay within a small multiple of it. More means some
    # step accumulates or normalises in low precision (as AMLP's head LayerNorm once did: 9-14 %).
    # Mixers with discontinuous selections (HyperMLP's ReLU/L2 at the first tokens, the stable causal
    # AMLP's column norms over a one-token prefix) are ill-conditioned there in float32 as well.
    for causal in [c for c, has in ((False, caps(name).noncausal), (True, caps(name).causal)) if has]:
        torch.manual_seed(0)
        m = amlp.build_mixer(name, dim=64, heads=4, causal=causal, **chosen(name)).eval()
        x = torch.randn(2, 256 if not caps(name).max_length else min(256, caps(name).max_length), 64)
        y32 = m(x)
        half = amlp.build_mixer(name, dim=64, heads=4, causal=causal, **chosen(name)).eval()
        half.load_state_dict(m.state_dict())
        y16 = half.to(torch.bfloat16)(x.to(torch.bfloat16)).float()

        def rel(y):
            return ((y - y32).abs().max() / y32.abs().max()).item()

        g = torch.Generator().manual_seed(1)
        sensitivity = max(rel(m(x * (1 + 2 ** -8 * torch.randn(x.shape, generator=g)))) for _ in range(3))
        assert rel(y16) <= max(0.015, 2.5 * sensitivity), (causal, rel(y16), sensitivity)


def test_a_mixer_without_a_default_form_says_so():
    for name in ("amlp-cov", "amlp-pquery"):
        with pytest.raises(ValueError, match=r"no default form: choose form= one of 'paper', 'official', 'stable'"):
            amlp.build_mixer(name, dim=DIM, heads=HEADS)
    from amlp.layers import AMLP

    with pytest.raises(ValueError, match="AMLP has no default form"):
        AMLP(DIM, HEADS, variant="cov")


# --- the ops themselves select padding (not only the layers, which zero padded tokens first) ----------
def _has_heads_op(name):
    from amlp.layers.base import ProjectedMixer

    cls = type(build(name, causal=default_causal(name)))
    return issubclass(cls, ProjectedMixer) and cls.mix_heads is not ProjectedMixer.mix_heads


HEADS_OPS = [n for n in ALL_MIXERS if caps(n).padding and _has_heads_op(n)]


def _heads_of(m, x, mask):
    """The per-head q, k, v the layer hands its op for ``x``."""
    seen = {}
    original = m.mix_heads

    def record(q, k, v, q_mask, kv_mask):
        seen["qkv"] = (q, k, v)
        return original(q, k, v, q_mask, kv_mask)
    m.mix_heads = record
    try:
        m(x, x_mask=mask)
    finally:
        del m.mix_heads
    return [t.detach() for t in seen["qkv"]]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("name", HEADS_OPS)
def test_the_op_selects_poisoned_padding_out(name, causal):
    if (causal and not caps(name).causal) or (not causal and not caps(name).noncausal):
        pytest.skip("no such form")
    torch.manual_seed(0)
    m = build(name, causal=causal)
    T, n_real = 12, 8
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, n_real:] = False
    clean = [t.clone().requires_grad_() for t in _heads_of(m, torch.randn(2, T, DIM, dtype=torch.float64), mask)]
    bad = [t.detach().clone() for t in clean]
    for t, poison in zip(bad, (float("nan"), float("inf"), float("nan"))):
        t[~mask] = poison
    bad = [t.requires_grad_() for t in bad]
    y_clean, y_bad = m.mix_heads(*clean, mask, mask), m.mix_heads(*bad, mask, mask)
    assert torch.isfinite(y_bad).all()
    torch.testing.assert_close(y_bad[mask], y_clean[mask], rtol=1e-9, atol=1e-10)
    probe = torch.randn_like(y_clean)
    g_clean = torch.autograd.grad((y_clean * probe).sum(), clean)
    g_bad = torch.autograd.grad((y_bad * probe).sum(), bad)
    for which, a, b in zip("qkv", g_clean, g_bad):
        assert torch.isfinite(b).all(), which
        torch.testing.assert_close(b[mask], a[mask], rtol=1e-8, atol=1e-10, msg=which)
