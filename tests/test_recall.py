"""In-context recall: copying and MQAR generators (format, loss masks, worked example), the
hard-accuracy scorer, the decoder's step path against its full forward, greedy decoding, a copying
run through the training loop that must learn, the CLI, and the resumable study."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from amlp.models.decoder import DecoderLM, greedy_decode, greedy_decode_full
from amlp.tasks.recall.data import (BOS, COPY_VOCAB_SIZE, EOS, IGNORE_INDEX, SEP, CopyingDataset, MQARDataset,
                                    copy_example, copy_hard_accuracy, mqar_gap_weights, mqar_sequence)
from amlp.train import load_config, run_experiment

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs" / "recall" / "copying_cpu.yaml"
MQAR_CONFIG = ROOT / "configs" / "recall" / "mqar_cpu.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- copying data -----------------------------------------------------------------------------------
def test_copy_example_layout_and_loss_mask():
    ex = copy_example(torch.tensor([3, 4, 28]))
    assert ex["tokens"].tolist() == [BOS, 3, 4, 28, SEP, 3, 4, 28]
    assert ex["targets"].tolist() == [IGNORE_INDEX] * 4 + [3, 4, 28, EOS]
    assert ex["mask"].all() and int(ex["length"]) == 3
    padded = copy_example(torch.tensor([5, 6]), pad_to=9)
    assert padded["tokens"].tolist() == [BOS, 5, 6, SEP, 5, 6, 0, 0, 0]
    assert padded["targets"].tolist() == [IGNORE_INDEX] * 3 + [5, 6, EOS] + [IGNORE_INDEX] * 3
    assert padded["mask"].tolist() == [True] * 6 + [False] * 3
    with pytest.raises(ValueError, match="pad_to"):
        copy_example(torch.tensor([5, 6, 7]), pad_to=5)


def test_copying_dataset_is_fresh_deterministic_and_well_formed():
    data = CopyingDataset(200, [2, 3, 4, 5], seed=7)
    again = CopyingDataset(200, [2, 3, 4, 5], seed=7)
    other = CopyingDataset(200, [2, 3, 4, 5], seed=8)
    assert torch.equal(data[17]["tokens"], again[17]["tokens"])
    assert not all(torch.equal(data[i]["tokens"], other[i]["tokens"]) for i in range(10))
    strings, lengths = set(), set()
    for i in range(len(data)):
        ex = data[i]
        S = int(ex["length"])
        lengths.add(S)
        t, y, m = ex["tokens"].tolist(), ex["targets"].tolist(), ex["mask"].tolist()
        assert len(t) == 2 * 5 + 2
        s = t[1:S + 1]
        assert t[0] == BOS and t[S + 1] == SEP and t[S + 2:2 * S + 2] == s
        assert all(3 <= c < COPY_VOCAB_SIZE for c in s)
        # loss exactly on the copy span and EOS, nothing on the prompt or the padding
        assert y == [IGNORE_INDEX] * (S + 1) + s + [EOS] + [IGNORE_INDEX] * (len(t) - 2 * S - 2)
        assert m == [True] * (2 * S + 2) + [False] * (len(t) - 2 * S - 2)
        strings.add(tuple(s))
    assert lengths == {2, 3, 4, 5}
    assert len(strings) > 190  # fresh strings, not a small pool
    with pytest.raises(IndexError):
        data[200]


# -- hard accuracy ------------------------------------------------------------------------------------
def test_copy_hard_accuracy_hand_made_cases():
    s = torch.tensor([[3, 4, 5, 6]] * 5)
    generated = torch.tensor([
        [3, 4, 5, 6, EOS],  # perfect copy
        [3, 9, 5, 6, EOS],  # one wrong letter: 3/4
        [3, 4, 5, 6, 7],  # no EOS at the end: 0
        [3, EOS, 5, 6, EOS],  # EOS inside the copy span: 0
        [9, 9, 5, 9, EOS],  # 1/4
    ])
    assert copy_hard_accuracy(generated, s).tolist() == [1.0, 0.75, 0.0, 0.0, 0.25]
    with pytest.raises(ValueError, match=r"\[B, S\+1\]"):
        copy_hard_accuracy(generated[:, :4], s)


# -- MQAR data ------------------------------------------------------------------------------------------
def test_mqar_worked_example_of_the_docstring():
    tokens, targets = mqar_sequence(torch.tensor([3, 1]), torch.tensor([5, 6]), torch.tensor([1, 0]), seq_len=8)
    assert tokens.tolist() == [3, 5, 1, 6, 1, 0, 3, 0]
    assert targets.tolist() == [-100, -100, -100, -100, 6, -100, 5, -100]
    with pytest.raises(ValueError, match="distinct"):
        mqar_sequence(torch.tensor([3, 1]), torch.tensor([5, 6]), torch.tensor([1, 1]), seq_len=8)
    with pytest.raises(ValueError, match="filler"):
        mqar_sequence(torch.tensor([3, 1]), torch.tensor([5, 6]), torch.tensor([1, 0]), seq_len=8,
                      filler=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("random_filler", [False, True])
def test_mqar_dataset_queries_ask_for_the_stored_values(random_filler):
    V, P, T = 32, 4, 24
    data = MQARDataset(100, vocab_size=V, num_pairs=P, seq_len=T, power_a=0.5, seed=3, random_filler=random_filler)
    for i in range(len(data)):
        ex = data[i]
        t, y = ex["tokens"].tolist(), ex["targets"].tolist()
        assert len(t) == len(y) == T
        keys, values = t[0:2 * P:2], t[1:2 * P:2]
        assert len(set(keys)) == P and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == P and all(V // 2 <= v < V for v in values)
        queried = [pos for pos, target in enumerate(y) if target != IGNORE_INDEX]
        assert len(queried) == P and all(pos >= 2 * P and (pos - 2 * P) % 2 == 0 for pos in queried)
        for pos in queried:  # the token at a query position is a key; its target is that key's value
            assert y[pos] == values[keys.index(t[pos])]
        assert sorted(t[pos] for pos in queried) == sorted(keys)
        if not random_filler:
            assert all(t[pos] == 0 for pos in range(2 * P, T) if pos not in queried)
    assert torch.equal(data[5]["tokens"], MQARDataset(100, vocab_size=V, num_pairs=P, seq_len=T, power_a=0.5, seed=3,
                                                      random_filler=random_filler)[5]["tokens"])


def test_mqar_gap_weights_follow_the_power_law_and_bias_short_gaps():
    w = mqar_gap_weights(5, 0.25)
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64) ** -0.75)
    data = MQARDataset(400, vocab_size=64, num_pairs=2, seq_len=64, power_a=0.05, seed=0, random_filler=False)
    first_gap = [(data[i]["targets"] != IGNORE_INDEX).nonzero()[0, 0].item() - 4 for i in range(400)]
    assert sum(g < 10 for g in first_gap) > 200  # 30 gaps, strongly favouring the short ones


def test_mqar_sizes_are_checked():
    with pytest.raises(ValueError, match="vocab_size"):
        MQARDataset(1, vocab_size=8, num_pairs=4, seq_len=64, power_a=0.1, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        MQARDataset(1, vocab_size=64, num_pairs=4, seq_len=15, power_a=0.1, seed=0)
    with pytest.raises(ValueError, match="data.num_pairs"):
        load_config(MQAR_CONFIG, ["data.num_pairs=0"])


# -- the decoder --------------------------------------------------------------------------------------------
STEP_MIXERS = {"softmax": {}, "causal-rn": {}, "causal-rn-quadratic": {}, "amlp-cov": {"form": "stable"},
               "hyper-glu": {"max_lag": 16}, "local": {"wsize": 3}}


@pytest.mark.parametrize("mixer", sorted(STEP_MIXERS))
def test_decoder_step_matches_forward(mixer):
    torch.manual_seed(1)
    model = DecoderLM(11, 9, dim=12, heads=1 if "rn" in mixer else 2, n_layers=2, mixer=mixer,
                      mixer_options=STEP_MIXERS[mixer], embed_init_std=1.0).double().eval()
    tokens = torch.randint(0, 11, (3, 7))
    full = model(tokens)
    state = model.init_state(3, dtype=torch.float64)
    steps = []
    for t in range(7):
        logits, state = model.step(tokens[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-9, atol=1e-9)
    assert model.block_type == ("causal-rn" if "rn" in mixer else "transformer")
    # a plain reference: the logits at t do not change when later tokens change
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 11
    torch.testing.assert_close(model(changed)[:, :4], full[:, :4])


def test_decoder_refuses_bad_inputs_and_configs():
    model = DecoderLM(11, 6, dim=8, heads=2, n_layers=1)
    with pytest.raises(ValueError, match="learned positions"):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    state = model.init_state(1)
    for _ in range(6):
        _, state = model.step(torch.zeros(1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="learned positions"):
        model.step(torch.zeros(1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="no causal form"):
        DecoderLM(11, 6, dim=8, heads=2, mixer="amlp-pquery")
    with pytest.raises(ValueError, match="causal-rn"):
        DecoderLM(11, 6, dim=8, heads=2, mixer="softmax", block="causal-rn")
    with pytest.raises(ValueError, match="model.block"):
        load_config(CPU_CONFIG, ["model.block=causal-rn"])
    with pytest.raises(ValueError, match="model.mixer"):
        load_config(CPU_CONFIG, ["model.mixer=linformer"])


@pytest.mark.parametrize("mixer", ["softmax", "causal-rn"])
def test_greedy_decoding_by_step_equals_rerunning_forward(mixer):
    torch.manual_seed(2)
    model = DecoderLM(COPY_VOCAB_SIZE, 14, dim=16, heads=1, n_layers=2, mixer=mixer, embed_init_std=1.0).double()
    model.eval()
    prompt = torch.randint(3, COPY_VOCAB_SIZE, (4, 6))
    by_step = greedy_decode(model, prompt, 8)
    by_forward = greedy_decode_full(model, prompt, 8)
    assert by_step.shape == (4, 8)
    assert torch.equal(by_step, by_forward)
    # by hand: the first generated token is the argmax of the forward's last logits
    assert torch.equal(by_step[:, 0], model(prompt)[:, -1].argmax(-1))


# -- training through the loop -------------------------------------------------------------------------------
def _tiny_copying(seed, tmp_path, extra=()):
    cfg = load_config(CPU_CONFIG, ["data.string_len=4", "model.dim=32", "train.max_steps=150", "train.lr=3e-3",
                                   "train.warmup_steps=20", "train.progress=false", "train.eval_every=0",
                                   "train.keep_best=false", "train.threads=1", "data.val_examples=64",
                                   "data.test_examples=128", f"seed={seed}", *extra])
    return run_experiment(cfg, tmp_path / f"run{seed}")


def test_copying_learns_at_S4_through_the_training_loop(tmp_path, capfd):
    result = _tiny_copying(0, tmp_path)
    assert result.test_metrics["hard_acc"] >= 0.9
    assert result.test_metrics["soft_acc"] >= 0.9
    assert result.test_metrics["params"] > 0
    assert "parameters" in capfd.readouterr().err
    saved = json.loads((tmp_path / "run0" / "results.json").read_text())
    assert saved["test"]["hard_acc"] == result.test_metrics["hard_acc"]


def test_copying_length_generalisation_split_reports_per_length(tmp_path):
    cfg = load_config(CPU_CONFIG, ["data.string_len=4", "data.min_string_len=2", "data.test_lengths=[3,6]",
                                   "model.dim=16", "train.max_steps=2", "train.progress=false",
                                   "data.val_examples=8", "data.test_examples=8", "train.batch_size=8"])
    result = run_experiment(cfg, tmp_path / "lg")
    metrics = result.test_metrics
    assert {"hard_acc_len3", "hard_acc_len6", "soft_acc_len3", "soft_acc_len6"} <= set(metrics)
    assert metrics["hard_acc"] == pytest.approx((metrics["hard_acc_len3"] + metrics["hard_acc_len6"]) / 2)
    # after two steps every hard score is 0; the soft scores are not, and differ by length
    assert metrics["soft_acc"] == pytest.approx((metrics["soft_acc_len3"] + metrics["soft_acc_len6"]) / 2)
    assert metrics["soft_acc_len3"] != metrics["soft_acc_len6"]
    # the test split holds test_examples strings of each length, and they are scored as that length
    from amlp.train.tasks import build_task

    test = build_task(cfg).dataset("test")
    lengths = [int(test[i]["length"]) for i in range(len(test))]
    assert sorted(lengths) == [3] * 8 + [6] * 8


def test_cli_trains_mqar(tmp_path):
    from amlp.cli import app

    out = CliRunner().invoke(app, ["train", "mqar", "--config", str(MQAR_CONFIG), "--run-dir", str(tmp_path / "m"),
                                   "--set", "train.max_steps=3", "--set", "train.progress=false",
                                   "--set", "data.val_examples=16", "--set", "data.test_examples=16",
                                   "--set", "model.dim=16", "--set", "data.test_pairs=[2,4]"])
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert 0.0 <= results["test"]["acc"] <= 1.0 and "acc_pairs2" in results["test"]
    bad = CliRunner().invoke(app, ["train", "copying", "--config", str(MQAR_CONFIG), "--run-dir", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and "mqar" in bad.output


# -- the study -------------------------------------------------------------------------------------------
def test_recall_study_runs_resumes_and_writes_the_report(tmp_path):
    from amlp.train.study_recall import load_recall_study, run_recall_study

    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        "mechanisms: [softmax, causal-rn]\nseeds: [0]\n"
        f"copying: {{config: {CPU_CONFIG}, string_lens: [2, 3]}}\n"
        f"mqar: {{config: {MQAR_CONFIG}, num_pairs: [2]}}\n"
        "run_root: runs/s\ndoc: docs/recall.md\nfigures: docs/figures\n"
        "overrides: [train.max_steps=2, train.progress=false, train.batch_size=8, model.dim=8, "
        "data.val_examples=8, data.test_examples=8]\n")
    logs = []
    study = load_recall_study(study_file)
    with pytest.raises(ValueError, match="unknown mechanism.*'amlp-pquery'"):
        run_recall_study(study, command="x", mechanisms=["amlp-pquery"], root=tmp_path, log=logs.append)
    with pytest.raises(ValueError, match="--tasks: 'copy'"):
        run_recall_study(study, command="x", tasks=["copy"], root=tmp_path, log=logs.append)
    # part of the grid: the report goes beside the results; the tracked document is refused
    part = run_recall_study(study, command="amlp study recall", tasks=["copying"], root=tmp_path, log=logs.append)
    assert part == tmp_path / "runs" / "s" / "report.md"
    assert (tmp_path / "runs" / "s" / "figures" / "recall_copying_vs_S.png").is_file()
    with pytest.raises(ValueError, match=r"2 cell\(s\).*mqar/softmax/pairs2/dim8/seed0"):
        run_recall_study(study, command="x", tasks=["copying"], root=tmp_path, log=logs.append, write_doc=True)
    assert not (tmp_path / "docs").exists()
    doc = run_recall_study(study, command="amlp study recall --write-doc", root=tmp_path, log=logs.append,
                           write_doc=True)
    assert doc == tmp_path / "docs" / "recall.md"
    results = json.loads((tmp_path / "runs" / "s" / "results.json").read_text())
    assert sorted(results) == sorted([
        "copying/softmax/S2/dim8/seed0", "copying/softmax/S3/dim8/seed0", "copying/causal-rn/S2/dim8/seed0",
        "copying/causal-rn/S3/dim8/seed0", "mqar/softmax/pairs2/dim8/seed0", "mqar/causal-rn/pairs2/dim8/seed0"])
    rec = results["copying/causal-rn/S3/dim8/seed0"]
    assert rec["state_size"] == 2 * 8  # two linear CausalRN blocks, hidden = dim, state independent of length
    assert results["copying/softmax/S3/dim8/seed0"]["state_size"] == 2 * (2 * 8 * 8)  # two K/V caches of 8 tokens
    text = doc.read_text()
    assert "| softmax | 8 |" in text and "| causal-rn | 8 |" in text and "## Multi-query" in text
    for png in ("recall_copying_vs_S.png", "recall_mqar_vs_pairs.png", "recall_accuracy_vs_state_size.png"):
        assert (tmp_path / "docs" / "figures" / png).stat().st_size > 1000
        assert f"figures/{png}" in text
    logs.clear()
    run_recall_study(study, command="amlp study recall", root=tmp_path, log=logs.append)
    assert sum("done before, skipped" in line for line in logs) == 6
    assert not any(": training" in line for line in logs)


def test_recall_study_never_counts_or_continues_a_run_of_another_protocol(tmp_path):
    from amlp.train import CheckpointError
    from amlp.train.study_recall import load_recall_study, run_recall_study

    def study(steps):
        path = tmp_path / f"study{steps}.yaml"
        path.write_text(
            "mechanisms: [softmax]\nseeds: [0]\n"
            f"copying: {{config: {CPU_CONFIG}, string_lens: [2]}}\n"
            "run_root: runs/s\ndoc: docs/recall.md\nfigures: docs/figures\n"
            f"overrides: [train.max_steps={steps}, train.progress=false, train.batch_size=8, model.dim=8, "
            "data.val_examples=8, data.test_examples=8]\n")
        return load_recall_study(path)

    run_recall_study(study(2), command="x", root=tmp_path, log=lambda line: None)
    # the cell's record kept: it is refused as a result of another protocol, not skipped as done
    for doc_only in (False, True):
        with pytest.raises(ValueError, match=r"copying/softmax/S2/dim8/seed0: train\.max_steps: 2 -> 3"):
            run_recall_study(study(3), command="x", root=tmp_path, doc_only=doc_only, log=lambda line: None)
    # the cell's record is lost, its run folder kept, and the protocol changed since: the study must not
    # continue the old run under the new protocol
    (tmp_path / "runs" / "s" / "results.json").unlink()
    with pytest.raises(CheckpointError, match=r"train\.max_steps: 2 -> 3"):
        run_recall_study(study(3), command="x", root=tmp_path, log=lambda line: None)
    assert not (tmp_path / "runs" / "s" / "results.json").exists()


# -- copying at a fixed parameter budget, and the long copying study --------------------------------------
LONG_STUDY = ROOT / "configs" / "recall" / "study" / "copying_long_cpu.yaml"


def test_copying_matched_parameter_rule_sizes_the_model_and_reports_it(tmp_path):
    base = ["data.string_len=3", "model.dim=8", "train.max_steps=2", "train.progress=false", "train.batch_size=8",
            "data.val_examples=8", "data.test_examples=8", "model.match_params=9000"]
    widths = {}
    for mixer in ("softmax", "causal-rn-quadratic"):
        cfg = load_config(CPU_CONFIG, base + [f"model.mixer={mixer}"])
        test = run_experiment(cfg, tmp_path / mixer).test_metrics
        assert abs(test["params"] / 9000 - 1) <= 0.02
        widths[mixer] = test["matched_dim"]
    assert widths["causal-rn-quadratic"] > widths["softmax"]  # 3Eh + h + E per CausalRN block vs ~12E^2
    with pytest.raises(ValueError, match="model.match_params"):
        load_config(CPU_CONFIG, ["model.match_params=0"])
    # without the rule nothing changes: the config's width, no matched_* metric
    cfg = load_config(CPU_CONFIG, [b for b in base if "match_params" not in b])
    test = run_experiment(cfg, tmp_path / "plain").test_metrics
    assert not any(k.startswith("matched_") for k in test)


def test_long_copying_study_sizes_every_mechanism_to_one_budget():
    from amlp.tasks.recall.task import CopyingTask
    from amlp.train.study_recall import load_recall_study, recall_cell_config

    study = load_recall_study(LONG_STUDY)
    study.validate()
    assert study.copying.string_lens[-1] >= 64 and len(study.seeds) == 3 and study.mqar is None
    assert study.doc == "docs/results/copying_long.md" and study.figures != "docs/figures"
    cells = {m for m in study.mechanisms if m.startswith("causal-rn-quadratic:")}
    assert len(cells) == 8  # the 3 x 3 grid without exact + exp, which is the plain causal-rn-quadratic row
    for S in (study.copying.string_lens[0], study.copying.string_lens[-1]):
        counts = {}
        for mech in study.mechanisms:
            cfg = recall_cell_config(ROOT, study.copying.config, "copying", mech, S, 64, 0, study.overrides)
            if mech in cells:  # the ablation options change no parameter: check that the mixer takes them
                with torch.device("meta"):
                    model = DecoderLM(COPY_VOCAB_SIZE, 2 * S + 2, dim=8, mixer=cfg.model.mixer,
                                      mixer_options=cfg.model.options)
                assert model.blocks[0].mixer.prenorm == cfg.model.options["prenorm"]
                continue
            match = CopyingTask(cfg).matched_size()
            assert match.within(0.02), match.describe()
            counts[mech] = match.params
        assert max(counts.values()) / min(counts.values()) - 1 <= 0.04


def test_study_with_ablation_rows_and_a_budget_writes_widths_and_the_grid(tmp_path):
    from amlp.train.study_recall import load_recall_study, run_recall_study

    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        "mechanisms: [softmax, causal-rn-quadratic, 'causal-rn-quadratic:prenorm=none,activation=relu']\n"
        f"seeds: [0]\ncopying: {{config: {CPU_CONFIG}, string_lens: [2]}}\nmqar: null\n"
        "run_root: runs/s\ndoc: docs/long.md\nfigures: docs/figures/long\n"
        "overrides: [train.max_steps=2, train.progress=false, train.batch_size=8, model.dim=8, "
        "data.val_examples=8, data.test_examples=8, model.match_params=6200]\n")
    study = load_recall_study(study_file)
    with pytest.raises(ValueError, match="takes no option.*'prenrom'"):
        run_recall_study(study, command="x", mechanisms=["causal-rn-quadratic:prenrom=none"], root=tmp_path,
                         log=lambda _: None)
    doc = run_recall_study(study, command="amlp study recall --write-doc", root=tmp_path, log=lambda _: None,
                           write_doc=True)
    results = json.loads((tmp_path / "runs" / "s" / "results.json").read_text())
    rec = results["copying/causal-rn-quadratic:prenorm=none,activation=relu/S2/dim8/seed0"]
    assert rec["model"]["mixer_options"]["causal-rn-quadratic"] == {"prenorm": "none", "activation": "relu"}
    assert abs(rec["params"] / 6200 - 1) <= 0.02
    text = doc.read_text()
    assert "| Mixer | width | params |" in text and "sized to 6,200 parameters" in text
    width = int(rec["test"]["matched_dim"])
    assert f"| causal-rn-quadratic:prenorm=none,activation=relu | {width} |" in text
    assert "CausalRN ablation" in text and "| pre-norm | exp | relu |" in text
    assert "| none | — | " in text and "| exact | " in text
    assert "## Checks (copying, S = 2, test hard accuracy)" in text and "the best of the other 1 ablation" in text
    assert (tmp_path / "docs" / "figures" / "long" / "recall_copying_vs_S.png").is_file()


def test_copying_checks_state_the_causal_rn_claims_at_the_longest_length():
    from amlp.train.study_recall import copying_checks

    def entry(*accs):
        return {"acc": list(accs), "soft": list(accs), "params": 1000, "state": 10}

    table = {("copying", "softmax", 32, 64): entry(1.0, 1.0, 1.0), ("copying", "softmax", 16, 64): entry(1.0),
             ("copying", "causal-rn-quadratic", 32, 64): entry(0.9, 1.0, 0.95),
             ("copying", "causal-rn", 32, 64): entry(0.25),
             ("copying", "linear", 16, 64): entry(0.5),  # not at the longest S: not stated
             ("copying", "causal-rn-quadratic:prenorm=approx,activation=exp", 32, 64): entry(0.4, 0.2),
             ("copying", "causal-rn-quadratic:prenorm=none,activation=relu", 32, 64): entry(0.1),
             ("mqar", "softmax", 64, 64): entry(1.0)}
    text = "\n".join(copying_checks(table))
    assert text.startswith("## Checks (copying, S = 32, test hard accuracy)")
    assert "- softmax: 1.000 ± 0.000 (3 seed(s))." in text
    assert "causal-rn-quadratic: 0.950 ± 0.050 (3 seed(s))." in text
    assert "and linear attention do not. causal-rn: 0.250 (1 seed(s))." in text and "linear:" not in text
    assert ("exact + exp: 0.950; the best of the other 2 ablation cells: approx + exp, 0.300 (means over seeds)."
            in text)
    assert copying_checks({("mqar", "softmax", 64, 64): entry(1.0)}) == []
