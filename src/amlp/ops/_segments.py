"""Segment-mean landmarks over the real tokens of a sequence (Nystromformer, LARA).

A row with ``n`` real tokens is cut into ``c`` contiguous segments of its real tokens, in order, with
the sizes :func:`torch.tensor_split` uses: the first ``n % c`` segments hold ``n // c + 1`` tokens
and the rest ``n // c``. So ``T`` need not be a multiple of ``c``, padded tokens belong to no
segment, and a right-padded row gives the same landmarks as the row alone.

The number of landmarks a row can have is at most its number of real tokens; the tensors are
``c`` wide for the whole batch and a boolean ``[B, c]`` says which landmarks exist in each row.
"""

from __future__ import annotations

import torch


def landmark_counts(counts: list[torch.Tensor], landmarks: int) -> torch.Tensor:
    """Landmarks per batch row: ``min(landmarks, n_1, n_2, ...)`` over the given real counts ``[B]``."""
    c = torch.full_like(counts[0], landmarks)
    for n in counts:
        c = torch.minimum(c, n)
    return c


def real_token_counts(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Real tokens per row as a long tensor ``[B]``."""
    if mask is None:
        return torch.full((batch,), length, dtype=torch.long, device=device)
    return mask.sum(1)


def segment_ids(mask: torch.Tensor | None, c_row: torch.Tensor, batch: int, length: int, device) -> torch.Tensor:
    """Segment of every token, ``[B, T]`` long; -1 for padded tokens (and rows with no landmark).

    ``c_row`` ``[B]`` is the number of segments of each row (at most its real token count).
    """
    if mask is None:
        rank = torch.arange(length, device=device).expand(batch, length)
        real = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        rank = mask.long().cumsum(1) - 1
        real = mask
    n = real.sum(1)
    c = c_row.clamp_min(1)
    small = (n // c).clamp_min(1)  # size of the later segments
    rem = n % c  # the first `rem` segments hold one more token
    boundary = rem * (small + 1)
    rank_b = rank
    first = rank_b // (small + 1).unsqueeze(1)
    later = rem.unsqueeze(1) + (rank_b - boundary.unsqueeze(1)) // small.unsqueeze(1)
    seg = torch.where(rank_b < boundary.unsqueeze(1), first, later)
    keep = real & (c_row > 0).unsqueeze(1)
    return torch.where(keep, seg, torch.full_like(seg, -1))


def segment_means(x: torch.Tensor, seg: torch.Tensor, width: int) -> torch.Tensor:
    """Mean of ``x`` (``[B, T, H, D]``) over each segment: ``[B, H, width, D]`` (zeros where empty)."""
    onehot = (seg.unsqueeze(-1) == torch.arange(width, device=x.device)).to(x.dtype)  # [B, T, c]
    sums = torch.einsum("btc,bthd->bhcd", onehot, x)
    sizes = onehot.sum(1).clamp_min(1.0)  # [B, c]
    return sums / sizes[:, None, :, None]


def landmark_valid(c_row: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` bool: True where landmark ``j < c_row[b]`` exists."""
    return torch.arange(width, device=c_row.device).unsqueeze(0) < c_row.unsqueeze(1)


def segment_means_reference(rows: torch.Tensor, c: int) -> torch.Tensor:
    """Plain form for one batch row and head: ``rows`` ``[n, D]`` -> ``[c, D]`` means of
    :func:`torch.tensor_split` pieces."""
    return torch.stack([piece.mean(0) for piece in torch.tensor_split(rows, c, dim=0)])


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``allowed`` (broadcastable bool); a row with nothing
    allowed gives zeros, never NaN."""
    filled = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=-1) * allowed.to(logits.dtype)
