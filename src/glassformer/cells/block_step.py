"""A decoder block's one-token step in one C call (csrc/decode_block.c), taken when nothing watches.

Decoding a token runs about sixty small PyTorch operations per block around its five weight
products; on a model of SmolLM2's size they cost as much as the products (bench/RESULTS.md, issue
14). So when a block has a common shape (pre-norm RMSNorm or LayerNorm; self-attention with rotary
positions or none of its own, grouped-query heads or not; a SwiGLU, GeGLU or plain GELU/ReLU/SiLU
MLP; biases or not: Llama, SmolLM2, Qwen2, Mistral, GPT-2 ...), autograd is off and none of its
hooks is active,
`Block.forward` hands the step to C, which does the same arithmetic as the cells with the low-bit
products of quant_gemv.c (float32 weights too). Any hook on the block, a longer input, another
device or dtype, or a missing C compiler leaves the cells to run it: seeing inside never changes
the numbers beyond float rounding (tested against the cells).
"""

from __future__ import annotations

import ctypes
from ctypes import c_float, c_int, c_void_p
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules import module as _module_hooks

from glassformer.cells.mlp import MLP
from glassformer.cells.norm import Norm
from glassformer.kv_cache import LayerKV
from glassformer.quantized import QuantizedWeight, _kernel

# Set to False to run every block in its cells (e.g. to compare the two).
enabled: bool = True


class _Weight(ctypes.Structure):
    """csrc/decode_block.c's `gf_weight`."""

    _fields_ = [
        ("bits", c_int),
        ("group", c_int),
        ("n", c_int),
        ("k", c_int),
        ("q", c_void_p),
        ("scale", c_void_p),
        ("min", c_void_p),
        ("bias", c_void_p),
    ]


_SIZES = (
    "batch",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "d_head",
    "d_mlp",
    "rotary_dim",
    "interleaved",
    "window",
    "slot",
    "n_keys",
    "max_len",
    "threads",
    "layer_norm",
    "act",
    "gated",
)
# csrc/decode_block.c's activations, by Config.act
C_ACTS = {"swiglu": 0, "silu": 0, "gelu": 1, "geglu": 2, "gelu_new": 2, "relu": 3}


class _Step(ctypes.Structure):
    """csrc/decode_block.c's `gf_step`."""

    _fields_ = [
        *((name, c_int) for name in _SIZES),
        ("eps", c_float),
        ("scale", c_float),
        ("ln1", c_void_p),
        ("ln2", c_void_p),
        ("ln1_b", c_void_p),
        ("ln2_b", c_void_p),
        *((name, _Weight) for name in ("qkv", "o", "gate", "up", "down")),
        ("cos", c_void_p),
        ("sin", c_void_p),
        ("k_cache", c_void_p),
        ("v_cache", c_void_p),
        ("key_valid", c_void_p),
    ]


def fits(block: Any) -> bool:
    """Whether `block`'s shape is one the C step computes (checked once, when it is built): a pre-norm
    decoder block (RMSNorm or LayerNorm), causal self-attention with rotary or no positions of its
    own, and a dense MLP."""
    attn, mlp = block.attn, block.mlp
    norms = (block.ln1, getattr(block, "ln2", None))
    return (
        not block.post_norm
        and not block.parallel
        and block.cross_attn is None
        and block.ln1_post is None
        and isinstance(mlp, MLP)
        and mlp.act_name in C_ACTS
        and block.ln2_post is None
        and all(isinstance(n, Norm) and n.centre == norms[0].centre and n.eps == norms[0].eps for n in norms)
        and attn.causal
        and attn.q_norm is None
        and attn.softcap is None
        and (attn.rotary is None or attn.rotary.rotary_dim % 2 == 0)
    )


def _weight(w: Tensor, bias: Tensor | None) -> _Weight | None:
    """A product's `gf_weight`, or None when C cannot read it."""
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous() and bias.device.type == "cpu"):
        return None
    bias_ptr = None if bias is None else bias.data_ptr()
    if isinstance(w, QuantizedWeight):
        return _Weight(w.bits, w.group, w.shape[0], w.padded, *w._parts, bias_ptr)
    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() or w.shape[1] % 32:
        return None
    return _Weight(32, w.shape[1], w.shape[0], w.shape[1], w.data_ptr(), None, None, bias_ptr)


# The tensors a step reads, by (module, parameter name) under the block; None where the block has none.
_SOURCES = (
    ("attn", "qkv_weight"),
    ("attn", "qkv_bias"),
    ("attn", "o_weight"),
    ("attn", "b_O"),
    ("mlp", "gate_weight"),
    ("mlp", "in_weight"),
    ("mlp", "b_in"),
    ("mlp", "out_weight"),
    ("mlp", "b_out"),
    ("ln1", "w"),
    ("ln2", "w"),
    ("ln1", "b"),
    ("ln2", "b"),
)


def _signature(block: Any) -> tuple:
    """What the prepared step depends on: each tensor's identity and where its values live (a
    requantized weight has new codes; a replaced one is another object)."""
    tensors = (block._modules[module]._parameters.get(name) for module, name in _SOURCES)
    return tuple(
        None if t is None else (id(t), t._parts if isinstance(t, QuantizedWeight) else t.data_ptr()) for t in tensors
    )


def _vector(t: Tensor | None) -> int | None:
    """A norm's weight or bias as C reads it (its address), or 0 when C cannot read it."""
    if t is None:
        return None
    return t.data_ptr() if t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" else 0


def _build(block: Any) -> _Step | None:
    """The block's `gf_step` with its sizes and weights filled in; None when C cannot read a weight."""
    attn, mlp, ln1, ln2, rotary = block.attn, block.mlp, block.ln1, block.ln2, block.attn.rotary
    gated = mlp.gate_weight is not None
    weights = [
        _weight(attn.qkv_weight, attn.qkv_bias),
        _weight(attn.o_weight, attn.b_O),
        _weight(mlp.gate_weight, None) if gated else _Weight(),
        _weight(mlp.in_weight, mlp.b_in),
        _weight(mlp.out_weight, mlp.b_out),
    ]
    norms = [_vector(t) for t in (ln1.w, ln2.w, ln1.b, ln2.b)]
    if None in weights or 0 in norms:
        return None
    step = _Step(
        d_model=ln1.w.shape[0],
        n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads,
        d_head=attn.d_head,
        d_mlp=mlp.d_mlp,
        rotary_dim=0 if rotary is None else rotary.rotary_dim,
        interleaved=0 if rotary is None else int(rotary.interleaved),
        window=attn.window or 0,
        layer_norm=int(ln1.centre),
        act=C_ACTS[mlp.act_name],
        gated=int(gated),
        eps=ln1.eps,
        scale=attn.scale,
    )
    step.ln1, step.ln2, step.ln1_b, step.ln2_b = norms
    step.qkv, step.o, step.gate, step.up, step.down = weights
    return step


def _prepared(block: Any) -> _Step | None:
    """`_build(block)`, kept on the block and built again only when its signature changes."""
    signature = _signature(block)
    if block.c_step_prepared is None or block.c_step_prepared[0] != signature:
        block.c_step_prepared = (signature, _build(block))
    return block.c_step_prepared[1]


def _watched(block: Any) -> bool:
    """Whether anything would see inside the block: one of its hook points, or a PyTorch module hook
    (`register_forward_hook` and the like, on the block, a cell in it, or every module)."""
    return (
        any(h.active for h in block.hook_points)
        or any(m._forward_hooks or m._forward_pre_hooks for m in block.c_step_modules)
        or bool(_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks)
    )


def run(block: Any, resid: Tensor, positions: Tensor, cache: LayerKV) -> Tensor | None:
    """The block's output for `resid (batch, 1, d_model)`, its keys and values written into `cache`;
    None when the step must run in the cells (a hook is active, autograd, another dtype or device,
    a weight C cannot read, or no compiled kernel)."""
    attn, mlp = block._modules["attn"], block._modules["mlp"]
    if (
        not enabled
        or torch.is_grad_enabled()
        or block.training
        or torch.compiler.is_compiling()
        or resid.dtype != torch.float32
        or resid.device.type != "cpu"
        or attn.tp is not None
        or mlp.tp is not None
        or cache.k.dtype != torch.float32
        or not cache.k.is_contiguous()
        or _watched(block)
    ):
        return None
    kernel = _kernel()
    prepared = None if kernel is None else _prepared(block)
    if prepared is None:
        return None
    step = _Step.from_buffer_copy(prepared)  # this call's own copy: threads may decode one model at once
    x = resid.contiguous()
    rotary = attn._modules.get("rotary")
    if rotary is not None:
        cos, sin = rotary.step_angles(x, positions)  # (batch, 1, 1, rotary_dim) each
        step.cos, step.sin = cos.data_ptr(), sin.data_ptr()
    kv = cache.cache
    step.batch, step.slot, step.n_keys, step.max_len = x.shape[0], kv.length - 1, kv.visible(), kv.max_len
    step.threads = torch.get_num_threads()
    step.k_cache, step.v_cache, step.key_valid = cache.k.data_ptr(), cache.v.data_ptr(), kv.key_valid.data_ptr()
    out = torch.empty_like(x)  # (batch, 1, d_model)
    if kernel.gf_decode_block(ctypes.byref(step), x.data_ptr(), out.data_ptr()) != 0:
        return None  # no memory for the scratch: the cells run it (and report the shortage)
    return out
