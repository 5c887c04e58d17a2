"""Nystromformer layer: segment-mean landmarks and an iterative pseudo-inverse."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.nystrom import (
    DEFAULT_LANDMARKS,
    DEFAULT_PINV_ITERATIONS,
    nystrom_attention,
    nystrom_attention_reference,
)
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer


@register_mixer("nystrom", description="Nystromformer: Nystrom approximation with segment-mean landmarks (linear time)",
                reference="Xiong et al. 2021, Nystromformer: A Nystrom-Based Algorithm for Approximating "
                          "Self-Attention, eqs. 14-16")
class Nystromformer(ProjectedMixer):
    r"""Nystromformer attention (see :mod:`amlp.ops.nystrom`):

        out = softmax(Q K~^T / sqrt(D)) pinv(softmax(Q~ K~^T / sqrt(D))) softmax(Q~ K^T / sqrt(D)) V

    Args:
        dim, heads: model width E and heads H.
        landmarks: number of segment-mean landmarks c (default 16; fewer when a sequence has fewer
            real tokens).
        pinv_iterations: iterations of the Moore-Penrose scheme (default 6, as in the paper).
        conv_kernel: odd kernel size of the optional depthwise convolution skip on V (the paper uses
            33); None (default) for no skip. Self-attention only.
        cross: accept a separate context (key landmarks from the context).
        dropout, bias: output dropout and projection biases.
    """

    capabilities = Capabilities(causal=False, noncausal=True, cross=True, padding=True)

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 landmarks: int = DEFAULT_LANDMARKS, pinv_iterations: int = DEFAULT_PINV_ITERATIONS,
                 conv_kernel: int | None = None, dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        if isinstance(landmarks, bool) or not isinstance(landmarks, int) or landmarks < 1:
            raise ValueError(f"landmarks must be an int >= 1, got {landmarks!r}")
        if isinstance(pinv_iterations, bool) or not isinstance(pinv_iterations, int) or pinv_iterations < 0:
            raise ValueError(f"pinv_iterations must be an int >= 0, got {pinv_iterations!r}")
        if conv_kernel is not None:
            if isinstance(conv_kernel, bool) or not isinstance(conv_kernel, int) or conv_kernel < 1 or conv_kernel % 2 == 0:
                raise ValueError(f"conv_kernel must be an odd int >= 1 or None, got {conv_kernel!r}")
            if cross:
                raise ValueError("conv_kernel needs self-attention; a convolution skip cannot align a separate context")
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        self.conv_kernel = conv_kernel
        if conv_kernel is not None:
            bound = 1.0 / math.sqrt(conv_kernel)
            self.conv_weight = nn.Parameter(torch.empty(heads, conv_kernel).uniform_(-bound, bound))
        else:
            self.conv_weight = None

    def _options(self):
        return dict(landmarks=self.landmarks, pinv_iterations=self.pinv_iterations, conv_weight=self.conv_weight)

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        return nystrom_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, **self._options())

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        return nystrom_attention_reference(q, k, v, q_mask=q_mask, kv_mask=kv_mask, **self._options())

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, landmarks={self.landmarks}, "
                f"pinv_iterations={self.pinv_iterations}, conv_kernel={self.conv_kernel}")
