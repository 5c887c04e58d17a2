"""Linformer attention layer."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linformer import linformer_attention, linformer_attention_reference
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer


@register_mixer("linformer", description="softmax attention over keys/values projected to k positions (linear time)",
                reference="Wang et al. 2020, Linformer: Self-Attention with Linear Complexity, sec. 4")
class LinformerAttention(ProjectedMixer):
    """Linformer: ``softmax(Q (E K)^T / sqrt(D)) (F V)`` with learned ``E, F in R^{k x n}`` shared by
    the heads (the paper's head-wise sharing), initialised ``N(0, 1/k^2)``.

    Args:
        proj_len: k, the number of projected positions (default 64).
        max_length: n, the longest sequence accepted (default 512); shorter sequences use the first
            T columns of E and F.

    Self-attention only and non-causal: every projected key mixes the whole sequence.
    """

    #: ``max_length`` is the default of the constructor option of the same name
    capabilities = Capabilities(causal=False, noncausal=True, cross=False, padding=True, recurrent=False,
                                max_length=512, max_length_option="max_length")

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 proj_len: int = 64, max_length: int = 512, dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        for name, value in (("proj_len", proj_len), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.proj_len = proj_len
        self._max_length = max_length
        self.e_proj = nn.Parameter(torch.randn(proj_len, max_length) / proj_len)
        self.f_proj = nn.Parameter(torch.randn(proj_len, max_length) / proj_len)

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        return linformer_attention(q, k, v, self.e_proj, self.f_proj, q_mask=q_mask, kv_mask=kv_mask)

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        return linformer_attention_reference(q, k, v, self.e_proj, self.f_proj, q_mask=q_mask, kv_mask=kv_mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, proj_len={self.proj_len}, max_length={self._max_length}"
