"""Character-level language modelling: the split, the vocabulary and the windows, the loss and bits per
character against hand computations, the matched-parameter rule for every causal mixer, checkpoints that
carry their vocabulary, exact resume, text generation from Python and from the CLI, and the configs."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from amlp.cli import app
from amlp.layers import mixer_names
from amlp.models.decoder import DecoderLM, greedy_decode_full
from amlp.tasks.lm import (CharVocab, EvalWindows, LMTask, TrainWindows, UnknownCharactersError, bits_per_char,
                           config_match_report, count_parameters, generate_text, lm_loss, match_params, split_text)
from amlp.tasks.lm.data import IGNORE_INDEX
from amlp.train import load_config, run_experiment
from amlp.train.checkpoint import load_checkpoint
from amlp.train.loop import load_trained_model

from conftest import chosen, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs" / "lm" / "cpu" / "softmax.yaml"
PAPER_DIR = ROOT / "configs" / "lm" / "paper"
SHAKESPEARE = Path(shared_data_dir()) / "tinyshakespeare" / "input.txt"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_text(n_lines=120, seed=0) -> str:
    rng = random.Random(seed)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    lines = []
    for _ in range(n_lines):
        name = rng.choice(["HAMLET", "OPHELIA"])
        lines.append(f"{name}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ".\n")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdata")
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(make_text())
    return root


def tiny_config(data_dir, *extra):
    return load_config(CPU_CONFIG, [f"data.data_dir={data_dir}", "data.seq_len=16", "model.dim=16", "model.heads=2",
                                    "model.n_layers=1", "model.match_params=null", "train.batch_size=4",
                                    "train.max_steps=3", "train.eval_every=0", "train.checkpoint_every=0",
                                    "train.warmup_steps=0", "train.progress=false", "train.threads=1", *extra])


# -- data ----------------------------------------------------------------------------------------------
def test_split_and_vocabulary_follow_the_90_10_protocol(data_dir):
    text = make_text()
    task = LMTask(tiny_config(data_dir))
    train, val = task.texts()
    n = int(0.9 * len(text))
    assert (train, val) == (text[:n], text[n:]) == split_text(text, 0.9)
    assert task.vocab.chars == "".join(sorted(set(train)))
    ids = task.vocab.encode("HAMLET: to be")
    assert task.vocab.decode(ids) == "HAMLET: to be" and task.vocab.encode_tensor("HAMLET: to be").tolist() == ids
    assert task.dataset("test") is None


def test_training_windows_are_every_contiguous_window():
    ids = torch.arange(10)
    data = TrainWindows(ids, 4)
    assert len(data) == 6
    assert data[0]["tokens"].tolist() == [0, 1, 2, 3] and data[0]["targets"].tolist() == [1, 2, 3, 4]
    assert data[5]["tokens"].tolist() == [5, 6, 7, 8] and data[5]["targets"].tolist() == [6, 7, 8, 9]
    with pytest.raises(IndexError):
        data[6]
    with pytest.raises(ValueError, match="seq_len"):
        TrainWindows(torch.arange(4), 4)


@pytest.mark.parametrize("n, L", [(11, 4), (13, 4), (5, 8), (2, 3)])
def test_validation_windows_predict_every_character_once(n, L):
    ids = torch.arange(100, 100 + n)
    data = EvalWindows(ids, L)
    assert len(data) == math.ceil((n - 1) / L)
    tokens, targets = [], []
    for i in range(len(data)):
        item = data[i]
        keep = item["targets"] != IGNORE_INDEX
        assert torch.equal(keep, item["mask"]) and item["tokens"].shape == (L,)
        assert keep[:int(keep.sum())].all()  # padding only on the right
        tokens += item["tokens"][keep].tolist()
        targets += item["targets"][keep].tolist()
    assert targets == ids[1:].tolist() and tokens == ids[:-1].tolist()


def test_unknown_characters_are_named():
    vocab = CharVocab.from_text("abc\n")
    with pytest.raises(UnknownCharactersError, match=r"'é' \(U\+00E9\), 'z'") as info:
        vocab.encode("abéz zé", "the prompt")
    assert info.value.chars == ["é", "z", " "] and "the prompt" in str(info.value)
    assert vocab.describe() == "'\\n', 'a', 'b', 'c'"
    assert CharVocab("".join(map(chr, range(65, 91)))).describe() == "'A'-'Z'"


# -- loss and bits per character -------------------------------------------------------------------------
def tiny_model(vocab=7, length=6, seed=0):
    torch.manual_seed(seed)
    return DecoderLM(vocab, length, dim=8, heads=2, n_layers=1, embed_init_std=1.0).double().eval()


def test_loss_is_the_mean_nll_by_hand():
    model = tiny_model()
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 2, 2]])
    targets = torch.tensor([[2, 3, 4, 5, 6, 0], [0, 1, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    with torch.no_grad():
        logits = model(tokens)
    by_hand, count = 0.0, 0
    for b in range(2):
        for t in range(6):
            y = int(targets[b, t])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, t]
            by_hand += float(torch.logsumexp(row, 0) - row[y])  # -log softmax(row)[y]
            count += 1
    assert count == 9
    expected = by_hand / count
    task = LMTask.__new__(LMTask)  # the task's loss is the same function of a batch
    with torch.no_grad():
        assert math.isclose(float(lm_loss(model, tokens, targets)), expected, rel_tol=1e-9)
        assert math.isclose(float(task.loss(model, {"tokens": tokens, "targets": targets})), expected, rel_tol=1e-9)
        assert math.isclose(float(lm_loss(model, tokens, targets, reduction="sum")), by_hand, rel_tol=1e-9)


def test_evaluation_reports_nll_and_bits_per_character(data_dir):
    cfg = tiny_config(data_dir)
    task = LMTask(cfg)
    torch.manual_seed(0)
    model = task.build_model().eval()
    val = task.dataset("val")
    loader = torch.utils.data.DataLoader(val, batch_size=3)
    with torch.no_grad():
        metrics = task.evaluate(model, loader)
        # by hand: every validation character but the first, predicted from its window
        ids = task.vocab.encode_tensor(task.texts()[1])
        total = 0.0
        for start in range(0, ids.numel() - 1, 16):
            chunk = ids[start:start + 17]
            logp = F.log_softmax(model(chunk[None, :-1]).double(), -1)[0]
            total -= float(logp.gather(1, chunk[1:, None]).sum())
    assert metrics["chars"] == ids.numel() - 1
    assert math.isclose(metrics["loss"], total / (ids.numel() - 1), rel_tol=1e-5)
    assert math.isclose(metrics["bpc"], metrics["loss"] / math.log(2), rel_tol=1e-12)
    assert math.isclose(bits_per_char(math.log(2) * 1.5), 1.5)
    assert metrics["params"] == model.num_parameters()


# -- the matched-parameter rule ---------------------------------------------------------------------------
def options_for(mixer, length):
    opts = chosen(mixer)
    if mixer.startswith("hyper"):
        opts["max_lag"] = length
    if mixer in ("gmlp", "cosformer"):
        opts["max_length"] = length
    return opts


@pytest.mark.parametrize("target", [250_000, 600_000])
def test_matched_parameter_rule_holds_for_every_causal_mixer(target):
    seen = set()
    for mixer in mixer_names(causal=True):
        opts = options_for(mixer, 32)
        r = match_params(target, vocab_size=40, max_length=32, dim=128, heads=2, n_layers=1, mixer=mixer,
                         mixer_options=opts)
        assert abs(r.params / target - 1) <= 0.02, r.describe()
        if r.by == "qk_rank":
            opts = {**opts, "qk_rank": r.value}
        built = DecoderLM(40, 32, dim=r.dim, heads=2, n_layers=1, mixer=mixer, mixer_options=opts)
        assert built.num_parameters() == r.params, mixer  # the meta count is the real one
        seen.add(r.by)
    assert "dim" in seen


def test_rule_searches_the_qk_rank_where_the_mixer_has_one_and_leaves_the_rng_alone():
    base = count_parameters(40, 32, dim=128, heads=2, n_layers=1, mixer="hyper-mlp", mixer_options={"max_lag": 32})
    state = torch.get_rng_state()
    r = match_params(int(base * 0.97), vocab_size=40, max_length=32, dim=128, heads=2, n_layers=1,
                     mixer="hyper-mlp", mixer_options={"max_lag": 32})
    assert torch.equal(torch.get_rng_state(), state)
    assert r.by == "qk_rank" and r.dim == 128 and abs(r.deviation) <= 0.02 and r.value % 2 == 0
    # a rank fixed in the options leaves only the width
    fixed = match_params(int(base * 0.97), vocab_size=40, max_length=32, dim=128, heads=2, n_layers=1,
                         mixer="hyper-mlp", mixer_options={"max_lag": 32, "qk_rank": 32})
    assert fixed.by == "dim"
    # too coarse a width: the MLP's hidden width settles the rest
    coarse = match_params(10_000, vocab_size=40, max_length=32, dim=16, heads=16, n_layers=1, mixer="softmax")
    assert coarse.dim == 16 and coarse.mlp_hidden is not None and abs(coarse.deviation) <= 0.02
    assert count_parameters(40, 32, dim=16, heads=16, n_layers=1, mixer="softmax",
                            mlp_ratio=coarse.mlp_hidden / 16) == coarse.params
    with pytest.raises(ValueError, match="within 2 %"):  # smaller than the embeddings alone
        match_params(100, vocab_size=40, max_length=32, dim=16, heads=2, n_layers=1, mixer="softmax")


def test_match_report_for_the_cpu_config(tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_bytes(CharVocab("".join(chr(c) for c in range(32, 97))).to_json())  # 65 characters
    cfg = load_config(CPU_CONFIG, [f"data.vocab={vocab}"])
    results = config_match_report(cfg)
    assert [r.mixer for r in results] == mixer_names(causal=True)
    assert all(abs(r.deviation) <= 0.02 for r in results)
    assert next(r for r in results if r.mixer == "softmax").dim == 128


# -- checkpoints, resume, generation ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("lmrun") / "run"
    cfg = tiny_config(data_dir, "model.match_params=6000", "model.match_tolerance=0.05", "train.max_steps=4")
    result = run_experiment(cfg, run)
    return run / "checkpoints" / "best", result


def test_a_checkpoint_carries_its_vocabulary_and_the_matched_size(trained, data_dir, tmp_path):
    best, result = trained
    record = json.loads((best / "vocab.json").read_text())
    train_text = split_text(make_text(), 0.9)[0]
    assert record["chars"] == "".join(sorted(set(train_text)))
    assert record["matched"]["by"] == "dim" and record["matched"]["target"] == 6000
    assert result.val_metrics["matched_dim"] == record["matched"]["value"]
    assert result.val_metrics["params"] == record["matched"]["params"]
    assert math.isclose(result.val_metrics["bpc"], result.val_metrics["loss"] / math.log(2))
    # the checkpoint is enough: no text file needed to load it and generate
    moved = tmp_path / "ckpt"
    shutil.copytree(best, moved)
    config, task, model = load_trained_model(moved, [f"data.data_dir={tmp_path / 'nowhere'}"], "cpu")
    assert task.vocab.chars == record["chars"] and model.dim == record["matched"]["dim"]
    out = generate_text(moved, "HAMLET:", 9, temperature=0)  # 16 characters in all: the model's positions
    again = generate_text(model, "HAMLET:", 9, temperature=0, vocab=task.vocab)
    assert out.text == again.text and len(out.text) == 9 and out.full.startswith("HAMLET:")
    ids = torch.tensor([task.vocab.encode("HAMLET:")])
    assert task.vocab.decode(greedy_decode_full(model, ids, 9)[0]) == out.text
    assert len(generate_text(model, "HAMLET:", 40, vocab=task.vocab, seed=0).text) == 40  # past them too
    streamed = []
    sampled = generate_text(model, "to be", 20, temperature=1.0, top_k=5, seed=3, vocab=task.vocab,
                            stream=streamed.append)
    assert "".join(streamed) == sampled.text
    assert generate_text(model, "to be", 20, temperature=1.0, top_k=5, seed=3, vocab=task.vocab).text == sampled.text
    with pytest.raises(UnknownCharactersError, match="'Z'"):
        generate_text(moved, "HAMLET Z", 5)


def test_resume_continues_exactly(data_dir, tmp_path):
    whole = run_experiment(tiny_config(data_dir, "train.max_steps=4", "train.checkpoint_every=2"), tmp_path / "a")
    first = tiny_config(data_dir, "train.max_steps=2", "train.checkpoint_every=2")
    run_experiment(first, tmp_path / "b")
    seen = []
    run_experiment(tiny_config(data_dir, "train.max_steps=4", "train.checkpoint_every=2"), tmp_path / "b",
                   resume=True, on_step_end=lambda trainer, step, loss: seen.append(step))
    assert seen == [3, 4]  # continued after step 2, not started again
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000004").model
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000004").model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.val_metrics["loss"] == pytest.approx(
        json.loads((tmp_path / "b" / "results.json").read_text())["val"]["loss"], rel=0, abs=0)


def test_cli_generate_streams_text_and_names_unknown_characters(trained):
    best, _ = trained
    runner = CliRunner()
    ok = runner.invoke(app, ["generate", "--checkpoint", str(best), "--prompt", "HAMLET:", "--max-new-tokens", "15",
                             "--temperature", "0", "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("HAMLET:") and len(ok.stdout.rstrip("\n")) >= len("HAMLET:") + 14
    assert "tokens/s" in ok.stderr
    again = runner.invoke(app, ["generate", "--checkpoint", str(best), "--prompt", "HAMLET:", "-n", "15",
                                "--temperature", "0"])
    assert again.stdout == ok.stdout
    expected = generate_text(best, "HAMLET:", 15, temperature=0).text
    assert ok.stdout.startswith("HAMLET:" + expected)
    bad = runner.invoke(app, ["generate", "--checkpoint", str(best), "--prompt", "HAMLET ß9"])
    assert bad.exit_code == 2
    assert "outside the model's vocabulary" in bad.output and "'ß' (U+00DF)" in bad.output and "'9'" in bad.output
    assert "Traceback" not in bad.output
    for args, needle in [(["--top-p", "1.5"], "--top-p"), (["--temperature", "-1"], "--temperature"),
                         (["--top-k", "0"], "--top-k")]:
        res = runner.invoke(app, ["generate", "--checkpoint", str(best), *args])
        assert res.exit_code == 2 and needle in res.output
    missing = runner.invoke(app, ["generate", "--checkpoint", "/nowhere/at/all"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output


# -- the configs and the real data --------------------------------------------------------------------------
def test_paper_configs_follow_nanogpt_shakespeare_char():
    paths = sorted(PAPER_DIR.glob("*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(path)
        m, d, t = cfg.model, cfg.data, cfg.train
        assert (m.n_layers, m.dim, m.heads, d.seq_len, t.batch_size) == (6, 384, 6, 256, 64), path.name
        assert m.match_params is not None and m.dropout == 0.2
        opts = {**m.options, **({"max_length": 256} if m.mixer in ("gmlp", "cosformer") else {})}
        r = match_params(m.match_params, vocab_size=65, max_length=256, dim=m.dim, heads=m.heads,
                         n_layers=m.n_layers, mixer=m.mixer, block=m.block, mlp_ratio=m.mlp_ratio, mixer_options=opts)
        assert abs(r.deviation) <= 0.02
    cpu = load_config(CPU_CONFIG)
    assert cpu.train.threads == 1 and cpu.model.match_params is not None


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tiny Shakespeare is not in the shared data folder")
def test_tiny_shakespeare_split_and_vocabulary():
    cfg = load_config(CPU_CONFIG, [f"data.data_dir={SHAKESPEARE.parent.parent}"])
    task = LMTask(cfg)
    train, val = task.texts()
    assert (len(train), len(val)) == (1003854, 111540)
    assert len(task.vocab) == 65 and task.vocab.chars[:2] == "\n "
    assert len(task.dataset("val")) == math.ceil(111539 / cfg.data.seq_len)
    assert len(task.dataset("train")) == 1003854 - cfg.data.seq_len


def test_cli_eval_defaults_to_the_validation_text(trained):
    best, result = trained
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(best), "--threads", "1"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["split"] == "val" and record["bpc"] == pytest.approx(record["loss"] / math.log(2))
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(best), "--split", "test"])
    assert res.exit_code == 1 and "has no 'test' split; it has train, val" in res.stderr
