"""`glassformer` command line: trace, generate, convert, info."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from glassformer.config import ACTS, ARCHS, NORM_POSITIONS, NORMS, POSITIONALS, Config
from glassformer.errors import GlassformerError
from glassformer.inspect.examples import two_heads
from glassformer.inspect.trace import trace
from glassformer.model import Transformer
from glassformer.tokenizer import load_tokenizer


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the fields of a small Config (the vocabulary is fixed by the byte tokenizer)."""
    parser.add_argument("--arch", choices=ARCHS, default="decoder")
    parser.add_argument("--n-layers", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=8)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--n-kv-heads", type=int, default=None)
    parser.add_argument("--positional", choices=POSITIONALS, default="learned")
    parser.add_argument("--norm", choices=NORMS, default="layernorm")
    parser.add_argument("--norm-position", choices=NORM_POSITIONS, default="pre")
    parser.add_argument("--act", choices=ACTS, default="gelu")
    parser.add_argument("--attn-only", action="store_true")
    parser.add_argument("--n-ctx", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def config_from_flags(args: argparse.Namespace, d_vocab: int) -> Config:
    return Config(
        arch=args.arch,
        n_layers=args.n_layers,
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        positional=args.positional,
        norm=args.norm,
        norm_position=args.norm_position,
        act=args.act,
        attn_only=args.attn_only,
        n_ctx=args.n_ctx,
        d_vocab=d_vocab,
    )


def byte_tokens(text: str) -> tuple[torch.Tensor, list[str]]:
    """UTF-8 bytes as token ids (vocabulary 256) and a printable label per token."""
    data = text.encode("utf-8")
    labels = [chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in data]
    return torch.tensor([list(data)]), labels


def cmd_trace(args: argparse.Namespace) -> None:
    if args.example == "two-heads":
        model, tokens, labels = two_heads()
        print(trace(model, tokens, position=args.position, labels=labels, max_values=args.max_values))
        return
    tokens, labels = byte_tokens(args.prompt)
    model = Transformer(config_from_flags(args, d_vocab=256), seed=args.seed).eval()
    tgt = tokens if model.cfg.arch == "encoder-decoder" else None
    print(trace(model, tokens, tgt, position=args.position, labels=labels, max_values=args.max_values))
    print("\n(random weights: the numbers show the arithmetic, not a trained model's behaviour)")


def cmd_convert(args: argparse.Namespace) -> None:
    model = Transformer.from_hf(args.hf_dir, allow_pickle=args.allow_pickle)
    model.save(args.out_dir)
    print(f"converted {args.hf_dir} ({model.cfg.extra.get('hf_model_type')}) -> {args.out_dir}")
    print_info(model, Path(args.out_dir))


def cmd_info(args: argparse.Namespace) -> None:
    print_info(Transformer.load(args.dir), Path(args.dir))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def print_info(model: Transformer, directory: Path) -> None:
    """The config, parameter counts by part, and the checkpoint's size on disk."""
    cfg = model.cfg
    print(f"{directory}: {cfg.arch}, {cfg.n_layers} layers, d_model={cfg.d_model}, {cfg.n_heads} heads")
    for name, value in cfg.to_dict().items():
        print(f"  {name:<18} {value}")
    total = count(model)
    parts = {name: count(child) for name, child in model.named_children() if count(child)}
    print(
        f"parameters: {total:,} ({total * model.embed.W_E.element_size() / 2**20:.1f} MiB as {model.embed.W_E.dtype})"
    )
    for name, n in parts.items():
        print(f"  {name:<18} {n:>14,}  {100 * n / total:5.1f}%")
    files = sorted(directory.iterdir())
    print("files: " + ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)" for f in files if f.is_file()))


def open_checkpoint(directory: str) -> Transformer:
    """A glassformer checkpoint, or a Hugging Face one (its config.json names a model_type)."""
    config = (
        json.loads((Path(directory) / "config.json").read_text()) if (Path(directory) / "config.json").exists() else {}
    )
    return Transformer.from_hf(directory) if "model_type" in config else Transformer.load(directory)


def cmd_generate(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = open_checkpoint(args.checkpoint), load_tokenizer(args.checkpoint)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give some text")
    options = dict(
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed),
        compile=args.compile,
    )
    print(args.prompt, end="", flush=True)
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    for token in model.stream(torch.tensor([ids]), args.max_new_tokens, **options):
        new.append(int(token[0]))
        text = tokenizer.decode(ids + new)[len(tokenizer.decode(ids)) :]
        print(text[len(shown) :], end="", flush=True)  # print what the new token adds to the text
        shown = text
    elapsed = time.perf_counter() - start
    print(f"\n\n[{len(new)} tokens in {elapsed:.2f} s: {len(new) / elapsed:.1f} tokens/s]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glassformer", description="A transformer you can see through.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("trace", help="walk one token through the model, cell by cell")
    p.add_argument("--example", choices=["two-heads"], help="a worked example with hand-set weights")
    p.add_argument("--prompt", default="Hello", help="text to run (UTF-8 bytes are the tokens)")
    p.add_argument("--position", type=int, default=-1, help="which token to trace (default: the last)")
    p.add_argument("--max-values", type=int, default=8, help="show vectors up to this size in full")
    add_config_flags(p)
    p.set_defaults(run=cmd_trace)

    p = sub.add_parser("convert", help="convert a local Hugging Face checkpoint directory to glassformer's format")
    p.add_argument("hf_dir", help="directory with config.json and model.safetensors (or shards)")
    p.add_argument("out_dir", help="where to write config.json and model.safetensors")
    p.add_argument("--allow-pickle", action="store_true", help="also read pickled pytorch_model.bin (weights only)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("generate", help="continue a prompt with a checkpoint, streaming to the terminal")
    p.add_argument("checkpoint", help="a glassformer or Hugging Face checkpoint directory with a tokenizer.json")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="take the most likely token instead of sampling")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("info", help="describe a glassformer checkpoint: config, parameters, sizes")
    p.add_argument("dir")
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (GlassformerError, ValueError, TypeError) as err:
        print(f"glassformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
