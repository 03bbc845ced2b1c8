"""`glassformer diagram | heads | html`: the inspection tools on the command line.

`add_commands(subparsers)` registers them on the `glassformer` parser (cli.py calls it; this module
never imports cli.py). Each takes a checkpoint (a GGUF file, or a glassformer or Hugging Face
directory); `diagram` and `html` also build a random-weight model from Config flags, as
`glassformer trace` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from glassformer.cli_flags import add_config_flags, config_fields
from glassformer.config import Config
from glassformer.errors import CheckpointError
from glassformer.inspect.diagram import diagram, render
from glassformer.inspect.heads import detect_heads
from glassformer.inspect.html import write_page
from glassformer.inspect.inputs import text_input
from glassformer.model import Transformer
from glassformer.opening import open_model

# The model drawn or shown when no checkpoint and no Config flags are given.
DEFAULT_MODEL = dict(arch="decoder", n_layers=1, d_model=8, n_heads=2, n_ctx=64)
CHECKPOINT_HELP = "a GGUF file, or a glassformer or Hugging Face checkpoint directory"


def add_commands(subparsers: Any) -> None:
    """Register `diagram`, `heads` and `html` on an argparse subparsers object."""
    p = subparsers.add_parser("diagram", help="draw the model as a Mermaid graph: hooks, cells, shapes")
    p.add_argument("checkpoint", nargs="?", help=f"{CHECKPOINT_HELP} (default: a model from the flags)")
    p.add_argument("--d-vocab", type=int, default=256, help="vocabulary of a model built from flags")
    p.add_argument("--out", help="write the Mermaid text to this file instead of printing it")
    p.add_argument("--render", help="also render to this .svg or .png with a local mmdc (mermaid-cli)")
    add_config_flags(p)
    p.set_defaults(run=cmd_diagram)

    p = subparsers.add_parser("heads", help="score each head: previous-token, duplicate, induction, first-token")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--length", type=int, default=None, help="random tokens before the repeat (default: n_ctx/2, ≤32)")
    p.add_argument("--batch", type=int, default=8, help="how many repeated sequences to average over")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_heads)

    p = subparsers.add_parser("html", help="a self-contained HTML page: trace of a token, interactive attention")
    p.add_argument("checkpoint", nargs="?", help=f"{CHECKPOINT_HELP}, with a tokenizer (default: flags)")
    p.add_argument("--prompt", default="Hello, world", help="text to run")
    p.add_argument("--position", type=int, default=-1, help="which token to trace (default: the last)")
    p.add_argument("--out", default="glassformer.html", help="where to write the page")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (no checkpoint)")
    add_config_flags(p)
    p.set_defaults(run=cmd_html)


def model_from_args(args: argparse.Namespace, d_vocab: int = 256) -> Transformer:
    """The checkpoint named on the command line, or a random-weight model from the Config flags."""
    fields = config_fields(args)
    if args.checkpoint:
        if fields:
            flags = ", ".join("--" + name.replace("_", "-") for name in fields)
            raise ValueError(f"give a checkpoint or Config flags, not both (got {args.checkpoint} and {flags})")
        return open_model(args.checkpoint)
    return Transformer(Config(**{**DEFAULT_MODEL, **fields, "d_vocab": d_vocab}), seed=getattr(args, "seed", 0)).eval()


def byte_tokens(text: str) -> tuple[torch.Tensor, list[str]]:
    """UTF-8 bytes as token ids (vocabulary 256) and a printable label per token."""
    data = text.encode("utf-8")
    labels = [chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in data]
    return torch.tensor([list(data)]), labels


def prompt_tokens(model: Transformer, prompt: str, checkpoint: str | None) -> tuple[torch.Tensor, list[str]]:
    """The prompt as (1, pos) tokens and a label per token: by the model's tokenizer, or, for a
    random-weight model from flags, as UTF-8 bytes. A checkpoint without a tokenizer is an error."""
    if model.tokenizer is not None:
        tokens, labels = text_input(model, prompt)
        return tokens, labels or []
    if checkpoint:
        raise CheckpointError(f"{checkpoint} has no tokenizer (tokenizer.json) to turn the prompt into tokens")
    return byte_tokens(prompt)


def cmd_diagram(args: argparse.Namespace) -> None:
    text = diagram(model_from_args(args, args.d_vocab))
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    if args.render:
        try:
            print(f"rendered {render(text, args.render)}")
        except FileNotFoundError as err:  # no local renderer: the Mermaid text is still there
            print(f"not rendered: {err}", file=sys.stderr)


def cmd_heads(args: argparse.Namespace) -> None:
    model = open_model(args.checkpoint)
    print(detect_heads(model, length=args.length, batch=args.batch, seed=args.seed))


def cmd_html(args: argparse.Namespace) -> None:
    model = model_from_args(args)
    tokens, labels = prompt_tokens(model, args.prompt, args.checkpoint)
    tgt = tokens if model.cfg.arch == "encoder-decoder" else None
    path = write_page(args.out, model, tokens, labels=labels, position=args.position, tgt=tgt, tgt_labels=labels)
    print(f"wrote {path}: open it in a browser (it needs no network)")
