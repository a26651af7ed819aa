"""A small data set in FineHARD's published record format, on real photographs.

The format is what upstream FG-CLIP's stage-2 loader reads (360CVGroup/FG-CLIP at 0fcea59,
fgclip/train/train_fgclip.py, LazySupervisedBboxDataset): a folder of JSON files, each a JSON
*list* of records, `.json` and `.jsonl` alike (both go through json.load, lines 162-177);
`f_path` carries the 'grit-20m/data-12m/' prefix upstream removes (line 206); `caption`,
`short_caption` (upstream prepends 'a photo of ', line 203); `bbox_info` boxes with `bbox` =
normalised [x1, y1, x2, y2, score] (x by width, y by height; upstream uses box[:4], line 237,
and scales x by the feature map's width, fgclip.py _denormalize_boxes), `short_expr`,
`long_expr`, `flag_short_neg` and `short_expr_negs`, a dict "0".."9" read in key order
(line 274). Boxes without negatives here carry flag 0 and no `short_expr_negs`, or an empty one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.photos import jpeg, photo_crops

PREFIX = "grit-20m/data-12m/"
COLOURS = ("red", "green", "blue", "yellow", "white", "black", "brown", "grey", "pink", "orange")
THINGS = ("cat", "rocket", "cup", "person", "galaxy", "window", "table", "flower")


def _box(rng: np.random.Generator, j: int, negs: bool) -> dict:
    x1, y1 = rng.uniform(0, 0.6, 2)
    x2, y2 = x1 + rng.uniform(0.1, 0.4), y1 + rng.uniform(0.1, 0.4)
    colour, thing = COLOURS[int(rng.integers(10))], THINGS[int(rng.integers(8))]
    box = {
        "bbox": [round(float(v), 6) for v in (x1, y1, x2, y2)] + [round(float(rng.uniform()), 4)],
        "short_expr": f"{colour} {thing}",
        "long_expr": f"a {colour} {thing} number {j} seen from close by",
        "flag_short_neg": int(negs),
    }
    if negs:
        others = [c for c in COLOURS if c != colour]
        box["short_expr_negs"] = {str(k): f"{others[k % 9]} {thing} #{k}" for k in range(10)}
    elif j % 2:
        box["short_expr_negs"] = {}
    return box


def write_finehard(root: Path, n: int = 16, seed: int = 11) -> tuple[Path, Path, list[dict]]:
    """(jsonfiles dir, image root, records): n records over two list files, images as JPEG."""
    rng = np.random.default_rng(seed)
    images = root / "grit-12m"
    records = []
    for i, arr in enumerate(photo_crops(n, seed=seed, sides=(160, 320))):
        rel = f"coyo_image_{i % 2}/{i // 8:05d}/{i:09d}.jpg"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(jpeg(arr))
        boxes = [_box(rng, j, negs=bool(j % 3 != 2)) for j in range(int(rng.integers(1, 6)))]
        records.append(
            {
                "f_path": PREFIX + rel,
                "caption": f"A photograph, number {i}, with "
                + ", ".join(b["long_expr"] for b in boxes)
                + ". The light is soft and the colours are natural.",
                "short_caption": f"photo {i} of " + " and ".join(b["short_expr"] for b in boxes),
                "bbox_info": boxes,
            }
        )
    ann = root / "jsonfiles"
    ann.mkdir(parents=True, exist_ok=True)
    half = n // 2
    (ann / "2024-12-06_18-32-53_results_a.json").write_text(json.dumps(records[:half], indent=4))
    (ann / "2024-12-06_18-33-17_results_b.jsonl").write_text(json.dumps(records[half:]))
    return ann, images, records
