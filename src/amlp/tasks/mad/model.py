"""The compression task's model: MAD's encoder-decoder backbone built around a :class:`DecoderLM`.

The decoder's blocks encode the input causally; its final (normalised) state at the last position,
the compression token, is the code of the whole sequence. A non-expanding MLP decodes position ``p``
from ``code + pos(p)`` (fixed sinusoidal positions, as in MAD's ``AutoEncoder``), and the
DecoderLM's own head reads the logits. Only the code carries information about the input, so the
reconstruction accuracy measures how much of the sequence the mixer can pack into one token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...models.decoder import DecoderLM


def decoder_states(lm: DecoderLM, tokens: torch.Tensor, *, x_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T, E]``: the states that ``lm`` feeds its head (``lm(tokens) == lm.head(decoder_states(...))``)."""
    return lm.hidden_states(tokens, x_mask=x_mask)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """``[length, dim]`` fixed sine/cosine positions (sines in the first half of the features,
    cosines in the second; frequencies ``10000 ** (-i / (dim/2 - 1))``)."""
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(-scale * torch.arange(half, dtype=torch.float64))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None, :]
    out = torch.zeros(length, dim, dtype=torch.float64)
    out[:, :half], out[:, half:2 * half] = torch.sin(angles), torch.cos(angles)
    return out.float()


class CompressionAutoencoder(nn.Module):
    """Encode with ``lm``'s blocks, keep the state at the last token, decode every position from it.

    Args:
        lm: the decoder (any causal mixer); its embeddings, blocks, final norm and head are used.
        length: the number of positions to decode (the input length).
    """

    def __init__(self, lm: DecoderLM, length: int):
        super().__init__()
        if length > lm.max_length:
            raise ValueError(f"length ({length}) exceeds the decoder's {lm.max_length} positions")
        self.lm, self.length = lm, length
        dim = lm.dim
        self.register_buffer("decode_positions", sinusoidal_positions(length, dim), persistent=False)
        self.decoder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                     nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        for m in self.decoder:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def recurrent(self) -> bool:
        return self.lm.recurrent

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_size(self, length: int) -> int | None:
        return self.lm.state_size(length)

    def encode(self, tokens: torch.Tensor, *, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, E]``: the code, the decoder's state at the last position."""
        return decoder_states(self.lm, tokens, x_mask=x_mask)[:, -1]

    def forward(self, tokens: torch.Tensor, *, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.length:
            raise ValueError(f"the model decodes {self.length} positions; got a sequence of length {T}")
        code = self.encode(tokens, x_mask=x_mask)
        z = code[:, None, :] + self.decode_positions[:T].to(code.dtype)
        return self.lm.head(self.decoder(z))
