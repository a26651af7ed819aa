"""FG-CLIP 2 loader: NaFlexBatches from the project's shards, grouped by patch budget.

Order: the global sample stream is order.py's stream at dp_size=1 (per-epoch shard permutation,
block shuffle, window shuffle: a pure function of the seed), identical on every DP rank. Its
shuffle windows go through `BudgetGrouper` (budget_groups.py), which turns them into global
batches of micro_batch_size x dp_size samples sharing one patch budget, using only the stored
image sizes; rank r takes slice r of each global batch. So all ranks agree on every batch's
budget, every sample of an epoch is read once across ranks, and nothing stalls: the carry
between windows is bounded (see budget_groups.py).

Reading: every rank reads the (small) `image_sizes` rows of every window it groups; JPEG bytes
(the bulk) only for its own samples; texts and boxes per read block holding one of its samples,
which with DP ranks sharing each window is most blocks: DP x v1's reads of those (small) arrays,
where v1's ranks read disjoint shard ranges. JPEG bytes are read in a thread pool of
data.num_threads and decoded as naflex_decode.py dispatches, like v1: DALI (data.loader auto
where installed, or dali; naflex_dali.py) on the CPU or, with data.decode_device mixed/auto and
a CUDA training device, by nvJPEG on that GPU; or PIL (the reference, in the same pool). NaFlex
resize/patchify is `naflex.pack_images` (equal to HF's Siglip2ImageProcessor) on the decoded
images' device; whole batches are assembled ahead in a background thread, up to
data.prefetch_queue_depth, and handed over on the training device (grids, sample ids and keys
stay on the host).

Texts are tokenized from the stored strings with the SigLIP 2 tokenizer (lowercased): short
captions "a photo of " + caption (64), long captions (196), each box's phrase (short or long
expression per DataConfig.region_text, the same seeded coin as v1) and, for boxes with hard
negatives, [short expression, K negatives] (64).

State: the next window of the global stream to group, and the grouper's state (its waiting and
emitted-but-unconsumed samples, prefetched batches included). Saving rank 0's `state_dict()`
and loading it on every rank resumes exactly; at another dp_size or micro-batch size the waiting
samples are regrouped (nothing repeated or skipped).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgclip_mega.config import DataConfig
from fgclip_mega.data.budget_groups import BudgetGrouper
from fgclip_mega.data.naflex import (
    PATCH_BUDGETS,
    NaFlexBatch,
    NaFlexError,
    batch_budget,
    check_budget,
    native_patches,
    pack_images,
)
from fgclip_mega.data.naflex_decode import build_decoder
from fgclip_mega.data.order import StreamOrder
from fgclip_mega.data.shards import ShardReader, ShardSet, open_shard_set
from fgclip_mega.data.siglip2_tokenizer import Siglip2Tokenizer
from fgclip_mega.data.source import REGION_TEXT, region_coins
from fgclip_mega.data.stream import storage_policy

STATE_VERSION = 1
_FIXED = ("seed", "fingerprint", "block_size", "window_blocks", "budgets", "patch_size")


@dataclass
class NaFlexLoaded(NaFlexBatch):
    """A NaFlexBatch with where its samples came from (for logs, tests and checks)."""

    sample_ids: torch.Tensor | None = None
    """(B,) int64 global sample ids (index order), on the CPU."""
    sample_epochs: torch.Tensor | None = None
    """(B,) int64 epoch each sample was read in."""
    keys: list[str] | None = None
    """The samples' keys (the records' f_path)."""
    budget: int = 0
    """The batch's patch budget (= pixels.shape[1])."""


def auto_patience(group_size: int, cfg: DataConfig) -> int:
    """Windows a bucket holds samples: enough for ~8 global batches to pass, so that a global
    batch that is a large part of a shuffle window still finds same-budget partners
    (run/bench_naflex_padding.py: at 4096-sample batches and 2048-sample windows, patience 1
    gives no gain over upstream, 16 gives 1.64x fewer patches)."""
    window = cfg.read_block_size * cfg.shuffle_window_blocks
    return max(1, -(-8 * group_size // window))


def sample_budget(width: int, height: int, patch_size: int, budgets: tuple[int, ...]) -> int:
    """The smallest budget in `budgets` holding the image at its native resolution (the largest
    one for bigger images): upstream's per-batch rule applied to one image."""
    return batch_budget([native_patches(height, width, patch_size)], budgets[-1])


class NaFlexLoader:
    """Endless iterator of this rank's NaFlex micro-batches (see the module docstring)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Siglip2Tokenizer | str | Path | None = None,
        patch_size: int = 16,
        max_budget: int | None = None,
        dp_rank: int = 0,
        dp_size: int = 1,
        shards: ShardSet | None = None,
        num_threads: int | None = None,
        patience: int | None = None,
        *,
        device: torch.device | str = "cpu",
        kind: str | None = None,
    ):
        """`tokenizer`, `max_budget`, `patience` default to data.tokenizer,
        data.max_patch_budget, data.budget_patience; `patch_size` is the vision tower's.
        `device` is the training device batches are returned on; `kind` ('dali' or 'pil')
        overrides data.loader."""
        max_budget = cfg.max_patch_budget if max_budget is None else max_budget
        patience = cfg.budget_patience if patience is None else patience
        if patience == 0:
            patience = auto_patience(cfg.micro_batch_size * dp_size, cfg)
        tokenizer = cfg.tokenizer if tokenizer is None else tokenizer
        if tokenizer == "":
            raise ValueError("data.tokenizer is empty: FG-CLIP 2 needs a SigLIP 2 tokenizer.json")
        check_budget(max_budget)
        if cfg.micro_batch_size < 1:
            raise ValueError(
                f"data.micro_batch_size={cfg.micro_batch_size}: the NaFlex loader needs it set"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if cfg.region_text not in REGION_TEXT:
            raise ValueError(f"data.region_text={cfg.region_text!r}: expected one of {REGION_TEXT}")
        self.cfg = cfg
        self.tok = (
            tokenizer if isinstance(tokenizer, Siglip2Tokenizer) else Siglip2Tokenizer(tokenizer)
        )
        self.patch_size = patch_size
        self.budgets = tuple(b for b in PATCH_BUDGETS if b <= max_budget)
        self.rank, self.dp = dp_rank, dp_size
        self.micro = cfg.micro_batch_size
        self.policy = storage_policy(cfg)
        self.shards = shards if shards is not None else open_shard_set(cfg.shards, self.policy)
        # The global stream: order.py at dp_size=1, the same on every rank.
        self.order = StreamOrder(
            self.shards.sizes, cfg.seed, 0, 1, cfg.read_block_size, cfg.shuffle_window_blocks
        )
        self.grouper = BudgetGrouper(self.micro * dp_size, self.budgets, patience)
        self.cursor = (self.order.first_epoch, 0)  # next (epoch, window) to group
        self.steps = 0  # batches consumed (informational)
        self.global_samples = 0  # samples consumed by the whole DP group
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self._blocks: OrderedDict[tuple[str, int, int], dict] = OrderedDict()
        self._pool = ThreadPoolExecutor(max(1, num_threads or cfg.num_threads))
        # The trainer passes its runtime's device (the one place that probes the accelerator).
        self.device = torch.device(device)
        self.decoder = build_decoder(cfg, self.device, self._pool, self.micro, kind)
        # Batches are assembled (read, decoded, tokenized, packed) ahead in one background thread,
        # up to data.prefetch_queue_depth; their samples stay in the state until consumed.
        self._assembler = ThreadPoolExecutor(1, thread_name_prefix="naflex-assemble")
        self._pending: deque[tuple[int, list, Future]] = deque()
        self._lock = threading.Lock()  # reader and block caches: main and assembler threads

    # ------------------------------------------------------------------ reading

    def _reader(self, shard: int) -> ShardReader:
        with self._lock:
            return self._reader_locked(shard)

    def _reader_locked(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            reader = ShardReader(self.shards.paths[shard], self.policy)
            if reader.num_samples != int(self.shards.sizes[shard]):
                raise ValueError(
                    f"{reader.path} has {reader.num_samples} samples, the index says "
                    f"{int(self.shards.sizes[shard])}: the shard changed after the index was "
                    "written"
                )
            if reader.num_negatives < self.cfg.num_hard_negatives:
                raise ValueError(
                    f"{reader.path} stores {reader.num_negatives} hard negatives per box, "
                    f"data.num_hard_negatives={self.cfg.num_hard_negatives} asks for more"
                )
            self._readers[shard] = reader
            if len(self._readers) > 64:
                self._readers.popitem(last=False)
        return self._readers[shard]

    def _block(self, kind: str, shard: int, row: int) -> dict:
        """Arrays of the aligned read block holding `row` ('sizes': image_sizes only; 'meta':
        offsets, texts, boxes), cached; keys 'start' and 'end' give its rows."""
        bs = self.cfg.read_block_size
        lo = row // bs * bs
        key = (kind, shard, lo)
        with self._lock:
            if key in self._blocks:
                return self._blocks[key]
        reader = self._reader(shard)
        hi = min(lo + bs, reader.num_samples)
        out = {"start": lo, "end": hi}
        if kind == "sizes":
            out["image_sizes"] = np.asarray(reader._a("image_sizes")[lo:hi])
        else:
            for name in ("image_offsets", "box_offsets"):
                out[name] = np.asarray(reader._a(name)[lo : hi + 1])
            for name in ("keys", "captions", "short_captions"):
                out[name] = reader._a(name)[lo:hi]
            b0, b1 = int(out["box_offsets"][0]), int(out["box_offsets"][-1])
            for name in ("boxes", "box_short_exprs", "box_long_exprs", "neg_flags",
                         "neg_texts"):  # fmt: skip
                out[name] = reader._a(name)[b0:b1]
            out["box_base"] = b0
        with self._lock:
            self._blocks[key] = out
            if len(self._blocks) > 256:
                self._blocks.popitem(last=False)
        return out

    def _locate(self, sid: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.order.offsets, sid, side="right") - 1)
        return shard, sid - int(self.order.offsets[shard])

    def _group_next_window(self) -> None:
        epoch, w = self.cursor
        plan = self.order.plan(epoch)
        lo, hi = int(plan.window_bounds[w]), int(plan.window_bounds[w + 1])
        ids = plan.ids[lo:hi]
        budgets = []
        for sid in ids.tolist():
            shard, row = self._locate(sid)
            blk = self._block("sizes", shard, row)
            width, height = (int(v) for v in blk["image_sizes"][row - blk["start"]])
            try:
                budgets.append(sample_budget(width, height, self.patch_size, self.budgets))
            except NaFlexError as e:
                meta = self._block("meta", shard, row)  # the sample's key, read for the message
                key = meta["keys"][row - meta["start"]]
                raise NaFlexError(f"{self.shards.paths[shard]} row {row} ({key}): {e}") from None
        self.grouper.add_window(ids.tolist(), [epoch] * len(ids), budgets)
        self.cursor = (epoch, w + 1) if w + 1 < len(plan.window_blocks) else (epoch + 1, 0)

    def _sample(self, sid: int, epoch: int) -> dict:
        shard, row = self._locate(sid)
        blk = self._block("meta", shard, row)
        i = row - blk["start"]
        reader = self._reader(shard)
        o0, o1 = int(blk["image_offsets"][i]), int(blk["image_offsets"][i + 1])
        b0, b1 = (int(v) - blk["box_base"] for v in blk["box_offsets"][i : i + 2])
        m = min(b1 - b0, self.cfg.max_boxes)
        coins = region_coins(self.cfg.seed, epoch, np.array([sid]), self.cfg.max_boxes)[0]
        if self.cfg.region_text != "random":
            coins[:] = self.cfg.region_text == "long"
        rows = range(b0, b0 + m)
        short_exprs = [str(blk["box_short_exprs"][j]) for j in rows]
        long_exprs = [str(blk["box_long_exprs"][j]) for j in rows]
        k = self.cfg.num_hard_negatives
        return {
            "key": str(blk["keys"][i]),
            "jpeg": (reader, o0, o1),  # read in the decode pool: reads overlap
            "where": f"{reader.path} row {row}",
            "size": tuple(int(v) for v in self._block("sizes", shard, row)["image_sizes"][i]),
            "caption": str(blk["captions"][i]),
            "short_caption": str(blk["short_captions"][i]),
            "boxes": np.asarray(blk["boxes"][b0 : b0 + m], np.float32).reshape(m, 4),
            "phrases": [long_exprs[j] if coins[j] else short_exprs[j] for j in range(m)],
            "short_exprs": short_exprs,
            "hard": [bool(blk["neg_flags"][j]) for j in rows],
            "negs": [[str(t) for t in blk["neg_texts"][j][:k]] for j in rows],
        }

    # ------------------------------------------------------------------ batches

    def __iter__(self):
        return self

    def __next__(self) -> NaFlexLoaded:
        while len(self._pending) < max(1, self.cfg.prefetch_queue_depth):
            while not self.grouper.ready:
                self._group_next_window()
            budget, items = self.grouper.pop()
            mine = items[self.rank * self.micro : (self.rank + 1) * self.micro]
            job = self._assembler.submit(self._assemble, budget, mine)
            self._pending.append((budget, items, job))
        _, _, job = self._pending.popleft()
        self.steps += 1
        self.global_samples += self.micro * self.dp
        return job.result()

    @property
    def epoch(self) -> int:
        """Epoch of the oldest sample not yet consumed (the trainer's checkpoint logs it)."""
        waiting = [items for _, items, _ in self._pending] + [v for _, v in self.grouper.ready]
        waiting += list(self.grouper.buckets.values())
        epochs = [e for items in waiting for _, e, _ in items]
        return min(epochs) if epochs else self.cursor[0]

    def _drop_pending(self) -> None:
        for _, _, job in self._pending:
            job.cancel()
        for _, _, job in self._pending:
            if not job.cancelled():
                job.exception()  # wait, so no stale batch is still being built
        self._pending.clear()

    def _assemble(self, budget: int, items: list[tuple[int, int, int]]) -> NaFlexLoaded:
        samples = [self._sample(sid, epoch) for sid, epoch, _ in items]
        images = self.decoder(samples)  # uint8 (3, H, W) each, on the decode device
        for s, img in zip(samples, images, strict=True):
            if (img.shape[2], img.shape[1]) != s["size"]:
                # The batch's budget was chosen from the stored size: a wrong one would
                # silently shrink or upsample the image.
                raise NaFlexError(
                    f"{s['where']} ({s['key']}): the JPEG is {img.shape[2]}x{img.shape[1]} px, "
                    f"the shard's image_sizes says {s['size'][0]}x{s['size'][1]}"
                )
            if img.shape[1] < self.patch_size or img.shape[2] < self.patch_size:
                raise NaFlexError(
                    f"{s['where']} ({s['key']}): image of {img.shape[2]}x{img.shape[1]} px is "
                    f"smaller than one {self.patch_size}x{self.patch_size} patch"
                )
        pixels, valid, grids = pack_images(images, self.patch_size, budget)
        tok = self.tok
        rois, phrases, hard_rows, hard_texts = [], [], [], []
        for i, s in enumerate(samples):
            for j, box in enumerate(s["boxes"]):
                if s["hard"][j]:
                    hard_rows.append(len(phrases))
                    hard_texts.extend([s["short_exprs"][j], *s["negs"][j]])
                rois.append([float(i), *box.tolist()])
                phrases.append(s["phrases"][j])
        k1 = 1 + self.cfg.num_hard_negatives
        return NaFlexLoaded(
            pixels=pixels,
            valid=valid,
            grids=[(int(h), int(w)) for h, w in grids.tolist()],
            long_tokens=_long(tok.long([s["caption"] for s in samples])),
            short_tokens=_long(tok.short([s["short_caption"] for s in samples])),
            region_rois=torch.tensor(rois, dtype=torch.float32).reshape(-1, 5),
            region_tokens=_phrases(tok, phrases),
            hard_rows=torch.tensor(hard_rows, dtype=torch.int64),
            hardneg_tokens=_phrases(tok, hard_texts).reshape(len(hard_rows), k1, tok.short_context),
            hardneg_valid=None,  # a flagged box has all K negatives (shard format)
            sample_ids=torch.tensor([it[0] for it in items], dtype=torch.int64),
            sample_epochs=torch.tensor([it[1] for it in items], dtype=torch.int64),
            keys=[s["key"] for s in samples],
            budget=budget,
        ).to(self.device)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        grouper = self.grouper.state_dict()
        # Prefetched batches are not consumed yet: they go back in front of the ready queue.
        prefetched = [[b, [list(it) for it in items]] for b, items, _ in self._pending]
        grouper["ready"] = prefetched + grouper["ready"]
        return {
            "version": STATE_VERSION,
            "kind": "naflex",
            "seed": self.cfg.seed,
            "fingerprint": self.shards.fingerprint,
            "block_size": self.cfg.read_block_size,
            "window_blocks": self.cfg.shuffle_window_blocks,
            "budgets": list(self.budgets),
            "patch_size": self.patch_size,
            "patience": self.grouper.patience,
            "dp_size": self.dp,
            "micro_batch_size": self.micro,
            "cursor": list(self.cursor),
            "steps": self.steps,
            "epoch": self.epoch,
            "global_samples": self.global_samples,
            "grouper": grouper,
        }

    def load_state_dict(self, state: dict) -> None:
        """Same layout: continues exactly. Another dp_size or micro-batch size: the samples that
        were waiting (grouped or not) are regrouped into the new global batch size."""
        if state.get("version") != STATE_VERSION or state.get("kind") != "naflex":
            raise ValueError(
                f"loader state version {state.get('version')} kind {state.get('kind')!r}: "
                f"expected a NaFlex loader state version {STATE_VERSION}"
            )
        mine = self.state_dict()
        for name in _FIXED:
            if state.get(name) != mine[name]:
                raise ValueError(
                    f"loader state: {name}={state.get(name)!r} but this loader has "
                    f"{mine[name]!r}; the sample grouping would differ, so it cannot resume"
                )
        try:
            grouper = BudgetGrouper.from_state(state["grouper"], self.micro * self.dp)
            grouper.patience = self.grouper.patience  # auto patience follows the batch size
            epoch, w = (int(v) for v in state["cursor"])
            if epoch < 0 or not 0 <= w < len(self.order.plan(epoch).window_blocks):
                raise ValueError(f"cursor ({epoch}, {w}) is not a window of the stream")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"loader state: {e}") from None
        self._drop_pending()
        self.grouper, self.cursor, self.steps = grouper, (epoch, w), int(state.get("steps", 0))
        self.global_samples = int(state.get("global_samples", 0))

    def close(self) -> None:
        self._drop_pending()
        self._assembler.shutdown(wait=True)
        self.decoder.close()
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.int64)


def _phrases(tok: Siglip2Tokenizer, texts: list[str]) -> torch.Tensor:
    """(N, L) int64 phrase tokens, L the short context; (0, L) for a batch without boxes."""
    if not texts:
        return torch.zeros(0, tok.short_context, dtype=torch.int64)
    return _long(tok.phrases(texts))


def padding_fraction(
    sizes: np.ndarray, budgets: np.ndarray | list[int], patch_size: int
) -> tuple[int, int]:
    """(padded patches, total patches) of images `sizes` (n, 2) (width, height) packed at the
    per-image `budgets` (n,): each image fills grid_for_budget's gh*gw of its budget."""
    from fgclip_mega.data.naflex import grid_for_budget

    padded = total = 0
    for (width, height), budget in zip(np.asarray(sizes).tolist(), budgets, strict=True):
        gh, gw = grid_for_budget(int(height), int(width), patch_size, int(budget))
        padded += int(budget) - gh * gw
        total += int(budget)
    return padded, total
