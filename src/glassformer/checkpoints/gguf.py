"""GGUF files (llama.cpp, Ollama, LM Studio) <-> glassformer, through the Hugging Face family tables.

A GGUF file names its tensors and settings in llama.cpp's vocabulary (`blk.0.attn_q.weight`,
`llama.attention.head_count`). Each architecture below is a table that renames them to the
Hugging Face names its family module already converts (llama.py, gpt2.py, neox.py), so a GGUF model
and the same model from `transformers` go through one conversion. The file's tensors are read with
the `gguf` package and dequantized by `gguf.quants`; nothing here parses the format by hand.

llama.cpp stores the Q and K rows of Llama-architecture models permuted for its interleaved rotary
(`convert_hf_to_gguf.py`'s `permute`); reading undoes that permutation and writing applies it.
It stacks a mixture's experts into one `(n_experts, …)` tensor per projection (`ffn_gate_exps`), where
Hugging Face checkpoints hold one tensor per expert: a row whose Hugging Face name has `{e}` is that
stack, split on reading and stacked on writing. Mixtral is the `llama` architecture with experts.
T5 is `t5`: an encoder stack (`enc.blk.N.…`) and a decoder stack (`dec.blk.N.…`), its table laid out by
the config (gated MLP or not, the two depths).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor

from glassformer.checkpoints import gemma, moe
from glassformer.checkpoints.files import atomic_write
from glassformer.checkpoints.gguf_rope import ROPE_TENSORS, gguf_rope_scaling, rope_scaling, tensor_scaling
from glassformer.checkpoints.gguf_vocab import read_metadata, tokenizer_from_gguf, tokenizer_metadata
from glassformer.checkpoints.hf import convert, export
from glassformer.config import Config
from glassformer.errors import CheckpointError
from glassformer.tokenizer import TextTokenizer

# One row: llama.cpp's tensor name and the Hugging Face one ("{i}" is the layer, "{e}" the expert of a
# stacked tensor), whether the Hugging Face tensor is the transpose of the GGUF one (GPT-2's Conv1D
# stores (in, out)).
Names = list[tuple[str, str, bool]]


def _layer(prefix: str, rows: list[tuple[str, str]], transposed: tuple[str, ...] = ()) -> Names:
    """Per-layer rows for weights and biases: `blk.{i}.<ours>.weight` <-> `<prefix><theirs>.weight`."""
    return [
        (f"blk.{{i}}.{ours}.{kind}", f"{prefix}{theirs}.{kind}", kind == "weight" and ours in transposed)
        for ours, theirs in rows
        for kind in ("weight", "bias")
    ]


def _experts(prefix: str, table: moe.Experts) -> Names:
    """Per-layer rows of a mixture: the router, and each projection's experts stacked in one tensor."""
    block = prefix + table.blocks[0]
    stacks = zip(("gate", "up", "down"), table.projections, strict=True)
    return [
        ("blk.{i}.ffn_gate_inp.weight", f"{block}gate.weight", False),
        *(
            (f"blk.{{i}}.ffn_{kind}_exps.weight", f"{block}experts.{{e}}.{theirs}.weight", False)
            for kind, theirs in stacks
        ),
    ]


@dataclass(frozen=True)
class Architecture:
    """How one `general.architecture` maps onto a Hugging Face family."""

    model_type: str  # the transformers model_type whose family module converts it
    settings: dict[str, str]  # GGUF key (after "<arch>.") -> Hugging Face config field
    names: Names | Callable[[dict[str, Any]], Names]  # tensor names, both ways; or every layer's, by the HF config
    defaults: dict[str, Any] = field(default_factory=dict)  # HF config fields GGUF leaves implicit
    permuted_qk: bool = False  # llama.cpp's interleaved-rotary row order for Q and K
    extra: Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]] | None = None  # derived fields
    norm_shift: float = 0.0  # GGUF norm gains = Hugging Face ones + this (Gemma stores 1 + w)
    writable: Callable[[Config], str | None] | None = None  # why a config does not fit the format, if it does not
    stored: Callable[[set[str]], dict[str, Any]] | None = None  # HF config fields the file's tensor names tell
    rope_factors: bool = False  # LongRoPE as rope_factors_long/short tensors (llama.cpp's Phi-3)


LLAMA_SETTINGS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
    "expert_count": "num_local_experts",  # Mixtral
    "expert_used_count": "num_experts_per_tok",
}
QWEN3MOE_SETTINGS = {
    **{k: v for k, v in LLAMA_SETTINGS.items() if not k.startswith("expert_")},
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
}
QWEN2MOE_SETTINGS = {**QWEN3MOE_SETTINGS, "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}
# GPT-2 and GPT-J: the same config fields, and the same embedding, final LayerNorm and head
GPT2_SETTINGS = {
    "context_length": "n_positions",
    "embedding_length": "n_embd",
    "feed_forward_length": "n_inner",
    "block_count": "n_layer",
    "attention.head_count": "n_head",
    "attention.layer_norm_epsilon": "layer_norm_epsilon",
    "vocab_size": "vocab_size",
}
GPT2_HEAD = [
    ("token_embd.weight", "transformer.wte.weight", False),
    ("output_norm.weight", "transformer.ln_f.weight", False),
    ("output_norm.bias", "transformer.ln_f.bias", False),
    ("output.weight", "lm_head.weight", False),
]
GPT2_NAMES = [
    *GPT2_HEAD,
    ("position_embd.weight", "transformer.wpe.weight", False),
    *_layer(
        "transformer.h.{i}.",
        [
            ("attn_norm", "ln_1"),
            ("attn_qkv", "attn.c_attn"),
            ("attn_output", "attn.c_proj"),
            ("ffn_norm", "ln_2"),
            ("ffn_up", "mlp.c_fc"),
            ("ffn_down", "mlp.c_proj"),
        ],
        transposed=("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
    ),
]
NEOX_NAMES = [
    ("token_embd.weight", "gpt_neox.embed_in.weight", False),
    ("output_norm.weight", "gpt_neox.final_layer_norm.weight", False),
    ("output_norm.bias", "gpt_neox.final_layer_norm.bias", False),
    ("output.weight", "lm_head.weight", False),  # "embed_out" in older transformers checkpoints
    *_layer(
        "gpt_neox.layers.{i}.",
        [
            ("attn_norm", "input_layernorm"),
            ("attn_qkv", "attention.query_key_value"),
            ("attn_output", "attention.dense"),
            ("ffn_norm", "post_attention_layernorm"),
            ("ffn_up", "mlp.dense_h_to_4h"),
            ("ffn_down", "mlp.dense_4h_to_h"),
        ],
    ),
]


# GPT-J: attention and MLP both read attn_norm; Q, K and V apart, none with a bias; the head has one.
# Its rotary pairs neighbouring dimensions (llama.cpp's NORM rope), so Q/K rows are stored as transformers
# holds them, as GPT-J's GGUF converters write them. llama.cpp names gptj's tensors but builds no graph for it.
GPTJ_NAMES = [
    *GPT2_HEAD,
    ("output.bias", "lm_head.bias", False),
    *_layer(
        "transformer.h.{i}.",
        [
            ("attn_norm", "ln_1"),
            ("attn_q", "attn.q_proj"),
            ("attn_k", "attn.k_proj"),
            ("attn_v", "attn.v_proj"),
            ("attn_output", "attn.out_proj"),
            ("ffn_up", "mlp.fc_in"),
            ("ffn_down", "mlp.fc_out"),
        ],
    ),
]


def _rotated(meta: Mapping[str, Any]) -> tuple[int, int]:
    """(rotated dimensions per head, d_head): `{arch}.rope.dimension_count`, the whole head if absent."""
    arch = meta["general.architecture"]
    head = meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"]
    return meta.get(f"{arch}.rope.dimension_count", head), head


def _neox_rotary(meta: Mapping[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """GGUF gives rotated dimensions per head; transformers wants the fraction of the head."""
    rotated, head = _rotated(meta)
    return {"rotary_pct": rotated / head}


def _gptj_rotary(meta: Mapping[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """GPT-J's transformers config counts the rotated dimensions per head, as GGUF does."""
    return {"rotary_dim": _rotated(meta)[0]}


HEAD = [
    ("token_embd.weight", "model.embed_tokens.weight", False),
    ("output_norm.weight", "model.norm.weight", False),
    ("output.weight", "lm_head.weight", False),
]


def _rotary_layers(prefix: str, rows: list[tuple[str, str]]) -> Names:
    """A Llama-laid-out model's tensor names: the head and `rows` in every layer."""
    return [*HEAD, *_layer(prefix, rows)]


def _replace(rows: list[tuple[str, str]], **changes: str) -> list[tuple[str, str]]:
    """`rows` with some GGUF names mapped to other Hugging Face names (ffn_norm="…"), the rest kept."""
    return [(ours, changes.get(ours, theirs)) for ours, theirs in rows]


LLAMA_ROWS = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
]
LLAMA_NAMES = _rotary_layers("model.layers.{i}.", LLAMA_ROWS)
MIXTRAL_NAMES = _experts("model.layers.{i}.", moe.MIXTRAL)
QWEN2MOE_NAMES = [
    *_experts("model.layers.{i}.", moe.QWEN2_MOE),
    *_layer(
        "model.layers.{i}.mlp.",
        [
            ("ffn_gate_inp_shexp", "shared_expert_gate"),  # llama.cpp: a (d_model,) vector
            ("ffn_gate_shexp", "shared_expert.gate_proj"),
            ("ffn_up_shexp", "shared_expert.up_proj"),
            ("ffn_down_shexp", "shared_expert.down_proj"),
        ],
    ),
]
QK_NORM_ROWS = [("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")]
QWEN3_NAMES = _rotary_layers("model.layers.{i}.", LLAMA_ROWS + QK_NORM_ROWS)
# Gemma 2/3 and OLMo 2 norm their cells' outputs (and Gemma 2/3's ffn_norm is the norm before the MLP).
POST_NORM_ROWS = [("post_attention_norm", "post_attention_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm")]
SANDWICH_ROWS = [*_replace(LLAMA_ROWS, ffn_norm="pre_feedforward_layernorm"), *POST_NORM_ROWS]


def _partial_rotary(meta: Mapping[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """Phi-3: the rotated dimensions per head as transformers' fraction of the head."""
    rotated, head = _rotated(meta)
    return {"partial_rotary_factor": rotated / head}


def _gemma_scale(meta: Mapping[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """GGUF has no query_pre_attn_scalar: llama.cpp scales Gemma 2/3 scores by 1/sqrt(head_dim)."""
    return {"query_pre_attn_scalar": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]}


def _gemma_fits(cfg: Config) -> str | None:
    """What llama.cpp fixes for Gemma 2/3 and a file cannot say otherwise."""
    version = gemma.version(cfg)  # llama.cpp slides the layers as the family's default pattern does
    pattern = ["sliding" if gemma.PATTERNS[version](i) else "full" for i in range(cfg.n_layers)]
    if cfg.sliding_window is not None and cfg.layer_types != pattern:
        return f"its layer_types are not llama.cpp's fixed {version} pattern ({pattern})"
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.d_head**-0.5) > 1e-9:
        return f"attn_scale={cfg.attn_scale} is not 1/sqrt(d_head), the only scale llama.cpp uses"
    if cfg.qk_norm == "head" and cfg.rotary_base_local not in (None, 10000.0):
        return f"rotary_base_local={cfg.rotary_base_local} is not llama.cpp's fixed 10000"
    return None


def _llama_experts(meta: Mapping[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """A `llama` file with experts is Mixtral (llama.cpp renormalises its top-k weights)."""
    return {"model_type": "mixtral", "norm_topk_prob": True} if hf.get("num_local_experts") else {}


T5_SETTINGS = {
    "context_length": "n_positions",
    "embedding_length": "d_model",
    "feed_forward_length": "d_ff",
    "block_count": "num_layers",
    "decoder_block_count": "num_decoder_layers",
    "attention.head_count": "num_heads",
    "attention.key_length": "d_kv",
    "attention.layer_norm_epsilon": "layer_norm_epsilon",  # the key transformers reads
    "attention.layer_norm_rms_epsilon": "layer_norm_epsilon",  # the key llama.cpp reads
    "attention.relative_buckets_count": "relative_attention_num_buckets",
    "decoder_start_token_id": "decoder_start_token_id",
    "vocab_size": "vocab_size",
}
T5_ATTENTION = [("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_o", "o")]


def _t5_stack(ours: str, theirs: str, n_layers: int, cross: bool, gated: bool) -> Names:
    """One T5 stack's layers: self-attention (`layer.0`), cross-attention (`layer.1`, decoder), the MLP
    last (`wi_0` the gate and `wi_1` the linear branch when gated, `wi` otherwise)."""
    rows = [("attn_norm", "layer.0.layer_norm"), *((o, f"layer.0.SelfAttention.{t}") for o, t in T5_ATTENTION)]
    if cross:
        rows += [("cross_attn_norm", "layer.1.layer_norm")]
        rows += [(f"cross_{o}", f"layer.1.EncDecAttention.{t}") for o, t in T5_ATTENTION]
    ff = "layer.2" if cross else "layer.1"
    dense = f"{ff}.DenseReluDense"
    rows += [("ffn_norm", f"{ff}.layer_norm"), ("ffn_down", f"{dense}.wo")]
    rows += [("ffn_gate", f"{dense}.wi_0"), ("ffn_up", f"{dense}.wi_1")] if gated else [("ffn_up", f"{dense}.wi")]
    layers = [(f"{ours}.blk.{i}.", f"{theirs}.block.{i}.") for i in range(n_layers)]
    return [(f"{o_layer}{o}.weight", f"{t_layer}{t}.weight", False) for o_layer, t_layer in layers for o, t in rows]


def _t5_names(hf: dict[str, Any]) -> Names:
    """T5's tensors: the position bias tables in layer 0 of each stack, a final norm on each."""
    bias = "relative_attention_bias.weight"
    gated = hf["feed_forward_proj"].startswith("gated-")
    return [
        ("token_embd.weight", "shared.weight", False),
        ("output.weight", "lm_head.weight", False),
        ("enc.output_norm.weight", "encoder.final_layer_norm.weight", False),
        ("dec.output_norm.weight", "decoder.final_layer_norm.weight", False),
        ("enc.blk.0.attn_rel_b.weight", f"encoder.block.0.layer.0.SelfAttention.{bias}", False),
        ("dec.blk.0.attn_rel_b.weight", f"decoder.block.0.layer.0.SelfAttention.{bias}", False),
        ("dec.blk.0.cross_attn_rel_b.weight", f"decoder.block.0.layer.1.EncDecAttention.{bias}", False),  # unused
        *_t5_stack("enc", "encoder", hf["num_layers"], cross=False, gated=gated),
        *_t5_stack("dec", "decoder", hf.get("num_decoder_layers") or hf["num_layers"], cross=True, gated=gated),
    ]


def _t5_feed_forward(stored: set[str]) -> dict[str, Any]:
    """llama.cpp runs a T5 MLP with ffn_gate as gated GELU (tanh), one without as ReLU."""
    return {"feed_forward_proj": "gated-gelu" if "enc.blk.0.ffn_gate.weight" in stored else "relu"}


def _t5_fits(cfg: Config) -> str | None:
    """The MLPs llama.cpp's t5 runs."""
    if cfg.act not in ("relu", "geglu"):
        return f"act={cfg.act!r}: llama.cpp runs a T5 MLP as ReLU or as gated GELU (geglu) only"
    return None


GEMMA = {"hidden_activation": "gelu_pytorch_tanh"}
GEMMA2_SETTINGS = {
    **LLAMA_SETTINGS,
    "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}
ARCHITECTURES = {
    "llama": Architecture(
        "llama",
        LLAMA_SETTINGS,
        LLAMA_NAMES + MIXTRAL_NAMES,
        {"hidden_act": "silu"},
        permuted_qk=True,
        extra=_llama_experts,
    ),
    # llama.cpp's qwen2moe never renormalises the top-k weights and always has Q/K/V biases
    "qwen2moe": Architecture(
        "qwen2_moe",
        QWEN2MOE_SETTINGS,
        LLAMA_NAMES + QWEN2MOE_NAMES,
        {"hidden_act": "silu", "norm_topk_prob": False, "qkv_bias": True},
    ),
    "qwen2": Architecture("qwen2", LLAMA_SETTINGS, LLAMA_NAMES, {"hidden_act": "silu"}),
    "qwen3": Architecture("qwen3", LLAMA_SETTINGS, QWEN3_NAMES, {"hidden_act": "silu"}),
    # llama.cpp's qwen3moe always renormalises the top-k weights (qwen3moe.cpp's build_moe_ffn)
    "qwen3moe": Architecture(
        "qwen3_moe",
        QWEN3MOE_SETTINGS,
        QWEN3_NAMES + _experts("model.layers.{i}.", moe.QWEN2_MOE),
        {"hidden_act": "silu", "norm_topk_prob": True},
    ),
    "phi3": Architecture(
        "phi3",
        {**LLAMA_SETTINGS, "attention.sliding_window": "sliding_window"},
        _rotary_layers(
            "model.layers.{i}.",
            [
                ("attn_norm", "input_layernorm"),
                ("attn_qkv", "self_attn.qkv_proj"),
                ("attn_output", "self_attn.o_proj"),
                ("ffn_norm", "post_attention_layernorm"),
                ("ffn_up", "mlp.gate_up_proj"),
                ("ffn_down", "mlp.down_proj"),
            ],
        ),
        {"hidden_act": "silu"},
        extra=_partial_rotary,
        rope_factors=True,
    ),
    "gemma": Architecture("gemma", LLAMA_SETTINGS, LLAMA_NAMES, GEMMA, norm_shift=1.0),
    "gemma2": Architecture(
        "gemma2",
        GEMMA2_SETTINGS,
        _rotary_layers("model.layers.{i}.", SANDWICH_ROWS),
        GEMMA,
        extra=_gemma_scale,
        norm_shift=1.0,
        writable=_gemma_fits,
    ),
    "gemma3": Architecture(
        "gemma3_text",
        GEMMA2_SETTINGS,
        _rotary_layers(
            "model.layers.{i}.",
            SANDWICH_ROWS + QK_NORM_ROWS,
        ),
        GEMMA,
        extra=_gemma_scale,
        norm_shift=1.0,
        writable=_gemma_fits,
    ),
    "olmo2": Architecture(
        "olmo2",
        LLAMA_SETTINGS,
        _rotary_layers(
            "model.layers.{i}.",
            [row for row in LLAMA_ROWS if row[0] not in ("attn_norm", "ffn_norm")] + POST_NORM_ROWS + QK_NORM_ROWS,
        ),
        {"hidden_act": "silu"},
    ),
    # llama.cpp applies no output scale (original T5's d_model**-0.5 is folded into output.weight on
    # writing) and fixes the buckets' max distance at 128
    "t5": Architecture(
        "t5",
        T5_SETTINGS,
        _t5_names,
        {"scale_decoder_outputs": False, "relative_attention_max_distance": 128},
        writable=_t5_fits,
        stored=_t5_feed_forward,
    ),
    "gpt2": Architecture("gpt2", GPT2_SETTINGS, GPT2_NAMES, {"activation_function": "gelu_new"}),
    # a file has no activation key: GPT-J's own gelu_new is the one every gptj file means
    "gptj": Architecture("gptj", GPT2_SETTINGS, GPTJ_NAMES, {"activation_function": "gelu_new"}, extra=_gptj_rotary),
    "gptneox": Architecture(
        "gpt_neox",
        {
            "context_length": "max_position_embeddings",
            "embedding_length": "hidden_size",
            "feed_forward_length": "intermediate_size",
            "block_count": "num_hidden_layers",
            "attention.head_count": "num_attention_heads",
            "attention.layer_norm_epsilon": "layer_norm_eps",
            "rope.freq_base": "rotary_emb_base",
            "use_parallel_residual": "use_parallel_residual",
            "vocab_size": "vocab_size",
        },
        NEOX_NAMES,
        {"hidden_act": "gelu"},
        extra=_neox_rotary,
    ),
}
# The GGUF architecture each Hugging Face family is written as (Mistral is "llama" in llama.cpp).
WRITTEN_AS = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "olmo2": "olmo2",
    "gpt2": "gpt2",
    "gptj": "gptj",
    "gpt_neox": "gptneox",
    "t5": "t5",
}


def permute_qk(w: Tensor, n_heads: int, inverse: bool = False) -> Tensor:
    """llama.cpp's Q/K row order: each head's rotate-half pairs (i, i + d/2) interleaved as (2i, 2i+1).
    `inverse=True` undoes it. Rows are `(n_heads * d_head, ...)`."""
    half = w.shape[0] // n_heads // 2
    split = (n_heads, half, 2) if inverse else (n_heads, 2, half)  # (heads, pairs, 2) or (heads, halves, d_head/2)
    return w.reshape(*split, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


GGUF_MAGIC = b"GGUF"


def magic(path: Path) -> bytes:
    """The first bytes of a file, as many as the GGUF magic has."""
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC))


class Reader(gguf.GGUFReader):
    """The `gguf` package's reader, parsing a plain ndarray view of its memory map: the same bytes,
    without `numpy.memmap`'s cost on each of the ~250,000 small slices that a 49k-token vocabulary
    takes to read (SmolLM2: 3.5 s -> 1.4 s). Should gguf rename `_get`, this is the plain reader."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        if type(self.data) is not np.ndarray:
            self._mapping = getattr(self.data, "_mmap", None)  # numpy's mmap.mmap object, to drop pages from
            self.data = self.data.view(np.ndarray)
        return super()._get(offset, dtype, count, override_order)

    def drop_pages(self, tensor: gguf.ReaderTensor) -> None:
        """Hand a tensor's pages of the file back to the kernel once it is dequantized: the mapped
        file then never sits in memory whole beside the float32 weights (98 MB for SmolLM2)."""
        if getattr(self, "_mapping", None) is None:
            return
        start = int(tensor.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        self._mapping.madvise(mmap.MADV_DONTNEED, start, int(tensor.data_offset) + int(tensor.n_bytes) - start)


def open_reader(path: str | Path) -> gguf.GGUFReader:
    """The file opened by the `gguf` package; any way it is not a readable GGUF is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file (from_gguf reads a local .gguf file)")
    start = magic(path)
    if start != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file: it starts with {start!r}, not {GGUF_MAGIC!r}")
    try:
        return Reader(path)
    except Exception as err:  # the reader raises ValueError, IndexError, struct.error … on damaged files
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or damaged?): {err}") from None


def hf_settings(meta: Mapping[str, Any], arch: Architecture, name: str, stored: set[str]) -> dict[str, Any]:
    """The Hugging Face config the file's metadata describes."""
    prefix = meta["general.architecture"] + "."
    hf = {"model_type": arch.model_type, **arch.defaults}
    hf |= {theirs: meta[prefix + key] for key, theirs in arch.settings.items() if prefix + key in meta}
    scaling = rope_scaling(meta, prefix, name)
    if scaling is not None:
        hf["rope_scaling"] = scaling
    if "vocab_size" not in hf:  # older files: the vocabulary's length
        if "tokenizer.ggml.tokens" not in meta:
            raise CheckpointError(f"{name}: neither {prefix}vocab_size nor tokenizer.ggml.tokens gives the vocabulary")
        hf["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    hf["tie_word_embeddings"] = "output.weight" not in stored
    hf["attention_bias"] = "blk.0.attn_output.bias" in stored
    if arch.stored is not None:
        hf |= arch.stored(stored)
    if arch.extra is not None:
        hf |= arch.extra(meta, hf)
    return hf


def tensor_names(arch: Architecture, hf: dict[str, Any]) -> Names:
    """The table's rows for every layer of a model with Hugging Face config `hf`."""
    if callable(arch.names):
        return arch.names(hf)
    layers = int(hf.get("num_hidden_layers", hf.get("n_layer", 0)))
    return [
        (ours.format(i=i), theirs.format(i=i, e="{e}"), transposed)
        for ours, theirs, transposed in arch.names
        for i in (range(layers) if "{i}" in ours else [None])
    ]


def dequantized(tensor: gguf.ReaderTensor, dtype: torch.dtype, name: str) -> Tensor:
    """One tensor as a torch tensor of `dtype`, in the row-major (rows, cols) order of its data."""
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(
            f"{name}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize"
        ) from None
    expected = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    if values.size != int(np.prod(expected)):
        raise CheckpointError(f"{name}: tensor {tensor.name} holds {values.size} values, its shape says {expected}")
    # a float32 tensor is a view of the read-only memory map: copied then, never written through
    values = np.require(values.reshape(expected), dtype=np.float32, requirements=["C", "W"])
    return torch.from_numpy(values).to(dtype)


def read_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[Config, dict[str, Tensor], TextTokenizer, dict[str, gguf.GGMLQuantizationType]]:
    """(Config, state dict, tokenizer, block types) of a GGUF file: metadata -> config, dequantized
    tensors -> weights (the Q/K permutation undone), tokenizer and chat template from the metadata,
    and each weight matrix's block type under its file name (what `weights="keep"` keeps)."""
    name = str(path)
    reader = open_reader(path)
    kinds = {t.name: t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    meta = read_metadata(reader)
    architecture = meta.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{name}: architecture {architecture!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    arch = ARCHITECTURES[architecture]
    tokenizer = tokenizer_from_gguf(meta)  # before the tensors: a file without a vocabulary fails fast
    tensors, hf = hf_tensors(reader, arch, meta, dtype, name)
    del reader, meta  # the parsed fields and the mapped file are not held while the weights are converted
    cfg, state = convert(hf, tensors, name)
    cfg.extra["gguf_architecture"] = architecture
    return cfg, state, tokenizer, kinds


def hf_tensors(
    reader: Reader, arch: Architecture, meta: Mapping[str, Any], dtype: torch.dtype, name: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The file's tensors, dequantized and under their Hugging Face names (the Q/K permutation
    undone, GPT-2's matrices transposed), and the Hugging Face config they fit."""
    stored = {t.name: t for t in reader.tensors}
    try:
        hf = hf_settings(meta, arch, name, set(stored))
    except KeyError as err:
        raise CheckpointError(f"{name}: its metadata lacks {err.args[0]!r}") from None
    # Llama 3's and Phi-3's scaling, as llama.cpp stores it: popped here, so counted as used
    rope = {t: dequantized(stored.pop(t), torch.float64, name) for t in ROPE_TENSORS if t in stored}  # (rotary_dim/2,)
    if rope:  # only in rotary families, whose context is max_position_embeddings
        if "rope_scaling" in hf:
            kind = hf["rope_scaling"]["rope_type"]
            raise CheckpointError(f"{name}: both {', '.join(rope)} and rope.scaling.type {kind!r}")
        prefix = meta["general.architecture"] + "."
        hf["rope_scaling"] = tensor_scaling(rope, meta, prefix, hf["max_position_embeddings"], name)
    to_hf = {ours: (theirs, transposed) for ours, theirs, transposed in tensor_names(arch, hf)}
    unknown = sorted(set(stored) - set(to_hf))
    if unknown:
        architecture = meta["general.architecture"]
        raise CheckpointError(f"{name}: tensors the {architecture} table does not know: {', '.join(unknown[:8])}")
    tensors = {}
    for gguf_name, tensor in stored.items():
        theirs, transposed = to_hf[gguf_name]
        t = dequantized(tensor, dtype, name)
        reader.drop_pages(tensor)
        if arch.permuted_qk and gguf_name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            heads = hf["num_attention_heads"] if ".attn_q." in gguf_name else hf["num_key_value_heads"]
            t = permute_qk(t, heads, inverse=True)
        if arch.norm_shift and gguf_name.endswith("norm.weight"):
            t = t - arch.norm_shift
        if "{e}" in theirs:  # (n_experts, …): one tensor per expert, each its own copy
            tensors |= {theirs.format(e=e): expert.clone() for e, expert in enumerate(t)}
        else:
            tensors[theirs] = t.T.contiguous() if transposed else t
    return tensors, hf


def _quantized(values: np.ndarray, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A weight matrix in the requested storage; vectors, and rows llama.cpp cannot block, stay f32."""
    if values.ndim == 1 or kind == "f32":
        return values.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind == "f16":
        return values.astype(np.float16), gguf.GGMLQuantizationType.F16
    q8 = gguf.GGMLQuantizationType.Q8_0
    if values.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0]:  # rows not made of whole 32-value blocks
        return values.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(values.astype(np.float32), q8), q8


DTYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


def write_gguf(
    cfg: Config, state: dict[str, Tensor], tokenizer: TextTokenizer | None, path: str | Path, dtype: str = "f32"
) -> Path:
    """Write a decoder (or a T5 encoder-decoder) and its tokenizer as a GGUF file (atomically), in the
    first architecture that can hold it; `dtype` "f32", "f16" or "q8_0" for the weight matrices (norms stay f32)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(map(repr, DTYPES))}")
    if tokenizer is None:
        raise CheckpointError(
            "this model has no tokenizer, and a GGUF file without a vocabulary does not run in llama.cpp or "
            "Ollama: set model.tokenizer (a glassformer.tokenizer.TextTokenizer) first"
        )
    vocabulary = tokenizer_metadata(tokenizer)  # before anything is written: it raises on a vocabulary GGUF lacks
    state = {k: v.detach().float().cpu() for k, v in state.items()}
    hf, tensors = export(cfg, state)
    if cfg.unembed_scale != 1.0:  # llama.cpp scales no output: the scale goes into a head of the file's own
        tensors["lm_head.weight"] = state["embed.W_E" if cfg.tie_embeddings else "unembed.weight"] * cfg.unembed_scale
    if hf["model_type"] not in WRITTEN_AS:
        raise CheckpointError(f"a {hf['model_type']} model has no GGUF table here ({', '.join(WRITTEN_AS)} do)")
    architecture = WRITTEN_AS[hf["model_type"]]
    arch = ARCHITECTURES[architecture]
    rope_meta, rope_tensors = gguf_rope_scaling(cfg, arch.rope_factors)  # before writing: it raises on what GGUF lacks
    misfit = arch.writable(cfg) if arch.writable is not None else None
    if misfit is None and cfg.sliding_window is not None and "attention.sliding_window" not in arch.settings:
        misfit = "its sliding window, which llama.cpp does not apply to this architecture"
    implied = [f"{k}={hf[k]!r} (it implies {v!r})" for k, v in arch.defaults.items() if hf.get(k, v) != v]
    if misfit is None and implied:
        misfit = ", ".join(implied)
    if misfit is not None:
        raise CheckpointError(f"cannot be written as GGUF {architecture}: {misfit}")
    named = gguf_tensors(arch, hf, tensors, architecture)
    path = Path(path)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, architecture)
        writer.add_name(cfg.extra.get("name", "glassformer model"))
        writer.add_file_type(FILE_TYPES[dtype])
        for key, theirs in arch.settings.items():
            if hf.get(theirs) is not None:
                writer.add_key_value(f"{architecture}.{key}", hf[theirs], _value_type(hf[theirs]))
        if cfg.positional == "rotary":
            writer.add_rope_dimension_count(cfg.rotary_dim)
        if "attention.key_length" in arch.settings:
            writer.add_value_length(cfg.d_head)
        for key, value in rope_meta.items():
            _add(writer, f"{architecture}.{key}", value)
        for key, value in vocabulary.items():
            _add(writer, key, value)
        for ours, t in named.items():
            if arch.permuted_qk and ours.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
                t = permute_qk(t, cfg.n_heads if ".attn_q." in ours else cfg.n_kv_heads)
            if arch.norm_shift and ours.endswith("norm.weight"):
                t = t + arch.norm_shift
            data, kind = _quantized(t.contiguous().numpy(), dtype)
            writer.add_tensor(ours, data, raw_dtype=kind)
        for ours, values in rope_tensors.items():
            writer.add_tensor(ours, values, raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return path


def gguf_tensors(
    arch: Architecture, hf: dict[str, Any], tensors: dict[str, Tensor], architecture: str
) -> dict[str, Tensor]:
    """Hugging Face tensors under llama.cpp's names, in their order: transposed where the table says,
    each projection's experts stacked into one (n_experts, …) tensor, a one-row matrix as a vector.
    A tensor the table has no name for is a CheckpointError (nothing is written)."""
    n_experts = hf.get(arch.settings.get("expert_count", ""), 0)
    rows = {}
    for ours, theirs, transposed in tensor_names(arch, hf):
        if "{e}" in theirs:
            rows |= {theirs.format(e=e): (ours, transposed, e) for e in range(n_experts)}
        else:
            rows[theirs] = (ours, transposed, None)
    homeless = sorted(set(tensors) - set(rows))
    if homeless:
        raise CheckpointError(
            f"cannot be written as GGUF {architecture}: tensors its table has no name for: {', '.join(homeless[:4])}"
        )
    out: dict[str, Tensor] = {}
    stacks: dict[str, dict[int, Tensor]] = {}
    for theirs, t in tensors.items():
        ours, transposed, e = rows[theirs]
        t = t.T if transposed else t
        if e is None:
            out[ours] = t[0] if t.dim() == 2 and t.shape[0] == 1 else t  # Qwen2-MoE's shared expert gate
            continue
        stacks.setdefault(ours, {})[e] = t
        if len(stacks[ours]) == n_experts:
            experts = stacks.pop(ours)
            out[ours] = torch.stack([experts[i] for i in range(n_experts)])  # (n_experts, rows, cols)
    return out


def _value_type(value: Any) -> gguf.GGUFValueType:
    """The GGUF type of a metadata value (llama.cpp's conventions: u32 sizes, f32 reals)."""
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    raise TypeError(f"no GGUF type for {type(value).__name__}")


def _add(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    """One metadata entry, arrays included."""
    if isinstance(value, list | tuple):
        writer.add_array(key, list(value))
    else:
        writer.add_key_value(key, value, _value_type(value))
