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
form splits time into chunks: inside a chunk the weights ``exp(c_j - l_t)`` (``j <= t``) form a small
triangular matrix, across chunks the normalised memory at the end of the previous chunk is carried
with weight ``exp(l_end - l_t)``. Short sequences (keys up to ``2D + chunk``) skip the per-step
memories: query t reads ``sum_j w[t, j, s] (q_t . k_j)`` through the pairwise weights
``w[t, j, s] = exp(c_j - l_t)`` and mixes the values with ``sum_s p[t, s] w[t, j, s]`` (less memory
and time there; the same function). The recurrent form is the recurrence above, with a state of
``n (2D + 1)`` numbers per head.

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
DEFAULT_CHUNK = 16


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


def _causal_memory(control: torch.Tensor, kv: torch.Tensor, chunk: int) -> torch.Tensor:
    """Normalised causal memories ``M_t = sum_{j<=t} exp(c_j - l_t) x_j^T``, ``[B, T, H, n, E]``,
    from control logits ``[B, T, H, n]`` and rows ``x`` ``[B, T, H, E]`` (chunked prefix sums)."""
    B, T, H, n = control.shape
    E = kv.shape[-1]
    nc = -(-T // chunk)
    tail = nc * chunk - T
    c = F.pad(control, (0, 0, 0, 0, 0, tail), value=SENTINEL)
    x = F.pad(kv, (0, 0, 0, 0, 0, tail))
    lse = torch.logcumsumexp(c, dim=1)
    c = c.view(B, nc, chunk, H, n)
    lse = lse.view(B, nc, chunk, H, n)
    x = x.view(B, nc, chunk, H, E)
    # within a chunk: w[t, j] = exp(c_j - l_t) for j <= t
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=c.device).triu(1)  # j > t
    expo = c.unsqueeze(2) - lse.unsqueeze(3)  # [B, nc, t, j, H, n]
    w = torch.exp(expo.masked_fill(later[:, :, None, None], float("-inf")))
    memory = torch.einsum("bntjhs,bnjhe->bnthse", w, x)  # [B, nc, chunk, H, n, E]
    if nc > 1:
        # carry the normalised memory at the end of each chunk into the next one
        # (unbind rather than indexing in the loop: its backward is one stack, not nc scatters)
        end_lse = lse[:, :, -1]  # [B, nc, H, n]
        in_chunk_ends = memory[:, :-1, -1].unbind(1)
        end_decays = torch.exp(end_lse[:, :-2] - end_lse[:, 1:-1]).unsqueeze(-1).unbind(1)
        ends = [in_chunk_ends[0]]
        for i in range(1, nc - 1):
            ends.append(in_chunk_ends[i] + end_decays[i - 1] * ends[-1])
        carried = torch.stack(ends, dim=1)  # memories at the ends of chunks 0 .. nc-2
        decay = torch.exp(end_lse[:, :-1].unsqueeze(2) - lse[:, 1:]).unsqueeze(-1)  # [B, nc-1, chunk, H, n, 1]
        memory = torch.cat([memory[:, :1], memory[:, 1:] + decay * carried.unsqueeze(2)], dim=1)
    return memory.reshape(B, nc * chunk, H, n, E)[:, :T]


def _causal_pairwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, control: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal ABC read through the pairwise weights ``w[t, j, s] = exp(c_j - l_t)`` (``j <= t``) without
    materialising a memory per step: ``q_t . K~_t[s] = sum_j w[t, j, s] (q_t . k_j)`` and
    ``out_t = sum_j (sum_s p[t, s] w[t, j, s]) v_j``. ``O(Tq Tk n)`` time and memory, which for short
    sequences is far below the ``O(T n D)`` memories (times the chunk) of the prefix-sum form."""
    Tq, Tk = q.shape[1], k.shape[1]
    lse = torch.logcumsumexp(control, dim=1)[:, Tk - Tq:]  # [B, Tq, H, n]
    later = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(Tk - Tq + 1)  # j > t (end-aligned)
    expo = control.unsqueeze(1) - lse.unsqueeze(2)  # [B, Tq, Tk, H, n]
    w = torch.exp(expo.masked_fill(later[:, :, None, None], float("-inf")))
    scores = torch.einsum("bthd,bjhd->btjh", q, k)
    weights = torch.softmax(torch.einsum("btjhs,btjh->bths", w, scores) * scale, dim=-1)
    return torch.einsum("btjh,bjhd->bthd", torch.einsum("bths,btjhs->btjh", weights, w), v)


def use_pairwise(tk: int, head_dim: int, chunk: int) -> bool:
    """Whether the causal form reads through pairwise weights (:func:`_causal_pairwise`) rather than
    per-step memories: when its ``Tk x n`` weights per query take no more memory than the prefix-sum
    form's ``n x 2D`` memory plus ``chunk x n`` in-chunk weights (keys up to ``2D + chunk``), where it is
    also faster."""
    return tk <= 2 * head_dim + chunk


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
        chunk_size: chunk length of the causal prefix sums (memory ``O(T * chunk * n)`` for the
            in-chunk weights, plus ``O(T n D)`` for the per-step memories).

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
        if use_pairwise(Tk, D, min(chunk_size, Tk)):
            out = _causal_pairwise(q, k, v, c, scale)
        else:
            memory = _causal_memory(c, torch.cat([k, v], dim=-1), min(chunk_size, Tk))[:, Tk - Tq:]
            mem_k, mem_v = memory[..., :D], memory[..., D:]
            weights = torch.softmax(torch.einsum("bthd,bthsd->bths", q, mem_k) * scale, dim=-1)
            out = torch.einsum("bths,bthsd->bthd", weights, mem_v)
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
