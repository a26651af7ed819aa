"""FG-OVD (Bianchi et al. 2024) as FG-CLIP evaluates it: a box's positive caption against its
negatives, from RoIAlign features of the box on the full image.

Two file formats, told apart by content (a directory may hold either, not both for one level):
- FG-OVD as distributed (lorebianchi98/FG-OVD benchmarks/: 1_attributes.json = hard,
  2_attributes.json = medium, 3_attributes.json = easy, shuffle_negatives.json = trivial; the
  attribute sets color/material/pattern/transparency.json are read when named as --data, their
  level being the file stem). LVIS-style JSON: "images" [{id, file_name: "val2017/....jpg",
  width, height, ...}], "annotations" [{id, image_id, bbox: [x, y, w, h] pixels, category_id,
  neg_category_ids: [...]}], "categories" [{id, name: the caption}]. Each annotation is one item:
  its category's name is the positive, its neg_category_ids' names in that order the negatives.
- FG-CLIP's JSONL re-packaging of it shipped in 360CVGroup/FG-CLIP data/fgovd/
  (h_attributes_llava.jsonl = hard, m_ = medium, e_ = easy, shuffle_negatives_llava.jsonl =
  trivial), one box per line: {"img_path", "bbox": [x, y, w, h], "pos_expression": [caption],
  "neg_expression": [captions], "test_type": "1_attributes", ...}.
Both become the same items, so the published protocol runs unchanged on either: the JSONL is the
JSON's annotations in file order with every caption that does not end in "." given one (so
"... fabric. " becomes "... fabric. ."). Checked on 3_attributes.json against
e_attributes_llava.jsonl: 1,299 items each, same order, boxes, images and negatives order; 1,507
of the 14,289 captions differ, all by that "."; the hard and trivial JSONL carry the same "x. ."
marks (their JSON files are too large for the snapshot read here). run/check_fgovd_format.py
repeats the check on full files.

Protocol of upstream fgclip/eval/fgovd_eval.py (v1, the script behind the published v1 numbers;
v2's fgclip2/eval/fgovd_bbox_roi.py scores the same way on lower-cased captions at length 64):
the image squashed to S x S, the box in feature-grid units on the dense map (ours: normalised by
the decoded image size, the same box), captions at --max_length 77 on the short path, hit when
the positive's score equals the maximum (a tie is a hit, as `torch.equal(max, s[0])` upstream).
Upstream keeps the 36 hard/trivial boxes that have 2-9 negatives (fewer competitors; FG-OVD's
own evaluation drops annotations with fewer than its N negatives): so do we, and we report how
many, the accuracy without them and the mean chance level 1/(1 + n_neg) beside the accuracy and
a measured no-information scorer. An item with no negative (upstream would count it a hit: one
caption is always the maximum) is a counted skip, as is a box leaving the image or with no area.
"""

from __future__ import annotations

import json
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
ORIGINAL_FILES = {
    "hard": "1_attributes.json",
    "medium": "2_attributes.json",
    "easy": "3_attributes.json",
    "trivial": "shuffle_negatives.json",
}
LEVEL_OF_TEST_TYPE = {
    "1_attributes": "hard",
    "2_attributes": "medium",
    "3_attributes": "easy",
    "shuffle_negatives": "trivial",
}
FULL_NEGATIVES = 10
JSONL, ORIGINAL = "fgclip-jsonl", "fgovd-json"


def level_files(data: Path) -> dict[str, Path]:
    """--data: a directory holding level files of either format (those present are evaluated)
    or one file (its level from its test_type, else its name)."""
    if data.is_dir():
        found: dict[str, Path] = {}
        for lvl in LEVEL_FILES:
            named = (data / LEVEL_FILES[lvl], data / ORIGINAL_FILES[lvl])
            here = [p for p in named if p.is_file()]
            if len(here) == 2:
                raise BenchmarkError(
                    f"{data}: both {here[0].name} and {here[1].name} hold the {lvl} level; pass "
                    "the one to score as --data"
                )
            if here:
                found[lvl] = here[0]
        if not found:
            names = sorted([*LEVEL_FILES.values(), *ORIGINAL_FILES.values()])
            raise BenchmarkError(f"{data}: none of {names} found")
        return found
    if not data.is_file():
        raise BenchmarkError(f"{data}: no such file or directory")
    kind, content = load(data)
    if kind == ORIGINAL:
        return {LEVEL_OF_TEST_TYPE.get(data.stem, data.stem): data}
    test_type = content[0][1].get("test_type") if content else None
    return {LEVEL_OF_TEST_TYPE.get(test_type, data.stem): data}


def load(path: Path) -> tuple[str, object]:
    """(ORIGINAL, the parsed JSON) for FG-OVD's own file, (JSONL, [(line, record)]) for FG-CLIP's,
    told apart by content, not by name."""
    if not path.is_file():
        raise BenchmarkError(f"{path}: annotation file not found")
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except ValueError:
        return JSONL, read_jsonl(path)  # several JSON values: lines (a bad line is named)
    if isinstance(whole, dict) and {"images", "annotations", "categories"} <= whole.keys():
        return ORIGINAL, whole
    if isinstance(whole, dict) and "img_path" in whole:
        return JSONL, [(1, whole)]  # a one-line JSONL file
    raise BenchmarkError(
        f"{path}: neither FG-OVD's benchmark JSON (images, annotations, categories) nor "
        'FG-CLIP\'s JSONL (one {"img_path", "bbox", "pos_expression", ...} per line)'
    )


def as_fgclip_caption(name: str) -> str:
    """A category name as FG-CLIP's JSONL carries it: "." appended unless it ends in one."""
    return name if name.endswith(".") else name + "."


def read_items(path: Path, skips: Skips) -> tuple[str, list[dict]]:
    """(format, [{"where", "img", "box", "texts": [positive, *negatives]}]) in file order; an
    item with no negative is a counted skip, a malformed one an error naming it."""
    kind, content = load(path)
    if kind == JSONL:
        return kind, _jsonl_items(path, content, skips)
    return kind, _original_items(path, content, skips)


def _item(where: str, img, box, pos: list, negs: list, skips: Skips) -> dict | None:
    if len(pos) != 1:
        raise BenchmarkError(f"{where}: one positive caption expected, got {len(pos)}")
    if not isinstance(img, str) or not img:
        raise BenchmarkError(f"{where}: the image path must be a non-empty string, got {img!r}")
    if len(box) != 4 or not all(isinstance(v, int | float) for v in box):
        raise BenchmarkError(f"{where}: bbox must be [x, y, w, h] numbers, got {box}")
    if not all(isinstance(t, str) and t.strip() for t in [*pos, *negs]):
        raise BenchmarkError(f"{where}: captions must be non-empty strings")
    if not negs:
        skips.add("empty_negatives", where)
        return None
    return {"where": where, "img": img, "box": box, "texts": [pos[0], *negs]}


def _jsonl_items(path: Path, lines: list, skips: Skips) -> list[dict]:
    items = []
    for line, rec in lines:
        where = f"{path}:{line}"
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{where}: a JSON object expected")
        pos = need(rec, "pos_expression", where, list)
        negs = need(rec, "neg_expression", where, list)
        box = need(rec, "bbox", where, list)
        img = need(rec, "img_path", where, str)
        if (it := _item(where, img, box, pos, negs, skips)) is not None:
            items.append(it)
    return items


def _by_id(data: dict, key: str, path: Path, field: str) -> dict:
    rows = need(data, key, str(path), list)
    out = {}
    for i, row in enumerate(rows):
        where = f"{path}: {key}[{i}]"
        if not isinstance(row, dict):
            raise BenchmarkError(f"{where}: a JSON object expected")
        rid = need(row, "id", where)
        if rid in out:
            raise BenchmarkError(f"{where}: duplicate id {rid}")
        out[rid] = need(row, field, where, str)
    return out


def _original_items(path: Path, data: dict, skips: Skips) -> list[dict]:
    files = _by_id(data, "images", path, "file_name")
    names = _by_id(data, "categories", path, "name")
    items = []
    for i, ann in enumerate(need(data, "annotations", str(path), list)):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise BenchmarkError(f"{where}: a JSON object expected")
        where += f" (id {ann.get('id')})"
        image_id = need(ann, "image_id", where)
        if image_id not in files:
            raise BenchmarkError(f"{where}: image_id {image_id} is not in images")
        cats = [need(ann, "category_id", where), *need(ann, "neg_category_ids", where, list)]
        for c in cats:
            if c not in names:
                raise BenchmarkError(f"{where}: category id {c} is not in categories")
        texts = [as_fgclip_caption(names[c]) for c in cats]
        box = need(ann, "bbox", where, list)
        if (it := _item(where, files[image_id], box, texts[:1], texts[1:], skips)) is not None:
            items.append(it)
    return items


def _score(region: torch.Tensor, texts: torch.Tensor) -> tuple[bool, bool]:
    """(hit, tie): scores of the unit region against its unit texts [positive, negatives...]."""
    s = unit(texts) @ unit(region)  # (1 + K,)
    best_neg = s[1:].max()
    return bool(s[0] >= best_neg), bool(s[0] == best_neg)


def evaluate_level(encoder, path: Path, image_root: Path, protocol, args, group) -> dict:
    skips = Skips()
    kind, items = read_items(path, skips)
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
        "format": kind,
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
