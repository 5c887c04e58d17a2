"""Objective distances between a reference and a synthesised utterance: mel-cepstral distortion (MCD) and
mel-spectral distortion (MSD), as defined by fairseq's evaluation of generated speech in S^2 (the
protocol the AMLP paper's TTS experiments follow). Both are computed from the waveforms alone, so they
apply to any two audios at the same sample rate, of any lengths.

Features of an audio ``x`` (1-D, float, at ``sample_rate`` = ``sr``), in float64:

* STFT with ``n_fft = win_length = int(0.05 * sr)`` (50 ms; 1102 samples at 22,050 Hz) and
  ``hop_length = int(0.0125 * sr)`` (12.5 ms; 275 samples at 22,050 Hz), periodic Hann window
  (librosa's ``"hann"``), ``center=True`` with reflect padding of ``n_fft // 2`` samples on both sides,
  so an audio of ``n`` samples has ``1 + n // hop_length`` frames;
* power spectrum ``|STFT|^2``;
* 80 mel bands: ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=80, fmin=20, fmax=sr / 2, htk=True,
  norm=None)`` (HTK mel scale, triangles of peak 1, no area normalisation);
* log-mel ``log(mel + 1e-6)`` (natural log, additive offset 1e-6, no clipping): the MSD features,
  ``[frames, 80]``;
* mel cepstrum: ``scipy.fft.dct(log_mel, type=2, norm="ortho")`` over the 80 bands, keeping the first
  13 coefficients, ``c0`` (the energy term) INCLUDED: the MCD features, ``[frames, 13]``.

Distance between reference features ``R`` ``[N, D]`` and synthesised features ``S`` ``[M, D]``:

* frame distance matrix ``C[i, j] = sqrt(mean_d (R[i, d] - S[j, d])^2)`` (root mean square over the
  ``D`` coefficients; no 10 / ln 10 * sqrt(2) dB factor);
* unconstrained dynamic time warping of ``C`` (``librosa.sequence.dtw`` with its default steps and
  weights, checked to be the steps ``(1, 1)``, ``(0, 1)``, ``(1, 0)`` with equal additive weights 0
  and multiplicative weights 1, i.e. ``A[i, j] = C[i, j] + min(A[i-1, j-1], A[i, j-1], A[i-1, j])``,
  ``A[0, 0] = C[0, 0]``; no band, no slope constraint; the path runs from ``(0, 0)`` to
  ``(N-1, M-1)``);
* distortion = ``A[N-1, M-1] / L``, the accumulated cost of the optimal path divided by its number of
  points ``L`` (``max(N, M) <= L <= N + M - 1``), i.e. the mean frame distance along the alignment
  (:func:`dtw_distortion`).

MCD uses the 13 cepstral coefficients, MSD the 80 log-mel bands. A corpus score is the plain mean of
the per-utterance distortions (:func:`corpus_distortions`), every utterance weighted equally.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import librosa
import numpy as np
import scipy.fft
from scipy.spatial.distance import cdist

from .audio import SAMPLE_RATE

#: window and hop of the features in seconds (50 ms and 12.5 ms)
WINDOW_SECONDS = 0.05
HOP_SECONDS = 0.0125
#: mel bands of the log-mel (MSD features) and their lowest frequency
DISTORTION_N_MELS = 80
DISTORTION_F_MIN = 20.0
#: cepstral coefficients of the MCD (c0 included)
DISTORTION_N_MFCC = 13
#: additive offset inside the log of the mel power
LOG_OFFSET = 1e-6


def feature_settings(sample_rate: int = SAMPLE_RATE) -> dict:
    """The feature settings at a sample rate: ``n_fft``, ``win_length``, ``hop_length``, ``n_mels``,
    ``n_mfcc``, ``fmin``, ``fmax``, ``log_offset``."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    n_fft = int(WINDOW_SECONDS * sample_rate)
    return {"n_fft": n_fft, "win_length": n_fft, "hop_length": int(HOP_SECONDS * sample_rate),
            "n_mels": DISTORTION_N_MELS, "n_mfcc": DISTORTION_N_MFCC, "fmin": DISTORTION_F_MIN,
            "fmax": sample_rate / 2.0, "log_offset": LOG_OFFSET}


def _as_audio(audio, name: str) -> np.ndarray:
    if hasattr(audio, "detach"):  # a torch tensor
        audio = audio.detach().cpu().double().numpy()
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D audio signal, got shape {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite samples")
    return x


_MEL_BASIS: dict[int, np.ndarray] = {}


def _mel_basis(sample_rate: int) -> np.ndarray:
    if sample_rate not in _MEL_BASIS:
        s = feature_settings(sample_rate)
        _MEL_BASIS[sample_rate] = librosa.filters.mel(
            sr=sample_rate, n_fft=s["n_fft"], n_mels=s["n_mels"], fmin=s["fmin"], fmax=s["fmax"],
            htk=True, norm=None, dtype=np.float64)
    return _MEL_BASIS[sample_rate]


def distortion_log_mel(audio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The MSD features of an audio: ``log(mel power + 1e-6)``, float64 ``[1 + len // hop, 80]``."""
    x = _as_audio(audio, "audio")
    s = feature_settings(sample_rate)
    spec = librosa.stft(x, n_fft=s["n_fft"], hop_length=s["hop_length"], win_length=s["win_length"],
                        window="hann", center=True, pad_mode="reflect")
    power = spec.real ** 2 + spec.imag ** 2
    return np.log(_mel_basis(sample_rate) @ power + LOG_OFFSET).T


def mel_cepstrum(log_mel: np.ndarray, n_mfcc: int = DISTORTION_N_MFCC) -> np.ndarray:
    """The first ``n_mfcc`` orthonormal DCT-II coefficients (c0 included) of ``[frames, bands]``."""
    return scipy.fft.dct(np.asarray(log_mel, dtype=np.float64), type=2, norm="ortho", axis=-1)[:, :n_mfcc]


def distortion_features(audio, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """(log-mel ``[frames, 80]``, mel cepstrum ``[frames, 13]``) of an audio, float64."""
    log_mel = distortion_log_mel(audio, sample_rate)
    return log_mel, mel_cepstrum(log_mel)


def frame_distance_matrix(reference: np.ndarray, synthesized: np.ndarray) -> np.ndarray:
    """``C[i, j]`` = root mean square over the coefficients of ``reference[i] - synthesized[j]``."""
    r = np.asarray(reference, dtype=np.float64)
    s = np.asarray(synthesized, dtype=np.float64)
    if r.ndim != 2 or s.ndim != 2 or r.shape[1] != s.shape[1]:
        raise ValueError(f"features must be [frames, dim] with the same dim, got {r.shape} and {s.shape}")
    # sum of squared differences computed directly (no |a|^2 + |b|^2 - 2ab expansion): identical
    # frames are at distance exactly 0
    return np.sqrt(cdist(r, s, "sqeuclidean") / r.shape[1])


def dtw_path(distance_matrix) -> tuple[float, np.ndarray]:
    """(accumulated cost at ``(N-1, M-1)``, path ``[L, 2]`` from ``(0, 0)`` to ``(N-1, M-1)``) of the
    unconstrained DTW of a distance matrix (steps ``(1, 1)``, ``(0, 1)``, ``(1, 0)``, equal weights)."""
    C = np.asarray(distance_matrix, dtype=np.float64)
    if C.ndim != 2 or C.size == 0:
        raise ValueError(f"distance matrix must be a non-empty 2-D array, got shape {C.shape}")
    if not np.all(np.isfinite(C)):
        raise ValueError("distance matrix has non-finite values")
    accumulated, path = librosa.sequence.dtw(C=C, subseq=False, backtrack=True)
    return float(accumulated[-1, -1]), path[::-1].copy()


def dtw_distortion(distance_matrix) -> float:
    """Accumulated cost of the optimal DTW path divided by the number of points on the path."""
    cost, path = dtw_path(distance_matrix)
    return cost / len(path)


def _distortion(reference: np.ndarray, synthesized: np.ndarray) -> float:
    return dtw_distortion(frame_distance_matrix(reference, synthesized))


def mel_cepstral_distortion(reference_audio, synthesized_audio, sample_rate: int = SAMPLE_RATE) -> float:
    """MCD: DTW-aligned mean RMS distance of the 13 mel-cepstral coefficients (c0 included)."""
    _, ref = distortion_features(reference_audio, sample_rate)
    _, syn = distortion_features(synthesized_audio, sample_rate)
    return _distortion(ref, syn)


def mel_spectral_distortion(reference_audio, synthesized_audio, sample_rate: int = SAMPLE_RATE) -> float:
    """MSD: DTW-aligned mean RMS distance of the 80 log-mel bands."""
    ref = distortion_log_mel(reference_audio, sample_rate)
    syn = distortion_log_mel(synthesized_audio, sample_rate)
    return _distortion(ref, syn)


def corpus_distortions(pairs: Iterable[Sequence], sample_rate: int = SAMPLE_RATE) -> dict:
    """Mean MCD and MSD over ``(reference audio, synthesised audio)`` pairs, each pair weighted
    equally: ``{"mcd": mean, "msd": mean, "count": number of pairs}``."""
    mcd, msd = [], []
    for pair in pairs:
        reference, synthesized = pair
        ref_mel, ref_cep = distortion_features(reference, sample_rate)
        syn_mel, syn_cep = distortion_features(synthesized, sample_rate)
        mcd.append(_distortion(ref_cep, syn_cep))
        msd.append(_distortion(ref_mel, syn_mel))
    if not mcd:
        raise ValueError("corpus_distortions needs at least one (reference, synthesized) pair")
    return {"mcd": float(np.mean(mcd)), "msd": float(np.mean(msd)), "count": len(mcd)}
