"""A decoder-only language model over tokens with any causal mixer, and its token-by-token form.

    logits = model(tokens)                       # [B, T] -> [B, T, V]
    state = model.init_state(batch_size)
    logits_t, state = model.step(tokens_t, state)  # [B] -> [B, V], same numbers as the full forward

Architecture: ``x = wte(token) + wpe(position)`` (both learned), then ``n_layers`` blocks, a final
LayerNorm and a linear head without bias. Two block types:

* ``"transformer"``: pre-norm ``x <- x + mixer(LN(x))``, ``x <- x + MLP(LN(x))`` with the mixer built
  by registry name (``amlp.build_mixer(name, dim, heads, causal=True, **options)``) and a GELU MLP of
  width ``mlp_ratio * dim``.
* ``"causal-rn"``: the CausalRN block ``x <- x + RN(x)`` (:class:`amlp.models.blocks.CausalRNBlock`,
  the CausalRN code's block), which replaces both sub-layers; the mixer must be ``causal-rn`` or
  ``causal-rn-quadratic``, and W_3 is initialised with std ``0.02 / sqrt(n_layers)`` as in the
  original code.

``block="auto"`` picks the CausalRN block for the two CausalRN mixers and the Transformer block for
every other mixer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..layers import build_mixer, get_mixer_info
from .blocks import CausalRNBlock

BLOCK_TYPES = ("auto", "transformer", "causal-rn")
CAUSAL_RN_MIXERS = ("causal-rn", "causal-rn-quadratic")


def resolve_block_type(block: str, mixer: str) -> str:
    """The concrete block type for ``block`` (``auto`` resolved) and ``mixer``; raises on a mismatch."""
    if block not in BLOCK_TYPES:
        raise ValueError(f"block must be one of {BLOCK_TYPES}, got {block!r}")
    if block == "auto":
        return "causal-rn" if mixer in CAUSAL_RN_MIXERS else "transformer"
    if block == "causal-rn" and mixer not in CAUSAL_RN_MIXERS:
        raise ValueError(f"block 'causal-rn' needs mixer 'causal-rn' or 'causal-rn-quadratic', got {mixer!r}")
    return block


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + mixer(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mixer: str, *, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 mixer_options: dict[str, Any] | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = build_mixer(mixer, dim=dim, heads=heads, causal=True, **(mixer_options or {}))
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(round(mlp_ratio * dim)))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x), x_mask=x_mask))
        return x + self.mlp(self.norm2(x))

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> Any:
        return self.mixer.init_state(batch_size, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        y_t, state = self.mixer.step(self.norm1(x_t), state)
        x_t = x_t + self.dropout(y_t)
        return x_t + self.mlp(self.norm2(x_t)), state


class DecoderLM(nn.Module):
    """Decoder-only model: embeddings, ``n_layers`` causal blocks, final LayerNorm, LM head.

    Args:
        vocab_size: number of token ids.
        max_length: number of learned positions (the longest input the model accepts).
        dim, heads, n_layers: width E, heads per mixer and number of blocks.
        mixer: registry name of the causal mixer (every block uses the same one).
        block: ``"auto"``, ``"transformer"`` or ``"causal-rn"`` (see the module docstring).
        mlp_ratio: MLP width over E in Transformer blocks.
        dropout: dropout on the sub-layer outputs and the embeddings.
        mixer_options: keyword options for the mixer (``hidden`` for CausalRN, ``wsize`` for
            ``local``, ...).
        embed_init_std: std of the normal initialisation of both embeddings.
    """

    def __init__(self, vocab_size: int, max_length: int, *, dim: int = 64, heads: int = 1, n_layers: int = 2,
                 mixer: str = "softmax", block: str = "auto", mlp_ratio: float = 4.0, dropout: float = 0.0,
                 mixer_options: dict[str, Any] | None = None, embed_init_std: float = 0.02):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_length", max_length), ("dim", dim),
                            ("heads", heads), ("n_layers", n_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        caps = get_mixer_info(mixer).capabilities
        if not caps.causal:
            raise ValueError(f"mixer {mixer!r} has no causal form (capability 'causal'); a decoder needs one")
        self.block_type = resolve_block_type(block, mixer)
        self.vocab_size, self.max_length, self.dim, self.mixer_name = vocab_size, max_length, dim, mixer
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_length, dim)
        nn.init.normal_(self.token_embedding.weight, std=embed_init_std)
        nn.init.normal_(self.position_embedding.weight, std=embed_init_std)
        self.embed_dropout = nn.Dropout(dropout)
        options = dict(mixer_options or {})
        if self.block_type == "causal-rn":
            options.setdefault("out_init_std", 0.02 / math.sqrt(n_layers))
            self.blocks = nn.ModuleList(
                CausalRNBlock(dim, quadratic=mixer == "causal-rn-quadratic", causal=True, **options)
                for _ in range(n_layers))
        else:
            self.blocks = nn.ModuleList(
                TransformerBlock(dim, heads, mixer, mlp_ratio=mlp_ratio, dropout=dropout, mixer_options=options)
                for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)

    @property
    def recurrent(self) -> bool:
        return all(block.mixer.capabilities.recurrent for block in self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_size(self, length: int) -> int | None:
        """Floats of recurrent mixer state per batch row after ``length`` tokens, summed over blocks
        (None if a mixer has no recurrent form)."""
        sizes = [block.mixer.state_size(length) for block in self.blocks]
        return None if any(s is None for s in sizes) else int(sum(sizes))

    def _check_tokens(self, tokens: torch.Tensor, dims: int, name: str) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != dims or tokens.is_floating_point():
            shape = "[B, T]" if dims == 2 else "[B]"
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{name} must be an integer tensor shaped {shape}, got {got}")

    def forward(self, tokens: torch.Tensor, *, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.hidden_states(tokens, x_mask=x_mask))

    def hidden_states(self, tokens: torch.Tensor, *, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, E]``: the final-norm states the head reads (``model(tokens) == model.head(...)``)."""
        self._check_tokens(tokens, 2, "tokens")
        T = tokens.shape[1]
        if T > self.max_length:
            raise ValueError(f"the model has {self.max_length} learned positions (model.max_length); "
                             f"got a sequence of length {T}")
        positions = torch.arange(T, device=tokens.device)
        x = self.embed_dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x, x_mask=x_mask)
        return self.norm(x)

    # -- token by token ----------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict[str, Any]:
        """Empty decoding state: the next position and one mixer state per block."""
        if not self.recurrent:
            names = sorted({b.mixer.mixer_name for b in self.blocks if not b.mixer.capabilities.recurrent})
            raise ValueError(f"mixer(s) {', '.join(names)} have no recurrent step (capability 'recurrent')")
        device = device or self.head.weight.device
        return {"position": 0,
                "blocks": [b.init_state(batch_size, device=device, dtype=dtype) for b in self.blocks]}

    def step(self, tokens_t: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits ``[B, V]`` for the next token after feeding ``tokens_t`` ``[B]`` at the state's position."""
        self._check_tokens(tokens_t, 1, "tokens_t")
        pos = state["position"]
        if pos >= self.max_length:
            raise ValueError(f"the model has {self.max_length} learned positions (model.max_length); "
                             f"step {pos + 1} is past them")
        x = self.embed_dropout(self.token_embedding(tokens_t) + self.position_embedding.weight[pos])
        new_states = []
        for block, s in zip(self.blocks, state["blocks"]):
            x, s = block.step(x, s)
            new_states.append(s)
        return self.head(self.norm(x)), {"position": pos + 1, "blocks": new_states}


@torch.no_grad()
def greedy_decode(model: DecoderLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ``prompt`` ``[B, P]`` by ``new_tokens`` tokens through ``model.step``.

    The prompt is fed one token at a time (every mixer keeps its recurrent state), then each argmax
    is fed back. Returns the ``[B, new_tokens]`` generated tokens.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be shaped [B, P] with P >= 1, got {tuple(prompt.shape)}")
    state = model.init_state(prompt.shape[0], device=prompt.device)
    logits = None
    for t in range(prompt.shape[1]):
        logits, state = model.step(prompt[:, t], state)
    out = []
    for i in range(new_tokens):
        token = logits.argmax(dim=-1)
        out.append(token)
        if i + 1 < new_tokens:
            logits, state = model.step(token, state)
    return torch.stack(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)


@torch.no_grad()
def greedy_decode_full(model: DecoderLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The same greedy continuation by re-running the full forward on the growing sequence
    (quadratic; the reference for :func:`greedy_decode`)."""
    seq = prompt
    for _ in range(new_tokens):
        token = model(seq)[:, -1].argmax(dim=-1)
        seq = torch.cat([seq, token[:, None]], dim=1)
    return seq[:, prompt.shape[1]:]
