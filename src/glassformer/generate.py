"""Decoding with a KV cache: greedy, temperature, top-k, top-p; stop tokens; left-padded batches;
hooks at every step; an optional compiled decode step.

The prompt runs once (prefill) and fills the cache; each later step feeds one token per row.
Positions count real tokens, so a left-padded row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from glassformer.cells.attention import AttentionMask
from glassformer.errors import InputError
from glassformer.hooks import OVER_KEYS, ActivationCache, HookedRoot, HookPoint, HookSpec, pos_axis
from glassformer.inputs import check_mask, check_tokens
from glassformer.kv_cache import KVCache
from glassformer.quantized import QuantizedWeight


def sample(
    logits: Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next tokens (batch,) from logits (batch, d_vocab): the argmax, or a draw from the softmax of
    logits / temperature restricted to the top_k tokens and the smallest set holding top_p mass."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (batch, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of better tokens
        drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:  # e.g. a CPU generator, a model on a GPU
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_options(
    model: HookedRoot, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be positive (use do_sample=False for greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    if model.cfg.arch == "encoder":
        raise InputError("an encoder-only model does not generate; use a decoder or an encoder-decoder")


def _start(
    model: HookedRoot,
    tokens: Tensor,
    attention_mask: Tensor | None,
    max_new_tokens: int,
    decoder_start_token_id: int | None,
) -> tuple[Tensor, Tensor, KVCache, Tensor | None, AttentionMask | None]:
    """Checked decoder input, its validity mask, a fresh cache, and the encoder's output if any."""
    cfg = model.cfg
    prompt = check_tokens(tokens, cfg, "tokens")
    valid = check_mask(attention_mask, prompt)
    encoder_out = encoder_mask = None
    if cfg.arch == "encoder-decoder":
        start = (
            decoder_start_token_id if decoder_start_token_id is not None else cfg.extra.get("decoder_start_token_id")
        )
        if start is None:
            raise InputError("an encoder-decoder model needs decoder_start_token_id to begin the target")
        encoder_mask = AttentionMask(valid)
        encoder_out = model._run_stack(model.encoder, prompt, encoder_mask)
        prompt, valid = torch.full((prompt.shape[0], 1), start, device=prompt.device), None
    if valid is not None and not valid.any(-1).all():
        raise InputError("a row of the attention mask is all padding: nothing to continue from")
    max_len = prompt.shape[1] + max_new_tokens
    if max_len > cfg.n_ctx:
        raise InputError(
            f"prompt of {prompt.shape[1]} + max_new_tokens={max_new_tokens} = {max_len} positions "
            f"exceeds the model's n_ctx={cfg.n_ctx}"
        )
    valid = torch.ones_like(prompt, dtype=torch.bool) if valid is None else valid
    src_len = None if encoder_out is None else encoder_out.shape[1]
    cache = new_cache(model, prompt.shape[0], max_len, src_len)
    return prompt, valid, cache, encoder_out, encoder_mask


def prefill(
    model: HookedRoot,
    tokens: Tensor,
    valid: Tensor,
    cache: KVCache,
    encoder_out: Tensor | None,
    encoder_mask: AttentionMask | None,
) -> Tensor:
    """Run `tokens (batch, pos)` (real where `valid`) into the cache in one pass (uncompiled);
    next-token logits (batch, d_vocab). Positions count real tokens only."""
    cache.advance(valid)
    positions = (valid.cumsum(-1) - 1).clamp(min=0)  # (batch, pos)
    return model.decode(tokens, positions, cache, encoder_out, encoder_mask)


def rerotation_point(model: HookedRoot) -> int | None:
    """The cache length at which decoding recomputes every key: LongRoPE's original context, where its
    short factors give way to the long ones for the whole sequence (as Phi-3 does in transformers:
    the keys cached so far were rotated with the short factors). None for every other rotary."""
    blocks = (model.decoder if model.cfg.arch == "encoder-decoder" else model).blocks
    rotary = blocks[0].attn.rotary
    return rotary.original if rotary is not None and rotary.kind == "longrope" else None


def new_cache(model: HookedRoot, batch: int, max_len: int, src_len: int | None = None) -> KVCache:
    """An empty KV cache for the decoder's layers, in the model's dtype and on its device."""
    blocks = (model.decoder if model.cfg.arch == "encoder-decoder" else model).blocks
    attn = blocks[0].attn  # its head count is local under tensor parallelism
    weight = model.embed.W_E
    return KVCache(
        len(blocks), batch, attn.n_kv_heads, max_len, attn.d_head, src_len, dtype=weight.dtype, device=weight.device
    )


@torch.no_grad()
def stream(
    model: HookedRoot,
    tokens: Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    fwd_hooks: Sequence[HookSpec] = (),
    decoder_start_token_id: int | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield the new token of every row (batch,) at each step, until `max_new_tokens` or until
    every row has produced `eos_token_id` (one id, or several: a chat model's end-of-turn tokens; a
    finished row then yields `pad_token_id`, by default the first EOS id). `fwd_hooks` apply at every
    step, as in `run_with_hooks`."""
    _check_options(model, max_new_tokens, temperature, top_k, top_p)
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = (stops or [None])[0] if pad_token_id is None else pad_token_id
    if compile and any(isinstance(p, QuantizedWeight) for p in model.parameters()):
        # the low-bit product is a ctypes call: the compiler would break the graph at each of them and
        # recompile for every weight (its pointers become guards), slower than eager
        raise InputError("compile=True does not support a quantized model yet; decode it eagerly (the default)")
    step = torch.compile(model.decode, dynamic=False) if compile else model.decode
    with model.hooks(fwd_hooks):  # the encoder's pass, the prefill and every step
        prompt, valid, cache, encoder_out, encoder_mask = _start(
            model, tokens, attention_mask, max_new_tokens, decoder_start_token_id
        )
        next_position = valid.sum(-1, keepdim=True)  # (batch, 1)
        finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        one_real = torch.ones(prompt.shape[0], 1, dtype=torch.bool, device=prompt.device)
        stop_ids = torch.tensor(stops, dtype=torch.long, device=prompt.device)
        logits = prefill(model, prompt, valid, cache, encoder_out, encoder_mask)
        restart = rerotation_point(model)
        if restart is not None and cache.length > restart:  # a long prompt: its keys are rotated long already
            restart = None
        for i in range(max_new_tokens):
            token = sample(logits, do_sample, temperature, top_k, top_p, generator)  # (batch,)
            if stops:
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= torch.isin(token, stop_ids)
            yield token
            if i == max_new_tokens - 1 or bool(finished.all()):
                return
            if restart is not None:
                prompt, valid = torch.cat([prompt, token[:, None]], 1), torch.cat([valid, one_real], 1)
            if cache.length == restart:  # the sequence outgrows the short factors: every key again, rotated long
                cache.truncate(0)
                logits = prefill(model, prompt, valid, cache, encoder_out, encoder_mask)
                restart = None  # once only: the tokens need not be kept any more
            else:
                cache.advance(one_real)
                logits = step(token[:, None], next_position, cache, encoder_out, encoder_mask)
            next_position = next_position + 1


def _step_recorder() -> tuple[list[HookSpec], dict[str, list[Tensor]]]:
    """A hook that keeps every step's activations, to be joined along the position axis."""
    steps: dict[str, list[Tensor]] = {}

    def keep(x: Tensor, hook: HookPoint) -> None:
        steps.setdefault(hook.name, []).append(x.detach())

    return [(lambda name: True, keep)], steps


def _join_steps(steps: dict[str, list[Tensor]]) -> ActivationCache:
    """Per-step activations joined along their position axis (`pos_axis`): those over keys along
    q_pos, each step's keys (the slots written by then) padded to the last step's with what a mask
    gives an unseen key (`OVER_KEYS`); cross-attention keys and values, computed once, and the
    pooler are kept as they are."""
    joined = {}
    for name, parts in steps.items():
        axis = pos_axis(name)
        if len(parts) == 1 or axis is None:
            joined[name] = parts[0]
        elif axis == 2:
            width, fill = max(p.shape[-1] for p in parts), OVER_KEYS[name.rsplit(".", 1)[-1]]
            joined[name] = torch.cat([F.pad(p, (0, width - p.shape[-1]), value=fill) for p in parts], dim=2)
        else:
            joined[name] = torch.cat(parts, dim=1)
    return ActivationCache(joined)


def generate(
    model: HookedRoot,
    tokens: Tensor,
    max_new_tokens: int,
    *,
    return_cache: bool = False,
    fwd_hooks: Sequence[HookSpec] = (),
    decoder_start_token_id: int | None = None,
    **options: Any,
) -> Tensor | tuple[Tensor, ActivationCache]:
    """Decode `max_new_tokens` and return the input with the new tokens appended (batch, pos + new),
    as `transformers` does; for an encoder-decoder model, the decoder sequence from its start token.

    Options are those of `stream`. With `return_cache=True` also returns the activations of every
    step joined along the position axis: q/k/v/z/resid over prompt and new tokens, the pattern as
    (batch, n_heads, steps' queries, slots written), 0 where a step's query came before the slot.
    """
    hooks, steps = _step_recorder() if return_cache else ([], {})
    new = list(
        stream(
            model,
            tokens,
            max_new_tokens,
            fwd_hooks=[*fwd_hooks, *hooks],
            decoder_start_token_id=decoder_start_token_id,
            **options,
        )
    )
    prompt = check_tokens(tokens, model.cfg)
    if model.cfg.arch == "encoder-decoder":
        start = (
            decoder_start_token_id if decoder_start_token_id is not None else model.cfg.extra["decoder_start_token_id"]
        )
        prompt = torch.full((prompt.shape[0], 1), start, device=prompt.device)
    out = torch.cat([prompt, torch.stack(new, dim=1)], dim=1)  # (batch, pos + new)
    return (out, _join_steps(steps)) if return_cache else out
