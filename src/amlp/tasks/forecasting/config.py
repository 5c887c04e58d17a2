"""Typed ``data:`` and ``model:`` sections of a forecasting config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ForecastingDataConfig:
    """Which ETT file, which setting, which windows (see :mod:`amlp.tasks.forecasting.data`)."""

    dataset: Literal["ETTh1", "ETTh2", "ETTm1", "ETTm2"] = "ETTh1"
    #: M: 7 -> 7, S: target -> target, MS: 7 -> target
    features: Literal["M", "S", "MS"] = "M"
    target: str = "OT"
    seq_len: int = 96
    label_len: int = 48
    pred_len: int = 24
    #: folder holding ett/ (None: $AMLP_DATA_DIR, else ../shared/data beside the repository, else ./data)
    data_dir: str | None = None
    #: keep every N-th validation window (the test split always uses every window)
    val_stride: int = 1

    def validate(self) -> None:
        for name in ("seq_len", "label_len", "pred_len", "val_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'data.{name}' must be >= 1, got {getattr(self, name)}")
        if self.label_len > self.seq_len:
            raise ValueError(f"config key 'data.label_len' ({self.label_len}) must not exceed data.seq_len "
                             f"({self.seq_len})")
        from .data import ETT_COLUMNS

        if self.target not in ETT_COLUMNS:
            raise ValueError(f"config key 'data.target' must be one of {list(ETT_COLUMNS)}, got {self.target!r}")


@dataclass
class InformerModelConfig:
    """The Informer-style encoder-decoder (see :mod:`amlp.models.informer`)."""

    d_model: int = 512
    heads: int = 8
    e_layers: int = 2
    d_layers: int = 1
    d_ff: int = 2048
    dropout: float = 0.05
    activation: Literal["gelu", "relu"] = "gelu"
    distil: bool = True
    self_mixer: str = "softmax"
    cross_mixer: str = "softmax"
    #: causal decoder self-attention, as in Informer
    decoder_causal: bool = True
    #: options per mixer registry name, used by whichever layer builds that mixer
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: options for the decoder cross-mixer only, over those of mixer_options
    cross_options: dict[str, Any] = field(default_factory=dict)
    #: biases in the value and time-feature embeddings, as Informer's code has them
    embedding_bias: bool = False

    def validate(self) -> None:
        for name in ("d_model", "heads", "e_layers", "d_layers", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'model.{name}' must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(f"config key 'model.d_model' ({self.d_model}) must be divisible by model.heads "
                             f"({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config key 'model.dropout' must be in [0, 1), got {self.dropout}")
        from ...layers import mixer_names

        names = mixer_names()
        for key in ("self_mixer", "cross_mixer"):
            if getattr(self, key) not in names:
                raise ValueError(f"config key 'model.{key}' names an unregistered mixer {getattr(self, key)!r}; "
                                 f"registered: {', '.join(names)}")
        for name, opts in self.mixer_options.items():
            if not isinstance(opts, dict):
                raise ValueError(f"config key 'model.mixer_options.{name}' must be a mapping of options")
        if not isinstance(self.cross_options, dict):
            raise ValueError("config key 'model.cross_options' must be a mapping of options")
