"""glassformer: a transformer you can see through, cell by cell, at full speed."""

from glassformer.config import Config
from glassformer.errors import GlassformerError, HookError, InputError
from glassformer.hooks import ActivationCache, HookPoint
from glassformer.model import Transformer

__all__ = [
    "ActivationCache",
    "Config",
    "GlassformerError",
    "HookError",
    "HookPoint",
    "InputError",
    "Transformer",
]
__version__ = "0.1.0"
