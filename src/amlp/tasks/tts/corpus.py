"""TTS corpora: a synthetic single-speaker corpus made by Festival (the slt HTS voice) from Multi30k
captions, and LJSpeech folders with forced alignments.

Synthetic corpus (:func:`build_synth_corpus`, the ``amlp data synth-tts`` command) in ``out_dir``::

    plan.json              the build's settings and its sentences (id, split, text), written first
    wavs/<id>.wav          22,050 Hz 16-bit mono (Festival's 32 kHz wave resampled with soxr)
    features/<id>.npz      mel [T, 80] float32 (log-mel of the stored wav), durations [N] int64 (frames,
                           sum T), pitch [N] float32 (Hz, unvoiced frames interpolated), energy [N] float32,
                           phones [N] str (Festival's, "pau" is silence)
    packed/<split>.npz     the split's features concatenated, so that loading 6,000 utterances reads three
                           files (a fraction of a second) instead of 6,000 (several seconds)
    metadata.jsonl         one JSON object per utterance: id, split, text, phones
    manifest.json          format and version, the audio constants, the voice, the split lists and the
                           sha256 of every file above; written last, so it marks a finished build

Ids are ``m30k_<line>``, the 0-based line of the sentence in Multi30k's ``train.en``. The sentences
are the distinct training captions (whitespace collapsed) that Festival can say (:func:`check_text`),
in an order drawn with ``numpy.random.default_rng(seed)``: the first ``test`` are the test split, the
next ``val`` the validation split, the next ``train`` the training split (so the test and validation
sentences do not change with the training size). The build is resumable: every file is written under a
temporary name and renamed into place, an utterance counts as done when its wav and its feature file
exist, and a restarted build synthesises only the rest (the result is byte-for-byte the same).

LJSpeech folder (:func:`load_corpus`): ``metadata.csv`` (``id|text|normalized text``; the normalised text
is used), ``wavs/<id>.wav`` and ``textgrids/<id>.TextGrid`` (Montreal Forced Aligner style: an interval
tier named ``phones``, silences labelled ``""``, ``sil`` or ``sp`` kept as given). Utterances without a
TextGrid (alignment failures) are skipped with a warning. Splits come from ``splits.json``
(``{"train": [ids], "val": [ids], "test": [ids]}``) when present, else the last 250 utterances of
``metadata.csv`` are the test split and the 250 before them the validation split (a tenth each when the
folder has fewer than 2,500). Features are computed on the first load and cached in ``<root>/features``
when that folder is writable, else in ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import audio as A
from .festival import VOICE, check_festival, check_text, festival_version, synthesize

FORMAT = "amlp-synth-tts"
FORMAT_VERSION = 1
#: sentences per Festival process
CHUNK_SIZE = 50
SPLITS = ("train", "val", "test")
#: the arrays of a feature file
FEATURE_KEYS = ("mel", "durations", "pitch", "energy", "phones")
#: default size of the LJSpeech validation and test splits
LJSPEECH_HELD_OUT = 250

__all__ = ["Utterance", "build_synth_corpus", "verify_corpus", "load_corpus", "pack_corpus", "select_sentences",
           "utterance_features", "FORMAT", "FORMAT_VERSION", "CHUNK_SIZE"]


@dataclass
class Utterance:
    """One utterance: ``phones`` [N] with ``durations`` [N] (frames, ``sum == mel.shape[0]``), the log-mel
    ``mel`` [T, 80], and per phone ``pitch`` (Hz, unvoiced frames interpolated) and ``energy`` (L2 norm of
    the STFT magnitude, averaged over the phone's frames); ``wav`` is the audio file when there is one."""
    id: str
    text: str
    phones: list[str]
    durations: np.ndarray
    mel: np.ndarray
    pitch: np.ndarray
    energy: np.ndarray
    wav: Path | None = None


# -- small file helpers ------------------------------------------------------------------------------------
_TMP_MARK = ".tmp-"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` archive (readable by ``numpy.load``) with fixed zip timestamps, so that the same arrays
    always give the same bytes (``numpy.savez`` stamps the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _atomic_write_bytes(path, _npz_bytes(arrays))


def _read_npz(path: Path, keys=FEATURE_KEYS) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise ValueError(f"{str(path)!r} lacks the arrays {', '.join(missing)}")
            return {k: data[k] for k in keys}
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"cannot read the feature file {str(path)!r}: {exc}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def _audio_constants() -> dict:
    return {"sample_rate": A.SAMPLE_RATE, "n_fft": A.N_FFT, "win_length": A.WIN_LENGTH, "hop_length": A.HOP_LENGTH,
            "n_mels": A.N_MELS, "f_min": A.F_MIN, "f_max": A.F_MAX, "log_floor": A.LOG_FLOOR}


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="utt", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


# -- features ----------------------------------------------------------------------------------------------
def utterance_features(audio: np.ndarray, phones: list[str], end_times_s) -> dict[str, np.ndarray]:
    """The feature arrays of one utterance (the keys of :data:`FEATURE_KEYS`) from its audio at
    ``SAMPLE_RATE`` and its phones' end times in seconds."""
    if len(phones) != len(end_times_s):
        raise ValueError(f"{len(phones)} phones but {len(end_times_s)} end times")
    mel, energy, pitch = A.frame_features(audio)
    durations = A.durations_from_segments(end_times_s, mel.shape[0])
    return {"mel": mel, "durations": durations,
            "pitch": A.phone_average(pitch, durations, interpolate_unvoiced=True),
            "energy": A.phone_average(energy, durations),
            "phones": np.array(list(phones), dtype=str) if phones else np.zeros(0, dtype="<U1")}


def _utterance(uid: str, text: str, arrays: dict[str, np.ndarray], wav: Path | None, where: str) -> Utterance:
    mel, durations = arrays["mel"], arrays["durations"].astype(np.int64, copy=False)
    phones = [str(p) for p in arrays["phones"]]
    n = len(phones)
    if mel.ndim != 2 or mel.shape[1] != A.N_MELS:
        raise ValueError(f"{where}: mel of shape {mel.shape}, expected [frames, {A.N_MELS}]")
    if not (durations.shape == arrays["pitch"].shape == arrays["energy"].shape == (n,)):
        raise ValueError(f"{where}: {n} phones but durations/pitch/energy of shapes {durations.shape}, "
                         f"{arrays['pitch'].shape}, {arrays['energy'].shape}")
    if int(durations.sum()) != mel.shape[0]:
        raise ValueError(f"{where}: durations sum to {int(durations.sum())} but the mel has {mel.shape[0]} frames")
    return Utterance(id=uid, text=text, phones=phones, durations=durations, mel=mel.astype(np.float32, copy=False),
                     pitch=arrays["pitch"].astype(np.float32, copy=False),
                     energy=arrays["energy"].astype(np.float32, copy=False), wav=wav)


# -- synthetic corpus: sentences ---------------------------------------------------------------------------
def _multi30k_train_en(data_dir) -> Path:
    from ..translation.data import multi30k_dir

    folder = multi30k_dir(data_dir)
    for name in ("train.en", "train.en.gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Multi30k training captions not found: no train.en or train.en.gz in {str(folder)!r}")


def select_sentences(lines: list[str], train: int, val: int, test: int,
                     seed: int = 0) -> dict[str, list[tuple[int, str]]]:
    """``{split: [(line index, text)]}``: distinct lines (whitespace collapsed) that pass
    :func:`check_text`, drawn in a seeded random order, test first, then val, then train; each split
    sorted by line index."""
    sizes = {"train": int(train), "val": int(val), "test": int(test)}
    if any(v < 0 for v in sizes.values()) or sum(sizes.values()) == 0:
        raise ValueError(f"split sizes must be >= 0 and not all 0, got {sizes}")
    seen: set[str] = set()
    candidates: list[tuple[int, str]] = []
    for index, line in enumerate(lines):
        try:
            text = check_text(line)
        except ValueError:
            continue
        if text not in seen:
            seen.add(text)
            candidates.append((index, text))
    need = sum(sizes.values())
    if need > len(candidates):
        raise ValueError(f"asked for {need} sentences ({sizes}) but only {len(candidates)} distinct usable ones exist")
    order = np.random.default_rng(seed).permutation(len(candidates))
    chosen, start = {}, 0
    for split in ("test", "val", "train"):
        picked = [candidates[i] for i in order[start:start + sizes[split]]]
        chosen[split] = sorted(picked)
        start += sizes[split]
    return {split: chosen[split] for split in SPLITS}


def _plan(lines, train, val, test, seed, source: str) -> dict:
    selection = select_sentences(lines, train, val, test, seed)
    return {"format": FORMAT, "version": FORMAT_VERSION, "source": source, "seed": int(seed),
            "sizes": {"train": int(train), "val": int(val), "test": int(test)}, "voice": VOICE,
            "audio": _audio_constants(),
            "utterances": [{"id": f"m30k_{index:05d}", "split": split, "text": text}
                           for split in SPLITS for index, text in selection[split]]}


# -- synthetic corpus: synthesis of one chunk --------------------------------------------------------------
def _build_chunk(root: str, items: list[tuple[str, str]]) -> list[str]:
    """Synthesise ``items`` ([(id, text)]) in one Festival process and write their wavs and features."""
    root = Path(root)
    with tempfile.TemporaryDirectory(prefix="amlp-synth-tts-") as tmp:
        results = synthesize([text for _, text in items], tmp, [uid for uid, _ in items])
        for (uid, _), (festival_wav, segments) in zip(items, results):
            wav = root / "wavs" / f"{uid}.wav"
            tmp_wav = _tmp_name(wav)
            A.save_wav(tmp_wav, A.load_wav(festival_wav, A.SAMPLE_RATE))
            os.replace(tmp_wav, wav)
            audio = A.load_wav(wav)  # the features describe the stored 16-bit audio exactly
            arrays = utterance_features(audio, [p for p, _ in segments], [t for _, t in segments])
            _write_npz(root / "features" / f"{uid}.npz", arrays)
    return [uid for uid, _ in items]


def _is_done(root: Path, uid: str) -> bool:
    return (root / "wavs" / f"{uid}.wav").is_file() and (root / "features" / f"{uid}.npz").is_file()


def _remove_stale_temporaries(root: Path) -> None:
    for folder in (root, root / "wavs", root / "features", root / "packed"):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(".") and _TMP_MARK in path.name:
                    path.unlink(missing_ok=True)


def build_synth_corpus(out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, train: int = 6000,
                       val: int = 250, test: int = 250, seed: int = 0, progress: bool = True, workers: int = 1,
                       *, chunk_size: int = CHUNK_SIZE, pack: bool = True) -> dict:
    """Build (or finish building) the synthetic corpus in ``out_dir`` (layout in the module docstring).

    Sentences: Multi30k's ``<data_dir>/multi30k/train.en[.gz]`` (``data_dir`` None: ``$AMLP_DATA_DIR``,
    else ``../shared/data`` beside the repository); ``train``/``val``/``test`` distinct sentences drawn
    with ``seed``. Festival synthesises ``chunk_size`` sentences per process, ``workers`` processes at a
    time. A folder that holds part of the same build is completed (a different build there is an error);
    ``pack`` writes ``packed/<split>.npz`` for fast loading. Progress goes to stderr.

    Returns ``{"root", "utterances", "synthesised" (this call), "seconds", "sentences_per_second"}``.
    """
    if chunk_size < 1 or workers < 1:
        raise ValueError(f"chunk_size and workers must be >= 1, got {chunk_size} and {workers}")
    check_festival()
    root = Path(out_dir)
    source = _multi30k_train_en(data_dir)
    from ..translation.data import read_lines

    plan = _plan(read_lines(source), train, val, test, seed, f"multi30k/{source.name}")
    plan_bytes = _json_bytes(plan)
    root.mkdir(parents=True, exist_ok=True)
    plan_path = root / "plan.json"
    if plan_path.is_file():
        if plan_path.read_bytes() != plan_bytes:
            raise ValueError(f"{str(root)!r} holds a different synthetic corpus build (its plan.json differs in "
                             "sentences or settings); use an empty folder, or delete this one to rebuild")
    else:
        if (root / "manifest.json").exists() or (root / "metadata.csv").exists():
            raise ValueError(f"{str(root)!r} already holds a corpus that this build did not start")
        _atomic_write_bytes(plan_path, plan_bytes)
    (root / "wavs").mkdir(exist_ok=True)
    (root / "features").mkdir(exist_ok=True)
    _remove_stale_temporaries(root)

    utterances = plan["utterances"]
    todo = [(u["id"], u["text"]) for u in utterances if not _is_done(root, u["id"])]
    chunks = [todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size)]
    bar = _progress(len(utterances), len(utterances) - len(todo), "synth-tts", progress)
    start = time.perf_counter()
    done = 0
    try:
        if workers == 1 or len(chunks) <= 1:
            for chunk in chunks:
                done += len(_build_chunk(str(root), chunk))
                bar.update(len(chunk))
                bar.set_postfix_str(f"{done / (time.perf_counter() - start):.1f} sent/s")
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_build_chunk, str(root), chunk) for chunk in chunks]
                try:
                    for future in as_completed(futures):
                        n = len(future.result())
                        done += n
                        bar.update(n)
                        bar.set_postfix_str(f"{done / (time.perf_counter() - start):.1f} sent/s")
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    _finish(root, plan, pack=pack, progress=progress)
    return {"root": str(root), "utterances": len(utterances), "synthesised": done, "seconds": seconds,
            "sentences_per_second": done / seconds if done and seconds > 0 else None}


def _finish(root: Path, plan: dict, *, pack: bool, progress: bool) -> None:
    """Write metadata.jsonl, the packs and manifest.json from the per-utterance files."""
    utterances = plan["utterances"]
    missing = [u["id"] for u in utterances if not _is_done(root, u["id"])]
    if missing:
        raise RuntimeError(f"{len(missing)} utterances are not built yet (first {missing[0]}); run the build again")
    features: dict[str, dict[str, np.ndarray]] = {}
    bar = _progress(len(utterances), 0, "reading features", progress and len(utterances) > 500)
    for u in utterances:
        features[u["id"]] = _read_npz(root / "features" / f"{u['id']}.npz")
        bar.update(1)
    bar.close()
    lines = [json.dumps({"id": u["id"], "split": u["split"], "text": u["text"],
                         "phones": [str(p) for p in features[u["id"]]["phones"]]}, ensure_ascii=True)
             for u in utterances]
    _atomic_write_bytes(root / "metadata.jsonl", ("\n".join(lines) + "\n").encode("ascii"))
    splits = {split: [u["id"] for u in utterances if u["split"] == split] for split in SPLITS}
    packed = root / "packed"
    if pack:
        for split, ids in splits.items():
            _write_npz(packed / f"{split}.npz", _pack_arrays(ids, [features[i] for i in ids]))
    else:
        for split in SPLITS:
            (packed / f"{split}.npz").unlink(missing_ok=True)
    files = [f"wavs/{u['id']}.wav" for u in utterances] + [f"features/{u['id']}.npz" for u in utterances]
    files += ["metadata.jsonl", "plan.json"] + ([f"packed/{split}.npz" for split in SPLITS] if pack else [])
    try:
        version = festival_version()
    except RuntimeError:
        version = "unknown"
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "audio": _audio_constants(), "voice": VOICE,
                "festival": version, "source": plan["source"], "seed": plan["seed"], "sizes": plan["sizes"],
                "splits": splits, "packed": bool(pack),
                "files": {name: _sha256(root / name) for name in sorted(files)}}
    _atomic_write_bytes(root / "manifest.json", _json_bytes(manifest))


def _pack_arrays(ids: list[str], arrays: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    def cat(key, empty_shape, dtype):
        parts = [a[key] for a in arrays]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype=dtype)

    phones = [p for a in arrays for p in a["phones"]]
    return {"ids": np.array(ids, dtype=str) if ids else np.zeros(0, dtype="<U1"),
            "frames": np.array([a["mel"].shape[0] for a in arrays], dtype=np.int64),
            "n_phones": np.array([a["durations"].shape[0] for a in arrays], dtype=np.int64),
            "mel": cat("mel", (0, A.N_MELS), np.float32), "durations": cat("durations", (0,), np.int64),
            "pitch": cat("pitch", (0,), np.float32), "energy": cat("energy", (0,), np.float32),
            "phones": np.array(phones, dtype=str) if phones else np.zeros(0, dtype="<U1")}


def pack_corpus(root: str | os.PathLike, progress: bool = True) -> None:
    """Write the packed features (``packed/<split>.npz``) of a finished synthetic corpus, and its manifest
    again with their checksums (for a corpus built with ``pack=False``)."""
    root = Path(root)
    plan_path = root / "plan.json"
    if not plan_path.is_file():
        raise FileNotFoundError(f"no plan.json in {str(root)!r}: not a corpus built by build_synth_corpus")
    _finish(root, json.loads(plan_path.read_text()), pack=True, progress=progress)


# -- checks ------------------------------------------------------------------------------------------------
def _read_manifest(root: Path) -> dict:
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {str(root)!r}: not a finished synthetic corpus (build it, or "
                                "finish an interrupted build, with build_synth_corpus / amlp data synth-tts)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable manifest {str(path)!r}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an {FORMAT} manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format version {manifest.get('version')!r}; this code reads version "
                         f"{FORMAT_VERSION}: rebuild the corpus")
    if manifest.get("audio") != _audio_constants():
        raise ValueError(f"{str(path)!r} was built with other audio settings {manifest.get('audio')} than this code's "
                         f"{_audio_constants()}: rebuild the corpus")
    return manifest


def verify_corpus(root: str | os.PathLike, progress: bool = False) -> int:
    """Check every file of a synthetic corpus against the sha256 in its manifest; ``ValueError`` naming the
    first missing or changed file. Returns the number of files checked."""
    root = Path(root)
    manifest = _read_manifest(root)
    files = manifest.get("files") or {}
    bar = _progress(len(files), 0, "verify", progress)
    try:
        for name in sorted(files):
            path = root / name
            if not path.is_file():
                raise ValueError(f"corpus {str(root)!r} is damaged: {name} is missing")
            actual = _sha256(path)
            if actual != files[name]:
                raise ValueError(f"corpus {str(root)!r} is damaged: {name} has sha256 {actual}, the manifest "
                                 f"says {files[name]}")
            bar.update(1)
    finally:
        bar.close()
    return len(files)


# -- loading -----------------------------------------------------------------------------------------------
def load_corpus(root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                workers: int = 1) -> dict[str, list[Utterance]]:
    """``{"train", "val", "test"}`` -> utterances of a corpus folder: a synthetic corpus (``manifest.json``,
    see :func:`build_synth_corpus`) or an LJSpeech folder (``metadata.csv``, ``wavs/``, ``textgrids/``).

    A synthetic corpus loads from its packed splits when it has them (a fraction of a second for 6,500
    utterances), else file by file. LJSpeech features are computed (``workers`` processes) on the first load
    and cached in ``<root>/features`` if writable, else ``cache_dir`` (default: ``~/.cache/amlp/tts``).
    Checksums are not verified here (see :func:`verify_corpus`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder not found: {str(root)!r}")
    if (root / "manifest.json").is_file():
        return _load_synth(root, progress)
    if (root / "metadata.csv").is_file():
        return _load_ljspeech(root, cache_dir, progress, workers)
    if (root / "plan.json").is_file():
        raise FileNotFoundError(f"{str(root)!r} holds an unfinished synthetic corpus build (no manifest.json): run "
                                "the build again to finish it")
    raise FileNotFoundError(f"{str(root)!r} is not a corpus: expected manifest.json (a corpus built by `amlp data "
                            "synth-tts`) or metadata.csv with wavs/ and textgrids/ (LJSpeech)")


def _load_synth(root: Path, progress: bool) -> dict[str, list[Utterance]]:
    manifest = _read_manifest(root)
    splits = manifest.get("splits") or {}
    if set(splits) != set(SPLITS):
        raise ValueError(f"{str(root / 'manifest.json')!r}: splits {sorted(splits)}, expected {list(SPLITS)}")
    meta_path = root / "metadata.jsonl"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(meta_path)!r} is missing")
    texts = {}
    for line in meta_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts[row["id"]] = row["text"]
    out: dict[str, list[Utterance]] = {}
    packed = manifest.get("packed") and all((root / "packed" / f"{s}.npz").is_file() for s in SPLITS)
    total = sum(len(ids) for ids in splits.values())
    bar = _progress(total, 0, "loading corpus", progress and not packed and total > 500)
    try:
        for split in SPLITS:
            ids = list(splits[split])
            missing = [i for i in ids if i not in texts]
            if missing:
                raise ValueError(f"{str(meta_path)!r} has no row for {missing[0]}")
            if packed:
                out[split] = _unpack(root / "packed" / f"{split}.npz", ids, texts, root)
            else:
                utts = []
                for uid in ids:
                    path = root / "features" / f"{uid}.npz"
                    if not path.is_file():
                        raise FileNotFoundError(f"feature file missing: {str(path)!r} (rebuild or finish the corpus)")
                    utts.append(_utterance(uid, texts[uid], _read_npz(path), root / "wavs" / f"{uid}.wav", str(path)))
                    bar.update(1)
                out[split] = utts
    finally:
        bar.close()
    return out


def _unpack(path: Path, ids: list[str], texts: dict[str, str], root: Path) -> list[Utterance]:
    keys = ("ids", "frames", "n_phones", "mel", "durations", "pitch", "energy", "phones")
    data = _read_npz(path, keys)
    if [str(i) for i in data["ids"]] != ids:
        raise ValueError(f"{str(path)!r} does not hold the manifest's utterances of its split (rebuild the corpus)")
    frame_ends = np.cumsum(data["frames"])
    phone_ends = np.cumsum(data["n_phones"])
    if (frame_ends[-1:] != data["mel"].shape[0]).any() or (phone_ends[-1:] != data["durations"].shape[0]).any():
        raise ValueError(f"{str(path)!r} is inconsistent (rebuild the corpus)")
    phones = data["phones"].tolist()
    out = []
    for k, uid in enumerate(ids):
        f1, p1 = int(frame_ends[k]), int(phone_ends[k])
        f0, p0 = f1 - int(data["frames"][k]), p1 - int(data["n_phones"][k])
        arrays = {"mel": data["mel"][f0:f1], "durations": data["durations"][p0:p1], "pitch": data["pitch"][p0:p1],
                  "energy": data["energy"][p0:p1], "phones": phones[p0:p1]}
        out.append(_utterance(uid, texts[uid], arrays, root / "wavs" / f"{uid}.wav", f"{path}[{uid}]"))
    return out


# -- LJSpeech ----------------------------------------------------------------------------------------------
def _read_textgrid_phones(path: Path) -> tuple[list[str], list[float]]:
    """(labels, end times) of the ``phones`` interval tier of a TextGrid, gaps filled with ``""``."""
    try:
        from praatio import textgrid
    except ImportError as exc:
        raise ImportError("reading TextGrids needs the praatio package (pip install praatio)") from exc
    try:
        grid = textgrid.openTextgrid(str(path), includeEmptyIntervals=True, reportingMode="silence")
    except Exception as exc:  # praatio raises several kinds on malformed files
        raise ValueError(f"cannot read the TextGrid {str(path)!r}: {exc}") from exc
    if "phones" not in grid.tierNames:
        raise ValueError(f"{str(path)!r} has no tier named 'phones' (tiers: {', '.join(grid.tierNames) or 'none'})")
    tier = grid.getTier("phones")
    if getattr(tier, "tierType", None) != "IntervalTier":
        raise ValueError(f"{str(path)!r}: the 'phones' tier is not an interval tier")
    labels, ends, last = [], [], 0.0
    for start, end, label in sorted((float(e.start), float(e.end), str(e.label)) for e in tier.entries):
        if start > last + 1e-9:
            labels.append("")
            ends.append(start)
        labels.append(label.strip())
        ends.append(end)
        last = max(last, end)
    if not labels:
        raise ValueError(f"{str(path)!r}: the 'phones' tier is empty")
    return labels, ends


def _ljspeech_entries(root: Path) -> list[tuple[str, str]]:
    entries, seen = [], set()
    for number, line in enumerate((root / "metadata.csv").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 2 or not fields[0].strip():
            raise ValueError(f"{str(root / 'metadata.csv')!r} line {number}: expected 'id|text|normalized text'")
        uid = fields[0].strip()
        if uid in seen:
            raise ValueError(f"{str(root / 'metadata.csv')!r} line {number}: id {uid!r} appears twice")
        seen.add(uid)
        text = fields[2].strip() if len(fields) > 2 and fields[2].strip() else fields[1].strip()
        entries.append((uid, text))
    if not entries:
        raise ValueError(f"{str(root / 'metadata.csv')!r} lists no utterances")
    return entries


def _ljspeech_splits(root: Path, ids: list[str]) -> dict[str, list[str]]:
    path = root / "splits.json"
    if path.is_file():
        splits = json.loads(path.read_text())
        if not isinstance(splits, dict) or set(splits) != set(SPLITS):
            raise ValueError(f"{str(path)!r} must map exactly {list(SPLITS)} to lists of ids")
        known = set(ids)
        for split in SPLITS:
            unknown = [i for i in splits[split] if i not in known]
            if unknown:
                raise ValueError(f"{str(path)!r}: {split} id {unknown[0]!r} is not in metadata.csv")
        return {split: list(splits[split]) for split in SPLITS}
    n = len(ids)
    held = LJSPEECH_HELD_OUT if n >= 10 * LJSPEECH_HELD_OUT else n // 10
    return {"train": ids[:n - 2 * held], "val": ids[n - 2 * held:n - held], "test": ids[n - held:]}


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test"):
            pass
        return True
    except OSError:
        return False


def _ljspeech_cache(root: Path, cache_dir) -> Path:
    if _writable_dir(root / "features"):
        return root / "features"
    if cache_dir is None:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
        cache_dir = base / "amlp" / "tts" / f"{root.resolve().name}-{tag}"
    cache_dir = Path(cache_dir)
    if not _writable_dir(cache_dir):
        raise PermissionError(f"cannot write features to {str(root / 'features')!r} or to the cache folder "
                              f"{str(cache_dir)!r}: pass a writable cache_dir")
    return cache_dir


def _source_key(wav: Path, textgrid: Path) -> str:
    digest = hashlib.sha256(textgrid.read_bytes())
    digest.update(f"|{wav.stat().st_size}|{json.dumps(_audio_constants(), sort_keys=True)}".encode())
    return digest.hexdigest()


def _ljspeech_features(wav: str, textgrid: str, cache: str) -> str:
    """Compute and cache one LJSpeech utterance's features; returns the cache path."""
    wav, textgrid, cache = Path(wav), Path(textgrid), Path(cache)
    phones, ends = _read_textgrid_phones(textgrid)
    arrays = utterance_features(A.load_wav(wav), phones, ends)
    arrays["source"] = np.array(_source_key(wav, textgrid))
    _write_npz(cache, arrays)
    return str(cache)


def _cached(cache: Path, key: str) -> dict[str, np.ndarray] | None:
    if not cache.is_file():
        return None
    try:
        data = _read_npz(cache, FEATURE_KEYS + ("source",))
    except ValueError:
        return None
    return data if str(data["source"]) == key else None


def _load_ljspeech(root: Path, cache_dir, progress: bool, workers: int) -> dict[str, list[Utterance]]:
    wavs, grids = root / "wavs", root / "textgrids"
    for folder in (wavs, grids):
        if not folder.is_dir():
            raise FileNotFoundError(f"LJSpeech folder {str(root)!r} has metadata.csv but no {folder.name}/ folder "
                                    "(expected wavs/<id>.wav and textgrids/<id>.TextGrid with a 'phones' tier)")
    entries = _ljspeech_entries(root)
    texts = dict(entries)
    splits = _ljspeech_splits(root, [uid for uid, _ in entries])
    wanted = [uid for split in SPLITS for uid in splits[split]]
    unaligned = [uid for uid in wanted if not (grids / f"{uid}.TextGrid").is_file()]
    if len(unaligned) == len(wanted):
        raise FileNotFoundError(f"no TextGrids in {str(grids)!r} for the utterances of metadata.csv "
                                f"(expected e.g. {unaligned[0]}.TextGrid)")
    if unaligned:
        noun = "utterance" if len(unaligned) == 1 else "utterances"
        warnings.warn(f"{len(unaligned)} {noun} of {str(root)!r} have no TextGrid and are left out "
                      f"(e.g. {', '.join(unaligned[:3])})", stacklevel=3)
    skip = set(unaligned)
    for uid in wanted:
        if uid not in skip and not (wavs / f"{uid}.wav").is_file():
            raise FileNotFoundError(f"audio missing: {str(wavs / f'{uid}.wav')!r}")
    cache = _ljspeech_cache(root, cache_dir)
    keep = [uid for uid in wanted if uid not in skip]
    arrays: dict[str, dict[str, np.ndarray]] = {}
    stale = []
    for uid in keep:
        key = _source_key(wavs / f"{uid}.wav", grids / f"{uid}.TextGrid")
        data = _cached(cache / f"{uid}.npz", key)
        if data is None:
            stale.append(uid)
        else:
            arrays[uid] = data
    bar = _progress(len(keep), len(keep) - len(stale), "LJSpeech features", progress and bool(stale))
    jobs = [(str(wavs / f"{u}.wav"), str(grids / f"{u}.TextGrid"), str(cache / f"{u}.npz")) for u in stale]
    try:
        if workers <= 1 or len(jobs) < 2:
            for job in jobs:
                _ljspeech_features(*job)
                bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for _ in pool.map(_ljspeech_features, *zip(*jobs), chunksize=8):
                    bar.update(1)
    finally:
        bar.close()
    for uid in stale:
        arrays[uid] = _read_npz(cache / f"{uid}.npz")
    return {split: [_utterance(uid, texts[uid], arrays[uid], wavs / f"{uid}.wav", str(cache / f"{uid}.npz"))
                    for uid in splits[split] if uid not in skip] for split in SPLITS}
