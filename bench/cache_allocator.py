"""run_with_cache against a plain forward in a process of its own, with and without gf.keep_freed_memory().

GPT-2-small dimensions (random weights), 1x1024 by default, float32, 2 threads; 1.5 GB of ballast
stands in for the other models a side-by-side benchmark holds. Run it once each way:

    .venv/bin/python bench/cache_allocator.py
    .venv/bin/python bench/cache_allocator.py --keep-freed-memory
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import glassformer as gf


def seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result  # freed before the next call, as a loop over inputs would
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-freed-memory", action="store_true")
    parser.add_argument("--shape", default="1x1024")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    if args.keep_freed_memory:
        assert gf.keep_freed_memory(), "this allocator has no such setting"
    torch.set_num_threads(2)
    batch, pos = map(int, args.shape.split("x"))
    gpt2 = dict(n_layers=12, d_model=768, n_heads=12, d_vocab=50257, n_ctx=1024, act="gelu_new", tie_embeddings=True)
    cfg = gf.Config(**gpt2)
    model = gf.Transformer(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(0))
    ballast = [torch.randn(125_000_000) for _ in range(3)]  # noqa: F841  (1.5 GB resident)
    with torch.inference_mode():
        seconds(lambda: model(tokens)), seconds(lambda: model.run_with_cache(tokens))  # warm-up
        forward, cached = [], []
        for _ in range(args.repeats):
            forward.append(seconds(lambda: model(tokens)))
            cached.append(seconds(lambda: model.run_with_cache(tokens)))
    f, c = statistics.median(forward), statistics.median(cached)
    print(
        f"{args.shape}, keep_freed_memory={args.keep_freed_memory}: forward {f:.3f} s, run_with_cache {c:.3f} s, "
        f"ratio {c / f:.2f}; cache calls {[round(x, 2) for x in cached]}"
    )


if __name__ == "__main__":
    main()
