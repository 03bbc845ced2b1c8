"""`process_weights`: the weight processing TransformerLens users rely on, on a copy of the model.

- Fold each pre-norm's weight and bias into the matrices that read its output: `ln1` into W_Q/W_K/W_V
  (and b_Q/b_K/b_V), `ln2` into W_in/W_gate (and b_in), `ln_cross` into the cross-attention's W_Q,
  the encoder's `ln_final` into every cross-attention's W_K/W_V, the last `ln_final` into W_U (and b_U).
  The norm is then unweighted (w = 1, b = 0): glassformer's own norm with unit gain is TransformerLens'
  "LNPre", so no new norm kind is needed.
- Fold the value biases into b_O: attention rows sum to one, so b_V reaches the output as b_V @ W_O.
- Centre the writing weights (W_E, W_pos, W_token_type, W_O, b_O, W_out, b_out) on their d_model axis:
  every reader of the residual stream is a LayerNorm, which removes the mean anyway.
- Centre the unembedding (W_U, b_U) over the vocabulary: softmax ignores a constant added to all logits.

The result computes the same probabilities; its intermediate activations differ (that is the point:
they are easier to read). A tied unembedding is untied first, since W_U and W_E change differently.
Steps that would change the output for a config are skipped, and `cfg.extra["processed"]` lists
the steps that were applied.

Legend: n_heads, n_kv_heads, d_head, d_model, d_mlp, d_vocab.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from glassformer.cells.attention import Attention
from glassformer.cells.norm import Norm
from glassformer.model import Transformer


def process_weights(
    model: Transformer,
    fold_ln: bool = True,
    fold_value_biases: bool = True,
    centre_writing_weights: bool = True,
    centre_unembed: bool = True,
) -> Transformer:
    """A processed copy of `model` that computes the same probabilities; `model` is left untouched."""
    cfg = model.cfg
    pre_layernorm = cfg.norm == "layernorm" and cfg.norm_position == "pre"
    steps = {
        "fold_ln": fold_ln and cfg.norm != "none" and cfg.norm_position == "pre",
        "fold_value_biases": fold_value_biases and cfg.bias,
        "centre_writing_weights": centre_writing_weights and pre_layernorm,  # only LayerNorm removes the mean
        "centre_unembed": centre_unembed,
    }
    new = _untied_copy(model, [name for name, on in steps.items() if on])
    with torch.no_grad():
        if steps["fold_ln"]:
            kept = _fold_norms(new)
            if kept:  # recorded, so nobody mistakes a kept norm gain for a folded one
                new.cfg.extra["processed"].append(f"fold_ln kept {', '.join(kept)} (W_gate has no bias)")
        if steps["fold_value_biases"]:
            for attn in _attentions(new):
                _fold_value_bias(attn)
        if steps["centre_writing_weights"]:
            _centre_writing(new)
        if steps["centre_unembed"]:
            _centre_unembed(new)
    return new


def _untied_copy(model: Transformer, steps: list[str]) -> Transformer:
    """A new model with `model`'s weights, on its device and dtype; its own W_U if W_E was shared."""
    cfg = dataclasses.replace(
        model.cfg, tie_embeddings=False, extra={**model.cfg.extra, "processed": steps}
    )  # derived sizes are already filled in, so the copy has exactly the same shapes
    first = next(model.parameters())
    new = Transformer(cfg, seed=0).to(device=first.device, dtype=first.dtype)  # seeded: global RNG untouched
    state = dict(model.state_dict())
    if model.cfg.tie_embeddings:
        state["unembed.weight"] = model.embed.W_E.detach().clone()  # (d_vocab, d_model)
    new.load_state_dict(state)
    return new.train(model.training)


def _stacks(model: Transformer) -> list[nn.Module]:
    return [model.encoder, model.decoder] if model.cfg.arch == "encoder-decoder" else [model]


def _attentions(model: Transformer) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def _fold_norms(model: Transformer) -> list[str]:
    """Each pre-norm's w and b into the readers of its output; the norm keeps only its normalising.
    Returns the norms that could not be folded."""
    kept = []
    prefixes = ("encoder.", "decoder.") if model.cfg.arch == "encoder-decoder" else ("",)
    for prefix, stack in zip(prefixes, _stacks(model), strict=True):
        for i, block in enumerate(stack.blocks):
            shared = block.mlp is not None and block.ln2 is None  # the MLP reads ln1 too (GPT-J)
            if not _fold(block.ln1, [(block.attn, "QKV")], [block.mlp] if shared else []):
                kept.append(f"{prefix}blocks.{i}.ln1")
            if block.cross_attn is not None:
                _fold(block.ln_cross, [(block.cross_attn, "Q")], [])
            if block.mlp is not None and not shared and not _fold(block.ln2, [], [block.mlp]):
                kept.append(f"{prefix}blocks.{i}.ln2")
    if model.cfg.arch == "encoder-decoder":
        _fold(model.encoder.ln_final, [(block.cross_attn, "KV") for block in model.decoder.blocks], [])
    root = model.decoder if model.cfg.arch == "encoder-decoder" else model
    if not model.cfg.head_transform and model.pooler is None:  # ln_final's only reader is then W_U
        _fold_into_unembed(root.ln_final, model)
    return kept


def _fold(norm: nn.Module, attentions: list[tuple[Attention, str]], mlps: list[nn.Module]) -> bool:
    """Fold `norm` into attention projections (which of Q, K, V) and MLP inputs that read it;
    False if it cannot be folded."""
    if not isinstance(norm, Norm):
        return True
    w, b = norm.w, norm.b  # (d_model,)
    if b is not None and any(m.gate_weight is not None for m in mlps):
        return False  # W_gate has no bias to take b @ W_gate: this norm stays as it is
    for attn, parts in attentions:
        for part in parts:
            weight = getattr(attn, f"W_{part}")  # (heads, d_model, d_head)
            bias = getattr(attn, f"b_{part}")  # (heads, d_head) or None
            if bias is not None and b is not None:
                setattr(attn, f"b_{part}", bias + torch.einsum("m,hmd->hd", b, weight))
            setattr(attn, f"W_{part}", weight * w[None, :, None])
    for mlp in mlps:
        if mlp.b_in is not None and b is not None:
            mlp.b_in.copy_(mlp.b_in + b @ mlp.W_in)
        mlp.W_in = mlp.W_in * w[:, None]  # (d_model, d_mlp)
        if mlp.gate_weight is not None:
            mlp.W_gate = mlp.W_gate * w[:, None]
    _unweight(norm)
    return True


def _fold_into_unembed(norm: nn.Module, model: Transformer) -> None:
    if not isinstance(norm, Norm):
        return
    unembed = model.unembed
    if unembed.b_U is not None and norm.b is not None:
        unembed.b_U.copy_(unembed.b_U + norm.b @ unembed.W_U)
    unembed.W_U = unembed.W_U * norm.w[:, None]  # (d_model, d_vocab)
    _unweight(norm)


def _unweight(norm: Norm) -> None:
    norm.w.fill_(1.0)
    if norm.b is not None:
        norm.b.zero_()


def _fold_value_bias(attn: Attention) -> None:
    """b_O += Σ_h b_V[h] @ W_O[h]; b_V = 0. Exact because each query's attention weights sum to one."""
    if attn.b_V is None or attn.b_O is None:
        return
    b_v = attn.b_V.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=0)  # (n_heads, d_head)
    attn.b_O.add_(torch.einsum("hd,hdm->m", b_v, attn.W_O))
    attn.b_V = torch.zeros_like(attn.b_V)


def _centred(x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True)


def _centre_writing(model: Transformer) -> None:
    """Every matrix and bias that writes into a residual stream, centred on d_model."""
    model.embed.W_E.copy_(_centred(model.embed.W_E))  # (d_vocab, d_model)
    for stack in _stacks(model):
        if stack.pos_embed is not None and isinstance(stack.pos_embed.W_pos, nn.Parameter):  # learned table
            stack.pos_embed.W_pos.copy_(_centred(stack.pos_embed.W_pos))  # (n_ctx, d_model)
        if stack.token_type_embed is not None:
            stack.token_type_embed.W_token_type.copy_(_centred(stack.token_type_embed.W_token_type))
        for block in stack.blocks:
            for attn in (block.attn, block.cross_attn):
                if attn is not None:
                    attn.W_O = _centred(attn.W_O)  # (n_heads, d_head, d_model)
                    if attn.b_O is not None:
                        attn.b_O.copy_(_centred(attn.b_O))
            if block.mlp is not None:
                block.mlp.W_out = _centred(block.mlp.W_out)  # (d_mlp, d_model)
                if block.mlp.b_out is not None:
                    block.mlp.b_out.copy_(_centred(block.mlp.b_out))


def _centre_unembed(model: Transformer) -> None:
    """W_U and b_U centred over the vocabulary: every logit moves by the same amount per position."""
    unembed = model.unembed
    unembed.W_U = _centred(unembed.W_U)  # (d_model, d_vocab)
    if unembed.b_U is not None:
        unembed.b_U.copy_(unembed.b_U - unembed.b_U.mean())
