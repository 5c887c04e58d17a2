"""The mixer registry: build any mixer by name, list what each can do, refuse what it cannot.

    >>> import amlp
    >>> mixer = amlp.build_mixer("amlp-pquery", dim=64, heads=4, cross=True)
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


def build_mixer(name: str, *, dim: int, heads: int, causal: bool = False, cross: bool = False, **options) -> Mixer:
    """Build the mixer registered as ``name``.

    Raises ``ValueError`` naming the mixer and the capability when it cannot do what is asked
    (``causal=True`` for a non-causal mixer, ``cross=True`` for a self-only one, ...).
    """
    info = get_mixer_info(name)
    caps = info.capabilities
    if causal and not caps.causal:
        raise ValueError(f"mixer {name!r} has no causal form (capability 'causal')")
    if not causal and not caps.noncausal:
        raise ValueError(f"mixer {name!r} has no non-causal form (capability 'noncausal'); pass causal=True")
    if cross and not caps.cross:
        raise ValueError(f"mixer {name!r} cannot mix a separate context (capability 'cross')")
    accepted = mixer_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"mixer {name!r} takes no option(s) {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(accepted) or 'none'}")
    return info.cls(dim=dim, heads=heads, causal=causal, cross=cross, **options)


def mixer_options(name: str) -> list[str]:
    """The constructor options of the mixer registered as ``name`` (beyond dim, heads, causal, cross)."""
    import inspect

    cls = get_mixer_info(name).cls
    names: list[str] = []
    for klass in cls.__mro__:  # subclasses that forward **options take their parent's
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return [n for n in names if n not in ("causal", "cross", "variant")]
