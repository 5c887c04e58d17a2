"""Typed ``data:`` and ``model:`` sections of a character-level language-modelling config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..recall.config import DecoderModelConfig
from .data import DEFAULT_FILE

MATCH_BY = ("auto", "dim", "qk_rank")


@dataclass
class LMDataConfig:
    """The text and its windows (see :mod:`amlp.tasks.lm.data`)."""

    #: folder holding the text file (None: $AMLP_DATA_DIR, else ../shared/data beside the repository,
    #: else ./data)
    data_dir: str | None = None
    #: the text file, under data_dir (or an absolute path)
    file: str = DEFAULT_FILE
    #: the first train_fraction of the characters is training text, the rest validation text
    train_fraction: float = 0.9
    #: characters per training window (the model's context); validation uses windows of the same length
    seq_len: int = 256
    #: a vocab.json to use instead of the training text's characters (set from the checkpoint when a
    #: trained model is loaded; every checkpoint carries one)
    vocab: str | None = None

    def validate(self) -> None:
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"config key 'data.train_fraction' must be in (0, 1), got {self.train_fraction}")
        if self.seq_len < 1:
            raise ValueError(f"config key 'data.seq_len' must be >= 1, got {self.seq_len}")
        if not self.file:
            raise ValueError("config key 'data.file' must name a text file")


@dataclass
class LMModelConfig(DecoderModelConfig):
    """The decoder (:class:`amlp.models.decoder.DecoderLM`) and the matched-parameter rule.

    With ``match_params: N`` the model is resized so that its parameter count is within
    ``match_tolerance`` (relative) of N: ``match_by: qk_rank`` searches the mixer's query/key rank at
    the given width, ``dim`` searches the width (a multiple of ``heads``), ``auto`` takes the QK rank
    for mixers that have one (HyperMLP, HyperGLU; unless ``qk_rank`` is fixed in their options) and
    the width for every other mixer, or when no rank reaches the target. Where the width's steps are
    too coarse to land within the tolerance, the largest width below N is kept and the MLP's hidden
    width is chosen instead (:func:`amlp.tasks.lm.matching.match_params`). The outcome is printed,
    saved in the checkpoint's ``vocab.json`` and reported by the evaluation (``params``,
    ``matched_dim`` or ``matched_qk_rank``, and ``matched_mlp_hidden`` when it was set).
    """

    match_params: int | None = None
    match_by: Literal["auto", "dim", "qk_rank"] = "auto"
    match_tolerance: float = 0.02

    def validate(self) -> None:
        super().validate()
        if self.match_params is not None and self.match_params < 1:
            raise ValueError(f"config key 'model.match_params' must be >= 1 or null, got {self.match_params}")
        if not 0.0 < self.match_tolerance < 1.0:
            raise ValueError(f"config key 'model.match_tolerance' must be in (0, 1), got {self.match_tolerance}")
