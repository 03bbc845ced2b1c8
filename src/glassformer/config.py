"""`Config`: every architectural choice of a model in one validated dataclass.

Derived sizes (d_head, n_kv_heads, d_mlp, n_decoder_layers, rotary_dim, d_expert_mlp) are filled in once, in
`__post_init__`, so no cell ever recomputes them. A bad value raises `ValueError` naming the field,
the value and what was expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("encoder", "decoder", "encoder-decoder")
POSITIONALS = ("sinusoidal", "learned", "rotary", "none")
NORMS = ("layernorm", "rmsnorm", "none")
NORM_POSITIONS = ("pre", "post")
ACTS = ("relu", "gelu", "gelu_new", "silu", "swiglu")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Config.{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Config.{name}={value!r} must be a positive integer")


def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"Config.{name}={value!r} must be a number, not {type(value).__name__}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Config.{name}={value!r} must be True or False, not {type(value).__name__}")


@dataclass
class Config:
    """The shape and wiring of a transformer; `Transformer(cfg)` builds it."""

    d_model: int
    n_layers: int
    n_heads: int
    d_vocab: int
    n_ctx: int
    arch: str = "decoder"
    n_decoder_layers: int | None = None  # encoder-decoder only; defaults to n_layers
    d_head: int | None = None  # defaults to d_model // n_heads
    n_kv_heads: int | None = None  # defaults to n_heads; fewer = grouped-query, 1 = multi-query
    d_mlp: int | None = None  # defaults to 4 * d_model
    positional: str = "learned"
    rotary_base: float = 10000.0
    rotary_dim: int | None = None  # rotated dims per head; defaults to d_head (partial rotary if less)
    norm: str = "layernorm"
    norm_position: str = "pre"
    eps: float = 1e-5
    act: str = "gelu"
    attn_only: bool = False
    parallel_attn_mlp: bool = False  # GPT-NeoX/GPT-J: x + attn(ln1(x)) + mlp(ln2(x))
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    embed_scale: float = 1.0  # token embeddings times this (sqrt(d_model) in Marian)
    n_token_types: int = 0  # segment embeddings (BERT); 0 = none
    head_transform: bool = False  # dense + act + norm before the unembedding (BERT's MLM head)
    pooler: bool = False  # tanh(dense(first token)) summary vector (BERT)
    n_experts: int = 0  # mixture of experts in place of every MLP (Mixtral, Qwen-MoE); 0 = a dense MLP
    n_experts_per_token: int = 2  # experts each token is routed to (top-k of the router's softmax)
    d_expert_mlp: int | None = None  # hidden units of each expert; defaults to d_mlp
    norm_topk_prob: bool = True  # rescale the chosen experts' weights to sum to 1 (Mixtral yes, Qwen2-MoE no)
    d_shared_expert_mlp: int = 0  # an always-on expert with a sigmoid gate (Qwen2-MoE); 0 = none
    bias: bool = True
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. the source checkpoint)

    def __post_init__(self) -> None:
        _choice("arch", self.arch, ARCHS)
        _choice("positional", self.positional, POSITIONALS)
        _choice("norm", self.norm, NORMS)
        _choice("norm_position", self.norm_position, NORM_POSITIONS)
        _choice("act", self.act, ACTS)
        for name in ("d_model", "n_layers", "n_heads", "d_vocab", "n_ctx"):
            _positive(name, getattr(self, name))
        for name in ("rotary_base", "eps", "embed_scale", "dropout", "init_std"):
            _number(name, getattr(self, name))
        flags = ("attn_only", "parallel_attn_mlp", "embed_norm", "head_transform", "pooler", "bias", "tie_embeddings")
        flags += ("norm_topk_prob",)
        for name in flags:
            _flag(name, getattr(self, name))

        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"Config.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "pass d_head explicitly or choose n_heads dividing d_model"
                )
            self.d_head = self.d_model // self.n_heads
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.rotary_dim is None:
            self.rotary_dim = self.d_head
        for name in ("d_head", "n_kv_heads", "d_mlp", "n_decoder_layers", "rotary_dim"):
            _positive(name, getattr(self, name))

        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"Config.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}: "
                "each key/value head serves a whole group of query heads"
            )
        if self.positional == "rotary" and (self.rotary_dim % 2 or self.rotary_dim > self.d_head):
            raise ValueError(f"Config.rotary_dim={self.rotary_dim} must be even and at most d_head={self.d_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Config.dropout={self.dropout!r} must be in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"Config.eps={self.eps!r} must be positive")
        if self.parallel_attn_mlp and (self.norm_position != "pre" or self.attn_only or self.arch == "encoder-decoder"):
            raise ValueError(
                "Config.parallel_attn_mlp=True needs norm_position='pre', an MLP (attn_only=False) and a single "
                "stack (arch 'decoder' or 'encoder': a parallel block has no place for cross-attention)"
            )
        if isinstance(self.n_token_types, bool) or not isinstance(self.n_token_types, int) or self.n_token_types < 0:
            raise ValueError(f"Config.n_token_types={self.n_token_types!r} must be a non-negative integer")
        if self.n_token_types and self.arch == "encoder-decoder":
            raise ValueError("Config.n_token_types applies to single-stack models, not arch='encoder-decoder'")
        if (self.embed_norm or self.head_transform) and self.norm == "none":
            raise ValueError("Config.embed_norm / head_transform need a norm (norm='none' was given)")
        if not self.embed_scale > 0:
            raise ValueError(f"Config.embed_scale={self.embed_scale!r} must be positive")
        if not self.rotary_base > 0:
            raise ValueError(f"Config.rotary_base={self.rotary_base!r} must be positive")
        self._check_experts()

    def _check_experts(self) -> None:
        """A mixture of experts: whole numbers of experts, top-k among them, an MLP to replace."""
        for name in ("n_experts", "d_shared_expert_mlp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Config.{name}={value!r} must be a non-negative integer")
        if not self.n_experts:
            return
        if self.d_expert_mlp is None:
            self.d_expert_mlp = self.d_mlp
        for name in ("n_experts_per_token", "d_expert_mlp"):
            _positive(name, getattr(self, name))
        if self.n_experts_per_token > self.n_experts:
            raise ValueError(
                f"Config.n_experts_per_token={self.n_experts_per_token} must be at most n_experts={self.n_experts}"
            )
        if self.attn_only:
            raise ValueError(f"Config.n_experts={self.n_experts} replaces the MLP, but attn_only=True has none")

    @property
    def gated(self) -> bool:
        """Whether the MLP has a gate (SwiGLU: `silu(x @ W_gate) * (x @ W_in)`)."""
        return self.act == "swiglu"

    @property
    def n_groups(self) -> int:
        """Query heads per key/value head (1 for plain multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field (derived ones included)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Config got unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)
