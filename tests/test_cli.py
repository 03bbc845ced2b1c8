"""The `glassformer` command line."""

import subprocess
import sys

from glassformer.cli import main


def test_trace_two_heads_example_prints_the_worked_numbers(capsys):
    assert main(["trace", "--example", "two-heads"]) == 0
    out = capsys.readouterr().out
    assert "head 0: [0.248, 0.248, 0.503]" in out
    assert "head 1: [0.248, 0.503, 0.248]" in out
    assert "[0.376, 0.376, 0.500, 0.752]" in out
    assert "[1.376, 1.376, 0.500, 1.752]" in out


def test_trace_a_prompt_with_config_flags(capsys):
    assert main(["trace", "--prompt", "héllo", "--n-layers", "2", "--positional", "rotary", "--act", "swiglu"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.attn.hook_rot_q" in out and "of 6" in out  # é is two UTF-8 bytes


def test_bad_config_is_a_one_line_error(capsys):
    assert main(["trace", "--d-model", "9", "--n-heads", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glassformer trace: error: Config.d_model=9") and "Traceback" not in err


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "glassformer", "trace", "--example", "two-heads"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "[1.376, 1.376, 0.500, 1.752]" in out.stdout
