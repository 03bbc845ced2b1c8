"""Tensor parallelism on this machine: 1 process (2 threads) against 2 processes (gloo, 1 thread each).

GPT-2-small dimensions with random weights (`gf.Transformer(..., seed=0)`, the same weights in every
process), float32, `torch.inference_mode()`. Three ways of running the same model, timed round-robin:

  1 process, 2 threads           the ordinary way on a 2-core machine
  1 process, 1 thread            half the machine: what a perfect 2-way split would be measured against
  2 processes x 1 thread (TP)    `gf.parallel.shard` over gloo on loopback: the fair comparison with
                                 "1 process, 2 threads", since both use both cores

Measures: forward 1x128; greedy `generate` from a 1x32 prompt with `--new` new tokens and with 1 new
token (prefill only), whose difference over `--new - 1` is the steady per-token decode time. Before
anything is timed, the 2-process logits and greedy tokens are checked against the 1-process ones.

Communication: every `torch.distributed.all_reduce` of one instrumented forward and one generate call
is counted (calls, floats, bytes, seconds inside the call, which includes waiting for the other
process), and a loopback all-reduce of a (1, 768) and a (128, 768) float32 tensor is timed alone,
next to a plain TCP round trip of the same 3 KB between the same two processes (the floor that the
operating system sets; the rest of an all-reduce's time is gloo's own).

This script is rank 0; it starts rank 1 itself (torch.multiprocessing, spawn). Rank 0 waits for the
machine to be quiet before each round and redoes a round in which other processes (not these two)
used more than CONTENDED_CORES cores during a call.

    .venv/bin/python bench/parallel.py [--repeats 5] [--new 64] [--patience 300]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import CLK_TCK, THREADS, cpu_model, versions  # noqa: E402

import glassformer as gf  # noqa: E402
from glassformer import parallel as tp  # noqa: E402

WORLD = 2
PROMPT = 32
FORWARD_POS = 128
AGREE_TOL = 1e-4  # max |logit difference| between 1 and 2 processes allowed before timing
QUIET_CORES = 0.3  # cores other processes may keep busy (while rank 0 sleeps) for the machine to count as quiet
CONTENDED_CORES = 0.15  # cores other processes may use during a timed call before its round is redone
MAX_DROPPED_ROUNDS = 20
ALL_REDUCE_SHAPES = ((1, 768), (128, 768))
ALL_REDUCE_CALLS = 1000
PING_BYTES = 3072  # a raw TCP round trip of one (1, 768) float32 message, for scale


def config() -> gf.Config:
    return gf.Config(
        arch="decoder",
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_vocab=50257,
        n_ctx=1024,
        positional="learned",
        norm="layernorm",
        act="gelu_new",
        tie_embeddings=True,
    )


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once


# ----------------------------------------------------------------------------------- CPU accounting


def process_ticks(pid: int) -> int:
    """utime + stime of every thread of process `pid` so far, in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def jiffies(pids: list[int]) -> tuple[int, int]:
    """(busy clock ticks of the whole machine, clock ticks of the processes `pids`) so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(process_ticks(pid) for pid in pids)


def others_cores(before: tuple[int, int], after: tuple[int, int], seconds: float) -> float:
    """Cores that processes other than ours kept busy, on average, between two `jiffies` samples."""
    return max((after[0] - before[0]) - (after[1] - before[1]), 0) / CLK_TCK / max(seconds, 1e-9)


def wait_quiet(pids: list[int], patience: float) -> float:
    """Sleep until other processes leave the CPUs, at most `patience` seconds; seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < patience:
        before = jiffies(pids)
        time.sleep(0.5)
        if others_cores(before, jiffies(pids), 0.5) <= QUIET_CORES:
            break
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------ communication


@dataclass
class Traffic:
    """What went through `dist.all_reduce` while instrumented."""

    calls: Counter = field(default_factory=Counter)  # floats per call -> calls
    bytes: int = 0
    seconds: float = 0.0


@contextmanager
def count_all_reduces() -> Iterator[Traffic]:
    """Wrap `torch.distributed.all_reduce` (which glassformer.parallel calls) to count and time it."""
    traffic, original = Traffic(), dist.all_reduce

    def counted(tensor: Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        out = original(tensor, *args, **kwargs)
        traffic.seconds += time.perf_counter() - start
        traffic.calls[tensor.numel()] += 1
        traffic.bytes += tensor.numel() * tensor.element_size()
        return out

    dist.all_reduce = counted
    try:
        yield traffic
    finally:
        dist.all_reduce = original


def time_all_reduce(shape: tuple[int, ...], calls: int) -> list[float]:
    """Seconds of each of `calls` back-to-back all-reduces of a float32 tensor of `shape`."""
    x = torch.randn(shape)
    for _ in range(20):
        dist.all_reduce(x)
    dist.barrier()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        dist.all_reduce(x)
        out.append(time.perf_counter() - start)
    return out


def tcp_round_trips(rank: int, calls: int) -> list[float]:
    """Seconds of each of `calls` round trips of PING_BYTES over a plain loopback TCP socket
    between rank 0 and rank 1 (TCP_NODELAY); rank 1 echoes."""
    listener = None
    port = torch.tensor([0])
    if rank == 0:
        listener = socket.create_server(("127.0.0.1", 0))
        port[0] = listener.getsockname()[1]
    dist.broadcast(port, src=0)
    if rank == 0:
        conn, _ = listener.accept()
    else:
        conn = socket.create_connection(("127.0.0.1", int(port)))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def receive() -> bytes:
        data = bytearray()
        while len(data) < PING_BYTES:
            data += conn.recv(PING_BYTES - len(data))
        return bytes(data)

    out, message = [], b"x" * PING_BYTES
    with conn:
        for i in range(calls + 50):  # the first 50 are warm-up
            if rank == 0:
                start = time.perf_counter()
                conn.sendall(message)
                receive()
                if i >= 50:
                    out.append(time.perf_counter() - start)
            else:
                conn.sendall(receive())
    if listener is not None:
        listener.close()
    return out


# ------------------------------------------------------------------------------------------- timing


@dataclass
class Case:
    """One way of running one measure: `procs` 1 runs on rank 0 alone (rank 1 waits in a barrier)."""

    name: str
    measure: str
    procs: int
    threads: int
    fn: Callable[[], object]
    times: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)
    idle_peer: list[float] = field(default_factory=list)  # cores rank 1 used while waiting (1-process cases)


def run_case(case: Case, rank: int, pids: list[int]) -> tuple[float, float, float]:
    """(seconds, others' cores, cores rank 1 used) of one call; for a 2-process case, the slower
    rank's seconds. Rank 1 waits in a barrier while rank 0 runs a 1-process case."""
    dist.barrier()
    seconds = others = peer = math.nan
    if case.procs == WORLD or rank == 0:
        torch.set_num_threads(case.threads)
        gc.collect()
        gc.disable()
        try:
            before, peer_before, start = jiffies(pids), process_ticks(pids[1]), time.perf_counter()
            case.fn()
            seconds = time.perf_counter() - start
            others = others_cores(before, jiffies(pids), seconds)
            peer = (process_ticks(pids[1]) - peer_before) / CLK_TCK / seconds
        finally:
            gc.enable()
    if case.procs == WORLD:
        slowest = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        seconds = float(slowest)
    return seconds, others, peer


def broadcast_flag(value: int) -> int:
    flag = torch.tensor([value])
    dist.broadcast(flag, src=0)
    return int(flag)


def time_measure(cases: list[Case], rank: int, pids: list[int], repeats: int, patience: float) -> int:
    """Warm every case up once, then `repeats` rounds of every case once (rotated); returns rounds dropped."""
    for case in cases:
        run_case(case, rank, pids)
    kept = dropped = 0
    while True:
        waited = wait_quiet(pids, patience) if rank == 0 else 0.0
        if not broadcast_flag(int(kept < repeats)):
            return dropped
        first = (kept + dropped) % len(cases)
        measured = {case.name: run_case(case, rank, pids) for case in cases[first:] + cases[:first]}
        if rank != 0:
            kept += 1  # rank 1 only follows rank 0's flags
            continue
        cells = ", ".join(f"{name} {t * 1e3:.0f} ms (others {o:.2f})" for name, (t, o, _) in measured.items())
        if max(o for _, o, _ in measured.values()) > CONTENDED_CORES and dropped < MAX_DROPPED_ROUNDS:
            dropped += 1
            print(f"  {cases[0].measure} dropped (contended, waited {waited:.0f} s): {cells}", flush=True)
            continue
        kept += 1
        for case in cases:
            case.times.append(measured[case.name][0])
            case.others.append(measured[case.name][1])
            case.idle_peer.append(measured[case.name][2])
        print(f"  {cases[0].measure} round {kept}/{repeats}: {cells}", flush=True)


# ------------------------------------------------------------------------------------------- worker


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank))
    torch.set_num_threads(1)
    tp.init(backend="gloo", timeout_s=args.patience + 600)  # rank 1 waits while rank 0 waits for quiet
    try:
        with torch.inference_mode():
            run(rank, args)
    finally:
        dist.destroy_process_group()


def say(rank: int, text: str = "") -> None:
    if rank == 0:
        print(text, flush=True)


def run(rank: int, args: argparse.Namespace) -> None:
    pid_list = [torch.zeros(1, dtype=torch.int64) for _ in range(WORLD)]
    dist.all_gather(pid_list, torch.tensor([os.getpid()]))
    pids = [int(p) for p in pid_list]

    cfg = config()
    full = gf.Transformer(cfg, seed=0).eval() if rank == 0 else None
    sharded = tp.shard(gf.Transformer(cfg, seed=0).eval())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.d_vocab, (1, FORWARD_POS), generator=gen)
    prompt = torch.randint(0, cfg.d_vocab, (1, PROMPT), generator=gen)
    local_bytes = torch.tensor([weight_bytes(sharded)])
    dist.all_reduce(local_bytes, op=dist.ReduceOp.MAX)
    if full is not None:
        print(f"weights: 1 process {weight_bytes(full) / 1e6:.0f} MB; per process of 2 {int(local_bytes) / 1e6:.0f} MB")

    # ------------------------------------------------------------------- the same numbers, first
    logits_tp = sharded(tokens)
    tokens_tp = sharded.generate(prompt, args.new)
    ok = 1
    if rank == 0:
        torch.set_num_threads(THREADS)
        diff = float((full(tokens) - logits_tp).abs().max())
        same = torch.equal(full.generate(prompt, args.new), tokens_tp)
        print(f"check: max |logits(2 processes) - logits(1 process)| on 1x{FORWARD_POS} = {diff:.2e}")
        print(f"check: greedy tokens, prompt {PROMPT} + {args.new} new, identical: {same}")
        ok = int(diff <= AGREE_TOL and same)
    if not broadcast_flag(ok):
        say(rank, "2 processes do not compute what 1 process computes: nothing timed")
        raise SystemExit(1)

    # ---------------------------------------------------------------------------- communication
    torch.set_num_threads(1)
    sharded(tokens)  # warm
    dist.barrier()
    with count_all_reduces() as fwd_traffic:
        start = time.perf_counter()
        sharded(tokens)
        fwd_wall = time.perf_counter() - start
    dist.barrier()
    with count_all_reduces() as gen_traffic:
        start = time.perf_counter()
        sharded.generate(prompt, args.new)
        gen_wall = time.perf_counter() - start
    alone = {f"all_reduce {shape}": time_all_reduce(shape, ALL_REDUCE_CALLS) for shape in ALL_REDUCE_SHAPES}
    alone[f"TCP round trip, {PING_BYTES:,} bytes"] = tcp_round_trips(rank, ALL_REDUCE_CALLS)

    # ------------------------------------------------------------------------------------ timing
    def cases_for(measure: str, fn: Callable[[gf.Transformer], object]) -> list[Case]:
        return [
            Case("1 process, 2 threads", measure, 1, THREADS, lambda: fn(full)),
            Case("1 process, 1 thread", measure, 1, 1, lambda: fn(full)),
            Case("2 processes x 1 thread", measure, WORLD, 1, lambda: fn(sharded)),
        ]

    measures = {
        f"forward 1x{FORWARD_POS}": cases_for("forward", lambda m: m(tokens)),
        f"generate {PROMPT}+{args.new}": cases_for("generate", lambda m: m.generate(prompt, args.new)),
        f"generate {PROMPT}+1": cases_for("prefill", lambda m: m.generate(prompt, 1)),
    }
    dropped = {}
    for label, cases in measures.items():
        say(rank, f"timing {label}")
        dropped[label] = time_measure(cases, rank, pids, args.repeats, args.patience)
    if rank == 0:
        report(args, measures, dropped, fwd_traffic, fwd_wall, gen_traffic, gen_wall, alone, cfg)


# ------------------------------------------------------------------------------------------ report


def report(
    args: argparse.Namespace,
    measures: dict[str, list[Case]],
    dropped: dict[str, int],
    fwd: Traffic,
    fwd_wall: float,
    gen: Traffic,
    gen_wall: float,
    alone: dict[str, list[float]],
    cfg: gf.Config,
) -> None:
    med = {label: [statistics.median(c.times) for c in cases] for label, cases in measures.items()}
    names = [c.name for c in next(iter(measures.values()))]
    forward, whole, prefill = med.values()
    steps = args.new - 1
    per_token = [(w - p) / steps for w, p in zip(whole, prefill, strict=True)]

    print(f"\n### Latency, median of {args.repeats} (float32; slower rank's time for 2 processes)\n")
    print(f"| measure | {' | '.join(names)} | 2 processes ÷ 1 process, 2 threads |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        (f"forward 1×{FORWARD_POS} (ms)", forward, 1e3, ".1f"),
        (f"generate, prompt {PROMPT} + {args.new} new (ms)", whole, 1e3, ".0f"),
        (f"generate, prompt {PROMPT} + 1 new = prefill (ms)", prefill, 1e3, ".1f"),
        (f"decode step: (row 2 − row 3) / {steps} (ms per token)", per_token, 1e3, ".2f"),
    ]
    for text, values, scale, fmt in rows:
        cells = " | ".join(f"{v * scale:{fmt}}" for v in values)
        print(f"| {text} | {cells} | {values[2] / values[0]:.2f} |")
    rates = [1 / t for t in per_token]
    print(f"| decode tokens/s (steady) | {' | '.join(f'{r:.1f}' for r in rates)} | {rates[2] / rates[0]:.2f} |")

    per_block = 2 * cfg.n_layers
    print("\n### Communication (2 processes, gloo on loopback; measured by wrapping dist.all_reduce)\n")
    print("| call | all-reduces | floats each | bytes in all | time inside all_reduce | per call | share of the call |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    n_fwd = sum(fwd.calls.values())
    print(
        f"| forward 1×{FORWARD_POS} | {n_fwd} | {', '.join(f'{k:,}' for k in fwd.calls)} | {fwd.bytes:,} "
        f"| {fwd.seconds * 1e3:.1f} ms | {fwd.seconds / n_fwd * 1e6:.0f} µs "
        f"| {100 * fwd.seconds / fwd_wall:.0f}% of {fwd_wall * 1e3:.0f} ms |"
    )
    step_calls = gen.calls.get(cfg.d_model, 0)
    prefill_calls = gen.calls.get(PROMPT * cfg.d_model, 0)
    print(
        f"| generate {PROMPT}+{args.new}: prefill | {prefill_calls} | {PROMPT * cfg.d_model:,} "
        f"| {prefill_calls * PROMPT * cfg.d_model * 4:,} | | | |"
    )
    print(
        f"| generate {PROMPT}+{args.new}: per decode step | {step_calls / steps:g} | {cfg.d_model:,} "
        f"| {step_calls / steps * cfg.d_model * 4:,.0f} per token | | | |"
    )
    n_gen = sum(gen.calls.values())
    print(
        f"| generate {PROMPT}+{args.new}: whole call | {n_gen} | | {gen.bytes:,} "
        f"| {gen.seconds * 1e3:.0f} ms | {gen.seconds / n_gen * 1e6:.0f} µs "
        f"| {100 * gen.seconds / gen_wall:.0f}% of {gen_wall * 1e3:.0f} ms |"
    )
    print(f"\nexpected: 2 all-reduces per block × {cfg.n_layers} blocks = {per_block} per forward or decode step")
    print("(time inside all_reduce includes waiting for the other process to reach it)")

    print(f"\n### A float32 all-reduce alone on loopback (gloo, 2 processes), {ALL_REDUCE_CALLS} calls back to back\n")
    print(
        f"| operation | median (µs) | mean (µs) | 10th–90th percentile (µs) | calls over 2 ms "
        f"| × {per_block} at the mean (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, times in alone.items():
        q = statistics.quantiles(times, n=10)
        m, mean = statistics.median(times), statistics.fmean(times)
        slow = sum(t > 2e-3 for t in times) / len(times)
        print(
            f"| {name} | {m * 1e6:.0f} | {mean * 1e6:.0f} | {q[0] * 1e6:.0f}–{q[-1] * 1e6:.0f} | {100 * slow:.1f}% "
            f"| {per_block * mean * 1e3:.2f} |"
        )

    print(
        "\n### Spread: median [min, max] ms; most cores other processes used during a kept call; for 1-process"
        " cases, most cores rank 1 used while it waited in a barrier\n"
    )
    print("rounds dropped as contended: " + ", ".join(f"{k} {v}" for k, v in dropped.items()) + "\n")
    print(f"| case | {' | '.join(measures)} |\n|---|" + "---|" * len(measures))
    for i, name in enumerate(names):
        cells = []
        for cases in measures.values():
            c = cases[i]
            waiting = f", rank 1 waiting≤{max(c.idle_peer):.2f}" if c.procs == 1 else ""
            cells.append(
                f"{statistics.median(c.times) * 1e3:.1f} [{min(c.times) * 1e3:.1f}, {max(c.times) * 1e3:.1f}] "
                f"others≤{max(c.others):.2f}{waiting}"
            )
        print(f"| {name} | {' | '.join(cells)} |")


# -------------------------------------------------------------------------------------------- main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measure (default 5)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per generate call (default 64)")
    parser.add_argument("--patience", type=float, default=300.0, help="seconds to wait for quiet before a round")
    args = parser.parse_args()
    if args.new < 2:
        parser.error("--new must be at least 2")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {cpu_model()} ({os.cpu_count()} cpus)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if k != "transformer-lens"))
    port = free_port()
    peer = mp.get_context("spawn").Process(target=worker, args=(1, port, args), daemon=True)
    peer.start()
    try:
        worker(0, port, args)
    finally:
        peer.join(timeout=60)
    if peer.exitcode != 0:
        sys.exit(f"rank 1 exited with {peer.exitcode}")


if __name__ == "__main__":
    main()
