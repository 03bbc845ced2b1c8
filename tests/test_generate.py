"""Generation: cached decoding equals full recomputation, padding, sampling, stopping, hooks."""

import pytest
import torch

import glassformer as gf

DECODERS = {
    "mha-learned": dict(),
    "gqa-rotary-swiglu": dict(positional="rotary", n_kv_heads=2, norm="rmsnorm", act="swiglu", bias=False),
    "mqa-sinusoidal": dict(positional="sinusoidal", n_kv_heads=1),
    "partial-rotary-parallel": dict(positional="rotary", rotary_dim=4, parallel_attn_mlp=True),
    "post-norm-attn-only": dict(norm_position="post", attn_only=True),
}


def make(arch="decoder", **kw):
    cfg = gf.Config(**{**dict(arch=arch, n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=40), **kw})
    return gf.Transformer(cfg, seed=0).eval()


def recompute(model, tokens, n, tgt=None):
    """Greedy decoding without a cache: the whole sequence again at every step; also the logits."""
    seq = tokens if tgt is None else tgt
    logits = []
    with torch.no_grad():
        for _ in range(n):
            out = model(seq)[:, -1] if tgt is None else model(tokens, seq)[:, -1]
            logits.append(out)
            seq = torch.cat([seq, out.argmax(-1, keepdim=True)], dim=1)
    return seq, torch.stack(logits, dim=1)


@pytest.mark.parametrize("name", DECODERS)
def test_cached_decoding_equals_recomputation(name):
    model = make(**DECODERS[name])
    prompt = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    out, cache = model.generate(prompt, 12, return_cache=True)
    expected, expected_logits = recompute(model, prompt, 12)
    assert torch.equal(out, expected)
    torch.testing.assert_close(cache["hook_logits"], expected_logits, atol=1e-5, rtol=1e-5)


def test_encoder_decoder_cached_decoding_equals_recomputation():
    model = make("encoder-decoder", n_decoder_layers=3)
    src = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    out, cache = model.generate(src, 10, decoder_start_token_id=1, return_cache=True)
    expected, expected_logits = recompute(model, src, 10, tgt=torch.ones(2, 1, dtype=torch.long))
    assert torch.equal(out, expected)
    torch.testing.assert_close(cache["hook_logits"], expected_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_left_padded_rows_decode_as_they_do_alone(name):
    model = make(**DECODERS[name])
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 50, (n,), generator=g) for n in (7, 4, 1)]
    width = max(len(r) for r in rows)
    prompt = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(prompt)
    for i, row in enumerate(rows):
        prompt[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    batched, cache = model.generate(prompt, 9, attention_mask=mask, return_cache=True)
    for i, row in enumerate(rows):
        alone, alone_cache = model.generate(row[None], 9, return_cache=True)
        assert torch.equal(batched[i, width - len(row) :], alone[0]), f"row {i}"
        torch.testing.assert_close(cache["hook_logits"][i, -9:], alone_cache["hook_logits"][0, -9:], atol=1e-5, rtol=0)


def test_encoder_decoder_padded_sources_decode_as_they_do_alone():
    model = make("encoder-decoder")
    src = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    batched = model.generate(src, 6, attention_mask=mask, decoder_start_token_id=1)
    alone = model.generate(src[1:, :5], 6, decoder_start_token_id=1)
    assert torch.equal(batched[1], alone[0])


def test_cache_memory_is_exactly_two_layers_batch_len_kv_heads_d_head():
    from glassformer.kv_cache import KVCache

    cfg = make(**DECODERS["gqa-rotary-swiglu"]).cfg
    cache = KVCache(cfg.n_layers, batch=3, n_kv_heads=cfg.n_kv_heads, max_len=17, d_head=cfg.d_head)
    assert cache.numel() == 2 * cfg.n_layers * 3 * 17 * cfg.n_kv_heads * cfg.d_head
    assert cache.k.shape == (cfg.n_layers, 3, cfg.n_kv_heads, 17, cfg.d_head)  # grouped-query heads once


def test_generate_allocates_exactly_the_cache_it_needs(monkeypatch):
    import glassformer.generate as generation

    made = []
    real = generation.KVCache
    monkeypatch.setattr(generation, "KVCache", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    model = make(**DECODERS["gqa-rotary-swiglu"])  # 2 layers, 2 key/value heads of 8 for 4 query heads
    model.generate(torch.randint(0, 50, (3, 7)), 10)
    (cache,) = made
    assert cache.numel() == 2 * 2 * 3 * (7 + 10) * 2 * 8


def test_stream_yields_the_tokens_generate_returns():
    model = make()
    prompt = torch.randint(0, 50, (2, 5))
    streamed = list(model.stream(prompt, 8))
    assert len(streamed) == 8 and streamed[0].shape == (2,)
    assert torch.equal(torch.stack(streamed, 1), model.generate(prompt, 8)[:, 5:])


def test_sampling_is_seeded_and_restricted():
    model = make()
    prompt = torch.randint(0, 50, (4, 5))

    def draw(seed, **kw):
        return model.generate(prompt, 10, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(7, temperature=1.5), draw(7, temperature=1.5))
    assert not torch.equal(draw(7, temperature=1.5), draw(8, temperature=1.5))
    greedy = model.generate(prompt, 10)
    assert torch.equal(draw(9, top_k=1), greedy)
    assert torch.equal(draw(9, top_p=1e-6), greedy)


def test_top_k_and_top_p_keep_the_right_tokens():
    from glassformer.generate import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, True, top_k=2, generator=g)) for _ in range(300)}
    assert draws == {0, 1}
    draws = {int(sample(logits, True, top_p=0.79, generator=g)) for _ in range(300)}  # 0.5 + 0.3 >= 0.79
    assert draws == {0, 1}
    draws = {int(sample(logits, True, top_p=0.81, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_rows_stop_at_eos_and_then_emit_padding():
    model = make()
    prompt = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(5))
    free = model.generate(prompt, 12)
    eos = int(free[0, 6])  # row 0 produces this token at its third step
    out = model.generate(prompt, 12, eos_token_id=eos, pad_token_id=49)
    for row, free_row in zip(out, free, strict=True):
        new, free_new = row[4:], free_row[4:]
        hits = (free_new == eos).nonzero()
        stop = int(hits[0]) if len(hits) else len(free_new)
        assert torch.equal(new[: stop + 1], free_new[: stop + 1])
        assert (new[stop + 1 :] == 49).all()
    assert (out[0, 4:] == eos).nonzero()[0] == (free[0, 4:] == eos).nonzero()[0]


def test_generation_stops_early_when_every_row_is_done():
    model = make()
    prompt = torch.randint(0, 50, (1, 4))
    first = int(model.generate(prompt, 1)[0, -1])
    assert model.generate(prompt, 20, eos_token_id=first).shape == (1, 5)


def test_too_long_for_the_context_is_a_clear_error():
    model = make()
    with pytest.raises(gf.InputError, match="prompt of 30 \\+ max_new_tokens=11 = 41 positions exceeds .* n_ctx=40"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 11)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, do_sample=True, temperature=0)
    with pytest.raises(gf.InputError, match="decoder_start_token_id"):
        make("encoder-decoder").generate(torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(gf.InputError, match="encoder-only"):
        make("encoder").generate(torch.zeros(1, 3, dtype=torch.long), 2)


def test_hooks_steer_every_step_and_are_removed():
    model = make()
    prompt = torch.randint(0, 50, (2, 5))
    bump = torch.randn(32) * 5

    def steer(resid, hook):
        return resid + bump

    hooks = [("blocks.1.hook_resid_post", steer)]
    steered = model.generate(prompt, 6, fwd_hooks=hooks)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):  # the same hook under run_with_hooks, recomputing everything
            logits = model.run_with_hooks(seq, fwd_hooks=hooks)[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(steered, seq) and not torch.equal(steered, model.generate(prompt, 6))
    assert not any(h.active for h in model.hook_dict.values())

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.generate(prompt, 3, fwd_hooks=[("blocks.0.attn.hook_z", boom)])
    assert not any(h.active for h in model.hook_dict.values())


def test_return_cache_joins_the_steps_like_one_forward_pass():
    model = make(**DECODERS["gqa-rotary-swiglu"])
    prompt = torch.randint(0, 50, (2, 6))
    out, cache = model.generate(prompt, 5, return_cache=True)
    with torch.no_grad():
        _, full = model.run_with_cache(out[:, :-1])  # the last new token was never fed back
    for name in (
        "blocks.1.hook_resid_post",
        "blocks.0.attn.hook_rot_k",
        "blocks.1.attn.hook_z",
        "blocks.0.mlp.hook_post",
    ):
        torch.testing.assert_close(cache[name], full[name], atol=1e-5, rtol=1e-5)
    n = out.shape[1] - 1
    pattern = cache["pattern", 0]  # (batch, n_heads, steps' queries, slots written)
    assert pattern.shape == (2, 4, n, n)
    torch.testing.assert_close(pattern, full["pattern", 0], atol=1e-5, rtol=1e-5)


def test_encoder_runs_once_and_cross_attention_keys_are_computed_once():
    model = make("encoder-decoder")
    calls = {"encoder": 0, "cross_k": 0}

    def count(key):
        def hook(x, h):
            calls[key] += 1

        return hook

    hooks = [("encoder.hook_embed", count("encoder")), ("decoder.blocks.0.cross_attn.hook_k", count("cross_k"))]
    model.generate(torch.randint(0, 50, (2, 6)), 7, decoder_start_token_id=1, fwd_hooks=hooks)
    assert calls == {"encoder": 1, "cross_k": 1}


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    model = make(**DECODERS["gqa-rotary-swiglu"])
    prompt = torch.randint(0, 50, (2, 5))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    assert torch.equal(
        model.generate(prompt, 8, attention_mask=mask, compile=True), model.generate(prompt, 8, attention_mask=mask)
    )
