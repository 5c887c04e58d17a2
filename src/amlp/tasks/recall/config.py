"""Typed ``data:`` and ``model:`` sections of the copying and MQAR configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _positive(obj, names, prefix):
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ValueError(f"config key '{prefix}.{name}' must be >= 1, got {value}")


@dataclass
class CopyingDataConfig:
    """The copying task of the CausalRN code (``src_copying``).

    Training strings have ``string_len`` letters, or, when ``min_string_len`` is set, a uniform random
    length in ``[min_string_len, string_len]`` per example (right-padded with masks). Validation draws
    from the training lengths; the test split holds ``test_examples`` strings of every length in
    ``test_lengths`` (default: ``[string_len]``), so longer test lengths measure length generalisation.
    """

    string_len: int = 16
    min_string_len: int | None = None
    test_lengths: list[int] = field(default_factory=list)
    #: examples in the training range (None: train.batch_size * train.max_steps, so no string repeats)
    train_examples: int | None = None
    val_examples: int = 320
    test_examples: int = 320
    data_seed: int = 12345

    def validate(self) -> None:
        _positive(self, ("string_len", "min_string_len", "train_examples", "val_examples", "test_examples"), "data")
        if self.min_string_len is not None and self.min_string_len > self.string_len:
            raise ValueError(f"config key 'data.min_string_len' ({self.min_string_len}) must not exceed "
                             f"data.string_len ({self.string_len})")
        if any(n < 1 for n in self.test_lengths):
            raise ValueError(f"config key 'data.test_lengths' must hold positive ints, got {self.test_lengths}")

    @property
    def train_lengths(self) -> list[int]:
        low = self.string_len if self.min_string_len is None else self.min_string_len
        return list(range(low, self.string_len + 1))

    @property
    def eval_lengths(self) -> list[int]:
        return list(self.test_lengths) or [self.string_len]


@dataclass
class MQARDataConfig:
    """Multi-query associative recall (zoology): ``num_pairs`` key-value pairs, then their queries at
    power-law gaps in a sequence of ``seq_len`` tokens over ``vocab_size`` tokens. ``test_pairs``
    (default ``[num_pairs]``) gives the test split one block of ``test_examples`` per pair count."""

    vocab_size: int = 8192
    num_pairs: int = 8
    seq_len: int = 64
    power_a: float = 0.01
    random_filler: bool = True
    test_pairs: list[int] = field(default_factory=list)
    train_examples: int | None = None
    val_examples: int = 1000
    test_examples: int = 1000
    data_seed: int = 12345

    def validate(self) -> None:
        _positive(self, ("vocab_size", "num_pairs", "seq_len", "train_examples", "val_examples", "test_examples"),
                  "data")
        if self.power_a <= 0:
            raise ValueError(f"config key 'data.power_a' must be > 0, got {self.power_a}")
        from .data import check_mqar_sizes

        check_mqar_sizes(self.vocab_size, self.num_pairs, self.seq_len, "data.")
        for p in self.test_pairs:
            check_mqar_sizes(self.vocab_size, p, self.seq_len, "data.test_pairs: data.")


@dataclass
class DecoderModelConfig:
    """The decoder-only model (:class:`amlp.models.decoder.DecoderLM`)."""

    mixer: str = "softmax"
    #: ``auto`` (CausalRN block for the CausalRN mixers, else Transformer), ``transformer`` or ``causal-rn``
    block: Literal["auto", "transformer", "causal-rn"] = "auto"
    dim: int = 64
    heads: int = 1
    n_layers: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    embed_init_std: float = 0.02
    #: learned positions (None: the longest sequence of the task's splits)
    max_length: int | None = None
    #: options per mixer registry name, used only for the mixer named in ``mixer``
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        _positive(self, ("dim", "heads", "n_layers", "max_length"), "model")
        if self.dim % self.heads:
            raise ValueError(f"config key 'model.dim' ({self.dim}) must be divisible by model.heads ({self.heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"config key 'model.mlp_ratio' must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config key 'model.dropout' must be in [0, 1), got {self.dropout}")
        from ...layers import mixer_names

        causal = mixer_names(causal=True)
        if self.mixer not in causal:
            raise ValueError(f"config key 'model.mixer' must name a registered causal mixer, got {self.mixer!r}; "
                             f"causal mixers: {', '.join(causal)}")
        from ...models.decoder import resolve_block_type

        try:
            resolve_block_type(self.block, self.mixer)
        except ValueError as err:
            raise ValueError(f"config key 'model.block': {err}") from None
        registered = mixer_names()
        for name, opts in self.mixer_options.items():
            if name not in registered:  # a misspelt name would leave its mixer's options silently unused
                raise ValueError(f"config key 'model.mixer_options.{name}': {name!r} is not a registered mixer; "
                                 f"registered: {', '.join(registered)}")
            if not isinstance(opts, dict):
                raise ValueError(f"config key 'model.mixer_options.{name}' must be a mapping of options")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.mixer_options.get(self.mixer, {}))
