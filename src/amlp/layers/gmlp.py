"""gMLP's spatial gating unit as a token mixer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gmlp import spatial_gating_unit, spatial_gating_unit_reference
from .base import Capabilities, Mixer
from .registry import register_mixer


@register_mixer("gmlp", description="gMLP spatial gating unit: a learned T x T token projection gating the channels",
                reference="Liu et al. 2021, Pay Attention to MLPs, sec. 2 (spatial gating unit)")
class SpatialGatingMixer(Mixer):
    """Token mixer built from gMLP's spatial gating unit (section 2):

        [Z1, Z2] = GELU(X U),   s(Z) = Z1 * (W_s LayerNorm(Z2) + b_s),   Y = s(Z) V

    with ``U: E -> 2E``, ``V: E -> E`` and ``W_s`` an ``n x n`` projection over positions
    (initialised near zero, ``b_s`` to ones, so the unit starts close to an identity gate). The
    channels are split into ``heads`` groups, each with its own ``W_s``; ``heads=1`` is the paper's
    unit. The causal form uses the lower triangle of ``W_s`` and has a recurrent :meth:`step` that
    caches the normalised ``Z2`` rows seen so far.

    Args:
        max_length: n, the longest sequence accepted (default 512); shorter sequences use the
            top-left ``T x T`` block of ``W_s``.
        init_scale: ``W_s`` starts uniform in ``[-init_scale, init_scale]``.

    Self-mixing only: ``W_s`` maps the positions of one sequence onto themselves.
    """

    #: ``max_length`` is the default of the constructor option of the same name
    capabilities = Capabilities(causal=True, noncausal=True, cross=False, padding=True, recurrent=True,
                                max_length=512, max_length_option="max_length")

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 max_length: int = 512, init_scale: float = 1e-3, dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self._max_length = max_length
        self.in_proj = nn.Linear(dim, 2 * dim, bias=bias)
        self.norm = nn.LayerNorm(dim)
        self.spatial_weight = nn.Parameter(torch.empty(heads, max_length, max_length).uniform_(-init_scale, init_scale))
        self.spatial_bias = nn.Parameter(torch.ones(heads, max_length))
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def _halves(self, x):
        """``(Z1, LayerNorm(Z2))`` split into heads, ``[B, T, H, D]`` each."""
        u, z = F.gelu(self.in_proj(x)).chunk(2, dim=-1)
        z = self.norm(z)
        shape = x.shape[:-1] + (self.heads, self.head_dim)
        return u.reshape(shape), z.reshape(shape)

    def _run(self, op, x, x_mask):
        u, z = self._halves(x)
        out = op(u, z, self.spatial_weight, self.spatial_bias, mask=x_mask, causal=self.causal)
        return self.dropout(self.out_proj(out.reshape(x.shape)))

    def mix_tokens(self, x, context, x_mask, context_mask):
        return self._run(spatial_gating_unit, x, x_mask)

    def reference_tokens(self, x, context, x_mask, context_mask):
        return self._run(spatial_gating_unit_reference, x, x_mask)

    # -- recurrent form: the normalised Z2 rows so far and the position ----------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.in_proj.weight
        z = torch.zeros((batch_size, 0, self.heads, self.head_dim), device=device or p.device, dtype=dtype or p.dtype)
        return {"z": z}

    def step(self, x_t: torch.Tensor, state):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {tuple(x_t.shape)}")
        t = state["z"].shape[1]
        if t >= self._max_length:
            raise ValueError(f"mixer 'gmlp' has a maximum length of {self._max_length} (capability 'max_length'); "
                             f"step() was called for position {t}")
        u, z = self._halves(x_t.unsqueeze(1))
        zs = torch.cat([state["z"], z], dim=1)  # [B, t+1, H, D]
        row = self.spatial_weight[:, t, : t + 1]  # [H, t+1]: the causal row of W_s
        gate = torch.einsum("hj,bjhd->bhd", row, zs) + self.spatial_bias[:, t].unsqueeze(-1)
        out = (u[:, 0] * gate).reshape(x_t.shape)
        return self.dropout(self.out_proj(out)), {"z": zs}

    def state_size(self, length: int) -> int:
        return min(length, self._max_length) * self.dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_length={self._max_length}"
