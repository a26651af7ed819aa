"""Batch source shared by the DALI loader (as its parallel external source) and the PIL loader.

`SampleSource(spec)(step)` returns micro-batch `step` of the rank stream that starts at
`spec.start`: JPEG bytes plus fixed-shape token, box and hard-negative arrays. It is a pure
function of (spec, step), so DALI may run it in any worker process, prefetch ahead, or be rebuilt
at a new start position for an exact resume. Blocks are read contiguously from the shards and
cached per shuffle window.

Read-ahead: while a window is in use, the next `spec.read_ahead` windows are read by a
background thread, their blocks concurrently (`_IO_THREADS`): on an object store each block
costs round trips of tens of milliseconds, which the training step then no longer waits for.
What is read, and so every batch, is the same with or without read-ahead.
Imports only numpy/zarr/fsspec: DALI's spawned workers import this module.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fgclip_mega.data.order import StreamOrder, Transition
from fgclip_mega.data.schema import OUTPUT_NAMES, allocate_outputs
from fgclip_mega.data.shards import Block, ShardReader
from fgclip_mega.data.storage import DEFAULT_POLICY, RetryPolicy
from fgclip_mega.data.tokenizer import fit_context
from fgclip_mega.data.worker_guard import guard_worker

OUTPUTS = OUTPUT_NAMES  # per-sample outputs in DALI order: see schema.OUTPUTS
REGION_TEXT = ("random", "short", "long")
_IO_THREADS = 8  # concurrent block reads of one window (latency-bound on object stores)


@dataclass(frozen=True)
class SourceSpec:
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    seed: int
    dp_rank: int
    dp_size: int
    batch_size: int
    start: int  # stream position of step 0
    block_size: int = 256
    window_blocks: int = 8
    max_boxes: int = 4
    num_negatives: int = 10
    short_context: int = 77
    long_context: int = 248
    region_text: str = "random"
    transition: Transition | None = None  # set after a resume at another dp_size (order.py)
    read_ahead: int = 1  # windows read in the background ahead of the one in use
    storage: RetryPolicy = DEFAULT_POLICY  # retries/timeouts of object-store reads

    def order(self) -> StreamOrder:
        return StreamOrder(
            np.array(self.sizes),
            self.seed,
            self.dp_rank,
            self.dp_size,
            self.block_size,
            self.window_blocks,
            self.transition,
        )


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def region_coins(seed: int, epoch: int, ids: np.ndarray, num_boxes: int) -> np.ndarray:
    """(n, num_boxes) bool, True = use long_expr: upstream's random.choice, made reproducible."""
    key = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + epoch) % 2**64], dtype=np.uint64))
    x = ids.astype(np.uint64)[:, None] * np.uint64(num_boxes + 1) + np.arange(
        num_boxes, dtype=np.uint64
    )
    return (_mix64(x ^ key) & np.uint64(1)).astype(bool)


class _Window:
    """The blocks of one shuffle window; block b holds the global ids firsts[b] + [0, len)."""

    def __init__(self, blocks: list[Block], firsts: np.ndarray):
        self.blocks = blocks
        self.order = np.argsort(firsts)
        self.sorted_firsts = firsts[self.order]

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block index, row in it) of each id; blocks are disjoint id ranges."""
        k = np.searchsorted(self.sorted_firsts, ids, side="right") - 1
        return self.order[k], ids - self.sorted_firsts[k]


class SampleSource:
    def __init__(self, spec: SourceSpec):
        if spec.region_text not in REGION_TEXT:
            raise ValueError(f"region_text={spec.region_text!r}: expected one of {REGION_TEXT}")
        self.spec = spec
        self.guard: tuple[int, bool, bool] | None = None
        """(parent pid, use PDEATHSIG, forked): set by the DALI loader, see worker_guard.py."""
        self._init()

    def _init(self) -> None:
        self.order = self.spec.order()
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], _Window] = OrderedDict()
        self._ahead: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._pools: tuple[int, ThreadPoolExecutor, ThreadPoolExecutor] | None = None

    def _pool(self, which: int) -> ThreadPoolExecutor:
        """0: the read-ahead thread, 1: block readers. Created in the process that uses them
        (a forked DALI worker inherits no threads)."""
        if self._pools is None or self._pools[0] != os.getpid():
            self._pools = (
                os.getpid(),
                ThreadPoolExecutor(1, thread_name_prefix="read-ahead"),
                ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="block-read"),
            )
            self._ahead = {}
        return self._pools[1 + which]

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "guard": self.guard}  # readers/caches rebuilt in the worker

    def __setstate__(self, state: dict) -> None:
        # Unpickled as a spawned worker starts: guard it before anything else.
        self.spec, self.guard = state["spec"], state["guard"]
        if self.guard is not None:
            guard_worker(*self.guard)
        self._init()

    def _reader(self, shard: int) -> ShardReader:
        with self._lock:  # block-reader threads share the cache
            return self._reader_locked(shard)

    def _reader_locked(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            reader = ShardReader(self.spec.paths[shard], self.spec.storage)
            if reader.num_samples != self.spec.sizes[shard]:
                raise ValueError(
                    f"{reader.path} has {reader.num_samples} samples, the index says "
                    f"{self.spec.sizes[shard]}: the shard changed after the index was written"
                )
            if reader.num_negatives < self.spec.num_negatives:
                raise ValueError(
                    f"{reader.path} stores {reader.num_negatives} hard negatives per box, "
                    f"num_hard_negatives={self.spec.num_negatives} asks for more"
                )
            self._readers[shard] = reader
            if len(self._readers) > 64:
                self._readers.popitem(last=False)
        return self._readers[shard]

    def _read_window(self, epoch: int, w: int) -> _Window:
        spans = self.order.plan(epoch).window_blocks[w]

        def read(span) -> Block:
            shard, lo, hi = (int(v) for v in span)
            return self._reader(shard).read_block(lo, hi)

        if self.spec.read_ahead > 0 and len(spans) > 1:
            blocks = list(self._pool(1).map(read, spans))
        else:
            blocks = [read(span) for span in spans]
        firsts = self.order.offsets[spans[:, 0]] + spans[:, 1] if len(spans) else np.zeros(0)
        return _Window(blocks, np.asarray(firsts, np.int64))

    def _next_windows(self, epoch: int, w: int):
        """The `spec.read_ahead` windows after (epoch, w), in stream order."""
        for _ in range(self.spec.read_ahead):
            if w + 1 < len(self.order.plan(epoch).window_blocks):
                epoch, w = epoch, w + 1
            else:
                epoch, w = epoch + 1, 0
                if not self.order.plan(epoch).window_blocks:  # an empty transition share
                    return
            yield epoch, w

    def _window(self, epoch: int, w: int) -> _Window:
        key = (epoch, w)
        if self.spec.read_ahead > 0:
            self._pool(0)  # in a new (forked) process: fresh pools, no stale futures
        if key not in self._windows:
            pending = self._ahead.pop(key, None)
            # A failed read-ahead raises here, in the step that needs the window.
            self._windows[key] = pending.result() if pending else self._read_window(epoch, w)
            if len(self._windows) > 2:  # a batch spans at most two windows
                self._windows.popitem(last=False)
            if self.spec.read_ahead > 0:
                wanted = list(self._next_windows(epoch, w))
                for old in [k for k in self._ahead if k not in wanted]:
                    self._ahead.pop(old).cancel()
                for nxt in wanted:
                    if nxt not in self._windows and nxt not in self._ahead:
                        self._ahead[nxt] = self._pool(0).submit(self._read_window, *nxt)
        return self._windows[key]

    def batch(self, step: int) -> dict[str, list | np.ndarray]:
        """Micro-batch `step`: 'jpeg' is a list of uint8 arrays, the rest are stacked arrays.

        Vectorised: the batch is cut into runs of samples from one block (at most a few
        windows' blocks), each gathered with a handful of numpy calls instead of ~20 per sample.
        """
        spec = self.spec
        b, m, k = spec.batch_size, spec.max_boxes, spec.num_negatives
        first = spec.start + step * b
        dims = {"LONG": spec.long_context, "SHORT": spec.short_context, "M": m, "K": k}
        out: dict = {"jpeg": [None] * b, **allocate_outputs(b, dims)}
        out["positions"][:] = np.arange(first, first + b)
        out["epochs"] = np.zeros(b, np.int64)
        done = 0
        while done < b:  # one pass per epoch the batch touches
            epoch, offset = self.order.locate(first + done)
            plan = self.order.plan(epoch)
            n = min(b - done, len(plan.ids) - offset)
            ids = plan.ids[offset : offset + n]
            windows = np.searchsorted(plan.window_bounds, np.arange(offset, offset + n), "right")
            windows -= 1
            for w in np.unique(windows):  # ascending = stream order
                picked = np.flatnonzero(windows == w)
                window = self._window(epoch, int(w))
                blocks, rows = window.locate(ids[picked])
                for blk_idx in np.unique(blocks):
                    sel = blocks == blk_idx
                    slots = done + picked[sel]
                    self._fill(out, slots, window.blocks[blk_idx], rows[sel], ids[picked[sel]],
                               epoch)  # fmt: skip
            done += n
        return out

    def _fill(self, out: dict, slots: np.ndarray, blk: Block, rows: np.ndarray,
              sids: np.ndarray, epoch: int) -> None:  # fmt: skip
        """Output slots `slots` (n,) <- rows `rows` (n,) of one block."""
        spec = self.spec
        m, k, s_ctx = spec.max_boxes, spec.num_negatives, spec.short_context
        out["sample_ids"][slots], out["epochs"][slots] = sids, epoch
        starts, ends = blk.image_offsets[rows].tolist(), blk.image_offsets[rows + 1].tolist()
        for slot, i0, i1 in zip(slots.tolist(), starts, ends, strict=True):
            out["jpeg"][slot] = blk.image_bytes[i0:i1]  # a view, as Block.jpeg
        out["long_tokens"][slots] = fit_context(blk.long_tokens[rows], spec.long_context)
        out["short_tokens"][slots] = fit_context(blk.short_tokens[rows], s_ctx)
        b0 = blk.box_offsets[rows]
        counts = np.minimum(blk.box_offsets[rows + 1] - b0, m)  # (n,)
        out["box_counts"][slots] = counts
        valid = np.arange(m)[None, :] < counts[:, None]  # (n, M)
        if not valid.any():
            return
        src = (b0[:, None] + np.arange(m)[None, :])[valid]  # (V,) box rows, sample-major
        i, j = np.nonzero(valid)
        dst = (slots[i], j)  # (V,) output (slot, box) pairs, same order as src
        out["boxes"][dst] = blk.boxes[src]
        coins = region_coins(spec.seed, epoch, sids, m)[valid]  # (V,) True = long phrase
        if spec.region_text == "short":
            coins[:] = False
        elif spec.region_text == "long":
            coins[:] = True
        short = fit_context(blk.box_short_tokens[src], s_ctx)  # (V, S)
        long = fit_context(blk.box_long_tokens[src], s_ctx)
        out["region_tokens"][dst] = np.where(coins[:, None], long, short)
        hard = out["hardneg_tokens"]  # (B, M, 1+K, S)
        hard[slots[i], j, 0] = short
        hard[slots[i], j, 1:] = fit_context(blk.neg_tokens[src, :k], s_ctx)
        out["hardneg_valid"][dst] = blk.neg_flags[src]

    def __call__(self, batch_info) -> tuple:
        """DALI batch-mode callable: one output per name in OUTPUTS, batch-major."""
        if self.guard is not None:  # a forked worker's first call (a no-op afterwards)
            guard_worker(*self.guard)
        step = batch_info if isinstance(batch_info, int) else batch_info.iteration
        arrays = self.batch(step)
        return tuple(arrays[name] for name in OUTPUTS)
