"""What the DALI and PIL loaders share: the rank stream, its resumable state, key lookup."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np

from fgclip_mega.config import DataConfig
from fgclip_mega.data.order import Transition, transition_after
from fgclip_mega.data.shards import ShardReader, ShardSet, open_shard_set
from fgclip_mega.data.source import SampleSource, SourceSpec
from fgclip_mega.data.storage import RetryPolicy

STATE_VERSION = 1

# State fields that fix the sample order; a resume with any of them changed is refused (a changed
# dp_size is continued through a transition epoch, see order.py).
_ORDER_FIELDS = ("seed", "fingerprint", "block_size", "window_blocks")


class ImageDecodeError(ValueError):
    """A sample's JPEG does not decode (or DALI fails on a batch); the message names it."""


def storage_policy(cfg: DataConfig) -> RetryPolicy:
    """Retries and timeouts of object-store requests (DataConfig.storage_*)."""
    return RetryPolicy(attempts=cfg.storage_attempts, timeout_s=cfg.storage_timeout_s)


class StreamLoader:
    """Endless iterator of micro-batches over this rank's share of the shards.

    The state is the stream position (samples this rank has consumed), identical on every rank
    because every rank takes the same number of equally sized micro-batches, plus the transition
    (if the stream began at a DP-size change): saving rank 0's `state_dict()` and loading it on
    all ranks resumes every rank exactly, at the same or at another dp_size.
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
        policy = storage_policy(cfg)
        self.shards = shards if shards is not None else open_shard_set(cfg.shards, policy)
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
            read_ahead=cfg.read_ahead_windows,
            storage=policy,
        )
        SampleSource(self.spec)  # validates the spec here, not in a worker process
        self.order = self.spec.order()
        self.position = 0
        self.global_base = 0  # samples the whole DP group consumed before position 0
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

    def _locate(self, sample_ids: np.ndarray) -> tuple[list[int], list[int]]:
        """(shard index, row in that shard) of each sample id."""
        offsets = self.shards.offsets
        shards = np.searchsorted(offsets, sample_ids, side="right") - 1
        return shards.tolist(), (sample_ids - offsets[shards]).tolist()

    def keys_of(self, sample_ids: np.ndarray) -> list[str]:
        out = []
        for shard, row in zip(*self._locate(sample_ids), strict=True):
            if shard not in self._keys:
                path = self.shards.paths[shard]
                self._keys[shard] = ShardReader(path, self.spec.storage).keys()
                if len(self._keys) > 64:
                    self._keys.popitem(last=False)
            out.append(self._keys[shard][row])
        return out

    def where(self, sample_id: int) -> str:
        """'<shard path> row R (key)' of a sample, as error messages name it."""
        ids = np.asarray([sample_id])
        (shard,), (row,) = self._locate(ids)
        return f"{self.shards.paths[shard]} row {row} ({self.keys_of(ids)[0]})"

    def undecodable(self, sample_id: int, reason: str) -> ImageDecodeError:
        return ImageDecodeError(f"{self.where(sample_id)}: the JPEG does not decode: {reason}")

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
            "transition": self.spec.transition.to_state() if self.spec.transition else None,
            # Every rank is at `position`: samples consumed by the whole DP group.
            "global_samples": self.global_base + self.position * self.spec.dp_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Same dp_size: continues exactly. Another dp_size (a resume at a new layout): the
        samples of the current epoch that no old rank read are split over the new ranks (a
        transition epoch, order.py), then normal epochs follow: nothing repeated or skipped."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        mine = self.state_dict()
        for name in _ORDER_FIELDS:
            if state.get(name) != mine[name]:
                raise ValueError(
                    f"loader state: {name}={state.get(name)!r} but this loader has "
                    f"{mine[name]!r}; the sample order would differ, so it cannot resume exactly"
                )
        old_dp, position = state.get("dp_size"), state.get("position")
        for name, value, least in (("dp_size", old_dp, 1), ("position", position, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"loader state: {name}={value!r}: expected an int >= {least}")
        global_samples = int(state.get("global_samples", position * old_dp))
        try:
            transition = Transition.from_state(state.get("transition"))
            if old_dp != self.spec.dp_size:
                transition = transition_after(
                    self.shards.sizes, self.spec.seed, old_dp, position,
                    self.spec.block_size, self.spec.window_blocks, transition,
                )  # fmt: skip
                position = 0
            spec = replace(self.spec, transition=transition)
            order = spec.order()
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"loader state (dp_size={old_dp}, position={state['position']}, "
                f"transition={state.get('transition')!r}): {e}"
            ) from None
        self.spec, self.order = spec, order
        self.global_base = global_samples - position * self.spec.dp_size
        self._restart(position)

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
