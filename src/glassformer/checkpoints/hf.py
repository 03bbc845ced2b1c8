"""`from_hf` and `to_hf`: Hugging Face checkpoints <-> glassformer, with the same numbers.

Each family is a small module (gpt2.py, llama.py, …) with a config mapping and a key/transform
table that serves both directions; nothing here or in the cells knows a model's name.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from glassformer.checkpoints import bart, bert, gemma, gpt2, gptj, llama, moe, neox, olmo2, phi3, t5
from glassformer.checkpoints.files import atomic_write, read_json, read_weights, write_json
from glassformer.checkpoints.tables import Family, HFState
from glassformer.config import Config
from glassformer.errors import CheckpointError


def families() -> dict[str, Family]:
    return {  # model_type -> family; llama, mistral, qwen2 and qwen3 differ only in config details
        "gpt2": gpt2.FAMILY,
        "llama": llama.FAMILY,
        "mistral": llama.FAMILY,
        "qwen2": llama.FAMILY,
        "qwen3": llama.FAMILY,
        "gemma": gemma.FAMILY,
        "gemma2": gemma.FAMILY,
        "gemma3_text": gemma.FAMILY,
        "olmo2": olmo2.FAMILY,
        "phi3": phi3.FAMILY,
        "bert": bert.FAMILY,
        "gpt_neox": neox.FAMILY,
        "gptj": gptj.FAMILY,
        "bart": bart.FAMILY,
        "marian": bart.FAMILY,
        "mixtral": moe.MIXTRAL_FAMILY,
        "qwen2_moe": moe.QWEN2_MOE_FAMILY,
        "qwen3_moe": moe.QWEN3_MOE_FAMILY,
        "t5": t5.FAMILY,
    }


def export(cfg: Config, state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Our config and tensors -> (Hugging Face config, tensors under their full names) of the first
    family with a way back (the decoder families and T5) that can hold them (the one the model came
    from, if any)."""
    known, preferred = families(), cfg.extra.get("hf_model_type")
    exporters = {id(fam): fam for name, fam in sorted(known.items(), key=lambda kv: kv[0] != preferred) if fam.export}
    problems = []
    for family in exporters.values():
        try:
            hf_config, tensors = family.hf_config(cfg, state), family.export(state, cfg)
            break
        except CheckpointError as err:
            problems.append(str(err))
    else:
        raise CheckpointError("no Hugging Face decoder family fits this model:\n  " + "\n  ".join(problems))
    # The body under the family's prefix ("model.layers.0…", none for T5); an output head ("lm_head.bias") beside it.
    prefix = family.prefixes[0] if family.prefixes else ""
    tensors = {(k if k.startswith("lm_head.") else prefix + k): v for k, v in tensors.items()}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = state["unembed.weight"]
    return hf_config, tensors


def to_hf(cfg: Config, state: dict[str, Tensor], directory: str | Path) -> Path:
    """Write a decoder (or a T5 encoder-decoder) as a Hugging Face checkpoint (config.json +
    model.safetensors) that `transformers.AutoModelForCausalLM.from_pretrained(directory)`
    (`AutoModelForSeq2SeqLM` for T5) opens with the same numbers."""
    hf_config, tensors = export(cfg, {k: v.detach() for k, v in state.items()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # no shared or strided storage
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(directory / "config.json", {**hf_config, "dtype": str(state["embed.W_E"].dtype).removeprefix("torch.")})
    return directory


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


def family_of(hf_config: dict[str, Any]) -> tuple[str, Family]:
    """The config's `model_type` and the family that converts it; a CheckpointError listing the
    supported ones otherwise."""
    model_type, known = hf_config.get("model_type"), families()
    if model_type not in known:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(known))}")
    return model_type, known[model_type]


def convert(
    hf_config: dict[str, Any], tensors: dict[str, Tensor], name: str, live: bool = False
) -> tuple[Config, dict[str, Tensor]]:
    """A Hugging Face config and its tensors (full names) -> our Config and state dict. `live`: the
    tensors belong to a running transformers model, so ours must be copies, never shared storage.
    Tensors combined into one (Q, K, V) leave `tensors` once combined, to bound the peak memory."""
    model_type, family = family_of(hf_config)
    shared = {t.data_ptr() for t in tensors.values()} if live else set()  # before the conversion releases any
    get = HFState(tensors, family.prefixes, name)
    try:
        cfg = family.config(hf_config, get)
    except KeyError as err:
        raise CheckpointError(f"{name}: its {model_type} config lacks the field {err.args[0]!r}") from None
    state = family.weights(get, cfg)
    unused = get.unused()
    if unused:  # e.g. a pre-training head glassformer has no place for: say so rather than drop it silently
        listed = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        warnings.warn(f"{name}: {len(unused)} tensors the {model_type} conversion does not use: {listed}", stacklevel=3)
    # Memory-mapped files are copy-on-write, so their tensors are used as they are. Every weight ends
    # up contiguous: a transposed (in, out) view would make each product reorder it.
    state = {
        k: t.clone(memory_format=torch.contiguous_format) if t.data_ptr() in shared else t.contiguous()
        for k, t in state.items()
    }
    return cfg, state


def read_hf(source: Any, allow_pickle: bool = False) -> tuple[Config, dict[str, Tensor], str]:
    """(Config, state dict, a name for messages) of a transformers model or a local HF directory."""
    hf_config, name = read_config(source)
    family_of(hf_config)  # an unsupported family is named before any weights are read
    live = not isinstance(source, str | Path)
    cfg, state = convert(hf_config, read_tensors(source, allow_pickle), name, live)
    return cfg, state, name


