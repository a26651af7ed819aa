"""DALI JPEG decoding for the NaFlex loader (naflex_decode.py chooses it).

One small pipeline: external_source (this rank's JPEG bytes, fed per micro-batch) ->
`decoders.image` on the CPU (libjpeg-turbo in DALI's threads) or `mixed` (nvJPEG on the training
GPU). Images keep their own sizes (a ragged batch); the resize to each image's patch grid and
the packing stay in `naflex.pack_images`, run on the decoded tensors' device, so the CPU path is
HF's Siglip2ImageProcessor bit for bit (DALI decodes our JPEGs exactly as PIL does: the tests
compare). The batch grouping, order and resume state stay in the loader: DALI holds no state
(no reader, no randomness), so resume is unchanged.

`adjust_orientation=False`: DALI applies a JPEG's EXIF rotation by default, PIL (and the stored
image sizes the budgets come from) does not; the shard builder re-encodes rotated images
upright, so a rotated one means a shard written some other way, decoded here as PIL does.

The pipeline runs synchronously (prefetch depth 1, fed and run once per micro-batch) in the
loader's assembler thread, which already prepares data.prefetch_queue_depth batches ahead.
Building it takes ~15-70 ms on these CPUs (measured; `import nvidia.dali` ~0.5 s once per
process), so it is built at the first batch and again after a decode error, which leaves a DALI
pipeline unusable.
"""

from __future__ import annotations

import gc
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fgclip_mega.data.naflex import NaFlexError
from fgclip_mega.data.naflex_decode import pil_verdict, read_jpeg, undecodable


class DaliDecoder:
    """uint8 (3, H, W) images from JPEG bytes by DALI; `decode_device` 'cpu' or 'mixed'."""

    kind = "dali"

    def __init__(
        self,
        decode_device: str,
        device: torch.device,
        pool: ThreadPoolExecutor,
        batch_size: int,
        num_threads: int,
    ):
        if decode_device not in ("cpu", "mixed"):
            raise ValueError(f"decode_device={decode_device!r}: expected 'cpu' or 'mixed'")
        if decode_device == "mixed" and device.type != "cuda":
            raise ValueError(f"decode_device=mixed decodes on a CUDA device, not {device}")
        self.decode_device = decode_device
        # mixed: the training GPU; cpu: DALI refuses any device id without CUDA (FACTS.md).
        self.device = device if decode_device == "mixed" else torch.device("cpu")
        self.device_id = (device.index or 0) if decode_device == "mixed" else None
        self.pool = pool  # reads the JPEG bytes from the shards in parallel (the loader's pool)
        self.batch_size = batch_size
        self.num_threads = max(1, num_threads)
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
        )
        def pipe():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(
                jpegs, device=self.decode_device, output_type=types.RGB, adjust_orientation=False
            )

        p = pipe()
        p.build()
        return p

    def _run(self, jpegs: list[np.ndarray]) -> list[torch.Tensor]:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("jpegs", jpegs)
        (out,) = self._pipe.run()  # (H_i, W_i, 3) uint8 each
        if self.decode_device == "cpu":
            # A copy: DALI reuses its output buffers at the next run().
            return [
                torch.from_numpy(np.asarray(t))
                .permute(2, 0, 1)
                .clone(memory_format=torch.contiguous_format)
                for t in out
            ]
        return self._to_torch_cuda(out)

    def _to_torch_cuda(self, out) -> list[torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        # Copied on torch's current stream, so torch's allocator may reuse these blocks safely;
        # then waited for, because DALI reuses its output buffers at the next run().
        stream = torch.cuda.current_stream(self.device)
        images = []
        for i in range(len(out)):
            t = out[i]
            x = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)  # (H, W, 3)
            feed_ndarray(t, x, cuda_stream=stream)
            images.append(x.permute(2, 0, 1))
        stream.synchronize()
        return images

    def __call__(self, samples: list[dict]) -> list[torch.Tensor]:
        jpegs = list(self.pool.map(read_jpeg, samples))
        try:
            return self._run(jpegs)
        except RuntimeError as e:
            self.close()  # a DALI pipeline is unusable after an error
            raise self._culprit(samples, jpegs, e) from None

    def _culprit(self, samples: list[dict], jpegs: list[np.ndarray], err: Exception) -> Exception:
        """The error naming the sample whose JPEG fails on its own (DALI's batch error gives
        only an index, and not always)."""
        for sample, jpeg in zip(samples, jpegs, strict=True):
            try:
                self._run([jpeg])
            except RuntimeError as e:
                self.close()
                why = f"DALI {self.decode_device}: {dali_error_reason(e)}; {pil_verdict(jpeg)}"
                return undecodable(sample, why)
        keys = ", ".join(s["key"] for s in samples)
        return NaFlexError(
            f"DALI ({self.decode_device}) failed on the batch [{keys}] although each JPEG "
            f"decodes on its own: {dali_error_reason(err)}"
        )

    def close(self) -> None:
        # DALI's threads stop when the pipeline is destroyed; collect now so that happens here,
        # deterministically (see DaliLoader.close).
        if self._pipe is not None:
            self._pipe = None
            gc.collect()


def dali_error_reason(err: Exception) -> str:
    """The line of a DALI error that says what failed (it also quotes the pipeline's source;
    the decoder's own reason goes to stderr only), without its index in the batch."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = lines[0] if lines else type(err).__name__
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        line = lines[lines.index("encountered:") + 1]
    return re.sub(r"\s*sample #\d+\s*:?\s*$", "", line) or line
