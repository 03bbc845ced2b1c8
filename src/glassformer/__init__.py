"""glassformer: a transformer you can see through, cell by cell, at full speed."""

from glassformer import parallel  # gf.parallel.shard / load_sharded / init
from glassformer.config import Config
from glassformer.errors import CheckpointError, GlassformerError, HookError, InputError
from glassformer.hooks import ActivationCache, HookPoint
from glassformer.inspect.trace import Trace, trace
from glassformer.model import Transformer

__all__ = [
    "ActivationCache",
    "CheckpointError",
    "Config",
    "GlassformerError",
    "HookError",
    "HookPoint",
    "InputError",
    "parallel",
    "Trace",
    "Transformer",
    "trace",
]
__version__ = "0.1.0"
