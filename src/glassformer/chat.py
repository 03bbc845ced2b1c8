"""Chat: a conversation rendered by the model's chat template, answered through one KV cache.

`ChatSession` keeps the keys and values of every token the model has seen, so a new turn feeds only
what the template adds after the shared prefix (the user's message and the assistant header), never
the earlier turns again. Answers stop at the template's end-of-turn token.
Legend: batch (always 1 here), pos.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from glassformer.errors import InputError
from glassformer.generate import new_cache, rerotation_point, sample
from glassformer.hooks import HookedRoot
from glassformer.kv_cache import KVCache

Message = dict[str, str]
CACHE_STEP = 256  # the cache grows by whole chunks of positions


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A multi-turn conversation with `model`; `send(text)` streams the answer as text pieces."""

    def __init__(self, model: HookedRoot, system: str | None = None, **sampling: Any) -> None:
        if model.cfg.arch != "decoder":
            raise InputError(f"chat needs a decoder-only model, not an {model.cfg.arch} model")
        self.model, self.tokenizer = model, model.text_tokenizer()
        if self.tokenizer.chat_template is None:
            raise InputError("this model's tokenizer has no chat template: use generate() on plain text")
        self.sampling = sampling  # do_sample, temperature, top_k, top_p, generator: as for generate
        self.system = system
        self.messages: list[Message] = []
        self.cache: KVCache | None = None
        self.ids: list[int] = []  # the tokens whose keys and values are in the cache, in order
        self.prefilled = 0  # tokens the last turn had to feed before answering (for the curious, and tests)

    def reset(self, system: str | None = None) -> None:
        """Start over (the cache is kept allocated and rewritten); a new system message if given."""
        self.system = system if system is not None else self.system
        self.messages, self.ids = [], []
        if self.cache is not None:
            self.cache.truncate(0)

    def conversation(self) -> list[Message]:
        """The messages the template renders: the system message first, when there is one."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _fit(self, length: int) -> KVCache:
        """A cache that holds `length` positions (allocated, or grown by chunks)."""
        n_ctx = self.model.cfg.n_ctx
        if length > n_ctx:
            raise InputError(
                f"the conversation needs {length} positions, past the model's n_ctx={n_ctx}: /reset to start over"
            )
        size = min(n_ctx, -(-length // CACHE_STEP) * CACHE_STEP)
        if self.cache is None:
            self.cache = new_cache(self.model, 1, size)
        self.cache.reserve(size)
        return self.cache

    def _feed(self, ids: list[int]) -> Tensor:
        """Run `ids` after what the cache holds; the next-token logits (1, d_vocab)."""
        cache = self._fit(len(self.ids) + len(ids))
        restart = rerotation_point(self.model)
        if restart is not None and len(self.ids) <= restart < len(self.ids) + len(ids):  # LongRoPE turns long
            ids, self.ids = self.ids + ids, []
            cache.truncate(0)
        start = len(self.ids)
        device = self.model.embed.W_E.device
        cache.advance(torch.ones(1, len(ids), dtype=torch.bool, device=device))
        positions = torch.arange(start, start + len(ids), device=device)[None]  # (1, pos)
        logits = self.model.decode(torch.tensor([ids], device=device), positions, cache)
        self.ids.extend(ids)  # only once their keys and values are written
        return logits

    @torch.no_grad()
    def send(self, text: str, max_new_tokens: int = 256) -> Iterator[str]:
        """Add a user message and stream the answer; the answer joins the conversation when the
        stream ends, also when it is stopped early (closed, or Ctrl-C)."""
        self.messages.append({"role": "user", "content": text})
        rendered = self.tokenizer.apply_chat_template(self.conversation(), add_generation_prompt=True)
        prompt = self.tokenizer.encode(rendered, add_bos=False)  # the template writes its own BOS, if any
        keep = shared_prefix(self.ids, prompt[:-1])  # at least one token to feed, for the logits
        if self.cache is not None:
            self.cache.truncate(keep)
        self.ids = self.ids[:keep]
        self.prefilled = len(prompt) - keep
        if len(prompt) + 1 > self.model.cfg.n_ctx:
            self.messages.pop()
            raise InputError(
                f"the conversation is {len(prompt)} tokens, at the model's n_ctx={self.model.cfg.n_ctx}: "
                "/reset to start over"
            )
        logits = self._feed(prompt[keep:])
        stops, answer = set(self.tokenizer.stop_ids()), []
        shown = ""
        try:
            for _ in range(min(max_new_tokens, self.model.cfg.n_ctx - len(self.ids))):
                token = int(sample(logits, **self.sampling)[0])
                if token in stops:  # not fed: the next turn's prompt brings it, with the template's text after it
                    break
                answer.append(token)
                text_so_far = self.tokenizer.decode(answer)
                if not text_so_far.endswith("\ufffd"):  # a whole character
                    yield text_so_far[len(shown) :]
                    shown = text_so_far
                logits = self._feed([token])
        finally:
            self.messages.append({"role": "assistant", "content": self.tokenizer.decode(answer)})


def chat(model: HookedRoot, messages: list[Message], max_new_tokens: int = 256, **sampling: Any) -> str:
    """The assistant's answer to `messages` (dicts with "role" and "content"), rendered by the
    model's chat template; greedy unless `do_sample=True`."""
    if not messages or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    session = ChatSession(model, **sampling)
    *earlier, last = messages
    if last["role"] != "user":
        raise InputError(f"the last message must be the user's, not {last['role']!r}")
    session.messages = list(earlier)
    return "".join(session.send(last["content"], max_new_tokens))
