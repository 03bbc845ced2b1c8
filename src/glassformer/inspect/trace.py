"""`trace`: the walk of one token through the model, cell by cell, with shapes and numbers.

Every step names its cell, the operation, the hook it comes from and the full tensor shape; the
numbers shown are the traced token's slice, all of them when they fit, the largest otherwise.
Dot product, scale, relative position bias (T5) and mask are separate steps, recomputed from the
cached q and k so the arithmetic of the scores cell is visible even though the model computes them
in one go.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from glassformer.errors import InputError
from glassformer.hooks import ActivationCache
from glassformer.inspect.inputs import TokensOrText, as_tokens, token_labels
from glassformer.model import Transformer


@dataclass
class Step:
    """One cell's output for the traced token."""

    cell: str  # what the diagram calls it: "attention scores", "residual add", …
    op: str  # the operation, as a formula
    hook: str  # the hook point it is read from ("" for a step derived from hooks)
    shape: tuple[int, ...]  # the whole tensor's shape (all tokens, all heads)
    values: Tensor  # the traced token's slice: (d,) or (n_heads, d)


@dataclass
class Trace:
    """The steps of one token's path; `str(trace)` renders it for the terminal."""

    title: str
    steps: list[Step]
    max_values: int = 8

    def __str__(self) -> str:
        lines = [self.title]
        for i, step in enumerate(self.steps, 1):
            lines.append(f"{i:>3}. {step.cell:<30} {step.op}")
            where = f"{step.hook}  " if step.hook else ""
            lines.append(f"     {where}shape {tuple(step.shape)}")
            lines.extend(f"       {row}" for row in _rows(step.values, self.max_values))
        return "\n".join(lines)


def _fmt(v: Tensor, max_values: int) -> str:
    """All values when they fit; else the largest in magnitude, with their indices, and the norm.
    A matrix (one row per key) is shown whole when it is small, else as its shape and norm."""
    if v.dim() == 2:
        if v.numel() <= 4 * max_values:
            return "[" + ", ".join(_fmt(row, max_values) for row in v) + "]"
        return f"({v.shape[0]} × {v.shape[1]} values, |x|={v.norm().item():.3f})"
    if v.numel() <= max_values:
        return "[" + ", ".join(f"{x:.3f}" for x in v.tolist()) + "]"
    top = v.abs().topk(max_values // 2).indices.tolist()
    shown = ", ".join(f"[{i}]={v[i].item():.3f}" for i in top)
    return f"largest: {shown} … (|x|={v.norm().item():.3f}, {v.numel()} values)"


def _rows(values: Tensor, max_values: int) -> list[str]:
    if values.dim() == 1:
        return [_fmt(values, max_values)]
    return [f"head {h}: {_fmt(row, max_values)}" for h, row in enumerate(values)]


class _Walker:
    """Collects the steps of one position from a full activation cache."""

    def __init__(self, model: Transformer, cache: ActivationCache, batch: int, pos: int) -> None:
        self.model, self.cache, self.b, self.p = model, cache, batch, pos
        self.steps: list[Step] = []

    def add(self, cell: str, op: str, hook: str, values: Tensor | None = None, source: str = "") -> None:
        """A step read from `hook` (or, when `source` says so, recomputed with that hook's shape)."""
        full = self.cache[hook]
        if values is None:
            values = full[self.b, self.p]
        self.steps.append(Step(cell, op, source or hook, tuple(full.shape), values.float()))

    def has(self, hook: str) -> bool:
        return hook in self.cache

    def norm(self, prefix: str, what: str) -> None:
        if self.has(f"{prefix}.hook_normalized"):
            kind = "LayerNorm" if self.model.cfg.norm == "layernorm" else "RMSNorm"
            self.add(
                f"{kind} ({what})",
                "(x - mean) / sqrt(var + eps) · w + b" if kind == "LayerNorm" else "x / sqrt(mean(x²) + eps) · w",
                f"{prefix}.hook_normalized",
            )

    def embedding(self, prefix: str) -> None:
        self.add("token embedding", "W_E[token]", f"{prefix}hook_embed")
        if self.has(f"{prefix}hook_pos_embed"):
            self.add("positional encoding", f"{self.model.cfg.positional} table[position]", f"{prefix}hook_pos_embed")

    def attention(self, a: str, causal: bool) -> None:
        """Cells 3-6 for attention module path `a` (…attn or …cross_attn)."""
        c, b, p = self.cache, self.b, self.p
        module = self.model.get_submodule(a)
        src = "x" if a.endswith(".attn") else "encoder output"
        self.add("query projection", "q = x @ W_Q + b_Q", f"{a}.hook_q", c[f"{a}.hook_q"][b, p])
        self.add("key projection", f"k = {src} @ W_K + b_K", f"{a}.hook_k", c[f"{a}.hook_k"][b].transpose(0, 1))
        self.add("value projection", f"v = {src} @ W_V + b_V", f"{a}.hook_v", c[f"{a}.hook_v"][b].transpose(0, 1))
        q, k = c[f"{a}.hook_q"], c[f"{a}.hook_k"]
        if self.has(f"{a}.q_norm.hook_normalized"):
            over = "each head" if module.qk_norm_heads else "all heads together"
            q, k = (c[f"{a}.{n}.hook_normalized"].view_as(t) for n, t in (("q_norm", q), ("k_norm", k)))
            self.add("query norm", f"RMSNorm of q over {over}", f"{a}.q_norm.hook_normalized", q[b, p])
            self.add("key norm", f"RMSNorm of k over {over}", f"{a}.k_norm.hook_normalized", k[b].transpose(0, 1))
        if self.has(f"{a}.hook_rot_q"):
            q, k = c[f"{a}.hook_rot_q"], c[f"{a}.hook_rot_k"]
            self.add("rotary (queries)", "rotate q by position", f"{a}.hook_rot_q", q[b, p])
            self.add("rotary (keys)", "rotate k by position", f"{a}.hook_rot_k", k[b].transpose(0, 1))
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # (batch, k_pos, n_heads, d_head)
        dots = torch.einsum("hd,khd->hk", q[b, p], k[b])  # (n_heads, k_pos)
        scores_hook, source = f"{a}.hook_attn_scores", "recomputed from q and k"
        self.add("attention scores", "q · k (dot product with every key)", scores_hook, dots, source)
        default = math.isclose(module.scale, 1 / math.sqrt(q.shape[-1]))
        factor = "1/sqrt(d_head)" if default else "the configured scale"
        self.add("attention scores", f"× {factor} = × {module.scale:.4f}", scores_hook, dots * module.scale, source)
        bias_hook = a.split("blocks.")[0] + "hook_position_bias"  # the stack's relative position bias
        if a.endswith(".attn") and self.has(bias_hook):
            bias = c[bias_hook][0, :, p]  # (n_heads, k_pos)
            self.add("relative position bias", "W_rel[bucket(key − query)] per head", bias_hook, bias)
            biased = dots * module.scale + bias  # (n_heads, k_pos)
            recomputed = "recomputed from q, k and the bias"
            self.add("attention scores", "+ relative position bias", scores_hook, biased, recomputed)
        masked = c[scores_hook][b, :, p]  # (n_heads, k_pos)
        if causal or bool(torch.isinf(masked).any()):
            what = "causal" if causal else "padding"
            if module.window is not None:
                what += f", sliding window of {module.window} keys"
            self.add("attention mask", f"-inf where masked ({what})", scores_hook, masked)
        if self.has(f"{a}.hook_attn_scores_capped"):
            cap = module.softcap
            self.add(
                "soft-capping",
                f"scores = {cap:g} · tanh(scores / {cap:g})",
                f"{a}.hook_attn_scores_capped",
                c[f"{a}.hook_attn_scores_capped"][b, :, p],
            )
        self.add("softmax", "pattern = softmax(scores) over keys", f"{a}.hook_pattern", c[f"{a}.hook_pattern"][b, :, p])
        self.add("weighted sum", "z = pattern @ v", f"{a}.hook_z")
        self.add("per-head result", "result_h = z_h @ W_O[h]", f"{a}.hook_result")

    def block(self, prefix: str, causal: bool) -> None:
        self.add("residual stream in", "resid_pre", f"{prefix}.hook_resid_pre")
        if not self.has(f"{prefix}.hook_resid_mid"):  # a parallel block: no stream between the cells
            self.parallel(prefix, causal)
            return
        self.sublayer(
            prefix,
            "ln1",
            "attention",
            "attn_out",
            "resid_pre",
            "resid_mid",
            lambda: self.attention(f"{prefix}.attn", causal),
        )
        if self.has(f"{prefix}.cross_attn.hook_q"):
            self.sublayer(
                prefix,
                "ln_cross",
                "cross-attention",
                "cross_attn_out",
                "resid_mid",
                "resid_mid_cross",
                lambda: self.attention(f"{prefix}.cross_attn", causal=False),
            )
        if self.has(f"{prefix}.hook_mlp_out"):
            before = "resid_mid_cross" if self.has(f"{prefix}.hook_resid_mid_cross") else "resid_mid"
            self.sublayer(prefix, "ln2", "MLP", "mlp_out", before, "resid_post", lambda: self.mlp(f"{prefix}.mlp"))
        else:
            self.add("block output", "resid_post = resid_mid (attention only)", f"{prefix}.hook_resid_post")

    def parallel(self, prefix: str, causal: bool) -> None:
        """Attention and MLP both read resid_pre (always pre-norm); one add takes both outputs."""
        self.norm(f"{prefix}.ln1", "before attention")
        self.attention(f"{prefix}.attn", causal)
        self.add("attention output", "attn_out = Σ_h result_h + b_O", f"{prefix}.hook_attn_out")
        self.norm(f"{prefix}.ln2", "before MLP")
        self.mlp(f"{prefix}.mlp")
        self.add("MLP output", f"mlp_out = {self.mlp_merge(f'{prefix}.mlp')}", f"{prefix}.hook_mlp_out")
        self.add("residual add", "resid_post = resid_pre + attn_out + mlp_out", f"{prefix}.hook_resid_post")

    def sublayer(self, prefix: str, ln: str, what: str, out: str, before: str, after: str, cell: Callable) -> None:
        """Pre-norm: norm, cell, residual add. Post-norm: cell, then residual add and norm together.
        Sandwich / output norm: (norm,) cell, the norm of the cell's output, residual add."""
        post_norm = self.model.cfg.norm_position == "post"
        if not post_norm:
            self.norm(f"{prefix}.{ln}", f"before {what}")
        cell()
        merge = "Σ_h result_h + b_O" if what.endswith("attention") else self.mlp_merge(f"{prefix}.mlp")
        if self.has(f"{prefix}.{ln}_post.hook_normalized"):
            self.norm(f"{prefix}.{ln}_post", f"of the {what} output")
            merge = f"norm({merge})"
        self.add(f"{what} output", f"{out} = {merge}", f"{prefix}.hook_{out}")
        added = f"{before} + {out}"
        if post_norm and self.has(f"{prefix}.{ln}.hook_normalized"):
            added = f"norm({added})"
        self.add("residual add", f"{after} = {added}", f"{prefix}.hook_{after}")

    def mlp_merge(self, m: str) -> str:
        """The MLP's last operation, as a formula."""
        if not self.has(f"{m}.hook_router_logits"):
            return "post @ W_out + b_out"
        return "Σ_e expert_out_e + shared" if self.has(f"{m}.hook_shared_out") else "Σ_e expert_out_e"

    def mlp(self, m: str) -> None:
        act = self.model.cfg.act
        if self.has(f"{m}.hook_router_logits"):
            self.experts(m)
        elif self.has(f"{m}.hook_pre_linear"):
            self.add("MLP gate", "gate = x @ W_gate", f"{m}.hook_pre")
            self.add("MLP in", "lin = x @ W_in + b_in", f"{m}.hook_pre_linear")
            gate = "gelu_tanh" if act == "geglu" else "silu"
            self.add("MLP activation", f"post = {gate}(gate) · lin", f"{m}.hook_post")
        else:
            self.add("MLP in", "pre = x @ W_in + b_in", f"{m}.hook_pre")
            self.add("MLP activation", f"post = {act}(pre)", f"{m}.hook_post")

    def experts(self, m: str) -> None:
        """Router, routing weights, the write of each expert the token is routed to, the shared expert."""
        cfg = self.model.cfg
        self.add("router", "logits = x @ W_router", f"{m}.hook_router_logits")
        renorm = ", renormalised to sum 1" if cfg.norm_topk_prob else ""
        op = f"top-{cfg.n_experts_per_token} of softmax(logits){renorm}, 0 elsewhere"
        self.add("expert weights", op, f"{m}.hook_expert_weights")
        weights = self.cache[f"{m}.hook_expert_weights"][self.b, self.p]  # (n_experts,)
        for e in weights.nonzero().flatten().tolist():
            op = f"expert_out_{e} = {weights[e].item():.3f} · expert_{e}(x)  (SwiGLU MLP)"
            self.add(f"expert {e}", op, f"{m}.hook_expert_out.{e}")
        if self.has(f"{m}.hook_shared_out"):
            self.add("shared expert gate", "gate = sigmoid(x @ W_shared_gate)", f"{m}.hook_shared_gate")
            self.add("shared expert", "shared = gate · shared_expert(x)", f"{m}.hook_shared_out")


def trace(
    model: Transformer,
    tokens: TokensOrText,
    tgt: TokensOrText | None = None,
    position: int = -1,
    batch_index: int = 0,
    labels: list[str] | None = None,
    max_values: int = 8,
) -> Trace:
    """Trace token `position` of sequence `batch_index` through every cell (for an encoder-decoder
    model, a target position through the decoder, after the encoder has run). Tokens may be text;
    `labels` (the traced sequence's token strings) default to the tokenizer's."""
    tokens = as_tokens(model, tokens)
    if tgt is not None:
        tgt = as_tokens(model, tgt, "tgt")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, tgt) if tgt is not None else model.run_with_cache(tokens)
    n_batch, n_pos = logits.shape[:2]
    if not -n_pos <= position < n_pos:
        raise InputError(f"position={position} is outside the {n_pos} tokens (expected -{n_pos} … {n_pos - 1})")
    if not -n_batch <= batch_index < n_batch:
        raise InputError(f"batch_index={batch_index} is outside the batch of {n_batch} sequences")
    pos = position % n_pos
    labels = labels or token_labels(model, tokens if tgt is None else tgt, batch_index)
    walker = _Walker(model, cache, batch_index, pos)
    cfg = model.cfg
    stack, n_layers = ("decoder.", cfg.n_decoder_layers) if cfg.arch == "encoder-decoder" else ("", cfg.n_layers)
    walker.embedding(stack)
    for layer in range(n_layers):
        walker.block(f"{stack}blocks.{layer}", causal=cfg.arch != "encoder")
    walker.norm(f"{stack}ln_final", "final")
    if walker.has("unembed.hook_logits_uncapped"):
        walker.add("output head", "logits = x @ W_U + b_U", "unembed.hook_logits_uncapped")
        walker.add(
            "soft-capping", f"logits = {cfg.final_softcap:g} · tanh(logits / {cfg.final_softcap:g})", "hook_logits"
        )
    else:
        scaled = "" if cfg.unembed_scale == 1.0 else f" · {cfg.unembed_scale:.4f}"
        walker.add("output head", f"logits = x{scaled} @ W_U + b_U", "hook_logits")
    label = f' ("{labels[pos]}")' if labels else ""
    title = (
        f"glassformer trace: {cfg.arch}, {n_layers} layer(s), d_model={cfg.d_model}, "
        f"{cfg.n_heads} heads × d_head={cfg.d_head}; token {pos}{label} of {n_pos}"
    )
    return Trace(title, walker.steps, max_values)
