"""load_image's bounded resize with JPEG draft decoding (issue 24 ingest speed): same size and
nearly the same pixels as a full PIL decode + resize, truncation still caught, rotation kept."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_prep.photos import photo_crops
from fgclip_mega.data.ingest import BadImage, load_image


def _reference(data: bytes, max_side: int) -> np.ndarray:
    """The plain path: full decode, upright, RGB, one bicubic resize (PIL only)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return np.asarray(img.resize(size, Image.BICUBIC), np.float32)


@pytest.fixture(scope="module")
def photo():
    (arr,) = photo_crops(1, seed=5, sides=(1400, 1400))
    return arr


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("max_side", [300, 700, 1000])
def test_draft_decode_matches_a_full_decode_and_resize(tmp_path, photo, orientation, max_side):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "big.jpg"
    Image.fromarray(photo).save(path, "JPEG", quality=95, exif=exif)
    data, w, h = load_image(str(path), max_side=max_side)
    want = _reference(path.read_bytes(), max_side)
    got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
    assert got.shape == want.shape and (w, h) == (want.shape[1], want.shape[0])
    assert max(w, h) == max_side
    # Baseline: the reference's own JPEG round trip (what the full-size path stored).
    buf = io.BytesIO()
    Image.fromarray(want.astype(np.uint8)).save(buf, "JPEG", quality=90)
    round_trip = np.abs(np.asarray(Image.open(buf), np.float32) - want).mean()
    err = np.abs(got - want).mean()
    assert err <= 1.25 * round_trip, (err, round_trip)
    assert not Image.open(io.BytesIO(data)).getexif().get(0x0112)


def test_truncated_big_jpeg_is_still_rejected_with_draft_decoding(tmp_path, photo):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for max_side in (None, 300):
        with pytest.raises(BadImage, match="undecodable image"):
            load_image(str(path), max_side=max_side)
