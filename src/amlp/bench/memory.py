"""Peak memory of one call of a :class:`~amlp.bench.workloads.Workload`.

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
allocated just before the call (inputs, model and the output gradient are built first, so the
figure is what the call itself adds: activations, saved tensors, workspaces and its outputs).
Memory held by the caching allocator but not handed to tensors is not counted.

CPU (Linux): every measurement runs in a fresh child process, forked from a small server process
(``python -m amlp.bench._memory_server``) that has imported torch but run nothing, so no allocator
state or thread pool is inherited (the server pays torch's one-off start-up costs on a tiny
input with one thread before it forks). The server runs with glibc's mmap threshold fixed at
64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor of that size or more is its own mapping and
goes back to the system when freed: resident memory then follows the live tensors instead of the
allocator's history. The child builds the inputs and model, makes the measured call once at full
size (a steady-state step: kernels set up, thread pool started, workspaces allocated), frees its
result, returns free heap memory to the system (``malloc_trim``), reads its resident set size
(``VmRSS``), resets the high-water mark by writing ``5`` to ``/proc/self/clear_refs``, makes the
measured call again and reads ``VmHWM``. The figure is ``VmHWM - VmRSS`` before the call: resident
memory the call added at its peak, counted in pages actually touched. The first call is measured the
same way (``first``: what a fresh process pays on its first step, set-up included) beside the
repeated one (``steady``). It includes allocator slack
(page granularity, small-object arenas, library workspaces that appear on first use) and is
therefore a little above the sum of tensor sizes; small figures (well under a megabyte) are mostly
noise. On other systems the CPU figure is reported as missing.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys

import torch

from .workloads import Workload, make_callable

#: glibc's mmap threshold in the measuring processes (see the module docstring)
MMAP_THRESHOLD = 64 * 1024


def cpu_peak_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def timed_peak(fn, device) -> tuple[float, float | None]:
    """(wall seconds, peak MiB that ``fn()`` added) in this process: ``max_memory_allocated`` on CUDA, the
    resident-set high-water mark on Linux CPUs (None where it cannot be read)."""
    import time

    import torch

    device = torch.device(device)
    base = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif cpu_peak_supported():
        trim_heap()
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    start = time.perf_counter()
    fn()
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    elif base is not None:
        peak = max(_status_kib("VmHWM") - base, 0) / 1024
    return time.perf_counter() - start, peak


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold in this process at :data:`MMAP_THRESHOLD` (``mallopt``), as the
    measuring processes have it: every later allocation of that size or more is its own mapping,
    released when freed, so the resident set follows the live tensors. False where it cannot be set
    (not glibc)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


def forked_peak_bytes(fns: list, repeats: int = 3) -> list[int | None]:
    """Peak resident bytes that one call of each of ``fns`` adds, measured in a child forked from
    this process, so the callables need not be rebuilt (the peers' modules) and this process keeps
    its allocator settings and timings: the child uses one torch thread, fixes the mmap threshold
    (:func:`fix_mmap_threshold`), and calls the functions in turn ``repeats`` times (in reverse
    order every other round), keeping the smallest figure of each. Nones where it cannot measure."""
    if not fns or not cpu_peak_supported() or not hasattr(os, "fork"):
        return [None] * len(fns)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's lines are not seen by coverage
        code = 1
        try:
            os.close(read_end)
            torch.set_num_threads(1)
            found: list[list[int]] = [[] for _ in fns]
            if fix_mmap_threshold():
                for r in range(max(1, repeats)):
                    order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
                    for i in order:
                        found[i].append(_added_peak_kib(fns[i]) * 1024)
            os.write(write_end, json.dumps([min(f) if f else None for f in found]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        return [None] * len(fns)
    return json.loads(data)


def _added_peak_kib(fn) -> int:
    """Resident KiB that one ``fn()`` adds at its peak: ``VmHWM`` after the call minus ``VmRSS``
    before it, with the heap trimmed and the high-water mark reset first."""
    trim_heap()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before)


def child_measure(w: Workload, threads: int) -> dict:
    """Run in the child: peak resident bytes added by the first call of ``w`` in this fresh process
    (``first``: kernels set up, thread pool started, workspaces allocated on the way) and by a
    repeated call (``steady``)."""
    torch.set_num_threads(threads)
    fn, _ = make_callable(w)
    first = _added_peak_kib(fn)
    steady = _added_peak_kib(fn)
    return {"steady": steady * 1024, "first": first * 1024}


class CpuPeakMeter:
    """Measures CPU peak memory of workloads, one fresh child process per measurement.

    A server process (``python -m amlp.bench._memory_server``) imports torch once; each
    measurement is a child forked from it.
    """

    def __init__(self, threads: int | None = None):
        self.threads = threads or torch.get_num_threads()
        self._server: subprocess.Popen | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.stdin.close()
            try:
                self._server.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self._server.kill()
            self._server = None

    def _start(self) -> subprocess.Popen:
        src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        return subprocess.Popen([sys.executable, "-m", "amlp.bench._memory_server"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, text=True)

    def measure(self, w: Workload) -> int:
        """Peak bytes of a repeated call (steady state)."""
        return self.measure_both(w)["steady"]

    def measure_both(self, w: Workload) -> dict:
        """Peak bytes of the first call in a fresh process and of a repeated call:
        ``{"first": ..., "steady": ...}``."""
        if not cpu_peak_supported():
            raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs")
        if self._server is None or self._server.poll() is not None:
            self._server = self._start()
        from ..layers import get_mixer_info

        module = get_mixer_info(w.mixer).cls.__module__
        request = {"workload": w.as_dict(), "threads": self.threads,
                   "modules": [] if module.startswith("amlp.") else [module]}
        self._server.stdin.write(json.dumps(request) + "\n")
        self._server.stdin.flush()
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError("the memory-measuring server stopped")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(answer["error"])
        return {key: int(value) for key, value in answer["bytes"].items()}


def _gpu_call_peak(fn, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return max(0, peak - before)


def gpu_peak_both(w: Workload) -> dict:
    """Peak bytes the first and a repeated call of ``w`` add on its CUDA device (in this process,
    so the first call may find kernels loaded by earlier workloads)."""
    device = torch.device(w.device)
    fn, _ = make_callable(w)
    first = _gpu_call_peak(fn, device)  # kernels, workspaces set up on the way
    return {"first": first, "steady": _gpu_call_peak(fn, device)}


def gpu_peak(w: Workload) -> int:
    """Peak bytes a repeated call of ``w`` adds on its CUDA device (in this process)."""
    return gpu_peak_both(w)["steady"]


class PeakMeter:
    """CPU or GPU peak memory, whichever the workload's device needs."""

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._cpu: CpuPeakMeter | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._cpu is not None:
            self._cpu.close()

    def measure(self, w: Workload) -> int | None:
        """Peak bytes of a repeated call (steady state); None where it cannot be read."""
        both = self.measure_both(w)
        return None if both is None else both["steady"]

    def measure_both(self, w: Workload) -> dict | None:
        """``{"first": ..., "steady": ...}``: the first call in a fresh process (CPU; on CUDA the
        first call of the workload) and a repeated call; None where it cannot be read."""
        if torch.device(w.device).type == "cuda":
            return gpu_peak_both(w)
        if not cpu_peak_supported():
            return None
        if self._cpu is None:
            self._cpu = CpuPeakMeter(self.threads)
        return self._cpu.measure_both(w)
