"""StreamOrder: every epoch is an exact partition of the samples over the DP ranks."""

import numpy as np
import pytest

from fgclip_mega.data.order import StreamOrder, Transition, transition_after


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


# ----------------------------------------------------------------------------- DP-size changes


def _read(order: StreamOrder, count: int) -> list[tuple[int, int]]:
    """(epoch, sample id) of the first `count` samples of a rank stream."""
    out, epoch = [], order.first_epoch
    while len(out) < count:
        ids = order.plan(epoch).ids[: count - len(out)]
        assert len(ids) <= order.epoch_length(epoch)
        out += [(epoch, int(i)) for i in ids]
        epoch += 1
    return out


def _chain(sizes, legs, bs, windows, seed=3):
    """Legs of (dp_size, samples each rank reads); the last leg reads on to the end of the epoch
    after its first one. Returns every (epoch, id) read, the epochs that must be complete, and
    the last layout's orders."""
    sizes = np.array(sizes, np.int64)
    transition, reads = None, []
    for k, (dp, position) in enumerate(legs):
        orders = [StreamOrder(sizes, seed, r, dp, bs, windows, transition) for r in range(dp)]
        if k == len(legs) - 1:
            end = orders[0].first_epoch + 2
            for o in orders:
                reads += _read(o, o.epoch_start(end))
            return reads, end, orders
        for o in orders:
            reads += _read(o, position)
        transition = transition_after(sizes, seed, dp, position, bs, windows, transition)


def _assert_exact(reads, end: int, total: int) -> None:
    # Independent of the epoch labels: every sample was read exactly `end` times.
    counts = np.bincount([i for _, i in reads], minlength=total)
    assert counts.min() == counts.max() == end, counts
    # And each epoch is one exact pass over the samples.
    assert sorted(reads) == [(e, i) for e in range(end) for i in range(total)]


def test_a_dp_size_change_neither_repeats_nor_skips_a_sample():
    rng = np.random.default_rng(1)
    cases = 0
    for _ in range(150):
        sizes = rng.choice([1, 3, 7, 16, 23, 64, 65, 100], size=int(rng.integers(1, 6)))
        total = int(sizes.sum())
        legs = []
        for _ in range(int(rng.integers(2, 5))):  # 1-3 changes, sometimes in the same epoch
            dp = int(rng.integers(1, 7))
            if dp > total:
                break
            # Mid-epoch positions, epoch boundaries (+-1) and several epochs in.
            per_rank = total // dp
            position = int(rng.choice([0, 1, per_rank - 1, per_rank, per_rank + 1,
                                       int(rng.integers(0, 3 * per_rank + 2))]))  # fmt: skip
            legs.append((dp, max(position, 0)))
        if len(legs) < 2:
            continue
        bs, windows = int(rng.choice([1, 4, 8, 64, 256])), int(rng.integers(1, 4))
        reads, end, orders = _chain(sizes, legs, bs, windows)
        _assert_exact(reads, end, total)
        # Rank streams stay within one sample of each other at every epoch boundary.
        for e in range(orders[0].first_epoch, end + 3):
            starts = [o.epoch_start(e) for o in orders]
            assert max(starts) - min(starts) <= 1, (legs, e, starts)
        cases += 1
    assert cases > 100


def test_transition_blocks_are_aligned_reads_holding_their_samples():
    sizes = np.array([23, 64, 7, 100], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    tr = transition_after(sizes, 5, 3, 30, 16, 2)  # 3 ranks read 30 of their ~64 samples
    assert tr.epoch == 0 and tr.legs == ((3, (30, 30, 30)),)
    orders = [StreamOrder(sizes, 5, r, 2, 16, 2, tr) for r in range(2)]
    left = set(range(int(sizes.sum())))
    for r in range(3):
        left -= set(StreamOrder(sizes, 5, r, 3, 16, 2).plan(0).ids[:30].tolist())
    got = []
    for o in orders:
        plan = o.plan(0)
        assert len(plan.ids) == o.epoch_length(0) and len(plan.window_blocks) == len(
            plan.window_bounds) - 1  # fmt: skip
        for w, blocks in enumerate(plan.window_blocks):
            assert len(blocks) <= 2
            spans = set()
            for shard, lo, hi in blocks:
                assert 0 <= lo < hi <= sizes[shard] and lo // 16 == (hi - 1) // 16
                spans |= set(range(offsets[shard] + lo, offsets[shard] + hi))
            ids = plan.ids[plan.window_bounds[w] : plan.window_bounds[w + 1]]
            assert set(ids.tolist()) <= spans  # SampleSource finds each id in its window
        got += plan.ids.tolist()
    assert sorted(got) == sorted(left)  # exactly what the 3 ranks had not read
    assert Transition.from_state(tr.to_state()) == tr


def test_bad_transitions_are_refused_naming_the_leg():
    sizes = np.array([10, 10])
    with pytest.raises(ValueError, match="leg 0: 1 read counts for dp_size=2"):
        StreamOrder(sizes, 0, 0, 1, transition=Transition(0, ((2, (3,)),)))
    with pytest.raises(ValueError, match="leg 0: rank 1 of dp_size=2 read 11"):
        StreamOrder(sizes, 0, 0, 1, transition=Transition(0, ((2, (3, 11)),)))
