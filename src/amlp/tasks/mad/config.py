"""The typed ``data:`` section of the MAD configs (the ``model:`` section is the recall tasks'
:class:`~amlp.tasks.recall.config.DecoderModelConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from .data import MAD_TASKS, MAD_TEST_EXAMPLES, MAD_TRAIN_EXAMPLES, SettingsError, make_settings

MADTaskName = Literal["in-context-recall", "fuzzy-in-context-recall", "noisy-in-context-recall", "selective-copying",
                      "compression", "memorization"]

#: the keys that are task settings (each belongs only to the tasks whose settings class has it)
SETTING_KEYS = ("vocab_size", "seq_len", "noise_vocab_size", "frac_noise", "k_motif_size", "v_motif_size",
                "num_tokens_to_copy", "map_seed")


@dataclass
class MADDataConfig:
    """One MAD task (``task``) and its splits.

    Every task setting left null takes MAD's baseline value for ``task`` (see
    :mod:`amlp.tasks.mad.data`); a setting that ``task`` does not have must stay null. The training
    split holds ``train_examples`` examples (null: MAD's, 12,800, or 256 for memorization) that the
    loop visits once per epoch; validation and test are fresh examples drawn from disjoint seeds
    (MAD tests on 1,280). ``loss_on: all`` trains on every position with a target (MAD: every next
    token for the recall tasks), ``scored`` only on the scored positions.
    """

    task: MADTaskName = "in-context-recall"
    vocab_size: int | None = None
    seq_len: int | None = None
    noise_vocab_size: int | None = None
    frac_noise: float | None = None
    k_motif_size: int | None = None
    v_motif_size: int | None = None
    num_tokens_to_copy: int | None = None
    map_seed: int | None = None
    train_examples: int | None = None
    val_examples: int = MAD_TEST_EXAMPLES
    test_examples: int = MAD_TEST_EXAMPLES
    loss_on: Literal["all", "scored"] = "all"
    data_seed: int = 12345

    def validate(self) -> None:
        for name in ("train_examples", "val_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"config key 'data.{name}' must be >= 1, got {value}")
        if self.data_seed < 0:
            raise ValueError(f"config key 'data.data_seed' must be >= 0, got {self.data_seed}")
        self.settings()

    def settings(self):
        """The task's settings: MAD's baseline with the non-null keys of this section."""
        own = {f.name for f in fields(MAD_TASKS[self.task][0])}
        given = {k: getattr(self, k) for k in SETTING_KEYS if getattr(self, k) is not None}
        for key in given:
            if key not in own:
                raise ValueError(f"config key 'data.{key}' is not a setting of {self.task} (its settings: "
                                 f"{', '.join(sorted(own))}); leave it null")
        try:
            return make_settings(self.task, **given)
        except SettingsError as err:
            raise ValueError(f"config key 'data.{err.field}' {err.reason}") from None

    @property
    def train_size(self) -> int:
        return self.train_examples if self.train_examples is not None else MAD_TRAIN_EXAMPLES[self.task]
