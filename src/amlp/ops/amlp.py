r"""AMLP-Cov and AMLP-PQuery (Attentive MLP, arXiv 2310.09512, section 2.3).

Both compute a two-layer MLP whose weights come from the context (eq. 8):

    AMLP(Q; K, V) = sigma_1(Q W_QK) W_QKV,    W_QK = L in R^{D x c},  W_QKV in R^{c x D}

**AMLP-Cov** (eqs. 9-10) builds ``L`` from feature covariances:

    L^T   = C_q sigma_2(Q^T Q) + C_k sigma_2(K^T K)          (c x D)
    W_QKV = L^T sigma_2(K^T V)                               (c x D)

**AMLP-PQuery** (eqs. 11-12) pools ``c`` pseudo-queries over positions:

    L^T   = [sigma_2(C_q Q^T) Q ; sigma_2(C_k K^T) K] W      (c x 2D) (2D x D)
    W_QKV = sigma_2(L^T K^T) V                               (c x D)

``sigma_2`` is a row-wise softmax and ``sigma_1`` is chosen by ``activation`` (softmax over the c
hidden units by default). Time and memory are linear in the sequence length.

Forms
-----
``form="paper"`` is the equations as printed: raw Gram matrices, unscaled logits (``scale``
overrides the sigma_1 logit scale only).

``form="official"`` is the computation of the authors' released code (``Shark-NLP/AttentiveMLP``,
``amlp.py``, read line by line). For Cov: every feature column of Q, K and V is L2-normalised over the
(real) positions before its Gram matrix, each Gram matrix has a learned per-head temperature, a ReLU
follows ``L^T``, the value map enters transposed (``W_QKV = L^T sigma_2(K^T V)^T``: L contracts the
V-feature axis and the output is indexed by the K-feature axis, as the released Cov computes it), and
the readout uses the raw queries with logits scaled by ``1/sqrt(D)``. For PQuery the released code
computes the printed equations (unscaled pooling logits, no temperatures, sigma_1 unscaled unless
``scale`` is given), so the official op equals the paper op; the released layer's options (LayerNorm
on each head's output, the conv branch, EMA centring of q, ``add_norm``) live in
:class:`amlp.layers.AMLP`. ``l_norm`` (the released ``w_norm`` of ``add_norm``) is a LayerNorm on the
rows of ``L^T``, before the ReLU in Cov.

``form="stable"`` makes the op invariant to the length of the sequence
and to the scale of q, k and v, which the paper form is not: its Gram matrices grow like ``T *
|x|^2``, so ``sigma_2`` of them saturates into a one-hot on long or large inputs and the
gradient through it vanishes. The remedies are the project's own, built on two of the released
code's (column normalisation and temperatures, which that code applies to Cov only):

* every feature column of Q, K and V is normalised over the (real) positions of the sequence, so
  the Gram matrices become cosine similarities between feature columns, bounded in [-1, 1]
  whatever T is (Cov); the same normalised columns are pooled in PQuery;
* each sigma_2 map has a learned per-head temperature (``temperature``, ``[H, 3]``), so the model
  can still choose how peaked the maps are;
* Cov applies a ReLU to ``L^T``; sigma_1 logits are scaled by ``1/sqrt(D)`` and the readout uses
  the column-normalised queries (root-mean-square 1), so the readout is scale free as well.

The stable Cov keeps the printed value map ``L^T sigma_2(K^T V)``, where the released code
transposes it; ``docs/amlp_forms.md`` lists every difference between the three forms.

The layers add a LayerNorm on each head's output (as the released code does). Normalising the
columns costs two extra reductions over T and is folded into the small ``c x D`` matrices, so no
normalised copy of Q, K or V is ever made.

Padding: padded queries and keys take no part in any statistic; outputs at padded queries are zero,
and every output of a batch row whose keys are all padding is zero.

Implementation: the only steps that touch T are Gram matrices (a custom autograd function that keeps
only its inputs for backward), column sums of squares, and softmax poolings over positions, which
run on :func:`torch.nn.functional.scaled_dot_product_attention` (a fused kernel that keeps no
T-by-c probability matrix for backward). Everything else is on ``c x D`` or ``D x D`` tensors.
Half-precision inputs are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import (check_landmarks, check_mask, check_qkv, compute_dtype, padded_rows_to_zero, real_counts,
                      select_real_rows)
from . import _sequence_passes as passes
from ._common import activate, check_activation, column_scale

FORMS = ("paper", "official", "stable")
DEFAULT_EPS = 1e-6


def _check_common(q, k, v, q_mask, kv_mask, activation, form, temperature, l_norm=None):
    check_qkv(q, k, v)
    B, Tq, H, D = q.shape
    check_mask(q_mask, B, Tq, "q_mask")
    check_mask(kv_mask, B, k.shape[1], "kv_mask")
    check_activation(activation)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if temperature is not None and (not isinstance(temperature, torch.Tensor) or tuple(temperature.shape) != (H, 3)):
        shape = tuple(temperature.shape) if isinstance(temperature, torch.Tensor) else type(temperature).__name__
        raise ValueError(f"temperature must be shaped [H, 3] = [{H}, 3], got {shape}")
    if l_norm is not None:
        if not isinstance(l_norm, (tuple, list)) or len(l_norm) != 2:
            raise ValueError("l_norm must be a pair (weight, bias) of LayerNorm parameters shaped [D], got "
                             f"{type(l_norm).__name__}")
        for name, t in zip(("weight", "bias"), l_norm):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (D,):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"l_norm {name} must be shaped [D] = [{D}], got {shape}")


def _norm_rows(l_t, ln_w, ln_b):
    """The optional LayerNorm over the feature axis of each row of ``L^T`` (released ``w_norm``)."""
    return l_t if ln_w is None else F.layer_norm(l_t, (l_t.shape[-1],), ln_w, ln_b)


def _split_norm(l_norm, dtype):
    return (None, None) if l_norm is None else (l_norm[0].to(dtype), l_norm[1].to(dtype))


def _temperatures(temperature, H, dtype, device):
    if temperature is None:
        return torch.ones(H, 3, dtype=dtype, device=device)
    return temperature.to(dtype)


def _finish(out, q_mask, kv_mask, dtype):
    """Zero padded queries and rows without any real key; cast back to the input dtype."""
    B, Tq = out.shape[:2]
    if kv_mask is not None:
        has_keys = kv_mask.any(1)
        if not bool(has_keys.all()):
            out = padded_rows_to_zero(out, has_keys.unsqueeze(1).expand(B, Tq))
    out = padded_rows_to_zero(out, q_mask)
    return out.to(dtype)


def _cov_maps(g_q, g_k, g_kv, s_v, tau, form, eps):
    """The three sigma_2 maps of AMLP-Cov, ``[B, H, D, D]`` each, and the query column norms
    (None in the paper form)."""
    H = tau.shape[0]
    if form == "paper":
        s_q, s_k, s_kv, n_q = g_q, g_k, g_kv, None
    else:
        n_q = g_q.diagonal(dim1=-2, dim2=-1).clamp_min(eps * eps).sqrt()  # column norms [B, H, D]
        n_k = g_k.diagonal(dim1=-2, dim2=-1).clamp_min(eps * eps).sqrt()
        n_v = s_v.clamp_min(eps * eps).sqrt()
        s_q = g_q / (n_q.unsqueeze(-1) * n_q.unsqueeze(-2))  # cosine similarities of feature columns
        s_k = g_k / (n_k.unsqueeze(-1) * n_k.unsqueeze(-2))
        s_kv = g_kv / (n_k.unsqueeze(-1) * n_v.unsqueeze(-2))
    t = tau.view(1, H, 3, 1, 1)
    maps = tuple(torch.softmax(s * t[:, :, i], dim=-1) for i, s in enumerate((s_q, s_k, s_kv)))
    return maps, n_q


def _cov_weights(g_q, g_k, g_kv, s_v, count_q, cq, ck, tau, ln_w, ln_b, form, eps, scale):
    """The small half of AMLP-Cov: from the Gram matrices to the readout's keys ``L^T`` (with the
    column scale of the queries folded in, stable form) and values ``W_QKV``, both ``[B, H, c, D]``."""
    (map_q, map_k, map_kv), n_q = _cov_maps(g_q, g_k, g_kv, s_v, tau, form, eps)
    l_t = torch.einsum("hcd,bhde->bhce", cq, map_q) + torch.einsum("hcd,bhde->bhce", ck, map_k)  # L^T, eq. 9
    l_t = _norm_rows(l_t, ln_w, ln_b)
    if form == "paper":
        return l_t, l_t @ map_kv, (1.0 if scale is None else float(scale))
    l_t = F.relu(l_t)
    if form == "official":
        # the released code's value map: (sigma_2(K^T V) L)^T = L^T sigma_2(K^T V)^T; raw queries
        read_scale = 1.0 / math.sqrt(cq.shape[-1]) if scale is None else float(scale)
        return l_t, l_t @ map_kv.transpose(-1, -2), read_scale
    values = l_t @ map_kv  # W_QKV, eq. 10
    keys = l_t * (count_q.sqrt()[:, None, None] / n_q).unsqueeze(-2)  # unit-RMS query columns, folded in
    read_scale = 1.0 / math.sqrt(cq.shape[-1]) if scale is None else float(scale)
    return keys, values, read_scale


def amlp_cov_maps(q, k, v, *, q_mask=None, kv_mask=None, form="stable", temperature=None, eps=DEFAULT_EPS):
    """Diagnostic: the three sigma_2 maps of AMLP-Cov, ``sigma_2(Q^T Q)``, ``sigma_2(K^T K)`` and
    ``sigma_2(K^T V)`` (normalised and tempered as in ``form``), each ``[B, H, D, D]``.

    A row whose maximum is close to 1 has collapsed into a one-hot, which is what the paper form
    does on long or large inputs and the stable form avoids.
    """
    _check_common(q, k, v, q_mask, kv_mask, "softmax", form, temperature)
    cdt = compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    tau = _temperatures(temperature, q.shape[2], cdt, q.device)
    s_v = passes.sumsq(v, kv_mask) if form != "paper" else None
    maps, _ = _cov_maps(passes.gram(q, q, q_mask), passes.gram(k, k, kv_mask), passes.gram(k, v, kv_mask), s_v,
                        tau, form, eps)
    return maps


def _small_leaves(*tensors):
    return [None if t is None else t.detach().requires_grad_(True) for t in tensors]


class _AMLPCovFunction(torch.autograd.Function):
    """AMLP-Cov with a hand-written backward over the sequence: only the inputs and the ``D x D``
    Gram matrices are kept; the small ``c x D`` graph is recomputed and differentiated by autograd,
    the passes over T accumulate straight into the input gradients."""

    @staticmethod
    def forward(ctx, q, k, v, cq, ck, tau, ln_w, ln_b, q_mask, kv_mask, activation, form, eps, scale):
        g_q = passes.gram(q, q, q_mask)
        g_k = passes.gram(k, k, kv_mask)
        g_kv = passes.gram(k, v, kv_mask)
        s_v = passes.sumsq(v, kv_mask) if form != "paper" else None
        count_q = real_counts(q_mask, q.shape[0], q.shape[1], q.dtype, q.device)
        keys, values, read_scale = _cov_weights(g_q, g_k, g_kv, s_v, count_q, cq, ck, tau, ln_w, ln_b, form, eps,
                                                scale)
        ctx.save_for_backward(q, k, v, cq, ck, tau, ln_w, ln_b, g_q, g_k, g_kv, s_v, count_q, q_mask, kv_mask)
        ctx.options = (activation, form, eps, scale)
        return passes.readout(q, keys, values, activation, read_scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, cq, ck, tau, ln_w, ln_b, g_q, g_k, g_kv, s_v, count_q, q_mask, kv_mask = ctx.saved_tensors
        activation, form, eps, scale = ctx.options
        leaves = _small_leaves(g_q, g_k, g_kv, s_v, cq, ck, tau, ln_w, ln_b)
        with torch.enable_grad():
            keys, values, read_scale = _cov_weights(*leaves[:4], count_q, *leaves[4:], form, eps, scale)
        grad_q = torch.empty_like(q)
        d_keys, d_values = passes.readout_vjp(grad_out, q, keys.detach(), values.detach(), activation, read_scale,
                                              grad_q, first=True)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad([keys, values], wanted, [d_keys, d_values], allow_unused=True))
        dg_q, dg_k, dg_kv, ds_v, d_cq, d_ck, d_tau, d_lnw, d_lnb = (None if t is None else next(grads) for t in leaves)
        passes.add_linear_vjp(grad_q, (q,), (dg_q + dg_q.transpose(-1, -2),), q_mask)
        grad_k = torch.empty_like(k)
        passes.add_linear_vjp(grad_k, (k, v), (dg_k + dg_k.transpose(-1, -2), dg_kv.transpose(-1, -2)), kv_mask,
                              first=True)
        grad_v = torch.empty_like(v)
        passes.add_linear_vjp(grad_v, (k,), (dg_kv,), kv_mask, first=True)
        if ds_v is not None:
            passes.add_sumsq_vjp(grad_v, v, ds_v, kv_mask)
        return (grad_q, grad_k, grad_v, d_cq, d_ck, d_tau, d_lnw, d_lnb) + (None,) * 6


def amlp_cov(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cq: torch.Tensor,
    ck: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    activation: str = "softmax",
    form: str = "stable",
    temperature: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    l_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """AMLP-Cov (eqs. 8-10): ``sigma_1(Q L) L^T sigma_2(K^T V)`` with ``L^T = C_q sigma_2(Q^T Q) + C_k sigma_2(K^T K)``.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H, D]`` (Tq may differ from Tk: cross-mixing).
        cq, ck: landmarks ``[H, c, D]``.
        q_mask, kv_mask: boolean ``[B, Tq]`` / ``[B, Tk]``, True = real token.
        activation: sigma_1, one of ``softmax`` (over the c hidden units), ``relu``, ``sigmoid``,
            ``identity``.
        form: ``"paper"``, ``"official"`` or ``"stable"`` (see the module docstring).
        temperature: ``[H, 3]`` multipliers of the three Gram matrices (Q^T Q, K^T K, K^T V) before
            sigma_2; ones when None.
        scale: sigma_1 logit scale; 1 in the paper form and ``1/sqrt(D)`` in the official and stable
            forms by default.
        eps: floor of the column norms in the official and stable forms.
        l_norm: optional ``(weight, bias)``, each ``[D]``: a LayerNorm on the rows of ``L^T`` (before
            the ReLU of the official and stable forms), the released code's ``add_norm``.

    Returns ``[B, Tq, H, D]`` in the dtype of ``q``.
    """
    _check_common(q, k, v, q_mask, kv_mask, activation, form, temperature, l_norm)
    B, Tq, H, D = q.shape
    check_landmarks(cq, H, D, "cq")
    check_landmarks(ck, H, D, "ck")
    if cq.shape != ck.shape:
        raise ValueError(f"cq and ck must have the same shape [H, c, D], got {tuple(cq.shape)} and {tuple(ck.shape)}")
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    tau = _temperatures(temperature, H, cdt, q.device)
    q, k, v = select_real_rows(q, k, v, q_mask, kv_mask)
    out = _AMLPCovFunction.apply(q.to(cdt), k.to(cdt), v.to(cdt), cq.to(cdt), ck.to(cdt), tau,
                                 *_split_norm(l_norm, cdt), q_mask, kv_mask, activation, form, eps, scale)
    return _finish(out, q_mask, kv_mask, out_dtype)


def _check_w(w, w_bias, H, D):
    if not isinstance(w, torch.Tensor) or not (
        tuple(w.shape) == (2 * D, D) or tuple(w.shape) == (H, 2 * D, D)
    ):
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w must be shaped [2D, D] = [{2 * D}, {D}] or [H, 2D, D] = [{H}, {2 * D}, {D}], got {shape}")
    if w_bias is not None and not (tuple(w_bias.shape) == (D,) or tuple(w_bias.shape) == (H, D)):
        raise ValueError(f"w_bias must be shaped [D] = [{D}] or [H, D] = [{H}, {D}], got {tuple(w_bias.shape)}")


def _pquery_landmark_queries(s_q, s_k, count_q, count_k, cq, ck, tau, eps, batch):
    """Pseudo-queries of the two first poolings, with the column normalisation of the stable form
    folded in (``s_q, s_k`` are None in the paper form). Returns (query_q, query_k, cs_q, cs_k)."""
    t = tau.view(1, tau.shape[0], 3, 1, 1)
    if s_q is None:
        query_q = (cq.unsqueeze(0) * t[:, :, 0]).expand(batch, -1, -1, -1)
        query_k = (ck.unsqueeze(0) * t[:, :, 1]).expand(batch, -1, -1, -1)
        return query_q, query_k, None, None
    cs_q = column_scale(s_q, count_q, eps)  # [B, H, D]
    cs_k = column_scale(s_k, count_k, eps)
    return cq * t[:, :, 0] * cs_q.unsqueeze(-2), ck * t[:, :, 1] * cs_k.unsqueeze(-2), cs_q, cs_k


def _pquery_weights(pooled_q, pooled_k, cs_q, cs_k, w, w_bias, ln_w, ln_b, tau):
    """``L^T = [pooled Q ; pooled K] W + b`` (eq. 11); returns the query of the third pooling (eq. 12)
    and the readout keys, both ``[B, H, c, D]``."""
    if cs_q is not None:
        pooled_q, pooled_k = pooled_q * cs_q.unsqueeze(-2), pooled_k * cs_k.unsqueeze(-2)
    l_t = torch.cat([pooled_q, pooled_k], dim=-1) @ w
    if w_bias is not None:
        l_t = l_t + (w_bias if w_bias.dim() == 1 else w_bias.unsqueeze(1))
    l_t = _norm_rows(l_t, ln_w, ln_b)
    t3 = tau[:, 2].view(1, -1, 1, 1)
    if cs_q is None:
        return l_t * t3, l_t
    return l_t * t3 * cs_k.unsqueeze(-2), l_t * cs_q.unsqueeze(-2)


class _AMLPPQueryFunction(torch.autograd.Function):
    """AMLP-PQuery with a hand-written backward over the sequence (see :class:`_AMLPCovFunction`):
    three softmax poolings over positions and the readout, whose VJPs accumulate into the input
    gradients chunk by chunk; the small graph in between is recomputed and left to autograd."""

    @staticmethod
    def forward(ctx, q, k, v, cq, ck, w, w_bias, ln_w, ln_b, tau, q_mask, kv_mask, activation, form, eps, scale):
        B, Tq, _, D = q.shape
        stable = form == "stable"
        pool_scale = 1.0 / math.sqrt(D) if stable else 1.0
        read_scale = (pool_scale if stable else 1.0) if scale is None else float(scale)
        s_q = passes.sumsq(q, q_mask) if stable else None
        s_k = passes.sumsq(k, kv_mask) if stable else None
        count_q = real_counts(q_mask, B, Tq, q.dtype, q.device)
        count_k = real_counts(kv_mask, B, k.shape[1], q.dtype, q.device)
        qm, km = passes.open_empty_rows(q_mask), passes.open_empty_rows(kv_mask)
        query_q, query_k, cs_q, cs_k = _pquery_landmark_queries(s_q, s_k, count_q, count_k, cq, ck, tau, eps, B)
        pooled_q, lse_q = passes.pool(query_q, q, q, qm, pool_scale)
        pooled_k, lse_k = passes.pool(query_k, k, k, km, pool_scale)
        query_v, keys = _pquery_weights(pooled_q, pooled_k, cs_q, cs_k, w, w_bias, ln_w, ln_b, tau)
        values, lse_v = passes.pool(query_v, k, v, km, pool_scale)
        ctx.save_for_backward(q, k, v, cq, ck, w, w_bias, ln_w, ln_b, tau, s_q, s_k, count_q, count_k, qm, km,
                              pooled_q, pooled_k, values, lse_q, lse_k, lse_v)
        ctx.options = (activation, eps, pool_scale, read_scale)
        return passes.readout(q, keys, values, activation, read_scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (q, k, v, cq, ck, w, w_bias, ln_w, ln_b, tau, s_q, s_k, count_q, count_k, qm, km,
         pooled_q, pooled_k, values, lse_q, lse_k, lse_v) = ctx.saved_tensors
        activation, eps, pool_scale, read_scale = ctx.options
        B = q.shape[0]
        leaves = _small_leaves(s_q, s_k, cq, ck, w, w_bias, ln_w, ln_b, tau, pooled_q, pooled_k)
        l_sq, l_sk, l_cq, l_ck, l_w, l_b, l_lnw, l_lnb, l_tau, l_pq, l_pk = leaves
        with torch.enable_grad():
            query_q, query_k, cs_q, cs_k = _pquery_landmark_queries(l_sq, l_sk, count_q, count_k, l_cq, l_ck, l_tau, eps, B)
            query_v, keys = _pquery_weights(l_pq, l_pk, cs_q, cs_k, l_w, l_b, l_lnw, l_lnb, l_tau)
        grad_q = torch.empty_like(q)
        d_keys, d_values = passes.readout_vjp(grad_out, q, keys.detach(), values, activation, read_scale, grad_q,
                                              first=True)
        grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
        d_query_v = passes.pool_vjp(d_values, values, lse_v, query_v.detach(), k, v, km, pool_scale, grad_k, grad_v,
                                    first=True)
        small = (l_sq, l_sk, l_cq, l_ck, l_w, l_b, l_lnw, l_lnb, l_tau)
        params = [t for t in small if t is not None]
        first = torch.autograd.grad([keys, query_v], [l_pq, l_pk] + params, [d_keys, d_query_v],
                                    retain_graph=True, allow_unused=True)
        d_pq, d_pk = first[0], first[1]
        d_query_q = passes.pool_vjp(d_pq, pooled_q, lse_q, query_q.detach(), q, q, qm, pool_scale, grad_q, grad_q)
        d_query_k = passes.pool_vjp(d_pk, pooled_k, lse_k, query_k.detach(), k, k, km, pool_scale, grad_k, grad_k)
        second = torch.autograd.grad([query_q, query_k], params, [d_query_q, d_query_k], allow_unused=True)
        summed = iter(_add_grads(a, b) for a, b in zip(first[2:], second))
        d_sq, d_sk, d_cq, d_ck, d_w, d_b, d_lnw, d_lnb, d_tau = (None if t is None else next(summed) for t in small)
        if d_sq is not None:
            # rows opened by open_empty_rows have no output, hence a zero gradient: the opened
            # masks give the same result as the original ones here
            passes.add_sumsq_vjp(grad_q, q, d_sq, qm)
            passes.add_sumsq_vjp(grad_k, k, d_sk, km)
        return (grad_q, grad_k, grad_v, d_cq, d_ck, d_w, d_b, d_lnw, d_lnb, d_tau) + (None,) * 6


def _add_grads(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def amlp_pquery(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cq: torch.Tensor,
    ck: torch.Tensor,
    w: torch.Tensor,
    *,
    w_bias: torch.Tensor | None = None,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    activation: str = "softmax",
    form: str = "stable",
    temperature: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    l_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """AMLP-PQuery (eqs. 8, 11, 12): pseudo-queries pooled over positions.

    ``L^T = [sigma_2(C_q Q^T) Q ; sigma_2(C_k K^T) K] W (+ w_bias)``,
    ``W_QKV = sigma_2(L^T K^T) V``, output ``sigma_1(Q L) W_QKV``.

    Args:
        q, k, v, cq, ck, q_mask, kv_mask, activation, eps: as in :func:`amlp_cov`.
        form: ``"paper"``, ``"official"`` (the released code computes the printed equations, so
            this is the paper form) or ``"stable"``.
        l_norm: optional ``(weight, bias)``, each ``[D]``: a LayerNorm on the rows of ``L^T`` after
            ``W`` (the released code's ``add_norm``).
        w: ``[2D, D]`` (shared by the heads) or ``[H, 2D, D]``; ``w_bias``: ``[D]`` or ``[H, D]``.
        temperature: ``[H, 3]`` multipliers of the three pooling logits (C_q Q^T, C_k K^T, L^T K^T);
            ones when None.
        scale: sigma_1 logit scale; 1 in the paper form and ``1/sqrt(D)`` in the stable form. The
            pooling logits are unscaled in the paper form and scaled by ``1/sqrt(D)`` in the stable form.

    Returns ``[B, Tq, H, D]`` in the dtype of ``q``.
    """
    _check_common(q, k, v, q_mask, kv_mask, activation, form, temperature, l_norm)
    B, Tq, H, D = q.shape
    check_landmarks(cq, H, D, "cq")
    check_landmarks(ck, H, D, "ck")
    _check_w(w, w_bias, H, D)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    tau = _temperatures(temperature, H, cdt, q.device)
    bias = None if w_bias is None else w_bias.to(cdt)
    q, k, v = select_real_rows(q, k, v, q_mask, kv_mask)
    out = _AMLPPQueryFunction.apply(q.to(cdt), k.to(cdt), v.to(cdt), cq.to(cdt), ck.to(cdt), w.to(cdt), bias,
                                    *_split_norm(l_norm, cdt), tau, q_mask, kv_mask, activation, form, eps, scale)
    return _finish(out, q_mask, kv_mask, out_dtype)


def amlp_pquery_maps(q, k, v, cq, ck, w, *, w_bias=None, q_mask=None, kv_mask=None, form="stable",
                     temperature=None, eps=DEFAULT_EPS, l_norm=None):
    """Diagnostic: the three sigma_2 pooling maps of AMLP-PQuery over positions,
    ``sigma_2(C_q Q^T)`` ``[B, H, c, Tq]``, ``sigma_2(C_k K^T)`` and ``sigma_2(L^T K^T)``
    ``[B, H, c, Tk]`` (normalised and tempered as in ``form``).

    A row whose maximum is close to 1 pools a single token (a collapse into a one-hot).
    """
    _check_common(q, k, v, q_mask, kv_mask, "softmax", form, temperature, l_norm)
    B, Tq, H, D = q.shape
    _check_w(w, w_bias, H, D)
    cdt = compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    tau = _temperatures(temperature, H, cdt, q.device)
    stable = form == "stable"
    pool_scale = 1.0 / math.sqrt(D) if stable else 1.0
    s_q = passes.sumsq(q, q_mask) if stable else None
    s_k = passes.sumsq(k, kv_mask) if stable else None
    count_q = real_counts(q_mask, B, Tq, cdt, q.device)
    count_k = real_counts(kv_mask, B, k.shape[1], cdt, q.device)
    qm, km = passes.open_empty_rows(q_mask), passes.open_empty_rows(kv_mask)
    query_q, query_k, cs_q, cs_k = _pquery_landmark_queries(s_q, s_k, count_q, count_k, cq.to(cdt), ck.to(cdt),
                                                            tau, eps, B)
    pooled_q, _ = passes.pool(query_q, q, q, qm, pool_scale)
    pooled_k, _ = passes.pool(query_k, k, k, km, pool_scale)
    query_v, _ = _pquery_weights(pooled_q, pooled_k, cs_q, cs_k, w.to(cdt),
                                 None if w_bias is None else w_bias.to(cdt), *_split_norm(l_norm, cdt), tau)
    return tuple(torch.softmax(passes.pool_logits(query, x, m, pool_scale), dim=-1)
                 for query, x, m in ((query_q, q, qm), (query_k, k, km), (query_v, k, km)))


# ---------------------------------------------------------------------------------------------
# Plain references: one batch row and one head at a time, padded rows dropped by indexing.


def _real_rows(x, mask, b, h):
    rows = x[b, :, h]
    return rows if mask is None else rows[mask[b]]


def _scatter_rows(out, rows_out, mask, b, h):
    if mask is None:
        out[b, :, h] = rows_out
    else:
        out[b, mask[b], h] = rows_out


def amlp_cov_reference(q, k, v, cq, ck, *, q_mask=None, kv_mask=None, activation="softmax", form="stable",
                       temperature=None, scale=None, eps=DEFAULT_EPS, l_norm=None):
    """Reference AMLP-Cov, written for clarity: eqs. 9-10 per batch row and head."""
    B, Tq, H, D = q.shape
    tau = torch.ones(H, 3, dtype=q.dtype) if temperature is None else temperature
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            Q, K, V = _real_rows(q, q_mask, b, h), _real_rows(k, kv_mask, b, h), _real_rows(v, kv_mask, b, h)
            if K.shape[0] == 0:
                continue
            if form != "paper":
                nq = Q.norm(dim=0).clamp_min(eps)
                nk = K.norm(dim=0).clamp_min(eps)
                nv = V.norm(dim=0).clamp_min(eps)
                Qn, Kn, Vn = Q / nq, K / nk, V / nv
                Qread = Qn * math.sqrt(Q.shape[0]) if form == "stable" else Q
                s = 1.0 / math.sqrt(D) if scale is None else scale
            else:
                Qn, Kn, Vn, Qread = Q, K, V, Q
                s = 1.0 if scale is None else scale
            Lt = cq[h] @ torch.softmax(tau[h, 0] * (Qn.T @ Qn), -1) + ck[h] @ torch.softmax(
                tau[h, 1] * (Kn.T @ Kn), -1
            )
            if l_norm is not None:
                Lt = F.layer_norm(Lt, (D,), *l_norm)
            if form != "paper":
                Lt = torch.relu(Lt)
            value_map = torch.softmax(tau[h, 2] * (Kn.T @ Vn), -1)
            W_qkv = Lt @ (value_map.T if form == "official" else value_map)
            hidden = activate(s * (Qread @ Lt.T), activation)
            _scatter_rows(out, hidden @ W_qkv, q_mask, b, h)
    return out


def amlp_pquery_reference(q, k, v, cq, ck, w, *, w_bias=None, q_mask=None, kv_mask=None, activation="softmax",
                          form="stable", temperature=None, scale=None, eps=DEFAULT_EPS, l_norm=None):
    """Reference AMLP-PQuery, written for clarity: eqs. 11-12 per batch row and head."""
    B, Tq, H, D = q.shape
    tau = torch.ones(H, 3, dtype=q.dtype) if temperature is None else temperature
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            Q, K, V = _real_rows(q, q_mask, b, h), _real_rows(k, kv_mask, b, h), _real_rows(v, kv_mask, b, h)
            if K.shape[0] == 0:
                continue
            if form == "stable":
                Q = Q / Q.norm(dim=0).clamp_min(eps) * math.sqrt(Q.shape[0])
                K = K / K.norm(dim=0).clamp_min(eps) * math.sqrt(K.shape[0])
                ps = 1.0 / math.sqrt(D)
                s = ps if scale is None else scale
            else:
                ps = 1.0
                s = 1.0 if scale is None else scale
            Wh = w if w.dim() == 2 else w[h]
            pseudo_q = torch.softmax(tau[h, 0] * ps * (cq[h] @ Q.T), -1) @ Q
            pseudo_k = torch.softmax(tau[h, 1] * ps * (ck[h] @ K.T), -1) @ K
            Lt = torch.cat([pseudo_q, pseudo_k], -1) @ Wh
            if w_bias is not None:
                Lt = Lt + (w_bias if w_bias.dim() == 1 else w_bias[h])
            if l_norm is not None:
                Lt = F.layer_norm(Lt, (D,), *l_norm)
            W_qkv = torch.softmax(tau[h, 2] * ps * (Lt @ K.T), -1) @ V
            hidden = activate(s * (Q @ Lt.T), activation)
            _scatter_rows(out, hidden @ W_qkv, q_mask, b, h)
    return out
