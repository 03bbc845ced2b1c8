"""Hook points: named identity cells where a user can read, change or ablate an activation.

A `HookPoint` with no hook attached returns its input untouched and costs one attribute check; cells
ask `hook.active` to decide whether to leave the fused fast path. `HookedRoot` gives a model
`run_with_cache`, `run_with_hooks` and the `hooks()` context manager, which always removes what it
added, also when a hook raises.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from glassformer.cache_algebra import CacheAlgebra, PosSlice, take
from glassformer.errors import HookError
from glassformer.memory import keep_memory_for_caches

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None
HookSpec = tuple[str | Callable[[str], bool], HookFn]


class HookPoint(nn.Module):
    """Identity on the forward pass, unless hooks are attached; then each may replace the tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""  # set by the root model to its module path
        self._fwd: list[HookFn] = []
        self._bwd: list[HookFn] = []

    @property
    def active(self) -> bool:
        """True when anything reads or changes this activation."""
        return bool(self._fwd or self._bwd)

    def add(self, fn: HookFn, backward: bool = False) -> None:
        (self._bwd if backward else self._fwd).append(fn)

    def clear(self) -> None:
        self._fwd.clear()
        self._bwd.clear()

    def __call__(self, x: Tensor) -> Tensor:  # bypasses nn.Module.__call__: this is the hot path
        if not (self._fwd or self._bwd):
            return x
        for fn in self._fwd:
            out = fn(x, self)
            if out is not None:
                x = self._checked(out, x)
        if self._bwd and x.requires_grad:
            for fn in self._bwd:
                x.register_hook(lambda grad, fn=fn: self._checked_grad(fn(grad, self), grad))
        return x

    def _checked(self, out: Any, x: Tensor) -> Tensor:
        if not isinstance(out, Tensor):
            raise HookError(f"hook on {self.name} returned {type(out).__name__}, expected a Tensor or None")
        if out.shape != x.shape:
            raise HookError(f"hook on {self.name} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        if out.dtype != x.dtype or out.device != x.device:
            raise HookError(
                f"hook on {self.name} returned a {out.dtype} tensor on {out.device}, expected {x.dtype} on {x.device}"
            )
        return out

    def _checked_grad(self, out: Any, grad: Tensor) -> Tensor | None:
        return None if out is None else self._checked(out, grad)

    def extra_repr(self) -> str:
        return self.name


# Short names, as in TransformerLens' `cache["pattern", 0]`, and where they live inside a block.
_SHORT_NAMES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_mid_cross": "hook_resid_mid_cross",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "cross_attn_out": "hook_cross_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "attn_scores": "attn.hook_attn_scores",
    "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
    "post": "mlp.hook_post",
    "router_logits": "mlp.hook_router_logits",
    "expert_weights": "mlp.hook_expert_weights",
    "scale": "ln1.hook_scale",
    "normalized": "ln1.hook_normalized",
}


def short_name(name: str, layer: int | None = None, where: str | None = None) -> list[str]:
    """Full hook names that a short key may stand for, most likely first (`"z_grad"`: z's gradient).

    `where` picks a sub-cell (`"ln2"`, `"cross_attn"`) or a stack (`"encoder"`, `"decoder"`).
    """
    if name.endswith("_grad"):  # a gradient is cached under its activation's name + "_grad"
        return [f"{full}_grad" for full in short_name(name.removesuffix("_grad"), layer, where)]
    if layer is None:
        return [name if name.startswith("hook_") else f"hook_{name}"]
    rel = _SHORT_NAMES.get(name, name)
    stacks = ("", "encoder.", "decoder.")
    if where in ("encoder", "decoder"):
        stacks = (f"{where}.",)
    elif where is not None:
        head, _, tail = rel.partition(".")
        rel = f"{where}.{tail}" if tail else f"{where}.{head}"
    return [f"{stack}blocks.{layer}.{rel}" for stack in stacks]


# Activations over (…, q_pos, k_pos), and what each holds for a key the mask hides.
OVER_KEYS = {
    "hook_pattern": 0.0,
    "hook_attn_scores": -math.inf,
    "hook_attn_scores_capped": -math.inf,
    "hook_position_bias": 0.0,
}


def pos_axis(name: str) -> int | None:
    """The position axis of a hook's activation: the queries' for scores and patterns; None for the pooler."""
    if name.endswith("hook_pooled"):
        return None
    return 2 if name.endswith(tuple(OVER_KEYS)) else 1


class ActivationCache(CacheAlgebra):
    """Activations of one forward pass, by hook name (`cache["blocks.0.attn.hook_z"]`) or short key
    (`cache["z", 0]`, `cache["scale", 0, "ln2"]`, `cache["pattern", 1, "decoder"]`). `model`, the
    model that ran (run_with_cache sets it), lets the cache algebra (`decompose_resid`, …) read weights."""

    def __init__(self, activations: dict[str, Tensor], model: nn.Module | None = None) -> None:
        self._acts = activations
        self.model = model

    def _resolve(self, key: str | tuple) -> str:
        if isinstance(key, str):
            if key in self._acts:
                return key
            candidates = short_name(key)
        else:
            candidates = short_name(*key)
        found = [c for c in candidates if c in self._acts]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise KeyError(f"{key!r} is ambiguous between {found}; name the stack or use the full name")
        wanted = candidates[0] if isinstance(key, tuple) else key
        close = difflib.get_close_matches(wanted, list(self._acts), n=5, cutoff=0.5)
        raise KeyError(f"{key!r} is not in this cache" + (f"; closest: {close}" if close else ""))

    def __getitem__(self, key: str | tuple) -> Tensor:
        return self._acts[self._resolve(key)]

    def __contains__(self, key: object) -> bool:
        try:
            self._resolve(key)  # type: ignore[arg-type]
        except (KeyError, TypeError):
            return False
        return True

    def keys(self) -> Iterable[str]:
        return self._acts.keys()

    def values(self) -> Iterable[Tensor]:
        return self._acts.values()

    def items(self) -> Iterable[tuple[str, Tensor]]:
        return self._acts.items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def to(self, device: torch.device | str) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._acts.items()}, self.model)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations)"


def _pairs(specs: Any, argument: str) -> list[HookSpec]:
    """`specs` as a list of (name or predicate, fn) pairs, or a TypeError saying what was expected."""
    pairs = list(specs) if isinstance(specs, list | tuple) else None
    if pairs is None or not all(
        isinstance(p, list | tuple) and len(p) == 2 and callable(p[1]) and (isinstance(p[0], str) or callable(p[0]))
        for p in pairs
    ):
        raise TypeError(
            f"{argument} must be a list of (hook name or predicate, fn) pairs, e.g. "
            f"[('blocks.0.attn.hook_z', fn)]; got {specs!r:.120}"
        )
    return pairs


class HookedRoot(nn.Module):
    """A model whose HookPoints are named by module path and can be hooked or cached by name."""

    def setup_hooks(self) -> None:
        """Name every HookPoint by its module path; call once at the end of `__init__`."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def _match(self, selector: str | Callable[[str], bool]) -> list[HookPoint]:
        if callable(selector):
            return [h for name, h in self.hook_dict.items() if selector(name)]
        if not isinstance(selector, str):
            raise HookError(f"hook name must be a string or a predicate, got {type(selector).__name__}")
        if selector not in self.hook_dict:
            close = difflib.get_close_matches(selector, list(self.hook_dict), n=5, cutoff=0.4)
            hint = f"; closest valid names: {close}" if close else ""
            raise HookError(f"unknown hook name {selector!r}{hint}")
        return [self.hook_dict[selector]]

    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn, backward: bool = False) -> None:
        """Attach `fn(tensor, hook)` until `reset_hooks()`; prefer the scoped `hooks()`."""
        for hook in self._match(name):
            hook.add(fn, backward)

    def reset_hooks(self) -> None:
        """Remove every hook from every HookPoint."""
        for hook in self.hook_dict.values():
            hook.clear()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = ()) -> Iterator[HookedRoot]:
        """Attach hooks for the `with` block only; they are removed on exit, also on an exception."""
        added: list[tuple[HookPoint, HookFn, bool]] = []
        try:
            for specs, backward in ((fwd_hooks, False), (bwd_hooks, True)):
                for selector, fn in _pairs(specs, "bwd_hooks" if backward else "fwd_hooks"):
                    for hook in self._match(selector):
                        hook.add(fn, backward)
                        added.append((hook, fn, backward))
            yield self
        finally:
            for hook, fn, backward in added:
                fns = hook._bwd if backward else hook._fwd
                if fn in fns:
                    fns.remove(fn)

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
        **kwargs: Any,
    ) -> Any:
        """`self(*args, **kwargs)` with temporary hooks, e.g. `[("blocks.0.attn.hook_z", fn)]`."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(*args, **kwargs)

    def cache_names(self, names_filter: NameFilter = None) -> list[str]:
        """The hook names a `names_filter` selects (None: all); unknown names are an error."""
        if names_filter is None:
            return list(self.hook_dict)
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if callable(names_filter):
            return [name for name in self.hook_dict if names_filter(name)]
        return [hook.name for name in names_filter for hook in self._match(name)]

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NameFilter = None,
        detach: bool = True,
        gather: bool = False,
        pos_slice: PosSlice = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backward_metric: Callable[[Any], Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run forward and keep the activations the filter selects: `(output, ActivationCache)`.

        `pos_slice` (an int, a slice, a list or tensor of positions), `dtype` (floating activations)
        and `device` are applied as each activation is recorded, so only that much is ever kept:
        positions are the queries' for scores and patterns, and an int drops the axis. On a
        tensor-parallel model, hooks see this process's heads; `gather=True` returns the full-head
        activations, as one process would have them.

        `backward_metric`, a function of the output returning a scalar tensor, also records the
        gradient of that scalar with respect to each activation, under `name + "_grad"` (as
        TransformerLens' `incl_bwd`), sliced and converted the same way; the output is then
        detached. Gradients come from `torch.autograd.grad` on the activations alone: parameters'
        `.grad` are left as they were, and the model's train/eval mode is not changed.
        """
        keep_memory_for_caches()  # the next cache reuses this one's freed blocks (memory.py)
        store: dict[str, Tensor] = {}
        live: dict[str, Tensor] = {}

        def record(x: Tensor, name: str) -> None:
            x = x.detach() if detach else x
            axis = pos_axis(name.removesuffix("_grad"))
            if axis is not None:
                x = take(x, pos_slice, axis)
            store[name] = x.to(device=device, dtype=dtype if x.is_floating_point() else None)

        def save(x: Tensor, hook: HookPoint) -> Tensor | None:
            if backward_metric is None or not x.is_floating_point():
                record(x, hook.name)
                return None
            if not x.requires_grad:  # nothing upstream needs a gradient (frozen weights): start here
                x = x.detach().requires_grad_()
            live[hook.name] = x
            record(x, hook.name)
            return x

        names = self.cache_names(names_filter)
        if backward_metric is None:
            with self.hooks([(name, save) for name in names]):
                out = self(*args, **kwargs)
        else:
            with torch.inference_mode(False), torch.enable_grad(), self.hooks([(name, save) for name in names]):
                out = self(*args, **kwargs)
                for name, grad in zip(live, _gradients(backward_metric(out), list(live.values())), strict=True):
                    record(grad, f"{name}_grad")
            out = out.detach()
        cache = ActivationCache(store, self)
        tp = getattr(self, "tp", None)  # set by glassformer.parallel.shard
        if gather and tp is not None:
            cache = tp.gather_cache(cache)
        return out, cache


def _gradients(metric: Any, activations: list[Tensor]) -> tuple[Tensor, ...]:
    """d metric / d activation for each activation (zeros where it does not reach the metric)."""
    if not isinstance(metric, Tensor) or metric.dim() != 0:
        got = f"shape {tuple(metric.shape)}" if isinstance(metric, Tensor) else type(metric).__name__
        raise ValueError(f"backward_metric must return a scalar (0-dim) tensor, got {got}; reduce it, e.g. .mean()")
    if not metric.requires_grad:
        raise ValueError("backward_metric returned a tensor that does not depend on the output (no gradient)")
    return torch.autograd.grad(metric, activations, allow_unused=True, materialize_grads=True)
