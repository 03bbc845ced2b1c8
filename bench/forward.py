"""Forward-pass benchmark: glassformer against Hugging Face, a lean SDPA model and TransformerLens.

One process, float32, 2 threads, `torch.inference_mode()`. GPT-2-small dimensions, random weights
(no hub download): the Hugging Face model is built from `GPT2Config()`, and its weights are copied
into every other model once, so a logits check proves that all of them compute the same function
before anything is timed. Models are timed round-robin (each repeat runs every model once), so
drift of the machine affects all of them alike; the median of the repeats is reported.

    .venv/bin/python bench/forward.py                    # TransformerLens 3.9 HookedTransformer as peer
    .venv-tl4/bin/python bench/forward.py --peer tl4     # TransformerLens 4.x TransformerBridge as peer
    .venv/bin/python bench/forward.py --quick            # 1x128 only, 3 repeats: a smoke test
    .venv/bin/python bench/forward.py --keep-freed-memory  # glibc keeps freed memory (see glassformer/memory.py)
    .venv/bin/python bench/forward.py --model gemma3     # or qwen3: bench/families.py's model against transformers

FLOP convention: 2 FLOPs per multiply-add of every weight matmul (QKV, W_O, W_in, W_out and the
unembedding) per token, plus attention counted causally: QK^T and pattern@V over the lower triangle,
2 * n_layers * batch * pos^2 * d_model (half of the full-matrix 4 * n_layers * batch * pos^2 * d_model).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: every model is built from a config
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families  # noqa: E402
from lean import LeanConfig, LeanGPT  # noqa: E402

import glassformer as gf  # noqa: E402
from glassformer import linear as gf_linear  # noqa: E402

THREADS = 2
DEFAULT_SHAPES = "1x128,8x128,1x1024"
MATMULS_PER_SAMPLE = 10  # products timed together, so one sample spans many clock ticks
MATMUL_SHAPES = ((1024, 768, 3072), (1024, 3072, 768), (1024, 768, 2304), (128, 768, 3072))
AGREE_TOL = 1e-3  # max |logit difference| allowed before timing is refused
QUIET_BUSY = 0.15  # share of all CPUs busy (while we sleep) below which the machine counts as quiet
CONTENDED_CORES = 0.15  # cores other processes may use, on average, during a timed call before its round is redone
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MAX_DROPPED_ROUNDS = 20  # per shape; after that, contended rounds are kept (and show in the spread table)


@dataclass(frozen=True)
class Dims:
    """GPT-2 small."""

    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    d_mlp: int = 3072
    d_vocab: int = 50257
    n_ctx: int = 1024


@dataclass
class Case:
    """One timed callable: `fn(tokens)` runs a full forward pass (or a cached run)."""

    name: str
    fn: Callable[[Tensor], Any]
    times: dict[str, list[float]] = field(default_factory=dict)  # shape label -> seconds per repeat
    cache: dict[str, tuple[int, float]] = field(default_factory=dict)  # shape label -> (entries, MB)
    others: dict[str, list[float]] = field(default_factory=dict)  # shape label -> cores other processes used


# --------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The AVX-512 / AMX flags that decide which matmul kernels run."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return " ".join(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "amx")))
    except OSError:
        pass
    return ""


def versions() -> dict[str, str]:
    """Versions of every library whose speed is compared, and the glassformer commit timed."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # a peer outside the `bench` extra: the GPT-2 run needs it, not the others
            return "not installed"

    names = ("torch", "transformers", "transformer-lens", "glassformer")
    return {"python": platform.python_version(), **{name: installed(name) for name in names}, "commit": git_commit()}


def git_commit() -> str:
    """Short commit of the glassformer source tree, '+dirty' when src/ has uncommitted changes."""
    import subprocess

    root = Path(gf.__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "src"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def cpu_jiffies() -> tuple[int, int]:
    """(busy clock ticks of the whole machine, clock ticks of this process) so far; (0, 0) off Linux."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return sum(values) - values[3] - values[4], int(own[11]) + int(own[12])  # all but idle, iowait; utime + stime


def others_cores(before: tuple[int, int], after: tuple[int, int], seconds: float) -> float:
    """How many cores other processes kept busy, on average, between two `cpu_jiffies()` samples."""
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(others, 0) / CLK_TCK / max(seconds, 1e-9)


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs that other processes kept busy over `seconds`, while this one sleeps."""
    before = cpu_jiffies()
    time.sleep(seconds)
    return others_cores(before, cpu_jiffies(), seconds) / (os.cpu_count() or 1)


def check_quiet(when: str, record: list[tuple[str, float]]) -> None:
    """Print (and record) how busy the machine was just now; warn when something else is running."""
    busy = busy_fraction()
    record.append((when, busy))
    warning = "  (other processes active: contended rounds are redone)" if busy > QUIET_BUSY else ""
    print(f"  machine busy {100 * busy:.0f}% {when}{warning}")


def matmul_ceiling(
    repeats: int, patience: float, shapes: tuple[tuple[int, int, int], ...] = MATMUL_SHAPES
) -> dict[str, float]:
    """fp32 GFLOP/s of `(m, k) @ (k, n)` for `shapes` (GPT-2's by default), by `torch.mm` (MKL) and by oneDNN's
    inner product (what glassformer's `linear` runs without autograd): median over `repeats`
    samples of MATMULS_PER_SAMPLE products each, a sample taken again when another process used
    the CPUs."""
    gen = torch.Generator().manual_seed(0)
    result = {}
    for m, k, n in shapes:
        a, b, out = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen), torch.empty(m, n)
        b_rows = b.T.contiguous()  # (n, k): the (out_features, in_features) layout of a weight
        products = {"mm": partial(torch.mm, a, b, out=out)}
        if gf_linear.use_onednn:
            products["oneDNN"] = partial(torch.ops.mkldnn._linear_pointwise, a, b_rows, None, "none", [], "")
        for kind, product in products.items():
            product()  # warm-up
            samples: list[float] = []
            for _ in range(4 * repeats):
                if len(samples) == repeats:
                    break
                wait_quiet(patience)
                jiffies, start = cpu_jiffies(), time.perf_counter()
                for _ in range(MATMULS_PER_SAMPLE):
                    product()
                seconds = time.perf_counter() - start
                if others_cores(jiffies, cpu_jiffies(), seconds) <= CONTENDED_CORES:
                    samples.append(MATMULS_PER_SAMPLE * 2 * m * k * n / seconds / 1e9)
            result[f"{m}x{k}@{k}x{n} {kind}"] = statistics.median(samples) if samples else float("nan")
    return result


# ---------------------------------------------------------------------------------------------- models


def build_hf(dims: Dims, seed: int = 0) -> nn.Module:
    """Hugging Face GPT-2 with SDPA attention and random weights (GPT2Config defaults = GPT-2 small)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(attn_implementation="sdpa")
    assert (config.n_embd, config.n_layer, config.n_head, config.vocab_size, config.n_positions) == (
        dims.d_model,
        dims.n_layers,
        dims.n_heads,
        dims.d_vocab,
        dims.n_ctx,
    ), "GPT2Config() defaults are not GPT-2 small any more"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def build_glassformer(dims: Dims, hf: nn.Module) -> gf.Transformer:
    """glassformer with GPT-2's wiring, its weights copied from `hf` through the TransformerLens views."""
    cfg = gf.Config(
        arch="decoder",
        n_layers=dims.n_layers,
        d_model=dims.d_model,
        n_heads=dims.n_heads,
        d_vocab=dims.d_vocab,
        n_ctx=dims.n_ctx,
        positional="learned",
        norm="layernorm",
        act="gelu_new",
        tie_embeddings=True,
        bias=True,
    )
    model = gf.Transformer(cfg, seed=0).eval()
    copy_hf_gpt2(model, hf)
    return model


def put(module: nn.Module, name: str, value: Tensor) -> None:
    """Copy `value` into `module.name`, whether that is a parameter or a TransformerLens-shaped view.

    Plain assignment does not do for both: a registered parameter (W_E, ln w/b, b_O, b_in, b_out)
    rejects a plain tensor and silently aliases an `nn.Parameter`, and a view (W_Q, W_in, ...) rejects
    an `nn.Parameter` with a KeyError from `nn.Module.__setattr__`.
    """
    target = getattr(module, name)
    if isinstance(target, nn.Parameter):
        target.copy_(value)
    else:
        setattr(module, name, value.detach())


@torch.no_grad()
def copy_hf_gpt2(model: gf.Transformer, hf: nn.Module) -> None:
    """Copy a Hugging Face GPT-2 into glassformer. HF Conv1D weights are (in, out); c_attn is [Q|K|V]."""
    cfg, src = model.cfg, hf.transformer
    heads, d_head, d_model = cfg.n_heads, cfg.d_head, cfg.d_model

    def per_head_in(w: Tensor) -> Tensor:  # (d_model, heads * d_head) -> (heads, d_model, d_head)
        return w.reshape(d_model, heads, d_head).permute(1, 0, 2)

    put(model.embed, "W_E", src.wte.weight)
    put(model.pos_embed, "W_pos", src.wpe.weight)
    for ours, theirs in zip(model.blocks, src.h, strict=True):
        for norm, hf_norm in ((ours.ln1, theirs.ln_1), (ours.ln2, theirs.ln_2)):
            put(norm, "w", hf_norm.weight)
            put(norm, "b", hf_norm.bias)
        w_qkv, b_qkv = theirs.attn.c_attn.weight.split(d_model, dim=1), theirs.attn.c_attn.bias.split(d_model)
        for i, part in enumerate("QKV"):
            put(ours.attn, f"W_{part}", per_head_in(w_qkv[i]))
            put(ours.attn, f"b_{part}", b_qkv[i].reshape(heads, d_head))
        put(ours.attn, "W_O", theirs.attn.c_proj.weight.reshape(heads, d_head, d_model))
        put(ours.attn, "b_O", theirs.attn.c_proj.bias)
        put(ours.mlp, "W_in", theirs.mlp.c_fc.weight)
        put(ours.mlp, "b_in", theirs.mlp.c_fc.bias)
        put(ours.mlp, "W_out", theirs.mlp.c_proj.weight)
        put(ours.mlp, "b_out", theirs.mlp.c_proj.bias)
    put(model.ln_final, "w", src.ln_f.weight)
    put(model.ln_final, "b", src.ln_f.bias)
    if model.unembed.b_U is not None:
        model.unembed.b_U.zero_()  # GPT-2's head has no bias


def build_lean(dims: Dims, hf: nn.Module) -> LeanGPT:
    """The lean nanoGPT-style reference, with `hf`'s weights."""
    cfg = LeanConfig(dims.n_layers, dims.n_heads, dims.d_model, dims.d_vocab, dims.n_ctx)
    return LeanGPT(cfg).load_hf_gpt2(hf).eval()


def build_tl3(dims: Dims, hf: nn.Module) -> nn.Module:
    """TransformerLens 3.x HookedTransformer from a config (no weight processing), `hf`'s weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    cfg = HookedTransformerConfig(
        n_layers=dims.n_layers,
        d_model=dims.d_model,
        n_ctx=dims.n_ctx,
        d_head=dims.d_model // dims.n_heads,
        n_heads=dims.n_heads,
        d_mlp=dims.d_mlp,
        d_vocab=dims.d_vocab,
        act_fn="gelu_new",
        normalization_type="LN",
        device="cpu",
        seed=0,
    )
    model = HookedTransformer(cfg)
    missing, unexpected = model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith(("b_U", "IGNORE", ".mask")) for k in missing), missing
    with torch.no_grad():
        model.unembed.b_U.zero_()
    return model.eval()


def build_tl4(dims: Dims, hf: nn.Module) -> nn.Module:
    """TransformerLens 4.x TransformerBridge around a second HF GPT-2 holding `hf`'s weights.

    The bridge replaces submodules of the model it wraps, so it gets its own copy; it is built with
    `build_bridge_from_module` from the local object and its config: no hub access.
    """
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    wrapped = build_hf(dims, seed=1)
    wrapped.load_state_dict(hf.state_dict())
    return build_bridge_from_module(wrapped, "GPT2LMHeadModel", hf_config=wrapped.config).eval()


def build_peer(peer: str, dims: Dims, hf: nn.Module) -> nn.Module:
    """The TransformerLens model this run compares against."""
    return build_tl3(dims, hf) if peer == "tl3" else build_tl4(dims, hf)


# ------------------------------------------------------------------------------------------ agreement


def hf_logits(hf: nn.Module, tokens: Tensor) -> Tensor:
    """HF logits without building a KV cache (the forward-pass work only)."""
    return hf(input_ids=tokens, use_cache=False).logits


def check_agreement(models: dict[str, Callable[[Tensor], Tensor]], reference: Tensor, tokens: Tensor) -> dict:
    """Max |logit - HF logit| of every model on `tokens`; exits if any is above AGREE_TOL."""
    diffs = {name: float((fn(tokens) - reference).abs().max()) for name, fn in models.items()}
    for name, diff in diffs.items():
        verdict = "ok" if diff <= AGREE_TOL else "MISMATCH"
        print(f"  {name:<28} max |logits - HF logits| = {diff:.2e}  {verdict}")
    if any(d > AGREE_TOL for d in diffs.values()):
        sys.exit("models disagree with Hugging Face: timing them would compare different computations")
    return diffs


# --------------------------------------------------------------------------------------------- timing


def parse_shape(text: str) -> tuple[int, int]:
    """'8x128' -> (8, 128)."""
    batch, pos = text.lower().split("x")
    return int(batch), int(pos)


def cache_size(result: Any) -> tuple[int, float] | None:
    """(entries, MB) of the activation cache in a `(output, cache)` result, else None."""
    if not (isinstance(result, tuple) and len(result) == 2 and hasattr(result[1], "items")):
        return None
    tensors = [v for _, v in result[1].items() if isinstance(v, Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors) / 1e6


def timed(fn: Callable[[Tensor], Any], tokens: Tensor) -> tuple[float, float, Any]:
    """(wall seconds, cores that other processes used meanwhile, result) of one call, gc paused."""
    gc.collect()
    gc.disable()
    try:
        jiffies, start = cpu_jiffies(), time.perf_counter()
        result = fn(tokens)
        wall = time.perf_counter() - start
        return wall, others_cores(jiffies, cpu_jiffies(), wall), result
    finally:
        gc.enable()


def wait_quiet(max_wait: float) -> float:
    """Sleep until other processes leave the CPUs (under QUIET_BUSY busy), at most `max_wait` s; seconds waited."""
    start = time.perf_counter()
    while busy_fraction(0.5) > QUIET_BUSY and time.perf_counter() - start < max_wait:
        pass
    return time.perf_counter() - start


def run_round(cases: list[Case], tokens: Tensor, first: int) -> list[tuple[float, float]]:
    """Every case once, starting at `first` (rotated so no case always runs first): (seconds, others' cores)."""
    out: dict[str, tuple[float, float]] = {}
    for case in cases[first:] + cases[:first]:
        seconds, others, result = timed(case.fn, tokens)
        del result
        out[case.name] = (seconds, others)
    return [out[case.name] for case in cases]


def time_round_robin(cases: list[Case], label: str, tokens: Tensor, repeats: int, warmup: int, patience: float) -> int:
    """Warm every case up, then keep `repeats` rounds, each calling every case once.

    A round in which other processes used more than CONTENDED_CORES cores during any call is thrown
    away and run again (at most MAX_DROPPED_ROUNDS times), after waiting up to `patience` seconds
    for the machine to go quiet. Returns the number of rounds thrown away.
    """
    for case in cases:
        for _ in range(warmup):
            _, _, result = timed(case.fn, tokens)
            size = cache_size(result)
            if size is not None:
                case.cache[label] = size
            del result
        case.times[label], case.others[label] = [], []
    kept = dropped = 0
    while kept < repeats:
        waited = wait_quiet(patience)
        measured = run_round(cases, tokens, first=(kept + dropped) % len(cases))
        cells = ", ".join(
            f"{c.name} {t:.3f} s" + (f" (others {o:.1f})" if o > 0.05 else "")
            for c, (t, o) in zip(cases, measured, strict=True)
        )
        contended = max(o for _, o in measured) > CONTENDED_CORES
        if contended and dropped < MAX_DROPPED_ROUNDS:
            dropped += 1
            print(f"  {label} dropped (contended, waited {waited:.0f} s): {cells}")
            continue
        kept += 1
        for case, (seconds, others) in zip(cases, measured, strict=True):
            case.times[label].append(seconds)
            case.others[label].append(others)
        print(f"  {label} round {kept}/{repeats}: {cells}")
    return dropped


def forward_flops(dims: Dims, batch: int, pos: int) -> float:
    """FLOPs of one forward pass (see the module docstring for the convention)."""
    per_layer = 3 * dims.d_model**2 + dims.d_model**2 + 2 * dims.d_model * dims.d_mlp
    matmul = 2 * batch * pos * (dims.n_layers * per_layer + dims.d_model * dims.d_vocab)
    attention = 2 * dims.n_layers * batch * pos**2 * dims.d_model  # causal: half of 4 L B T^2 C
    return float(matmul + attention)


# -------------------------------------------------------------------------------------------- reports


def med(case: Case, label: str) -> float:
    return statistics.median(case.times[label])


def forward_table(cases: dict[str, Case], labels: list[str], peer: str, dims: Dims, ceiling: float) -> str:
    """Markdown: plain-forward medians, ratios and glassformer's share of the matmul ceiling."""
    head = (
        f"| batch×pos | glassformer (s) | HF sdpa (s) | lean (s) | {peer} (s) | gf/HF | gf/lean | gf/{peer} "
        "| gf with F.linear (s) | its /HF | its /lean "
        "| GFLOP | gf GFLOP/s | gf % of ceiling |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for label in labels:
        g, mkl, h, lean, p = (med(cases[n], label) for n in ("glassformer", "glassformer F.linear", "HF", "lean", peer))
        flops = forward_flops(dims, *parse_shape(label))
        rows.append(
            f"| {label} | {g:.3f} | {h:.3f} | {lean:.3f} | {p:.3f} | {g / h:.3f} | {g / lean:.3f} | {g / p:.3f} "
            f"| {mkl:.3f} | {mkl / h:.3f} | {mkl / lean:.3f} "
            f"| {flops / 1e9:.1f} | {flops / g / 1e9:.1f} | {100 * flops / g / 1e9 / ceiling:.0f}% |"
        )
    return "\n".join([head, *rows])


def cache_table(cases: dict[str, Case], labels: list[str], peer: str) -> str:
    """Markdown: run_with_cache against the plain forward of the same model."""
    head = (
        f"| batch×pos | gf forward (s) | gf run_with_cache (s) | gf cache/forward | gf cache | {peer} forward (s) "
        f"| {peer} run_with_cache (s) | {peer} cache/forward | {peer} cache |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for label in labels:
        cells = [label]
        for name in ("glassformer", peer):
            fwd, cached = med(cases[name], label), med(cases[f"{name} cache"], label)
            entries, mb = cases[f"{name} cache"].cache.get(label, (0, 0.0))
            cells += [f"{fwd:.3f}", f"{cached:.3f}", f"{cached / fwd:.2f}", f"{entries} tensors, {mb:.0f} MB"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, *rows])


def spread_table(cases: dict[str, Case], labels: list[str]) -> str:
    """Markdown: median [min, max] seconds of every case and the most cores other processes used
    during one of its kept calls, to judge the noise behind the ratios."""
    head = "| case | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels)
    rows = []
    for case in cases.values():
        cells = [
            f"{med(case, lb):.3f} [{min(case.times[lb]):.3f}, {max(case.times[lb]):.3f}] "
            f"others≤{max(case.others[lb]):.2f}"
            for lb in labels
        ]
        rows.append(f"| {case.name} | " + " | ".join(cells) + " |")
    return "\n".join([head, *rows])


def target_table(cases: dict[str, Case], labels: list[str]) -> str:
    """Markdown: pass/fail of the issue's targets at every shape."""
    targets = [
        ("glassformer forward ≤ 0.90 × HF", "glassformer", "HF", 0.90),
        ("glassformer forward ≤ 1.05 × lean", "glassformer", "lean", 1.05),
        ("glassformer run_with_cache ≤ 1.5 × glassformer forward", "glassformer cache", "glassformer", 1.5),
    ]
    rows = ["| target | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for text, num, den, limit in targets:
        cells = []
        for label in labels:
            ratio = med(cases[num], label) / med(cases[den], label)
            cells.append(f"{ratio:.3f} {'PASS' if ratio <= limit else 'FAIL'}")
        rows.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"batch x pos list (default {DEFAULT_SHAPES})")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case and shape (default 1)")
    parser.add_argument("--peer", choices=("tl3", "tl4"), default="tl3", help="TransformerLens version to compare")
    parser.add_argument(
        "--model",
        choices=("gpt2", *families.MODELS),
        default="gpt2",
        help="GPT-2 small (every peer), or a Gemma-3- / Qwen3-shaped model against transformers (bench/families.py)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 1x128, 3 repeats")
    parser.add_argument(
        "--patience", type=float, default=300.0, help="seconds to wait for other processes before a round (300)"
    )
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="call gf.keep_freed_memory() first (process-wide: every case, peers included, runs with it)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats = "1x128", 3
    return args


def with_f_linear(fn: Callable[[Tensor], Any]) -> Callable[[Tensor], Any]:
    """`fn` with every weight product through F.linear (MKL) instead of oneDNN: where the gain is."""

    def run(tokens: Tensor) -> Any:
        gf_linear.use_onednn = False
        try:
            return fn(tokens)
        finally:
            gf_linear.use_onednn = True

    return run


def make_cases(glass: gf.Transformer, hf: nn.Module, lean: nn.Module, peer: str, tl: nn.Module) -> dict[str, Case]:
    """The six timed cases: four plain forwards and the two cached runs."""
    cases = (
        Case("glassformer", glass),
        Case("glassformer F.linear", with_f_linear(glass)),
        Case("HF", lambda t: hf_logits(hf, t)),
        Case("lean", lean),
        Case(peer, tl),
        Case("glassformer cache", glass.run_with_cache),
        Case(f"{peer} cache", tl.run_with_cache),
    )
    return {case.name: case for case in cases}


def check_all(glass: gf.Transformer, hf: nn.Module, lean: nn.Module, peer: str, tl: nn.Module) -> dict[str, float]:
    """Every model's (and cached run's) logits against HF's on 2x64 random tokens."""
    print("agreement with HF on 2x64 random tokens:")
    tokens = torch.randint(0, Dims().d_vocab, (2, 64), generator=torch.Generator().manual_seed(1))
    models = {
        "glassformer": glass,
        "glassformer run_with_cache": lambda t: glass.run_with_cache(t)[0],
        "lean": lean,
        peer: tl,
        f"{peer} run_with_cache": lambda t: tl.run_with_cache(t)[0],
    }
    return check_agreement(models, hf_logits(hf, tokens), tokens)


def print_report(cases: dict[str, Case], labels: list[str], peer: str, ceiling: float, dropped: dict[str, int]) -> None:
    """The markdown tables of a run."""
    repeats = len(cases["glassformer"].times[labels[0]])
    print(f"\n### Forward pass, median of {repeats} (FLOPs: weight matmuls + causal attention)\n")
    print(forward_table(cases, labels, peer, Dims(), ceiling))
    print("\n### run_with_cache (every hook point) against the plain forward\n")
    print(cache_table(cases, labels, peer))
    print("\n### Targets\n")
    print(target_table(cases, labels))
    print("\n### Spread: median [min, max] seconds, most cores used by other processes\n")
    print("rounds dropped as contended: " + ", ".join(f"{k} {v}" for k, v in dropped.items()) + "\n")
    print(spread_table(cases, labels))


def family_report(cases: dict[str, Case], labels: list[str], glass: gf.Transformer, ceiling: float) -> str:
    """Markdown for a bench/families.py model: glassformer against transformers, its share of the
    matmul ceiling, run_with_cache against the plain forward, and the issue's forward target."""
    head = (
        "| batch×pos | glassformer (s) | HF sdpa (s) | gf/HF | target gf/HF ≤ 0.8 | gf with F.linear (s) | its /HF "
        "| GFLOP | gf GFLOP/s | gf % of ceiling | HF % of ceiling | gf run_with_cache (s) | cache/forward |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for label in labels:
        g, h, mkl, c = (
            med(cases[n], label) for n in ("glassformer", "HF", "glassformer F.linear", "glassformer cache")
        )
        gflops = families.forward_flops(glass, *parse_shape(label)) / 1e9
        rows.append(
            f"| {label} | {g:.3f} | {h:.3f} | {g / h:.3f} | {'PASS' if g / h <= 0.8 else 'FAIL'} | {mkl:.3f} "
            f"| {mkl / h:.3f} | {gflops:.1f} | {gflops / g:.1f} | {100 * gflops / g / ceiling:.0f}% "
            f"| {100 * gflops / h / ceiling:.0f}% | {c:.3f} | {c / g:.2f} |"
        )
    return "\n".join([head, *rows])


def run_family(
    args: argparse.Namespace, labels: list[str], quiet: list[tuple[str, float]]
) -> tuple[dict[str, float], dict, dict[str, int], dict[str, Case]]:
    """forward.py --model gemma3|qwen3: glassformer (from_hf, the default path) against transformers."""
    dropped: dict[str, int] = {}
    with torch.inference_mode():
        hf = families.build(args.model)
        glass = gf.Transformer.from_hf(hf)
        print(f"model: {families.describe(hf)}; peer: transformers (the lean model and TL are GPT-2's)")
        print(
            f"FLOPs: {families.weight_matrices(glass) / 1e6:.1f} M weight-matrix parameters per token "
            "(blocks + unembedding), attention over the keys each query sees (window where sliding)"
        )
        ceiling_by_shape = matmul_ceiling(max(args.repeats, 5), args.patience, families.matmul_shapes(glass))
        ceiling = max(ceiling_by_shape.values())
        print("matmul fp32 GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in ceiling_by_shape.items()))
        print(f"matmul ceiling: {ceiling:.0f} GFLOP/s")
        agreement = {}
        for batch, pos in families.agreement_shapes(glass):
            print(f"agreement with HF on {batch}x{pos} random tokens:")
            tokens = torch.randint(0, glass.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(1))
            agreement[f"{batch}x{pos}"] = check_agreement({"glassformer": glass}, hf_logits(hf, tokens), tokens)
        cases = {
            c.name: c
            for c in (
                Case("glassformer", glass),
                Case("glassformer F.linear", with_f_linear(glass)),
                Case("HF", lambda t: hf_logits(hf, t)),
                Case("glassformer cache", glass.run_with_cache),
            )
        }
        for label in labels:
            batch, pos = parse_shape(label)
            tokens = torch.randint(0, glass.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(pos))
            dropped[label] = time_round_robin(
                list(cases.values()), label, tokens, args.repeats, args.warmup, args.patience
            )
            check_quiet(f"after {label}", quiet)
    repeats = len(cases["glassformer"].times[labels[0]])
    print(f"\n### {args.model}: forward pass, median of {repeats}\n")
    print(family_report(cases, labels, glass, ceiling))
    print("\n### Spread: median [min, max] seconds, most cores used by other processes\n")
    print("rounds dropped as contended: " + ", ".join(f"{k} {v}" for k, v in dropped.items()) + "\n")
    print(spread_table(cases, labels))
    return ceiling_by_shape, agreement, dropped, cases


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.set_default_dtype(torch.float32)
    dims = Dims()
    labels = [s.strip() for s in args.shapes.split(",") if s.strip()]
    peer = {"tl3": "TL 3", "tl4": "TL 4 bridge"}[args.peer]

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {cpu_model()} ({os.cpu_count()} cpus; {cpu_flags()}), torch threads {torch.get_num_threads()}")
    info = versions()  # read once, at the start: the source may change while the run goes on
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if args.keep_freed_memory:
        print(f"allocator: freed memory kept for reuse (gf.keep_freed_memory() -> {gf.keep_freed_memory()})")

    quiet: list[tuple[str, float]] = []
    dropped: dict[str, int] = {}
    check_quiet("before the run", quiet)
    if args.model != "gpt2":
        ceiling_by_shape, agreement, dropped, cases = run_family(args, labels, quiet)
        if args.json:
            write_json(args, info, ceiling_by_shape, agreement, quiet, dropped, cases)
        return
    with torch.inference_mode():
        ceiling_by_shape = matmul_ceiling(max(args.repeats, 5), args.patience)
        ceiling = max(ceiling_by_shape.values())
        print("matmul fp32 GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in ceiling_by_shape.items()))
        print(f"matmul ceiling: {ceiling:.0f} GFLOP/s")

        print("building models (random weights, copied from the HF model into the others)")
        hf = build_hf(dims)
        glass, lean, tl = build_glassformer(dims, hf), build_lean(dims, hf), build_peer(args.peer, dims, hf)
        agreement = check_all(glass, hf, lean, peer, tl)

        cases = make_cases(glass, hf, lean, peer, tl)
        for label in labels:
            batch, pos = parse_shape(label)
            tokens = torch.randint(0, dims.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(pos))
            dropped[label] = time_round_robin(
                list(cases.values()), label, tokens, args.repeats, args.warmup, args.patience
            )
            check_quiet(f"after {label}", quiet)

    print_report(cases, labels, peer, ceiling, dropped)
    if args.json:
        write_json(args, info, ceiling_by_shape, agreement, quiet, dropped, cases)


def write_json(
    args: argparse.Namespace,
    info: dict[str, str],
    ceiling_by_shape: dict[str, float],
    agreement: dict,
    quiet: list[tuple[str, float]],
    dropped: dict[str, int],
    cases: dict[str, Case],
) -> None:
    """Every measurement of the run, to `args.json`."""
    record = {
        "argv": sys.argv,
        "model": args.model,
        "keep_freed_memory": args.keep_freed_memory,
        "cpu": cpu_model(),
        "threads": THREADS,
        "versions": info,
        "matmul_gflops": ceiling_by_shape,
        "agreement": agreement,
        "busy": quiet,
        "dropped_rounds": dropped,
        "times": {c.name: c.times for c in cases.values()},
        "others_cores": {c.name: c.others for c in cases.values()},
        "cache": {c.name: c.cache for c in cases.values() if c.cache},
    }
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
