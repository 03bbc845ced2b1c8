"""`QuantizedWeight`: a weight matrix kept in memory as bfloat16, int8 or int4, that reads as floats.

Every product of the model goes through `glassformer.linear.linear`, which hands a quantized weight to
the kernel of csrc/quant_gemv.c: activations stay float32 and each group of weights is scaled once
(`W[n, k] = q[n, k] * scale[n, g] + min[n, g]`, g = k // group). Everything else that touches the
weight — `W_Q`, `FactoredMatrix`, `state_dict`, an embedding lookup, an in-place edit — sees (or
writes) its float values, so hooks, caches, patching and the trace work as on a float model.

Why a hand-written kernel: PyTorch's shipped weight-only CPU kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) took 4-7x the time of the float32 product on this machine's
decode shapes (bench/RESULTS.md, "Low-bit weights"). The C file is compiled once per machine with the
system compiler (under ~/.cache/glassformer); without a compiler the same products run in PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from glassformer.errors import InputError

BITS = {"bf16": 16, "int8": 8, "int4": 4}
BLOCK = 32  # columns per packed block; every group is a whole number of blocks
ROWS_FOR_GEMM = 32  # above this many rows a product dequantizes the matrix and runs a float GEMM


def _build(sources: dict[str, bytes], built: Path) -> bool:
    """Compile the C `sources` (name -> text) into one library at `built` (atomically); False, with a
    warning, when they cannot be."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("glassformer: no C compiler, so quantized products run in PyTorch (slower)", stacklevel=4)
        return False
    try:
        built.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=built.parent) as tmp:
            for name, text in sources.items():
                (Path(tmp) / name).write_bytes(text)
            done = subprocess.run(
                [compiler, *FLAGS, *(str(Path(tmp) / name) for name in sources), "-o", str(Path(tmp) / "k.so"), "-lm"],
                capture_output=True,
                timeout=300,
            )
            if done.returncode == 0:
                os.replace(Path(tmp) / "k.so", built)  # atomic: a concurrent process sees all of it or nothing
                return True
            reason = done.stderr[-300:].decode(errors="replace")
    except (OSError, subprocess.SubprocessError) as err:
        reason = str(err)
    warnings.warn(f"glassformer: the quantized-product kernel did not build ({reason}); quantized products "
                  "run in PyTorch (slower)", stacklevel=4)
    return False


def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use for this machine's CPU (under ~/.cache/glassformer,
    or GLASSFORMER_CACHE); None where it cannot be built or loaded (PyTorch runs the products)."""
    if platform.system() != "Linux":
        return None
    sources = {name: files("glassformer").joinpath("csrc", name).read_bytes() for name in SOURCES}
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags_line = next((line for line in cpu.splitlines() if line.startswith("flags")), "")
    key = hashlib.sha256(b"".join(sources.values()) + " ".join(FLAGS).encode() + flags_line.encode()).hexdigest()
    cache = Path(os.environ.get("GLASSFORMER_CACHE", Path.home() / ".cache" / "glassformer"))
    built = cache / f"kernels-{key[:16]}.so"
    if not built.exists() and not _build(sources, built):
        return None
    lib = ctypes.CDLL(str(built))
    ptr, i = ctypes.c_void_p, ctypes.c_int
    lib.gf_quant_matmul.argtypes = [i, ptr, i, i, ptr, ptr, ptr, i, i, ptr, ptr, i]
    lib.gf_quant_matmul.restype = None
    lib.gf_dequantize.argtypes = [i, ptr, ptr, ptr, i, i, i, ptr, i]
    lib.gf_dequantize.restype = None
    lib.gf_decode_block.argtypes = [ptr, ptr, ptr]
    lib.gf_decode_block.restype = i
    return lib


SOURCES = ("quant_gemv.c", "decode_block.c")  # in csrc/: the low-bit products, and the fused decode step
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
UNLOADED = object()
# The kernel library: loaded (built, the first time on a machine) by the first quantized product, so
# importing glassformer compiles nothing. None runs every product in PyTorch (tests set it so).
KERNEL: Any = UNLOADED


def _kernel() -> ctypes.CDLL | None:
    global KERNEL
    if KERNEL is UNLOADED:
        KERNEL = _library()
    return KERNEL


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class QuantizedWeight(torch.Tensor):
    """(out_features, in_features) weight stored as `bits`-bit codes with a float scale and min per
    group of `group` columns (bf16: the top half of each float32). Reads as float32 everywhere;
    `linear` runs the product on the codes. Not trainable: it never requires grad."""

    codes: Tensor  # (N, K_padded * bits / 8) uint8
    scale: Tensor  # (N, K_padded / group) float32
    min: Tensor  # (N, K_padded / group) float32
    bits: int
    group: int

    @staticmethod
    def __new__(cls, codes: Tensor, scale: Tensor, min: Tensor, bits: int, group: int, shape: torch.Size):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32, device=codes.device)

    def __init__(self, codes: Tensor, scale: Tensor, min: Tensor, bits: int, group: int, shape: torch.Size):
        self.bits = bits
        self._store_parts(codes, scale, min, group)

    def _store_parts(self, codes: Tensor, scale: Tensor, min: Tensor, group: int) -> None:
        self.codes, self.scale, self.min, self.group = codes, scale, min, group
        self.padded = codes.shape[1] * 8 // self.bits  # columns as stored: in_features rounded up to a group
        # what every product passes to the kernel, found once (decoding makes ~200 products a token)
        self._parts = (_ptr(codes), _ptr(scale), _ptr(min))

    @property
    def scheme(self) -> str:
        return {16: "bf16", 8: "int8", 4: "int4"}[self.bits]

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"QuantizedWeight({self.scheme}, group {self.group}, shape {tuple(self.shape)})"

    def __reduce_ex__(self, protocol: int) -> Any:
        return (QuantizedWeight, (self.codes, self.scale, self.min, self.bits, self.group, self.shape))

    def __deepcopy__(self, memo: dict) -> QuantizedWeight:
        return self._like(self.codes.clone(), self.scale.clone(), self.min.clone())

    def _like(self, codes: Tensor, scale: Tensor, min: Tensor) -> QuantizedWeight:
        return QuantizedWeight(codes, scale, min, self.bits, self.group, self.shape)

    def nbytes_stored(self) -> int:
        """Bytes held: codes, scales and mins."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.min))

    def dequantize(self) -> Tensor:
        """The float32 matrix (out_features, in_features)."""
        n, k = self.shape
        kernel = _kernel() if self.codes.device.type == "cpu" else None
        if kernel is not None:
            out = torch.empty(n, self.padded)  # (N, K_padded)
            kernel.gf_dequantize(self.bits, _ptr(self.codes), _ptr(self.scale), _ptr(self.min), n, self.padded,
                                 self.group, _ptr(out), torch.get_num_threads())
        else:
            out = self._dequantize_rows(self.codes, self.scale, self.min)
        return out[:, :k]

    def _dequantize_rows(self, codes: Tensor, scale: Tensor, min: Tensor) -> Tensor:
        """PyTorch's version of the kernel's decoding, for any subset of rows: (rows, K_padded)."""
        rows = codes.shape[0]
        if self.bits == 16:
            return (codes.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
        if self.bits == 8:
            values = codes.view(torch.int8).float()  # (rows, K_padded)
        else:
            blocks = codes.view(rows, -1, BLOCK // 2)  # (rows, blocks, 16)
            values = torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(rows, -1).float()  # (rows, K_padded)
        grouped = values.view(rows, -1, self.group)  # (rows, groups, group)
        return (grouped * scale[..., None] + min[..., None]).view(rows, -1)

    def rows(self, index: Tensor) -> Tensor:
        """Rows `index` (any shape) as floats: an embedding lookup that decodes only the rows it needs."""
        flat = index.reshape(-1)
        out = self._dequantize_rows(self.codes[flat], self.scale[flat], self.min[flat])[:, : self.shape[1]]
        return out.view(*index.shape, self.shape[1])

    def runs_on_codes(self, x: Tensor) -> bool:
        """Whether the kernel multiplies `x` (..., in_features) on the codes: on CPU, for at most
        ROWS_FOR_GEMM rows, where it was built. Otherwise a float GEMM on `dequantize()` is faster
        (a prefill) or the only way (another device, no C compiler)."""
        return x.device.type == "cpu" and x.numel() <= ROWS_FOR_GEMM * x.shape[-1] and _kernel() is not None

    def product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x (..., in_features) @ self.T + bias on the codes, where `runs_on_codes(x)`; (..., out_features)."""
        n, k = self.shape
        flat = x.reshape(-1, k)  # (rows, in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if self.padded != k:
            flat = F.pad(flat, (0, self.padded - k))
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
        out = torch.empty(flat.shape[0], n)  # (rows, out_features)
        codes, scale, min = self._parts
        _kernel().gf_quant_matmul(self.bits, flat.data_ptr(), flat.shape[0], self.padded, codes, scale, min, n,
                                  self.group, _ptr(bias), out.data_ptr(), torch.get_num_threads())
        return (out if x.dtype == torch.float32 else out.to(x.dtype)).view(*x.shape[:-1], n)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        aten = torch.ops.aten
        first = args[0] if args else None
        if func in (aten.detach.default, aten.alias.default):
            return first._like(first.codes, first.scale, first.min)
        if func is aten.clone.default:
            return first.__deepcopy__({})
        if func is aten.embedding.default and isinstance(first, QuantizedWeight):
            return first.rows(args[1])
        dense = tree_map(lambda t: t.dequantize() if isinstance(t, QuantizedWeight) else t, (args, kwargs))
        if func._schema.is_mutable and isinstance(first, QuantizedWeight):
            # An in-place edit (copy_, mul_, zero_ ...) runs on the floats and is stored back quantized.
            target = dense[0][0]
            func(*dense[0], **dense[1])
            first._store(quantize_weight(target, first.scheme, first.group))
            return first
        return func(*dense[0], **dense[1])

    def _store(self, other: QuantizedWeight) -> None:
        self._store_parts(other.codes, other.scale, other.min, other.group)

    def __setitem__(self, index: Any, value: Any) -> None:
        """`W[idx] = value` (an ablation's usual form): set on the floats, stored back quantized. A view
        reads floats but writes nowhere: `W[:, 0].zero_()` is lost, `W[:, 0] = 0` is kept."""
        with torch.no_grad():
            values = self.dequantize().clone()
            values[index] = value
            self._store(quantize_weight(values, self.scheme, self.group))


def _pad_columns(w: Tensor, multiple: int) -> Tensor:
    k = w.shape[1]
    return torch.cat([w, w[:, -1:].expand(-1, -k % multiple)], dim=1) if k % multiple else w


def quantize_weight(weight: Tensor, scheme: str, group_size: int | None = None) -> QuantizedWeight:
    """`weight` (out_features, in_features) as a `QuantizedWeight`.

    int8: symmetric, one scale per row (`group_size=None`) or per group; int4: a scale and a min per
    group (default 32, as llama.cpp's Q4_1); bf16: the top half of each float32, rounded."""
    if scheme not in BITS:
        raise InputError(f"unknown quantization scheme {scheme!r}; choose one of {sorted(BITS)}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"only a 2-D float weight matrix can be quantized, got {tuple(weight.shape)} {weight.dtype}")
    bits = BITS[scheme]
    w = weight.detach().float()
    n, k = w.shape
    if scheme == "int4" and group_size is None:
        group_size = 32
    if group_size is not None and (group_size <= 0 or group_size % BLOCK):
        raise InputError(f"group_size must be a positive multiple of {BLOCK}, got {group_size}")
    group = group_size or math.ceil(k / BLOCK) * BLOCK  # None: one group per row
    padded = _pad_columns(w, group)  # (N, K_padded); the padding repeats the last column, so a short
    # last group keeps its own range (its inputs are zero-padded: those columns never count)
    grouped = padded.view(n, -1, group)  # (N, groups, group)
    if bits == 16:
        codes = padded.to(torch.bfloat16).view(torch.uint8)  # (N, 2 K_padded)
        ones = torch.ones(n, grouped.shape[1])
        return QuantizedWeight(codes, ones, torch.zeros_like(ones), bits, group, weight.shape)
    if bits == 8:
        scale = grouped.abs().amax(-1) / 127  # (N, groups)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(grouped / scale[..., None]).clamp(-127, 127).to(torch.int8)  # (N, groups, group)
        return QuantizedWeight(q.view(n, -1).view(torch.uint8), scale, torch.zeros_like(scale), bits, group,
                               weight.shape)
    low, high = grouped.amin(-1), grouped.amax(-1)  # (N, groups)
    scale = (high - low) / 15
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)  # (N, groups, group)
    return QuantizedWeight(pack_int4(q.view(n, -1)), scale, low, bits, group, weight.shape)


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) codes 0..15, K a multiple of 32 -> (N, K/2) bytes: in each block of 32 columns, byte i
    holds column i (low nibble) and column i + 16 (high nibble)."""
    blocks = q.view(q.shape[0], -1, 2, BLOCK // 2)  # (N, blocks, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], -1)


def from_codes(q: Tensor, scale: Tensor, min: Tensor, bits: int, group: int, shape: tuple[int, int]) -> QuantizedWeight:
    """A `QuantizedWeight` from codes already in hand (a GGUF file's blocks): q (N, K_padded) as
    uint8 0..15 for int4 or int8 for int8, scale and min (N, K_padded / group)."""
    codes = pack_int4(q) if bits == 4 else q.view(torch.uint8)
    return QuantizedWeight(codes.contiguous(), scale.float().contiguous(), min.float().contiguous(), bits, group,
                           torch.Size(shape))


def dense(t: Tensor) -> Tensor:
    """`t` as a plain tensor (a `QuantizedWeight` dequantized), e.g. to write a checkpoint."""
    return t.dequantize() if isinstance(t, QuantizedWeight) else t
