r"""The spatial gating unit of gMLP (Liu et al. 2021, "Pay Attention to MLPs", section 2,
the spatial gating unit), used as a token mixer.

The channels are split in two halves ``Z = [Z1, Z2]``; the second half is mixed across positions by
a learned ``n x n`` matrix and gates the first:

    s(Z) = Z1 * f(Z2),  f(Z2) = W_s LayerNorm(Z2) + b_s       (W_s in R^{n x n}, b_s in R^n)

This op takes ``u = Z1`` and ``z = LayerNorm(Z2)`` split into heads, ``[B, T, H, D]``, with one
spatial projection per head (``[H, n, n]``; one head is the paper's unit). A sequence of ``T <= n``
tokens uses the top-left ``T x T`` block of ``W_s`` and the first ``T`` entries of ``b_s``.

Causal form: ``W_s`` is made lower-triangular, so position i mixes positions ``j <= i`` only.

Padding: the columns of ``W_s`` at padded positions are zeroed (padded tokens contribute nothing);
outputs at padded positions are zero.
"""

from __future__ import annotations

import torch

from ._checks import check_mask, compute_dtype, padded_rows_to_zero


def check_halves(u: torch.Tensor, z: torch.Tensor) -> None:
    """Check the two halves ``u, z``: floating-point ``[B, T, H, D]`` tensors of one shape."""
    for name, t in (("u", u), ("z", z)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point tensor shaped [B, T, H, D], got {shape}")
    if u.shape != z.shape:
        raise ValueError(f"u and z must have the same shape [B, T, H, D], got {tuple(u.shape)} and {tuple(z.shape)}")
    if u.shape[1] == 0:
        raise ValueError("the sequence length must be at least 1, got T=0")


def check_spatial(weight: torch.Tensor, bias: torch.Tensor, heads: int, length: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[0] != heads \
            or weight.shape[1] != weight.shape[2]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be shaped [H, n, n] = [{heads}, n, n], got {shape}")
    n = weight.shape[1]
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (heads, n):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be shaped [H, n] = [{heads}, {n}], got {shape}")
    if length > n:
        raise ValueError(f"the spatial projection covers n = {n} positions but the sequence has T = {length} tokens")


def spatial_gating_unit(
    u: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """``u * (W_s z + b_s)`` along the time axis, per head.

    Args:
        u: the gated half ``Z1``, ``[B, T, H, D]``.
        z: the normalised half ``LayerNorm(Z2)``, ``[B, T, H, D]``.
        weight: W_s, ``[H, n, n]`` with ``n >= T``; bias: b_s, ``[H, n]``.
        mask: boolean ``[B, T]``, True = real token.
        causal: use the lower triangle of W_s only.

    Returns ``[B, T, H, D]`` in the dtype of ``u``.
    """
    check_halves(u, z)
    B, T, H, D = u.shape
    check_mask(mask, B, T, "mask")
    check_spatial(weight, bias, H, T)
    out_dtype = u.dtype
    cdt = compute_dtype(u.dtype)
    u, z = u.to(cdt), z.to(cdt)
    w = weight[:, :T, :T].to(cdt)
    if causal:
        w = w.tril()
    z = padded_rows_to_zero(z, mask)  # == zeroing the columns of W_s at padded positions
    gate = torch.einsum("hij,bjhd->bihd", w, z) + bias[:, :T].to(cdt).T[None, :, :, None]
    out = padded_rows_to_zero(u * gate, mask)
    return out.to(out_dtype)


def spatial_gating_unit_reference(u, z, weight, bias, *, mask=None, causal=False):
    """Reference: for each output position i, the sum over the allowed positions j written out."""
    B, T, H, D = u.shape
    out = torch.zeros_like(u)
    for b in range(B):
        for i in range(T):
            if mask is not None and not bool(mask[b, i]):
                continue
            gate = bias[:, i].unsqueeze(-1).to(u.dtype).expand(H, D)
            for j in range(T):
                if (causal and j > i) or (mask is not None and not bool(mask[b, j])):
                    continue
                gate = gate + weight[:, i, j].unsqueeze(-1) * z[b, j]
            out[b, i] = u[b, i] * gate
    return out
