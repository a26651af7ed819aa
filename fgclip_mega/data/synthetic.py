"""Synthetic fine-grained scenes in the FineHARD record format.

Each image holds 2..max_objects shapes, each with four attributes (shape, colour, size, texture)
at a random non-overlapping position on a noisy background. Per image: a long caption describing
every object and where it is, a short caption, and per object a box with `short_expr` (all four
attributes), `long_expr` (attributes + position) and, for most boxes, 10 hard negatives that
change exactly one attribute of `short_expr` (FineHARD's recipe). Negatives that would describe
another object of the same image are excluded, so a negative is never true.

Sizes follow the resolution the model trains at (`train_size`; images are squashed to
train_size x train_size): one texture cell (a stripe's width, a checker square, a dot's
diameter) is max(4, train_size / 32) pixels after that resize, so the period is >= 8 px and
survives the antialiased squash; stripes repeat every 2 cells, so even the smallest triangle
shows several (generator 4; before, every 4 cells: a small object could show one band); and the
smallest object spans about two ViT patches (26% of the short side), so a 1x1 RoIAlign bin over
its box averages textured features. Measured with a colour-aware nearest-centroid probe on the
inner half of each box after the squash to 64 px (128x96 source, the tiny preset): textures
separable at 95.3% with the old fixed 6-px period, see the report.

Boxes are NOT tight: each carries a margin of background of BOX_MARGIN of the image's width
(left/right) and height (top/bottom) around the drawn pixels, the same for every object. FG-CLIP's
region embedding averages dense features over the box (1x1 RoIAlign), and inside a tight box a
small and a large object look alike, so "size" was invisible to the region path (held-out pairwise
size accuracy 0.52 ~ no information). With a fixed margin the share of the box the object covers
encodes its size (about 0.28 small, 0.37 medium, 0.46 large at 128x96). Objects are placed so that
the margined box lies inside the image (no clipping, which would change that share) and holds no
pixel of another object.

Mixed sizes for NaFlex (FG-CLIP 2; `MixedSizes`, off by default): each scene draws its own width
and height (aspect ratio log-uniform in 1:max_aspect..max_aspect:1, native patch count
log-uniform in [min_patches, max_patches] at the spec's patch size, short side >=
min_short_patches patches) from a stream separate from the scene's, so the drawing stream is
the fixed-size one. NaFlex does not squash: it keeps the aspect ratio and scales the image to
the largest patch grid within the batch's budget, and a batch's budget is at least the smallest
allowed one holding this image's own native grid (capped at max_budget), so the smallest scale
an image can be trained at is its grid at that budget. The rule: one texture cell is
>= max(4, patch_size / 2) px on both axes at that smallest scale (`naflex_texture_cell`; any
larger budget only enlarges it), objects stay fractions of the short side, and box margins are
BOX_MARGIN of the short side on both axes (not of each axis: on a 3:1 image a margin of 10% of
the width would exceed a small object, and the covered share would then encode the aspect ratio
instead of the size); object sides jitter +-5% around their size's fraction (+-10% for fixed
sizes, where a small star's share of its box reached a medium square's). The fixed-size
default is unchanged (same bytes as generator 4).

Everything is a pure function of (seed, split, index): any worker count gives the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (130, 50, 170),
    "orange": (245, 130, 20),
    "pink": (245, 140, 190),
    "brown": (130, 80, 35),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "cyan": (40, 200, 210),
}
SIZES = {"small": 0.26, "medium": 0.36, "large": 0.48}  # side as a fraction of min(W, H)
BOX_MARGIN = 0.1
"""Background around each object in its box, as a fraction of the image width / height."""
GENERATOR_VERSION = 4
"""Bumped when the drawing changes: embedded synthetic sets built by an older one are rebuilt."""
TRAIN_SIZE = 224
"""Default training resolution the textures are sized for (images are squashed to it)."""
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = {
    "beige": (225, 215, 190),
    "gray": (150, 150, 150),
    "pale blue": (190, 210, 235),
    "mint": (195, 230, 205),
    "sand": (210, 190, 150),
}
SPLITS = ("train", "val", "test")
_SPLIT_SALT = {"train": 11, "val": 12, "test": 13}
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
_SENTENCES = (
    "In the {position} there is a {size} {colour} {shape} with a {texture} pattern.",
    "A {size} {colour} {shape} with a {texture} pattern sits in the {position}.",
    "The {position} of the picture shows a {size} {colour} {shape} whose pattern is {texture}.",
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    texture: str
    box: tuple[float, float, float, float]
    """Normalised (x1, y1, x2, y2): the drawn pixels plus BOX_MARGIN of background per side."""
    position: str

    @property
    def short_expr(self) -> str:
        return f"a {self.size} {self.colour} {self.texture} {self.shape}"

    @property
    def long_expr(self) -> str:
        return (
            f"a {self.size} {self.colour} {self.shape} with a {self.texture} pattern "
            f"in the {self.position} of the image"
        )


def _position_word(cx: float, cy: float) -> str:
    col = ("left", "center", "right")[min(int(cx * 3), 2)]
    row = ("top", "middle", "bottom")[min(int(cy * 3), 2)]
    if row == "middle":
        return "center" if col == "center" else col
    return row if col == "center" else f"{row} {col}"


def _apart(a: tuple[int, ...], b: tuple[int, ...], gap: int = 2) -> bool:
    """Whether pixel boxes a and b are at least `gap` apart: each box holds exactly one object."""
    return a[0] >= b[2] + gap or a[2] + gap <= b[0] or a[1] >= b[3] + gap or a[3] + gap <= b[1]


def _outline(shape: str, side: float) -> list[tuple[float, float]] | None:
    """Polygon of `shape` in a side x side local frame; None for the circle (an ellipse)."""
    s, c = side, side / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(0, 0), (s, 0), (s, s), (0, s)]
    if shape == "triangle":
        return [(c, 0), (s, s), (0, s)]
    if shape == "diamond":
        return [(c, 0), (s, c), (c, s), (0, c)]
    if shape == "hexagon":
        return [(c + c * math.cos(a), c + c * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    radii = [c if k % 2 == 0 else 0.45 * c for k in range(10)]  # five-pointed star
    angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    return [(c + r * math.cos(a), c + r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]


def texture_cell(width: int, height: int, train_size: int) -> int:
    """Texture cell in source pixels: >= max(4, train_size / 32) px on both axes after the
    squash of width x height to train_size x train_size."""
    cell_train = max(4.0, train_size / 32)
    return max(2, math.ceil(cell_train * max(width, height) / train_size))


def naflex_scale(width: int, height: int, patch_size: int, max_budget: int) -> float:
    """Smallest factor (on either axis) NaFlex resizes a width x height image by: its grid at
    the smallest budget any batch holding it can get (its own native patch count's budget)."""
    from fgclip_mega.data.naflex import batch_budget, grid_for_budget, native_patches

    budget = batch_budget([native_patches(height, width, patch_size)], max_budget)
    gh, gw = grid_for_budget(height, width, patch_size, budget)
    return min(gh * patch_size / height, gw * patch_size / width)


def naflex_texture_cell(width: int, height: int, patch_size: int, max_budget: int) -> int:
    """Texture cell in source pixels: >= max(4, patch_size / 2) px on both axes after any
    NaFlex resize of the image (aspect kept, budget <= max_budget)."""
    cell_train = max(4.0, patch_size / 2)
    return max(2, math.ceil(cell_train / naflex_scale(width, height, patch_size, max_budget)))


_SIZE_SALT = 101  # the size stream of (seed, split, index), apart from the drawing stream
MIXED_VERSION = 1
"""Bumped when mixed-size drawing (`MixedSizes`, its texture/margin rules) changes: embedded
mixed-size sets record it beside GENERATOR_VERSION and are rebuilt."""


@dataclass(frozen=True)
class MixedSizes:
    """Per-scene width and height for NaFlex training, drawn from (seed, split, index).

    The default spans the CPU budgets 128 and 256 at patch 8 (and some images above 256
    patches, downscaled to the cap); `MixedSizes.gpu()` spans 256..1024 at patch 16."""

    patch_size: int = 8
    """NaFlex patch size the scenes are drawn for (textures, native patch counts)."""
    max_budget: int = 256
    """Largest patch budget of the run (batches never exceed it; bigger images shrink)."""
    min_patches: int = 96
    """Smallest native patch count (w // p) * (h // p) drawn, roughly (log-uniform)."""
    max_patches: int = 320
    """Largest native patch count drawn, roughly (log-uniform)."""
    max_aspect: float = 3.0
    """Aspect ratios w / h are log-uniform in [1 / max_aspect, max_aspect]."""
    min_short_patches: int = 6
    """Short side at least this many patches (raises the patch count of elongated scenes)."""

    def __post_init__(self):
        from fgclip_mega.data.naflex import check_budget

        check_budget(self.max_budget)
        if self.patch_size < 2:
            raise ValueError(f"MixedSizes.patch_size: {self.patch_size} < 2")
        if not 1 <= self.min_patches <= self.max_patches:
            raise ValueError(
                f"MixedSizes.min_patches/max_patches: need 1 <= {self.min_patches} <= "
                f"{self.max_patches}"
            )
        if self.max_aspect < 1:
            raise ValueError(f"MixedSizes.max_aspect: {self.max_aspect} < 1")
        if self.min_short_patches < 1:
            raise ValueError(f"MixedSizes.min_short_patches: {self.min_short_patches} < 1")

    @classmethod
    def gpu(cls) -> MixedSizes:
        """Patch 16, budgets 256..1024 (the GPU presets' range)."""
        return cls(patch_size=16, max_budget=1024, min_patches=200, max_patches=1280)

    def size(self, seed: int, split: str, index: int) -> tuple[int, int]:
        """(width, height) of scene `index` of `split`."""
        rng = np.random.default_rng([seed, _SPLIT_SALT[split], index, _SIZE_SALT])
        log_aspect = math.log(self.max_aspect)
        aspect = math.exp(rng.uniform(-log_aspect, log_aspect))  # w / h
        # The short side is sqrt(n / max(aspect, 1 / aspect)) patches: floor n so it holds
        # min_short_patches (an elongated scene gets more patches, not a thinner short side).
        lo = max(self.min_patches, self.min_short_patches**2 * max(aspect, 1 / aspect))
        hi = max(lo, self.max_patches)
        n = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        p = self.patch_size
        width = math.ceil(p * math.sqrt(n * aspect))
        height = math.ceil(p * math.sqrt(n / aspect))
        return width, height


def _texture_mask(texture: str, n: int, cell: int) -> np.ndarray:
    """(n, n) bool: True where the texture's second shade is drawn; features `cell` px wide."""
    yy, xx = np.mgrid[0:n, 0:n]
    period = 2 * cell
    if texture == "striped":  # diagonal bands `cell` px wide along x and y (period 2 cells)
        return ((xx + yy) // cell) % 2 == 1
    if texture == "dotted":  # dots of diameter `cell` on a 2-cell grid
        r = cell / 2
        return ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < r * r
    if texture == "checkered":
        return ((xx // cell) + (yy // cell)) % 2 == 1
    return np.zeros((n, n), dtype=bool)


def _draw(
    img: Image.Image, obj: SceneObject, x0: int, y0: int, side: int, cell: int
) -> tuple[int, ...]:
    """Draws `obj` with its top-left at (x0, y0); returns the tight pixel box (x1, y1, x2, y2)."""
    mask = Image.new("L", (side, side), 0)
    pts = _outline(obj.shape, side - 1)
    if pts is None:
        ImageDraw.Draw(mask).ellipse([0, 0, side - 1, side - 1], fill=255)
    else:
        ImageDraw.Draw(mask).polygon(pts, fill=255)
    base = np.array(COLOURS[obj.colour], dtype=np.int16)
    # The second shade must differ visibly from the base for black and white too.
    shade = base // 2 if base.sum() > 200 else base + 110
    patch = np.where(_texture_mask(obj.texture, side, cell)[..., None], shade, base).astype(
        np.uint8
    )
    img.paste(Image.fromarray(patch), (x0, y0), mask)
    ys, xs = np.nonzero(np.asarray(mask))
    return x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1


def _negatives(obj: SceneObject, taken: set[str], k: int, rng: np.random.Generator) -> list[str]:
    """k phrases, each `obj.short_expr` with one attribute changed; none describes a taken one."""
    cands = []
    for field, values in (
        ("colour", COLOURS),
        ("shape", SHAPES),
        ("size", SIZES),
        ("texture", TEXTURES),
    ):
        for v in values:
            if v != getattr(obj, field):
                alt = SceneObject(**{**obj.__dict__, field: v})
                if alt.short_expr not in taken:
                    cands.append(alt.short_expr)
    pick = rng.choice(len(cands), size=min(k, len(cands)), replace=False)
    return [cands[i] for i in pick]


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[str, Image.Image]:
    name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    # Smooth noise (upsampled coarse noise) gives photo-like JPEG sizes (~50 KB at 500x375).
    coarse = rng.integers(-40, 41, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.int16)
    coarse = np.clip(coarse + np.array(BACKGROUNDS[name], dtype=np.int16), 0, 255)
    return name, Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)


def make_scene(
    seed: int,
    split: str,
    index: int,
    width: int = 500,
    height: int = 375,
    max_objects: int = 5,
    num_negatives: int = 10,
    jpeg_quality: int = 90,
    train_size: int = TRAIN_SIZE,
    sizes: MixedSizes | None = None,
) -> tuple[str, bytes, dict]:
    """(f_path, JPEG bytes, FineHARD record) of image `index` of `split`, drawn for training
    at train_size x train_size; with `sizes`, drawn at its own size for NaFlex training (width,
    height and train_size are then unused)."""
    if split not in _SPLIT_SALT:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if sizes is not None:
        width, height = sizes.size(seed, split, index)
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], index])
    bg_name, img = _background(rng, width, height)
    short_side = min(width, height)
    if sizes is None:
        cell = texture_cell(width, height, train_size)
        mx, my = round(BOX_MARGIN * width), round(BOX_MARGIN * height)  # margin in source px
    else:  # NaFlex keeps the aspect ratio: margins of the short side (see the module doc)
        cell = naflex_texture_cell(width, height, sizes.patch_size, sizes.max_budget)
        mx = my = round(BOX_MARGIN * short_side)
    placed: list[tuple[int, int, int, int]] = []
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        attrs = dict(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            texture=TEXTURES[rng.integers(len(TEXTURES))],
        )
        jitter = rng.uniform(0.9, 1.1)
        if sizes is not None:  # +-5%: with a star's smaller tight box, +-10% made sizes overlap
            jitter = 1 + (jitter - 1) / 2
        side = max(8, int(SIZES[attrs["size"]] * short_side * jitter))
        if side + 2 * mx > width or side + 2 * my > height:
            continue  # the margined box would not fit in the image
        for _try in range(30):
            # The margined square lies inside the image and holds no other object.
            x0 = int(rng.integers(mx, width - side - mx + 1))
            y0 = int(rng.integers(my, height - side - my + 1))
            grown = (x0 - mx, y0 - my, x0 + side + mx, y0 + side + my)
            if all(_apart(grown, b, gap=1) for b in placed):
                break
        else:
            continue  # no free spot: fewer objects in this image
        pos = _position_word((x0 + side / 2) / width, (y0 + side / 2) / height)
        obj = SceneObject(**attrs, box=(0.0, 0.0, 0.0, 0.0), position=pos)
        if any(o.short_expr == obj.short_expr for o in objects):
            continue  # phrases must identify one object
        x1, y1, x2, y2 = _draw(img, obj, x0, y0, side, cell)
        placed.append((x0, y0, x0 + side, y0 + side))
        box = ((x1 - mx) / width, (y1 - my) / height, (x2 + mx) / width, (y2 + my) / height)
        objects.append(SceneObject(**{**obj.__dict__, "box": tuple(round(v, 5) for v in box)}))

    taken = {o.short_expr for o in objects}
    bbox_info = []
    for obj in objects:
        has_negs = rng.random() < 0.85
        negs = _negatives(obj, taken, num_negatives, rng) if has_negs else []
        bbox = list(obj.box)
        if rng.random() < 0.5:  # FineHARD boxes sometimes carry a detector score as a 5th value
            bbox.append(round(float(rng.uniform(0.5, 1.0)), 3))
        bbox_info.append(
            {
                "bbox": bbox,
                "short_expr": obj.short_expr,
                "long_expr": obj.long_expr,
                "flag_short_neg": int(has_negs),
                "short_expr_negs": {str(i): n for i, n in enumerate(negs)},
            }
        )
    sentences = [_SENTENCES[rng.integers(len(_SENTENCES))].format(**o.__dict__) for o in objects]
    n = len(objects)
    caption = f"A {bg_name} background with {_COUNT_WORDS[n]} objects. " + " ".join(sentences)
    names = [f"a {o.colour} {o.shape}" for o in objects]
    listed = names[0] if n == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    f_path = f"{split}/{index:08d}.jpg"
    record = {
        "f_path": f_path,
        "caption": caption,
        "short_caption": f"{listed} on a {bg_name} background",
        "bbox_info": bbox_info,
    }
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=jpeg_quality)
    return f_path, buf.getvalue(), record


def _scene_line(index: int, split: str, image_dir: str, kw: dict) -> str:
    """Worker: writes image `index` of `split` under image_dir, returns its JSONL record."""
    f_path, jpeg, record = make_scene(kw["seed"], split, index, **{
        k: v for k, v in kw.items() if k != "seed"
    })  # fmt: skip
    with open(os.path.join(image_dir, f_path), "wb") as fh:
        fh.write(jpeg)
    return json.dumps(record)


def write_raw_split(
    root: str | Path,
    split: str,
    num_samples: int,
    seed: int = 0,
    width: int = 500,
    height: int = 375,
    max_objects: int = 5,
    num_negatives: int = 10,
    train_size: int = TRAIN_SIZE,
    workers: int = 1,
    progress: bool = False,
    sizes: MixedSizes | None = None,
) -> Path:
    """Writes images 0..num_samples-1 of `split` as root/images/{split}/NNNNNNNN.jpg and their
    records as root/{split}.jsonl (f_path relative to root/images); returns the JSONL path.

    The JSONL appears only complete (written aside, then renamed): a consumer never sees a
    half-written split. Any worker count gives the same bytes. With `sizes`, every scene has its
    own size (see `MixedSizes`); width, height and train_size are unused.
    """
    from tqdm import tqdm

    root = Path(root)
    image_dir = root / "images"
    (image_dir / split).mkdir(parents=True, exist_ok=True)
    kw = dict(seed=seed, width=width, height=height, max_objects=max_objects,
              num_negatives=num_negatives, train_size=train_size, sizes=sizes)  # fmt: skip
    work = partial(_scene_line, split=split, image_dir=str(image_dir), kw=kw)
    jsonl = root / f"{split}.jsonl"
    tmp = jsonl.with_name(jsonl.name + f".tmp{os.getpid()}")
    bar = tqdm(total=num_samples, unit="img", desc=split, disable=not progress)
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        lines = pool.imap(work, range(num_samples), chunksize=16) if pool else map(
            work, range(num_samples)
        )  # fmt: skip
        with open(tmp, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line + "\n")
                bar.update()
        os.replace(tmp, jsonl)
    finally:
        if pool:
            pool.terminate()
        tmp.unlink(missing_ok=True)
        bar.close()
    return jsonl
