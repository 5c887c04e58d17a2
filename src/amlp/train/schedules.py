"""Learning-rate schedules as a multiplier of the peak rate, a pure function of the step.

Because the factor depends only on the step count, resuming restores the schedule exactly from the
step stored in the checkpoint.

* ``constant``: 1 (after an optional linear warm-up).
* ``inverse_sqrt`` (Vaswani et al. 2017; fairseq's ``inverse_sqrt``): linear warm-up to the peak over
  ``W`` steps, then ``sqrt(W / s)`` at step ``s`` (1-based).
* ``exponential``: linear warm-up, then ``gamma ** floor((s - W - 1) / decay_every)``; with
  ``decay_every`` = one epoch and ``gamma = 0.5`` this is Informer's halving of the rate every epoch.
"""

from __future__ import annotations

import math


def lr_factor(step: int, schedule: str, *, warmup_steps: int = 0, decay_gamma: float = 0.5,
              decay_every: int = 1) -> float:
    """Multiplier of the peak learning rate for optimiser step ``step`` (0-based)."""
    s = step + 1
    if schedule not in ("constant", "inverse_sqrt", "exponential"):
        raise ValueError(f"unknown schedule {schedule!r}; expected constant, inverse_sqrt or exponential")
    if warmup_steps > 0 and s < warmup_steps:
        return s / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        return math.sqrt(warmup_steps / s)
    if decay_every < 1:
        raise ValueError(f"decay_every must be >= 1, got {decay_every}")
    return decay_gamma ** ((s - max(warmup_steps, 1)) // decay_every)
