"""The CPU peak-memory server: ``python -m amlp.bench._memory_server`` (see :mod:`amlp.bench.memory`).

The server warms torch up once and then forks one child per measurement.
Kept apart from :mod:`amlp.bench.memory` so that running it as ``__main__`` imports nothing twice.
"""

from __future__ import annotations

import os

import torch  # noqa: F401  imported once here, inherited by every forked child

from amlp.bench.memory import child_measure, trim_heap
from amlp.bench.workloads import Workload, make_callable


def _prepare() -> None:
    """Pay torch's one-off start-up costs (dispatcher, autograd, kernels) once, here, with a single
    thread (so no OpenMP thread team exists when the children are forked), then return the freed
    heap to the system and move every live Python object out of the collector's way (``gc.freeze``)
    so that each child's ``gc.collect`` is quick."""
    import gc

    torch.set_num_threads(1)
    for kind in ("op", "layer"):
        for mode in ("fwd", "fwdbwd"):
            fn, _ = make_callable(Workload(kind=kind, mixer="softmax", batch=1, length=8, heads=2, head_dim=4,
                                           mode=mode))
            fn()
            del fn
    trim_heap()
    gc.freeze()


def serve() -> None:  # pragma: no cover - runs in the server process
    """The measuring server: read one JSON request per line, fork a child per request (this
    process has imported torch but run nothing, so the child inherits no allocator or thread-pool
    state), answer one JSON line per request."""
    import importlib
    import json
    import sys

    _prepare()
    for line in sys.stdin:
        request = json.loads(line)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                for module in request.get("modules", []):
                    importlib.import_module(module)
                answer = {"ok": True, "bytes": child_measure(Workload(**request["workload"]), request["threads"])}
            except BaseException as exc:  # reported to the parent
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            os.write(write_fd, json.dumps(answer).encode())
            os._exit(0)
        os.close(write_fd)
        chunks = []
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        if chunks:
            answer = json.loads(b"".join(chunks))
        else:
            answer = {"ok": False, "error": f"measuring process died (wait status {status}; out of memory?)"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
