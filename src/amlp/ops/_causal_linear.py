"""Chunked causal linear attention, shared by the kernelised ops (Performer, cosFormer).

Given query features ``phi_q`` ``[B, Tq, H, F]``, key features ``phi_k`` ``[B, Tk, H, F]`` and
values ``v`` ``[B, Tk, H, D]``, with queries end-aligned to keys (query i sits at key position
``i + Tk - Tq``), computes

    num_i = phi_q_i^T sum_{j <= i + Tk - Tq} phi_k_j v_j^T,      den_i = phi_q_i^T sum_{j <= ...} phi_k_j

in chunks of ``chunk`` positions: inside a chunk an explicit lower-triangular ``chunk x chunk``
product, across chunks an exclusive prefix sum of per-chunk ``F x D`` states. Memory is
``O(T * chunk + (T / chunk) * F * D)`` per (batch, head), instead of the ``O(T * F * D)`` of a full
prefix sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Prefix sums over dim 1 that leave out the element itself."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1).cumsum(1)


def causal_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                            chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal numerator ``[B, Tq, H, D]`` and denominator ``[B, Tq, H]`` (see the module docstring)."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    B, Tq, H, Fdim = phi_q.shape
    Tk = phi_k.shape[1]
    T = Tk
    if Tq < Tk:  # zero queries in front put query i at key position i + Tk - Tq
        phi_q = F.pad(phi_q, (0, 0, 0, 0, Tk - Tq, 0))
    L = max(1, min(chunk, T))
    pad = (-T) % L
    if pad:
        phi_q = F.pad(phi_q, (0, 0, 0, 0, 0, pad))
        phi_k = F.pad(phi_k, (0, 0, 0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, 0, 0, pad))
    n = (T + pad) // L
    qc = phi_q.reshape(B, n, L, H, Fdim)
    kc = phi_k.reshape(B, n, L, H, Fdim)
    vc = v.reshape(B, n, L, H, v.shape[-1])

    lower = torch.ones(L, L, dtype=torch.bool, device=phi_q.device).tril()
    scores = torch.einsum("bnlhf,bnshf->bnhls", qc, kc) * lower.to(phi_q.dtype)
    num = torch.einsum("bnhls,bnshd->bnlhd", scores, vc)
    den = scores.sum(-1).transpose(2, 3)  # [B, n, L, H]

    state = torch.einsum("bnshf,bnshd->bnhfd", kc, vc)
    state = _exclusive_cumsum(state)  # sums over the earlier chunks only, [B, n, H, F, D]
    norm = _exclusive_cumsum(kc.sum(2))  # [B, n, H, F]
    num = num + torch.einsum("bnlhf,bnhfd->bnlhd", qc, state)
    den = den + torch.einsum("bnlhf,bnhf->bnlh", qc, norm)

    num = num.reshape(B, n * L, H, -1)[:, T - Tq:T]
    den = den.reshape(B, n * L, H)[:, T - Tq:T]
    return num, den
