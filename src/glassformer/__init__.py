"""glassformer: a transformer you can see through, cell by cell, at full speed."""

from glassformer import parallel  # gf.parallel.shard / load_sharded / init
from glassformer.config import Config
from glassformer.errors import CacheError, CheckpointError, CircuitError, GlassformerError, HookError, InputError
from glassformer.factored import FactoredMatrix
from glassformer.hooks import ActivationCache, HookPoint
from glassformer.inspect.trace import Trace, trace
from glassformer.memory import keep_freed_memory
from glassformer.model import Transformer
from glassformer.quantize import quantize
from glassformer.quantized import QuantizedWeight

__all__ = [
    "ActivationCache",
    "CacheError",
    "CheckpointError",
    "CircuitError",
    "Config",
    "FactoredMatrix",
    "GlassformerError",
    "HookError",
    "HookPoint",
    "InputError",
    "keep_freed_memory",
    "parallel",
    "quantize",
    "QuantizedWeight",
    "Trace",
    "Transformer",
    "trace",
    "train",
    "TrainConfig",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`gf.train` and `gf.TrainConfig`, imported on first use (training pulls in tqdm and tokenizers)."""
    if name in ("train", "TrainConfig"):
        from glassformer.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'glassformer' has no attribute {name!r}")
