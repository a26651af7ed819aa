"""Pieces every benchmark shares: reading annotation files with errors that name the culprit,
images encoded once per file (global and/or box features) over the DP ranks, counted skips."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fgclip_mega.eval.benchmarks.engine import map_batches
from fgclip_mega.eval.benchmarks.protocol import (
    BenchmarkError,
    Protocol,
    normalised_box,
    open_rgb,
    pixels,
)


def read_json(path: Path):
    if not path.is_file():
        raise BenchmarkError(f"{path}: annotation file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e})") from e


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of each non-empty line."""
    if not path.is_file():
        raise BenchmarkError(f"{path}: annotation file not found")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((i, json.loads(line)))
            except ValueError as e:
                raise BenchmarkError(f"{path}:{i}: not valid JSON ({e})") from e
    return out


def need(record: dict, key: str, where: str, kind=None):
    if key not in record:
        raise BenchmarkError(f"{where}: missing key {key!r}")
    value = record[key]
    if kind is not None and not isinstance(value, kind):
        raise BenchmarkError(f"{where}: {key!r} must be {kind}, got {type(value).__name__}")
    return value


@dataclass
class Skips:
    """Items left out, by reason, with a few examples each: reported, never silent."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str, n: int = 1) -> None:
        self.counts[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(example)

    def as_dict(self) -> dict:
        counts = sorted(self.counts.items())
        return {r: {"count": c, "examples": self.examples[r]} for r, c in counts}


@dataclass
class ImageJob:
    """One image file and the pixel boxes to pool on it (possibly none)."""

    path: Path
    boxes: list = field(default_factory=list)


def encode_images(
    encoder,
    jobs: list[ImageJob],
    protocol: Protocol,
    batch_size: int,
    group,
    *,
    global_features: bool,
    skip_missing: bool,
) -> list[dict]:
    """Per job: {"missing": True} (only with skip_missing, else FileNotFoundError), or
    {"image": (P,) or None, "boxes": [(P,) or None for each box]}, None for a box with no area
    or outside the image (see normalised_box). Box features follow protocol.box_features."""

    def fn(a: int, b: int) -> list[dict]:
        records: list[dict] = [{} for _ in range(a, b)]
        full, rois, crops, crop_slots = [], [], [], []
        for i, job in enumerate(jobs[a:b]):
            try:
                img = open_rgb(job.path)
            except FileNotFoundError:
                if not skip_missing:
                    raise
                records[i] = {"missing": True}
                continue
            records[i] = {"boxes": [None] * len(job.boxes), "slot": len(full)}
            w, h = img.size
            needs_full = global_features or (job.boxes and protocol.box_features == "roi")
            if needs_full:
                full.append(pixels(img, protocol))
            for j, box in enumerate(job.boxes):
                nb = normalised_box(box, w, h, protocol.box_format)
                if nb is None:
                    continue
                if protocol.box_features == "roi":
                    rois.append([len(full) - 1, *nb])
                else:
                    x1, y1, x2, y2 = (nb[0] * w, nb[1] * h, nb[2] * w, nb[3] * h)
                    # Upstream's crop baseline: integer pixel box, cropped, squashed to S x S.
                    crop = img.crop(
                        (int(x1), int(y1), max(int(x2), int(x1) + 1), max(int(y2), int(y1) + 1))
                    )
                    crops.append(pixels(crop, protocol))
                crop_slots.append((i, j))
        image_emb = region_emb = None
        if full:
            stack = torch.stack(full)
            if global_features:
                image_emb = encoder.images(stack)
            if rois:
                region_emb = encoder.regions(stack, torch.tensor(rois, dtype=torch.float32))
        if crops:
            region_emb = encoder.images(torch.stack(crops))
        for k, (i, j) in enumerate(crop_slots):
            records[i]["boxes"][j] = region_emb[k].clone()
        for rec in records:
            slot = rec.pop("slot", None)
            if slot is not None:
                rec["image"] = image_emb[slot].clone() if image_emb is not None else None
        return records

    return map_batches(len(jobs), batch_size, fn, group, "images")
