"""`from_hf`: a Hugging Face model (object or local directory) -> glassformer, same numbers.

Each family is a small module (gpt2.py, llama.py, …) with a config mapping and a key/transform
table; nothing here or in the cells knows a model's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from glassformer.checkpoints.files import read_json, read_weights
from glassformer.checkpoints.native import check_state
from glassformer.config import Config
from glassformer.errors import CheckpointError
from glassformer.model import Transformer

# One table row: our tensor name (relative), their tensor name(s) (relative), how to combine them.
Row = tuple[str, str | tuple[str, ...], Callable[..., Tensor]]


def same(t: Tensor) -> Tensor:
    return t


def transposed(t: Tensor) -> Tensor:
    """Hugging Face Conv1D stores (in, out); glassformer stores (out, in) as nn.Linear does."""
    return t.T


def stacked(*ts: Tensor) -> Tensor:
    """Separate Q, K, V projections -> one fused (out, in) matrix (or bias), Q rows first."""
    return torch.cat(ts, dim=0)


class HFState:
    """The checkpoint's tensors by name, whatever prefix the model class put before them."""

    def __init__(self, tensors: dict[str, Tensor], prefixes: Sequence[str], source: str) -> None:
        self.tensors, self.prefixes, self.source = tensors, ("", *prefixes), source

    def find(self, name: str) -> Tensor | None:
        for prefix in self.prefixes:
            if prefix + name in self.tensors:
                return self.tensors[prefix + name]
        return None

    def __call__(self, name: str) -> Tensor:
        tensor = self.find(name)
        if tensor is None:
            raise CheckpointError(f"{self.source} lacks tensor {name!r} that this model family needs")
        return tensor


def map_rows(get: HFState, rows: Sequence[Row], ours: str = "", theirs: str = "") -> dict[str, Tensor]:
    """Apply a table; `ours`/`theirs` prefix every name on each side (e.g. one layer's)."""
    out = {}
    for mine, names, combine in rows:
        names = (names,) if isinstance(names, str) else names
        out[ours + mine] = combine(*(get(theirs + name) for name in names))
    return out


@dataclass(frozen=True)
class Family:
    """How one `model_type` maps onto glassformer: its config, its tensors, its key prefixes."""

    config: Callable[[dict[str, Any], HFState], Config]  # the tensors tell which optional heads exist
    weights: Callable[[HFState, Config], dict[str, Tensor]]
    prefixes: tuple[str, ...]


def families() -> dict[str, Family]:
    from glassformer.checkpoints import bart, bert, gpt2, llama, neox

    return {
        "gpt2": gpt2.FAMILY,
        "llama": llama.FAMILY,
        "mistral": llama.FAMILY,
        "qwen2": llama.FAMILY,
        "bert": bert.FAMILY,
        "gpt_neox": neox.FAMILY,
        "bart": bart.FAMILY,
        "marian": bart.FAMILY,
    }


def read_config(source: Any) -> tuple[dict[str, Any], str]:
    """(config dict, a name for messages) of a transformers model or a local directory."""
    if isinstance(source, str | Path):
        directory = Path(source)
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is not a directory (from_hf reads local files only, never the hub)")
        return read_json(directory / "config.json"), str(directory)
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        return source.config.to_dict(), type(source).__name__
    raise TypeError(f"from_hf takes a transformers model or a local directory, got {type(source).__name__}")


def read_tensors(source: Any, allow_pickle: bool) -> dict[str, Tensor]:
    if isinstance(source, str | Path):
        return read_weights(Path(source), allow_pickle)
    return source.state_dict()


def from_hf(source: Any, allow_pickle: bool = False) -> Transformer:
    """Convert a Hugging Face model or local checkpoint directory into an equivalent Transformer."""
    hf_config, name = read_config(source)
    model_type = hf_config.get("model_type")
    known = families()
    if model_type not in known:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(known))}")
    family = known[model_type]
    tensors = read_tensors(source, allow_pickle)
    get = HFState(tensors, family.prefixes, name)
    cfg = family.config(hf_config, get)
    state = family.weights(get, cfg)
    # Never share storage with a live transformers model: editing one must not change the other.
    # (Memory-mapped files are copy-on-write, so their tensors are used as they are.)
    live = set() if isinstance(source, str | Path) else {t.data_ptr() for t in tensors.values()}
    state = {k: t.clone() if t.data_ptr() in live else t.contiguous() for k, t in state.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state(model, state, name)
    model.load_state_dict(state, assign=True)
    return model.eval()


def zeros_like_bias(size: int, like: Tensor) -> Tensor:
    """A bias the source model does not have: zeros change nothing."""
    return torch.zeros(size, dtype=like.dtype)


ACTS = {
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_fast": "gelu_new",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def activation(name: str) -> str:
    """A Hugging Face activation name -> ours."""
    if name not in ACTS:
        raise CheckpointError(f"activation {name!r} is not supported; supported: {', '.join(sorted(ACTS))}")
    return ACTS[name]
