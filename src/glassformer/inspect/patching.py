"""Activation patching: which activations carry the difference between a clean and a corrupted input.

Run the clean input once and cache it; then rerun the corrupted input many times, each time
overwriting one slice of one activation (a layer's residual stream at one position, one head's
output) with its clean value, and measure how much of the clean behaviour comes back. The metric
is any function of the logits, e.g. the logit difference between the right and a wrong answer.

Legend: batch, pos, n_heads, d_head, d_model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from glassformer.errors import InputError
from glassformer.hooks import ActivationCache, HookPoint
from glassformer.inspect.inputs import TokensOrText, as_tokens, token_id
from glassformer.model import Transformer

Metric = Callable[[Tensor], Tensor | float]
Index = tuple[slice | int, ...]  # which part of an activation to patch, after the batch axis
Inputs = TokensOrText | Sequence[TokensOrText]  # tokens or text; (src, tgt) for an encoder-decoder model


def logit_diff(correct: int | str, wrong: int | str, position: int = -1, model: Transformer | None = None) -> Metric:
    """A metric: mean over the batch of `logits[:, position, correct] - logits[:, position, wrong]`.
    The tokens may be given as text (one token each) when `model` is given to read them."""
    if model is not None:
        correct, wrong = token_id(model, correct, "correct"), token_id(model, wrong, "wrong")
    elif isinstance(correct, str) or isinstance(wrong, str):
        raise TypeError(f"logit_diff({correct!r}, {wrong!r}): tokens given as text need the model, model=...")

    def metric(logits: Tensor) -> Tensor:  # logits (batch, pos, d_vocab)
        return (logits[:, position, correct] - logits[:, position, wrong]).mean()

    return metric


def model_inputs(model: Transformer, tokens: Inputs) -> tuple[Tensor, ...]:
    """One token tensor, or (src, tgt) for an encoder-decoder model; text goes through the tokenizer."""
    parts = (tokens,) if isinstance(tokens, Tensor | str) else tuple(tokens)
    return tuple(as_tokens(model, part) for part in parts)


def same_length(model: Transformer, clean: Inputs, corrupted: Inputs) -> tuple[tuple[Tensor, ...], ...]:
    """Both runs' token tensors, checked to have as many positions each (patching is position by position)."""
    clean_tokens, corrupted_tokens = model_inputs(model, clean), model_inputs(model, corrupted)
    for a, b in zip(clean_tokens, corrupted_tokens, strict=False):
        if a.shape[-1] != b.shape[-1]:
            raise InputError(
                f"the clean input has {a.shape[-1]} tokens and the corrupted one {b.shape[-1]}: patching needs "
                "the same number of tokens (choose texts that tokenize to equal lengths)"
            )
    return clean_tokens, corrupted_tokens


def clean_cache(model: Transformer, clean: Inputs, names: Sequence[str]) -> ActivationCache:
    """The clean run's activations at `names` (only those: the rest of the run stays on the fast path)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(*model_inputs(model, clean), names_filter=list(names))
    return cache


def patched_logits(
    model: Transformer, corrupted: Inputs, cache: ActivationCache, name: str, index: Index = ()
) -> Tensor:
    """Logits of the corrupted run with `cache[name][:, *index]` written into activation `name`."""
    clean = cache[name]

    def patch(x: Tensor, hook: HookPoint) -> Tensor:
        if x.shape != clean.shape:
            raise InputError(f"{name}: corrupted activation {tuple(x.shape)} differs from clean {tuple(clean.shape)}")
        x = x.clone()
        x[(slice(None), *index)] = clean[(slice(None), *index)]
        return x

    with torch.no_grad():
        return model.run_with_hooks(*model_inputs(model, corrupted), fwd_hooks=[(name, patch)])


def metric_value(metric: Metric, logits: Tensor) -> float:
    """The metric of these logits as a float."""
    out = metric(logits)
    return float(out.item() if isinstance(out, Tensor) else out)


def patch_residual(
    model: Transformer,
    clean: Inputs,
    corrupted: Inputs,
    metric: Metric,
    hook: str = "hook_resid_pre",
    stack: str = "",
) -> Tensor:
    """(n_layers, pos) metric after patching the clean `blocks.{layer}.{hook}` at one position each.

    `stack` is "" for a single-stack model, or "encoder." / "decoder." for an encoder-decoder one.
    Inputs may be text of the same token length.
    """
    clean, corrupted = same_length(model, clean, corrupted)
    names = layer_names(model, stack, hook)
    cache = clean_cache(model, clean, names)
    n_pos = cache[names[0]].shape[1]
    out = torch.empty(len(names), n_pos)
    for layer, name in enumerate(names):
        for pos in range(n_pos):
            out[layer, pos] = metric_value(metric, patched_logits(model, corrupted, cache, name, (pos,)))
    return out


def patch_heads(
    model: Transformer,
    clean: Inputs,
    corrupted: Inputs,
    metric: Metric,
    hook: str = "attn.hook_z",
    stack: str = "",
    per_position: bool = False,
) -> Tensor:
    """(n_layers, n_heads) metric after patching one head's clean `hook` (z, q, result, …) at every
    position; `per_position=True` gives (n_layers, pos, n_heads), one position and head at a time.
    Inputs may be text of the same token length."""
    clean, corrupted = same_length(model, clean, corrupted)
    names = layer_names(model, stack, hook)
    cache = clean_cache(model, clean, names)
    _, n_pos, n_heads, *_ = cache[names[0]].shape  # (batch, pos, n_heads, d_head)
    positions: list[int | slice] = list(range(n_pos)) if per_position else [slice(None)]
    out = torch.empty(len(names), len(positions), n_heads)
    for layer, name in enumerate(names):
        for i, pos in enumerate(positions):
            for head in range(n_heads):
                out[layer, i, head] = metric_value(metric, patched_logits(model, corrupted, cache, name, (pos, head)))
    return out if per_position else out[:, 0]


def layer_names(model: Transformer, stack: str, hook: str) -> list[str]:
    """`{stack}blocks.{layer}.{hook}` for every layer, checked against the model's hook points."""
    names = [n for n in model.hook_dict if n.startswith(f"{stack}blocks.") and n.endswith(f".{hook}")]
    names = [n for n in names if n == f"{stack}blocks.{n[len(stack) :].split('.')[1]}.{hook}"]
    if not names:
        raise ValueError(f"no hook point {stack}blocks.<layer>.{hook} in this model")
    return names


def restored_fraction(patched: Tensor, clean: float, corrupted: float) -> Tensor:
    """(patched - corrupted) / (clean - corrupted): 1 where patching restores the clean metric, 0 where
    it changes nothing."""
    return (patched - corrupted) / (clean - corrupted)
