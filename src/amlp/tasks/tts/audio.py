"""Audio I/O and the acoustic features of the TTS task: log-mel spectrogram, frame energy, pitch, and
phone-level averages of frame features (FastSpeech 2's variance targets).

Units: audio is float32 in [-1, 1] at ``SAMPLE_RATE`` Hz; a *frame* is one STFT hop (``HOP_LENGTH``
samples, about 11.6 ms); an audio of ``n`` samples has ``1 + n // HOP_LENGTH`` frames (centred STFT,
frame ``k`` is centred on sample ``k * HOP_LENGTH``). Durations are in frames, pitch in Hz, times in
seconds. Feature arrays are float32 and frame-major (``[frames, ...]``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

#: samples per second of every waveform the task stores or models
SAMPLE_RATE = 22050
#: FFT size (samples)
N_FFT = 1024
#: analysis window length (samples, Hann)
WIN_LENGTH = 1024
#: hop between frames (samples)
HOP_LENGTH = 256
#: mel bands
N_MELS = 80
#: lowest mel filter edge (Hz)
F_MIN = 0.0
#: highest mel filter edge (Hz)
F_MAX = 8000.0
#: floor applied to the mel magnitudes before the natural log
LOG_FLOOR = 1e-5

__all__ = ["SAMPLE_RATE", "N_FFT", "WIN_LENGTH", "HOP_LENGTH", "N_MELS", "F_MIN", "F_MAX", "LOG_FLOOR",
           "load_wav", "save_wav", "n_frames", "log_mel", "frame_energy", "frame_pitch", "frame_features",
           "phone_average", "durations_from_segments"]


# -- I/O ---------------------------------------------------------------------------------------------------
def load_wav(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A sound file as float32 mono samples in [-1, 1] at ``sample_rate`` Hz (channels averaged;
    resampled with soxr through librosa when the file's rate differs)."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {str(path)!r}")
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if rate != sample_rate:
        import librosa

        audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(audio, dtype=np.float32)


def save_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float samples (clipped to [-1, 1]) as a 16-bit PCM WAV file at ``sample_rate`` Hz."""
    import soundfile as sf

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"save_wav expects mono audio of shape [samples], got {audio.shape}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


# -- frame features ----------------------------------------------------------------------------------------
def n_frames(n_samples: int) -> int:
    """Frames of an audio of ``n_samples`` samples: ``1 + n_samples // HOP_LENGTH``."""
    return 1 + int(n_samples) // HOP_LENGTH


@functools.lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX).astype(np.float32)


def _check_audio(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"expected mono audio of shape [samples] with samples > 0, got {audio.shape}")
    return audio


def _magnitude(audio: np.ndarray) -> np.ndarray:
    """STFT magnitude [1 + N_FFT // 2, frames] (Hann window, centred, reflect padding)."""
    import librosa

    audio = _check_audio(audio)
    spec = librosa.stft(audio, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window="hann",
                        center=True, pad_mode="reflect")
    return np.abs(spec).astype(np.float32)


def _log_mel_of(magnitude: np.ndarray) -> np.ndarray:
    mel = _mel_basis() @ magnitude
    return np.log(np.maximum(mel, LOG_FLOOR)).T.astype(np.float32, copy=False)


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Log-mel spectrogram [frames, N_MELS] float32 of audio at ``SAMPLE_RATE``: the slaney mel filters
    (librosa defaults, F_MIN..F_MAX Hz) applied to the STFT magnitude (power 1), then the natural log of
    ``max(mel, 1e-5)``. Frames: ``1 + len(audio) // HOP_LENGTH``."""
    return np.ascontiguousarray(_log_mel_of(_magnitude(audio)))


def frame_energy(audio: np.ndarray) -> np.ndarray:
    """Energy per frame [frames] float32: the L2 norm over frequency of each frame's STFT magnitude
    (linear amplitude units, as in FastSpeech 2)."""
    return np.linalg.norm(_magnitude(audio), axis=0).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _import_pyworld():
    try:
        import pyworld
    except ModuleNotFoundError as exc:
        # pyworld <= 0.3.5 imports pkg_resources (gone from recent setuptools) only to read its
        # version; the compiled module itself works, so load it directly.
        if exc.name != "pkg_resources":
            raise
        import importlib.machinery
        import importlib.util

        spec = importlib.util.find_spec("pyworld")
        if spec is None or not spec.submodule_search_locations:
            raise
        folder = Path(list(spec.submodule_search_locations)[0])
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = folder / f"pyworld{suffix}"
            if candidate.is_file():
                loader = importlib.machinery.ExtensionFileLoader("pyworld.pyworld", str(candidate))
                ext_spec = importlib.util.spec_from_file_location("pyworld.pyworld", candidate, loader=loader)
                module = importlib.util.module_from_spec(ext_spec)
                loader.exec_module(module)
                return module
        raise
    return pyworld


def frame_pitch(audio: np.ndarray) -> np.ndarray:
    """Fundamental frequency per frame [frames] float32 in Hz, 0 where unvoiced: WORLD's DIO estimate
    refined by StoneMask (pyworld, frame period ``1000 * HOP_LENGTH / SAMPLE_RATE`` ms, so estimate ``k``
    is at the centre of frame ``k``), trimmed or zero-padded to the mel frame count."""
    audio = _check_audio(audio)
    pw = _import_pyworld()
    x = audio.astype(np.float64)
    period_ms = 1000.0 * HOP_LENGTH / SAMPLE_RATE
    f0, times = pw.dio(x, SAMPLE_RATE, frame_period=period_ms)
    f0 = pw.stonemask(x, f0, times, SAMPLE_RATE)
    frames = n_frames(audio.size)
    out = np.zeros(frames, dtype=np.float32)
    k = min(frames, f0.size)
    out[:k] = f0[:k]
    return out


def frame_features(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(log_mel [frames, N_MELS], energy [frames], pitch [frames])`` of one audio, sharing one STFT;
    the same values as :func:`log_mel`, :func:`frame_energy` and :func:`frame_pitch`."""
    magnitude = _magnitude(audio)
    mel = np.ascontiguousarray(_log_mel_of(magnitude))
    energy = np.linalg.norm(magnitude, axis=0).astype(np.float32)
    return mel, energy, frame_pitch(audio)


# -- phone level -------------------------------------------------------------------------------------------
def _interpolate_zeros(values: np.ndarray) -> np.ndarray:
    voiced = np.flatnonzero(values != 0)
    if voiced.size == 0 or voiced.size == values.size:
        return values
    # linear between voiced frames, constant (the nearest voiced value) before the first / after the last
    return np.interp(np.arange(values.size), voiced, values[voiced]).astype(values.dtype)


def phone_average(values: np.ndarray, durations: np.ndarray, *, interpolate_unvoiced: bool = False) -> np.ndarray:
    """Mean of each phone's frames [N] float32 (same units as ``values``).

    ``values`` [frames] is a frame feature, ``durations`` [N] the phones' lengths in frames with
    ``sum(durations) == len(values)``. With ``interpolate_unvoiced`` (FastSpeech 2's pitch) the zero
    (unvoiced) frames are first replaced by linear interpolation between the voiced frames (constant
    beyond the first and last voiced frame; all-zero input stays zero). A phone of 0 frames gets the value
    of the frame at its boundary (the frame that starts where it would start, the last frame at the end).
    """
    values = np.asarray(values, dtype=np.float64)
    durations = np.asarray(durations)
    if values.ndim != 1 or durations.ndim != 1:
        raise ValueError(f"expected values [frames] and durations [N], got {values.shape} and {durations.shape}")
    if durations.size and (durations < 0).any():
        raise ValueError("durations must be non-negative")
    if int(durations.sum()) != values.size:
        raise ValueError(f"durations sum to {int(durations.sum())} frames but there are {values.size} values")
    if durations.size == 0:
        return np.zeros(0, dtype=np.float32)
    if interpolate_unvoiced:
        values = _interpolate_zeros(values)
    ends = np.cumsum(durations.astype(np.int64))
    starts = ends - durations
    sums = np.concatenate([[0.0], np.cumsum(values)])
    out = (sums[ends] - sums[starts]) / np.maximum(durations, 1)
    empty = durations == 0
    if empty.any():
        out[empty] = values[np.minimum(starts[empty], values.size - 1)]
    return out.astype(np.float32)


def durations_from_segments(end_times_s, n_frames: int) -> np.ndarray:
    """Phone durations in frames [N] int64 from the phones' end times in seconds.

    Each boundary is rounded to a frame, ``round(t * SAMPLE_RATE / HOP_LENGTH)`` (half to even, as
    Python's ``round``), clipped to ``[0, n_frames]`` and made monotone (a boundary before the previous
    one is moved up to it); the last phone ends at ``n_frames`` whatever its end time, so the durations
    sum to ``n_frames`` exactly. Phones can get 0 frames.
    """
    ends = np.asarray(end_times_s, dtype=np.float64).reshape(-1)
    n_frames = int(n_frames)
    if ends.size == 0:
        if n_frames:
            raise ValueError(f"no segments to cover {n_frames} frames")
        return np.zeros(0, dtype=np.int64)
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if not np.isfinite(ends).all():
        raise ValueError("segment end times must be finite")
    bounds = np.clip(np.round(ends * SAMPLE_RATE / HOP_LENGTH), 0, n_frames).astype(np.int64)
    bounds = np.maximum.accumulate(bounds)
    bounds[-1] = n_frames
    return np.diff(bounds, prepend=0).astype(np.int64)
