"""The README's Python tour runs as written, so it can never drift from the code."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples save checkpoints into the working directory
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        if block.startswith("# run with: torchrun"):
            continue  # multi-process examples are covered by tests/test_parallel.py
        exec(compile(block, str(README), "exec"), {})


def test_readme_quick_start_is_the_two_make_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_readme_first_example_is_the_one_make_demo_runs():
    example = (README.parent / "examples" / "smollm2.py").read_text()
    assert f"```python\n{example}```" in README.read_text()
