"""The speech task end to end on the committed 3-utterance fixture: vocabulary and statistics, batches,
training FastSpeech 2 and Transformer-TTS, MCD/MSD in evaluation, checkpoints that carry their
inventory, synthesis of user text, the CLI's errors, and the study's grid and report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from amlp.cli import app
from amlp.tasks.tts.corpus import load_corpus
from amlp.tasks.tts.study import (TTSStudyConfig, load_tts_study, run_tts_study, site_overrides, study_cells,
                                  with_option)
from amlp.tasks.tts.task import VOCAB_FILE, TTSTask, TTSVocab, collate_utterances, synthesize_text
from amlp.train import load_config, run_experiment
from amlp.train.loop import evaluate_checkpoint, load_trained_model

FIXTURE = Path(__file__).parent / "fixtures" / "tts" / "synth3"
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _festival() -> bool:
    try:
        from amlp.tasks.tts.festival import check_festival

        check_festival()
        return True
    except RuntimeError:
        return False


needs_festival = pytest.mark.skipif(not shutil.which("festival") or not _festival(),
                                    reason="Festival with the slt voice is not installed "
                                           "(apt-get install festival festvox-us-slt-hts)")


def _config(arch: str, steps: int, **model):
    raw = {
        "task": "tts", "seed": 0,
        "data": {"corpus": str(FIXTURE), "max_frames_per_batch": 400, "griffin_lim_iters": 4},
        "model": {"arch": arch, "dim": 32, "heads": 2, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                  "dropout": 0.0, "variance_dim": 32, "postnet_layers": 2, "postnet_dim": 32, "prenet_dim": 32,
                  "encoder_prenet_layers": 1, "max_phones": 64, "max_frames": 256, **model},
        "train": {"optimizer": "adam", "lr": 3e-3, "max_steps": steps, "threads": 1, "progress": False,
                  "eval_every": steps, "checkpoint_every": steps // 2, "keep_last": 2, "precision": "fp32",
                  "test_checkpoint": "average", "average_last": 2},
    }
    return load_config(raw=raw)


# -- vocabulary, statistics, batches -------------------------------------------------------------------------
def test_vocab_statistics_and_inventory():
    corpus = load_corpus(FIXTURE)
    task = TTSTask(_config("fastspeech2", 2))
    vocab = task.vocab
    train = corpus["train"]
    mels = np.concatenate([u.mel for u in train])
    np.testing.assert_allclose(vocab.mel_mean, mels.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vocab.denormalise_mel(vocab.normalise_mel(train[0].mel)), train[0].mel, atol=1e-4)
    pitch = np.concatenate([u.pitch for u in train])
    assert vocab.pitch_mean == pytest.approx(float(pitch.mean()), rel=1e-6)
    # every split's phones are in the inventory; the statistics are the training split's alone
    for split in ("train", "val", "test"):
        for u in corpus[split]:
            assert len(vocab.encode(list(u.phones))) == len(u.phones)
    with pytest.raises(ValueError, match="not in the model's inventory"):
        vocab.encode(["pau", "no-such-phone"])


def test_vocab_round_trip(tmp_path):
    vocab = TTSTask(_config("fastspeech2", 2)).vocab
    (tmp_path / VOCAB_FILE).write_text(vocab.to_json())
    assert TTSVocab.load(tmp_path / VOCAB_FILE) == vocab
    with pytest.raises(FileNotFoundError, match="data.vocab"):
        TTSVocab.load(tmp_path / "missing.json")


def test_collate_pads_and_masks():
    task = TTSTask(_config("fastspeech2", 2))
    data = task.dataset("val")
    items = [task.dataset("train")[0], data[0]]
    batch = collate_utterances(items)
    n = [int(i["phones"].shape[0]) for i in items]
    t = [int(i["mel"].shape[0]) for i in items]
    assert batch["phone_mask"].sum(1).tolist() == n and batch["frame_mask"].sum(1).tolist() == t
    assert batch["durations"].sum(1).tolist() == t  # durations sum to the frames
    assert (batch["phones"][~batch["phone_mask"]] == 0).all()
    assert task.batches("train") == [[0]]


# -- training and evaluation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["fastspeech2", "transformer-tts"])
def test_train_evaluate_and_checkpoint(tmp_path, arch):
    torch.manual_seed(0)
    result = run_experiment(_config(arch, 60), tmp_path / "run")
    test = result.test_metrics
    for key in ("loss", "mel_l1", "mcd", "msd", "params"):
        assert np.isfinite(test[key]), (key, test)
    assert test["synth_utterances"] == 1
    # a distortion of the synthesis against the reference, not of the reference against itself
    assert test["mcd"] > 0 and test["msd"] > 0 and test["mel_l1"] > 0
    if arch == "fastspeech2":
        assert np.isfinite(test["baseline_mcd"]) and np.isfinite(test["baseline_msd"])
        assert test["baseline_mcd"] > 0 and test["baseline_mcd"] != test["mcd"]
        # the model saw this utterance only through the training one: it has learned durations at least
        assert test["mel_l1"] < 1.5
    ckpt = tmp_path / "run" / "checkpoints" / "averaged"
    assert (ckpt / VOCAB_FILE).is_file()
    # the checkpoint carries its inventory and statistics: evaluation does not recompute them
    metrics = evaluate_checkpoint(ckpt, "test", device="cpu")
    assert metrics["mcd"] == pytest.approx(test["mcd"], rel=1e-4)
    config, task, model = load_trained_model(ckpt, device="cpu")
    assert config.data.vocab == str(ckpt / VOCAB_FILE)


def test_fastspeech2_overfits_one_utterance(tmp_path):
    """Trained on its training utterance alone, FastSpeech 2 says it back better than the trivial
    baseline (the average frame repeated for the predicted duration) says it."""
    torch.manual_seed(0)
    cfg = _config("fastspeech2", 300, dim=64, ffn_dim=128, variance_dim=64)
    cfg.train.average_last = 1
    result = run_experiment(cfg, tmp_path / "run")
    task = TTSTask(cfg)
    config, _, model = load_trained_model(tmp_path / "run" / "checkpoints" / "averaged", device="cpu")
    model.eval()
    batch = collate_utterances([task.dataset("train")[0]])
    mel = task.synthesize_mels(model, batch["phones"], batch["phone_mask"])[0]
    reference = task.dataset("train").utterances[0].mel
    assert abs(mel.shape[0] - reference.shape[0]) <= 0.1 * reference.shape[0]
    from amlp.tasks.tts.metrics import mel_cepstral_distortion

    ref_audio = task.vocode(reference)
    mcd = mel_cepstral_distortion(ref_audio, task.vocode(mel))
    trivial = task.vocode(np.repeat(np.asarray(task.vocab.mel_mean, np.float32)[None], mel.shape[0], axis=0))
    assert mcd < 0.6 * mel_cepstral_distortion(ref_audio, trivial), mcd
    assert result.step == 300


# -- configuration errors ---------------------------------------------------------------------------------
def test_sites_a_mixer_cannot_serve_are_refused():
    with pytest.raises(ValueError, match="model.encoder_mixer"):
        _config("fastspeech2", 2, encoder_mixer="hyper-mlp")
    with pytest.raises(ValueError, match="model.decoder_mixer"):
        _config("transformer-tts", 2, decoder_mixer="amlp-pquery", decoder_options={"form": "official"})
    with pytest.raises(ValueError, match="model.cross_mixer"):
        _config("transformer-tts", 2, cross_mixer="local")
    with pytest.raises(ValueError, match="data.max_frames_per_batch"):
        load_config(raw={"task": "tts", "data": {"max_frames_per_batch": 0}})


def test_missing_corpus_is_a_clear_error(tmp_path):
    cfg = _config("fastspeech2", 2)
    cfg.data.corpus = str(tmp_path / "nowhere")
    with pytest.raises((ValueError, FileNotFoundError), match="nowhere"):
        TTSTask(cfg)


# -- synthesis of user text and the CLI ----------------------------------------------------------------------
def test_synthesize_rejects_what_festival_cannot_say(tmp_path):
    res = runner.invoke(app, ["synthesize", "Grüße aus Köln", "--checkpoint", str(tmp_path)])
    assert res.exit_code == 2 and "ü" in res.output
    res = runner.invoke(app, ["synthesize", "...", "--checkpoint", str(tmp_path)])
    assert res.exit_code == 2 and "no letters" in res.output
    res = runner.invoke(app, ["data", "synth-tts", "--train", "0", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--train" in res.output


@needs_festival
def test_synthesize_text_writes_audio(tmp_path):
    torch.manual_seed(0)
    run_experiment(_config("fastspeech2", 20), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "averaged"
    config, task, model = load_trained_model(ckpt, device="cpu")
    audio, phones = synthesize_text(task, model, "A dog in a car.")
    assert phones[0] == "pau" and audio.dtype == np.float32 and len(audio) > 0
    out = tmp_path / "dog.wav"
    res = runner.invoke(app, ["synthesize", "A dog in a car.", "--checkpoint", str(ckpt), "--output", str(out)])
    assert res.exit_code == 0, res.output
    import soundfile

    data, sr = soundfile.read(out)
    assert sr == 22050 and len(data) == len(audio)
    res = runner.invoke(app, ["synthesize", "A dog.", "--checkpoint", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "missing" in res.output


# -- the study ------------------------------------------------------------------------------------------
def test_study_grid_of_the_cpu_study():
    study = load_tts_study(ROOT / "configs" / "tts" / "study" / "cpu.yaml")
    study.validate()
    cells = study_cells(study)
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    # 11 rows, 2 more seeds for three rows, 4 rank values besides the row's own c = 64
    assert len(cells) == 11 + 3 * 2 + 4
    amlp = "fastspeech2/amlp-cov:form=official,landmarks=64,activation=relu"
    assert f"{amlp}/seed2" in keys and "fastspeech2/amlp-cov:form=official,landmarks=8,activation=relu/seed0" in keys
    assert with_option("amlp-cov:form=official,landmarks=64", "landmarks", 8) == "amlp-cov:form=official,landmarks=8"
    assert with_option("abc", "landmarks", 8) == "abc:landmarks=8"
    over = site_overrides(cells[-1].row)
    assert "model.encoder_mixer=amlp-cov" in over and "model.decoder_mixer=amlp-cov" in over
    tr = [c for c in cells if c.row.arch == "transformer-tts"][0]
    assert "model.cross_mixer=softmax" in site_overrides(tr.row)


def test_study_runs_a_cell_writes_a_report_and_refuses_the_doc(tmp_path):
    raw_cfg = _config("fastspeech2", 4).to_dict()
    (tmp_path / "fs2.yaml").write_text(json.dumps(raw_cfg))
    from amlp.train.config import from_dict

    study = from_dict(TTSStudyConfig, {"configs": {"fastspeech2": "fs2.yaml"},
                                       "rows": [{"arch": "fastspeech2", "mechanism": "softmax"},
                                                {"arch": "fastspeech2", "mechanism": "abc:landmarks=4"}],
                                       "run_root": "runs/study", "doc": "docs/tts.md", "wavs": 1,
                                       "latency": {"batch_sizes": [1], "utterances": 1}})
    logs = []
    report = run_tts_study(study, command="amlp study tts", rows=["fastspeech2/softmax"], root=tmp_path,
                           log=logs.append)
    results = json.loads((tmp_path / "runs/study/results.json").read_text())
    record = results["fastspeech2/softmax/seed0"]
    assert record["finished"] and np.isfinite(record["test"]["mcd"])
    assert Path(tmp_path / record["wavs"][0]).is_file()
    text = report.read_text()
    assert "| NAR | FS2 |" in text and "3.4748" in text and "trivial" in text
    # the second run skips the finished cell
    run_tts_study(study, command="amlp study tts", rows=["fastspeech2/softmax"], root=tmp_path, log=logs.append)
    assert any("done before" in line for line in logs)
    with pytest.raises(ValueError, match="abc:landmarks=4/seed0"):
        run_tts_study(study, command="amlp study tts", write_doc=True, doc_only=True, root=tmp_path)
    assert not (tmp_path / "docs" / "tts.md").exists()
