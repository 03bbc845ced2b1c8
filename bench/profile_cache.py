"""What `run_with_cache` adds to a forward pass, piece by piece, for one GPT-2-small layer.

Times (median, contended samples redone) the attention of one glassformer layer on a `--shape` input:
the fused path that a plain forward runs, the explicit path that hooking the scores or the pattern
switches to, the per-head `result` that hooking `hook_result` adds, and, for comparison, variants of
the explicit steps with fewer full-size temporaries. Then the whole model: forward, run_with_cache,
and the cost of only touching as many fresh bytes as the cache holds.

    .venv/bin/python bench/profile_cache.py --shape 1x1024
    THP_MEM_ALLOC_ENABLE=1 .venv/bin/python bench/profile_cache.py   # PyTorch's transparent-huge-page allocations
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from forward import (
    CONTENDED_CORES,
    THREADS,
    Dims,
    build_glassformer,
    build_hf,
    cpu_jiffies,
    others_cores,
    parse_shape,
    wait_quiet,
)
from torch import Tensor

import glassformer as gf
from glassformer.cells.attention import Attention, AttentionMask


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` uncontended calls, after one warm-up call."""
    fn()
    samples: list[float] = []
    for _ in range(4 * repeats):
        if len(samples) == repeats:
            break
        wait_quiet(60.0)
        jiffies, start = cpu_jiffies(), time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        del result
        if others_cores(jiffies, cpu_jiffies(), seconds) <= CONTENDED_CORES:
            samples.append(1e3 * seconds)
    return statistics.median(samples) if samples else float("nan")


def explicit_lean(attn: Attention, q: Tensor, k: Tensor, v: Tensor, blocked: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The explicit steps with fewer full-size temporaries: scale folded into q (pos x d_model
    elements, not pos x pos x heads), matmul in (batch, heads, ...) layout, the mask's complement
    computed once and applied in place. q (batch, pos, heads, d_head); k, v (batch, heads, k_pos, d_head).
    Returns (scores, pattern, z) as the hooks would see them."""
    qh = (q * attn.scale).transpose(1, 2)  # (batch, heads, pos, d_head)
    scores = torch.matmul(qh, k.transpose(-1, -2))  # (batch, heads, pos, k_pos)
    scores.masked_fill_(blocked, float("-inf"))
    pattern = scores.softmax(dim=-1)
    z = torch.matmul(pattern, v).transpose(1, 2)  # (batch, pos, heads, d_head)
    return scores, pattern, z


def layer_rows(model: gf.Transformer, batch: int, pos: int, repeats: int) -> list[tuple[str, float]]:
    """(what, ms) for one layer's attention paths, and each step of the explicit one."""
    attn = model.blocks[0].attn
    x = torch.randn(batch, pos, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    q, k, v = attn.keys_values(x, None, None, None)  # q (b, pos, h, d); k, v (b, h, k_pos, d)
    mask = AttentionMask(None)
    allowed = mask.allowed(True, pos, pos, x.device)
    blocked = ~allowed
    scores = torch.einsum("bqhd,bhkd->bhqk", q * attn.scale, k).masked_fill_(blocked, float("-inf"))
    pattern = scores.softmax(dim=-1)
    z = attn._fused(q, k, v, mask)
    w_o = attn.W_O
    warm = torch.empty_like(scores)
    steps = {
        "fused attention (SDPA), as in a plain forward": lambda: attn._fused(q, k, v, mask),
        "explicit attention, as in run_with_cache (attention.py `_explicit`)": lambda: attn._explicit(q, k, v, allowed),
        "  scores: einsum(q * scale, k)": lambda: torch.einsum("bqhd,bhkd->bhqk", q * attn.scale, k),
        "  ~allowed + masked_fill_ (in place)": lambda: scores.masked_fill_(~allowed, float("-inf")),
        "  softmax (a new score-sized tensor)": lambda: scores.softmax(dim=-1),
        "  einsum(pattern, v)": lambda: torch.einsum("bhqk,bhkd->bqhd", pattern, v),
        "  variant of the whole: matmul in (batch, heads, ...) layout": lambda: explicit_lean(attn, q, k, v, blocked),
        "writing a fresh score-sized tensor (empty_like + fill_)": lambda: torch.empty_like(scores).fill_(0.0),
        "writing a warm score-sized tensor (fill_)": lambda: warm.fill_(0.0),
        "W_O merge, as in a plain forward: F.linear(z.flatten(2), ...)": lambda: F.linear(
            z.flatten(2), attn.o_weight, attn.b_O
        ),
        "per-head result + sum, as with hook_result (einsum, .sum(2), + b_O)": lambda: (
            torch.einsum("bphd,hdm->bphm", z, w_o).sum(dim=2) + attn.b_O
        ),
        "  the einsum alone": lambda: torch.einsum("bphd,hdm->bphm", z, w_o),
    }
    return [(what, median_ms(fn, repeats)) for what, fn in steps.items()]


def touch(n_bytes: int, chunk: int) -> list[Tensor]:
    """Allocate and write `n_bytes` of fresh memory in `chunk`-byte tensors, all kept alive."""
    return [torch.empty(chunk // 4).fill_(1.0) for _ in range(n_bytes // chunk)]


def model_rows(model: gf.Transformer, tokens: Tensor, repeats: int) -> list[tuple[str, float]]:
    """(what, ms) for the whole model."""
    _, cache = model.run_with_cache(tokens)
    n_bytes = sum(t.numel() * t.element_size() for t in cache.values())
    names = [n for n in model.hook_dict if not n.endswith("hook_result")]
    del cache
    return [
        ("forward", median_ms(lambda: model(tokens), repeats)),
        ("run_with_cache, every hook", median_ms(lambda: model.run_with_cache(tokens), repeats)),
        (
            "run_with_cache, every hook but hook_result",
            median_ms(lambda: model.run_with_cache(tokens, names_filter=names), repeats),
        ),
        (
            f"touch {n_bytes / 1e6:.0f} MB of fresh memory in 50 MB tensors (the cache's size)",
            median_ms(lambda: touch(n_bytes, 50_331_648), repeats),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1x1024", help="batch x pos (default 1x1024)")
    parser.add_argument("--repeats", type=int, default=7, help="samples per measurement (default 7)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    batch, pos = parse_shape(args.shape)
    dims = Dims()
    with torch.inference_mode():
        model = build_glassformer(dims, build_hf(dims))
        tokens = torch.randint(0, dims.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(pos))
        rows = layer_rows(model, batch, pos, args.repeats)
        rows += [("", float("nan"))] + model_rows(model, tokens, args.repeats)
    print(f"### run_with_cache pieces, {args.shape}, median of {args.repeats} (ms; layer rows: one of 12 layers)\n")
    print("| what | ms |\n|---|---|")
    for what, ms in rows:
        print(f"| {what} | {ms:.1f} |" if what else "| **whole model** | |")


if __name__ == "__main__":
    main()
