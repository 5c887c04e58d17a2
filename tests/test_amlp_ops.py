"""AMLP-Cov and AMLP-PQuery ops: equations, gradients, padding, permutation, stability, errors."""

import math

import pytest
import torch

from amlp.ops import amlp_cov, amlp_cov_reference, amlp_pquery, amlp_pquery_reference
from amlp.ops import _sequence_passes as passes
from amlp.ops.amlp import FORMS, amlp_cov_maps, amlp_pquery_maps

F64 = torch.float64
VARIANTS = ("cov", "pquery")
ACTIVATIONS = ("softmax", "relu", "sigmoid", "identity")


def make(B, Tq, Tk, H, D, c, dtype=F64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * s).requires_grad_()

    return dict(
        q=r(B, Tq, H, D, s=scale), k=r(B, Tk, H, D, s=scale), v=r(B, Tk, H, D, s=scale),
        cq=r(H, c, D, s=0.3), ck=r(H, c, D, s=0.3), w=r(2 * D, D, s=1 / math.sqrt(2 * D)), w_bias=r(D, s=0.1),
        temperature=(torch.rand(H, 3, generator=g, dtype=dtype) + 0.5).requires_grad_(),
    )


def run(variant, t, fn=None, **kw):
    if variant == "cov":
        fn = fn or amlp_cov
        return fn(t["q"], t["k"], t["v"], t["cq"], t["ck"], temperature=t["temperature"], **kw)
    fn = fn or amlp_pquery
    return fn(t["q"], t["k"], t["v"], t["cq"], t["ck"], t["w"], w_bias=t["w_bias"], temperature=t["temperature"], **kw)


def run_ref(variant, t, **kw):
    return run(variant, t, amlp_cov_reference if variant == "cov" else amlp_pquery_reference, **kw)


# --- the paper form against an independent einsum of eqs. 8-12 ------------------------------


def einsum_paper(variant, t, activation):
    """Eqs. 8-12 as printed, batched over (batch, head) with einsum; no masks, no temperatures."""
    q, k, v, cq, ck = t["q"], t["k"], t["v"], t["cq"], t["ck"]
    act = {"softmax": lambda z: torch.softmax(z, -1), "relu": torch.relu, "sigmoid": torch.sigmoid,
           "identity": lambda z: z}[activation]
    if variant == "cov":
        qtq = torch.einsum("bnhd,bnhe->bhde", q, q)
        ktk = torch.einsum("bmhd,bmhe->bhde", k, k)
        ktv = torch.einsum("bmhd,bmhe->bhde", k, v)
        l_t = torch.einsum("hcd,bhde->bhce", cq, torch.softmax(qtq, -1)) + torch.einsum(
            "hcd,bhde->bhce", ck, torch.softmax(ktk, -1))  # eq. 9
        w_qkv = torch.einsum("bhcd,bhde->bhce", l_t, torch.softmax(ktv, -1))  # eq. 10
    else:
        a_q = torch.softmax(torch.einsum("hcd,bnhd->bhcn", cq, q), -1)
        a_k = torch.softmax(torch.einsum("hcd,bmhd->bhcm", ck, k), -1)
        pq = torch.einsum("bhcn,bnhd->bhcd", a_q, q)
        pk = torch.einsum("bhcm,bmhd->bhcd", a_k, k)
        l_t = torch.einsum("bhcf,fd->bhcd", torch.cat([pq, pk], -1), t["w"]) + t["w_bias"]  # eq. 11
        w_qkv = torch.einsum("bhcm,bmhd->bhcd", torch.softmax(torch.einsum("bhcd,bmhd->bhcm", l_t, k), -1), v)  # eq. 12
    hidden = act(torch.einsum("bnhd,bhcd->bnhc", q, l_t))  # sigma_1(Q W_QK), W_QK = L
    return torch.einsum("bnhc,bhcd->bnhd", hidden, w_qkv)  # eq. 8


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("tq,tk", [(63, 63), (63, 41)])
def test_paper_form_equals_einsum_of_the_equations(variant, activation, tq, tk):
    t = make(2, tq, tk, 2, 60, 7, scale=0.15)
    t["temperature"] = None  # the paper has none
    fast = run(variant, t, form="paper", activation=activation)
    expect = einsum_paper(variant, t, activation)
    torch.testing.assert_close(fast, expect, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(fast)
    inputs = [t[n] for n in ("q", "k", "v", "cq", "ck")]
    g_fast = torch.autograd.grad(fast, inputs, grad)
    g_expect = torch.autograd.grad(expect, inputs, grad)
    for a, b in zip(g_fast, g_expect):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fast_equals_reference_with_padding_and_long_chunks(variant, form, activation, monkeypatch):
    # many chunks in the chunked passes (the last one partial), both masks, a row without any real key
    monkeypatch.setattr(passes, "CHUNK_BYTES", 1)
    monkeypatch.setattr(passes, "MAX_CHUNKS", 10 ** 6)
    t = make(2, 1100, 530, 2, 5, 3, scale=0.5)
    g = torch.Generator().manual_seed(1)
    q_mask = torch.rand(2, 1100, generator=g) > 0.3
    kv_mask = torch.rand(2, 530, generator=g) > 0.3
    kv_mask[1] = False
    kw = dict(form=form, activation=activation, q_mask=q_mask, kv_mask=kv_mask)
    fast, ref = run(variant, t, **kw), run_ref(variant, t, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    assert fast[1].abs().max() == 0
    grad = torch.randn_like(fast)
    names = ["q", "k", "v", "cq", "ck", "temperature"] + (["w", "w_bias"] if variant == "pquery" else [])
    inputs = [t[n] for n in names]
    for a, b in zip(torch.autograd.grad(fast, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(variant, form):
    t = make(1, 5, 4, 2, 3, 2, scale=0.7)
    names = ["q", "k", "v", "cq", "ck", "temperature"] + (["w", "w_bias"] if variant == "pquery" else [])

    def f(*xs):
        return run(variant, dict(t, **dict(zip(names, xs))), form=form)

    assert torch.autograd.gradcheck(f, [t[n] for n in names], eps=1e-6, atol=1e-6)


# --- padding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", FORMS)
def test_query_padding(variant, form):
    t = make(2, 9, 7, 2, 4, 3, scale=0.5)
    q_mask = torch.ones(2, 9, dtype=torch.bool)
    q_mask[0, 6:] = False
    padded = run(variant, t, form=form, q_mask=q_mask)
    alone = run(variant, dict(t, q=t["q"][:1, :6], k=t["k"][:1], v=t["v"][:1]), form=form)
    torch.testing.assert_close(padded[0, :6], alone[0])
    assert padded[0, 6:].abs().max() == 0
    junk = t["q"].detach().clone()
    junk[0, 6:] = 1e3
    torch.testing.assert_close(run(variant, dict(t, q=junk), form=form, q_mask=q_mask), padded)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", FORMS)
def test_key_padding(variant, form):
    t = make(2, 9, 8, 2, 4, 3, scale=0.5)
    kv_mask = torch.ones(2, 8, dtype=torch.bool)
    kv_mask[1, 5:] = False
    padded = run(variant, t, form=form, kv_mask=kv_mask)
    alone = run(variant, dict(t, q=t["q"][1:], k=t["k"][1:, :5], v=t["v"][1:, :5]), form=form)
    torch.testing.assert_close(padded[1], alone[0])
    k2, v2 = t["k"].detach().clone(), t["v"].detach().clone()
    k2[1, 5:], v2[1, 5:] = -77.0, 1e4
    torch.testing.assert_close(run(variant, dict(t, k=k2, v=v2), form=form, kv_mask=kv_mask), padded)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fully_padded_row_gives_zeros_and_finite_gradients(variant):
    t = make(2, 4, 5, 2, 3, 2)
    kv_mask = torch.ones(2, 5, dtype=torch.bool)
    kv_mask[0] = False
    out = run(variant, t, kv_mask=kv_mask)
    assert out[0].abs().max() == 0 and torch.isfinite(out).all()
    out.sum().backward()
    for n in ("q", "k", "v", "cq"):
        assert torch.isfinite(t[n].grad).all()


# --- permutation -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", FORMS)
def test_permuting_keys_in_cross_mixing_changes_nothing(variant, form):
    t = make(2, 6, 11, 2, 4, 3, scale=0.5)
    perm = torch.randperm(11)
    out = run(variant, t, form=form)
    shuffled = run(variant, dict(t, k=t["k"][:, perm], v=t["v"][:, perm]), form=form)
    torch.testing.assert_close(shuffled, out)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", FORMS)
def test_permuting_the_sequence_in_self_mixing_permutes_the_output(variant, form):
    t = make(2, 10, 10, 2, 4, 3, scale=0.5)
    t["k"], t["v"] = t["q"], t["q"] * 0.5 + 0.1
    perm = torch.randperm(10)
    out = run(variant, t, form=form)
    shuffled = run(variant, dict(t, q=t["q"][:, perm], k=t["k"][:, perm], v=t["v"][:, perm]), form=form)
    torch.testing.assert_close(shuffled, out[:, perm])


# --- stability -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_stable_form_is_invariant_to_input_scale(variant):
    t = make(2, 20, 20, 2, 8, 4)
    out = run(variant, t)
    big = run(variant, dict(t, q=t["q"] * 50, k=t["k"] * 50, v=t["v"] * 50))
    # Cov reads V only through normalised statistics; PQuery pools V itself, so it scales with it
    torch.testing.assert_close(big, out if variant == "cov" else 50 * out)
    # the paper form is not invariant: that is the point of the stable form
    assert not torch.allclose(run(variant, t, form="paper"),
                              run(variant, dict(t, q=t["q"] * 50, k=t["k"] * 50, v=t["v"] * 50), form="paper"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_stable_form_is_invariant_to_repeating_the_sequence(variant):
    # a sequence repeated 1024 times (T = 65,536) has the same normalised statistics as one copy,
    # so every token gets the output it gets in the short sequence: nothing saturates with T
    t = make(1, 64, 64, 2, 8, 4, dtype=torch.float32, seed=3)
    t["k"], t["v"] = t["q"], t["q"] * 0.7
    short = run(variant, t).detach()
    tile = lambda x: x.detach().repeat(1, 1024, 1, 1)  # noqa: E731
    long = run(variant, dict(t, q=tile(t["q"]), k=tile(t["k"]), v=tile(t["v"])))
    assert long.shape[1] == 65_536
    torch.testing.assert_close(long[:, :64], short, rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(long[:, -64:], short, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cov_maps_do_not_collapse_at_65536_tokens_scaled_by_50(dtype):
    """'Collapsed' means a sigma_2 row has become a one-hot: its largest probability is near 1.
    At T = 65,536 with inputs x50 the paper form collapses (max > 0.99) and the stable form keeps
    every row spread out (max < 0.5) with finite outputs."""
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 65_536, 2, 16
    q, k, v = (torch.randn(B, T, H, D, generator=g).mul(50).to(dtype) for _ in range(3))
    stable = amlp_cov_maps(q, k, v, form="stable")
    paper = amlp_cov_maps(q, k, v, form="paper")
    for m in stable:
        assert torch.isfinite(m).all() and m.max() < 0.5
    assert min(m.max(-1).values.mean() for m in paper) > 0.99
    cq = torch.randn(H, 4, D, generator=g).to(dtype)
    out = amlp_cov(q, k, v, cq, cq.flip(1))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pquery_maps_do_not_collapse_at_65536_tokens_scaled_by_50(dtype):
    """'Collapsed' means a pooling row has become a one-hot: it pools a single token. At T = 65,536
    with inputs x50 the paper form does (max > 0.99 on average) and the stable form does not."""
    g = torch.Generator().manual_seed(0)
    B, T, H, D, c = 1, 65_536, 1, 16, 4
    q, k, v = (torch.randn(B, T, H, D, generator=g).mul(50).to(dtype).requires_grad_() for _ in range(3))
    cq, ck = torch.randn(H, c, D, generator=g), torch.randn(H, c, D, generator=g)
    w = torch.randn(2 * D, D, generator=g) / math.sqrt(2 * D)
    with torch.no_grad():
        stable = amlp_pquery_maps(q, k, v, cq, ck, w, form="stable")
        paper = amlp_pquery_maps(q, k, v, cq, ck, w, form="paper")
    for m in stable:
        assert torch.isfinite(m).all() and m.max() < 0.01
    assert max(m.max(-1).values.mean() for m in paper) > 0.99
    out = amlp_pquery(q, k, v, cq, ck, w)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(x.grad.float()).all() for x in (q, k, v))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_float32_and_keep_their_dtype(variant, dtype):
    t32 = make(2, 16, 12, 2, 8, 4, dtype=torch.float32)
    t_half = {n: (x.detach().to(dtype) if n in ("q", "k", "v") else x) for n, x in t32.items()}
    out = run(variant, t_half)
    assert out.dtype == dtype
    ref = run(variant, {n: x.detach() for n, x in t32.items()})
    # the op computes in float32: the error is the rounding of the inputs and of the output, a few
    # units in the last place of the half type relative to the output's scale
    ulp = torch.finfo(dtype).eps
    err = (out.float() - ref).abs().max().item()
    assert err <= 4 * ulp * ref.abs().max().item(), (err, ref.abs().max().item())


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_token(variant):
    t = make(2, 1, 1, 2, 4, 3)
    out = run(variant, t)
    assert out.shape == (2, 1, 2, 4) and torch.isfinite(out).all()
    torch.testing.assert_close(out, run_ref(variant, t))


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_inputs_name_the_argument(variant):
    t = make(2, 5, 6, 2, 4, 3)
    cases = [
        (dict(q=t["q"][0]), "q must have 4 dimensions"),
        (dict(k=t["k"][:1], v=t["v"][:1]), "batch size"),
        (dict(k=t["k"][:, :, :1], v=t["v"][:, :, :1]), "heads"),
        (dict(v=t["v"][:, :3]), "k and v must have the same shape"),
        (dict(cq=t["cq"][:, :, :3]), r"cq must be shaped \[H, c, D\]"),
        (dict(cq=t["cq"][:, :0], ck=t["ck"][:, :0]), "at least one landmark"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            run(variant, dict(t, **change))
    with pytest.raises(ValueError, match="q_mask"):
        run(variant, t, q_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv_mask must have dtype torch.bool"):
        run(variant, t, kv_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="activation"):
        run(variant, t, activation="tanh")
    with pytest.raises(ValueError, match="form"):
        run(variant, t, form="fast")
    with pytest.raises(ValueError, match="temperature"):
        run(variant, dict(t, temperature=torch.ones(3)))
    if variant == "pquery":
        with pytest.raises(ValueError, match=r"w must be shaped"):
            run(variant, dict(t, w=torch.ones(4, 4, dtype=F64)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_poisoned_padded_rows_reach_no_real_output_or_gradient(variant, form, poison):
    t = make(2, 9, 8, 2, 4, 3, scale=0.5)
    q_mask = torch.ones(2, 9, dtype=torch.bool)
    q_mask[0, 6:] = False
    kv_mask = torch.ones(2, 8, dtype=torch.bool)
    kv_mask[1, 5:] = False
    clean = run(variant, t, form=form, q_mask=q_mask, kv_mask=kv_mask)
    bad = {n: x.detach().clone() for n, x in t.items()}
    bad["q"][0, 6:] = poison
    bad["k"][1, 5:], bad["v"][1, 5:] = poison, -poison
    for x in bad.values():
        x.requires_grad_(True)
    out = run(variant, bad, form=form, q_mask=q_mask, kv_mask=kv_mask)
    torch.testing.assert_close(out, clean)  # padded outputs are zero in both
    grad = torch.randn_like(out)
    names = ["q", "k", "v", "cq", "ck", "temperature"] + (["w", "w_bias"] if variant == "pquery" else [])
    g_bad = torch.autograd.grad(out, [bad[n] for n in names], grad)
    g_clean = torch.autograd.grad(clean, [t[n] for n in names], grad)
    for n, a, b in zip(names, g_bad, g_clean):
        assert torch.isfinite(a).all(), n
        torch.testing.assert_close(a, b, msg=n)


@pytest.mark.parametrize("variant", VARIANTS)
def test_operator_calls_of_a_training_step_do_not_grow_with_the_length(variant, monkeypatch):
    # 64-row chunks, at most 8 of them: 512 tokens make 8 chunks, 2048 tokens make 8 chunks of 256;
    # with the chunk size fixed, 2048 tokens would make 32 chunks and four times the calls per pass
    from amlp.bench.workloads import count_aten_calls

    monkeypatch.setattr(passes, "CHUNK_BYTES", 1)
    monkeypatch.setattr(passes, "MAX_CHUNKS", 8)
    assert len(passes.row_chunks(torch.empty(1, 2048, 2, 4))) == 8
    calls = {}
    for T in (512, 2048):
        t = make(1, T, T, 2, 4, 3, dtype=torch.float32)
        calls[T] = count_aten_calls(lambda t=t: run(variant, t).sum().backward())
    assert calls[512] == calls[2048]
