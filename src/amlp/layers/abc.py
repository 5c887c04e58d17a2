"""ABC (attention with bounded-memory control) layer."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.abc import DEFAULT_CHUNK, SENTINEL, abc_attention, abc_attention_reference, abc_step
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer


@register_mixer("abc", description="ABC: keys and values written into n learned memory slots (linear time)",
                reference="Peng et al. 2022, ABC: Attention with Bounded-memory Control, ABC_MLP")
class ABCAttention(ProjectedMixer):
    """ABC_MLP: learned control vectors ``phi_j = exp(W_phi x_j)`` (one logit per slot and head,
    computed from the source tokens) write the keys and values into ``n`` memory slots,

        K~ = sum_j alpha_j k_j^T,  V~ = sum_j alpha_j v_j^T,   alpha_{j,s} = phi_{j,s} / sum_i phi_{i,s},

    and each query reads ``softmax(q K~^T / sqrt(D)) V~``. The causal form normalises by the running
    total at each step; its recurrent :meth:`step` keeps ``n (2D + 1)`` numbers per head.

    Args:
        landmarks: n, the number of memory slots per head (the AMLP paper, Table 8: 64 for TTS,
            16 otherwise).
        chunk_size: chunk length of the causal prefix sums (a speed/memory trade-off only).
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=True, padding=True, recurrent=True)

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 landmarks: int = 64, chunk_size: int = DEFAULT_CHUNK, dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        if isinstance(landmarks, bool) or not isinstance(landmarks, int) or landmarks < 1:
            raise ValueError(f"landmarks must be an int >= 1, got {landmarks!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.landmarks = landmarks
        self.chunk_size = chunk_size
        self.control_proj = nn.Linear(dim, heads * landmarks, bias=bias)  # W_phi

    def _control(self, source: torch.Tensor) -> torch.Tensor:
        return self.control_proj(source).view(source.shape[0], source.shape[1], self.heads, self.landmarks)

    def _run(self, op, x, context, x_mask, context_mask, **extra):
        source = x if context is None else context
        kv_mask = x_mask if context is None else context_mask
        q = self.split_heads(self.q_proj(x))
        k = self.split_heads(self.k_proj(source))
        v = self.split_heads(self.v_proj(source))
        out = op(q, k, v, self._control(source), q_mask=x_mask, kv_mask=kv_mask, causal=self.causal, **extra)
        return self.dropout(self.out_proj(out.reshape(x.shape[0], x.shape[1], self.dim)))

    def mix_tokens(self, x, context, x_mask, context_mask):
        return self._run(abc_attention, x, context, x_mask, context_mask, chunk_size=self.chunk_size)

    def reference_tokens(self, x, context, x_mask, context_mask):
        return self._run(abc_attention_reference, x, context, x_mask, context_mask)

    # -- recurrent form: normalised memories and the log of their running totals ------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.q_proj.weight
        device, dtype = device or p.device, dtype or p.dtype
        shape = (batch_size, self.heads, self.landmarks)
        mem = torch.zeros(shape + (self.head_dim,), device=device, dtype=dtype)
        return {"lse": torch.full(shape, SENTINEL, device=device, dtype=dtype), "k": mem, "v": mem.clone()}

    def step(self, x_t: torch.Tensor, state):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {tuple(x_t.shape)}")
        B = x_t.shape[0]
        heads = (B, self.heads, self.head_dim)
        control = self.control_proj(x_t).view(B, self.heads, self.landmarks)
        out, state = abc_step(self.q_proj(x_t).view(heads), self.k_proj(x_t).view(heads),
                              self.v_proj(x_t).view(heads), control, state)
        return self.dropout(self.out_proj(out.reshape(B, self.dim))), state

    def state_size(self, length: int) -> int:
        return self.heads * self.landmarks * (2 * self.head_dim + 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, landmarks={self.landmarks}"
