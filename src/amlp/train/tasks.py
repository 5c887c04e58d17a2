"""The task interface of the training loop, and the table of known tasks.

A task is a class with two dataclass attributes and four methods; the loop in
:mod:`amlp.train.loop` does everything else (devices, precision, data order, data parallelism,
optimiser, schedule, clipping, logging, checkpoints, interrupts)::

    class MyTask:
        data_config = MyDataConfig      # dataclass for the ``data:`` section of the config
        model_config = MyModelConfig    # dataclass for the ``model:`` section

        def __init__(self, config):     # config: amlp.train.config.ExperimentConfig
            ...
        def build_model(self) -> torch.nn.Module: ...
        def dataset(self, split: str) -> torch.utils.data.Dataset:   # "train", "val" or "test"
            ...                          # (return None when the task has no such split)
        def loss(self, model, batch) -> torch.Tensor:
            ...                          # scalar mean loss over the batch (batch already on device)
        def evaluate(self, model, batches) -> dict[str, float]:
            ...                          # metrics over an iterable of batches; must include "loss"

Items of the datasets are collated by :func:`torch.utils.data.default_collate` unless the task
defines ``collate(items)``. The loop moves every tensor of a batch to the device. ``evaluate`` is
called with the model in eval mode, under ``torch.no_grad()`` and the run's autocast, and receives
the batches of the split in order. A dataclass's optional ``validate()`` raises ``ValueError``
naming the bad key (``data.seq_len``, ...).

To add a task, write it under ``amlp/tasks/<name>/`` and add one line to :data:`TASKS`.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable, Protocol

import torch

#: task name -> "module:Class"
TASKS: dict[str, str] = {
    "toy-regression": "amlp.train.toy:ToyRegressionTask",
    "forecasting": "amlp.tasks.forecasting.task:ForecastingTask",
    "copying": "amlp.tasks.recall.task:CopyingTask",
    "mqar": "amlp.tasks.recall.task:MQARTask",
    "translation": "amlp.tasks.translation.task:TranslationTask",
    "tts": "amlp.tasks.tts.task:TTSTask",
    "sr": "amlp.tasks.super_resolution.task:SuperResolutionTask",
    "lm": "amlp.tasks.lm.task:LMTask",
    "mad": "amlp.tasks.mad.task:MADTask",
}


class Task(Protocol):
    data_config: type
    model_config: type

    def build_model(self) -> torch.nn.Module: ...

    def dataset(self, split: str) -> torch.utils.data.Dataset | None: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, batches: Iterable[Any]) -> dict[str, float]: ...


def get_task_class(name: Any) -> type:
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"config key 'task' must be one of {sorted(TASKS)}, got {name!r}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(config) -> Task:
    """Instantiate the task named by ``config.task``."""
    return get_task_class(config.task)(config)
