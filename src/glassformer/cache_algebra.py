"""Cache algebra: a cached run's residual stream taken apart into what wrote it, with
TransformerLens' `ActivationCache` names and labels (`decompose_resid`, `accumulated_resid`,
`stack_head_results`, `stack_neuron_results`, `apply_ln_to_stack`, `logit_attrs`).

A pre-norm stream is a sum: the embeddings, then each layer's attention and MLP outputs; each
head's `result` and each neuron's `post[n] * W_out[n]` split those further. A norm is linear once
its scale is fixed, so with the scale the run used (`hook_scale`) every piece maps to its share of
the normalised stream, and through W_U to its share of a logit. Post-norm streams are not such sums.

Stacks are (n_components, batch, pos, d_model); an int `pos_slice` drops the pos axis, as in
TransformerLens. Weights are brought to the cache's device and dtype. The stream is the one the head
reads: the decoder's in an encoder-decoder model. Legend: batch, pos, n_heads, d_model, d_mlp.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from glassformer.errors import CacheError

PosSlice = int | slice | list[int] | range | Tensor | None
NEURON_CHUNK_ELEMENTS = 2**24  # stack_neuron_results' temporaries: 64 MiB of float32 by default


def take(x: Tensor, index: PosSlice, dim: int) -> Tensor:
    """`x` at `index` along `dim`: an int drops the axis; a slice, a list or a tensor of indices keeps it."""
    if index is None:
        return x
    if isinstance(index, list | range):
        index = torch.tensor(list(index), dtype=torch.long, device=x.device)
    elif isinstance(index, Tensor):
        index = index.to(x.device)
    elif isinstance(index, bool) or not isinstance(index, int | slice):
        raise TypeError(f"a position or neuron slice must be an int, a slice, a list or a tensor; got {index!r}")
    return x[(slice(None),) * (dim % x.dim()) + (index,)]


def check_sum(cfg: Any, what: str, cells: bool = False) -> None:
    """Refuse a model whose stream is not a sum of the pieces: post-norm; with `cells` (heads, neurons),
    also a norm after each cell (sandwich, output), which their writes pass through."""
    refused = ("post", "sandwich", "output") if cells else ("post",)
    if cfg.norm_position in refused and cfg.norm != "none":
        why = (
            "after a post-norm block the residual stream is no longer a sum of the components"
            if cfg.norm_position == "post"
            else "a norm after each cell stands between the heads' and neurons' writes and the stream"
        )
        raise ValueError(f"{what} needs a pre-norm model (norm_position='pre'), not {cfg.norm_position!r}: {why}")


def check_linear_head(cfg: Any, what: str, cells: bool = False) -> None:
    """Refuse a model whose logits are not linear in the normalised stream (or, with `cells`, in its pieces)."""
    check_sum(cfg, what, cells)
    if cfg.head_transform:
        raise ValueError(f"{what} cannot go through head_transform (a non-linear head)")
    if cfg.final_softcap is not None:
        raise ValueError(f"{what} cannot go through final_softcap (cap * tanh(logits / cap) is not linear)")


class CacheAlgebra:
    """The decompositions `ActivationCache` offers; needs `self.model` and `self[name]`."""

    model: Any

    def _root(self) -> tuple[Any, str]:
        """The stack whose stream feeds the head, and the prefix of its hook names."""
        if self.model is None:
            raise CacheError(
                "this cache does not know its model: make it with model.run_with_cache(...) "
                "or ActivationCache(activations, model=model)"
            )
        if self.model.cfg.arch == "encoder-decoder":
            return self.model.decoder, "decoder."
        return self.model, ""

    def _get(self, name: str, what: str) -> Tensor:
        if name not in self:  # type: ignore[operator]
            raise CacheError(f"{what} needs {name!r}, which this cache lacks: record it with run_with_cache")
        return self[name]  # type: ignore[index]

    def _layer(self, layer: int | None) -> int:
        """`layer` in 0..n_layers; None and -1 mean n_layers, the stream entering the head."""
        n_layers = len(self._root()[0].blocks)
        if layer is None or layer == -1:
            return n_layers
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer must be in 0..{n_layers} (or -1 / None for the last); got {layer}")
        return layer

    def _stack(self, names: list[str], pos_slice: PosSlice, what: str) -> Tensor:
        """The named (batch, pos, d_model) activations at `pos_slice`, stacked on a new first axis."""
        if not names:  # nothing before layer 0: an empty stack of the right shape
            root, prefix = self._root()
            like = take(self._get(f"{prefix}blocks.0.hook_resid_pre", what), pos_slice, -2)
            return like.new_zeros(0, *like.shape)
        return torch.stack([take(self._get(name, what), pos_slice, -2) for name in names])

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The stream entering `layer` (None: the head) as the pieces that wrote it, (n_components,
        batch, pos, d_model): "embed", "pos_embed", then "0_attn_out", "0_mlp_out", …; `mlp_input`
        adds `layer`'s attention, `mode` "attn"/"mlp" keeps one kind."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp'; got {mode!r}")
        root, prefix = self._root()
        check_sum(self.model.cfg, "decompose_resid")
        layer = self._layer(layer)
        labels = []
        if incl_embeds:
            labels += self._embed_labels(root)
        for i in range(min(layer + mlp_input, len(root.blocks))):
            block = root.blocks[i]
            if i == layer and block.parallel:  # a parallel block's MLP reads resid_pre too
                break
            if mode != "mlp":
                labels += [f"{i}_attn_out"] + ([f"{i}_cross_attn_out"] if block.cross_attn is not None else [])
            if mode != "attn" and block.mlp is not None and i < layer:
                labels.append(f"{i}_mlp_out")
        names = [_hook_of(label, prefix) for label in labels]
        stack = self._stack(names, pos_slice, "decompose_resid")  # (n_components, batch, pos, d_model)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def _embed_labels(self, root: Any) -> list[str]:
        """The embedding pieces: one "embeddings" piece when a norm follows them (it mixes them)."""
        if self.model.cfg.embed_norm:
            return ["embeddings"]
        labels = ["embed"]
        if root.pos_embed is not None:
            labels.append("pos_embed")
        if root.token_type_embed is not None:
            labels.append("token_type_embed")
        return labels

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The stream as it grows: resid_pre of each layer up to `layer` ("0_pre", "0_mid" with
        `incl_mid`, …) and, for layer None, the final resid_post ("final_post"). With `apply_ln`, up
        to the head: each through the final norm on its own statistics (the logit lens, with the
        norm's weight and bias); before a layer: divided by that layer's cached scale."""
        root, prefix = self._root()
        layer = self._layer(layer)
        n_layers = len(root.blocks)
        labels, names = [], []
        for i in range(min(layer + 1, n_layers)):
            labels.append(f"{i}_pre")
            names.append(f"{prefix}blocks.{i}.hook_resid_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                mid = "resid_mid_cross" if mlp_input and i == layer and root.blocks[i].cross_attn else "resid_mid"
                labels.append(f"{i}_mid")
                names.append(f"{prefix}blocks.{i}.hook_{mid}")
        if layer == n_layers:
            labels.append("final_post")
            names.append(f"{prefix}blocks.{n_layers - 1}.hook_resid_post")
        stack = self._stack(names, pos_slice, "accumulated_resid")  # (n_components, batch, pos, d_model)
        if apply_ln and layer == n_layers:
            stack = _normalize(root.ln_final, stack)
        elif apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self, layer: int | None = -1, return_labels: bool = False, pos_slice: PosSlice = None, apply_ln: bool = False
    ) -> Tensor | tuple[Tensor, list[str]]:
        """Each head's write into the stream, of the layers before `layer` (-1: all), (n_layers *
        n_heads, batch, pos, d_model), labelled "L0H0", …; b_O is not a head's, and is left out."""
        root, prefix = self._root()
        check_sum(self.model.cfg, "stack_head_results", cells=True)
        layer = self._layer(layer)
        parts, labels = [], []
        for i in range(layer):
            result = self._head_result(prefix, i, pos_slice, root.blocks[i].attn)  # (batch, pos, n_heads, d_model)
            parts.append(result.movedim(-2, 0))  # (n_heads, batch, pos, d_model)
            labels += [f"L{i}H{h}" for h in range(result.shape[-2])]
        stack = torch.cat(parts) if parts else self._stack([], pos_slice, "stack_head_results")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _head_result(self, prefix: str, layer: int, pos_slice: PosSlice, attn: Any) -> Tensor:
        """hook_result of `layer` at `pos_slice`, or z @ W_O per head when only z was recorded."""
        name = f"{prefix}blocks.{layer}.attn.hook_result"
        if name in self:  # type: ignore[operator]
            return take(self[name], pos_slice, -3)  # type: ignore[index]
        z_name = f"{prefix}blocks.{layer}.attn.hook_z"
        if z_name not in self:  # type: ignore[operator]
            raise CacheError(f"stack_head_results needs {name!r} or {z_name!r}: record one with run_with_cache")
        z = take(self[z_name], pos_slice, -3)  # type: ignore[index]  # (batch, pos, n_heads, d_head)
        return torch.einsum("...hd,hdm->...hm", z, attn.W_O.detach().to(z))  # (batch, pos, n_heads, d_model)

    def stack_neuron_results(
        self,
        layer: int | None,
        pos_slice: PosSlice = None,
        neuron_slice: PosSlice = None,
        return_labels: bool = False,
        apply_ln: bool = False,
        chunk_size: int | None = None,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """Each neuron's write `post[..., n] * W_out[n]`, of the layers before `layer`, (n_neurons,
        batch, pos, d_model), labelled "L0N5"; b_out is left out. The result is written a chunk of
        `chunk_size` neurons at a time: beyond the result, memory holds one chunk (chunk_size × batch
        × pos × d_model; by default at most NEURON_CHUNK_ELEMENTS elements). Slice positions and
        neurons to keep the result itself small."""
        root, prefix = self._root()
        check_sum(self.model.cfg, "stack_neuron_results", cells=True)
        layer = self._layer(layer)
        pieces, labels = [], []
        for i in range(layer):
            mlp = root.blocks[i].mlp
            if getattr(mlp, "W_out", None) is None:
                raise CacheError(f"stack_neuron_results: layer {i} has no dense MLP (attention-only, or experts)")
            neurons = take(torch.arange(mlp.W_out.shape[0]), neuron_slice, 0).reshape(-1)  # (n,)
            post = take(self._get(f"{prefix}blocks.{i}.mlp.hook_post", "stack_neuron_results"), pos_slice, -2)
            pieces.append((post[..., neurons.to(post.device)].movedim(-1, 0), mlp.W_out.detach()[neurons]))
            labels += [f"L{i}N{n}" for n in neurons.tolist()]
        if not pieces:
            stack = self._stack([], pos_slice, "stack_neuron_results")
        else:
            stack = self._write_neurons(pieces, layer if apply_ln else None, pos_slice, chunk_size)
        return (stack, labels) if return_labels else stack

    def _write_neurons(
        self, pieces: list[tuple[Tensor, Tensor]], ln_layer: int | None, pos_slice: PosSlice, chunk_size: int | None
    ) -> Tensor:
        """Acts (n, batch, pos) times W_out rows (n, d_model), written chunk by chunk into one result."""
        acts, d_model = pieces[0][0], pieces[0][1].shape[-1]
        chunk_size = chunk_size or max(1, NEURON_CHUNK_ELEMENTS // (acts[0].numel() * d_model))
        out = acts.new_empty(sum(a.shape[0] for a, _ in pieces), *acts.shape[1:], d_model)  # (n, batch, pos, d_model)
        start = 0
        for post, w_out in pieces:
            w_out = w_out.to(post)
            for a in range(0, post.shape[0], chunk_size):
                b = min(a + chunk_size, post.shape[0])
                shape = (b - a,) + (1,) * (post.dim() - 1) + (w_out.shape[-1],)
                chunk = post[a:b, ..., None] * w_out[a:b].view(shape)  # (chunk, batch, pos, d_model)
                if ln_layer is not None:
                    chunk = self.apply_ln_to_stack(chunk, ln_layer, pos_slice=pos_slice)
                out[start + a : start + b] = chunk
            start += post.shape[0]
        return out

    def apply_ln_to_stack(
        self, stack: Tensor, layer: int | None = None, mlp_input: bool = False, pos_slice: PosSlice = None
    ) -> Tensor:
        """Each piece as the norm before `layer` (None: the final norm; ln2 with `mlp_input`) treats it
        in this run: centred (LayerNorm), divided by the cached scale. The pieces then sum to the
        normalised stream before the norm's weight and bias, as in TransformerLens. `pos_slice` is the
        one the stack was taken at."""
        root, prefix = self._root()
        check_sum(self.model.cfg, "apply_ln_to_stack")
        layer = self._layer(layer)
        if layer == len(root.blocks):
            norm, where = root.ln_final, "ln_final"
        else:
            block = root.blocks[layer]
            use_ln2 = mlp_input and getattr(block, "ln2", None) is not None
            norm, where = (block.ln2, f"blocks.{layer}.ln2") if use_ln2 else (block.ln1, f"blocks.{layer}.ln1")
        if not hasattr(norm, "hook_scale"):  # no norm there: the stream is read as it is
            return stack
        if norm.centre:
            stack = stack - stack.mean(-1, keepdim=True)
        scale = take(self._get(f"{prefix}{where}.hook_scale", "apply_ln_to_stack"), pos_slice, -2)  # (batch, pos, 1)
        return stack / scale

    def logit_attrs(
        self, stack: Tensor, tokens: Any, incorrect_tokens: Any = None, pos_slice: PosSlice = None
    ) -> Tensor:
        """Each piece's direct share of the logit of `tokens` (minus that of `incorrect_tokens`):
        through the final norm with the cached scale and its weight, and W_U (with `unembed_scale`).
        For a full decomposition the shares sum to the logit less the biases (b_U, and the final
        norm's bias read through W_U). Tokens: an int, a string (one token), or ids shaped like the
        stack's batch (and pos) axes."""
        check_linear_head(self.model.cfg, "logit_attrs")
        direction = self._direction(tokens)
        if incorrect_tokens is not None:
            wrong = self._direction(incorrect_tokens)
            if wrong.shape != direction.shape:
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape; got {tuple(direction.shape[:-1])} "
                    f"and {tuple(wrong.shape[:-1])}"
                )
            direction = direction - wrong
        scaled = self.apply_ln_to_stack(stack, None, pos_slice=pos_slice)  # (n_components, batch, pos, d_model)
        return (scaled * direction.to(scaled)).sum(-1)  # (n_components, batch, pos)

    def _direction(self, tokens: Any) -> Tensor:
        """(*tokens.shape, d_model): each token's W_U column, times the final norm's weight and unembed_scale."""
        root, _ = self._root()
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens)
        w_u = self.model.unembed.W_U.detach() * self.model.cfg.unembed_scale  # (d_model, d_vocab)
        if getattr(root.ln_final, "w", None) is not None:
            w_u = w_u * root.ln_final.w.detach()[:, None]
        ids = torch.as_tensor(tokens, device=w_u.device)
        return w_u[:, ids].movedim(0, -1)  # (*tokens.shape, d_model)


def _hook_of(label: str, prefix: str) -> str:
    """The hook holding a decompose_resid piece: "0_attn_out" -> "blocks.0.hook_attn_out"."""
    if label == "embeddings":
        return f"{prefix}blocks.0.hook_resid_pre"
    layer, _, rest = label.partition("_")
    if not layer.isdigit():
        return f"{prefix}hook_{label}"
    return f"{prefix}blocks.{layer}.hook_{rest}"


def _normalize(norm: Any, x: Tensor) -> Tensor:
    """`norm` applied to `x` (..., d_model) on its own statistics, in x's dtype (no hooks run)."""
    if not hasattr(norm, "hook_scale"):  # Identity: no final norm
        return x
    if norm.centre:
        x = x - x.mean(-1, keepdim=True)
    out = x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * norm.w.detach().to(x)
    return out if norm.b is None else out + norm.b.detach().to(x)
