"""Helpers shared by the grid studies: formatting over seeds, the load sentence, the report target."""


import pytest
import torch

from amlp.train.study_common import (EarlierProtocol, check_doc_selection, earlier_section, fmt_seeds, load_note,
                                    report_path, torch_threads)


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
