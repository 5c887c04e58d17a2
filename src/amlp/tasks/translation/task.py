"""The translation task of the training loop: AR Transformer or GLAT on Multi30k, BLEU with sacrebleu.

Training loss:

* AR (``model.arch: transformer``): label-smoothed cross-entropy of the teacher-forced decoder
  (input ``[BOS] + y``, output ``y + [EOS]``) over real target positions.
* GLAT (``model.arch: glat``): a first parallel pass without gradient gives the Hamming distance
  ``d`` between its argmax and the target; ``floor(ratio * d)`` target positions, drawn uniformly
  among the real ones, are revealed to the second pass (:func:`glancing_reveal`); label-smoothed
  cross-entropy on the positions not revealed, plus ``length_loss_weight`` x the cross-entropy of the
  length classifier. The ratio goes linearly from ``glance_start`` to ``glance_end`` over training.

Evaluation reports ``loss`` (token cross-entropy without smoothing, teacher-forced for AR, from the
copied inputs with nothing revealed for GLAT), ``bleu`` and ``chrf`` (sacrebleu, detokenised output
against the raw references; :func:`bleu_signature` gives the signature), ``params``. Validation
during training decodes greedily (AR) and with the configured length beam (GLAT); the test split
decodes with the configured beam.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from ...models.translation import BOS, EOS, GLAT, PAD, TransformerMT
from ...models.translation_decoding import ar_greedy, beam_search, nar_decode
from .config import TranslationDataConfig, TranslationModelConfig
from .data import (PairDataset, Tokenizer, cached_tokenizer, collate_pairs, read_split, token_batches)

TOKENIZER_FILE = "tokenizer.model"


def _unwrap(model):
    return getattr(model, "module", model)


def _signature(metric) -> str:
    metric.corpus_score(["a"], [["a"]])  # sacrebleu fills the signature once it has scored
    return str(metric.get_signature())


def bleu_signature() -> str:
    """sacrebleu's signature of the BLEU that :func:`corpus_scores` computes (one reference)."""
    import sacrebleu

    return _signature(sacrebleu.metrics.BLEU())


def chrf_signature() -> str:
    import sacrebleu

    return _signature(sacrebleu.metrics.CHRF())


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenisation, mixed case) of detokenised text."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return {"bleu": float(sacrebleu.metrics.BLEU().corpus_score(hypotheses, [references]).score),
            "chrf": float(sacrebleu.metrics.CHRF().corpus_score(hypotheses, [references]).score)}


def glancing_reveal(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, ratio: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Positions revealed to GLAT's second pass: per row, ``floor(ratio * d)`` real positions drawn
    uniformly without replacement, where ``d`` is the number of real positions at which
    ``prediction`` differs from ``target`` (Qian et al. 2021, eq. 6). ``[B, T]`` bool."""
    distance = ((prediction != target) & mask).sum(1)
    count = torch.floor(distance.double() * ratio).long()
    noise = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device)
    noise = torch.where(mask, noise, torch.full_like(noise, 2.0))
    order = noise.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(mask.shape[1], device=mask.device).expand_as(order))
    return (rank < count[:, None]) & mask


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed loss, plain negative log-likelihood), both means over the rows of ``logits``
    ``[N, V]`` (the real positions only, selected by the caller)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, target, label_smoothing=smoothing)
    with torch.no_grad():
        nll = F.cross_entropy(logits, target) if smoothing else loss.detach()
    return loss, nll


def ar_inputs(tgt: torch.Tensor, tgt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decoder input ``[BOS] + y``, output ``y + [EOS]``, mask) for the teacher-forced AR decoder."""
    B = tgt.shape[0]
    lengths = tgt_mask.sum(1)
    inp = torch.cat([torch.full((B, 1), BOS, dtype=tgt.dtype, device=tgt.device), tgt], dim=1)
    out = torch.cat([tgt, torch.full((B, 1), PAD, dtype=tgt.dtype, device=tgt.device)], dim=1)
    out = out.scatter(1, lengths[:, None], EOS)
    mask = torch.arange(out.shape[1], device=tgt.device)[None, :] <= lengths[:, None]
    return inp, out, mask


class TranslationTask:
    data_config = TranslationDataConfig
    model_config = TranslationModelConfig

    def __init__(self, config):
        self.config = config
        d: TranslationDataConfig = config.data
        self.progress_fraction = 0.0
        if d.tokenizer is not None:
            self.tokenizer = Tokenizer.load(d.tokenizer)
        else:
            train_src, train_tgt = read_split("train", d.source, d.target, d.data_dir, d.files)
            # one joint model per language pair, whichever the direction
            sides = sorted([(d.source, train_src), (d.target, train_tgt)], key=lambda side: side[0])
            self.tokenizer, _ = cached_tokenizer(sides[0][1] + sides[1][1], d.vocab_size, d.spm_model_type, 1.0,
                                                 d.cache_dir)
        self._splits: dict[str, PairDataset] = {}
        #: loop split -> corpus split; the corpus's own names are accepted too (``amlp eval --split``)
        names = list(d.files) if d.files is not None else ["test2016", "test2017", "mscoco2017"]
        self._split_names = {"train": "train", "val": "val", "test": d.test_split, **{n: n for n in names}}

    # -- data ---------------------------------------------------------------------------------------
    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(line) for line in lines]

    def _load(self, split: str) -> PairDataset:
        d: TranslationDataConfig = self.config.data
        name = self._split_names[split]
        src_lines, tgt_lines = read_split(name, d.source, d.target, d.data_dir, d.files)
        if split == "train" and d.distill_from:
            tgt_lines = distilled_targets(d.distill_from, src_lines, self.config)
        elif split == "train" and d.distill_file:
            tgt_lines = read_distill_file(d.distill_file, len(src_lines))
        src, tgt = self.encode_lines(src_lines), self.encode_lines(tgt_lines)
        limit = min(d.max_train_length, self.config.model.max_length)
        if split == "train":
            keep = [i for i in range(len(src)) if 0 < len(src[i]) <= limit and 0 < len(tgt[i]) <= limit]
            src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
            return PairDataset(src, tgt)
        return PairDataset(src, tgt, refs=tgt_lines, sources=src_lines)

    def dataset(self, split: str) -> PairDataset | None:
        if split not in self._split_names:
            return None
        if split not in self._splits:
            self._splits[split] = self._load(split)
        return self._splits[split]

    collate = staticmethod(collate_pairs)

    def batches(self, split: str) -> list[list[int]]:
        """Index batches of ``split`` by tokens (the training loop shuffles their order every epoch)."""
        data = self.dataset(split)
        lengths = [data.num_tokens(i) + 1 for i in range(len(data))]
        return token_batches(lengths, self.config.data.max_tokens)

    def set_progress(self, step: int, total_steps: int) -> None:
        self.progress_fraction = step / max(total_steps, 1)

    def checkpoint_files(self) -> dict[str, bytes]:
        return {TOKENIZER_FILE: self.tokenizer.proto}

    @staticmethod
    def checkpoint_overrides(path: str | os.PathLike) -> list[str]:
        """Read the tokenizer from the checkpoint itself, wherever the cache is."""
        own = Path(path) / TOKENIZER_FILE
        return [f"data.tokenizer={own}"] if own.is_file() else []

    # -- model ----------------------------------------------------------------------------------------
    def build_model(self):
        m: TranslationModelConfig = self.config.model
        cls = TransformerMT if m.arch == "transformer" else GLAT
        model = cls(self.tokenizer.vocab_size, m.max_length, dim=m.dim, heads=m.heads, ffn_dim=m.ffn_dim,
                    encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
                    encoder_mixer=m.encoder_mixer, self_mixer=m.self_mixer, cross_mixer=m.cross_mixer,
                    encoder_options=m.encoder_options, self_options=m.self_options, cross_options=m.cross_options,
                    dropout=m.dropout, positions=m.positions)
        print(f"translation {self.config.data.source}->{self.config.data.target}: {m.arch} "
              f"({m.encoder_mixer} / {m.self_mixer} / {m.cross_mixer}), {model.num_parameters():,} parameters",
              file=sys.stderr, flush=True)
        return model

    @property
    def glance_ratio(self) -> float:
        m = self.config.model
        return m.glance_start + (m.glance_end - m.glance_start) * min(max(self.progress_fraction, 0.0), 1.0)

    def loss(self, model, batch) -> torch.Tensor:
        return self._losses(model, batch, glance=True)[0]

    def _losses(self, model, batch, *, glance: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        m: TranslationModelConfig = self.config.model
        net = _unwrap(model)
        src, src_mask, tgt, tgt_mask = batch["src"], batch["src_mask"], batch["tgt"], batch["tgt_mask"]
        if isinstance(net, TransformerMT):
            inp, out, mask = ar_inputs(tgt, tgt_mask)
            logits = model(src, src_mask, inp, mask, select=mask)
            loss, nll = smoothed_cross_entropy(logits, out[mask], m.label_smoothing)
            return loss, nll, int(mask.sum())
        revealed = None
        if glance and model.training and m.glance_start + m.glance_end > 0:
            with torch.no_grad():
                first, _ = model(src, src_mask, tgt_mask)
                revealed = glancing_reveal(first.argmax(-1), tgt, tgt_mask, self.glance_ratio)
        scored = tgt_mask if revealed is None else tgt_mask & ~revealed
        logits, length_logits = model(src, src_mask, tgt_mask, revealed=revealed, tgt=tgt, select=scored)
        if logits.shape[0] == 0:  # everything revealed: only the length is learned from this batch
            loss = nll = logits.sum()
        else:
            loss, nll = smoothed_cross_entropy(logits, tgt[scored], m.label_smoothing)
        lengths = tgt_mask.sum(1).clamp_max(net.max_length)
        length_loss = F.cross_entropy(length_logits.float(), lengths)
        return loss + m.length_loss_weight * length_loss, nll, int(scored.sum())

    # -- evaluation -----------------------------------------------------------------------------------
    def decode(self, model, src, src_mask, *, search: str) -> list[list[int]]:
        """Token ids per row. ``search``: ``greedy`` or ``beam`` (AR); NAR always uses its length beam,
        mask-predict iterations and ``collapse_repeats`` from the config."""
        m: TranslationModelConfig = self.config.model
        net = _unwrap(model)
        if isinstance(net, GLAT):
            return nar_decode(net, src, src_mask, length_beam=m.length_beam, iterations=m.iterations,
                              collapse_repeats=m.collapse_repeats)
        if search == "greedy" or m.beam == 1:
            return ar_greedy(net, src, src_mask, max_len_a=m.max_len_a, max_len_b=m.max_len_b)
        return beam_search(net, src, src_mask, beam=m.beam, length_penalty=m.length_penalty,
                           max_len_a=m.max_len_a, max_len_b=m.max_len_b)

    def evaluate(self, model, batches: Iterable[dict], split: str = "val") -> dict[str, float]:
        net = _unwrap(model)
        data = self.dataset(split)
        limit = self.config.data.val_bleu_examples if split == "val" else None
        search = "greedy" if split == "val" else "beam"
        nll_sum, count = 0.0, 0
        hypotheses: dict[int, str] = {}
        for batch in batches:
            # the loss over the pairs whose target fits the model's positions (BOS included for AR);
            # BLEU over every pair
            room = net.max_length - (1 if isinstance(net, TransformerMT) else 0)
            fits = batch["tgt_mask"].sum(1) <= room
            if bool(fits.any()):
                part = {k: v[fits] for k, v in batch.items()}
                width = int(part["tgt_mask"].sum(1).max())
                part["tgt"], part["tgt_mask"] = part["tgt"][:, :width], part["tgt_mask"][:, :width]
                _, nll, n = self._losses(model, part, glance=False)
                nll_sum += float(nll) * n
                count += n
            rows = torch.ones_like(batch["index"], dtype=torch.bool) if limit is None else batch["index"] < limit
            if not bool(rows.any()):
                continue
            keep = batch["index"][rows]
            src, src_mask = batch["src"][rows], batch["src_mask"][rows]
            width = int(src_mask.sum(1).max())
            for i, ids in zip(keep.tolist(), self.decode(net, src[:, :width], src_mask[:, :width], search=search)):
                hypotheses[i] = self.tokenizer.decode(ids)
        order = sorted(hypotheses)
        scores = corpus_scores([hypotheses[i] for i in order], [data.refs[i] for i in order])
        return {"loss": nll_sum / max(count, 1), **scores, "params": float(net.num_parameters())}


# -- sequence-level knowledge distillation -------------------------------------------------------------------
def distilled_targets(teacher: str | os.PathLike, sources: list[str], config) -> list[str]:
    """The beam outputs of the AR checkpoint ``teacher`` on ``sources``, cached in the teacher's run folder
    (``<run>/distilled/<key>.txt``, one line per source) and reused while the sources, the teacher's
    weights and the beam are the same."""
    from ...train.loop import load_trained_model

    teacher = Path(teacher)
    d = config.data
    weights = teacher / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"data.distill_from: no checkpoint at {str(teacher)!r} (expected a checkpoint "
                                "folder with model.safetensors, e.g. <run>/checkpoints/best)")
    h = hashlib.sha256(weights.read_bytes())
    for line in sources:
        h.update(line.encode("utf-8") + b"\n")
    h.update(f"beam={d.distill_beam}".encode())
    run_dir = teacher.parent.parent if teacher.parent.name == "checkpoints" else teacher.parent
    cache = run_dir / "distilled" / f"{d.source}-{d.target}-{h.hexdigest()[:16]}.txt"
    if cache.is_file():
        lines = cache.read_text(encoding="utf-8").split("\n")[:-1]
        if len(lines) == len(sources):
            return lines
    tconfig, task, model = load_trained_model(teacher, [f"model.beam={d.distill_beam}"], device="auto")
    if tconfig.model.arch != "transformer":
        raise ValueError(f"data.distill_from: the teacher must be an AR model (model.arch: transformer), "
                         f"{str(teacher)!r} is {tconfig.model.arch!r}")
    if (tconfig.data.source, tconfig.data.target) != (d.source, d.target):
        raise ValueError(f"data.distill_from: the teacher translates {tconfig.data.source}->{tconfig.data.target}, "
                         f"this run {d.source}->{d.target}")
    threads = torch.get_num_threads()
    if config.train.threads:  # the run's thread budget holds for its distillation too
        torch.set_num_threads(config.train.threads)
    try:
        outputs = translate_lines(task, model, sources, batch_size=64, progress=True, search="beam",
                                  description="distilling")
    finally:
        torch.set_num_threads(threads)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in outputs), encoding="utf-8")
    os.replace(tmp, cache)
    (cache.with_suffix(".json")).write_text(json.dumps({"teacher": str(teacher), "beam": d.distill_beam,
                                                        "sentences": len(sources)}, indent=1))
    return outputs


def write_distill_file(path: str | os.PathLike, lines: list[str]) -> None:
    """Save distilled targets for ``data.distill_file``: one line each, gzip (with no time stamp, so the
    same lines give the same bytes) when ``path`` ends in ``.gz``."""
    path = Path(path)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.suffix == ".gz":
        import gzip

        data = gzip.compress(data, compresslevel=9, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_distill_file(path: str | os.PathLike, expected: int) -> list[str]:
    """The lines of a ``data.distill_file``; ``expected`` is the number of training sources they replace
    the targets of (a file of another length is refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.distill_file: no file at {str(path)!r}")
    data = path.read_bytes()
    if path.suffix == ".gz":
        import gzip

        data = gzip.decompress(data)
    lines = data.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != expected:
        raise ValueError(f"data.distill_file: {str(path)!r} has {len(lines)} line(s), the training split has "
                         f"{expected} source line(s); it must hold one target per source")
    return lines


def check_lines(task: TranslationTask, model, lines: list[str]) -> list[list[int]]:
    """Token ids of each input line; an empty line or one longer than the model accepts raises
    ``ValueError`` naming its line number (1-based)."""
    net = _unwrap(model)
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"line {n} is empty; give one sentence per line")
        ids = task.encode_lines([line.strip()])[0]
        if len(ids) > net.max_length:
            raise ValueError(f"line {n} has {len(ids)} subword tokens, more than the model's maximum of "
                             f"{net.max_length} (model.max_length); split it into shorter sentences")
        out.append(ids)
    return out


@torch.no_grad()
def translate_lines(task: TranslationTask, model, lines: list[str], *, batch_size: int = 64,
                    progress: bool = False, search: str = "beam", description: str = "translating") -> list[str]:
    """Translations of ``lines``, in their order (batches are formed by length and put back)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = check_lines(task, model, lines)
    device = next(_unwrap(model).parameters()).device
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    results: list[str | None] = [None] * len(ids)
    bar = tqdm(total=len(ids), desc=description, unit="line", disable=not progress, file=sys.stderr)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        src = torch.full((len(chunk), width), PAD, dtype=torch.long)
        for r, i in enumerate(chunk):
            src[r, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
        src = src.to(device)
        for i, out in zip(chunk, task.decode(model, src, src != PAD, search=search)):
            results[i] = task.tokenizer.decode(out)
        bar.update(len(chunk))
    bar.close()
    return [r if r is not None else "" for r in results]

