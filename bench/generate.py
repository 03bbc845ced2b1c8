"""Greedy decoding speed, side by side: glassformer (KV cache, eager and compiled decode step) vs
Hugging Face `generate` (use_cache=True) vs TransformerLens 3.9 `generate` (KV cache on).

GPT-2-small dimensions by default, or a Gemma-3- / Qwen3-shaped model (`--model`, bench/families.py:
transformers is the only peer there, the lean model and TransformerLens being GPT-2's); random
weights shared by all, float32, 2 threads, prompt 32, 128 new tokens, batch 1 and 8. Tokens/s counts
new tokens of all rows. Before timing, glassformer's logits are checked against transformers' (as in
bench/forward.py: no timing above 1e-3) and its greedy tokens must be identical to transformers'.
Timing is bench/forward.py's round-robin: the runners take turns, medians are reported, and a round in
which other processes used the CPUs is run again.

    .venv/bin/python bench/generate.py [--repeats 3] [--batches 1,8] [--new 128] [--no-tl] [--no-compile]
    .venv/bin/python bench/generate.py --model gemma3|qwen3   # bench/families.py's models, transformers as peer
    .venv/bin/python bench/generate.py --quick                # smoke test: batch 1, 16 new tokens, 1 round
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
import families  # noqa: E402
from forward import (  # noqa: E402
    THREADS,
    Case,
    Dims,
    build_hf,
    build_tl3,
    check_agreement,
    check_quiet,
    cpu_flags,
    cpu_model,
    hf_logits,
    time_round_robin,
    versions,
)

import glassformer as gf  # noqa: E402

PROMPT = 32
TARGETS = {1: 1.5, 8: 1.2}  # glassformer / transformers tokens/s, by batch (issues 4 and 12)


def runners(
    hf: torch.nn.Module, ours: gf.Transformer, dims: Dims, new: int, with_tl: bool, with_compile: bool
) -> dict[str, Callable[[Tensor], Tensor]]:
    """name -> fn(prompt) returning prompt + new tokens, greedy, all with the same weights."""
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


def check_before_timing(hf: torch.nn.Module, ours: gf.Transformer, fns: dict[str, Callable], prompts: dict) -> None:
    """Logits within bench/forward.py's tolerance, and greedy tokens identical to transformers' for
    every prompt (eager and compiled); exits otherwise, before anything is timed."""
    for batch, pos in families.agreement_shapes(ours):
        tokens = torch.randint(0, ours.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(1))
        print(f"agreement with HF on {batch}x{pos} random tokens:")
        check_agreement({"glassformer": ours}, hf_logits(hf, tokens), tokens)
    for batch, prompt in prompts.items():
        reference = fns["transformers"](prompt)
        for name in (n for n in fns if n.startswith("glassformer")):
            same = torch.equal(fns[name](prompt), reference)
            print(f"  batch {batch}: {name} greedy tokens identical to transformers': {same}")
            if not same:
                sys.exit("greedy tokens differ from transformers': timing would compare different work")


def report(cases: dict[str, Case], prompts: dict, new: int, weight_bytes: int) -> None:
    """Markdown: tokens/s of every runner, glassformer's ratio to transformers against the targets,
    and its time per decode step (one new token in every row; the prompt's forward is spread over the
    steps) with the rate at which that step reads every weight matrix once."""
    names = list(cases)
    head = (
        "| batch | "
        + " | ".join(f"{n} tok/s" for n in names)
        + " | gf/transformers | target | gf compiled/transformers | gf/TL | gf ms/step | gf weight GB/s |"
    )
    rows = [head, "|---" * (len(names) + 7) + "|"]
    for batch in prompts:
        label = f"b={batch}"
        rate = {n: batch * new / statistics.median(cases[n].times[label]) for n in names}
        ratio = rate["glassformer"] / rate["transformers"]
        target = TARGETS.get(batch)
        verdict = f"≥ {target}: {'PASS' if ratio >= target else 'MISS'}" if target else ""
        compiled = rate.get("glassformer compiled", float("nan")) / rate["transformers"]
        vs_tl = rate["glassformer"] / rate["TransformerLens 3.9"] if "TransformerLens 3.9" in rate else float("nan")
        step = batch / rate["glassformer"]  # seconds per decode step (one new token in every row)
        rows.append(
            f"| {batch} | "
            + " | ".join(f"{rate[n]:.1f}" for n in names)
            + f" | {ratio:.2f} | {verdict} | {compiled:.2f} | {vs_tl:.2f} | {1e3 * step:.1f} "
            f"| {weight_bytes / step / 1e9:.1f} |"
        )
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--no-tl", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--model", choices=("gpt2", *families.MODELS), default="gpt2")
    parser.add_argument("--patience", type=float, default=300.0, help="seconds to wait for a quiet machine (300)")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 1, 16 new tokens, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.new, args.repeats = "1", 16, 1
    torch.set_num_threads(THREADS)
    dims = Dims()
    hf = build_hf(dims) if args.model == "gpt2" else families.build(args.model)
    ours = gf.Transformer.from_hf(hf)
    name = "GPT-2 small" if args.model == "gpt2" else families.describe(hf)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    matrix_bytes = 4 * families.weight_matrices(ours)  # read once per decode step (float32)
    with_tl = not args.no_tl and args.model == "gpt2"  # TransformerLens: GPT-2 only here
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {cpu_model()} ({cpu_flags()}), {THREADS} threads")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(
        f"{name}, float32 ({weight_bytes / 1e6:.0f} MB of weights, {matrix_bytes / 1e6:.0f} MB of weight matrices "
        f"read per decode step); prompt {PROMPT}, {args.new} new tokens, greedy; medians of {args.repeats}"
        + ("" if with_tl else "; peer: transformers only (the lean model and TransformerLens are GPT-2's)")
    )
    quiet: list[tuple[str, float]] = []
    check_quiet("before the run", quiet)
    prompts = {
        batch: torch.randint(0, ours.cfg.d_vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        for batch in map(int, args.batches.split(","))
    }
    with torch.inference_mode():
        fns = runners(hf, ours, dims, args.new, with_tl, not args.no_compile)
        check_before_timing(hf, ours, fns, prompts)
        cases = {name: Case(name, fn) for name, fn in fns.items()}
        dropped = {}
        for batch, prompt in prompts.items():
            label = f"b={batch}"
            dropped[label] = time_round_robin(list(cases.values()), label, prompt, args.repeats, 1, args.patience)
            check_quiet(f"after batch {batch}", quiet)
    print(f"\n### Greedy decoding, prompt {PROMPT} + {args.new} new tokens, median of {args.repeats}\n")
    report(cases, prompts, args.new, matrix_bytes)
    print("\nrounds dropped as contended: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    for case in cases.values():
        spread = ", ".join(f"{lb} [{min(t):.2f}, {max(t):.2f}] s" for lb, t in case.times.items())
        print(f"  {case.name}: {spread}")


if __name__ == "__main__":
    main()
