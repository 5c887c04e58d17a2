"""Config validation, overrides and learning-rate schedules of the training engine."""

import math
from pathlib import Path

import pytest

from amlp.train import load_config, lr_factor
from amlp.train.config import TrainConfig, apply_overrides, from_dict, parse_override

ROOT = Path(__file__).resolve().parents[1]


def toy(**train):
    return {"task": "toy-regression", "train": {"progress": False, **train}}


def test_valid_config_builds_typed_objects():
    cfg = load_config(raw=toy(lr=3e-3, betas=[0.8, 0.9]), overrides=["model.hidden=7", "train.max_steps=5"])
    assert cfg.train.lr == 3e-3 and cfg.train.betas == (0.8, 0.9) and cfg.train.max_steps == 5
    assert cfg.model.hidden == 7 and isinstance(cfg.train, TrainConfig)
    assert cfg.to_dict()["train"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "'train.lrr'"),
    (["model.hiden=3"], "'model.hiden'"),
    (["train.lr=abc"], "'train.lr'"),
    (["train.lr=-1"], "'train.lr'"),
    (["train.batch_size=2.5"], "'train.batch_size'"),
    (["train.schedule=cosine"], "'train.schedule'"),
    (["train.precision=fp8"], "'train.precision'"),
    (["train.device=tpu"], "'train.device'"),
    (["train.betas=[0.9]"], "'train.betas'"),
    (["train.progress=maybe"], "'train.progress'"),
    (["train.schedule=inverse_sqrt", "train.warmup_steps=0"], "'train.warmup_steps'"),
    (["data.n_train=0"], "'data.n_train'"),
    (["task=nope"], "'task'"),
    (["extra=1"], "'extra'"),
    (["train.lr.x=1"], "'train.lr'"),
])
def test_invalid_values_name_the_key(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(raw=toy(), overrides=overrides)
    assert message in str(err.value)


def test_override_syntax():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_override("train.lr")
    raw = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=2", "model.new=x"])
    assert raw == {"train": {"lr": 2}, "model": {"new": "x"}}


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="'task' is required"):
        load_config(raw={"train": {}})


def test_from_dict_requires_a_mapping():
    with pytest.raises(ValueError, match="'train'"):
        from_dict(TrainConfig, [1, 2], "train")


def test_every_repository_config_validates():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "no configs found"
    from amlp.train.study_forecasting import load_study

    from amlp.train.study_recall import load_recall_study

    for path in files:
        if path.parent.name == "study" and path.parent.parent.name == "translation":
            from amlp.tasks.translation.study import load_translation_study

            study = load_translation_study(path)
            for arch, cfg in study.configs.items():
                assert load_config(ROOT / cfg).model.arch == arch
        elif path.parent.name == "study" and path.parent.parent.name == "tts":
            from amlp.tasks.tts.study import load_tts_study

            study = load_tts_study(path)
            study.validate()
            for arch, cfg in study.configs.items():
                assert load_config(ROOT / cfg).model.arch == arch
        elif path.parent.name == "study" and path.parent.parent.name == "sr":
            from amlp.tasks.super_resolution.study import load_sr_study

            study = load_sr_study(path)
            study.validate()
            assert load_config(ROOT / study.config).task == "sr"
        elif path.parent.name == "study" and path.parent.parent.name == "lm":
            from amlp.tasks.lm.study import load_lm_study

            study = load_lm_study(path)
            study.validate()
            assert load_config(ROOT / study.config).task == "lm"
        elif path.parent.name == "study" and path.parent.parent.name == "mad":
            from amlp.tasks.mad.study import load_mad_study, study_tasks

            study = load_mad_study(path)
            study.validate()
            assert study_tasks(study, ROOT)  # every config a MAD one, each task once
        elif path.parent.name == "study" and path.parent.parent.name == "recall":
            from amlp.train.study_recall import recall_cell_config

            study = load_recall_study(path)
            study.validate()
            for task, section in (("copying", study.copying), ("mqar", study.mqar)):
                if section is not None:
                    base = load_config(ROOT / section.config)
                    assert base.task == task
                    value = (section.string_lens if task == "copying" else section.num_pairs)[-1]
                    for mech in study.mechanisms:  # every mechanism names a causal mixer and options it takes
                        cfg = recall_cell_config(ROOT, section.config, task, mech, value, base.model.dim,
                                                 study.seeds[0], study.overrides)
                        assert cfg.model.mixer == mech.partition(":")[0]
        elif path.parent.name == "study":
            study = load_study(path)
            for cfg in study.configs:
                assert load_config(ROOT / cfg).task == "forecasting"
        else:
            load_config(path)


def _expected_factor(step, schedule, warmup, gamma, every):
    # written independently of amlp.train.schedules, from the definitions
    s = step + 1
    if warmup and s < warmup:
        return s / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        return 1.0 / math.sqrt(s / warmup)
    k = 0
    t = max(warmup, 1)
    while t + every <= s:
        t += every
        k += 1
    return gamma ** k


@pytest.mark.parametrize("schedule, warmup", [("constant", 0), ("constant", 3), ("inverse_sqrt", 4),
                                              ("exponential", 0), ("exponential", 5)])
def test_schedules_match_their_definition(schedule, warmup):
    for step in range(40):
        got = lr_factor(step, schedule, warmup_steps=warmup, decay_gamma=0.5, decay_every=7)
        assert got == pytest.approx(_expected_factor(step, schedule, warmup, 0.5, 7)), step
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, "cosine")
