"""Direct logit attribution: how much each component writes, directly, into one logit.

In a pre-norm model the final residual stream is a sum: the embeddings, each head's `result`, each
attention bias `b_O`, each MLP's output. The final norm is linear once its scale is fixed, so with
the scale the run actually used (`ln_final.hook_scale`, from the cache) every component maps to a
share of the logit:

    logit[t] = Σ_c  (c - mean(c)) / scale · w_ln · W_U[:, t]   +   (b_ln · W_U[:, t] + b_U[t])

(no `- mean(c)` under RMSNorm, no scale without a final norm). The shares plus the bias term add up
to the logit exactly, up to float rounding. Post-norm models (a norm after every residual add) and
BERT's head transform are not sums of components, and are refused.

Legend: batch, pos, n_heads, d_model, d_vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glassformer.cache_algebra import check_linear_head
from glassformer.inspect.inputs import TokensOrText, as_tokens, id_strings, token_id
from glassformer.model import Transformer


@dataclass
class Attribution:
    """Each component's direct contribution to one logit (or a difference of two) per sequence."""

    labels: list[str]  # "embed", "pos_embed", "L0H1" (layer 0 head 1), "L0 b_O", "L1 mlp", "bias", …
    values: Tensor  # (n_components, batch)
    logit: Tensor  # (batch,) what the model computed: the sum of `values`, up to rounding
    what: str = "logit"  # which logit: "logit[' Paris']", "logit[' Paris'] - logit[' London']"

    def heads(self, n_layers: int, n_heads: int, kind: str = "H") -> Tensor:
        """(n_layers, n_heads) mean contributions of the heads (`kind="X"`: the cross-attention heads)."""
        index = {label: i for i, label in enumerate(self.labels)}
        return torch.stack(
            [
                torch.stack([self.values[index[f"L{layer}{kind}{h}"]].mean() for h in range(n_heads)])
                for layer in range(n_layers)
            ]
        )

    def __str__(self) -> str:
        mean = self.values.mean(dim=1)  # (n_components,)
        order = mean.abs().argsort(descending=True).tolist()
        lines = [f"{self.what} {self.logit.mean().item():+.4f} = sum of (mean over the batch, largest first):"]
        lines += [f"  {self.labels[i]:<12} {mean[i].item():+.4f}" for i in order]
        return "\n".join(lines)


def _components(model: Transformer, cache: dict, stack: str, position: int) -> tuple[list[str], list[Tensor]]:
    """The pieces of the final residual stream at `position`, each (batch, d_model)."""
    s = model.decoder if model.cfg.arch == "encoder-decoder" else model
    labels, parts = [], []
    if model.cfg.embed_norm:  # the embedding norm mixes the embeddings: block 0 reads one vector
        labels.append("embeddings")
        parts.append(cache[f"{stack}blocks.0.hook_resid_pre"][:, position])
    else:
        for hook in ("hook_embed", "hook_pos_embed", "hook_token_type_embed"):
            if f"{stack}{hook}" in cache:
                labels.append(hook.removeprefix("hook_"))
                parts.append(cache[f"{stack}{hook}"][:, position])
    for layer, block in enumerate(s.blocks):
        for attn, tag in (("attn", "H"), ("cross_attn", "X")):
            if getattr(block, attn) is None:
                continue
            result = cache[f"{stack}blocks.{layer}.{attn}.hook_result"][:, position]  # (batch, n_heads, d_model)
            for head in range(result.shape[1]):
                labels.append(f"L{layer}{tag}{head}")
                parts.append(result[:, head])
            if getattr(block, attn).b_O is not None:
                labels.append(f"L{layer} {'b_O' if tag == 'H' else 'cross b_O'}")
                parts.append(getattr(block, attn).b_O.expand_as(result[:, 0]))
        if block.mlp is not None:
            labels.append(f"L{layer} mlp")
            parts.append(cache[f"{stack}blocks.{layer}.hook_mlp_out"][:, position])
    return labels, parts


def direct_logit_attribution(
    model: Transformer,
    tokens: TokensOrText,
    target: int | str,
    wrong: int | str | None = None,
    position: int = -1,
    tgt: TokensOrText | None = None,
) -> Attribution:
    """Each component's direct share of `logits[:, position, target]` (minus `wrong`'s, if given).

    For an encoder-decoder model pass the decoder tokens as `tgt`; the decoder's stream is decomposed
    (the encoder reaches it only through cross-attention, whose heads are components `L{i}X{h}`).
    Tokens may be text, and `target`/`wrong` the text of one token each (`model.to_single_token`).
    """
    check_linear_head(model.cfg, "direct logit attribution", cells=True)
    tokens = as_tokens(model, tokens)
    tgt = as_tokens(model, tgt, "tgt") if tgt is not None else None
    target = token_id(model, target, "target")
    wrong = token_id(model, wrong, "wrong") if wrong is not None else None
    stack = "decoder." if model.cfg.arch == "encoder-decoder" else ""
    inputs = (tokens,) if tgt is None else (tokens, tgt)
    with torch.no_grad():
        logits, cache = model.run_with_cache(*inputs, names_filter=_needed)
        labels, parts = _components(model, cache, stack, position)
        stream = torch.stack(parts)  # (n_components, batch, d_model)
        shares = cache.logit_attrs(stream, target, wrong, pos_slice=position)  # (n_components, batch)
        bias = _bias(model, target, wrong).expand(1, stream.shape[1])  # (1, batch)
        values = torch.cat([shares, bias])  # (n_components + 1, batch)
        logit = logits[:, position, target] - (logits[:, position, wrong] if wrong is not None else 0)  # (batch,)
    return Attribution([*labels, "bias"], values, logit, _what(model, target, wrong))


def _what(model: Transformer, target: int, wrong: int | None) -> str:
    """The attributed quantity in words, with the tokens as strings: "logit[' Paris'] - logit[' London']"."""
    names = id_strings(model.tokenizer, [target] if wrong is None else [target, wrong])
    return " - ".join(f"logit[{name!r}]" if model.tokenizer is not None else f"logit[{name}]" for name in names)


def _needed(name: str) -> bool:
    """The hooks the decomposition reads (caching only these keeps the rest on the fast path)."""
    ends = (
        "hook_result",
        "hook_mlp_out",
        "hook_embed",
        "hook_pos_embed",
        "hook_token_type_embed",
        "ln_final.hook_scale",
    )
    return name.endswith(ends) or name.endswith("blocks.0.hook_resid_pre")


def _bias(model: Transformer, target: int, wrong: int | None) -> Tensor:
    """The logit's constant part: b_U[target] and the final norm's bias read through W_U (less wrong's)."""
    norm = model.decoder.ln_final if model.cfg.arch == "encoder-decoder" else model.ln_final
    w_u = model.unembed.W_U * model.cfg.unembed_scale  # (d_model, d_vocab); the head scales x first

    def constant(token: int) -> Tensor:
        out = torch.zeros((), device=w_u.device)
        if model.unembed.b_U is not None:
            out = out + model.unembed.b_U[token]
        if getattr(norm, "b", None) is not None:
            out = out + norm.b @ w_u[:, token]
        return out

    return constant(target) - (constant(wrong) if wrong is not None else 0)
