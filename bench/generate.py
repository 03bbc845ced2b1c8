"""Greedy decoding speed, side by side: glassformer (KV cache, eager and compiled decode step) vs
Hugging Face `generate` (use_cache=True) vs TransformerLens 3.9 `generate` (KV cache on).

GPT-2-small dimensions, random weights shared by all, float32, 2 threads, prompt 32, 128 new tokens,
batch 1 and 8. Tokens/s counts new tokens of all rows. Before timing, glassformer's tokens are
checked against transformers' (same weights, greedy: they must be identical).

    .venv/bin/python bench/generate.py [--repeats 3] [--batches 1,8] [--new 128] [--no-tl] [--no-compile]
    .venv/bin/python bench/generate.py --model gemma3|qwen3   # bench/families.py's models, transformers as peer
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
import families  # noqa: E402
from forward import THREADS, Dims, build_hf, build_tl3, cpu_model  # noqa: E402

import glassformer as gf  # noqa: E402

PROMPT = 32


def runners(hf: torch.nn.Module, dims: Dims, new: int, with_tl: bool, with_compile: bool) -> dict[str, Callable]:
    """name -> fn(prompt) returning prompt + new tokens, greedy, all with the same weights."""
    ours = gf.Transformer.from_hf(hf)
    out: dict[str, Callable[[Tensor], Tensor]] = {
        "transformers": lambda p: hf.generate(
            p,
            attention_mask=torch.ones_like(p),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        ),
        "glassformer": lambda p: ours.generate(p, new),
    }
    if with_compile:
        out["glassformer compiled"] = lambda p: ours.generate(p, new, compile=True)
    if with_tl:
        tl = build_tl3(dims, hf)
        out["TransformerLens 3.9"] = lambda p: tl.generate(
            p, max_new_tokens=new, do_sample=False, stop_at_eos=False, use_past_kv_cache=True, verbose=False
        )
    return out


def time_all(fns: dict[str, Callable], prompt: Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per generate call; the models take turns so drift hits all alike."""
    for fn in fns.values():
        fn(prompt)  # warm-up (and compilation)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(prompt)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--no-tl", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--model", choices=("gpt2", *families.MODELS), default="gpt2")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    dims = Dims()
    hf = build_hf(dims) if args.model == "gpt2" else families.build(args.model)
    name = "GPT-2 small" if args.model == "gpt2" else families.describe(hf)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"{cpu_model()}, {THREADS} threads; {name}, float32 ({weight_bytes / 1e6:.0f} MB of weights); "
        f"prompt {PROMPT}, {args.new} new tokens, greedy; medians of {args.repeats}\n"
    )
    with_tl = not args.no_tl and args.model == "gpt2"  # TransformerLens 3.9 has no random-weight Gemma 3 / Qwen3
    vocab = hf.config.vocab_size
    with torch.inference_mode():
        fns = runners(hf, dims, args.new, with_tl, not args.no_compile)
        rows = []
        for batch in map(int, args.batches.split(",")):
            prompt = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
            same = torch.equal(fns["glassformer"](prompt), fns["transformers"](prompt))
            seconds = time_all(fns, prompt, args.repeats)
            rows.append((batch, same, {name: batch * args.new / s for name, s in seconds.items()}))
    names = list(fns)
    print(
        f"{'batch':>5} {'same tokens':>11} "
        + " ".join(f"{n + ' tok/s':>26}" for n in names)
        + f" {'ours/transformers':>18} {'ours/TL':>8}"
    )
    for batch, same, rate in rows:
        tl = rate.get("TransformerLens 3.9")
        vs_tl = rate["glassformer"] / tl if tl else float("nan")
        print(
            f"{batch:>5} {str(same):>11} "
            + " ".join(f"{rate[n]:>26.1f}" for n in names)
            + f" {rate['glassformer'] / rate['transformers']:>18.2f} {vs_tl:>8.2f}"
        )
    print("\ntargets: ours/transformers >= 1.5 at batch 1 and >= 1.2 at batch 8")


if __name__ == "__main__":
    main()
