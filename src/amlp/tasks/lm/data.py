"""Character-level text data: the vocabulary, the train / validation split and the windows.

* :class:`CharVocab`: the sorted characters of the training text, one id per character (no
  special tokens). It is saved with every checkpoint (``vocab.json``) so that a checkpoint folder is
  enough to generate text, wherever the data is.
* :func:`split_text`: the first ``train_fraction`` of the characters is training text, the rest is
  validation text (nanoGPT's 90/10 split of tiny Shakespeare: ``data[:1003854]`` / ``data[1003854:]``).
* :class:`TrainWindows`: every contiguous window of ``seq_len + 1`` characters of the training text,
  item ``i`` starting at character ``i``. The training loop visits them in a seeded random order
  (a permutation per epoch), so a batch is a set of random windows and the data position is a
  function of the step: resuming is exact.
* :class:`EvalWindows`: non-overlapping windows that together predict every character of the
  validation text but its first one; the last window is right-padded (targets :data:`IGNORE_INDEX`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..forecasting.data import resolve_data_dir

IGNORE_INDEX = -100
VOCAB_FORMAT = "amlp-char-vocab-1"
VOCAB_FILE = "vocab.json"
DEFAULT_FILE = "tinyshakespeare/input.txt"


def _show(ch: str) -> str:
    """A character as a reader can see it in a message: ``'a'``, ``'\\n'``, ``'é' (U+00E9)``."""
    shown = repr(ch)
    return shown if ch.isascii() else f"{shown} (U+{ord(ch):04X})"


class UnknownCharactersError(ValueError):
    """Text holds characters the vocabulary does not have; ``chars`` lists them in order of appearance."""

    def __init__(self, chars: list[str], vocab: "CharVocab", what: str = "the text"):
        self.chars = chars
        shown = ", ".join(_show(c) for c in chars[:20]) + (f" and {len(chars) - 20} more" if len(chars) > 20 else "")
        super().__init__(f"{what} has {len(chars)} character(s) outside the model's vocabulary: {shown}; "
                         f"the vocabulary has {len(vocab)} characters: {vocab.describe()}")


class CharVocab:
    """A character vocabulary: id ``i`` is ``chars[i]``.

        >>> v = CharVocab.from_text("hello")
        >>> v.chars, v.encode("hole"), v.decode([2, 1])
        ('ehlo', [2, 3, 2, 0], 'le')
    """

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise ValueError("a vocabulary needs at least one character")
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary's characters must be distinct")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        """The sorted distinct characters of ``text``."""
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} characters)"

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` outside the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.index))

    def encode(self, text: str, what: str = "the text") -> list[int]:
        """Ids of ``text``; raises :class:`UnknownCharactersError` naming every unknown character."""
        missing = self.unknown(text)
        if missing:
            raise UnknownCharactersError(missing, self, what)
        return [self.index[c] for c in text]

    def encode_tensor(self, text: str, what: str = "the text") -> torch.Tensor:
        if not text:
            return torch.zeros(0, dtype=torch.long)
        missing = self.unknown(text)
        if missing:
            raise UnknownCharactersError(missing, self, what)
        # one table lookup over the bytes of a pure-ASCII text, else a Python pass
        if all(ord(c) < 256 for c in self.chars) and text.isascii():
            table = torch.full((256,), -1, dtype=torch.long)
            table[torch.tensor([ord(c) for c in self.chars])] = torch.arange(len(self))
            return table[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        try:
            return "".join(self.chars[i] for i in ids)
        except (IndexError, TypeError):
            bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < len(self))]
            raise ValueError(f"ids outside the vocabulary of {len(self)} characters: {bad[:10]}") from None

    def describe(self) -> str:
        """The characters, runs of consecutive code points shortened (``'\\n', ' ', '!', 'A'-'Z'``)."""
        parts, i, cs = [], 0, self.chars
        while i < len(cs):
            j = i
            while j + 1 < len(cs) and ord(cs[j + 1]) == ord(cs[j]) + 1:
                j += 1
            if j - i >= 3:
                parts.append(f"{_show(cs[i])}-{_show(cs[j])}")
            else:
                parts.extend(_show(c) for c in cs[i:j + 1])
            i = j + 1
        return ", ".join(parts)

    # -- file form (saved in every checkpoint) -------------------------------------------------------
    def to_json(self, **extra) -> bytes:
        return json.dumps({"format": VOCAB_FORMAT, "chars": self.chars, **extra}, indent=1).encode("utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["CharVocab", dict]:
        """(vocabulary, the rest of the record) from a ``vocab.json`` written by :meth:`to_json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {str(path)!r} does not exist")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"vocabulary file {str(path)!r} cannot be read ({err})") from None
        if not isinstance(record, dict) or record.get("format") != VOCAB_FORMAT or not isinstance(
                record.get("chars"), str):
            raise ValueError(f"{str(path)!r} is not a character vocabulary (format {VOCAB_FORMAT})")
        chars = record.pop("chars")
        record.pop("format")
        return cls(chars), record


def find_text_file(file: str = DEFAULT_FILE, data_dir: str | os.PathLike | None = None) -> Path:
    """The text file: ``file`` itself when it is an existing path, else ``file`` under the data folder
    (``data_dir``, ``$AMLP_DATA_DIR``, ``../shared/data`` beside the repository, ``./data``)."""
    direct = Path(file)
    if direct.is_absolute() and direct.is_file():
        return direct
    path = resolve_data_dir(data_dir) / file
    if path.is_file():
        return path
    raise FileNotFoundError(f"text file not found: {str(path)!r} does not exist. Set data.data_dir (--data-dir) or "
                            f"AMLP_DATA_DIR to the folder that holds {file}")


def read_text(path: str | os.PathLike) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({err})") from None


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """(training text, validation text): the first ``int(train_fraction * len(text))`` characters,
    then the rest."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n = int(train_fraction * len(text))
    return text[:n], text[n:]


class TrainWindows(torch.utils.data.Dataset):
    """Every window of ``seq_len + 1`` consecutive ids: item ``i`` is ``tokens = ids[i : i+L]``,
    ``targets = ids[i+1 : i+L+1]``."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if ids.numel() < seq_len + 1:
            raise ValueError(f"the training text has {ids.numel()} characters, fewer than data.seq_len + 1 = "
                             f"{seq_len + 1}")
        self.ids, self.seq_len = ids.long(), seq_len

    def __len__(self) -> int:
        return self.ids.numel() - self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        window = self.ids[index:index + self.seq_len + 1]
        return {"tokens": window[:-1], "targets": window[1:]}


class EvalWindows(torch.utils.data.Dataset):
    """Non-overlapping windows covering a text: window ``j`` reads ``ids[jL : jL+L]`` and predicts
    ``ids[jL+1 : jL+L+1]``; together they predict every id but the first, each exactly once. The last
    window is right-padded: token 0, target :data:`IGNORE_INDEX`, mask False."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.ids, self.seq_len = ids.long(), seq_len
        self.predicted = max(self.ids.numel() - 1, 0)

    def __len__(self) -> int:
        return math.ceil(self.predicted / self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        L = self.seq_len
        start = index * L
        n = min(L, self.predicted - start)
        tokens = torch.zeros(L, dtype=torch.long)
        targets = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
        tokens[:n] = self.ids[start:start + n]
        targets[:n] = self.ids[start + 1:start + n + 1]
        mask = torch.zeros(L, dtype=torch.bool)
        mask[:n] = True
        return {"tokens": tokens, "targets": targets, "mask": mask}
