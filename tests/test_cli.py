"""Every subcommand, given a bad argument, exits with a one-line message and no traceback."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from amlp.cli import app

ROOT = Path(__file__).resolve().parents[1]
TOY = ["train", "toy-regression", "--config"]


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "toy.yaml"
    path.write_text("task: toy-regression\nseed: 0\ntrain: {batch_size: 8, max_steps: 2, progress: false}\n")
    return str(path)


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("f") / "plain-file"
    path.write_text("not a folder")
    return str(path)


def cases(toy, a_file):
    study_f = str(ROOT / "configs/forecasting/study/cpu.yaml")
    study_r = str(ROOT / "configs/recall/study/cpu.yaml")
    return [
        (["check", "nope"], "unknown mixer(s) 'nope'"),
        (["eval", "--checkpoint", "/nowhere/at/all"], "does not exist"),
        (["eval", "--checkpoint", a_file], "is a file; a checkpoint is a folder"),
        (["train", "copying", "--config", str(ROOT / "configs")], "is a folder; give a YAML file"),
        (["translate", "--checkpoint", a_file, "-i", "/nowhere/in.txt"], "No such file or directory: '/nowhere/in.txt'"),
        (["train", "forecasting", "--config", "/nowhere.yaml"], "does not exist"),
        (["train", "copying", "--config", "/nowhere.yaml"], "does not exist"),
        (["train", "mqar", "--config", "/nowhere.yaml"], "does not exist"),
        (TOY + [toy, "--run-dir", a_file + "/run"], "Not a directory"),
        (TOY + [toy, "--run-dir", a_file], "is a file; choose another --run-dir"),
        (["generate", "--checkpoint", "/nowhere/at/all", "--prompt", "A", "-t", "nan"], "finite number >= 0"),
        (TOY + [toy, "--run-dir", a_file + "/run", "--set", "model.hidden=[unclosed"], "not valid YAML"),
        (TOY + [toy, "--run-dir", a_file + "/x", "--set", "train.lr=-1"], "train.lr"),
        (TOY + [toy, "--set", "model.hidden=[1, 2]"], "[1, 2]"),  # brackets printed literally
        (["train", "toy-regression"], "give --config"),
        (["train", "copying", "--config", str(ROOT / "configs/recall/copying_cpu.yaml"), "--run-dir", a_file + "/x",
          "--set", "model.mixer_options.amlp_cov.form=official"], "'amlp_cov' is not a registered mixer"),
        (["study", "forecasting", "--config", study_f, "--seeds", "x"], "--seeds must be comma-separated integers"),
        (["study", "forecasting", "--config", study_f, "--mechanisms", "sofmax"], "unknown mechanism 'sofmax'"),
        (["study", "forecasting", "--config", "/nowhere.yaml"], "does not exist"),
        (["study", "lm", "--config", str(ROOT / "configs/lm/cpu/softmax.yaml")], "is a training config (task: 'lm')"),
        (["study", "forecasting", "--config", str(ROOT / "configs/forecasting/cpu/etth1_S.yaml")],
         "not a study file"),
        (["study", "recall", "--config", study_r, "--seeds", "x"], "--seeds must be comma-separated integers"),
        (["study", "recall", "--config", study_r, "--mechanisms", "sofmax"], "unknown mechanism 'sofmax'"),
        (["study", "recall", "--config", study_r, "--tasks", "copy"], "--tasks: 'copy'"),
        (["study", "recall", "--config", study_r, "--tasks", "mqar", "--pairs", "-1"],
         "'data.num_pairs' must be >= 1, got -1"),  # refused before the first cell trains
        (["data", "download", "nope"], "unknown data set 'nope'"),
        (["bench", "ops", "--mixers", "nope"], "unknown mixer 'nope'"),
        (["bench", "ops", "--quick", "--mixers", "softmax", "--out", a_file + "/out"], "cannot be created"),
        (["bench", "generation", "--lengths", "x"], "not an integer"),
        (["bench", "generation", "--quick", "--out", a_file + "/out"], "cannot be created"),
        (["bench", "step", "--positions", "x"], "--positions must be comma-separated integers"),
        (["bench", "step", "--mixers", "nope"], "unknown mixer 'nope'"),
        (["bench", "step", "--out", a_file + "/out"], "cannot be created"),
        (["bench", "plot", "/nowhere/at/all"], "/nowhere/at/all"),
        (["bench", "report", "/nowhere/at/all"], "/nowhere/at/all"),
        (["bench", "peers", "--pairs", "nope"], "unknown pair(s) 'nope'"),
        (["bench", "peers", "--released-amlp", "/nowhere/at/all/amlp.py"], "does not exist"),
        (["bench", "peers", "--quick", "--pairs", "softmax", "--out", a_file + "/out"], "cannot be created"),
        (["bench", "ops", "--quick", "--device", "foo"], "device must be auto, cpu, cuda or cuda:N, got 'foo'"),
        (["bench", "ops", "--quick", "--threads", "-2"], "threads must be >= 0"),
        (["bench", "ops", "--quick", "--min-run-time", "-1"], "min_run_time must be > 0"),
        (["bench", "generation", "--quick", "--activation", "bogus"], "activation must be one of"),
        (["bench", "step", "--device", "foo"], "device must be auto, cpu, cuda or cuda:N"),
        (["bench", "step", "--threads", "-1"], "threads must be >= 0"),
        (["bench", "step", "--mixers", "softmax", "--dim", "8", "--heads", "3"], "dim must be divisible by heads"),
        (["bench", "step", "--mixers", ","], "no mixers to measure"),
        (["eval", "--checkpoint", "/nowhere/at/all", "--device", "foo"], "does not exist"),
        # output paths are checked before the model is loaded
        (["translate", "--checkpoint", "/nowhere/at/all", "-o", str(ROOT)], "is a folder; give a file name"),
        (["translate", "--checkpoint", "/nowhere/at/all", "-o", a_file + "/x.txt"], "is not a writable folder"),
        (["upscale", a_file, str(ROOT), "--checkpoint", "/nowhere/at/all"], "is a folder; give a file name"),
    ]


def test_bad_arguments_give_one_line_errors_without_tracebacks(toy_config, a_file):
    runner = CliRunner()
    for args, needle in cases(toy_config, a_file):
        res = runner.invoke(app, args)
        assert res.exit_code in (1, 2), (args, res.exit_code, res.output)
        assert "Traceback" not in res.output, (args, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
        assert needle in res.output, (args, res.output)
        # the error goes to stderr: a redirected or piped output does not hide it
        assert needle in res.stderr and "error:" not in res.stdout, (args, res.stdout)


def test_a_diverging_run_is_a_message_not_a_traceback(toy_config, tmp_path):
    res = CliRunner().invoke(app, TOY + [toy_config, "--run-dir", str(tmp_path / "r"), "--set", "train.lr=1e30",
                                         "--set", "train.max_steps=20"])
    assert res.exit_code == 1 and "lower train.lr" in res.output and "Traceback" not in res.output


def test_saved_results_that_are_not_amlp_bench_output_are_one_line_errors(tmp_path, a_file):
    runner = CliRunner()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ops.json").write_text("not json")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ops.json").write_text("{}")
    for args, needle in ((["bench", "plot", str(tmp_path / "junk")], "not valid JSON"),
                         (["bench", "report", str(tmp_path / "junk")], "not valid JSON"),
                         (["bench", "report", str(tmp_path / "empty")], "lacks the key 'header'"),
                         (["bench", "report", str(tmp_path / "empty"), "--section", " "], "--section must name"),
                         (["data", "download", "ett", "--data-dir", a_file], "cannot write into --data-dir")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.output, (args, res.output)
