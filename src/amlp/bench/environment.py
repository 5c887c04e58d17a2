"""What machine a result came from, how fast it moves memory and how fast it multiplies matrices."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from contextlib import contextmanager

import torch


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, :func:`platform.processor` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def parse_device(name: str) -> torch.device:
    """``torch.device(name)``, with a ``ValueError`` naming the accepted forms for a name torch does
    not know (torch raises a ``RuntimeError`` listing its every backend)."""
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is checked to exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
             "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(set(table))}, got {name!r}")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def machine_header(device: torch.device) -> dict:
    """CPU/GPU model, core counts, library versions and a UTC timestamp."""
    head = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname_platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu_model": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
    }
    try:
        head["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        pass
    return head


def measure_bandwidth(device: torch.device, megabytes: int = 256, min_run_time: float = 0.5,
                      threads: int | None = None) -> float:
    """Memory bandwidth in bytes per second: a copy of a ``megabytes`` float32 buffer, timed.

    A copy reads and writes every byte once, so the figure is ``2 * size / median time``. Pick a
    buffer well above the last-level cache (the default 256 MB is).
    """
    from torch.utils.benchmark import Timer

    n = max(1, int(megabytes * 2**20) // 4)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    timer = Timer("dst.copy_(src)", globals={"dst": dst, "src": src},
                  num_threads=threads or torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return 2.0 * src.numel() * src.element_size() / m.median


def measure_matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                        min_run_time: float = 0.5, threads: int | None = None) -> float:
    """Matrix-multiply rate in FLOP per second: ``torch.mm`` of two ``size x size`` matrices of
    ``dtype`` on ``device`` (into a preallocated output), timed with the given number of threads.

    One product is ``2 * size**3`` floating-point operations (a multiply and an add per term), so
    the figure is that over the median time: the machine's practical peak for dense products, the
    reference of the ``*_peak_fraction`` columns of ``amlp bench ops``.
    """
    from torch.utils.benchmark import Timer

    gen = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)  # warm-up: kernels chosen, pages touched
    timer = Timer("torch.mm(a, b, out=out)", globals={"torch": torch, "a": a, "b": b, "out": out},
                  num_threads=threads or torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return 2.0 * size**3 / m.median


def invocation(default: str) -> str:
    """The command line that started this run (``amlp bench ...``), or ``amlp bench DEFAULT`` when
    the bench was started from Python."""
    import shlex
    import sys

    args = sys.argv[1:]
    if args[:1] == ["bench"]:
        return "amlp " + " ".join(shlex.quote(a) for a in args)
    return f"amlp bench {default}"


@contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch threads (as the timed calls ran), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_timing_settings(threads: int, min_run_time: float) -> None:
    """``threads >= 0`` (0: torch's default) and ``min_run_time > 0``, or a ``ValueError``."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {threads}")
    if not min_run_time > 0:
        raise ValueError(f"min_run_time must be > 0, got {min_run_time}")
