"""cosFormer layer: ReLU linear attention with cos-based re-weighting."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops.cosformer import DEFAULT_EPS, cosformer_attention, cosformer_attention_reference
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer

DEFAULT_CAUSAL_HORIZON = 2048


@register_mixer("cosformer", description="cosFormer: ReLU kernel with cos re-weighting of distances (linear time)",
                reference="Qin et al. 2022, cosFormer: Rethinking Softmax in Attention, eqs. 9-11")
class CosFormer(ProjectedMixer):
    r"""cosFormer attention (see :mod:`amlp.ops.cosformer`):

        out_i = sum_j relu(q_i).relu(k_j) cos(pi/2 (i - j)/M) v_j / max(sum_j relu(q_i).relu(k_j) cos(pi/2 (i - j)/M), eps)

    Args:
        dim, heads: model width E and heads H.
        max_length: the re-weighting horizon M, fixed per instance. Non-causal default ``None``:
            ``M = max(n_q, n_k)`` of each batch row (the paper's choice, no length limit). The causal
            form needs a fixed M so that the output at a position does not depend on the final length
            and the recurrent step equals the parallel form; its default is 2048. When set, inputs
            longer than ``max_length`` are refused.
        causal: prefix-sum form with a recurrent :meth:`step` (state: the cos and sin sums
            ``sum k^cos v^T``, ``sum k^sin v^T``, ``sum k^cos``, ``sum k^sin`` and the position).
        cross: accept a separate context (each side keeps its own positions).
        eps: floor of the denominator.
        dropout, bias: output dropout and projection biases.
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=True, padding=True, recurrent=True,
                                max_length_option="max_length")

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 max_length: int | None = None, eps: float = DEFAULT_EPS, dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        if causal and max_length is None:
            max_length = DEFAULT_CAUSAL_HORIZON
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be an int >= 1 or None, got {max_length!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self._max_length = max_length
        self.eps = eps

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        return cosformer_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, causal=self.causal,
                                   max_length=self._max_length, eps=self.eps)

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        return cosformer_attention_reference(q, k, v, q_mask=q_mask, kv_mask=kv_mask, causal=self.causal,
                                             max_length=self._max_length, eps=self.eps)

    # -- recurrent form ---------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.q_proj.weight
        device, dtype = device or p.device, dtype or p.dtype
        H, D = self.heads, self.head_dim
        zeros = lambda *shape: torch.zeros(batch_size, H, *shape, device=device, dtype=dtype)  # noqa: E731
        return {"kv_cos": zeros(D, D), "kv_sin": zeros(D, D), "z_cos": zeros(D), "z_sin": zeros(D), "position": 0}

    def step(self, x_t: torch.Tensor, state):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {tuple(x_t.shape)}")
        position = state["position"] + 1
        if position > self._max_length:
            raise ValueError(f"mixer 'cosformer' has a maximum length of {self._max_length}; step {position} is past it")
        x = x_t.unsqueeze(1)
        q = F.relu(self.split_heads(self.q_proj(x))[:, 0])  # [B, H, D]
        k = F.relu(self.split_heads(self.k_proj(x))[:, 0])
        v = self.split_heads(self.v_proj(x))[:, 0]
        angle = math.pi / 2 * position / self._max_length
        c, s = math.cos(angle), math.sin(angle)
        kv_cos = state["kv_cos"] + c * k.unsqueeze(-1) * v.unsqueeze(-2)
        kv_sin = state["kv_sin"] + s * k.unsqueeze(-1) * v.unsqueeze(-2)
        z_cos, z_sin = state["z_cos"] + c * k, state["z_sin"] + s * k
        num = torch.einsum("bhd,bhde->bhe", c * q, kv_cos) + torch.einsum("bhd,bhde->bhe", s * q, kv_sin)
        den = ((c * q) * z_cos).sum(-1) + ((s * q) * z_sin).sum(-1)
        out = (num / den.clamp_min(self.eps).unsqueeze(-1)).reshape(x_t.shape[0], self.dim)
        new_state = {"kv_cos": kv_cos, "kv_sin": kv_sin, "z_cos": z_cos, "z_sin": z_sin, "position": position}
        return self.dropout(self.out_proj(out)), new_state

    def state_size(self, length: int) -> int:
        return self.heads * (2 * self.head_dim * self.head_dim + 2 * self.head_dim) + 1

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}, max_length={self._max_length}"
