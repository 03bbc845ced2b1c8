"""Where a forward pass spends its time: torch.profiler op totals for glassformer, the lean reference and HF.

Same models, weights and settings as `bench/forward.py` (float32, 2 threads, inference mode). Each
model is warmed up, then profiled over `--iters` forward passes; the table gives milliseconds per
forward pass of every aten op (self CPU time), side by side, largest first.

    .venv/bin/python bench/profile_forward.py --shape 1x1024
    .venv/bin/python bench/profile_forward.py --shape 1x128 --cache   # glassformer run_with_cache too
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from forward import (
    CONTENDED_CORES,
    THREADS,
    Dims,
    build_glassformer,
    build_hf,
    build_lean,
    cpu_jiffies,
    hf_logits,
    others_cores,
    parse_shape,
    wait_quiet,
)
from torch import Tensor
from torch.profiler import ProfilerActivity, profile


def op_times(fn: Callable[[Tensor], Any], tokens: Tensor, iters: int) -> dict[str, float]:
    """Self CPU milliseconds per call of every op, over `iters` profiled calls after one warm-up.

    Profiled again (up to 5 times) when other processes used the CPUs meanwhile.
    """
    fn(tokens)
    for _ in range(5):
        wait_quiet(300.0)
        jiffies, start = cpu_jiffies(), time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                fn(tokens)
        if others_cores(jiffies, cpu_jiffies(), time.perf_counter() - start) <= CONTENDED_CORES:
            break
        print("  contended, profiling again", file=sys.stderr)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3 / iters
    return dict(totals)


def table(columns: dict[str, dict[str, float]], top: int) -> str:
    """Markdown: the `top` ops by their largest time in any column, plus each column's total."""
    names = sorted(
        {op for col in columns.values() for op in col}, key=lambda op: -max(c.get(op, 0) for c in columns.values())
    )
    head = "| op (self CPU ms per forward) | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    rows = [
        f"| {op} | " + " | ".join(f"{col.get(op, 0.0):.1f}" for col in columns.values()) + " |" for op in names[:top]
    ]
    total = "| **total** | " + " | ".join(f"**{sum(col.values()):.1f}**" for col in columns.values()) + " |"
    return "\n".join([head, *rows, total])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1x1024", help="batch x pos (default 1x1024)")
    parser.add_argument("--iters", type=int, default=3, help="profiled forward passes per model (default 3)")
    parser.add_argument("--top", type=int, default=18, help="ops to list (default 18)")
    parser.add_argument("--cache", action="store_true", help="also profile glassformer run_with_cache")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    dims = Dims()
    batch, pos = parse_shape(args.shape)
    tokens = torch.randint(0, dims.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(pos))
    with torch.inference_mode():
        hf = build_hf(dims)
        glass, lean = build_glassformer(dims, hf), build_lean(dims, hf)
        fns: dict[str, Callable[[Tensor], Any]] = {
            "glassformer": glass,
            "lean": lean,
            "HF sdpa": lambda t: hf_logits(hf, t),
        }
        if args.cache:
            fns["glassformer run_with_cache"] = glass.run_with_cache
        columns = {name: op_times(fn, tokens, args.iters) for name, fn in fns.items()}
    print(f"### torch.profiler, {args.shape}, {args.iters} forward passes each, {THREADS} threads\n")
    print(table(columns, args.top))


if __name__ == "__main__":
    main()
