"""Distinct real photographs for tests and benchmarks, from the photos scikit-image ships.

scikit-image's sample photographs (astronaut, chelsea, coffee, rocket, hubble_deep_field; public
domain / CC0, installed with the package, no download) are cut into many distinct images: crop i
is a seeded window (size, aspect ratio, position) of one photo, optionally flipped, resized so
that its longer side is a seeded size. Real JPEG statistics (texture, noise, colour), unlike
solid or drawn synthetic images.
"""

from __future__ import annotations

import io

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")


def _sources() -> list[np.ndarray]:
    import skimage.data

    return [np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]) for name in PHOTOS]


def photo_crops(n: int, seed: int = 0, sides: tuple[int, int] = (160, 640)):
    """Yields n distinct (H, W, 3) uint8 photographs, longer side in `sides` (inclusive)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _sources()
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        frac = rng.uniform(0.4, 1.0)  # crop size relative to the photo
        aspect = rng.uniform(0.6, 1.7)  # width / height of the crop
        ch = max(16, min(h, int(h * frac / max(1.0, aspect))))
        cw = max(16, min(w, int(ch * aspect)))
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        crop = src[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        side = int(rng.integers(sides[0], sides[1] + 1))
        scale = side / max(ch, cw)
        size = (max(8, round(cw * scale)), max(8, round(ch * scale)))
        yield np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BICUBIC))


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
