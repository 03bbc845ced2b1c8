"""Training throughput, side by side: a glassformer training step (forward, backward, clipping,
AdamW as `glassformer train` runs it) vs a lean nanoGPT-style model of the same dimensions with
the same optimizer settings, in one process, taking turns.

6 layers, 6 heads, 384 wide, context 256, batch 16, vocabulary 65 (nanoGPT's Shakespeare model),
float32, 2 threads. Reports tokens/s of each and the ratio; target ratio >= 1.0.

    .venv/bin/python bench/train.py [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from forward import THREADS, cpu_model  # noqa: E402
from lean import LeanConfig, LeanGPT  # noqa: E402

import glassformer as gf  # noqa: E402
from glassformer.training.trainer import TrainConfig, loss_of, make_optimizer  # noqa: E402

DIMS = dict(n_layers=6, n_heads=6, d_model=384, n_ctx=256, d_vocab=65)
BATCH = 16


def glassformer_step() -> Callable[[torch.Tensor, torch.Tensor], None]:
    model = gf.Transformer(gf.Config(**DIMS, tie_embeddings=True), seed=0).train()
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_of(model, {"tokens": x, "targets": y}).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def lean_step() -> Callable[[torch.Tensor, torch.Tensor], None]:
    cfg = LeanConfig(
        n_layer=DIMS["n_layers"],
        n_head=DIMS["n_heads"],
        n_embd=DIMS["d_model"],
        vocab_size=DIMS["d_vocab"],
        block_size=DIMS["n_ctx"],
    )
    model = LeanGPT(cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
        fused=True,
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed sample")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, DIMS["d_vocab"], (BATCH, DIMS["n_ctx"]), generator=g)
    y = torch.randint(0, DIMS["d_vocab"], (BATCH, DIMS["n_ctx"]), generator=g)
    steps = {"glassformer": glassformer_step(), "lean nanoGPT-style": lean_step()}
    for step in steps.values():
        for _ in range(3):
            step(x, y)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            samples[name].append(BATCH * DIMS["n_ctx"] * args.steps / (time.perf_counter() - start))
    rate = {name: statistics.median(s) for name, s in samples.items()}
    print(
        f"{cpu_model()}, {THREADS} threads; 6L/6H/384, context 256, batch 16, vocab 65; "
        f"medians of {args.repeats} x {args.steps} steps"
    )
    for name, r in rate.items():
        print(f"  {name:<20} {r:>8.0f} tokens/s")
    print(f"  ratio glassformer/lean: {rate['glassformer'] / rate['lean nanoGPT-style']:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
