"""Synthetic fine-grained scenes: determinism, captions, boxes around the drawn pixels (with a
fixed background margin, so the object's share of its box encodes its size), negatives."""

import io
import json

import numpy as np
from PIL import Image, ImageDraw

from data_prep.synthetic import generate, parse_args
from fgclip_mega.data.ingest import parse_record
from fgclip_mega.data.synthetic import (
    BOX_MARGIN,
    COLOURS,
    SHAPES,
    SIZES,
    TEXTURES,
    _background,
    make_scene,
    texture_cell,
)

ATTRS = {"size": SIZES, "colour": COLOURS, "texture": TEXTURES, "shape": SHAPES}


def _attrs(short_expr: str) -> dict:
    """'a large red striped circle' -> its four attributes (each attribute is one word)."""
    _, size, colour, texture, shape = short_expr.split(" ")
    out = {"size": size, "colour": colour, "texture": texture, "shape": shape}
    assert all(out[k] in ATTRS[k] for k in out), short_expr
    return out


def test_deterministic_and_seed_dependent():
    a = make_scene(7, "train", 3)
    assert make_scene(7, "train", 3) == a
    assert make_scene(8, "train", 3)[1] != a[1] and make_scene(7, "val", 3)[1] != a[1]


def test_records_are_valid_finehard_and_describe_the_image():
    n_boxes = n_flagged = 0
    for i in range(40):
        f_path, jpeg, rec = make_scene(1, "train", i, 200, 150)
        assert f_path == rec["f_path"] == f"train/{i:08d}.jpg"
        sample, _, problems = parse_record(json.loads(json.dumps(rec)))
        assert not problems and len(sample.boxes) == len(rec["bbox_info"]) >= 1
        img = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=int)
        assert img.shape == (150, 200, 3)
        exprs = [b["short_expr"] for b in rec["bbox_info"]]
        assert len(set(exprs)) == len(exprs)
        for box in rec["bbox_info"]:
            n_boxes += 1
            attrs = _attrs(box["short_expr"])
            # The long caption and long_expr mention every attribute of every object.
            for word in attrs.values():
                assert word in box["long_expr"] and word in rec["caption"]
            assert f"a {attrs['colour']} {attrs['shape']}" in rec["short_caption"]
            # The object's colour is on the pixels at the box centre (shapes are convex around
            # it; textured ones show the base colour or its shade).
            x1, y1, x2, y2 = np.array(box["bbox"][:4]) * [200, 150, 200, 150]
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            patch = img[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3)
            base = np.array(COLOURS[attrs["colour"]])
            shade = base // 2 if base.sum() > 200 else base + 110
            dist = np.minimum(np.abs(patch - base).max(1), np.abs(patch - shade).max(1))
            assert dist.min() <= 40, (box, patch)
            if box["flag_short_neg"]:
                n_flagged += 1
                negs = list(box["short_expr_negs"].values())
                assert len(negs) == len(set(negs)) == 10
                for neg in negs:  # exactly one attribute changed, never another object
                    changed = [k for k, v in _attrs(neg).items() if v != attrs[k]]
                    assert len(changed) == 1 and neg not in exprs
            else:
                assert box["short_expr_negs"] == {}
    assert 0.7 * n_boxes <= n_flagged < n_boxes


def test_cli_writes_splits(tmp_path):
    args = parse_args(["--out", str(tmp_path), "--num-train", "12", "--num-val", "3",
                       "--num-test", "2", "--workers", "2", "--width", "120", "--height", "90",
                       "--no-progress"])  # fmt: skip
    assert generate(args) == {"train": 12, "val": 3, "test": 2}
    for split, n in (("train", 12), ("val", 3), ("test", 2)):
        lines = (tmp_path / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        for i, line in enumerate(lines):
            f_path, jpeg, rec = make_scene(0, split, i, 120, 90)
            assert json.loads(line) == rec  # identical to the in-process generator
            assert (tmp_path / "images" / f_path).read_bytes() == jpeg


def test_texture_cells_are_at_least_4_px_after_the_squash():
    for w, h, size in [
        (128, 96, 64),
        (500, 375, 224),
        (336, 252, 224),
        (672, 504, 336),
        (64, 48, 32),
    ]:
        cell = texture_cell(w, h, size)
        assert cell * size / w >= 4 and cell * size / h >= 4, (w, h, size, cell)


def test_textures_survive_the_squash_to_the_training_size():
    # The tiny preset: 128x96 scenes squashed to 64x64 with PIL's antialiased bilinear resize
    # (what the loaders do). Inside every textured square, most pixels must still be close to
    # the pure base colour or the pure shade; a texture finer than the resize blurs into a mix
    # (the old fixed 6-px period left striped squares with 0% such pixels).
    seen = set()
    for i in range(120):
        _, jpeg, rec = make_scene(0, "train", i, 128, 96, train_size=64)
        img = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((64, 64), Image.BILINEAR)
        a = np.asarray(img, float)
        for box in rec["bbox_info"]:
            attrs = _attrs(box["short_expr"])
            if attrs["texture"] == "plain" or attrs["shape"] != "square":
                continue
            x1, y1, x2, y2 = np.array(box["bbox"][:4]) * 64
            m = BOX_MARGIN * 64  # the box's background margin, in training pixels
            x1, y1, x2, y2 = x1 + m, y1 + m, x2 - m, y2 - m
            crop = a[int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1]
            base = np.array(COLOURS[attrs["colour"]], float)
            d = (base // 2 if base.sum() > 200 else base + 110) - base
            t = ((crop - base) @ d) / (d @ d)  # 0 = base colour, 1 = shade
            pure = ((t < 0.25) | (t > 0.75)).mean()
            assert pure >= 0.55, (i, box["short_expr"], pure)
            seen.add(attrs["texture"])
    assert seen == {"striped", "dotted", "checkered"}


def _object_mask(img: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels that differ from the scene's own background (JPEG q100 error < 15)."""
    return np.abs(img - bg).max(-1) > 40


def test_boxes_carry_a_fixed_margin_so_the_covered_share_encodes_size():
    # Independent of the generator's geometry: the objects are found on the pixels (scene minus
    # the same scene's background, drawn first from the scene's random stream, so redrawn here
    # from the same stream). Every box must lie inside the image, hold exactly its object's
    # pixels plus BOX_MARGIN of background per side, and the object's share of the box must
    # separate the sizes (a tight box made every size cover ~the whole box).
    w, h = 128, 96
    share = {s: [] for s in SIZES}
    for i in range(60):
        _, jpeg, rec = make_scene(2, "train", i, w, h, train_size=64, jpeg_quality=100)
        img = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=int)
        bg = np.asarray(_background(np.random.default_rng([2, 11, i]), w, h)[1], dtype=int)
        obj = _object_mask(img, bg)
        boxes = [np.array(b["bbox"][:4]) * [w, h, w, h] for b in rec["bbox_info"]]
        for b, (x1, y1, x2, y2) in zip(rec["bbox_info"], boxes, strict=True):
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, b
            inner = obj[round(y1) : round(y2), round(x1) : round(x2)]
            ys, xs = np.nonzero(inner)
            mx, my = BOX_MARGIN * w, BOX_MARGIN * h
            # Object pixels start about one margin in from each side (+-2 px: antialiasing,
            # dark pixels of a texture close to the background, JPEG).
            assert abs(xs.min() - mx) <= 3 and abs(inner.shape[1] - 1 - xs.max() - mx) <= 3, b
            assert abs(ys.min() - my) <= 3 and abs(inner.shape[0] - 1 - ys.max() - my) <= 3, b
            # The margin holds no other object: a ring just inside the box edge is background.
            ring = np.ones_like(inner)
            ring[3:-3, 3:-3] = False
            assert not (inner & ring).any(), b
            tight = (x2 - x1 - 2 * mx) * (y2 - y1 - 2 * my)
            share[_attrs(b["short_expr"])["size"]].append(tight / ((x2 - x1) * (y2 - y1)))
    lo = {s: min(v) for s, v in share.items()}
    hi = {s: max(v) for s, v in share.items()}
    assert all(len(v) >= 10 for v in share.values()), {s: len(v) for s, v in share.items()}
    assert hi["small"] < lo["medium"] and hi["medium"] < lo["large"], (lo, hi)
    assert np.mean(share["large"]) - np.mean(share["small"]) > 0.12, share


def test_every_textured_object_shows_its_texture():
    # Stripes 16 px apart left small objects two-tone (a small triangle's middle row was one
    # band): at every size the generator draws (each preset's resolution), every shape's second
    # shade covers >= 10% of it (a dot at least) and, for stripes and checks, its middle row
    # shows both shades.
    from fgclip_mega.data.synthetic import _outline, _texture_mask

    for w, h, size in [(128, 96, 64), (500, 375, 224), (336, 252, 224)]:
        cell = texture_cell(w, h, size)
        short = min(w, h)
        sides = range(
            int(0.9 * min(SIZES.values()) * short), int(1.1 * max(SIZES.values()) * short)
        )
        for side in sides[::3]:
            for shape in SHAPES:
                canvas = Image.new("L", (side, side), 0)
                pts = _outline(shape, side - 1)
                draw = ImageDraw.Draw(canvas)
                draw.ellipse([0, 0, side - 1, side - 1], fill=255) if pts is None else draw.polygon(
                    pts, fill=255
                )
                inside = np.asarray(canvas) > 0
                for texture in ("striped", "dotted", "checkered"):
                    shade = _texture_mask(texture, side, cell)
                    row = shade[side // 2][inside[side // 2]]
                    where = (w, h, size, side, shape, texture)
                    assert shade[inside].mean() >= 0.1, where
                    if texture != "dotted":  # (a small shape's middle row may be one dot)
                        assert (row[1:] != row[:-1]).any(), where  # both shades
