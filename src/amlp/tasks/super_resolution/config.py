"""Typed ``data:`` and ``model:`` sections of a super-resolution config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class SRDataConfig:
    """ORL faces split by person (:mod:`amlp.tasks.super_resolution.data`)."""

    #: folder holding orl_faces/ (None: $AMLP_DATA_DIR, else ../shared/data beside the repository, else ./data)
    data_dir: str | None = None
    #: people (1..40) of each split; none of them may be in two splits
    train_people: list[int] = field(default_factory=lambda: list(range(1, 33)))
    val_people: list[int] = field(default_factory=lambda: list(range(33, 37)))
    test_people: list[int] = field(default_factory=lambda: list(range(37, 41)))
    #: horizontal flips of the training images
    flip: bool = True
    #: validation images sampled (super-resolved) at each validation; None: all. The test split is
    #: always sampled in full
    val_sample_examples: int | None = 8

    def validate(self) -> None:
        sets = {"train_people": self.train_people, "val_people": self.val_people, "test_people": self.test_people}
        for key, people in sets.items():
            if not people or any(not isinstance(p, int) or not 1 <= p <= 40 for p in people):
                raise ValueError(f"config key 'data.{key}' must list people 1..40, got {people!r}")
        names = list(sets)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = sorted(set(sets[a]) & set(sets[b]))
                if both:
                    raise ValueError(f"config keys 'data.{a}' and 'data.{b}' share people {both}: a person must "
                                     "be in one split only")
        if self.val_sample_examples is not None and self.val_sample_examples < 1:
            raise ValueError(f"config key 'data.val_sample_examples' must be >= 1 or null, got {self.val_sample_examples}")


@dataclass
class SRModelConfig:
    """The SR3 U-Net (:mod:`amlp.models.sr3`), its noise schedule and its sampler."""

    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    res_blocks: int = 1
    #: feature-map sides with an attention layer after the residual blocks (64x64 images: 32 and 16)
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 32])
    #: registry name of the attention layers' mixer (any with a non-causal form) and its options
    mixer: str = "softmax"
    mixer_options: dict[str, Any] = field(default_factory=dict)
    heads: int = 1
    dropout: float = 0.0
    #: diffusion: steps of the linear beta schedule and its ends; the training loss on the noise
    timesteps: int = 1000
    beta_start: float = 1.0e-6
    beta_end: float = 1.0e-2
    loss: Literal["l1", "l2"] = "l1"
    #: evaluation and upscaling: ``ddim`` with ``sample_steps`` steps (eta ``eta``) or ``ddpm`` (every step)
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = 50
    eta: float = 1.0

    def validate(self) -> None:
        for name in ("base_channels", "res_blocks", "heads", "timesteps", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key 'model.{name}' must be >= 1, got {getattr(self, name)}")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"config key 'model.channel_mults' must be positive integers, got {self.channel_mults}")
        if self.sample_steps > self.timesteps:
            raise ValueError(f"config key 'model.sample_steps' ({self.sample_steps}) must be <= model.timesteps "
                             f"({self.timesteps})")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"config keys 'model.beta_start' and 'model.beta_end' must satisfy 0 < start < end < 1, "
                             f"got {self.beta_start}, {self.beta_end}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config key 'model.dropout' must be in [0, 1), got {self.dropout}")
        if self.eta < 0:
            raise ValueError(f"config key 'model.eta' must be >= 0, got {self.eta}")
        from ...models.translation import check_site

        try:
            check_site(self.mixer, "attention", options=self.mixer_options)
        except ValueError as err:
            raise ValueError(f"config key 'model.mixer': {err}") from None
