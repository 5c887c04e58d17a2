r"""Local (windowed) softmax attention (Luong et al. 2015, "Effective Approaches to Attention-based
Neural Machine Translation", section 3.2: local-m, the window centred on the query's own position;
the AMLP paper's "local" baseline, Table 8 ``wsize``).

Each query attends only to the keys inside a fixed window around it:

    out_i = sum_{j in W(i)} softmax_j(scale * q_i . k_j) v_j

    non-causal:  W(i) = { j : |i - j| <= wsize // 2 }        (2 * (wsize // 2) + 1 keys)
    causal:      W(i) = { j : i - wsize < j <= i }            (the last ``wsize`` keys)

Queries and keys share one time axis (self-attention); cross-attention would need an explicit
alignment between the two sequences, which this op does not take.

Implementation: the queries are cut into blocks of ``b >= reach`` positions (``reach`` = how far the
window extends to either side), and each query block attends to the key blocks next to it (one on
each side for the non-causal window, one on the left for the causal one). Keys are gathered with a
strided view (:meth:`torch.Tensor.unfold`), so the logits are ``[B, H, T, <= 3b]``: memory
``O(T * wsize)``, never ``T x T``. Each block runs on
:func:`torch.nn.functional.scaled_dot_product_attention` with a boolean band mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_mask, check_qkv, compute_dtype, guard_padded_rows, padded_rows_to_zero


def check_window(wsize) -> None:
    if isinstance(wsize, bool) or not isinstance(wsize, int) or wsize < 1:
        raise ValueError(f"wsize must be an int >= 1, got {wsize!r}")


def window_offsets(wsize: int, causal: bool) -> tuple[int, int]:
    """The window as offsets ``(lo, hi)``: query i sees key j when ``lo <= j - i <= hi``."""
    check_window(wsize)
    if causal:
        return -(wsize - 1), 0
    half = wsize // 2
    return -half, half


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    wsize: int = 15,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Windowed softmax attention on ``[B, T, H, D]`` tensors (self-attention: Tq == Tk).

    Args:
        q, k, v: ``[B, T, H, D]``.
        wsize: window size; non-causal queries see ``|i - j| <= wsize // 2``, causal queries see
            ``i - wsize < j <= i``.
        q_mask, kv_mask: boolean ``[B, T]``, True = real token. Padded keys are never attended;
            outputs at padded queries, and at queries with no real key in their window, are zero.
        causal: use the causal (left) window.
        scale: logit scale, ``1/sqrt(D)`` by default.
        block_size: query block length (at least the window's reach, which is the default).

    Returns ``[B, T, H, D]`` in the dtype of ``q``.
    """
    check_qkv(q, k, v, same_length=True)
    B, T, H, D = q.shape
    check_mask(q_mask, B, T, "q_mask")
    check_mask(kv_mask, B, T, "kv_mask")
    q, k, v = guard_padded_rows(q, k, v, q_mask, kv_mask)
    lo, hi = window_offsets(wsize, causal)
    reach = max(-lo, hi, 1)
    if block_size is None:
        block_size = reach
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < reach:
        raise ValueError(f"block_size must be an int >= the window reach {reach}, got {block_size!r}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)

    bs = block_size
    nb = -(-T // bs)
    tail = nb * bs - T
    left = 1 if lo < 0 else 0
    right = 1 if hi > 0 else 0
    width = (left + 1 + right) * bs
    pad_keys = (left * bs, tail + right * bs)

    q_blocks = F.pad(q, (0, 0, 0, 0, 0, tail)).view(B, nb, bs, H, D)

    def key_windows(x):  # [B, T, H, D] -> [B * nb, H, width, D]; window n covers block n-left .. n+right
        xp = F.pad(x, (0, 0, 0, 0) + pad_keys)
        return xp.unfold(1, width, bs).permute(0, 1, 2, 4, 3).reshape(B * nb, H, width, D)

    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if kv_mask is None else kv_mask
    real_windows = F.pad(real, pad_keys, value=False).unfold(1, width, bs)  # [B, nb, width]
    a = torch.arange(bs, device=q.device).unsqueeze(1)
    c = torch.arange(width, device=q.device).unsqueeze(0)
    offset = c - left * bs - a  # j - i for query a of a block and key c of its window
    band = (offset >= lo) & (offset <= hi)
    allowed = band & real_windows.unsqueeze(2)  # [B, nb, bs, width]
    empty = ~allowed.any(-1)  # queries with no real key in their window
    # open the query's own slot for those rows so no kernel meets an all-masked row; zeroed below
    allowed = allowed | (empty.unsqueeze(-1) & (offset == 0))

    qh = q_blocks.permute(0, 1, 3, 2, 4).reshape(B * nb, H, bs, D)
    out = F.scaled_dot_product_attention(
        qh, key_windows(k), key_windows(v), attn_mask=allowed.reshape(B * nb, 1, bs, width), scale=scale
    )
    out = out.view(B, nb, H, bs, D).permute(0, 1, 3, 2, 4).reshape(B, nb * bs, H, D)[:, :T]
    out = padded_rows_to_zero(out, ~empty.reshape(B, nb * bs)[:, :T])
    out = padded_rows_to_zero(out, q_mask)
    return out.to(out_dtype)


def local_attention_reference(q, k, v, *, wsize=15, q_mask=None, kv_mask=None, causal=False, scale=None):
    """Reference: one query at a time, its window's real keys picked by index. Same contract."""
    B, T, H, D = q.shape
    lo, hi = window_offsets(wsize, causal)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(T):
            if q_mask is not None and not bool(q_mask[b, i]):
                continue
            keys = [j for j in range(max(0, i + lo), min(T, i + hi + 1))
                    if kv_mask is None or bool(kv_mask[b, j])]
            if not keys:
                continue
            idx = torch.tensor(keys, device=q.device)
            logits = torch.einsum("hd,jhd->hj", q[b, i], k[b, idx]) * scale
            out[b, i] = torch.einsum("hj,jhd->hd", torch.softmax(logits, dim=-1), v[b, idx])
    return out
