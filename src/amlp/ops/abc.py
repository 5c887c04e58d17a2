r"""ABC: Attention with Bounded-memory Control (Peng et al. 2022, ACL; the ABC_MLP variant,
whose control vectors are learned).

The keys and values are written into ``n`` memory slots by learned control weights, and each query
attends to the ``n`` slots instead of the ``T`` keys:

    phi_j = exp(c_j),   c_j = W_phi x_j in R^n                 (control logits, one per slot)
    K~ = sum_j alpha_j k_j^T,   V~ = sum_j alpha_j v_j^T,     alpha_{j,s} = phi_{j,s} / sum_i phi_{i,s}
    out_i = softmax(scale * q_i K~^T) V~                        (n x D memories; O(T n D) time)

The control weights are normalised per slot over the positions written (a softmax over time).

**Causal form.** The memory read by query t holds positions ``j <= t`` only, normalised by the
running total at step t:

    K~_t = sum_{j<=t} phi_j k_j^T / sum_{j<=t} phi_j                 (per slot)

This is evaluated with prefix sums in log space: with ``l_t = logcumsumexp_{j<=t}(c_j)``,

    K~_t = exp(l_{t-1} - l_t) K~_{t-1} + exp(c_t - l_t) k_t^T,

every exponent is ``<= 0``, so nothing overflows whatever the scale of the logits. The parallel
form splits time into chunks and never forms the per-step memories: inside a chunk, query t reads
``sum_j w[t, j, s] (q_t . k_j)`` through the pairwise weights ``w[t, j, s] = exp(c_j - l_t)``
(``j <= t``, a small triangular array) and mixes the values with ``sum_s p[t, s] w[t, j, s]``; the
normalised memory at the end of the previous chunk is read with weight ``exp(l_end - l_t)``, and
those boundary memories follow the recurrence above from chunk to chunk. The recurrent form is the
recurrence itself, with a state of ``n (2D + 1)`` numbers per head.

Padding: padded keys get no weight (their logits are pushed to a sentinel far below any real
logit, which keeps the log-space arithmetic finite); outputs at padded queries are zero, and a query
that has no real key to read (a fully padded row, or causal queries before the first real key)
returns zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_mask, check_qkv, compute_dtype, padded_rows_to_zero

#: logit given to padded keys: exp(SENTINEL - any real logit) is exactly 0, and sums stay finite
SENTINEL = -1e30
DEFAULT_CHUNK = 8


def check_control(control: torch.Tensor, batch: int, length: int, heads: int) -> int:
    """Check the control logits ``[B, Tk, H, n]``; return ``n``."""
    if (not isinstance(control, torch.Tensor) or control.dim() != 4
            or tuple(control.shape[:3]) != (batch, length, heads) or control.shape[3] < 1):
        shape = tuple(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__
        raise ValueError(f"control must be shaped [B, Tk, H, n] = [{batch}, {length}, {heads}, n] with n >= 1, "
                         f"got {shape}")
    if not control.is_floating_point():
        raise ValueError(f"control must be a floating-point tensor, got dtype {control.dtype}")
    return control.shape[3]


def _softmax_or_zero(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` where ``-inf`` marks excluded entries; an all-excluded slice gives zeros
    (and zero gradients), never NaN."""
    top = logits.detach().amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(logits - top)
    return e / e.sum(dim, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def _causal_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, control: torch.Tensor, scale: float,
                    chunk: int) -> torch.Tensor:
    """Causal ABC in chunks of ``chunk`` positions, ``q`` aligned with the keys (``[B, T, H, D]``, the
    same T). For query t in a chunk that starts after the normalised memories ``K0, V0`` (``n x D``
    per head, the state after the previous chunks, with running total ``L0``):

        q_t . K~_t[s] = exp(L0_s - l_ts) q_t . K0[s] + sum_{j <= t in the chunk} w[t, j, s] q_t . k_j
        out_t = sum_s p[t, s] exp(L0_s - l_ts) V0[s] + sum_j (sum_s p[t, s] w[t, j, s]) v_j

    with ``w[t, j, s] = exp(c_js - l_ts)`` and ``p[t] = softmax(scale q_t . K~_t)``. The per-step
    memories are never formed: the work is ``O(T chunk n)`` weights and ``O(T n D)`` products, and
    the states at the chunk boundaries follow one small recurrence over the chunks."""
    B, T, H, D = k.shape
    n = control.shape[-1]
    C = min(chunk, T)
    nc = -(-T // C)
    tail = nc * C - T
    if tail:  # positions after the end: no weight, nothing read
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, tail)) for x in (q, k, v))
        control = F.pad(control, (0, 0, 0, 0, 0, tail), value=SENTINEL)
    # heads first, contiguous: [B, H, nc, C, .], so every product below is one batched matrix product
    c = control.permute(0, 2, 3, 1).contiguous()  # [B, H, n, T]: the running sum along the last axis
    lse = torch.logcumsumexp(c, dim=-1).view(B, H, n, nc, C).permute(0, 1, 3, 4, 2)  # [B, H, nc, C, n]
    c = c.view(B, H, n, nc, C).permute(0, 1, 3, 4, 2)
    q, k, v = (x.view(B, nc, C, H, D).permute(0, 3, 1, 2, 4).contiguous() for x in (q, k, v))
    ends = lse[:, :, :, -1]  # running totals at the ends of the chunks, [B, H, nc, n]
    first = torch.full_like(ends[:, :, :1], float("-inf"))
    before = torch.cat([first, ends[:, :, :-1]], dim=2)  # L0 of each chunk
    # the normalised memories at the chunk boundaries: M_i = exp(L_{i-1} - L_i) M_{i-1} + S_i
    kv = torch.cat([k, v], dim=-1)
    weight = torch.exp(c - ends.unsqueeze(3))  # [B, H, nc, C, n]
    sums = torch.matmul(weight.transpose(-1, -2), kv)  # S_i, [B, H, nc, n, 2D]
    decay = torch.exp(before - ends).unsqueeze(-1)  # [B, H, nc, n, 1], 0 for the first chunk
    states = [torch.zeros_like(sums[:, :, 0])]
    # unbound once: one backward node for all chunks (a select per chunk would add a full-size zero
    # gradient per chunk)
    for d_i, s_i in zip(decay.unbind(2)[:-1], sums.unbind(2)[:-1]):
        states.append(d_i * states[-1] + s_i)
    start = torch.stack(states, dim=2)  # memories before each chunk, [B, H, nc, n, 2D]
    k0, v0 = start[..., :D], start[..., D:]
    carry = torch.exp(before.unsqueeze(3) - lse)  # exp(L0 - l_t), [B, H, nc, C, n]
    later = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)  # [t, j]: j > t
    # w[t, j, s] as [B, H, nc, t, s, j]: the products below contract j or s as matrix products
    w = torch.exp((c.transpose(-1, -2).unsqueeze(3) - lse.unsqueeze(5)).masked_fill(later[:, None, :], float("-inf")))
    pair = torch.matmul(q, k.transpose(-1, -2))  # q_t . k_j inside the chunk, [B, H, nc, t, j]
    logits = carry * torch.matmul(q, k0.transpose(-1, -2)) + torch.matmul(w, pair.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(logits * scale, dim=-1)  # [B, H, nc, t, s]
    mix = torch.matmul(p.unsqueeze(-2), w).squeeze(-2)  # sum_s p[t, s] w[t, j, s], [B, H, nc, t, j]
    out = torch.matmul(p * carry, v0) + torch.matmul(mix, v)  # [B, H, nc, C, D]
    return out.permute(0, 2, 3, 1, 4).reshape(B, nc * C, H, D)[:, :T]


def abc_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    control: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """ABC attention on ``[B, T, H, D]`` tensors with ``n`` memory slots per head.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H, D]`` (Tq may differ from Tk: cross-attention).
        control: control logits ``c = W_phi x`` of the key positions, ``[B, Tk, H, n]``.
        q_mask, kv_mask: boolean ``[B, Tq]`` / ``[B, Tk]``, True = real token.
        causal: query i reads the memory of keys ``j <= i + Tk - Tq`` (end-aligned, as in
            :func:`amlp.ops.softmax.softmax_attention`), normalised by the running total.
        scale: logit scale of the read-out, ``1/sqrt(D)`` by default.
        chunk_size: chunk length of the causal form (memory ``O(T * chunk * n)`` for the in-chunk
            weights; a Python step per chunk for the memories at the chunk boundaries).

    Returns ``[B, Tq, H, D]`` in the dtype of ``q``.
    """
    check_qkv(q, k, v)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    check_mask(q_mask, B, Tq, "q_mask")
    check_mask(kv_mask, B, Tk, "kv_mask")
    check_control(control, B, Tk, H)
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries end-aligned to keys), got Tq={Tq}, Tk={Tk}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    q, k, v, c = q.to(cdt), k.to(cdt), v.to(cdt), control.to(cdt)
    k, v = padded_rows_to_zero(k, kv_mask), padded_rows_to_zero(v, kv_mask)

    if not causal:
        if kv_mask is not None:
            c = c.masked_fill(~kv_mask[:, :, None, None], float("-inf"))
        alpha = _softmax_or_zero(c, dim=1)  # [B, Tk, H, n], normalised over time per slot
        mem_k = torch.einsum("bjhs,bjhd->bhsd", alpha, k)
        mem_v = torch.einsum("bjhs,bjhd->bhsd", alpha, v)
        # a row without real keys has zero memories and so reads zero
        out = F.scaled_dot_product_attention(q.transpose(1, 2), mem_k, mem_v, scale=scale).transpose(1, 2)
    else:
        if kv_mask is not None:
            c = c.masked_fill(~kv_mask[:, :, None, None], SENTINEL)
        # queries end-aligned to the keys: the first Tk - Tq key positions have no query
        aligned = q if Tq == Tk else F.pad(q, (0, 0, 0, 0, Tk - Tq, 0))
        out = _causal_chunked(aligned, k, v, c, scale, chunk_size)[:, Tk - Tq:]
        if kv_mask is not None:
            # a query before the first real key reads nothing
            seen = (kv_mask.cumsum(1) > 0)[:, Tk - Tq:]
            out = padded_rows_to_zero(out, seen)
    out = padded_rows_to_zero(out, q_mask)
    return out.to(out_dtype)


def abc_step(q_t, k_t, v_t, control_t, state, *, scale: float | None = None):
    """One causal step: fold ``(k_t, v_t)`` into the memories and read them with ``q_t``.

    ``q_t, k_t, v_t``: ``[B, H, D]``; ``control_t``: ``[B, H, n]``; ``state``: a dict with
    ``lse`` ``[B, H, n]`` (log of the running totals; start at :data:`SENTINEL`) and ``k, v``
    ``[B, H, n, D]`` (the normalised memories; start at zero). Returns ``(out_t [B, H, D], state)``.
    """
    D = q_t.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lse = torch.logaddexp(state["lse"], control_t)
    keep = torch.exp(state["lse"] - lse).unsqueeze(-1)
    write = torch.exp(control_t - lse).unsqueeze(-1)
    mem_k = keep * state["k"] + write * k_t.unsqueeze(-2)
    mem_v = keep * state["v"] + write * v_t.unsqueeze(-2)
    weights = torch.softmax(torch.einsum("bhd,bhsd->bhs", q_t, mem_k) * scale, dim=-1)
    out = torch.einsum("bhs,bhsd->bhd", weights, mem_v)
    return out, {"lse": lse, "k": mem_k, "v": mem_v}


def abc_attention_reference(q, k, v, control, *, q_mask=None, kv_mask=None, causal=False, scale=None):
    """Reference ABC: for every query, the memories built from the keys it may read, directly as
    ``K~ = softmax_over_time(c)^T K``. Same contract as :func:`abc_attention`."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(Tq):
            if q_mask is not None and not bool(q_mask[b, i]):
                continue
            last = i + Tk - Tq if causal else Tk - 1
            keys = [j for j in range(last + 1) if kv_mask is None or bool(kv_mask[b, j])]
            if not keys:
                continue
            idx = torch.tensor(keys, device=q.device)
            alpha = torch.softmax(control[b, idx], dim=0)  # [n_keys, H, n]: per head and slot, over time
            mem_k = torch.einsum("jhs,jhd->hsd", alpha, k[b, idx])  # [H, n, D]
            mem_v = torch.einsum("jhs,jhd->hsd", alpha, v[b, idx])
            read = torch.softmax(scale * torch.einsum("hsd,hd->hs", mem_k, q[b, i]), dim=-1)
            out[b, i] = torch.einsum("hs,hsd->hd", read, mem_v)
    return out
