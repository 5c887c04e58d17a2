"""Checkpoints: safetensors weights plus a JSON record of everything else, written atomically.

A checkpoint is a directory::

    step-00000120/
        model.safetensors       # the model's state_dict
        optimizer.safetensors   # optimiser state tensors ("optimizer.<param>.<name>") and torch RNG states
        state.json              # step, epoch, data position, schedule, optimiser hyper-parameters,
                                # Python/NumPy RNG states, metrics and the full experiment config

It is first written under a temporary name and then renamed with ``os.replace``, so a directory
named ``step-*`` or ``best`` is always complete. Loading reads and checks every part (format, keys,
shapes, dtypes) before anything is assigned to the model or optimiser; a corrupt or mismatched
checkpoint raises :class:`CheckpointError` and leaves the model untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "amlp-checkpoint-1"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model / optimiser it is loaded into."""


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# -- writing ---------------------------------------------------------------------------------------------
def _plain_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(path: str | Path, *, model_state: dict[str, torch.Tensor],
                    optimizer_tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing an existing one).

    ``extra_files`` (name -> bytes) are written beside the weights, e.g. a task's tokenizer, so that a
    checkpoint folder is enough to use the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_plain_tensors(model_state), str(tmp / MODEL_FILE), metadata={"format": FORMAT})
        save_file(_plain_tensors(optimizer_tensors), str(tmp / OPTIMIZER_FILE), metadata={"format": FORMAT})
        for name, data in (extra_files or {}).items():
            if name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE) or Path(name).name != name:
                raise ValueError(f"extra checkpoint file name {name!r} is reserved or not a plain file name")
            (tmp / name).write_bytes(data)
        with open(tmp / STATE_FILE, "w") as fh:
            json.dump({"format": FORMAT, **state}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            # the old checkpoint stays in place until the new one is complete; it is moved aside only
            # for the instant of the swap, and put back if the swap fails
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, trash)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(trash, path)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def list_step_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete ``step-*`` checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_step_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``step-*`` checkpoints (``best`` is never touched)."""
    found = list_step_checkpoints(root)
    for _, path in found[:-keep_last] if keep_last > 0 else found:
        shutil.rmtree(path, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read every part of the checkpoint at ``path`` (a directory), or raise :class:`CheckpointError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a file; a checkpoint is a folder holding "
                              f"{MODEL_FILE}, {OPTIMIZER_FILE} and {STATE_FILE} (runs/.../checkpoints/best, "
                              "averaged or step-N)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (expected a directory holding "
                              f"{MODEL_FILE}, {OPTIMIZER_FILE} and {STATE_FILE})")
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {name} is missing")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {STATE_FILE} is not valid JSON ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unknown format "
                              f"({state.get('format') if isinstance(state, dict) else type(state).__name__!r}; "
                              f"expected {FORMAT!r})")
    for key in ("step", "config"):
        if key not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {STATE_FILE} has no {key!r}")
    tensors = {}
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        try:
            tensors[name] = load_file(str(path / name))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {name} cannot be read ({err})") from None
    return Checkpoint(path, tensors[MODEL_FILE], tensors[OPTIMIZER_FILE], state)


def check_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` has exactly the keys and shapes of ``model``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))


def _short(items: list[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


# -- optimiser state <-> flat tensors + JSON ----------------------------------------------------------
def flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able values."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                              record: dict[str, Any], where: str = "checkpoint") -> dict[str, Any]:
    """Rebuild an optimiser state_dict and check it fits ``optimizer`` (group count and sizes, shapes)."""
    try:
        groups = record["param_groups"]
        scalars = record.get("scalars", {})
    except (TypeError, KeyError):
        raise CheckpointError(f"{where} is corrupt: the optimiser record has no param_groups") from None
    current = optimizer.state_dict()
    if len(groups) != len(current["param_groups"]) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, current["param_groups"])):
        raise CheckpointError(f"{where} does not match the optimiser: parameter groups differ "
                              f"({[len(g['params']) for g in groups]} vs "
                              f"{[len(g['params']) for g in current['param_groups']]} parameters)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in scalars.items():
        state.setdefault(int(idx), {}).update(entry)
    for idx, entry in state.items():
        if idx >= len(params):
            raise CheckpointError(f"{where} does not match the optimiser: state for parameter {idx} "
                                  f"but the optimiser has {len(params)}")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[idx].shape:
                raise CheckpointError(f"{where} does not match the optimiser: {name} of parameter {idx} has "
                                      f"shape {tuple(value.shape)}, the parameter {tuple(params[idx].shape)}")
    return {"state": state, "param_groups": groups}


def average_checkpoints(paths: list[str | Path]) -> tuple[dict[str, torch.Tensor], Checkpoint]:
    """The element-wise mean of the model weights of ``paths`` (floating tensors, in float64, cast
    back; other tensors from the newest), and the newest checkpoint. Every checkpoint must hold the
    same tensors with the same shapes."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    ckpts = [load_checkpoint(p) for p in paths]
    newest = max(ckpts, key=lambda c: c.step)
    keys = set(newest.model)
    for c in ckpts:
        if set(c.model) != keys or any(c.model[k].shape != newest.model[k].shape for k in keys):
            raise CheckpointError(f"checkpoint {str(c.path)!r} does not hold the same tensors as {str(newest.path)!r}")
    out = {}
    for k, t in newest.model.items():
        if t.is_floating_point():
            out[k] = (sum(c.model[k].double() for c in ckpts) / len(ckpts)).to(t.dtype)
        else:
            out[k] = t.clone()
    return out, newest
