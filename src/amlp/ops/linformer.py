r"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity",
section 4).

Keys and values are projected along the sequence onto ``k`` positions before softmax attention:

    K' = E K,  V' = F V                        (E, F in R^{k x n}; K, V in R^{n x D})
    out = softmax(Q K'^T / sqrt(D)) V'         (T x k logits: linear in T for fixed k)

``n`` is the maximum sequence length the projections were built for; a sequence of ``T <= n``
tokens uses the first ``T`` columns of ``E`` and ``F``. ``E`` and ``F`` are either shared by all
heads (``[k, n]``, the paper's head-wise sharing) or one per head (``[H, k, n]``).

Self-attention only, non-causal: every projected key mixes the whole sequence.

Padding: padded rows of K and V are zeroed before the projection, so padded tokens contribute
nothing (a sequence padded on the right gives the same outputs as the unpadded one); outputs at
padded queries are zero, and a row without real tokens returns zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_mask, check_qkv, compute_dtype, guard_padded_rows, padded_rows_to_zero


def check_projection(p: torch.Tensor, heads: int, length: int, name: str) -> None:
    """Check a sequence projection ``[k, n]`` or ``[H, k, n]`` that covers ``length`` positions."""
    if not isinstance(p, torch.Tensor) or p.dim() not in (2, 3) or (p.dim() == 3 and p.shape[0] != heads):
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise ValueError(f"{name} must be shaped [k, n] or [H, k, n] = [{heads}, k, n], got {shape}")
    if p.shape[-1] < length:
        raise ValueError(f"{name} covers n = {p.shape[-1]} positions but the sequence has T = {length} tokens")


def _first_columns(p: torch.Tensor, length: int, dtype) -> torch.Tensor:
    """``[H or 1, k, T]``: the first ``T`` columns of a projection."""
    p = p[..., :length].to(dtype)
    return p if p.dim() == 3 else p.unsqueeze(0)


def linformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    e_proj: torch.Tensor,
    f_proj: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Linformer attention on ``[B, T, H, D]`` tensors (self-attention: Tq == Tk).

    Args:
        q, k, v: ``[B, T, H, D]``.
        e_proj, f_proj: E and F, ``[k, n]`` or ``[H, k, n]`` with ``n >= T``.
        q_mask, kv_mask: boolean ``[B, T]``, True = real token.
        scale: logit scale, ``1/sqrt(D)`` by default.

    Returns ``[B, T, H, D]`` in the dtype of ``q``.
    """
    check_qkv(q, k, v, same_length=True)
    B, T, H, D = q.shape
    check_mask(q_mask, B, T, "q_mask")
    check_mask(kv_mask, B, T, "kv_mask")
    q, k, v = guard_padded_rows(q, k, v, q_mask, kv_mask)
    check_projection(e_proj, H, T, "e_proj")
    check_projection(f_proj, H, T, "f_proj")
    if e_proj.shape[-2] != f_proj.shape[-2]:
        raise ValueError(f"e_proj and f_proj must project to the same k, got {e_proj.shape[-2]} and {f_proj.shape[-2]}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    k, v = padded_rows_to_zero(k, kv_mask), padded_rows_to_zero(v, kv_mask)
    k_low = torch.einsum("hct,bthd->bhcd", _first_columns(e_proj, T, cdt), k)  # [B, H, k, D]
    v_low = torch.einsum("hct,bthd->bhcd", _first_columns(f_proj, T, cdt), v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_low, v_low, scale=scale).transpose(1, 2)
    out = padded_rows_to_zero(out, q_mask)
    return out.to(out_dtype)


def linformer_attention_reference(q, k, v, e_proj, f_proj, *, q_mask=None, kv_mask=None, scale=None):
    """Reference: eq. 7 per batch row and head with explicit matrices. Same contract as above."""
    B, T, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.zeros_like(q)
    for b in range(B):
        keep = torch.ones(T, dtype=q.dtype) if kv_mask is None else kv_mask[b].to(q.dtype)
        for h in range(H):
            E = (e_proj if e_proj.dim() == 2 else e_proj[h])[:, :T]
            Fm = (f_proj if f_proj.dim() == 2 else f_proj[h])[:, :T]
            k_low = E @ (k[b, :, h] * keep[:, None])
            v_low = Fm @ (v[b, :, h] * keep[:, None])
            weights = torch.softmax(scale * (q[b, :, h] @ k_low.T), dim=-1)
            out[b, :, h] = weights @ v_low
    if q_mask is not None:
        out = out * q_mask[:, :, None, None].to(out.dtype)
    return out
