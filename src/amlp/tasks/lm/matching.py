"""The matched-parameter rule: size a decoder so that its parameter count is close to a target.

Models of different mixers are compared at (nearly) the same number of parameters: given a target N,
either the query/key rank of the mixer (where it has one: HyperMLP, HyperGLU) or the model width E is
chosen so that the count is within a tolerance of N (2 % by default); where the width's steps (multiples
of the number of heads) are too coarse, the MLP's hidden width settles the rest. Counting builds the model on
PyTorch's ``meta`` device (no memory, no arithmetic) and leaves the random number generators as
they were, so the search costs milliseconds and does not change the model's initialisation.

    >>> r = match_params(200_000, vocab_size=65, max_length=64, dim=64, heads=2, n_layers=2, mixer="softmax")
    >>> r.by, abs(r.deviation) <= 0.02                                # doctest: +SKIP
    ('dim', True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ...layers import get_mixer_info
from ...layers.registry import accepted_options
from ...models.decoder import DecoderLM, resolve_block_type

#: the largest width or rank the search tries
MAX_SIZE = 1 << 16


@dataclass(frozen=True)
class MatchResult:
    """The outcome of the rule for one mixer: the size chosen (``by`` = ``dim`` or ``qk_rank``, its
    ``value``), the model's width, its parameter count and the target."""

    mixer: str
    by: str
    value: int
    dim: int
    params: int
    target: int
    #: the MLP's hidden width when the rule had to set it (see :func:`match_params`); None: ``mlp_ratio * dim``
    mlp_hidden: int | None = None

    @property
    def deviation(self) -> float:
        """``params / target - 1``."""
        return self.params / self.target - 1.0

    def within(self, tolerance: float) -> bool:
        return abs(self.deviation) <= tolerance

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "deviation": self.deviation}

    def describe(self) -> str:
        mlp = f" (MLP {self.mlp_hidden} wide)" if self.mlp_hidden is not None else ""
        return (f"{self.mixer}: {self.by} = {self.value}{mlp} gives {self.params:,} parameters "
                f"({100 * self.deviation:+.2f} % of the target {self.target:,})")


def model_options(mixer: str, options: dict[str, Any] | None, max_length: int) -> dict[str, Any]:
    """The mixer options a language model uses: ``options``, plus the model's length for mixers whose
    size depends on a length option (gMLP's spatial weights, cosFormer's re-weighting) when it is
    not given."""
    options = dict(options or {})
    length_option = get_mixer_info(mixer).capabilities.max_length_option
    if length_option and length_option not in options:
        options[length_option] = max_length
    return options


def count_parameters(vocab_size: int, max_length: int, *, dim: int, heads: int, n_layers: int, mixer: str,
                     block: str = "auto", mlp_ratio: float = 4.0, mixer_options: dict[str, Any] | None = None) -> int:
    """Parameters of ``DecoderLM(vocab_size, max_length, ...)``, counted on the meta device."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = DecoderLM(vocab_size, max_length, dim=dim, heads=heads, n_layers=n_layers, mixer=mixer, block=block,
                          mlp_ratio=mlp_ratio, mixer_options=mixer_options)
    return model.num_parameters()


def _closest(count: Callable[[int], int | None], step: int, target: int, what: str) -> tuple[int, int]:
    """(value, count) over the multiples of ``step`` whose count is closest to ``target``, for a
    count that does not decrease with the value."""
    def at(k: int) -> int | None:
        try:
            return count(k * step)
        except ValueError:
            return None

    lo, hi = 1, 1
    while True:  # find hi with count(hi) >= target
        c = at(hi)
        if c is not None and c >= target:
            break
        if hi * step >= MAX_SIZE:
            break
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the first k with count >= target lies in (lo, hi]
        mid = (lo + hi) // 2
        c = at(mid)
        if c is not None and c >= target:
            hi = mid
        else:
            lo = mid
    best = None
    for k in range(max(1, lo - 2), hi + 3):
        c = at(k)
        if c is not None and (best is None or abs(c - target) < abs(best[1] - target)):
            best = (k * step, c)
    if best is None:
        raise ValueError(f"no {what} near the target of {target:,} parameters builds")
    return best


def _qk_heads(mixer: str, dim: int, heads: int, options: dict[str, Any]) -> int:
    """The number of query/key heads (the QK rank moves in steps of it)."""
    from ...layers import build_mixer

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        built = build_mixer(mixer, dim=dim, heads=heads, causal=True, **options)
    return int(getattr(built, "qk_heads", heads))


def has_qk_rank(mixer: str, options: dict[str, Any] | None = None) -> bool:
    """Whether ``mixer`` has a free query/key rank option (``qk_rank``, not fixed in ``options``)."""
    accepted = accepted_options(mixer) or set()
    return "qk_rank" in accepted and "qk_rank" not in (options or {})


def match_params(target: int, *, vocab_size: int, max_length: int, dim: int, heads: int, n_layers: int,
                 mixer: str, block: str = "auto", mlp_ratio: float = 4.0, mixer_options: dict[str, Any] | None = None,
                 by: str = "auto", tolerance: float = 0.02) -> MatchResult:
    """Size the decoder to about ``target`` parameters (see the module docstring).

    ``by``: ``"qk_rank"`` (search the mixer's QK rank at width ``dim``), ``"dim"`` (search the width
    over multiples of ``heads``) or ``"auto"`` (the QK rank where the mixer has one, the width when
    no rank is within ``tolerance``, when the rank would have to be at its floor of one per QK head
    while the count is still above the target, or when the mixer has none). When no width is within
    ``tolerance`` (the width moves in steps of ``heads``, coarse for a small model), the largest width
    below the target is kept and the hidden width of the blocks' MLPs is chosen instead
    (``mlp_hidden``; Transformer blocks only). ``mixer_options`` are used as given (see
    :func:`model_options`). Raises ``ValueError`` when the best size is not within ``tolerance``.
    """
    if target < 1:
        raise ValueError(f"the target must be a positive number of parameters, got {target}")
    if by not in ("auto", "dim", "qk_rank"):
        raise ValueError(f"by must be 'auto', 'dim' or 'qk_rank', got {by!r}")
    options = dict(mixer_options or {})
    common = dict(n_layers=n_layers, mixer=mixer, block=block, mlp_ratio=mlp_ratio)
    attempts: list[MatchResult] = []
    if by == "qk_rank" or (by == "auto" and has_qk_rank(mixer, options)):
        if not has_qk_rank(mixer, options):
            raise ValueError(f"mixer {mixer!r} has no free qk_rank option to match the parameter count with; "
                             "use model.match_by: dim")
        qk_heads = _qk_heads(mixer, dim, heads, options)
        value, params = _closest(
            lambda r: count_parameters(vocab_size, max_length, dim=dim, heads=heads,
                                       mixer_options={**options, "qk_rank": r}, **common),
            qk_heads, target, "qk_rank")
        attempts.append(MatchResult(mixer, "qk_rank", value, dim, params, target))
        # a rank at its floor (one per QK head) that is still too large has not matched anything
        floored = value == qk_heads and params > target
        if by == "qk_rank" or (attempts[-1].within(tolerance) and not floored):
            return _checked(attempts, tolerance)
    def at_width(e: int) -> int:
        return count_parameters(vocab_size, max_length, dim=e, heads=heads, mixer_options=options, **common)

    value, params = _closest(at_width, heads, target, "width")
    attempts.append(MatchResult(mixer, "dim", value, value, params, target))
    if not attempts[-1].within(tolerance) and resolve_block_type(block, mixer) == "transformer":
        # the width moves in steps of `heads`, too coarse for a small model: take the largest width
        # below the target and fill the rest with the MLP's hidden width (steps of 2E + 1 per block)
        low = value if params <= target else value - heads
        if low >= heads:
            hidden, params = _closest(
                lambda h: count_parameters(vocab_size, max_length, dim=low, heads=heads, n_layers=n_layers,
                                           mixer=mixer, block=block, mlp_ratio=h / low, mixer_options=options),
                1, target, "MLP width")
            attempts.append(MatchResult(mixer, "dim", low, low, params, target, mlp_hidden=hidden))
    return _checked(attempts, tolerance)


def _checked(attempts: list[MatchResult], tolerance: float) -> MatchResult:
    result = attempts[-1]
    if not result.within(tolerance):
        tried = "; ".join(a.describe() for a in attempts)
        raise ValueError(f"no size matches the target within {100 * tolerance:g} %: {tried}. Change model.heads "
                         "(the width moves in steps of heads), model.match_tolerance or the target")
    return result


def match_report(target: int, mixers: list[str], *, vocab_size: int, max_length: int, dim: int, heads: int,
                 n_layers: int, block: str = "auto", mlp_ratio: float = 4.0,
                 mixer_options: dict[str, dict[str, Any]] | None = None, by: str = "auto",
                 tolerance: float = 0.02) -> list[MatchResult]:
    """:func:`match_params` for each of ``mixers``; ``mixer_options`` maps a mixer name to its options
    (as the config's ``model.mixer_options``; the length option is filled in by :func:`model_options`)."""
    out = []
    for mixer in mixers:
        options = model_options(mixer, (mixer_options or {}).get(mixer), max_length)
        out.append(match_params(target, vocab_size=vocab_size, max_length=max_length, dim=dim, heads=heads,
                                n_layers=n_layers, mixer=mixer, block=block, mlp_ratio=mlp_ratio,
                                mixer_options=options, by=by, tolerance=tolerance))
    return out


def format_match_report(results: list[MatchResult]) -> str:
    """A plain-text table of :func:`match_report`'s results."""
    rows = [("mixer", "matched by", "value", "width", "MLP width", "parameters", "vs target")]
    rows += [(r.mixer, r.by, str(r.value), str(r.dim), "" if r.mlp_hidden is None else str(r.mlp_hidden),
              f"{r.params:,}", f"{100 * r.deviation:+.2f} %") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
