"""Text-to-speech acoustic models with a registered mixer at each attention site: phone ids in,
log-mel frames out (a vocoder turns them into audio).

* :class:`FastSpeech2`, non-autoregressive (Ren et al. 2021, FastSpeech 2): the phone encoder, a
  variance adaptor (duration, pitch and energy predicted per phone), the length regulator, a frame
  decoder and a PostNet; all frames come out of one parallel pass.
* :class:`TransformerTTS`, autoregressive (Li et al. 2019, Neural Speech Synthesis with Transformer
  Network): a phone encoder and a causal frame decoder with cross-mixing over the phones, trained by
  teacher forcing and decoded frame by frame through each decoder mixer's recurrent ``step``, with a
  stop token that ends each utterance.

Tensors are batch first. Phones ``[B, N]`` (long, id ``PAD = 0`` is padding) with ``phone_mask``
``[B, N]``; frames ``[B, T, n_mels]`` with ``frame_mask`` ``[B, T]``; masks are bool, True = real
position, and sequences are padded on the right. Masks select (``torch.where``), they never multiply:
whatever a padded phone or frame holds (NaN included) reaches no real output. Convolutions see zeros
beyond the real positions of their row, so an utterance gives the same output alone or padded in a
batch (eval mode); batch-norm statistics in training are taken over the real positions only.

FastSpeech 2 layout (the paper's post-norm FFT blocks)::

    phones -> embedding + sinusoidal positions -> N x FFT block                     (encoder, [B, N, E])
    FFT block:  x <- LN(x + mixer(x));  x <- LN(x + Conv1d_1(ReLU(Conv1d_9(x))))
    variance adaptor:  log(d + 1), pitch, energy = predictors(x)  (phone level)
                       x <- x + Emb(bucket(pitch));  x <- x + Emb(bucket(energy))
                       (ground-truth pitch/energy/durations in training, predicted at inference)
    length regulator:  phone i repeated d_i times                                      ([B, T, E])
    frames -> + sinusoidal positions -> N x FFT block -> Linear(n_mels) = mel;  mel_post = mel + PostNet(mel)

Transformer-TTS layout (pre-norm blocks shared with :mod:`amlp.models.translation`, a final LayerNorm
after each stack)::

    phones -> embedding -> encoder pre-net (K x [Conv1d_5, BatchNorm, ReLU, dropout], Linear)
           -> + alpha_enc * PE -> N x [x + mixer(LN(x)); x + FFN(LN(x))] -> LN                (memory)
    [go, mel_0 .. mel_{T-2}] -> decoder pre-net (2 x [Linear, ReLU, dropout 0.5]) -> Linear
           -> + alpha_dec * PE -> N x [causal self mixer, cross mixer over memory, FFN] -> LN
           -> Linear(n_mels) = mel, Linear(1) = stop logit;  mel_post = mel + PostNet(mel)

The paper's scaled positional encoding (a trainable scalar ``alpha`` per stack on the sinusoidal
table) and its pre-nets are kept (the encoder pre-net depth is an argument: ``encoder_prenet_layers=0``
leaves the embedding and the linear projection only). The decoder pre-net's dropout stays on at
inference, as in the paper (Tacotron 2's device for varied prosody); ``prenet_dropout_at_inference``
switches it off (step decoding then equals teacher forcing on the model's own frames).

Every mixer is built by registry name (``amlp.build_mixer``), so the site that a mixer cannot serve
is refused with the registry's message. A mixer whose maximum length is a constructor option gets the
model's ``max_phones`` (phone sites) or ``max_frames`` (frame sites) there when it has a size limit
(gMLP's spatial weights, Linformer's projections) or needs a fixed horizon (causal cosFormer, and an
AR cross site, where it is the larger of the two).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import build_mixer
from ..layers.registry import get_mixer_info
from .translation import (DecoderBlock, EncoderBlock, _FixedPositions, check_ar_cross, check_site,
                          sinusoidal_positions)

#: phone id 0 is padding (a task maps phone strings to ids 1 .. V-1)
PAD = 0

__all__ = ["PAD", "FastSpeech2", "PostNet", "TransformerTTS", "length_regulate", "site_options"]


# -- helpers -----------------------------------------------------------------------------------------
def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _odd_kernel(name: str, value) -> None:
    _positive_int(name, value)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd (a centred convolution keeps the length), got {value}")


def _dropout_rate(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[B, T, ...]`` with the positions where ``mask`` ``[B, T]`` is False set to zero, by
    selection (a NaN there does not survive)."""
    if mask is None:
        return x
    mask = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_mask(mask: torch.Tensor, shape: tuple[int, int], name: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__)
        raise ValueError(f"{name} must be a bool tensor shaped {list(shape)} (True = real position), got {got}")


def _check_phones(phones: torch.Tensor, phone_mask: torch.Tensor, max_phones: int) -> None:
    if not isinstance(phones, torch.Tensor) or phones.dim() != 2 or phones.is_floating_point():
        raise ValueError(f"phones must be an integer tensor shaped [B, N], got "
                         f"{tuple(phones.shape) if isinstance(phones, torch.Tensor) else type(phones).__name__}")
    _check_mask(phone_mask, tuple(phones.shape), "phone_mask")
    if phones.shape[1] > max_phones:
        raise ValueError(f"the input has {phones.shape[1]} phones, more than the model's max_phones={max_phones} "
                         "(its phone position table and phone-site mixer lengths); build the model with a larger "
                         "max_phones")


def site_options(name: str, options: dict | None, length: int, *, fixed: bool = False,
                 what: str = "max_length") -> dict:
    """The options of mixer ``name`` at a site whose sequences are at most ``length`` long: a mixer
    whose maximum length is a constructor option (``capabilities.max_length_option``) gets ``length``
    there when it has a size limit (``capabilities.max_length``) or when ``fixed`` (a causal form or
    an AR cross site, which need a fixed horizon). A value given in ``options`` below ``length`` is
    refused (``what`` names the model's limit in the message)."""
    caps = get_mixer_info(name).capabilities
    opts = dict(options or {})
    key = caps.max_length_option
    if key is None:
        return opts
    if key in opts:
        given = opts[key]
        if given is not None and isinstance(given, int) and given < length:
            raise ValueError(f"mixer {name!r}: option {key}={given} is below the model's {what}={length}; "
                             f"leave {key} out (the model passes {length}) or lower {what}")
    elif caps.max_length is not None or fixed:
        opts[key] = length
    return opts


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over channels of ``[B, C, T]`` whose training statistics (and running averages)
    come from the real positions of ``mask`` ``[B, T]`` alone; eval mode uses the running averages
    like :class:`torch.nn.BatchNorm1d`."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or not self.training:
            return super().forward(x)
        m = mask[:, None, :]
        n = mask.sum().clamp_min(1).to(x.dtype)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        mean = torch.where(m, x, zero).sum((0, 2)) / n
        centred = torch.where(m, x - mean[None, :, None], zero)
        var = centred.pow(2).sum((0, 2)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        y = (x - mean[None, :, None]) * torch.rsqrt(var + self.eps)[None, :, None]
        if self.affine:
            y = y * self.weight[None, :, None] + self.bias[None, :, None]
        return y


def _conv(conv: nn.Conv1d, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``conv`` over time on ``x`` ``[B, T, C]`` (zeros at the padded positions), ``[B, T, C']``."""
    return conv(_select(x, mask).transpose(1, 2)).transpose(1, 2)


class ConvBNStack(nn.Module):
    """``layers`` x [Conv1d (centred), masked BatchNorm, activation, dropout] on ``[B, T, C]``; the
    activation of the last layer is ``last_activation`` (None: linear)."""

    def __init__(self, channels: list[int], kernel: int, activation: str, dropout: float,
                 last_activation: str | None):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(a, b, kernel, padding=kernel // 2) for a, b in zip(channels, channels[1:]))
        self.norms = nn.ModuleList(MaskedBatchNorm1d(b) for b in channels[1:])
        self.activations = [activation] * (len(self.convs) - 1) + [last_activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for conv, norm, act in zip(self.convs, self.norms, self.activations):
            h = conv(_select(x, mask).transpose(1, 2))
            h = norm(h, mask).transpose(1, 2)
            if act == "tanh":
                h = torch.tanh(h)
            elif act == "relu":
                h = F.relu(h)
            x = self.dropout(h)
        return x


class PostNet(nn.Module):
    """Tacotron 2's PostNet (Shen et al. 2018): ``layers`` Conv1d with batch-norm, tanh on all but the
    last, dropout; its output is a residual added to the mel: ``mel_post = mel + PostNet(mel)``."""

    def __init__(self, n_mels: int, dim: int = 512, layers: int = 5, kernel: int = 5, dropout: float = 0.5):
        super().__init__()
        _positive_int("postnet_layers", layers)
        _positive_int("postnet_dim", dim)
        _odd_kernel("postnet_kernel", kernel)
        _dropout_rate("postnet_dropout", dropout)
        channels = [n_mels] + [dim] * (layers - 1) + [n_mels]
        self.stack = ConvBNStack(channels, kernel, "tanh", dropout, None)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _select(mel + self.stack(mel, mask), mask)


def length_regulate(x: torch.Tensor, durations: torch.Tensor, max_frames: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """FastSpeech's length regulator: phone vector ``x[b, i]`` repeated ``durations[b, i]`` times.

    Args:
        x: ``[B, N, E]`` phone-level vectors.
        durations: ``[B, N]`` integer frame counts >= 0 (padding phones have 0; a real phone may
            have 0 too and is then skipped).
        max_frames: the output length ``T`` (rows padded to it); a row needing more frames raises
            ``ValueError``. None: ``T`` is the longest row's total.

    Returns:
        ``(frames [B, T, E], frame_mask [B, T])``; frame ``t < sum(durations[b])`` of row ``b`` is real
        and the rest are zeros (selected, whatever the padded phones hold).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be shaped [B, N, E], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(durations, torch.Tensor) or durations.is_floating_point() or durations.dtype == torch.bool:
        raise ValueError("durations must be an integer tensor (frames per phone)")
    if tuple(durations.shape) != tuple(x.shape[:2]):
        raise ValueError(f"durations must be shaped [B, N] = {list(x.shape[:2])}, got {list(durations.shape)}")
    if bool((durations < 0).any()):
        raise ValueError("durations must be >= 0")
    B, N, E = x.shape
    durations = durations.long()
    ends = torch.cumsum(durations, dim=1)  # [B, N]: frame index where each phone stops
    totals = ends[:, -1] if N else torch.zeros(B, dtype=torch.long, device=x.device)
    longest = int(totals.max()) if B else 0
    if max_frames is None:
        T = longest
    else:
        _positive_int("max_frames", max_frames, 0)
        if longest > max_frames:
            row = int(totals.argmax())
            raise ValueError(f"utterance {row} needs {longest} frames, more than max_frames={max_frames}")
        T = max_frames
    t = torch.arange(T, device=x.device)
    frame_mask = t[None, :] < totals[:, None]
    if N == 0 or T == 0:
        return x.new_zeros(B, T, E), frame_mask
    # the phone of frame t is the number of phones that end at or before t
    index = torch.searchsorted(ends, t[None, :].expand(B, T).contiguous(), right=True).clamp_max(N - 1)
    frames = torch.gather(x, 1, index[..., None].expand(B, T, E))
    return _select(frames, frame_mask), frame_mask


# -- FastSpeech 2 ------------------------------------------------------------------------------------
class FFTBlock(nn.Module):
    """FastSpeech's feed-forward Transformer block (post-norm): a registered non-causal mixer with a
    residual and LayerNorm, then Conv1d(kernel ``ffn_kernel``) -> ReLU -> Conv1d(1) with dropout, a
    residual and LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, ffn_kernel: int, mixer: str, options: dict,
                 dropout: float):
        super().__init__()
        self.mixer = build_mixer(mixer, dim=dim, heads=heads, causal=False, **options)
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv1d(dim, ffn_dim, ffn_kernel, padding=ffn_kernel // 2)
        self.conv2 = nn.Conv1d(ffn_dim, dim, 1)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # padded rows are zeros from here on (a NaN there would reach the LayerNorm's parameter gradients)
        x = _select(x, mask)
        x = self.norm1(x + self.dropout(self.mixer(x, x_mask=mask)))
        h = self.dropout(F.relu(_conv(self.conv1, x, mask)))
        x = self.norm2(x + self.dropout(_conv(self.conv2, h, mask)))
        return _select(x, mask)


class VariancePredictor(nn.Module):
    """FastSpeech 2's variance predictor: 2 x [Conv1d(kernel), ReLU, LayerNorm, dropout], then a
    linear layer to one value per position (``[B, N]``, zero at padded positions)."""

    def __init__(self, dim: int, hidden: int, kernel: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv1d(dim, hidden, kernel, padding=kernel // 2)
        self.norm1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.norm2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.norm1(F.relu(_conv(self.conv1, x, mask))))
        h = self.dropout(self.norm2(F.relu(_conv(self.conv2, h, mask))))
        return _select(self.out(h).squeeze(-1), mask)


class VarianceEmbedding(nn.Module):
    """A normalised float per position quantised into ``bins`` equal buckets over ``value_range``
    (values outside fall into the end buckets) and embedded."""

    def __init__(self, dim: int, bins: int, value_range: tuple[float, float], name: str):
        super().__init__()
        lo, hi = (float(v) for v in value_range)
        if not lo < hi:
            raise ValueError(f"{name}_range must be (low, high) with low < high, got {value_range!r}")
        self.register_buffer("boundaries", torch.linspace(lo, hi, bins + 1)[1:-1], persistent=False)
        self.embedding = nn.Embedding(bins, dim)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        values = _select(values, mask).contiguous()
        index = torch.bucketize(values.to(self.boundaries.dtype), self.boundaries)
        return _select(self.embedding(index), mask)


class FastSpeech2(nn.Module):
    """FastSpeech 2 (Ren et al. 2021), the non-autoregressive acoustic model; see the module docstring.

    Args:
        num_phones: phone vocabulary size V (id 0 is padding).
        n_mels: mel bands of the output.
        dim, heads, ffn_dim, ffn_kernel: width E, heads per mixer, the FFT block's conv width and first
            kernel (the paper's 256, 2, 1024, 9).
        encoder_layers, decoder_layers: FFT blocks per stack (4 and 4).
        encoder_mixer, decoder_mixer: registry names of the phone and frame self-mixing sites (non-causal),
            with their options in ``encoder_options``, ``decoder_options`` (e.g. ``{"form": "paper"}``
            for AMLP); a mixer whose maximum length is an option gets ``max_phones`` / ``max_frames``.
        dropout: in the FFT blocks and after the embeddings (0.2, the paper's setting).
        variance_dim, variance_kernel, variance_dropout: the predictors' conv width, kernel, dropout
            (256, 3, 0.5).
        bins, pitch_range, energy_range: pitch and energy (normalised by the caller) are quantised into
            ``bins`` buckets over the range and embedded.
        postnet_layers, postnet_dim, postnet_kernel, postnet_dropout: the PostNet (5, 512, 5, 0.5).
        max_phones, max_frames: the longest phone and frame sequences (position tables and mixer lengths).

    ``forward(phones, phone_mask, durations=None, pitch=None, energy=None)`` returns a dict:
    ``mel``, ``mel_post`` ``[B, T, n_mels]``, ``frame_mask`` ``[B, T]``, ``durations`` (the frames per
    phone used, ``[B, N]``), and the predictions ``log_duration`` (of ``log(d + 1)``), ``pitch``,
    ``energy`` ``[B, N]`` (zero at padded phones). Ground-truth durations, pitch and energy are used
    where given (training), the predictions otherwise.
    """

    def __init__(self, num_phones: int, n_mels: int = 80, *, dim: int = 256, heads: int = 2, ffn_dim: int = 1024,
                 ffn_kernel: int = 9, encoder_layers: int = 4, decoder_layers: int = 4,
                 encoder_mixer: str = "softmax", decoder_mixer: str = "softmax",
                 encoder_options: dict | None = None, decoder_options: dict | None = None, dropout: float = 0.2,
                 variance_dim: int = 256, variance_kernel: int = 3, variance_dropout: float = 0.5, bins: int = 256,
                 pitch_range: tuple[float, float] = (-4.0, 4.0), energy_range: tuple[float, float] = (-4.0, 4.0),
                 postnet_layers: int = 5, postnet_dim: int = 512, postnet_kernel: int = 5,
                 postnet_dropout: float = 0.5, max_phones: int = 256, max_frames: int = 1000):
        super().__init__()
        for name, value in (("num_phones", num_phones), ("n_mels", n_mels), ("dim", dim), ("heads", heads),
                            ("ffn_dim", ffn_dim), ("encoder_layers", encoder_layers),
                            ("decoder_layers", decoder_layers), ("variance_dim", variance_dim),
                            ("max_phones", max_phones), ("max_frames", max_frames)):
            _positive_int(name, value)
        _positive_int("bins", bins, 2)
        _odd_kernel("ffn_kernel", ffn_kernel)
        _odd_kernel("variance_kernel", variance_kernel)
        _dropout_rate("dropout", dropout)
        _dropout_rate("variance_dropout", variance_dropout)
        encoder_options = site_options(encoder_mixer, encoder_options, max_phones, what="max_phones")
        decoder_options = site_options(decoder_mixer, decoder_options, max_frames, what="max_frames")
        check_site(encoder_mixer, "encoder self", options=encoder_options)
        check_site(decoder_mixer, "decoder self", options=decoder_options)
        self.num_phones, self.n_mels, self.dim = num_phones, n_mels, dim
        self.max_phones, self.max_frames = max_phones, max_frames
        self.mixers = {"encoder": encoder_mixer, "decoder": decoder_mixer}
        self.phone_embedding = nn.Embedding(num_phones, dim, padding_idx=PAD)
        self.encoder_positions = _FixedPositions(sinusoidal_positions(max_phones, dim))
        self.decoder_positions = _FixedPositions(sinusoidal_positions(max_frames, dim))
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(FFTBlock(dim, heads, ffn_dim, ffn_kernel, encoder_mixer, encoder_options, dropout)
                                     for _ in range(encoder_layers))
        self.duration_predictor = VariancePredictor(dim, variance_dim, variance_kernel, variance_dropout)
        self.pitch_predictor = VariancePredictor(dim, variance_dim, variance_kernel, variance_dropout)
        self.energy_predictor = VariancePredictor(dim, variance_dim, variance_kernel, variance_dropout)
        self.pitch_embedding = VarianceEmbedding(dim, bins, pitch_range, "pitch")
        self.energy_embedding = VarianceEmbedding(dim, bins, energy_range, "energy")
        self.decoder = nn.ModuleList(FFTBlock(dim, heads, ffn_dim, ffn_kernel, decoder_mixer, decoder_options, dropout)
                                     for _ in range(decoder_layers))
        self.mel_linear = nn.Linear(dim, n_mels)
        self.postnet = PostNet(n_mels, postnet_dim, postnet_layers, postnet_kernel, postnet_dropout)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, phones: torch.Tensor, phone_mask: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, N, E]`` (zero at padded phones)."""
        _check_phones(phones, phone_mask, self.max_phones)
        positions = torch.arange(phones.shape[1], device=phones.device)
        x = self.phone_embedding(phones) + self.encoder_positions(positions)
        x = _select(self.dropout(x), phone_mask)
        for block in self.encoder:
            x = block(x, phone_mask)
        return x

    def predicted_durations(self, log_duration: torch.Tensor, phone_mask: torch.Tensor,
                            duration_scale: float = 1.0) -> torch.Tensor:
        """Frames per phone ``[B, N]`` from predicted ``log(d + 1)``: ``round(max(exp(p) - 1, 0) *
        duration_scale)``, 0 at padded phones, and at least one frame per utterance (the real phone
        with the longest prediction gets it when all round to 0)."""
        if not isinstance(duration_scale, (int, float)) or isinstance(duration_scale, bool) or not duration_scale > 0:
            raise ValueError(f"duration_scale must be a number > 0, got {duration_scale!r}")
        d = torch.round((torch.exp(log_duration.float()) - 1).clamp_min(0) * float(duration_scale)).long()
        d = torch.where(phone_mask, d, torch.zeros_like(d))
        empty = (d.sum(1) == 0) & phone_mask.any(1)
        if bool(empty.any()):
            longest = torch.where(phone_mask, log_duration.float(), torch.full_like(log_duration.float(), -math.inf))
            first = F.one_hot(longest.argmax(1), d.shape[1]).bool() & empty[:, None]
            d = torch.where(first, torch.ones_like(d), d)
        return d

    def _check_frames(self, durations: torch.Tensor, source: str) -> None:
        totals = durations.sum(1)
        longest = int(totals.max()) if totals.numel() else 0
        if longest > self.max_frames:
            row = int(totals.argmax())
            raise ValueError(f"utterance {row} has {longest} {source} frames, more than the model's "
                             f"max_frames={self.max_frames} (its frame position table and frame-mixer lengths); "
                             "build the model with a larger max_frames" +
                             (" or lower duration_scale" if source == "predicted" else ""))
        if longest == 0:
            raise ValueError(f"every utterance of the batch has 0 {source} frames (durations sum to 0)")

    def forward(self, phones: torch.Tensor, phone_mask: torch.Tensor, durations: torch.Tensor | None = None,
                pitch: torch.Tensor | None = None, energy: torch.Tensor | None = None,
                duration_scale: float = 1.0) -> dict[str, torch.Tensor]:
        x = self.encode(phones, phone_mask)
        log_duration = self.duration_predictor(x, phone_mask)
        pitch_pred = self.pitch_predictor(x, phone_mask)
        for name, value in (("durations", durations), ("pitch", pitch), ("energy", energy)):
            if value is not None and tuple(value.shape) != tuple(phones.shape):
                raise ValueError(f"{name} must be shaped [B, N] = {list(phones.shape)}, got {list(value.shape)}")
        x = x + self.pitch_embedding(pitch_pred.detach() if pitch is None else pitch, phone_mask)
        energy_pred = self.energy_predictor(x, phone_mask)
        x = x + self.energy_embedding(energy_pred.detach() if energy is None else energy, phone_mask)
        if durations is None:
            durations = self.predicted_durations(log_duration.detach(), phone_mask, duration_scale)
            source = "predicted"
        else:
            if durations.is_floating_point() or durations.dtype == torch.bool:
                raise ValueError("durations must be an integer tensor (frames per phone)")
            durations = torch.where(phone_mask, durations.long(), torch.zeros_like(durations, dtype=torch.long))
            if bool((durations < 0).any()):
                raise ValueError("durations must be >= 0")
            source = "given"
        self._check_frames(durations, source)
        y, frame_mask = length_regulate(x, durations)
        positions = torch.arange(y.shape[1], device=y.device)
        y = _select(self.dropout(y + self.decoder_positions(positions)), frame_mask)
        for block in self.decoder:
            y = block(y, frame_mask)
        mel = _select(self.mel_linear(y), frame_mask)
        mel_post = self.postnet(mel, frame_mask)
        return {"mel": mel, "mel_post": mel_post, "frame_mask": frame_mask, "durations": durations,
                "log_duration": log_duration, "pitch": pitch_pred, "energy": energy_pred}

    @torch.no_grad()
    def infer(self, phones: torch.Tensor, phone_mask: torch.Tensor, duration_scale: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mel_post [B, T, n_mels], frame_mask [B, T])`` from predicted durations, pitch and energy
        (call ``model.eval()`` first); ``duration_scale`` > 1 speaks slower."""
        out = self.forward(phones, phone_mask, duration_scale=duration_scale)
        return out["mel_post"], out["frame_mask"]


# -- Transformer-TTS ---------------------------------------------------------------------------------
class DecoderPrenet(nn.Module):
    """Two Linear + ReLU + dropout layers, then a linear projection to the model width. The dropout
    stays on at inference while ``dropout_at_inference`` (the paper's choice)."""

    def __init__(self, n_mels: int, hidden: int, dim: int, dropout: float, dropout_at_inference: bool):
        super().__init__()
        self.fc1 = nn.Linear(n_mels, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.p = dropout
        self.dropout_at_inference = dropout_at_inference

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        on = self.training or self.dropout_at_inference
        h = F.dropout(F.relu(self.fc1(mel)), self.p, training=on)
        h = F.dropout(F.relu(self.fc2(h)), self.p, training=on)
        return self.proj(h)


class TransformerTTS(nn.Module):
    """Transformer-TTS (Li et al. 2019), the autoregressive acoustic model; see the module docstring.

    Args:
        num_phones: phone vocabulary size V (id 0 is padding).
        n_mels: mel bands.
        dim, heads, ffn_dim: width E, heads per mixer, FFN width (the paper's 512, 8, 2048).
        encoder_layers, decoder_layers: blocks per stack (6 and 6).
        encoder_mixer, self_mixer, cross_mixer: registry names of the encoder self site, the decoder's
            causal self site (a ``recurrent`` mixer for :meth:`step` / :meth:`infer`) and its cross site
            (a mixer whose output for a frame does not depend on later frames: softmax, abc, performer, linear,
            cosformer), with their options in ``encoder_options``, ``self_options``, ``cross_options``.
        dropout: on sub-layer outputs, in the FFN and the encoder pre-net.
        encoder_prenet_layers, encoder_prenet_kernel: conv layers (with batch-norm and ReLU) of the
            encoder pre-net and their kernel (3 and 5 in the paper; 0 layers leaves the projection).
        prenet_dim, prenet_dropout, prenet_dropout_at_inference: decoder pre-net width, its dropout and
            whether it stays on in eval mode (256, 0.5, True as in the paper; the attribute
            ``prenet_dropout_at_inference`` can be changed after construction).
        postnet_layers, postnet_dim, postnet_kernel, postnet_dropout: the PostNet (5, 512, 5, 0.5).
        max_phones, max_frames: the longest phone and frame sequences (position tables, mixer lengths).

    ``forward(phones, phone_mask, mel, frame_mask)`` teacher-forces on ``mel`` shifted right by one
    frame (a zero "go" frame first) and returns a dict ``mel``, ``mel_post`` ``[B, T, n_mels]`` and
    ``stop_logits`` ``[B, T]`` (zero at padded frames); frame t is predicted from frames < t.
    """

    def __init__(self, num_phones: int, n_mels: int = 80, *, dim: int = 512, heads: int = 8, ffn_dim: int = 2048,
                 encoder_layers: int = 6, decoder_layers: int = 6, encoder_mixer: str = "softmax",
                 self_mixer: str = "softmax", cross_mixer: str = "softmax", encoder_options: dict | None = None,
                 self_options: dict | None = None, cross_options: dict | None = None, dropout: float = 0.1,
                 encoder_prenet_layers: int = 3, encoder_prenet_kernel: int = 5, prenet_dim: int = 256,
                 prenet_dropout: float = 0.5, prenet_dropout_at_inference: bool = True, postnet_layers: int = 5,
                 postnet_dim: int = 512, postnet_kernel: int = 5, postnet_dropout: float = 0.5,
                 max_phones: int = 256, max_frames: int = 1000):
        super().__init__()
        for name, value in (("num_phones", num_phones), ("n_mels", n_mels), ("dim", dim), ("heads", heads),
                            ("ffn_dim", ffn_dim), ("encoder_layers", encoder_layers),
                            ("decoder_layers", decoder_layers), ("prenet_dim", prenet_dim),
                            ("max_phones", max_phones), ("max_frames", max_frames)):
            _positive_int(name, value)
        _positive_int("encoder_prenet_layers", encoder_prenet_layers, 0)
        _odd_kernel("encoder_prenet_kernel", encoder_prenet_kernel)
        _dropout_rate("dropout", dropout)
        _dropout_rate("prenet_dropout", prenet_dropout)
        encoder_options = site_options(encoder_mixer, encoder_options, max_phones, what="max_phones")
        self_options = site_options(self_mixer, self_options, max_frames, fixed=True, what="max_frames")
        longest = max(max_phones, max_frames)
        cross_options = site_options(cross_mixer, cross_options, longest, fixed=True,
                                     what="max(max_phones, max_frames)")
        check_site(encoder_mixer, "encoder self", options=encoder_options)
        check_site(self_mixer, "decoder self", causal=True, options=self_options)
        check_site(cross_mixer, "decoder cross", cross=True, options=cross_options)
        check_ar_cross(cross_mixer, cross_options)
        self.num_phones, self.n_mels, self.dim = num_phones, n_mels, dim
        self.max_phones, self.max_frames = max_phones, max_frames
        self.mixers = {"encoder": encoder_mixer, "self": self_mixer, "cross": cross_mixer}
        self.phone_embedding = nn.Embedding(num_phones, dim, padding_idx=PAD)
        self.encoder_prenet = ConvBNStack([dim] * (encoder_prenet_layers + 1), encoder_prenet_kernel, "relu",
                                          dropout, "relu")
        self.encoder_projection = nn.Linear(dim, dim)
        self.decoder_prenet = DecoderPrenet(n_mels, prenet_dim, dim, prenet_dropout, prenet_dropout_at_inference)
        # scaled positional encoding: x + alpha * PE, one trainable alpha per stack
        self.encoder_alpha = nn.Parameter(torch.ones(()))
        self.decoder_alpha = nn.Parameter(torch.ones(()))
        self.encoder_positions = _FixedPositions(sinusoidal_positions(max_phones, dim))
        self.decoder_positions = _FixedPositions(sinusoidal_positions(max_frames, dim))
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderBlock(dim, heads, ffn_dim, encoder_mixer, encoder_options, dropout)
                                     for _ in range(encoder_layers))
        self.encoder_norm = nn.LayerNorm(dim)
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads, ffn_dim, self_mixer, self_options, cross_mixer,
                                                  cross_options, dropout, True) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mel_linear = nn.Linear(dim, n_mels)
        self.stop_linear = nn.Linear(dim, 1)
        self.postnet = PostNet(n_mels, postnet_dim, postnet_layers, postnet_kernel, postnet_dropout)

    @property
    def prenet_dropout_at_inference(self) -> bool:
        return self.decoder_prenet.dropout_at_inference

    @prenet_dropout_at_inference.setter
    def prenet_dropout_at_inference(self, value: bool) -> None:
        self.decoder_prenet.dropout_at_inference = bool(value)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def recurrent(self) -> bool:
        return all(b.self_mixer.capabilities.recurrent for b in self.decoder)

    def encode(self, phones: torch.Tensor, phone_mask: torch.Tensor) -> torch.Tensor:
        """Encoder output (the memory) ``[B, N, E]``, zero at padded phones."""
        _check_phones(phones, phone_mask, self.max_phones)
        x = self.encoder_prenet(self.phone_embedding(phones), phone_mask)
        positions = torch.arange(phones.shape[1], device=phones.device)
        x = self.encoder_projection(x) + self.encoder_alpha * self.encoder_positions(positions)
        x = _select(self.dropout(x), phone_mask)
        for block in self.encoder:
            x = block(x, phone_mask)
        return _select(self.encoder_norm(x), phone_mask)

    def _check_frames(self, length: int) -> None:
        if length > self.max_frames:
            raise ValueError(f"{length} frames are more than the model's max_frames={self.max_frames} (its frame "
                             "position table and frame-mixer lengths); build the model with a larger max_frames")

    def _outputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.decoder_norm(h)
        return self.mel_linear(h), self.stop_linear(h).squeeze(-1)

    def forward(self, phones: torch.Tensor, phone_mask: torch.Tensor, mel: torch.Tensor,
                frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(mel, torch.Tensor) or mel.dim() != 3 or mel.shape[-1] != self.n_mels:
            raise ValueError(f"mel must be shaped [B, T, {self.n_mels}], got "
                             f"{tuple(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__}")
        _check_mask(frame_mask, tuple(mel.shape[:2]), "frame_mask")
        self._check_frames(mel.shape[1])
        memory = self.encode(phones, phone_mask)
        # teacher forcing: frame t sees the real frames before it (a zero "go" frame first)
        previous = torch.cat([torch.zeros_like(mel[:, :1]), _select(mel, frame_mask)[:, :-1]], dim=1)
        positions = torch.arange(mel.shape[1], device=mel.device)
        y = self.decoder_prenet(previous) + self.decoder_alpha * self.decoder_positions(positions)
        y = _select(self.dropout(y), frame_mask)
        for block in self.decoder:
            y = block(y, frame_mask, memory, phone_mask)
        out, stop = self._outputs(y)
        out = _select(out, frame_mask)
        return {"mel": out, "mel_post": self.postnet(out, frame_mask), "stop_logits": _select(stop, frame_mask)}

    def init_state(self, batch_size: int, device=None) -> dict[str, Any]:
        """The decoder state before the first frame (every decoder self mixer needs a recurrent step)."""
        if not self.recurrent:
            raise ValueError(f"mixer {self.mixers['self']!r} has no recurrent step (capability 'recurrent')")
        device = device or self.mel_linear.weight.device
        return {"position": 0, "blocks": [b.init_state(batch_size, device) for b in self.decoder]}

    def step(self, prev_frame: torch.Tensor, state: dict, memory: torch.Tensor, phone_mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(mel_t [B, n_mels], stop_logit_t [B], new state)`` after feeding the previous frame
        ``prev_frame`` ``[B, n_mels]`` (zeros first); ``memory`` is :meth:`encode`'s output. The mel is
        before the PostNet (which needs every frame)."""
        pos = state["position"]
        self._check_frames(pos + 1)
        y = self.decoder_prenet(prev_frame) + self.decoder_alpha * self.decoder_positions.weight[pos]
        y = self.dropout(y)
        blocks = []
        for block, s in zip(self.decoder, state["blocks"]):
            y, s = block.step(y, s, memory, phone_mask)
            blocks.append(s)
        mel_t, stop_t = self._outputs(y)
        return mel_t, stop_t, {"position": pos + 1, "blocks": blocks}

    @torch.no_grad()
    def decode(self, phones: torch.Tensor, phone_mask: torch.Tensor, max_frames: int | None = None,
               stop_threshold: float = 0.5) -> dict[str, torch.Tensor]:
        """Frame-by-frame decoding; a row ends at the first frame whose ``sigmoid(stop) > stop_threshold``
        (that frame included) or after ``max_frames`` frames. Returns ``mel``, ``mel_post``,
        ``stop_logits`` and ``frame_mask`` (zero past each row's end)."""
        max_frames = self.max_frames if max_frames is None else max_frames
        _positive_int("max_frames", max_frames)
        self._check_frames(max_frames)
        memory = self.encode(phones, phone_mask)
        B = phones.shape[0]
        state = self.init_state(B, device=phones.device)
        frame = memory.new_zeros(B, self.n_mels)
        done = torch.zeros(B, dtype=torch.bool, device=phones.device)
        lengths = torch.full((B,), max_frames, dtype=torch.long, device=phones.device)
        mels, stops = [], []
        for t in range(max_frames):
            frame, stop, state = self.step(frame, state, memory, phone_mask)
            mels.append(frame)
            stops.append(stop)
            ended = (torch.sigmoid(stop) > stop_threshold) & ~done
            lengths = torch.where(ended, torch.full_like(lengths, t + 1), lengths)
            done |= ended
            if bool(done.all()):
                break
        mel, stop_logits = torch.stack(mels, 1), torch.stack(stops, 1)
        frame_mask = torch.arange(mel.shape[1], device=mel.device)[None, :] < lengths[:, None]
        mel = _select(mel, frame_mask)
        return {"mel": mel, "mel_post": self.postnet(mel, frame_mask), "stop_logits": _select(stop_logits, frame_mask),
                "frame_mask": frame_mask}

    @torch.no_grad()
    def infer(self, phones: torch.Tensor, phone_mask: torch.Tensor, max_frames: int | None = None,
              stop_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mel_post [B, T, n_mels], frame_mask [B, T])`` by :meth:`decode` (call ``model.eval()``
        first; ``max_frames`` defaults to the model's)."""
        out = self.decode(phones, phone_mask, max_frames, stop_threshold)
        return out["mel_post"], out["frame_mask"]
