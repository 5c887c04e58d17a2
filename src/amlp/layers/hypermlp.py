r"""HyperMLP and HyperGLU layers (arXiv 2602.12601): the causal attention head as a dynamic two-layer
MLP whose weights come from the context, with learned mixing in feature space (gates) and in
sequence space (lag-indexed diagonal-plus-low-rank operators).

Per layer (as the official code ``LJC-FVNR/HyperMLP`` computes it; the head itself is
:func:`amlp.ops.hypermlp.hyper_attention`):

    x~ = Conv1(X), x^ = Conv2(X)           causal depthwise convolutions (kernel 4, no bias)
    q  = (X W_q) * sigmoid(X G_q + g_q)     QK gate M^(1); width qk_rank, H_qk heads
    k  = x~ W_k,   v = x^ W_v               widths qk_rank and vo_rank
    s1 = sigmoid(X W_c1 + b_1), s2 = sigmoid(X W_c2 + b_2)      controls of R^(1), R^(2)
    r  = hyper_attention(q, k, v, ...)      scores, R^(1), activation, R^(2), readout
    y  = (concat_heads(r) * sigmoid(X G_o + g_o)) W_o           VO gate M^(2), output projection

HyperMLP (``hyper-mlp``) uses ``H_qk = H`` query/key heads and the activation ReLU(h)/||h||_2;
HyperGLU (``hyper-glu``) uses ``H_qk = 2H`` (gate heads, then scale heads, each with its own R^(1))
and ``Softplus(h_scale) * ReLU(h_gate)/||h_gate||_2``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..ops.hypermlp import KINDS, LAYOUTS, hyper_attention, hyper_attention_reference
from .base import Capabilities, Mixer
from .registry import register_mixer

SEQUENCE_MIXING = ("both", "qk", "vo", "none")


class HyperHead(Mixer):
    """Causal HyperMLP / HyperGLU mixer (``kind="relu"`` / ``"glu"``).

    Args:
        dim, heads: model width E and number of value heads H.
        kind: ``"relu"`` (HyperMLP) or ``"glu"`` (HyperGLU).
        qk_rank: total query/key width, split over ``H_qk`` heads (``H`` for relu, ``2H`` for glu).
            Default: ``E // 4`` rounded down to a multiple of ``H_qk`` (at least ``H_qk``).
        vo_rank: total value width, split over H heads (default E).
        rank: r_s, the rank of each sequence-mixing operator (default 16).
        max_lag: number of lags with parameters (rows of the p, A, B banks; default 2048). Lags at
            or beyond it have no low-rank term and no diagonal (R is the identity there), so the
            head still attends to those tokens as plain ReLU / GLU attention and any length runs.
        conv_kernel: size of the causal depthwise convolutions on the K and V inputs (default 4).
        kv_conv, qk_gate, vo_gate: switch the convolutions / the QK gate / the VO gate on or off.
        sequence_mixing: which operators are learned: ``"both"`` (R^(1) and R^(2)), ``"qk"``,
            ``"vo"`` or ``"none"`` (the others are the identity).
        layout: how the operators' slots are indexed: ``"lag"`` (the default, the paper's design:
            bank row l for the token l steps back) or ``"absolute"``, an ablation (bank row j for the
            token at position j; ``max_lag`` then counts positions). See :mod:`amlp.ops.hypermlp`.
        chunk_size: queries per block of the chunked form; ``"auto"`` (the default) sizes the blocks
            from a memory budget (:data:`amlp.ops.hypermlp.AUTO_BLOCK_BYTES`), ``None`` is the dense form.
        dropout: dropout on the layer output. bias: biases on the q/k/v/output projections
            (default False, as in the reference design; gate and control linears always have one).

    Padding (``x_mask``): padded tokens enter the convolutions as zeros, their keys and values are
    zeroed and the outputs at padded positions are zero. Right padding is exact. Left padding is
    not exactly invariant (R^(1) moves mass into padded slots, which then count in the norm and
    feed R^(2), and the lags of the real keys shift by the padding length; with
    ``sequence_mixing="none"`` it is exact), so pad on the right.

    The recurrent :meth:`step` caches K (qk_rank floats per token), V (vo_rank per token) and the last
    ``conv_kernel - 1`` inputs, and gives the same numbers as :meth:`forward`.
    """

    capabilities = Capabilities(causal=True, noncausal=False, cross=False, padding=True, recurrent=True)

    def __init__(self, dim: int, heads: int, *, kind: str = "relu", causal: bool = False, cross: bool = False,
                 qk_rank: int | None = None, vo_rank: int | None = None, rank: int = 16, max_lag: int = 2048,
                 conv_kernel: int = 4, kv_conv: bool = True, qk_gate: bool = True, vo_gate: bool = True,
                 sequence_mixing: str = "both", chunk_size: int | str | None = "auto", dropout: float = 0.0,
                 bias: bool = False, layout: str = "lag"):
        super().__init__(dim, heads, causal=causal, cross=cross)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        qk_heads = heads if kind == "relu" else 2 * heads
        if qk_rank is None:
            qk_rank = qk_heads * max(1, (dim // 4) // qk_heads)
        if vo_rank is None:
            vo_rank = dim
        for name, value in (("qk_rank", qk_rank), ("vo_rank", vo_rank), ("rank", rank), ("max_lag", max_lag),
                            ("conv_kernel", conv_kernel)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if qk_rank % qk_heads != 0:
            raise ValueError(f"qk_rank must be divisible by the {qk_heads} query/key heads of kind {kind!r}, "
                             f"got qk_rank={qk_rank}")
        if vo_rank % heads != 0:
            raise ValueError(f"vo_rank must be divisible by heads, got vo_rank={vo_rank}, heads={heads}")
        if sequence_mixing not in SEQUENCE_MIXING:
            raise ValueError(f"sequence_mixing must be one of {SEQUENCE_MIXING}, got {sequence_mixing!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if chunk_size != "auto" and chunk_size is not None and (
                not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, None or 'auto', got {chunk_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.kind, self.qk_heads, self.qk_rank, self.vo_rank = kind, qk_heads, qk_rank, vo_rank
        self.rank, self.max_lag, self.conv_kernel, self.chunk_size = rank, max_lag, conv_kernel, chunk_size
        self.sequence_mixing, self.layout = sequence_mixing, layout
        self.qk_dim, self.vo_dim = qk_rank // qk_heads, vo_rank // heads

        self.q_proj = nn.Linear(dim, qk_rank, bias=bias)
        self.k_proj = nn.Linear(dim, qk_rank, bias=bias)
        self.v_proj = nn.Linear(dim, vo_rank, bias=bias)
        self.out_proj = nn.Linear(vo_rank, dim, bias=bias)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        # depthwise causal convolutions, weight [E, kernel]: y_t = sum_i w[:, i] x_{t - kernel + 1 + i}
        self.k_conv = nn.Parameter(torch.randn(dim, conv_kernel) * 0.02) if kv_conv else None
        self.v_conv = nn.Parameter(torch.randn(dim, conv_kernel) * 0.02) if kv_conv else None
        self.q_gate = nn.Linear(dim, qk_rank) if qk_gate else None
        self.o_gate = nn.Linear(dim, vo_rank) if vo_gate else None
        mix_qk = sequence_mixing in ("both", "qk")
        mix_vo = sequence_mixing in ("both", "vo")
        self.qk_control = nn.Linear(dim, qk_heads * rank) if mix_qk else None
        self.vo_control = nn.Linear(dim, heads * rank) if mix_vo else None
        self.qk_p = nn.Parameter(torch.zeros(qk_heads, max_lag)) if mix_qk else None
        self.qk_a = nn.Parameter(torch.randn(qk_heads, max_lag, rank) * 0.02) if mix_qk else None
        self.qk_b = nn.Parameter(torch.randn(qk_heads, max_lag, rank) * 0.02) if mix_qk else None
        self.vo_p = nn.Parameter(torch.zeros(heads, max_lag)) if mix_vo else None
        self.vo_a = nn.Parameter(torch.randn(heads, max_lag, rank) * 0.02) if mix_vo else None
        self.vo_b = nn.Parameter(torch.randn(heads, max_lag, rank) * 0.02) if mix_vo else None
        self.dropout = nn.Dropout(dropout)

    # -- pieces --------------------------------------------------------------------------------
    @property
    def has_conv(self) -> bool:
        return self.k_conv is not None

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Causal depthwise convolution of ``[B, T, E]``: left padding ``kernel - 1``, then one
        multiply-add per tap (a handful of element-wise passes for the small kernels used here)."""
        T = x.shape[1]
        padded = F.pad(x, (0, 0, self.conv_kernel - 1, 0))
        out = padded[:, :T] * weight[:, 0]
        for i in range(1, self.conv_kernel):
            out = out + padded[:, i:i + T] * weight[:, i]
        return out

    def _conv_reference(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The same convolution as a loop over taps: ``y_t = sum_i w[:, i] x_{t - kernel + 1 + i}``."""
        T = x.shape[1]
        out = torch.zeros_like(x)
        for i in range(self.conv_kernel):
            lag = self.conv_kernel - 1 - i
            if lag < T:
                out[:, lag:] = out[:, lag:] + weight[:, i] * x[:, : T - lag]
        return out

    def _features(self, x, x_conv_k, x_conv_v, q_rows):
        """Projections, gates and controls. ``x`` gives the queries (its last ``q_rows`` tokens),
        ``x_conv_k`` / ``x_conv_v`` the (convolved) inputs of the keys and values."""
        B, T, _ = x.shape
        xq = x[:, T - q_rows:]
        q = self.q_proj(xq)
        if self.q_gate is not None:
            q = q * torch.sigmoid(self.q_gate(xq))
        q = q.view(B, q_rows, self.qk_heads, self.qk_dim)
        k = self.k_proj(x_conv_k).view(B, x_conv_k.shape[1], self.qk_heads, self.qk_dim)
        v = self.v_proj(x_conv_v).view(B, x_conv_v.shape[1], self.heads, self.vo_dim)
        return q, k, v

    def _op_options(self, xq):
        B, Tq, _ = xq.shape
        opts = dict(kind=self.kind, layout=self.layout)
        if self.qk_p is not None:
            s = torch.sigmoid(self.qk_control(xq)).view(B, Tq, self.qk_heads, self.rank)
            opts.update(s_qk=s, qk_p=self.qk_p, qk_a=self.qk_a, qk_b=self.qk_b)
        if self.vo_p is not None:
            s = torch.sigmoid(self.vo_control(xq)).view(B, Tq, self.heads, self.rank)
            opts.update(s_vo=s, vo_p=self.vo_p, vo_a=self.vo_a, vo_b=self.vo_b)
        return opts

    def _finish(self, r, xq):
        B, Tq = r.shape[:2]
        r = r.reshape(B, Tq, self.vo_rank)
        if self.o_gate is not None:
            r = r * torch.sigmoid(self.o_gate(xq))
        return self.dropout(self.out_proj(r))

    def _run(self, x, x_mask, conv, op, **extra):
        if x_mask is not None:
            x_in = torch.where(x_mask[:, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))  # zeros in the convolutions
        else:
            x_in = x
        xk = conv(x_in, self.k_conv) if self.has_conv else x_in
        xv = conv(x_in, self.v_conv) if self.has_conv else x_in
        q, k, v = self._features(x, xk, xv, x.shape[1])
        r = op(q, k, v, q_mask=x_mask, kv_mask=x_mask, **self._op_options(x), **extra)
        return self._finish(r, x)

    # -- the mixer contract --------------------------------------------------------------------
    def mix_tokens(self, x, context, x_mask, context_mask):
        return self._run(x, x_mask, self._conv, hyper_attention, chunk_size=self.chunk_size)

    def reference_tokens(self, x, context, x_mask, context_mask):
        if context is not None:
            raise ValueError(f"mixer {self.mixer_name!r} cannot mix a separate context (capability 'cross')")
        return self._run(x, x_mask, self._conv_reference, hyper_attention_reference)

    # -- recurrent form --------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        ref = self.q_proj.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        return {
            "k": torch.zeros(batch_size, 0, self.qk_heads, self.qk_dim, device=device, dtype=dtype),
            "v": torch.zeros(batch_size, 0, self.heads, self.vo_dim, device=device, dtype=dtype),
            "x": torch.zeros(batch_size, self.conv_kernel - 1 if self.has_conv else 0, self.dim,
                             device=device, dtype=dtype),
        }

    def step(self, x_t: torch.Tensor, state):
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {tuple(x_t.shape)}")
        x = x_t.unsqueeze(1)
        if self.has_conv:
            window = torch.cat([state["x"], x], dim=1)  # the last `kernel` inputs, oldest first
            xk = torch.einsum("bie,ei->be", window, self.k_conv).unsqueeze(1)
            xv = torch.einsum("bie,ei->be", window, self.v_conv).unsqueeze(1)
            new_x = window[:, 1:]
        else:
            xk = xv = x
            new_x = state["x"]
        q, k_t, v_t = self._features(x, xk, xv, 1)
        k = torch.cat([state["k"], k_t], dim=1)
        v = torch.cat([state["v"], v_t], dim=1)
        r = hyper_attention(q, k, v, **self._op_options(x))
        return self._finish(r, x)[:, 0], {"k": k, "v": v, "x": new_x}

    def state_size(self, length: int) -> int:
        conv = (self.conv_kernel - 1) * self.dim if self.has_conv else 0
        return length * (self.qk_rank + self.vo_rank) + conv

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kind={self.kind!r}, qk_rank={self.qk_rank}, "
                f"vo_rank={self.vo_rank}, rank={self.rank}, max_lag={self.max_lag}, "
                f"sequence_mixing={self.sequence_mixing!r}, layout={self.layout!r}, chunk_size={self.chunk_size}")


@register_mixer("hyper-mlp", description="HyperMLP: causal head as a dynamic MLP, ReLU/L2 with lag-indexed DPLR "
                "sequence mixing (quadratic, chunked)",
                reference="HyperMLP / HyperGLU, arXiv 2602.12601 (sections 2-3, Lemma G.1)")
class HyperMLP(HyperHead):
    def __init__(self, dim: int, heads: int, **options):
        if options.pop("kind", "relu") != "relu":
            raise ValueError("hyper-mlp takes no kind option; use HyperHead(kind=...) or 'hyper-glu'")
        super().__init__(dim, heads, kind="relu", **options)


@register_mixer("hyper-glu", description="HyperGLU: causal head as a dynamic GLU, softplus(scale) * ReLU/L2(gate) "
                "with lag-indexed DPLR sequence mixing (quadratic, chunked)",
                reference="HyperMLP / HyperGLU, arXiv 2602.12601 (sections 2-3, Prop. 2.4, Lemma G.1)")
class HyperGLU(HyperHead):
    def __init__(self, dim: int, heads: int, **options):
        if options.pop("kind", "glu") != "glu":
            raise ValueError("hyper-glu takes no kind option; use HyperHead(kind=...) or 'hyper-mlp'")
        super().__init__(dim, heads, kind="glu", **options)
