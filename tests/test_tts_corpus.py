"""TTS audio features, Festival and the corpora (amlp.tasks.tts.{audio,festival,corpus}).

The fixture ``tests/fixtures/tts/synth3`` is a synthetic corpus of three utterances (about 300 KB) made by
``build_synth_corpus(out, data_dir=d, train=1, val=1, test=1, pack=False)`` where ``d/multi30k/train.en``
holds the lines "A man on the sea.", "A dog in a car." and "A child in a swing." (three of the shortest
Multi30k training captions). Tests that run Festival are skipped when it or the slt HTS voice is missing.
"""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from amlp.tasks.tts import audio as A
from amlp.tasks.tts import corpus as C
from amlp.tasks.tts import festival as F

FIXTURE = Path(__file__).parent / "fixtures" / "tts" / "synth3"
SENTENCES = ["A man on the sea.", "A dog in a car.", 'A "small" child \\ in a swing.']


def _festival_reason() -> str | None:
    if shutil.which("festival") is None:
        return "Festival is not installed (apt-get install festival festvox-us-slt-hts)"
    try:
        F.check_festival()
    except RuntimeError as exc:
        return str(exc)
    return None


needs_festival = pytest.mark.skipif(_festival_reason() is not None, reason=str(_festival_reason()))


def _data_dir(tmp: Path, lines: list[str]) -> Path:
    folder = tmp / "data" / "multi30k"
    folder.mkdir(parents=True)
    (folder / "train.en").write_text("\n".join(lines) + "\n")
    return tmp / "data"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A corpus of the three SENTENCES, built without interruption in chunks of two."""
    tmp = tmp_path_factory.mktemp("synth")
    data = _data_dir(tmp, SENTENCES)
    summary = C.build_synth_corpus(tmp / "corpus", data_dir=data, train=1, val=1, test=1, progress=False,
                                   chunk_size=2)
    return tmp / "corpus", data, summary


# -- audio -------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:n_fft=1024 is too large")
@pytest.mark.parametrize("n", [300, 2560, 22050, 22050 + 255])
def test_log_mel_shape_and_formula(n):
    rng = np.random.default_rng(n)
    x = (0.1 * rng.standard_normal(n)).astype(np.float32)
    mel = A.log_mel(x)
    assert mel.shape == (1 + n // A.HOP_LENGTH, A.N_MELS) == (A.n_frames(n), 80)
    assert mel.dtype == np.float32
    import librosa

    spec = np.abs(librosa.stft(x, n_fft=1024, hop_length=256, win_length=1024, window="hann", center=True,
                               pad_mode="reflect"))
    basis = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0.0, fmax=8000.0)
    np.testing.assert_allclose(mel, np.log(np.maximum(basis @ spec, 1e-5)).T, rtol=1e-4, atol=1e-4)
    energy = A.frame_energy(x)
    assert energy.shape == (mel.shape[0],)
    np.testing.assert_allclose(energy, np.linalg.norm(spec, axis=0), rtol=1e-4)


def test_silence_log_mel_is_the_floor():
    assert np.allclose(A.log_mel(np.zeros(4096, dtype=np.float32)), np.log(1e-5))


def test_pitch_of_a_200_hz_sine():
    t = np.arange(A.SAMPLE_RATE) / A.SAMPLE_RATE
    x = (0.5 * np.sin(2 * np.pi * 200.0 * t)).astype(np.float32)
    f0 = A.frame_pitch(x)
    assert f0.shape == (A.n_frames(x.size),) and f0.dtype == np.float32
    inner = f0[5:-5]
    assert (inner > 0).all()
    assert abs(float(np.median(inner)) - 200.0) < 3.0
    assert np.abs(inner - 200.0).max() < 8.0
    assert (A.frame_pitch(np.zeros(5000, dtype=np.float32)) == 0).all()
    mel, energy, pitch = A.frame_features(x)
    np.testing.assert_array_equal(pitch, f0)
    np.testing.assert_array_equal(mel, A.log_mel(x))


def test_wav_round_trip_and_resampling(tmp_path):
    t = np.arange(32000) / 32000
    x = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    A.save_wav(tmp_path / "a.wav", x, sample_rate=32000)
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (32000, 2, 1)
    same = A.load_wav(tmp_path / "a.wav", sample_rate=32000)
    assert np.abs(same - x).max() < 1e-3
    y = A.load_wav(tmp_path / "a.wav")
    assert y.dtype == np.float32 and abs(y.size - A.SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * A.SAMPLE_RATE / y.size - 440.0) < 2.0
    with pytest.raises(FileNotFoundError):
        A.load_wav(tmp_path / "missing.wav")


def test_durations_from_segments():
    fps = A.SAMPLE_RATE / A.HOP_LENGTH  # about 86.13 frames per second
    # boundaries round(0.1 * fps) = 9, round(0.25 * fps) = 22; the last phone ends at n_frames
    d = A.durations_from_segments([0.1, 0.25, 0.5], 50)
    assert d.dtype == np.int64 and d.tolist() == [9, 13, 28]
    # the last end time is ignored: shorter or longer than the audio, the last phone absorbs the rest
    assert A.durations_from_segments([0.1, 0.25, 9.0], 30).tolist() == [9, 13, 8]
    # end times past the audio are clipped: zero-length phones, still summing to n_frames
    assert A.durations_from_segments([0.1, 5.0, 6.0, 7.0], 20).tolist() == [9, 11, 0, 0]
    # non-monotone end times are made monotone; close boundaries give zero-length phones
    assert A.durations_from_segments([0.2, 0.1, 0.3], 40).tolist() == [17, 0, 23]
    assert A.durations_from_segments([0.1, 0.101, 0.3], 40).tolist() == [9, 0, 31]
    assert A.durations_from_segments([0.5], 7).tolist() == [7]
    assert A.durations_from_segments([], 0).tolist() == []
    with pytest.raises(ValueError):
        A.durations_from_segments([], 5)
    ends = np.sort(np.random.default_rng(0).uniform(0, 3, 40))
    d = A.durations_from_segments(ends, 250)
    assert d.sum() == 250 and (d >= 0).all()
    assert np.round(ends[0] * fps) == d[0]


def test_phone_average():
    values = np.array([1, 2, 3, 0, 0, 6, 7, 0], dtype=np.float32)
    durations = np.array([2, 3, 0, 3], dtype=np.int64)
    # plain means: [1, 2] -> 1.5, [3, 0, 0] -> 1, zero frames -> frame 5 (its boundary) = 6, [6, 7, 0] -> 13/3
    out = A.phone_average(values, durations)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [1.5, 1.0, 6.0, 13 / 3], rtol=1e-6)
    # interpolated: zeros at frames 3, 4 lie between 3 (frame 2) and 6 (frame 5): 4, 5; the last one
    # (frame 7) is after the last voiced frame: 7. Frames [1, 2, 3, 4, 5, 6, 7, 7].
    out = A.phone_average(values, durations, interpolate_unvoiced=True)
    np.testing.assert_allclose(out, [1.5, 4.0, 6.0, 20 / 3], rtol=1e-6)
    # a zero-length phone at the very end takes the last frame; leading zeros take the first voiced value
    np.testing.assert_allclose(A.phone_average(np.array([0, 0, 4, 8.0]), [2, 2, 0], interpolate_unvoiced=True),
                               [4.0, 6.0, 8.0])
    np.testing.assert_allclose(A.phone_average(np.zeros(4), [1, 3], interpolate_unvoiced=True), [0.0, 0.0])
    with pytest.raises(ValueError):
        A.phone_average(values, [2, 2])


# -- Festival ----------------------------------------------------------------------------------------------
def test_check_text():
    assert F.check_text("  A dog,\n  in a \"car\"!  ") == 'A dog, in a "car"!'
    assert F.check_text("Back\\slash {x} ~ 42") == "Back\\slash {x} ~ 42"
    for text in ["", "   \n\t"]:
        with pytest.raises(ValueError, match="empty"):
            F.check_text(text)
    with pytest.raises(ValueError, match="no letters"):
        F.check_text("123 ... !")
    with pytest.raises(ValueError) as info:
        F.check_text("Un café crème \u2014 s'il vous plaît")
    message = str(info.value)
    for char in ["é", "è", "î", "\u2014"]:
        assert repr(char) in message
    assert "'a'" not in message
    with pytest.raises(TypeError):
        F.check_text(None)


def test_parse_segs():
    text = "EST_File Segment\nDataType ascii\nNumFields 3\n#\n0.1750 100 pau\n0.2300 100 ax\n\n0.3100 100 m\n"
    assert F.parse_segs(text) == [("pau", 0.175), ("ax", 0.23), ("m", 0.31)]
    assert F.parse_segs("#\n") == []
    with pytest.raises(ValueError):
        F.parse_segs("0.1 100 pau\n")
    with pytest.raises(ValueError):
        F.parse_segs("#\n0.1 pau\n")


@needs_festival
def test_synthesize_escapes_text_and_matches_front_end(tmp_path):
    sentences = ['She said "hello" \\ twice.', "Two dogs."]
    out = F.synthesize(sentences, tmp_path, ["q", "d"])
    for (wav, segments), text in zip(out, sentences):
        assert wav.is_file() and wav.parent == tmp_path.resolve()
        phones = [p for p, _ in segments]
        assert phones[0] == phones[-1] == F.SILENCE
        ends = [t for _, t in segments]
        assert all(b >= a for a, b in zip(ends, ends[1:]))
        assert F.text_to_phones(text) == phones
    assert [p for p, _ in out[1][1]] == ["pau", "t", "uw", "d", "aa", "g", "z", "pau"]
    with pytest.raises(ValueError, match="sentence 1"):
        F.synthesize(["fine", "caf\u00e9"], tmp_path, ["a", "b"])
    with pytest.raises(ValueError):
        F.synthesize(["fine"], tmp_path, ["../escape"])


def test_missing_festival_names_the_packages(monkeypatch):
    monkeypatch.setattr(F.shutil, "which", lambda name: None)
    F._checked.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="festvox-us-slt-hts"):
            F.check_festival()
    finally:
        F._checked.cache_clear()


# -- corpus: selection -------------------------------------------------------------------------------------
def test_select_sentences():
    lines = [f"Sentence number {i}." for i in range(40)] + ["Sentence number 3.", "caf\u00e9", "", "12"]
    a = C.select_sentences(lines, 10, 5, 5, seed=1)
    assert [len(a[s]) for s in C.SPLITS] == [10, 5, 5]
    chosen = [t for s in C.SPLITS for _, t in a[s]]
    assert len(set(chosen)) == 20 and all(t.startswith("Sentence") for t in chosen)
    assert all(idx < 40 for s in C.SPLITS for idx, _ in a[s])
    assert C.select_sentences(lines, 10, 5, 5, seed=1) == a
    assert C.select_sentences(lines, 10, 5, 5, seed=2) != a
    b = C.select_sentences(lines, 3, 5, 5, seed=1)  # held-out splits do not depend on the training size
    assert b["test"] == a["test"] and b["val"] == a["val"]
    with pytest.raises(ValueError, match="only 40"):
        C.select_sentences(lines, 30, 5, 10)


# -- corpus: the committed fixture -------------------------------------------------------------------------
def _check_utterance(u: C.Utterance):
    assert u.mel.dtype == np.float32 and u.mel.shape[1] == A.N_MELS
    assert u.durations.dtype == np.int64 and int(u.durations.sum()) == u.mel.shape[0]
    n = len(u.phones)
    assert u.durations.shape == u.pitch.shape == u.energy.shape == (n,)
    assert u.pitch.dtype == u.energy.dtype == np.float32
    assert (u.pitch > 50).all() and (u.pitch < 500).all()  # interpolated: no unvoiced zeros
    assert (u.energy >= 0).all()
    assert u.phones[0] == u.phones[-1] == "pau"


def test_load_fixture():
    corpus = C.load_corpus(FIXTURE, progress=False)
    assert {k: [u.id for u in v] for k, v in corpus.items()} == {
        "train": ["m30k_00001"], "val": ["m30k_00000"], "test": ["m30k_00002"]}
    assert corpus["train"][0].text == "A dog in a car."
    assert corpus["train"][0].phones == ["pau", "ax", "d", "ao", "g", "ih", "n", "ax", "k", "aa", "r", "pau"]
    for utts in corpus.values():
        u = utts[0]
        _check_utterance(u)
        assert u.wav.is_file()
        audio = A.load_wav(u.wav)
        assert A.n_frames(audio.size) == u.mel.shape[0]
        np.testing.assert_allclose(A.log_mel(audio), u.mel, atol=1e-3)
    assert C.verify_corpus(FIXTURE) == 8


def test_packed_loading_matches_per_file(tmp_path):
    root = tmp_path / "c"
    shutil.copytree(FIXTURE, root)
    per_file = C.load_corpus(root, progress=False)
    C.pack_corpus(root, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["packed"] and "packed/train.npz" in manifest["files"]
    assert C.verify_corpus(root) == 11
    packed = C.load_corpus(root, progress=False)
    for split in C.SPLITS:
        for a, b in zip(per_file[split], packed[split], strict=True):
            assert (a.id, a.text, a.phones, a.wav) == (b.id, b.text, b.phones, b.wav)
            for key in ("durations", "mel", "pitch", "energy"):
                np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_checksum_tamper_detection(tmp_path):
    root = tmp_path / "c"
    shutil.copytree(FIXTURE, root)
    wav = root / "wavs" / "m30k_00002.wav"
    data = bytearray(wav.read_bytes())
    data[-100] ^= 1
    wav.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="wavs/m30k_00002.wav has sha256"):
        C.verify_corpus(root)
    (root / "features" / "m30k_00000.npz").unlink()
    with pytest.raises(ValueError, match="features/m30k_00000.npz is missing"):
        C.verify_corpus(root)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        C.load_corpus(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        C.load_corpus(tmp_path)
    root = tmp_path / "c"
    shutil.copytree(FIXTURE, root)
    (root / "features" / "m30k_00000.npz").unlink()
    with pytest.raises(FileNotFoundError, match="m30k_00000.npz"):
        C.load_corpus(root, progress=False)
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        C.load_corpus(root)


# -- corpus: LJSpeech layout -------------------------------------------------------------------------------
def _textgrid(intervals: list[tuple[float, float, str]], xmax: float) -> str:
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {xmax}",
             "tiers? <exists>", "size = 2", "item []:"]
    for k, (name, items) in enumerate([("words", [(0.0, xmax, "word")]), ("phones", intervals)], 1):
        lines += [f"    item [{k}]:", '        class = "IntervalTier"', f'        name = "{name}"',
                  "        xmin = 0", f"        xmax = {xmax}", f"        intervals: size = {len(items)}"]
        for j, (a, b, label) in enumerate(items, 1):
            lines += [f"        intervals [{j}]:", f"            xmin = {a}", f"            xmax = {b}",
                      f'            text = "{label}"']
    return "\n".join(lines) + "\n"


def test_ljspeech_folder(tmp_path):
    pytest.importorskip("praatio")
    root = tmp_path / "lj"
    (root / "wavs").mkdir(parents=True)
    (root / "textgrids").mkdir()
    t = np.arange(int(0.6 * A.SAMPLE_RATE)) / A.SAMPLE_RATE
    rows = []
    for k in range(4):
        uid = f"LJ001-{k:04d}"
        A.save_wav(root / "wavs" / f"{uid}.wav", (0.3 * np.sin(2 * np.pi * (150 + 20 * k) * t)).astype(np.float32))
        rows.append(f"{uid}|Text {k}, raw.|Text {k}, normalised.")
        if k != 3:  # the last one has no alignment
            grid = _textgrid([(0.0, 0.1, ""), (0.1, 0.3, "HH"), (0.35, 0.5, "AY1"), (0.5, 0.6, "sil")], 0.6)
            (root / "textgrids" / f"{uid}.TextGrid").write_text(grid)
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "splits.json").write_text(json.dumps({"train": ["LJ001-0000", "LJ001-0003"], "val": ["LJ001-0001"],
                                                  "test": ["LJ001-0002"]}))
    with pytest.warns(UserWarning, match="1 utterance of"):
        corpus = C.load_corpus(root, progress=False)
    assert {k: [u.id for u in v] for k, v in corpus.items()} == {
        "train": ["LJ001-0000"], "val": ["LJ001-0001"], "test": ["LJ001-0002"]}
    u = corpus["val"][0]
    assert u.text == "Text 1, normalised." and u.wav == root / "wavs" / "LJ001-0001.wav"
    assert u.phones == ["", "HH", "", "AY1", "sil"]  # the gap 0.3-0.35 s is filled with silence ""
    fps = A.SAMPLE_RATE / A.HOP_LENGTH
    frames = A.n_frames(t.size)
    assert u.durations.tolist() == [round(0.1 * fps), round(0.3 * fps) - round(0.1 * fps),
                                    round(0.35 * fps) - round(0.3 * fps), round(0.5 * fps) - round(0.35 * fps),
                                    frames - round(0.5 * fps)]
    assert u.mel.shape == (frames, 80)
    assert abs(float(u.pitch[1]) - 170.0) < 5.0
    cache = root / "features" / "LJ001-0001.npz"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    with pytest.warns(UserWarning):
        again = C.load_corpus(root, progress=False)
    assert cache.stat().st_mtime_ns == stamp  # read from the cache
    np.testing.assert_array_equal(again["val"][0].mel, u.mel)
    # a changed alignment is noticed and the features recomputed
    grid = _textgrid([(0.0, 0.2, "sil"), (0.2, 0.6, "AA1")], 0.6)
    (root / "textgrids" / "LJ001-0001.TextGrid").write_text(grid)
    with pytest.warns(UserWarning):
        assert C.load_corpus(root, progress=False)["val"][0].phones == ["sil", "AA1"]
    (root / "wavs" / "LJ001-0002.wav").unlink()
    with pytest.raises(FileNotFoundError, match="LJ001-0002.wav"), pytest.warns(UserWarning):
        C.load_corpus(root, progress=False)


def test_ljspeech_default_splits(tmp_path):
    ids = [f"u{i:04d}" for i in range(3000)]
    splits = C._ljspeech_splits(tmp_path, ids)
    assert splits["test"] == ids[-250:] and splits["val"] == ids[-500:-250] and splits["train"] == ids[:-500]
    small = C._ljspeech_splits(tmp_path, ids[:40])
    assert [len(small[s]) for s in C.SPLITS] == [32, 4, 4]


# -- corpus: building with Festival ------------------------------------------------------------------------
@needs_festival
def test_build_small_corpus(built):
    root, _, summary = built
    assert summary["utterances"] == summary["synthesised"] == 3 and summary["sentences_per_second"] > 0
    assert C.verify_corpus(root) == 11
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == C.FORMAT and manifest["audio"]["sample_rate"] == 22050
    corpus = C.load_corpus(root, progress=False)
    metadata = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    by_id = {row["id"]: row for row in metadata}
    assert sorted(row["text"] for row in metadata) == sorted(F.check_text(s) for s in SENTENCES)
    for split, utts in corpus.items():
        assert [u.id for u in utts] == manifest["splits"][split] and len(utts) == 1
        u = utts[0]
        _check_utterance(u)
        assert by_id[u.id]["split"] == split and by_id[u.id]["phones"] == u.phones
        audio = A.load_wav(u.wav)
        with wave.open(str(u.wav)) as w:
            assert w.getframerate() == 22050 and w.getsampwidth() == 2
        assert A.n_frames(audio.size) == u.mel.shape[0]
        assert F.text_to_phones(u.text) == u.phones


@needs_festival
def test_build_resumes_after_interruption(built, tmp_path, monkeypatch):
    reference, data, _ = built
    root = tmp_path / "corpus"
    real = C._build_chunk
    calls = []

    def stop_after_first_chunk(out, items):
        if calls:
            raise KeyboardInterrupt
        calls.append(items)
        return real(out, items)

    monkeypatch.setattr(C, "_build_chunk", stop_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        C.build_synth_corpus(root, data_dir=data, train=1, val=1, test=1, progress=False, chunk_size=2)
    assert not (root / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        C.load_corpus(root)
    done = sorted(p.stem for p in (root / "features").glob("*.npz"))
    assert done == sorted(uid for uid, _ in calls[0]) and len(done) == 2
    # a half-written file left by a killed process is never taken as done, and is cleaned up
    stray = root / "features" / f".m30k_00002.npz{C._TMP_MARK}99999"
    stray.write_bytes(b"partial")
    monkeypatch.setattr(C, "_build_chunk", real)
    summary = C.build_synth_corpus(root, data_dir=data, train=1, val=1, test=1, progress=False, chunk_size=2)
    assert summary["synthesised"] == 1 and not stray.exists()
    assert (root / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    # a finished build run again does nothing new; another build in the same folder is refused
    assert C.build_synth_corpus(root, data_dir=data, train=1, val=1, test=1, progress=False)["synthesised"] == 0
    with pytest.raises(ValueError, match="different"):
        C.build_synth_corpus(root, data_dir=data, train=2, val=0, test=1, progress=False)
