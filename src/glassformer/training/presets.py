"""Named starting points for `glassformer train --preset`: model fields plus training settings."""

from __future__ import annotations

from typing import Any

# tiny: nanoGPT's CPU recipe for character-level Shakespeare (4 layers, 4 heads, 128 wide, context
# 64, batch 12, 2,000 steps, no dropout); it reaches a validation loss near 1.88.
# demo: what `make demo` trains in about three minutes on a 2-core CPU.
# small: nanoGPT's GPU recipe (6 layers, 6 heads, 384 wide, context 256), for a GPU or a long wait.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": dict(n_layers=4, n_heads=4, d_model=128, n_ctx=64, dropout=0.0),
        "batch_size": 12,
        "max_steps": 2000,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "warmup_steps": 100,
        "eval_interval": 250,
        "eval_batches": 20,
        "checkpoint_interval": 500,
    },
    "demo": {
        "model": dict(n_layers=4, n_heads=4, d_model=128, n_ctx=64, dropout=0.0),
        "batch_size": 16,
        "max_steps": 3000,
        "lr": 2e-3,
        "min_lr": 1e-4,
        "warmup_steps": 100,
        "eval_interval": 250,
        "eval_batches": 20,
        "checkpoint_interval": 1000,
    },
    "small": {
        "model": dict(n_layers=6, n_heads=6, d_model=384, n_ctx=256, dropout=0.2),
        "batch_size": 64,
        "max_steps": 5000,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "warmup_steps": 100,
        "eval_interval": 250,
        "eval_batches": 200,
        "checkpoint_interval": 1000,
    },
}
