"""StreamOrder: every epoch is an exact partition of the samples over the DP ranks."""

import numpy as np
import pytest

from fgclip_mega.data.order import StreamOrder


def test_small_shards_before_the_rank_range_are_not_read():
    # Issue 11: the main job's data (4 shards of 64, blocks of 256) on DP=2 made rank 1 read
    # block [128, 64) of shard 0, a shard lying wholly before its range.
    order = StreamOrder(np.array([64] * 4), seed=1234, dp_rank=1, dp_size=2)
    blocks = np.concatenate(order.plan(0).window_blocks)
    assert all(0 <= lo < hi <= 64 for _, lo, hi in blocks), blocks
    assert sum(hi - lo for _, lo, hi in blocks) == 128


def _check_partition(sizes: np.ndarray, dp: int, bs: int, windows: int, epoch: int) -> None:
    total = int(sizes.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    orders = [StreamOrder(sizes, 7, r, dp, bs, windows) for r in range(dp)]
    ids = []
    for o in orders:
        plan = o.plan(epoch)
        assert len(plan.ids) == o.epoch_length(epoch)
        for shard, lo, hi in np.concatenate(plan.window_blocks):
            # Every block is a non-empty range inside its shard, at most one read block long.
            assert 0 <= lo < hi <= sizes[shard] and hi - lo <= bs, (sizes, dp, bs, shard, lo, hi)
            assert lo // bs == (hi - 1) // bs  # aligned to the read blocks
        # The rank's ids are exactly the ids of its blocks, each once.
        from_blocks = (
            np.concatenate(
                [
                    np.arange(offsets[s] + lo, offsets[s] + hi)
                    for s, lo, hi in np.concatenate(plan.window_blocks)
                ]
            )
            if len(np.concatenate(plan.window_blocks))
            else np.zeros(0, np.int64)
        )
        assert np.array_equal(np.sort(plan.ids), np.sort(from_blocks))
        ids.append(plan.ids)
    # Nothing is dropped (StreamOrder has no remainder: ranks differ by at most one sample).
    assert np.array_equal(np.sort(np.concatenate(ids)), np.arange(total))
    lengths = [len(i) for i in ids]
    assert max(lengths) - min(lengths) <= 1


def test_every_epoch_partitions_the_samples_for_many_layouts():
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(300):
        n_shards = int(rng.integers(1, 9))
        # Mix tiny shards, shards around the block size and large ones.
        sizes = rng.choice([1, 2, 3, 7, 16, 63, 64, 65, 100, 256, 300], size=n_shards)
        dp = int(rng.integers(1, 9))
        if sizes.sum() < dp:
            continue
        bs = int(rng.choice([1, 3, 8, 64, 256, 1000]))
        _check_partition(sizes.astype(np.int64), dp, bs, int(rng.integers(1, 4)),
                         int(rng.integers(0, 50)))  # fmt: skip
        cases += 1
    assert cases > 200


@pytest.mark.parametrize("sizes", [[64] * 4, [64, 300, 5], [1] * 9])
def test_main_job_layouts(sizes):
    for dp in (2, 3, 4, 8):
        if sum(sizes) >= dp:
            for epoch in range(3):
                _check_partition(np.array(sizes, np.int64), dp, 256, 8, epoch)
