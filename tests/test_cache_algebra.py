"""Cache algebra: the pieces add up to what the model computed (the stream, each layer's attention and
MLP output, the normalised stream, the logit, the logit lens), and match TransformerLens 3.9 on the
same weights (skipped where transformer_lens is not installed)."""

import operator

import pytest
import torch

import glassformer as gf
from glassformer.inspect.lens import logit_lens
from tests.inspect.test_attribution import model as attribution_model

TOKENS = torch.tensor([[3, 7, 1, 9, 4, 2], [5, 5, 8, 0, 6, 1]])
SMALL = dict(n_layers=3, d_model=16, n_heads=4, d_vocab=13, n_ctx=8)
CONFIGS = {
    "gpt2": dict(),  # LayerNorm, learned positions, biases
    "llama": dict(norm="rmsnorm", act="swiglu", positional="rotary", n_kv_heads=2, bias=False),
    "gptj": dict(parallel_attn_mlp=True, shared_norm=True, positional="rotary", rotary_dim=2, rotary_interleaved=True),
}


def model_of(**kw) -> gf.Transformer:
    """Random weights with non-trivial norm gains and biases (attribution's test model, 3 layers)."""
    return attribution_model(**{**SMALL, **kw})


def run(m, tokens=TOKENS, **kw):
    with torch.no_grad():
        return m.run_with_cache(tokens, **kw)


@pytest.fixture(params=list(CONFIGS), scope="module")
def ran(request):
    m = model_of(**CONFIGS[request.param])
    return m, *run(m)


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_decompose_resid_sums_to_the_stream_entering_each_layer(ran):
    m, _, cache = ran
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == ["embed", "pos_embed"] if m.pos_embed is not None else labels[0] == "embed"
    assert labels[-2:] == ["2_attn_out", "2_mlp_out"] and stack.shape == (len(labels), 2, 6, 16)
    close(stack.sum(0), cache["resid_post", 2])
    for layer in range(3):
        close(cache.decompose_resid(layer=layer).sum(0), cache["resid_pre", layer])
        if not m.cfg.parallel_attn_mlp:
            close(cache.decompose_resid(layer=layer, mlp_input=True).sum(0), cache["resid_mid", layer])
    attn, labels = cache.decompose_resid(mode="attn", incl_embeds=False, return_labels=True)
    assert labels == ["0_attn_out", "1_attn_out", "2_attn_out"]
    assert cache.decompose_resid(layer=0, incl_embeds=False).shape == (0, 2, 6, 16)
    with pytest.raises(ValueError, match="mode must be"):
        cache.decompose_resid(mode="heads")


def test_heads_and_neurons_sum_to_their_layers_output(ran):
    m, _, cache = ran
    heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape == (12, 2, 6, 16) and labels[:2] == ["L0H0", "L0H1"] and labels[-1] == "L2H3"
    neurons, neuron_labels = cache.stack_neuron_results(3, return_labels=True)
    d_mlp = m.cfg.d_mlp
    assert neurons.shape == (3 * d_mlp, 2, 6, 16) and neuron_labels[d_mlp + 5] == "L1N5"
    for layer, block in enumerate(m.blocks):
        b_o = 0 if block.attn.b_O is None else block.attn.b_O
        close(heads[4 * layer : 4 * layer + 4].sum(0) + b_o, cache["attn_out", layer])
        b_out = 0 if block.mlp.b_out is None else block.mlp.b_out
        close(neurons[layer * d_mlp : (layer + 1) * d_mlp].sum(0) + b_out, cache["mlp_out", layer])


def test_normalised_pieces_sum_to_the_final_norm_before_its_weight_and_bias(ran):
    """Σ apply_ln_to_stack(decompose_resid()) == (ln_final.hook_normalized - b) / w: the final norm's
    input centred (LayerNorm) and divided by its cached scale."""
    m, _, cache = ran
    pieces = cache.apply_ln_to_stack(cache.decompose_resid())
    b = 0 if m.ln_final.b is None else m.ln_final.b
    close(pieces.sum(0), (cache["ln_final.hook_normalized"] - b) / m.ln_final.w)
    assert torch.equal(pieces, cache.decompose_resid(apply_ln=True))
    block = m.blocks[1]
    ln2 = block.ln1 if block.ln2 is None else block.ln2  # GPT-J's MLP reads ln1
    pieces = cache.decompose_resid(layer=1, mlp_input=True, apply_ln=True)
    b = 0 if ln2.b is None else ln2.b
    close(pieces.sum(0), (cache[ln2.hook_normalized.name] - b) / ln2.w)


def test_accumulated_resid_through_the_final_norm_is_the_logit_lens(ran):
    m, _, cache = ran
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    lens = logit_lens(m, TOKENS)
    b_u = 0 if m.unembed.b_U is None else m.unembed.b_U
    close(stack @ m.unembed.W_U + b_u, lens.logits)
    plain, labels = cache.accumulated_resid(layer=2, incl_mid=not m.cfg.parallel_attn_mlp, return_labels=True)
    assert labels[:2] == (["0_pre", "0_mid"] if not m.cfg.parallel_attn_mlp else ["0_pre", "1_pre"])
    assert labels[-1] == "2_pre" and torch.equal(plain[-1], cache["resid_pre", 2])


def test_logit_attrs_sum_to_the_logit_less_the_biases(ran):
    m, logits, cache = ran
    target, wrong = torch.tensor([3, 8]), torch.tensor([5, 5])
    stack = cache.decompose_resid(pos_slice=-1)  # (n_components, batch, d_model)
    attrs = cache.logit_attrs(stack, target, pos_slice=-1)
    assert attrs.shape == (stack.shape[0], 2)
    w_u, b_ln = m.unembed.W_U, m.ln_final.b
    biases = torch.zeros(m.cfg.d_vocab) if m.unembed.b_U is None else m.unembed.b_U.clone()
    if b_ln is not None:
        biases += b_ln @ w_u
    close(attrs.sum(0), logits[:, -1].gather(1, target[:, None])[:, 0] - biases[target])
    diff = cache.logit_attrs(stack, target, wrong, pos_slice=-1).sum(0)
    expected = logits[:, -1, target].diagonal() - logits[:, -1, wrong].diagonal()
    close(diff, expected - biases[target] + biases[wrong])
    every = cache.logit_attrs(cache.decompose_resid(), 4)  # one token, every position: (n, batch, pos)
    close(every.sum(0), logits[..., 4] - biases[4])


def test_unembed_scale_and_tied_heads_are_linear_and_kept():
    m = model_of(norm="rmsnorm", tie_embeddings=True, unembed_scale=0.25, bias=False)
    logits, cache = run(m)
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=2), 7, pos_slice=2)
    close(attrs.sum(0), logits[:, 2, 7])


def test_neurons_chunked_equal_unchunked():
    m = model_of()
    _, cache = run(m)
    whole = cache.stack_neuron_results(2, chunk_size=10**9, apply_ln=True, pos_slice=[1, 4])
    chunked, labels = cache.stack_neuron_results(2, chunk_size=5, apply_ln=True, pos_slice=[1, 4], return_labels=True)
    assert torch.equal(chunked, whole) and chunked.shape == (2 * 64, 2, 2, 16)
    by_hand = cache["post", 1][:, [1, 4], 7, None] * m.blocks[1].mlp.W_out[7]
    close(cache.stack_neuron_results(2, neuron_slice=7, pos_slice=[1, 4])[1], by_hand)
    some, labels = cache.stack_neuron_results(1, neuron_slice=slice(2, 5), return_labels=True)
    assert labels == ["L0N2", "L0N3", "L0N4"] and some.shape == (3, 2, 6, 16)


def test_pos_slice_forms_agree():
    m = model_of()
    _, cache = run(m)
    full = cache.decompose_resid()
    assert torch.equal(cache.decompose_resid(pos_slice=-1), full[:, :, -1])
    assert torch.equal(cache.decompose_resid(pos_slice=[1, 3]), full[:, :, [1, 3]])
    assert torch.equal(cache.decompose_resid(pos_slice=torch.tensor([1, 3])), full[:, :, [1, 3]])
    assert torch.equal(cache.decompose_resid(pos_slice=slice(2, None)), full[:, :, 2:])
    heads = cache.stack_head_results(pos_slice=slice(0, 2), apply_ln=True)
    torch.testing.assert_close(heads, cache.stack_head_results(apply_ln=True)[:, :, :2])
    with pytest.raises(TypeError, match="int, a slice, a list or a tensor"):
        cache.decompose_resid(pos_slice="last")


def test_head_results_from_z_when_result_was_not_recorded():
    m = model_of(n_kv_heads=2)
    _, full = run(m)
    _, lean = run(m, names_filter=lambda name: not name.endswith("hook_result"))
    close(lean.stack_head_results(), full.stack_head_results())
    _, bare = run(m, names_filter=lambda name: name.endswith("hook_resid_pre"))
    with pytest.raises(gf.CacheError, match=r"blocks.0.attn.hook_result.*blocks.0.attn.hook_z"):
        bare.stack_head_results()
    with pytest.raises(gf.CacheError, match="does not know its model"):
        gf.ActivationCache(dict(full.items())).decompose_resid()


def test_encoder_decoder_decomposes_the_decoder_stream():
    m = model_of(arch="encoder-decoder", n_layers=2)
    tgt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        logits, cache = m.run_with_cache(TOKENS, tgt)
    stack, labels = cache.decompose_resid(return_labels=True)
    assert "1_cross_attn_out" in labels
    close(stack.sum(0), cache["decoder.blocks.1.hook_resid_post"])
    assert cache.stack_head_results().shape == (8, 2, 3, 16)


def test_non_linear_models_are_refused():
    with pytest.raises(ValueError, match="pre-norm"):
        run(model_of(norm_position="post"))[1].decompose_resid()
    _, cache = run(model_of(norm_position="sandwich", norm="rmsnorm"))  # the stream sums; the heads do not
    close(cache.decompose_resid().sum(0), cache["resid_post", 2])
    with pytest.raises(ValueError, match="a norm after each cell"):
        cache.stack_head_results()
    _, cache = run(model_of(final_softcap=3.0))
    with pytest.raises(ValueError, match="final_softcap"):
        cache.logit_attrs(cache.decompose_resid(), 3)
    _, cache = run(model_of(arch="encoder", head_transform=True))
    with pytest.raises(ValueError, match="head_transform"):
        cache.logit_attrs(cache.decompose_resid(), 3)
    _, cache = run(model_of(attn_only=True))
    with pytest.raises(gf.CacheError, match="no dense MLP"):
        cache.stack_neuron_results(1)


def transformer_lens_twin(tl, m, fold_ln=False):
    """A TransformerLens HookedTransformer with `m`'s weights (GPT-2 shape); fold_ln folds the norm gains."""
    cfg = tl.HookedTransformerConfig(
        n_layers=3, d_model=16, n_heads=4, d_head=4, d_mlp=64, n_ctx=8, d_vocab=13, act_fn="gelu",
        normalization_type="LN", device="cpu",
    )  # fmt: skip
    hooked = tl.HookedTransformer(cfg)
    with torch.no_grad():
        for name, param in hooked.named_parameters():
            param.copy_(operator.attrgetter(name)(m))
    if fold_ln:
        state = hooked.state_dict()
        hooked.load_and_process_state_dict(
            state, fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False
        )
    return hooked.eval()


def test_same_labels_and_numbers_as_transformer_lens():
    tl = pytest.importorskip("transformer_lens")
    m = model_of()
    ours = run(m)[1]
    hooked = transformer_lens_twin(tl, m)
    with torch.no_grad():
        _, theirs = hooked.run_with_cache(TOKENS)
    calls = [
        ("decompose_resid", dict(return_labels=True)),
        ("decompose_resid", dict(layer=2, mlp_input=True, apply_ln=True, pos_slice=-1, return_labels=True)),
        ("accumulated_resid", dict(apply_ln=True, return_labels=True)),
        ("accumulated_resid", dict(layer=2, incl_mid=True, apply_ln=True, return_labels=True)),
        ("stack_head_results", dict(apply_ln=True, pos_slice=[0, 5], return_labels=True)),
        ("stack_neuron_results", dict(layer=2, apply_ln=True, neuron_slice=slice(3, 9), return_labels=True)),
    ]
    for method, kw in calls:
        (a, labels_a), (b, labels_b) = getattr(ours, method)(**kw), getattr(theirs, method)(**kw)
        assert labels_a == labels_b, method
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{method} {kw}")
    stack = ours.decompose_resid(layer=1)
    torch.testing.assert_close(
        ours.apply_ln_to_stack(stack, 1, mlp_input=True), theirs.apply_ln_to_stack(stack, 1, mlp_input=True)
    )
    # TransformerLens reads W_U without the final norm's gain, which it expects folded in: compare folded.
    folded = transformer_lens_twin(tl, m, fold_ln=True)
    with torch.no_grad():
        _, theirs = folded.run_with_cache(TOKENS)
    stack = ours.decompose_resid(pos_slice=-1)
    target, wrong = torch.tensor([3, 8]), torch.tensor([5, 5])
    torch.testing.assert_close(
        ours.logit_attrs(stack, target, wrong, pos_slice=-1), theirs.logit_attrs(stack, target, wrong, pos_slice=-1)
    )


def test_gradients_match_transformer_lens_incl_bwd():
    """run_with_cache(backward_metric=loss) records what TransformerLens' incl_bwd=True does, by the same names."""
    tl = pytest.importorskip("transformer_lens")
    m = model_of()
    hooked = transformer_lens_twin(tl, m)
    names = ["hook_embed", "blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern", "blocks.2.mlp.hook_post"]
    _, theirs = hooked.run_with_cache(TOKENS, names_filter=names, incl_bwd=True, return_type="loss")

    def loss(logits):  # TransformerLens' lm_cross_entropy_loss: next-token cross-entropy, mean
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), TOKENS[:, 1:])

    _, ours = m.run_with_cache(TOKENS, names_filter=names, backward_metric=loss)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-4, msg=name)
