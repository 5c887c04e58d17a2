"""Wall-clock time of a callable with :mod:`torch.utils.benchmark` (CUDA is synchronised)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer


@dataclass
class TimeResult:
    median: float  # seconds per call
    iqr: float  # interquartile range of the per-call times, seconds
    runs: int  # calls measured


def measure_time(fn, *, min_run_time: float = 1.0, threads: int | None = None, max_single_runs: int = 2) -> TimeResult:
    """Median seconds per call of ``fn()``.

    One warm-up call first (not counted). Calls shorter than ``min_run_time`` go through
    ``Timer.blocked_autorange`` (blocks of calls, at least ``min_run_time`` seconds in all); a
    call that alone takes longer than ``min_run_time`` is timed ``max_single_runs`` times with
    ``Timer.timeit(1)`` instead, so that long runs (autoregressive generation of thousands of tokens)
    do not repeat for minutes. ``torch.utils.benchmark`` synchronises the accelerator around every
    timed block.
    """
    threads = threads or torch.get_num_threads()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
    first = timer.timeit(1)  # warm-up (not counted), and a first estimate of one call
    if first.median >= min_run_time:
        times = [timer.timeit(1).median for _ in range(max(1, max_single_runs))]
        times.sort()
        iqr = _iqr(times)
        return TimeResult(statistics.median(times), iqr, len(times))
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return TimeResult(m.median, m.iqr, len(m.times) * m.number_per_run)


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    qs = statistics.quantiles(values, n=4, method="inclusive")
    return qs[2] - qs[0]
