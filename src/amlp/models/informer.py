"""An Informer-style encoder-decoder forecaster whose attention layers are chosen by registry name.

Follows Zhou et al. 2021 ("Informer", AAAI), as used for the cross-attention study of the AMLP
paper (Jiang et al. 2023, section 3.3, Tables 4 and 6):

* **Embedding**: value embedding (a width-3 circular convolution over time) + time-feature
  embedding (a linear map of the ``timeF`` features) + fixed sinusoidal positions, then dropout.
* **Encoder**: ``e_layers`` post-norm blocks ``x = LN(x + Drop(SelfMix(x)))``,
  ``x = LN(x + Drop(FFN(x)))``; with ``distil`` a distilling block (convolution, BatchNorm, ELU,
  max-pool with stride 2) between two blocks halves the length; a final LayerNorm.
* **Decoder**: ``d_layers`` blocks of self-mixing, cross-mixing over the encoder output and FFN,
  each residual and post-norm; a final LayerNorm and a linear projection to the outputs.
* **Generative decoder input**: the last ``label_len`` known steps followed by ``pred_len`` zeros
  (time features for all of them); the forecast is the last ``pred_len`` outputs, produced in one
  pass (non-autoregressive).

The decoder's self-mixing is causal by default, as in Informer (``decoder_causal=False`` makes it
bidirectional). Any registered mixer can serve as ``self_mixer`` / ``cross_mixer``; options per
mixer name come from ``mixer_options`` (for instance ``{"amlp-cov": {"landmarks": 16}}``).
Departures from Informer's code: its ProbSparse attention and the ``mix`` head reshuffle of its
decoder self-attention are not implemented; encoder and decoder self-attention are any registered
mixer (full softmax attention in the shipped configs, with Informer's attention dropout through the
softmax mixer's ``attn_dropout``). ``embedding_bias=True`` gives the value convolution and the
time-feature map the biases Informer's embeddings have (off by default for checkpoints made before
the option existed).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..layers import build_mixer


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """``PE[t, 2i] = sin(t / 10000^(2i/dim))``, ``PE[t, 2i+1] = cos(...)`` (Vaswani et al. 2017)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe


class ForecastEmbedding(nn.Module):
    """Value (circular conv, width 3) + time-feature (linear) + sinusoidal position embedding."""

    def __init__(self, c_in: int, n_time_features: int, d_model: int, dropout: float, bias: bool = False):
        super().__init__()
        self.value = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=bias)
        nn.init.kaiming_normal_(self.value.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.time = nn.Linear(n_time_features, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.d_model = d_model

    def forward(self, x: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
        v = self.value(x.transpose(1, 2)).transpose(1, 2)
        pe = sinusoidal_positions(x.shape[1], self.d_model, x.device).to(v.dtype)
        return self.dropout(v + self.time(marks) + pe)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU() if activation == "gelu" else nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(d_ff, d_model), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class EncoderBlock(nn.Module):
    def __init__(self, d_model, heads, d_ff, dropout, activation, mixer, mixer_options):
        super().__init__()
        self.mix = build_mixer(mixer, dim=d_model, heads=heads, **mixer_options)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = self.norm1(x + self.dropout(self.mix(x)))
        return self.norm2(x + self.ffn(x))


class DistilBlock(nn.Module):
    """Informer's self-attention distilling: conv (width 3, circular), BatchNorm, ELU, max-pool /2."""

    def __init__(self, d_model: int):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1, padding_mode="circular")
        self.norm = nn.BatchNorm1d(d_model)
        self.act = nn.ELU()
        self.pool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        y = self.pool(self.act(self.norm(self.conv(x.transpose(1, 2)))))
        return y.transpose(1, 2)


class DecoderBlock(nn.Module):
    def __init__(self, d_model, heads, d_ff, dropout, activation, self_mixer, cross_mixer, causal,
                 self_options, cross_options):
        super().__init__()
        self.self_mix = build_mixer(self_mixer, dim=d_model, heads=heads, causal=causal, **self_options)
        self.cross_mix = build_mixer(cross_mixer, dim=d_model, heads=heads, cross=True, **cross_options)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory):
        x = self.norm1(x + self.dropout(self.self_mix(x)))
        x = self.norm2(x + self.dropout(self.cross_mix(x, memory)))
        return self.norm3(x + self.ffn(x))


class InformerForecaster(nn.Module):
    """Encoder-decoder forecaster: ``forward(x, x_mark, x_dec, x_dec_mark) -> [B, pred_len, c_out]``.

    Args:
        enc_in, dec_in, c_out: input channels of encoder and decoder, output channels.
        n_time_features: width of the time-feature vectors.
        pred_len: number of future steps predicted (the last ``pred_len`` decoder positions).
        d_model, heads, e_layers, d_layers, d_ff, dropout, activation, distil: as in Informer.
        self_mixer, cross_mixer: registry names of the self- and cross-mixers.
        decoder_causal: causal decoder self-mixing (Informer) or bidirectional.
        mixer_options: options per registry name, passed to ``build_mixer`` for that mixer.
        embedding_bias: biases in the value and time-feature embeddings (as Informer).
        cross_options: options for the cross-mixer only, over those of ``mixer_options`` (for a
            study that varies, say, the AMLP form of the cross-attention alone).
    """

    def __init__(self, enc_in: int, dec_in: int, c_out: int, n_time_features: int, pred_len: int, *,
                 d_model: int = 512, heads: int = 8, e_layers: int = 2, d_layers: int = 1, d_ff: int = 2048,
                 dropout: float = 0.05, activation: str = "gelu", distil: bool = True,
                 self_mixer: str = "softmax", cross_mixer: str = "softmax", decoder_causal: bool = True,
                 mixer_options: dict[str, dict[str, Any]] | None = None, embedding_bias: bool = False,
                 cross_options: dict[str, Any] | None = None):
        super().__init__()
        options = mixer_options or {}
        self.pred_len = pred_len
        self.enc_embedding = ForecastEmbedding(enc_in, n_time_features, d_model, dropout, embedding_bias)
        self.dec_embedding = ForecastEmbedding(dec_in, n_time_features, d_model, dropout, embedding_bias)
        self.encoder = nn.ModuleList(
            EncoderBlock(d_model, heads, d_ff, dropout, activation, self_mixer, options.get(self_mixer, {}))
            for _ in range(e_layers))
        self.distil = nn.ModuleList(DistilBlock(d_model) for _ in range(e_layers - 1)) if distil else None
        self.encoder_norm = nn.LayerNorm(d_model)
        self.decoder = nn.ModuleList(
            DecoderBlock(d_model, heads, d_ff, dropout, activation, self_mixer, cross_mixer, decoder_causal,
                         options.get(self_mixer, {}), {**options.get(cross_mixer, {}), **(cross_options or {})})
            for _ in range(d_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.projection = nn.Linear(d_model, c_out)

    def encode(self, x: torch.Tensor, x_mark: torch.Tensor) -> torch.Tensor:
        h = self.enc_embedding(x, x_mark)
        for i, block in enumerate(self.encoder):
            h = block(h)
            if self.distil is not None and i < len(self.distil):
                h = self.distil[i](h)
        return self.encoder_norm(h)

    def forward(self, x: torch.Tensor, x_mark: torch.Tensor, x_dec: torch.Tensor,
                x_dec_mark: torch.Tensor) -> torch.Tensor:
        for name, t, width in (("x", x, 3), ("x_mark", x_mark, 3), ("x_dec", x_dec, 3), ("x_dec_mark", x_dec_mark, 3)):
            if t.dim() != width:
                raise ValueError(f"{name} must be shaped [B, T, C], got {tuple(t.shape)}")
        if x_dec.shape[1] < self.pred_len:
            raise ValueError(f"x_dec must hold at least pred_len={self.pred_len} steps, got {x_dec.shape[1]}")
        memory = self.encode(x, x_mark)
        h = self.dec_embedding(x_dec, x_dec_mark)
        for block in self.decoder:
            h = block(h, memory)
        out = self.projection(self.decoder_norm(h))
        return out[:, -self.pred_len:, :]


def generative_decoder_input(y: torch.Tensor, label_len: int, pred_len: int) -> torch.Tensor:
    """Informer's decoder input: the first ``label_len`` steps of ``y`` (known) then ``pred_len`` zeros."""
    known = y[:, :label_len]
    return torch.cat([known, torch.zeros(y.shape[0], pred_len, y.shape[2], dtype=y.dtype, device=y.device)], dim=1)
