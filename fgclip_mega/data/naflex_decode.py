"""JPEG decoding for the NaFlex loader: PIL (the reference) or DALI, chosen in one place.

`build_decoder` is the dispatch, the same one as v1's loader (loader.py): data.loader picks DALI
or PIL (auto = DALI where it is installed, PIL with a warning where not), and for DALI
data.decode_device picks the placement (`resolve_decode_device`: mixed = nvJPEG on the training
GPU, which must be a CUDA device DALI sees; cpu = libjpeg-turbo in DALI's threads). A decoder
turns a list of the loader's samples into uint8 (3, H, W) images at their own size, on the CPU
or (mixed) on the training GPU; `naflex.pack_images` then packs them on that device.

A JPEG that does not decode is one NaFlexError naming its shard row and key (the shard builder
rejects such files, so this only meets shards written some other way or damaged since).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from fgclip_mega.config import DataConfig
from fgclip_mega.data.loader import resolve_decode_device, resolve_loader_kind
from fgclip_mega.data.naflex import NaFlexError


class Decoder(Protocol):
    kind: str
    """'pil' or 'dali'."""
    decode_device: str
    """Where JPEGs are decoded: 'cpu' or 'mixed' (nvJPEG)."""

    def __call__(self, samples: list[dict]) -> list[torch.Tensor]: ...

    def close(self) -> None: ...


def read_jpeg(sample: dict) -> np.ndarray:
    """The sample's JPEG bytes, (n,) uint8, read from its shard."""
    reader, o0, o1 = sample["jpeg"]
    return np.asarray(reader._a("image_bytes")[o0:o1])


def undecodable(sample: dict, reason: str) -> NaFlexError:
    return NaFlexError(f"{sample['where']} ({sample['key']}): the JPEG does not decode: {reason}")


def pil_decode(jpeg: np.ndarray) -> torch.Tensor:
    """(3, H, W) uint8 RGB; PIL's own exception for bad data."""
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def pil_failure(jpeg: np.ndarray) -> str | None:
    """'PIL: <error>' where PIL cannot decode the JPEG either, else None."""
    try:
        pil_decode(jpeg)
    except Exception as e:  # noqa: BLE001
        return f"PIL: {type(e).__name__}: {e}"
    return None


def pil_verdict(jpeg: np.ndarray) -> str:
    """What PIL makes of a JPEG another decoder refused (DALI's errors give no reason)."""
    return pil_failure(jpeg) or "PIL decodes it"


class PilDecoder:
    """PIL in a thread pool: the reference decoder (what HF's processor is fed in the tests)."""

    kind = "pil"
    decode_device = "cpu"

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool  # the loader's read pool, which it shuts down

    def __call__(self, samples: list[dict]) -> list[torch.Tensor]:
        return list(self.pool.map(self._decode, samples))

    @staticmethod
    def _decode(sample: dict) -> torch.Tensor:
        try:
            return pil_decode(read_jpeg(sample))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
            raise undecodable(sample, f"PIL: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        pass


def build_decoder(
    cfg: DataConfig,
    device: torch.device,
    pool: ThreadPoolExecutor,
    batch_size: int,
    kind: str | None = None,
) -> Decoder:
    """The decoder data.loader (or `kind`) and data.decode_device ask for on training `device`;
    a setting that cannot work here (mixed without a CUDA device) fails now, not at batch 1."""
    kind = resolve_loader_kind(kind or cfg.loader)
    if kind == "pil":
        return PilDecoder(pool)
    if kind == "dali":
        from fgclip_mega.data.naflex_dali import DaliDecoder

        placement = resolve_decode_device(cfg.decode_device, device)
        return DaliDecoder(placement, device, pool, batch_size, cfg.num_threads)
    raise ValueError(f"data.loader={kind!r}: expected 'auto', 'dali' or 'pil'")
