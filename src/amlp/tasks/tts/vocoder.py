"""Griffin-Lim vocoder: log-mel spectrogram (:mod:`amlp.tasks.tts.audio`) -> waveform.

The log-mel ``[frames, 80]`` is the natural log of the slaney mel filter bank
(``librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX)``) applied to
the STFT magnitude. :func:`griffin_lim` undoes it in two steps:

1. ``exp`` of the log-mel times the pseudo-inverse of the same filter bank, negative values clipped
   to 1e-8: the least-squares linear magnitude ``[N_FFT // 2 + 1, frames]`` (one matrix product; the
   non-negative least squares of ``librosa.feature.inverse.mel_to_stft`` is several times slower and
   no better after Griffin-Lim);
2. ``librosa.griffinlim`` on that magnitude with the STFT of the features (``n_fft=N_FFT``,
   ``win_length=WIN_LENGTH``, ``hop_length=HOP_LENGTH``, Hann window, ``center=True``, reflect
   padding), ``n_iter`` iterations of the fast Griffin-Lim (momentum 0.99, librosa's default), random
   initial phases drawn from ``numpy.random.RandomState(seed)``: the same input and seed always give
   the same audio.

The audio has ``(frames - 1) * HOP_LENGTH`` samples, float32, at ``SAMPLE_RATE`` (an audio of ``n``
samples has ``1 + n // HOP_LENGTH`` frames, so this is the original length to within one hop).
"""

from __future__ import annotations

import functools
from typing import Sequence

import librosa
import numpy as np

from .audio import F_MAX, F_MIN, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH


def _as_log_mel(log_mel, name: str = "log_mel") -> np.ndarray:
    if hasattr(log_mel, "detach"):  # a torch tensor
        log_mel = log_mel.detach().float().cpu().numpy()
    x = np.asarray(log_mel)
    if x.ndim != 2 or x.shape[1] != N_MELS:
        raise ValueError(f"{name} must be [frames, {N_MELS}], got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 frames to make audio, got {x.shape[0]}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite values (nan or inf)")
    return x


@functools.lru_cache(maxsize=1)
def _inverse_filter_bank() -> np.ndarray:
    bank = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX)
    return np.linalg.pinv(bank.astype(np.float64))


def mel_to_magnitude(log_mel) -> np.ndarray:
    """The linear STFT magnitude ``[N_FFT // 2 + 1, frames]`` of a log-mel: the pseudo-inverse of the mel
    filter bank applied to ``exp(log_mel)``, negative values clipped to 1e-8 (a least-squares inverse in
    one matrix product)."""
    x = _as_log_mel(log_mel)
    return np.maximum(_inverse_filter_bank() @ np.exp(x).T, 1e-8)


def griffin_lim(log_mel, *, n_iter: int = 60, seed: int = 0) -> np.ndarray:
    """Audio (float32, ``SAMPLE_RATE``, ``(frames - 1) * HOP_LENGTH`` samples) of a log-mel
    ``[frames, 80]`` (numpy or torch) by Griffin-Lim with ``n_iter`` iterations from random phases
    seeded by ``seed``."""
    if int(n_iter) < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    magnitude = mel_to_magnitude(log_mel)
    frames = magnitude.shape[1]
    audio = librosa.griffinlim(magnitude, n_iter=int(n_iter), hop_length=HOP_LENGTH, win_length=WIN_LENGTH,
                               n_fft=N_FFT, window="hann", center=True, pad_mode="reflect",
                               length=(frames - 1) * HOP_LENGTH, init="random",
                               random_state=np.random.RandomState(seed))
    return audio.astype(np.float32)


def mel_to_audio_batch(log_mels, lengths: Sequence[int] | None = None, *, n_iter: int = 60,
                       seed: int = 0) -> list[np.ndarray]:
    """:func:`griffin_lim` of each log-mel of a batch: a list of ``[frames_i, 80]`` arrays, or a padded
    ``[B, T, 80]`` array / tensor with ``lengths`` (frames of each row; None: all ``T``). Every item
    uses the same ``seed``, so an utterance gives the same audio alone or in any batch."""
    if lengths is not None:
        if hasattr(lengths, "tolist"):
            lengths = lengths.tolist()
        if len(lengths) != len(log_mels):
            raise ValueError(f"{len(lengths)} lengths for a batch of {len(log_mels)} log-mels")
        items = [log_mels[b][: int(n)] for b, n in enumerate(lengths)]
    else:
        items = list(log_mels)
    return [griffin_lim(m, n_iter=n_iter, seed=seed) for m in items]
