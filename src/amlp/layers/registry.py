"""The mixer registry: build any mixer by name, list what each can do, refuse what it cannot.

    >>> import amlp
    >>> mixer = amlp.build_mixer("amlp-pquery", dim=64, heads=4, cross=True, form="paper")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Capabilities, Mixer


@dataclass(frozen=True)
class MixerInfo:
    """One registry entry: the name, the class, its capabilities and a one-line description."""

    name: str
    cls: type
    capabilities: Capabilities
    description: str
    reference: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "reference": self.reference,
                **self.capabilities.as_dict()}


_REGISTRY: dict[str, MixerInfo] = {}


def register_mixer(name: str, *, description: str, reference: str = ""):
    """Class decorator adding a :class:`Mixer` subclass to the registry under ``name``."""

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"register_mixer expects a Mixer subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"a mixer named {name!r} is already registered ({_REGISTRY[name].cls.__name__})")
        cls.mixer_name = name
        _REGISTRY[name] = MixerInfo(name, cls, cls.capabilities, description, reference)
        return cls

    return wrap


def get_mixer_info(name: str) -> MixerInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_mixers() -> list[MixerInfo]:
    """Every registered mixer with its capability record, in registration order."""
    return list(_REGISTRY.values())


def mixer_names(*, causal: bool | None = None, cross: bool | None = None) -> list[str]:
    """Names of the registered mixers, optionally only those with a causal / cross form."""
    out = []
    for info in _REGISTRY.values():
        caps = info.capabilities
        if causal is True and not caps.causal:
            continue
        if causal is False and not caps.noncausal:
            continue
        if cross is True and not caps.cross:
            continue
        out.append(info.name)
    return out


def check_request(name: str, *, causal: bool = False, cross: bool = False, options: dict | None = None) -> None:
    """Raise ``ValueError`` naming the mixer and the capability (or option) when the mixer registered as
    ``name`` cannot be built as asked; what :func:`build_mixer` checks, for config validation."""
    info = get_mixer_info(name)
    caps = info.capabilities
    options = options or {}
    if causal and not caps.causal:
        raise ValueError(f"mixer {name!r} has no causal form (capability 'causal')")
    if not causal and not caps.noncausal:
        raise ValueError(f"mixer {name!r} has no non-causal form (capability 'noncausal'); pass causal=True")
    if cross and not caps.cross:
        raise ValueError(f"mixer {name!r} cannot mix a separate context (capability 'cross')")
    for option, values in caps.choices:
        if option not in options:
            raise ValueError(f"mixer {name!r} has no default {option}: choose {option}= one of "
                             f"{', '.join(map(repr, values))} (docs/amlp_forms.md compares them)")
    accepted = accepted_options(name)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            own = sorted(accepted - {"dim", "heads", "causal", "cross", "variant"})
            raise ValueError(f"mixer {name!r} takes no option(s) {', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(own) or 'none'}")


def build_mixer(name: str, *, dim: int, heads: int, causal: bool = False, cross: bool = False, **options) -> Mixer:
    """Build the mixer registered as ``name``.

    Raises ``ValueError`` naming the mixer and the capability when it cannot do what is asked
    (``causal=True`` for a non-causal mixer, ``cross=True`` for a self-only one, ...).
    """
    info = get_mixer_info(name)
    check_request(name, causal=causal, cross=cross, options=options)
    return info.cls(dim=dim, heads=heads, causal=causal, cross=cross, **options)


def choice_options(name: str, *, causal: bool = False) -> list[dict]:
    """Every combination of the mixer's required choices that builds in the given form (``[{}]``
    for a mixer without required choices), e.g. ``[{"form": "paper"}, {"form": "stable"}]`` for
    causal AMLP-Cov, which has no official causal form."""
    import itertools

    caps = get_mixer_info(name).capabilities
    combos = [dict(zip([o for o, _ in caps.choices], values))
              for values in itertools.product(*[v for _, v in caps.choices])]
    out = []
    for combo in combos:
        try:
            build_mixer(name, dim=4, heads=1, causal=causal, **combo)
        except ValueError:
            continue
        out.append(combo)
    return out


def accepted_options(name: str) -> set[str] | None:
    """Keyword options the constructor of mixer ``name`` names, following ``**options`` up the
    class hierarchy; None when some constructor takes ``**options`` that no parent names (unknown)."""
    import inspect

    cls = get_mixer_info(name).cls
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None
