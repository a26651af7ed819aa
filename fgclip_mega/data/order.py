"""Sample order of one data-parallel rank: an endless stream, a pure function of the seed.

Epoch e (over the N samples of the index):
  1. the shards are permuted with rng(seed, e) - the same permutation on every rank - and laid
     end to end into one sequence of N samples;
  2. the sequence is cut into dp_size contiguous ranges, so a rank reads whole shards except at
     most two boundary shards it shares with its neighbours. N = dp_size * base + extra: every
     rank gets `base` samples and `extra` ranks get one more; which ranks get the extra sample
     rotates from epoch to epoch (ranks (e * extra + j) % dp_size, j < extra), so over dp_size
     epochs all ranks get the same count. Every sample is read exactly once per epoch across
     ranks, nothing is dropped or repeated, and rank streams never differ by more than one sample;
  3. a rank's range is cut into blocks of `block_size` samples aligned to multiples of
     `block_size` inside each shard (one contiguous read each, matching the 256-row chunks);
     the block order is permuted with rng(seed, e, dp_size, rank);
  4. consecutive groups of `window_blocks` blocks form windows; the samples of a window are
     permuted in memory (a shuffle buffer of window_blocks * block_size samples).

The rank's stream is epoch 0's order, then epoch 1's, and so on; the trainer takes micro-batches
off it, so every rank has the same number of steps (a batch may straddle an epoch boundary). The
stream position (samples consumed) is the whole loader state: `locate` maps it back to
(epoch, offset). Global sample ids number the samples in index order (shard offset + row).

A change of dp_size mid-epoch (a resume at a new layout) continues with a *transition epoch*:
`transition_after` works out, from the old layout's common position (and any earlier transition),
which samples of the current epoch T no old rank has read; the new ranks split those in index
order into dp_size contiguous ranges, cut each range into (shard, aligned block) groups, shuffle
groups and windows as above, and then continue with normal epochs T+1, T+2, ... Every sample is
still read exactly once per epoch. The extra samples keep rotating round-robin from where the
transition's left off (its n % dp_size extras go to ranks 0, 1, ...), so rank streams still never
differ by more than one sample at any epoch boundary. The transition is a
`Transition(epoch, legs, rotation)`: leg 0 is the order of epoch T at its dp_size (its extras
starting at rank `rotation`), leg k the transition order built from legs[:k]; each leg records
how many samples of epoch T each of its ranks had read. A pure function again, so DALI's reader
processes rebuild the same order from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Transition:
    epoch: int
    """The epoch T the layout changed in."""
    legs: tuple[tuple[int, tuple[int, ...]], ...]
    """Per earlier layout, oldest first: (dp_size, samples of epoch T each of its ranks read)."""
    rotation: int = 0
    """Leg 0's extra samples of epoch T went to ranks rotation, rotation + 1, ... (mod dp)."""

    def to_state(self) -> dict:
        legs = [[dp, list(read)] for dp, read in self.legs]
        return {"epoch": self.epoch, "legs": legs, "rotation": self.rotation}

    @staticmethod
    def from_state(state: dict | None) -> Transition | None:
        if not state:
            return None
        legs = tuple((int(dp), tuple(int(c) for c in read)) for dp, read in state["legs"])
        return Transition(int(state["epoch"]), legs, int(state.get("rotation", 0)))


@dataclass(frozen=True)
class EpochPlan:
    ids: np.ndarray  # (n,) int64 global sample ids in stream order
    window_bounds: np.ndarray  # (W+1,) stream offsets where windows start (last = n)
    window_blocks: tuple[np.ndarray, ...]  # per window: (k, 3) int64 rows of (shard, start, end)

    def window_of(self, offset: int) -> int:
        return int(np.searchsorted(self.window_bounds, offset, side="right") - 1)


class StreamOrder:
    def __init__(
        self,
        sizes: np.ndarray,
        seed: int,
        dp_rank: int,
        dp_size: int,
        block_size: int = 256,
        window_blocks: int = 8,
        transition: Transition | None = None,
        *,
        _normal_from: tuple[int, int, int] = (0, 0, 0),
    ):
        sizes = np.asarray(sizes, dtype=np.int64)
        total = int(sizes.sum())
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if total < dp_size:
            raise ValueError(f"{total} samples cannot feed dp_size={dp_size} ranks")
        if seed < 0:
            raise ValueError(f"data seed must be >= 0, got {seed}")
        if block_size < 1 or window_blocks < 1:
            raise ValueError(f"block_size={block_size}, window_blocks={window_blocks}: need >= 1")
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.seed, self.rank, self.dp = seed, dp_rank, dp_size
        self.block_size, self.window_blocks = block_size, window_blocks
        self.base, self.extra = divmod(total, dp_size)
        self.plan = lru_cache(maxsize=2)(self._plan)
        self.transition = transition
        # Normal epochs e >= e0 start at stream position s0 + (e - e0) * base + (extras this
        # rank got), with k0 extras handed out round-robin (from rank 0) before epoch e0.
        self._e0, self._s0, self._k0 = _normal_from
        self._t_len = 0
        if transition is not None:
            left = self._unread()
            t_base, t_extra = divmod(len(left), dp_size)
            self._t_len = _split_range(len(left), dp_size, dp_rank)[1]
            self._e0, self._s0, self._k0 = transition.epoch + 1, t_base, t_extra

    @property
    def first_epoch(self) -> int:
        return self.transition.epoch if self.transition is not None else self._e0

    def _unread(self) -> np.ndarray:
        sizes = tuple(self.sizes.tolist())
        return _unread(sizes, self.seed, self.block_size, self.window_blocks, self.transition)

    def extras_before(self, epoch: int) -> int:
        """Extra samples handed out round-robin before normal epoch `epoch` (a counter)."""
        return self._k0 + (epoch - self._e0) * self.extra

    def _gets_extra(self, rank, epoch: int):
        return (self.extra > 0) & ((rank - self.extras_before(epoch)) % self.dp < self.extra)

    def epoch_length(self, epoch: int) -> int:
        """Samples this rank reads in `epoch`."""
        if self.transition is not None and epoch == self.transition.epoch:
            return self._t_len
        return self.base + int(self._gets_extra(self.rank, epoch))

    def epoch_start(self, epoch: int) -> int:
        """Stream position where `epoch` begins for this rank."""
        if self.transition is not None and epoch == self.transition.epoch:
            return 0
        if epoch < self._e0:
            raise ValueError(f"this stream starts at epoch {self.first_epoch}, not {epoch}")
        # Extras k in [0, t) went to ranks k % dp: count those with k % dp == rank.
        t = self.extras_before(epoch)
        mine = -(-(t - self.rank) // self.dp) if t > self.rank else 0
        return self._s0 + (epoch - self._e0) * self.base + mine

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset inside the epoch) of a stream position."""
        if self.transition is not None and position < self._t_len:
            return self.transition.epoch, position
        lo, hi = self._e0, self._e0 + max(0, position - self._s0) // self.base + 1
        while lo < hi:  # largest e with epoch_start(e) <= position
            mid = (lo + hi + 1) // 2
            if self.epoch_start(mid) <= position:
                lo = mid
            else:
                hi = mid - 1
        return lo, position - self.epoch_start(lo)

    def _rank_range(self, epoch: int) -> tuple[int, int]:
        ranks = np.arange(self.dp)
        lengths = self.base + self._gets_extra(ranks, epoch)
        start = int(lengths[: self.rank].sum())
        return start, start + int(lengths[self.rank])

    def _plan(self, epoch: int) -> EpochPlan:
        tr = self.transition
        if tr is not None and epoch == tr.epoch:
            return _split_plan(self, self._unread(), epoch, len(tr.legs))
        if epoch < self._e0:
            raise ValueError(f"this stream starts at epoch {self.first_epoch}, not {epoch}")
        shard_perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
        ends = np.cumsum(self.sizes[shard_perm])
        a, b = self._rank_range(epoch)
        bs = self.block_size
        blocks = []
        for shard, end, size in zip(shard_perm, ends, self.sizes[shard_perm], strict=True):
            begin = end - size
            lo, hi = max(a, begin) - begin, min(b, end) - begin
            if lo >= hi:  # the shard lies wholly outside [a, b)
                continue
            for s in range(lo // bs * bs, hi, bs):
                blocks.append((shard, max(s, lo), min(s + bs, hi)))
        blocks_arr = np.array(blocks, dtype=np.int64).reshape(-1, 3)
        rng = np.random.default_rng([self.seed, epoch, self.dp, self.rank])
        blocks_arr = blocks_arr[rng.permutation(len(blocks_arr))]
        windows = tuple(
            blocks_arr[i : i + self.window_blocks]
            for i in range(0, len(blocks_arr), self.window_blocks)
        )
        pieces, bounds = [], [0]
        for win in windows:
            ids = np.concatenate(
                [np.arange(self.offsets[s] + lo, self.offsets[s] + hi) for s, lo, hi in win]
            )
            pieces.append(rng.permutation(ids))
            bounds.append(bounds[-1] + len(ids))
        ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        assert len(ids) == b - a, (len(ids), a, b)
        return EpochPlan(ids.astype(np.int64), np.array(bounds, np.int64), windows)

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        """(count,) global ids at stream positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        epoch, offset = self.locate(start)
        while done < count:
            ids = self.plan(epoch).ids[offset : offset + count - done]
            out[done : done + len(ids)] = ids
            done += len(ids)
            epoch, offset = epoch + 1, 0
        return out


def _split_range(n: int, dp_size: int, rank: int) -> tuple[int, int]:
    """(start, length) of `rank`'s share when n items are cut into dp_size contiguous ranges
    (the first n % dp_size ranks get one more)."""
    base, extra = divmod(n, dp_size)
    return rank * base + min(rank, extra), base + int(rank < extra)


def _split_plan(order: StreamOrder, left: np.ndarray, epoch: int, tag: int) -> EpochPlan:
    """The transition plan of `order`'s rank over the unread ids `left` (sorted): its contiguous
    share, grouped by (shard, read block), groups and windows shuffled like a normal epoch."""
    start, length = _split_range(len(left), order.dp, order.rank)
    ids = left[start : start + length]
    if length == 0:
        return EpochPlan(np.zeros(0, np.int64), np.zeros(1, np.int64), ())
    shard = np.searchsorted(order.offsets, ids, side="right") - 1
    row = ids - order.offsets[shard]
    chunk = row // order.block_size
    cut = np.flatnonzero((np.diff(shard) != 0) | (np.diff(chunk) != 0)) + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [length]])
    # A group's block spans its first to last unread row: the rows read in between by the old
    # layout are fetched with it (one contiguous read) but never emitted.
    blocks = np.stack([shard[starts], row[starts], row[ends - 1] + 1], axis=1).astype(np.int64)
    rng = np.random.default_rng([order.seed, epoch, order.dp, order.rank, tag])
    perm = rng.permutation(len(blocks))
    pieces, bounds, windows = [], [0], []
    for i in range(0, len(perm), order.window_blocks):
        sel = perm[i : i + order.window_blocks]
        win = np.concatenate([ids[starts[j] : ends[j]] for j in sel])
        pieces.append(rng.permutation(win))
        bounds.append(bounds[-1] + len(win))
        windows.append(blocks[sel])
    return EpochPlan(np.concatenate(pieces), np.array(bounds, np.int64), tuple(windows))


@lru_cache(maxsize=4)
def _unread(
    sizes: tuple[int, ...], seed: int, block_size: int, window_blocks: int, tr: Transition
) -> np.ndarray:
    """Sorted ids of epoch tr.epoch that none of tr.legs' ranks read."""
    arr = np.array(sizes, np.int64)
    unread = np.ones(int(arr.sum()), bool)
    for k, (dp, read) in enumerate(tr.legs):
        if len(read) != dp:
            raise ValueError(f"transition leg {k}: {len(read)} read counts for dp_size={dp}")
        left = np.flatnonzero(unread)
        for rank, count in enumerate(read):
            # Leg 0 read epoch T as a normal epoch whose extras started at rank `rotation`.
            normal = (tr.epoch, 0, tr.rotation)
            order = StreamOrder(arr, seed, rank, dp, block_size, window_blocks, _normal_from=normal)
            plan = order._plan(tr.epoch) if k == 0 else _split_plan(order, left, tr.epoch, k)
            if not 0 <= count <= len(plan.ids):
                raise ValueError(
                    f"transition leg {k}: rank {rank} of dp_size={dp} read {count} samples of "
                    f"epoch {tr.epoch}, its share has {len(plan.ids)}"
                )
            unread[plan.ids[:count]] = False
    return np.flatnonzero(unread)


def transition_after(
    sizes: np.ndarray,
    seed: int,
    dp_size: int,
    position: int,
    block_size: int = 256,
    window_blocks: int = 8,
    transition: Transition | None = None,
) -> Transition:
    """The transition that continues, at any new dp_size, a stream whose `dp_size` ranks have
    each consumed `position` samples (of their streams, built with `transition`)."""
    orders = [
        StreamOrder(sizes, seed, r, dp_size, block_size, window_blocks, transition)
        for r in range(dp_size)
    ]
    where = [o.locate(position) for o in orders]
    # Ranks' epochs start within one sample of each other: a rank already in epoch T+1 has
    # read all of T and nothing of T+1 yet (its T+1 starts exactly at `position`).
    epoch = min(e for e, _ in where)
    read = tuple(
        off if e == epoch else o.epoch_length(epoch)
        for o, (e, off) in zip(orders, where, strict=True)
    )
    for o, (e, off) in zip(orders, where, strict=True):
        if e > epoch and (e > epoch + 1 or off > 0):
            raise AssertionError(f"rank {o.rank} at ({e}, {off}) ran ahead of epoch {epoch}")
    if transition is not None and transition.epoch == epoch:
        return Transition(epoch, (*transition.legs, (dp_size, read)), transition.rotation)
    return Transition(epoch, ((dp_size, read),), orders[0].extras_before(epoch) % dp_size)
