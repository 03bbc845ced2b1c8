"""Low-bit decoding against llama.cpp on this CPU: SmolLM2-135M-Instruct.Q4_1.gguf, 2 threads each.

Runners, each in its own fresh process (load included, as a user runs them; rounds alternate order):
glassformer float32 (`from_gguf(path)`), bf16 and int8 (`from_gguf(path).quantize(...)`), int4
(`from_gguf(path, weights="keep")`: the file's Q4_1 blocks as int4, its Q8_0 embedding as int8),
llama.cpp through llama-cpp-python on the same file (n_threads=2), and transformers float32
(`from_pretrained(folder, gguf_file=...)`).

Figures: decode tok/s at batch 1 (prompt 64 + 128 new tokens, greedy, the whole call timed: prefill of
the 64 included), at batch 8 (not llama.cpp: its Python API decodes one sequence), prefill tok/s at
512, peak RSS of the process, and perplexity over the first 4 x 512 tokens of tinyshakespeare (each
window on its own, every position scored); for glassformer also the time of a decode with one hook
attached over one without (the median of three ratios, the two taking turns). The bound: bytes of
weight matrices read per decoded token over the measured memory bandwidth (a 512 MB float32 sum).

    .venv/bin/python bench/llm.py [--rounds 2] [--runners gf-f32,gf-int4,llama.cpp,...] [--pair] [--json out.json]

`--pair` adds glassformer int4 and llama.cpp decoding in one process, taking turns: on a machine whose
speed drifts between processes, the fairer ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_smollm2 import gguf_path, memory_bandwidth, status_mb  # noqa: E402

THREADS = 2
PAIR_ROUNDS = 8
PROMPT, NEW, PREFILL, WINDOWS = 64, 128, 512, 4
RUNNERS = ("gf-f32", "gf-bf16", "gf-int8", "gf-int4", "llama.cpp", "transformers")
TARGETS = {"int4 decode / llama.cpp": 1.0, "int4 prefill / llama.cpp": 1.0, "f32 decode / transformers": 1.5}


def text_tokens(tokenize: Any) -> list[int]:
    """tinyshakespeare's opening as token ids, by the runner's own tokenizer."""
    text = (files("glassformer") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return tokenize(text[:40_000])[: PREFILL * WINDOWS]


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def child_glassformer(kind: str, out: dict) -> None:
    import torch

    import glassformer as gf

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    if kind == "gf-int4":
        model = gf.Transformer.from_gguf(gguf_path(), weights="keep")
    else:
        model = gf.Transformer.from_gguf(gguf_path())
        if kind != "gf-f32":
            model.quantize(kind.removeprefix("gf-"))
    out["load_s"] = time.perf_counter() - start
    ids = text_tokens(lambda t: model.to_tokens(t)[0].tolist())
    tokens = torch.tensor(ids)
    prompt = tokens[None, 1000 : 1000 + PROMPT]
    out["prefill_s"] = timed(lambda: model(tokens[None, :PREFILL]))
    out["decode_b1_s"] = timed(lambda: model.generate(prompt, NEW))
    out["decode_b8_s"] = timed(lambda: model.generate(prompt.repeat(8, 1), NEW))
    # one hook against none: three calls of each, taking turns after the timed first call above
    pairs = [
        (timed(lambda: hooked_generate(model, prompt)), timed(lambda: model.generate(prompt, NEW))) for _ in range(3)
    ]
    out["hook_ratio"] = statistics.median(hooked / plain for hooked, plain in pairs)
    out["tokens_b1"] = model.generate(prompt, 32)[0, PROMPT:].tolist()
    with torch.no_grad():
        out["nll"] = [window_nll(model(w[None])[0], w) for w in tokens.view(WINDOWS, PREFILL)]


def hooked_generate(model: Any, prompt: Any) -> Any:
    """Decoding with one hook attached (it reads the last layer's residual and changes nothing)."""
    seen = []
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with model.hooks([(last, lambda x, hook: seen.append(x.shape[1]))]):
        return model.generate(prompt, NEW)


def window_nll(logits: Any, tokens: Any) -> float:
    """Summed negative log-likelihood of tokens[1:] given the logits (pos, vocab)."""
    import torch

    logp = torch.log_softmax(logits[:-1].float(), -1)
    return float(-logp.gather(1, tokens[1:, None].long()).sum())


def child_transformers(out: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(THREADS)
    path = gguf_path()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out["load_s"] = time.perf_counter() - start
    tokens = torch.tensor(text_tokens(lambda t: tok(t)["input_ids"]))
    prompt = tokens[None, 1000 : 1000 + PROMPT]

    def generate(p: Any) -> Any:
        return model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0)

    with torch.no_grad():
        out["prefill_s"] = timed(lambda: model(tokens[None, :PREFILL]))
        out["decode_b1_s"] = timed(lambda: generate(prompt))
        out["decode_b8_s"] = timed(lambda: generate(prompt.repeat(8, 1)))
        out["tokens_b1"] = model.generate(prompt, max_new_tokens=32, do_sample=False)[0, PROMPT:].tolist()
        out["nll"] = [window_nll(model(w[None]).logits[0], w) for w in tokens.view(WINDOWS, PREFILL)]


def child_llama(out: dict) -> None:
    import numpy as np
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(str(gguf_path()), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, n_batch=512,
                logits_all=True, verbose=False)
    out["load_s"] = time.perf_counter() - start
    ids = text_tokens(lambda t: llm.tokenize(t.encode(), add_bos=False))
    prompt = ids[1000 : 1000 + PROMPT]

    def prefill() -> None:
        llm.reset()
        llm.eval(ids[:PREFILL])

    def decode() -> list[int]:
        llm.reset()
        got = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            got.append(token)
            if len(got) == NEW:
                break
        return got

    out["prefill_s"] = timed(prefill)
    out["decode_b1_s"] = timed(decode)
    out["tokens_b1"] = decode()[:32]
    nll = []
    for w in np.array(ids).reshape(WINDOWS, PREFILL):
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[:PREFILL - 1], dtype=np.float64)  # (pos - 1, vocab)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll.append(float(-logp[np.arange(PREFILL - 1), w[1:]].sum()))
    out["nll"] = nll


def child_pair(out: dict) -> None:
    """glassformer int4 and llama.cpp decoding in one process, taking turns (PAIR_ROUNDS each): the
    ratio then does not depend on how fast the machine was when each fresh process ran."""
    import torch
    from llama_cpp import Llama

    import glassformer as gf

    torch.set_num_threads(THREADS)
    model = gf.Transformer.from_gguf(gguf_path(), weights="keep")
    llm = Llama(str(gguf_path()), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, n_batch=512,
                logits_all=True, verbose=False)
    prompt = text_tokens(lambda t: model.to_tokens(t)[0].tolist())[1000 : 1000 + PROMPT]

    def ours() -> None:
        model.generate(torch.tensor([prompt]), NEW)

    def theirs() -> None:
        llm.reset()
        for count, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), 1):
            if count == NEW:
                break

    out["gf-int4"], out["llama.cpp"] = [], []
    for r in range(PAIR_ROUNDS):
        for kind, fn in (("gf-int4", ours), ("llama.cpp", theirs))[:: 1 if r % 2 == 0 else -1]:
            out[kind].append(NEW / timed(fn))


def child(kind: str) -> None:
    """One runner in this fresh process; prints its figures as JSON."""
    out: dict[str, Any] = {"runner": kind}
    Path("/proc/self/clear_refs").write_text("5")
    if kind == "pair":
        child_pair(out)
    elif kind.startswith("gf-"):
        child_glassformer(kind, out)
    elif kind == "llama.cpp":
        child_llama(out)
    else:
        child_transformers(out)
    out["peak_rss_mb"] = status_mb("VmHWM")
    print("RESULT " + json.dumps(out))


def run_child(kind: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", kind], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))


def weight_bytes() -> dict[str, float]:
    """Bytes of weight matrices read per decoded token, by storage (SmolLM2: layers + tied head)."""
    import glassformer as gf
    from glassformer.quantize import product_weights

    model = gf.Transformer.from_gguf(gguf_path(), weights="keep")
    params = dict(model.named_parameters())
    layers = sum(params[n].numel() for n in product_weights(model) if n != "embed.W_E")
    head = params["embed.W_E"].numel()
    return {
        "gf-f32": 4 * (layers + head), "gf-bf16": 2 * (layers + head), "gf-int8": layers * 1.125 + head * 1.0625,
        "gf-int4": layers * 0.625 + head * 1.0625, "llama.cpp": layers * 0.625 + head * 1.0625,
        "transformers": 4 * (layers + head),
    }


def report(results: dict[str, list[dict]], bandwidth: float, bytes_per_token: dict[str, float]) -> None:
    def med(kind: str, key: str) -> float:
        values = [r[key] for r in results[kind] if key in r]
        return statistics.median(values) if values else float("nan")

    print("| runner | load s | decode b1 tok/s | decode b8 tok/s | prefill 512 tok/s | peak RSS MB | perplexity "
          "| bound tok/s | of bound | decode with a hook / without |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rate = {}
    for kind, rows in results.items():
        b1 = NEW / med(kind, "decode_b1_s")
        b8 = 8 * NEW / med(kind, "decode_b8_s")
        prefill = PREFILL / med(kind, "prefill_s")
        ppl = statistics.fmean([float(__import__("math").exp(sum(r["nll"]) / (WINDOWS * (PREFILL - 1))))
                                for r in rows])
        bound = bandwidth / bytes_per_token[kind]
        hook = med(kind, "hook_ratio")
        rate[kind] = (b1, prefill, ppl)
        print(f"| {kind} | {med(kind, 'load_s'):.2f} | {b1:.1f} | {b8:.1f} | {prefill:.0f} "
              f"| {med(kind, 'peak_rss_mb'):.0f} | {ppl:.3f} | {bound:.0f} | {b1 / bound:.2f} | {hook:.3f} |")
    print()
    if "gf-int4" in rate and "llama.cpp" in rate:
        for label, i in (("decode", 0), ("prefill", 1)):
            ratio = rate["gf-int4"][i] / rate["llama.cpp"][i]
            target = TARGETS[f"int4 {label} / llama.cpp"]
            print(f"int4 {label} / llama.cpp: {ratio:.2f} (target ≥ {target}: {'PASS' if ratio >= target else 'MISS'})")
        print(f"int4 perplexity / llama.cpp's: {rate['gf-int4'][2] / rate['llama.cpp'][2]:.4f} (target ≤ 1.01)")
    if "gf-f32" in rate and "transformers" in rate:
        ratio = rate["gf-f32"][0] / rate["transformers"][0]
        print(f"f32 decode / transformers: {ratio:.2f} (target ≥ 1.5: {'PASS' if ratio >= 1.5 else 'MISS'})")
    if "gf-int8" in rate and "gf-f32" in rate:
        print(f"int8 perplexity / float32: {rate['gf-int8'][2] / rate['gf-f32'][2]:.4f} (target ≤ 1.005)")
    for kind in results:
        if kind != "gf-f32" and "gf-f32" in results:
            same = results[kind][0]["tokens_b1"] == results["gf-f32"][0]["tokens_b1"]
            print(f"{kind}: first 32 greedy tokens identical to glassformer float32's: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--json")
    parser.add_argument("--pair", action="store_true", help="int4 and llama.cpp also in one process, taking turns")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    kinds = args.runners.split(",")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    bandwidth = memory_bandwidth()["read"] * 1e9
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            results[kind].append(run_child(kind))
    print(f"memory bandwidth (512 MB float32 sum, {THREADS} threads): {bandwidth / 1e9:.1f} GB/s; "
          f"medians of {args.rounds} fresh processes per runner\n")
    report(results, bandwidth, weight_bytes())
    if args.pair:
        pair = run_child("pair")
        ours, theirs = statistics.median(pair["gf-int4"]), statistics.median(pair["llama.cpp"])
        rounds = [a / b for a, b in zip(pair["gf-int4"], pair["llama.cpp"], strict=True)]
        print(f"\nin one process, taking turns ({PAIR_ROUNDS} calls each, b1, {PROMPT} + {NEW}): "
              f"gf-int4 {ours:.1f} tok/s, llama.cpp {theirs:.1f}; ratio {ours / theirs:.2f} "
              f"(per pair {min(rounds):.2f}–{max(rounds):.2f})")
        results["pair"] = [pair]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
