"""The embedded synthetic dataset: a small shard set built once for CPU training and tests.

It takes the same path as real data: scenes are written as FineHARD JSONL + JPEG files
(`raw/`), then parsed, validated and sharded (`shards/`) with the library's ingest and shard
writer. The index records the generation parameters; a matching index is reused as is.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from pathlib import Path

from fgclip_mega.data.build import build_shards
from fgclip_mega.data.shards import INDEX_NAME
from fgclip_mega.data.synthetic import GENERATOR_VERSION, write_raw_split

log = logging.getLogger(__name__)


def synthetic_image_shape(image_size: int) -> tuple[int, int]:
    """(width, height) of generated images: 4:3, height 1.5x the model input (>= 48 px)."""
    height = max(48, round(1.5 * image_size))
    return round(height * 4 / 3), height


def build_fresh_shards(
    jsonl: Path, raw: Path, out: Path, shard_size: int, num_negatives: int, meta: dict
) -> dict:
    """Generated records -> shards in `out`, rebuilt from scratch (other generation parameters
    changed the images, not only the records); an invalid record is an error, since generated
    data is valid by construction. Returns build_shards' report."""
    shutil.rmtree(out, ignore_errors=True)
    report = build_shards(
        str(jsonl),
        str(raw / "images"),
        str(out),
        shard_size=shard_size,
        num_negatives=num_negatives,
        progress=False,
        index_meta=meta,
    )
    if report["problems"]:
        first = report["problems"][0]
        raise RuntimeError(f"synthetic record {first['source']} is invalid: {first['reason']}")
    return report


def ensure_synthetic_shards(
    directory: str | Path,
    num_samples: int = 256,
    image_size: int = 224,
    seed: int = 0,
    shard_size: int = 64,
    num_negatives: int = 10,
) -> Path:
    """Path of index.json of a synthetic train split in `directory`, built if missing/stale."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    width, height = synthetic_image_shape(image_size)
    params = {
        "num_samples": num_samples,
        "width": width,
        "height": height,
        "seed": seed,
        "shard_size": shard_size,
        "num_negatives": num_negatives,
        "train_size": image_size,
        "generator": GENERATOR_VERSION,
    }
    index_path = directory / "shards" / INDEX_NAME
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rank builds, the others wait and reuse
        if index_path.is_file():
            with open(index_path, encoding="utf-8") as fh:
                if json.load(fh).get("synthetic") == params:
                    return index_path
        t0 = time.time()
        raw = directory / "raw"
        jsonl = write_raw_split(
            raw, "train", num_samples, seed, width, height, train_size=image_size
        )
        out = directory / "shards"
        report = build_fresh_shards(
            jsonl, raw, out, shard_size, num_negatives, {"synthetic": params}
        )
        log.info(
            "built %d synthetic samples (%dx%d) in %s at %s in %.1f s",
            num_samples, width, height, report["samples"], out, time.time() - t0,
        )  # fmt: skip
        return index_path
