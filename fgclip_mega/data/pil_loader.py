"""Pure-PIL loader over the same shards and stream: the test reference and benchmark baseline.

Same SampleSource (order, tokens, boxes) as the DALI loader; images are decoded with PIL in a
thread pool of `num_threads` (PIL releases the GIL in decode and resize) and resized with the
same semantics as the DALI loader: antialiased -> PIL BILINEAR resize (triangle filter);
not antialiased -> PIL affine transform with BILINEAR sampling at pixel centres (plain bilinear
interpolation, half-pixel centres).
"""

from __future__ import annotations

import io
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

from fgclip_mega.config import DataConfig
from fgclip_mega.data.batch import Batch, batch_from_arrays
from fgclip_mega.data.shards import ShardSet
from fgclip_mega.data.source import SampleSource
from fgclip_mega.data.stream import StreamLoader
from fgclip_mega.data.transforms import normalise


def pil_resized(jpeg: bytes | np.ndarray, size: int, antialias: bool) -> np.ndarray:
    """(size, size, 3) uint8: PIL decode to RGB, then squash to size x size."""
    from PIL import Image

    data = jpeg.tobytes() if isinstance(jpeg, np.ndarray) else jpeg
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if antialias:
        img = img.resize((size, size), Image.BILINEAR)
    else:
        w, h = img.size
        affine = (w / size, 0.0, 0.0, 0.0, h / size, 0.0)
        img = img.transform((size, size), Image.AFFINE, affine, resample=Image.BILINEAR)
    return np.asarray(img)


class PilLoader(StreamLoader):
    def __init__(
        self,
        cfg: DataConfig,
        image_size: int,
        short_context: int = 77,
        long_context: int = 248,
        dp_rank: int = 0,
        dp_size: int = 1,
        device: torch.device | str | None = None,
        shards: ShardSet | None = None,
        antialias: bool | None = None,
    ):
        super().__init__(cfg, image_size, short_context, long_context, dp_rank, dp_size, shards)
        self.device = torch.device(device or "cpu")
        self.antialias = cfg.resize_antialias == "on" if antialias is None else antialias
        self._decode = ThreadPoolExecutor(max(1, cfg.num_threads))
        self._assemble = ThreadPoolExecutor(1)
        self._pending: deque[Future] = deque()
        self._source: SampleSource | None = None
        self._next_step = 0

    def _make(self, source: SampleSource, step: int) -> dict:
        arrays = source.batch(step)
        size, aa, ids = self.image_size, self.antialias, arrays["sample_ids"]

        def decode(i: int) -> np.ndarray:
            try:
                return pil_resized(arrays["jpeg"][i], size, aa)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
                raise self.undecodable(int(ids[i]), f"PIL: {type(e).__name__}: {e}") from None

        images = list(self._decode.map(decode, range(len(arrays["jpeg"]))))
        arrays["images"] = normalise(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
        return arrays

    def __next__(self) -> Batch:
        if self._source is None:
            self._source = SampleSource(replace(self.spec, start=self.position))
            self._next_step = 0
        while len(self._pending) < max(1, self.cfg.prefetch_queue_depth):
            self._pending.append(self._assemble.submit(self._make, self._source, self._next_step))
            self._next_step += 1
        arrays = self._pending.popleft().result()
        self._check_positions(arrays["positions"])
        arrays["epoch"] = self.order.locate(self.position)[0]
        batch = batch_from_arrays(
            arrays["images"],
            arrays,
            self.keys_of(arrays["sample_ids"]),
            length_multiple=self.cfg.text_length_multiple,
        )
        self.position += self.batch_size
        return batch.to(self.device)

    def _restart(self, position: int) -> None:
        for fut in self._pending:
            fut.cancel()
        for fut in self._pending:
            if not fut.cancelled():
                fut.exception()  # wait, so no stale batch is still being built
        self._pending.clear()
        self._source = None
        super()._restart(position)

    def close(self) -> None:
        self._restart(self.position)
        self._decode.shutdown(wait=True)
        self._assemble.shutdown(wait=True)
