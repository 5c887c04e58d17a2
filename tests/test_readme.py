"""The README's example runs as written, and its set-up commands match .ci/run."""

import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_example_runs(capsys):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count(str(torch.Size([2, 1000, 256]))) == 2


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in readme
    assert re.search(r"^python3? -m pytest", ci, flags=re.M)
