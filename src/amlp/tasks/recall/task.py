"""The copying and MQAR tasks of the training loop, on a decoder-only model with any causal mixer.

Copying (as in the CausalRN code's ``src_copying``): cross-entropy on the copy span and the final
EOS. Evaluation reports ``loss``, ``soft_acc`` (teacher-forced argmax over the copy span and EOS,
averaged per sample) and ``hard_acc`` (greedy decoding from ``[BOS, s, SEP]`` through every mixer's
recurrent ``step``, scored by :func:`copy_hard_accuracy`), plus ``hard_acc_len<S>`` /
``soft_acc_len<S>`` per string length when a split holds several lengths.

MQAR (zoology): cross-entropy at the query positions; evaluation reports ``loss`` and ``acc``
(argmax at the queries, over every query of the split), plus ``acc_pairs<P>`` per pair count when
the test split holds several.

Both also report ``params`` (the model's parameter count) and ``state_size`` (floats of recurrent
mixer state per sequence at the split's longest input, summed over blocks; see
:meth:`amlp.models.decoder.DecoderLM.state_size`).

Copying can size its model to a parameter budget with the language model's matched-parameter rule
(``model.match_params``, ``model.match_by``, ``model.match_tolerance``; see
:class:`CopyingModelConfig` and :func:`amlp.tasks.lm.matching.match_params`); the evaluation then
also reports ``matched_dim`` or ``matched_qk_rank`` (and ``matched_mlp_hidden`` when the rule set
the MLP's width).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...models.decoder import DecoderLM, greedy_decode, greedy_decode_full
from ..lm.config import LMModelConfig
from ..lm.matching import MatchResult, match_params
from .config import CopyingDataConfig, DecoderModelConfig, MQARDataConfig
from .data import (COPY_VOCAB_SIZE, IGNORE_INDEX, CopyingDataset, MQARDataset, copy_hard_accuracy, copy_length)


def _unwrap(model):
    return getattr(model, "module", model)


def _train_size(config, given: int | None) -> int:
    if given is not None:
        return given
    steps = config.train.max_steps or 1000 * config.train.epochs
    return config.train.batch_size * steps


@dataclass
class CopyingModelConfig(LMModelConfig):
    """The decoder of the copying task, with the language model's matched-parameter rule: with
    ``match_params: N`` the width (or, for HyperMLP/HyperGLU, the QK rank; see ``match_by``) is chosen
    so that the parameter count is within ``match_tolerance`` of N, for the longest input of the
    config's splits (:class:`amlp.tasks.lm.config.LMModelConfig` documents the three keys). The
    mixer options are used as given. Without ``match_params`` the model is the config's."""


def _build_decoder(config, vocab_size: int, max_length: int, match: MatchResult | None = None) -> DecoderLM:
    m: DecoderModelConfig = config.model
    length = m.max_length or max_length
    if length < max_length:
        raise ValueError(f"config key 'model.max_length' ({length}) is shorter than the longest input "
                         f"({max_length})")
    dim, options, mlp_ratio, rule = m.dim, m.options, m.mlp_ratio, ""
    if match is not None:
        dim = match.dim
        if match.by == "qk_rank":
            options = {**options, "qk_rank": match.value}
        if match.mlp_hidden is not None:
            mlp_ratio = match.mlp_hidden / match.dim
        mlp = f" (MLP {match.mlp_hidden} wide)" if match.mlp_hidden is not None else ""
        rule = (f"; matched to {match.target:,} parameters by {match.by} = {match.value}{mlp} "
                f"({100 * match.deviation:+.2f} %)")
    model = DecoderLM(vocab_size, length, dim=dim, heads=m.heads, n_layers=m.n_layers, mixer=m.mixer,
                      block=m.block, mlp_ratio=mlp_ratio, dropout=m.dropout, mixer_options=options,
                      embed_init_std=m.embed_init_std)
    print(f"{config.task}: decoder with {m.n_layers} x {model.block_type} block(s), mixer {m.mixer}, "
          f"dim {dim}: {model.num_parameters():,} parameters{rule}", file=sys.stderr, flush=True)
    return model


def _token_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["tokens"], x_mask=batch["mask"]).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1),
                           ignore_index=IGNORE_INDEX)
    return loss, logits


class _TokenPredictionTask:
    """What the recall tasks share: fixed splits built in ``__init__`` and a next-token loss on the
    positions whose target is not ignored."""

    _splits: dict

    def dataset(self, split: str):
        return self._splits.get(split)

    def loss(self, model, batch) -> torch.Tensor:
        return _token_loss(model, batch)[0]


class CopyingTask(_TokenPredictionTask):
    data_config = CopyingDataConfig
    model_config = CopyingModelConfig

    def __init__(self, config):
        self.config = config
        d: CopyingDataConfig = config.data
        self.max_input = copy_length(max(d.train_lengths + d.eval_lengths))
        self.match: MatchResult | None = None
        self._splits = {
            "train": CopyingDataset(_train_size(config, d.train_examples), d.train_lengths, d.data_seed,
                                    pad_to=self.max_input),
            "val": CopyingDataset(d.val_examples, d.train_lengths, d.data_seed + 1, pad_to=self.max_input),
            "test": _ConcatByLength([CopyingDataset(d.test_examples, [n], d.data_seed + 2 + n, pad_to=self.max_input)
                                     for n in d.eval_lengths]),
        }

    def matched_size(self) -> MatchResult | None:
        """The outcome of the matched-parameter rule (None without ``model.match_params``)."""
        m: CopyingModelConfig = self.config.model
        if m.match_params is None:
            return None
        return match_params(m.match_params, vocab_size=COPY_VOCAB_SIZE, max_length=m.max_length or self.max_input,
                            dim=m.dim, heads=m.heads, n_layers=m.n_layers, mixer=m.mixer, block=m.block,
                            mlp_ratio=m.mlp_ratio, mixer_options=m.options, by=m.match_by,
                            tolerance=m.match_tolerance)

    def build_model(self) -> DecoderLM:
        self.match = self.matched_size()
        return _build_decoder(self.config, COPY_VOCAB_SIZE, self.max_input, self.match)

    def evaluate(self, model, batches) -> dict[str, float]:
        net = _unwrap(model)
        loss_sum, n_targets = 0.0, 0
        soft, hard = defaultdict(list), defaultdict(list)
        for batch in batches:
            loss, logits = _token_loss(model, batch)
            count = int((batch["targets"] != IGNORE_INDEX).sum())
            loss_sum += float(loss) * count
            n_targets += count
            scored = batch["targets"] != IGNORE_INDEX
            correct = (logits.argmax(-1) == batch["targets"]) & scored
            per_sample = correct.sum(1).double() / scored.sum(1).clamp_min(1).double()
            lengths = batch["length"]
            for S in lengths.unique().tolist():
                rows = (lengths == S).nonzero().squeeze(1)
                soft[S] += per_sample[rows].tolist()
                tokens = batch["tokens"][rows]
                prompt, strings = tokens[:, :S + 2], tokens[:, 1:S + 1]
                decode = greedy_decode if net.recurrent else greedy_decode_full
                generated = decode(net, prompt, S + 1)
                hard[S] += copy_hard_accuracy(generated, strings).tolist()
        every_soft = [v for S in sorted(soft) for v in soft[S]]
        every_hard = [v for S in sorted(hard) for v in hard[S]]
        out = {"loss": loss_sum / max(n_targets, 1), "soft_acc": sum(every_soft) / max(len(every_soft), 1),
               "hard_acc": sum(every_hard) / max(len(every_hard), 1)}
        if len(hard) > 1:
            for S in sorted(hard):
                out[f"soft_acc_len{S}"] = sum(soft[S]) / len(soft[S])
                out[f"hard_acc_len{S}"] = sum(hard[S]) / len(hard[S])
        longest = max(hard) if hard else self.config.data.string_len
        out["params"] = float(net.num_parameters())
        size = net.state_size(copy_length(longest))
        out["state_size"] = float("nan") if size is None else float(size)
        match = self.match if self.match is not None else self.matched_size()
        if match is not None:
            out[f"matched_{match.by}"] = float(match.value)
            if match.mlp_hidden is not None:
                out["matched_mlp_hidden"] = float(match.mlp_hidden)
        return out


class _ConcatByLength(torch.utils.data.ConcatDataset):
    """Concatenation of per-length (or per-pair-count) test sets."""


class MQARTask(_TokenPredictionTask):
    data_config = MQARDataConfig
    model_config = DecoderModelConfig

    def __init__(self, config):
        self.config = config
        d: MQARDataConfig = config.data
        common = dict(vocab_size=d.vocab_size, seq_len=d.seq_len, power_a=d.power_a, random_filler=d.random_filler)
        self._splits = {
            "train": MQARDataset(_train_size(config, d.train_examples), num_pairs=d.num_pairs, seed=d.data_seed,
                                 **common),
            "val": MQARDataset(d.val_examples, num_pairs=d.num_pairs, seed=d.data_seed + 1, **common),
            "test": _ConcatByLength([MQARDataset(d.test_examples, num_pairs=p, seed=d.data_seed + 2 + p, **common)
                                     for p in (d.test_pairs or [d.num_pairs])]),
        }

    def build_model(self) -> DecoderLM:
        return _build_decoder(self.config, self.config.data.vocab_size, self.config.data.seq_len)

    def evaluate(self, model, batches) -> dict[str, float]:
        net = _unwrap(model)
        loss_sum, n_queries = 0.0, 0
        correct_by_pairs, count_by_pairs = defaultdict(int), defaultdict(int)
        for batch in batches:
            loss, logits = _token_loss(model, batch)
            queries = batch["targets"] != IGNORE_INDEX
            per_row = queries.sum(1)
            count = int(per_row.sum())
            loss_sum += float(loss) * count
            n_queries += count
            correct = ((logits.argmax(-1) == batch["targets"]) & queries).sum(1)
            for p in per_row.unique().tolist():
                rows = per_row == p
                correct_by_pairs[p] += int(correct[rows].sum())
                count_by_pairs[p] += int(per_row[rows].sum())
        out = {"loss": loss_sum / max(n_queries, 1),
               "acc": sum(correct_by_pairs.values()) / max(sum(count_by_pairs.values()), 1)}
        if len(count_by_pairs) > 1:
            for p in sorted(count_by_pairs):
                out[f"acc_pairs{p}"] = correct_by_pairs[p] / count_by_pairs[p]
        out["params"] = float(net.num_parameters())
        size = net.state_size(self.config.data.seq_len)
        out["state_size"] = float("nan") if size is None else float(size)
        return out
