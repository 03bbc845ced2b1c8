"""T5 (`t5`: T5, T5 v1.1, Flan-T5): encoder-decoder, pre-RMSNorm without biases, no 1/sqrt(d)
score scaling, a relative position bias per stack (stored in each stack's first block), ReLU or
gated-GELU MLPs, and in the original T5 the decoder's output scaled by d_model^-1/2 before the
(tied) embedding turns it into logits.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from glassformer.checkpoints.tables import Family, HFState, map_rows, same, stacked
from glassformer.config import Config
from glassformer.errors import CheckpointError

# T5's feed_forward_proj -> our activation
ACTS = {"relu": "relu", "gated-gelu": "geglu", "gated-silu": "swiglu", "gelu": "gelu_new"}


def attention(ours: str, theirs: str) -> list:
    return [
        (f"{ours}.qkv_weight", tuple(f"{theirs}.{p}.weight" for p in "qkv"), stacked),
        (f"{ours}.o_weight", f"{theirs}.o.weight", same),
    ]


def mlp(cfg: Config, theirs: str) -> list:
    """wi (or wi_0, the gate, and wi_1) and wo of a DenseReluDense / DenseGatedActDense layer."""
    if cfg.gated:
        inputs = [("mlp.gate_weight", f"{theirs}.wi_0.weight", same), ("mlp.in_weight", f"{theirs}.wi_1.weight", same)]
    else:
        inputs = [("mlp.in_weight", f"{theirs}.wi.weight", same)]
    return [*inputs, ("mlp.out_weight", f"{theirs}.wo.weight", same)]


def layer(cfg: Config, decoder: bool) -> list:
    """One block's rows: self-attention, (cross-attention,) MLP, each with the norm before it."""
    rows = attention("attn", "layer.0.SelfAttention") + [("ln1.w", "layer.0.layer_norm.weight", same)]
    if decoder:
        rows += attention("cross_attn", "layer.1.EncDecAttention") + [("ln_cross.w", "layer.1.layer_norm.weight", same)]
    last = "layer.2" if decoder else "layer.1"
    return rows + mlp(cfg, f"{last}.DenseReluDense") + [("ln2.w", f"{last}.layer_norm.weight", same)]


def config(hf: dict[str, Any], get: HFState) -> Config:
    act = hf.get("feed_forward_proj", "relu")
    if act not in ACTS:
        raise CheckpointError(f"T5 feed_forward_proj {act!r} is not supported; supported: {', '.join(ACTS)}")
    decoder_heads = hf.get("num_heads")
    if hf.get("num_decoder_layers") is not None and decoder_heads != hf["num_heads"]:
        raise CheckpointError("T5 with different head counts in encoder and decoder is not supported")
    tied = bool(hf.get("tie_word_embeddings", True))
    # transformers 5 ties the head always and says with scale_decoder_outputs whether to scale (T5 does,
    # T5 v1.1 does not); configs written before say both with tie_word_embeddings
    scaled = bool(hf.get("scale_decoder_outputs", tied))
    return Config(
        arch="encoder-decoder",
        d_model=hf["d_model"],
        n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        n_heads=hf["num_heads"],
        d_head=hf["d_kv"],
        d_mlp=hf["d_ff"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf.get("n_positions") or 512,
        positional="relative",
        relative_buckets=hf["relative_attention_num_buckets"],
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        attn_scale=1.0,
        norm="rmsnorm",
        eps=hf["layer_norm_epsilon"],
        act=ACTS[act],
        bias=False,
        tie_embeddings=tied,
        unembed_scale=hf["d_model"] ** -0.5 if scaled else 1.0,
        extra={"hf_model_type": "t5", "decoder_start_token_id": hf.get("decoder_start_token_id", 0)},
    )


def weights(get: HFState, cfg: Config) -> dict[str, Tensor]:
    state = {"embed.W_E": get("shared.weight")}
    if not cfg.tie_embeddings:
        state["unembed.weight"] = get("lm_head.weight")
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        state[f"{stack}.pos_bias.W_rel"] = get(bias)  # (num_buckets, n_heads), shared by the stack's layers
        state[f"{stack}.ln_final.w"] = get(f"{stack}.final_layer_norm.weight")
        rows = layer(cfg, decoder=stack == "decoder")
        for i in range(n_layers):
            state |= map_rows(get, rows, cfg, ours=f"{stack}.blocks.{i}.", theirs=f"{stack}.block.{i}.")
    return state


FAMILY = Family(config, weights, prefixes=())
