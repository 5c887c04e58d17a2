"""Parsing of length sweeps: ``"256,512,1024"``, ``"256:8192"`` (doubling) or ``"256:8192:4"`` (x4)."""

from __future__ import annotations


def parse_lengths(text: str) -> list[int]:
    """Turn a sweep description into a sorted list of distinct positive lengths.

    * ``"256,512,2048"``: exactly these lengths;
    * ``"256:8192"``: 256, 512, ..., 8192 (doubling, both ends included);
    * ``"256:8192:4"``: 256, 1024, 4096 (growing by the given factor, up to the end).

    Parts may be mixed: ``"100,256:1024"``. Raises ``ValueError`` on anything else.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("lengths must be a non-empty string such as '256,512' or '256:8192'")
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty item in lengths {text!r}")
        if ":" in part:
            pieces = part.split(":")
            if len(pieces) not in (2, 3):
                raise ValueError(f"a range is START:END or START:END:FACTOR, got {part!r}")
            try:
                start, end = int(pieces[0]), int(pieces[1])
                factor = int(pieces[2]) if len(pieces) == 3 else 2
            except ValueError:
                raise ValueError(f"range {part!r} must hold integers") from None
            if start < 1 or end < start:
                raise ValueError(f"range {part!r} needs 1 <= START <= END")
            if factor < 2:
                raise ValueError(f"range factor must be an integer >= 2, got {factor} in {part!r}")
            n = start
            while n <= end:
                out.add(n)
                n *= factor
        else:
            try:
                n = int(part)
            except ValueError:
                raise ValueError(f"length {part!r} is not an integer") from None
            if n < 1:
                raise ValueError(f"lengths must be >= 1, got {n}")
            out.add(n)
    return sorted(out)


def parse_names(text: str | None) -> list[str]:
    """``"a,b , c"`` -> ``["a", "b", "c"]`` (order kept, duplicates dropped)."""
    if text is None:
        return []
    names: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part and part not in names:
            names.append(part)
    return names
