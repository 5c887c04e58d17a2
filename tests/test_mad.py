"""The MAD suite: every docstring example, determinism and disjoint splits, each task's targets
against its definition on random draws, shapes and masks, the configs, the compression model, the
scoring, and a tiny model that learns through the training loop."""

import doctest
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import amlp.tasks.mad.data as mad_data
from amlp.models.decoder import DecoderLM
from amlp.tasks.mad import (IGNORE_INDEX, MAD_DIFFICULTY, MAD_TASK_NAMES, MAD_TASKS, MAD_TRAIN_EXAMPLES,
                            CompressionAutoencoder, CompressionSettings, FuzzyInContextRecallSettings,
                            InContextRecallSettings, MADDataset, MemorizationSettings, NoisyInContextRecallSettings,
                            SelectiveCopyingSettings, compression, example_rng, fuzzy_in_context_recall, generate,
                            in_context_recall, mad_benchmark_grid, mad_score, make_settings, memorization,
                            memorization_map, noisy_in_context_recall, selective_copying)
from amlp.tasks.mad.model import decoder_states
from amlp.train import load_config, run_experiment
from amlp.train import tasks as train_tasks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "mad"


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """The loop finds tasks in TASKS; make sure "mad" is there."""
    monkeypatch.setitem(train_tasks.TASKS, "mad", "amlp.tasks.mad.task:MADTask")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _full(ex):
    """The whole sequence of a recall example (its inputs, then the last target)."""
    return ex.inputs.tolist() + [int(ex.targets[-1])]


def _batch(data, start, stop):
    return default_collate([data[i] for i in range(start, stop)])


def _draws(task, settings, n=200, seed=0, train=True):
    return [generate(task, settings, example_rng(seed, "train", i), train=train) for i in range(n)]


# -- docstring examples ---------------------------------------------------------------------------------
def test_every_docstring_example_is_reproduced():
    result = doctest.testmod(mad_data, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    for _, fn in MAD_TASKS.values():  # each generator carries a worked example
        assert ">>> " in fn.__doc__, fn.__name__
    assert result.attempted >= 6 * 3


def test_docstring_examples_by_hand():
    ex = in_context_recall(InContextRecallSettings(vocab_size=6, seq_len=10), np.random.default_rng(3))
    assert _full(ex) == [2, 5, 0, 3, 0, 3, 0, 3, 2, 5]
    assert ex.targets.tolist() == _full(ex)[1:] and np.flatnonzero(ex.scored).tolist() == [4, 6, 8]
    ex = noisy_in_context_recall(NoisyInContextRecallSettings(8, 10, 4, 0.5), np.random.default_rng(7))
    assert _full(ex) == [7, 4, 1, 3, 1, 3, 5, 5, 1, 3] and np.flatnonzero(ex.scored).tolist() == [4, 8]
    ex = fuzzy_in_context_recall(FuzzyInContextRecallSettings(9, 14, 2, 2), np.random.default_rng(1))
    assert _full(ex) == [8, 0, 5, 2, 5, 1, 0, 5, 7, 1, 0, 5, 7, 0, 5]
    assert np.flatnonzero(ex.scored).tolist() == [10, 11, 13]
    ex = selective_copying(SelectiveCopyingSettings(6, 10, 3), np.random.default_rng(2))
    assert ex.inputs.tolist() == [3, 4, 1, 4, 0, 4, 5, 4, 4, 4]
    assert ex.targets.tolist() == [IGNORE_INDEX] * 7 + [3, 1, 0]
    ex = compression(CompressionSettings(5, 6), np.random.default_rng(0))
    assert ex.inputs.tolist() == ex.targets.tolist() == [3, 2, 2, 1, 1, 4] and ex.scored.all()
    s = MemorizationSettings(vocab_size=9, seq_len=8, map_seed=0)
    assert memorization_map(s).tolist() == [6, 4, 5, 7]
    ex = memorization(s, np.random.default_rng(0))
    assert ex.inputs.tolist() == [3, 8, 2, 8, 2, 8, 1, 8]
    assert ex.targets.tolist() == [IGNORE_INDEX, 7, IGNORE_INDEX, 5, IGNORE_INDEX, 5, IGNORE_INDEX, 4]


# -- MAD's settings ---------------------------------------------------------------------------------------
def test_defaults_are_mads_baseline_settings():
    assert make_settings("in-context-recall") == InContextRecallSettings(16, 128)
    assert make_settings("fuzzy-in-context-recall") == FuzzyInContextRecallSettings(16, 128, 3, 3)
    assert make_settings("noisy-in-context-recall") == NoisyInContextRecallSettings(32, 128, 16, 0.2)
    assert make_settings("selective-copying") == SelectiveCopyingSettings(16, 256, 16)
    assert make_settings("compression") == CompressionSettings(16, 32)
    assert make_settings("memorization") == MemorizationSettings(256, 32, 12345)
    assert MAD_TRAIN_EXAMPLES == {t: 256 if t == "memorization" else 12_800 for t in MAD_TASK_NAMES}
    grid = mad_benchmark_grid("in-context-recall")
    assert len(grid) == 1 + 3 + 3 + 4 and grid[0] == {"vocab_size": 16, "seq_len": 128, "train_examples": 12_800}
    assert {"vocab_size": 16, "seq_len": 1024, "train_examples": 12_800} in grid
    for task in MAD_TASK_NAMES:  # every setting of the grid is valid
        for values in mad_benchmark_grid(task):
            make_settings(task, **{k: v for k, v in values.items() if k != "train_examples"})
    assert set(MAD_DIFFICULTY) == set(MAD_TASK_NAMES)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="'seq_len' must be even"):
        InContextRecallSettings(seq_len=11)
    with pytest.raises(ValueError, match="'seq_len' must be an int >= 34"):
        SelectiveCopyingSettings(seq_len=33, num_tokens_to_copy=16)
    with pytest.raises(ValueError, match="'vocab_size'"):
        FuzzyInContextRecallSettings(vocab_size=6, k_motif_size=3)
    with pytest.raises(ValueError, match="'frac_noise'"):
        NoisyInContextRecallSettings(frac_noise=1.0)
    with pytest.raises(ValueError, match="'frac_noise' is not a setting of compression"):
        make_settings("compression", frac_noise=0.1)
    with pytest.raises(ValueError, match="unknown MAD task"):
        make_settings("copying")


def test_mad_score_is_the_mean_over_the_six_tasks():
    accs = {t: i / 10 for i, t in enumerate(MAD_TASK_NAMES)}
    assert mad_score(accs) == pytest.approx(np.mean([0.0, 0.1, 0.2, 0.3, 0.4, 0.5]))
    with pytest.raises(ValueError, match="missing"):
        mad_score({t: 1.0 for t in MAD_TASK_NAMES[:5]})
    with pytest.raises(ValueError, match="unknown"):
        mad_score({**accs, "copying": 1.0})


# -- determinism, splits, shapes ------------------------------------------------------------------------------
SMALL = {"in-context-recall": {"seq_len": 32}, "fuzzy-in-context-recall": {"seq_len": 32},
         "noisy-in-context-recall": {"seq_len": 32, "frac_noise": 0.4}, "selective-copying": {"seq_len": 40},
         "compression": {}, "memorization": {}}


@pytest.mark.parametrize("task", MAD_TASK_NAMES)
def test_generators_are_deterministic_and_well_shaped(task):
    settings = make_settings(task, **SMALL[task])
    T, V = settings.input_length, settings.vocab_size
    for i in range(50):
        a = generate(task, settings, np.random.default_rng(i))
        b = generate(task, settings, np.random.default_rng(i))
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
        assert a.inputs.shape == a.targets.shape == a.scored.shape == (T,)
        assert a.inputs.dtype == a.targets.dtype == np.int64 and a.scored.dtype == bool
        assert ((a.inputs >= 0) & (a.inputs < V)).all()
        has_target = a.targets != IGNORE_INDEX
        assert (a.scored <= has_target).all() and a.scored.any()
        assert ((a.targets[has_target] >= 0) & (a.targets[has_target] < V)).all()
    for i in range(20):  # another seed, another example
        assert not np.array_equal(generate(task, settings, np.random.default_rng(i)).inputs,
                                  generate(task, settings, np.random.default_rng(i + 1000)).inputs)


@pytest.mark.parametrize("task", MAD_TASK_NAMES)
def test_datasets_are_deterministic_and_splits_disjoint(task):
    settings = make_settings(task, **SMALL[task])
    train = MADDataset(task, settings, 64, seed=5, split="train")
    again = MADDataset(task, settings, 64, seed=5, split="train")
    assert torch.equal(train.tokens, again.tokens) and torch.equal(train.targets, again.targets)
    assert torch.equal(train.scored, again.scored)
    item = train[3]
    assert set(item) == {"tokens", "targets", "scored"} and item["tokens"].shape == (settings.input_length,)
    rows = {tuple(r) for r in train.tokens.tolist()}
    for split, seed in (("val", 5), ("test", 5), ("val", 4), ("test", 3)):  # other splits, also of other seeds
        other = MADDataset(task, settings, 64, seed=seed, split=split)
        assert not rows & {tuple(r) for r in other.tokens.tolist()}
    with pytest.raises(IndexError):
        train[64]
    # the seeds themselves: (seed, split, index) never repeats across splits
    a = example_rng(5, "train", 0).integers(1 << 62, size=4)
    assert not np.array_equal(a, example_rng(4, "val", 0).integers(1 << 62, size=4))
    assert not np.array_equal(a, example_rng(5, "val", 0).integers(1 << 62, size=4))


# -- each task's definition on random draws --------------------------------------------------------------------
def _check_pair_recall(ex, n_tokens, vocab_size):
    full = _full(ex)
    n_keys = n_tokens // 2
    table, seen, expected = {}, set(), []
    for q in range(0, len(full), 2):
        k, v = full[q], full[q + 1]
        if k >= n_tokens:  # a noise slot: two noise tokens, never scored
            assert n_tokens <= v < vocab_size
            expected.append(False)
            continue
        assert 0 <= k < n_keys and n_keys <= v < n_tokens
        assert table.setdefault(k, v) == v  # a key keeps its value within the sequence
        expected.append(k in seen)
        seen.add(k)
    scored_at = np.flatnonzero(ex.scored).tolist()
    # scored: the input positions showing a key that appeared earlier; the target is its value
    assert scored_at == [q for q, e in zip(range(0, len(full), 2), expected) if e]
    for p in scored_at:
        earlier = [q for q in range(0, p, 2) if full[q] == full[p]]
        assert earlier and all(full[q + 1] == ex.targets[p] for q in earlier)
    assert ex.scored[-1] and ex.targets.tolist() == full[1:]  # the final query; every next token is a target


def test_in_context_recall_answers_are_the_values_paired_earlier():
    settings = InContextRecallSettings(vocab_size=16, seq_len=64)
    for ex in _draws("in-context-recall", settings):
        _check_pair_recall(ex, 16, 16)


def test_noisy_recall_skips_noise_and_answers_from_the_pairs():
    settings = NoisyInContextRecallSettings(vocab_size=32, seq_len=64, noise_vocab_size=16, frac_noise=0.3)
    noise_slots = total = 0
    for ex in _draws("noisy-in-context-recall", settings, n=400):
        _check_pair_recall(ex, 16, 32)
        slots = np.array(_full(ex)[:-2:2])
        noise_slots += int((slots >= 16).sum())
        total += slots.size
    assert noise_slots / total == pytest.approx(0.3, abs=0.03)


def _runs(tokens, is_key):
    """Maximal runs of key tokens and of value tokens, as (kind, tuple)."""
    out = []
    for t in tokens:
        kind = "k" if is_key(t) else "v"
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + (t,))
        else:
            out.append((kind, (t,)))
    return out


@pytest.mark.parametrize("train", [True, False])
def test_fuzzy_recall_answers_are_the_multi_token_values_paired_earlier(train):
    settings = FuzzyInContextRecallSettings()  # vocabulary 16: key tokens 0-6, value tokens 7-14, pad 15
    key_sizes = set()
    for ex in _draws("fuzzy-in-context-recall", settings, n=100, train=train):
        full = _full(ex)
        pad = next(i for i, t in enumerate(full) if t != 15)
        assert pad >= 1 and 15 not in full[pad:]
        runs = _runs(full[pad:], lambda t: t < 7)
        assert len(runs) % 2 == 0 and [kind for kind, _ in runs] == ["k", "v"] * (len(runs) // 2)
        table, seen, expected = {}, set(), []
        for (_, key), (_, value) in zip(runs[::2], runs[1::2]):
            assert 1 <= len(key) <= 3 and len(set(key)) == len(key)
            assert 1 <= len(value) <= 3 and len(set(value)) == len(value)
            assert table.setdefault(key, value) == value
            expected += [False] * len(key) + [key in seen] * len(value)
            seen.add(key)
            key_sizes.add(len(key))
        assert expected[-1] and runs[-2][1] in [k for _, k in runs[:-2:2]]  # the final query was shown before
        assert ex.scored.tolist() == ([False] * pad + expected)[1:]
        assert ex.targets.tolist() == full[1:]
    assert key_sizes == ({1, 2, 3} if train else {3})


def test_selective_copying_targets_are_the_non_noise_tokens_in_order():
    settings = SelectiveCopyingSettings(vocab_size=16, seq_len=64, num_tokens_to_copy=8)
    for ex in _draws("selective-copying", settings):
        x = ex.inputs.tolist()
        region = 64 - 8 - 1
        assert x[region] == 15 and x[region + 1:] == [14] * 8
        kept = [t for t in x[:region] if t != 14]
        assert len(kept) == 8 and all(0 <= t < 14 for t in kept)
        assert ex.targets[region + 1:].tolist() == kept
        assert (ex.targets[:region + 1] == IGNORE_INDEX).all()
        assert np.flatnonzero(ex.scored).tolist() == list(range(region + 1, 64))


def test_compression_target_is_the_input_reconstructed():
    settings = CompressionSettings()
    for ex in _draws("compression", settings):
        assert np.array_equal(ex.targets, ex.inputs) and ex.scored.all()
        assert ex.inputs[-1] == 15 and (ex.inputs[:-1] < 15).all()


def test_memorization_follows_one_fixed_map():
    settings = MemorizationSettings()
    table = memorization_map(settings)
    assert len(table) == 127 and len(set(table.tolist())) == 127 and table.min() >= 127 and table.max() <= 254
    assert np.array_equal(table, memorization_map(MemorizationSettings(seq_len=64)))  # the map: vocab + seed only
    assert not np.array_equal(table, memorization_map(MemorizationSettings(map_seed=1)))
    for split in ("train", "test"):
        for i in range(100):
            ex = generate("memorization", settings, example_rng(9, split, i))
            keys = ex.inputs[0::2]
            assert (ex.inputs[1::2] == 255).all() and (keys < 127).all()
            assert np.array_equal(ex.targets[1::2], table[keys]) and (ex.targets[0::2] == IGNORE_INDEX).all()
            assert np.array_equal(ex.scored, ex.targets != IGNORE_INDEX)


# -- configs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "cpu").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_configs_load_and_name_their_task(path):
    cfg = load_config(path)
    assert cfg.task == "mad" and cfg.data.task == path.stem
    assert path.read_text().startswith("#")  # a header comment says what the protocol is
    settings = cfg.data.settings()
    assert cfg.model.max_length in (None, settings.input_length)
    if path.parent == CONFIGS:  # the GPU protocol runs MAD's baseline setting
        assert settings == make_settings(path.stem)
        assert cfg.data.train_size == MAD_TRAIN_EXAMPLES[path.stem] and cfg.data.test_examples == 1280
    for name, opts in cfg.model.mixer_options.items():  # position-bound mixers cover the input
        for key in ("max_lag", "max_length"):
            if key in opts:
                assert opts[key] >= settings.input_length, (name, key)


def test_all_six_tasks_have_both_configs():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(MAD_TASK_NAMES)
    assert sorted(p.stem for p in (CONFIGS / "cpu").glob("*.yaml")) == sorted(MAD_TASK_NAMES)


def test_config_errors_name_the_key():
    path = CONFIGS / "cpu" / "compression.yaml"
    with pytest.raises(ValueError, match="'data.frac_noise' is not a setting of compression"):
        load_config(path, ["data.frac_noise=0.3"])
    with pytest.raises(ValueError, match="'data.vocab_size'"):
        load_config(path, ["data.vocab_size=1"])
    with pytest.raises(ValueError, match="'data.task' must be one of"):
        load_config(path, ["data.task=copying"])
    with pytest.raises(ValueError, match="'data.val_examples'"):
        load_config(path, ["data.val_examples=0"])
    cfg = load_config(path, ["data.task=memorization", "data.seq_len=null", "data.vocab_size=null",
                             "data.train_examples=null"])
    assert cfg.data.settings() == make_settings("memorization") and cfg.data.train_size == 256


# -- the compression model ------------------------------------------------------------------------------------
def test_decoder_states_are_what_the_head_reads():
    torch.manual_seed(0)
    lm = DecoderLM(7, 10, dim=16, heads=2, n_layers=2).double().eval()
    tokens = torch.randint(0, 7, (3, 9))
    torch.testing.assert_close(lm.head(decoder_states(lm, tokens)), lm(tokens))


@pytest.mark.parametrize("mixer", ["softmax", "causal-rn"])
def test_compression_autoencoder_decodes_every_position_from_the_last_token(mixer):
    torch.manual_seed(0)
    lm = DecoderLM(6, 8, dim=16, heads=1, n_layers=2, mixer=mixer).double()
    model = CompressionAutoencoder(lm, 8).double().eval()
    tokens = torch.randint(0, 5, (4, 8))
    tokens[:, -1] = 5
    out = model(tokens)
    assert out.shape == (4, 8, 6)
    # the logits are a function of the code alone; changing the first token changes the code, hence every position
    code = decoder_states(lm, tokens)[:, -1]
    torch.testing.assert_close(out, lm.head(model.decoder(code[:, None] + model.decode_positions.double())))
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 5
    assert (model(changed) - out).abs().amax(dim=-1).min() > 0
    assert model.num_parameters() > lm.num_parameters() and model.state_size(8) == lm.state_size(8)


# -- the task -----------------------------------------------------------------------------------------------------
def _task(task="memorization", extra=()):
    from amlp.tasks.mad.task import MADTask

    cfg = load_config(CONFIGS / "cpu" / f"{task}.yaml", ["model.dim=16", "data.train_examples=64",
                                                          "data.val_examples=32", "data.test_examples=32", *extra])
    return MADTask(cfg)


class _Oracle(torch.nn.Module):
    """Memorization answered from the map: at an insert token, the value of the key before it."""

    def __init__(self, table, vocab, wrong_keys=()):
        super().__init__()
        self.table, self.vocab, self.wrong = torch.as_tensor(table.copy()), vocab, set(wrong_keys)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def num_parameters(self):
        return 1

    def state_size(self, length):
        return None

    def forward(self, tokens):
        prev = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1).clamp_max(len(self.table) - 1)
        answer = self.table[prev]
        for k in self.wrong:
            answer = torch.where(prev == k, torch.full_like(answer, self.vocab - 1), answer)
        return torch.nn.functional.one_hot(answer, self.vocab).float() * 30 + self.w


def test_evaluate_scores_accuracy_on_the_scored_positions():
    task = _task()
    table = memorization_map(task.settings)
    batches = [_batch(task.dataset("test"), i, i + 8) for i in range(0, 32, 8)]
    with torch.no_grad():  # as the loop evaluates
        perfect = task.evaluate(_Oracle(table, task.settings.vocab_size), batches)
        wrong = task.evaluate(_Oracle(table, task.settings.vocab_size, wrong_keys=(0, 1)), batches)
    assert perfect["acc"] == 1.0 and perfect["acc_macro"] == 1.0 and perfect["loss"] < 1e-3
    assert np.isnan(perfect["state_size"]) and perfect["params"] == 1.0
    # wrong on every query of key 0 and 1: acc is the fraction of other queries; per-token accuracy 0 there
    keys = task.dataset("test").tokens[:, 0::2]
    assert wrong["acc"] == pytest.approx(float((keys > 1).float().mean()))
    targets = task.dataset("test").targets[:, 1::2]
    present = targets.unique()
    assert wrong["acc_macro"] == pytest.approx(float(sum(int(v) not in (table[0], table[1]) for v in present))
                                               / len(present))


def test_loss_on_scored_ignores_the_other_targets():
    task = _task("in-context-recall", ["data.seq_len=16"])
    scored_task = _task("in-context-recall", ["data.seq_len=16", "data.loss_on=scored"])
    torch.manual_seed(0)
    model = task.build_model()
    batch = _batch(task.dataset("train"), 0, 8)
    assert torch.equal(batch["tokens"], _batch(scored_task.dataset("train"), 0, 8)["tokens"])
    logits = model(batch["tokens"])
    s = batch["scored"]
    expected = torch.nn.functional.cross_entropy(logits[s], batch["targets"][s])
    torch.testing.assert_close(scored_task.loss(model, batch), expected)
    torch.testing.assert_close(task.loss(model, batch), torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1)))


def test_compression_task_builds_the_autoencoder():
    task = _task("compression", ["data.seq_len=8"])
    model = task.build_model()
    assert isinstance(model, CompressionAutoencoder)
    batch = _batch(task.dataset("val"), 0, 16)
    with torch.no_grad():
        metrics = task.evaluate(model.eval(), [batch])
        logits = model(batch["tokens"])
    # the accuracy of the autoencoder's own reconstruction at the scored positions
    s = batch["scored"]
    assert metrics["acc"] == pytest.approx((logits[s].argmax(-1) == batch["targets"][s]).double().mean().item())
    assert metrics["params"] == model.num_parameters()


def test_a_tiny_model_learns_memorization_through_the_loop(tmp_path):
    cfg = load_config(CONFIGS / "cpu" / "memorization.yaml", [
        "data.vocab_size=17", "data.seq_len=8", "data.train_examples=256", "data.val_examples=64",
        "data.test_examples=128", "model.dim=32", "model.n_layers=1", "train.batch_size=32", "train.max_steps=150",
        "train.lr=3e-3", "train.warmup_steps=10", "train.eval_every=0", "train.checkpoint_every=0",
        "train.keep_best=false", "train.progress=false"])
    result = run_experiment(cfg, tmp_path / "mem")
    chance = 1 / 8  # 8 keys, each with one of 8 values
    assert result.test_metrics["acc"] > 0.9 > 3 * chance
