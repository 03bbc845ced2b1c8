"""Which low-bit storage keeps each weight of a GGUF file (`from_gguf(path, weights="keep")`).

A block type becomes the kernel layout that holds its values: the 4-bit types (Q4_0, Q4_1, Q4_K, and
the 2-3 bit ones, which fit) become int4 with a scale and min per 32 columns, the 5-8 bit types (Q5_*,
Q6_K, Q8_0) int8 with a scale per 32 columns, F16/BF16/F32 stay float32. The weights are requantized from
the file's values: llama.cpp's Q4_1 and Q8_0 blocks always use their extreme codes, so those come back
with the file's own codes and scales (tested); the others on a grid at least as fine as the file's.
A matrix built from several file tensors (attention's fused QKV) takes the finest of their layouts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from gguf import GGMLQuantizationType as T

INT4 = {T.Q4_0, T.Q4_1, T.Q4_K, T.Q2_K, T.Q3_K}
INT8 = {T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0, T.Q8_1, T.Q8_K}
FINEST = {"int4": 0, "int8": 1, None: 2}  # None: float32

# GGUF tensor name -> our parameter (decoders; other tensors take the file's most common layout)
NAMES = [
    (re.compile(r"blk\.(\d+)\.attn_(q|k|v|qkv)\.weight"), "blocks.{}.attn.qkv_weight"),
    (re.compile(r"blk\.(\d+)\.attn_output\.weight"), "blocks.{}.attn.o_weight"),
    (re.compile(r"blk\.(\d+)\.ffn_up\.weight"), "blocks.{}.mlp.in_weight"),
    (re.compile(r"blk\.(\d+)\.ffn_gate\.weight"), "blocks.{}.mlp.gate_weight"),
    (re.compile(r"blk\.(\d+)\.ffn_down\.weight"), "blocks.{}.mlp.out_weight"),
    (re.compile(r"token_embd\.weight"), "embed.W_E"),
    (re.compile(r"output\.weight"), "unembed.weight"),
]


def scheme_of(kind: T) -> str | None:
    """The kernel layout for a GGUF block type; None keeps float32."""
    return "int4" if kind in INT4 else "int8" if kind in INT8 else None


def gguf_plan(stored: Mapping[str, T], names: Iterable[str]) -> dict[str, tuple[str, int]]:
    """`{our weight name: (scheme, group_size)}` for the product weights `names` of a model read from
    a GGUF file whose weight matrices have the block types `stored` (by file name: `read_gguf`'s
    fourth result); weights the file stores as float are left out (they stay float32)."""
    kinds: dict[str, list[str | None]] = {}
    counts: dict[str | None, int] = {}
    for file_name, kind in stored.items():
        scheme = scheme_of(kind)
        counts[scheme] = counts.get(scheme, 0) + 1
        for pattern, ours in NAMES:
            match = pattern.fullmatch(file_name)
            if match:
                kinds.setdefault(ours.format(*match.groups()[:1]), []).append(scheme)
    common = max(counts, key=counts.get) if counts else None
    if "unembed.weight" not in kinds and "embed.W_E" in kinds:  # tied: the head reads the embedding
        kinds["unembed.weight"] = kinds["embed.W_E"]
    plan = {}
    for name in names:
        scheme = max(kinds.get(name, [common]), key=lambda s: FINEST[s])
        if scheme is not None:
            plan[name] = (scheme, 32)
    return plan
