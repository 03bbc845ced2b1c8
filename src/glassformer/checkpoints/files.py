"""Reading and writing weight files: atomic writes, safetensors by default, pickle only on request."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from glassformer.errors import CheckpointError

PICKLED = ("pytorch_model.bin", "model.pt", "model.bin")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then fsync and rename over `path`: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Memory-mapped tensors (copy-on-write: changing them never touches the file)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


def read_weights(directory: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: `model.safetensors`, sharded safetensors with an
    index, or (only with `allow_pickle=True`, and then with `weights_only=True`) a pickled file."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index} has no weight_map")
        return {name: t for shard in shards for name, t in read_safetensors(directory / shard).items()}
    pickled = [directory / name for name in PICKLED if (directory / name).exists()]
    if pickled and not allow_pickle:
        raise CheckpointError(
            f"{pickled[0]} holds pickled weights, which can run code when loaded; glassformer refuses them "
            "unless you pass allow_pickle=True (they are then read with torch.load(weights_only=True))"
        )
    if pickled:
        try:
            return torch.load(pickled[0], map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many types here; all mean "unreadable"
            raise CheckpointError(f"{pickled[0]} could not be read safely: {err}") from None
    raise CheckpointError(f"no weights in {directory}: expected model.safetensors (or a sharded index)")
