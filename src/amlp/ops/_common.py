"""Small building blocks shared by several ops: activations, masked Gram matrices, column norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("softmax", "relu", "sigmoid", "identity")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activate(x: torch.Tensor, activation: str, dim: int = -1) -> torch.Tensor:
    """Apply sigma_1: softmax over ``dim``, or an element-wise relu / sigmoid / identity."""
    if activation == "softmax":
        return torch.softmax(x, dim=dim)
    if activation == "relu":
        return F.relu(x)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "identity":
        return x
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _mask_weights(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask.to(x.dtype)[:, :, None, None]


class _MaskedGram(torch.autograd.Function):
    """``G[b, h] = sum_t m[b, t] x[b, t, h]^T y[b, t, h]`` (``[B, H, D, D]``) from ``[B, T, H, D]`` inputs.

    Only the inputs are kept for backward (no masked or transposed copies), which keeps the peak
    memory of a training step at the size of the inputs themselves.
    """

    @staticmethod
    def forward(ctx, x, y, mask):
        w = _mask_weights(mask, x)
        xm = x if w is None else x * w
        ctx.save_for_backward(x, y, mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return torch.einsum("bthd,bthe->bhde", xm, y)

    @staticmethod
    def backward(ctx, grad):
        x, y, mask = ctx.saved_tensors
        mask = mask if ctx.has_mask else None
        w = _mask_weights(mask, x)
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = torch.einsum("bthe,bhde->bthd", y, grad)
            if w is not None:
                gx = gx * w
        if ctx.needs_input_grad[1]:
            gy = torch.einsum("bthd,bhde->bthe", x, grad)
            if w is not None:
                gy = gy * w
        return gx, gy, None


def masked_gram(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``X^T diag(m) Y`` per batch and head: ``[B, T, H, D] x [B, T, H, E] -> [B, H, D, E]``."""
    return _MaskedGram.apply(x, y, mask)


def masked_sumsq(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-column sum of squares over real positions: ``[B, T, H, D] -> [B, H, D]``."""
    sq = x.square()
    if mask is not None:
        sq = sq * mask.to(x.dtype)[:, :, None, None]
    return sq.sum(1)


def column_scale(sumsq: torch.Tensor, count: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt(n) / ||column||``: multiplying a column by it gives unit root-mean-square over the
    ``n`` real positions. ``sumsq`` is ``[B, H, D]``, ``count`` is ``[B]``; returns ``[B, H, D]``."""
    norm = sumsq.clamp_min(eps * eps).sqrt()
    return count.clamp_min(1.0).sqrt()[:, None, None] / norm
