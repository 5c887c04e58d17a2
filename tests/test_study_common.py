"""Helpers shared by the grid studies: formatting over seeds, the load sentence, the report target, the
check that a finished cell ran under the protocol of the study now."""

import json
from pathlib import Path

import pytest
import torch

from amlp.train.config import load_config, to_plain
from amlp.train.study_common import (EarlierProtocol, cell_store, check_doc_selection, check_protocols, earlier_section, fmt_seeds,
                                    load_note, protocol_changes, report_path, torch_threads)

ROOT = Path(__file__).resolve().parents[1]


def test_fmt_seeds():
    assert fmt_seeds([], 2) == "—"
    assert fmt_seeds([1.234], 2) == "1.23¹"
    assert fmt_seeds([1.0, 3.0], 1) == "2.0 ± 1.4"  # sample standard deviation


def test_load_note():
    assert load_note([{"cpus": 2}]) == ""
    note = load_note([{"cpus": 2, "load_average_1min": 2.5}, {"cpus": 2, "load_average_1min": 1.0}])
    assert "2 CPUs" in note and "1.0 to 2.5" in note


def test_report_path_and_doc_selection(tmp_path):
    assert report_path(tmp_path, tmp_path / "runs", "docs/x.md", ["a"], False) == tmp_path / "runs" / "report.md"
    assert report_path(tmp_path, tmp_path / "runs", "docs/x.md", [], True) == tmp_path / "docs/x.md"
    with pytest.raises(ValueError, match="not writing docs/x.md: 1 cell"):
        report_path(tmp_path, tmp_path / "runs", "docs/x.md", ["a"], True)
    check_doc_selection("docs/x.md", ["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="b"):
        check_doc_selection("docs/x.md", ["a", "b"], ["a"])


def test_torch_threads_restores():
    original = torch.get_num_threads()
    torch.set_num_threads(2)  # other test modules may have set 1 already: start from a count to restore
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with torch_threads(None):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


def test_earlier_section_lists_only_rows_with_earlier_values():
    protocol = EarlierProtocol(records="docs/results/records/x.json", label="fewer steps")
    rows = [(["a", "one"], [1.0, 3.0], [2.0]), (["b", "two"], [], [5.0]), (["c", "three"], [4.0], [])]
    lines = earlier_section(protocol, "loss", ["key", "name"], rows, 1)
    assert lines[0] == "## Earlier protocol: fewer steps"
    assert "`docs/results/records/x.json`; loss" in lines[2]
    assert lines[4:6] == ["| key | name | earlier protocol | seeds | this protocol | seeds |", "|---|---|---|---|---|---|"]
    assert lines[6:] == ["| a | one | 2.0 ± 1.4 | 2 | 2.0¹ | 1 |", "| c | three | 4.0¹ | 1 | — | — |", ""]
    assert earlier_section(protocol, "loss", ["key"], [(["b"], [], [1.0])], 1) == []


def _record(cfg) -> dict:
    # as a record holds it after a round trip through its JSON file
    return json.loads(json.dumps({"finished": True, **{k: to_plain(getattr(cfg, k)) for k in ("model", "train", "data")}}))


def test_protocol_changes_name_the_fields_that_differ():
    cfg = load_config(ROOT / "configs/mad/cpu/in-context-recall.yaml")
    record = _record(cfg)
    assert protocol_changes(record, cfg) == []
    steps = cfg.train.max_steps
    record["train"]["max_steps"] = steps + 7
    assert protocol_changes(record, cfg) == [f"train.max_steps: {steps + 7!r} -> {steps!r}"]
    # fields that do not change what a cell measures, and fields one side lacks, are not compared
    record = _record(cfg)
    record["train"]["progress"] = not cfg.train.progress
    record["data"]["data_dir"] = "/elsewhere"
    del record["model"]["dim"]
    record["train"]["a_field_from_an_older_version"] = 1
    del record["data"]
    assert protocol_changes(record, cfg) == []


def test_protocol_changes_compare_only_the_options_of_the_cells_mixer():
    cfg = load_config(ROOT / "configs/mad/cpu/in-context-recall.yaml", ["model.mixer=softmax"])
    record = _record(cfg)
    # options for another mixer, added since the cell ran, leave the cell's protocol as it was
    record["model"]["mixer_options"] = {"softmax": record["model"]["mixer_options"].get("softmax", {})}
    assert protocol_changes(record, load_config(ROOT / "configs/mad/cpu/in-context-recall.yaml",
                                                ["model.mixer=softmax", "model.mixer_options.local.wsize=3"])) == []
    # an option of the cell's own mixer changes it
    changed = load_config(ROOT / "configs/mad/cpu/in-context-recall.yaml",
                          ["model.mixer=local", "model.mixer_options.local.wsize=3"])
    before = _record(load_config(ROOT / "configs/mad/cpu/in-context-recall.yaml", ["model.mixer=local"]))
    assert [c.split(":")[0] for c in protocol_changes(before, changed)] == ["model.mixer_options"]


def test_check_protocols_refuses_cells_of_another_protocol_and_names_them():
    cfg = load_config(ROOT / "configs/mad/cpu/in-context-recall.yaml")
    same, other = _record(cfg), _record(cfg)
    other["train"]["max_steps"] = cfg.train.max_steps + 1
    results = {"a": same, "b": other, "c": {**other, "finished": False}}
    check_protocols(results, [("a", lambda r: cfg), ("c", lambda r: cfg), ("missing", lambda r: cfg)], "r.json")
    with pytest.raises(ValueError, match=r"(?s)1 finished cell\(s\) in r.json .*\n  b: train.max_steps: .*'earlier'"):
        check_protocols(results, [("a", lambda r: cfg), ("b", lambda r: cfg)], "r.json")


def test_a_studys_free_fields_are_not_compared_and_keep_its_cells_tracked(tmp_path):
    cfg = load_config(ROOT / "configs/mad/cpu/in-context-recall.yaml")
    record = _record(cfg)
    record["train"]["threads"] = (cfg.train.threads or 1) + 1
    assert [c.split(":")[0] for c in protocol_changes(record, cfg)] == ["train.threads"]
    assert protocol_changes(record, cfg, free=["train.threads"]) == []
    check_protocols({"a": record}, [("a", lambda r: cfg)], "r.json", free=["train.threads"])
    with pytest.raises(ValueError, match="train.threads"):
        check_protocols({"a": record}, [("a", lambda r: cfg)], "r.json")
    # --set of a free key records in the tracked file; any other key does not
    notes: list[str] = []
    store = cell_store(tmp_path, tmp_path / "runs", "tracked.json", ["train.threads=2"], notes.append,
                       free=["train.threads"])
    assert store.tracked == tmp_path / "tracked.json" and not notes
    store = cell_store(tmp_path, tmp_path / "runs", "tracked.json", ["train.threads=2"], notes.append)
    assert store.tracked is None and "train.threads changes the study's protocol" in notes[0]


@pytest.mark.parametrize("study, records, agree", [
    ("translation", "translation-cpu.json", True), ("translation", "translation-cpu-glat3200.json", False),
    ("lm", "lm-cpu.json", True), ("lm", "lm-cpu-causal-rn-hidden-e.json", False)])
def test_the_tracked_records_agree_with_the_study_configs_and_the_earlier_protocols_do_not(study, records, agree):
    """Every finished cell in a study's tracked records ran under the protocol its configs give now; the
    cells kept as an earlier protocol are told apart by the check."""
    import functools

    path = ROOT / "docs/results/records" / records
    results = json.loads(path.read_text())
    if study == "translation":
        from amlp.tasks.translation import study as mod

        st = mod.load_translation_study(ROOT / "configs/translation/study/cpu.yaml")
        current = [(c.key, functools.partial(mod._config_now, st, ROOT, list(st.overrides), c))
                   for c in mod.study_cells(st)]
    else:
        from amlp.tasks.lm import study as mod

        st = mod.load_lm_study(ROOT / "configs/lm/study/cpu.yaml")
        current = [(mod.cell_key(*c), lambda r, c=c: load_config(ROOT / st.config, list(st.overrides)
                                                                  + mod._cell_overrides(*c)))
                   for c in mod.study_cells(st)]
    assert any(r.get("finished") for r in results.values())
    if agree:
        check_protocols(results, current, records)
    else:
        with pytest.raises(ValueError, match="another protocol"):
            check_protocols(results, current, records)
