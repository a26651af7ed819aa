"""The embedded synthetic dataset for FG-CLIP 2 (NaFlex): scenes of mixed sizes and aspect ratios
(`synthetic.MixedSizes`) plus the SigLIP-2-style tokenizer.json of their vocabulary, built once.

The same path as `embedded.ensure_synthetic_shards` (FineHARD JSONL + JPEGs in raw/, parsed,
validated and sharded in shards/; the index records the generation parameters and a matching
one is reused), with images kept at their own sizes (no max_side: NaFlex resizes per batch) and
the tokenizer written to tokenizer/ beside them (`data.tokenizer` points there).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import time
from pathlib import Path

from fgclip_mega.data.embedded import build_fresh_shards
from fgclip_mega.data.shards import INDEX_NAME
from fgclip_mega.data.synthetic import (
    GENERATOR_VERSION,
    MIXED_VERSION,
    MixedSizes,
    write_raw_split,
)
from fgclip_mega.data.synthetic_tokenizer import write_tokenizer

log = logging.getLogger(__name__)


def ensure_synthetic_naflex_shards(
    directory: str | Path,
    num_samples: int = 256,
    sizes: MixedSizes | None = None,
    seed: int = 0,
    split: str = "train",
    shard_size: int = 64,
    num_negatives: int = 10,
) -> tuple[Path, Path]:
    """(index.json, tokenizer.json) of a mixed-size synthetic `split` in `directory`, built if
    missing or stale; `sizes` defaults to `MixedSizes()` (patch 8, budgets 128/256)."""
    sizes = MixedSizes() if sizes is None else sizes
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = {
        "num_samples": num_samples,
        "sizes": dataclasses.asdict(sizes),
        "seed": seed,
        "split": split,
        "shard_size": shard_size,
        "num_negatives": num_negatives,
        "generator": GENERATOR_VERSION,
        "mixed_generator": MIXED_VERSION,
    }
    index_path = directory / "shards" / INDEX_NAME
    tokenizer = directory / "tokenizer" / "tokenizer.json"
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rank builds, the others wait and reuse
        if index_path.is_file() and tokenizer.is_file():
            with open(index_path, encoding="utf-8") as fh:
                if json.load(fh).get("synthetic_naflex") == params:
                    return index_path, tokenizer
        t0 = time.time()
        raw = directory / "raw"
        jsonl = write_raw_split(raw, split, num_samples, seed, sizes=sizes)
        out = directory / "shards"
        meta = {"synthetic_naflex": params}
        report = build_fresh_shards(jsonl, raw, out, shard_size, num_negatives, meta)
        write_tokenizer(tokenizer.parent)
        log.info(
            "built %d mixed-size synthetic samples (%s) in %s at %s in %.1f s",
            num_samples, split, report["samples"], out, time.time() - t0,
        )  # fmt: skip
        return index_path, tokenizer
