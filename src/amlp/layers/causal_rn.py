"""CausalRN mixers: the exponentially activated relation network, linear and quadratic.

    y_i = W_3 LN0( (1/n_i) sum_{j <= i} exp(N_pre(a_i, b_j)) ) + b_3,
    a_i = W_1 LN0(x_i) + b_1,   b_j = W_2 LN0(x_j)

(arXiv 2406.16168; code ``FrankCuiCN/causal-relation-networks``). The residual ``x_i +`` belongs to the block
(:class:`amlp.models.blocks.CausalRNBlock`), not to the mixer.

These are not attention: there are no queries, keys or values, no heads and no softmax, so they
subclass :class:`Mixer` directly. The contract's ``heads`` argument is accepted and **ignored**: the
relation network has a single head over all h hidden features (every configuration of the original
code uses one head, and the stabilisation of its ``bar_quadratic.py`` is exact only for one head), so
``mixer.heads == 1`` whatever is passed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops._checks import compute_dtype, padded_rows_to_zero
from ..ops.causal_rn import (
    DEFAULT_CHUNK_SIZE,
    causal_rn_linear,
    causal_rn_linear_init_state,
    causal_rn_linear_reference,
    causal_rn_linear_step,
    causal_rn_quadratic,
    causal_rn_quadratic_reference,
    causal_rn_quadratic_step,
    check_ablation,
    layer_norm0,
)
from .base import Capabilities, Mixer
from .registry import register_mixer


class _RelationNetwork(Mixer):
    """Projections, post-projection and padding shared by the two CausalRN mixers.

    Args:
        dim: model width E.
        heads: accepted for the mixer contract and ignored (one head; see the module docstring).
        causal: pool over the prefix ``j <= i`` (True) or over the whole sequence.
        hidden: h, the width of the relation features (default: ``dim``).
        hidden_ratio: h as a multiple of ``dim`` instead, ``round(hidden_ratio * dim)`` (the papers' language
            model uses 4, so that a block has the parameters of a Transformer block; give ``hidden`` or this).
        init_std: standard deviation of the normal initialisation of W_1, W_2 and W_3 (0.02).
        out_init_std: that of W_3 (default ``init_std``; the original code uses
            ``0.02 / sqrt(number of blocks)``, which a model passes here).
    """

    def __init__(self, dim: int, heads: int = 1, *, causal: bool = False, cross: bool = False,
                 hidden: int | None = None, hidden_ratio: float | None = None, init_std: float = 0.02,
                 out_init_std: float | None = None):
        super().__init__(dim, heads, causal=causal, cross=cross)
        if hidden_ratio is not None:
            if hidden is not None:
                raise ValueError(f"give hidden ({hidden!r}) or hidden_ratio ({hidden_ratio!r}), not both")
            if isinstance(hidden_ratio, bool) or not isinstance(hidden_ratio, (int, float)) or not hidden_ratio > 0:
                raise ValueError(f"hidden_ratio must be a number > 0, got {hidden_ratio!r}")
            hidden = int(round(hidden_ratio * dim))
        hidden = dim if hidden is None else hidden
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 2:
            raise ValueError(f"hidden must be an int >= 2 (LN0 over one feature is always zero), got {hidden!r}")
        self.heads, self.head_dim = 1, hidden
        self.hidden = hidden
        self.in_query = nn.Linear(dim, hidden, bias=True)  # W_1, b_1
        self.in_key = nn.Linear(dim, hidden, bias=False)  # W_2
        self.out_proj = nn.Linear(hidden, dim, bias=True)  # W_3, b_3
        nn.init.normal_(self.in_query.weight, std=init_std)
        nn.init.normal_(self.in_key.weight, std=init_std)
        nn.init.normal_(self.out_proj.weight, std=init_std if out_init_std is None else out_init_std)
        nn.init.zeros_(self.in_query.bias)
        nn.init.zeros_(self.out_proj.bias)

    def _pair_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xn = layer_norm0(x.to(compute_dtype(x.dtype))).to(x.dtype)
        return self.in_query(xn), self.in_key(xn)

    def _pool(self, a, b, mask):  # pragma: no cover - abstract
        raise NotImplementedError

    def _pool_reference(self, a, b, mask):  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(self, pooled, mask):
        out = self.out_proj(pooled)
        return padded_rows_to_zero(out, mask)  # by selection

    def mix_tokens(self, x, context, x_mask, context_mask):
        a, b = self._pair_features(x)
        return self._finish(self._pool(a, b, x_mask), x_mask)

    def reference_tokens(self, x, context, x_mask, context_mask):
        a, b = self._pair_features(x)
        return self._finish(self._pool_reference(a, b, x_mask), x_mask)

    def _check_step(self, x_t):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {shape}")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, causal={self.causal}"


@register_mixer("causal-rn", description="CausalRN: exp-activated relation network, separable pre-norm (linear time)",
                reference="Cui et al. 2024, Causal Relation Networks (arXiv 2406.16168), linear form")
class CausalRN(_RelationNetwork):
    """Linear CausalRN ("approx" pre-normalisation): ``N_pre = LN0(a_i) + LN0(b_j)``.

    O(T h) time by a stable log-cumsum-exp (bidirectional: log-sum-exp); the recurrent state is the
    running ``log sum_j exp(b^_j)``, h numbers per batch row. See :class:`_RelationNetwork` for the
    options.
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=False, padding=True, recurrent=True)

    def _pool(self, a, b, mask):
        return causal_rn_linear(a, b, mask=mask, causal=self.causal)

    def _pool_reference(self, a, b, mask):
        return causal_rn_linear_reference(a, b, mask=mask, causal=self.causal)

    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.in_query.weight
        dtype = torch.float32 if (dtype or p.dtype) in (torch.float16, torch.bfloat16) else (dtype or p.dtype)
        return causal_rn_linear_init_state(batch_size, self.hidden, dtype=dtype, device=device or p.device)

    def step(self, x_t, state):
        self._check_step(x_t)
        a, b = self._pair_features(x_t)
        pooled, state = causal_rn_linear_step(a, b, state)
        return self.out_proj(pooled), state

    def state_size(self, length: int) -> int:
        return self.hidden


@register_mixer("causal-rn-quadratic",
                description="CausalRN with exact per-pair pre-norm (quadratic time, copies perfectly)",
                reference="Cui et al. 2024, Causal Relation Networks (arXiv 2406.16168), quadratic form")
class CausalRNQuadratic(_RelationNetwork):
    """Quadratic CausalRN ("exact" pre-normalisation): ``N_pre = LN0(a_i + b_j)`` for every pair.

    O(T^2 h) time; queries run in blocks of ``chunk_size`` so no ``[B, T, T, h]`` tensor is ever
    built. The recurrent state is the cache of every past ``b_j`` (``t h`` numbers per batch row).

    The ablation grid of the paper (the authors' ``block_r_ablation.py``) is available through two
    options, every cell computed quadratically,
    ``y_i = W_3 LN0( (1/n_i) sum_{j <= i} act(N_pre(a_i, b_j)) ) + b_3``:

    * ``prenorm``: ``"exact"`` ``N_pre = LN0(a_i + b_j)`` (default); ``"approx"``
      ``LN0(a_i) + LN0(b_j)``, the separable pre-norm of the linear ``causal-rn`` (with exp it gives
      the same function as ``causal-rn``, computed pair by pair); ``"none"`` ``a_i + b_j``.
    * ``activation``: ``"exp"`` (default), ``"relu"``, ``"gelu"`` (exact, erf) or ``"elu"`` (alpha 1).

    The defaults are the form above. Future and padded pairs add nothing to a pool and receive no
    gradient: their pre-activation is replaced, by selection, with -inf for exp (whose value there
    is exactly 0) and with 0 for the other activations (relu, gelu and elu all map 0 to 0; -inf
    would give GELU NaN and ELU -1), and their gradient is selected out. The parameters are the
    same for every cell.

    Args:
        chunk_size: queries per block; ``"auto"`` (the default) sizes the blocks from a memory budget
            (:data:`amlp.ops.causal_rn.AUTO_BLOCK_BYTES`).
        prenorm: ``"exact"``, ``"approx"`` or ``"none"``.
        activation: ``"exp"``, ``"relu"``, ``"gelu"`` or ``"elu"``.
        Other options as in :class:`_RelationNetwork`.
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=False, padding=True, recurrent=True)

    def __init__(self, dim: int, heads: int = 1, *, causal: bool = False, cross: bool = False,
                 hidden: int | None = None, hidden_ratio: float | None = None,
                 chunk_size: int | str = DEFAULT_CHUNK_SIZE, init_std: float = 0.02,
                 out_init_std: float | None = None, prenorm: str = "exact", activation: str = "exp"):
        super().__init__(dim, heads, causal=causal, cross=cross, hidden=hidden, hidden_ratio=hidden_ratio,
                         init_std=init_std, out_init_std=out_init_std)
        if chunk_size != "auto" and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                     or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1 or 'auto', got {chunk_size!r}")
        check_ablation(prenorm, activation)
        self.chunk_size = chunk_size
        self.prenorm, self.activation = prenorm, activation

    def _pool(self, a, b, mask):
        return causal_rn_quadratic(a, b, mask=mask, causal=self.causal, chunk_size=self.chunk_size,
                                   prenorm=self.prenorm, activation=self.activation)

    def _pool_reference(self, a, b, mask):
        return causal_rn_quadratic_reference(a, b, mask=mask, causal=self.causal, prenorm=self.prenorm,
                                             activation=self.activation)

    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.in_key.weight
        return torch.zeros(batch_size, 0, self.hidden, device=device or p.device, dtype=dtype or p.dtype)

    def step(self, x_t, state):
        self._check_step(x_t)
        a, b = self._pair_features(x_t)
        cache = torch.cat([state, b.to(state.dtype).unsqueeze(1)], dim=1)
        pooled = causal_rn_quadratic_step(a, cache, prenorm=self.prenorm, activation=self.activation)
        return self.out_proj(pooled), cache

    def state_size(self, length: int) -> int:
        return length * self.hidden

    def extra_repr(self) -> str:
        ablation = "" if (self.prenorm, self.activation) == ("exact", "exp") else \
            f", prenorm={self.prenorm}, activation={self.activation}"
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}{ablation}"
