"""The character-level language-modelling task of the training loop (tiny Shakespeare by default).

Training: next-character cross-entropy over random windows of ``data.seq_len`` characters of the
training text (:class:`amlp.tasks.lm.data.TrainWindows`; the loop draws them in a seeded order, so a
run resumes exactly). Any causal mixer, through :class:`amlp.models.decoder.DecoderLM`.

Evaluation (the ``val`` split: non-overlapping windows over the whole validation text) reports

* ``loss``: the mean negative log-likelihood in nats over every predicted character,
* ``bpc``: bits per character, ``loss / ln 2``,
* ``chars``: the number of characters predicted,
* ``params`` and, with the matched-parameter rule, ``matched_dim`` or ``matched_qk_rank`` (and
  ``matched_mlp_hidden`` when the rule set the MLP's width).

There is no test split (the usual protocol reports validation numbers). Every checkpoint carries the
vocabulary, and the outcome of the matched-parameter rule, in ``vocab.json``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from ...models.decoder import DecoderLM
from .config import LMDataConfig, LMModelConfig
from .data import (IGNORE_INDEX, VOCAB_FILE, CharVocab, EvalWindows, TrainWindows, find_text_file, read_text,
                   split_text)
from .matching import MatchResult, match_params, model_options

LN2 = math.log(2.0)


def _unwrap(model):
    return getattr(model, "module", model)


def bits_per_char(nll: float | torch.Tensor) -> float | torch.Tensor:
    """Bits per character of a mean negative log-likelihood in nats: ``nll / ln 2``."""
    return nll / LN2


def lm_loss(model, tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (nats) of ``model(tokens)`` against ``targets`` ``[B, T]``, over the
    positions whose target is not :data:`IGNORE_INDEX` (``mean`` or ``sum``)."""
    logits = model(tokens, x_mask=mask)
    if logits.dtype in (torch.float16, torch.bfloat16):  # the softmax in float32 under autocast
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


class LMTask:
    data_config = LMDataConfig
    model_config = LMModelConfig

    def __init__(self, config):
        self.config = config
        d: LMDataConfig = config.data
        m: LMModelConfig = config.model
        self.max_length = m.max_length or d.seq_len
        if self.max_length < d.seq_len:
            raise ValueError(f"config key 'model.max_length' ({self.max_length}) is shorter than data.seq_len "
                             f"({d.seq_len})")
        self._texts: tuple[str, str] | None = None
        self._splits: dict[str, torch.utils.data.Dataset] = {}
        self.match: MatchResult | None = None
        if d.vocab is not None:
            self.vocab, _ = CharVocab.load(d.vocab)
        else:
            self.vocab = CharVocab.from_text(self.texts()[0])

    # -- data ---------------------------------------------------------------------------------------
    def texts(self) -> tuple[str, str]:
        """(training text, validation text), read on first use (a model loaded from a checkpoint
        needs no text to generate)."""
        if self._texts is None:
            d: LMDataConfig = self.config.data
            path = find_text_file(d.file, d.data_dir)
            text = read_text(path)
            train, val = split_text(text, d.train_fraction)
            if len(train) < d.seq_len + 1 or len(val) < 2:
                raise ValueError(f"{str(path)!r} has {len(text)} characters: too few for a training window of "
                                 f"data.seq_len + 1 = {d.seq_len + 1} and a validation text")
            self._texts = (train, val)
        return self._texts

    def dataset(self, split: str):
        if split not in ("train", "val"):
            return None
        if split not in self._splits:
            train, val = self.texts()
            seq_len = self.config.data.seq_len
            if split == "train":
                ids = self.vocab.encode_tensor(train, "the training text")
                self._splits[split] = TrainWindows(ids, seq_len)
            else:
                ids = self.vocab.encode_tensor(val, "the validation text")
                self._splits[split] = EvalWindows(ids, seq_len)
        return self._splits[split]

    def checkpoint_files(self) -> dict[str, bytes]:
        extra = {}
        if self.match is not None:
            extra["matched"] = self.match.as_dict()
        return {VOCAB_FILE: self.vocab.to_json(**extra)}

    @staticmethod
    def checkpoint_overrides(path: str | os.PathLike) -> list[str]:
        """Read the vocabulary from the checkpoint itself, wherever the text is."""
        own = Path(path) / VOCAB_FILE
        return [f"data.vocab={own}"] if own.is_file() else []

    # -- model ----------------------------------------------------------------------------------------
    def model_sizes(self) -> tuple[int, dict, float]:
        """(width, mixer options, MLP ratio) of the model: the config's, or those the matched-parameter
        rule chose."""
        m: LMModelConfig = self.config.model
        options = model_options(m.mixer, m.options, self.max_length)
        if m.match_params is None:
            self.match = None
            return m.dim, options, m.mlp_ratio
        self.match = match_params(m.match_params, vocab_size=len(self.vocab), max_length=self.max_length, dim=m.dim,
                                  heads=m.heads, n_layers=m.n_layers, mixer=m.mixer, block=m.block,
                                  mlp_ratio=m.mlp_ratio, mixer_options=options, by=m.match_by,
                                  tolerance=m.match_tolerance)
        if self.match.by == "qk_rank":
            options["qk_rank"] = self.match.value
        ratio = m.mlp_ratio if self.match.mlp_hidden is None else self.match.mlp_hidden / self.match.dim
        return self.match.dim, options, ratio

    def build_model(self) -> DecoderLM:
        m: LMModelConfig = self.config.model
        dim, options, mlp_ratio = self.model_sizes()
        model = DecoderLM(len(self.vocab), self.max_length, dim=dim, heads=m.heads, n_layers=m.n_layers, mixer=m.mixer,
                          block=m.block, mlp_ratio=mlp_ratio, dropout=m.dropout, mixer_options=options,
                          embed_init_std=m.embed_init_std)
        rule = ""
        if self.match is not None:
            mlp = f" (MLP {self.match.mlp_hidden} wide)" if self.match.mlp_hidden is not None else ""
            rule = (f"; matched to {self.match.target:,} parameters by {self.match.by} = {self.match.value}{mlp} "
                    f"({100 * self.match.deviation:+.2f} %)")
        print(f"lm: {m.n_layers} x {model.block_type} block(s), mixer {m.mixer}, dim {dim}, {len(self.vocab)} "
              f"characters: {model.num_parameters():,} parameters{rule}", file=sys.stderr, flush=True)
        return model

    def loss(self, model, batch) -> torch.Tensor:
        return lm_loss(model, batch["tokens"], batch["targets"], batch.get("mask"))

    def evaluate(self, model, batches: Iterable[dict]) -> dict[str, float]:
        net = _unwrap(model)
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for batch in batches:
            nll = lm_loss(model, batch["tokens"], batch["targets"], batch.get("mask"), reduction="sum")
            total += nll.detach().double().cpu()
            count += int((batch["targets"] != IGNORE_INDEX).sum())
        loss = float(total) / max(count, 1)
        out = {"loss": loss, "bpc": bits_per_char(loss), "chars": float(count), "params": float(net.num_parameters())}
        if self.match is not None:
            out[f"matched_{self.match.by}"] = float(self.match.value)
            if self.match.mlp_hidden is not None:
                out["matched_mlp_hidden"] = float(self.match.mlp_hidden)
        return out


def config_match_report(config, mixers: list[str] | None = None) -> list[MatchResult]:
    """The matched-parameter rule of ``config`` (its ``model.match_params`` target, sizes and
    per-mixer options) applied to each of ``mixers`` (default: every causal mixer in the registry,
    AMLP in its form from ``model.mixer_options``, else ``stable``)."""
    from ...layers import mixer_names
    from ...layers.registry import choice_options
    from .matching import match_report

    m: LMModelConfig = config.model
    if m.match_params is None:
        raise ValueError("the config sets no model.match_params target")
    task = LMTask(config)
    mixers = list(mixers) if mixers is not None else mixer_names(causal=True)
    options = {name: dict(opts) for name, opts in m.mixer_options.items()}
    for name in mixers:
        combos = choice_options(name, causal=True)
        if combos and not all(k in options.get(name, {}) for k in combos[0]):
            pick = next((c for c in combos if "stable" in c.values()), combos[0])
            options[name] = {**pick, **options.get(name, {})}
    return match_report(m.match_params, mixers, vocab_size=len(task.vocab), max_length=task.max_length, dim=m.dim,
                        heads=m.heads, n_layers=m.n_layers, block=m.block, mlp_ratio=m.mlp_ratio,
                        mixer_options=options, by=m.match_by, tolerance=m.match_tolerance)
