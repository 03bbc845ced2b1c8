"""Tensor parallelism (Megatron-style) as a transformation of an ordinary model.

Each process keeps its share of the heads (W_Q, W_K, W_V split by head; grouped-query heads by
key/value-head group) and of the MLP's hidden units (W_in and the SwiGLU gate by column); W_O and
W_out are split by row and followed by one all-reduce each: two per block, one more per
cross-attention. A relative position bias table (T5) is split by head, as the heads that add it.
Embedding, norms and head are replicated. Local sizes are recorded on the sharded modules
(`attn.n_heads`, `mlp.d_mlp`); the shared Config is never changed.

Autograd runs through the collectives: entering a split section is the identity forward and an
all-reduce backward (`f` in the Megatron paper); leaving it is an all-reduce forward and the
identity backward (`g`). So a training step on N processes updates the weights as on one.

    torchrun --nproc-per-node 2 my_script.py      # gloo on CPU, nccl on CUDA
    gf.parallel.init()
    model = gf.parallel.shard(gf.Transformer.load("ckpt"))     # or gf.parallel.load_sharded("ckpt")
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn

from glassformer.cells.attention import Attention
from glassformer.cells.mlp import MLP
from glassformer.checkpoints.files import read_json
from glassformer.config import Config
from glassformer.errors import GlassformerError, InputError
from glassformer.hooks import ActivationCache
from glassformer.model import Transformer
from glassformer.tokenizer import directory_tokenizer

Index = tuple[slice, ...]


class PeerError(GlassformerError, RuntimeError):
    """A process of the tensor-parallel group stopped or stopped answering."""


def init(backend: str | None = None, timeout_s: float = 60.0) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a peer that dies or
    hangs makes the others fail with PeerError after at most `timeout_s` seconds."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def local_device() -> torch.device:
    """Where this process computes: its own GPU (torchrun's LOCAL_RANK) under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _failed(what: str, x: Tensor, err: Exception) -> GlassformerError:
    """The error to raise when a collective fails: a tensor on the wrong device for the backend, or a peer gone."""
    backend = dist.get_backend()
    if backend == "nccl" and x.device.type != "cuda":
        return InputError(
            f"a {x.device.type} tensor cannot take part in {backend}'s {what}: the model and its inputs "
            f"must be on {local_device()} (glassformer.parallel.local_device())"
        )
    return PeerError(f"a tensor-parallel peer stopped or timed out during the {what}: {err}")


def _all_reduce(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    try:
        dist.all_reduce(x, group=group)
    except RuntimeError as err:  # torch.distributed's errors (DistBackendError, …) are RuntimeErrors
        raise _failed("all-reduce", x, err) from None
    return x


def _all_gather(x: Tensor, group: dist.ProcessGroup | None, world: int) -> list[Tensor]:
    parts = [torch.empty_like(x) for _ in range(world)]
    try:
        dist.all_gather(parts, x, group=group)
    except RuntimeError as err:
        raise _failed("gather", x, err) from None
    return parts


class _Enter(torch.autograd.Function):
    """Identity forward, all-reduce backward: the input of a column-split section."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # noqa: ANN001
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return _all_reduce(grad.clone(), ctx.group), None


class _Exit(torch.autograd.Function):
    """All-reduce forward, identity backward: the output of a row-split section."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # noqa: ANN001
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad, None


class TensorParallel:
    """Where a sharded cell sits in its group; `enter`/`exit` wrap its split section."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world: int) -> None:
        self.group, self.rank, self.world = group, rank, world

    def enter(self, x: Tensor) -> Tensor:
        return _Enter.apply(x, self.group)

    def exit(self, x: Tensor) -> Tensor:
        return _Exit.apply(x, self.group)

    @contextmanager
    def own_random_stream(self, device: torch.device) -> Iterator[None]:
        """Random numbers drawn inside (dropout of this process's heads) differ between processes,
        while the shared stream outside, which the replicated residual's dropout uses, stays equal
        everywhere: the seed is drawn from the shared stream, then offset by rank."""
        seed = int(torch.randint(2**62, (1,), device=device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + self.rank)
            yield

    def gather_state(self, cfg: Config, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Whole tensors from every process's share (a collective: each process of the group calls it)."""
        out = {}
        for name, local in tensors.items():
            split = split_of(name)
            if split == "replicated":
                out[name] = local
                continue
            parts = _all_gather(local.detach().contiguous(), self.group, self.world)
            if split == "qkv":  # regroup: every process's queries, then every process's keys, then values
                sizes = [rows.stop - rows.start for rows in _qkv_rows(cfg, 0, self.world)]
                pieces = [part.split(sizes) for part in parts]
                out[name] = torch.cat([piece[i] for i in range(3) for piece in pieces])
            else:
                out[name] = torch.cat(parts, dim=0 if split == "mlp_rows" else 1)
        return out

    def gather_cache(self, cache: ActivationCache) -> ActivationCache:
        """Full-head (full-width) activations from every process's share (a collective)."""
        out = {}
        for name, tensor in cache.items():
            axis = split_axis(name)
            if axis is None:
                out[name] = tensor
                continue
            out[name] = torch.cat(_all_gather(tensor.contiguous(), self.group, self.world), dim=axis)
        return ActivationCache(out, cache.model)


def groups(tp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(tensor-parallel group, data-parallel group) of this process when every `tp` consecutive
    ranks split one model and the copies of the model train on different data."""
    rank, world = _group_position(None)
    if tp < 1 or world % tp:
        raise ValueError(f"tp={tp} must divide the number of processes ({world})")
    mine = {}
    for start in range(0, world, tp):  # every process creates every group, in the same order
        group = dist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            mine["tp"] = group
    for offset in range(tp):
        group = dist.new_group(list(range(offset, world, tp)))
        if rank % tp == offset:
            mine["dp"] = group
    return mine["tp"], mine["dp"]


def clip_grad_norm_(model: Transformer, max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole model's gradients: split gradients' squares are
    summed across the group, replicated ones counted once, so every process scales alike."""
    tp = getattr(model, "tp", None)
    if tp is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    split = [g for name, g in grads.items() if split_of(name) != "replicated"]
    whole = [g for name, g in grads.items() if split_of(name) == "replicated"]
    device = next(iter(grads.values())).device
    split_sq = sum((g.float().pow(2).sum() for g in split), torch.zeros((), device=device))
    whole_sq = sum((g.float().pow(2).sum() for g in whole), torch.zeros((), device=device))
    total = (_all_reduce(split_sq, tp.group) + whole_sq).sqrt()
    torch._foreach_mul_(list(grads.values()), (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def check_divisible(cfg: Config, world: int) -> None:
    """Heads, key/value heads and MLP width must split evenly, and there must be no mixture of
    experts (not split yet): checked before any communication."""
    if cfg.n_experts:
        raise ValueError(
            f"tensor parallelism does not split a mixture of experts yet (Config.n_experts={cfg.n_experts}); "
            "run the model on one process"
        )
    sizes = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads}
    if not cfg.attn_only:
        sizes["d_mlp"] = cfg.d_mlp
    bad = [f"{name}={size}" for name, size in sizes.items() if size % world]
    if bad:
        raise ValueError(f"cannot split {', '.join(bad)} across a tensor-parallel group of {world} processes")
    if cfg.qk_norm == "projection" and world > 1:  # its RMS is over every head, which no process holds
        raise ValueError("cannot split a model with qk_norm='projection' (OLMo 2) across processes: not supported")


def split_of(name: str) -> str:
    """How the tensor `name` is divided among processes: "qkv" (its query rows, then its key and value
    rows), "head_columns" (W_O), "mlp_rows" (W_in, the gate, b_in), "mlp_columns" (W_out),
    "bias_heads" (the relative position bias table's head columns) or "replicated". W_O's and W_out's
    rows are the columns of the stored (d_model, ·) matrices."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("qkv_weight", "qkv_bias"):
        return "qkv"
    if leaf == "W_rel":
        return "bias_heads"
    if leaf == "o_weight":
        return "head_columns"
    if leaf in ("in_weight", "gate_weight") or name.endswith("mlp.b_in"):
        return "mlp_rows"
    if name.endswith("mlp.out_weight"):
        return "mlp_columns"
    return "replicated"


def _qkv_rows(cfg: Config, rank: int, world: int) -> list[slice]:
    """Process `rank`'s query, key and value rows of the packed (q, k, v) projection."""
    h, kv, dh = cfg.n_heads // world, cfg.n_kv_heads // world, cfg.d_head
    q_rows = slice(rank * h * dh, (rank + 1) * h * dh)
    kv_rows = [
        slice(
            cfg.n_heads * dh + (part * cfg.n_kv_heads + rank * kv) * dh,
            cfg.n_heads * dh + (part * cfg.n_kv_heads + (rank + 1) * kv) * dh,
        )
        for part in (0, 1)
    ]
    return [q_rows, *kv_rows]


def local_state(
    cfg: Config, names: Iterable[str], read: Callable[[str, Index], Tensor], rank: int, world: int
) -> dict[str, Tensor]:
    """This process's share of the tensors `names`, read from the full ones by name and index (in
    memory or on disk). Weights, their gradients and optimizer moments split alike."""
    m, h = cfg.d_mlp // world, cfg.n_heads // world
    mlp_rows, heads = slice(rank * m, (rank + 1) * m), slice(rank * h, (rank + 1) * h)
    q_rows = _qkv_rows(cfg, rank, world)[0]
    out = {}
    for name in names:
        split = split_of(name)
        if split == "qkv":  # this process's query heads, then its K and V heads
            out[name] = torch.cat([read(name, (rows,)) for rows in _qkv_rows(cfg, rank, world)])
        elif split == "mlp_rows":
            out[name] = read(name, (mlp_rows,))
        elif split == "mlp_columns":
            out[name] = read(name, (slice(None), mlp_rows))
        elif split == "head_columns":
            out[name] = read(name, (slice(None), q_rows))
        elif split == "bias_heads":
            out[name] = read(name, (slice(None), heads))
        else:
            out[name] = read(name, (slice(None),))
    return out


def share_of(model: Transformer, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """This process's share of whole tensors (weights, or optimizer moments named by parameter) for a
    model already split; unsharded models get `tensors` back."""
    tp = getattr(model, "tp", None)
    if tp is None:
        return dict(tensors)
    read = lambda name, index: tensors[name][index].clone(memory_format=torch.contiguous_format)  # noqa: E731
    return local_state(model.cfg, tensors, read, tp.rank, tp.world)


def full_state(model: Transformer, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole tensors from every process's share: the inverse of `local_state`. A collective: every
    process of the model's group calls it. Unsharded models get `tensors` back."""
    tp = getattr(model, "tp", None)
    return dict(tensors) if tp is None else tp.gather_state(model.cfg, tensors)


def _localize(model: Transformer, group: dist.ProcessGroup | None, rank: int, world: int) -> None:
    """Record local sizes and the group on every split cell."""
    tp = TensorParallel(group, rank, world)
    for module in model.modules():
        if isinstance(module, Attention):
            module.n_heads //= world
            module.n_kv_heads //= world
            module.q_size, module.kv_size = module.n_heads * module.d_head, module.n_kv_heads * module.d_head
            module.tp = tp
        elif isinstance(module, MLP):
            module.d_mlp //= world
            module.tp = tp
    model.tp = tp


def _assign(model: Transformer, state: dict[str, Tensor]) -> None:
    """Put each local tensor in place as the module's parameter (shapes change, so no load_state_dict)."""
    for name, tensor in state.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, leaf, nn.Parameter(tensor.contiguous(), requires_grad=getattr(module, leaf).requires_grad))


def _group_position(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        raise PeerError("no process group: call glassformer.parallel.init() first (under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard(model: Transformer, group: dist.ProcessGroup | None = None) -> Transformer:
    """Split `model` across `group` (default: every process), in place; returns it. Under nccl the
    model moves to this process's GPU (`local_device()`); the inputs must be put there too."""
    rank, world = _group_position(group)
    check_divisible(model.cfg, world)
    full = {k: v.detach() for k, v in model.state_dict().items()}
    state = local_state(model.cfg, full, lambda name, index: full[name][index].clone(), rank, world)
    _localize(model, group, rank, world)
    _assign(model, state)
    return model.to(local_device()) if local_device().type == "cuda" else model


def load_sharded(
    directory: str | Path, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None
) -> Transformer:
    """Open a glassformer checkpoint already split (with its tokenizer): each process reads only its own slices, onto
    `device` (default: `local_device()`, this process's GPU under nccl)."""
    rank, world = _group_position(group)
    directory = Path(directory)
    cfg = Config.from_dict(read_json(directory / "config.json"))
    check_divisible(cfg, world)
    with torch.device("meta"):
        model = Transformer(cfg)
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        state = local_state(cfg, model.state_dict(), lambda name, index: f.get_slice(name)[index], rank, world)
    _localize(model, group, rank, world)
    _assign(model, state)
    model.tokenizer = directory_tokenizer(directory)
    return model.to(device if device is not None else local_device()).eval()


# Hook names whose tensors are split, and the axis of the split.
_SPLIT_AXES = {
    "hook_q": 2,
    "hook_k": 2,
    "hook_v": 2,
    "hook_rot_q": 2,
    "hook_rot_k": 2,
    "hook_z": 2,
    "hook_result": 2,
    "hook_attn_scores": 1,
    "hook_attn_scores_capped": 1,
    "hook_pattern": 1,
    "hook_position_bias": 1,
    "hook_pre": -1,
    "hook_pre_linear": -1,
    "hook_post": -1,
}


def split_axis(name: str) -> int | None:
    """The axis along which hook `name`'s tensor is split among processes, or None if it is whole.
    A per-head q/k norm's hooks are split by head, (batch, pos, heads, d_head or 1)."""
    module, _, leaf = name.removesuffix("_grad").rpartition(".")  # a gradient is split as its activation
    if module.endswith((".q_norm", ".k_norm")):
        return 2
    return _SPLIT_AXES.get(leaf)


def gather_cache(model: Transformer, cache: ActivationCache) -> ActivationCache:
    """Full-head (full-width) activations from every process's share, as one process would have."""
    tp = getattr(model, "tp", None)
    return cache if tp is None else tp.gather_cache(cache)
