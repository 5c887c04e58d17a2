"""Speech metrics (MCD / MSD, fairseq S^2's definitions) and the Griffin-Lim vocoder."""

import librosa
import numpy as np
import pytest
import scipy.fft
import scipy.signal
import torch

from amlp.tasks.tts.audio import F_MAX, F_MIN, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH
from amlp.tasks.tts.metrics import (corpus_distortions, distortion_features, distortion_log_mel,
                                    dtw_distortion, dtw_path, feature_settings, frame_distance_matrix,
                                    mel_cepstral_distortion, mel_spectral_distortion)
from amlp.tasks.tts.vocoder import griffin_lim, mel_to_audio_batch

SR = 22050


def _log_mel(audio: np.ndarray) -> np.ndarray:
    """The features' log-mel [frames, 80], computed here with librosa from the shared constants."""
    magnitude = np.abs(librosa.stft(audio, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH,
                                    window="hann", center=True, pad_mode="reflect"))
    basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX)
    return np.log(np.maximum(basis @ magnitude, 1e-5)).T.astype(np.float32)


def _vowel(period: int, n_periods: int, formants, rng) -> np.ndarray:
    """An exactly periodic harmonic tone (period in samples) with a formant-like spectral envelope."""
    f0 = SR / period
    t = np.arange(period * n_periods) / SR
    x = np.zeros_like(t)
    for h in range(1, int(SR / 2 / f0)):
        f = h * f0
        amp = sum(np.exp(-0.5 * ((f - fc) / bw) ** 2) for fc, bw in formants) + 0.01
        x += amp / np.sqrt(h) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return x


# (period in samples, number of periods, formants (Hz, bandwidth))
_SEGMENTS = [(147, 30, [(700, 120), (1200, 150), (2600, 250)]),
             (126, 40, [(300, 80), (2300, 200), (3000, 300)]),
             (105, 40, [(500, 100), (1000, 120), (2500, 250)]),
             (175, 25, [(400, 100), (1900, 200), (2600, 250)])]


@pytest.fixture(scope="module")
def speech():
    """About 0.8 s of four vowel-like segments, and the same with 15 periods of the second one repeated
    (a seamless local time stretch of 86 ms: the repeated stretch is a whole number of periods)."""
    rng = np.random.default_rng(0)
    parts = [_vowel(p, n, f, rng) for p, n, f in _SEGMENTS]
    x = np.concatenate(parts)
    scale = 0.3 / np.abs(x).max()
    x = x * scale
    period = _SEGMENTS[1][0]
    cut = len(parts[0]) + 10 * period
    stretched = np.concatenate([x[:cut], x[cut:cut + 15 * period], x[cut:]])
    return x, stretched


def _noisy(x: np.ndarray, snr_db: float) -> np.ndarray:
    noise = np.random.default_rng(1).standard_normal(len(x))
    return x + noise * np.sqrt(np.mean(x ** 2)) * 10 ** (-snr_db / 20)


# -- features -------------------------------------------------------------------------------------------


def test_feature_settings():
    s = feature_settings(SR)
    assert (s["n_fft"], s["win_length"], s["hop_length"]) == (1102, 1102, 275)
    assert (s["n_mels"], s["n_mfcc"], s["fmin"], s["fmax"], s["log_offset"]) == (80, 13, 20.0, 11025.0, 1e-6)
    assert feature_settings(16000)["n_fft"] == 800 and feature_settings(16000)["hop_length"] == 200
    x = np.random.default_rng(0).standard_normal(SR // 2)
    log_mel, cep = distortion_features(x, SR)
    frames = 1 + len(x) // 275
    assert log_mel.shape == (frames, 80) and cep.shape == (frames, 13)
    # c0 included: the first orthonormal DCT-II coefficient is sum / sqrt(80)
    np.testing.assert_allclose(cep[:, 0], log_mel.sum(1) / np.sqrt(80), rtol=1e-10)
    np.testing.assert_allclose(cep, scipy.fft.dct(log_mel, type=2, norm="ortho", axis=1)[:, :13], rtol=1e-10)


def test_log_mel_matches_the_definition_by_hand():
    """Reflect-padded framing, periodic Hann, power spectrum, HTK mel (peak 1), log(mel + 1e-6)."""
    x = np.random.default_rng(0).standard_normal(5000) * 0.1
    n_fft, hop = 1102, 275
    padded = np.pad(x, n_fft // 2, mode="reflect")
    frames = np.stack([padded[i * hop:i * hop + n_fft] for i in range(1 + len(x) // hop)])
    power = np.abs(np.fft.rfft(frames * scipy.signal.get_window("hann", n_fft, fftbins=True), axis=1)) ** 2
    basis = librosa.filters.mel(sr=SR, n_fft=n_fft, n_mels=80, fmin=20, fmax=SR / 2, htk=True, norm=None,
                                dtype=np.float64)
    assert np.isclose(basis.max(), 1.0, atol=0.02)  # triangles of peak 1, not area-normalised
    expected = np.log(power @ basis.T + 1e-6)
    np.testing.assert_allclose(distortion_log_mel(x, SR), expected, rtol=1e-9, atol=1e-9)


# -- distortions ------------------------------------------------------------------------------------------


def test_zero_against_itself(speech):
    x, _ = speech
    assert mel_cepstral_distortion(x, x) < 1e-6
    assert mel_spectral_distortion(x, x) < 1e-6
    assert mel_cepstral_distortion(torch.from_numpy(x), x) < 1e-6


def test_grows_with_noise(speech):
    x, _ = speech
    mcd = [mel_cepstral_distortion(x, _noisy(x, snr)) for snr in (30, 20, 10)]
    msd = [mel_spectral_distortion(x, _noisy(x, snr)) for snr in (30, 20, 10)]
    assert 0 < mcd[0] < mcd[1] < mcd[2]
    assert 0 < msd[0] < msd[1] < msd[2]


def test_symmetric(speech):
    x, stretched = speech
    y = _noisy(x, 20)
    assert mel_cepstral_distortion(x, y) == pytest.approx(mel_cepstral_distortion(y, x), rel=1e-9)
    assert mel_spectral_distortion(x, y) == pytest.approx(mel_spectral_distortion(y, x), rel=1e-9)
    assert mel_cepstral_distortion(x, stretched) == pytest.approx(mel_cepstral_distortion(stretched, x),
                                                                  rel=1e-9)


def test_time_warps_cost_far_less_than_noise(speech):
    x, stretched = speech
    delayed = np.concatenate([np.zeros(300), x])[:len(x)]  # 13.6 ms late
    noise = mel_cepstral_distortion(x, _noisy(x, 30))
    assert mel_cepstral_distortion(x, stretched) < 0.1 * noise
    assert mel_cepstral_distortion(x, delayed) < 0.15 * noise
    assert mel_spectral_distortion(x, stretched) < 0.1 * mel_spectral_distortion(x, _noisy(x, 30))
    # the DTW is what absorbs the stretch: frame by frame, the same pair is far apart
    _, a = distortion_features(x)
    _, b = distortion_features(stretched)
    n = min(len(a), len(b))
    frame_by_frame = np.sqrt(np.mean((a[:n] - b[:n]) ** 2, axis=1)).mean()
    assert mel_cepstral_distortion(x, stretched) < 0.1 * frame_by_frame


def test_dtw_hand_worked():
    # accumulated costs A (worked by hand):  row 0: 1 2 11 / row 1: 10 10 3 / row 2: 19 19 4;
    # optimal path (0,0) (0,1) (1,2) (2,2): cost 4 over 4 points (not 3 = max(N, M), not 6 = N + M)
    C = np.array([[1.0, 1.0, 9.0], [9.0, 9.0, 1.0], [9.0, 9.0, 1.0]])
    cost, path = dtw_path(C)
    assert cost == 4.0
    assert path.tolist() == [[0, 0], [0, 1], [1, 2], [2, 2]]
    assert dtw_distortion(C) == 1.0
    # 2 x 4: path (0,0) (0,1) (1,2) (1,3), cost 1 + 2 + 1 + 2 = 6 over 4 points
    assert dtw_distortion(np.array([[1.0, 2.0, 5.0, 6.0], [7.0, 3.0, 1.0, 2.0]])) == 1.5
    assert dtw_distortion(np.array([[2.5]])) == 2.5
    assert dtw_distortion(np.array([[1.0, 2.0, 3.0]])) == 2.0


def test_dtw_steps_are_the_unconstrained_symmetric_ones():
    """librosa's default DTW = A[i,j] = C[i,j] + min(A[i-1,j-1], A[i,j-1], A[i-1,j]), equal weights."""
    C = np.random.default_rng(0).random((9, 13))
    A = np.full((10, 14), np.inf)
    A[0, 0] = 0.0
    for i in range(1, 10):
        for j in range(1, 14):
            A[i, j] = C[i - 1, j - 1] + min(A[i - 1, j - 1], A[i, j - 1], A[i - 1, j])
    cost, path = dtw_path(C)
    assert cost == pytest.approx(A[-1, -1], rel=1e-12)
    steps = np.diff(path, axis=0)
    assert {tuple(s) for s in steps.tolist()} <= {(1, 1), (0, 1), (1, 0)}
    assert path[0].tolist() == [0, 0] and path[-1].tolist() == [8, 12]
    assert C[path[:, 0], path[:, 1]].sum() == pytest.approx(cost, rel=1e-12)


def test_frame_distance_is_rms():
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    b = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(frame_distance_matrix(a, b), [[np.sqrt(12.5)], [np.sqrt(6.5)]])


def test_corpus_distortions(speech):
    x, stretched = speech
    y = _noisy(x, 20)
    out = corpus_distortions([(x, y), (x, stretched)], SR)
    assert out["count"] == 2
    mcd = [mel_cepstral_distortion(x, y), mel_cepstral_distortion(x, stretched)]
    msd = [mel_spectral_distortion(x, y), mel_spectral_distortion(x, stretched)]
    assert out["mcd"] == pytest.approx(np.mean(mcd)) and out["msd"] == pytest.approx(np.mean(msd))
    with pytest.raises(ValueError):
        corpus_distortions([], SR)


def test_rejects_bad_audio():
    with pytest.raises(ValueError, match="1-D"):
        mel_cepstral_distortion(np.zeros((2, 1000)), np.zeros(1000))
    with pytest.raises(ValueError, match="non-finite"):
        mel_spectral_distortion(np.full(1000, np.nan), np.zeros(1000))
    with pytest.raises(ValueError, match="empty"):
        mel_spectral_distortion(np.zeros(0), np.zeros(1000))


# -- Griffin-Lim ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sine():
    n = int(0.75 * SAMPLE_RATE)
    return (0.5 * np.sin(2 * np.pi * 440.0 * np.arange(n) / SAMPLE_RATE)).astype(np.float32)


def test_griffin_lim_reconstructs_a_sine(sine):
    log_mel = _log_mel(sine)
    audio = griffin_lim(log_mel)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == (log_mel.shape[0] - 1) * HOP_LENGTH
    assert abs(len(audio) - len(sine)) < HOP_LENGTH
    again = _log_mel(audio)
    assert again.shape == log_mel.shape
    # spectral convergence of the mel magnitudes: ||M' - M||_F / ||M||_F (measured 0.13: the
    # non-negative least-squares mel inversion is the limit, not the iterations)
    target, got = np.exp(log_mel), np.exp(again)
    assert np.linalg.norm(got - target) / np.linalg.norm(target) < 0.2


def test_griffin_lim_is_deterministic(sine):
    log_mel = _log_mel(sine)[:20]
    a = griffin_lim(log_mel, n_iter=8)
    np.testing.assert_array_equal(a, griffin_lim(torch.from_numpy(log_mel), n_iter=8))
    assert not np.array_equal(a, griffin_lim(log_mel, n_iter=8, seed=1))
    padded = np.zeros((2, 30, 80), dtype=np.float32) + np.log(1e-5)
    padded[0, :20] = log_mel
    padded[1, :12] = log_mel[:12]
    batch = mel_to_audio_batch(torch.from_numpy(padded), lengths=torch.tensor([20, 12]), n_iter=8)
    np.testing.assert_array_equal(batch[0], a)
    np.testing.assert_array_equal(batch[1], griffin_lim(log_mel[:12], n_iter=8))


def test_griffin_lim_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[frames, 80\]"):
        griffin_lim(np.zeros((10, 79)))
    with pytest.raises(ValueError, match=r"\[frames, 80\]"):
        griffin_lim(np.zeros((80,)))
    with pytest.raises(ValueError, match=r"\[frames, 80\]"):
        griffin_lim(np.zeros((1, 10, 80)))
    with pytest.raises(ValueError, match="at least 2 frames"):
        griffin_lim(np.zeros((1, 80)))
    bad = np.zeros((10, 80))
    bad[3, 4] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        griffin_lim(bad)
