"""`train`: a run from a `TrainConfig` and model fields, top to bottom.

AdamW (fused where available; no weight decay on norms, biases and embeddings), linear warm-up
then cosine decay, gradient clipping and accumulation, periodic evaluation, atomic checkpoints
with optimizer and random-generator state (so a killed run resumes to the same weights), bf16
autocast on CUDA, optional `torch.compile`, and under `torchrun` data parallelism, tensor
parallelism (`tp` consecutive processes split each model, see `glassformer.parallel`) or both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from glassformer import parallel
from glassformer.checkpoints.native import write
from glassformer.config import Config
from glassformer.errors import CheckpointError, InputError
from glassformer.model import Transformer
from glassformer.training.data import SEQ2SEQ_TASKS, SYNTHETIC_TASKS, Batch, SyntheticData, TextData, read_corpus
from glassformer.training.report import plot_losses, write_metrics
from glassformer.training.state import STATE_FILE, load_state, restore, save_state, snapshot
from glassformer.training.tokenizers import bpe_tokenizer, char_tokenizer


@dataclass
class TrainConfig:
    """How to train: data, optimisation, evaluation, checkpoints. The model's shape is a `Config`."""

    out_dir: str = "runs/train"
    data: str = "tinyshakespeare"  # a UTF-8 file, "tinyshakespeare", or a task: repeat, copy, reverse, sort
    tokenizer: str = "char"  # text corpora: "char" or "bpe"
    bpe_vocab_size: int = 512
    task_vocab: int = 16  # synthetic tasks: symbols + 1 (id 0 starts a target)
    task_length: int = 8
    batch_size: int = 12  # sequences per step per process
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    checkpoint_interval: int = 500
    seed: int = 0
    compile: bool = False
    tp: int = 1  # processes that split one model (tensor parallelism); the rest of the world splits the data
    deterministic: bool = True  # CPU runs are then bit-reproducible, also across a resume
    progress: bool = True
    resume: bool = False
    model: dict[str, Any] = field(default_factory=dict)  # Config fields; d_vocab comes from the data

    # Changing these between a run and its resume changes no completed step.
    RESUMABLE_CHANGES = (
        "out_dir",
        "max_steps",
        "eval_interval",
        "checkpoint_interval",
        "progress",
        "resume",
        "compile",
    )


@dataclass
class RunResult:
    model: Transformer  # with tp > 1, this process's share; the whole model is saved in out_dir
    step: int
    metrics: list[dict[str, float]]
    interrupted: bool = False


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on norms, biases or embeddings)."""
    embeddings = ("W_E", "W_pos", "W_token_type")
    decay, plain = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and not name.endswith(embeddings) else plain).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def loss_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy (encoder-decoder tasks: over the target)."""
    logits = model(batch["src"], batch["tgt"]) if "src" in batch else model(batch["tokens"])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())


def prepare_data(cfg: TrainConfig, run_dir: Path, n_ctx: int, is_main: bool) -> tuple[Any, int, Any]:
    """(data, vocabulary size, tokenizer or None): the tokenizer and token file are built once."""
    if cfg.data in SYNTHETIC_TASKS:
        length = cfg.task_length
        if cfg.data == "repeat" and 2 * length - 1 > n_ctx or cfg.data != "repeat" and length > n_ctx:
            raise InputError(f"task {cfg.data!r} with task_length={length} does not fit n_ctx={n_ctx}")
        return SyntheticData(cfg.data, cfg.task_vocab, length), cfg.task_vocab, None
    from tokenizers import Tokenizer

    tokens_path, tokenizer_path = run_dir / "tokens.npy", run_dir / "tokenizer.json"
    if is_main and not (cfg.resume and tokens_path.exists()):
        text = read_corpus(cfg.data)
        if cfg.tokenizer not in ("char", "bpe"):
            raise ValueError(f"tokenizer={cfg.tokenizer!r} is not 'char' or 'bpe'")
        tokenizer = char_tokenizer(text) if cfg.tokenizer == "char" else bpe_tokenizer([text], cfg.bpe_vocab_size)
        TextData.build(text, tokenizer, tokens_path, n_ctx)
        tokenizer.save(str(tokenizer_path))
    barrier()
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return TextData(tokens_path, n_ctx), tokenizer.get_vocab_size(), tokenizer


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun, joins the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # nccl maps each process to the GPU current when it first communicates
    return rank, world, device


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, model_cfg: Config, run_dir: Path) -> None:
    """A resume must continue the same run: same model, data and optimisation settings."""
    now = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in cfg.RESUMABLE_CHANGES}
    before = {k: v for k, v in saved["train_config"].items() if k not in cfg.RESUMABLE_CHANGES}
    changed = sorted(k for k in now if k != "model" and now.get(k) != before.get(k))  # model: compared resolved
    if saved["model_config"] != model_cfg.to_dict():
        changed.append("model")
    if changed:
        raise CheckpointError(
            f"{run_dir} holds a run with different settings ({', '.join(changed)}); "
            "resume it with the same settings, or train into a new --out directory"
        )


def train(cfg: TrainConfig) -> RunResult:
    """Train (or resume) a model as `cfg` says; returns the model, the last step and the metrics."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    try:
        return _train(cfg)
    finally:  # the process's setting is the caller's again
        torch.use_deterministic_algorithms(deterministic_before, warn_only=True)


def _train(cfg: TrainConfig) -> RunResult:
    rank, world, device = setup_distributed()
    is_main = rank == 0
    run_dir = Path(cfg.out_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and (run_dir / STATE_FILE).exists():
            raise CheckpointError(f"{run_dir} already holds a run; pass resume=True (--resume) or another directory")

    # The model: its shape from cfg.model, its vocabulary from the data.
    fields = {"arch": "encoder-decoder" if cfg.data in SEQ2SEQ_TASKS else "decoder", **cfg.model}
    data, d_vocab, tokenizer = prepare_data(cfg, run_dir, fields.get("n_ctx", 256), is_main)
    model_cfg = Config(**{"n_ctx": 256, **fields, "d_vocab": d_vocab})
    model = Transformer(model_cfg, seed=cfg.seed).to(device).train()
    dp_rank, dp_world, dp_group = rank, world, None
    if cfg.tp > 1:
        if world % cfg.tp:
            raise ValueError(f"tp={cfg.tp} must divide the number of processes torchrun started ({world})")
        parallel.check_divisible(model_cfg, cfg.tp)
        tp_group, dp_group = parallel.groups(cfg.tp)
        dp_rank, dp_world = rank // cfg.tp, world // cfg.tp
        parallel.shard(model, tp_group)
    optimizer = make_optimizer(model, cfg, device)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + dp_rank)  # dropout differs between copies of the model, as it must
    start, metrics = 0, []

    if cfg.resume:
        info, tensors = load_state(run_dir)
        check_resumable(info["meta"], cfg, model_cfg, run_dir)
        rng = restore(tensors, info, model, optimizer, partial(parallel.share_of, model))
        data_rng.set_state(rng["data"])
        if f"torch{rank}" not in rng:
            saved_by = sum(name.startswith("torch") for name in rng)
            raise CheckpointError(f"{run_dir} was saved by {saved_by} processes; resume it with as many")
        torch.set_rng_state(rng[f"torch{rank}"])
        if device.type == "cuda" and f"cuda{rank}" in rng:  # dropout on the GPU draws from its own generator
            torch.cuda.set_rng_state(rng[f"cuda{rank}"], device)
        start = info["step"]
        metrics = [m for m in read_metrics(run_dir) if m["step"] <= start]

    meta = {"train_config": json.loads(json.dumps(dataclasses.asdict(cfg))), "model_config": model_cfg.to_dict()}
    runner = torch.compile(model) if cfg.compile else model
    if dp_world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(runner, process_group=dp_group)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens_per_step = (
        cfg.batch_size * cfg.grad_accum * dp_world * (data.n_ctx if hasattr(data, "n_ctx") else cfg.task_length)
    )
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and is_main), unit="step")
    last_rng = rng_states(data_rng, device)
    step, interrupted, started = start, False, time.perf_counter()

    def checkpoint() -> None:
        rng = gather_rng(last_rng, world, device)  # collectives: every process takes part
        tensors = snapshot(model, optimizer, partial(parallel.full_state, model))
        if is_main:
            save_state(run_dir, tensors, optimizer.state_dict()["param_groups"], rng, step, meta)
            weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            write(model_cfg, weights, run_dir)
            plot_losses(metrics, run_dir / "loss.png")

    try:
        while step < cfg.max_steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            for micro in range(cfg.grad_accum):
                batch = data.batch("train", cfg.batch_size * dp_world, data_rng)  # one global batch, one slice per copy
                mine = slice(dp_rank * cfg.batch_size, (dp_rank + 1) * cfg.batch_size)
                batch = {k: v[mine].to(device) for k, v in batch.items()}
                sync = dp_world == 1 or micro == cfg.grad_accum - 1
                with autocast, nullcontext() if sync else runner.no_sync():
                    loss = loss_of(runner, batch) / cfg.grad_accum
                    loss.backward()
            parallel.clip_grad_norm_(model, cfg.grad_clip)  # over the whole model when it is split
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_rng = rng_states(data_rng, device)
            bar.update(1)
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - started
                row = {
                    "step": step,
                    **evaluate(model, data, cfg, device),
                    "lr": learning_rate(cfg, step - 1),
                    "tokens_per_s": tokens_per_step * (step - start) / elapsed,
                    "elapsed_s": elapsed,
                }
                metrics.append(row)
                bar.set_postfix(
                    train=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}"
                )
                if is_main:
                    write_metrics(run_dir / "metrics.jsonl", metrics)
            if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps:
                checkpoint()
    except KeyboardInterrupt:  # Ctrl-C: keep what the completed steps learned, and stop cleanly
        interrupted = True
        checkpoint()
    finally:
        bar.close()
    model.eval()
    return RunResult(model, step, metrics, interrupted)


def rng_states(data_rng: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The data generator (shared by all processes) and this process's global generators (dropout):
    the CPU's, and the GPU's when the model runs on one."""
    states = {"data": data_rng.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def gather_rng(local: dict[str, torch.Tensor], world: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's dropout generators, as torch0, torch1, … (and cuda0, …), for the one state file."""
    out = {"data": local["data"]}
    for name in sorted(set(local) - {"data"}):
        states = [local[name]]
        if world > 1:  # through the device the backend speaks (nccl: the GPU), back to the CPU
            mine = local[name].to(device)
            states = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(states, mine)
        out |= {f"{name}{r}": state.cpu() for r, state in enumerate(states)}
    return out


@torch.no_grad()
def evaluate(model: Transformer, data: Any, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean loss over `eval_batches` fixed batches of each split (the same batches every time)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        rng = torch.Generator().manual_seed(cfg.seed + 1)
        losses = [
            loss_of(model, {k: v.to(device) for k, v in data.batch(split, cfg.batch_size, rng).items()}).item()
            for _ in range(cfg.eval_batches)
        ]
        out[f"{split}_loss"] = sum(losses) / len(losses)
    model.train()
    return out


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
