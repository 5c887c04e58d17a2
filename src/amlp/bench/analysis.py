"""Derived figures: crossover lengths against the baseline and distance to the bandwidth floor."""

from __future__ import annotations

import math
from dataclasses import dataclass

BELOW_RANGE = "below range"
NONE_IN_RANGE = "none in range"
NOT_MEASURED = "not measured"
AT = "at"


@dataclass
class Crossover:
    """Where a mixer starts beating the baseline on one metric.

    ``status`` is ``"at"`` (``length`` holds the interpolated crossover), ``"below range"`` (it beats
    the baseline at every measured length) or ``"none in range"`` (it does not beat the baseline at
    the longest measured length) or ``"not measured"`` (no point has both values). ``length`` is None unless ``status == "at"``.
    """

    status: str
    length: float | None = None

    def describe(self) -> str:
        if self.status == AT:
            return f"{self.length:,.0f}"
        return self.status


def crossover_length(lengths, mixer_values, baseline_values) -> Crossover:
    """Shortest length from which the mixer beats the baseline (smaller value) for good.

    Points where either value is missing (None / NaN) are dropped. The crossover is located after
    the last measured length where the mixer is not better (ratio mixer/baseline >= 1), by linear
    interpolation of ``log(ratio)`` against ``log(length)`` between that point and the next one (the
    curves are close to power laws, so this is interpolation on log-log axes).
    """
    pts = []
    for n, m, b in zip(lengths, mixer_values, baseline_values):
        if m is None or b is None:
            continue
        m, b = float(m), float(b)
        if math.isnan(m) or math.isnan(b) or n <= 0:
            continue
        pts.append((float(n), m, b))
    if not pts:
        return Crossover(NOT_MEASURED)
    pts.sort()
    ratios = [_ratio(m, b) for _, m, b in pts]
    losing = [i for i, r in enumerate(ratios) if r >= 1.0]
    if not losing:
        return Crossover(BELOW_RANGE)
    j = losing[-1]
    if j == len(pts) - 1:
        return Crossover(NONE_IN_RANGE)
    (n0, _, _), (n1, _, _) = pts[j], pts[j + 1]
    r0, r1 = ratios[j], ratios[j + 1]
    l0, l1 = math.log(max(r0, 1e-300)), math.log(max(r1, 1e-300))
    if l0 == l1:  # pragma: no cover - r0 >= 1 > r1 makes this impossible
        return Crossover(AT, n1)
    frac = l0 / (l0 - l1)  # log-ratio reaches 0 this far from n0 towards n1 (in log length)
    length = math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0)))
    return Crossover(AT, length)


def _ratio(m: float, b: float) -> float:
    if b <= 0:
        return 0.0 if m <= 0 else math.inf
    return m / b


def floor_time(nbytes: float, bandwidth: float) -> float:
    """Seconds needed to move ``nbytes`` once at ``bandwidth`` bytes per second."""
    if bandwidth <= 0:
        return math.nan
    return nbytes / bandwidth
