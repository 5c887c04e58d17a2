"""Typed ``data:`` and ``model:`` sections of a translation config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class TranslationDataConfig:
    """Which direction, which subwords, which batches (see :mod:`amlp.tasks.translation.data`)."""

    #: language codes: the file suffixes (Multi30k has en and de)
    source: str = "en"
    target: str = "de"
    #: folder holding multi30k/ (None: $AMLP_DATA_DIR, else ../shared/data beside the repository, else ./data)
    data_dir: str | None = None
    #: a corpus of one's own instead of Multi30k: split name (train, val and the test split) -> path
    #: prefix of ``<prefix>.<source>`` / ``<prefix>.<target>`` (plain or .gz), e.g. a distilled WMT14
    files: dict[str, str] | None = None
    #: the joint sentencepiece model; None: trained on the training split (both sides) and cached
    #: in ``cache_dir``; every checkpoint carries a copy (``tokenizer.model``)
    tokenizer: str | None = None
    vocab_size: int = 8000
    spm_model_type: Literal["unigram", "bpe"] = "unigram"
    cache_dir: str = "runs/cache/translation"
    #: tokens per training batch: rows x the longest side of the batch (fairseq's ``--max-tokens``)
    max_tokens: int = 4096
    #: training pairs with a side longer than this many subwords are left out
    max_train_length: int = 100
    #: split reported by the final test: test2016 (the standard), test2017 or mscoco2017 (or a
    #: split of ``files``)
    test_split: str = "test2016"
    #: checkpoint of a trained AR model: the training targets become its beam outputs on the training
    #: sources (sequence-level knowledge distillation, Kim and Rush 2016), cached in its run folder
    distill_from: str | None = None
    distill_beam: int = 4
    #: a file of training targets, one line per line of the training split's sources (plain text, or
    #: gzip when it ends in ``.gz``): distilled targets saved earlier (the translation study keeps its
    #: teachers' beam outputs so), used instead of a teacher checkpoint; excludes ``distill_from``
    distill_file: str | None = None
    #: validation pairs decoded for BLEU during training (None: all)
    val_bleu_examples: int | None = None

    def validate(self) -> None:
        for name in ("source", "target"):
            code = getattr(self, name)
            if not code or not code.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"config key 'data.{name}' must be a language code such as en or de, got {code!r}")
        if self.files is not None:
            missing = [s for s in ("train", "val", self.test_split) if s not in self.files]
            if missing:
                raise ValueError(f"config key 'data.files' needs the splits train, val and data.test_split "
                                 f"({self.test_split}); missing: {', '.join(missing)}")
        else:
            from .data import SPLITS

            if self.test_split not in SPLITS or self.test_split == "train":
                raise ValueError(f"config key 'data.test_split' must be one of val, test2016, test2017, mscoco2017 "
                                 f"for Multi30k, got {self.test_split!r}")
        if self.source == self.target:
            raise ValueError(f"config keys 'data.source' and 'data.target' must differ, both are {self.source!r}")
        for name in ("vocab_size", "max_tokens", "max_train_length", "distill_beam"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'data.{name}' must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 16:
            raise ValueError(f"config key 'data.vocab_size' must be >= 16, got {self.vocab_size}")
        if self.distill_from and self.distill_file:
            raise ValueError("config keys 'data.distill_from' and 'data.distill_file' are two sources of distilled "
                             "targets: set one")
        if self.val_bleu_examples is not None and self.val_bleu_examples < 1:
            raise ValueError(f"config key 'data.val_bleu_examples' must be >= 1 or null, got {self.val_bleu_examples}")


@dataclass
class TranslationModelConfig:
    """The encoder-decoder (:mod:`amlp.models.translation`), its training loss and its decoding."""

    #: ``transformer`` (AR, :class:`~amlp.models.translation.TransformerMT`) or ``glat`` (NAR)
    arch: Literal["transformer", "glat"] = "transformer"
    dim: int = 256
    heads: int = 4
    ffn_dim: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    dropout: float = 0.1
    #: positions per stack: the longest source or target accepted
    max_length: int = 128
    #: ``learned`` or ``sinusoidal`` (fixed, fairseq's default for the Transformer and GLAT)
    positions: Literal["learned", "sinusoidal"] = "learned"
    #: registry names of the mixers at the three sites, and their options
    encoder_mixer: str = "softmax"
    self_mixer: str = "softmax"
    cross_mixer: str = "softmax"
    encoder_options: dict[str, Any] = field(default_factory=dict)
    self_options: dict[str, Any] = field(default_factory=dict)
    cross_options: dict[str, Any] = field(default_factory=dict)
    label_smoothing: float = 0.1
    #: GLAT: glancing ratio, annealed linearly from ``glance_start`` to ``glance_end`` over training
    glance_start: float = 0.5
    glance_end: float = 0.3
    #: GLAT: weight of the length-prediction loss
    length_loss_weight: float = 0.1
    #: decoding: AR beam size (1 = greedy) and length penalty; NAR length beam and mask-predict iterations
    beam: int = 4
    length_penalty: float = 1.0
    length_beam: int = 3
    iterations: int = 1
    #: NAR: collapse runs of one repeated token in the output to a single token (the post-processing of
    #: Lee et al. 2018 and later NAR work; off by default, as the GLAT and AMLP papers report one pass)
    collapse_repeats: bool = False
    #: AR output length limit: ``max_len_a * source length + max_len_b``
    max_len_a: float = 1.2
    max_len_b: int = 10

    def validate(self) -> None:
        for name in ("dim", "heads", "ffn_dim", "encoder_layers", "decoder_layers", "max_length", "beam",
                     "length_beam", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'model.{name}' must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"config key 'model.dim' ({self.dim}) must be divisible by model.heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config key 'model.dropout' must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"config key 'model.label_smoothing' must be in [0, 1), got {self.label_smoothing}")
        for name in ("glance_start", "glance_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"config key 'model.{name}' must be in [0, 1], got {getattr(self, name)}")
        from ...models.translation import check_ar_cross, check_site

        sites = (("encoder_mixer", "encoder self", False, False, self.encoder_options),
                 ("self_mixer", "decoder self", self.arch == "transformer", False, self.self_options),
                 ("cross_mixer", "decoder cross", False, True, self.cross_options))
        for key, site, causal, cross, options in sites:
            try:
                check_site(getattr(self, key), site, causal=causal, cross=cross, options=options)
            except ValueError as err:
                raise ValueError(f"config key 'model.{key}': {err}") from None
        if self.arch == "transformer" and self.collapse_repeats:
            raise ValueError("config key 'model.collapse_repeats' applies to NAR decoding (model.arch: glat); "
                             "AR decoding keeps its searched output")
        if self.arch == "transformer":
            try:
                check_ar_cross(self.cross_mixer, self.cross_options)
            except ValueError as err:
                raise ValueError(f"config key 'model.cross_mixer': {err}") from None
