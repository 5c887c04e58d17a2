"""Sampling from a decoder-only language model through its recurrent step.

    result = generate(model, prompt_ids, max_new_tokens=200, temperature=0.8, top_k=20)
    result.ids                  # the new tokens only: [N] for a [P] prompt, [B, N] for a [B, P] one
    result.tokens_per_second    # new tokens (all rows) per second of decoding after the prompt

How it decodes (:class:`amlp.models.decoder.DecoderLM`):

* The prompt is fed **token by token** through ``model.step``, which carries every mixer's recurrent
  state; the parallel forward returns no state to continue from, so this is the exact route for
  every mixer. (For a ``DecoderLM`` whose mixers have no step, each new token re-runs the full
  forward over the context instead: same numbers, quadratic time.)
* Each next token comes from the last logits: ``temperature = 0`` is greedy (argmax; deterministic,
  ``top_k`` / ``top_p`` do not matter), otherwise the logits are divided by the temperature, cut to
  the ``top_k`` largest and to the smallest set whose probability reaches ``top_p`` (nucleus), and a
  token is drawn with ``generator`` (the global generator when None).
* The model has ``model.max_length`` learned positions. When the context would pass them, it is cut
  to its last ``refresh_keep`` tokens (default: half the positions), which are fed again from
  position 0, and decoding goes on: a sliding window refreshed every
  ``max_length - refresh_keep`` tokens. Up to ``max_length`` tokens in all, nothing is cut.
* ``stream(token)`` is called with each new token as it is chosen (an ``int`` for a 1-D prompt, a
  CPU ``LongTensor [B]`` for a batch), e.g. to print text as it comes.

The model is put in eval mode (no dropout) for the call and back as it was afterwards.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import torch
from torch import nn


class GenerationResult(NamedTuple):
    """What :func:`generate` returns (unpacks as ``ids, tokens_per_second, ...``)."""

    #: the new tokens only, ``[N]`` for a 1-D prompt, ``[B, N]`` for a batch of prompts
    ids: torch.Tensor
    #: new tokens (over all rows) per second of decoding, the prompt excluded
    tokens_per_second: float
    #: seconds spent producing the new tokens
    seconds: float
    #: seconds spent feeding the prompt
    prompt_seconds: float


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` ``[B, V]`` with every token outside the ``top_k`` largest and outside the nucleus
    (the smallest set of the most likely tokens whose probability reaches ``top_p``) set to
    ``-inf``. The most likely token is always kept."""
    if top_k is not None and top_k < logits.shape[-1]:
        values, index = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, -math.inf).scatter(-1, index, values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
        drop = before >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return logits


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` (see the module docstring); ``[B]`` long."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


class _Context:
    """The tokens seen so far and the model's state over the current window of them."""

    def __init__(self, model: nn.Module, batch: int, device: torch.device, keep: int):
        self.model, self.batch, self.device, self.keep = model, batch, device, keep
        self.recurrent = bool(getattr(model, "recurrent", True))
        self.limit = int(getattr(model, "max_length", 0)) or None
        self.history: list[torch.Tensor] = []   # every token fed, [B] each
        self.window_start = 0                   # index into history where the current window starts
        self.state: Any = None

    def _advance(self, token: torch.Tensor) -> torch.Tensor:
        if self.recurrent:
            logits, self.state = self.model.step(token, self.state)
            return logits
        return self.model(torch.stack(self.history[self.window_start:], dim=1))[:, -1]

    def feed(self, token: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the next token after ``token`` ``[B]``."""
        if self.state is None and self.recurrent and not self.history:
            self.state = self.model.init_state(self.batch, device=self.device)
        length = len(self.history) - self.window_start
        self.history.append(token)
        if self.limit is not None and length >= self.limit:
            # no position left for this token: a new window of the last `keep` tokens before it and
            # this one, fed from position 0; the last logits are the next token's
            self.window_start = len(self.history) - 1 - self.keep
            if not self.recurrent:
                return self._advance(token)
            logits = None
            self.state = self.model.init_state(self.batch, device=self.device)
            for t in self.history[self.window_start:]:
                logits = self._advance(t)
            return logits
        return self._advance(token)


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             stream: Callable[[Any], None] | None = None, refresh_keep: int | None = None) -> GenerationResult:
    """Continue ``prompt_ids`` (``[P]`` or ``[B, P]``, P >= 1) by ``max_new_tokens`` sampled tokens.

    Args:
        model: a :class:`amlp.models.decoder.DecoderLM` (or anything with its ``step`` /
            ``init_state`` / ``max_length`` interface); a DDP wrapper is unwrapped.
        temperature: 0 = greedy; otherwise the softmax temperature.
        top_k: sample among the ``top_k`` most likely tokens only.
        top_p: nucleus sampling: among the smallest set of most likely tokens whose probability
            reaches ``top_p``.
        generator: the random generator of the sampling (e.g. ``torch.Generator().manual_seed(0)``).
        stream: called with each new token as soon as it is chosen.
        refresh_keep: tokens kept when the context outgrows the model's positions (default half of
            them); see the module docstring.

    Returns a :class:`GenerationResult` ``(ids, tokens_per_second, seconds, prompt_seconds)``.
    """
    net = getattr(model, "module", model)
    _check_args(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.is_floating_point() or prompt_ids.dim() not in (1, 2):
        got = tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise ValueError(f"prompt_ids must be an integer tensor shaped [P] or [B, P], got {got}")
    single = prompt_ids.dim() == 1
    prompt = prompt_ids[None] if single else prompt_ids
    if prompt.shape[1] < 1:
        raise ValueError("the prompt must hold at least one token (the model has no start token)")
    vocab = getattr(net, "vocab_size", None)
    if vocab is not None and (int(prompt.min()) < 0 or int(prompt.max()) >= vocab):
        raise ValueError(f"prompt ids must be in [0, {vocab}), got values from {int(prompt.min())} to "
                         f"{int(prompt.max())}")
    limit = int(getattr(net, "max_length", 0)) or None
    keep = (limit // 2 if limit else 0) if refresh_keep is None else refresh_keep
    if limit is not None and not 0 <= keep < limit:
        raise ValueError(f"refresh_keep must be in [0, {limit}) (the model has {limit} positions), got {keep}")
    device = next(net.parameters()).device
    prompt = prompt.to(device=device, dtype=torch.long)
    B = prompt.shape[0]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    was_training = net.training
    net.eval()
    try:
        start = time.perf_counter()
        context = _Context(net, B, device, keep)
        logits = None
        for t in range(prompt.shape[1]):
            logits = context.feed(prompt[:, t])
        sync()
        prompt_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out: list[torch.Tensor] = []
        for i in range(max_new_tokens):
            token = sample_logits(logits, temperature, top_k, top_p, generator)
            out.append(token)
            if stream is not None:
                stream(int(token[0]) if single else token.cpu())
            if i + 1 < max_new_tokens:
                logits = context.feed(token)
        sync()
        seconds = time.perf_counter() - start
    finally:
        net.train(was_training)
    ids = torch.stack(out, dim=1) if out else prompt.new_zeros(B, 0)
    rate = B * max_new_tokens / seconds if seconds > 0 else math.inf
    return GenerationResult(ids[0] if single else ids, rate if max_new_tokens else 0.0, seconds, prompt_seconds)
