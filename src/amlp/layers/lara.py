"""LARA layer: linear randomized attention with multiple importance sampling."""

from __future__ import annotations

import torch

from ..ops.lara import MIS_WEIGHTS, lara_attention, lara_attention_reference
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer


@register_mixer("lara", description="LARA: randomized attention by multiple importance sampling (linear time)",
                reference="Zheng, Wang and Kong 2022, Linear Complexity Randomized Self-attention Mechanism, "
                          "sec. 3-4")
class LARA(ProjectedMixer):
    r"""Linear randomized attention (see :mod:`amlp.ops.lara` for the equations and the one
    reconstructed detail, the query-dependent weighting):

        LARA(q_n) = sum_c a'_nc xi(q_n, w_c) sum_m xi(k_m, w_c) v_m / sum_c a'_nc xi(q_n, w_c) sum_m xi(k_m, w_c)

    with one sample ``w_c`` from each proposal ``N(q~_c + k~_c, I)`` centred on segment means.

    Args:
        dim, heads: model width E and heads H.
        landmarks: number of proposals / samples C (default 16; fewer when a sequence is shorter).
        mis_weights: ``"query"`` (default, query-dependent weights) or ``"balance"`` (balance heuristic).
        seed: seed of the ``torch.Generator`` the Gaussian noise of the samples is drawn from, so
            construction is reproducible (the noise ``[H, C, D]`` is a buffer, saved in the state dict).
            Layers built with the same seed hold the same noise; give each layer of a model its own
            seed (e.g. base seed + layer index) for independent draws.
        redraw: if True, every forward in training mode draws fresh noise from the layer's
            generator (the unbiased randomized estimator of training); eval mode always uses the
            stored noise, so it is deterministic.
        cross: accept a separate context (key landmarks from the context).
        dropout, bias: output dropout and projection biases.
    """

    capabilities = Capabilities(causal=False, noncausal=True, cross=True, padding=True)

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 landmarks: int = 16, mis_weights: str = "query", seed: int = 0, redraw: bool = False,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        if isinstance(landmarks, bool) or not isinstance(landmarks, int) or landmarks < 1:
            raise ValueError(f"landmarks must be an int >= 1, got {landmarks!r}")
        if mis_weights not in MIS_WEIGHTS:
            raise ValueError(f"mis_weights must be one of {MIS_WEIGHTS}, got {mis_weights!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.landmarks = landmarks
        self.mis_weights = mis_weights
        self.seed = seed
        self.redraw = bool(redraw)
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("noise", self._draw())

    def _draw(self) -> torch.Tensor:
        return torch.randn(self.heads, self.landmarks, self.head_dim, generator=self.generator, dtype=torch.float64
                           ).to(torch.get_default_dtype())

    def redraw_noise(self) -> None:
        """Replace the sample noise by a fresh draw from the layer's generator."""
        self.noise.copy_(self._draw().to(device=self.noise.device, dtype=self.noise.dtype))

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        if self.training and self.redraw:
            self.redraw_noise()
        return lara_attention(q, k, v, self.noise, q_mask=q_mask, kv_mask=kv_mask, mis_weights=self.mis_weights)

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        return lara_attention_reference(q, k, v, self.noise, q_mask=q_mask, kv_mask=kv_mask,
                                        mis_weights=self.mis_weights)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, landmarks={self.landmarks}, mis_weights={self.mis_weights!r}, "
                f"seed={self.seed}, redraw={self.redraw}")
