"""The one exception family of glassformer: catch `GlassformerError` to catch them all."""


class GlassformerError(Exception):
    """Base of every glassformer-specific failure."""


class HookError(GlassformerError, ValueError):
    """A hook name that does not exist, or a hook that returned something unusable."""


class InputError(GlassformerError, ValueError):
    """Tokens, masks or residual tensors the model cannot run on."""


class CheckpointError(GlassformerError, ValueError):
    """A checkpoint that cannot be read, or that does not match its config."""


class CircuitError(GlassformerError, ValueError):
    """Weights that cannot be read as the circuit asked for: factored matrices whose inner sizes
    differ, an eigen-decomposition of a non-square product, one stack's QK/OV asked of an
    encoder-decoder model."""


class CacheError(GlassformerError, ValueError):
    """An activation cache that lacks what a computation needs, or that does not know its model."""
