"""DALI loader: shards -> parallel external source -> JPEG decode -> squash resize -> normalise.

Decode placement is one dispatch (`decode_device`, resolved in `resolve_decode_device`):
  - 'mixed' when DALI sees a CUDA device and the training device is CUDA: nvJPEG decode, DALI
    resize and crop_mirror_normalize on the GPU, handed over by DALIGenericIterator;
  - 'cpu' otherwise: DALI decodes in its CPU threads (libjpeg-turbo, bit-exact with PIL) and
    the squash resize + normalisation run in torch (transforms.py): DALI's CPU resize costs more
    than the decode itself, torch's uint8 kernels ~6x less.
Both squash to image_size x image_size like upstream FG-CLIP (no aspect-preserving crop).
`resize_antialias` (default on) low-pass filters like PIL's BILINEAR resize on both paths;
measured cost on the CPU path: ~0.04 ms per image, so there is no reason to alias.

Public entry point for the trainer: `build_loader(cfg.data, image_size=..., ...)`.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import threading
from dataclasses import replace

import numpy as np
import torch

from fgclip_mega.config import DataConfig
from fgclip_mega.data import schema
from fgclip_mega.data.batch import CLIP_MEAN, CLIP_STD, Batch, batch_from_arrays
from fgclip_mega.data.shards import ShardSet, open_shard_set
from fgclip_mega.data.source import OUTPUTS, SampleSource
from fgclip_mega.data.stream import ImageDecodeError, StreamLoader, storage_policy
from fgclip_mega.data.transforms import normalise, squash_u8

_log = logging.getLogger(__name__)


def dali_cuda_devices() -> int:
    from nvidia.dali import backend

    return int(backend.GetCUDADeviceCount())


def resolve_decode_device(setting: str, device: torch.device) -> str:
    """'mixed' or 'cpu' for DataConfig.decode_device on the given training device."""
    if setting == "cpu":
        return "cpu"
    has_cuda = device.type == "cuda" and dali_cuda_devices() > 0
    if setting == "mixed" and not has_cuda:
        raise ValueError(
            f"data.decode_device=mixed needs a CUDA training device that DALI can see "
            f"(device={device}, DALI CUDA devices={dali_cuda_devices()})"
        )
    return "mixed" if has_cuda else "cpu"


def resolve_start_method(setting: str) -> str:
    """fork unless CUDA is already initialised in this process (a forked child cannot use it)."""
    if setting != "auto":
        return setting
    return "spawn" if torch.cuda.is_initialized() else "fork"


def _build_pipeline(
    source: SampleSource,
    cfg: DataConfig,
    image_size: int,
    decode_device: str,
    device_id: int | None,
    antialias: bool,
):
    from nvidia.dali import fn, pipeline_def, types

    workers = cfg.py_num_workers
    dali_types = {"uint8": types.UINT8, "int32": types.INT32, "int64": types.INT64,
                  "float32": types.FLOAT}  # fmt: skip

    @pipeline_def(
        batch_size=source.spec.batch_size,
        num_threads=cfg.num_threads,
        device_id=device_id,
        prefetch_queue_depth=cfg.prefetch_queue_depth,
        py_num_workers=max(1, workers),
        py_start_method=resolve_start_method(cfg.py_start_method),
    )
    def pipe():
        outs = fn.external_source(
            source=source,
            num_outputs=len(OUTPUTS),
            batch=True,
            batch_info=True,
            parallel=workers > 0,
            dtype=[dali_types[field.dtype] for field in schema.OUTPUTS],
        )
        images = fn.decoders.image(outs[0], device=decode_device, output_type=types.RGB)
        if decode_device == "mixed":
            images = fn.resize(
                images,
                resize_x=image_size,
                resize_y=image_size,
                interp_type=types.INTERP_LINEAR,
                antialias=antialias,
            )
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[255 * m for m in CLIP_MEAN],
                std=[255 * s for s in CLIP_STD],
            )
        # cpu: (H_i, W_i, 3) uint8 images of varying size, resized in torch by the loader.
        return (images, *outs[1:])

    return pipe()


class DaliLoader(StreamLoader):
    """Micro-batches decoded by DALI; `next(loader)` returns a Batch on `device`.

    Call `next` from the training thread: on the CPU path it briefly sets torch's intra-op
    thread count to 1 for the resize (see `_next_cpu`) and restores it before returning.
    """

    def __init__(
        self,
        cfg: DataConfig,
        image_size: int,
        short_context: int = 77,
        long_context: int = 248,
        dp_rank: int = 0,
        dp_size: int = 1,
        device: torch.device | str = "cpu",
        shards: ShardSet | None = None,
    ):
        super().__init__(cfg, image_size, short_context, long_context, dp_rank, dp_size, shards)
        # The trainer passes its runtime's device (the one place that probes the accelerator).
        self.device = torch.device(device)
        self.decode_device = resolve_decode_device(cfg.decode_device, self.device)
        self.antialias = cfg.resize_antialias == "on"
        self._iter = None
        self._pipe = None

    def _start(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        source = SampleSource(replace(self.spec, start=self.position))
        # Reader processes die with this one (see worker_guard.py); PDEATHSIG follows the thread
        # that starts them, which is this one: only safe when it is the main thread.
        forked = resolve_start_method(self.cfg.py_start_method) == "fork"
        on_main = threading.current_thread() is threading.main_thread()
        source.guard = (os.getpid(), on_main, forked)
        device_id = None
        if self.decode_device == "mixed":
            device_id = self.device.index if self.device.index is not None else 0
        self._pipe = _build_pipeline(
            source, self.cfg, self.image_size, self.decode_device, device_id, self.antialias
        )
        self._pipe.build()
        if self.decode_device == "mixed":
            names = ["images", *OUTPUTS[1:]]
            self._iter = DALIGenericIterator([self._pipe], names, auto_reset=False)

    def _next_cpu(self) -> dict:
        outs = self._pipe.run()
        # np.asarray views DALI's buffers (no copy); they are consumed before the next run().
        images = [np.asarray(t) for t in outs[0]]
        dense = zip(OUTPUTS[1:], outs[1:], strict=True)
        out = {name: torch.from_numpy(tl.as_array()) for name, tl in dense}
        # One torch thread while DALI's threads decode the next batches: with torch's default
        # pool the 2-core machine is oversubscribed and OpenMP spin-waits (measured 0.6 ms ->
        # 7-8 ms per image). Restored before returning, so the training step is unaffected.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out["images"] = normalise(squash_u8(images, self.image_size, self.antialias))
        finally:
            torch.set_num_threads(threads)
        return out

    def __next__(self) -> Batch:
        if self._pipe is None:
            self._start()
        try:
            out = next(self._iter)[0] if self._iter is not None else self._next_cpu()
        except RuntimeError as e:
            self.close()  # a DALI pipeline is unusable after an error
            raise self._culprit(e) from None
        self._check_positions(out["positions"].numpy())
        ids = out["sample_ids"].numpy()
        out["epoch"] = self.order.locate(self.position)[0]
        batch = batch_from_arrays(
            out["images"], out, self.keys_of(ids), length_multiple=self.cfg.text_length_multiple
        )
        self.position += self.batch_size
        return batch.to(self.device)

    def _culprit(self, err: Exception) -> ImageDecodeError:
        """The error naming the sample whose JPEG PIL cannot decode either: DALI's error
        names no sample, and with prefetching it may come from a batch queued behind this
        one, so those are searched too (read again from the shards: an error path only)."""
        from fgclip_mega.data.naflex_dali import dali_error_reason
        from fgclip_mega.data.naflex_decode import pil_failure

        reason = f"DALI {self.decode_device}: {dali_error_reason(err)}"
        source = SampleSource(replace(self.spec, start=self.position))
        for step in range(max(1, self.cfg.prefetch_queue_depth) + 1):
            arrays = source.batch(step)
            for sid, jpeg in zip(arrays["sample_ids"], arrays["jpeg"], strict=True):
                if (failure := pil_failure(jpeg)) is not None:
                    return self.undecodable(int(sid), f"{reason}; {failure}")
        return ImageDecodeError(
            f"{reason}, at stream position {self.position} of rank {self.spec.dp_rank} "
            "(PIL decodes every JPEG of this batch and of the ones queued behind it)"
        )

    def _restart(self, position: int) -> None:
        self.close()
        super()._restart(position)

    def close(self) -> None:
        # Dropping the iterator and pipeline stops DALI's threads and reader processes, but only
        # when they are collected: the pipeline sits in reference cycles, and a worker pool torn
        # down later by a random GC pass, while another loader's pool runs, made that pool fail
        # ("Worker data receiving interrupted", seen when a run evaluates and then resumes).
        # Collect now so the teardown happens here, deterministically.
        had_pipe = self._pipe is not None
        self._iter = None
        self._pipe = None
        if had_pipe:
            gc.collect()


def resolve_loader_kind(setting: str) -> str:
    """'dali' or 'pil' for DataConfig.loader: auto is DALI where it is installed and the PIL
    reference loader (the same batches, decoded by PIL) where it is not, saying so."""
    if setting != "auto":
        return setting
    if importlib.util.find_spec("nvidia.dali") is not None:
        return "dali"
    _log.warning("nvidia-dali is not installed: data.loader=auto uses the PIL reference loader")
    return "pil"


def build_loader(
    cfg: DataConfig,
    image_size: int,
    short_context: int = 77,
    long_context: int = 248,
    dp_rank: int = 0,
    dp_size: int = 1,
    device: torch.device | str = "cpu",
    kind: str | None = None,
) -> StreamLoader:
    """The trainer's entry point: a DALI (or PIL reference) loader over `cfg.shards`.

    With `cfg.shards` empty, the embedded synthetic set (cfg.synthetic_num_samples images) is
    built once in `cfg.synthetic_dir` and used; concurrent ranks wait on a file lock.
    """
    if cfg.shards:
        shards = open_shard_set(cfg.shards, storage_policy(cfg))
    else:
        from fgclip_mega.data.embedded import ensure_synthetic_shards

        index = ensure_synthetic_shards(
            cfg.synthetic_dir, cfg.synthetic_num_samples, image_size, seed=cfg.seed
        )
        shards = open_shard_set(index)
    args = (cfg, image_size, short_context, long_context, dp_rank, dp_size)
    kind = resolve_loader_kind(kind or cfg.loader)
    if kind == "dali":
        return DaliLoader(*args, device=device, shards=shards)
    if kind == "pil":
        from fgclip_mega.data.pil_loader import PilLoader

        return PilLoader(*args, device=device, shards=shards)
    raise ValueError(f"loader kind {kind!r}: expected 'dali' or 'pil'")


def build_config_loader(
    cfg, dp_rank: int, dp_size: int, device: torch.device | str, data: DataConfig | None = None
) -> StreamLoader:
    """`build_loader` with the sizes of a whole `Config` (image size, text contexts);
    `data` replaces cfg.data (e.g. the held-out set)."""
    t = cfg.model.text
    return build_loader(
        data or cfg.data,
        cfg.model.vision.image_size,
        t.short_context,
        t.long_context,
        dp_rank=dp_rank,
        dp_size=dp_size,
        device=device,
    )


__all__ = ["Batch", "DaliLoader", "build_config_loader", "build_loader", "resolve_decode_device"]
