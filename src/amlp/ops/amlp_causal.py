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

Computation: the sequence runs in chunks whose length follows from a memory budget
(:data:`CHUNK_BYTES`; when one block of the whole batch exceeds it, the batch rows run in groups
that fit it), each cut into blocks of :data:`BLOCK_TOKENS` tokens. Inside a chunk the
prefix statistics of every token are matrix products: one per block for the block's sum, a
cumulative sum over the blocks, and one masked product inside each block, started from the state
carried from the previous chunk; there is no Python loop over tokens. The readout never forms
``W_t``: it computes ``(sigma_1(q_t L_t) L_t^T) sigma_2(z_t)``. A chunk has a hand-written
backward that recomputes the chunk from its inputs rather than keeping it (``recompute``), so
training memory is one chunk's ``d x d`` statistics plus the carried states, instead of
``O(T d^2)`` per head. The recurrent step (:func:`amlp_cov_causal_step`) updates the state in place
of a chunk and handles the three statistics together.

Padding: padded queries take no part in S^Q and padded keys none in S^K, z; outputs at padded
queries are zero, and so is every output whose prefix holds no real key yet. Half-precision inputs
are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_landmarks, check_mask, check_qkv, compute_dtype, padded_rows_to_zero
from ._common import activate, check_activation
from ._sequence_passes import activation_vjp
from .amlp import DEFAULT_EPS

#: the released code has no causal form (its fairseq ``incremental_state`` path re-runs the op over all cached
#: keys), hence no official causal form
CAUSAL_FORMS = ("paper", "stable")

#: the largest block of the two-level prefix sums (tokens); the products inside a block cost
#: O(block d^2) per token, the cumulative sum over blocks O(d^2 / block)
BLOCK_TOKENS = 8
#: memory for the temporaries of one chunk when ``chunk_size`` is not given (the chunk length
#: follows from it): small enough that a chunk's passes run on data the CPU cache holds. On the
#: development CPU one block of 8 tokens per chunk trained 1.4 times faster than 32 at B H = 8,
#: d = 64, and 2.4 times faster at B = 64, H = 1
CHUNK_BYTES = 12 * 2**20
#: kept for callers that name a chunk size; None chooses it from ``CHUNK_BYTES``
DEFAULT_CHUNK_SIZE = None


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
    if tuple(t.shape for t in state) == expected:  # torch.Size compares equal to a tuple
        return
    for name, t, shape in zip(CovPrefixState._fields, state, expected):
        if tuple(t.shape) != shape:
            raise ValueError(f"initial_state.{name} must be shaped {list(shape)}, got {tuple(t.shape)}")


def _block_prefix_sums(start, x, y, block: int):
    """Prefix sums of outer products for every token t of a chunk:

        out[t] = start + sum_{i <= t} x_i^T y_i

    ``start`` is ``[B, H, d, e]``, ``x, y`` are ``[B, H, N, d]`` and ``[B, H, N, e]`` with N a
    multiple of ``block``. Returns ``[B, H, N, d, e]`` and the sum after the chunk, ``[B, H, d, e]``.

    Two levels, all matrix products: the chunk is cut into blocks of ``block`` tokens; one product
    per block gives its sum ``X_b^T Y_b``, a cumulative sum over the (few) blocks gives each block's
    starting statistic, and inside a block the prefix is one product ``[(t, d), i] @ [i, e]`` with a
    lower-triangular mask folded into its left factor. No ``[N, d, e]`` tensor of outer products is
    made and no cumulative sum runs over one.
    """
    B, H, N, D = x.shape
    E = y.shape[-1]
    n = N // block
    xt = x.view(B, H, n, block, D).transpose(-1, -2)  # [B, H, n, d, i]
    yb = y.view(B, H, n, block, E)
    sums = torch.matmul(xt, yb)  # [B, H, n, d, e]: the sum of each block
    ends = torch.cumsum(sums, dim=2).add_(start.unsqueeze(2))  # statistic after each block
    starts = torch.cat([start.unsqueeze(2), ends[:, :, :-1]], dim=2)  # statistic before each block
    tri = torch.ones(block, block, dtype=x.dtype, device=x.device).tril()
    left = xt.unsqueeze(3) * tri[:, None, :]  # [B, H, n, t, d, i]
    out = torch.matmul(left.reshape(B, H, n, block * D, block), yb).view(B, H, n, block, D, E)
    out.add_(starts.unsqueeze(3))
    return out.view(B, H, N, D, E), ends[:, :, -1]


def _prefix_vjp(grad_u, x, after, block: int):
    """VJP of the prefix sums ``U_t = S_0 + sum_{i <= t} x_i^T y_i`` with respect to ``y``:

        out[i] = x_i (sum_{t >= i} dU_t + after)

    ``grad_u`` is ``[B, H, N, d, e]``, ``x`` ``[B, H, N, d]``, ``after`` ``[B, H, d, e]`` (the
    gradient reaching the statistic after the chunk). The same two levels as
    :func:`_block_prefix_sums`: inside a block one product ``[i, (t, d)] @ [(t, d), e]`` with the
    mask ``t >= i`` folded into its left factor; across blocks the suffix sums of the block sums.
    Returns ``[B, H, N, e]`` and ``sum_t dU_t + after`` (the gradient of ``S_0``).
    """
    B, H, N, D, E = grad_u.shape
    n = N // block
    gb = grad_u.view(B, H, n, block, D, E)
    sums = gb.sum(3)  # [B, H, n, d, e]
    # suffix sums over the later blocks, plus what reaches the statistic after the chunk
    later = torch.flip(torch.cumsum(torch.flip(sums, [2]), dim=2), [2]) - sums + after.unsqueeze(2)
    xb = x.view(B, H, n, block, D)
    upper = torch.ones(block, block, dtype=x.dtype, device=x.device).triu()  # [i, t]: t >= i
    left = (upper[:, :, None] * xb.unsqueeze(4)).view(B, H, n, block, block * D)  # [i, (t, d)]
    out = torch.matmul(left, gb.reshape(B, H, n, block * D, E))
    out = out.add_(torch.matmul(xb, later))
    return out.view(B, H, N, E), later[:, :, 0] + sums[:, :, 0]


def _cov_chunk_forward(q, k, v, q_w, k_w, s_q0, s_k0, z0, vsq0, cnt_q0, cnt_k0, cq, ck, tau,
                       activation: str, stable: bool, read_scale: float, eps: float, block: int, keep: bool = False):
    """One chunk of the causal AMLP-Cov.

    ``q, k, v``: ``[B, H, N, d]`` with padded rows already zero and N a multiple of ``block``;
    ``q_w, k_w``: ``[B, N]`` (1 real, 0 padded); the rest is the carried state, the landmarks
    ``[H, c, d]`` and temperatures ``[H, 3]``. Returns the chunk output ``[B, H, N, d]``, the
    state after the chunk and, with ``keep``, the intermediates the backward needs (else None).
    """
    cnt_q = cnt_q0.unsqueeze(1) + torch.cumsum(q_w, dim=1)  # [B, N]
    cnt_k = cnt_k0.unsqueeze(1) + torch.cumsum(k_w, dim=1)
    vsq = vsq0.unsqueeze(2) + torch.cumsum(v.square(), dim=2)  # [B, H, N, d]
    t = tau.view(1, -1, 1, 1, 3)
    stats, ends, inv = [], [], {}
    if stable:
        # running inverse column norms: the diagonals of the prefix Gram matrices
        sq_q = s_q0.diagonal(dim1=-2, dim2=-1).unsqueeze(2) + torch.cumsum(q.square(), dim=2)
        sq_k = s_k0.diagonal(dim1=-2, dim2=-1).unsqueeze(2) + torch.cumsum(k.square(), dim=2)
        for name, sq in (("q", sq_q), ("k", sq_k), ("v", vsq)):
            inv[name] = sq.clamp_min(eps * eps).rsqrt()
        pairs = ((s_q0, q, q, "q", "q"), (s_k0, k, k, "k", "k"), (z0, k, v, "k", "v"))
        logits = []
        for i, (start, x, y, r, c) in enumerate(pairs):
            # tau * S / (n n^T): cosine similarities between feature columns over the prefix
            u, end = _block_prefix_sums(start, x, y, block)
            logits.append(u * ((inv[r] * t[..., i]).unsqueeze(-1) * inv[c].unsqueeze(-2)))
            stats.append((u, inv[r], inv[c]))
            ends.append(end)
        q_read = q * (cnt_q.sqrt()[:, None, :, None] * inv["q"])  # unit-RMS query columns over the prefix
    else:
        logits = []
        for i, (start, x, y) in enumerate(((s_q0, q, q), (s_k0, k, k), (z0, k, v))):
            u, end = _block_prefix_sums(start, x, y, block)
            logits.append(u * t[..., i].unsqueeze(-1))
            stats.append((u, None, None))
            ends.append(end)
        q_read = q
    maps = [torch.softmax(x, dim=-1) for x in logits]
    del logits
    l_t = torch.matmul(cq[None, :, None], maps[0]).add_(torch.matmul(ck[None, :, None], maps[1]))
    # L_t^T = C_q sigma_2(S_t^Q) + C_k sigma_2(S_t^K), [B, H, N, c, d]  (eq. 13)
    if stable:
        l_t = F.relu(l_t)
    logits_h = (l_t * q_read.unsqueeze(-2)).sum(-1).mul_(read_scale)  # L_t^T q_t, [B, H, N, c]
    hidden = activate(logits_h, activation)
    mixed = torch.matmul(hidden.unsqueeze(-2), l_t)  # [B, H, N, 1, d]
    # o_t = sigma_1(q_t L_t) L_t^T sigma_2(z_t)  (eq. 14, W_t never formed)
    out = torch.matmul(mixed, maps[2]).squeeze(-2)
    out = torch.where((cnt_k > 0)[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    cache = None
    if keep:
        cache = dict(stats=stats, maps=maps, inv=inv, l_t=l_t, logits_h=logits_h, hidden=hidden, mixed=mixed,
                     q_read=q_read, cnt_q=cnt_q, cnt_k=cnt_k)
    return out, ends[0], ends[1], ends[2], vsq[:, :, -1], cnt_q[:, -1], cnt_k[:, -1], cache


def _inv_norm_vjp(grad_inv, inv, x, grad_end, eps):
    """VJP of ``inv_t = rsqrt(max(start + sum_{i <= t} x_i^2, eps^2))`` (``[B, H, N, d]``) with
    ``grad_end`` reaching ``start + sum_i x_i^2`` after the chunk (or None). Returns the gradient
    of ``x`` and of ``start``."""
    d_sq = grad_inv * (-0.5) * inv.pow(3)
    d_sq = torch.where(inv < 1.0 / eps, d_sq, torch.zeros((), dtype=d_sq.dtype, device=d_sq.device))
    suffix = torch.flip(torch.cumsum(torch.flip(d_sq, [2]), dim=2), [2])
    if grad_end is not None:
        suffix = suffix + grad_end.unsqueeze(2)
    return 2.0 * x * suffix, suffix[:, :, 0]


def _prefix_vjp_left(grad_u, y, after, block: int):
    """VJP of the prefix sums ``U_t = S_0 + sum_{i <= t} x_i^T y_i`` with respect to ``x``:

        out[i] = (sum_{t >= i} dU_t + after) y_i

    (shapes as in :func:`_prefix_vjp`). Inside a block one product ``[(t, d), e] @ [e, i]``
    followed by a masked sum over ``t``, so ``dU`` is never transposed.
    """
    B, H, N, D, E = grad_u.shape
    n = N // block
    gb = grad_u.view(B, H, n, block, D, E)
    sums = gb.sum(3)
    later = torch.flip(torch.cumsum(torch.flip(sums, [2]), dim=2), [2]) - sums + after.unsqueeze(2)
    yb = y.view(B, H, n, block, E)
    per_pair = torch.matmul(gb.view(B, H, n, block * D, E), yb.transpose(-1, -2)).view(B, H, n, block, D, block)
    upper = torch.ones(block, block, dtype=y.dtype, device=y.device).triu()  # [i, t]: t >= i
    out = (per_pair * upper.T[:, None, :]).sum(3).transpose(-1, -2)  # [B, H, n, i, d]
    out = out + torch.matmul(yb, later.transpose(-1, -2))
    return out.reshape(B, H, N, D)


class _CovChunk(torch.autograd.Function):
    """One chunk of the causal AMLP-Cov with a hand-written backward.

    Forward keeps only its inputs; backward recomputes the chunk and runs the chain rule through
    eqs. 13-14 in a fixed number of products and passes per chunk: the readout, the two
    ``C sigma_2(S)`` products, the softmax VJPs, the normalisation of the stable form (running
    column norms and temperatures) and the two-level prefix sums, whose VJPs are suffix sums
    written as products (:func:`_prefix_vjp`).
    """

    @staticmethod
    def forward(ctx, q, k, v, q_w, k_w, s_q0, s_k0, z0, vsq0, cnt_q0, cnt_k0, cq, ck, tau, options):
        ctx.save_for_backward(q, k, v, q_w, k_w, s_q0, s_k0, z0, vsq0, cnt_q0, cnt_k0, cq, ck, tau)
        ctx.options = options
        result = _cov_chunk_forward(q, k, v, q_w, k_w, s_q0, s_k0, z0, vsq0, cnt_q0, cnt_k0, cq, ck, tau, *options)
        ctx.mark_non_differentiable(result[5], result[6])
        return result[:7]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_sq, d_sk, d_z, d_vsq, _d_cnt_q, _d_cnt_k):
        q, k, v, q_w, k_w, s_q0, s_k0, z0, vsq0, cnt_q0, cnt_k0, cq, ck, tau = ctx.saved_tensors
        activation, stable, read_scale, eps, block = ctx.options
        cache = _cov_chunk_forward(q, k, v, q_w, k_w, s_q0, s_k0, z0, vsq0, cnt_q0, cnt_k0, cq, ck, tau,
                                   *ctx.options, keep=True)[-1]
        zeros = torch.zeros((), dtype=q.dtype, device=q.device)
        d_out = torch.where((cache["cnt_k"] > 0)[:, None, :, None], d_out, zeros)
        maps_q, maps_k, maps_v = cache["maps"]
        l_t, hidden, mixed, q_read = cache["l_t"], cache["hidden"], cache["mixed"], cache["q_read"]
        # the readout: o_t = m_t P^V_t, m_t = h_t^T L_t^T, h_t = sigma_1(s L_t^T q_t)
        d_maps_v = mixed.transpose(-1, -2) * d_out.unsqueeze(-2)  # m_t^T do_t, [B, H, N, d, d]
        # matrix-vector products over many small matrices run faster as a multiply and a sum
        d_mixed = (maps_v * d_out.unsqueeze(-2)).sum(-1).unsqueeze(-2)  # P^V_t do_t, [B, H, N, 1, d]
        d_hidden = (l_t * d_mixed).sum(-1)  # [B, H, N, c]
        d_logits_h = activation_vjp(cache["logits_h"], hidden, d_hidden, activation).mul_(read_scale)
        d_l = hidden.unsqueeze(-1) * d_mixed + d_logits_h.unsqueeze(-1) * q_read.unsqueeze(-2)  # [B, H, N, c, d]
        d_q_read = torch.matmul(d_logits_h.unsqueeze(-2), l_t).squeeze(-2)  # [B, H, N, d]
        if stable:
            d_l = torch.where(l_t > 0, d_l, zeros)
        # L_t^T = C_q P^Q_t + C_k P^K_t
        d_cq = torch.matmul(d_l, maps_q.transpose(-1, -2)).sum((0, 2))  # [H, c, d]
        d_ck = torch.matmul(d_l, maps_k.transpose(-1, -2)).sum((0, 2))
        d_maps = (torch.matmul(cq.transpose(-1, -2)[None, :, None], d_l),
                  torch.matmul(ck.transpose(-1, -2)[None, :, None], d_l), d_maps_v)
        d_tau = torch.zeros_like(tau)
        d_u = []
        d_inv = {"q": 0.0, "k": 0.0, "v": 0.0}
        t = tau.view(1, -1, 1, 1, 3)
        for i, (maps, d_map, (u, r, c)) in enumerate(zip(cache["maps"], d_maps, cache["stats"])):
            d_logits = torch._softmax_backward_data(d_map, maps, -1, maps.dtype)
            weighted = d_logits * u  # dLambda (.) U
            if stable:
                # Lambda = (tau r) (x) c (.) U, with r and c running inverse column norms
                g_r = (weighted * c.unsqueeze(-2)).sum(-1)  # [B, H, N, d]
                g_c = torch.matmul(r.unsqueeze(-2), weighted).squeeze(-2) * t[..., i]
                d_tau[:, i] = (g_r * r).sum((0, 2, 3))
                d_u.append(d_logits.mul_((r * t[..., i]).unsqueeze(-1)).mul_(c.unsqueeze(-2)))
                row_name, col_name = (("q", "q"), ("k", "k"), ("k", "v"))[i]
                d_inv[row_name] = d_inv[row_name] + g_r * t[..., i]
                d_inv[col_name] = d_inv[col_name] + g_c
            else:
                d_tau[:, i] = weighted.sum((0, 2, 3, 4))
                d_u.append(d_logits.mul_(t[..., i].unsqueeze(-1)))
        # the prefix sums: S^Q = sum q^T q, S^K = sum k^T k, z = sum k^T v
        d_q, d_s_q0 = _prefix_vjp(d_u[0], q, d_sq, block)  # q enters S^Q on both sides
        d_q = d_q + _prefix_vjp_left(d_u[0], q, d_sq, block)
        d_k, d_s_k0 = _prefix_vjp(d_u[1], k, d_sk, block)
        d_k = d_k + _prefix_vjp_left(d_u[1], k, d_sk, block)
        d_v, d_z0 = _prefix_vjp(d_u[2], k, d_z, block)
        d_k = d_k + _prefix_vjp_left(d_u[2], v, d_z, block)
        d_vsq0 = d_vsq
        if stable:
            inv = cache["inv"]
            scale_q = cache["cnt_q"].sqrt()[:, None, :, None]
            d_q = d_q + d_q_read * scale_q * inv["q"]
            d_inv["q"] = d_inv["q"] + d_q_read * q * scale_q
            g, g0 = _inv_norm_vjp(d_inv["q"], inv["q"], q, None, eps)
            d_q = d_q + g
            d_s_q0 = d_s_q0 + torch.diag_embed(g0)
            g, g0 = _inv_norm_vjp(d_inv["k"], inv["k"], k, None, eps)
            d_k = d_k + g
            d_s_k0 = d_s_k0 + torch.diag_embed(g0)
            g, d_vsq0 = _inv_norm_vjp(d_inv["v"], inv["v"], v, d_vsq, eps)
            d_v = d_v + g
        else:
            d_q = d_q + d_q_read
            d_v = d_v + 2.0 * v * d_vsq.unsqueeze(2)
        return (d_q, d_k, d_v, None, None, d_s_q0, d_s_k0, d_z0, d_vsq0, None, None, d_cq, d_ck, d_tau, None)


def _chunk_tokens(batch: int, heads: int, head_dim: int, itemsize: int, block: int) -> int:
    """Tokens per chunk from :data:`CHUNK_BYTES`: a chunk holds about a dozen ``[B, H, N, d, d]``
    tensors (three statistics with their scaled and softmaxed forms, and their gradients), rounded
    down to a multiple of ``block``, at least one block."""
    per_token = 12 * batch * heads * head_dim * head_dim * itemsize
    return max(block, (CHUNK_BYTES // per_token) // block * block)


def _group_rows(batch: int, heads: int, head_dim: int, itemsize: int, block: int) -> int:
    """Batch rows computed together when the chunk length is chosen from :data:`CHUNK_BYTES`: all of
    them when one block of the whole batch fits the budget, else as many as fit (at least one), so
    that a chunk's temporaries stay about the budget's size however large the batch (the rows are
    independent). ``amlp bench ops --mixers amlp-cov --causal --threads 1`` at B = 32, H = 4,
    d = 32, T = 128 on an otherwise idle two-core AMD EPYC: forward and backward 0.61-0.65 s in
    groups of 7 rows, 0.72-0.74 s with the whole batch at once."""
    per_row = 12 * heads * head_dim * head_dim * itemsize * block
    return max(1, min(batch, CHUNK_BYTES // per_row))


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
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    recompute: bool | None = None,
    initial_state: CovPrefixState | None = None,
    return_state: bool = False,
):
    """Causal AMLP-Cov (Appendix A, eqs. 13-14): output t uses the statistics of tokens 1..t.

    Args:
        q, k, v: ``[B, T, H, D]`` (one sequence: q, k and v have the same length).
        cq, ck, q_mask, kv_mask, activation, form, temperature, scale, eps: as in
            :func:`amlp.ops.amlp.amlp_cov`.
        chunk_size: tokens per chunk of the parallel prefix computation; None: as many as fit in
            :data:`CHUNK_BYTES` of temporaries (a multiple of :data:`BLOCK_TOKENS`), with the batch
            rows in groups when one block of all of them does not fit.
        recompute: run each chunk through its hand-written backward, which recomputes the chunk
            instead of keeping it (None: whenever autograd records a graph); False runs the chunks
            without a backward of their own (plain autograd, which keeps every intermediate).
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
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
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
    block = min(BLOCK_TOKENS, chunk_size or BLOCK_TOKENS)
    group = B
    if chunk_size is None:
        itemsize = torch.finfo(cdt).bits // 8
        group = _group_rows(B, H, D, itemsize, block)
        chunk_size = _chunk_tokens(group, H, D, itemsize, block)
    else:
        chunk_size = -(-chunk_size // block) * block
    # the sequence is padded to whole blocks with zero rows of weight 0, which change no statistic
    pad = -T % block
    qh, kh, vh = (padded_rows_to_zero(x.to(cdt), m).transpose(1, 2) for x, m in ((q, q_mask), (k, kv_mask), (v, kv_mask)))
    if pad:
        qh, kh, vh = (F.pad(x, (0, 0, 0, pad)) for x in (qh, kh, vh))  # [B, H, T + pad, D]
        q_w, k_w = F.pad(q_w, (0, pad)), F.pad(k_w, (0, pad))
    if initial_state is None:
        state = tuple(amlp_cov_causal_init_state(B, H, D, dtype=cdt, device=q.device))
    else:
        _check_state(initial_state, B, H, D)
        state = tuple(s.to(cdt) for s in initial_state)
    if recompute is None:
        recompute = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, cq, ck, tau, *state)
        )
    options = (activation, stable, read_scale, eps, block)
    group_outs, group_states = [], []
    for b0 in range(0, B, group):  # groups of batch rows, each through the whole sequence
        rows = slice(b0, min(B, b0 + group))
        carried = [t[rows] for t in state]
        outs = []
        for start in range(0, T + pad, chunk_size):
            sl = slice(start, min(start + chunk_size, T + pad))
            args = (qh[rows, :, sl], kh[rows, :, sl], vh[rows, :, sl], q_w[rows, sl], k_w[rows, sl], *carried,
                    cq, ck, tau)
            if recompute:
                out, *carried = _CovChunk.apply(*args, options)
            else:
                out, *carried = _cov_chunk_forward(*args, *options)[:7]
            outs.append(out)
        group_outs.append(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
        group_states.append(carried)
    out = torch.cat(group_outs, dim=0) if len(group_outs) > 1 else group_outs[0]
    out = out[:, :, :T].transpose(1, 2)  # [B, T, H, D]
    out = padded_rows_to_zero(out, q_mask).to(out_dtype)
    if return_state:
        return out, CovPrefixState(*(torch.cat(parts, dim=0) for parts in zip(*group_states)))
    return out


def amlp_cov_causal_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cq: torch.Tensor,
    ck: torch.Tensor,
    state: CovPrefixState,
    *,
    activation: str = "softmax",
    form: str = "stable",
    temperature: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, CovPrefixState]:
    """One recurrent step of the causal AMLP-Cov (eqs. 13-14) for one real token per batch row.

    ``q, k, v`` are ``[B, H, D]``; ``state`` is the :class:`CovPrefixState` before the token.
    Returns the output ``[B, H, D]`` (in the dtype of ``q``) and the state after the token; the
    state passed in is not modified. Equal to :func:`amlp_cov_causal` on the same token with
    ``initial_state=state``, with the three statistics handled together (one softmax, one product
    for ``L_t^T``) so that a step costs a few dozen operator calls whatever the width.
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must be [B, H, D] and equal in shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, D = q.shape
    if form not in CAUSAL_FORMS:
        raise ValueError(f"form must be one of {CAUSAL_FORMS} for causal AMLP-Cov, got {form!r}")
    _check_state(state, B, H, D)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)

    def cast(t):  # a step is a few dozen small operations: skip the calls that would do nothing
        return t if t.dtype == cdt else t.to(cdt)

    q, k, v = cast(q), cast(k), cast(v)
    s_q0, s_k0, z0, vsq0, cnt_q0, cnt_k0 = (cast(t) for t in state)
    stable = form == "stable"
    read_scale = float(scale) if scale is not None else (1.0 / math.sqrt(D) if stable else 1.0)
    tau = torch.ones(H, 3, dtype=cdt, device=q.device) if temperature is None else cast(temperature)
    rows = torch.stack([q, k, k], dim=2)  # [B, H, 3, D]: the left factors of S^Q, S^K, z
    stats = torch.stack([s_q0, s_k0, z0], dim=2).addcmul_(rows.unsqueeze(-1),
                                                          torch.stack([q, k, v], dim=2).unsqueeze(-2))
    s_q, s_k, z = stats.unbind(2)  # the state after the token
    vsq = torch.addcmul(vsq0, v, v)
    cnt_q, cnt_k = cnt_q0 + 1, cnt_k0 + 1
    tau_rows = tau.T.unsqueeze(-1)  # [3, H, 1]: one temperature per statistic and head
    if stable:
        # running column norms of q, k, v: [B, H, 3, D]
        inv = torch.cat([stats[:, :, :2].diagonal(dim1=-2, dim2=-1), vsq.unsqueeze(2)], dim=2).clamp_min(
            eps * eps).rsqrt()
        row_scale = torch.cat([inv[:, :, :2], inv[:, :, 1:2]], dim=2).mul_(tau_rows.transpose(0, 1))
        logits = (stats * row_scale.unsqueeze(-1)).mul_(inv.unsqueeze(-2))
        q_read = q * (cnt_q.sqrt()[:, None, None] * inv[:, :, 0])
    else:
        logits = stats * tau_rows.transpose(0, 1).unsqueeze(-1)
        q_read = q
    maps = torch.softmax(logits, dim=-1)  # [B, H, 3, D, D]
    landmarks = cast(torch.cat([cq, ck], dim=-1))  # [H, c, 2D]
    l_t = torch.matmul(landmarks, maps[:, :, :2].reshape(B, H, 2 * D, D))  # L_t^T, [B, H, c, D]  (eq. 13)
    if stable:
        l_t = F.relu(l_t)
    hidden = activate(torch.matmul(l_t, q_read.unsqueeze(-1)).squeeze(-1) * read_scale, activation)
    out = torch.matmul(torch.matmul(hidden.unsqueeze(-2), l_t), maps[:, :, 2]).squeeze(-2)  # (eq. 14)
    new_state = CovPrefixState(s_q, s_k, z, vsq, cnt_q, cnt_k)
    return out.to(out_dtype), new_state


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
