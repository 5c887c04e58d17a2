"""Multi30k parallel text, a joint sentencepiece model, token datasets and batches by tokens.

Files: ``<data_dir>/multi30k/{train,val,test_2016_flickr,test_2017_flickr,test_2017_mscoco}.{en,de}.gz``
(raw, cased, one sentence per line; line *i* of ``.en`` translates line *i* of ``.de``). ``data_dir`` is
the argument, else ``$AMLP_DATA_DIR``, else ``../shared/data`` beside the repository, else ``./data``
(as for the forecasting data).

Subwords: one joint sentencepiece model (Kudo and Richardson 2018) over both sides of the training
split only, with ids ``pad = 0``, ``unk = 1``, ``bos = 2``, ``eos = 3``. Detokenised output
(``decode``) is what BLEU is computed on, against the raw references.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...models.translation import BOS, EOS, PAD, UNK
from ..forecasting.data import resolve_data_dir
LANGUAGES = ("en", "de")
#: split name -> file stem in the multi30k folder
SPLITS = {"train": "train", "val": "val", "test2016": "test_2016_flickr", "test2017": "test_2017_flickr",
          "mscoco2017": "test_2017_mscoco"}


def multi30k_dir(data_dir: str | os.PathLike | None = None) -> Path:
    folder = resolve_data_dir(data_dir) / "multi30k"
    if not folder.is_dir():
        raise FileNotFoundError(f"Multi30k not found: no folder {str(folder)!r}. Set data.data_dir or "
                                "AMLP_DATA_DIR to the folder that holds multi30k/")
    return folder


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (``.gz`` or plain), without their line ends."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


def read_split(split: str, src: str, tgt: str, data_dir: str | os.PathLike | None = None,
               files: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(source lines, target lines) of a split: Multi30k's, or with ``files`` (split name -> path prefix)
    a corpus of one's own in ``<prefix>.<lang>`` or ``<prefix>.<lang>.gz`` (a relative prefix is taken
    from the data directory, else the working directory)."""
    if files is not None:
        if split not in files:
            raise ValueError(f"no files for split {split!r}; data.files has {', '.join(files) or 'none'}")
        prefix = Path(files[split])
        if not prefix.is_absolute() and not prefix.parent.is_dir():
            prefix = resolve_data_dir(data_dir) / prefix
        stem, where = prefix, "corpus"
    else:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; Multi30k splits: {', '.join(SPLITS)}")
        stem, where = multi30k_dir(data_dir) / SPLITS[split], "Multi30k"
    sides = []
    for lang in (src, tgt):
        path = stem.with_name(f"{stem.name}.{lang}.gz")
        if not path.is_file():
            plain = path.with_suffix("")
            if not plain.is_file():
                raise FileNotFoundError(f"{where} file not found: {str(plain)!r} (or .gz)")
            path = plain
        sides.append(read_lines(path))
    if len(sides[0]) != len(sides[1]):
        raise ValueError(f"{where} {split}: {len(sides[0])} {src} lines but {len(sides[1])} {tgt} lines")
    return sides[0], sides[1]


# -- sentencepiece --------------------------------------------------------------------------------------
class Tokenizer:
    """A sentencepiece model with the project's special ids (pad 0, unk 1, bos 2, eos 3)."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD, UNK, BOS, EOS):
            raise ValueError("the sentencepiece model must use pad 0, unk 1, bos 2, eos 3 (train it with "
                             "amlp.tasks.translation.data.train_tokenizer)")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {str(path)!r}")
        return cls(path.read_bytes())

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.proto)
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if EOS in ids:
            ids = ids[:ids.index(EOS)]
        return self.sp.decode([i for i in ids if i not in (PAD, BOS)])


def train_tokenizer(lines: list[str], vocab_size: int, model_type: str = "unigram",
                    character_coverage: float = 1.0) -> Tokenizer:
    """Train a sentencepiece model on ``lines`` (deterministic: no sampling of the input)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    return Tokenizer(buffer.getvalue())


def tokenizer_key(lines: list[str], vocab_size: int, model_type: str, character_coverage: float) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    h.update(f"{vocab_size}|{model_type}|{character_coverage}".encode())
    return h.hexdigest()[:16]


def cached_tokenizer(lines: list[str], vocab_size: int, model_type: str, character_coverage: float,
                     cache_dir: str | os.PathLike) -> tuple[Tokenizer, Path]:
    """The tokenizer trained on ``lines`` with these settings, from ``cache_dir`` or trained there."""
    key = tokenizer_key(lines, vocab_size, model_type, character_coverage)
    path = Path(cache_dir) / f"spm-{model_type}-{vocab_size}-{key}.model"
    if path.is_file():
        return Tokenizer.load(path), path
    tok = train_tokenizer(lines, vocab_size, model_type, character_coverage)
    tok.save(path)
    return tok, path


# -- datasets and batches ----------------------------------------------------------------------------------
@dataclass
class Pair:
    index: int
    src: list[int]
    tgt: list[int]


class PairDataset(torch.utils.data.Dataset):
    """Token-id pairs (no BOS or EOS on either side; the models add what they need). Item: a :class:`Pair`."""

    def __init__(self, src_ids: list[list[int]], tgt_ids: list[list[int]], refs: list[str] | None = None,
                 sources: list[str] | None = None):
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
        self.src = src_ids
        self.tgt = tgt_ids
        self.refs = refs
        self.sources = sources

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> Pair:
        return Pair(i, self.src[i], self.tgt[i])

    def num_tokens(self, i: int) -> int:
        return max(len(self.src[i]), len(self.tgt[i]))


def collate_pairs(items: list[Pair]) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``src`` [B, S], ``src_mask``, ``tgt`` [B, T], ``tgt_mask`` (True = real token),
    ``index`` [B] (positions in the dataset)."""
    B = len(items)
    S = max(len(p.src) for p in items)
    T = max(len(p.tgt) for p in items)
    src = torch.full((B, S), PAD, dtype=torch.long)
    tgt = torch.full((B, T), PAD, dtype=torch.long)
    for b, p in enumerate(items):
        src[b, :len(p.src)] = torch.tensor(p.src, dtype=torch.long)
        tgt[b, :len(p.tgt)] = torch.tensor(p.tgt, dtype=torch.long)
    return {"src": src, "src_mask": src != PAD, "tgt": tgt, "tgt_mask": tgt != PAD,
            "index": torch.tensor([p.index for p in items], dtype=torch.long)}


def token_batches(lengths: list[int], max_tokens: int, *, max_sentences: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (rows x longest) stays within
    ``max_tokens`` (fairseq's rule). Examples are visited by length, ties by index, so the batches
    are a function of the lengths only; a single example longer than ``max_tokens`` gets a batch of
    its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        full = max_sentences is not None and len(current) >= max_sentences
        if current and (grown * (len(current) + 1) > max_tokens or full):
            batches.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches
