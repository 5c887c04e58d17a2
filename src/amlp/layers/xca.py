"""Cross-covariance attention (XCA) layer."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.xca import cross_covariance_attention, cross_covariance_attention_reference
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer


@register_mixer("xca", description="cross-covariance attention: softmax over D x D channel covariances (linear time)",
                reference="Ali et al. 2021, XCiT: Cross-Covariance Image Transformers, sec. 3 (XC-Attention)")
class CrossCovarianceAttention(ProjectedMixer):
    """XCA: ``out = V softmax(tau * K^T^ Q^)`` with q and k columns L2-normalised over the sequence
    and a learned temperature ``tau`` per head (initialised to 1, as in XCiT).

    Self-attention only and non-causal: the channel covariance sums over the whole sequence, and
    needs queries and keys on one sequence.
    """

    capabilities = Capabilities(causal=False, noncausal=True, cross=False, padding=True, recurrent=False)

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        self.temperature = nn.Parameter(torch.ones(heads))

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        return cross_covariance_attention(q, k, v, self.temperature, q_mask=q_mask, kv_mask=kv_mask)

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        return cross_covariance_attention_reference(q, k, v, self.temperature, q_mask=q_mask, kv_mask=kv_mask)
