"""Measurement of the mixers: ``amlp bench ops`` (time and peak memory of each registered mixer over
a length sweep, crossover lengths against softmax attention, distance to the memory-bandwidth
floor), ``amlp bench generation`` (the AMLP paper's AR vs NAR vs NAR-AMLP study) and ``amlp bench
peers`` (amlp's mixers against other implementations of the same mechanisms, :mod:`amlp.bench.peers`).

    >>> from amlp.bench import OpsSettings, run_ops, save_ops
    >>> result = run_ops(OpsSettings(mixers=["softmax", "amlp-cov"], lengths=[256, 512]))
    >>> save_ops(result, "bench-results")

How memory is measured: :mod:`amlp.bench.memory`. Results are written as CSV (with a ``#``
header block describing the machine and the settings), JSON and PNG plots.
"""

from __future__ import annotations

import os

from .analysis import Crossover, crossover_length
from .generation import GEN_COLUMNS, GenerationResult, GenerationSettings, run_generation
from .ops import CROSSOVER_COLUMNS, OPS_COLUMNS, OpsResult, OpsSettings, run_ops
from .peers import PEERS_COLUMNS, PeersResult, PeersSettings, run_peers, save_peers
from .report import plot_generation, plot_ops, read_csv, write_csv, write_json
from .sweep import parse_lengths, parse_names


def plots_available() -> bool:
    """True when matplotlib (the optional ``plot`` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plot_title(header: dict) -> str:
    s = header["settings"]
    gpu = f", {header['gpu_model']}" if header.get("gpu_model", "none") != "none" else ""
    padded = f", padding={s['padding']:g}" if s.get("padding") else ""
    sizes = (f"B={s['batch']}, H={s['heads']}, D={s['head_dim']}, c={s['landmarks']}, level={s['level']}{padded}"
             if "dim" not in s else
             f"B={s['batch']}, E={s['dim']}, H={s['heads']}, layers={s['layers']}, c={s['landmarks']}, "
             f"sigma_1={s['activation']}")
    return f"{header['cpu_model']} ({header['torch_threads']} threads){gpu}, {s['dtype']}, {sizes}; {header['timestamp_utc']}"


def save_ops(result: OpsResult, out_dir: str, *, plots: bool = True) -> list[str]:
    """Write ``ops.csv``, ``ops_crossover.csv``, ``ops.json`` and (with ``plots``) the PNGs."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("ops.csv", "ops_crossover.csv", "ops.json")]
    write_csv(paths[0], result.header, result.rows, OPS_COLUMNS)
    write_csv(paths[1], result.header, result.crossovers, CROSSOVER_COLUMNS)
    write_json(paths[2], {"header": result.header, "rows": result.rows, "crossovers": result.crossovers})
    if plots:
        paths += plot_ops(result.rows, out_dir, _plot_title(result.header))
    return paths


def save_generation(result: GenerationResult, out_dir: str, *, plots: bool = True) -> list[str]:
    """Write ``generation.csv``, ``generation.json`` and (with ``plots``) the PNGs."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("generation.csv", "generation.json")]
    write_csv(paths[0], result.header, result.rows, GEN_COLUMNS)
    write_json(paths[1], {"header": result.header, "rows": result.rows, "headline": result.headline})
    if plots:
        paths += plot_generation(result.rows, out_dir, _plot_title(result.header))
    return paths


def replot(out_dir: str) -> list[str]:
    """Draw the PNG plots again from the ``ops.json`` / ``generation.json`` found in ``out_dir``."""
    import json

    paths = []
    for name, plot in (("ops.json", plot_ops), ("generation.json", plot_generation)):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            with open(path) as fh:
                data = json.load(fh)
            paths += plot(data["rows"], out_dir, _plot_title(data["header"]))
    if not paths:
        raise FileNotFoundError(f"no ops.json or generation.json in {out_dir!r}")
    return paths


__all__ = ["CROSSOVER_COLUMNS", "Crossover", "GEN_COLUMNS", "GenerationResult", "GenerationSettings", "OPS_COLUMNS",
           "OpsResult", "OpsSettings", "PEERS_COLUMNS", "PeersResult", "PeersSettings", "crossover_length",
           "parse_lengths", "parse_names", "plots_available", "read_csv", "replot", "run_generation", "run_ops",
           "run_peers", "save_generation", "save_ops", "save_peers"]
