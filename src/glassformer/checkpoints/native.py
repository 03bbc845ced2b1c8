"""glassformer's own checkpoint: a directory with `config.json` and `model.safetensors`.

Both files are written atomically, and the config is also stored in the weights file's metadata,
so a crash between the two renames is detected on load instead of pairing weights with the wrong
config. Reading memory-maps the weights (the model is built around them on the meta device: no copy).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from glassformer.checkpoints.files import atomic_write, read_json, read_weights, write_json
from glassformer.config import Config
from glassformer.errors import CheckpointError


def write(cfg: Config, state: dict[str, Tensor], directory: str | Path) -> Path:
    """The checkpoint of a model with config `cfg` and weights `state` (full, not split)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = cfg.to_dict()
    tensors = {name: t.detach().contiguous() for name, t in state.items()}
    # One metadata key: safetensors writes several in hash order, which would make equal checkpoints
    # differ in bytes from one process to the next.
    metadata = {"glassformer": json.dumps({"format": 1, "config": config}, sort_keys=True)}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_json(directory / "config.json", config)
    return directory


def check_state(expected: dict[str, Tensor], state: dict[str, Tensor], source: str) -> None:
    """Every problem at once: missing, unexpected, wrongly shaped or non-float tensors, against the
    `expected` tensors (a model's state dict, on the meta device)."""
    problems = [f"missing tensor {name} {tuple(t.shape)}" for name, t in expected.items() if name not in state]
    problems += [f"unexpected tensor {name} {tuple(t.shape)}" for name, t in state.items() if name not in expected]
    for name, t in state.items():
        if name in expected and t.shape != expected[name].shape:
            problems.append(f"{name} has shape {tuple(t.shape)}, the config needs {tuple(expected[name].shape)}")
        elif not t.is_floating_point():
            problems.append(f"{name} has dtype {t.dtype}, expected a floating-point dtype")
    if len({t.dtype for t in state.values()}) > 1:
        problems.append(f"tensors mix dtypes {sorted(str(d) for d in {t.dtype for t in state.values()})}")
    if problems:
        listing = "\n  ".join(problems)
        raise CheckpointError(f"{source} does not match its config ({len(problems)} problems):\n  {listing}")


def read(directory: str | Path) -> tuple[Config, dict[str, Tensor], str]:
    """(Config, memory-mapped weights, the weights file's name) of a checkpoint written by `write`;
    a config that differs from the one stored with the weights is an error."""
    directory = Path(directory)
    cfg = Config.from_dict(read_json(directory / "config.json"))
    weights = directory / "model.safetensors"
    state = read_weights(directory)
    with safe_open(weights, framework="pt") as f:
        stored = json.loads((f.metadata() or {}).get("glassformer", "{}")).get("config")
    if stored is not None and stored != cfg.to_dict():
        raise CheckpointError(
            f"{directory / 'config.json'} differs from the config stored with the weights "
            "(an interrupted save?); re-save the model"
        )
    return cfg, state, str(weights)
