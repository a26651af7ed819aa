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


def _crop_box(box, nb: list[float], w: int, h: int, box_format: str):
    """Upstream's crop baseline box: integer x, y, w, h of the pixel box (lvis_box_cls_ddp.py:
    `map(int, bbox)`), None when that leaves no pixel."""
    if box_format == "xywh":
        x, y, bw, bh = (int(float(v)) for v in box)
    else:
        x, y = int(nb[0] * w), int(nb[1] * h)
        bw, bh = int(nb[2] * w) - x, int(nb[3] * h) - y
    return (x, y, x + bw, y + bh) if bw > 0 and bh > 0 else None


def _prepare(encoder, job: ImageJob, protocol: Protocol, global_features: bool, skip_missing: bool):
    """(record, the full image prepared for the model or None, [(box slot, normalised box or
    the prepared crop)]); images are prepared by `encoder.prepare` (v1: resized to S x S; v2:
    NaFlex patches at the image's own budget)."""
    try:
        img = open_rgb(job.path)
    except FileNotFoundError:
        if not skip_missing:
            raise
        return {"missing": True}, None, []
    w, h = img.size
    roi = protocol.box_features == "roi"
    full = encoder.prepare(img) if global_features or (job.boxes and roi) else None
    parts = []
    for j, box in enumerate(job.boxes):
        nb = normalised_box(box, w, h, protocol.box_format)
        if nb is None:
            continue
        if roi:
            parts.append((j, nb))
        elif (c := _crop_box(box, nb, w, h, protocol.box_format)) is not None:
            parts.append((j, encoder.prepare(img.crop(c))))
    return {"boxes": [None] * len(job.boxes)}, full, parts


def encode_images(
    encoder,
    jobs: list[ImageJob],
    protocol: Protocol,
    batch_size: int,
    group,
    *,
    global_features: bool,
    skip_missing: bool,
    threads: int = 4,
) -> list[dict]:
    """Per job: {"missing": True} (only with skip_missing, else FileNotFoundError), or
    {"image": (P,) or None, "boxes": [(P,) or None for each box]}, None for a box with no area,
    outside the image (see normalised_box) or, cropped, under a pixel. Box features follow
    protocol.box_features. Images are decoded and prepared in `threads` threads (PIL and torch
    release the GIL there); the result does not depend on their number."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max(1, threads))

    def fn(a: int, b: int) -> list[dict]:
        prepared = list(
            pool.map(
                lambda j: _prepare(encoder, j, protocol, global_features, skip_missing),
                jobs[a:b],
            )
        )
        full, slots, rois, crops, box_slots = [], [], [], [], []
        for i, (_, pix, parts) in enumerate(prepared):
            slots.append(len(full) if pix is not None else None)
            if pix is not None:
                full.append(pix)
            for j, part in parts:
                if isinstance(part, list):
                    rois.append([slots[i], *part])
                else:
                    crops.append(part)
                box_slots.append((i, j))
        image_emb = region_emb = None
        if full:
            if global_features:
                image_emb = encoder.images(full)
            if rois:
                region_emb = encoder.regions(full, torch.tensor(rois, dtype=torch.float32))
        if crops:
            region_emb = encoder.images(crops)
        records = [rec for rec, _, _ in prepared]
        for k, (i, j) in enumerate(box_slots):
            records[i]["boxes"][j] = region_emb[k].clone()
        for rec, slot in zip(records, slots, strict=True):
            if not rec.get("missing"):
                image = (
                    image_emb[slot].clone() if image_emb is not None and slot is not None else None
                )
                rec["image"] = image
        return records

    try:
        return map_batches(len(jobs), batch_size, fn, group, "images")
    finally:
        pool.shutdown()
