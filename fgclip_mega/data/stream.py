"""What the DALI and PIL loaders share: the rank stream, its resumable state, key lookup."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from fgclip_mega.config import DataConfig
from fgclip_mega.data.shards import ShardReader, ShardSet, open_shard_set
from fgclip_mega.data.source import SampleSource, SourceSpec

STATE_VERSION = 1
# State fields that fix the sample order; a resume with any of them changed is refused.
_ORDER_FIELDS = ("seed", "dp_size", "fingerprint", "block_size", "window_blocks")


class StreamLoader:
    """Endless iterator of micro-batches over this rank's share of the shards.

    The state is the stream position (samples this rank has consumed), identical on every rank
    because every rank takes the same number of equally sized micro-batches: saving rank 0's
    `state_dict()` and loading it on all ranks resumes every rank exactly.
    """

    def __init__(
        self,
        cfg: DataConfig,
        image_size: int,
        short_context: int,
        long_context: int,
        dp_rank: int,
        dp_size: int,
        shards: ShardSet | None = None,
    ):
        self.cfg = cfg
        self.image_size = image_size
        self.shards = shards if shards is not None else open_shard_set(cfg.shards)
        self.spec = SourceSpec(
            paths=tuple(self.shards.paths),
            sizes=tuple(int(s) for s in self.shards.sizes),
            seed=cfg.seed,
            dp_rank=dp_rank,
            dp_size=dp_size,
            batch_size=cfg.micro_batch_size,
            start=0,
            block_size=cfg.read_block_size,
            window_blocks=cfg.shuffle_window_blocks,
            max_boxes=cfg.max_boxes,
            num_negatives=cfg.num_hard_negatives,
            short_context=short_context,
            long_context=long_context,
            region_text=cfg.region_text,
        )
        SampleSource(self.spec)  # validates the spec here, not in a worker process
        self.order = self.spec.order()
        self.position = 0
        self._keys: OrderedDict[int, list[str]] = OrderedDict()

    # ------------------------------------------------------------------ stream facts

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def epoch(self) -> int:
        """Epoch of the next sample."""
        return self.order.locate(self.position)[0]

    @property
    def samples_per_epoch(self) -> int:
        """Samples per rank per epoch (ranks alternate in taking one extra, see order.py)."""
        return self.order.base

    def keys_of(self, sample_ids: np.ndarray) -> list[str]:
        offsets = self.shards.offsets
        shards = np.searchsorted(offsets, sample_ids, side="right") - 1
        out = []
        for sid, shard in zip(sample_ids.tolist(), shards.tolist(), strict=True):
            if shard not in self._keys:
                self._keys[shard] = ShardReader(self.shards.paths[shard]).keys()
                if len(self._keys) > 64:
                    self._keys.popitem(last=False)
            out.append(self._keys[shard][sid - int(offsets[shard])])
        return out

    def _check_positions(self, positions: np.ndarray) -> None:
        expected = np.arange(self.position, self.position + self.batch_size)
        if not np.array_equal(positions, expected):
            raise RuntimeError(
                f"loader produced stream positions {positions[:4]}... where "
                f"{expected[:4]}... were due: the batch order is broken"
            )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        epoch, offset = self.order.locate(self.position)
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "epoch": epoch,
            "offset_in_epoch": offset,
            "seed": self.spec.seed,
            "dp_size": self.spec.dp_size,
            "num_samples": self.shards.num_samples,
            "fingerprint": self.shards.fingerprint,
            "block_size": self.spec.block_size,
            "window_blocks": self.spec.window_blocks,
            # Every rank is at `position`: samples consumed by the whole DP group.
            "global_samples": self.position * self.spec.dp_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Same dp_size: continues exactly. Another dp_size (a resume at a new layout): each
        rank's order depends on dp_size, so the stream continues at the start of the next epoch
        (`resume_position`); the rest of the interrupted epoch is not seen."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        mine = self.state_dict()
        for name in _ORDER_FIELDS:
            if name != "dp_size" and state.get(name) != mine[name]:
                raise ValueError(
                    f"loader state: {name}={state.get(name)!r} but this loader has "
                    f"{mine[name]!r}; the sample order would differ, so it cannot resume exactly"
                )
        self._restart(self.resume_position(state))

    def resume_position(self, state: dict) -> int:
        """This loader's stream position for a saved state (the same on every rank)."""
        if state["dp_size"] == self.spec.dp_size:
            return int(state["position"])
        epoch = state["epoch"] + (state["offset_in_epoch"] > 0)
        # Ranks' epochs start within one sample of each other: the latest start is common.
        return epoch * self.order.base - (-(epoch * self.order.extra) // self.spec.dp_size)

    def _restart(self, position: int) -> None:
        """Continue from `position`; subclasses drop prefetched work."""
        self.position = position

    def __iter__(self):
        return self

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
