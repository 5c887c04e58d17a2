"""The mixer contract shared by every layer.

    y = mixer(x, context=None, *, x_mask=None, context_mask=None)   # [B, T, E] -> [B, T, E]
    state = mixer.init_state(batch_size)                            # causal mixers with a step
    y_t, state = mixer.step(x_t, state)                             # x_t [B, E] -> y_t [B, E]

``context=None`` is self-mixing; a tensor ``[B, S, E]`` is cross-mixing (S may differ from T).
Masks are boolean ``[B, T]`` / ``[B, S]``, True = real token. Causality is fixed at construction.

Masks select, they never multiply: whatever a padded position holds (NaN and inf included) reaches
no real output and no gradient, and in a causal form a non-finite token reaches only the outputs
that see it (the later ones; for a window mixer, those within the window), which are NaN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..ops._checks import check_mask


@dataclass(frozen=True)
class Capabilities:
    """What a mixer can do, as data: the registry builds, refuses and tests from this record."""

    causal: bool = False
    noncausal: bool = True
    cross: bool = False
    padding: bool = True
    recurrent: bool = False
    max_length: int | None = None
    #: name of the constructor option that sets ``max_length`` per instance, if any
    max_length_option: str | None = None
    #: options with no default, as ``((option, (choice, ...)), ...)``: the user must choose one
    #: (AMLP's ``form``); generic tools (the correctness gate) go through every choice
    choices: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _state_tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _state_tensors(value)
    elif isinstance(state, (tuple, list)):
        for value in state:
            yield from _state_tensors(value)


def check_state(state, batch: int, name: str) -> None:
    """A recurrent state must be what ``init_state`` (or a previous ``step``) returned, for the
    batch size of ``x_t``: every tensor in it has that batch size as its first dimension."""
    if state is None:
        raise ValueError(f"mixer {name!r}: state is None; start from state = mixer.init_state(batch_size) and pass "
                         "on the state each step returns")
    tensors = list(_state_tensors(state))
    if not tensors:
        raise ValueError(f"mixer {name!r}: state holds no tensors (got {type(state).__name__}); use the state "
                         "init_state or step returned")
    for t in tensors:
        if t.dim() >= 1 and t.shape[0] != batch:
            raise ValueError(f"mixer {name!r}: the state was made for batch size {t.shape[0]}, but x_t has batch "
                             f"size {batch}; call init_state({batch})")


def _checked_step(step):
    @functools.wraps(step)
    def checked(self, x_t, state):
        if self.capabilities.recurrent and not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be shaped [B, E] with E = {self.dim}, got {shape}")
        self._check_dtype(x_t, "x_t")
        check_state(state, x_t.shape[0], self.mixer_name)
        return step(self, x_t, state)

    return checked


def _checked_init_state(init_state):
    @functools.wraps(init_state)
    def checked(self, batch_size, *args, **kwargs):
        check_batch_size(batch_size)
        return init_state(self, batch_size, *args, **kwargs)

    return checked


def _select_real(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t`` with its padded rows (``mask`` False) replaced by zeros, by selection."""
    if mask is None:
        return t
    return torch.where(mask.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))


class Mixer(nn.Module):
    """Base class of every sequence mixer; subclasses implement :meth:`mix_tokens`.

    The recurrent interface of every subclass is checked here: ``init_state`` takes a positive batch
    size, and ``step`` takes ``x_t`` ``[B, E]`` and a state made for that batch size.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()
    #: registry name, filled in by :func:`amlp.layers.registry.register_mixer`
    mixer_name: ClassVar[str] = "mixer"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = _checked_step(cls.__dict__["step"])
        if "init_state" in cls.__dict__:
            cls.init_state = _checked_init_state(cls.__dict__["init_state"])

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if dim % heads != 0:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        caps = self.capabilities
        if causal and not caps.causal:
            raise ValueError(f"mixer {self.mixer_name!r} has no causal form (capability 'causal')")
        if not causal and not caps.noncausal:
            raise ValueError(f"mixer {self.mixer_name!r} has no non-causal form (capability 'noncausal'); pass causal=True")
        if cross and not caps.cross:
            raise ValueError(f"mixer {self.mixer_name!r} cannot mix a separate context (capability 'cross')")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.causal = causal
        self.cross = cross

    #: per-instance maximum length, for mixers whose limit is a constructor option
    _max_length: int | None = None

    @property
    def max_length(self) -> int | None:
        """Longest input this instance accepts (None: unbounded)."""
        return self._max_length if self._max_length is not None else self.capabilities.max_length

    # -- the public call -------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        x_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_input(x, "x")
        B, T, _ = x.shape
        check_mask(x_mask, B, T, "x_mask")
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without a context; use x_mask for self-mixing")
        else:
            if not self.capabilities.cross:
                raise ValueError(f"mixer {self.mixer_name!r} cannot mix a separate context (capability 'cross')")
            self._check_input(context, "context")
            if context.shape[0] != B:
                raise ValueError(f"context must have the batch size of x ({B}), got {context.shape[0]}")
            check_mask(context_mask, B, context.shape[1], "context_mask")
        if x_mask is not None and not self.capabilities.padding:
            raise ValueError(f"mixer {self.mixer_name!r} does not take padding masks (capability 'padding')")
        limit = self.max_length
        for name, t in (("x", x), ("context", context)):
            if limit is not None and t is not None and t.shape[1] > limit:
                raise ValueError(
                    f"mixer {self.mixer_name!r} has a maximum length of {limit} (capability 'max_length'); "
                    f"{name} has length {t.shape[1]}"
                )
        # padding is selected out before anything is computed from it: a NaN or inf in a padded
        # position then reaches neither a real output nor a gradient (a mask that multiplies would
        # turn 0 * NaN into NaN)
        x = _select_real(x, x_mask)
        if context is not None:
            context = _select_real(context, context_mask)
        if not self.causal:
            return self.mix_tokens(x, context, x_mask, context_mask)
        # causal: a non-finite token is selected out before mixing, so it cannot reach an earlier
        # output through a product with a zero weight; the outputs it can reach are set to NaN after
        bad = ~torch.isfinite(x).all(-1)
        x = torch.where(bad.unsqueeze(-1), torch.zeros((), dtype=x.dtype, device=x.device), x)
        y = self.mix_tokens(x, context, x_mask, context_mask)
        reached = self.poison_reach(bad)
        return torch.where(reached.unsqueeze(-1), torch.full((), float("nan"), dtype=y.dtype, device=y.device), y)

    def poison_reach(self, bad: torch.Tensor) -> torch.Tensor:
        """Causal forms: which outputs ``[B, T]`` a non-finite input at the ``bad`` positions
        ``[B, T]`` reaches (by default every later position; a window mixer overrides this)."""
        return torch.cumsum(bad.to(torch.int32), dim=1) > 0

    def _check_input(self, t: torch.Tensor, name: str) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.dim:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be shaped [B, T, E] with E = {self.dim}, got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one token, got length 0")
        self._check_dtype(t, name)

    def _check_dtype(self, t: torch.Tensor, name: str) -> None:
        """Outside autocast, the input must have the dtype of the parameters."""
        p = next(self.parameters(), None)
        if p is None or t.dtype == p.dtype or torch.is_autocast_enabled(t.device.type):
            return
        raise ValueError(f"{name} has dtype {t.dtype} but the mixer's parameters are {p.dtype}; convert one of them "
                         f"(mixer.to({t.dtype}) or {name}.to({p.dtype})), or run under torch.autocast")

    def mix_tokens(self, x, context, x_mask, context_mask) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reference(self, x, context=None, *, x_mask=None, context_mask=None) -> torch.Tensor:
        """The same computation as :meth:`forward` through the plain reference op (slow, for tests
        and for the correctness gate of the benchmark)."""
        self._check_input(x, "x")
        if context is not None:
            self._check_input(context, "context")
        return self.reference_tokens(x, context, x_mask, context_mask)

    def reference_tokens(self, x, context, x_mask, context_mask) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"mixer {self.mixer_name!r} has no reference form")

    # -- recurrent interface (causal mixers with capability 'recurrent') --------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> Any:
        raise ValueError(f"mixer {self.mixer_name!r} has no recurrent step (capability 'recurrent')")

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise ValueError(f"mixer {self.mixer_name!r} has no recurrent step (capability 'recurrent')")

    def state_size(self, length: int) -> int | None:
        """Number of floats of recurrent state per batch row after ``length`` tokens (None: no step)."""
        return None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}"


class ProjectedMixer(Mixer):
    """A mixer with the usual q, k, v and output projections around a per-head op.

    Subclasses implement :meth:`mix_heads` on ``[B, T, H, D]`` tensors.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self._reset_projections()

    def _reset_projections(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim)

    def _project_and_mix(self, mix, x, context, x_mask, context_mask):
        source = x if context is None else context
        kv_mask = x_mask if context is None else context_mask
        q = self.split_heads(self.q_proj(x))
        k = self.split_heads(self.k_proj(source))
        v = self.split_heads(self.v_proj(source))
        out = self.head_output(mix(q, k, v, x_mask, kv_mask))
        out = out.reshape(x.shape[0], x.shape[1], self.dim)
        return self.dropout(self.out_proj(out))

    def mix_tokens(self, x, context, x_mask, context_mask):
        return self._project_and_mix(self.mix_heads, x, context, x_mask, context_mask)

    def project_context(self, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> dict | None:
        """The projected keys and values of a context, to mix many query batches against it without
        projecting it again (a decoder's cross site, one step at a time): pass the result to
        :meth:`mix_projected`. None for a mixer that does not mix through these projections alone."""
        if type(self).mix_tokens is not ProjectedMixer.mix_tokens:
            return None
        self._check_input(context, "context")
        check_mask(context_mask, context.shape[0], context.shape[1], "context_mask")
        context = _select_real(context, context_mask)
        return {"k": self.split_heads(self.k_proj(context)), "v": self.split_heads(self.v_proj(context)),
                "mask": context_mask}

    def mix_projected(self, x: torch.Tensor, projected: dict, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mixer(x, context, x_mask=x_mask, context_mask=...)`` for the context that
        :meth:`project_context` projected (same numbers, without projecting it again)."""
        self._check_input(x, "x")
        check_mask(x_mask, x.shape[0], x.shape[1], "x_mask")
        x = _select_real(x, x_mask)
        q = self.split_heads(self.q_proj(x))
        out = self.head_output(self.mix_heads(q, projected["k"], projected["v"], x_mask, projected["mask"]))
        return self.dropout(self.out_proj(out.reshape(x.shape[0], x.shape[1], self.dim)))

    def reference_tokens(self, x, context, x_mask, context_mask):
        return self._project_and_mix(self.mix_heads_reference, x, context, x_mask, context_mask)

    def head_output(self, out: torch.Tensor) -> torch.Tensor:
        """What the layer does to the op's ``[B, T, H, D]`` output before merging the heads
        (nothing by default; AMLP normalises each head here)."""
        return out

    def mix_heads(self, q, k, v, q_mask, kv_mask) -> torch.Tensor:  # pragma: no cover - abstract
        """The fast op on ``[B, T, H, D]`` heads."""
        raise NotImplementedError

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask) -> torch.Tensor:  # pragma: no cover
        """The plain reference op on ``[B, T, H, D]`` heads (same parameters as :meth:`mix_heads`)."""
        raise NotImplementedError(f"mixer {self.mixer_name!r} has no reference form")
