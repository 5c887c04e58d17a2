"""Typed ``data:`` and ``model:`` sections of a forecasting config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ForecastingDataConfig:
    """Which series, which setting, which windows (see :mod:`amlp.tasks.forecasting.data`).

    ``dataset`` names an ETT preset (ETTh1, ETTh2, ETTm1, ETTm2: file, columns, date format, split
    and frequency known) unless ``path`` points at a CSV file of one's own, in which case ``dataset``
    is only its name in reports and the keys below describe the file.
    """

    dataset: str = "ETTh1"
    #: M: all columns -> all columns, S: target -> target, MS: all columns -> target
    features: Literal["M", "S", "MS"] = "M"
    target: str = "OT"
    seq_len: int = 96
    label_len: int = 48
    pred_len: int = 24
    #: folder holding ett/ (None: $AMLP_DATA_DIR, else ../shared/data beside the repository, else ./data)
    data_dir: str | None = None
    #: keep every N-th validation window (the test split always uses every window)
    val_stride: int = 1
    #: a CSV (or .csv.gz) file of one's own: absolute, or relative to the data directory or the
    #: working directory; None for the ETT presets
    path: str | None = None
    #: name of the date column, and its strftime format (None: inferred by pandas)
    date_column: str = "date"
    date_format: str | None = None
    #: value columns in order (None: every column but the date)
    columns: list[str] | None = None
    #: frequency of the time features: s, min, h or d (None: from the spacing of the dates)
    freq: str | None = None
    #: ``auto`` (ETT presets: 12/4/4 months; other files: ratio), ``ratio`` or ``ett``
    split: Literal["auto", "ratio", "ett"] = "auto"
    #: train / val / test fractions of the ratio split (Informer: 0.7 / 0.1 / 0.2)
    split_ratios: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])

    def validate(self) -> None:
        for name in ("seq_len", "label_len", "pred_len", "val_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'data.{name}' must be >= 1, got {getattr(self, name)}")
        if self.label_len > self.seq_len:
            raise ValueError(f"config key 'data.label_len' ({self.label_len}) must not exceed data.seq_len "
                             f"({self.seq_len})")
        from .data import ETT_COLUMNS, ETT_DATASETS, normalise_freq

        if self.path is None:
            if self.dataset not in ETT_DATASETS:
                raise ValueError(f"config key 'data.dataset' must be one of {', '.join(ETT_DATASETS)} (the ETT "
                                 f"presets), got {self.dataset!r}; for a file of your own set data.path to it")
            if self.target not in ETT_COLUMNS:
                raise ValueError(f"config key 'data.target' must be one of {list(ETT_COLUMNS)}, got {self.target!r}")
        if self.freq is not None:
            try:
                normalise_freq(self.freq)
            except ValueError as err:
                raise ValueError(f"config key 'data.freq': {err}") from None
        r = self.split_ratios
        if (len(r) != 3 or any(not isinstance(x, (int, float)) or x <= 0 for x in r)
                or abs(sum(r) - 1.0) > 1e-6):
            raise ValueError(f"config key 'data.split_ratios' must be three positive fractions summing to 1 "
                             f"(train, val, test), got {r}")
        if self.columns is not None and (not self.columns or len(set(self.columns)) != len(self.columns)):
            raise ValueError(f"config key 'data.columns' must list distinct column names, got {self.columns}")


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
        registered = mixer_names()
        for name, opts in self.mixer_options.items():
            if name not in registered:  # a misspelt name would leave its mixer's options silently unused
                raise ValueError(f"config key 'model.mixer_options.{name}': {name!r} is not a registered mixer; "
                                 f"registered: {', '.join(registered)}")
            if not isinstance(opts, dict):
                raise ValueError(f"config key 'model.mixer_options.{name}' must be a mapping of options")
        if not isinstance(self.cross_options, dict):
            raise ValueError("config key 'model.cross_options' must be a mapping of options")
