"""Performer layer: multi-head FAVOR+ attention with seeded orthogonal random features."""

from __future__ import annotations

import math

import torch

from ..ops.performer import (
    feature_logits,
    orthogonal_gaussian_features,
    performer_attention,
    performer_attention_reference,
    query_features,
)
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer


@register_mixer("performer", description="Performer: FAVOR+ positive orthogonal random features (linear time)",
                reference="Choromanski et al. 2021, Rethinking Attention with Performers, Lemma 1, sec. 2.4-2.6")
class Performer(ProjectedMixer):
    r"""FAVOR+ attention (see :mod:`amlp.ops.performer`):

        out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j),
        phi(x)_i = exp(w_i . x' - |x'|^2/2) / sqrt(m),   x' = x D^(-1/4)

    Args:
        dim, heads: model width E and heads H (head dim D = E / H).
        approx_attn_dim: m, the number of random features (the AMLP paper's Table 8 uses 64 for TTS
            and 16 for the other tasks; default 64).
        seed: seed of the ``torch.Generator`` the features are drawn from. Construction is
            reproducible: two layers built with the same seed hold the same features (the features are
            a buffer, saved in the state dict). They are one ``[m, D]`` matrix shared by all heads.
            Layers built with the same seed (or deep copies of one layer) hold the same features;
            give each layer of a model its own seed (e.g. base seed + layer index) for independent draws.
        redraw: if True, every forward in training mode draws fresh features from the layer's
            generator (continuing its seeded stream); eval mode always uses the stored features, so
            it is deterministic.
        causal: prefix-sum form with a recurrent :meth:`step` (state ``S = sum phi(k) v^T``,
            ``z = sum phi(k)`` and a running stabiliser).
        cross: accept a separate context.
        dropout, bias: output dropout and projection biases.
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=True, padding=True, recurrent=True)

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 approx_attn_dim: int = 64, seed: int = 0, redraw: bool = False,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        if isinstance(approx_attn_dim, bool) or not isinstance(approx_attn_dim, int) or approx_attn_dim < 1:
            raise ValueError(f"approx_attn_dim must be an int >= 1, got {approx_attn_dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.approx_attn_dim = approx_attn_dim
        self.seed = seed
        self.redraw = bool(redraw)
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("features", self._draw())

    def _draw(self) -> torch.Tensor:
        return orthogonal_gaussian_features(self.approx_attn_dim, self.head_dim, generator=self.generator)

    def redraw_features(self) -> None:
        """Replace the features by a fresh draw from the layer's generator."""
        fresh = self._draw()
        self.features.copy_(fresh.to(device=self.features.device, dtype=self.features.dtype))

    def _features_for_call(self) -> torch.Tensor:
        if self.training and self.redraw:
            self.redraw_features()
        return self.features

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        return performer_attention(q, k, v, self._features_for_call(), q_mask=q_mask, kv_mask=kv_mask,
                                   causal=self.causal)

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        return performer_attention_reference(q, k, v, self.features, q_mask=q_mask, kv_mask=kv_mask,
                                             causal=self.causal)

    # -- recurrent form ---------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.q_proj.weight
        device, dtype = device or p.device, dtype or p.dtype
        H, m, D = self.heads, self.approx_attn_dim, self.head_dim
        return {
            "kv": torch.zeros(batch_size, H, m, D, device=device, dtype=dtype),  # sum phi(k) v^T
            "z": torch.zeros(batch_size, H, m, device=device, dtype=dtype),  # sum phi(k)
            "max": torch.full((batch_size, H), float("-inf"), device=device, dtype=dtype),
        }

    def step(self, x_t: torch.Tensor, state):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {tuple(x_t.shape)}")
        x = x_t.unsqueeze(1)
        q = self.split_heads(self.q_proj(x))
        k = self.split_heads(self.k_proj(x))
        v = self.split_heads(self.v_proj(x))[:, 0]  # [B, H, D]
        w = self.features.to(q.dtype)
        m = self.approx_attn_dim
        logits_k = feature_logits(k, w)[:, 0]  # [B, H, m]
        new_max = torch.maximum(state["max"], logits_k.amax(-1).detach())
        rescale = torch.exp(state["max"] - new_max)  # the running stabiliser grew: shrink the sums
        phi_k = torch.exp(logits_k - new_max.unsqueeze(-1)) / math.sqrt(m)
        kv = state["kv"] * rescale[..., None, None] + phi_k.unsqueeze(-1) * v.unsqueeze(-2)
        z = state["z"] * rescale.unsqueeze(-1) + phi_k
        phi_q = query_features(feature_logits(q, w))[:, 0]  # [B, H, m]
        num = torch.einsum("bhm,bhmd->bhd", phi_q, kv)
        den = torch.einsum("bhm,bhm->bh", phi_q, z).clamp_min(torch.finfo(num.dtype).tiny)
        out = (num / den.unsqueeze(-1)).reshape(x_t.shape[0], self.dim)
        return self.dropout(self.out_proj(out)), {"kv": kv, "z": z, "max": new_max}

    def state_size(self, length: int) -> int:
        return self.heads * (self.approx_attn_dim * self.head_dim + self.approx_attn_dim + 1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, causal={self.causal}, approx_attn_dim={self.approx_attn_dim}, "
                f"seed={self.seed}, redraw={self.redraw}")
