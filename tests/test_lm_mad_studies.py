"""The language-modelling and MAD studies: their grids, one tiny cell of each run end to end, the
reports, skipping finished cells, the refusal to write the tracked document from an incomplete grid,
and the CLI commands."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from amlp.cli import app
from amlp.tasks.lm.matching import match_params, model_options
from amlp.tasks.lm.study import (LMStudyConfig, check_causal_mechanism, load_lm_study, mechanism_overrides,
                                 report_checks, run_lm_study, study_cells, training_throughput)
from amlp.tasks.mad import MAD_TASK_NAMES
from amlp.tasks.mad.study import (PAPER_ROWS, PAPER_TABLE1_MAD, MADStudyConfig, load_mad_study, mad_checks,
                                  mad_row_score, run_mad_study, study_tasks)
from amlp.tasks.mad.study import study_cells as mad_cells
from amlp.train.config import from_dict, load_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
LM_STUDY = ROOT / "configs" / "lm" / "study" / "cpu.yaml"
MAD_STUDY = ROOT / "configs" / "mad" / "study" / "cpu.yaml"
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the grids ---------------------------------------------------------------------------------------------
def test_lm_study_grid():
    study = load_lm_study(LM_STUDY)
    study.validate()
    assert study.sizes == [400000, 830000]
    assert load_config(ROOT / study.config).model.match_params == 830000
    cells = study_cells(study)
    assert len(study.mechanisms) == 11
    assert len(cells) == 2 * (4 * 3 + 7 * 1) == 38
    assert len({(n, m, s) for n, m, s in cells}) == len(cells)
    for mech in study.mechanisms:
        for size in study.sizes:
            seeds = sorted(s for n, m, s in cells if m == mech and n == size)
            assert seeds == ([0, 1, 2] if mech in ("softmax", "linear", "causal-rn", "hyper-glu") else [0])
    assert (400000, "amlp-cov:form=stable,landmarks=16", 0) in cells
    assert mechanism_overrides("amlp-cov:form=stable,landmarks=16") == [
        "model.mixer=amlp-cov", 'model.mixer_options.amlp-cov.form="stable"',
        "model.mixer_options.amlp-cov.landmarks=16"]


def test_lm_report_checks_the_softmax_target_in_nats_and_states_the_claims():
    study = load_lm_study(LM_STUDY)
    assert report_checks({}, study) == []

    def rec(size, mech, seed, bpc):
        return {f"{size}/{mech}/seed{seed}": {"finished": True, "size": size, "mechanism": mech, "seed": seed,
                                              "bpc": bpc}}

    results = {}
    # 2.3 bits = 1.594 nats (held in nats, not in bits); 2.4 bits = 1.664 nats (held in neither)
    for seed, bpc in enumerate([2.29, 2.30, 2.31]):
        results |= rec(830000, "softmax", seed, bpc)
    results |= rec(400000, "softmax", 0, 2.4)
    for seed, bpc in enumerate([2.40, 2.41, 2.42]):
        results |= rec(830000, "linear", seed, bpc) | rec(830000, "causal-rn", seed, bpc - 0.005)
    results |= rec(830000, "hyper-mlp", 0, 2.20)
    text = "\n".join(report_checks(results, study))
    assert "Softmax at 830,000 parameters: 1.594 nats per character (2.300 bits, 3 seed(s)): held in nats, " \
           "not held in bits." in text
    assert "Softmax at 400,000 parameters: 1.664 nats per character (2.400 bits, 1 seed(s)): not held in nats, " \
           "not held in bits." in text
    # -0.005 bits = -0.003 nats, inside the seeds' std of 0.01 bits = 0.007 nats
    assert "CausalRN (linear form) minus linear attention, validation loss per character: 830,000: -0.003 nats " \
           "(3 and 3 seed(s); within the larger seed std, 0.007)" in text
    assert "HyperMLP minus softmax, validation loss per character: 830,000: -0.069 nats (1 and 3 seed(s))." in text
    assert "HyperGLU minus" not in text  # no finished HyperGLU cell, no line


def test_lm_report_shows_an_earlier_protocol_beside_this_one():
    from amlp.tasks.lm.study import _earlier
    from amlp.train.study_common import EarlierProtocol

    study = load_lm_study(LM_STUDY)

    def rec(size, mech, seed, bpc):
        return {f"{size}/{mech}/seed{seed}": {"finished": True, "size": size, "mechanism": mech, "seed": seed,
                                              "bpc": bpc}}

    before = rec(400000, "causal-rn", 0, 2.85) | rec(400000, "causal-rn", 1, 2.81)
    now = rec(400000, "causal-rn", 0, 2.5) | rec(400000, "softmax", 0, 2.4)
    text = "\n".join(_earlier(EarlierProtocol("x.json", "CausalRN with h = E"), before, now, study))
    assert text.startswith("## Earlier protocol: CausalRN with h = E")
    assert "| 400,000 | CausalRN | 2.830 ± 0.028 | 2 | 2.500¹ | 1 |" in text
    assert "softmax" not in text.split("|---|")[-1]  # no earlier softmax cell, no row
    assert _earlier(EarlierProtocol("x.json", "y"), {}, now, study) == []
    # the committed study names its earlier protocols' records, and they exist
    assert study.earlier and all((ROOT / e.records).is_file() for e in study.earlier)


def test_every_lm_row_is_matched_at_each_size():
    study = load_lm_study(LM_STUDY)
    base = load_config(ROOT / study.config)
    m = base.model
    for mech in study.mechanisms:
        cfg = load_config(ROOT / study.config, mechanism_overrides(mech))
        for size in study.sizes:
            # tiny Shakespeare's training text has 65 characters
            r = match_params(size, vocab_size=65, max_length=base.data.seq_len, dim=m.dim, heads=m.heads,
                             n_layers=m.n_layers, mixer=cfg.model.mixer, block=m.block, mlp_ratio=m.mlp_ratio,
                             mixer_options=model_options(cfg.model.mixer, cfg.model.options, base.data.seq_len),
                             by=m.match_by, tolerance=m.match_tolerance)
            assert r.within(m.match_tolerance), (mech, size, r.describe())


def test_mad_study_grid():
    study = load_mad_study(MAD_STUDY)
    study.validate()
    tasks = study_tasks(study, ROOT)
    assert list(tasks) == list(MAD_TASK_NAMES)
    cells = mad_cells(study, list(tasks))
    assert len(study.mechanisms) == 12 and len(study.ablations) == 7
    assert len(cells) == 19 * 6 * 1 == 114
    assert {s for _, _, s in cells} == {0}
    assert "hyper-mlp:sequence_mixing=none" in study.ablations and "hyper-glu:sequence_mixing=qk" in study.ablations
    assert "hyper-mlp:layout=absolute" in study.ablations and "hyper-glu:layout=absolute" in study.ablations
    assert all(m.split(":")[0] in ("hyper-mlp", "hyper-glu") for m in study.ablations)
    assert PAPER_TABLE1_MAD == {"R-cg-q": 66.78, "R-cg-q-12o": 81.01}
    assert set(PAPER_ROWS) <= set(study.rows)


def test_mechanisms_must_build_causally():
    with pytest.raises(ValueError, match="no causal form"):
        check_causal_mechanism("amlp-cov:form=official,landmarks=16")
    with pytest.raises(ValueError, match="sequence_mixing"):
        check_causal_mechanism("hyper-glu:sequence_mixing=sometimes")
    with pytest.raises(ValueError, match="more_seeds"):
        from_dict(LMStudyConfig, {"config": "x.yaml", "mechanisms": ["softmax"], "sizes": [1000],
                                  "more_seeds": {"mechanisms": ["abc"]}}).validate()
    with pytest.raises(ValueError, match="distinct"):
        from_dict(MADStudyConfig, {"configs": ["x.yaml"], "mechanisms": ["hyper-glu"],
                                   "ablations": ["hyper-glu"]}).validate()


def test_mad_row_score_needs_all_six_tasks():
    results = {f"{t}/softmax/seed0": {"finished": True, "task": t, "mechanism": "softmax", "seed": 0,
                                      "test": {"acc": 0.1 * (i + 1)}} for i, t in enumerate(MAD_TASK_NAMES)}
    assert mad_row_score(results, "softmax", list(MAD_TASK_NAMES)) == pytest.approx(35.0)
    del results["memorization/softmax/seed0"]
    assert mad_row_score(results, "softmax", list(MAD_TASK_NAMES)) is None


def test_mad_checks_compare_the_rows_of_each_paper_finding():
    study = load_mad_study(MAD_STUDY)
    tasks = list(MAD_TASK_NAMES)
    assert mad_checks({}, study, tasks) == []

    def row(mech, acc, only=None):
        return {f"{t}/{mech}/seed0": {"finished": True, "mechanism": mech, "task": t, "seed": 0, "test": {"acc": acc}}
                for t in (only or tasks)}

    results = (row("hyper-mlp", 0.9) | row("hyper-mlp:sequence_mixing=none", 0.7) | row("hyper-mlp:layout=absolute", 0.5)
               | row("hyper-glu", 0.8) | row("hyper-glu:layout=absolute", 0.85, only=tasks[:5]))
    text = "\n".join(mad_checks(results, study, tasks))
    assert "- The paper: sequence mixing is the dominant gain (R-cg-q 66.78 to R-cg-q-12o 81.01). Here: HyperMLP " \
           "90.00 against HyperMLP `sequence_mixing=none` 70.00 (+20.00)." in text
    assert "removing the lag layout collapses performance. Here: HyperMLP 90.00 against HyperMLP " \
           "`layout=absolute` 50.00 (+40.00)." in text
    # HyperGLU without the lag layout lacks a task: no score, no comparison; no pair at all: no line
    assert "HyperGLU `layout=absolute`" not in text and "two-sided" not in text


def test_training_throughput_reads_the_logged_windows(tmp_path):
    rows = ["step,epoch,loss,lr,grad_norm,samples_per_s,elapsed_s"]
    rows += [f"{s},0,1,0.001,1,{'nan' if s < 2 else (10 if s < 4 else 20)},0" for s in range(1, 7)]
    (tmp_path / "train_log.csv").write_text("\n".join(rows) + "\n")
    # windows at steps 2, 4, 6 (log_every 2): 10, 20, 20 samples/s -> median 20, times 8 characters
    assert training_throughput(tmp_path, 8, 2) == 160


def test_measure_training_times_the_steps_it_is_asked_for_and_refuses_what_it_cannot_time(tmp_path):
    from amlp.train.study_common import measure_training

    data = tmp_path / "data" / "tinyshakespeare"
    data.mkdir(parents=True)
    (data / "input.txt").write_text(_text())
    cfg = load_config(ROOT / "configs/lm/cpu/softmax.yaml", [f"data.data_dir={tmp_path / 'data'}", *LM_TINY])
    timing = measure_training(cfg, steps=3, warmup=2)
    assert timing["steps"] == 3 and timing["warmup"] == 2 and timing["seconds_per_step"] > 0 and timing["threads"] == 1
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        measure_training(cfg, steps=3, warmup=0)
    big = load_config(ROOT / "configs/lm/cpu/softmax.yaml",
                      [f"data.data_dir={tmp_path / 'data'}", *LM_TINY, "train.batch_size=64"])
    with pytest.raises(ValueError, match="needs an epoch of at least that many batches"):
        measure_training(big, steps=400, warmup=1)


# -- one tiny cell of each, end to end ------------------------------------------------------------------------
def _text(n_lines=150, seed=0) -> str:
    rng = random.Random(seed)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    return "\n".join(f"{rng.choice(['HAMLET', 'OPHELIA'])}:\n" + " ".join(rng.choice(words) for _ in range(6)) + ".\n"
                     for _ in range(n_lines))


LM_TINY = ["data.seq_len=16", "model.dim=16", "model.heads=2", "model.n_layers=1", "model.match_tolerance=0.05",
           "model.mixer_options.hyper-glu={max_lag: 16, rank: 4}", "train.batch_size=4", "train.max_steps=4",
           "train.eval_every=2", "train.checkpoint_every=0", "train.warmup_steps=0", "train.log_every=2", "train.progress=false", "train.threads=1"]


def _lm_study(tmp_path, **extra) -> LMStudyConfig:
    data = tmp_path / "data"
    (data / "tinyshakespeare").mkdir(parents=True, exist_ok=True)
    (data / "tinyshakespeare" / "input.txt").write_text(_text())
    (tmp_path / "lm.yaml").write_text(json.dumps(read_yaml(ROOT / "configs" / "lm" / "cpu" / "softmax.yaml")))
    raw = {"config": "lm.yaml", "mechanisms": ["softmax", "hyper-glu"], "sizes": [6000],
           "more_seeds": {"seeds": [0, 1], "mechanisms": ["softmax"]}, "run_root": "runs/lm", "doc": "docs/lm.md",
           "generation": {"prompt": "HAMLET:", "new_tokens": 12, "threads": 1, "warmup_tokens": 2},
           "overrides": [f"data.data_dir={data}", *LM_TINY], **extra}
    return from_dict(LMStudyConfig, raw)


def test_lm_study_runs_a_cell_writes_the_report_and_refuses_the_doc(tmp_path):
    study = _lm_study(tmp_path)
    logs: list[str] = []
    report = run_lm_study(study, command="amlp study lm", mechanisms=["softmax"], seeds=[0], root=tmp_path,
                          log=logs.append)
    assert report == tmp_path / "runs/lm/report.md"
    results = json.loads((tmp_path / "runs/lm/results.json").read_text())
    assert list(results) == ["6000/softmax/seed0"]
    rec = results["6000/softmax/seed0"]
    assert rec["finished"] and rec["steps"] == 4 and rec["bpc"] > 0
    assert abs(rec["params"] / 6000 - 1) <= 0.05 and rec["matched"]
    assert rec["train_chars_per_s"] > 0 and rec["generation"]["tokens_per_second"] > 0
    assert len(rec["generation"]["text"]) == 12 and rec["generation"]["threads"] == 1
    assert [c[0] for c in rec["curve"]] == [2, 4]
    text = report.read_text()
    assert "## 6,000 parameters" in text and "| HyperGLU ¹ | — |" in text
    # the row shows the cell's own numbers
    assert (f"| softmax | {rec['bpc']:.3f}¹ | 1 of 2 | {int(rec['params']):,} (dim " in text
            and f" | {rec['train_chars_per_s']:.0f}¹ | {rec['generation']['tokens_per_second']:.1f}¹ |" in text)
    assert "1 of 2" in text and "tokens / s" in text
    # the text each model wrote, after its prompt (HyperGLU has no finished cell: not shown)
    samples = text[text.index("## Generated text"):text.index("## Protocol")]
    assert f"softmax:\n\n```text\nHAMLET:{rec['generation']['text']}\n```" in samples
    assert "HyperGLU" not in samples
    assert "timed when its training finished" in text and "logged windows" in text
    # retiming: the finished cell's speeds are measured again in one pass, nothing is trained
    logs.clear()
    run_lm_study(study, command="amlp study lm", root=tmp_path, retime=True, log=logs.append)
    timed = json.loads((tmp_path / "runs/lm/results.json").read_text())["6000/softmax/seed0"]
    assert timed["during_training"]["train_chars_per_s"] == rec["train_chars_per_s"]
    assert timed["train_chars_per_s"] > 0 and timed["train_machine"]["steps"] == 20
    assert timed["generation"]["tokens_per_second"] > 0 and timed["bpc"] == rec["bpc"] and timed["steps"] == 4
    assert not any("training in" in line for line in logs)
    assert any("hyper-glu/seed0: not finished, nothing to time" in line for line in logs)
    text = report.read_text()
    assert f"timed again in one pass, one after another (`amlp study lm --retime`, started {timed['timing_pass']})" in text
    assert "20 steps of each cell's config" in text
    # the second run skips the finished cell
    logs.clear()
    run_lm_study(study, command="amlp study lm", mechanisms=["softmax"], seeds=[0], root=tmp_path, log=logs.append)
    assert any("6000/softmax/seed0: done before, skipped" in line for line in logs)
    # the tracked document needs the whole grid: refused before any work, nothing written
    with pytest.raises(ValueError, match="hyper-glu/seed0"):
        run_lm_study(study, command="amlp study lm", write_doc=True, doc_only=True, root=tmp_path)
    with pytest.raises(ValueError, match="6000/softmax/seed1"):
        run_lm_study(study, command="amlp study lm", mechanisms=["hyper-glu"], write_doc=True, root=tmp_path)
    assert not (tmp_path / "docs").exists()
    with pytest.raises(ValueError, match="--sizes"):
        run_lm_study(study, command="amlp study lm", sizes=[5], root=tmp_path)
    # a study whose grid is that one cell writes its document and the learning-curve figure
    whole = _lm_study(tmp_path, mechanisms=["softmax"], more_seeds=None)
    doc = run_lm_study(whole, command="amlp study lm --write-doc", write_doc=True, doc_only=True, root=tmp_path)
    assert doc == tmp_path / "docs/lm.md"
    assert (tmp_path / "docs/figures/lm_learning_curves.png").stat().st_size > 0
    assert "figures/lm_learning_curves.png" in doc.read_text()


def test_lm_study_records_carry_the_grid_to_a_machine_without_its_run_folders(tmp_path):
    import shutil

    study = _lm_study(tmp_path, mechanisms=["softmax"], more_seeds=None, records="tracked/lm.json")
    run_lm_study(study, command="amlp study lm", root=tmp_path, log=lambda line: None)
    tracked = json.loads((tmp_path / "tracked/lm.json").read_text())
    assert list(tracked) == ["6000/softmax/seed0"]
    rec = tracked["6000/softmax/seed0"]
    shutil.rmtree(tmp_path / "runs")  # another machine: only the repository is there
    logs: list[str] = []
    run_lm_study(study, command="amlp study lm", root=tmp_path, retime=True, log=logs.append)
    assert not any("training in" in line for line in logs)
    timed = json.loads((tmp_path / "runs/lm/results.json").read_text())["6000/softmax/seed0"]
    assert timed == json.loads((tmp_path / "tracked/lm.json").read_text())["6000/softmax/seed0"]
    # the generation speed comes from the cell's model untrained; the sample stays the trained model's
    assert timed["generation"]["untrained"] and timed["generation"]["tokens_per_second"] > 0
    assert timed["generation"]["text"] == rec["generation"]["text"]
    doc = run_lm_study(study, command="amlp study lm --write-doc", write_doc=True, root=tmp_path,
                       log=logs.append)
    text = doc.read_text()
    assert "from `tracked/lm.json`" in text and "timed with the cell's model untrained" in text


def test_lm_study_cell_on_more_threads_stays_in_the_protocol_and_is_timed_again_on_the_protocols(tmp_path):
    study = _lm_study(tmp_path, mechanisms=["softmax"], more_seeds=None, records="tracked/lm.json")
    report = run_lm_study(study, command="amlp study lm", root=tmp_path, extra_overrides=["train.threads=2"],
                          log=lambda line: None)
    rec = json.loads((tmp_path / "tracked/lm.json").read_text())["6000/softmax/seed0"]
    assert rec["finished"] and rec["train"]["threads"] == 2 and "train.threads=2" in rec["overrides"]
    text = report.read_text()
    assert "1 cell(s) trained with another thread count than the protocol's (6,000 softmax seed 0)" in text
    # without the override the cell is the protocol's: done, not refused as another protocol's
    logs: list[str] = []
    run_lm_study(study, command="amlp study lm", root=tmp_path, log=logs.append)
    assert any("6000/softmax/seed0: done before, skipped" in line for line in logs)
    run_lm_study(study, command="amlp study lm", root=tmp_path, retime=True, log=lambda line: None)
    timed = json.loads((tmp_path / "tracked/lm.json").read_text())["6000/softmax/seed0"]
    assert timed["train_machine"]["threads"] == 1 and timed["during_training"]
    assert "another thread count" not in report.read_text()


MAD_TINY = ["data.seq_len=16", "data.train_examples=64", "data.val_examples=16", "data.test_examples=32",
            "model.dim=16", "train.batch_size=16", "train.max_steps=3", "train.eval_every=0",
            "train.checkpoint_every=0", "train.warmup_steps=0", "train.progress=false", "train.threads=1"]


def _mad_study(tmp_path, **extra) -> MADStudyConfig:
    (tmp_path / "icr.yaml").write_text(json.dumps(read_yaml(ROOT / "configs/mad/cpu/in-context-recall.yaml")))
    raw = {"configs": ["icr.yaml"], "mechanisms": ["softmax"], "ablations": ["hyper-glu:sequence_mixing=none"],
           "run_root": "runs/mad", "doc": "docs/mad.md", "overrides": MAD_TINY, **extra}
    return from_dict(MADStudyConfig, raw)


def test_mad_study_runs_a_cell_writes_the_report_and_refuses_the_doc(tmp_path):
    study = _mad_study(tmp_path)
    logs: list[str] = []
    report = run_mad_study(study, command="amlp study mad", mechanisms=["softmax"], root=tmp_path, log=logs.append)
    results = json.loads((tmp_path / "runs/mad/results.json").read_text())
    rec = results["in-context-recall/softmax/seed0"]
    assert rec["finished"] and rec["steps"] == 3 and 0 <= rec["test"]["acc"] <= 1
    text = report.read_text()
    assert "in-context recall" in text
    # the row shows the cell's own numbers: accuracy in percent (one seed), no MAD score from one task
    assert f"| softmax | {100 * rec['test']['acc']:.2f}¹ | — | 1 | {int(rec['test']['params']):,} |" in text
    assert "| HyperGLU `sequence_mixing=none` | — |" in text
    assert "66.78" in text and "81.01" in text and "Table 1" in text and "removing the lag layout" in text
    logs.clear()
    run_mad_study(study, command="amlp study mad", mechanisms=["softmax"], root=tmp_path, log=logs.append)
    assert any("in-context-recall/softmax/seed0: done before, skipped" in line for line in logs)
    # the finished cell ran 3 steps: under a protocol of 4 it is neither skipped nor reported as done
    longer = _mad_study(tmp_path, overrides=[o for o in MAD_TINY if not o.startswith("train.max_steps")]
                        + ["train.max_steps=4"])
    for doc_only in (False, True):
        with pytest.raises(ValueError, match="in-context-recall/softmax/seed0: train.max_steps: 3 -> 4"):
            run_mad_study(longer, command="amlp study mad", root=tmp_path, doc_only=doc_only, log=logs.append)
    with pytest.raises(ValueError, match="in-context-recall/hyper-glu:sequence_mixing=none/seed0"):
        run_mad_study(study, command="amlp study mad", write_doc=True, doc_only=True, root=tmp_path)
    assert not (tmp_path / "docs").exists()
    with pytest.raises(ValueError, match="--tasks"):
        run_mad_study(study, command="amlp study mad", tasks=["copying"], root=tmp_path)
    whole = _mad_study(tmp_path, ablations=[])
    doc = run_mad_study(whole, command="amlp study mad --write-doc", write_doc=True, doc_only=True, root=tmp_path)
    assert doc == tmp_path / "docs/mad.md" and "| softmax |" in doc.read_text()


def test_cli_study_commands(tmp_path):
    lm = _lm_study(tmp_path)
    lm_file = tmp_path / "lm_study.yaml"
    lm_file.write_text(json.dumps({"config": str(tmp_path / "lm.yaml"), "mechanisms": lm.mechanisms,
                                   "sizes": lm.sizes, "run_root": str(tmp_path / "runs/lm"),
                                   "doc": str(tmp_path / "docs/lm.md")}))
    res = runner.invoke(app, ["study", "lm", "--config", str(lm_file), "--report-only"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs/lm/report.md").is_file()
    res = runner.invoke(app, ["study", "lm", "--config", str(lm_file), "--write-doc", "--report-only"])
    assert res.exit_code == 1 and "not writing" in res.output
    # --mechanisms takes ',' as the other studies do, and ';'; options after ',' stay with their name
    for text in ("softmax,hyper-glu", "softmax;hyper-glu"):
        res = runner.invoke(app, ["study", "lm", "--config", str(lm_file), "--mechanisms", text, "--report-only"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["study", "lm", "--config", str(lm_file), "--mechanisms",
                              "softmax,amlp-cov:form=stable,landmarks=16", "--report-only"])
    assert res.exit_code == 1 and "--mechanisms: 'amlp-cov:form=stable,landmarks=16' not in this study" in res.output
    mad = _mad_study(tmp_path)
    mad_file = tmp_path / "mad_study.yaml"
    mad_file.write_text(json.dumps({"configs": [str(tmp_path / "icr.yaml")], "mechanisms": mad.mechanisms,
                                    "run_root": str(tmp_path / "runs/mad"), "doc": str(tmp_path / "docs/mad.md")}))
    res = runner.invoke(app, ["study", "mad", "--config", str(mad_file), "--report-only"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs/mad/report.md").is_file()
    res = runner.invoke(app, ["study", "mad", "--config", str(mad_file), "--tasks", "nope", "--report-only"])
    assert res.exit_code == 1 and "--tasks" in res.output
