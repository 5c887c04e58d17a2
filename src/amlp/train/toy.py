"""A tiny synthetic regression task: the smallest example of the task interface, used by the tests
of the training loop (resume, data parallelism, interrupts).

The data are ``y = x A + 0.1 * noise`` with a fixed random ``A``; the model is a two-layer MLP with
dropout (so the dropout random stream is part of what resuming must restore).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ToyDataConfig:
    n_train: int = 256
    n_val: int = 64
    n_test: int = 64
    in_dim: int = 5
    out_dim: int = 3
    data_seed: int = 1234

    def validate(self) -> None:
        for name in ("n_train", "n_val", "n_test", "in_dim", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'data.{name}' must be >= 1, got {getattr(self, name)}")


@dataclass
class ToyModelConfig:
    hidden: int = 16
    dropout: float = 0.1

    def validate(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"config key 'model.hidden' must be >= 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config key 'model.dropout' must be in [0, 1), got {self.dropout}")


class ToyRegressionTask:
    data_config = ToyDataConfig
    model_config = ToyModelConfig

    def __init__(self, config):
        self.config = config
        d: ToyDataConfig = config.data
        g = torch.Generator().manual_seed(d.data_seed)
        weight = torch.randn(d.in_dim, d.out_dim, generator=g)
        self._splits = {}
        for split, n in (("train", d.n_train), ("val", d.n_val), ("test", d.n_test)):
            x = torch.randn(n, d.in_dim, generator=g)
            y = x @ weight + 0.1 * torch.randn(n, d.out_dim, generator=g)
            self._splits[split] = torch.utils.data.TensorDataset(x, y)

    def build_model(self) -> nn.Module:
        d, m = self.config.data, self.config.model
        return nn.Sequential(nn.Linear(d.in_dim, m.hidden), nn.GELU(), nn.Dropout(m.dropout),
                             nn.Linear(m.hidden, d.out_dim))

    def dataset(self, split: str):
        return self._splits.get(split)

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x).float(), y)

    def evaluate(self, model, batches):
        total, count, abs_total = 0.0, 0, 0.0
        for x, y in batches:
            err = model(x).float() - y
            total += float((err ** 2).sum())
            abs_total += float(err.abs().sum())
            count += err.numel()
        return {"loss": total / count, "mse": total / count, "mae": abs_total / count}
