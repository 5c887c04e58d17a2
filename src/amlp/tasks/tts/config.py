"""Typed ``data:`` and ``model:`` sections of a text-to-speech config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class TTSDataConfig:
    """Which corpus, which batches (see :mod:`amlp.tasks.tts.corpus`)."""

    #: corpus folder: one built by ``amlp data synth-tts`` (manifest.json) or an LJSpeech folder
    #: (metadata.csv, wavs/, textgrids/)
    corpus: str = "data/tts-slt"
    #: the phone inventory and feature statistics; None: computed from the training split. Every
    #: checkpoint carries its own copy (``tts_vocab.json``)
    vocab: str | None = None
    #: mel frames per training batch: rows x the longest utterance of the batch
    max_frames_per_batch: int = 6000
    #: training utterances longer than this many frames or phones are left out
    max_train_frames: int = 1000
    max_train_phones: int = 200
    #: utterances of the validation split synthesised (Griffin-Lim + MCD/MSD) at each validation;
    #: None: all. The test split is always synthesised in full
    val_synth_examples: int | None = 16
    #: Griffin-Lim iterations used for the reported metrics and for ``amlp synthesize``
    griffin_lim_iters: int = 32

    def validate(self) -> None:
        if not self.corpus:
            raise ValueError("config key 'data.corpus' must name the corpus folder (amlp data synth-tts builds one)")
        for name in ("max_frames_per_batch", "max_train_frames", "max_train_phones", "griffin_lim_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'data.{name}' must be >= 1, got {getattr(self, name)}")
        if self.val_synth_examples is not None and self.val_synth_examples < 1:
            raise ValueError(f"config key 'data.val_synth_examples' must be >= 1 or null, got {self.val_synth_examples}")


@dataclass
class TTSModelConfig:
    """FastSpeech 2 (NAR) or Transformer-TTS (AR) (:mod:`amlp.models.tts`) and their losses."""

    #: ``fastspeech2`` (NAR) or ``transformer-tts`` (AR)
    arch: Literal["fastspeech2", "transformer-tts"] = "fastspeech2"
    dim: int = 256
    heads: int = 2
    ffn_dim: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    dropout: float = 0.2
    #: registry names of the mixers: encoder self, decoder self (causal for Transformer-TTS), decoder
    #: cross (Transformer-TTS only), and their options
    encoder_mixer: str = "softmax"
    decoder_mixer: str = "softmax"
    cross_mixer: str = "softmax"
    encoder_options: dict[str, Any] = field(default_factory=dict)
    decoder_options: dict[str, Any] = field(default_factory=dict)
    cross_options: dict[str, Any] = field(default_factory=dict)
    #: positions: the longest phone sequence and the longest mel sequence a model accepts
    max_phones: int = 256
    max_frames: int = 1200
    #: FastSpeech 2: variance predictors' width and the buckets of the pitch and energy embeddings
    variance_dim: int = 256
    bins: int = 256
    #: PostNet
    postnet_layers: int = 5
    postnet_dim: int = 512
    #: Transformer-TTS: width of the decoder pre-net, conv layers of the encoder pre-net
    prenet_dim: int = 256
    encoder_prenet_layers: int = 3
    #: Transformer-TTS: weight of positive (stop) frames in the stop-token loss, and the decision threshold
    stop_weight: float = 5.0
    stop_threshold: float = 0.5

    def validate(self) -> None:
        for name in ("dim", "heads", "ffn_dim", "encoder_layers", "decoder_layers", "max_phones", "max_frames",
                     "variance_dim", "bins", "postnet_layers", "postnet_dim", "prenet_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'model.{name}' must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"config key 'model.dim' ({self.dim}) must be divisible by model.heads ({self.heads})")
        if self.encoder_prenet_layers < 0:
            raise ValueError(f"config key 'model.encoder_prenet_layers' must be >= 0, got {self.encoder_prenet_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config key 'model.dropout' must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.stop_threshold < 1.0:
            raise ValueError(f"config key 'model.stop_threshold' must be in (0, 1), got {self.stop_threshold}")
        if self.stop_weight <= 0:
            raise ValueError(f"config key 'model.stop_weight' must be > 0, got {self.stop_weight}")
        from ...models.translation import check_ar_cross, check_site

        ar = self.arch == "transformer-tts"
        sites = [("encoder_mixer", "encoder self", False, False, self.encoder_options),
                 ("decoder_mixer", "decoder self", ar, False, self.decoder_options)]
        if ar:
            sites.append(("cross_mixer", "decoder cross", False, True, self.cross_options))
        for key, site, causal, cross, options in sites:
            try:
                check_site(getattr(self, key), site, causal=causal, cross=cross, options=options)
            except ValueError as err:
                raise ValueError(f"config key 'model.{key}': {err}") from None
        if ar:
            try:
                check_ar_cross(self.cross_mixer, self.cross_options)
            except ValueError as err:
                raise ValueError(f"config key 'model.cross_mixer': {err}") from None
