"""`glassformer` command line: trace, train, sample, generate, chat, convert, info, diagram, heads, html."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from glassformer import parallel
from glassformer.cli_chat import add_chat_command
from glassformer.cli_flags import add_config_flags, config_fields
from glassformer.config import Config
from glassformer.errors import CheckpointError, GlassformerError
from glassformer.inspect.commands import CHECKPOINT_HELP, add_commands, model_from_args, prompt_tokens
from glassformer.inspect.examples import two_heads
from glassformer.inspect.trace import trace
from glassformer.model import Transformer
from glassformer.opening import checkpoint_kind, directory_config, open_model
from glassformer.tokenizer import TextTokenizer, load_tokenizer


def cmd_trace(args: argparse.Namespace) -> None:
    if args.example == "two-heads":
        model, tokens, labels = two_heads()
        print(trace(model, tokens, position=args.position, labels=labels, max_values=args.max_values))
        return
    model = model_from_args(args)
    tokens, labels = prompt_tokens(model, args.prompt, args.checkpoint)
    tgt = tokens if model.cfg.arch == "encoder-decoder" else None
    print(trace(model, tokens, tgt, position=args.position, labels=labels, max_values=args.max_values))
    if not args.checkpoint:
        print("\n(random weights: the numbers show the arithmetic, not a trained model's behaviour)")


def cmd_convert(args: argparse.Namespace) -> None:
    kind = checkpoint_kind(args.source)
    model = open_model(args.source, allow_pickle=args.allow_pickle)
    model.save(args.out_dir)  # the tokenizer too, when the source has one
    print(f"converted {args.source} ({source_format(kind, model)}) -> {args.out_dir}")
    print_info(model, Path(args.out_dir))


def source_format(kind: str, model: Transformer) -> str:
    """A converted checkpoint in words: its Hugging Face family ("gpt2"), "GGUF, llama", or "glassformer"."""
    family = model.cfg.extra.get("hf_model_type")
    if kind == "hf":
        return str(family)
    return f"GGUF, {family}" if kind == "gguf" and family else "GGUF" if kind == "gguf" else kind


def cmd_info(args: argparse.Namespace) -> None:
    print_info(open_model(args.path), Path(args.path))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def print_info(model: Transformer, path: Path) -> None:
    """The config, parameter counts by part, the tokenizer, and the checkpoint's size on disk."""
    cfg = model.cfg
    print(f"{path}: {cfg.arch}, {cfg.n_layers} layers, d_model={cfg.d_model}, {cfg.n_heads} heads")
    for name, value in cfg.to_dict().items():
        print(f"  {name:<18} {value}")
    total = count(model)
    parts = {name: count(child) for name, child in model.named_children() if count(child)}
    print(
        f"parameters: {total:,} ({total * model.embed.W_E.element_size() / 2**20:.1f} MiB as {model.embed.W_E.dtype})"
    )
    for name, n in parts.items():
        print(f"  {name:<18} {n:>14,}  {100 * n / total:5.1f}%")
    print(f"tokenizer: {describe_tokenizer(model.tokenizer)}")
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    print("files: " + ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)" for f in files if f.is_file()))


def describe_tokenizer(tokenizer: TextTokenizer | None) -> str:
    """One line: the tokenizer's kind, vocabulary, special tokens, and whether it has a chat template."""
    if tokenizer is None:
        return "none (token ids only)"
    kind = type(tokenizer.backend.model).__name__
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    special = ", ".join(f"{name}={value}" for name, value in ids.items() if value is not None)
    chat = "a chat template" if tokenizer.chat_template else "no chat template"
    return f"{kind}, {tokenizer.vocab_size:,} tokens ({special or 'no special tokens'}); {chat}"


def open_for_generation(path: str, tp: int) -> Transformer:
    """The checkpoint (a GGUF file or a directory), split across the torchrun processes when `tp` > 1."""
    if tp == 1:
        return open_model(path)
    own_format = checkpoint_kind(path) == "glassformer"
    if own_format:
        parallel.check_divisible(Config.from_dict(directory_config(Path(path))), tp)  # before any communication
    parallel.init()
    if torch.distributed.get_world_size() != tp:
        raise ValueError(f"--tp {tp} needs as many processes; torchrun started {torch.distributed.get_world_size()}")
    if not own_format:
        return parallel.shard(open_model(path))  # GGUF and Hugging Face models are converted whole, then split
    return parallel.load_sharded(path)  # each process reads only its slices, and the tokenizer


def cmd_generate(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = open_for_generation(args.checkpoint, args.tp)
    if model.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint} has no tokenizer to turn the prompt into tokens and back")
    main_process = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    options = dict(
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=[] if args.ignore_eos else model.tokenizer.stop_ids(),
        generator=torch.Generator().manual_seed(args.seed),
        compile=args.compile,
    )
    model.to_tokens(args.prompt)  # a prompt the tokenizer cannot encode fails here, before any output
    show = print if main_process else lambda *a, **k: None  # every process decodes; one prints
    show(args.prompt, end="", flush=True)
    steps = 0
    start = time.perf_counter()
    for piece in model.stream(args.prompt, args.max_new_tokens, **options):  # the text each new token adds
        show(piece, end="", flush=True)
        steps += 1
    elapsed = time.perf_counter() - start
    show(f"\n\n[{steps} tokens in {elapsed:.2f} s: {steps / elapsed:.1f} tokens/s]", file=sys.stderr)


# TrainConfig fields settable from the command line; unset ones keep the preset's value.
TRAIN_FLAGS: dict[str, dict] = {
    "data": dict(help="a UTF-8 text file, 'tinyshakespeare', or a task: repeat, copy, reverse, sort"),
    "tokenizer": dict(choices=("char", "bpe")),
    "bpe_vocab_size": dict(type=int),
    "task_vocab": dict(type=int),
    "task_length": dict(type=int),
    "batch_size": dict(type=int),
    "grad_accum": dict(type=int),
    "max_steps": dict(type=int),
    "lr": dict(type=float),
    "min_lr": dict(type=float),
    "warmup_steps": dict(type=int),
    "weight_decay": dict(type=float),
    "grad_clip": dict(type=float),
    "eval_interval": dict(type=int),
    "eval_batches": dict(type=int),
    "checkpoint_interval": dict(type=int),
    "seed": dict(type=int),
    "tp": dict(type=int, help="processes that split each model (tensor parallel; run under torchrun)"),
}


def cmd_train(args: argparse.Namespace) -> None:
    from glassformer.training.data import SEQ2SEQ_TASKS, SyntheticData
    from glassformer.training.presets import PRESETS
    from glassformer.training.showcase import seq2seq_accuracy, show_text_run
    from glassformer.training.state import STATE_FILE, read_info
    from glassformer.training.trainer import TrainConfig, train

    # A new run starts from the preset; a resumed one from the settings saved with it.
    if args.resume and (Path(args.out) / STATE_FILE).exists():
        saved = read_info(Path(args.out))["meta"]["train_config"]
        base = {k: v for k, v in saved.items() if k not in ("out_dir", "resume", "progress", "compile")}
    else:
        base = dict(PRESETS[args.preset])
    model_fields = {**base.pop("model"), **config_fields(args)}
    chosen = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    cfg = TrainConfig(
        **{**base, **chosen},
        out_dir=args.out,
        model=model_fields,
        compile=args.compile,
        resume=args.resume,
        progress=not args.no_progress,
    )
    result = train(cfg)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    model = Transformer.load(args.out) if cfg.tp > 1 else result.model  # a split model runs only in its group
    last = result.metrics[-1] if result.metrics else {}
    if result.interrupted:  # Ctrl-C: the completed steps are saved; no sample, no pictures
        print(f"interrupted at step {result.step}, saved -> {args.out} (continue with --resume)")
        return
    print(
        f"done at step {result.step}: train loss {last.get('train_loss', float('nan')):.4f}, "
        f"validation loss {last.get('val_loss', float('nan')):.4f} -> {args.out}"
    )
    if cfg.data in SEQ2SEQ_TASKS:
        data = SyntheticData(cfg.data, cfg.task_vocab, cfg.task_length)
        print(f"exact-match accuracy on 256 new sequences: {seq2seq_accuracy(model, data):.1%}")
    elif cfg.data != "repeat":
        text = show_text_run(model, load_tokenizer(args.out), Path(args.out), args.sample_tokens)
        print(f"\n--- a sample from the KV-cache decoder ---\n{text}\n---")
        print(
            f"wrote {args.out}/: model (config.json, model.safetensors), tokenizer.json, metrics.jsonl, loss.png, "
            "sample.txt, attention.png, trace.txt"
        )


def cmd_sample(args: argparse.Namespace) -> None:
    from glassformer.training.showcase import sample_text

    model, tokenizer = Transformer.load(args.dir), load_tokenizer(args.dir)
    print(sample_text(model, tokenizer, args.prompt, args.max_new_tokens, args.seed))


def add_trace(sub: Any) -> None:
    """`glassformer trace`: one token through the model, cell by cell."""
    p = sub.add_parser("trace", help="walk one token through the model, cell by cell")
    p.add_argument("checkpoint", nargs="?", help=f"{CHECKPOINT_HELP}, with a tokenizer (default: flags)")
    p.add_argument("--example", choices=["two-heads"], help="a worked example with hand-set weights")
    p.add_argument("--prompt", default="Hello", help="text to run (without a checkpoint, UTF-8 bytes are the tokens)")
    p.add_argument("--position", type=int, default=-1, help="which token to trace (default: the last)")
    p.add_argument("--max-values", type=int, default=8, help="show vectors up to this size in full")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    add_config_flags(p)
    p.set_defaults(run=cmd_trace)


def add_train(sub: Any) -> None:
    """`glassformer train`: a model from scratch, with the TrainConfig and Config flags."""
    p = sub.add_parser("train", help="train a model from scratch on text or a synthetic task")
    p.add_argument("--preset", choices=("tiny", "demo", "small"), default="tiny")
    p.add_argument("--out", default="runs/train", help="run directory: checkpoint, tokenizer, metrics, pictures")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out, with its settings")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sample-tokens", type=int, default=500, help="length of the sample printed at the end")
    group = p.add_argument_group("training")
    for name, options in TRAIN_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), default=None, **options)
    add_config_flags(p)
    p.set_defaults(run=cmd_train)


def add_sample(sub: Any) -> None:
    """`glassformer sample`: text from a trained run directory."""
    p = sub.add_parser("sample", help="generate text from a trained run directory")
    p.add_argument("dir")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_sample)


def add_convert(sub: Any) -> None:
    """`glassformer convert`: a GGUF file or Hugging Face directory to glassformer's format."""
    p = sub.add_parser("convert", help="convert a GGUF file or a Hugging Face directory to glassformer's format")
    p.add_argument("source", help="a GGUF file, or a Hugging Face directory (config.json + safetensors or shards)")
    p.add_argument("out_dir", help="where to write config.json, model.safetensors and the tokenizer")
    p.add_argument("--allow-pickle", action="store_true", help="also read pickled pytorch_model.bin (weights only)")
    p.set_defaults(run=cmd_convert)


def add_generate(sub: Any) -> None:
    """`glassformer generate`: a prompt continued by a checkpoint, streamed to the terminal."""
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint, streaming to the terminal")
    p.add_argument("checkpoint", help=f"{CHECKPOINT_HELP}, with a tokenizer")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="take the most likely token instead of sampling")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="go on past the tokenizer's end-of-text tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes (run under torchrun)")
    p.set_defaults(run=cmd_generate)


def add_info(sub: Any) -> None:
    """`glassformer info`: what a checkpoint holds."""
    p = sub.add_parser("info", help="describe a checkpoint: config, parameters, tokenizer, sizes")
    p.add_argument("path", help=CHECKPOINT_HELP)
    p.set_defaults(run=cmd_info)


# Each registers its subcommands on the parser's subparsers; a new command adds its own function here.
COMMANDS: list[Callable[[Any], None]] = [
    add_trace,
    add_train,
    add_sample,
    add_convert,
    add_generate,
    add_info,
    add_chat_command,
    add_commands,
]


def build_parser() -> argparse.ArgumentParser:
    """The `glassformer` parser: one subcommand per entry of COMMANDS."""
    parser = argparse.ArgumentParser(prog="glassformer", description="A transformer you can see through.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (GlassformerError, ValueError, TypeError) as err:
        print(f"glassformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop (which saves and returns) there is nothing to keep
        print(f"glassformer {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a gloo group left to interpreter exit can abort it
    return 0


if __name__ == "__main__":
    sys.exit(main())
