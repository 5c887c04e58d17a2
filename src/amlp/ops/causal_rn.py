r"""CausalRN: the causal relation network with an exponential activation (arXiv 2406.16168).

A relation network pools a pair function over the context; CausalRN makes the output index the
query and masks the future (the CausalRN paper and the authors' code, ``FrankCuiCN/causal-relation-networks``):

    u_i = (1 / n_i) sum_{j <= i} g(x_i, x_j),        y_i = W_3 LN0(u_i) + b_3

with ``g(x_i, x_j) = exp(N_pre(a_i, b_j))``, ``a_i = W_1 LN0(x_i) + b_1`` and ``b_j = W_2 LN0(x_j)``
(both h-dimensional), ``n_i`` the number of keys pooled (i in the causal form, T in the bidirectional
one) and ``LN0`` the parameter-free layer norm over the h features (eps 0, see :func:`layer_norm0`).
The ops here take ``a`` and ``b`` (``[B, T, h]``, before any normalisation) and return the
post-normalised pool ``LN0(u)``; the projections live in the layer.

Two pre-activation normalisations (parameter-free, eps 0, as in the authors' code):

* **approx** (:func:`causal_rn_linear`): ``N_pre = LN0(a_i) + LN0(b_j)``, additively separable, so
  ``sum_j exp(a^_i + b^_j) = exp(a^_i) * sum_j exp(b^_j)`` (CausalRN paper, v2): a prefix sum, O(T h) time,
  and a recurrent state of h numbers.
* **exact** (:func:`causal_rn_quadratic`): ``N_pre = LN0(a_i + b_j)``, normalised per pair, which does
  not factorise: O(T^2 h) time; the memory is kept at O(chunk_size * T * h) by running over blocks
  of queries (recomputed in backward). Only the pair's variance needs the pair itself, and it comes
  from small products (``|a_i + b_j - mean|^2`` expands into two norms and a dot product), so a block's
  ``[B, C, T, h]`` tensor of pairs takes a handful of elementwise passes, forward and backward.

Ablations (CausalRN paper, v1): :func:`causal_rn_quadratic` also computes the other cells of the authors'
grid, ``prenorm`` in {exact, approx, none} x ``activation`` in {exp, relu, gelu, elu}, quadratically
(the default, exact + exp, is the path described above). The pooled vector is the mean of the
activated pairs over the keys a query may see, then LN0. Future and padded pairs are removed by
selection before the activation: their pre-activation becomes -inf for exp (exactly 0 after it)
and 0 for relu, gelu and elu (which map 0 to 0; a fill of -inf would not do for them:
``GELU(-inf)`` is NaN and ``ELU(-inf) = -1`` would add the number of masked keys to the pool), and
their gradient is selected out in backward. With exp and a pre-norm other than exact, each query's
terms are divided by ``exp(M_i)``, ``M_i`` its largest allowed pre-activation, which the
post-normalisation cancels; the other activations need no shift. Every cell runs through the same
pair pool (:class:`_PairPool`), whose backward forms the pairs again instead of keeping them.

Numerical stability (as in the authors' ``bar_linear.py`` and ``bar_quadratic.py``): both forms work
in the log domain. The post-normalisation is invariant to a positive factor per position (exactly,
since eps = 0), so each position's pooled vector is divided by ``exp(m_i)`` with ``m_i`` its largest
log-entry (detached) before the exponential; the division by ``n_i`` is cancelled by the same
argument and is not performed. The outputs are then finite whatever the length and the scale of the
inputs.

Padding: ``mask`` (``[B, T]``, True = real token) removes padded keys from every pool (in the
linear form their log weight is far below any reachable value, so their ``exp`` is exactly zero; in
the quadratic form padded tokens are replaced by zeros, by selection, before anything is computed
from them, and their pairs are selected out as above, so whatever they hold reaches no real output
or gradient); in the bidirectional
form each pool is the mean over the real tokens of its row. Outputs at padded positions are zero.
Half-precision inputs are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_mask, compute_dtype, padded_rows_to_zero

#: log weight given to padded keys: LN0 outputs are bounded by sqrt(h - 1) in absolute value, so
#: ``exp(MASKED_LOG_WEIGHT - max)`` underflows to exactly 0 in float32 and float64 for any h < 10^7.
MASKED_LOG_WEIGHT = -1.0e4

#: queries per block: "auto" sizes the blocks so one ``[B, C, T, h]`` tensor of pairs takes about
#: :data:`AUTO_BLOCK_BYTES`. Forward + backward, one thread of an AVX-512 CPU: at B 32, T 128, h 252
#: blocks of 4 / 8 / 16 / 32 queries (16 to 126 MiB) took 448 / 363 / 406 / 712 ms; at B 8, T 512,
#: h 64 blocks of 8 / 16 / 32 / 64 took 337 / 283 / 335 / 336 ms; blocks of one query cost 4 to 6
#: times the best
DEFAULT_CHUNK_SIZE = "auto"
AUTO_BLOCK_BYTES = 24 * 2**20


def auto_block_rows(batch: int, keys: int, hidden: int, itemsize: int = 4) -> int:
    """Queries per block so that one block of pairs takes about :data:`AUTO_BLOCK_BYTES` (at least 1)."""
    return max(1, AUTO_BLOCK_BYTES // max(1, batch * keys * hidden * itemsize))

#: pre-activation normalisations of the quadratic form (the authors' code): per pair, per side, none
PRENORMS = ("exact", "approx", "none")
#: activations of the quadratic form (the CausalRN paper's ablation; elu is in the authors' ablation code)
ACTIVATIONS = ("exp", "relu", "gelu", "elu")
_ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu, "elu": F.elu}


def layer_norm0_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """:func:`layer_norm0` written out as its definition, with autograd through every operation (the
    references use it)."""
    centred = x - x.mean(dim=dim, keepdim=True)
    var = centred.square().mean(dim=dim, keepdim=True)
    safe_var = torch.where(var > 0, var, torch.ones_like(var))
    return centred / safe_var.sqrt()


class _LayerNorm0(torch.autograd.Function):
    """LN0 with its backward written out: ``dx = r (g - mean(g) - y mean(g y))`` with ``y`` the output
    and ``r`` the inverse standard deviation (1 for a constant vector, whose output is 0, so the same
    formula gives the gradient of ``x - mean(x)`` there). Two passes forward, three backward, instead of
    the dozen operations autograd records for the definition."""

    @staticmethod
    def forward(ctx, x, dim):
        var, mean = torch.var_mean(x, dim=dim, correction=0, keepdim=True)
        inv_std = torch.where(var > 0, var.rsqrt(), torch.ones((), dtype=var.dtype, device=var.device))
        out = (x - mean).mul_(inv_std)
        ctx.dim = dim
        ctx.save_for_backward(out, inv_std)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out, inv_std = ctx.saved_tensors
        dim = ctx.dim
        centred_grad = grad - grad.mean(dim=dim, keepdim=True)
        return centred_grad.sub_(out * (grad * out).mean(dim=dim, keepdim=True)).mul_(inv_std), None


def layer_norm0(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Parameter-free layer norm with eps = 0: ``(x - mean(x)) / std(x)`` over ``dim`` (biased std).

    A constant vector (std exactly 0) maps to zeros rather than NaN, with finite gradients (those of
    ``x - mean(x)``); every other input is normalised exactly, so the map is invariant to a positive
    scale of ``x``. Computed with a written-out backward (:func:`layer_norm0_reference` is the
    definition); the gradient is not differentiable again.
    """
    return _LayerNorm0.apply(x, dim)


def _check_pair_features(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be shaped [B, T, h], got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape [B, T, h], got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.shape[1] == 0 or a.shape[2] == 0:
        raise ValueError(f"a and b need at least one token and one feature, got shape {tuple(a.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    check_mask(mask, a.shape[0], a.shape[1], "mask")


def _masked_log_weights(b_hat: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return b_hat
    return b_hat.masked_fill(~mask.unsqueeze(-1), MASKED_LOG_WEIGHT)


def _normalised_exp(log_u: torch.Tensor) -> torch.Tensor:
    """``LN0(exp(log_u))`` computed as ``LN0(exp(log_u - max))`` (max over features, detached)."""
    shift = log_u.detach().amax(dim=-1, keepdim=True)
    return layer_norm0(torch.exp(log_u - shift))


def _prefix_log_sum_exp(b_hat: torch.Tensor, hidden: int) -> torch.Tensor:
    """``logcumsumexp`` over dim 1 of LN0 outputs (``[B, T, h]``, padded keys at
    :data:`MASKED_LOG_WEIGHT`), as ``log(cumsum(exp(b^ - M))) + M`` with ``M`` the detached largest
    entry of each (row, feature) over the sequence.

    Exact for LN0 outputs: they lie within ``[-sqrt(h - 1), sqrt(h - 1)]``, so no real term falls more
    than ``2 sqrt(h - 1)`` below ``M`` and none of the exponentials underflow (float32 up to
    h = 1,601, float64 beyond; torch's ``logcumsumexp`` past h = 122,501). A prefix that holds only
    padded keys gets the log of the smallest normal number instead of ``-inf`` (its outputs are
    padded ones and set to zero). Several times faster than ``torch.logcumsumexp`` forward and
    backward on the CPU.
    """
    spread = 2.0 * math.sqrt(hidden - 1)
    if spread > 700.0:
        return torch.logcumsumexp(b_hat, dim=1)
    work = b_hat if spread <= 80.0 or b_hat.dtype == torch.float64 else b_hat.double()
    top = work.detach().amax(dim=1, keepdim=True)
    sums = torch.cumsum(torch.exp(work - top), dim=1)
    return (torch.log(sums.clamp_min(torch.finfo(sums.dtype).tiny)) + top).to(b_hat.dtype)


def causal_rn_linear(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Linear-time relation pool with the separable ("approx") pre-normalisation, post-normalised.

    ``LN0(u_i)`` with ``u_i = (1/n_i) sum_{j <= i} exp(LN0(a_i) + LN0(b_j))`` (causal) or the sum over
    every real j (bidirectional), computed as ``LN0(exp(a^_i + log S_i - m_i))`` with
    ``log S_i = logcumsumexp_{j <= i} b^_j`` (``logsumexp`` over all j when not causal; the prefix sums
    by :func:`_prefix_log_sum_exp`) and ``m_i`` the detached per-position maximum (as in the authors'
    ``bar_linear.py``). O(T h) time and memory.

    Args:
        a, b: ``[B, T, h]``, the two projections ``W_1 LN0(x) + b_1`` and ``W_2 LN0(x)``.
        mask: boolean ``[B, T]``, True = real token; padded keys are excluded from every pool.
        causal: pool over ``j <= i`` (True) or over the whole sequence (False).

    Returns ``[B, T, h]`` in the dtype of ``a``; zero at padded positions.
    """
    _check_pair_features(a, b, mask)
    out_dtype = a.dtype
    cdt = compute_dtype(a.dtype)
    a_hat = layer_norm0(a.to(cdt))
    b_hat = _masked_log_weights(layer_norm0(b.to(cdt)), mask)
    if causal:
        log_s = _prefix_log_sum_exp(b_hat, b_hat.shape[-1])
    else:
        log_s = torch.logsumexp(b_hat, dim=1, keepdim=True)
    out = _normalised_exp(a_hat + log_s)
    return padded_rows_to_zero(out, mask).to(out_dtype)


def causal_rn_linear_init_state(batch: int, hidden: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Empty recurrent state of :func:`causal_rn_linear_step`: ``log S_0 = -inf``, ``[B, h]``."""
    return torch.full((batch, hidden), float("-inf"), dtype=dtype, device=device)


def causal_rn_linear_step(a_t: torch.Tensor, b_t: torch.Tensor, log_s: torch.Tensor):
    """One token of the causal linear form, as a recurrence: ``log S_t = logaddexp(log S_{t-1}, b^_t)``,
    output ``LN0(exp(a^_t + log S_t - m_t))``.

    ``a_t, b_t`` are ``[B, h]``; ``log_s`` is the ``[B, h]`` state. Returns ``(out [B, h], log_s)``;
    the output is in the dtype of ``a_t`` and the state in float32 (or float64 for float64 inputs).
    """
    if a_t.dim() != 2 or a_t.shape != b_t.shape:
        raise ValueError(f"a_t and b_t must both be shaped [B, h], got {tuple(a_t.shape)} and {tuple(b_t.shape)}")
    if log_s.shape != a_t.shape:
        raise ValueError(f"state must be shaped [B, h] = {list(a_t.shape)}, got {tuple(log_s.shape)}")
    cdt = compute_dtype(a_t.dtype)
    log_s = torch.logaddexp(log_s.to(cdt), layer_norm0(b_t.to(cdt)))
    out = _normalised_exp(layer_norm0(a_t.to(cdt)) + log_s)
    return out.to(a_t.dtype), log_s


#: ``log2(e)``: the pairs are exponentiated as ``2^(x log2 e)``, which the CPU kernels compute several
#: times faster than ``exp(x)``, with the factor folded into each pair's scale
LOG2E = 1.4426950408889634


def _first_masked_key(allowed: torch.Tensor) -> int | None:
    """The first key column some query of the block may not see (None: every pair is allowed). The
    columns before it need no masking: in a causal block without padding, that is all but the last
    block-length keys."""
    cols = (~allowed).any(dim=1).any(dim=0).nonzero()
    return int(cols[0, 0]) if cols.numel() else None


class _PairInputs(NamedTuple):
    """Pair-function inputs, ``[B, T, h]``: ``x`` as the pairs use it (centred over the features for
    the exact pre-norm) and, for the exact pre-norm only, what the pair variances need: ``x`` in
    float64, so that the expansion of ``|ac_i + bc_j|^2`` cannot cancel, and its squared norms
    ``[B, T]`` (neither records a graph). Formed once per call; the blocks take views of it."""

    x: torch.Tensor
    x64: torch.Tensor | None = None
    sq: torch.Tensor | None = None

    @classmethod
    def of(cls, x: torch.Tensor, prenorm: str = "exact") -> "_PairInputs":
        if prenorm == "approx":
            return cls(layer_norm0(x))
        if prenorm == "none":
            return cls(x)
        centred = x - x.mean(dim=-1, keepdim=True)
        x64 = centred.detach().double()
        return cls(centred, x64, x64.square().sum(-1))

    def rows(self, start: int, stop: int) -> "_PairInputs":
        return _PairInputs(*(None if t is None else t[:, start:stop] for t in self))

    @property
    def shape(self) -> torch.Size:
        return self.x.shape


#: a pair whose variance is below this fraction of ``|ac_i|^2 + |bc_j|^2`` counts as constant: its
#: centred sum, relative to its parts, is below 1e-7, where float32 cannot tell it from rounding (and
#: where the float64 expansion of the variance would be all rounding when the sum is exactly 0)
CONSTANT_PAIR = 1e-14


def _pair_scales(a64, b64, a_sq, b_sq, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, not constant)``, ``[B, C, S]``: ``r_ij = 1 / sqrt(var_ij)`` from the pair variance
    ``var_ij = (|ac_i|^2 + |bc_j|^2 + 2 ac_i . bc_j) / h``, computed in float64 and returned in
    ``dtype``. A constant pair (see :data:`CONSTANT_PAIR`) gets r = 1, as :func:`layer_norm0` treats a
    zero variance: its centred sum is 0, so LN0 gives zeros, and no gradient goes through r."""
    norms = a_sq.unsqueeze(2) + b_sq.unsqueeze(1)
    var = torch.baddbmm(norms, a64, b64.transpose(1, 2), alpha=2.0)
    positive = var > norms.mul_(CONSTANT_PAIR)
    r64 = torch.where(positive, var.div_(a64.shape[-1]), torch.ones((), dtype=var.dtype, device=var.device)).rsqrt_()
    return r64.to(dtype), positive


def _pairs(x, y, scale, allowed, first: int | None, fill: float) -> torch.Tensor:
    """``scale_ij (x_i + y_j)`` for every pair of the block, ``[B, C, S, h]`` (``scale`` ``[B, C, S]``
    or a number), with ``fill`` where a pair is not allowed (selected, so nothing is computed from
    what a masked pair holds). A new tensor: the callers work on it in place."""
    pair = x.unsqueeze(2) + y.unsqueeze(1)
    if isinstance(scale, torch.Tensor):
        pair.mul_(scale.unsqueeze(-1))
    elif scale != 1.0:
        pair.mul_(scale)
    if first is not None:
        pair[:, :, first:].masked_fill_(~allowed[:, :, first:].unsqueeze(-1), fill)
    return pair


def _sum_over_queries(w: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """``sum_i r_ij w_ijk`` (or ``sum_i w_ijk`` without ``r``), ``[B, S, h]``: one slice of queries at
    a time, which runs several times faster than a reduction over the second dimension."""
    out = w[:, 0] * r[:, 0].unsqueeze(-1) if r is not None else w[:, 0].clone()
    for i in range(1, w.shape[1]):
        if r is not None:
            out.addcmul_(w[:, i], r[:, i].unsqueeze(-1))
        else:
            out.add_(w[:, i])
    return out


def _activation_vjp(grad: torch.Tensor, pair: torch.Tensor, activation: str) -> torch.Tensor:
    """``grad * act'(pair)`` for relu, gelu (exact) and elu (alpha 1), fused by the backward kernels."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, pair, 0)
    if activation == "gelu":  # the oneDNN kernel does not broadcast its gradient
        return torch.ops.aten.gelu_backward(grad.expand_as(pair).contiguous(), pair)
    return torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, False, pair)


class _PairPool(torch.autograd.Function):
    r"""The pool of one block of queries, ``[B, C, h]``, over the allowed keys j of each query i:

    * ``activation == "exp"``: ``log sum_j exp(N_ij)`` (``-inf`` for a query with no allowed key);
    * otherwise: ``sum_j act(N_ij)``;

    with ``N_ij`` the pre-activation of the pair: ``LN0(a_i + b_j) = r_ij (ac_i + bc_j)`` for the
    exact pre-norm (``r`` from :func:`_pair_scales`, ``ac``, ``bc`` the centred inputs), ``a_i + b_j``
    otherwise (the inputs already normalised for the approx pre-norm); see :class:`_PairInputs`.

    Exponentials are taken as powers of 2, which the CPU kernels compute several times faster, with
    ``log2(e)`` folded into the scale. Every term is shifted by a bound of the largest one: for the
    exact pre-norm the bound of LN0, ``sqrt(h - 1)``, so every term is in ``[exp(-2 sqrt(h - 1)), 1]``,
    which float32 holds without underflow up to h of about 1,900 (beyond, a vanishing term may
    round to 0, and a feature whose terms all do gets ``-inf``, which the normalisation after it
    maps to 0); otherwise the largest allowed pre-activation of the query.

    No pair is kept, and of the ``[B, C, S]`` tensors only the mask: backward forms the scales and
    the pairs again, and its terms are written out. With ``G = d loss / d out`` and
    ``D_ijk = G_ik act'(N_ijk)`` (for exp, ``G_ik`` times the softmax over j of the pairs),

        d x_ik   = sum_j r_ij D_ijk                      (a batched matrix product)
        d y_jk   = sum_i r_ij D_ijk                      (a sum over the block's queries)
        d r_ij   = sum_k D_ijk (ac_ik + bc_jk)           (a matrix product and a reduction)
        d var_ij = -r_ij^3 d r_ij / (2 h), which reaches ac and bc through two more small products,

    (r = 1 and no ``d r`` without the exact pre-norm). Pairs that are not allowed pass no gradient.
    """

    @staticmethod
    def forward(ctx, x, y, x64, y64, x_sq, y_sq, allowed, activation):
        exact = x64 is not None
        first = _first_masked_key(allowed)
        ctx.first, ctx.activation = first, activation
        r = _pair_scales(x64, y64, x_sq, y_sq, x.dtype)[0] if exact else None
        if activation != "exp":
            # a pair that is not allowed is 0 before the activation, and act(0) = 0 for relu, gelu, elu
            ctx.save_for_backward(x, y, x64, y64, x_sq, y_sq, allowed)
            return _ACTIVATION_FNS[activation](_pairs(x, y, 1.0 if r is None else r, allowed, first, 0.0)).sum(2)
        if exact:
            shift = math.sqrt(max(x.shape[-1] - 1, 0))
            pair = _pairs(x, y, r * LOG2E, allowed, first, float("-inf")).sub_(shift * LOG2E)
        else:
            pair = _pairs(x, y, LOG2E, allowed, first, float("-inf"))
            shift2 = pair.amax(dim=(2, 3), keepdim=True)
            shift2 = torch.where(torch.isfinite(shift2), shift2, 0.0)  # a query with no key at all
            pair.sub_(shift2)
            shift = shift2.view(shift2.shape[:2] + (1,)) / LOG2E
        out = pair.exp2_().sum(2).log_().add_(shift)
        ctx.save_for_backward(x, y, x64, y64, x_sq, y_sq, allowed, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, y, x64, y64, x_sq, y_sq, allowed, *out = ctx.saved_tensors
        exact = x64 is not None
        r, positive = _pair_scales(x64, y64, x_sq, y_sq, x.dtype) if exact else (None, None)
        if ctx.activation == "exp":
            out = out[0]
            # D = G exp(pair - out); where out is -inf (no term survived) the weights are 0
            norm2 = torch.where(torch.isfinite(out), out * LOG2E, float("inf")).unsqueeze(2)
            w = _pairs(x, y, LOG2E if r is None else r * LOG2E, allowed, ctx.first, float("-inf"))
            w.sub_(norm2).exp2_()
            if exact:  # two contractions before G enters, while w holds the softmax weights
                B, C, S, h = w.shape
                flat = w.view(B * C, S, h)
                d_x = grad * torch.bmm(r.reshape(B * C, 1, S), flat).view(B, C, h)
                d_r = torch.bmm(flat, (grad * x).reshape(B * C, h, 1)).view(B, C, S)
            w.mul_(grad.unsqueeze(2))
        else:
            pair = _pairs(x, y, 1.0 if r is None else r, allowed, ctx.first, 0.0)
            w = _activation_vjp(grad.unsqueeze(2), pair, ctx.activation)
            del pair
            if ctx.first is not None:
                w[:, :, ctx.first:].masked_fill_(~allowed[:, :, ctx.first:].unsqueeze(-1), 0.0)
            if exact:
                B, C, S, h = w.shape
                d_x = torch.bmm(r.reshape(B * C, 1, S), w.view(B * C, S, h)).view(B, C, h)
                d_r = torch.bmm(w.view(B * C, S, h), x.reshape(B * C, h, 1)).view(B, C, S)
        d_y = _sum_over_queries(w, r)
        if not exact:
            return w.sum(2), d_y, None, None, None, None, None, None
        d_r += (w * y.unsqueeze(1)).sum(-1)
        del w
        # through the variance: var_ij = (|ac_i|^2 + |bc_j|^2 + 2 ac_i . bc_j) / h
        d_var = torch.where(positive, d_r * r.pow(3) * (-1.0 / x.shape[-1]), r.new_zeros(()))
        d_x += d_var.sum(2, keepdim=True) * x + torch.bmm(d_var, y)
        d_y += d_var.sum(1).unsqueeze(-1) * y + torch.bmm(d_var.transpose(1, 2), x)
        return d_x, d_y, None, None, None, None, None, None


def _pair_pool_block(a: _PairInputs, b: _PairInputs, allowed: torch.Tensor, activation: str = "exp") -> torch.Tensor:
    """``LN0`` of ``(1/n_i) sum_j act(N_pre(a_i, b_j))`` over the allowed keys, for one block of
    queries: ``a`` ``[B, C, h]``, ``b`` ``[B, S, h]`` (prepared for the pre-norm, see :class:`_PairInputs`),
    ``allowed`` bool ``[B, C, S]``. A query with no allowed key gets zeros. With exp the pool is
    formed in the log domain, shifted per position, and not divided by n_i: the post-LN0 cancels
    positive factors per position exactly."""
    pooled = _PairPool.apply(a.x, b.x, a.x64, b.x64, a.sq, b.sq, allowed, activation)
    zero = torch.zeros((), dtype=pooled.dtype, device=pooled.device)
    if activation == "exp":
        return _normalised_exp(torch.where(allowed.any(dim=-1, keepdim=True), pooled, zero))
    n_keys = allowed.sum(-1, keepdim=True).clamp_min(1).to(pooled.dtype)  # [B, C, 1]
    return layer_norm0(pooled / n_keys)


def check_ablation(prenorm: str, activation: str) -> None:
    """Raise ``ValueError`` unless ``prenorm`` is one of :data:`PRENORMS` and ``activation`` one of
    :data:`ACTIVATIONS`."""
    if not isinstance(prenorm, str) or prenorm not in PRENORMS:
        raise ValueError(f"prenorm must be one of {', '.join(map(repr, PRENORMS))}, got {prenorm!r}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")


def causal_rn_quadratic(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    chunk_size: int | str = DEFAULT_CHUNK_SIZE,
    recompute: bool | None = None,
    prenorm: str = "exact",
    activation: str = "exp",
) -> torch.Tensor:
    """Relation pool with the exact per-pair pre-normalisation, post-normalised (the authors' quadratic RN).

    ``LN0(u_i)`` with ``u_i = (1/n_i) sum_{j <= i} exp(LN0(a_i + b_j))`` (all real j when not causal),
    computed stably as ``LN0(exp(logsumexp_j LN0(a_i + b_j) - m_i))`` (as in the authors'
    ``bar_quadratic.py``). O(T^2 h) time.

    Queries run in blocks of ``chunk_size``; a block of queries meets only the keys it may see, so
    the largest tensor is ``[B, chunk_size, T, h]``, never ``[B, T, T, h]``, and backward forms each
    block's pairs again instead of keeping them (:class:`_PairPool`), so training memory stays at one
    block as well.

    The ablation grid of the CausalRN paper (``u_i = (1/n_i) sum_{j <= i} act(N_pre(a_i, b_j))``, every cell
    quadratic, see the module docstring):

    * ``prenorm``: ``"exact"`` ``LN0(a_i + b_j)`` (default), ``"approx"`` ``LN0(a_i) + LN0(b_j)`` (the
      pre-norm of :func:`causal_rn_linear`, here computed pair by pair) or ``"none"`` ``a_i + b_j``;
    * ``activation``: ``"exp"`` (default), ``"relu"``, ``"gelu"`` (exact, erf) or ``"elu"`` (alpha 1).

    Args:
        a, b, mask, causal: as in :func:`causal_rn_linear`.
        chunk_size: queries per block (>= 1), or ``"auto"`` (the default: from
            :data:`AUTO_BLOCK_BYTES`).
        recompute: accepted for compatibility and without effect: no block keeps its pairs for
            backward (backward forms them again), so training memory stays at one block.
        prenorm, activation: the ablation cell (default ``exact`` + ``exp``, the form above).

    Returns ``[B, T, h]`` in the dtype of ``a``; zero at padded positions.
    """
    _check_pair_features(a, b, mask)
    if chunk_size != "auto" and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or 'auto', got {chunk_size!r}")
    check_ablation(prenorm, activation)
    B, T, h = a.shape
    out_dtype = a.dtype
    cdt = compute_dtype(a.dtype)
    if chunk_size == "auto":
        chunk_size = auto_block_rows(B, T, h, torch.finfo(cdt).bits // 8)
    a, b = a.to(cdt), b.to(cdt)
    if mask is not None:  # padded tokens enter nothing, whatever they hold (NaN included)
        zero = torch.zeros((), dtype=cdt, device=a.device)
        a = torch.where(mask.unsqueeze(-1), a, zero)
        b = torch.where(mask.unsqueeze(-1), b, zero)
    key_ok = torch.ones(B, T, dtype=torch.bool, device=a.device) if mask is None else mask
    positions = torch.arange(T, device=a.device)
    a, b = _PairInputs.of(a, prenorm), _PairInputs.of(b, prenorm)
    blocks = []
    for start in range(0, T, chunk_size):
        stop = min(start + chunk_size, T)
        n_keys = stop if causal else T
        allowed = key_ok[:, None, :n_keys].expand(B, stop - start, n_keys)
        if causal:
            allowed = allowed & (positions[None, :n_keys] <= positions[start:stop, None]).unsqueeze(0)
        blocks.append(_pair_pool_block(a.rows(start, stop), b.rows(0, n_keys), allowed, activation))
    out = torch.cat(blocks, dim=1)
    return padded_rows_to_zero(out, mask).to(out_dtype)


def causal_rn_quadratic_step(a_t: torch.Tensor, b_cache: torch.Tensor, *, prenorm: str = "exact",
                             activation: str = "exp") -> torch.Tensor:
    """One token of the causal quadratic form, for decoding: ``a_t`` ``[B, h]`` against the cache of
    every ``b_j`` so far including the current one, ``[B, t, h]`` (the raw ``b_j``, whatever the
    ``prenorm``). Returns ``LN0(u_t)`` ``[B, h]``; ``prenorm`` and ``activation`` as in
    :func:`causal_rn_quadratic`."""
    if a_t.dim() != 2 or b_cache.dim() != 3 or b_cache.shape[0] != a_t.shape[0] or b_cache.shape[2] != a_t.shape[1]:
        raise ValueError(f"a_t must be [B, h] and b_cache [B, t, h], got {tuple(a_t.shape)} and {tuple(b_cache.shape)}")
    check_ablation(prenorm, activation)
    out_dtype = a_t.dtype
    cdt = compute_dtype(a_t.dtype)
    B, t, _ = b_cache.shape
    allowed = torch.ones(B, 1, t, dtype=torch.bool, device=a_t.device)
    out = _pair_pool_block(_PairInputs.of(a_t.to(cdt).unsqueeze(1), prenorm), _PairInputs.of(b_cache.to(cdt), prenorm),
                           allowed, activation)
    return out[:, 0].to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Plain references: the explicit pairwise tensor, no stabilisation, the mean taken literally.


def _pair_weights(mask: torch.Tensor | None, B: int, T: int, causal: bool, dtype, device) -> torch.Tensor:
    """``[B, T, T]`` weights ``w[b, i, j] = 1/n_i`` for the keys query i pools, 0 elsewhere."""
    keep = torch.ones(B, T, T, dtype=dtype, device=device)
    if causal:
        keep = keep * torch.tril(torch.ones(T, T, dtype=dtype, device=device))
    if mask is not None:
        keep = keep * mask[:, None, :].to(dtype)
    return keep / keep.sum(-1, keepdim=True).clamp_min(1.0)


def _post_normalise(pairs: torch.Tensor, mask, causal, activation=torch.exp) -> torch.Tensor:
    B, T = pairs.shape[:2]
    w = _pair_weights(mask, B, T, causal, pairs.dtype, pairs.device)
    u = torch.einsum("bij,bijh->bih", w, activation(pairs))  # the masked pairs get weight 0 after the activation
    out = layer_norm0_reference(u)
    if mask is not None:
        out = out * mask[:, :, None].to(out.dtype)
    return out


def causal_rn_linear_reference(a, b, *, mask=None, causal=True):
    """Reference: ``LN0((1/n_i) sum_j exp(LN0(a_i) + LN0(b_j)))`` over an explicit ``[B, T, T, h]``
    tensor of pairs, without any stabilisation."""
    a_hat, b_hat = layer_norm0_reference(a), layer_norm0_reference(b)
    pairs = a_hat[:, :, None, :] + b_hat[:, None, :, :]
    return _post_normalise(pairs, mask, causal)


def causal_rn_quadratic_reference(a, b, *, mask=None, causal=True, prenorm="exact", activation="exp"):
    """Reference: ``LN0((1/n_i) sum_j exp(LN0(a_i + b_j)))`` over an explicit ``[B, T, T, h]`` tensor
    of pairs, without any stabilisation; ``prenorm`` and ``activation`` select the other cells of the
    ablation grid (``act(LN0(a_i) + LN0(b_j))``, ``act(a_i + b_j)``; see :func:`causal_rn_quadratic`)."""
    check_ablation(prenorm, activation)
    if prenorm == "exact":
        pairs = layer_norm0_reference(a[:, :, None, :] + b[:, None, :, :])
    elif prenorm == "approx":
        pairs = layer_norm0_reference(a)[:, :, None, :] + layer_norm0_reference(b)[:, None, :, :]
    else:
        pairs = a[:, :, None, :] + b[:, None, :, :]
    return _post_normalise(pairs, mask, causal, torch.exp if activation == "exp" else _ACTIVATION_FNS[activation])
