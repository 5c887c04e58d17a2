"""The MAD tasks in the training loop: one task class, ``data.task`` chooses which of the six.

Every task trains a :class:`~amlp.models.decoder.DecoderLM` with any causal mixer (for compression,
wrapped in MAD's encoder-decoder, :class:`~amlp.tasks.mad.model.CompressionAutoencoder`) with
cross-entropy on the positions that have a target (``data.loss_on``). Evaluation reports, over the
scored positions of the split:

* ``acc``: the fraction predicted exactly (argmax), MAD's score of the task;
* ``acc_macro``: the mean over target tokens of that token's accuracy (the class-averaged accuracy
  that the released MAD code's torchmetrics metric computes by default);
* ``loss``: the cross-entropy;

plus ``params`` and ``state_size`` (floats of recurrent mixer state per sequence at the input
length; NaN when a mixer has none). The suite's score is the mean of the six ``acc``
(:func:`amlp.tasks.mad.data.mad_score`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..recall.config import DecoderModelConfig
from ..recall.task import _build_decoder, _unwrap
from .config import MADDataConfig
from .data import IGNORE_INDEX, MADDataset
from .model import CompressionAutoencoder


class MADTask:
    data_config = MADDataConfig
    model_config = DecoderModelConfig

    def __init__(self, config):
        self.config = config
        d: MADDataConfig = config.data
        self.settings = d.settings()
        self._splits = {
            "train": MADDataset(d.task, self.settings, d.train_size, d.data_seed, "train"),
            "val": MADDataset(d.task, self.settings, d.val_examples, d.data_seed, "val"),
            "test": MADDataset(d.task, self.settings, d.test_examples, d.data_seed, "test"),
        }

    def dataset(self, split: str):
        return self._splits.get(split)

    def build_model(self):
        length = self.settings.input_length
        lm = _build_decoder(self.config, self.settings.vocab_size, length)
        if self.config.data.task == "compression":
            return CompressionAutoencoder(lm, length)
        return lm

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(batch["tokens"]).float()
        targets = batch["targets"]
        if self.config.data.loss_on == "scored":
            targets = torch.where(batch["scored"], targets, torch.full_like(targets, IGNORE_INDEX))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)

    def evaluate(self, model, batches) -> dict[str, float]:
        net = _unwrap(model)
        V = self.settings.vocab_size
        loss_sum, n_scored, n_correct = 0.0, 0, 0
        support = torch.zeros(V, dtype=torch.float64)
        hits = torch.zeros(V, dtype=torch.float64)
        for batch in batches:
            logits = model(batch["tokens"]).float()
            scored = batch["scored"]
            target = batch["targets"][scored]
            picked = logits[scored]
            loss_sum += float(F.cross_entropy(picked, target, reduction="sum"))
            correct = picked.argmax(-1) == target
            n_scored += int(target.numel())
            n_correct += int(correct.sum())
            support += torch.bincount(target.cpu(), minlength=V).double()
            hits += torch.bincount(target[correct].cpu(), minlength=V).double()
        present = support > 0
        out = {"loss": loss_sum / max(n_scored, 1), "acc": n_correct / max(n_scored, 1),
               "acc_macro": float((hits[present] / support[present]).mean()) if bool(present.any()) else 0.0,
               "params": float(net.num_parameters())}
        size = net.state_size(self.settings.input_length)
        out["state_size"] = float("nan") if size is None else float(size)
        return out
