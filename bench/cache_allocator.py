"""run_with_cache against a plain forward in a process of its own, with and without gf.keep_freed_memory().

GPT-2-small dimensions (random weights), 1x1024 by default, float32, 2 threads; 1.5 GB of ballast
stands in for the other models a side-by-side benchmark holds, and forwards and caches alternate,
as they do there. Run it once each way:

    .venv/bin/python bench/cache_allocator.py
    .venv/bin/python bench/cache_allocator.py --keep-freed-memory
    .venv/bin/python bench/cache_allocator.py --ballast-gb 0 --back-to-back [--f-linear]   # the easiest case
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import glassformer as gf
from glassformer import linear as gf_linear


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
    parser.add_argument("--ballast-gb", type=float, default=1.5, help="resident memory besides the model")
    parser.add_argument("--back-to-back", action="store_true", help="all forwards, then all caches")
    parser.add_argument("--f-linear", action="store_true", help="glassformer.linear.use_onednn = False")
    args = parser.parse_args()
    gf_linear.use_onednn = gf_linear.use_onednn and not args.f_linear
    if args.keep_freed_memory:
        assert gf.keep_freed_memory(), "this allocator has no such setting"
    torch.set_num_threads(2)
    batch, pos = map(int, args.shape.split("x"))
    gpt2 = dict(n_layers=12, d_model=768, n_heads=12, d_vocab=50257, n_ctx=1024, act="gelu_new", tie_embeddings=True)
    cfg = gf.Config(**gpt2)
    model = gf.Transformer(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(0))
    ballast = torch.randn(int(args.ballast_gb * 2**30 / 4))  # noqa: F841  (resident while we time)
    with torch.inference_mode():
        seconds(lambda: model(tokens)), seconds(lambda: model.run_with_cache(tokens))  # warm-up
        if args.back_to_back:
            forward = [seconds(lambda: model(tokens)) for _ in range(args.repeats)]
            cached = [seconds(lambda: model.run_with_cache(tokens)) for _ in range(args.repeats)]
        else:
            forward, cached = [], []
            for _ in range(args.repeats):
                forward.append(seconds(lambda: model(tokens)))
                cached.append(seconds(lambda: model.run_with_cache(tokens)))
    f, c = statistics.median(forward), statistics.median(cached)
    order = "back to back" if args.back_to_back else "alternating"
    print(
        f"{args.shape}, keep_freed_memory={args.keep_freed_memory}, ballast {args.ballast_gb} GB, {order}, "
        f"oneDNN {gf_linear.use_onednn}: forward {f:.3f} s, run_with_cache {c:.3f} s, ratio {c / f:.2f}; "
        f"cache calls {[round(x, 2) for x in cached]}"
    )


if __name__ == "__main__":
    main()
