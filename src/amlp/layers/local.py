"""Local (windowed) softmax attention layer."""

from __future__ import annotations

import torch

from ..ops.local import check_window, local_attention, local_attention_reference
from ..ops.softmax import softmax_attention
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer


@register_mixer("local", description="windowed softmax attention (self only; O(T * wsize) memory)",
                reference="Luong et al. 2015, Effective Approaches to Attention-based NMT, sec. 3.2")
class LocalAttention(ProjectedMixer):
    """Softmax attention restricted to a window around each query:

        out_i = sum_{j in W(i)} softmax_j(q_i . k_j / sqrt(D)) v_j,
        W(i) = {j : |i - j| <= wsize // 2}  (non-causal)  or  {j : i - wsize < j <= i}  (causal).

    Args:
        wsize: window size (the AMLP paper, Table 8: 15 for TTS, SR and LSTF; 5 for MT).

    Self-attention only: attending a separate context needs an explicit alignment between the two
    sequences, so ``cross=True`` and a ``context`` are refused. Causal instances have a recurrent
    :meth:`step` that keeps a rolling cache of the last ``wsize`` keys and values.
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=False, padding=True, recurrent=True)

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 wsize: int = 15, dropout: float = 0.0, bias: bool = True):
        if cross:
            raise ValueError(
                "mixer 'local' cannot mix a separate context (capability 'cross'): local attention "
                "across two sequences needs an explicit alignment between them, which it does not take"
            )
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        check_window(wsize)
        self.wsize = wsize

    def forward(self, x, context=None, *, x_mask=None, context_mask=None):
        if context is not None:
            raise ValueError(
                "mixer 'local' cannot mix a separate context (capability 'cross'): local attention "
                "across two sequences needs an explicit alignment between them, which it does not take"
            )
        return super().forward(x, context, x_mask=x_mask, context_mask=context_mask)

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        return local_attention(q, k, v, wsize=self.wsize, q_mask=q_mask, kv_mask=kv_mask, causal=self.causal)

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        return local_attention_reference(q, k, v, wsize=self.wsize, q_mask=q_mask, kv_mask=kv_mask,
                                         causal=self.causal)

    def poison_reach(self, bad: torch.Tensor) -> torch.Tensor:
        """A token reaches the next ``wsize`` outputs only (the causal window)."""
        count = torch.cumsum(bad.to(torch.int32), dim=1)
        before = torch.nn.functional.pad(count, (self.wsize, 0))[:, : count.shape[1]]
        return count - before > 0

    # -- recurrent form: a rolling cache of the last wsize keys and values ------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.q_proj.weight
        empty = torch.zeros((batch_size, 0, self.heads, self.head_dim), device=device or p.device,
                            dtype=dtype or p.dtype)
        return {"k": empty, "v": empty.clone()}

    def step(self, x_t: torch.Tensor, state):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {tuple(x_t.shape)}")
        x = x_t.unsqueeze(1)
        q = self.split_heads(self.q_proj(x))
        k = torch.cat([state["k"], self.split_heads(self.k_proj(x))], dim=1)[:, -self.wsize:]
        v = torch.cat([state["v"], self.split_heads(self.v_proj(x))], dim=1)[:, -self.wsize:]
        out = softmax_attention(q, k, v).reshape(x.shape[0], 1, self.dim)
        return self.dropout(self.out_proj(out))[:, 0], {"k": k, "v": v}

    def state_size(self, length: int) -> int:
        return 2 * min(length, self.wsize) * self.dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, wsize={self.wsize}"
