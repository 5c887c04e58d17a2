"""``amlp bench generation``: the efficiency study of the AMLP paper (Jiang et al. 2023, section 3.4
and Appendix G): time and memory to produce ``n`` tokens

* **AR**: a causal decoder stack with softmax attention and a key/value cache, one token per step;
* **NAR**: one non-autoregressive pass of the same stack with (non-causal) softmax attention;
* **NAR-AMLP**: one pass with AMLP-Cov / AMLP-PQuery (``c = 64``, ReLU as sigma_1, as in the paper).

The paper plots each method's time and memory as a ratio to AR on a log scale, and quotes two
figures at 8,192 tokens: NAR is 116x and NAR-AMLP 590x faster than AR, and NAR-AMLP uses 89% less
memory than NAR. The paper simulates "a single efficient module"; ``layers=1`` comes closest, the
default stack adds a second layer and the position-wise MLPs of a real decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..layers import get_mixer_info
from ..layers.check import check_mixer
from .environment import check_timing_settings, invocation, machine_header, parse_dtype, resolve_device
from .memory import PeakMeter
from .ops import _check_form, gate_kwargs
from .timing import measure_time
from .workloads import DecoderStack, Workload, generate_autoregressive, make_callable, options_for

DEFAULT_NAR_MIXERS = ("softmax", "amlp-cov", "amlp-pquery")
GEN_COLUMNS = ["method", "mixer", "status", "message", "length", "batch", "dim", "heads", "layers", "dtype",
               "device", "time_s", "time_iqr_s", "runs", "peak_bytes", "time_ratio_to_ar", "speedup_vs_ar",
               "memory_ratio_to_ar", "memory_saving_vs_nar"]


@dataclass
class GenerationSettings:
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192])
    batch: int = 0  # 0: 12 on GPU, 2 on CPU
    dim: int = 512
    heads: int = 8
    layers: int = 2
    mlp_ratio: int = 4
    ar_mixer: str = "softmax"
    nar_mixers: list[str] = field(default_factory=lambda: list(DEFAULT_NAR_MIXERS))
    nar_baseline: str = "softmax"
    landmarks: int = 64
    #: AMLP's form (AMLP has no default form; the benchmark measures this one, and timing differs
    #: little between forms)
    form: str = "stable"
    activation: str = "relu"
    dtype: str = "float32"
    device: str = "auto"
    min_run_time: float = 1.0
    memory: bool = True
    threads: int = 0
    seed: int = 0

    def resolved_batch(self, device: torch.device) -> int:
        if self.batch:
            return self.batch
        return 12 if device.type == "cuda" else 2

    def validate(self) -> None:
        for name in ("dim", "heads", "layers", "mlp_ratio", "landmarks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads, got dim={self.dim}, heads={self.heads}")
        if not self.lengths:
            raise ValueError("no lengths to measure")
        _check_form(self.form)
        info = get_mixer_info(self.ar_mixer)
        if not (info.capabilities.causal and info.capabilities.recurrent):
            raise ValueError(f"the AR mixer must have a causal recurrent step; {self.ar_mixer!r} does not")
        for name in self.nar_mixers:
            if not get_mixer_info(name).capabilities.noncausal:
                raise ValueError(f"NAR mixer {name!r} has no non-causal form")
        parse_dtype(self.dtype)
        resolve_device(self.device)
        check_timing_settings(self.threads, self.min_run_time)
        from ..ops._common import check_activation

        check_activation(self.activation)


@dataclass
class GenerationResult:
    header: dict
    rows: list[dict]
    headline: list[dict]


def method_label(mixer: str, baseline: str) -> str:
    return "NAR" if mixer == baseline else f"NAR {mixer}"


def _step_matches_forward(settings: GenerationSettings) -> tuple[bool, str]:
    """The AR path's gate: step-by-step decoding equals the causal forward pass (float64, tiny)."""
    try:
        torch.manual_seed(settings.seed)
        model = DecoderStack(settings.ar_mixer, dim=2 * settings.heads, heads=settings.heads, layers=2,
                             causal=True, length=7).double().eval()
        x = torch.randn(2, 7, 2 * settings.heads, dtype=torch.float64)
        with torch.no_grad():
            full = model(x)
            state = model.init_state(2, dtype=torch.float64)
            steps = []
            for t in range(7):
                y, state = model.step(x[:, t], state)
                steps.append(y)
        err = (torch.stack(steps, 1) - full).abs().max().item()
        if not err <= 1e-8:
            return False, f"step() differs from forward() by {err:.3g}"
        model.eval()
        generate_autoregressive(model, x[:, 0], 3)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def run_generation(settings: GenerationSettings, *, progress: Callable[[str], None] | None = None,
                   total: Callable[[int], None] | None = None) -> GenerationResult:
    settings.validate()
    device = resolve_device(settings.device)
    batch = settings.resolved_batch(device)
    threads = settings.threads or torch.get_num_threads()
    tick = progress or (lambda _desc: None)
    plan = [("AR", settings.ar_mixer, "ar")] + [
        (method_label(m, settings.nar_baseline), m, "nar") for m in settings.nar_mixers]
    if total is not None:
        total(len(plan) * (1 + len(settings.lengths)))
    header = {**machine_header(device), "torch_threads": threads, "command": invocation("generation"),
              "settings": {**asdict(settings), "batch": batch, "device": str(device)},
              "memory_method": ("not measured" if not settings.memory else
                                "torch.cuda.max_memory_allocated minus allocated before the call" if device.type == "cuda"
                                else "fresh child process per point: VmHWM after the call minus VmRSS before it")}
    wanted = {"landmarks": settings.landmarks, "activation": settings.activation, "form": settings.form}
    rows = []
    with PeakMeter(threads) as meter:
        for method, mixer, kind in plan:
            options = {} if kind == "ar" else options_for(mixer, wanted)
            if kind == "ar":
                res = check_mixer(mixer, **gate_kwargs(mixer))
                ok, message = res.passed, res.message
                if ok:
                    ok, message = _step_matches_forward(settings)
            else:
                res = check_mixer(mixer, **gate_kwargs(mixer), **options)
                ok, message = res.passed, res.message
            tick(f"{method}: correctness check")
            for n in settings.lengths:
                row = {"method": method, "mixer": mixer, "status": "ok" if ok else "failed",
                       "message": "" if ok else f"correctness check failed: {message}", "length": n,
                       "batch": batch, "dim": settings.dim, "heads": settings.heads, "layers": settings.layers,
                       "dtype": settings.dtype, "device": str(device)}
                if ok:
                    w = Workload(kind=kind, mixer=mixer, batch=batch, length=n, heads=settings.heads,
                                 head_dim=settings.dim // settings.heads, dtype=settings.dtype, device=str(device),
                                 causal=(kind == "ar"), options=options, layers=settings.layers,
                                 mlp_ratio=settings.mlp_ratio, seed=settings.seed)
                    try:
                        fn, _ = make_callable(w)
                        t = measure_time(fn, min_run_time=settings.min_run_time, threads=threads)
                        del fn
                        row.update(time_s=t.median, time_iqr_s=t.iqr, runs=t.runs)
                        if settings.memory:
                            row["peak_bytes"] = meter.measure(w)
                    except Exception as exc:
                        row.update(status="error", message=f"{type(exc).__name__}: {exc}")
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                rows.append(row)
                tick(f"{method} n={n}")
    _add_ratios(rows, settings.nar_baseline)
    rows = [{c: r.get(c) for c in GEN_COLUMNS} for r in rows]
    return GenerationResult(header, rows, headline_figures(rows))


def _add_ratios(rows: list[dict], nar_baseline: str) -> None:
    ar = {r["length"]: r for r in rows if r["method"] == "AR"}
    nar = {r["length"]: r for r in rows if r["method"] == "NAR"}
    for r in rows:
        a = ar.get(r["length"], {})
        t, ta = r.get("time_s"), a.get("time_s")
        if t and ta:
            r["time_ratio_to_ar"] = t / ta
            r["speedup_vs_ar"] = ta / t
        m, ma = r.get("peak_bytes"), a.get("peak_bytes")
        if m is not None and ma:
            r["memory_ratio_to_ar"] = m / ma
        mn = nar.get(r["length"], {}).get("peak_bytes")
        if r["method"].startswith("NAR") and m is not None and mn:
            r["memory_saving_vs_nar"] = 1.0 - m / mn


def headline_figures(rows: list[dict]) -> list[dict]:
    """At the longest length measured by every method: each NAR method's speed-up over AR and its
    memory saving against NAR (the paper: 116x, 590x and 89% at 8,192 tokens)."""
    out = []
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "AR"]
    for method in methods:
        good = [r for r in rows if r["method"] == method and r.get("speedup_vs_ar")]
        if not good:
            out.append({"method": method, "length": None, "speedup_vs_ar": None, "memory_saving_vs_nar": None})
            continue
        r = max(good, key=lambda r: r["length"])
        out.append({"method": method, "length": r["length"], "speedup_vs_ar": r["speedup_vs_ar"],
                    "memory_saving_vs_nar": r.get("memory_saving_vs_nar")})
    return out


PAPER_HEADLINE = {"length": 8192, "NAR speedup_vs_ar": 116.0, "NAR-AMLP speedup_vs_ar": 590.0,
                  "NAR-AMLP memory_saving_vs_nar": 0.89}
