"""Multi-head softmax attention layer (the baseline)."""

from __future__ import annotations

import torch

from ..ops.softmax import softmax_attention, softmax_attention_reference
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer


@register_mixer("softmax", description="multi-head softmax attention (fused SDPA kernel)",
                reference="Vaswani et al. 2017, Attention Is All You Need")
class SoftmaxAttention(ProjectedMixer):
    """Softmax attention with q, k, v and output projections.

    Causal instances have a recurrent :meth:`step` backed by a key/value cache. ``attn_dropout``
    drops attention weights in training (Informer uses 0.05); the step and evaluation never drop.
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=True, padding=True, recurrent=True)

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 dropout: float = 0.0, bias: bool = True, attn_dropout: float = 0.0):
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        if isinstance(attn_dropout, bool) or not isinstance(attn_dropout, (int, float)) or not 0.0 <= attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {attn_dropout!r}")
        self.attn_dropout = float(attn_dropout)

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        return softmax_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, causal=self.causal,
                                 dropout_p=self.attn_dropout if self.training else 0.0)

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        return softmax_attention_reference(q, k, v, q_mask=q_mask, kv_mask=kv_mask, causal=self.causal)

    # -- recurrent form: a growing key/value cache ---------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.q_proj.weight
        shape = (batch_size, 0, self.heads, self.head_dim)
        empty = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        return {"k": empty, "v": empty.clone()}

    def step(self, x_t: torch.Tensor, state):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {tuple(x_t.shape)}")
        x = x_t.unsqueeze(1)
        q = self.split_heads(self.q_proj(x))
        k = torch.cat([state["k"], self.split_heads(self.k_proj(x))], dim=1)
        v = torch.cat([state["v"], self.split_heads(self.v_proj(x))], dim=1)
        out = softmax_attention(q, k, v, causal=True).reshape(x.shape[0], 1, self.dim)
        return self.dropout(self.out_proj(out))[:, 0], {"k": k, "v": v}

    def state_size(self, length: int) -> int:
        return 2 * length * self.dim
