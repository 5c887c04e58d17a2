"""What the grid studies of the tasks share: the record of a finished cell, where the report goes (and
when the tracked document is refused), thread budgets for measurements, and the report's formatting."""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .config import to_plain
from .study_forecasting import _mean_std, grid_refusal


def fmt_seeds(values: list[float], digits: int) -> str:
    """``mean ± std`` over seeds, ``mean¹`` for a single seed, ``—`` for none."""
    if not values:
        return "—"
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}¹"


def record_values(records: Iterable[dict], get) -> list[float]:
    """``get(record)`` for each record, as floats, leaving out the records where it is missing (a
    ``KeyError`` / ``TypeError`` or None) or not finite."""
    out = []
    for r in records:
        try:
            v = get(r)
        except (KeyError, TypeError):
            v = None
        if v is not None and math.isfinite(float(v)):
            out.append(float(v))
    return out


def load_note(measurements: Iterable[dict]) -> str:
    """A sentence on the machine's load when the measurements (dicts with ``cpus`` and
    ``load_average_1min``) were taken; empty when none recorded it."""
    measurements = list(measurements)
    loads = [m["load_average_1min"] for m in measurements if m.get("load_average_1min") is not None]
    if not loads:
        return ""
    # a single-threaded measurement holds the load near 1 by itself
    beside = " (other processes ran beside them)" if max(loads) > 1.5 else ""
    return (f" The machine has {measurements[0].get('cpus')} CPUs; the 1-minute load average at the measurements "
            f"was {min(loads):.1f} to {max(loads):.1f}{beside}.")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (None: as it is), then restore the previous number."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def check_doc_selection(doc: str, missing: list[str], selected: Iterable[str]) -> None:
    """Before any work: a run that is to write the tracked document must cover every missing cell."""
    selected = set(selected)
    outside = [k for k in missing if k not in selected]
    if outside:
        raise ValueError(grid_refusal(doc, outside))


def report_path(root: Path, run_root: Path, doc: str, missing: list[str], write_doc: bool) -> Path:
    """The study's tracked document (only from a complete grid, else ``ValueError``) or the report beside
    the results."""
    if not write_doc:
        return run_root / "report.md"
    if missing:
        raise ValueError(grid_refusal(doc, missing))
    return root / doc


def cell_record(cfg, result, *, root: Path, config: str, overrides: list[str], run_dir: Path, checkpoint: Path,
                **fields) -> dict:
    """The record of a finished cell: what ran, where, on which checkpoint, with the given fields."""
    def rel(p: Path) -> str:
        return str(p.relative_to(root) if p.is_relative_to(root) else p)

    return {"finished": True, **fields, "config": config, "overrides": list(overrides), "steps": result.step,
            "tested_step": result.tested_step, "val": result.val_metrics, "run_dir": rel(run_dir),
            "checkpoint": rel(checkpoint), "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
            "train": to_plain(cfg.train), "model": to_plain(cfg.model), "data": to_plain(cfg.data)}
