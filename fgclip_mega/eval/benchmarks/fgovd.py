"""FG-OVD (Bianchi et al. 2024) as FG-CLIP evaluates it: a box's positive caption against its
negatives, from RoIAlign features of the box on the full image.

Files: FG-CLIP's JSONL conversion shipped in 360CVGroup/FG-CLIP data/fgovd/
(h_attributes_llava.jsonl = hard, m_ = medium, e_ = easy, shuffle_negatives_llava.jsonl =
trivial), one box per line: {"img_path": "val2017/....jpg", "bbox": [x, y, w, h] (pixels),
"pos_expression": [caption], "neg_expression": [captions], "test_type": ...} over COCO images.
Protocol of upstream fgclip/eval/fgovd_eval.py: the image squashed to S x S, the box in
feature-grid units on the dense map (ours: normalised by the decoded image size, the same
box), captions at --max_length 77 on the short path, hit when the positive's score equals the
maximum (a tie is a hit, as `torch.equal(max, s[0])` upstream). Upstream keeps the 36 hard/
trivial boxes that have 2-9 negatives (fewer competitors): so do we, and we report how many and
the mean chance level 1/(1 + n_neg) beside the accuracy and a measured no-information scorer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fgclip_mega.eval.benchmarks.common import (
    BenchmarkError,
    ImageJob,
    Skips,
    encode_images,
    need,
    read_jsonl,
)
from fgclip_mega.eval.benchmarks.engine import encode_texts, random_features, unit

LEVEL_FILES = {
    "hard": "h_attributes_llava.jsonl",
    "medium": "m_attributes_llava.jsonl",
    "easy": "e_attributes_llava.jsonl",
    "trivial": "shuffle_negatives_llava.jsonl",
}
LEVEL_OF_TEST_TYPE = {
    "1_attributes": "hard",
    "2_attributes": "medium",
    "3_attributes": "easy",
    "shuffle_negatives": "trivial",
}
FULL_NEGATIVES = 10


def level_files(data: Path) -> dict[str, Path]:
    """--data: a directory holding the level files (those present are evaluated) or one file
    (its level from its test_type)."""
    if data.is_dir():
        found = {lvl: data / name for lvl, name in LEVEL_FILES.items() if (data / name).is_file()}
        if not found:
            raise BenchmarkError(f"{data}: none of {sorted(LEVEL_FILES.values())} found")
        return found
    if not data.is_file():
        raise BenchmarkError(f"{data}: no such file or directory")
    lines = read_jsonl(data)
    kind = lines[0][1].get("test_type") if lines else None
    return {LEVEL_OF_TEST_TYPE.get(kind, data.stem): data}


def _items(path: Path, skips: Skips) -> list[dict]:
    items = []
    for line, rec in read_jsonl(path):
        where = f"{path}:{line}"
        pos = need(rec, "pos_expression", where, list)
        negs = need(rec, "neg_expression", where, list)
        box = need(rec, "bbox", where, list)
        img = need(rec, "img_path", where, str)
        if len(pos) != 1:
            raise BenchmarkError(f"{where}: pos_expression must hold one caption, got {len(pos)}")
        if len(box) != 4:
            raise BenchmarkError(f"{where}: bbox must be [x, y, w, h], got {box}")
        if not all(isinstance(t, str) for t in [*pos, *negs]):
            raise BenchmarkError(f"{where}: captions must be strings")
        if not negs:
            skips.add("empty_negatives", where)
            continue
        items.append({"where": where, "img": img, "box": box, "texts": [pos[0], *negs]})
    return items


def _score(region: torch.Tensor, texts: torch.Tensor) -> tuple[bool, bool]:
    """(hit, tie): scores of the unit region against its unit texts [positive, negatives...]."""
    s = unit(texts) @ unit(region)  # (1 + K,)
    best_neg = s[1:].max()
    return bool(s[0] >= best_neg), bool(s[0] == best_neg)


def evaluate_level(encoder, path: Path, image_root: Path, protocol, args, group) -> dict:
    skips = Skips()
    items = _items(path, skips)
    # Each image is encoded once and all its boxes pooled on it (the dense map does not depend
    # on the box): the same numbers as upstream's one pass per line, far fewer passes.
    jobs: dict[str, ImageJob] = {}
    slots = []
    for it in items:
        job = jobs.setdefault(it["img"], ImageJob(image_root / it["img"]))
        slots.append((it["img"], len(job.boxes)))
        job.boxes.append(it["box"])
    names = list(jobs)
    encoded = dict(
        zip(
            names,
            encode_images(
                encoder,
                list(jobs.values()),
                protocol,
                args.batch_size,
                group,
                global_features=False,
                skip_missing=args.skip_missing_images,
                threads=args.threads,
            ),
            strict=True,
        )
    )
    texts = sorted({t for it in items for t in it["texts"]})
    row = {t: i for i, t in enumerate(texts)}
    text_emb = encode_texts(encoder, texts, protocol.text_length, args.batch_size, group)
    hits = ties = n = few = hits_full = n_full = 0
    chance = 0.0
    scored = []
    for it, (img, slot) in zip(items, slots, strict=True):
        rec = encoded[img]
        if rec.get("missing"):
            skips.add("missing_image", str(image_root / img))
            continue
        region = rec["boxes"][slot]
        if region is None:
            skips.add("box_outside_image_or_empty", f"{it['where']}: {it['box']}")
            continue
        hit, tie = _score(region, text_emb[[row[t] for t in it["texts"]]])
        k = len(it["texts"]) - 1
        n, hits, ties = n + 1, hits + hit, ties + tie
        chance += 1.0 / (1 + k)
        if k < FULL_NEGATIVES:
            few += 1
        else:
            n_full, hits_full = n_full + 1, hits_full + hit
        scored.append(it)
    if n == 0:
        raise BenchmarkError(f"{path}: no item could be scored (skips: {skips.as_dict()})")
    # Measured no-information level: random region vectors against the same texts, same rule.
    rand = random_features(n, text_emb.shape[1], seed=0)
    rand_hits = sum(
        _score(rand[i], text_emb[[row[t] for t in it["texts"]]])[0] for i, it in enumerate(scored)
    )
    return {
        "file": str(path),
        "accuracy": hits / n,
        "items": n,
        "ties_counted_as_hits": ties,
        "chance_mean_1_over_1_plus_negatives": chance / n,
        "no_info_random_features_accuracy": rand_hits / n,
        "items_with_fewer_than_10_negatives": few,
        "accuracy_on_items_with_10_negatives": hits_full / n_full if n_full else None,
        "skipped": skips.as_dict(),
    }


def run(encoder, args, protocol, group) -> dict:
    data = Path(args.data)
    files = level_files(data)
    root = Path(args.image_root) if args.image_root else (data if data.is_dir() else data.parent)
    levels = {
        lvl: evaluate_level(encoder, p, root, protocol, args, group) for lvl, p in files.items()
    }
    return {"levels": levels, "metrics": {lvl: r["accuracy"] for lvl, r in levels.items()}}
