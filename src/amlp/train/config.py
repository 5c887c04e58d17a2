"""Experiment configs: YAML files validated into typed dataclasses, with command-line overrides.

A config file has five top-level keys::

    task: forecasting          # which task (see :data:`amlp.train.tasks.TASKS`)
    seed: 0
    data:  {...}               # the task's data config (a dataclass owned by the task)
    model: {...}               # the task's model config (a dataclass owned by the task)
    train: {...}               # :class:`TrainConfig`, shared by every task

Overrides use dotted keys, ``train.lr=3e-4`` or ``model.cross_mixer=amlp-cov``; the value is read
as YAML (``1e-4`` is a float, ``[1, 2]`` a list, ``null`` is None). An unknown key or a value of the
wrong type or range raises ``ValueError`` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; this loader reads it as a float, as users expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


SCHEDULES = ("constant", "inverse_sqrt", "exponential")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing options shared by every task.

    ``batch_size`` is the *global* batch: with ``torchrun --nproc_per_node P`` each process takes
    ``batch_size / P`` examples of every batch, so results do not depend on the number of processes.
    Training stops after ``max_steps`` optimiser steps if set, otherwise after ``epochs`` epochs.
    """

    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    #: learning-rate schedule: ``constant``, ``inverse_sqrt`` (linear warm-up to ``lr`` over
    #: ``warmup_steps``, then ``lr * sqrt(warmup_steps / step)``) or ``exponential``
    #: (``lr * decay_gamma ** (step // decay_every)``, after an optional linear warm-up)
    schedule: Literal["constant", "inverse_sqrt", "exponential"] = "constant"
    warmup_steps: int = 0
    decay_gamma: float = 0.5
    #: steps between two exponential decays; None = one epoch (Informer halves the rate every epoch)
    decay_every: int | None = None
    #: gradient clipping by global norm; 0 = off
    clip_norm: float = 0.0
    #: ``auto`` = bf16 autocast on CUDA devices that support it, fp32 elsewhere
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
    device: str = "auto"
    #: evaluate on the validation set every N steps; 0 = at the end of every epoch
    eval_every: int = 0
    #: save a checkpoint every N steps; 0 = at the end of every epoch only
    checkpoint_every: int = 0
    keep_last: int = 2
    keep_best: bool = True
    #: validation metric that decides the best checkpoint (lower is better)
    best_metric: str = "loss"
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = False
    num_workers: int = 0
    #: CPU threads for torch during the run (None: torch's default). On a shared or small machine
    #: 1 is often much faster than oversubscribing the cores.
    threads: int | None = None
    #: evaluate on the test split at the end of training
    test_at_end: bool = True
    #: which weights the final test uses: ``last`` (the last step), ``best`` (the checkpoint with
    #: the best validation ``best_metric``, as Informer tests; needs ``keep_best``) or ``average``
    #: (the mean of the last ``average_last`` step checkpoints' weights, saved as
    #: ``checkpoints/averaged``; needs ``keep_last >= average_last``)
    test_checkpoint: Literal["last", "best", "average"] = "last"
    average_last: int = 5

    def validate(self) -> None:
        positive = ("batch_size", "epochs", "log_every", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'train.{name}' must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"config key 'train.max_steps' must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"config key 'train.lr' must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"config key 'train.weight_decay' must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"config key 'train.betas' must be two numbers in [0, 1), got {self.betas}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"config key 'train.{name}' must be >= 0, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"config key 'train.threads' must be >= 1 or null, got {self.threads}")
        if not 0.0 < self.decay_gamma <= 1.0:
            raise ValueError(f"config key 'train.decay_gamma' must be in (0, 1], got {self.decay_gamma}")
        if self.decay_every is not None and self.decay_every < 1:
            raise ValueError(f"config key 'train.decay_every' must be >= 1 or null, got {self.decay_every}")
        if self.clip_norm < 0:
            raise ValueError(f"config key 'train.clip_norm' must be >= 0, got {self.clip_norm}")
        if self.schedule == "inverse_sqrt" and self.warmup_steps < 1:
            raise ValueError("config key 'train.warmup_steps' must be >= 1 for the inverse_sqrt schedule")
        if self.test_checkpoint == "average" and self.keep_last < self.average_last:
            raise ValueError(f"config key 'train.test_checkpoint' is 'average' over train.average_last="
                             f"{self.average_last} checkpoints but train.keep_last={self.keep_last} keeps fewer")
        if self.average_last < 1:
            raise ValueError(f"config key 'train.average_last' must be >= 1, got {self.average_last}")
        if self.test_checkpoint == "best" and not self.keep_best:
            raise ValueError("config key 'train.test_checkpoint' is 'best' but train.keep_best is false: no best "
                             "checkpoint would be kept")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, got {dev!r}")


@dataclass
class ExperimentConfig:
    """A whole run: the task, its data and model configs, the training options and the seed."""

    task: str
    data: Any
    model: Any
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, "data": to_plain(self.data),
                "model": to_plain(self.model), "train": to_plain(self.train)}


# -- generic dataclass <-> dict ----------------------------------------------------------------------
def to_plain(obj: Any) -> Any:
    """A dataclass (or nested containers of them) as plain YAML/JSON-friendly values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        raise ValueError(f"config key '{key}' expects {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"config key '{key}' expects {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' expects a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}' expects true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{key}' expects a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for key '{key}'")  # pragma: no cover


def from_dict(cls: type, values: Any, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a mapping, refusing unknown keys and wrongly typed values.

    Calls ``validate()`` on the result if the class defines it.
    """
    where = prefix or "<root>"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config key '{where}' expects a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        keys = ", ".join(f"'{prefix + '.' if prefix else ''}{k}'" for k in unknown)
        raise ValueError(f"unknown config key {keys}; valid keys under '{where}': {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"config key '{key}' is required")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


# -- overrides -----------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). The value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r} has an empty key part")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: value is not valid YAML ({err})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Set each dotted ``key=value`` in the nested dict ``raw`` (in place; returns it)."""
    for text in overrides or []:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {text!r}: config key '{'.'.join(parts[:i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_study_file(path: str | Path) -> dict[str, Any]:
    """A study file's mapping, refusing a training config given in its place (it has a ``task`` key)."""
    raw = read_yaml(path)
    if "task" in raw:
        raise ValueError(f"{str(path)!r} is a training config (task: {raw['task']!r}), not a study file; give a "
                         "study file with --config (the configs/<task>/study/ folders hold them)")
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a folder; give a YAML file")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
    return raw


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw nested dict into an :class:`ExperimentConfig` (task sections typed by the task)."""
    from .tasks import get_task_class

    raw = dict(raw)
    allowed = {"task", "seed", "data", "model", "train"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"unknown config key {', '.join(repr(k) for k in unknown)}; valid top-level keys: "
                         f"{', '.join(sorted(allowed))}")
    if "task" not in raw:
        raise ValueError("config key 'task' is required")
    task_cls = get_task_class(raw["task"])
    seed = _coerce(raw.get("seed", 0), int, "seed")
    cfg = ExperimentConfig(
        task=raw["task"],
        data=from_dict(task_cls.data_config, raw.get("data"), "data"),
        model=from_dict(task_cls.model_config, raw.get("model"), "model"),
        train=from_dict(TrainConfig, raw.get("train"), "train"),
        seed=seed,
    )
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or take ``raw``), apply ``key=value`` overrides and validate it."""
    if raw is None:
        if path is None:
            raise ValueError("give a config path or a raw config mapping")
        raw = read_yaml(path)
    else:
        raw = copy.deepcopy(raw)
    apply_overrides(raw, overrides)
    return build_config(raw)
