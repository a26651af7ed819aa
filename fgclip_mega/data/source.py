"""Batch source shared by the DALI loader (as its parallel external source) and the PIL loader.

`SampleSource(spec)(step)` returns micro-batch `step` of the rank stream that starts at
`spec.start`: JPEG bytes plus fixed-shape token, box and hard-negative arrays. It is a pure
function of (spec, step), so DALI may run it in any worker process, prefetch ahead, or be rebuilt
at a new start position for an exact resume. Blocks are read contiguously from the shards and
cached per shuffle window. Imports only numpy/zarr: DALI's spawned workers import this module.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fgclip_mega.data.order import StreamOrder, Transition
from fgclip_mega.data.schema import OUTPUT_NAMES, allocate_outputs
from fgclip_mega.data.shards import Block, ShardReader
from fgclip_mega.data.tokenizer import fit_context
from fgclip_mega.data.worker_guard import guard_worker

OUTPUTS = OUTPUT_NAMES  # per-sample outputs in DALI order: see schema.OUTPUTS
REGION_TEXT = ("random", "short", "long")


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
    """The blocks of one shuffle window and where each global id sits in them."""

    def __init__(self, blocks: list[Block], rows: dict[int, tuple[int, int]]):
        self.blocks = blocks
        self.rows = rows


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

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "guard": self.guard}  # readers/caches rebuilt in the worker

    def __setstate__(self, state: dict) -> None:
        # Unpickled as a spawned worker starts: guard it before anything else.
        self.spec, self.guard = state["spec"], state["guard"]
        if self.guard is not None:
            guard_worker(*self.guard)
        self._init()

    def _reader(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            reader = ShardReader(self.spec.paths[shard])
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

    def _window(self, epoch: int, w: int) -> _Window:
        key = (epoch, w)
        if key not in self._windows:
            plan = self.order.plan(epoch)
            blocks, rows = [], {}
            for b, (shard, lo, hi) in enumerate(plan.window_blocks[w]):
                blocks.append(self._reader(int(shard)).read_block(int(lo), int(hi)))
                first = int(self.order.offsets[shard] + lo)
                rows.update({first + r: (b, r) for r in range(int(hi - lo))})
            self._windows[key] = _Window(blocks, rows)
            if len(self._windows) > 2:  # a batch spans at most two windows
                self._windows.popitem(last=False)
        return self._windows[key]

    def batch(self, step: int) -> dict[str, list | np.ndarray]:
        """Micro-batch `step`: 'jpeg' is a list of uint8 arrays, the rest are stacked arrays."""
        spec = self.spec
        b, m, k = spec.batch_size, spec.max_boxes, spec.num_negatives
        s_ctx = spec.short_context
        first = spec.start + step * b
        dims = {"LONG": spec.long_context, "SHORT": s_ctx, "M": m, "K": k}
        out: dict = {"jpeg": [], **allocate_outputs(b, dims)}
        out["positions"][:] = np.arange(first, first + b)
        out["epochs"] = np.zeros(b, np.int64)
        for i, pos in enumerate(range(first, first + b)):
            epoch, offset = self.order.locate(pos)
            plan = self.order.plan(epoch)
            sid = int(plan.ids[offset])
            window = self._window(epoch, plan.window_of(offset))
            block_idx, row = window.rows[sid]
            blk = window.blocks[block_idx]
            out["sample_ids"][i], out["epochs"][i] = sid, epoch
            out["jpeg"].append(blk.jpeg(row))
            out["long_tokens"][i] = fit_context(blk.long_tokens[row], spec.long_context)
            out["short_tokens"][i] = fit_context(blk.short_tokens[row], s_ctx)
            b0 = int(blk.box_offsets[row])
            n = min(int(blk.box_offsets[row + 1]) - b0, m)
            out["box_counts"][i] = n
            if n == 0:
                continue
            rows = slice(b0, b0 + n)
            out["boxes"][i, :n] = blk.boxes[rows]
            coins = region_coins(spec.seed, epoch, np.array([sid]), m)[0, :n]
            if spec.region_text == "short":
                coins[:] = False
            elif spec.region_text == "long":
                coins[:] = True
            short = fit_context(blk.box_short_tokens[rows], s_ctx)
            long = fit_context(blk.box_long_tokens[rows], s_ctx)
            out["region_tokens"][i, :n] = np.where(coins[:, None], long, short)
            out["hardneg_tokens"][i, :n, 0] = short
            out["hardneg_tokens"][i, :n, 1:] = fit_context(blk.neg_tokens[rows, :k], s_ctx)
            out["hardneg_valid"][i, :n] = blk.neg_flags[rows]
        return out

    def __call__(self, batch_info) -> tuple:
        """DALI batch-mode callable: one output per name in OUTPUTS, batch-major."""
        if self.guard is not None:  # a forked worker's first call (a no-op afterwards)
            guard_worker(*self.guard)
        step = batch_info if isinstance(batch_info, int) else batch_info.iteration
        arrays = self.batch(step)
        return tuple(arrays[name] for name in OUTPUTS)
