"""What a model trains on: a text corpus tokenized once into a memory-mapped file, or a synthetic
task generated on the fly. Every batch comes from a seeded `torch.Generator`, so a run is
reproducible and its data position is just that generator's state.

Tasks: `text` (next-token prediction over a corpus), `repeat` (random tokens, then the last ones
again, with a period that varies per sequence: the setting where induction heads form), and the
encoder-decoder tasks `copy`, `reverse` and `sort` (target = the source, reversed, or sorted).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from glassformer.checkpoints.files import atomic_write
from glassformer.errors import InputError
from glassformer.training.tokenizers import encode

Batch = dict[str, Tensor]
SEQ2SEQ_TASKS = ("copy", "reverse", "sort")
SYNTHETIC_TASKS = ("repeat", *SEQ2SEQ_TASKS)


def read_corpus(source: str) -> str:
    """The text of `source`: "tinyshakespeare" (shipped with glassformer) or a UTF-8 file."""
    path = files("glassformer") / "data" / "tinyshakespeare.txt" if source == "tinyshakespeare" else Path(source)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"corpus {source!r} is not a readable file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"corpus {source!r} is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 4]!r})"
        ) from None
    if not text.strip():
        raise InputError(f"corpus {source!r} is empty")
    return text


class TextData:
    """Token ids of a corpus in a memory-mapped file; the last `val_fraction` is validation."""

    def __init__(self, path: Path, n_ctx: int, val_fraction: float = 0.1) -> None:
        self.ids = np.load(path, mmap_mode="r")  # (n_tokens,) uint16 or uint32
        n_val = max(1, int(len(self.ids) * val_fraction))
        self.splits = {"train": self.ids[:-n_val], "val": self.ids[-n_val:]}
        self.n_ctx = n_ctx
        for split, ids in self.splits.items():
            if len(ids) <= n_ctx:
                raise InputError(
                    f"the corpus has {len(self.ids)} tokens: its {split} split ({len(ids)}) is "
                    f"smaller than one context window of {n_ctx} + 1 tokens"
                )

    @classmethod
    def build(cls, text: str, tokenizer: Tokenizer, path: Path, n_ctx: int) -> TextData:
        """Tokenize `text` once into `path` (a .npy file, written atomically)."""
        ids = encode(tokenizer, text)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
                np.save(f, ids)

        atomic_write(path, write)
        return cls(path, n_ctx)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """Random windows: inputs (batch, n_ctx) and targets shifted by one."""
        ids = self.splits[split]
        starts = torch.randint(len(ids) - self.n_ctx, (batch_size,), generator=generator).tolist()
        window = np.stack([ids[s : s + self.n_ctx + 1] for s in starts]).astype(np.int64)  # (batch, n_ctx + 1)
        window = torch.from_numpy(window)
        return {"tokens": window[:, :-1], "targets": window[:, 1:]}


@dataclass
class SyntheticData:
    """Random token sequences, generated per batch. Ids 1.. are symbols; 0 starts a target."""

    task: str
    d_vocab: int
    length: int  # symbols per sequence (the repeated half, for `repeat`)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        if self.task == "repeat":
            return self._repeats(batch_size, generator)
        symbols = torch.randint(1, self.d_vocab, (batch_size, self.length), generator=generator)
        target = {"copy": symbols, "reverse": symbols.flip(1), "sort": symbols.sort(dim=1).values}[self.task]
        start = torch.zeros(batch_size, 1, dtype=torch.long)
        return {"src": symbols, "tgt": torch.cat([start, target[:, :-1]], dim=1), "targets": target}

    def _repeats(self, batch_size: int, generator: torch.Generator) -> Batch:
        """2·length random tokens whose last 2·period are a period repeated twice, the period drawn per
        sequence from [length/2, length]: with a fixed period a head could solve the task by position
        alone (look back `length` tokens); a varying one leaves only induction (find the previous
        occurrence of this token, predict what followed it)."""
        n = 2 * self.length
        symbols = torch.randint(1, self.d_vocab, (batch_size, n), generator=generator)  # (batch, 2 length)
        period = torch.randint(self.length // 2, self.length + 1, (batch_size, 1), generator=generator)
        pos = torch.arange(n)[None]  # (1, 2 length)
        seq = symbols.gather(1, torch.where(pos >= n - period, pos - period, pos))  # the second copy reads the first
        return {"tokens": seq[:, :-1], "targets": seq[:, 1:]}
