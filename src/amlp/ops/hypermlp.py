r"""HyperMLP / HyperGLU heads (arXiv 2602.12601): causal attention seen as a dynamic two-layer MLP.

For the query at position t and the lag-ordered prefix (lag l = t - j, l = 0 is the current token),
one head computes (the HyperMLP paper's dynamic MLP ``o_t = sigma(x_t W1(X)) W2(X)``):

    z_t[l] = q_t . k_{t-l}                               scores, lag layout, l = 0..t
    h_t    = z_t R1_t,   R_t = I + Diag(p) + A Diag(s_t) B^T   sequence mixing R^(1) (DPLR)
    a_t    = ReLU(h_t) / ||h_t||_2                       HyperMLP activation
           = Softplus(h^scale_t) * ReLU(h^gate_t) / ||h^gate_t||_2     HyperGLU activation
    w_t    = a_t R2_t                                    sequence mixing R^(2), its own p, A, B, s
    r_t    = sum_l w_t[l] v_{t-l}                        readout

The DPLR product never forms the t-by-t matrix (Lemma G.1 of the paper):

    y R = y * (1 + p) + ((y A) * s) B^T          O(t r) per row

**Lag-indexed parameters.** ``p`` (``[H, M]``), ``A`` and ``B`` (``[H, M, r]``) are banks indexed by
lag: lag l uses row l, whatever the sequence length, so the operator of a length-t prefix is the
top-left block of the operator of any longer sequence. With the padding-invariant L2 norm (a zero
slot adds nothing to the norm) this gives autoregressive truncation invariance: the output at step t
of a length-T pass equals the output computed on the length-(t+1) prefix alone (paper Thm 2.3).

**Lags beyond the bank.** Lags l >= M (``M`` = number of bank rows, ``max_lag`` of the layers) have
no parameters: their A and B rows are taken as zero and their p as zero, so R acts as the identity
on those slots. They still take part in the scores, the low-rank projection ``y A`` ignores them,
and the activation's norm counts them: the head keeps attending to old tokens as plain ReLU / GLU
attention. Any length runs, and truncation invariance still holds.

**Absolute layout (ablation).** ``layout="absolute"`` indexes the slots by key position instead of
lag, oldest first: slot j is the key at position j and uses bank row j (positions ``j >= M`` have
no parameters). The operator of a prefix is still the top-left block of the operator of a longer
sequence, so the parallel form still equals token-by-token decoding, but a slot no longer means
"this far back": what R learns for slot j applies to whatever token sits at position j. At a full
window (T = M) this is the non-lag ablation of the paper's Table 1 (its code's identity aligner,
which slices the banks from the end of the window).

**Layouts.** Scores are computed in the standard layout (query row, key column) by one matmul,
moved into the lag layout by a row-dependent shift (:func:`to_lag_layout`; no index tensor, a
pad-and-reshape), mixed there, and moved back (:func:`from_lag_layout`) for the readout matmul.
``chunk_size=None`` processes all queries at once (``[B, H, Tq, Tk]`` per tensor); a chunk size
processes query blocks ``[i0, i1)`` against keys ``[0, i1)`` only, so at most ``chunk x Tk`` scores
per head exist at once; under autograd each block keeps only its inputs and is recomputed in
backward, which keeps the saved memory at the size of one block as well (the chunked form supports
first-order gradients; use the dense form for double backward).

**Padding.** Keys and values at padded positions are zeroed and outputs at padded queries are zero.
This is exact for right padding (a causal head never sees the future). Left padding is **not**
exactly invariant: R^(1) can move mass into padded slots, which then count in the norm and feed
R^(2), and the lag of every real key is shifted by the padding length.

Half-precision inputs are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._checks import check_mask, compute_dtype, guard_padded, padded_rows_to_zero

KINDS = ("relu", "glu")
#: how the slots of the sequence-mixing operators are indexed: by lag (newest first, the paper's
#: design) or by absolute key position (oldest first, the ablation)
LAYOUTS = ("lag", "absolute")
NORM_EPS = 1e-12
#: memory of one ``[B, H_qk, C, L]`` block of scores under ``chunk_size="auto"``: the block's passes
#: (shifts, sequence mixing, activation and their gradients) then run on data a CPU cache can hold,
#: which on the development CPU trained 2.5 times faster at T = 2,048 than blocks of 1,024 queries
AUTO_BLOCK_BYTES = 8 * 2**20
MIN_AUTO_ROWS = 16


def auto_chunk_rows(batch: int, heads: int, keys: int, itemsize: int = 4) -> int:
    """Query rows per block so that one block of scores takes about :data:`AUTO_BLOCK_BYTES`."""
    return max(MIN_AUTO_ROWS, AUTO_BLOCK_BYTES // max(1, batch * heads * keys * itemsize))


# -- layouts ---------------------------------------------------------------------------------------
def _shift_rows(x: torch.Tensor) -> torch.Tensor:
    """``out[..., c, m] = x[..., c, i0 + c - m]`` where ``i0 + c - m >= 0``, else 0; ``i0 = L - C``.

    ``x`` is ``[..., C, L]``. Flipping the columns turns this into a left shift of row c by
    ``C - 1 - c``, done with one right pad and a reshape of the flattened rows to a longer stride.
    The map is its own inverse on tensors that are zero where it writes zero.
    """
    C, L = x.shape[-2], x.shape[-1]
    if C > L:
        raise ValueError(f"a block of C = {C} query rows needs at least C key columns, got {L}")
    lead = x.shape[:-2]
    padded = F.pad(x.flip(-1), (0, C))  # [..., C, L + C]
    flat = padded.reshape(*lead, C * (L + C))
    start = C - 1
    out = flat[..., start:start + C * (L + C - 1)].reshape(*lead, C, L + C - 1)
    return out[..., :L]


def to_lag_layout(scores: torch.Tensor) -> torch.Tensor:
    """Standard layout ``[..., C, L]`` (query row c at absolute position ``i0 + c``, ``i0 = L - C``;
    key column j) to lag layout: ``out[..., c, l] = scores[..., c, i0 + c - l]`` for ``l <= i0 + c``
    and 0 for the lags that do not exist yet. Keys after the query are never read."""
    return _shift_rows(scores)


def from_lag_layout(weights: torch.Tensor) -> torch.Tensor:
    """Lag layout ``[..., C, L]`` back to the standard layout (inverse of :func:`to_lag_layout`):
    ``out[..., c, j] = weights[..., c, i0 + c - j]`` for ``j <= i0 + c``, 0 for future keys.
    ``weights`` must be zero at the invalid lags ``l > i0 + c``."""
    return _shift_rows(weights)


def _shift_left_rows(x: torch.Tensor) -> torch.Tensor:
    """``out[..., c, m] = x[..., c, m + C - 1 - c]`` (0 past the last column): row c moved left by
    ``C - 1 - c``. ``x`` is ``[..., C, L]``; one zero pad, then a strided view of it."""
    C, L = x.shape[-2], x.shape[-1]
    padded = F.pad(x, (0, C))  # [..., C, L + C]
    lead = padded.stride()[:-2]
    return padded.as_strided((*x.shape[:-2], C, L), (*lead, L + C - 1, 1), padded.storage_offset() + C - 1)


def _shift_right_rows(x: torch.Tensor) -> torch.Tensor:
    """``out[..., c, j] = x[..., c, j - (C - 1 - c)]`` (0 before the first column): the inverse of
    :func:`_shift_left_rows` on tensors that are zero where that one reads past the last column."""
    C, L = x.shape[-2], x.shape[-1]
    padded = F.pad(x, (C - 1, 0))  # [..., C, L + C - 1]
    lead = padded.stride()[:-2]
    return padded.as_strided((*x.shape[:-2], C, L), (*lead, L + C, 1), padded.storage_offset())


class _ShiftLeft(torch.autograd.Function):
    """:func:`_shift_left_rows` whose backward is the right shift (its adjoint on the entries it
    reads), instead of the generic strided-view backward (a zero tensor of the whole storage)."""

    @staticmethod
    def forward(ctx, x):
        return _shift_left_rows(x)

    @staticmethod
    def backward(ctx, grad):
        return _ShiftRight.apply(grad)


class _ShiftRight(torch.autograd.Function):
    """:func:`_shift_right_rows` with the left shift as its backward (see :class:`_ShiftLeft`)."""

    @staticmethod
    def forward(ctx, x):
        return _shift_right_rows(x)

    @staticmethod
    def backward(ctx, grad):
        return _ShiftLeft.apply(grad)


def valid_lags(rows: int, length: int, device=None) -> torch.Tensor:
    """Boolean ``[rows, length]``: True where lag l exists for query row c, i.e. ``l <= i0 + c`` with
    ``i0 = length - rows`` (queries end-aligned to the keys)."""
    c = torch.arange(rows, device=device).unsqueeze(1)
    lag = torch.arange(length, device=device).unsqueeze(0)
    return lag <= c + (length - rows)


# -- the DPLR sequence-mixing operator -------------------------------------------------------------
def dplr_apply(y: torch.Tensor, p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``y R`` with ``R = I + Diag(p) + A Diag(s) B^T`` (Lemma G.1), without forming R.

    Args:
        y: rows in the lag layout, ``[B, H, C, L]``.
        p: diagonal bank ``[H, M]``; a, b: low-rank banks ``[H, M, r]``; row l belongs to lag l.
            Lags ``l >= M`` have no parameters: p, A and B are zero there (R is the identity).
        s: per-row control ``[B, H, C, r]``.

    Returns ``y * (1 + p) + ((y A) * s) B^T`` shaped like ``y``.
    """
    L = y.shape[-1]
    M = min(L, p.shape[-1])
    p_l = p[:, :M]
    if M < L:
        p_l = F.pad(p_l, (0, L - M))
    low = torch.matmul(torch.matmul(y[..., :M], a[:, :M].unsqueeze(0)) * s, b[:, :M].transpose(-1, -2).unsqueeze(0))
    if M < L:
        low = F.pad(low, (0, L - M))
    return low.addcmul_(y, 1.0 + p_l[None, :, None, :])  # the diagonal part added in place: one pass


def dplr_matrix(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, length: int) -> torch.Tensor:
    """The explicit operator ``I + Diag(p) + A Diag(s) B^T`` on the first ``length`` lags.

    ``p`` ``[H, M]``, ``a, b`` ``[H, M, r]``, ``s`` ``[..., H, r]``; returns ``[..., H, length, length]``.
    Bank rows beyond ``M`` are zero (identity on lags without parameters).
    """
    H, M = p.shape
    r = a.shape[-1]
    p_full = torch.zeros(H, length, dtype=p.dtype, device=p.device)
    a_full = torch.zeros(H, length, r, dtype=a.dtype, device=a.device)
    b_full = torch.zeros(H, length, r, dtype=b.dtype, device=b.device)
    n = min(M, length)
    p_full[:, :n] = p[:, :n]
    a_full[:, :n] = a[:, :n]
    b_full[:, :n] = b[:, :n]
    eye = torch.eye(length, dtype=p.dtype, device=p.device)
    diag = eye + torch.diag_embed(p_full)  # [H, L, L]
    low = torch.einsum("hlr,...hr,hmr->...hlm", a_full, s, b_full)
    return diag + low


# -- validation ------------------------------------------------------------------------------------
def _check_bank(name, bank, heads, device):
    if bank is None:
        return None
    p, a, b = bank
    for pname, t in (("p", p), ("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}_{pname} must be a tensor, got {type(t).__name__}")
    if p.dim() != 2 or p.shape[0] != heads:
        raise ValueError(f"{name}_p must be shaped [H, M] with H = {heads}, got {tuple(p.shape)}")
    M = p.shape[1]
    for pname, t in (("a", a), ("b", b)):
        if t.dim() != 3 or t.shape[0] != heads or t.shape[1] != M:
            raise ValueError(f"{name}_{pname} must be shaped [H, M, r] = [{heads}, {M}, r], got {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name}_a and {name}_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return M, a.shape[2]


def _check_inputs(q, k, v, kind, s_qk, s_vo, qk_bank, vo_bank, q_mask, kv_mask, layout="lag"):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be shaped [B, T, H, D], got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    B, Tq, Hqk, Dk = q.shape
    if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must be shaped [B, Tk, H_qk, D_k] = [{B}, Tk, {Hqk}, {Dk}], got {tuple(k.shape)}")
    Tk = k.shape[1]
    H = v.shape[2]
    if v.shape[0] != B or v.shape[1] != Tk:
        raise ValueError(f"v must be shaped [B, Tk, H, D_v] with B = {B}, Tk = {Tk}, got {tuple(v.shape)}")
    expected = H if kind == "relu" else 2 * H
    if Hqk != expected:
        raise ValueError(f"kind {kind!r} needs {expected} query/key heads for {H} value heads, got {Hqk}")
    if Tq == 0 or Tk == 0:
        raise ValueError(f"sequence lengths must be at least 1, got Tq={Tq}, Tk={Tk}")
    if Tq > Tk:
        raise ValueError(f"causal heads need Tq <= Tk (queries end-aligned to keys), got Tq={Tq}, Tk={Tk}")
    for name, bank, s, heads in (("qk", qk_bank, s_qk, Hqk), ("vo", vo_bank, s_vo, H)):
        dims = _check_bank(name, bank, heads, q.device)
        if dims is None:
            continue
        r = dims[1]
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (B, Tq, heads, r):
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"s_{name} must be shaped [B, Tq, H, r] = [{B}, {Tq}, {heads}, {r}], got {shape}")
    check_mask(q_mask, B, Tq, "q_mask")
    check_mask(kv_mask, B, Tk, "kv_mask")


# -- activations -----------------------------------------------------------------------------------
def _l2_normalised_relu(h: torch.Tensor) -> torch.Tensor:
    """``ReLU(h) / max(||h||_2, 1e-12)`` over the last axis (zero slots add nothing: Eq. 34)."""
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return F.relu(h) * norm.reciprocal()  # one [.., 1] reciprocal: the backward multiplies, never divides


def _activate(h: torch.Tensor, kind: str, heads: int) -> torch.Tensor:
    """HyperMLP ``ReLU(h)/||h||``, or HyperGLU ``Softplus(h_scale) ReLU(h_gate)/||h_gate||`` with
    the query/key heads ordered ``[gate heads | scale heads]`` on dim 1."""
    if kind == "relu":
        return _l2_normalised_relu(h)
    gate, scale = h[:, :heads], h[:, heads:]
    return F.softplus(scale) * _l2_normalised_relu(gate)


# -- the fast forms --------------------------------------------------------------------------------
def _block(q, k, v, s_qk, s_vo, qk_p, qk_a, qk_b, vo_p, vo_a, vo_b, kind: str, layout: str = "lag"):
    """Query rows ``q`` ``[B, Hqk, C, Dk]`` at the last C of the ``L`` key positions of ``k``
    ``[B, Hqk, L, Dk]`` and ``v`` ``[B, H, L, Dv]``; returns ``[B, H, C, Dv]``."""
    C, L = q.shape[2], k.shape[2]
    H = v.shape[1]
    invalid = ~valid_lags(C, L, q.device)
    if layout == "absolute":
        # slots are key positions, in the standard layout: the mask of invalid lags is the mask of
        # future keys (column j is invalid for row c when j > i0 + c)
        z = torch.matmul(q, k.transpose(-1, -2)).masked_fill_(invalid, 0.0)
        if qk_p is not None:
            z = dplr_apply(z, qk_p, qk_a, qk_b, s_qk).masked_fill_(invalid, 0.0)
        w = _activate(z, kind, H)
        if vo_p is not None:
            w = dplr_apply(w, vo_p, vo_a, vo_b, s_vo).masked_fill_(invalid, 0.0)
        return torch.matmul(w, v)
    # with the keys in reverse order, the lag layout is a row-dependent left shift of the scores
    # (no flip of a C x L tensor): z[c, l] = q_c . k_{i0 + c - l}
    z = _ShiftLeft.apply(torch.matmul(q, k.flip(2).transpose(-1, -2)))  # [B, Hqk, C, L], zero at invalid lags
    if qk_p is not None:
        z = dplr_apply(z, qk_p, qk_a, qk_b, s_qk).masked_fill_(invalid, 0.0)
    w = _activate(z, kind, H)
    if vo_p is not None:
        w = dplr_apply(w, vo_p, vo_a, vo_b, s_vo).masked_fill_(invalid, 0.0)
    return torch.matmul(_ShiftRight.apply(w), v.flip(2))  # back to reversed key order for the readout


class _RecomputedBlock(torch.autograd.Function):
    """One query block of :func:`_block` that keeps only its inputs for backward and recomputes the
    block's scores there, so the chunked form never holds more than one block of scores."""

    @staticmethod
    def forward(ctx, kind, layout, *inputs):
        ctx.kind, ctx.layout = kind, layout
        ctx.present = [t is not None for t in inputs]
        ctx.save_for_backward(*[t for t in inputs if t is not None])
        with torch.no_grad():
            return _block(*inputs, kind, layout)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved).detach().requires_grad_(need) if present else None
                  for present, need in zip(ctx.present, ctx.needs_input_grad[2:])]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(())
        if wanted:
            with torch.enable_grad():
                out = _block(*inputs, ctx.kind, ctx.layout)
                # a scalar objective: the same vector-Jacobian product without explicit grad_outputs
                grads = iter(torch.autograd.grad((out * grad).sum(), wanted, allow_unused=True))
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (None, None, *result)


def hyper_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kind: str = "relu",
    s_qk: torch.Tensor | None = None,
    s_vo: torch.Tensor | None = None,
    qk_p: torch.Tensor | None = None,
    qk_a: torch.Tensor | None = None,
    qk_b: torch.Tensor | None = None,
    vo_p: torch.Tensor | None = None,
    vo_a: torch.Tensor | None = None,
    vo_b: torch.Tensor | None = None,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    layout: str = "lag",
) -> torch.Tensor:
    """Causal HyperMLP (``kind="relu"``) or HyperGLU (``kind="glu"``) heads.

    Args:
        q, k: ``[B, Tq, H_qk, D_k]`` and ``[B, Tk, H_qk, D_k]``; ``H_qk = H`` for relu, ``2H`` for
            glu (gate heads first, then scale heads; value head i pairs with gate head i and scale
            head H + i).
        v: ``[B, Tk, H, D_v]``. Queries are end-aligned to keys (query i at position i + Tk - Tq).
        s_qk, s_vo: controls ``s_t`` of R^(1) ``[B, Tq, H_qk, r]`` and R^(2) ``[B, Tq, H, r]``.
        qk_p, qk_a, qk_b: R^(1) banks ``[H_qk, M]``, ``[H_qk, M, r]``, ``[H_qk, M, r]`` indexed by
            lag; None (all three) leaves R^(1) the identity. vo_p, vo_a, vo_b: the same for R^(2)
            with H heads.
        q_mask, kv_mask: boolean ``[B, Tq]`` / ``[B, Tk]``, True = real token. Padded keys and
            values are zeroed, outputs at padded queries are zero (exact for right padding).
        chunk_size: None computes all queries at once; an int processes query blocks of that size
            against their key prefix only; ``"auto"`` picks the block from :data:`AUTO_BLOCK_BYTES`
            (all queries at once when they fit).
        layout: ``"lag"`` (bank row l for lag l, the paper's design) or ``"absolute"`` (bank row j for
            the key at position j, the ablation; see the module docstring).

    Returns ``[B, Tq, H, D_v]`` in the dtype of ``q``.
    """
    qk_bank = None if qk_p is None else (qk_p, qk_a, qk_b)
    vo_bank = None if vo_p is None else (vo_p, vo_a, vo_b)
    _check_inputs(q, k, v, kind, s_qk, s_vo, qk_bank, vo_bank, q_mask, kv_mask, layout)
    if chunk_size != "auto" and chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, None or 'auto', got {chunk_size!r}")
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    if chunk_size == "auto":
        rows = auto_chunk_rows(B, q.shape[2], Tk, torch.finfo(cdt).bits // 8)
        chunk_size = None if rows >= Tq else rows
    k = padded_rows_to_zero(k, kv_mask)
    v = padded_rows_to_zero(v, kv_mask)
    # a padded query's row is zero at the output; its inputs matter only if they are not finite
    q, s_qk, s_vo = (None if t is None else guard_padded(t, q_mask) for t in (q, s_qk, s_vo))

    def heads_first(t):
        return None if t is None else t.to(cdt).transpose(1, 2)

    def cast(t):
        return None if t is None else t.to(cdt)

    qh, kh, vh, sq, sv = (heads_first(t) for t in (q, k, v, s_qk, s_vo))
    params = tuple(cast(t) for t in (qk_p, qk_a, qk_b, vo_p, vo_a, vo_b))
    offset = Tk - Tq
    step = Tq if chunk_size is None else chunk_size
    recompute = chunk_size is not None and Tq > step and torch.is_grad_enabled()
    outs = []
    for i0 in range(0, Tq, step):
        i1 = min(Tq, i0 + step)
        args = (qh[:, :, i0:i1], kh[:, :, :offset + i1], vh[:, :, :offset + i1],
                None if sq is None else sq[:, :, i0:i1], None if sv is None else sv[:, :, i0:i1], *params)
        if recompute:
            outs.append(_RecomputedBlock.apply(kind, layout, *args))
        else:
            outs.append(_block(*args, kind, layout))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    out = padded_rows_to_zero(out.transpose(1, 2), q_mask)
    return out.to(out_dtype)


def hyper_attention_reference(q, k, v, *, kind="relu", s_qk=None, s_vo=None, qk_p=None, qk_a=None, qk_b=None,
                              vo_p=None, vo_a=None, vo_b=None, q_mask=None, kv_mask=None, chunk_size=None,
                              layout="lag"):
    """Per-token loop over the lag-ordered prefix (the position-ordered prefix with
    ``layout="absolute"``) with explicitly built t-by-t operators ``R = I + Diag(p) + A Diag(s_t) B^T``
    (same contract as :func:`hyper_attention`; ``chunk_size`` is ignored)."""
    qk_bank = None if qk_p is None else (qk_p, qk_a, qk_b)
    vo_bank = None if vo_p is None else (vo_p, vo_a, vo_b)
    _check_inputs(q, k, v, kind, s_qk, s_vo, qk_bank, vo_bank, q_mask, kv_mask, layout)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    B, Tq, Hqk, _ = q.shape
    Tk, H = k.shape[1], v.shape[2]
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    if kv_mask is not None:
        keep = kv_mask.to(cdt)[:, :, None, None]
        k, v = k * keep, v * keep
    rows = []
    for i in range(Tq):
        t = i + Tk - Tq  # absolute position of this query
        keys_lag = k[:, : t + 1].flip(1)  # [B, t+1, Hqk, Dk], row l = key at lag l
        values_lag = v[:, : t + 1].flip(1)
        if layout == "absolute":  # row j = key at position j
            keys_lag, values_lag = k[:, : t + 1], v[:, : t + 1]
        z = torch.einsum("bhd,blhd->bhl", q[:, i], keys_lag)
        if qk_p is not None:
            R1 = dplr_matrix(qk_p.to(cdt), qk_a.to(cdt), qk_b.to(cdt), s_qk[:, i].to(cdt), t + 1)
            z = torch.einsum("bhl,bhlm->bhm", z, R1)
        if kind == "relu":
            a = torch.relu(z) / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(NORM_EPS)
        else:
            gate, scale = z[:, :H], z[:, H:]
            norm = torch.linalg.vector_norm(gate, dim=-1, keepdim=True).clamp_min(NORM_EPS)
            a = F.softplus(scale) * torch.relu(gate) / norm
        if vo_p is not None:
            R2 = dplr_matrix(vo_p.to(cdt), vo_a.to(cdt), vo_b.to(cdt), s_vo[:, i].to(cdt), t + 1)
            a = torch.einsum("bhl,bhlm->bhm", a, R2)
        rows.append(torch.einsum("bhl,blhd->bhd", a, values_lag))
    out = torch.stack(rows, dim=1)
    if q_mask is not None:
        out = out * q_mask.to(cdt)[:, :, None, None]
    return out.to(out_dtype)
