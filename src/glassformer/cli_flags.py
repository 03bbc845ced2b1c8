"""Config fields as command-line flags (--n-layers, --d-model, …), shared by `glassformer trace | train`
and the inspection commands. A leaf module: cli.py and inspect/commands.py both import it.
"""

from __future__ import annotations

import argparse
from typing import Any

from glassformer.config import ACTS, ARCHS, NORM_POSITIONS, NORMS, POSITIONALS

# Config fields settable from the command line, with their argparse options.
MODEL_FLAGS: dict[str, dict] = {
    "arch": dict(choices=ARCHS),
    "n_layers": dict(type=int),
    "n_decoder_layers": dict(type=int),
    "d_model": dict(type=int),
    "n_heads": dict(type=int),
    "n_kv_heads": dict(type=int),
    "d_mlp": dict(type=int),
    "n_ctx": dict(type=int),
    "positional": dict(choices=POSITIONALS),
    "norm": dict(choices=NORMS),
    "norm_position": dict(choices=NORM_POSITIONS),
    "act": dict(choices=ACTS),
    "dropout": dict(type=float),
    "attn_only": dict(action=argparse.BooleanOptionalAction),
}


def add_config_flags(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """--n-layers, --d-model, … for the Config fields in MODEL_FLAGS; unset ones stay None."""
    group = parser.add_argument_group("model")
    for name, options in MODEL_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), default=defaults.get(name), **options)


def config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The Config fields given on the command line."""
    return {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
