"""``amlp bench step``: the cost of one recurrent step at different positions.

A recurrent mixer with a constant-size state (CausalRN, causal AMLP-Cov, Performer, ...) should
cost the same per token at t = 100 and at t = 10,000; one with a growing cache (softmax attention,
quadratic CausalRN, HyperMLP) costs more as t grows. For each mixer and position t the mixer is
advanced through t tokens with its own ``step`` (not timed), then ``steps`` further steps are timed
together (``time.perf_counter``, CUDA synchronised) and the mean per step is reported, under
``torch.no_grad()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..layers import build_mixer, get_mixer_info
from .workloads import options_for
from .environment import invocation, machine_header, parse_dtype, resolve_device

STEP_COLUMNS = ["mixer", "status", "message", "position", "seconds_per_step", "ratio_to_first_position",
                "state_floats", "dim", "heads", "batch", "dtype", "device"]


@dataclass
class StepSettings:
    mixers: list[str] = field(default_factory=lambda: ["softmax", "causal-rn", "amlp-cov"])
    positions: list[int] = field(default_factory=lambda: [100, 10_000])
    steps: int = 50
    batch: int = 1
    dim: int = 256
    heads: int = 4
    dtype: str = "float32"
    device: str = "auto"
    threads: int = 0
    options: dict = field(default_factory=dict)
    #: AMLP's form (AMLP has no default form): the one measured
    form: str = "stable"

    def validate(self) -> None:
        if not self.mixers:
            raise ValueError("no mixers to measure")
        for name in ("steps", "batch", "dim", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads, got dim={self.dim}, heads={self.heads}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        resolve_device(self.device)
        for name in self.mixers:
            caps = get_mixer_info(name).capabilities  # raises for an unknown name
            if not (caps.causal and caps.recurrent):
                raise ValueError(f"mixer {name!r} has no recurrent step (capability 'recurrent')")
        if not self.positions or min(self.positions) < 0:
            raise ValueError(f"positions must be non-negative integers, got {self.positions}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        parse_dtype(self.dtype)
        from .ops import _check_form

        _check_form(self.form)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(settings: StepSettings, progress=None) -> tuple[dict, list[dict]]:
    """Measure every (mixer, position); returns ``(header, rows)``."""
    settings.validate()
    device = resolve_device(settings.device)
    dtype = parse_dtype(settings.dtype)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    header = {**machine_header(device), "torch_threads": torch.get_num_threads(), "command": invocation("step"),
              "settings": {k: v for k, v in settings.__dict__.items()}}
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name in settings.mixers:
        torch.manual_seed(0)
        options = {**options_for(name, {"form": settings.form}), **settings.options.get(name, {})}
        mixer = build_mixer(name, dim=settings.dim, heads=settings.heads, causal=True,
                            **options).to(device=device, dtype=dtype).eval()
        first = None
        for position in sorted(settings.positions):
            row = {"mixer": name, "position": position, "dim": settings.dim, "heads": settings.heads,
                   "batch": settings.batch, "dtype": settings.dtype, "device": str(device), "status": "ok",
                   "message": ""}
            try:
                with torch.no_grad():
                    state = mixer.init_state(settings.batch, device=device, dtype=dtype)
                    tokens = torch.randn(position + settings.steps, settings.batch, settings.dim, generator=gen)
                    tokens = tokens.to(device=device, dtype=dtype)
                    for t in range(position):
                        _, state = mixer.step(tokens[t], state)
                    _sync(device)
                    start = time.perf_counter()
                    for t in range(position, position + settings.steps):
                        _, state = mixer.step(tokens[t], state)
                    _sync(device)
                    per_step = (time.perf_counter() - start) / settings.steps
                row["seconds_per_step"] = per_step
                first = per_step if first is None else first
                row["ratio_to_first_position"] = per_step / first
                row["state_floats"] = mixer.state_size(position + settings.steps)
            except Exception as exc:  # reported in the row, the sweep goes on
                row.update(status="error", message=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            if progress is not None:
                progress(f"{name} t={position}")
    return header, rows
