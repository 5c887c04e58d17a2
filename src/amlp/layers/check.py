"""The correctness gate: a mixer's fast path against its plain reference on a small input."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import build_mixer, get_mixer_info


@dataclass
class CheckResult:
    name: str
    passed: bool
    max_abs_error: float
    message: str = ""


def check_mixer(name: str, *, dim: int = 24, heads: int = 3, length: int = 13, batch: int = 2,
                tolerance: float = 1e-8, seed: int = 0, **options) -> CheckResult:
    """Run mixer ``name`` and its reference in float64 on a small random input (with padding where
    the mixer supports it) and compare outputs and input gradients."""
    info = get_mixer_info(name)
    caps = info.capabilities
    gen = torch.Generator().manual_seed(seed)
    try:
        torch.manual_seed(seed)
        mixer = build_mixer(name, dim=dim, heads=heads, causal=not caps.noncausal, **options).double().eval()
        x = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
        mask = None
        if caps.padding and batch > 1:
            mask = torch.ones(batch, length, dtype=torch.bool)
            mask[-1, length - max(1, length // 3):] = False
        fast = mixer(x, x_mask=mask)
        (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
        ref = mixer.reference(x, x_mask=mask)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    except Exception as exc:  # the gate reports any failure rather than crashing the caller
        return CheckResult(name, False, float("nan"), f"{type(exc).__name__}: {exc}")
    if mask is not None:
        keep = mask[:, :, None]
        fast, ref = fast * keep, ref * keep
    err = max((fast - ref).abs().max().item(), (g_fast - g_ref).abs().max().item())
    scale = max(1.0, ref.abs().max().item())
    ok = bool(torch.isfinite(fast).all()) and err <= tolerance * scale
    return CheckResult(name, ok, err, "" if ok else f"max abs error {err:.3g} > {tolerance:g}")
