"""from_hf: the same numbers as `transformers` on the same (random, seeded) weights."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import glassformer as gf  # noqa: E402

SMALL_LLAMA = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    vocab_size=101,
    max_position_embeddings=64,
)


def build(family):
    """A small Hugging Face model with random weights, built offline from its config."""
    torch.manual_seed(0)
    t = transformers
    models = {
        "gpt2": lambda: t.GPT2LMHeadModel(
            t.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0, eos_token_id=0)
        ),
        "gpt2-untied-relu": lambda: t.GPT2LMHeadModel(
            t.GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=2,
                vocab_size=101,
                n_positions=64,
                n_inner=40,
                activation_function="relu",
                tie_word_embeddings=False,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**SMALL_LLAMA, rope_theta=500.0)),
        "llama-mqa-tied": lambda: t.LlamaForCausalLM(
            t.LlamaConfig(**{**SMALL_LLAMA, "num_key_value_heads": 1}, tie_word_embeddings=True, attention_bias=True)
        ),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL_LLAMA)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**SMALL_LLAMA, sliding_window=5)),
        "mistral-unwindowed": lambda: t.MistralForCausalLM(t.MistralConfig(**SMALL_LLAMA, sliding_window=None)),
        "qwen2-sliding": lambda: t.Qwen2ForCausalLM(
            t.Qwen2Config(**SMALL_LLAMA, use_sliding_window=True, sliding_window=4, max_window_layers=1)
        ),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**SMALL_LLAMA, head_dim=12)),
        "qwen3-sliding-bias": lambda: t.Qwen3ForCausalLM(
            t.Qwen3Config(
                **SMALL_LLAMA, use_sliding_window=True, sliding_window=4, max_window_layers=1, attention_bias=True
            )
        ),
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**SMALL_LLAMA, head_dim=16)),
        "gemma2": lambda: t.Gemma2ForCausalLM(
            t.Gemma2Config(
                **SMALL_LLAMA,
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=4,
                attn_logit_softcapping=2.0,
                final_logit_softcapping=3.0,
            )
        ),
        "gemma3": lambda: t.Gemma3ForCausalLM(
            t.Gemma3TextConfig(
                **{**SMALL_LLAMA, "num_hidden_layers": 7},
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=4,
                rope_parameters={
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                },
            )
        ),
        "gemma3-scaled": lambda: t.Gemma3ForCausalLM(  # the global layers' rotary scaled, the local ones not
            t.Gemma3TextConfig(
                **{**SMALL_LLAMA, "num_hidden_layers": 6},
                head_dim=16,
                sliding_window=4,
                initializer_range=0.3,
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                },
            )
        ),
        "phi3-longrope": lambda: t.Phi3ForCausalLM(
            t.Phi3Config(
                **{**SMALL_LLAMA, "max_position_embeddings": 64},
                original_max_position_embeddings=8,
                pad_token_id=0,
                eos_token_id=1,
                initializer_range=0.3,
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0, 1.5, 2.0, 2.5],
                    "long_factor": [2.0, 4.0, 6.0, 8.0],
                },
            )
        ),
        "olmo2": lambda: t.Olmo2ForCausalLM(t.Olmo2Config(**SMALL_LLAMA, pad_token_id=0)),
        "phi3": lambda: t.Phi3ForCausalLM(
            t.Phi3Config(
                **SMALL_LLAMA,
                pad_token_id=0,
                eos_token_id=1,
                sliding_window=5,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
            )
        ),
        "gptj": lambda: t.GPTJForCausalLM(t.GPTJConfig(**GPTJ)),
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(**SMALL_MOE, num_local_experts=4, sliding_window=None)),
        "qwen3-moe": lambda: t.Qwen3MoeForCausalLM(
            t.Qwen3MoeConfig(**SMALL_MOE, num_experts=4, moe_intermediate_size=16, head_dim=12, norm_topk_prob=True)
        ),
        "qwen2-moe": lambda: t.Qwen2MoeForCausalLM(
            t.Qwen2MoeConfig(
                **SMALL_MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=40
            )
        ),
        "pythia": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**NEOX, rotary_pct=0.25)),
        "neox-sequential": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**NEOX, use_parallel_residual=False)),
        "bert-mlm": lambda: t.BertForMaskedLM(t.BertConfig(**BERT)),
        "bert-mlm-untied": lambda: t.BertForMaskedLM(t.BertConfig(**BERT, tie_word_embeddings=False)),
        "bert": lambda: t.BertModel(t.BertConfig(**BERT)),
        "bart": lambda: t.BartForConditionalGeneration(t.BartConfig(**SEQ2SEQ)),
        "marian": lambda: t.MarianMTModel(t.MarianConfig(**SEQ2SEQ, scale_embedding=True, activation_function="swish")),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(**T5)),
        "t5-v1.1": lambda: own_head(
            t.T5ForConditionalGeneration(t.T5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
        ),
    }
    model = models[family]().eval()
    with torch.no_grad():  # biases start at zero in transformers' init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            if name.endswith("mlp.gate.weight"):  # a decisive router: no near-ties between experts
                p.normal_(0, 1.0)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0, 0.1)
    return model


def own_head(model):
    """transformers 5 builds T5's lm_head tied to the shared embedding whatever the config says, but
    loads a Flan-T5 checkpoint with the head of its own that it ships: give the model one."""
    model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn_like(model.lm_head.weight))
    return model


GPTJ = dict(
    n_embd=32,
    n_layer=3,
    n_head=4,
    rotary_dim=4,  # of d_head 8: partial rotary
    initializer_range=0.2,  # weights large enough that the rotary layout shows in the logits
    n_inner=48,
    vocab_size=101,
    n_positions=64,
    bos_token_id=0,
    eos_token_id=0,
)
SMALL_MOE = {**SMALL_LLAMA, "num_hidden_layers": 2, "intermediate_size": 24, "num_experts_per_tok": 2}
NEOX = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    vocab_size=101,
    max_position_embeddings=64,
)
BERT = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    vocab_size=101,
    max_position_embeddings=64,
)
SEQ2SEQ = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    vocab_size=101,
    max_position_embeddings=64,
    pad_token_id=1,
    decoder_start_token_id=2,
)
# Original T5 (ReLU, tied head on the output scaled by d_model**-0.5); 16 is the relative bias's max
# distance, so that sequences of 20 use every bucket.
T5 = dict(
    vocab_size=101,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
)
ENCODER_DECODERS = ["bart", "marian", "t5", "t5-v1.1"]
DECODERS = [
    "gpt2",
    "gpt2-untied-relu",
    "llama",
    "llama-mqa-tied",
    "qwen2",
    "qwen2-sliding",
    "mistral",
    "mistral-unwindowed",
    "qwen3",
    "qwen3-sliding-bias",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3-scaled",
    "olmo2",
    "phi3",
    "phi3-longrope",
    "pythia",
    "neox-sequential",
    "gptj",
    "mixtral",
    "qwen2-moe",
    "qwen3-moe",
]
# Families whose attention slides: decoding must cross the window.
WINDOWED = ["mistral", "qwen2-sliding", "qwen3-sliding-bias", "gemma2", "gemma3", "gemma3-scaled", "phi3"]
FAMILIES = DECODERS


def padded_batch(vocab):
    """Three rows: left-padded, right-padded, unpadded."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    mask[1, 8:] = 0
    return tokens, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_every_layer_match_transformers(family, attn):
    hf = build(family)
    if attn == "sdpa" and not hf._supports_sdpa:
        pytest.skip(f"transformers has no sdpa attention for {family} (soft-capping)")
    hf.set_attn_implementation(attn)
    model = gf.Transformer.from_hf(hf)
    tokens, mask = padded_batch(hf.config.vocab_size)
    # glassformer counts positions over real tokens; give transformers the same position ids.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    real = mask.bool()
    assert (ref.logits - logits)[real].abs().max() <= 1e-4
    n = model.cfg.n_layers
    for i in range(n - 1):  # transformers' last hidden state is after the final norm
        assert (ref.hidden_states[i + 1] - cache["resid_post", i])[real].abs().max() <= 1e-4, f"layer {i}"
    assert (ref.hidden_states[n] - cache["ln_final.hook_normalized"])[real].abs().max() <= 1e-4


def close(ours, theirs, real):
    assert (ours - theirs)[real].abs().max() <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["bert-mlm", "bert-mlm-untied", "bert"])
def test_bert_hidden_states_logits_and_pooler(family, attn):
    hf = build(family)
    hf.set_attn_implementation(attn)
    model = gf.Transformer.from_hf(hf)
    tokens, mask = padded_batch(101)
    mask[0] = 1  # an encoder is padded on the right
    types = torch.randint(0, 2, tokens.shape, generator=torch.Generator().manual_seed(2))
    real = mask.bool()
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, attention_mask=mask, token_type_ids=types)
    for i in range(model.cfg.n_layers):
        close(cache["resid_post", i], ref.hidden_states[i + 1], real)
    if family.startswith("bert-mlm"):
        close(logits, ref.logits, real)
    else:
        torch.testing.assert_close(
            model.pooler(cache["resid_post", model.cfg.n_layers - 1]), ref.pooler_output, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_encoder_decoder_logits_and_every_layer(family, attn):
    """Padded source and target of 20 and 18 tokens; every layer of both stacks, and the logits."""
    hf = build(family)
    hf.set_attn_implementation(attn)
    model = gf.Transformer.from_hf(hf)
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(0, 101, (2, 20), generator=g), torch.randint(0, 101, (2, 18), generator=g)
    src_mask, tgt_mask = torch.ones_like(src), torch.ones_like(tgt)
    src_mask[1, 13:], tgt_mask[0, 11:] = 0, 0
    with torch.no_grad():
        ref = hf(
            input_ids=src,
            attention_mask=src_mask,
            decoder_input_ids=tgt,
            decoder_attention_mask=tgt_mask,
            output_hidden_states=True,
        )
        logits, cache = model.run_with_cache(src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask)
    close(logits, ref.logits, tgt_mask.bool())
    for stack, n, theirs, mask in (
        ("encoder", model.cfg.n_layers, ref.encoder_hidden_states, src_mask),
        ("decoder", model.cfg.n_decoder_layers, ref.decoder_hidden_states, tgt_mask),
    ):
        ours = [cache[f"{stack}.blocks.{i}.hook_resid_post"] for i in range(n)]
        if f"{stack}.ln_final.hook_normalized" in cache:  # pre-norm: transformers' last state is after the norm
            ours[-1] = cache[f"{stack}.ln_final.hook_normalized"]
        for i in range(n):
            close(ours[i], theirs[i + 1], mask.bool())


def test_marian_positions_are_computed_when_the_checkpoint_omits_them(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = build("marian")
    hf.save_pretrained(tmp_path)
    tensors = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if "embed_positions" not in k}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    src, tgt = torch.randint(0, 101, (1, 7)), torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        expected = hf(input_ids=src, decoder_input_ids=tgt).logits
        torch.testing.assert_close(gf.Transformer.from_hf(tmp_path)(src, tgt), expected, atol=1e-4, rtol=0)


def test_local_directory_single_and_sharded(tmp_path):
    hf = build("llama")
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        expected = hf(tokens).logits
        for sub in ("single", "sharded"):
            torch.testing.assert_close(gf.Transformer.from_hf(tmp_path / sub)(tokens), expected, atol=1e-4, rtol=0)


def test_pickled_checkpoint_needs_explicit_opt_in(tmp_path):
    hf = build("gpt2")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(gf.CheckpointError, match="allow_pickle=True"):
        gf.Transformer.from_hf(tmp_path)
    tokens = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            gf.Transformer.from_hf(tmp_path, allow_pickle=True)(tokens), hf(tokens).logits, atol=1e-4, rtol=0
        )


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "made_up_arch"}')
    with pytest.raises(gf.CheckpointError, match="'made_up_arch' is not supported; supported: .*gpt2.*llama.*t5"):
        gf.Transformer.from_hf(tmp_path)
    with pytest.raises(gf.CheckpointError, match="not a directory"):
        gf.Transformer.from_hf(tmp_path / "missing")


def test_missing_tensor_is_named(tmp_path):
    hf = build("gpt2")
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop(next(k for k in tensors if k.endswith("h.1.mlp.c_fc.weight")))
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(gf.CheckpointError, match="lacks tensor 'h.1.mlp.c_fc.weight'"):
        gf.Transformer.from_hf(tmp_path)


def test_converted_model_does_not_share_storage_with_the_source():
    hf = build("llama")
    model = gf.Transformer.from_hf(hf)
    with torch.no_grad():
        model.embed.W_E.zero_()
        model.blocks[0].ln1.w.zero_()
    assert hf.model.embed_tokens.weight.abs().sum() > 0
    assert hf.model.layers[0].input_layernorm.weight.abs().sum() > 0


def test_converted_weights_are_contiguous_even_from_transposed_sources():
    """GPT-2's Conv1D stores (in, out): a strided copy would make every product reorder it."""
    model = gf.Transformer.from_hf(build("gpt2"))
    assert all(p.is_contiguous() for p in model.parameters())


def test_converted_config_records_the_source():
    model = gf.Transformer.from_hf(build("qwen2"))
    cfg = model.cfg
    assert (cfg.positional, cfg.norm, cfg.act, cfg.n_kv_heads, cfg.extra["hf_model_type"]) == (
        "rotary",
        "rmsnorm",
        "swiglu",
        2,
        "qwen2",
    )


@pytest.mark.parametrize("family", [*DECODERS, "t5", "t5-v1.1"])
def test_from_hf_to_hf_from_hf_round_trip(tmp_path, family):
    """transformers -> glassformer -> Hugging Face directory: transformers reopens it with the same
    logits, and glassformer reopens it bit for bit (T5: the same tokens as source and target)."""
    hf = build(family)
    model = gf.Transformer.from_hf(hf)
    model.to_hf(tmp_path)
    seq2seq = family.startswith("t5")
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    reopened = auto.from_pretrained(tmp_path).eval()
    assert type(reopened) is type(hf)
    tokens, mask = padded_batch(101)
    target = dict(decoder_input_ids=tokens) if seq2seq else {}
    with torch.no_grad():
        torch.testing.assert_close(reopened(tokens, **target).logits, hf(tokens, **target).logits, atol=1e-6, rtol=0)
        reread = gf.Transformer.from_hf(tmp_path)
        assert reread.cfg == model.cfg
        ours = (tokens, tokens) if seq2seq else (tokens,)
        assert torch.equal(reread(*ours, attention_mask=mask), model(*ours, attention_mask=mask))


@pytest.mark.parametrize(
    "kw",
    [
        dict(positional="learned", act="gelu_new", tie_embeddings=True),
        dict(positional="rotary", norm="rmsnorm", act="swiglu", bias=False, n_kv_heads=2),
        dict(positional="rotary", rotary_dim=4, parallel_attn_mlp=True, act="gelu"),
    ],
)
def test_a_model_made_in_glassformer_opens_in_transformers(tmp_path, kw):
    cfg = gf.Config(**{**dict(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16), **kw})
    model = gf.Transformer(cfg, seed=0).eval()
    if cfg.bias:  # make the zero-initialised biases count (the unembedding bias must stay zero)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.split(".")[-1].startswith("b") and name != "unembed.b_U":
                    p.normal_(0, 0.1)
    model.to_hf(tmp_path)
    reopened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(reopened(tokens).logits, model(tokens), atol=1e-5, rtol=0)


def test_to_hf_refuses_what_no_family_can_hold(tmp_path):
    encoder = gf.Transformer(gf.Config(arch="encoder", n_layers=1, d_model=8, n_heads=2, d_vocab=10, n_ctx=4))
    with pytest.raises(gf.CheckpointError, match="(?s)no Hugging Face decoder family fits.*arch='encoder'"):
        encoder.to_hf(tmp_path)
    gpt2_like = gf.Transformer(gf.Config(n_layers=1, d_model=8, n_heads=2, d_vocab=10, n_ctx=4), seed=0)
    with torch.no_grad():
        gpt2_like.unembed.b_U.fill_(1.0)
    with pytest.raises(gf.CheckpointError, match="non-zero biases \\['unembed.b_U'\\]"):
        gpt2_like.to_hf(tmp_path)
    scaled = gf.Transformer(gf.Config(n_layers=1, d_model=8, n_heads=2, d_vocab=10, n_ctx=4, unembed_scale=0.5))
    with pytest.raises(gf.CheckpointError, match="(?s)no Hugging Face decoder family fits.*unembed_scale=0.5"):
        scaled.to_hf(tmp_path)  # no decoder family scales its logits: writing it would drop the scale
    assert list(tmp_path.iterdir()) == []  # nothing written


GREEDY = [
    "gpt2",
    "llama",
    "pythia",
    "gptj",
    "qwen3",
    "gemma",
    "olmo2",
    "phi3-longrope",
    "mixtral",
    "qwen2-moe",
    "qwen3-moe",
]


def assert_greedy_matches(family: str, prompt_len: int, pads: int, new: int = 48) -> None:
    """`new` greedy tokens (KV cache on both sides) equal transformers' `generate`, on a batch whose
    first row is left-padded by `pads`."""
    hf = build(family)
    model = gf.Transformer.from_hf(hf)
    prompt = torch.randint(0, 101, (2, prompt_len), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    mask[0, :pads] = 0
    expected = hf.generate(
        prompt, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(model.generate(prompt, new, attention_mask=mask), expected)


@pytest.mark.parametrize("family", GREEDY)
def test_greedy_generation_matches_transformers(family):
    assert_greedy_matches(family, prompt_len=6, pads=2)


@pytest.mark.parametrize("family", WINDOWED)
def test_greedy_generation_crosses_the_sliding_window_as_transformers_does(family):
    """Windows of 4-5 keys: the prefill and every KV-cache step beyond the window."""
    assert_greedy_matches(family, prompt_len=9, pads=3)


def test_a_sliding_window_is_not_the_context_length():
    """A new user's Mistral: the window (5) limits what each query sees, not how long a prompt may be."""
    hf = build("mistral")
    model = gf.Transformer.from_hf(hf)
    assert (model.cfg.n_ctx, model.cfg.sliding_window, model.cfg.layer_types) == (64, 5, ["sliding"] * 3)
    tokens = torch.randint(0, 101, (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
        _, cache = model.run_with_cache(tokens)
    pattern = cache["pattern", 0][0, 0]  # (q_pos, k_pos)
    assert torch.equal(pattern > 0, torch.ones(19, 19).tril().triu(-4).bool())  # itself and the 4 before


@pytest.mark.parametrize("family", ["marian", "t5", "t5-v1.1"])
def test_greedy_generation_matches_transformers_encoder_decoder(family):
    """48 new tokens from a padded source batch, cross-attention K/V cached on both sides."""
    hf = build(family)
    if family.startswith("t5"):  # as initializer_factor=2.5: at 1, T5's greedy decoding repeats one token
        with torch.no_grad():
            for p in hf.parameters():
                p.mul_(2.5)
    model = gf.Transformer.from_hf(hf)
    src = torch.randint(3, 101, (2, 20), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(src)
    mask[1, 13:] = 0
    expected = hf.generate(
        src,
        attention_mask=mask,
        max_new_tokens=48,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        forced_eos_token_id=None,
        bad_words_ids=None,
        # transformers sizes its own cache by the encoder's layer count (2, not the decoder's 3): give it one
        cache=transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache()),
    )
    # A T5 checkpoint's start token comes with its config; Marian's is given.
    start = {} if family.startswith("t5") else dict(decoder_start_token_id=hf.config.decoder_start_token_id)
    out = model.generate(src, 48, attention_mask=mask, **start)
    assert torch.equal(out, expected)
    assert all(row.unique().numel() > 5 for row in out)  # real continuations, not one token repeated


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj", "gemma2", "bert", "bart", "marian", "t5"])
def test_left_padded_rows_equal_transformers_on_the_row_alone(family):
    """glassformer counts positions over real tokens, so a left-padded row computes what transformers
    computes for the same tokens unpadded (transformers itself would need position_ids for that)."""
    hf = build(family)
    model = gf.Transformer.from_hf(hf)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(3, 101, (2, 10), generator=g)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0  # row 0: 6 real tokens after 4 pads
    seq2seq = family in ENCODER_DECODERS
    tgt = torch.randint(3, 101, (2, 5), generator=g)
    with torch.no_grad():
        if seq2seq:
            ours = model(tokens, tgt, attention_mask=mask)
            alone = [
                hf(input_ids=tokens[i : i + 1, 4 * (1 - i) :], decoder_input_ids=tgt[i : i + 1]).logits for i in (0, 1)
            ]
            for i in (0, 1):
                torch.testing.assert_close(ours[i : i + 1], alone[i], atol=1e-4, rtol=0)
            return
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
        last = cache["resid_post", model.cfg.n_layers - 2]  # a block output both sides expose
        for i, start in ((0, 4), (1, 0)):
            ref = hf(tokens[i : i + 1, start:], output_hidden_states=True).hidden_states[model.cfg.n_layers - 1]
            torch.testing.assert_close(last[i : i + 1, start:], ref, atol=1e-4, rtol=0)


def test_to_hf_of_a_model_no_family_holds_names_the_reason(tmp_path):
    swiglu_learned = gf.Transformer(gf.Config(n_layers=1, d_model=8, n_heads=2, d_vocab=10, n_ctx=4, act="swiglu"))
    with pytest.raises(gf.CheckpointError, match="(?s)no Hugging Face decoder family fits.*act='swiglu'"):
        swiglu_learned.to_hf(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_config_without_a_needed_field_is_a_clear_error(tmp_path):
    import json

    build("gpt2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(gf.CheckpointError, match="config lacks the field 'n_embd'"):
        gf.Transformer.from_hf(tmp_path)


@pytest.mark.parametrize("family", [*DECODERS, "bert-mlm", "bert-mlm-untied", "bert", *ENCODER_DECODERS])
def test_every_tensor_of_a_supported_model_is_used(family):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unused tensor would be a warning
        gf.Transformer.from_hf(build(family))


def test_tensors_the_conversion_does_not_use_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    build("gpt2").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.adapter.weight"] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="1 tensors the gpt2 conversion does not use: transformer.h.0.adapter.weight"):
        gf.Transformer.from_hf(tmp_path)
