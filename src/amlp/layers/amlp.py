"""AMLP layers: AMLP-Cov and AMLP-PQuery with projections, landmarks and output normalisation."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..ops._common import check_activation
from ..ops.amlp import FORMS, amlp_cov, amlp_cov_reference, amlp_pquery, amlp_pquery_reference
from ..ops.amlp_causal import (
    DEFAULT_CHUNK_SIZE,
    amlp_cov_causal,
    amlp_cov_causal_init_state,
    amlp_cov_causal_reference,
)
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer

VARIANTS = ("cov", "pquery")


class AMLP(ProjectedMixer):
    """Attentive MLP (arXiv 2310.09512): ``sigma_1(Q L) W_QKV`` with context-computed weights.

    Args:
        dim, heads: model width E and number of heads H (head dim D = E / H).
        variant: ``"cov"`` (eqs. 9-10) or ``"pquery"`` (eqs. 11-12).
        landmarks: c, the hidden width of the dynamic MLP (the paper uses 16, and 64 for TTS).
        activation: sigma_1: ``softmax`` (default), ``relu``, ``sigmoid`` or ``identity``.
        form: ``"stable"`` (default; length- and scale-invariant statistics, learned per-head
            temperatures, LayerNorm on each head's output) or ``"paper"`` (the equations as printed,
            no temperatures, no output norm).
        dropout: dropout on the layer output.
        out_norm: LayerNorm on each head's output before the output projection; defaults to True
            for the stable form and False for the paper form.
        shared_w: PQuery only: one ``W`` (``nn.Linear(2D, D)``) for all heads (True, as in the
            authors' code) or one per head.
        causal: Cov only: the prefix-statistics form of Appendix A (eqs. 13-14), self-mixing, with a
            recurrent :meth:`step` (state ``3 D^2 + D`` per head). PQuery has no cheap causal form.
        chunk_size: tokens per chunk of the parallel causal computation.
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=True, padding=True, recurrent=True)

    def __init__(self, dim: int, heads: int, *, variant: str = "pquery", landmarks: int = 16,
                 activation: str = "softmax", form: str = "stable", causal: bool = False,
                 cross: bool = False, dropout: float = 0.0, out_norm: bool | None = None,
                 shared_w: bool = True, bias: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if causal and variant == "pquery":
            raise ValueError("AMLP-PQuery has no causal form: its values are pooled by sigma_2(L_t^T K^T), and L_t "
                             "changes at every step, so every cached key would be revisited (quadratic); "
                             "use variant='cov' for a causal AMLP")
        if causal and cross:
            raise ValueError("causal AMLP-Cov mixes a sequence with its own prefix; causal=True with cross=True "
                             "is not supported")
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        if not isinstance(landmarks, int) or landmarks < 1:
            raise ValueError(f"landmarks must be an int >= 1, got {landmarks!r}")
        check_activation(activation)
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.variant, self.landmarks, self.activation, self.form = variant, landmarks, activation, form
        H, D = heads, self.head_dim
        std = math.sqrt(2.0 / (landmarks + D))
        self.cq = nn.Parameter(torch.randn(H, landmarks, D) * std)
        self.ck = nn.Parameter(torch.randn(H, landmarks, D) * std)
        if variant == "pquery":
            self.w = nn.Parameter(torch.empty(2 * D, D) if shared_w else torch.empty(H, 2 * D, D))
            self.w_bias = nn.Parameter(torch.zeros(D) if shared_w else torch.zeros(H, D))
            bound = 1.0 / math.sqrt(2 * D)
            nn.init.uniform_(self.w, -bound, bound)
        self.temperature = nn.Parameter(torch.ones(H, 3)) if form == "stable" else None
        use_norm = (form == "stable") if out_norm is None else out_norm
        self.out_norm = nn.LayerNorm(D) if use_norm else None

    def _mix(self, cov_op, pquery_op, q, k, v, q_mask, kv_mask):
        common = dict(q_mask=q_mask, kv_mask=kv_mask, activation=self.activation, form=self.form,
                      temperature=self.temperature)
        if self.variant == "cov":
            return cov_op(q, k, v, self.cq, self.ck, **common)
        return pquery_op(q, k, v, self.cq, self.ck, self.w, w_bias=self.w_bias, **common)

    def head_output(self, out):
        return out if self.out_norm is None else self.out_norm(out)

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        if self.causal:
            causal_cov = functools.partial(amlp_cov_causal, chunk_size=self.chunk_size)
            return self._mix(causal_cov, None, q, k, v, q_mask, kv_mask)
        return self._mix(amlp_cov, amlp_pquery, q, k, v, q_mask, kv_mask)

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        if self.causal:
            return self._mix(amlp_cov_causal_reference, None, q, k, v, q_mask, kv_mask)
        return self._mix(amlp_cov_reference, amlp_pquery_reference, q, k, v, q_mask, kv_mask)

    # -- recurrent form (causal Cov): the running statistics of eqs. 13-14 --------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.q_proj.weight
        return amlp_cov_causal_init_state(batch_size, self.heads, self.head_dim, dtype=dtype or p.dtype,
                                          device=device or p.device)

    def step(self, x_t: torch.Tensor, state):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {shape}")
        x = x_t.unsqueeze(1)
        q, k, v = (self.split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out, state = amlp_cov_causal(q, k, v, self.cq, self.ck, activation=self.activation, form=self.form,
                                     temperature=self.temperature, initial_state=state, return_state=True)
        out = self.head_output(out)
        return self.dropout(self.out_proj(out.reshape(x.shape[0], 1, self.dim)))[:, 0], state

    def state_size(self, length: int) -> int | None:
        if not self.causal:
            return None
        return self.heads * (3 * self.head_dim**2 + self.head_dim) + 2

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, variant={self.variant!r}, landmarks={self.landmarks}, "
                f"activation={self.activation!r}, form={self.form!r}")


@register_mixer("amlp-cov", description="AMLP-Cov: dynamic MLP from feature covariances (linear time)",
                reference="Jiang et al. 2023, Attentive MLP for Non-Autoregressive Generation, eqs. 8-10 "
                          "(causal: Appendix A, eqs. 13-14)")
class AMLPCov(AMLP):
    capabilities = Capabilities(causal=True, noncausal=True, cross=True, padding=True, recurrent=True)

    def __init__(self, dim: int, heads: int, **options):
        if options.pop("variant", "cov") != "cov":
            raise ValueError("amlp-cov takes no variant option; use AMLP(variant=...) or 'amlp-pquery'")
        super().__init__(dim, heads, variant="cov", **options)


@register_mixer("amlp-pquery", description="AMLP-PQuery: dynamic MLP from pooled pseudo-queries (linear time)",
                reference="Jiang et al. 2023, Attentive MLP for Non-Autoregressive Generation, eqs. 8, 11-12")
class AMLPPQuery(AMLP):
    capabilities = Capabilities(causal=False, noncausal=True, cross=True, padding=True)

    def __init__(self, dim: int, heads: int, **options):
        if options.pop("variant", "pquery") != "pquery":
            raise ValueError("amlp-pquery takes no variant option; use AMLP(variant=...) or 'amlp-cov'")
        super().__init__(dim, heads, variant="pquery", **options)
