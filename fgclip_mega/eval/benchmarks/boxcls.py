"""Box classification on COCO val2017 / LVIS v1 instances JSON: each ground-truth box's RoIAlign
feature on the full image against class-name prompt ensembles, top-1 (and top-5).

As upstream: fgclip/eval/in_1K/coco_box_cls.py (v1; COCO classes in the file's category order,
80 OpenAI templates, unit prompt embeddings averaged and renormalised, every annotation counted,
crowd boxes included) and fgclip2/eval/in1k/lvis_box_cls_ddp.py (LVIS: class index = id - 1,
names with '_' -> ' ', image = basename of coco_url under the image root (we also take
<root>/<train2017|val2017>/<name> from the URL); its crop-and-resize
baseline: integer box crop, squash, global embedding). Upstream v2 silently drops images it
cannot find; we fail naming the file, or count them with --skip-missing-images.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from fgclip_mega.eval.benchmarks.common import (
    BenchmarkError,
    ImageJob,
    Skips,
    encode_images,
    need,
    read_json,
)
from fgclip_mega.eval.benchmarks.engine import (
    class_embeddings,
    random_features,
    topk_hits,
    unit,
)
from fgclip_mega.eval.benchmarks.zeroshot import templates_of


def read_instances(path: Path, dataset: str) -> tuple[list[str], dict[int, int], list, Skips]:
    """(class names, category id -> class index, [(image path tail, [(box, class)])], skips)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: expected a COCO-style object with images/annotations")
    cats = need(data, "categories", str(path), list)
    if dataset == "lvis":
        cats = sorted(cats, key=lambda c: c["id"])
    names, index = [], {}
    for i, c in enumerate(cats):
        where = f"{path}: categories[{i}]"
        cid, name = need(c, "id", where), need(c, "name", where, str)
        if cid in index:
            raise BenchmarkError(f"{where}: duplicate category id {cid}")
        index[cid] = len(names)
        names.append(name.replace("_", " ") if dataset == "lvis" else name)
    images = {}
    for i, im in enumerate(need(data, "images", str(path), list)):
        where = f"{path}: images[{i}]"
        if dataset == "lvis":
            # ".../train2017/000000397133.jpg": LVIS val draws on COCO train and val images.
            tail = "/".join(need(im, "coco_url", where, str).rsplit("/", 2)[-2:])
        else:
            tail = need(im, "file_name", where, str)
        images[need(im, "id", where)] = tail
    per_image: dict = {}
    skips = Skips()
    for i, ann in enumerate(need(data, "annotations", str(path), list)):
        where = f"{path}: annotations[{i}]"
        img, cid = need(ann, "image_id", where), need(ann, "category_id", where)
        box = need(ann, "bbox", where, list)
        if img not in images:
            raise BenchmarkError(f"{where}: image_id {img} is not in images")
        if cid not in index:
            raise BenchmarkError(f"{where}: category_id {cid} is not in categories")
        if len(box) != 4:
            raise BenchmarkError(f"{where}: bbox must be [x, y, w, h], got {box}")
        per_image.setdefault(img, []).append((box, index[cid], where, bool(ann.get("iscrowd"))))
    items = [(images[k], per_image[k]) for k in sorted(per_image)]
    return names, index, items, skips


def _image_path(root: Path, tail: str) -> Path:
    """root/tail, or for an LVIS 'split/name' tail root/name when that exists (upstream keeps
    the train and val images in one folder)."""
    path = root / tail
    if not path.is_file() and (root / Path(tail).name).is_file():
        return root / Path(tail).name
    return path


def run(encoder, args, protocol, group, dataset: str) -> dict:
    path = Path(args.data)
    names, _, items, skips = read_instances(path, dataset)
    root = Path(args.image_root) if args.image_root else path.parent
    jobs = [ImageJob(_image_path(root, tail), [b[0] for b in boxes]) for tail, boxes in items]
    encoded = encode_images(
        encoder,
        jobs,
        protocol,
        args.batch_size,
        group,
        global_features=False,
        skip_missing=args.skip_missing_images,
        threads=args.threads,
    )
    classes = class_embeddings(
        encoder,
        names,
        templates_of(protocol.templates),
        protocol.text_length,
        protocol.prompt_ensemble,
        args.batch_size,
        group,
    )  # (C, P) unit
    feats, targets, crowd = [], [], 0
    for (tail, boxes), rec in zip(items, encoded, strict=True):
        if rec.get("missing"):
            skips.add("missing_image", str(_image_path(root, tail)), len(boxes))
            continue
        for (box, cls, where, is_crowd), emb in zip(boxes, rec["boxes"], strict=True):
            if emb is None:
                skips.add("box_outside_image_or_empty", f"{where}: {box}")
                continue
            feats.append(emb)
            targets.append(cls)
            crowd += is_crowd
    if not feats:
        raise BenchmarkError(f"{path}: no box could be scored (skips: {skips.as_dict()})")
    target = torch.tensor(targets)
    ks = (1, 5) if len(names) >= 5 else (1,)
    hits = topk_hits(unit(torch.stack(feats)) @ classes.T, target, ks)
    rand = topk_hits(random_features(len(feats), classes.shape[1]) @ classes.T, target, ks)
    n = len(feats)
    majority = Counter(targets).most_common(1)[0][1]
    metrics = {f"top{k}": hits[k] / n for k in ks}
    return {
        "metrics": metrics,
        "boxes": n,
        "classes": len(names),
        "crowd_boxes_included": crowd,
        "no_info_random_features": {f"top{k}": rand[k] / n for k in ks},
        "majority_class_top1": majority / n,
        "skipped": skips.as_dict(),
    }
