"""Model blocks built from registered mixers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers import build_mixer


class CausalRNBlock(nn.Module):
    """One CausalRN block: ``x <- x + RN(x)`` (the block of the CausalRN code).

    The relation network replaces both the attention and the MLP sub-layer of a Transformer block;
    its pre-normalisation (parameter-free LN0) is inside the mixer. The mixer is built by registry
    name: ``"causal-rn"`` (linear, separable pre-norm) or ``"causal-rn-quadratic"`` (exact per-pair
    pre-norm).

    Args:
        dim: model width E.
        hidden: h, the relation width (default ``dim``).
        quadratic: use the quadratic (exact pre-norm) mixer.
        causal: causal (default) or bidirectional pooling.
        **mixer_options: passed to the mixer (``chunk_size``, ``init_std``, ``out_init_std``).
    """

    def __init__(self, dim: int, hidden: int | None = None, *, quadratic: bool = False, causal: bool = True,
                 **mixer_options):
        super().__init__()
        name = "causal-rn-quadratic" if quadratic else "causal-rn"
        self.mixer = build_mixer(name, dim=dim, heads=1, causal=causal, hidden=hidden, **mixer_options)

    def forward(self, x: torch.Tensor, *, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.mixer(x, x_mask=x_mask)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> Any:
        return self.mixer.init_state(batch_size, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        y_t, state = self.mixer.step(x_t, state)
        return x_t + y_t, state
