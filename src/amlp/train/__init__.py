"""The training engine: typed configs, the generic loop, checkpoints, schedules.

See :mod:`amlp.train.tasks` for the interface a task implements and :mod:`amlp.train.loop` for
what the loop does.
"""

from .checkpoint import CheckpointError, load_checkpoint
from .config import ExperimentConfig, TrainConfig, build_config, load_config
from .loop import Trainer, TrainResult, evaluate_checkpoint, load_trained_model, run_experiment
from .schedules import lr_factor
from .tasks import TASKS, build_task, get_task_class

__all__ = ["CheckpointError", "ExperimentConfig", "TASKS", "TrainConfig", "TrainResult", "Trainer", "build_config",
           "build_task", "evaluate_checkpoint", "get_task_class", "load_checkpoint", "load_config",
           "load_trained_model", "lr_factor", "run_experiment"]
