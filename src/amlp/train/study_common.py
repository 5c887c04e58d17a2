"""What the grid studies of the tasks share: the record of a finished cell, where the report goes (and
when the tracked document is refused), thread budgets for measurements, the timing of training steps,
and the report's formatting."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .config import to_plain
from .study_forecasting import _mean_std, _read_results, _record, grid_refusal


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


def start_timing_pass(log) -> str:
    """The name of a new timing pass (its start, to the millisecond), after warning through ``log``
    when other processes load the machine (a single-threaded pass holds the load near 1 by itself)."""
    load = machine()["load_average_1min"]
    if load is not None and load > 1.5:
        log(f"warning: the 1-minute load average is {load:.1f}; other processes will slow the timings "
            "(the report states the load)")
    return _dt.datetime.now().isoformat(sep=" ", timespec="milliseconds")


def timing_passes(passes: Iterable[str | None], command: str, what: str = "cell") -> str:
    """A sentence on how the speeds of a report were measured: each ``what`` as its training finished
    (pass None), in one ``command`` pass (named by its start), or in several."""
    passes = set(passes)
    if passes == {None}:
        return f"Each {what} was timed when its training finished, so they were timed at different loads."
    if len(passes) == 1:
        return f"Every {what} was timed again in one pass, one after another (`{command}`, started {passes.pop()})."
    return (f"The {what}s were timed in {len(passes)} separate passes (as they finished, or by `{command}` on part "
            "of the grid), so they were timed at different loads.")


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


@dataclasses.dataclass
class EarlierProtocol:
    """Cells of an earlier protocol of a study (study key ``earlier``), kept in their own records file and
    shown in the report beside the same cells under the current protocol."""
    records: str
    #: what differed, e.g. "GLAT trained 3,200 steps (twice the AR updates)"
    label: str


def load_earlier(root: Path, earlier: Iterable[EarlierProtocol]) -> list[tuple[EarlierProtocol, dict]]:
    """Each earlier protocol with its records (``ValueError`` naming a records file that does not exist)."""
    out = []
    for e in earlier:
        path = root / e.records
        if not path.is_file():
            raise ValueError(f"study key 'earlier': the records file {e.records!r} does not exist")
        out.append((e, _read_results(path)))
    return out


def earlier_section(protocol: EarlierProtocol, metric: str, key_columns: list[str],
                    rows: Iterable[tuple[list[str], list[float], list[float]]], digits: int) -> list[str]:
    """The report section of an earlier protocol: one table row per ``(key cells, earlier values, current
    values)`` with earlier values, each side as mean ± std and its number of seeds; ``metric`` says what
    the values are. Empty when no row has an earlier value."""
    lines = [f"## Earlier protocol: {protocol.label}", "",
             f"Records in `{protocol.records}`; {metric}, mean ± std over seeds (¹ one seed).", "",
             "| " + " | ".join(key_columns + ["earlier protocol", "seeds", "this protocol", "seeds"]) + " |",
             "|" + "---|" * (len(key_columns) + 4)]
    found = False
    for keys, before, now in rows:
        if not before:
            continue
        found = True
        lines.append("| " + " | ".join(keys + [fmt_seeds(before, digits), str(len(before)),
                                               fmt_seeds(now, digits) if now else "—",
                                               str(len(now)) if now else "—"]) + " |")
    return lines + [""] if found else []


#: ``--set`` keys that leave a study's protocol as it is (where the data lies, progress bars): cells run
#: with only these are recorded in the study's tracked records file
SAME_PROTOCOL_KEYS = ("train.progress", "data.data_dir")


@dataclasses.dataclass
class CellStore:
    """Where a study's finished cells are recorded: ``<run_root>/results.json`` beside the run folders,
    and, when the study names one (its key ``records``), a tracked file that travels with the
    repository, so that a grid continues on another machine (its finished cells are skipped there).

    Reading merges the two (the local record wins); recording writes both. A record's checkpoint lies
    in the run folder it names, so on another machine it may be missing: :meth:`checkpoint` says."""

    local: Path
    tracked: Path | None = None

    def read(self) -> dict:
        out = _read_results(self.tracked) if self.tracked is not None else {}
        out.update(_read_results(self.local))
        return out

    def record(self, key: str, record: dict) -> None:
        _record(self.local, key, record)
        if self.tracked is not None:
            _record(self.tracked, key, record)

    def finished(self, key: str) -> bool:
        return bool(self.read().get(key, {}).get("finished"))

    def source(self, root: Path) -> str:
        """The file the report is generated from (the tracked one when there is one), relative to ``root``."""
        path = self.tracked if self.tracked is not None else self.local
        return str(path.relative_to(root) if path.is_relative_to(root) else path)

    @staticmethod
    def checkpoint(root: Path, record: dict) -> Path | None:
        """The record's checkpoint when it is on this machine, else None."""
        path = Path(record.get("checkpoint") or "")
        path = path if path.is_absolute() else root / path
        return path if record.get("checkpoint") and path.exists() else None


#: config fields that do not change what a cell measures (where the data and caches lie, progress bars):
#: a finished cell recorded with other values here still belongs to the protocol
PROTOCOL_FREE_FIELDS = SAME_PROTOCOL_KEYS + ("data.cache_dir",)


def _protocol_fields(section: dict) -> dict:
    """A config section's fields as compared between a record and the protocol now: per-mixer option tables
    (``mixer_options``, keyed by mixer name) reduced to the entry of the section's ``mixer``."""
    out = dict(section)
    if isinstance(out.get("mixer"), str) and isinstance(out.get("mixer_options"), dict):
        table = out["mixer_options"]
        if all(isinstance(v, dict) for v in table.values()):
            out["mixer_options"] = {out["mixer"]: table.get(out["mixer"], {})}
    return out


def protocol_changes(record: dict, cfg, free: Iterable[str] = ()) -> list[str]:
    """How the protocol of a finished cell's ``record`` differs from ``cfg`` (the cell's experiment config
    now): ``"section.field: recorded -> now"`` for each field of ``model``, ``train`` and ``data`` that
    both have and whose values differ (a whole options mapping is one field). Fields one side lacks (a
    field the code added since the cell finished, a record without the section) are not compared, nor
    :data:`PROTOCOL_FREE_FIELDS`, nor the study's own ``free`` fields (dotted names)."""
    free = set(PROTOCOL_FREE_FIELDS) | set(free)
    changes = []
    for name in ("model", "train", "data"):
        recorded = record.get(name)
        if not isinstance(recorded, dict):
            continue
        before, now = _protocol_fields(recorded), _protocol_fields(to_plain(getattr(cfg, name)))
        for key in before:
            dotted = f"{name}.{key}"
            if key in now and dotted not in free and _plain(before[key]) != _plain(now[key]):
                changes.append(f"{dotted}: {before[key]!r} -> {now[key]!r}")
    return changes


def _plain(value):
    """``value`` as JSON gives it back (tuples as lists, keys as strings), so a record read from its file
    compares equal to the config it was written from."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def check_protocols(results: dict, current: Iterable[tuple[str, Callable[[dict], object]]], source: str,
                    free: Iterable[str] = ()) -> None:
    """Refuse (``ValueError``) when a finished cell was recorded under another protocol than the study's
    now, before any work: its result would otherwise be counted, and reported, as this protocol's.

    ``current`` gives ``(cell key, function of the cell's record -> the cell's experiment config now)``
    for the cells to check; ``results`` are the study's records, ``source`` the file that holds them, ``free``
    the fields that study lets differ (see :func:`protocol_changes`)."""
    free = tuple(free)
    stale = []
    for key, config_now in current:
        record = results.get(key) or {}
        if record.get("finished"):
            changes = protocol_changes(record, config_now(record), free)
            if changes:
                stale.append(f"  {key}: " + "; ".join(changes))
    if stale:
        raise ValueError(
            f"{len(stale)} finished cell(s) in {source} were recorded under another protocol than the study's "
            "configs give now, and would be reported as this protocol's:\n" + "\n".join(stale) + "\n"
            "Keep them as an earlier protocol (move them to a records file of their own and name it under the "
            "study key 'earlier'), or delete them from the records (and their run folders) to train them again "
            "under the protocol now; or restore the configs they ran with.")


def cell_store(root: Path, run_root: Path, records: str | None, extra_overrides: Iterable[str] = (),
               log=print, free: Iterable[str] = ()) -> CellStore:
    """The study's :class:`CellStore`. Its tracked ``records`` file is left out when ``extra_overrides``
    (the command line's ``--set``) change the protocol (any key but :data:`SAME_PROTOCOL_KEYS` and the
    study's own ``free`` keys): such cells neither count the tracked cells as done nor are recorded there.
    Finished local cells missing from the tracked file are copied into it."""
    local = run_root / "results.json"
    if not records:
        return CellStore(local)
    changed = sorted({o.split("=", 1)[0].strip() for o in extra_overrides} - set(SAME_PROTOCOL_KEYS) - set(free))
    if changed:
        log(f"note: --set {', '.join(changed)} changes the study's protocol; its cells are recorded only in "
            f"{local}, not in the tracked {records}")
        return CellStore(local)
    store = CellStore(local, root / records)
    tracked = _read_results(store.tracked)
    for key, rec in _read_results(local).items():
        if rec.get("finished") and not tracked.get(key, {}).get("finished"):
            _record(store.tracked, key, rec)
    return store


class _Timed(Exception):
    """Raised from the step callback once the timed steps are done (ends the run without a checkpoint
    or an evaluation)."""


def measure_training(config, steps: int = 20, warmup: int = 3) -> dict:
    """Time ``steps`` optimiser steps of ``config`` (after ``warmup`` >= 1 untimed ones, the first of
    which builds what the loop builds once) with the training loop itself, from a fresh model in a
    temporary run folder that is removed afterwards (nothing is validated or saved): the mean seconds
    per step, with the run's threads, and the machine's load."""
    from .loop import Trainer

    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1, got {steps} and {warmup}")
    total = warmup + steps
    marks: list[float] = []

    def on_step_end(trainer, step, loss):
        marks.append(time.perf_counter())
        if step >= total:
            raise _Timed

    train = dataclasses.replace(config.train, max_steps=max(config.train.max_steps or 0, total), progress=False,
                                test_at_end=False, eval_every=0, checkpoint_every=0)
    config = dataclasses.replace(config, train=train)
    with tempfile.TemporaryDirectory(prefix="amlp-timing-") as tmp:
        trainer = Trainer(config, tmp, on_step_end=on_step_end)
        if trainer.steps_per_epoch < total:
            raise ValueError(f"timing {total} steps needs an epoch of at least that many batches; the training "
                             f"split gives {trainer.steps_per_epoch}")
        try:
            trainer.fit()
        except _Timed:
            pass
    seconds = (marks[-1] - marks[warmup - 1]) / steps
    return {"seconds_per_step": seconds, "steps": len(marks) - warmup, "warmup": warmup,
            "threads": train.threads or torch.get_num_threads(), **machine()}
