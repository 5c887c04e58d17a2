"""``amlp bench ops``: time and peak memory of registered mixers over a length sweep.

Every mixer first passes the correctness gate (:func:`amlp.layers.check.check_mixer`, its fast path
against its plain reference on a small float64 input); a mixer that fails is reported as failed and
gets no speed figure. See :mod:`amlp.bench.memory` for how peak memory is measured.

With ``counts`` (the default), every measured point also gets the ATen operator calls and the
matrix-product FLOPs of one call (:func:`~amlp.bench.workloads.count_aten_calls`,
:func:`~amlp.bench.workloads.count_flops`), counted in separate calls after the timing (never under
the timer), and its fraction of the machine's matrix-multiply rate, measured once per run
(:func:`~amlp.bench.environment.measure_matmul_rate`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..layers import get_mixer_info
from ..layers.check import check_mixer
from .analysis import crossover_length, floor_time
from .environment import (check_timing_settings, invocation, machine_header, measure_bandwidth, measure_matmul_rate,
                          parse_dtype, resolve_device, torch_threads)
from .memory import PeakMeter
from .timing import measure_time
from .workloads import (MODES, Workload, check_padding, count_aten_calls, count_flops, has_head_op, make_callable,
                        options_for)

DEFAULT_MIXERS = ("softmax", "amlp-cov", "amlp-pquery")
DEFAULT_LENGTHS = "256:8192"
LEVELS = ("op", "layer")
METRICS = {  # crossover metric -> row column
    "fwd time": "fwd_time_s",
    "fwd+bwd time": "fwdbwd_time_s",
    "fwd memory": "fwd_peak_bytes",
    "fwd+bwd memory": "fwdbwd_peak_bytes",
}

#: row columns, in order (the CSV/JSON schema)
OPS_COLUMNS = [
    "mixer", "status", "message", "level", "causal", "length", "batch", "padding", "heads", "head_dim", "landmarks",
    "dtype", "device",
    "fwd_time_s", "fwd_time_iqr_s", "fwd_runs", "fwdbwd_time_s", "fwdbwd_time_iqr_s", "fwdbwd_runs",
    "fwd_peak_bytes", "fwdbwd_peak_bytes", "fwd_first_peak_bytes", "fwdbwd_first_peak_bytes",
    "fwd_speedup_vs_baseline", "fwdbwd_speedup_vs_baseline",
    "fwd_memory_ratio_vs_baseline", "fwdbwd_memory_ratio_vs_baseline",
    "fwd_first_memory_ratio_vs_baseline", "fwdbwd_first_memory_ratio_vs_baseline",
    "fwd_floor_s", "fwdbwd_floor_s", "fwd_x_floor", "fwdbwd_x_floor",
    "fwd_aten_calls", "fwdbwd_aten_calls", "fwd_flops", "fwdbwd_flops", "fwd_peak_fraction", "fwdbwd_peak_fraction",
]
CROSSOVER_COLUMNS = ["mixer", "baseline", "metric", "status", "length"]


def _check_form(form: str) -> None:
    from ..ops.amlp import FORMS

    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")


@dataclass
class OpsSettings:
    mixers: list[str] = field(default_factory=lambda: list(DEFAULT_MIXERS))
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192])
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    landmarks: int = 16
    #: AMLP's form (AMLP has no default form; the benchmark measures this one, and timing differs
    #: little between forms)
    form: str = "stable"
    dtype: str = "float32"
    device: str = "auto"
    level: str = "op"
    causal: bool = False
    #: fraction of each row's positions that are padding (its last ones), masked out through the
    #: mixer's masks: what masking costs each mixer (0: no masks passed)
    padding: float = 0.0
    #: mixer the others are compared with (added to ``mixers`` when missing); "" or "none": no comparison
    baseline: str = "softmax"
    min_run_time: float = 1.0
    memory: bool = True
    threads: int = 0  # 0: torch's default
    bandwidth_mb: int = 256
    #: count ATen operator calls and FLOPs of every point and its fraction of the matmul rate
    counts: bool = True
    #: side of the square matrices of the matmul-rate measurement
    matmul_size: int = 2048
    seed: int = 0

    def validate(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        for name in ("batch", "heads", "head_dim", "landmarks", "bandwidth_mb", "matmul_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.mixers:
            raise ValueError("no mixers to measure")
        _check_form(self.form)
        if not self.lengths:
            raise ValueError("no lengths to measure")
        if self.baseline in ("", "none"):
            self.baseline = ""
        for name in self.mixers + ([self.baseline] if self.baseline else []):
            get_mixer_info(name)  # raises ValueError naming the registered mixers
        check_padding(self.padding)
        parse_dtype(self.dtype)
        resolve_device(self.device)
        check_timing_settings(self.threads, self.min_run_time)


@dataclass
class OpsResult:
    header: dict
    rows: list[dict]
    crossovers: list[dict]


def _nan_if_none(x):
    return math.nan if x is None else x


def run_ops(settings: OpsSettings, *, progress: Callable[[str], None] | None = None,
            total: Callable[[int], None] | None = None) -> OpsResult:
    """Measure every (mixer, length) point; ``progress(description)`` is called after each step."""
    settings.validate()
    if settings.baseline and settings.baseline not in settings.mixers:
        settings.mixers = [settings.baseline] + list(settings.mixers)  # speed-ups need the baseline
    device = resolve_device(settings.device)
    threads = settings.threads or torch.get_num_threads()
    tick = progress or (lambda _desc: None)
    steps = 1 + int(settings.counts) + len(settings.mixers) * (1 + len(settings.lengths) * len(MODES))
    if total is not None:
        total(steps)

    bandwidth = measure_bandwidth(device, settings.bandwidth_mb, min(0.5, settings.min_run_time), threads)
    tick("memory bandwidth")
    matmul_rate = None
    if settings.counts:
        matmul_rate = measure_matmul_rate(device, parse_dtype(settings.dtype), settings.matmul_size,
                                          min(0.5, settings.min_run_time), threads)
        tick("matmul rate")
    header = {**machine_header(device), "torch_threads": threads, "command": invocation("ops"),
              "settings": {**asdict(settings), "device": str(device)},
              "bandwidth_bytes_per_s": bandwidth,
              "matmul_flops_per_s": matmul_rate,
              "matmul_method": _matmul_method(settings),
              "counts_method": _counts_method(settings.counts),
              "memory_method": _memory_method(device, settings.memory)}

    rows: list[dict] = []
    with PeakMeter(threads) as meter:
        for name in settings.mixers:
            caps = get_mixer_info(name).capabilities
            causal = settings.causal or not caps.noncausal
            options = options_for(name, {"landmarks": settings.landmarks, "form": settings.form})
            level = _level_for(name, settings.level)
            base = {"mixer": name, "level": level, "causal": causal, "batch": settings.batch,
                    "padding": settings.padding,
                    "heads": settings.heads, "head_dim": settings.head_dim,
                    "landmarks": options.get("landmarks"), "dtype": settings.dtype, "device": str(device)}
            status, message = _gate(name, options, settings, causal)
            if status == "ok" and level != settings.level:
                message = LAYER_FALLBACK
            tick(f"{name}: correctness check")
            for length in settings.lengths:
                row = {**base, "length": length, "status": status, "message": message}
                if status == "ok":
                    # a maximum set by an option is built to each length (build_for_length); only a
                    # fixed maximum limits the lengths measured
                    if caps.max_length and not caps.max_length_option and length > caps.max_length:
                        row.update(status="skipped", message=f"longer than max length {caps.max_length}")
                    else:
                        _measure_point(row, name, options, settings, device, causal, threads, bandwidth,
                                       matmul_rate, meter, tick)
                        rows.append(row)
                        continue
                for _ in MODES:
                    tick(f"{name} T={length}")
                rows.append(row)

    _add_baseline_ratios(rows, settings.baseline)
    crossovers = crossovers_from_rows(rows, settings.baseline)
    rows = [{col: row.get(col) for col in OPS_COLUMNS} for row in rows]
    return OpsResult(header, rows, crossovers)


def _memory_method(device: torch.device, enabled: bool) -> str:
    if not enabled:
        return "not measured"
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus allocated before the call"
    return "fresh child process per point: VmHWM after the call minus VmRSS before it (clear_refs reset)"


def _matmul_method(settings: OpsSettings) -> str:
    if not settings.counts:
        return "not measured"
    n = settings.matmul_size
    return f"torch.mm of two {n}x{n} {settings.dtype} matrices, 2*{n}^3 FLOP / median time"


def _counts_method(enabled: bool) -> str:
    if not enabled:
        return "not counted"
    return ("one untimed call each after the timing: aten_calls = torch.profiler events named aten::* "
            "(nested included); flops = torch.utils.flop_counter.FlopCounterMode (matrix products only)")


def gate_kwargs(name: str) -> dict:
    """Sizes for the correctness check: its default length, or the mixer's maximum when shorter."""
    limit = get_mixer_info(name).capabilities.max_length
    return {"length": min(13, limit)} if limit else {}


#: the message of a mixer measured at layer level in an op-level sweep
LAYER_FALLBACK = "no per-head op (mixes whole tokens): measured at layer level, projections included"


def _level_for(name: str, level: str) -> str:
    """The level a mixer is measured at: the one asked for, or ``layer`` for a mixer without a
    per-head op in an op-level sweep (so every registered mixer gets a figure)."""
    return "layer" if level == "op" and not has_head_op(get_mixer_info(name).cls) else level


def _gate(name: str, options: dict, settings: OpsSettings, causal: bool) -> tuple[str, str]:
    info = get_mixer_info(name)
    if causal and not info.capabilities.causal:
        return "skipped", "no causal form"
    if settings.padding and not info.capabilities.padding:
        return "skipped", "takes no padding masks"
    result = check_mixer(name, **gate_kwargs(name), **options)
    if not result.passed:
        return "failed", f"correctness check against the reference failed: {result.message}"
    return "ok", ""


def _count_point(row: dict, mode: str, fn, matmul_rate: float | None) -> None:
    """ATen calls, FLOPs and fraction of the matmul rate of one call of ``fn``, counted in calls
    of their own (``fn`` has been called by the timing already, so no further warm-up is made)."""
    calls, flops = count_aten_calls(fn, warmup=False), count_flops(fn, warmup=False)
    row[f"{mode}_aten_calls"], row[f"{mode}_flops"] = calls, flops
    t = row.get(f"{mode}_time_s")
    if matmul_rate and t:
        row[f"{mode}_peak_fraction"] = flops / t / matmul_rate


def _measure_point(row, name, options, settings, device, causal, threads, bandwidth, matmul_rate, meter,
                   tick) -> None:
    messages = []
    for mode in MODES:
        w = Workload(kind=row["level"], mixer=name, batch=settings.batch, length=row["length"],
                     heads=settings.heads, head_dim=settings.head_dim, mode=mode, dtype=settings.dtype,
                     device=str(device), causal=causal, options=options, seed=settings.seed,
                     padding=settings.padding)
        try:
            fn, facts = make_callable(w)
            t = measure_time(fn, min_run_time=settings.min_run_time, threads=threads)
            row[f"{mode}_time_s"], row[f"{mode}_time_iqr_s"], row[f"{mode}_runs"] = t.median, t.iqr, t.runs
            row[f"{mode}_floor_s"] = floor_time(facts["io_bytes"], bandwidth)
            row[f"{mode}_x_floor"] = t.median / row[f"{mode}_floor_s"]
            if settings.counts:
                with torch_threads(threads):
                    _count_point(row, mode, fn, matmul_rate)
            del fn
            if settings.memory:
                both = meter.measure_both(w)
                if both is not None:
                    row[f"{mode}_peak_bytes"], row[f"{mode}_first_peak_bytes"] = both["steady"], both["first"]
        except Exception as exc:  # one bad point (out of memory, ...) must not end the sweep
            messages.append(f"{mode}: {type(exc).__name__}: {exc}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tick(f"{name} T={row['length']} {mode}")
    if messages:
        row["status"] = "error"
        row["message"] = "; ".join(messages)


def _add_baseline_ratios(rows: list[dict], baseline: str) -> None:
    if not baseline:
        return
    ref = {r["length"]: r for r in rows if r["mixer"] == baseline and r["status"] == "ok"}
    for row in rows:
        b = ref.get(row["length"])
        if b is None or row["status"] not in ("ok", "error") or row["level"] != b["level"]:
            continue  # no ratio between an op and a whole layer
        for mode in MODES:
            t, tb = row.get(f"{mode}_time_s"), b.get(f"{mode}_time_s")
            if t and tb:
                row[f"{mode}_speedup_vs_baseline"] = tb / t
            for kind in ("", "first_"):
                m, mb = row.get(f"{mode}_{kind}peak_bytes"), b.get(f"{mode}_{kind}peak_bytes")
                if m is not None and mb:
                    row[f"{mode}_{kind}memory_ratio_vs_baseline"] = m / mb


def crossovers_from_rows(rows: list[dict], baseline: str) -> list[dict]:
    """Crossover lengths of every measured mixer against ``baseline``, per metric."""
    if not baseline:
        return []
    ref = {r["length"]: r for r in rows if r["mixer"] == baseline}
    out = []
    names = []
    for r in rows:
        if r["mixer"] != baseline and r["mixer"] not in names:
            names.append(r["mixer"])
    for name in names:
        mine = sorted((r for r in rows if r["mixer"] == name), key=lambda r: r["length"])
        if not any(r["status"] in ("ok", "error") for r in mine) or not ref:
            continue
        lengths = [r["length"] for r in mine]
        for metric, col in METRICS.items():
            vals = [_nan_if_none(r.get(col)) for r in mine]
            base = [_nan_if_none(ref[n].get(col)) if n in ref else math.nan for n in lengths]
            c = crossover_length(lengths, vals, base)
            out.append({"mixer": name, "baseline": baseline, "metric": metric, "status": c.status,
                        "length": c.length})
    return out
