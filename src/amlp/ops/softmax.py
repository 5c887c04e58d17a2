"""Softmax attention (Vaswani et al. 2017), the baseline every mixer is measured against.

    out_i = sum_j softmax_j(scale * q_i . k_j) v_j

computed with :func:`torch.nn.functional.scaled_dot_product_attention`, which dispatches to a fused
(flash-style) kernel on CPU and GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_mask, check_qkv, compute_dtype, guard_padded_rows, padded_rows_to_zero


def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """Boolean ``[Tq, Tk]`` mask, True where query i may see key j.

    Queries are aligned to the end of the keys (query i sits at key position ``i + Tk - Tq``), which
    is the convention of decoding with a cache: one new query against every key so far.
    """
    offset = tk - tq
    qi = torch.arange(tq, device=device).unsqueeze(1)
    kj = torch.arange(tk, device=device).unsqueeze(0)
    return kj <= qi + offset


def key_mask_for_sdpa(kv_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Turn a key padding mask ``[B, Tk]`` into an SDPA mask ``[B, 1, 1, Tk]``.

    Rows with no real key at all are opened to every key (so no kernel meets an all-masked row and
    produces NaN); the second return value flags those rows, ``[B]``, so the caller can zero them.
    On the CPU it is None when no row is empty; on a GPU, and under ``torch.compile``, it is always
    returned (no host sync, and no data-dependent branch in a graph).
    """
    if kv_mask is None:
        return None, None
    empty = ~kv_mask.any(1)
    if kv_mask.device.type != "cpu" or torch.compiler.is_compiling() or bool(empty.any()):
        kv_mask = kv_mask | empty.unsqueeze(1)
        return kv_mask[:, None, None, :], empty
    return kv_mask[:, None, None, :], None


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention on ``[B, T, H, D]`` tensors.

    Args:
        q: queries ``[B, Tq, H, D]``; k, v: keys and values ``[B, Tk, H, D]``.
        q_mask, kv_mask: boolean ``[B, Tq]`` / ``[B, Tk]``, True = real token. Outputs at padded
            queries, and at every query of a row whose keys are all padding, are zero.
        causal: query i sees keys ``j <= i + Tk - Tq`` (end-aligned; plain lower-triangular when
            ``Tq == Tk``).
        scale: logit scale, ``1/sqrt(D)`` by default.
        dropout_p: dropout on the attention weights (pass 0 outside training).

    Returns ``[B, Tq, H, D]`` in the dtype of ``q`` (float32 arithmetic for half inputs).
    """
    check_qkv(q, k, v)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    check_mask(q_mask, B, Tq, "q_mask")
    check_mask(kv_mask, B, Tk, "kv_mask")
    q, k, v = guard_padded_rows(q, k, v, q_mask, kv_mask)
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries end-aligned to keys), got Tq={Tq}, Tk={Tk}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype) if q.device.type == "cpu" else q.dtype
    qh, kh, vh = (t.to(cdt).transpose(1, 2) for t in (q, k, v))

    attn_mask, empty = key_mask_for_sdpa(kv_mask)
    is_causal = False
    if causal:
        if attn_mask is None and Tq == Tk:
            is_causal = True
        else:
            cm = causal_mask(Tq, Tk, q.device)
            attn_mask = cm if attn_mask is None else attn_mask & cm
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                         dropout_p=float(dropout_p))
    out = out.transpose(1, 2)
    if empty is not None:
        out = padded_rows_to_zero(out, (~empty).unsqueeze(1).expand(B, Tq))
    out = padded_rows_to_zero(out, q_mask)
    return out.to(out_dtype)


def softmax_attention_reference(q, k, v, *, q_mask=None, kv_mask=None, causal=False, scale=None):
    """Dense reference: explicit logits, masked softmax, weighted sum. Same contract as above."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if kv_mask is not None:
        allowed = allowed & kv_mask[:, None, None, :]
    if causal:
        allowed = allowed & causal_mask(Tq, Tk, q.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhij,bjhd->bihd", weights, v)
    if q_mask is not None:
        out = out * q_mask[:, :, None, None].to(out.dtype)
    return out
