"""T5's relative position bias cell (cells/relative_position.py): the distance buckets against
transformers' own function, both directions, and the bias table read per (query, key) pair."""

import pytest
import torch

import glassformer as gf
from glassformer.cells.relative_position import RelativePositionBias, bucket

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 16), (6, 7)])
def test_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-300, 301)[None, :]  # key - query, past max_distance both ways
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    ours = bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert int(ours.max()) == num_buckets - 1 and int(ours.min()) == 0


def test_bias_reads_the_table_at_each_pairs_bucket():
    cfg = gf.Config(
        arch="encoder-decoder",
        n_layers=1,
        d_model=8,
        n_heads=2,
        d_vocab=5,
        n_ctx=64,
        positional="relative",
        relative_buckets=8,
        relative_max_distance=16,
    )
    cell = RelativePositionBias(cfg, bidirectional=False)
    with torch.no_grad():
        cell.W_rel.copy_(torch.arange(16.0).view(8, 2))
    bias = cell(torch.tensor([3, 9]), k_len=12)  # (1, n_heads, 2 queries, 12 keys)
    assert bias.shape == (1, 2, 2, 12)
    # causal buckets: a key j <= query i falls in bucket i - j while that is below 4 (exact), later keys in 0
    assert bias[0, 0, 0, :4].tolist() == [6.0, 4.0, 2.0, 0.0] and bias[0, 1, 0, 4:].eq(1.0).all()
    assert bias[0, 0, 1, 9].item() == 0.0 and bias[0, 0, 1, 8].item() == 2.0
