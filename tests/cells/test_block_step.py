"""Tests of the one-token C step (cells/block_step.py, csrc/decode_block.c): every decoding step it
takes gives the cells' logits and keys/values, and it steps aside for hooks, autograd and shapes it
does not compute."""

from __future__ import annotations

import pytest
import torch

import glassformer as gf
from glassformer import quantized
from glassformer.cells import block_step
from glassformer.generate import new_cache, prefill

pytestmark = pytest.mark.skipif(quantized._kernel() is None, reason="no C compiler: the cells run every step")

LLAMA = dict(positional="rotary", norm="rmsnorm", act="swiglu", bias=False, eps=1e-6)
FITS = {
    "llama-gqa": dict(LLAMA),
    "mha-bias": dict(LLAMA, n_kv_heads=4, bias=True),  # Qwen2 has q/k/v biases
    "mqa-interleaved": dict(LLAMA, n_kv_heads=1, rotary_interleaved=True),
    "partial-rotary-scaled": dict(LLAMA, rotary_dim=8, rotary_scaling={"type": "linear", "factor": 2.0}),
    "sliding-window": dict(LLAMA, sliding_window=3, layer_types=["sliding", "full"], attn_scale=0.3),
    "gpt2": dict(positional="learned", norm="layernorm", act="gelu_new", bias=True, n_kv_heads=4),
    "layernorm-no-bias-rotary-gelu": dict(positional="rotary", norm="layernorm", act="gelu", bias=False),
    "geglu-sinusoidal": dict(LLAMA, positional="sinusoidal", act="geglu"),
    "relu": dict(LLAMA, act="relu"),
    "silu-ungated": dict(LLAMA, act="silu"),
}
DOES_NOT_FIT = {
    "post-norm": dict(LLAMA, norm_position="post"),
    "sandwich": dict(LLAMA, norm_position="sandwich"),
    "mixture-of-experts": dict(LLAMA, n_experts=4),
    "qk-norm": dict(LLAMA, qk_norm="head"),
    "softcap": dict(LLAMA, attn_softcap=5.0),
    "parallel": dict(LLAMA, parallel_attn_mlp=True),
}


def make_model(scheme: str | None = None, d_model: int = 64, **overrides) -> gf.Transformer:
    base = dict(d_model=d_model, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=96, d_vocab=50, n_ctx=32)
    model = gf.Transformer(gf.Config(**{**base, **overrides}), seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # O(1) weights and gains != 1, so that every term matters
        for name, param in model.named_parameters():
            param.copy_(
                1 + 0.2 * torch.randn(param.shape, generator=gen)
                if name.endswith(".w")
                else torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5
            )
    return model.quantize(scheme) if scheme else model


def decode_logits(model: gf.Transformer, tokens: torch.Tensor, valid: torch.Tensor, prompt: int = 5):
    """Logits of every step after a `prompt`-token prefill, and the cache they leave."""
    cache = new_cache(model, tokens.shape[0], tokens.shape[1])
    with torch.no_grad():
        steps = [prefill(model, tokens[:, :prompt], valid[:, :prompt], cache, None, None)]
        for i in range(prompt, tokens.shape[1]):
            cache.advance(valid[:, i : i + 1])
            positions = valid[:, : i + 1].cumsum(-1)[:, -1:] - 1  # (batch, 1)
            steps.append(model.decode(tokens[:, i : i + 1], positions, cache))
    return torch.stack(steps, 1), cache  # (batch, steps, d_vocab)


@pytest.fixture
def calls(monkeypatch):
    """How many block steps ran in C, and how many stepped aside to the cells."""
    seen = {"c": 0, "cells": 0}
    original = block_step.run

    def counted(*args):
        out = original(*args)
        if block_step.enabled:  # (not the reference runs with the C step switched off)
            seen["c" if out is not None else "cells"] += 1
        return out

    monkeypatch.setattr(block_step, "run", counted)
    return seen


def compare_with_cells(model, monkeypatch, tokens, valid):
    ours, ours_cache = decode_logits(model, tokens, valid)
    monkeypatch.setattr(block_step, "enabled", False)
    cells, cells_cache = decode_logits(model, tokens, valid)
    monkeypatch.setattr(block_step, "enabled", True)
    torch.testing.assert_close(ours, cells, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours_cache.k, cells_cache.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_cache.v, cells_cache.v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(FITS))
@pytest.mark.parametrize("scheme", [None, "bf16", "int8", "int4"])
def test_the_c_step_gives_the_cells_logits_and_keys(name, scheme, monkeypatch, calls):
    model = make_model(scheme, **FITS[name])
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, :3] = False  # the second row left-padded
    compare_with_cells(model, monkeypatch, tokens, valid)
    assert calls["c"] == 7 * model.cfg.n_layers and calls["cells"] == 0  # every decoding step ran in C


def test_widths_off_the_group_are_padded(monkeypatch, calls):
    """d_model 40 under int4 (group 32): the kernel reads the inputs zero-padded to 64 columns."""
    model = make_model("int4", d_model=40, n_heads=5, n_kv_heads=5, d_head=8, d_mlp=72, **LLAMA)
    tokens = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(4))
    compare_with_cells(model, monkeypatch, tokens, torch.ones_like(tokens, dtype=torch.bool))
    assert calls["c"] > 0 and calls["cells"] == 0


@pytest.mark.parametrize("name", list(DOES_NOT_FIT))
def test_other_shapes_run_in_the_cells(name):
    model = make_model(**DOES_NOT_FIT[name])
    assert not any(block.c_step_fits for block in model.blocks)


def test_gpt2_from_transformers_decodes_its_greedy_tokens(monkeypatch, calls):
    """A GPT-2 loaded from transformers (LayerNorm, tanh GELU, biases, learned positions) decodes in C
    the tokens transformers' own greedy search gives."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=60, n_positions=40)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    model = gf.Transformer.from_hf(reference)
    prompt = torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(10))
    expected = reference.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, 20), expected)
    assert calls["c"] == 19 * 2 and calls["cells"] == 0


def test_a_float_width_the_kernel_cannot_read_runs_in_the_cells(monkeypatch, calls):
    """float32 weights whose inputs are not a multiple of 32 columns: the cells run those blocks."""
    model = make_model(d_model=40, n_heads=5, n_kv_heads=5, d_head=8, d_mlp=72, **LLAMA)
    tokens = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(5))
    decode_logits(model, tokens, torch.ones_like(tokens, dtype=torch.bool))
    assert calls["c"] == 0 and calls["cells"] > 0


def test_a_hook_sends_only_its_own_block_to_the_cells(monkeypatch, calls):
    """A hook that changes block 1's z is applied (the cells run block 1), block 0 still runs in C, and
    the logits are those of the cells with the same hook; removing it brings C back."""
    model = make_model("int4", **LLAMA)
    tokens = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(6))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    plain, _ = decode_logits(model, tokens, valid)
    with model.hooks([("blocks.1.attn.hook_z", lambda z, hook: z * 0.5)]):
        hooked, _ = decode_logits(model, tokens, valid)
        monkeypatch.setattr(block_step, "enabled", False)
        cells, _ = decode_logits(model, tokens, valid)
        monkeypatch.setattr(block_step, "enabled", True)
    torch.testing.assert_close(hooked, cells, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(hooked[:, 1:], plain[:, 1:], atol=1e-3)
    assert calls == {"c": 10 + 5, "cells": 5}  # plain: both blocks; hooked: block 0 only
    decode_logits(model, tokens, valid)
    assert calls["c"] == 10 + 5 + 10


def test_autograd_and_a_missing_kernel_leave_the_cells_to_run(monkeypatch, calls):
    model = make_model("int8", **LLAMA)
    tokens = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(7))
    cache = new_cache(model, 1, 8)
    with torch.no_grad():
        prefill(model, tokens[:, :7], torch.ones(1, 7, dtype=torch.bool), cache, None, None)
    cache.advance(torch.ones(1, 1, dtype=torch.bool))
    resid = torch.randn(1, 1, 64)
    assert block_step.run(model.blocks[0], resid, torch.tensor([[7]]), cache.layers[0]) is None  # grad enabled
    with torch.no_grad():
        assert block_step.run(model.blocks[0], resid, torch.tensor([[7]]), cache.layers[0]) is not None
        monkeypatch.setattr(quantized, "KERNEL", None)
        assert block_step.run(model.blocks[0], resid, torch.tensor([[7]]), cache.layers[0]) is None
    ours, _ = decode_logits(model, tokens, torch.ones_like(tokens, dtype=torch.bool))
    assert calls["c"] == 1 and torch.isfinite(ours).all()


def test_greedy_generation_is_unchanged(monkeypatch):
    model = make_model("int4", **LLAMA)
    prompt = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(8))
    ours = model.generate(prompt, 20)
    monkeypatch.setattr(block_step, "enabled", False)
    assert torch.equal(ours, model.generate(prompt, 20))


def test_edited_replaced_and_requantized_weights_are_read_again(monkeypatch, calls):
    """The C step's arguments are kept between steps: an edit that moves a weight's storage, a
    requantized weight and a model quantized after decoding all reach it."""
    model = make_model(**LLAMA)
    tokens = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(9))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    before, _ = decode_logits(model, tokens, valid)
    with torch.no_grad():
        model.blocks[0].attn.o_weight.data = torch.zeros_like(model.blocks[0].attn.o_weight)  # new storage
    compare_with_cells(model, monkeypatch, tokens, valid)
    model.quantize("int8")  # every product weight replaced
    compare_with_cells(model, monkeypatch, tokens, valid)
    with torch.no_grad():
        model.blocks[1].mlp.out_weight[:, :10] = 0  # stored back quantized: new codes
    after, _ = decode_logits(model, tokens, valid)
    compare_with_cells(model, monkeypatch, tokens, valid)
    assert not torch.allclose(before, after, atol=1e-3) and calls["cells"] == 0


@pytest.mark.parametrize("where", ["block", "cell", "everywhere"])
def test_a_pytorch_module_hook_sends_the_block_to_the_cells(where, calls):
    """`register_forward_hook` (on the block, on a cell inside it, or on every module) is seen: the
    cells run, so the hook fires at every step."""
    model = make_model("int8", **LLAMA)
    tokens = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(11))
    fired = []
    target = {"block": model.blocks[1], "cell": model.blocks[1].mlp}.get(where)
    hook = lambda module, args, out: fired.append(1)  # noqa: E731
    handle = (
        torch.nn.modules.module.register_module_forward_hook(hook)
        if target is None
        else target.register_forward_hook(hook)
    )
    try:
        decode_logits(model, tokens, torch.ones_like(tokens, dtype=torch.bool))
    finally:
        handle.remove()
    blocks_in_cells = 2 if target is None else 1
    assert calls["cells"] == 3 * blocks_in_cells and fired


def test_a_model_that_has_decoded_can_be_copied_and_pickled(monkeypatch, calls):
    """The prepared C arguments (this process's addresses) are not copied: a deep copy or a pickled
    model prepares its own, and decodes the same logits in C."""
    import copy
    import pickle

    model = make_model("int4", **LLAMA)
    tokens = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(12))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    ours, _ = decode_logits(model, tokens, valid)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        theirs, _ = decode_logits(twin, tokens, valid)
        torch.testing.assert_close(theirs, ours, atol=0, rtol=0)
    assert calls["cells"] == 0 and calls["c"] == 3 * 3 * 2


def test_two_threads_decoding_one_model_keep_their_caches_apart():
    """Each call fills its own copy of the block's prepared arguments, so two generations running at
    once on one model (a server's requests) give what each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    model = make_model("int4", **LLAMA)
    prompts = [torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(s)) for s in (13, 14)]
    alone = [model.generate(p, 20) for p in prompts]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda p: model.generate(p, 20), prompts * 4))
    assert all(torch.equal(got, alone[i % 2]) for i, got in enumerate(together))
