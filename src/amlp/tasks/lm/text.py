"""Text in, text out: a trained character model continuing a prompt.

    >>> from amlp.tasks.lm import generate_text
    >>> out = generate_text("runs/lm/softmax-seed0/checkpoints/best", "ROMEO:", 200,
    ...                     temperature=0.8, seed=0, stream=lambda s: print(s, end="", flush=True))  # doctest: +SKIP
    >>> out.text, out.tokens_per_second                                                             # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...models.decoder import DecoderLM
from ...models.generation import generate
from .data import VOCAB_FILE, CharVocab


@dataclass
class TextGeneration:
    """What :func:`generate_text` returns."""

    prompt: str
    #: the continuation only (``prompt + text`` is the whole passage)
    text: str
    tokens_per_second: float
    seconds: float
    prompt_seconds: float

    @property
    def full(self) -> str:
        return self.prompt + self.text


def load_lm(checkpoint: str | os.PathLike, device: str = "auto") -> tuple[DecoderLM, CharVocab]:
    """(model in eval mode, vocabulary) of a checkpoint folder of an ``lm`` run."""
    from ...train.loop import load_trained_model

    config, task, model = load_trained_model(checkpoint, [], device)
    if config.task != "lm":
        raise ValueError(f"{str(checkpoint)!r} is a checkpoint of task {config.task!r}, not lm")
    return model, task.vocab


def checkpoint_vocab(checkpoint: str | os.PathLike) -> CharVocab | None:
    """The vocabulary a checkpoint folder carries (None if it has no ``vocab.json``)."""
    path = Path(checkpoint) / VOCAB_FILE
    return CharVocab.load(path)[0] if path.is_file() else None


def generate_text(source, prompt: str, max_new_tokens: int = 500, *, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  generator: torch.Generator | None = None, stream: Callable[[str], None] | None = None,
                  vocab: CharVocab | str | None = None, device: str = "auto",
                  refresh_keep: int | None = None) -> TextGeneration:
    """Continue ``prompt`` by ``max_new_tokens`` characters.

    Args:
        source: a checkpoint folder of an ``lm`` run (it carries its vocabulary), or a
            :class:`~amlp.models.decoder.DecoderLM` together with ``vocab``.
        prompt: at least one character, every one of them in the vocabulary (else
            :class:`~amlp.tasks.lm.data.UnknownCharactersError`, a ``ValueError`` naming them, is
            raised before any weights are read).
        temperature, top_k, top_p, refresh_keep: as :func:`amlp.models.generation.generate`
            (temperature 0 = greedy).
        seed: seeds a generator of its own for the sampling (``generator`` gives one directly; with
            neither, the global generator is used).
        stream: called with each new character as soon as it is chosen.
        vocab: the vocabulary of a model given directly (a :class:`CharVocab` or its characters).
        device: ``auto``, ``cpu`` or ``cuda`` when loading a checkpoint.
    """
    if isinstance(source, (str, os.PathLike)):
        if vocab is None:
            vocab = checkpoint_vocab(source)
    elif vocab is None:
        raise ValueError("give the vocabulary (vocab=) of a model passed directly")
    if isinstance(vocab, str):
        vocab = CharVocab(vocab)
    if not prompt:
        raise ValueError("the prompt is empty; give at least one character")
    if vocab is not None:
        vocab.encode(prompt, "the prompt")  # an unknown character is an error before anything is loaded
    if isinstance(source, (str, os.PathLike)):
        model, own = load_lm(source, device)
        vocab = vocab or own
        if len(own) != len(vocab):
            raise ValueError(f"the checkpoint's model has {len(own)} characters, the vocabulary given {len(vocab)}")
    else:
        model = source
        if getattr(model, "vocab_size", len(vocab)) != len(vocab):
            raise ValueError(f"the model has {model.vocab_size} token ids, the vocabulary {len(vocab)} characters")
    ids = vocab.encode_tensor(prompt, "the prompt")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    emit = None if stream is None else (lambda token: stream(vocab.chars[token]))
    result = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      generator=generator, stream=emit, refresh_keep=refresh_keep)
    return TextGeneration(prompt, vocab.decode(result.ids), result.tokens_per_second, result.seconds,
                          result.prompt_seconds)
