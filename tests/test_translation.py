"""Translation: subwords and BLEU, the AR and GLAT models, their decoding, the task, the CLI."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from amlp.cli import app
from amlp.models.translation import BOS, EOS, GLAT, PAD, TransformerMT, uniform_copy
from amlp.models.translation_decoding import (ar_greedy, ar_teacher_forced_argmax, beam_search, collapse_runs,
                                             nar_decode)
from amlp.tasks.translation.data import read_split, token_batches, train_tokenizer
from amlp.tasks.translation.task import (ar_inputs, corpus_scores, glancing_reveal, bleu_signature,
                                         translate_lines)
from amlp.train import load_config, run_experiment
from amlp.train.loop import evaluate_checkpoint, load_trained_model
from conftest import shared_data_dir

DATA = Path(shared_data_dir())
needs_data = pytest.mark.skipif(not (DATA / "multi30k" / "val.en.gz").is_file(),
                                reason="Multi30k not found (set AMLP_DATA_DIR)")
runner = CliRunner()


# -- subwords and scores ---------------------------------------------------------------------------------
@needs_data
def test_sentencepiece_round_trip_and_special_ids():
    src, tgt = read_split("val", "en", "de", DATA)
    tok = train_tokenizer(src[:64] + tgt[:64], 300)
    for line in src[:8] + tgt[:8]:
        ids = tok.encode(line)
        assert not {PAD, BOS, EOS} & set(ids)  # no pad/bos/eos inside a sentence
        assert tok.decode(ids) == line
        assert tok.decode(ids + [EOS, 17, 18]) == line  # decoding stops at EOS
    assert tok.decode([BOS] + tok.encode(src[0]) + [PAD, PAD]) == src[0]


def test_sacrebleu_scores_and_signature():
    refs = ["Ein Mann fährt Fahrrad .", "Zwei Hunde spielen im Schnee ."]
    assert corpus_scores(refs, refs)["bleu"] == pytest.approx(100.0)
    assert corpus_scores(refs, refs)["chrf"] == pytest.approx(100.0)
    worse = corpus_scores(["Ein Mann fährt .", "Hunde im Schnee ."], refs)
    # by hand: n-gram precisions 8/8, 4/6, 2/4 and 0/2 (exp smoothing: 1/2 for the first zero count,
    # divided by the total again: 1/4), brevity penalty exp(1 - 11/8) for 8 tokens against 11
    expected = 100 * math.exp(1 - 11 / 8) * (1 * 4 / 6 * 2 / 4 * 1 / 4) ** 0.25
    assert worse["bleu"] == pytest.approx(expected, rel=1e-9)  # hypotheses and references not swapped
    assert 0 < worse["chrf"] < 100
    sig = bleu_signature()
    assert "tok:13a" in sig and "case:mixed" in sig
    with pytest.raises(ValueError, match="hypotheses"):
        corpus_scores(["a"], refs)


def test_token_batches_respect_budget_and_cover_everything():
    lengths = [3, 9, 4, 12, 7, 1, 20, 5, 5, 8]
    batches = token_batches(lengths, 24)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 24
    assert token_batches(lengths, 24) == batches  # a function of the lengths
    assert [[6]] == [b for b in token_batches(lengths, 10) if 6 in b]  # longer than the budget: alone


# -- glancing and lengths --------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_glancing_reveals_ratio_times_hamming_distance(ratio):
    g = torch.Generator().manual_seed(0)
    target = torch.randint(4, 50, (6, 11), generator=g)
    mask = torch.ones(6, 11, dtype=torch.bool)
    mask[2, 7:] = False
    mask[4, 3:] = False
    prediction = target.clone()
    wrong = torch.rand(6, 11, generator=g) < 0.6
    prediction[wrong] = 0  # never a target token
    revealed = glancing_reveal(prediction, target, mask, ratio, generator=g)
    distance = ((prediction != target) & mask).sum(1)
    assert torch.equal(revealed.sum(1), torch.floor(distance * ratio).long())
    assert not bool((revealed & ~mask).any())


def test_uniform_copy_maps_ends_to_ends():
    emb = torch.arange(5, dtype=torch.float32)[None, :, None].repeat(2, 1, 3)
    out = uniform_copy(emb, torch.tensor([5, 3]), torch.tensor([9, 2]), 9)
    assert out[0, :, 0].tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4]  # round(j * 4 / 8), halves to even
    assert out[1, :2, 0].tolist() == [0, 2]


def _glat(**kw):
    torch.manual_seed(0)
    opts = dict(dim=32, heads=2, ffn_dim=64, encoder_layers=1, decoder_layers=1, dropout=0.0)
    opts.update(kw)
    return GLAT(40, 24, **opts).eval()


def test_length_prediction_and_length_beam_shapes():
    model = _glat()
    src = torch.randint(4, 40, (3, 7))
    mask = torch.ones_like(src, dtype=torch.bool)
    memory = model.encode(src, mask)
    assert model.length_logits(memory, mask).shape == (3, 25)
    tgt_mask = torch.arange(9)[None] < torch.tensor([[9], [4], [6]])
    logits, length_logits = model(src, mask, tgt_mask)
    assert logits.shape == (3, 9, 40) and length_logits.shape == (3, 25)
    for beam in (1, 3):
        out = nar_decode(model, src, mask, length_beam=beam)
        assert len(out) == 3
        top = model.length_logits(memory, mask)[:, 1:].topk(beam, dim=1).indices + 1
        for row, lengths in zip(out, top.tolist()):
            assert len(row) in lengths and all(t > EOS for t in row)


def test_collapse_repeats_reduces_each_run_to_one_token_after_choosing_the_candidate():
    assert collapse_runs([5, 5, 7, 5, 5, 5, 9]) == [5, 7, 5, 9]
    assert collapse_runs([]) == [] and collapse_runs([3]) == [3]
    model = _glat()
    forward = model.forward

    def repeating(*args, **kwargs):  # a model that repeats: one token is favoured at every position
        logits, length_logits = forward(*args, **kwargs)
        logits = logits.clone()
        logits[..., 17] += 50.0
        return logits, length_logits

    model.forward = repeating
    src = torch.randint(4, 40, (3, 7))
    mask = torch.ones_like(src, dtype=torch.bool)
    plain = nar_decode(model, src, mask, length_beam=2)
    collapsed = nar_decode(model, src, mask, length_beam=2, collapse_repeats=True)
    assert any(len(row) > 1 for row in plain)
    assert collapsed == [collapse_runs(row) for row in plain] and all(row == [17] for row in collapsed)


def test_collapse_repeats_is_refused_for_the_ar_model():
    from amlp.train.config import build_config

    base = {"task": "translation", "model": {"arch": "transformer", "collapse_repeats": True}}
    with pytest.raises(ValueError, match="model.collapse_repeats' applies to NAR decoding"):
        build_config(base)
    base["model"]["arch"] = "glat"
    assert build_config(base).model.collapse_repeats is True


# -- AR decoding through step ------------------------------------------------------------------------------
AR_SITES = [("softmax", {}, "softmax", {}), ("performer", {}, "performer", {}), ("abc", {}, "abc", {}),
            ("cosformer", {"max_length": 32}, "cosformer", {"max_length": 32}), ("local", {}, "softmax", {}),
            ("amlp-cov", {"form": "stable"}, "softmax", {}), ("linear", {}, "linear", {})]


def _ar(self_mixer="softmax", self_options=None, cross_mixer="softmax", cross_options=None):
    torch.manual_seed(0)
    return TransformerMT(40, 32, dim=32, heads=2, ffn_dim=64, encoder_layers=2, decoder_layers=2,
                         self_mixer=self_mixer, self_options=self_options, cross_mixer=cross_mixer,
                         cross_options=cross_options, dropout=0.0).eval()


def _sources():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 40, (3, 7), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    src[1, 5:], mask[1, 5:] = PAD, False
    return src, mask


@pytest.mark.parametrize("self_mixer,self_options,cross_mixer,cross_options", AR_SITES,
                         ids=[s[0] + "/" + s[2] for s in AR_SITES])
def test_step_decoding_equals_teacher_forced_argmax(self_mixer, self_options, cross_mixer, cross_options):
    model = _ar(self_mixer, self_options, cross_mixer, cross_options)
    src, mask = _sources()
    hyps = ar_greedy(model, src, mask)
    assert ar_teacher_forced_argmax(model, src, mask, hyps) == hyps
    assert beam_search(model, src, mask, beam=1) == hyps
    # not only the chosen tokens: the step's logits along the greedy path are the forward's
    T = max(len(h) for h in hyps) + 1
    tgt_in = torch.full((len(hyps), T), PAD, dtype=torch.long)
    for b, h in enumerate(hyps):
        tgt_in[b, 0] = BOS
        tgt_in[b, 1:len(h) + 1] = torch.tensor(h)
    tgt_mask = tgt_in != PAD
    with torch.no_grad():
        full = model(src, mask, tgt_in, tgt_mask)
        memory, state, steps = model.encode(src, mask), model.init_state(len(hyps)), []
        for t in range(T):
            logits, state = model.step(tgt_in[:, t], state, memory, mask)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1)[tgt_mask], full[tgt_mask], rtol=1e-4, atol=1e-4)


def test_sinusoidal_positions_decode_through_step_and_are_not_saved():
    from amlp.models.translation import sinusoidal_positions

    table = sinusoidal_positions(50, 8)
    assert torch.allclose(table[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert table[7, 0] == pytest.approx(math.sin(7.0)) and table[7, 4] == pytest.approx(math.cos(7.0))
    assert table[7, 3] == pytest.approx(math.sin(7.0 / 10000 ** (3 / 3)), abs=1e-6)
    torch.manual_seed(0)
    model = TransformerMT(40, 32, dim=32, heads=2, ffn_dim=64, encoder_layers=1, decoder_layers=2, dropout=0.0,
                          positions="sinusoidal").eval()
    assert not any("positions" in k for k in model.state_dict())
    src, mask = _sources()
    hyps = ar_greedy(model, src, mask)
    assert ar_teacher_forced_argmax(model, src, mask, hyps) == hyps
    with pytest.raises(ValueError, match="positions"):
        TransformerMT(40, 32, dim=32, heads=2, positions="rotary")


def test_beam_search_finds_no_worse_sequence_than_greedy():
    model = _ar()
    src, mask = _sources()
    greedy = ar_greedy(model, src, mask)
    beam = beam_search(model, src, mask, beam=4, length_penalty=0.0)

    @torch.no_grad()
    def score(hyp, b):
        inp = torch.tensor([[BOS] + hyp])
        logp = torch.log_softmax(model(src[b:b + 1], mask[b:b + 1], inp).float(), -1)[0]
        logp[:, [PAD, BOS]] = -math.inf
        logp = torch.log_softmax(logp, -1)
        targets = hyp + [EOS]
        return sum(float(logp[t, tok]) for t, tok in enumerate(targets))

    for b in range(3):
        assert score(beam[b], b) >= score(greedy[b], b) - 1e-4


def test_source_padding_does_not_change_the_translation():
    model = _ar()
    src, mask = _sources()
    wide = torch.cat([src, torch.full((3, 4), PAD)], 1)
    wide_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    wide[:, 7:] = 9  # garbage under the mask
    assert beam_search(model, src, mask) == beam_search(model, wide, wide_mask)
    glat = _glat()
    assert nar_decode(glat, src, mask, iterations=3) == nar_decode(glat, wide, wide_mask, iterations=3)


def test_a_translation_does_not_depend_on_its_batch():
    # an untrained model runs to the length limit, which is per sentence (1.2 x its source + 10)
    model = _ar()
    src, mask = _sources()
    for decode in (ar_greedy, lambda m, s, k: beam_search(m, s, k, beam=3)):
        together = decode(model, src, mask)
        alone = [decode(model, src[b:b + 1, :int(mask[b].sum())], mask[b:b + 1, :int(mask[b].sum())])[0]
                 for b in range(3)]
        assert together == alone
    assert len(together[1]) == int(1.2 * 5 + 10) - 1 and len(together[0]) == int(1.2 * 7 + 10) - 1


def test_sites_a_mixer_cannot_serve_are_refused():
    with pytest.raises(ValueError, match="decoder self site.*capability 'causal'"):
        _ar("amlp-pquery", {"form": "official"})
    with pytest.raises(ValueError, match="decoder cross site.*capability 'cross'"):
        _ar(cross_mixer="local")
    with pytest.raises(ValueError, match="see later target tokens"):
        _ar(cross_mixer="amlp-pquery", cross_options={"form": "official"})
    with pytest.raises(ValueError, match="no default form"):
        _glat(self_mixer="amlp-pquery")
    base = {"task": "translation", "model": {"arch": "transformer", "self_mixer": "xca"}}
    with pytest.raises(ValueError, match="model.self_mixer.*capability 'causal'"):
        load_config(raw=base)
    with pytest.raises(ValueError, match="model.cross_mixer.*capability 'cross'"):
        load_config(raw={"task": "translation", "model": {"arch": "glat", "cross_mixer": "gmlp"}})


def test_ar_inputs_shift_and_end_with_eos():
    tgt = torch.tensor([[5, 6, 7], [8, 9, PAD]])
    inp, out, mask = ar_inputs(tgt, tgt != PAD)
    assert inp.tolist() == [[BOS, 5, 6, 7], [BOS, 8, 9, PAD]]
    assert out.tolist() == [[5, 6, 7, EOS], [8, 9, EOS, PAD]]
    assert mask.tolist() == [[True] * 4, [True, True, True, False]]


# -- the task end to end ------------------------------------------------------------------------------------
def _tiny_corpus(folder: Path, n: int = 32) -> Path:
    src, tgt = read_split("val", "en", "de", DATA)
    out = folder / "multi30k"
    out.mkdir(parents=True)
    for split in ("train", "val", "test_2016_flickr"):
        for lang, lines in (("en", src[:n]), ("de", tgt[:n])):
            with gzip.open(out / f"{split}.{lang}.gz", "wt", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in lines))
    return folder


def _tiny_config(tmp_path: Path, arch: str, steps: int, **model):
    raw = {
        "task": "translation", "seed": 0,
        "data": {"data_dir": str(_tiny_corpus(tmp_path)), "vocab_size": 300, "max_tokens": 2048,
                 "cache_dir": str(tmp_path / "cache")},
        "model": {"arch": arch, "dim": 64, "heads": 2, "ffn_dim": 128, "encoder_layers": 2, "decoder_layers": 2,
                  "dropout": 0.0, "max_length": 96, "label_smoothing": 0.0, "beam": 2, "length_beam": 1,
                  "glance_start": 0.5, "glance_end": 0.3, **model},
        "train": {"optimizer": "adam", "lr": 3e-3, "max_steps": steps, "threads": 1, "progress": False,
                  "eval_every": steps, "checkpoint_every": steps // 2, "keep_last": 2, "precision": "fp32",
                  "test_checkpoint": "average", "average_last": 1},
    }
    return load_config(raw=raw)


@needs_data
@pytest.mark.parametrize("arch,steps", [("transformer", 150), ("glat", 300)])
def test_tiny_model_overfits_32_pairs(tmp_path, arch, steps):
    cfg = _tiny_config(tmp_path, arch, steps)
    result = run_experiment(cfg, tmp_path / "run")
    assert result.test_metrics["bleu"] >= 90, result.test_metrics
    ckpt = tmp_path / "run" / "checkpoints" / "averaged"
    assert (ckpt / "tokenizer.model").is_file()
    # the checkpoint carries its tokenizer: the cache may go
    for f in (tmp_path / "cache").iterdir():
        f.unlink()
    metrics = evaluate_checkpoint(ckpt, "test2016", device="cpu")
    assert metrics["bleu"] == pytest.approx(result.test_metrics["bleu"])
    if arch == "transformer":
        _check_translate_cli(tmp_path, ckpt)
    else:  # the NAR post-processing from the command line
        src, _ = read_split("val", "en", "de", DATA)
        res = runner.invoke(app, ["translate", "--checkpoint", str(ckpt), "--no-progress", "--collapse-repeats"],
                            input="\n".join(src[:3]) + "\n")
        assert res.exit_code == 0, res.output
        _, task, model = load_trained_model(ckpt, ["model.collapse_repeats=true"], device="cpu")
        assert res.stdout.strip("\n").split("\n") == translate_lines(task, model, src[:3])


def _check_translate_cli(tmp_path: Path, ckpt: Path) -> None:
    src, tgt = read_split("val", "en", "de", DATA)
    lines = [src[1], src[0], src[17], src[1]]
    res = runner.invoke(app, ["translate", "--checkpoint", str(ckpt), "--no-progress"], input="\n".join(lines) + "\n")
    assert res.exit_code == 0, res.output
    out = res.stdout.strip("\n").split("\n")
    assert len(out) == 4 and out[0] == out[3]
    config, task, model = load_trained_model(ckpt, device="cpu")
    assert out == translate_lines(task, model, lines, batch_size=3)
    assert out == [translate_lines(task, model, [line])[0] for line in lines]
    assert corpus_scores(out, [tgt[1], tgt[0], tgt[17], tgt[1]])["bleu"] >= 70
    # bad inputs: an empty line, a line longer than the model's positions, an unknown checkpoint
    res = runner.invoke(app, ["translate", "--checkpoint", str(ckpt)], input=f"{src[0]}\n\n{src[1]}\n")
    assert res.exit_code == 1 and "line 2 is empty" in res.output
    res = runner.invoke(app, ["translate", "--checkpoint", str(ckpt)], input=" ".join(src[:30]) + "\n")
    assert res.exit_code == 1 and "line 1 has" in res.output and "model.max_length" in res.output
    res = runner.invoke(app, ["translate", "--checkpoint", str(ckpt), "--threads", "0"], input="a\n")
    assert res.exit_code == 2 and "--threads must be >= 1" in res.output
    res = runner.invoke(app, ["translate", "--checkpoint", str(tmp_path / "nowhere")], input="a\n")
    assert res.exit_code == 1 and "nowhere" in res.output
    res = runner.invoke(app, ["translate", "--checkpoint", str(ckpt), "--collapse-repeats"], input="a\n")
    assert res.exit_code == 1 and "applies to NAR decoding" in res.output
    res = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--split", "test2016"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["bleu_signature"] == bleu_signature() and "nrefs:1|case:mixed" in record["bleu_signature"]
    assert "nc:6" in record["chrf_signature"]
    assert record["bleu"] >= 90


# -- the study ------------------------------------------------------------------------------------------------
def _tiny_study_configs(tmp_path: Path, train: dict) -> tuple[Path, dict[str, Path]]:
    """The tiny corpus and an AR and a GLAT config file for it (``train`` keys over the defaults)."""
    import yaml

    data_dir = _tiny_corpus(tmp_path)
    common = {"task": "translation", "seed": 0,
              "data": {"data_dir": str(data_dir), "vocab_size": 300, "max_tokens": 2048,
                       "cache_dir": str(tmp_path / "cache")},
              "model": {"dim": 32, "heads": 2, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                        "dropout": 0.0, "max_length": 96, "beam": 2, "length_beam": 2},
              "train": {"optimizer": "adam", "lr": 3e-3, "threads": 1, "progress": False, "keep_last": 2,
                        "precision": "fp32", **train}}
    configs = {}
    for arch in ("transformer", "glat"):
        raw = json.loads(json.dumps(common))
        raw["model"]["arch"] = arch
        configs[arch] = tmp_path / f"{arch}.yaml"
        configs[arch].write_text(yaml.safe_dump(raw))
    return data_dir, configs


@needs_data
def test_study_runs_teacher_first_distils_resumes_and_reports(tmp_path):
    import yaml

    from amlp.tasks.translation.study import load_translation_study, run_translation_study

    data_dir, configs = _tiny_study_configs(tmp_path, {"max_steps": 6, "eval_every": 6, "checkpoint_every": 3,
                                                       "test_checkpoint": "average", "average_last": 2})
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "directions": ["en-de"], "configs": {k: str(v) for k, v in configs.items()},
        "rows": [{"arch": "glat", "mechanism": "abc"}, {"arch": "transformer", "mechanism": "softmax"},
                 {"arch": "transformer", "mechanism": "local", "cross": "softmax"}],
        "teacher": "transformer/softmax", "test_sets": ["test2016"],
        "latency": {"batch_sizes": [1, 4], "sentences": 4},
        "run_root": str(tmp_path / "runs"), "doc": str(tmp_path / "doc.md")}))
    study = load_translation_study(study_file)
    logged = []
    with pytest.raises(ValueError, match="not writing"):
        run_translation_study(study, command="amlp study translation", rows=["transformer/softmax"],
                              write_doc=True, log=logged.append)
    report = run_translation_study(study, command="amlp study translation", rows=["transformer/softmax", "glat/abc"],
                                   log=logged.append)
    assert "training" in logged[0] and "en-de/transformer/softmax/seed0" in logged[0]  # teacher first
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    glat = results["en-de/glat/abc/seed0"]
    teacher = results["en-de/transformer/softmax/seed0"]
    assert any(o.startswith("data.distill_from=") and o.endswith(teacher["checkpoint"]) for o in glat["overrides"])
    assert list((tmp_path / "runs" / "en-de" / "transformer" / "softmax" / "seed0" / "distilled").glob("*.txt"))
    assert set(glat["latency"]["batch_sizes"]) == {"1", "4"}
    text = report.read_text()
    assert "GLAT (ABC)" in text and "Tr (local, cross softmax) | —" in text and "nrefs:1" in text
    assert "21.98" in text  # the paper's GLAT (ABC) En-De score beside the row
    # NAR cells are also scored with repeated-token runs collapsed, beside the single pass
    assert set(glat["tests_collapsed"]) == {"test2016"} and "tests_collapsed" not in teacher
    assert "runs collapsed²" in text and "## Examples" not in text  # examples only in the tracked document
    logged.clear()
    run_translation_study(study, command="amlp study translation", write_doc=True, log=logged.append)
    assert sum("done before, skipped" in line for line in logged) == 2
    doc = (tmp_path / "doc.md").read_text()
    # the tracked document shows test sentences as every row's model translates them
    examples = doc[doc.index("## Examples"):doc.index("## Protocol")]
    sources, references = read_split("test2016", "en", "de", data_dir)
    for i in (0, round((len(sources) - 1) / 2), len(sources) - 1):
        assert f"Sentence {i + 1} of {len(sources)}:" in examples and f"| reference | {references[i]} |" in examples
    for label in ("Tr (softmax)", "Tr (local, cross softmax)", "GLAT (ABC)"):
        assert examples.count(f"| {label} | ") == 3
    # rescoring: the finished cells are scored again from their checkpoints, nothing is trained
    before = json.loads((tmp_path / "runs" / "results.json").read_text())
    logged.clear()
    run_translation_study(study, command="amlp study translation", rows=["glat/abc", "transformer/local"],
                          rescore=True, log=logged.append)
    after = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert "rescored_at" in after["en-de/glat/abc/seed0"] and "rescored_at" not in after["en-de/transformer/softmax/seed0"]
    assert after["en-de/glat/abc/seed0"]["tests"] == before["en-de/glat/abc/seed0"]["tests"]
    assert "rescored_at" in after["en-de/transformer/local/seed0"]
    assert not any("training" in line for line in logged)
    assert "timed when its training finished" in report.read_text()
    # retiming: every finished cell's decoding is timed again in one pass, nothing is trained or scored
    with pytest.raises(ValueError, match="separate passes"):
        run_translation_study(study, command="amlp study translation", rescore=True, retime=True, log=logged.append)
    logged.clear()
    run_translation_study(study, command="amlp study translation", retime=True, log=logged.append)
    timed = json.loads((tmp_path / "runs" / "results.json").read_text())
    passes = {r["latency"]["pass"] for r in timed.values()}
    assert len(passes) == 1 and len(timed) == 3
    assert all(timed[k]["tests"] == after[k]["tests"] for k in timed)
    assert all(set(r["latency"]["batch_sizes"]) == {"1", "4"} for r in timed.values())
    assert not any("training" in line or "scoring" in line for line in logged)
    assert f"timed again in one pass, one after another (`amlp study translation --retime`, started {passes.pop()})" \
        in (tmp_path / "runs" / "report.md").read_text()
    run_translation_study(study, command="amlp study translation", rows=["glat/abc"], retime=True, log=logged.append)
    assert "timed in 2 separate passes" in (tmp_path / "runs" / "report.md").read_text()


@needs_data
def test_study_records_carry_the_grid_to_a_machine_without_its_run_folders(tmp_path):
    import shutil

    import yaml

    from amlp.tasks.translation.study import distilled_path, load_translation_study, run_translation_study
    from amlp.tasks.translation.task import read_distill_file

    data_dir, configs = _tiny_study_configs(tmp_path, {"max_steps": 4, "eval_every": 4, "checkpoint_every": 2})
    records = tmp_path / "tracked" / "mt.json"
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "directions": ["en-de"], "configs": {k: str(v) for k, v in configs.items()},
        "rows": [{"arch": "transformer", "mechanism": "softmax"}, {"arch": "glat", "mechanism": "abc"},
                 {"arch": "glat", "mechanism": "softmax"}],
        "test_sets": ["test2016"], "latency": {"batch_sizes": [2], "sentences": 4}, "examples": 2,
        "run_root": str(tmp_path / "runs"), "records": str(records), "doc": str(tmp_path / "doc.md")}))
    study = load_translation_study(study_file)
    logged = []
    run_translation_study(study, command="amlp study translation", rows=["transformer/softmax", "glat/abc"],
                          log=logged.append)
    tracked = json.loads(records.read_text())
    assert set(tracked) == {"en-de/transformer/softmax/seed0", "en-de/glat/abc/seed0"}
    assert tracked == json.loads((tmp_path / "runs" / "results.json").read_text())
    # the teacher's beam outputs are saved beside the records as soon as it is trained, and the NAR
    # cells train on that file
    saved = distilled_path(study, Path("/"), "en-de")
    assert saved == records.with_name("mt-distilled-en-de.txt.gz") and saved.is_file()
    sources, _ = read_split("train", "en", "de", data_dir)
    assert len(read_distill_file(saved, len(sources))) == len(sources)
    assert f"data.distill_file={saved}" in tracked["en-de/glat/abc/seed0"]["overrides"]
    assert set(tracked["en-de/glat/abc/seed0"]["examples"]["lines"]) == {"0", str(len(read_split("test2016", "en", "de", data_dir)[0]) - 1)}
    # a record from before records kept examples gets them when its cell is skipped with its checkpoint here
    for path in (records, tmp_path / "runs" / "results.json"):
        old = json.loads(path.read_text())
        del old["en-de/glat/abc/seed0"]["examples"]
        path.write_text(json.dumps(old))
    run_translation_study(study, command="amlp study translation", rows=["glat/abc"], log=logged.append)
    assert json.loads(records.read_text())["en-de/glat/abc/seed0"]["examples"] == tracked["en-de/glat/abc/seed0"]["examples"]
    # a protocol-changing --set is kept out of the tracked file, both ways
    logged.clear()
    run_translation_study(study, command="amlp study translation", rows=["glat/softmax"],
                          extra_overrides=["train.max_steps=2"], log=logged.append)
    assert any("changes the study's protocol" in line for line in logged)
    assert "en-de/glat/softmax/seed0" not in json.loads(records.read_text())
    # another machine: only the repository (records and distilled targets) is there
    shutil.rmtree(tmp_path / "runs")
    logged.clear()
    run_translation_study(study, command="amlp study translation", retime=True, log=logged.append)
    assert sum("is not on this machine" in line for line in logged) == 2
    with pytest.raises(ValueError, match="glat/softmax"):
        run_translation_study(study, command="amlp study translation", write_doc=True, doc_only=True, log=logged.append)
    logged.clear()
    run_translation_study(study, command="amlp study translation", write_doc=True, log=logged.append)
    assert sum("done before, skipped" in line for line in logged) == 2
    assert any("training" in line and "glat/softmax" in line for line in logged)
    assert f"data.distill_file={saved}" in json.loads(records.read_text())["en-de/glat/softmax/seed0"]["overrides"]
    doc = (tmp_path / "doc.md").read_text()
    assert f"from `{records}`" in doc
    examples = doc[doc.index("## Examples"):doc.index("## Protocol")]
    for label in ("Tr (softmax)", "GLAT (ABC)", "GLAT (softmax)"):
        assert examples.count(f"| {label} | ") == 2, label
    # a cell that finished under another protocol is refused, not skipped as done
    with pytest.raises(ValueError, match="en-de/glat/softmax/seed0: train.max_steps: 4 -> 3"):
        run_translation_study(study, command="amlp study translation", rows=["glat/softmax"],
                              extra_overrides=["train.max_steps=3"], log=logged.append)
    # without the teacher's checkpoint or its saved targets a NAR cell cannot start, and says why
    saved.unlink()
    shutil.rmtree(tmp_path / "runs")
    tracked = json.loads(records.read_text())
    del tracked["en-de/glat/abc/seed0"]
    records.write_text(json.dumps(tracked))
    with pytest.raises(ValueError, match="not on this machine and the study saved no distilled targets"):
        run_translation_study(study, command="amlp study translation", log=logged.append)


def test_distill_file_is_checked_against_the_training_sources(tmp_path):
    from amlp.tasks.translation.task import read_distill_file, write_distill_file
    from amlp.train.config import load_config

    path = tmp_path / "d.txt.gz"
    write_distill_file(path, ["ein Hund .", "", "zwei"])
    first = path.read_bytes()
    write_distill_file(path, ["ein Hund .", "", "zwei"])
    assert path.read_bytes() == first  # the same lines give the same bytes
    assert read_distill_file(path, 3) == ["ein Hund .", "", "zwei"]
    with pytest.raises(ValueError, match="has 3 line\\(s\\), the training split has 4"):
        read_distill_file(path, 4)
    with pytest.raises(FileNotFoundError, match="no file"):
        read_distill_file(tmp_path / "none.txt", 1)
    with pytest.raises(ValueError, match="set one"):
        load_config("configs/translation/cpu/glat.yaml", ["data.distill_from=x", f"data.distill_file={path}"])


@pytest.mark.parametrize("name", ["softmax", "performer", "abc", "cosformer", "linear"])
def test_projected_context_mixes_as_the_full_call(name):
    import amlp

    torch.manual_seed(0)
    mixer = amlp.build_mixer(name, dim=16, heads=2, cross=True).eval()
    x, ctx = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    ctx[1, 4:] = float("nan")  # padding is selected away, not multiplied
    projected = mixer.project_context(ctx, mask)
    if name == "abc":  # its own token mixing: no shortcut, the decoder calls it whole
        assert projected is None
        return
    expected = mixer(x, ctx, context_mask=mask)
    assert torch.allclose(mixer.mix_projected(x, projected), expected, atol=1e-6)
    assert torch.isfinite(expected).all()


def test_study_command_names_unknown_rows_and_directions():
    res = runner.invoke(app, ["study", "translation", "--rows", "glat/nonsense", "--report-only"])
    assert res.exit_code == 1 and "--rows: 'glat/nonsense' not in this study" in res.output
    res = runner.invoke(app, ["study", "translation", "--directions", "fr-en", "--report-only"])
    assert res.exit_code == 1 and "--directions: 'fr-en'" in res.output
    res = runner.invoke(app, ["study", "translation", "--seeds", "a", "--report-only"])
    assert res.exit_code == 2 and "--seeds" in res.output


def test_study_file_refuses_a_negative_number_of_examples():
    from amlp.tasks.translation.study import load_translation_study

    study = load_translation_study(Path(__file__).resolve().parents[1] / "configs/translation/study/cpu.yaml")
    assert study.examples == 3
    study.examples = -1
    with pytest.raises(ValueError, match="'examples' must be >= 0"):
        study.validate()


def test_report_checks_state_the_protocol_requirements():
    from amlp.tasks.translation.study import Latency, StudyRow, TranslationStudyConfig, _requirements

    study = TranslationStudyConfig(configs={"transformer": "t.yaml", "glat": "g.yaml"},
                                   rows=[StudyRow("transformer", "softmax"), StudyRow("glat", "softmax")],
                                   directions=["en-de"], test_sets=["test2016"],
                                   latency=Latency(batch_sizes=[1, 64]))

    def record(row, seed, bleu, collapsed, speed):
        rec = {"finished": True, "direction": "en-de", "row": row, "seed": seed,
               "tests": {"test2016": {"bleu": bleu}},
               "latency": {"batch_sizes": {"1": {"sentences_per_s": speed}, "64": {"sentences_per_s": 4 * speed}}}}
        if collapsed is not None:
            rec["tests_collapsed"] = {"test2016": {"bleu": collapsed}}
        return rec

    results = {"a": record("transformer/softmax", 0, 32.0, None, 10.0),
               "b": record("transformer/softmax", 1, 31.0, None, 10.0),
               "c": record("glat/softmax", 0, 25.0, 26.0, 40.0), "d": record("glat/softmax", 1, 25.5, 26.5, 40.0)}
    text = "\n".join(_requirements(results, study))
    assert "31.50 BLEU (at least the 30" in text
    assert "25.25 BLEU, 6.25 below the AR model (more than 6); with runs collapsed 26.25, 5.25 below (within 6)" in text
    assert "batch 1: GLAT 40.0 sentences/s against beam search 10.0 (4.0×)" in text
    # without the GLAT softmax row there is nothing to check
    del results["c"], results["d"]
    assert _requirements(results, study) == []


def test_report_states_the_papers_comparisons_beside_the_study_means():
    from amlp.tasks.translation.study import StudyRow, TranslationStudyConfig, _paper_comparisons

    rows = [StudyRow("glat", "softmax"), StudyRow("glat", "abc"),
            StudyRow("glat", "amlp-pquery:form=official,landmarks=16,ema=0.99")]
    study = TranslationStudyConfig(configs={"glat": "g.yaml"}, rows=rows, directions=["en-de", "de-en"],
                                   test_sets=["test2016"])

    def record(direction, row, seed, bleu):
        return {f"{direction}/{row}/{seed}": {"finished": True, "direction": direction, "row": row, "seed": seed,
                                              "tests": {"test2016": {"bleu": bleu}}}}

    pquery = rows[2].key
    results = (record("en-de", "glat/softmax", 0, 26.0) | record("en-de", pquery, 0, 24.0)
               | record("en-de", pquery, 1, 25.0) | record("de-en", "glat/abc", 0, 20.0))
    text = "\n".join(_paper_comparisons(results, study))
    assert text.startswith("## The paper's comparisons (test2016 BLEU, means over seeds)")
    assert ("- en → de: GLAT (AMLP-PQuery `form=official,landmarks=16,ema=0.99`) 24.50 against GLAT (softmax) 26.00 "
            "(-1.50; 2 and 1 seed(s)); the paper on WMT14: 25.00 against 26.24 (-1.24).") in text
    # a pair with one row unfinished is left out: no en-de ABC cell, no de-en AMLP-PQuery cell
    assert "GLAT (ABC)" not in text and "de → en" not in text
    assert _paper_comparisons({}, study) == []


def test_report_shows_an_earlier_protocol_beside_this_one():
    from amlp.tasks.translation.study import (EarlierProtocol, StudyRow, TranslationStudyConfig, _earlier,
                                              load_translation_study)

    study = TranslationStudyConfig(configs={"transformer": "t.yaml", "glat": "g.yaml"},
                                   rows=[StudyRow("transformer", "softmax"), StudyRow("glat", "softmax"),
                                         StudyRow("glat", "abc")],
                                   directions=["en-de"], test_sets=["test2016"])

    def record(row, seed, bleu):
        return {f"en-de/{row}/seed{seed}": {"finished": True, "direction": "en-de", "row": row, "seed": seed,
                                            "tests": {"test2016": {"bleu": bleu}}}}

    now = record("transformer/softmax", 0, 32.0) | record("glat/softmax", 0, 27.0)
    before = record("glat/softmax", 0, 25.0) | record("glat/softmax", 1, 26.0) | record("glat/abc", 0, 20.0)
    text = "\n".join(_earlier(EarlierProtocol("x.json", "GLAT trained 3,200 steps"), before, now, study))
    assert text.startswith("## Earlier protocol: GLAT trained 3,200 steps")
    assert "| en → de | GLAT (softmax) | 25.50 ± 0.71 | 2 | 27.00¹ | 1 |" in text
    assert "| en → de | GLAT (ABC) | 20.00¹ | 1 | — | — |" in text
    assert "Tr (softmax)" not in text  # no earlier cell of it
    assert "GLAT (softmax) was 6.50 BLEU below the AR Transformer" in text
    assert _earlier(EarlierProtocol("x.json", "y"), {}, now, study) == []
    # the committed study names its earlier protocol's records, and they exist
    root = Path(__file__).resolve().parents[1]
    committed = load_translation_study(root / "configs/translation/study/cpu.yaml")
    assert committed.earlier and all((root / e.records).is_file() for e in committed.earlier)


def test_report_shows_rows_outside_the_grid_beside_the_grids_row():
    from amlp.tasks.translation.study import StudyRow, TranslationStudyConfig, _other_rows

    study = TranslationStudyConfig(configs={"transformer": "t.yaml", "glat": "g.yaml"},
                                   rows=[StudyRow("transformer", "softmax"), StudyRow("glat", "abc:landmarks=16")],
                                   other_rows=[StudyRow("glat", "abc"), StudyRow("glat", "performer")],
                                   other_rows_note="At the TTS sizes.", directions=["en-de"],
                                   test_sets=["test2016", "test2017"])
    study.validate()

    def record(row, seed, bleu):
        return {f"en-de/{row}/seed{seed}": {"finished": True, "direction": "en-de", "row": row, "seed": seed,
                                            "tests": {"test2016": {"bleu": bleu}, "test2017": {"bleu": bleu - 8}}}}

    results = (record("transformer/softmax", 0, 32.0) | record("glat/abc", 0, 25.0)
               | record("glat/abc:landmarks=16", 0, 22.0) | record("glat/abc:landmarks=16", 1, 23.0))
    text = "\n".join(_other_rows(results, study))
    assert text.startswith("## Rows outside the grid\n\nAt the TTS sizes.")
    assert "| en → de | GLAT (ABC) | 25.00¹ | 17.00¹ | 1 | GLAT (ABC `landmarks=16`) | 22.50 ± 0.71 |" in text
    assert "Performer" not in text  # no finished cell of it
    assert _other_rows(record("transformer/softmax", 0, 32.0), study) == []


def test_study_file_refuses_an_other_row_that_is_in_the_grid():
    from amlp.tasks.translation.study import StudyRow, TranslationStudyConfig

    study = TranslationStudyConfig(configs={"transformer": "t.yaml"}, rows=[StudyRow("transformer", "softmax")],
                                   other_rows=[StudyRow("transformer", "softmax")])
    with pytest.raises(ValueError, match="'other_rows': 'transformer/softmax' is a row of the grid"):
        study.validate()
    study.other_rows = [StudyRow("rnn", "softmax")]
    with pytest.raises(ValueError, match="has no arch of transformer, glat"):
        study.validate()


def test_committed_study_runs_the_efficient_rows_at_the_papers_mt_sizes():
    """AMLP paper Table 8, MT column: local window 5, ABC 16 slots, Performer 16 features, AMLP 16 landmarks."""
    from amlp.tasks.translation.study import load_translation_study

    study = load_translation_study(Path(__file__).resolve().parents[1] / "configs/translation/study/cpu.yaml")
    mechanisms = {r.mechanism for r in study.rows}
    assert {"local:wsize=5", "abc:landmarks=16", "performer:approx_attn_dim=16"} <= mechanisms
    assert all("landmarks=16" in m for m in mechanisms if m.startswith("amlp-"))
    assert {r.key for r in study.other_rows} == {"transformer/local", "transformer/performer", "glat/abc"}
