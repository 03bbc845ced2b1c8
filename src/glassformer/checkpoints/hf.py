"""`from_hf` and `to_hf`: Hugging Face checkpoints <-> glassformer, with the same numbers.

Each family is a small module (gpt2.py, llama.py, …) with a config mapping and a key/transform
table that serves both directions; nothing here or in the cells knows a model's name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from glassformer.checkpoints.files import atomic_write, read_json, read_weights, write_json
from glassformer.checkpoints.native import check_state
from glassformer.config import Config
from glassformer.errors import CheckpointError
from glassformer.model import Transformer


@dataclass(frozen=True)
class Transform:
    """How their tensor(s) become one of ours, and back again."""

    to_ours: Callable[[tuple[Tensor, ...], Config], Tensor]
    to_theirs: Callable[[Tensor, Config], tuple[Tensor, ...]]


def qkv_sizes(cfg: Config) -> list[int]:
    return [cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head]


same = Transform(lambda ts, cfg: ts[0], lambda t, cfg: (t,))
# Hugging Face Conv1D stores (in, out); glassformer stores (out, in) as nn.Linear does.
transposed = Transform(lambda ts, cfg: ts[0].T, lambda t, cfg: (t.T,))
# Separate Q, K, V projections <-> one fused (out, in) matrix (or bias), Q rows first.
stacked = Transform(lambda ts, cfg: torch.cat(ts, dim=0), lambda t, cfg: t.split(qkv_sizes(cfg), dim=0))

# One table row: our tensor name (relative), their tensor name(s) (relative), the transform between.
Row = tuple[str, str | tuple[str, ...], Transform]


# Names of buffers (not weights) that transformers models save: nothing to convert.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias", "position_ids", ".inv_freq")


class HFState:
    """The checkpoint's tensors by name, whatever prefix the model class put before them."""

    def __init__(self, tensors: dict[str, Tensor], prefixes: Sequence[str], source: str) -> None:
        self.tensors, self.prefixes, self.source = tensors, ("", *prefixes), source
        self.read: set[str] = set()  # the names the conversion found

    def find(self, name: str) -> Tensor | None:
        for prefix in self.prefixes:
            if prefix + name in self.tensors:
                self.read.add(prefix + name)
                return self.tensors[prefix + name]
        return None

    def unused(self) -> list[str]:
        """Tensors the conversion never read: not the buffers transformers saves beside the weights
        (causal masks, position ids, rotary tables), nor a tied copy of a tensor it did read."""
        read_storage = {self.tensors[n].data_ptr() for n in self.read}
        return sorted(
            n
            for n, t in self.tensors.items()
            if n not in self.read and not n.endswith(HF_BUFFERS) and t.data_ptr() not in read_storage
        )

    def __call__(self, name: str) -> Tensor:
        tensor = self.find(name)
        if tensor is None:
            raise CheckpointError(f"{self.source} lacks tensor {name!r} that this model family needs")
        return tensor


def _names(names: str | tuple[str, ...]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else names


def map_rows(get: HFState, rows: Sequence[Row], cfg: Config, ours: str = "", theirs: str = "") -> dict[str, Tensor]:
    """Their tensors -> ours, by a table; `ours`/`theirs` prefix each side's names (one layer's, say)."""
    return {ours + mine: t.to_ours(tuple(get(theirs + n) for n in _names(names)), cfg) for mine, names, t in rows}


def unmap_rows(
    state: dict[str, Tensor], rows: Sequence[Row], cfg: Config, ours: str = "", theirs: str = ""
) -> dict[str, Tensor]:
    """Our tensors -> theirs, by the same table read backwards."""
    out = {}
    for mine, names, transform in rows:
        out |= {theirs + n: t for n, t in zip(_names(names), transform.to_theirs(state[ours + mine], cfg), strict=True)}
    return out


@dataclass(frozen=True)
class Family:
    """How one `model_type` maps onto glassformer: its config, its tensors, its key prefixes, and
    (decoder families) the way back: `export` our tensors, `hf_config` for transformers."""

    config: Callable[[dict[str, Any], HFState], Config]  # the tensors tell which optional heads exist
    weights: Callable[[HFState, Config], dict[str, Tensor]]
    prefixes: tuple[str, ...]
    export: Callable[[dict[str, Tensor], Config], dict[str, Tensor]] | None = None  # the body, unprefixed
    hf_config: Callable[[Config, dict[str, Tensor]], dict[str, Any]] | None = None  # raises if it does not fit


def families() -> dict[str, Family]:
    from glassformer.checkpoints import bart, bert, gpt2, llama, neox

    return {  # model_type -> family; llama, mistral and qwen2 differ only in config details
        "gpt2": gpt2.FAMILY,
        "llama": llama.FAMILY,
        "mistral": llama.FAMILY,
        "qwen2": llama.FAMILY,
        "bert": bert.FAMILY,
        "gpt_neox": neox.FAMILY,
        "bart": bart.FAMILY,
        "marian": bart.FAMILY,
    }


def to_hf(model: Transformer, directory: str | Path) -> Path:
    """Write a decoder as a Hugging Face checkpoint (config.json + model.safetensors) that
    `transformers.AutoModelForCausalLM.from_pretrained(directory)` opens with the same numbers."""
    cfg, state = model.cfg, {k: v.detach() for k, v in model.state_dict().items()}
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {family.prefixes[0] + k: v for k, v in tensors.items()}  # e.g. "model.layers.0…"
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = state["unembed.weight"]
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # no shared or strided storage
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(directory / "config.json", {**hf_config, "dtype": str(model.embed.W_E.dtype).removeprefix("torch.")})
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
    try:
        cfg = family.config(hf_config, get)
    except KeyError as err:
        raise CheckpointError(f"{name}: its {model_type} config lacks the field {err.args[0]!r}") from None
    state = family.weights(get, cfg)
    unused = get.unused()
    if unused:  # e.g. a pre-training head glassformer has no place for: say so rather than drop it silently
        listed = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        warnings.warn(f"{name}: {len(unused)} tensors the {model_type} conversion does not use: {listed}", stacklevel=2)
    # Never share storage with a live transformers model: editing one must not change the other.
    # (Memory-mapped files are copy-on-write, so their tensors are used as they are.) Every weight
    # ends up contiguous: a transposed (in, out) view would make each product reorder it.
    live = set() if isinstance(source, str | Path) else {t.data_ptr() for t in tensors.values()}
    state = {
        k: t.clone(memory_format=torch.contiguous_format) if t.data_ptr() in live else t.contiguous()
        for k, t in state.items()
    }
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state(model, state, name)
    model.load_state_dict(state, assign=True)
    return model.eval()


def zeros_like_bias(size: int, like: Tensor) -> Tensor:
    """A bias the source model does not have: zeros change nothing."""
    return torch.zeros(size, dtype=like.dtype)


def bias_sizes(cfg: Config) -> dict[str, int]:
    """Our bias tensors' lengths, for biases a checkpoint may lack."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head
    return {"attn.qkv_bias": qkv, "attn.b_O": cfg.d_model, "mlp.b_in": cfg.d_mlp, "mlp.b_out": cfg.d_model}


def map_biases(
    get: HFState, rows: Sequence[Row], cfg: Config, ours: str, theirs: str, like: Tensor
) -> dict[str, Tensor]:
    """Bias rows of a table; one the checkpoint lacks becomes zeros (our config gives every linear
    map a bias when any has one)."""
    out = {}
    for mine, names, transform in rows:
        found = tuple(get.find(theirs + n) for n in _names(names))
        missing = any(t is None for t in found)
        out[ours + mine] = zeros_like_bias(bias_sizes(cfg)[mine], like) if missing else transform.to_ours(found, cfg)
    return out


def fit(cfg: Config, family: str, **needs: Any) -> None:
    """Raise unless every named Config field has the value the target family can express."""
    wrong = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in needs.items() if getattr(cfg, k) != v]
    if wrong:
        raise CheckpointError(f"cannot be written as {family}: {', '.join(wrong)}")


# Fields every decoder family needs as they are by default.
PLAIN_DECODER = dict(
    arch="decoder",
    norm_position="pre",
    attn_only=False,
    embed_norm=False,
    embed_scale=1.0,
    n_token_types=0,
    head_transform=False,
    pooler=False,
)


def hf_activation(act: str) -> str:
    """Our activation -> the Hugging Face name of a family with a plain (ungated) MLP."""
    plain = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
    if act not in plain:
        raise CheckpointError(f"act={act!r} has no place in a plain MLP (needs one of {', '.join(plain)})")
    return plain[act]


def require_zero(state: dict[str, Tensor], names: Sequence[str], family: str) -> None:
    """A bias that the target family cannot hold must be zero, or exporting would change the model."""
    nonzero = [n for n in names if n in state and bool(state[n].any())]
    if nonzero:
        raise CheckpointError(f"{family} has no place for the non-zero biases {nonzero}")


def standard_sizes(hf: dict[str, Any]) -> dict[str, int]:
    """Config sizes from the field names most transformers configs share (BERT, Llama, NeoX)."""
    return dict(
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_mlp=hf["intermediate_size"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf["max_position_embeddings"],
    )


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
