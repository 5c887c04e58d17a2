"""HyperMLP / HyperGLU: lag layout, DPLR identity, dense = chunked = per-token loop, truncation
invariance, reduction to ReLU attention, recurrent step, causality, lags beyond the bank, and the
absolute-layout ablation."""

import pytest
import torch

import amlp
from amlp.layers import HyperGLU, HyperHead, HyperMLP
from amlp.ops.hypermlp import (
    dplr_apply,
    dplr_matrix,
    from_lag_layout,
    hyper_attention,
    hyper_attention_reference,
    to_lag_layout,
    valid_lags,
)

F64 = torch.float64
NAMES = ("hyper-mlp", "hyper-glu")
KINDS = ("relu", "glu")


# -- inputs and builders ------------------------------------------------------------------------------
def op_inputs(kind, B=2, Tq=7, Tk=7, H=2, Dk=3, Dv=4, r=2, M=5, dtype=F64, mixing=True, seed=0):
    """Random op inputs; the banks are O(1) so the sequence mixing matters."""
    g = torch.Generator().manual_seed(seed)
    Hqk = H if kind == "relu" else 2 * H

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    q, k, v = rn(B, Tq, Hqk, Dk), rn(B, Tk, Hqk, Dk), rn(B, Tk, H, Dv)
    opts = dict(kind=kind)
    if mixing:
        opts.update(
            s_qk=torch.rand(B, Tq, Hqk, r, generator=g, dtype=dtype),
            s_vo=torch.rand(B, Tq, H, r, generator=g, dtype=dtype),
            qk_p=0.5 * rn(Hqk, M), qk_a=0.7 * rn(Hqk, M, r), qk_b=0.7 * rn(Hqk, M, r),
            vo_p=0.5 * rn(H, M), vo_a=0.7 * rn(H, M, r), vo_b=0.7 * rn(H, M, r),
        )
    return q, k, v, opts


def build(name, dim=12, heads=2, **kw):
    kw.setdefault("qk_rank", 8)
    kw.setdefault("rank", 3)
    kw.setdefault("max_lag", 16)
    kw.setdefault("conv_kernel", 3)
    m = amlp.build_mixer(name, dim=dim, heads=heads, causal=True, **kw).double().eval()
    randomise(m)
    return m


@torch.no_grad()
def randomise(m, scale=0.5):
    """Move the sequence-mixing banks and convolutions away from their near-identity init."""
    for name in ("qk_p", "qk_a", "qk_b", "vo_p", "vo_a", "vo_b", "k_conv", "v_conv"):
        t = getattr(m, name)
        if t is not None:
            t.normal_(0.0, scale)


def run_steps(m, x):
    state = m.init_state(x.shape[0], dtype=x.dtype)
    outs = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    return torch.stack(outs, 1), state


# -- layouts and the DPLR operator -----------------------------------------------------------------
@pytest.mark.parametrize("C,L", [(1, 1), (1, 6), (3, 3), (4, 9), (6, 7)])
def test_lag_layout_equals_the_gather_definition(C, L):
    x = torch.randn(2, 3, C, L)
    i0 = L - C
    expected = torch.zeros_like(x)
    for c in range(C):
        for lag in range(L):
            j = i0 + c - lag  # the key at this lag
            if j >= 0:
                expected[..., c, lag] = x[..., c, j]
    assert torch.equal(to_lag_layout(x), expected)
    valid = valid_lags(C, L)
    assert torch.equal(valid, torch.tensor([[i0 + c - lag >= 0 for lag in range(L)] for c in range(C)]))
    # back to the standard layout: the causal part is recovered, the future is zero
    causal = torch.tensor([[j <= i0 + c for j in range(L)] for c in range(C)])
    assert torch.equal(from_lag_layout(to_lag_layout(x)), x * causal)


def explicit_dplr(p, a, b, s, length):
    """R[l, m] = [l == m] (1 + p_l) + sum_r A[l, r] s_r B[m, r], built entry by entry, zero bank
    rows beyond M."""
    M, r = a.shape
    R = torch.zeros(length, length, dtype=p.dtype)
    for row in range(length):
        for col in range(length):
            val = 0.0
            if row == col:
                val += 1.0 + (p[row].item() if row < M else 0.0)
            if row < M and col < M:
                val += sum(a[row, i].item() * s[i].item() * b[col, i].item() for i in range(r))
            R[row, col] = val
    return R


@pytest.mark.parametrize("length", [4, 7])
def test_dplr_identity_equals_the_explicit_operator(length):
    """Lemma G.1: y R = y (1 + p) + ((y A) s) B^T with R = I + Diag(p) + A Diag(s) B^T; the bank has
    M = 5 rows, so length 7 also checks lags without parameters (R = identity there)."""
    H, M, r, B, C = 2, 5, 3, 2, 3
    p, a, b = torch.randn(H, M, dtype=F64), torch.randn(H, M, r, dtype=F64), torch.randn(H, M, r, dtype=F64)
    s = torch.rand(B, H, C, r, dtype=F64)
    y = torch.randn(B, H, C, length, dtype=F64)
    R = dplr_matrix(p, a, b, s.transpose(1, 2), length)  # s as [B, C, H, r] -> R [B, C, H, L, L]
    fast = dplr_apply(y, p, a, b, s)
    for bb in range(B):
        for h in range(H):
            for c in range(C):
                explicit = explicit_dplr(p[h], a[h], b[h], s[bb, h, c], length)
                torch.testing.assert_close(R[bb, c, h], explicit)
                torch.testing.assert_close(fast[bb, h, c], y[bb, h, c] @ explicit)


# -- the op: fast forms against the per-token loop -------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,M", [(7, 9), (9, 4)])  # bank longer than T, and lags beyond the bank
def test_dense_lag_layout_equals_per_token_loop(kind, T, M):
    q, k, v, opts = op_inputs(kind, Tq=T, Tk=T, M=M)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, T - 3:] = False
    fast = hyper_attention(q, k, v, q_mask=mask, kv_mask=mask, **opts)
    ref = hyper_attention_reference(q, k, v, q_mask=mask, kv_mask=mask, **opts)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert fast[1, T - 3:].abs().max() == 0  # padded queries


@pytest.mark.parametrize("layout", ["lag", "absolute"])
@pytest.mark.parametrize("kind", KINDS)
def test_poisoned_padding_reaches_no_real_output_or_gradient(kind, layout):
    """NaN in the padded rows of q, k, v and of the controls: selected out at the op's entry, so no
    real output and no gradient changes (the readout's zero weights would carry 0 x NaN)."""
    q, k, v, opts = op_inputs(kind, Tq=9, Tk=9, M=6)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    clean = [t.clone().requires_grad_() for t in (q, k, v, opts.pop("s_qk"), opts.pop("s_vo"))]
    bad = [t.detach().clone() for t in clean]
    for t in bad:
        t[~mask] = float("nan")
    bad = [t.requires_grad_() for t in bad]

    def run(q, k, v, s_qk, s_vo):
        return hyper_attention(q, k, v, s_qk=s_qk, s_vo=s_vo, q_mask=mask, kv_mask=mask, layout=layout, **opts)
    y_clean, y_bad = run(*clean), run(*bad)
    assert torch.isfinite(y_bad).all() and (y_bad[~mask] == 0).all()
    torch.testing.assert_close(y_bad, y_clean, rtol=0, atol=0)
    probe = torch.randn_like(y_clean)
    for a, b in zip(torch.autograd.grad((y_clean * probe).sum(), clean), torch.autograd.grad((y_bad * probe).sum(), bad)):
        assert torch.isfinite(b).all() and (b[~mask] == 0).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_queries_end_aligned_to_keys(kind):
    """Tq < Tk: the queries are the last Tq positions (the decoding case)."""
    q, k, v, opts = op_inputs(kind, Tq=3, Tk=8, M=6)
    fast = hyper_attention(q, k, v, **opts)
    torch.testing.assert_close(fast, hyper_attention_reference(q, k, v, **opts), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast, hyper_attention(q, k, v, chunk_size=2, **opts), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("budget, chunked", [(None, False), (2 * 4 * 10 * 8, True)])
def test_auto_blocks_follow_the_memory_budget(monkeypatch, budget, chunked):
    """``chunk_size="auto"``: all queries at once when they fit the budget, else blocks of the rows
    the budget allows (here 16, the floor, of 30 queries); the same outputs and gradients either way."""
    import amlp.ops.hypermlp as hm

    if budget is not None:
        monkeypatch.setattr(hm, "AUTO_BLOCK_BYTES", budget)
    q, k, v, opts = op_inputs("relu", Tq=30, Tk=30, M=6)
    leaves = [q, k, v, opts["qk_a"]]
    for t in leaves:
        t.requires_grad_(True)
    rows = hm.auto_chunk_rows(q.shape[0], q.shape[2], 30, 8)
    assert (rows < 30) == chunked
    calls = []
    monkeypatch.setattr(hm._RecomputedBlock, "apply", lambda *a, _f=hm._RecomputedBlock.apply: calls.append(1) or _f(*a))
    auto = hyper_attention(q, k, v, chunk_size="auto", **opts)
    assert bool(calls) == chunked
    dense = hyper_attention(q, k, v, **opts)
    torch.testing.assert_close(auto, dense, rtol=1e-10, atol=1e-12)
    weight = torch.randn_like(dense)
    for a, b in zip(_grads(auto, leaves, weight), _grads(dense, leaves, weight)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="'auto'"):
        hyper_attention(q, k, v, chunk_size="fast", **opts)


def _grads(out, tensors, weight):
    return torch.autograd.grad((out * weight).sum(), tensors)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_dense_equals_chunked_outputs_and_gradients(kind, chunk):
    q, k, v, opts = op_inputs(kind, Tq=10, Tk=10, M=6)
    leaves = [q, k, v] + [opts[n] for n in ("s_qk", "s_vo", "qk_p", "qk_a", "qk_b", "vo_p", "vo_a", "vo_b")]
    for t in leaves:
        t.requires_grad_(True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 8:] = False
    dense = hyper_attention(q, k, v, q_mask=mask, kv_mask=mask, **opts)
    chunked = hyper_attention(q, k, v, q_mask=mask, kv_mask=mask, chunk_size=chunk, **opts)
    torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-12)
    weight = torch.randn_like(dense)
    g_dense = _grads(dense, leaves, weight)
    g_chunk = _grads(chunked, leaves, weight)
    for a, b in zip(g_dense, g_chunk):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    g_ref = _grads(hyper_attention_reference(q, k, v, q_mask=mask, kv_mask=mask, **opts), leaves, weight)
    for a, b in zip(g_ref, g_dense):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_chunked_form_never_keeps_a_full_score_matrix_for_backward():
    """Under autograd every tensor kept for backward by the chunked form is at most one block of
    scores (chunk x T per head), while the dense form keeps T x T ones."""
    kind, T, chunk = "relu", 48, 8
    q, k, v, opts = op_inputs(kind, B=1, Tq=T, Tk=T, H=2, M=64)
    q.requires_grad_(True)
    B, Hqk = 1, 2

    def largest_saved(**kw):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hyper_attention(q, k, v, **opts, **kw).sum().backward()
        return max(sizes)

    assert largest_saved() >= B * Hqk * T * T
    assert largest_saved(chunk_size=chunk) <= max(B * Hqk * chunk * T, q.numel(), opts["qk_a"].numel(), k.numel())


def test_lag_indexing_uses_bank_row_l_for_lag_l():
    """Changing bank rows l > t leaves the output at position t alone (row l is lag l, not an
    absolute position); changing row 0 (the current token) changes every output."""
    q, k, v, opts = op_inputs("relu", Tq=8, Tk=8, M=8)
    base = hyper_attention(q, k, v, **opts)
    t = 3
    for name in ("qk_p", "qk_a", "vo_b"):
        changed = dict(opts)
        changed[name] = opts[name].clone()
        changed[name][:, t + 1:] += 1.0
        out = hyper_attention(q, k, v, **changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-13)
        assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-6
    changed = dict(opts, vo_p=opts["vo_p"].clone())
    changed["vo_p"][:, 0] += 1.0
    diff = (hyper_attention(q, k, v, **changed) - base).abs().amax(dim=(0, 2, 3))
    assert (diff > 1e-8).all()


@pytest.mark.parametrize("kind", KINDS)
def test_lags_beyond_the_bank_equal_zero_padded_banks(kind):
    """Lags >= M behave exactly as if the bank had zero rows there (p = 0, no low-rank term)."""
    T, M = 11, 4
    q, k, v, opts = op_inputs(kind, Tq=T, Tk=T, M=M)
    padded = dict(opts)
    for name in ("qk_p", "vo_p"):
        padded[name] = torch.cat([opts[name], torch.zeros(opts[name].shape[0], T - M, dtype=F64)], 1)
    for name in ("qk_a", "qk_b", "vo_a", "vo_b"):
        t = opts[name]
        padded[name] = torch.cat([t, torch.zeros(t.shape[0], T - M, t.shape[2], dtype=F64)], 1)
    torch.testing.assert_close(hyper_attention(q, k, v, chunk_size=3, **opts),
                               hyper_attention(q, k, v, **padded), rtol=1e-10, atol=1e-12)


# -- the layers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("options", [
    {},
    {"kv_conv": False, "qk_gate": False},
    {"vo_gate": False, "sequence_mixing": "qk", "chunk_size": 2},
    {"sequence_mixing": "vo", "max_lag": 3, "bias": True},
    {"sequence_mixing": "none", "conv_kernel": 1, "vo_rank": 8},
    {"layout": "absolute"},
    {"layout": "absolute", "max_lag": 4, "chunk_size": 3},
])
def test_layer_fast_path_equals_reference_loop(name, options):
    m = build(name, **options)
    x = torch.randn(2, 9, 12, dtype=F64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    fast = m(x, x_mask=mask)
    ref = m.reference(x, x_mask=mask)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    g_fast = torch.autograd.grad(fast.square().sum(), [x] + list(m.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), [x] + list(m.parameters()))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", NAMES)
def test_layer_dense_equals_chunked_with_gradients(name):
    m = build(name, chunk_size=None)
    x = torch.randn(2, 11, 12, dtype=F64, requires_grad=True)
    dense = m(x)
    g_dense = torch.autograd.grad(dense.square().sum(), [x] + list(m.parameters()))
    m.chunk_size = 4
    chunked = m(x)
    g_chunk = torch.autograd.grad(chunked.square().sum(), [x] + list(m.parameters()))
    torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_dense, g_chunk):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("max_lag", [16, 4])
@pytest.mark.parametrize("layout", ["lag", "absolute"])
def test_truncation_invariance(name, max_lag, layout):
    """y(x[:, :t]) == y(x)[:, :t] for every t, also when t passes the last lag (or position) with
    parameters."""
    m = build(name, max_lag=max_lag, chunk_size=3, layout=layout)
    x = torch.randn(2, 10, 12, dtype=F64)
    full = m(x)
    for t in range(1, 11):
        torch.testing.assert_close(m(x[:, :t]), full[:, :t], rtol=1e-10, atol=1e-12)


def test_banks_sliced_from_the_window_end_would_break_truncation_invariance():
    """Guard for the test above: slicing the banks from the end of the sequence (key j of a length-T
    sequence on row M - T + j, the official code's non-lag aligner) changes the output at t when the
    sequence grows, so the test can fail; the lag layout and the start-aligned absolute layout do not."""
    q, k, v, opts = op_inputs("relu", Tq=8, Tk=8, M=8, seed=3)

    def end_aligned(T):
        sliced = dict(opts, s_qk=opts["s_qk"][:, :T], s_vo=opts["s_vo"][:, :T])
        for n in ("qk_p", "vo_p", "qk_a", "qk_b", "vo_a", "vo_b"):
            sliced[n] = opts[n][:, 8 - T:]
        return hyper_attention(q[:, :T], k[:, :T], v[:, :T], layout="absolute", **sliced)

    assert (end_aligned(5) - end_aligned(8)[:, :5]).abs().max() > 1e-6
    short_opts = dict(opts, s_qk=opts["s_qk"][:, :5], s_vo=opts["s_vo"][:, :5])
    for layout in ("lag", "absolute"):
        full = hyper_attention(q, k, v, layout=layout, **opts)
        torch.testing.assert_close(hyper_attention(q[:, :5], k[:, :5], v[:, :5], layout=layout, **short_opts),
                                   full[:, :5])


# -- the absolute layout (ablation) ------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,M,chunk", [(7, 9, None), (9, 4, 2), (10, 10, 3)])
def test_absolute_layout_equals_per_token_loop_with_gradients(kind, T, M, chunk):
    q, k, v, opts = op_inputs(kind, Tq=T, Tk=T, M=M, seed=5)
    leaves = [q, k, v] + [opts[n] for n in ("s_qk", "s_vo", "qk_p", "qk_a", "qk_b", "vo_p", "vo_a", "vo_b")]
    for t in leaves:
        t.requires_grad_(True)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, T - 3:] = False
    fast = hyper_attention(q, k, v, q_mask=mask, kv_mask=mask, chunk_size=chunk, layout="absolute", **opts)
    ref = hyper_attention_reference(q, k, v, q_mask=mask, kv_mask=mask, layout="absolute", **opts)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert fast[1, T - 3:].abs().max() == 0
    weight = torch.randn_like(fast)
    for a, b in zip(_grads(ref, leaves, weight), _grads(fast, leaves, weight)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    # the layouts differ once the banks are not the identity
    assert (hyper_attention(q, k, v, q_mask=mask, kv_mask=mask, **opts) - fast).abs().max() > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_absolute_layout_is_the_lag_layout_with_the_bank_rows_reversed_for_the_last_query(kind):
    """For the query at position t, slot j (absolute) is slot t - j (lag): absolute with bank rows
    0..t equals lag with those rows reversed."""
    t = 6
    q, k, v, opts = op_inputs(kind, Tq=1, Tk=t + 1, M=t + 1, seed=7)
    reversed_rows = dict(opts)
    for n in ("qk_p", "vo_p", "qk_a", "qk_b", "vo_a", "vo_b"):
        reversed_rows[n] = opts[n].flip(1)
    torch.testing.assert_close(hyper_attention(q, k, v, layout="absolute", **opts),
                               hyper_attention(q, k, v, **reversed_rows), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 3])
def test_absolute_layout_is_causal(chunk):
    q, k, v, opts = op_inputs("glu", Tq=8, Tk=8, M=8, seed=2)
    base = hyper_attention(q, k, v, layout="absolute", chunk_size=chunk, **opts)
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:] = float("nan")  # future scores are selected out
    v2[:, 5:] += 3.0
    out = hyper_attention(q, k2, v2, layout="absolute", chunk_size=chunk, **opts)
    torch.testing.assert_close(out[:, :5], base[:, :5], rtol=0, atol=0)
    assert (out[:, 5:] - base[:, 5:]).isnan().all()


@pytest.mark.parametrize("name", NAMES)
def test_absolute_layout_layer_keeps_a_poisoned_future_out_of_the_past(name):
    m = build(name, layout="absolute", chunk_size=4)
    x = torch.randn(2, 10, 12, dtype=F64)
    clean = m(x)
    x[:, 6] = float("nan")
    poisoned = m(x)
    torch.testing.assert_close(poisoned[:, :6], clean[:, :6], rtol=0, atol=0)
    assert poisoned[:, 6:].isnan().all()


def test_reduces_to_normalised_relu_attention():
    """No sequence mixing (A = B = 0, p = 0), no gates, no conv, ReLU kind:
    y = ((ReLU(Q K^T * tril) / ||row||_2) V) W_o."""
    m = build("hyper-mlp", kv_conv=False, qk_gate=False, vo_gate=False)
    with torch.no_grad():
        for n in ("qk_p", "qk_a", "qk_b", "vo_p", "vo_a", "vo_b"):
            getattr(m, n).zero_()
    x = torch.randn(2, 8, 12, dtype=F64)
    H, Dk, Dv = m.heads, m.qk_dim, m.vo_dim
    q = (x @ m.q_proj.weight.T).view(2, 8, H, Dk).transpose(1, 2)
    k = (x @ m.k_proj.weight.T).view(2, 8, H, Dk).transpose(1, 2)
    v = (x @ m.v_proj.weight.T).view(2, 8, H, Dv).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * torch.ones(8, 8, dtype=F64).tril()
    weights = torch.relu(scores) / scores.norm(dim=-1, keepdim=True)
    expected = (weights @ v).transpose(1, 2).reshape(2, 8, H * Dv) @ m.out_proj.weight.T
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-12)
    plain = build("hyper-mlp", kv_conv=False, qk_gate=False, vo_gate=False, sequence_mixing="none")
    plain.load_state_dict({n: t for n, t in m.state_dict().items() if n in plain.state_dict()})
    torch.testing.assert_close(plain(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("max_lag", [16, 3])
@pytest.mark.parametrize("layout", ["lag", "absolute"])
def test_step_equals_forward(name, max_lag, layout):
    m = build(name, max_lag=max_lag, chunk_size=4, layout=layout)
    x = torch.randn(2, 9, 12, dtype=F64)
    stepped, state = run_steps(m, x)
    torch.testing.assert_close(stepped, m(x), rtol=1e-10, atol=1e-12)
    floats = sum(t[0].numel() for t in state.values())
    assert m.state_size(9) == floats == 9 * (8 + 12) + 2 * 12


def test_step_without_convolution_or_gates():
    m = build("hyper-glu", kv_conv=False, qk_gate=False, vo_gate=False, sequence_mixing="vo")
    x = torch.randn(2, 6, 12, dtype=F64)
    stepped, state = run_steps(m, x)
    torch.testing.assert_close(stepped, m(x), rtol=1e-10, atol=1e-12)
    assert m.state_size(6) == sum(t[0].numel() for t in state.values()) == 6 * (8 + 12)


@pytest.mark.parametrize("name", NAMES)
def test_padding_rows_give_zeros_and_finite_gradients(name):
    """A fully padded row returns zeros; left padding runs (zeros at padded queries, finite
    everywhere) but is not exactly invariant, as documented."""
    m = build(name)
    x = torch.randn(3, 8, 12, dtype=F64, requires_grad=True)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0] = False
    mask[1, :3] = False  # left padding
    y = m(x, x_mask=mask)
    assert y[0].abs().max() == 0 and y[1, :3].abs().max() == 0
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    left_alone = m(x[1:2, 3:])
    assert torch.isfinite(left_alone).all()
    assert (y[1, 3:] - left_alone[0]).abs().max() > 1e-8  # R^(1) puts mass on the padded slots
    plain = build(name, sequence_mixing="none")  # without sequence mixing left padding is exact
    torch.testing.assert_close(plain(x, x_mask=mask)[1, 3:], plain(x[1:2, 3:])[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_causal_jacobian_with_the_convolution(name):
    """d y_t / d x_j = 0 for j > t; and the convolutions reach back: y_t depends on x_{t-1}
    even through the key/value paths alone."""
    m = build(name, dim=8, heads=2, qk_rank=4, conv_kernel=3)
    x = torch.randn(1, 6, 8, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda inp: m(inp), x)[0, :, :, 0]  # [T, E, T, E]
    per_pair = jac.abs().sum(dim=(1, 3))  # [t, j]
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert per_pair[future].max() == 0
    assert (per_pair[~future] > 0).all()


def test_convolution_is_causal_and_matches_its_loop():
    m = build("hyper-mlp", dim=8, heads=2, qk_rank=4, conv_kernel=4)
    x = torch.randn(2, 7, 8, dtype=F64)
    fast = m._conv(x, m.k_conv)
    torch.testing.assert_close(fast, m._conv_reference(x, m.k_conv))
    expected = torch.zeros_like(x)
    for t in range(7):
        for i in range(4):
            j = t - 3 + i
            if j >= 0:
                expected[:, t] += m.k_conv[:, i] * x[:, j]
    torch.testing.assert_close(fast, expected)


@pytest.mark.parametrize("name", NAMES)
def test_beyond_max_lag_runs_and_keeps_the_contract(name):
    """T > max_lag: runs, is causal, step == forward, outputs at t < max_lag unchanged."""
    max_lag = 4
    m = build(name, max_lag=max_lag, chunk_size=3)
    x = torch.randn(2, 13, 12, dtype=F64)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(m(x[:, :max_lag]), y[:, :max_lag], rtol=1e-10, atol=1e-12)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(2, 4, 12, dtype=F64)
    torch.testing.assert_close(m(x2)[:, :9], y[:, :9], rtol=1e-10, atol=1e-12)
    stepped, _ = run_steps(m, x)
    torch.testing.assert_close(stepped, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.reference(x), y, rtol=1e-9, atol=1e-11)
    # the old tokens are still attended to: changing x_0 changes the output at the last step
    x3 = x.clone()
    x3[:, 0] += 1.0
    assert (m(x3)[:, -1] - y[:, -1]).abs().max() > 1e-8


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_inputs_stay_finite(name, dtype):
    m = amlp.build_mixer(name, dim=16, heads=2, causal=True, max_lag=8, rank=4, chunk_size=5).to(dtype)
    randomise(m)
    x = (50 * torch.randn(2, 12, 16)).to(dtype).requires_grad_(True)
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for p in m.parameters() if p.grad is not None)


def test_glu_pairs_value_head_with_gate_and_scale_heads():
    """HyperGLU value head i uses gate head i and scale head H + i: scaling up the scale head of
    value head 0 leaves value head 1 alone."""
    H = 2
    q, k, v, opts = op_inputs("glu", H=H, Tq=6, Tk=6, mixing=False)
    base = hyper_attention(q, k, v, kind="glu")
    q2 = q.clone()
    q2[:, :, H + 0] *= 3.0
    out = hyper_attention(q2, k, v, kind="glu")
    torch.testing.assert_close(out[:, :, 1], base[:, :, 1])
    assert (out[:, :, 0] - base[:, :, 0]).abs().max() > 1e-6
    # the gate heads only route (Prop. 2.4): without sequence mixing, scaling a gate head by a
    # positive factor is normalised away, and flipping its sign moves the weight to other slots
    q3 = q.clone()
    q3[:, :, 0] *= 5.0
    torch.testing.assert_close(hyper_attention(q3, k, v, kind="glu"), base)
    q3[:, :, 0] *= -1.0
    assert (hyper_attention(q3, k, v, kind="glu")[:, :, 0] - base[:, :, 0]).abs().max() > 1e-6


def test_default_ranks_and_option_errors():
    assert HyperMLP(24, 3, causal=True).qk_rank == 6
    glu = HyperGLU(40, 4, causal=True)  # E/4 = 10 rounded down to a multiple of 2H = 8
    assert glu.qk_rank == 8 and glu.qk_heads == 8 and glu.vo_rank == 40
    assert HyperHead(8, 2, kind="glu", causal=True).qk_rank == 4  # at least one dim per head
    with pytest.raises(ValueError, match="non-causal"):
        amlp.build_mixer("hyper-mlp", dim=8, heads=2)
    with pytest.raises(ValueError, match="cross"):
        amlp.build_mixer("hyper-glu", dim=8, heads=2, causal=True, cross=True)
    with pytest.raises(ValueError, match="qk_rank"):
        HyperGLU(16, 2, causal=True, qk_rank=6)
    with pytest.raises(ValueError, match="vo_rank"):
        HyperMLP(16, 2, causal=True, vo_rank=5)
    with pytest.raises(ValueError, match="kind"):
        HyperHead(16, 2, kind="softmax", causal=True)
    with pytest.raises(ValueError, match="kind"):
        HyperMLP(16, 2, kind="glu", causal=True)
    with pytest.raises(ValueError, match="chunk_size"):
        HyperMLP(16, 2, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="sequence_mixing"):
        HyperMLP(16, 2, causal=True, sequence_mixing="all")
    with pytest.raises(ValueError, match="max_lag"):
        HyperMLP(16, 2, causal=True, max_lag=0)
    with pytest.raises(ValueError, match="layout must be one of"):
        HyperGLU(16, 2, causal=True, layout="position")
    assert "layout='absolute'" in repr(HyperGLU(16, 2, causal=True, layout="absolute"))
    m = HyperMLP(16, 2, causal=True)
    with pytest.raises(ValueError, match="x_t"):
        m.step(torch.randn(2, 1, 16), m.init_state(2))


def test_op_input_errors():
    q, k, v, opts = op_inputs("glu", Tq=5, Tk=5)
    with pytest.raises(ValueError, match="query/key heads"):
        hyper_attention(q, k, v, **dict(opts, kind="relu"))
    with pytest.raises(ValueError, match="v must be shaped"):
        hyper_attention(q, k, v[:, :4], **opts)
    with pytest.raises(ValueError, match="s_qk"):
        hyper_attention(q, k, v, **dict(opts, s_qk=opts["s_qk"][:, :3]))
    with pytest.raises(ValueError, match="vo_a"):
        hyper_attention(q, k, v, **dict(opts, vo_a=opts["vo_a"][:, :2]))
    with pytest.raises(ValueError, match="Tq <= Tk"):
        hyper_attention(q, k[:, :3], v[:, :3], kind="glu")
    with pytest.raises(ValueError, match="kv_mask"):
        hyper_attention(q, k, v, kv_mask=torch.ones(2, 4, dtype=torch.bool), **opts)
    with pytest.raises(ValueError, match="chunk_size"):
        hyper_attention(q, k, v, chunk_size=-1, **opts)
    with pytest.raises(ValueError, match="layout must be one of"):
        hyper_attention(q, k, v, layout="lags", **opts)
