"""Small building blocks shared by several ops: activations and column norms."""

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


def column_scale(sumsq: torch.Tensor, count: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt(n) / ||column||``: multiplying a column by it gives unit root-mean-square over the
    ``n`` real positions. ``sumsq`` is ``[B, H, D]``, ``count`` is ``[B]``; returns ``[B, H, D]``."""
    norm = sumsq.clamp_min(eps * eps).sqrt()
    return count.clamp_min(1.0).sqrt()[:, None, None] / norm
