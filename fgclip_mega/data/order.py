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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


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

    def _gets_extra(self, rank: int, epoch: int) -> bool:
        return self.extra > 0 and (rank - epoch * self.extra) % self.dp < self.extra

    def epoch_length(self, epoch: int) -> int:
        """Samples this rank reads in `epoch`."""
        return self.base + int(self._gets_extra(self.rank, epoch))

    def epoch_start(self, epoch: int) -> int:
        """Stream position where `epoch` begins for this rank."""
        # Extra samples of epochs < e went to k % dp for k in [0, e * extra): count k == rank.
        t = epoch * self.extra
        return epoch * self.base + (-(-(t - self.rank) // self.dp) if t > self.rank else 0)

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset inside the epoch) of a stream position."""
        lo, hi = position // (self.base + 1), position // self.base + 1
        while lo < hi:  # largest e with epoch_start(e) <= position
            mid = (lo + hi + 1) // 2
            if self.epoch_start(mid) <= position:
                lo = mid
            else:
                hi = mid - 1
        return lo, position - self.epoch_start(lo)

    def _rank_range(self, epoch: int) -> tuple[int, int]:
        ranks = np.arange(self.dp)
        lengths = self.base + ((ranks - epoch * self.extra) % self.dp < self.extra) * (
            self.extra > 0
        )
        start = int(lengths[: self.rank].sum())
        return start, start + int(lengths[self.rank])

    def _plan(self, epoch: int) -> EpochPlan:
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
