"""The speed a user gets from a plain script: every figure here comes from a fresh Python process that
does only what a new user types (no `inference_mode`, no warm-up, no thread setting, nothing dropped).

GPT-2 small with random weights, as in issue 14: `gf.Transformer.from_hf(GPT2LMHeadModel(GPT2Config()))`
against the same `transformers` model, put in eval mode as `from_pretrained` would leave it. Each process
times its first call on its own and then three more (median); processes of the two libraries alternate,
`--rounds` times, and the medians over rounds are printed with their spread.

    .venv/bin/python bench/plain_script.py [--rounds 3] [--only PARTS] [--json out.json]

Tasks: `generate` (prompt 32, 64 new tokens, greedy, batch 1), the forward at 1x128, 8x128 and 1x1024
(as `model(tokens)`, autograd on, as a script has it), and glassformer's `run_with_cache` with every
hook at the same shapes (as a ratio to its own forward). `--only 1x1024,generate` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

SETUP = {
    "glassformer": """
        import glassformer as gf
        model = gf.Transformer.from_hf(GPT2LMHeadModel(GPT2Config()))
        generate = lambda p: model.generate(p, max_new_tokens=64)
        forward = lambda t: model(t)
        cached = lambda t: model.run_with_cache(t)
    """,
    "transformers": """
        model = GPT2LMHeadModel(GPT2Config()).eval()
        generate = lambda p: model.generate(p, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
        forward = lambda t: model(t).logits
        cached = None
    """,
}

WORKER = """
import json, statistics, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
t0 = time.perf_counter()
{setup}
built = time.perf_counter() - t0
g = torch.Generator().manual_seed(0)
inputs = {{
    "generate b1 p32+64": (lambda: generate, torch.randint(0, 50257, (1, 32), generator=g)),
    "forward 1x128": (lambda: forward, torch.randint(0, 50257, (1, 128), generator=g)),
    "forward 8x128": (lambda: forward, torch.randint(0, 50257, (8, 128), generator=g)),
    "run_with_cache 1x128": (lambda: cached, torch.randint(0, 50257, (1, 128), generator=g)),
    "run_with_cache 8x128": (lambda: cached, torch.randint(0, 50257, (8, 128), generator=g)),
    "forward 1x1024": (lambda: forward, torch.randint(0, 50257, (1, 1024), generator=g)),
    "run_with_cache 1x1024": (lambda: cached, torch.randint(0, 50257, (1, 1024), generator=g)),
}}
inputs = {{task: v for task, v in inputs.items() if any(part in task for part in {only!r})}}
out = {{"build": built}}
for task, (fn, x) in inputs.items():
    fn = fn()
    if fn is None:
        continue
    times = []
    for _ in range(4):
        t0 = time.perf_counter(); fn(x); times.append(time.perf_counter() - t0)
    out[task] = {{"first": times[0], "median": statistics.median(times[1:])}}
print("RESULT " + json.dumps(out))
"""


def run_worker(library: str, only: list[str]) -> dict:
    """One fresh process of `library`'s plain script, on the tasks whose names contain a part of `only`."""
    code = WORKER.format(setup=textwrap.dedent(SETUP[library]).strip(), only=only)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write every round's figures here")
    parser.add_argument("--only", default="", help="comma-separated parts of task names to run (default: all)")
    args = parser.parse_args()
    rounds: dict[str, list[dict]] = {"glassformer": [], "transformers": []}
    for r in range(args.rounds):
        for library in (("glassformer", "transformers") if r % 2 == 0 else ("transformers", "glassformer")):
            rounds[library].append(run_worker(library, args.only.split(",")))
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}; {args.rounds} fresh processes each\n")
    print("| task | gf first call s | gf later s | transformers first s | transformers later s "
          "| gf/tf later | gf/tf first |")
    print("|---|---|---|---|---|---|---|")
    gf_rounds, tf_rounds = rounds["glassformer"], rounds["transformers"]
    for task in (t for t in gf_rounds[0] if t != "build"):
        first = statistics.median(r[task]["first"] for r in gf_rounds)
        later = statistics.median(r[task]["median"] for r in gf_rounds)
        if task in tf_rounds[0]:
            tf_first = statistics.median(r[task]["first"] for r in tf_rounds)
            tf_later = statistics.median(r[task]["median"] for r in tf_rounds)
            print(
                f"| {task} | {first:.3f} | {later:.3f} | {tf_first:.3f} | {tf_later:.3f} "
                f"| {later / tf_later:.2f} | {first / tf_first:.2f} |"
            )
        else:
            fwd = statistics.median(r[task.replace("run_with_cache", "forward")]["median"] for r in gf_rounds)
            print(f"| {task} | {first:.3f} | {later:.3f} | | | {later / fwd:.2f} × gf forward | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounds, f, indent=1)


if __name__ == "__main__":
    main()
