"""The KV cache: keys and values of every attention layer, preallocated once per generation.

Each layer's keys and values live in `(batch, n_kv_heads, max_len, d_head)` tensors written by
index (gpt-fast's static-shape design): a decoding step writes its new keys at `slots` and attends
over the slots written so far; under torch.compile over all `max_len` slots, masked to those filled
with real tokens, so that every step has the same shapes. Grouped-query heads are cached once per
key/value head.
Cross-attention keys and values (from the encoder output) are computed at the first step and kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class LayerKV:
    """One attention layer's slice of the cache."""

    def __init__(self, cache: KVCache, k: Tensor, v: Tensor) -> None:
        self.cache, self.k, self.v = cache, k, v  # k, v: (batch, n_kv_heads, max_len, d_head)
        self.filled = False  # cross-attention: whether the encoder's keys are in

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values `(batch, pos, n_kv_heads, d_head)` at the step's slots; return the
        visible slots, `(batch, n_kv_heads, cache.visible(), d_head)`."""
        self.k.index_copy_(2, self.cache.slots, k.transpose(1, 2).to(self.k.dtype))
        self.v.index_copy_(2, self.cache.slots, v.transpose(1, 2).to(self.v.dtype))
        n = self.cache.visible()
        return self.k[:, :, :n], self.v[:, :, :n]

    def store(self, k: Tensor, v: Tensor) -> None:
        """Cross-attention: keep the encoder's keys/values `(batch, src_pos, n_kv_heads, d_head)`."""
        self.k.copy_(k.transpose(1, 2))
        self.v.copy_(v.transpose(1, 2))
        self.filled = True


class KVCache:
    """Preallocated keys and values for `n_layers` attention layers (plus cross-attention ones).

    `slots` are the cache positions the current step writes; `key_valid (batch, max_len)` marks
    slots holding a real (not padding, already written) token.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        d_head: int,
        src_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """`n_kv_heads` is what this process holds: all of them, or its share under tensor parallelism."""
        shape = (n_layers, batch, n_kv_heads, max_len, d_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (layers, batch, n_kv_heads, max_len, d_head)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.layers = [LayerKV(self, self.k[i], self.v[i]) for i in range(n_layers)]
        self.cross: list[LayerKV | None] = [None] * n_layers
        if src_len is not None:
            cross_shape = (n_layers, batch, n_kv_heads, src_len, d_head)
            self.cross_k = torch.zeros(cross_shape, dtype=dtype, device=device)
            self.cross_v = torch.zeros(cross_shape, dtype=dtype, device=device)
            self.cross = [LayerKV(self, self.cross_k[i], self.cross_v[i]) for i in range(n_layers)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.slots = torch.zeros(0, dtype=torch.long, device=device)
        self.length = 0  # slots written so far

    def advance(self, valid: Tensor) -> None:
        """Start a step of `valid.shape[1]` tokens; `valid (batch, pos)` marks the real ones."""
        n = valid.shape[1]
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} used, {n} more requested")
        self.slots = torch.arange(self.length, self.length + n, device=self.key_valid.device)
        self.key_valid[:, self.length : self.length + n] = valid
        self.length += n

    def visible(self) -> int:
        """Slots a step attends over: those written so far (reading the unwritten ones would cost
        memory traffic for nothing), or all of them in a compiled step, which keeps one shape."""
        return self.max_len if torch.compiler.is_compiling() else self.length

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (a conversation rolled back to a shared prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} positions to {length}")
        self.key_valid[:, length:] = False
        self.length = length

    def reserve(self, max_len: int) -> None:
        """Hold at least `max_len` positions, keeping what is written: a conversation's cache grows
        by reallocation, since a decoding step attends over every slot."""
        if max_len <= self.max_len:
            return
        more = max_len - self.max_len
        self.k, self.v = (F.pad(t, (0, 0, 0, more)) for t in (self.k, self.v))  # zeros after the max_len axis
        self.layers = [LayerKV(self, self.k[i], self.v[i]) for i in range(len(self.layers))]
        self.key_valid = F.pad(self.key_valid, (0, more))  # (batch, max_len): the new slots hold nothing
        self.max_len = max_len

    def numel(self) -> int:
        """Elements held for self-attention: 2 · layers · batch · max_len · n_kv_heads · d_head."""
        return self.k.numel() + self.v.numel()
