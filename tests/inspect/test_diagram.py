"""The Mermaid diagram: every hook of the model, the data flow between them, the real shapes."""

import os
import re
import stat

import pytest
import torch

import glassformer as gf
from glassformer.inspect.diagram import diagram, render
from glassformer.inspect.examples import two_heads

NODE = re.compile(r'^\s*(h_\S+)\["(?:⊕ )?([^"<]+)', re.M)
EDGE = re.compile(r'^\s*(\S+) -->\|"([^"]*)"\| (\S+)$', re.M)


def parse(text):
    """(node labels by hook name, edges as (source, shape label, target) with hook names)."""
    names = dict(NODE.findall(text))
    edges = {(names.get(a, a), label, names.get(b, b)) for a, label, b in EDGE.findall(text)}
    return set(names.values()), edges


def model(**kw):
    cfg = gf.Config(**{**dict(n_layers=1, d_model=8, n_heads=2, d_vocab=32, n_ctx=16), **kw})
    return gf.Transformer(cfg, seed=0)


def test_attention_only_block_has_every_hook_and_shape():
    """The classic attention-only diagram: resid_pre → q/k/v → scores → pattern → z → result → attn_out → resid."""
    m = model(attn_only=True)
    text = diagram(m)
    assert text.startswith("graph TD\n")
    nodes, edges = parse(text)
    assert nodes == set(m.hook_dict)  # every hook point, nothing invented
    b = "blocks.0."
    resid, heads, scores = "(seq, d_model=8)", "(seq, n_heads=2, d_head=4)", "(n_heads=2, seqQ, seqK)"
    expected = {
        ("hook_embed", resid, b + "hook_resid_pre"),
        ("hook_pos_embed", resid, b + "hook_resid_pre"),
        (b + "hook_resid_pre", resid, b + "ln1.hook_scale"),
        (b + "ln1.hook_scale", "(seq, 1)", b + "ln1.hook_normalized"),
        (b + "ln1.hook_normalized", resid, b + "attn.hook_q"),
        (b + "ln1.hook_normalized", resid, b + "attn.hook_k"),
        (b + "ln1.hook_normalized", resid, b + "attn.hook_v"),
        (b + "attn.hook_q", heads, b + "attn.hook_attn_scores"),
        (b + "attn.hook_k", heads, b + "attn.hook_attn_scores"),
        (b + "attn.hook_attn_scores", scores, b + "attn.hook_pattern"),
        (b + "attn.hook_pattern", scores, b + "attn.hook_z"),
        (b + "attn.hook_v", heads, b + "attn.hook_z"),
        (b + "attn.hook_z", heads, b + "attn.hook_result"),
        (b + "attn.hook_result", "(seq, n_heads=2, d_model=8)", b + "hook_attn_out"),
        (b + "hook_resid_pre", resid, b + "hook_resid_mid"),  # the residual add: two inputs
        (b + "hook_attn_out", resid, b + "hook_resid_mid"),
        (b + "hook_resid_mid", resid, b + "hook_resid_post"),
        (b + "hook_resid_post", resid, "ln_final.hook_normalized"),
        ("ln_final.hook_normalized", resid, "hook_logits"),
    }
    assert expected <= edges, expected - edges
    assert "⊕ blocks.0.hook_resid_mid" in text and "⊕ blocks.0.attn.hook_z" not in text
    assert "hook_logits<br/>(seq, d_vocab=32)" in text  # the sink shows its own shape
    assert 'subgraph h_blocks_0["blocks.0 · Block"]' in text and '["blocks.0.attn · Attention"]' in text


def test_every_edge_shape_is_the_shape_the_model_computes():
    """Sizes on the edges are those of a real run: the diagram cannot drift from the code."""
    m = model(n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=24, act="swiglu", positional="rotary")
    _, cache = m.run_with_cache(torch.tensor([[1, 2, 3, 4, 5]]))
    _, edges = parse(diagram(m))
    assert edges
    for source, label, _ in edges:
        if source == "tokens":
            continue
        dims = label.strip("()").split(", ")
        shape = cache[source].shape[1:]
        assert len(dims) == len(shape), (source, label)
        for dim, size in zip(dims, shape, strict=True):
            assert "seq" in dim or dim.endswith(f"={size}") or dim == str(size), (source, label)
    assert ("blocks.0.attn.hook_k", "(seq, n_kv_heads=2, d_head=2)", "blocks.0.attn.hook_rot_k") in edges
    assert ("blocks.0.mlp.hook_pre_linear", "(seq, d_mlp=24)", "blocks.0.mlp.hook_post") in edges


def test_equal_sizes_are_still_told_apart():
    """The two-heads example has d_head = n_heads = 2: axis names come from the model's wiring, not sizes."""
    m, _, _ = two_heads()
    _, edges = parse(diagram(m))
    assert ("blocks.0.attn.hook_q", "(seq, n_heads=2, d_head=2)", "blocks.0.attn.hook_attn_scores") in edges
    assert ("hook_embed", "(seq, d_model=4)", "blocks.0.hook_resid_pre") in edges  # no positions: embed alone


def test_a_mixture_of_experts_draws_router_experts_and_shared_expert():
    m = model(act="swiglu", d_mlp=20, n_experts=4, n_experts_per_token=2, d_expert_mlp=8, d_shared_expert_mlp=6)
    nodes, edges = parse(diagram(m))
    assert set(m.hook_dict) <= nodes  # every expert's hooks, also those no dummy token is routed to
    mlp = "blocks.0.mlp"
    assert (f"{mlp}.hook_router_logits", "(seq, n_experts=4)", f"{mlp}.hook_expert_weights") in edges
    assert (f"{mlp}.hook_expert_weights", "(seq, n_experts=4)", f"{mlp}.hook_expert_out.3") in edges
    assert (f"{mlp}.experts.3.hook_post", "(d_expert_mlp=8)", f"{mlp}.hook_expert_out.3") in edges  # routed rows
    assert (f"{mlp}.shared_expert.hook_post", "(seq, d_shared_expert_mlp=6)", f"{mlp}.hook_shared_out") in edges
    assert ("blocks.0.ln2.hook_normalized", "(seq, d_model=8)", f"{mlp}.hook_router_logits") in edges


def test_encoder_decoder_draws_cross_attention_from_the_encoder_output():
    m = model(arch="encoder-decoder")
    text = diagram(m)
    nodes, edges = parse(text)
    assert nodes == set(m.hook_dict)
    cross = "decoder.blocks.0.cross_attn."
    assert ("encoder.ln_final.hook_normalized", "(src_seq, d_model=8)", cross + "hook_k") in edges
    assert ("encoder.ln_final.hook_normalized", "(src_seq, d_model=8)", cross + "hook_v") in edges
    assert ("decoder.blocks.0.ln_cross.hook_normalized", "(tgt_seq, d_model=8)", cross + "hook_q") in edges
    assert (cross + "hook_pattern", "(n_heads=2, tgt_seq, src_seq)", cross + "hook_z") in edges
    assert (
        "decoder.blocks.0.hook_cross_attn_out",
        "(tgt_seq, d_model=8)",
        "decoder.blocks.0.hook_resid_mid_cross",
    ) in edges
    assert 'subgraph h_encoder["encoder · Stack"]' in text and "src_tokens" in text and "tgt_tokens" in text


def test_parallel_block_adds_both_branches_to_the_same_stream():
    m = model(parallel_attn_mlp=True)
    nodes, edges = parse(diagram(m))
    b = "blocks.0."
    into_post = {source for source, _, target in edges if target == b + "hook_resid_post"}
    assert into_post == {b + "hook_resid_pre", b + "hook_attn_out", b + "hook_mlp_out"}
    assert (b + "hook_resid_pre", "(seq, d_model=8)", b + "ln1.hook_scale") in edges
    assert (b + "hook_resid_pre", "(seq, d_model=8)", b + "ln2.hook_scale") in edges
    assert b + "hook_resid_mid" not in nodes


def test_post_norm_block_normalises_after_the_add():
    m = model(norm_position="post", arch="encoder")
    _, edges = parse(diagram(m))
    b = "blocks.0."
    assert (b + "ln1.hook_normalized", "(seq, d_model=8)", b + "hook_resid_mid") in edges
    assert (b + "hook_attn_out", "(seq, d_model=8)", b + "ln1.hook_scale") in edges


def test_diagram_leaves_the_model_as_it_was():
    m = model(dropout=0.1).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    diagram(m)
    assert m.training and all(not h.active for h in m.hook_dict.values())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_render_says_so_without_a_local_renderer(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mmdc"):
        render("graph TD\n  a --> b\n", tmp_path / "d.svg")
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        render("graph TD\n", tmp_path / "d.pdf")


def test_render_calls_a_local_mmdc(tmp_path, monkeypatch):
    fake = tmp_path / "mmdc"  # stands in for mermaid-cli: copies its input to its output
    fake.write_text('#!/bin/sh\ncp "$2" "$4"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    out = render("graph TD\n  a --> b\n", tmp_path / "d.svg")
    assert out.read_text() == "graph TD\n  a --> b\n"
