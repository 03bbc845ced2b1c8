"""A training run's state in one safetensors file: weights, optimizer moments, random generators
and the step, written atomically, so a run killed at any moment resumes from the last one exactly.
Nothing here is pickled."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from glassformer.checkpoints.files import atomic_write
from glassformer.errors import CheckpointError

STATE_FILE = "train_state.safetensors"


Tensors = dict[str, torch.Tensor]


def optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own numbering (that of its state_dict)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, whole: Callable[[Tensors], Tensors] = dict) -> Tensors:
    """Weights as `model.NAME` and optimizer moments as `optim.KIND.NAME`, by parameter name, so the
    file does not depend on how the model is laid out. `whole` joins a split model's shares (a
    collective: every process calls it); scalars such as Adam's step count are never split."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in whole(model.state_dict()).items()}
    names, kinds = optimizer_names(model, optimizer), {}
    for index, moments in optimizer.state_dict()["state"].items():
        for kind, value in moments.items():
            kinds.setdefault(kind, {})[names[index]] = torch.as_tensor(value)
    for kind, by_name in kinds.items():
        if all(v.dim() > 0 for v in by_name.values()):
            by_name = whole(by_name)
        tensors |= {f"optim.{kind}.{name}": v.contiguous() for name, v in by_name.items()}
    return tensors


def save_state(
    directory: Path,
    tensors: Tensors,
    param_groups: list[dict[str, Any]],
    rng: Tensors,
    step: int,
    meta: dict[str, Any],
) -> None:
    """Everything needed to continue after `step` completed optimizer steps, in one file."""
    tensors = tensors | {f"rng.{k}": v for k, v in rng.items()}
    info = {"step": step, "param_groups": param_groups, "meta": meta}
    metadata = {"glassformer": json.dumps(info, sort_keys=True)}  # one key: stable bytes (see checkpoints/native.py)
    atomic_write(directory / STATE_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata with step, param_groups and meta; tensors) of a saved run, or an error naming the file."""
    return read_info(directory), _reading(directory / STATE_FILE, load_file)


def read_info(directory: Path) -> dict[str, Any]:
    """The metadata of a saved run (step, param_groups, and the settings under "meta"), without its tensors."""

    def info(path: Path) -> dict[str, Any]:
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()["glassformer"])

    return _reading(directory / STATE_FILE, info)


def _reading(path: Path, read: Callable[[Path], Any]) -> Any:
    """`read(path)`, with a CheckpointError naming the file when it is missing or unreadable."""
    try:
        return read(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: nothing to resume in {path.parent}") from None
    except Exception as err:  # safetensors and json raise several types; all mean "unreadable"
        raise CheckpointError(f"{path} cannot be read ({err})") from None


def restore(
    tensors: Tensors,
    info: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    part: Callable[[Tensors], Tensors] = dict,
) -> Tensors:
    """Load weights and optimizer moments in place (`part` takes a split model's share of whole
    tensors); return the saved random generator states."""
    model.load_state_dict(part({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}))
    kinds: dict[str, Tensors] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, kind, name = key.split(".", 2)
            kinds.setdefault(kind, {})[name] = value
    state: dict[int, Tensors] = {}
    names = optimizer_names(model, optimizer)
    for kind, by_name in kinds.items():
        if all(v.dim() > 0 for v in by_name.values()):
            by_name = part(by_name)
        for index, name in enumerate(names):
            if name in by_name:
                state.setdefault(index, {})[kind] = by_name[name]
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
