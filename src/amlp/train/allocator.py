"""Keep freed memory in the process for reuse: the C allocator setting that `amlp train` and `amlp study`
apply before they train.

A training step on the CPU allocates and frees the same large buffers every step (activations, their
gradients, the logits). glibc's ``malloc`` serves an allocation above its mmap threshold (128 KiB to
32 MiB, adjusted as it goes) with a fresh ``mmap`` and returns the pages to the system on ``free``,
and it trims the top of its heap back to the system as soon as more than a threshold is free. Either
way the next step gets pages the kernel must fault in and zero again: on the two-core CPU the studies
run on, a translation step spent about a tenth of its time in the kernel doing that.

:func:`retain_freed_memory` sets three ``mallopt`` parameters so that large allocations come from the
heap and the heap keeps what is freed: ``M_MMAP_THRESHOLD`` (1 GiB), ``M_TRIM_THRESHOLD`` (the
largest value) and ``M_TOP_PAD`` (64 MiB). The process then holds on to its peak heap instead of
handing it back between steps, which is what a training process wants. Results do not change: only
where the bytes come from does.

It applies to glibc (Linux) only; elsewhere it does nothing. ``AMLP_RETAIN_FREED_MEMORY=0`` in the
environment turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: mallopt parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20
TRIM_THRESHOLD = 2**31 - 1
ENV = "AMLP_RETAIN_FREED_MEMORY"


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and others have no such symbol
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Make this process's ``malloc`` keep freed memory for reuse (see the module docstring). Returns
    True when the settings took effect, False where they do not apply (not glibc) or are turned off
    (``AMLP_RETAIN_FREED_MEMORY=0``)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    done = [libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            libc.mallopt(_M_TOP_PAD, TOP_PAD)]
    return all(r == 1 for r in done)
