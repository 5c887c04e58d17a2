"""The measured computations, each rebuilt from a small picklable description (:class:`Workload`)
so that the same thing can be timed in this process and measured for memory in a fresh one.

* ``kind="op"``: the mixer's per-head op, ``mixer.mix_heads(q, k, v, None, None)`` on
  ``[B, T, H, D]`` tensors that require grad (what the AMLP paper's efficiency claims are about);
* ``kind="layer"``: the whole module (projections included) on ``[B, T, E]``;
* ``kind="nar"``: one non-autoregressive pass of a small decoder stack (:class:`DecoderStack`) over
  ``T`` positions;
* ``kind="ar"``: autoregressive generation of ``T`` tokens by the causal stack, one token per step
  through the mixers' recurrent ``step`` (a key/value cache for softmax attention).

``padding`` (``op`` and ``layer`` only) is the fraction of each row's positions that are padding:
the last ``round(padding * T)`` positions of every row (at least one stays real) are masked out, and
the masks go to the mixer (``q_mask`` / ``kv_mask`` of the op, ``x_mask`` of the layer), so the
time includes the mixer's masking work. Padded inputs hold random values, as real ones do.

``mode="fwd"`` runs the forward pass under ``torch.no_grad()``; ``mode="fwdbwd"`` runs the forward
pass with autograd and the backward pass of a fixed random output gradient (gradients of the inputs
and of every parameter, none accumulated between calls).

What one call does, apart from its time: :func:`count_aten_calls` (ATen operator calls, from
:mod:`torch.profiler`) and :func:`count_flops` (floating-point operations of the matrix-product
class, from :class:`torch.utils.flop_counter.FlopCounterMode`).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..layers import build_mixer, get_mixer_info
from ..layers.registry import accepted_options
from ..layers.base import ProjectedMixer
from .environment import parse_dtype

KINDS = ("op", "layer", "nar", "ar")
MODES = ("fwd", "fwdbwd")


@dataclass
class Workload:
    kind: str
    mixer: str
    batch: int
    length: int
    heads: int
    head_dim: int
    mode: str = "fwd"
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = False
    options: dict = field(default_factory=dict)
    layers: int = 2
    mlp_ratio: int = 4
    seed: int = 0
    padding: float = 0.0

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def padding_mask(batch: int, length: int, padding: float, device=None) -> torch.Tensor | None:
    """Boolean ``[batch, length]`` mask (True = real) whose rows each end in ``round(padding * length)``
    padded positions, at least one position kept real; None for ``padding == 0``."""
    check_padding(padding)
    if padding == 0:
        return None
    real = max(1, length - round(padding * length))
    return (torch.arange(length, device=device) < real).expand(batch, length)


def check_padding(padding) -> None:
    if isinstance(padding, bool) or not isinstance(padding, (int, float)) or not 0 <= padding < 1:
        raise ValueError(f"padding is the fraction of positions padded, in [0, 1); got {padding!r}")


def options_for(name: str, wanted: dict) -> dict:
    """The subset of ``wanted`` options that mixer ``name`` takes (all of them when unknown)."""
    known = accepted_options(name)
    if known is None:
        return dict(wanted)
    return {k: v for k, v in wanted.items() if k in known}


def has_head_op(cls: type) -> bool:
    """Whether a mixer class has its own per-head op (``mix_heads`` on ``[B, T, H, D]``): a
    ProjectedMixer that implements it (ABC, for one, mixes whole tokens and has none)."""
    return isinstance(cls, type) and issubclass(cls, ProjectedMixer) and cls.mix_heads is not ProjectedMixer.mix_heads


def build_for_length(name: str, *, dim: int, heads: int, causal: bool, options: dict, length: int) -> nn.Module:
    """Build mixer ``name``; mixers whose maximum length is an option get ``length`` there."""
    caps = get_mixer_info(name).capabilities
    opts = dict(options)
    if caps.max_length_option and caps.max_length_option not in opts:
        opts[caps.max_length_option] = length
    return build_mixer(name, dim=dim, heads=heads, causal=causal, **opts)


class DecoderStack(nn.Module):
    """``layers`` pre-norm residual blocks ``x + mixer(LN(x))``, ``x + MLP(LN(x))`` and a final LN.

    The mixers come from the registry by name. With a causal recurrent mixer, :meth:`step`
    decodes one position at a time and gives the same numbers as :meth:`forward`.
    """

    def __init__(self, mixer: str, *, dim: int, heads: int, layers: int = 2, mlp_ratio: int = 4,
                 causal: bool = False, options: dict | None = None, length: int = 1):
        super().__init__()
        self.mixers = nn.ModuleList(
            build_for_length(mixer, dim=dim, heads=heads, causal=causal, options=options or {}, length=length)
            for _ in range(layers))
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
            for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mixer, n1, n2, mlp in zip(self.mixers, self.norms1, self.norms2, self.mlps):
            x = x + mixer(n1(x))
            x = x + mlp(n2(x))
        return self.final_norm(x)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> list:
        return [m.init_state(batch_size, device=device, dtype=dtype) for m in self.mixers]

    def step(self, x_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        new_state = []
        for mixer, n1, n2, mlp, s in zip(self.mixers, self.norms1, self.norms2, self.mlps, state):
            y, s = mixer.step(n1(x_t), s)
            x_t = x_t + y
            x_t = x_t + mlp(n2(x_t))
            new_state.append(s)
        return self.final_norm(x_t), new_state


def generate_autoregressive(model: DecoderStack, start: torch.Tensor, length: int) -> torch.Tensor:
    """Produce ``length`` positions one step at a time, each output fed back as the next input
    (continuous tokens, as a spectrogram decoder does). ``start`` is ``[B, E]``; returns ``[B, length, E]``."""
    state = model.init_state(start.shape[0], device=start.device, dtype=start.dtype)
    x_t = start
    outputs = []
    for _ in range(length):
        x_t, state = model.step(x_t, state)
        outputs.append(x_t)
    return torch.stack(outputs, dim=1)


def make_callable(w: Workload) -> tuple[Callable[[], Any], dict]:
    """Build inputs and model for ``w``; return the call to measure and facts about it
    (``io_bytes``: bytes of inputs plus outputs, the least a call must move)."""
    if w.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {w.kind!r}")
    if w.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {w.mode!r}")
    device = torch.device(w.device)
    dtype = parse_dtype(w.dtype)
    torch.manual_seed(w.seed)
    gen = torch.Generator(device="cpu").manual_seed(w.seed)

    def randn(*shape, grad=False):
        t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    B, T, H, D, E = w.batch, w.length, w.heads, w.head_dim, w.dim
    elem = torch.empty((), dtype=dtype).element_size()
    check_padding(w.padding)
    if w.padding and w.kind not in ("op", "layer"):
        raise ValueError(f"padding applies to the 'op' and 'layer' workloads, not {w.kind!r}")
    if w.kind in ("op", "layer"):
        mixer = build_for_length(w.mixer, dim=E, heads=H, causal=w.causal, options=w.options, length=T)
        mixer = mixer.to(device=device, dtype=dtype).eval()
        mask = padding_mask(B, T, w.padding, device)
        if mask is not None and not mixer.capabilities.padding:
            raise ValueError(f"mixer {w.mixer!r} does not take padding masks (capability 'padding')")
        if w.kind == "op":
            if not has_head_op(type(mixer)):
                raise ValueError(f"mixer {w.mixer!r} has no per-head op (it mixes whole tokens); use level 'layer'")
            inputs = [randn(B, T, H, D, grad=True) for _ in range(3)]

            def forward():
                return mixer.mix_heads(inputs[0], inputs[1], inputs[2], mask, mask)

            out_numel = B * T * H * D
        else:
            inputs = [randn(B, T, E, grad=True)]

            def forward():
                return mixer(inputs[0], x_mask=mask)

            out_numel = B * T * E
        params = [p for p in mixer.parameters() if p.requires_grad]
        in_bytes = sum(t.numel() for t in inputs) * elem
        param_bytes = sum(p.numel() for p in params) * elem
        if w.mode == "fwd":
            def fn():
                with torch.no_grad():
                    return forward()

            io_bytes = in_bytes + out_numel * elem + (param_bytes if w.kind == "layer" else 0)
        else:
            grad_out = randn(*((B, T, H, D) if w.kind == "op" else (B, T, E)))
            targets = inputs + params

            def fn():
                return torch.autograd.grad(forward(), targets, grad_out, allow_unused=True)

            # read inputs, write output, read its gradient, write input gradients (+ params, their grads)
            io_bytes = 2 * in_bytes + 2 * out_numel * elem + (2 * param_bytes if w.kind == "layer" else 0)
        return fn, {"io_bytes": io_bytes}

    # generation
    model = DecoderStack(w.mixer, dim=E, heads=H, layers=w.layers, mlp_ratio=w.mlp_ratio, causal=w.causal,
                         options=w.options, length=T).to(device=device, dtype=dtype).eval()
    if w.kind == "nar":
        x = randn(B, T, E)

        def fn():
            with torch.no_grad():
                return model(x)
    else:
        start = randn(B, E)

        def fn():
            with torch.no_grad():
                return generate_autoregressive(model, start, T)

    return fn, {"io_bytes": 2 * B * T * E * elem}


# -- what one call does -----------------------------------------------------------------------------

ATEN_PREFIX = "aten::"


@contextmanager
def _stderr_silenced():
    """Point file descriptor 2 at the null device for the block: the profiler's C++ library
    (kineto) logs every start and stop there, past Python's ``sys.stderr``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def count_aten_calls(fn: Callable[[], Any], *, warmup: bool = True) -> int:
    """ATen operator calls of one ``fn()``.

    The call runs under :func:`torch.profiler.profile` (CPU activity: operators are recorded on
    the host, for CPU and GPU tensors alike, on every thread, the autograd engine's included) and
    every recorded event whose name starts with ``aten::`` counts, top-level and nested alike:
    ``aten::linear`` and the ``aten::t`` and ``aten::addmm`` it calls are three calls. With
    ``warmup``, ``fn`` is called once first, outside the profiler.
    """
    from torch.profiler import ProfilerActivity, profile

    if warmup:
        fn()
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith(ATEN_PREFIX))


def _sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def extra_flop_formulas() -> dict:
    """FLOP formulas that torch's counter lacks: the CPU kernels of ``scaled_dot_product_attention``
    (``_scaled_dot_product_flash_attention_for_cpu`` and its backward), counted as torch counts its
    GPU attention kernels (the two products of the forward, five of the backward, causal masks not
    discounted). A formula torch itself registers is left to torch."""
    from torch.utils.flop_counter import flop_registry

    table = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flop)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            table[op] = formula
    return table


class _GlobalTotalOnly:
    """Stands in for the module tracker of :class:`~torch.utils.flop_counter.FlopCounterMode`, so
    that every count goes to the global total only. The tracker hooks the inputs of every module
    for the backward pass, which ``torch.autograd.grad`` refuses on leaf inputs (the layer-level
    workloads), and a per-module breakdown is not needed here."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def count_flops(fn: Callable[[], Any], *, warmup: bool = True) -> int:
    """Floating-point operations of one ``fn()``, counted by
    :class:`torch.utils.flop_counter.FlopCounterMode` with :func:`extra_flop_formulas`.

    Only the matrix-product class is counted (``mm``, ``bmm``, ``addmm``, ``baddbmm``, the attention
    kernels of ``scaled_dot_product_attention``, convolutions): a product of ``[m, k]`` by ``[k, n]``
    is ``2 m k n``. Elementwise work (softmax, exponentials, additions, normalisation, reductions)
    is not counted. With ``warmup``, ``fn`` is called once first, outside the counter.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if warmup:
        fn()
    counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalTotalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())
