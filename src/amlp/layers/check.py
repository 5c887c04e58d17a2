"""The correctness gate: a mixer's fast path against its plain reference on a small input."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import build_mixer, choice_options, get_mixer_info


@dataclass
class CheckResult:
    name: str
    passed: bool
    max_abs_error: float
    message: str = ""


def _runs(name: str, options: dict, forms: list[bool] | None = None) -> list[tuple[bool, dict]]:
    """The (causal, options) runs of a check: every form the mixer has (or ``forms``), each with every
    choice of an option without a default (AMLP's ``form``) that ``options`` does not fix."""
    caps = get_mixer_info(name).capabilities
    if forms is None:
        forms = [c for c, has in ((False, caps.noncausal), (True, caps.causal)) if has]
    missing = [o for o, _ in caps.choices if o not in options]
    runs = []
    for causal in forms:
        combos = [{k: v for k, v in c.items() if k in missing} for c in choice_options(name, causal=causal)] \
            if missing else [{}]
        runs += [(causal, combo) for combo in combos]
    return runs


def randomise_affine_parameters(module: torch.nn.Module, generator: torch.Generator | None = None,
                                scale: float = 0.5) -> torch.nn.Module:
    """Give every bias and every normalisation's scale and shift random values (in place), as training
    would: with the zero biases and unit scales of initialisation, a padded token (zeroed by the
    layer) projects to zero queries, keys and values, and a mixer built from sums would look right
    whether or not its padding mask reached the op."""
    with torch.no_grad():
        for mod in module.modules():
            is_norm = isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm))
            for pname, p in mod.named_parameters(recurse=False):
                if pname == "bias" or (is_norm and pname == "weight"):
                    noise = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                    p.copy_((1.0 if is_norm and pname == "weight" else 0.0) + scale * noise)
    return module


def check_mixer(name: str, *, dim: int = 24, heads: int = 3, length: int = 13, batch: int = 2,
                tolerance: float = 1e-8, seed: int = 0, **options) -> CheckResult:
    """Run mixer ``name`` and its reference in float64 on a small random input (with padding where
    the mixer supports it) and compare the outputs at every position (padded ones included: the
    reference defines them too), the input gradient and every parameter gradient.

    Every form the mixer has is checked (non-causal and causal) unless ``causal`` is given in
    ``options``, and every choice of an option without a default (AMLP's ``form``) that is not given.
    """
    info = get_mixer_info(name)
    caps = info.capabilities
    forms = [bool(options.pop("causal"))] if "causal" in options else None
    worst = 0.0
    for causal, combo in _runs(name, options, forms):
        label = ", ".join([f"{k}={v}" for k, v in combo.items()] + ["causal" if causal else "non-causal"])
        gen = torch.Generator().manual_seed(seed)
        try:
            torch.manual_seed(seed)
            mixer = build_mixer(name, dim=dim, heads=heads, causal=causal, **options, **combo).double().eval()
            randomise_affine_parameters(mixer, gen)
            x = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
            mask = None
            if caps.padding and batch > 1:
                mask = torch.ones(batch, length, dtype=torch.bool)
                mask[-1, length - max(1, length // 3):] = False
            params = [p for p in mixer.parameters() if p.requires_grad]
            fast = mixer(x, x_mask=mask)
            weights = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
            g_fast = torch.autograd.grad((fast * weights).sum(), [x] + params, allow_unused=True)
            ref = mixer.reference(x, x_mask=mask)
            g_ref = torch.autograd.grad((ref * weights).sum(), [x] + params, allow_unused=True)
        except Exception as exc:  # the gate reports any failure rather than crashing the caller
            return CheckResult(name, False, float("nan"), f"{label}: {type(exc).__name__}: {exc}")
        names = ["input"] + [n for n, p in mixer.named_parameters() if p.requires_grad]
        errors = {"output": (fast - ref).abs().max().item()}
        for n, a, b in zip(names, g_fast, g_ref):
            if (a is None) != (b is None):
                return CheckResult(name, False, float("nan"),
                                   f"{label}: the gradient of {n} exists in one path only")
            if a is not None:
                errors[f"gradient of {n}"] = (a - b).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        what, err = max(errors.items(), key=lambda kv: kv[1] if kv[1] == kv[1] else float("inf"))
        finite = bool(torch.isfinite(fast).all()) and all(e == e for e in errors.values())
        if not finite or err > tolerance * scale:
            return CheckResult(name, False, err, f"{label}: max abs error {err:.3g} > {tolerance:g} ({what})"
                               if finite else f"{label}: non-finite output or gradient")
        worst = max(worst, err)
    return CheckResult(name, True, worst, "")


#: largest relative errors allowed of a half-precision run against float32. bfloat16 keeps 8 bits
#: of mantissa (about 0.4 % per rounding, a few percent through a layer); the input gradient of a
#: mixer with ReLU-type kinks differs more, since a rounding flips the side of a pre-activation
#: near zero (HyperMLP's ReLU, LARA's sampling weights: 10-30 % on small inputs), so its bound only
#: catches gross errors (a wrong dtype path, an overflow)
LOW_PRECISION_TOLERANCE = {"output": 0.05, "input gradient": 0.5}


def check_mixer_precision(name: str, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                          dim: int = 64, heads: int = 4, length: int = 257, batch: int = 2,
                          tolerance: dict | None = None, seed: int = 0, **options) -> CheckResult:
    """Run mixer ``name`` on ``device`` in ``dtype`` (bfloat16 by default) and compare it with the same
    mixer, same parameters and same input in float32 on that device: the output at the real
    positions and the input gradient, each as a relative error ``||low - float32|| / ||float32||``.
    Every form is checked as in :func:`check_mixer`; padding is used where the mixer supports it.
    The float32 path itself is held against the float64 reference by :func:`check_mixer`.
    ``tolerance`` maps ``output`` and ``input gradient`` to their bounds
    (:data:`LOW_PRECISION_TOLERANCE` by default). The result's error is the largest relative error.
    """
    tolerance = {**LOW_PRECISION_TOLERANCE, **(tolerance or {})}
    info = get_mixer_info(name)
    caps = info.capabilities
    device = torch.device(device)
    length = min(length, caps.max_length) if caps.max_length else length
    worst = 0.0
    for causal, combo in _runs(name, options):
        label = ", ".join([f"{k}={v}" for k, v in combo.items()] + ["causal" if causal else "non-causal"])
        gen = torch.Generator().manual_seed(seed)
        try:
            torch.manual_seed(seed)
            extra = {"max_length": length} if caps.max_length_option else {}
            full = build_mixer(name, dim=dim, heads=heads, causal=causal, **extra, **options, **combo)
            full = full.to(device).eval()
            half = build_mixer(name, dim=dim, heads=heads, causal=causal, **extra, **options, **combo)
            half.load_state_dict(full.state_dict())
            half = half.to(device=device, dtype=dtype).eval()
            x = torch.randn(batch, length, dim, generator=gen).to(device)
            mask = None
            if caps.padding and batch > 1:
                mask = torch.ones(batch, length, dtype=torch.bool, device=device)
                mask[-1, length - max(1, length // 3):] = False
            outs, grads = [], []
            for mixer, xin in ((full, x), (half, x.to(dtype))):
                xin = xin.detach().requires_grad_(True)
                y = mixer(xin, x_mask=mask)
                weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
                (g,) = torch.autograd.grad((y.float() * weights).sum(), [xin])
                outs.append(y.float())
                grads.append(g.float())
        except Exception as exc:  # reported, not raised
            return CheckResult(name, False, float("nan"), f"{label}: {type(exc).__name__}: {exc}")
        keep = (slice(None),) if mask is None else (mask,)
        errors = {}
        for what, (a, b) in (("output", outs), ("input gradient", grads)):
            a, b = a[keep], b[keep]
            if not bool(torch.isfinite(b).all()):
                return CheckResult(name, False, float("nan"), f"{label}: non-finite {what} in {dtype}")
            errors[what] = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a).clamp_min(1e-12)).item()
        for what, err in errors.items():
            if err > tolerance[what]:
                return CheckResult(name, False, err,
                                   f"{label}: relative error of the {what} {err:.3g} > {tolerance[what]:g}")
        worst = max(worst, *errors.values())
    return CheckResult(name, True, worst, "")
