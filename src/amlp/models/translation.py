"""Encoder-decoder translation models with a registered mixer at each of the three attention sites.

Two models share one encoder and one decoder stack:

* :class:`TransformerMT`, autoregressive (Vaswani et al. 2017): a causal decoder trained by teacher
  forcing, decoded token by token through each decoder mixer's recurrent ``step``.
* :class:`GLAT`, non-autoregressive (Qian et al. 2021, Glancing Transformer): the target length is
  predicted from the encoder, the decoder input is a uniform copy of the source embeddings, and the
  whole target comes out of one parallel pass. In training, a first pass measures how wrong the
  model is and the second pass is given ("glances at") ``ratio x Hamming distance`` target tokens.

Layout (pre-norm; a final LayerNorm after each stack)::

    encoder block:  x <- x + self_mixer(LN(x));            x <- x + FFN(LN(x))
    decoder block:  y <- y + self_mixer(LN(y));  y <- y + cross_mixer(LN(y), memory);  y <- y + FFN(LN(y))

Embeddings are shared by the source, the target and the output projection (one joint subword
vocabulary), scaled by sqrt(E), plus learned positions (one table per stack). Every mixer is built by
registry name (``amlp.build_mixer``), so the site that a mixer cannot serve is refused with the
registry's message: the decoder self site of the AR model needs a causal form, the cross site needs a
cross form.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import build_mixer
from ..layers.registry import check_request

#: special token ids of every translation vocabulary
PAD, UNK, BOS, EOS = 0, 1, 2, 3

#: cross mixers whose output for a query depends on that query alone (and the context), so that one
#: decoding step may mix the newest query by itself
QUERY_LOCAL_CROSS = ("softmax", "abc", "performer", "linear")
#: cross mixers that an AR decoder may use: the output for a query must not depend on later queries.
#: cosFormer qualifies with a fixed ``max_length`` (its query re-weighting then depends on the
#: query's own position only; a decoding step re-mixes the prefix of queries). Every other cross
#: mixer pools over the queries (AMLP's covariances and pseudo-queries, Nystrom's and LARA's
#: landmarks), so teacher forcing would see the future.
AR_CROSS = QUERY_LOCAL_CROSS + ("cosformer",)


def check_ar_cross(name: str, options: dict | None) -> None:
    """Refuse a cross mixer whose output for a query depends on later queries (an AR decoder's cross site)."""
    if name not in AR_CROSS:
        raise ValueError(f"the decoder cross site of an AR model: mixer {name!r} mixes over all queries, so the "
                         f"output at a position would see later target tokens; AR cross mixers: {', '.join(AR_CROSS)}")
    if name == "cosformer" and not (options or {}).get("max_length"):
        raise ValueError("the decoder cross site of an AR model: mixer 'cosformer' needs a fixed max_length option "
                         "(else its re-weighting depends on the whole target length)")


def check_site(name: str, site: str, *, causal: bool = False, cross: bool = False,
               options: dict | None = None) -> None:
    """Refuse, with the registry's message, a mixer that cannot serve ``site``."""
    try:
        check_request(name, causal=causal, cross=cross, options=options)
    except ValueError as err:
        raise ValueError(f"the {site} site: {err}") from None


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """``[length, dim]``: sin of ``p / 10000^(2i/dim)`` in the first half of the channels and cos in the
    second (fairseq's layout of Vaswani et al. 2017's encoding)."""
    half = dim // 2
    rate = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / max(half - 1, 1)))
    angle = torch.arange(length, dtype=torch.float64)[:, None] * rate[None, :]
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(length, 1, dtype=torch.float64)], dim=1)
    return table.float()


class _FixedPositions(nn.Module):
    """A fixed position table with the call and ``weight`` of an ``nn.Embedding`` (not saved: it is
    a function of the sizes)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, mixer: str, options: dict, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = build_mixer(mixer, dim=dim, heads=heads, causal=False, **options)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        x = x + self.dropout(self.mixer(self.norm1(x), x_mask=mask))
        return x + self.dropout(self.ffn(self.norm2(x)))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, self_mixer: str, self_options: dict,
                 cross_mixer: str, cross_options: dict, dropout: float, causal: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_mixer = build_mixer(self_mixer, dim=dim, heads=heads, causal=causal, **self_options)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_mixer = build_mixer(cross_mixer, dim=dim, heads=heads, causal=False, cross=True, **cross_options)
        self.cross_name = cross_mixer
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y, mask, memory, memory_mask):
        y = y + self.dropout(self.self_mixer(self.norm1(y), x_mask=mask))
        y = y + self.dropout(self.cross_mixer(self.norm2(y), memory, x_mask=mask, context_mask=memory_mask))
        return y + self.dropout(self.ffn(self.norm3(y)))

    def init_state(self, batch_size: int, device) -> dict[str, Any]:
        return {"self": self.self_mixer.init_state(batch_size, device=device), "queries": None, "memory": None}

    def step(self, y_t, state, memory, memory_mask):
        h, self_state = self.self_mixer.step(self.norm1(y_t), state["self"])
        y_t = y_t + self.dropout(h)
        q = self.norm2(y_t)[:, None]
        queries, projected = state["queries"], state["memory"]
        if self.cross_name in QUERY_LOCAL_CROSS:
            # the memory's keys and values are projected once, at the first step
            if projected is None and hasattr(self.cross_mixer, "project_context"):
                projected = self.cross_mixer.project_context(memory, memory_mask)
            if projected is not None:
                c = self.cross_mixer.mix_projected(q, projected)[:, -1]
            else:
                c = self.cross_mixer(q, memory, context_mask=memory_mask)[:, -1]
        else:
            queries = q if queries is None else torch.cat([queries, q], dim=1)
            c = self.cross_mixer(queries, memory, context_mask=memory_mask)[:, -1]
        y_t = y_t + self.dropout(c)
        y_t = y_t + self.dropout(self.ffn(self.norm3(y_t)))
        return y_t, {"self": self_state, "queries": queries, "memory": projected}


class EncoderDecoder(nn.Module):
    """What both translation models share: embeddings, the encoder, the decoder stack, the output layer.

    Args:
        vocab_size: joint subword vocabulary (pad id 0).
        max_length: learned positions per stack (the longest source or target accepted).
        dim, heads, ffn_dim: width E, heads per mixer, FFN width.
        encoder_layers, decoder_layers: blocks per stack.
        encoder_mixer, self_mixer, cross_mixer: registry names for the three sites, with their
            options in ``encoder_options``, ``self_options``, ``cross_options``.
        dropout: on embeddings and sub-layer outputs (and inside the FFN).
        positions: ``learned`` (a table per stack, N(0, 1/E)) or ``sinusoidal`` (Vaswani et al. 2017,
            fixed; fairseq's default for the Transformer and GLAT).
        causal: decoder self-mixing is causal (the AR model) or not (the NAR model).
    """

    causal = True

    def __init__(self, vocab_size: int, max_length: int, *, dim: int = 256, heads: int = 4, ffn_dim: int = 1024,
                 encoder_layers: int = 3, decoder_layers: int = 3, encoder_mixer: str = "softmax",
                 self_mixer: str = "softmax", cross_mixer: str = "softmax", encoder_options: dict | None = None,
                 self_options: dict | None = None, cross_options: dict | None = None, dropout: float = 0.1,
                 positions: str = "learned"):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_length", max_length), ("dim", dim), ("heads", heads),
                            ("ffn_dim", ffn_dim), ("encoder_layers", encoder_layers),
                            ("decoder_layers", decoder_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_site(encoder_mixer, "encoder self", options=encoder_options)
        check_site(self_mixer, "decoder self", causal=self.causal, options=self_options)
        check_site(cross_mixer, "decoder cross", cross=True, options=cross_options)
        if self.causal:
            check_ar_cross(cross_mixer, cross_options)
        self.vocab_size, self.max_length, self.dim = vocab_size, max_length, dim
        self.mixers = {"encoder": encoder_mixer, "self": self_mixer, "cross": cross_mixer}
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.embed_scale = math.sqrt(dim)
        if positions not in ("learned", "sinusoidal"):
            raise ValueError(f"positions must be 'learned' or 'sinusoidal', got {positions!r}")
        self.positions = positions
        if positions == "learned":
            self.encoder_positions = nn.Embedding(max_length, dim)
            self.decoder_positions = nn.Embedding(max_length, dim)
            nn.init.normal_(self.encoder_positions.weight, std=dim ** -0.5)
            nn.init.normal_(self.decoder_positions.weight, std=dim ** -0.5)
        else:
            table = sinusoidal_positions(max_length, dim)
            self.encoder_positions = _FixedPositions(table)
            self.decoder_positions = _FixedPositions(table.clone())
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderBlock(dim, heads, ffn_dim, encoder_mixer, dict(encoder_options or {}),
                                                  dropout) for _ in range(encoder_layers))
        self.encoder_norm = nn.LayerNorm(dim)
        self.decoder = nn.ModuleList(
            DecoderBlock(dim, heads, ffn_dim, self_mixer, dict(self_options or {}), cross_mixer,
                         dict(cross_options or {}), dropout, self.causal) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(dim)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_length(self, length: int, what: str) -> None:
        if length > self.max_length:
            raise ValueError(f"the {what} has {length} tokens, more than the model's {self.max_length} learned "
                             "positions (model.max_length)")

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens) * self.embed_scale

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, S, E]`` for source ids ``[B, S]`` (``src_mask``: True = real token)."""
        if src.dim() != 2 or src.is_floating_point():
            raise ValueError(f"src must be an integer tensor shaped [B, S], got {tuple(src.shape)}")
        self._check_length(src.shape[1], "source")
        positions = torch.arange(src.shape[1], device=src.device)
        x = self.dropout(self.embed_tokens(src) + self.encoder_positions(positions))
        for block in self.encoder:
            x = block(x, src_mask)
        return self.encoder_norm(x)

    def decode_embedded(self, y: torch.Tensor, tgt_mask: torch.Tensor | None, memory: torch.Tensor,
                        src_mask: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` from decoder inputs ``y`` ``[B, T, E]`` (token embeddings, no positions);
        with ``select`` (bool ``[B, T]``), only the logits of the selected positions, ``[N, V]`` in
        row-major order (the output layer is the largest matmul: training skips the padding)."""
        self._check_length(y.shape[1], "target")
        positions = torch.arange(y.shape[1], device=y.device)
        y = self.dropout(y + self.decoder_positions(positions))
        for block in self.decoder:
            y = block(y, tgt_mask, memory, src_mask)
        y = self.decoder_norm(y)
        return self.output(y if select is None else y[select])

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.embedding.weight)


class TransformerMT(EncoderDecoder):
    """The autoregressive encoder-decoder: ``logits = model(src, src_mask, tgt_in, tgt_mask)``.

    ``tgt_in`` is the target shifted right (BOS first); position t predicts target token t.
    """

    causal = True

    def forward(self, src, src_mask, tgt_in, tgt_mask=None, select=None):
        memory = self.encode(src, src_mask)
        return self.decode_embedded(self.embed_tokens(tgt_in), tgt_mask, memory, src_mask, select)

    @property
    def recurrent(self) -> bool:
        return all(b.self_mixer.capabilities.recurrent for b in self.decoder)

    def init_state(self, batch_size: int, device=None) -> dict[str, Any]:
        if not self.recurrent:
            raise ValueError(f"mixer {self.mixers['self']!r} has no recurrent step (capability 'recurrent')")
        device = device or self.embedding.weight.device
        return {"position": 0, "blocks": [b.init_state(batch_size, device) for b in self.decoder]}

    def step(self, tokens_t: torch.Tensor, state: dict, memory: torch.Tensor, src_mask: torch.Tensor):
        """Logits ``[B, V]`` for the next token after feeding ``tokens_t`` ``[B]``."""
        pos = state["position"]
        self._check_length(pos + 1, "target")
        y = self.dropout(self.embed_tokens(tokens_t) + self.decoder_positions.weight[pos])
        blocks = []
        for block, s in zip(self.decoder, state["blocks"]):
            y, s = block.step(y, s, memory, src_mask)
            blocks.append(s)
        return self.output(self.decoder_norm(y)), {"position": pos + 1, "blocks": blocks}

    @staticmethod
    def reorder_state(state: dict, index: torch.Tensor) -> dict:
        """The state with its batch rows taken in ``index`` order (beam search)."""
        def pick(obj):
            if isinstance(obj, torch.Tensor):
                return obj.index_select(0, index) if obj.dim() > 0 else obj
            if isinstance(obj, dict):
                return {k: pick(v) for k, v in obj.items()}
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):
                return type(obj)(*(pick(v) for v in obj))
            if isinstance(obj, (list, tuple)):
                return type(obj)(pick(v) for v in obj)
            return obj
        return pick(state)


def uniform_copy(src_embedded: torch.Tensor, src_lengths: torch.Tensor, tgt_lengths: torch.Tensor,
                 tgt_max: int) -> torch.Tensor:
    """Decoder inputs by uniform copy (Gu et al. 2018; GLAT): target position ``j`` of a target of
    length ``T'`` takes the source embedding at ``round(j * (S - 1) / (T' - 1))``. ``[B, tgt_max, E]``;
    rows past a target's length copy position 0 (they are masked downstream)."""
    B = src_embedded.shape[0]
    j = torch.arange(tgt_max, device=src_embedded.device, dtype=torch.float64)[None, :].expand(B, -1)
    S = src_lengths.to(torch.float64)[:, None]
    T = tgt_lengths.to(torch.float64)[:, None]
    ratio = (S - 1).clamp_min(0) / (T - 1).clamp_min(1)
    index = torch.round(j * ratio).long()
    index = torch.minimum(index, (src_lengths[:, None] - 1).clamp_min(0))
    index = torch.where(j < T, index, torch.zeros_like(index))
    return torch.gather(src_embedded, 1, index[..., None].expand(-1, -1, src_embedded.shape[-1]))


class GLAT(EncoderDecoder):
    """The non-autoregressive encoder-decoder of GLAT (Qian et al. 2021).

    * Length: a classifier over target lengths ``0 .. max_length`` from the mean of the encoder output
      over real source positions (``length_logits``).
    * Decoder input: :func:`uniform_copy` of the source token embeddings; where a target token is
      revealed (glancing in training, kept tokens in mask-predict), its embedding replaces the copy.
    * ``forward(src, src_mask, tgt_mask, revealed=None, tgt=None)``: one parallel pass; ``revealed``
      ``[B, T]`` (bool) marks positions whose input is the target token of ``tgt``.
    """

    causal = False

    def __init__(self, vocab_size: int, max_length: int, **kwargs):
        super().__init__(vocab_size, max_length, **kwargs)
        self.length_head = nn.Linear(self.dim, max_length + 1)

    def length_logits(self, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        real = src_mask[..., None]
        pooled = torch.where(real, memory, torch.zeros_like(memory)).sum(1)
        pooled = pooled / real.sum(1).clamp_min(1).to(memory.dtype)
        return self.length_head(pooled)

    def decoder_inputs(self, src, src_mask, tgt_mask, revealed=None, tgt=None) -> torch.Tensor:
        src_embedded = self.embed_tokens(src)
        y = uniform_copy(src_embedded, src_mask.sum(1), tgt_mask.sum(1), tgt_mask.shape[1])
        if revealed is not None:
            if tgt is None:
                raise ValueError("revealed positions need the target tokens (tgt)")
            y = torch.where(revealed[..., None], self.embed_tokens(tgt), y)
        return y

    def forward(self, src, src_mask, tgt_mask, revealed=None, tgt=None, memory=None, select=None):
        """(token logits ``[B, T, V]`` (``[N, V]`` at the ``select`` positions), length logits
        ``[B, max_length + 1]``)."""
        if memory is None:
            memory = self.encode(src, src_mask)
        y = self.decoder_inputs(src, src_mask, tgt_mask, revealed, tgt)
        return (self.decode_embedded(y, tgt_mask, memory, src_mask, select),
                self.length_logits(memory, src_mask))
