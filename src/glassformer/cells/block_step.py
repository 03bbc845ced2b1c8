"""A decoder block's one-token step in one C call (csrc/decode_block.c), taken when nothing watches.

Decoding a token runs about sixty small PyTorch operations per block around its five weight
products; on a model of SmolLM2's size they cost as much as the products (bench/RESULTS.md, issue
14). So when a block has the common shape (pre-norm RMSNorm, rotary self-attention with or without
grouped-query heads, a SwiGLU MLP, biases or not), autograd is off and none of its hooks is active,
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
import torch.nn.functional as F
from torch import Tensor

from glassformer.cells.mlp import MLP
from glassformer.cells.norm import Norm
from glassformer.hooks import HookPoint
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
)


class _Step(ctypes.Structure):
    """csrc/decode_block.c's `gf_step`."""

    _fields_ = [
        *((name, c_int) for name in _SIZES),
        ("eps", c_float),
        ("scale", c_float),
        ("ln1", c_void_p),
        ("ln2", c_void_p),
        *((name, _Weight) for name in ("qkv", "o", "gate", "up", "down")),
        ("cos", c_void_p),
        ("sin", c_void_p),
        ("k_cache", c_void_p),
        ("v_cache", c_void_p),
        ("key_valid", c_void_p),
    ]


def fits(block: Any) -> bool:
    """Whether `block`'s shape is the one the C step computes (checked once, when it is built)."""
    attn, mlp = block.attn, block.mlp
    return (
        not block.post_norm
        and not block.parallel
        and block.cross_attn is None
        and block.ln1_post is None
        and isinstance(block.ln1, Norm)
        and not block.ln1.centre
        and isinstance(mlp, MLP)
        and mlp.gate_weight is not None
        and mlp.act is F.silu
        and isinstance(block.ln2, Norm)
        and not block.ln2.centre
        and block.ln2_post is None
        and block.ln1.eps == block.ln2.eps
        and attn.causal
        and attn.rotary is not None
        and attn.q_norm is None
        and attn.softcap is None
        and attn.rotary.rotary_dim % 2 == 0
    )


def _weight(w: Tensor, bias: Tensor | None) -> tuple | None:
    """`gf_weight`'s fields for a product's weight, or None when C cannot read it."""
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous() and bias.device.type == "cpu"):
        return None
    bias_ptr = None if bias is None else bias.data_ptr()
    if isinstance(w, QuantizedWeight):
        return (w.bits, w.group, w.shape[0], w.padded, *w._parts, bias_ptr)
    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() or w.shape[1] % 32:
        return None
    return (32, w.shape[1], w.shape[0], w.shape[1], w.data_ptr(), None, None, bias_ptr)


def _watched(hooks: list[HookPoint]) -> bool:
    return any(h._fwd or h._bwd for h in hooks)


def run(block: Any, resid: Tensor, positions: Tensor, cache: LayerKV) -> Tensor | None:
    """The block's output for `resid (batch, 1, d_model)`, its keys and values written into `cache`;
    None when the step must run in the cells (a hook is active, autograd, another dtype or device,
    a weight C cannot read, or no compiled kernel)."""
    attn, mlp = block.attn, block.mlp
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
        or _watched(block.hook_points)
    ):
        return None
    kernel = _kernel()
    weights = [
        _weight(attn.qkv_weight, attn.qkv_bias),
        _weight(attn.o_weight, attn.b_O),
        _weight(mlp.gate_weight, None),
        _weight(mlp.in_weight, mlp.b_in),
        _weight(mlp.out_weight, mlp.b_out),
    ]
    norms = (block.ln1.w, block.ln2.w)
    if kernel is None or None in weights or any(w.dtype != torch.float32 or not w.is_contiguous() for w in norms):
        return None
    batch, _, d_model = resid.shape
    x = resid.contiguous()
    cos, sin = attn.rotary.step_angles(x, positions)  # (batch, 1, 1, rotary_dim) each
    window = attn.window or 0
    kv = cache.cache
    step = _Step(
        batch,
        d_model,
        attn.n_heads,
        attn.n_kv_heads,
        attn.d_head,
        mlp.d_mlp,
        attn.rotary.rotary_dim,
        int(attn.rotary.interleaved),
        window,
        kv.length - 1,
        kv.visible(),
        kv.max_len,
        torch.get_num_threads(),
        block.ln1.eps,
        attn.scale,
        block.ln1.w.data_ptr(),
        block.ln2.w.data_ptr(),
        *(_Weight(*w) for w in weights),
        cos.data_ptr(),
        sin.data_ptr(),
        cache.k.data_ptr(),
        cache.v.data_ptr(),
        kv.key_valid.data_ptr(),
    )
    out = torch.empty_like(x)  # (batch, 1, d_model)
    if kernel.gf_decode_block(ctypes.byref(step), x.data_ptr(), out.data_ptr()) != 0:
        return None  # no memory for the scratch: the cells run it (and report the shortage)
    return out
