r"""Causal AMLP-Cov: the prefix-statistics form of Appendix A (arXiv 2310.09512, eqs. 13-14).

The three d x d statistics of AMLP-Cov become running sums over the prefix, per head:

    S_t^Q = S_{t-1}^Q + q_t^T q_t,     S_t^K = S_{t-1}^K + k_t^T k_t,     z_t = z_{t-1} + k_t^T v_t
    L_t^T = C_q sigma_2(S_t^Q) + C_k sigma_2(S_t^K)                                      (13)
    W_t   = L_t^T sigma_2(z_t)                                                           (14)
    o_t   = sigma_1(q_t L_t) W_t

so output t depends on tokens 1..t only, and the recurrent state is ``3 d^2`` numbers per head
whatever t is. Every token rebuilds its own ``L_t`` (``c x d``) from its own softmaxed statistics:
O(c d^2) time per token and head, which is the price the paper's appendix points out.

Forms (the same two as the non-causal :func:`amlp.ops.amlp.amlp_cov`):

* ``"paper"``: the equations above as printed; sigma_1 logits scaled by ``scale`` (1 by default).
* ``"stable"``: the statistics at step t are normalised by the running column norms over the prefix,
  ``n_t = sqrt(sum_{i <= t} x_i^2)`` per feature (cosine similarities between feature columns),
  each sigma_2 has its per-head temperature, ``L_t^T`` goes through a ReLU, and the readout uses the
  query column-normalised over the prefix, ``q_t * sqrt(t) / n_t^Q``, with logits scaled by
  ``1/sqrt(d)``. At the last position the output therefore equals the non-causal stable output for
  the whole sequence.

Computation: the sequence runs in chunks of ``chunk_size`` tokens. Inside a chunk the prefix sums of
the outer products are a cumulative sum of ``[B, H, C, d, d]`` tensors started from the state carried
from the previous chunk; there is no Python loop over tokens. The readout never forms ``W_t``: it
computes ``(sigma_1(q_t L_t) L_t^T) sigma_2(z_t)``. When a gradient is needed each chunk is recomputed
in backward rather than kept (``recompute``), so training memory is one chunk's ``d x d`` statistics
plus the carried states, instead of ``O(T d^2)`` per head.

Padding: padded queries take no part in S^Q and padded keys none in S^K, z; outputs at padded
queries are zero, and so is every output whose prefix holds no real key yet. Half-precision inputs
are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._checks import check_landmarks, check_mask, check_qkv, compute_dtype, padded_rows_to_zero
from ._common import activate, check_activation
from .amlp import DEFAULT_EPS

#: the released code has no causal form (spec section 2.7, row 14), hence no official causal form
CAUSAL_FORMS = ("paper", "stable")

DEFAULT_CHUNK_SIZE = 32


class CovPrefixState(NamedTuple):
    """Running statistics of the causal AMLP-Cov after some prefix (per batch row and head).

    ``s_q, s_k, z`` are ``[B, H, d, d]`` (sums of ``q^T q``, ``k^T k``, ``k^T v``), ``v_sumsq`` is
    ``[B, H, d]`` (the column sums of squares of v, used by the stable form), ``count_q`` and
    ``count_k`` are ``[B]`` (real queries and keys so far).
    """

    s_q: torch.Tensor
    s_k: torch.Tensor
    z: torch.Tensor
    v_sumsq: torch.Tensor
    count_q: torch.Tensor
    count_k: torch.Tensor


def amlp_cov_causal_init_state(batch: int, heads: int, head_dim: int, *, dtype=torch.float32,
                               device=None) -> CovPrefixState:
    """The state before any token: all statistics zero."""
    dtype = compute_dtype(dtype)
    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype, device=device)

    return CovPrefixState(zeros(batch, heads, head_dim, head_dim), zeros(batch, heads, head_dim, head_dim),
                          zeros(batch, heads, head_dim, head_dim), zeros(batch, heads, head_dim), zeros(batch),
                          zeros(batch))


def _check_state(state, B, H, D):
    if not isinstance(state, CovPrefixState):
        raise ValueError(f"initial_state must be a CovPrefixState, got {type(state).__name__}")
    expected = ((B, H, D, D),) * 3 + ((B, H, D), (B,), (B,))
    for name, t, shape in zip(CovPrefixState._fields, state, expected):
        if tuple(t.shape) != shape:
            raise ValueError(f"initial_state.{name} must be shaped {list(shape)}, got {tuple(t.shape)}")


def _prefix_statistic(start, x, y, row_scale, col_scale=None):
    """Scaled prefix sums of outer products for every token t of a chunk:

        out[t] = diag(row_scale[t]) (start + sum_{i <= t} x_i^T y_i) diag(col_scale[t])

    ``start`` is ``[B, H, d, d]``, ``x, y`` are ``[B, H, C, d]``, the scales ``[B, H, C, d]`` or
    broadcastable to it (``col_scale`` None: ones). The masked sum is one matrix product per batch row and head,
    ``[(t, d), i] @ [i, e]``, with the row scale folded into its left factor, so no ``[C, d, d]``
    tensor of outer products is made and no cumulative sum is run over one.
    """
    B, H, C, D = x.shape
    tri = torch.ones(C, C, dtype=x.dtype, device=x.device).tril()
    left = x.transpose(-1, -2).unsqueeze(2) * tri[:, None, :] * row_scale.unsqueeze(-1)  # [B, H, C(t), d, C(i)]
    out = torch.matmul(left.reshape(B, H, C * D, C), y).view(B, H, C, D, D)
    out = torch.addcmul(out, start.unsqueeze(2), row_scale.unsqueeze(-1))
    if col_scale is not None:
        out = out * col_scale.unsqueeze(-2)
    return out


def _cov_chunk(q, k, v, q_w, k_w, s_q0, s_k0, z0, vsq0, cnt_q0, cnt_k0, cq, ck, tau, *,
               activation: str, stable: bool, read_scale: float, eps: float):
    """One chunk of the causal AMLP-Cov.

    ``q, k, v``: ``[B, H, C, d]`` with padded rows already zero; ``q_w, k_w``: ``[B, C]`` (1 real,
    0 padded); the rest is the carried state, the landmarks ``[H, c, d]`` and temperatures ``[H, 3]``.
    Returns the chunk output ``[B, H, C, d]`` and the state after the chunk.
    """
    cnt_q = cnt_q0.unsqueeze(1) + torch.cumsum(q_w, dim=1)  # [B, C]
    cnt_k = cnt_k0.unsqueeze(1) + torch.cumsum(k_w, dim=1)
    vsq = vsq0.unsqueeze(2) + torch.cumsum(v.square(), dim=2)  # [B, H, C, d]
    t = tau.view(1, -1, 1, 1, 3)
    if stable:
        # running column norms: the diagonals of the prefix Gram matrices
        inv_q = 1.0 / (s_q0.diagonal(dim1=-2, dim2=-1).unsqueeze(2) + torch.cumsum(q.square(), dim=2)).clamp_min(
            eps * eps).sqrt()
        inv_k = 1.0 / (s_k0.diagonal(dim1=-2, dim2=-1).unsqueeze(2) + torch.cumsum(k.square(), dim=2)).clamp_min(
            eps * eps).sqrt()
        inv_v = 1.0 / vsq.clamp_min(eps * eps).sqrt()
        # tau * S / (n n^T): cosine similarities between feature columns over the prefix
        logits_q = _prefix_statistic(s_q0, q, q, inv_q * t[..., 0], inv_q)
        logits_k = _prefix_statistic(s_k0, k, k, inv_k * t[..., 1], inv_k)
        logits_kv = _prefix_statistic(z0, k, v, inv_k * t[..., 2], inv_v)
        q_read = q * (cnt_q.sqrt()[:, None, :, None] * inv_q)  # unit-RMS query columns over the prefix
    else:
        logits_q = _prefix_statistic(s_q0, q, q, t[..., 0])
        logits_k = _prefix_statistic(s_k0, k, k, t[..., 1])
        logits_kv = _prefix_statistic(z0, k, v, t[..., 2])
        q_read = q
    l_t = torch.matmul(cq[None, :, None], torch.softmax(logits_q, dim=-1)) + torch.matmul(
        ck[None, :, None], torch.softmax(logits_k, dim=-1)
    )  # L_t^T = C_q sigma_2(S_t^Q) + C_k sigma_2(S_t^K), [B, H, C, c, d]  (eq. 13)
    if stable:
        l_t = F.relu(l_t)
    hidden = activate(torch.einsum("bhtd,bhtcd->bhtc", q_read, l_t) * read_scale, activation)
    mixed = torch.einsum("bhtc,bhtcd->bhtd", hidden, l_t)
    # o_t = sigma_1(q_t L_t) L_t^T sigma_2(z_t)  (eq. 14, W_t never formed)
    out = torch.matmul(mixed.unsqueeze(-2), torch.softmax(logits_kv, dim=-1)).squeeze(-2)
    out = out * (cnt_k > 0).to(out.dtype)[:, None, :, None]
    s_q = s_q0 + q.transpose(-1, -2) @ q
    s_k = s_k0 + k.transpose(-1, -2) @ k
    z = z0 + k.transpose(-1, -2) @ v
    return out, s_q, s_k, z, vsq[:, :, -1], cnt_q[:, -1], cnt_k[:, -1]


def amlp_cov_causal(
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    recompute: bool | None = None,
    initial_state: CovPrefixState | None = None,
    return_state: bool = False,
):
    """Causal AMLP-Cov (Appendix A, eqs. 13-14): output t uses the statistics of tokens 1..t.

    Args:
        q, k, v: ``[B, T, H, D]`` (one sequence: q, k and v have the same length).
        cq, ck, q_mask, kv_mask, activation, form, temperature, scale, eps: as in
            :func:`amlp.ops.amlp.amlp_cov`.
        chunk_size: tokens per chunk of the parallel prefix computation.
        recompute: recompute each chunk in backward instead of keeping it (None: whenever autograd
            records a graph).
        initial_state: statistics of an earlier prefix to continue from (:class:`CovPrefixState`).
        return_state: also return the state after the last token.

    Returns ``[B, T, H, D]`` in the dtype of ``q``, and the final state if ``return_state``.
    """
    check_qkv(q, k, v, same_length=True)
    B, T, H, D = q.shape
    check_mask(q_mask, B, T, "q_mask")
    check_mask(kv_mask, B, T, "kv_mask")
    check_activation(activation)
    if form not in CAUSAL_FORMS:
        raise ValueError(f"form must be one of {CAUSAL_FORMS} for causal AMLP-Cov, got {form!r}"
                         + ("; the released code has no causal form, so there is no official one" if form == "official"
                            else ""))
    if temperature is not None and (not isinstance(temperature, torch.Tensor) or tuple(temperature.shape) != (H, 3)):
        shape = tuple(temperature.shape) if isinstance(temperature, torch.Tensor) else type(temperature).__name__
        raise ValueError(f"temperature must be shaped [H, 3] = [{H}, 3], got {shape}")
    check_landmarks(cq, H, D, "cq")
    check_landmarks(ck, H, D, "ck")
    if cq.shape != ck.shape:
        raise ValueError(f"cq and ck must have the same shape [H, c, D], got {tuple(cq.shape)} and {tuple(ck.shape)}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    stable = form == "stable"
    if scale is not None:
        read_scale = float(scale)
    else:
        read_scale = 1.0 / math.sqrt(D) if stable else 1.0
    tau = torch.ones(H, 3, dtype=cdt, device=q.device) if temperature is None else temperature.to(cdt)
    cq, ck = cq.to(cdt), ck.to(cdt)
    q_w = torch.ones(B, T, dtype=cdt, device=q.device) if q_mask is None else q_mask.to(cdt)
    k_w = torch.ones(B, T, dtype=cdt, device=q.device) if kv_mask is None else kv_mask.to(cdt)
    qh = padded_rows_to_zero(q.to(cdt), q_mask).transpose(1, 2)  # [B, H, T, D]
    kh = padded_rows_to_zero(k.to(cdt), kv_mask).transpose(1, 2)
    vh = padded_rows_to_zero(v.to(cdt), kv_mask).transpose(1, 2)
    if initial_state is None:
        state = tuple(amlp_cov_causal_init_state(B, H, D, dtype=cdt, device=q.device))
    else:
        _check_state(initial_state, B, H, D)
        state = tuple(s.to(cdt) for s in initial_state)
    if recompute is None:
        recompute = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, cq, ck, tau, *state)
        )
    chunk_fn = functools.partial(_cov_chunk, activation=activation, stable=stable, read_scale=read_scale, eps=eps)
    outs = []
    for start in range(0, T, chunk_size):
        sl = slice(start, min(start + chunk_size, T))
        args = (qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], q_w[:, sl], k_w[:, sl], *state, cq, ck, tau)
        if recompute:
            out, *state = checkpoint(chunk_fn, *args, use_reentrant=False)
        else:
            out, *state = chunk_fn(*args)
        outs.append(out)
    out = torch.cat(outs, dim=2).transpose(1, 2)  # [B, T, H, D]
    out = padded_rows_to_zero(out, q_mask).to(out_dtype)
    if return_state:
        return out, CovPrefixState(*state)
    return out


def amlp_cov_causal_reference(q, k, v, cq, ck, *, q_mask=None, kv_mask=None, activation="softmax", form="stable",
                              temperature=None, scale=None, eps=DEFAULT_EPS):
    """Reference causal AMLP-Cov: eqs. 13-14 one batch row, head and token at a time, with the
    running sums updated literally."""
    B, T, H, D = q.shape
    tau = torch.ones(H, 3, dtype=q.dtype) if temperature is None else temperature
    stable = form == "stable"
    s = scale if scale is not None else (1.0 / math.sqrt(D) if stable else 1.0)
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            S_q = q.new_zeros(D, D)
            S_k = q.new_zeros(D, D)
            z = q.new_zeros(D, D)
            v_sumsq = q.new_zeros(D)
            n_queries = n_keys = 0
            for t in range(T):
                q_t, k_t, v_t = q[b, t, h], k[b, t, h], v[b, t, h]
                query_real = q_mask is None or bool(q_mask[b, t])
                if query_real:
                    S_q = S_q + torch.outer(q_t, q_t)
                    n_queries += 1
                if kv_mask is None or bool(kv_mask[b, t]):
                    S_k = S_k + torch.outer(k_t, k_t)
                    z = z + torch.outer(k_t, v_t)
                    v_sumsq = v_sumsq + v_t * v_t
                    n_keys += 1
                if not query_real or n_keys == 0:
                    continue
                if stable:
                    norm_q = S_q.diagonal().clamp_min(eps * eps).sqrt()
                    norm_k = S_k.diagonal().clamp_min(eps * eps).sqrt()
                    norm_v = v_sumsq.clamp_min(eps * eps).sqrt()
                    stat_q = S_q / torch.outer(norm_q, norm_q)
                    stat_k = S_k / torch.outer(norm_k, norm_k)
                    stat_kv = z / torch.outer(norm_k, norm_v)
                    q_read = q_t / norm_q * math.sqrt(n_queries)
                else:
                    stat_q, stat_k, stat_kv, q_read = S_q, S_k, z, q_t
                L_t = cq[h] @ torch.softmax(tau[h, 0] * stat_q, -1) + ck[h] @ torch.softmax(tau[h, 1] * stat_k, -1)
                if stable:
                    L_t = torch.relu(L_t)  # this is L_t^T, c x D
                W_t = L_t @ torch.softmax(tau[h, 2] * stat_kv, -1)
                out[b, t, h] = activate(s * (L_t @ q_read), activation) @ W_t
    return out
