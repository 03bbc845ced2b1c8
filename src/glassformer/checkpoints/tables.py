"""The pieces every Hugging Face family table is made of: transforms between their tensors and ours,
the lookup of their tensors by name, table rows applied both ways, and config helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from glassformer.config import Config
from glassformer.errors import CheckpointError


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

# One table row: our tensor name(s) (relative), their tensor name(s) (relative), the transform between
# (several of ours from one of theirs: the transform returns, and takes back, a tuple).
Row = tuple[str | tuple[str, ...], str | tuple[str, ...], Transform]


# Names of buffers (not weights) that transformers models save: nothing to convert.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias", "position_ids", ".inv_freq")


class HFState:
    """The checkpoint's tensors by name, whatever prefix the model class put before them."""

    def __init__(self, tensors: dict[str, Tensor], prefixes: Sequence[str], source: str) -> None:
        self.tensors, self.prefixes, self.source = tensors, ("", *prefixes), source
        self.read: dict[str, int] = {}  # the full names the conversion found, and their storage

    def find(self, name: str) -> Tensor | None:
        for prefix in self.prefixes:
            if prefix + name in self.tensors:
                tensor = self.tensors[prefix + name]
                self.read[prefix + name] = tensor.data_ptr()
                return tensor
        return None

    def release(self, names: Sequence[str]) -> None:
        """Let go of tensors already combined into a new one (Q, K, V stacked), so that the separate
        parts and the whole are not all held at once while a model converts."""
        for name in names:
            for prefix in self.prefixes:
                if prefix + name in self.read:
                    self.tensors.pop(prefix + name, None)

    def unused(self) -> list[str]:
        """Tensors the conversion never read: not the buffers transformers saves beside the weights
        (causal masks, position ids, rotary tables), nor a tied copy of a tensor it did read."""
        read_storage = set(self.read.values())
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
    """Their tensors -> ours, by a table; `ours`/`theirs` prefix each side's names (one layer's, say).
    Tensors combined into one are released as soon as the combination exists."""
    out = {}
    for mine, names, transform in rows:
        made = transform.to_ours(tuple(get(theirs + n) for n in _names(names)), cfg)
        if isinstance(mine, str):
            out[ours + mine] = made
        else:
            out |= {ours + m: t for m, t in zip(mine, made, strict=True)}
        if not isinstance(names, str):
            get.release([theirs + n for n in names])
    return out


def unmap_rows(
    state: dict[str, Tensor], rows: Sequence[Row], cfg: Config, ours: str = "", theirs: str = ""
) -> dict[str, Tensor]:
    """Our tensors -> theirs, by the same table read backwards."""
    out = {}
    for mine, names, transform in rows:
        value = state[ours + mine] if isinstance(mine, str) else tuple(state[ours + m] for m in mine)
        out |= {theirs + n: t for n, t in zip(_names(names), transform.to_theirs(value, cfg), strict=True)}
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
        if not isinstance(names, str):
            get.release([theirs + n for n in names])
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
    sliding_window=None,
    rotary_scaling=None,
    rotary_interleaved=False,
    shared_norm=False,
    rotary_base_local=None,
    attn_scale=None,
    attn_softcap=None,
    final_softcap=None,
    qk_norm="none",
    n_experts=0,
    unembed_scale=1.0,
)


HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def sliding_layers(hf: dict[str, Any], default: Callable[[int], bool]) -> dict[str, Any]:
    """`sliding_window` and `layer_types` of a transformers config. `layer_types` is read when the
    config has it (transformers 5 writes it), else `default(i)` says whether layer i slides (the
    family's own rule: every layer for Mistral, alternate layers for Gemma 2, …)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window is None:
        return {}
    kinds = hf.get("layer_types")
    if kinds is None:
        kinds = ["sliding_attention" if default(i) else "full_attention" for i in range(hf["num_hidden_layers"])]
    unknown = sorted(set(kinds) - set(HF_LAYER_TYPES))
    if unknown:
        raise CheckpointError(f"layer_types {unknown} are not supported (known: {', '.join(HF_LAYER_TYPES)})")
    return {"sliding_window": window, "layer_types": [HF_LAYER_TYPES[k] for k in kinds]}


def hf_layer_types(cfg: Config) -> list[str]:
    """Our layer types under transformers' names."""
    theirs = {ours: name for name, ours in HF_LAYER_TYPES.items()}
    return [theirs[kind] for kind in cfg.layer_types]


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
