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
POSITIONALS = ("sinusoidal", "learned", "rotary", "relative", "none")  # relative: T5's bucketed bias on the scores
NORMS = ("layernorm", "rmsnorm", "none")
# pre: x + cell(norm(x)); post: norm(x + cell(x)); sandwich (Gemma 2/3): x + norm_post(cell(norm(x)));
# output (OLMo 2): x + norm_post(cell(x)).
NORM_POSITIONS = ("pre", "post", "sandwich", "output")
ACTS = ("relu", "gelu", "gelu_new", "silu", "swiglu", "geglu")  # geglu: tanh-GELU gate (Gemma, T5 v1.1)
LAYER_TYPES = ("full", "sliding")  # attention over every earlier key, or over the last sliding_window keys
QK_NORMS = ("none", "head", "projection")  # RMSNorm of q and k: per head (Qwen3, Gemma 3) or whole (OLMo 2)
# Rotary scaling variants: type -> (required keys, optional keys). `original_n_ctx` is the context the
# model was pre-trained with; the formulas are in cells/rotary_scaling.py. "default" = no scaling.
ROTARY_SCALINGS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor", "original_n_ctx"}), frozenset()),
    "yarn": (
        frozenset({"factor", "original_n_ctx"}),
        frozenset({"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}),
    ),
    "llama3": (frozenset({"factor", "original_n_ctx", "low_freq_factor", "high_freq_factor"}), frozenset()),
    "longrope": (
        frozenset({"short_factor", "long_factor", "original_n_ctx"}),
        frozenset({"factor", "attention_factor"}),
    ),
}


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


def check_rotary_scaling(scaling: Any, rotary_dim: int, name: str = "Config.rotary_scaling") -> None:
    """Raise a ValueError unless `scaling` is a rotary scaling dict: a known "type", its required
    keys, no unknown ones, positive numbers, and longrope factor lists of rotary_dim / 2 numbers."""
    if not isinstance(scaling, dict) or scaling.get("type") not in ROTARY_SCALINGS:
        raise ValueError(f"{name}={scaling!r} must be None or a dict whose 'type' is one of {list(ROTARY_SCALINGS)}")
    required, optional = ROTARY_SCALINGS[scaling["type"]]
    missing, unknown = sorted(required - set(scaling)), sorted(set(scaling) - required - optional - {"type"})
    if missing or unknown:
        raise ValueError(
            f"{name} of type {scaling['type']!r} lacks {missing} / has unknown keys {unknown}; "
            f"required: {sorted(required)}, optional: {sorted(optional)}"
        )
    for key, value in scaling.items():
        if key in ("short_factor", "long_factor"):
            if not isinstance(value, list) or len(value) != rotary_dim // 2 or not all(_is_positive(v) for v in value):
                raise ValueError(
                    f"{name}[{key!r}] must be a list of rotary_dim / 2 = {rotary_dim // 2} positive numbers"
                )
        elif key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"{name}['truncate']={value!r} must be True or False")
        elif key != "type" and not _is_positive(value):
            raise ValueError(f"{name}[{key!r}]={value!r} must be a positive number")


def _is_positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


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
    rotary_scaling: dict[str, Any] | None = None  # {"type": "linear" | "dynamic" | "yarn" | "llama3" | "longrope", …}
    rotary_interleaved: bool = False  # rotate pairs (x0, x1), (x2, x3)… (GPT-J), not halves (NeoX, Llama)
    rotary_base_local: float | None = None  # rotary base of the sliding-window layers (Gemma 3); None = rotary_base
    sliding_window: int | None = None  # keys a query sees in a "sliding" layer, itself included
    layer_types: list[str] | None = None  # per layer "full" or "sliding"; defaults to all sliding with a window
    relative_buckets: int = 32  # positional="relative": learned biases per head, one per distance bucket
    relative_max_distance: int = 128  # distances from here on share the last bucket
    attn_scale: float | None = None  # multiplies q·k; None = 1/sqrt(d_head) (Gemma: query_pre_attn_scalar^-1/2)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    qk_norm: str = "none"  # RMSNorm of q and k before rotary: "head" (over d_head) or "projection" (all heads)
    norm: str = "layernorm"
    norm_position: str = "pre"
    eps: float = 1e-5
    act: str = "gelu"
    attn_only: bool = False
    parallel_attn_mlp: bool = False  # GPT-NeoX/GPT-J: x + attn(ln1(x)) + mlp(ln2(x))
    shared_norm: bool = False  # parallel block whose MLP reads ln1(x) too, with no ln2 (GPT-J)
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    embed_scale: float = 1.0  # token embeddings times this (sqrt(d_model) in Marian)
    unembed_scale: float = 1.0  # the final residual times this before the head (T5, tied: d_model**-0.5)
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
        _choice("qk_norm", self.qk_norm, QK_NORMS)
        for name in ("d_model", "n_layers", "n_heads", "d_vocab", "n_ctx", "relative_buckets", "relative_max_distance"):
            _positive(name, getattr(self, name))
        for name in ("rotary_base", "eps", "embed_scale", "unembed_scale", "dropout", "init_std"):
            _number(name, getattr(self, name))
        for name in ("rotary_base_local", "attn_scale", "attn_softcap", "final_softcap"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name))
                if not getattr(self, name) > 0:
                    raise ValueError(f"Config.{name}={getattr(self, name)!r} must be positive (or None)")
        flags = (
            "attn_only",
            "parallel_attn_mlp",
            "shared_norm",
            "embed_norm",
            "head_transform",
            "pooler",
            "bias",
            "tie_embeddings",
            "rotary_interleaved",
            "norm_topk_prob",
        )
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
        self._check_layer_types()
        if self.norm_position in ("sandwich", "output") and self.arch == "encoder-decoder":
            raise ValueError(f"Config.norm_position={self.norm_position!r} is for single-stack models")
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
        for name in ("embed_scale", "unembed_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Config.{name}={getattr(self, name)!r} must be positive")
        if self.positional == "relative" and (
            self.relative_buckets < 4 or self.relative_max_distance <= self.relative_buckets // 2
        ):
            raise ValueError(
                f"Config.relative_buckets={self.relative_buckets}, relative_max_distance="
                f"{self.relative_max_distance}: need at least 4 buckets and a max distance beyond the exact "
                "buckets (relative_buckets // 2)"
            )
        if not self.rotary_base > 0:
            raise ValueError(f"Config.rotary_base={self.rotary_base!r} must be positive")
        if self.shared_norm and not self.parallel_attn_mlp:
            raise ValueError("Config.shared_norm=True needs parallel_attn_mlp=True (only a parallel block shares ln1)")
        if self.rotary_scaling is not None:
            check_rotary_scaling(self.rotary_scaling, self.rotary_dim)
        self._check_experts()

    def _check_layer_types(self) -> None:
        """Fill `layer_types` (all "sliding" when there is a window, else all "full") and check it."""
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window)
            if self.arch != "decoder":
                raise ValueError("Config.sliding_window applies to causal self-attention: arch must be 'decoder'")
        if self.layer_types is None:
            self.layer_types = ["full" if self.sliding_window is None else "sliding"] * self.n_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"Config.layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
        for kind in self.layer_types:
            _choice("layer_types[…]", kind, LAYER_TYPES)
        if "sliding" in self.layer_types and self.sliding_window is None:
            raise ValueError("Config.layer_types has 'sliding' layers but sliding_window is None")

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full attention."""
        if self.sliding_window is None:
            return None
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

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
        """Whether the MLP has a gate (SwiGLU `silu(x @ W_gate) * (x @ W_in)`, or GeGLU with tanh-GELU)."""
        return self.act in ("swiglu", "geglu")

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
