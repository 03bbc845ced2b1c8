"""A training run's state in one safetensors file: weights, optimizer moments, random generators
and the step, written atomically, so a run killed at any moment resumes from the last one exactly.
Nothing here is pickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from glassformer.checkpoints.files import atomic_write
from glassformer.errors import CheckpointError

STATE_FILE = "train_state.safetensors"


def save_state(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    step: int,
    meta: dict[str, Any],
) -> None:
    """Everything needed to continue after `step` completed optimizer steps."""
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for index, moments in opt["state"].items():
        tensors |= {f"optim.{index}.{k}": torch.as_tensor(v).contiguous() for k, v in moments.items()}
    tensors |= {f"rng.{k}": v for k, v in rng.items()}
    info = {"step": step, "param_groups": opt["param_groups"], "meta": meta}
    metadata = {"glassformer": json.dumps(info, sort_keys=True)}  # one key: stable bytes (see checkpoints/native.py)
    atomic_write(directory / STATE_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata with step, param_groups and meta; tensors) of a saved run, or an error naming the file."""
    path = directory / STATE_FILE
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()["glassformer"]), tensors
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: nothing to resume in {directory}") from None
    except Exception as err:  # safetensors and json raise several types; all mean "unreadable"
        raise CheckpointError(f"{path} cannot be read ({err})") from None


def restore(
    tensors: dict[str, torch.Tensor], info: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """Load weights and optimizer moments in place; return the saved random generator states."""
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
