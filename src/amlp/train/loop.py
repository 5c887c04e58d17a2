"""The one training loop every task uses.

    >>> from amlp.train import load_config, Trainer
    >>> cfg = load_config("configs/forecasting/cpu/etth1_M.yaml", ["train.max_steps=20"])
    >>> result = Trainer(cfg, "runs/demo").fit()            # doctest: +SKIP
    >>> result.test_metrics["mse"]                          # doctest: +SKIP

What the loop owns, so that tasks do not have to (the task interface is in :mod:`amlp.train.tasks`):

* **Seeds and data order.** The model is built right after ``torch.manual_seed(seed)``. Epoch ``e``
  visits the training set in ``randperm(n)`` drawn from a generator seeded with ``(seed, e)``, cut
  into global batches of ``train.batch_size`` (the last incomplete batch is dropped). The data
  position is therefore a function of the step, and resuming needs nothing but the step.
* **Devices and precision.** ``train.device=auto`` takes CUDA when available (one device per
  process under ``torchrun``), else the CPU; ``train.precision=auto`` means bf16 autocast on CUDA
  devices that support it and fp32 elsewhere.
* **Data parallelism.** Under ``torchrun --nproc_per_node P`` (or any launcher that sets ``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``) the model is wrapped in
  ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU) and rank ``r`` takes the ``r``-th slice of
  every global batch, so P processes follow the trajectory of one process with the same global batch.
  Every rank evaluates the whole validation set (so all agree on the best checkpoint); rank 0 alone
  writes logs and checkpoints.
* **Optimisation.** AdamW/Adam/SGD, a step-indexed learning-rate schedule
  (:mod:`amlp.train.schedules`), gradient clipping by global norm.
* **Logging.** A progress bar (tqdm) with loss, learning rate and throughput; one CSV row per step
  in ``<run>/train_log.csv``, one per evaluation in ``<run>/eval_log.csv``; TensorBoard when
  ``train.tensorboard=true`` and it is installed.
* **Checkpoints** (:mod:`amlp.train.checkpoint`) every ``checkpoint_every`` steps or epoch, at the
  end and on interrupt; the newest ``keep_last`` are kept, plus ``best`` by validation metric.
  ``resume=True`` continues exactly where the newest checkpoint stopped.
* **Interrupts.** The first SIGINT (Ctrl-C) lets the current step finish, saves a checkpoint and
  raises ``KeyboardInterrupt``; a second one interrupts at once.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, default_collate

from .checkpoint import (CheckpointError, check_model_state, flatten_optimizer_state, latest_checkpoint,
                         load_checkpoint, prune_checkpoints, save_checkpoint, step_dir_name,
                         unflatten_optimizer_state)
from .config import ExperimentConfig, TrainConfig, build_config
from .schedules import lr_factor
from .tasks import build_task


class _SavedInterrupt(KeyboardInterrupt):
    """A Ctrl-C honoured between two steps, after the checkpoint was written."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_metrics: dict[str, float] | None = None
    test_metrics: dict[str, float] | None = None
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the step whose weights the test used (the best checkpoint's with train.test_checkpoint=best)
    tested_step: int | None = None


# -- small helpers -------------------------------------------------------------------------------------
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    from ..bench.environment import parse_device

    device = parse_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asks for CUDA but no CUDA device is available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: full precision)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to(v, device) for v in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``n`` training examples."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    record = {"python": [py[0], list(py[1]), py[2]],
              "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, record


def set_rng_state(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if record.get("python"):
        v, s, g = record["python"]
        random.setstate((v, tuple(s), g))
    if record.get("numpy"):
        name, keys, pos, has_gauss, cached = record["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


class CSVLog:
    """Append-only CSV with a fixed header; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str] | None, resume_step: int | None):
        self.path = path
        self.fields = fields
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.fields = self.fields or reader.fieldnames
                rows = [r for r in reader if r.get("step") and int(r["step"]) <= resume_step]
        self._fh = None
        if self.fields:
            self._open(rows)
        else:
            path.unlink(missing_ok=True)

    def _open(self, rows):
        self._fh = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fields, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(rows)
        self._fh.flush()

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is None:
            self.fields = list(row)
            self._open([])
        self._writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _setup_distributed() -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, initialised_here) from the torchrun environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return rank, world, local_rank, True


#: config keys that do not change what a run computes: where the data lies, how visibly and where the
#: run goes (a run may continue under other values of these)
NON_PROTOCOL_KEYS = frozenset({"data.data_dir", "train.progress", "train.tensorboard", "train.log_every",
                               "train.num_workers", "train.threads", "train.device"})


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_leaves(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value))  # tuples and lists alike
    return out


def config_differences(old: dict, new: dict, ignore=NON_PROTOCOL_KEYS) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf of two nested config dicts (``to_dict()``)
    that differs, a key only one side has included (its value None on the other), keys in ``ignore``
    left out."""
    a, b = _leaves(old), _leaves(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]


# -- the trainer ---------------------------------------------------------------------------------------
class Trainer:
    """Runs one experiment config in ``run_dir``.

    Args:
        config: the validated experiment config.
        run_dir: where logs, checkpoints and ``results.json`` go (created if needed).
        resume: ``False`` (start fresh; refused if ``run_dir`` already holds checkpoints), ``True`` (continue from the newest checkpoint; an error if
            there is none), ``"auto"`` (continue if there is a checkpoint) or a checkpoint path.
        task: an already built task (default: built from ``config.task``).
        on_step_end: called as ``on_step_end(trainer, step, loss)`` after every optimiser step
            (for tests and custom monitoring).
        same_config: when resuming, refuse (:class:`CheckpointError`) a checkpoint written under a config
            that differs from ``config`` in any key but :data:`NON_PROTOCOL_KEYS` (the studies set it, so
            that a cell never continues a run of another protocol, e.g. a longer ``train.max_steps``);
            by default a run may continue under a changed config (to train longer, say).
    """

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, *, resume: bool | str | Path = False,
                 task=None, on_step_end: Callable[["Trainer", int, float], None] | None = None,
                 same_config: bool = False):
        self.config = config
        self.same_config = same_config
        self.tc: TrainConfig = config.train
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume = resume
        self.on_step_end = on_step_end
        self.rank, self.world, self.local_rank, self._owns_pg = _setup_distributed()
        self.is_main = self.rank == 0
        self.device = resolve_device(self.tc.device, self.local_rank)
        self.amp_dtype = autocast_dtype(self.tc.precision, self.device)
        if self.tc.batch_size % self.world:
            raise ValueError(f"config key 'train.batch_size' ({self.tc.batch_size}) must be divisible by the "
                             f"number of processes ({self.world})")
        self._seed_everything(config.seed)
        self.task = task if task is not None else build_task(config)
        self.model = self.task.build_model().to(self.device)
        if self.rank:
            torch.manual_seed(config.seed + 7919 * self.rank)  # distinct dropout streams per rank
        self.train_set = self.task.dataset("train")
        if self.train_set is None or len(self.train_set) == 0:
            raise ValueError("the task has no training examples")
        n = len(self.train_set)
        # a task with its own batches (``batches(split)``, e.g. by tokens) fixes them once; epochs
        # shuffle their order
        self._batch_plan = getattr(self.task, "batches", None)
        if self._batch_plan is not None:
            self.train_batches = [list(b) for b in self._batch_plan("train")]
            self.steps_per_epoch = len(self.train_batches)
            if self.steps_per_epoch == 0:
                raise ValueError("the task made no training batches")
        elif n < self.tc.batch_size:
            raise ValueError(f"the training split has {n} examples, fewer than train.batch_size={self.tc.batch_size}")
        else:
            self.steps_per_epoch = n // self.tc.batch_size
        self.total_steps = self.tc.max_steps or self.tc.epochs * self.steps_per_epoch
        self.decay_every = self.tc.decay_every or self.steps_per_epoch
        self.optimizer = self._build_optimizer()
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.ddp_model: nn.Module = self.model
        self._stop_requested = False
        self._collate = getattr(self.task, "collate", None) or default_collate

    # -- construction ----------------------------------------------------------------------------
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        tc = self.tc
        params = [p for p in self.model.parameters() if p.requires_grad]
        if tc.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        if tc.optimizer == "adam":
            return torch.optim.Adam(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.betas[0], weight_decay=tc.weight_decay)

    def lr_at(self, step: int) -> float:
        tc = self.tc
        return tc.lr * lr_factor(step, tc.schedule, warmup_steps=tc.warmup_steps, decay_gamma=tc.decay_gamma,
                                 decay_every=self.decay_every)

    # -- data -----------------------------------------------------------------------------------------
    def _train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        batches = []
        if self._batch_plan is not None:
            order = epoch_order(self.steps_per_epoch, self.config.seed, epoch).tolist()
            for b in order[start_batch:]:
                batches.append(self.train_batches[b][self.rank::self.world])
        else:
            order = epoch_order(len(self.train_set), self.config.seed, epoch)
            gb, per = self.tc.batch_size, self.tc.batch_size // self.world
            for b in range(start_batch, self.steps_per_epoch):
                idx = order[b * gb:(b + 1) * gb]
                batches.append(idx[self.rank * per:(self.rank + 1) * per].tolist())
        # an own generator, so that building the loader draws nothing from the global RNG
        # (which drives dropout and must follow the step, not the number of loaders made)
        generator = torch.Generator().manual_seed(int(self.config.seed) * 7 + epoch)
        return DataLoader(self.train_set, batch_sampler=batches, collate_fn=self._collate, generator=generator,
                          num_workers=self.tc.num_workers, pin_memory=self.device.type == "cuda")

    def eval_loader(self, split: str) -> DataLoader | None:
        data = self.task.dataset(split)
        if data is None or len(data) == 0:
            return None
        return _eval_loader(self.task, data, split, self.tc.batch_size, self._collate, self.tc.num_workers,
                            self.device.type == "cuda")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float] | None:
        loader = self.eval_loader(split)
        if loader is None:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                metrics = _task_evaluate(self.task, self.model, (move_to(b, self.device) for b in loader), split)
        finally:
            self.model.train(was_training)
        return {k: float(v) for k, v in metrics.items()}

    # -- checkpoints ----------------------------------------------------------------------------------
    def _state_record(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        opt_tensors, opt_record = flatten_optimizer_state(self.optimizer)
        rng_tensors, rng_record = rng_state()
        state = {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "batch_in_epoch": self.step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world,
            "scheduler": {"schedule": self.tc.schedule, "peak_lr": self.tc.lr, "lr": self.lr_at(max(self.step - 1, 0))},
            "optimizer": opt_record,
            "rng": rng_record,
            "best": self.best,
            "config": self.config.to_dict(),
        }
        return {**opt_tensors, **rng_tensors}, state

    def save(self, path: Path | None = None) -> Path | None:
        """Write a checkpoint of the current step (rank 0 only); returns its path."""
        if not self.is_main:
            return None
        path = path or self.ckpt_dir / step_dir_name(self.step)
        tensors, state = self._state_record()
        files = getattr(self.task, "checkpoint_files", None)
        save_checkpoint(path, model_state=self.model.state_dict(), optimizer_tensors=tensors, state=state,
                        extra_files=files() if files is not None else None)
        prune_checkpoints(self.ckpt_dir, self.tc.keep_last)
        return path

    def _find_resume_checkpoint(self) -> Path | None:
        if self.resume is False or self.resume is None:
            return None
        if self.resume is True or self.resume == "auto":
            path = latest_checkpoint(self.ckpt_dir)
            if path is None and self.resume is True:
                raise CheckpointError(f"nothing to resume: no checkpoint under {str(self.ckpt_dir)!r}")
            return path
        return Path(self.resume)

    def restore(self, path: Path) -> None:
        """Load the checkpoint at ``path`` into model, optimiser, RNGs and step (all or nothing)."""
        ckpt = load_checkpoint(path)
        where = f"checkpoint {str(path)!r}"
        check_model_state(self.model, ckpt.model, where)
        if self.same_config:
            try:  # read under this version's config (options added since take their defaults)
                saved = build_config(ckpt.state["config"]).to_dict()
            except (ValueError, TypeError) as err:
                raise CheckpointError(f"{where} holds a config this version cannot read ({err})") from None
            changed = config_differences(saved, self.config.to_dict())
            if changed:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:5])
                more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
                raise CheckpointError(f"{where} was written under another config ({shown}{more}), so it cannot "
                                      "continue this run: move its run folder away (or remove it) to start "
                                      f"again in {str(self.run_dir)!r}")
        opt_state = unflatten_optimizer_state(self.optimizer, ckpt.optimizer, ckpt.state.get("optimizer", {}), where)
        spe = ckpt.state.get("steps_per_epoch")
        if spe is not None and spe != self.steps_per_epoch:
            raise CheckpointError(f"{where} was written with {spe} steps per epoch, this run has "
                                  f"{self.steps_per_epoch} (a different training set or batch size); "
                                  "it cannot continue the same data order (copying and MQAR without "
                                  "data.train_examples draw train.batch_size x train.max_steps training "
                                  "examples, so a run of theirs continues only with its own max_steps)")
        # everything checked: now assign
        self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(opt_state)
        set_rng_state({k: v for k, v in ckpt.optimizer.items() if k.startswith("rng.")}, ckpt.state.get("rng", {}))
        if self.rank:
            torch.manual_seed(self.config.seed + 7919 * self.rank + ckpt.step)
        self.step = ckpt.step
        self.best = ckpt.state.get("best")

    # -- interrupts -------------------------------------------------------------------------------
    def _on_sigint(self, signum, frame):
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        flag = self._stop_requested
        if self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        threads = torch.get_num_threads()
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads)

    def _fit(self) -> TrainResult:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"the run folder {str(self.run_dir)!r} is a file; choose another --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_path = self._find_resume_checkpoint()
        if resume_path is None and latest_checkpoint(self.ckpt_dir) is not None:
            raise ValueError(f"{str(self.run_dir)!r} already holds checkpoints of another run; continue it with "
                             "resume (--resume) or choose another run directory (--run-dir)")
        if resume_path is not None:
            self.restore(resume_path)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        resumed_step = self.step if resume_path is not None else None
        train_log = eval_log = writer = None
        if self.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
            train_log = CSVLog(self.run_dir / "train_log.csv",
                               ["step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s"], resumed_step)
            eval_log = CSVLog(self.run_dir / "eval_log.csv", None, resumed_step)
            writer = self._tensorboard()
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        result = TrainResult(self.run_dir, self.step, best=self.best)
        progress = None
        try:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, disable=not (self.tc.progress and self.is_main),
                            desc=f"{self.config.task}", dynamic_ncols=True)
            self._run(result, train_log, eval_log, writer, progress)
        except _SavedInterrupt:
            raise
        except KeyboardInterrupt:
            # a second Ctrl-C, or one raised from inside a step: save the last finished step
            if self.is_main:
                self.save()
            raise
        finally:
            if progress is not None:
                progress.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            for log in (train_log, eval_log):
                if log is not None:
                    log.close()
            if writer is not None:
                writer.close()
        if self.tc.test_at_end:
            result.tested_step = self.step
            if self.tc.test_checkpoint == "best":
                self._load_best_weights(result)
            elif self.tc.test_checkpoint == "average":
                self._load_averaged_weights(result)
            result.test_metrics = self.evaluate("test")
            if self.is_main and result.test_metrics is not None:
                self._log_eval(self.run_dir / "eval_log.csv", "test", result.test_metrics, result.tested_step)
        result.step, result.best = self.step, self.best
        if self.is_main:
            (self.run_dir / "results.json").write_text(json.dumps({
                "step": self.step, "val": result.val_metrics, "test": result.test_metrics, "best": self.best,
                "tested_step": result.tested_step,
                "config": self.config.to_dict()}, indent=1))
        if self._owns_pg and dist.is_initialized():
            dist.destroy_process_group()
        return result

    def _load_averaged_weights(self, result: TrainResult) -> None:
        """Put the mean of the last ``average_last`` step checkpoints into the model and save it as
        ``checkpoints/averaged`` (test_checkpoint=average)."""
        from .checkpoint import average_checkpoints, list_step_checkpoints

        paths = [p for _, p in list_step_checkpoints(self.ckpt_dir)][-self.tc.average_last:]
        if len(paths) < self.tc.average_last:
            warnings.warn(f"train.test_checkpoint=average over {self.tc.average_last} checkpoints, but only "
                          f"{len(paths)} exist; averaging those")
        weights, newest = average_checkpoints(paths)
        check_model_state(self.model, weights, "averaged checkpoint")
        self.model.load_state_dict(weights)
        result.tested_step = newest.step
        if self.is_main:
            tensors, state = self._state_record()
            state["averaged"] = [p.name for p in paths]
            files = getattr(self.task, "checkpoint_files", None)
            save_checkpoint(self.ckpt_dir / "averaged", model_state=weights, optimizer_tensors=tensors, state=state,
                            extra_files=files() if files is not None else None)

    def _load_best_weights(self, result: TrainResult) -> None:
        """Put the weights of the best validation checkpoint into the model (test_checkpoint=best)."""
        if self.best is None:
            warnings.warn("train.test_checkpoint=best but no validation result was recorded (no validation "
                          "split, or every value was NaN); testing the last step's weights")
            return
        path = self.ckpt_dir / "best"
        ckpt = load_checkpoint(path)
        check_model_state(self.model, ckpt.model, f"checkpoint {str(path)!r}")
        self.model.load_state_dict(ckpt.model)
        result.tested_step = ckpt.step

    def _log_eval(self, path: Path, split: str, metrics: dict[str, float], step: int | None = None) -> None:
        """One row of eval_log.csv; ``step`` is the step of the weights evaluated (default: the current)."""
        step = self.step if step is None else step
        log = CSVLog(path, None, self.step)
        log.write({"step": step, "epoch": step / self.steps_per_epoch, "split": split, **metrics})
        log.close()

    def _tensorboard(self):
        if not self.tc.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("train.tensorboard=true but tensorboard is not installed; logging to CSV only")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _run(self, result: TrainResult, train_log, eval_log, writer, progress) -> None:
        tc = self.tc
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        start_time = time.perf_counter()
        window_samples, window_start = 0, time.perf_counter()
        samples_per_s = float("nan")
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            for batch in self._train_loader(epoch, start):
                lr = self.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                batch = move_to(batch, self.device)
                if hasattr(self.task, "set_progress"):
                    self.task.set_progress(self.step, self.total_steps)
                with self._autocast():
                    loss = self.task.loss(self.ddp_model, batch)
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"the loss is {loss.item()} at step {self.step}; lower train.lr, "
                                             "set train.clip_norm or train.precision=fp32")
                loss.backward()
                if tc.clip_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.clip_norm))
                else:  # the norm is logged whether or not it is clipped
                    grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                loss_value = loss.detach().float()
                if self.world > 1:
                    dist.all_reduce(loss_value)
                    loss_value /= self.world
                loss_value = float(loss_value)
                window_samples += _rows(batch) * self.world
                if self.step % tc.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    samples_per_s = window_samples / max(now - window_start, 1e-9)
                    window_samples, window_start = 0, now
                    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.0f}")
                progress.update(1)
                if train_log is not None:
                    train_log.write({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                                     "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                                     "samples_per_s": samples_per_s,
                                     "elapsed_s": round(time.perf_counter() - start_time, 3)})
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, self.step)
                    writer.add_scalar("train/lr", lr, self.step)
                if self.on_step_end is not None:
                    self.on_step_end(self, self.step, loss_value)
                end_of_epoch = self.step % self.steps_per_epoch == 0
                last = self.step >= self.total_steps
                if (tc.eval_every and self.step % tc.eval_every == 0) or (not tc.eval_every and end_of_epoch) or last:
                    self._validate(result, eval_log, writer)
                if (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or end_of_epoch or last:
                    self.save()
                if self._stop_agreed():
                    if self.is_main:
                        path = self.save()
                        progress.write(f"interrupted at step {self.step}; checkpoint saved to {path}")
                    raise _SavedInterrupt(f"interrupted at step {self.step}")
                if last:
                    break

    def _validate(self, result: TrainResult, eval_log, writer) -> None:
        metrics = self.evaluate("val")
        if metrics is None:
            return
        result.val_metrics = metrics
        result.history.append({"step": self.step, **metrics})
        if eval_log is not None:
            eval_log.write({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "split": "val",
                            **metrics})
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"val/{k}", v, self.step)
        key = self.tc.best_metric
        if key not in metrics:
            raise ValueError(f"config key 'train.best_metric' names {key!r}, which the task's evaluation does not "
                             f"report (it reports {sorted(metrics)})")
        value = metrics[key]
        if self.tc.keep_best and math.isfinite(value) and (self.best is None or value < self.best["value"]):
            self.best = {"metric": key, "value": value, "step": self.step}
            if self.is_main:
                self.save(self.ckpt_dir / "best")


def _rows(batch: Any) -> int:
    """Examples in a (local) batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        n = _rows(v)
        if n:
            return n
    return 0


def _eval_loader(task, data, split: str, batch_size: int, collate, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """Batches of ``split`` in order: the task's own (``batches(split)``) if it has them, else
    ``batch_size`` examples at a time."""
    plan = getattr(task, "batches", None)
    # an own generator: making the loader's iterator must draw nothing from the global RNG
    if plan is not None:
        return DataLoader(data, batch_sampler=[list(b) for b in plan(split)], collate_fn=collate,
                          generator=torch.Generator().manual_seed(0), num_workers=num_workers, pin_memory=pin_memory)
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0), num_workers=num_workers, pin_memory=pin_memory)


def _task_evaluate(task, model, batches, split: str) -> dict[str, float]:
    """``task.evaluate``, told the split when it takes a ``split`` argument."""
    import inspect

    if "split" in inspect.signature(task.evaluate).parameters:
        return task.evaluate(model, batches, split=split)
    return task.evaluate(model, batches)


# -- running and evaluating from files ------------------------------------------------------------------
def run_experiment(config: ExperimentConfig, run_dir: str | Path, *, resume: bool | str | Path = False,
                   **kwargs) -> TrainResult:
    """Train ``config`` in ``run_dir`` (see :class:`Trainer`)."""
    return Trainer(config, run_dir, resume=resume, **kwargs).fit()


def load_trained_model(path: str | Path, overrides: list[str] | None = None, device: str = "auto"):
    """(config, task, model) rebuilt from the checkpoint directory ``path``, weights loaded and checked.

    ``overrides`` (``key=value``) change the stored config first, e.g. ``data.data_dir=...``.
    """
    from .config import apply_overrides

    from .tasks import get_task_class

    ckpt = load_checkpoint(path)
    own = getattr(get_task_class(ckpt.state["config"].get("task")), "checkpoint_overrides", None)
    stored = apply_overrides(ckpt.state["config"], own(path) if own is not None else [])
    try:
        build_config(stored)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {err}") from None
    try:  # the caller's changes, blamed on the caller
        config = build_config(apply_overrides(stored, list(overrides or [])))
    except ValueError as err:
        raise ValueError(f"{', '.join(overrides or [])} cannot apply to checkpoint {str(path)!r}: {err}") from None
    task = build_task(config)
    torch.manual_seed(config.seed)
    model = task.build_model()
    check_model_state(model, ckpt.model, f"checkpoint {str(path)!r}")
    bad = [name for name, t in ckpt.model.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} holds NaN or infinite weights (in {', '.join(bad[:3])}"
                              f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); the run diverged before "
                              "it was saved")
    model.load_state_dict(ckpt.model)
    model.to(resolve_device(device))
    model.eval()
    return config, task, model


def evaluate_checkpoint(path: str | Path, split: str = "test", overrides: list[str] | None = None,
                        device: str = "auto") -> dict[str, float]:
    """Metrics of the checkpoint at ``path`` on ``split`` (``val`` or ``test``)."""
    config, task, model = load_trained_model(path, overrides, device)
    dev = next(model.parameters()).device
    data = task.dataset(split)
    if data is None:
        have = [s for s in ("train", "val", "test") if task.dataset(s) is not None]
        raise ValueError(f"the {config.task} task has no {split!r} split; it has {', '.join(have)} "
                         "(choose one with --split)")
    loader = _eval_loader(task, data, split, config.train.batch_size,
                          getattr(task, "collate", None) or default_collate)
    amp = autocast_dtype(config.train.precision, dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        metrics = _task_evaluate(task, model, (move_to(b, dev) for b in loader), split)
    metrics = {k: float(v) for k, v in metrics.items()}
    nan = [k for k, v in metrics.items() if math.isnan(v)]
    if nan:
        raise ValueError(f"evaluating {str(path)!r} on {split!r} gave NaN for {', '.join(nan)}")
    return metrics
