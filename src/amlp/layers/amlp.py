"""AMLP layers: AMLP-Cov and AMLP-PQuery with projections, landmarks and output normalisation."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._checks import compute_dtype
from ..ops._common import check_activation
from ..ops.amlp import FORMS, amlp_cov, amlp_cov_reference, amlp_pquery, amlp_pquery_reference
from ..ops.amlp_causal import (
    DEFAULT_CHUNK_SIZE,
    amlp_cov_causal,
    amlp_cov_causal_init_state,
    amlp_cov_causal_step,
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
        form: required, no default: ``"paper"`` (the equations as printed, no temperatures, no
            output norm), ``"official"`` (the computation and initialisation of the authors'
            released code, LayerNorm on each head's output) or ``"stable"`` (length- and
            scale-invariant statistics, learned per-head temperatures, LayerNorm on each head's
            output). None is best on every task of the forecasting study, so the choice is the
            user's; ``docs/amlp_forms.md`` lists every difference and the evidence.
        dropout: dropout on the layer output.
        out_norm: LayerNorm on each head's output before the output projection; defaults to True
            for the stable and official forms and False for the paper form.
        scale: sigma_1 logit scale (None: the form's own, 1 in the paper form and in official
            PQuery, ``1/sqrt(D)`` otherwise; the released PQuery's ``scale=True`` is ``D**-0.5``).
        add_norm: LayerNorm (over each head's D features, shared by the heads) on q, k and v, and
            on the rows of ``L^T``, as the released code's ``add_norm``.
        ema: momentum beta of the released code's EMA centring of q (its MT recipe uses 0.99):
            a buffer holds the running mean of q per feature over the real positions of the batch
            and heads, ``mu <- beta mu + (1 - beta) mean``, updated (detached) in training only,
            and ``q - mu`` enters the op (and the conv branch). None: off.
        conv_kernel_size: odd k for the released code's conv branch: a depthwise convolution per
            head (one k-tap filter along the sequence shared by the head's features, with a bias),
            over q with padded rows zeroed, then ReLU and ``conv_dropout``, added to the op's output
            before the output norm. None: off.
        shared_w: PQuery only: one ``W`` (``nn.Linear(2D, D)``) for all heads (True, as in the
            authors' code) or one per head.
        causal: Cov only: the prefix-statistics form of Appendix A (eqs. 13-14), self-mixing, with a
            recurrent :meth:`step` (state ``3 D^2 + D`` per head). PQuery has no cheap causal form.
        chunk_size: tokens per chunk of the parallel causal computation (None: from a memory budget).
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=True, padding=True, recurrent=True,
                                choices=(("form", FORMS),))

    def __init__(self, dim: int, heads: int, *, variant: str = "pquery", landmarks: int = 16,
                 activation: str = "softmax", form: str | None = None, causal: bool = False,
                 cross: bool = False, dropout: float = 0.0, out_norm: bool | None = None,
                 shared_w: bool = True, bias: bool = True, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                 scale: float | None = None, add_norm: bool = False, ema: float | None = None,
                 conv_kernel_size: int | None = None, conv_dropout: float = 0.0):
        if form is None:
            raise ValueError("AMLP has no default form: choose form='paper' (the equations as printed), 'official' "
                             "(the authors' released code) or 'stable' (length- and scale-invariant); none is best on "
                             "every task of the forecasting study (docs/amlp_forms.md)")
        if causal and variant == "pquery":
            raise ValueError("AMLP-PQuery has no causal form: its values are pooled by sigma_2(L_t^T K^T), and L_t "
                             "changes at every step, so every cached key would be revisited (quadratic); "
                             "use variant='cov' for a causal AMLP")
        if causal and form == "official":
            raise ValueError("form='official' has no causal form: the released code re-runs the non-causal op over "
                             "the cached keys at every step; use form='paper' or 'stable' with causal=True")
        if causal and (add_norm or ema is not None or conv_kernel_size is not None):
            raise ValueError("add_norm, ema and conv_kernel_size are options of the non-causal layer (the EMA mean and "
                             "the symmetric conv see future tokens); leave them off with causal=True")
        if causal and cross:
            raise ValueError("causal AMLP-Cov mixes a sequence with its own prefix; causal=True with cross=True "
                             "is not supported")
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        if isinstance(landmarks, bool) or not isinstance(landmarks, int) or landmarks < 1:
            raise ValueError(f"landmarks must be an int >= 1, got {landmarks!r}")
        check_activation(activation)
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number or None, got {scale!r}")
        if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0):
            raise ValueError(f"ema must be a momentum in [0, 1) or None, got {ema!r}")
        if conv_kernel_size is not None and (isinstance(conv_kernel_size, bool) or not isinstance(conv_kernel_size, int)
                                             or conv_kernel_size < 1 or conv_kernel_size % 2 == 0):
            raise ValueError(f"conv_kernel_size must be an odd int >= 1 or None, got {conv_kernel_size!r}")
        if not 0.0 <= conv_dropout < 1.0:
            raise ValueError(f"conv_dropout must be in [0, 1), got {conv_dropout}")
        self.variant, self.landmarks, self.activation, self.form = variant, landmarks, activation, form
        self.scale = None if scale is None else float(scale)
        H, D = heads, self.head_dim
        official = form == "official"
        # the released code: xavier-normal with gain 2**-0.5 on [H, c, D], std 1/sqrt(D (c + H))
        std = 1.0 / math.sqrt(D * (landmarks + H)) if official else math.sqrt(2.0 / (landmarks + D))
        self.cq = nn.Parameter(torch.randn(H, landmarks, D) * std)
        self.ck = nn.Parameter(torch.randn(H, landmarks, D) * std)
        if variant == "pquery":
            self.w = nn.Parameter(torch.empty(2 * D, D) if shared_w else torch.empty(H, 2 * D, D))
            self.w_bias = nn.Parameter(torch.zeros(D) if shared_w else torch.zeros(H, D))
            bound = 1.0 / math.sqrt(2 * D)  # nn.Linear(2D, D)'s default
            nn.init.uniform_(self.w, -bound, bound)
            if official:
                nn.init.uniform_(self.w_bias, -bound, bound)
        if form == "stable" or (official and variant == "cov"):
            self.temperature = nn.Parameter(torch.ones(H, 3))
            if official:  # xavier-normal with gain 2**-0.5 on three [H, 1, 1] tensors: N(0, 1 / (1 + H))
                nn.init.normal_(self.temperature, std=math.sqrt(1.0 / (1 + H)))
        else:
            self.temperature = None
        use_norm = (form != "paper") if out_norm is None else out_norm
        self.out_norm = nn.LayerNorm(D) if use_norm else None
        self.add_norm = bool(add_norm)
        if self.add_norm:
            self.q_norm, self.k_norm, self.v_norm, self.l_norm = (nn.LayerNorm(D) for _ in range(4))
        self.ema = None if ema is None else float(ema)
        if self.ema is not None:
            self.register_buffer("ema_mean", torch.zeros(D))
        self.conv = None
        if conv_kernel_size is not None:
            self.conv = nn.Conv2d(H, H, kernel_size=(conv_kernel_size, 1), padding=(conv_kernel_size // 2, 0), groups=H)
            self.conv_dropout = nn.Dropout(conv_dropout)

    def _mix(self, cov_op, pquery_op, q, k, v, q_mask, kv_mask):
        # half-precision heads are mixed, and normalised (head_output), in float32: an AMLP head's
        # output can be a large common value plus small per-feature differences, which rounding it
        # to 8 bits before the LayerNorm would erase
        cdt = compute_dtype(q.dtype)
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        common = dict(q_mask=q_mask, kv_mask=kv_mask, activation=self.activation, form=self.form,
                      temperature=self.temperature, scale=self.scale)
        if self.causal:
            return cov_op(q, k, v, self.cq, self.ck, **common)
        q, k, v = self._prepare(q, k, v, q_mask)
        common["l_norm"] = (self.l_norm.weight, self.l_norm.bias) if self.add_norm else None
        if self.variant == "cov":
            out = cov_op(q, k, v, self.cq, self.ck, **common)
        else:
            out = pquery_op(q, k, v, self.cq, self.ck, self.w, w_bias=self.w_bias, **common)
        return self._add_conv(out, q, q_mask)

    def _prepare(self, q, k, v, q_mask):
        """The released code's optional steps before the op: LayerNorm on q, k, v, then EMA centring of q."""
        if self.add_norm:
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        if self.ema is not None:
            if self.training:
                with torch.no_grad():
                    if q_mask is None:
                        mean = q.float().mean(dim=(0, 1, 2))
                    else:  # real positions only: select them, never weight padding by zero
                        mean = q[q_mask].float().mean(dim=(0, 1)) if bool(q_mask.any()) else self.ema_mean
                    self.ema_mean.copy_(self.ema * self.ema_mean + (1.0 - self.ema) * mean)
            q = q - self.ema_mean.to(q.dtype)
        return q, k, v

    def _add_conv(self, out, q, q_mask):
        """The released code's conv branch: ``out + Drop(ReLU(DepthwiseConv_k(q)))`` per head."""
        if self.conv is None:
            return out
        if q_mask is not None:
            q = torch.where(q_mask[:, :, None, None], q, torch.zeros((), dtype=q.dtype, device=q.device))
        conv = self.conv(q.permute(0, 2, 1, 3).to(self.conv.weight.dtype)).permute(0, 2, 1, 3)
        return out + self.conv_dropout(F.relu(conv)).to(out.dtype)

    def head_output(self, out):
        dtype = self.out_proj.weight.dtype
        if self.out_norm is not None:
            n = self.out_norm
            out = F.layer_norm(out, n.normalized_shape, n.weight.to(out.dtype), n.bias.to(out.dtype), n.eps)
        return out.to(dtype)

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
        out, state = amlp_cov_causal_step(q[:, 0], k[:, 0], v[:, 0], self.cq, self.ck, state,
                                          activation=self.activation, form=self.form,
                                          temperature=self.temperature, scale=self.scale)
        out = self.head_output(out.unsqueeze(1))
        return self.dropout(self.out_proj(out.reshape(x.shape[0], 1, self.dim)))[:, 0], state

    def state_size(self, length: int) -> int | None:
        if not self.causal:
            return None
        return self.heads * (3 * self.head_dim**2 + self.head_dim) + 2

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, variant={self.variant!r}, landmarks={self.landmarks}, "
                f"activation={self.activation!r}, form={self.form!r}"
                + (f", scale={self.scale}" if self.scale is not None else "") + (", add_norm=True" if self.add_norm else "")
                + (f", ema={self.ema}" if self.ema is not None else "")
                + (f", conv_kernel_size={self.conv.kernel_size[0]}" if self.conv is not None else ""))


@register_mixer("amlp-cov", description="AMLP-Cov: dynamic MLP from feature covariances (linear time)",
                reference="Jiang et al. 2023, Attentive MLP for Non-Autoregressive Generation, eqs. 8-10 "
                          "(causal: Appendix A, eqs. 13-14)")
class AMLPCov(AMLP):
    capabilities = Capabilities(causal=True, noncausal=True, cross=True, padding=True, recurrent=True,
                                choices=(("form", FORMS),))

    def __init__(self, dim: int, heads: int, **options):
        if options.pop("variant", "cov") != "cov":
            raise ValueError("amlp-cov takes no variant option; use AMLP(variant=...) or 'amlp-pquery'")
        super().__init__(dim, heads, variant="cov", **options)


@register_mixer("amlp-pquery", description="AMLP-PQuery: dynamic MLP from pooled pseudo-queries (linear time)",
                reference="Jiang et al. 2023, Attentive MLP for Non-Autoregressive Generation, eqs. 8, 11-12")
class AMLPPQuery(AMLP):
    capabilities = Capabilities(causal=False, noncausal=True, cross=True, padding=True, choices=(("form", FORMS),))

    def __init__(self, dim: int, heads: int, **options):
        if options.pop("variant", "pquery") != "pquery":
            raise ValueError("amlp-pquery takes no variant option; use AMLP(variant=...) or 'amlp-cov'")
        super().__init__(dim, heads, variant="pquery", **options)
