"""FineHARD records and image files -> validated `Sample`s, the input side of the shard format.

A record is a dict with `f_path`, `caption`, `short_caption` and optionally `bbox_info` (stage-2
data): a list of boxes, each with `bbox` (normalised [x1, y1, x2, y2], an optional 5th detector
score is ignored), `short_expr`, `long_expr`, `flag_short_neg` and `short_expr_negs` (a dict or
list of negative phrases, used when the flag is 1).

Validation never raises past the caller for bad data: a broken record raises `BadRecord` (the
record is skipped), a broken box is dropped from its record and reported as a `Problem`, and a
missing or undecodable image raises `BadImage` from `load_image`. Every problem names the key
(or the JSON source line) so a report can list each culprit.

Annotations are untrusted (web-scraped): texts must be valid Unicode (no lone surrogates) and at
most MAX_TEXT_CHARS long, a record holds at most MAX_BOXES_PER_RECORD boxes, numbers must fit a
float, images are opened only inside the image root (`resolve_image`: no absolute paths, no
'..', no symlinks leading out), and an image is decoded only when its header declares at most
MAX_IMAGE_PIXELS pixels and its file holds at most MAX_IMAGE_BYTES.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

BOX_TOLERANCE = 1e-3
"""Coordinates within this of [0, 1] are clipped into it; further out the box is rejected."""
MAX_TEXT_CHARS = 20_000
"""Longer captions/phrases are rejected (~10x FineHARD's longest; 248 tokens fit in far less)."""
MAX_BOXES_PER_RECORD = 1000
"""A record with more entries in bbox_info is rejected as a whole."""
MAX_IMAGE_PIXELS = 89_478_485
"""PIL's Image.MAX_IMAGE_PIXELS default; larger declared sizes are rejected before decoding."""
MAX_IMAGE_BYTES = 64 << 20
"""Image files larger than this are rejected without reading them."""


class BadRecord(ValueError):
    """The record cannot be used; the message is the reason (category before the first ':')."""


class BadImage(BadRecord):
    """The record's image is missing, unreadable or undecodable."""


@dataclass
class Problem:
    key: str
    """Record key (its f_path), or the JSON source location when the record has none."""
    reason: str
    """Human-readable cause."""
    kind: str
    """'record', 'image' or 'box' ('box': only that box was dropped)."""
    box: int | None = None
    """Index of the box in the record's bbox_info (box problems only)."""
    source: str = ""
    """Input file and line of the record."""


@dataclass
class Sample:
    key: str
    """Unique name of the sample (the record's f_path)."""
    caption: str
    """Long caption."""
    short_caption: str
    """Short caption (without any prefix)."""
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    """(m, 4) float32 normalised xyxy, clipped to [0, 1]."""
    short_exprs: list[str] = field(default_factory=list)
    """Per box: short region phrase."""
    long_exprs: list[str] = field(default_factory=list)
    """Per box: long region phrase."""
    neg_flags: list[int] = field(default_factory=list)
    """Per box: 1 when `negs[i]` holds exactly num_negatives hard negatives."""
    negs: list[list[str]] = field(default_factory=list)
    """Per box: the hard-negative phrases ([] when the flag is 0)."""
    image: bytes = b""
    """Encoded JPEG."""
    width: int = 0
    """Pixel width of the stored JPEG."""
    height: int = 0
    """Pixel height of the stored JPEG."""


def check_text(value: object, what: str, allow_empty: bool = False) -> str:
    """`value` if it is a usable string, else BadRecord naming `what` and the reason."""
    if not isinstance(value, str):
        raise BadRecord(f"{what} is {type(value).__name__}, expected a string")
    if len(value) > MAX_TEXT_CHARS:
        raise BadRecord(f"{what} is too long: {len(value)} characters (max {MAX_TEXT_CHARS})")
    if not allow_empty and not value.strip():
        raise BadRecord(f"{what} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): zarr cannot store it
        raise BadRecord(f"{what} is not valid Unicode (lone surrogate)") from None
    return value


def _text(rec: dict, name: str, where: str, allow_empty: bool = False) -> str:
    return check_text(rec.get(name), f"{where}{name}", allow_empty)


def _number(v: object) -> float | None:
    """float(v) for a finite-or-not JSON number (not a bool); None for anything else."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        return float(v)
    except OverflowError:  # an int beyond float range: reported as not finite
        return math.inf


def _parse_box(raw: object, i: int, num_negatives: int, tol: float) -> tuple[tuple, str | None]:
    """((box, short, long, flag, negs), note) or raises BadRecord naming what is wrong."""
    where = f"bbox_info[{i}]."
    if not isinstance(raw, dict):
        raise BadRecord(f"bbox_info[{i}] is {type(raw).__name__}, expected an object")
    bbox = raw.get("bbox")
    if not isinstance(bbox, list | tuple) or len(bbox) not in (4, 5):
        raise BadRecord(
            f"{where}bbox must be a list of 4 (or 5 with a score) numbers: {_short_repr(bbox)}"
        )
    values = [_number(v) for v in bbox]
    if any(v is None for v in values):
        raise BadRecord(f"{where}bbox has a non-number: {_short_repr(bbox)}")
    x1, y1, x2, y2 = values[:4]
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise BadRecord(f"{where}bbox has NaN/inf: {_short_repr(bbox)}")
    if min(x1, y1, x2, y2) < -tol or max(x1, y1, x2, y2) > 1 + tol:
        raise BadRecord(f"{where}bbox outside [0, 1] (tolerance {tol}): {_short_repr(bbox)}")
    if x2 < x1 or y2 < y1:
        raise BadRecord(f"{where}bbox has x2 < x1 or y2 < y1: {_short_repr(bbox)}")
    box = tuple(min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
    short = _text(raw, "short_expr", where)
    long = _text(raw, "long_expr", where)
    flag = raw.get("flag_short_neg", 0)
    if isinstance(flag, bool | float) or flag not in (0, 1):
        raise BadRecord(f"{where}flag_short_neg must be 0 or 1, got {flag!r}")
    negs: list[str] = []
    note = None
    if flag == 1:
        raw_negs = raw.get("short_expr_negs")
        values = list(raw_negs.values()) if isinstance(raw_negs, dict) else raw_negs
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            note = f"{where}short_expr_negs is not a dict/list of strings: negatives dropped"
        elif bad := _first_bad_text(values[:num_negatives], f"{where}short_expr_negs"):
            note = f"{bad}: negatives dropped"
        elif len(values) < num_negatives:
            note = (
                f"{where}flag_short_neg=1 but {len(values)} short_expr_negs "
                f"(need {num_negatives}): negatives dropped"
            )
        else:
            negs = values[:num_negatives]
        if note:
            flag = 0
    return (box, short, long, int(flag), negs), note


def _first_bad_text(values: list[str], what: str) -> str | None:
    for i, v in enumerate(values):
        try:
            check_text(v, f"{what}[{i}]")
        except BadRecord as e:
            return str(e)
    return None


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_record(
    rec: object,
    num_negatives: int = 10,
    max_boxes: int | None = None,
    strip_prefix: str = "",
    source: str = "",
    tol: float = BOX_TOLERANCE,
) -> tuple[Sample, str, list[Problem]]:
    """(sample without image, image path relative to the image root, box problems).

    Raises BadRecord when the record as a whole is unusable. Bad boxes are dropped and reported;
    `max_boxes` keeps the first that many valid boxes (None keeps all).
    """
    if not isinstance(rec, dict):
        raise BadRecord(f"record is {type(rec).__name__}, expected an object")
    f_path = _text(rec, "f_path", "")
    if strip_prefix and f_path.startswith(strip_prefix):
        f_path = f_path[len(strip_prefix) :]
    sample = Sample(
        key=f_path,
        caption=_text(rec, "caption", ""),
        short_caption=_text(rec, "short_caption", "", allow_empty=True),
    )
    infos = rec.get("bbox_info")
    if infos is None:
        infos = []
    if not isinstance(infos, list):
        raise BadRecord(f"bbox_info is {type(infos).__name__}, expected a list")
    if len(infos) > MAX_BOXES_PER_RECORD:
        raise BadRecord(f"bbox_info has {len(infos)} boxes (max {MAX_BOXES_PER_RECORD})")
    problems: list[Problem] = []
    boxes = []
    for i, raw in enumerate(infos):
        if max_boxes is not None and len(boxes) >= max_boxes:
            break
        try:
            parsed, note = _parse_box(raw, i, num_negatives, tol)
        except BadRecord as e:
            problems.append(Problem(f_path, str(e), "box", i, source))
            continue
        if note:
            problems.append(Problem(f_path, note, "box", i, source))
        box, short, long, flag, negs = parsed
        boxes.append(box)
        sample.short_exprs.append(short)
        sample.long_exprs.append(long)
        sample.neg_flags.append(flag)
        sample.negs.append(negs)
    sample.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return sample, f_path, problems


def resolve_image(root: str, f_path: str) -> str:
    """Real path of image `f_path` under `root`; BadImage when it would lie outside the root.

    Absolute paths, '..' components and symlinks that lead out of the root are all refused:
    the resolved path (realpath) must stay inside the resolved root.
    """
    if "\x00" in f_path:
        raise BadImage(f"image path outside the image folder: {f_path!r} holds a NUL byte")
    if os.path.isabs(f_path):
        raise BadImage(f"image path outside the image folder: {f_path!r} is absolute")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, f_path))
    if os.path.commonpath([real_root, path]) != real_root or path == real_root:
        raise BadImage(f"image path outside the image folder: {f_path!r} resolves to {path}")
    return path


def load_image(
    path: str,
    max_side: int | None = None,
    quality: int = 90,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
    timings: dict[str, float] | None = None,
) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of a fully decodable image; raises BadImage otherwise.

    The original bytes are kept when they already are an RGB/grey JPEG without an EXIF rotation
    and within `max_side`; anything else (PNG, CMYK, rotated, too large) is re-encoded as an RGB
    JPEG, rotated upright and shrunk so its longer side is at most `max_side`. Files over
    `max_bytes` are not read and images declaring over `max_pixels` are not decoded.
    `timings`, when given, accumulates CPU seconds of this process per stage: read, decode,
    resize, encode (CPU time: what a core spends, whatever else runs on the machine).
    """
    from PIL import Image, ImageOps

    clock = _Clock(timings)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise BadImage(f"image file too large: {path}: {size} bytes (max {max_bytes})")
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise BadImage(f"missing image file: {path}") from None
    except OSError as e:
        raise BadImage(f"unreadable image file: {path}: {e}") from None
    if not data:
        raise BadImage(f"empty image file: {path}")
    if len(data) > max_bytes:  # grew while reading
        raise BadImage(f"image file too large: {path}: over {max_bytes} bytes")
    clock.lap("read")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImage(f"undecodable image: {path}: {type(e).__name__}: {e}") from None
    # Checked on the declared size, before any pixel is decoded (decompression bombs).
    if img.width * img.height > max_pixels:
        raise BadImage(
            f"image too large: {path}: {img.width}x{img.height} pixels declared (max {max_pixels})"
        )
    orientation = img.getexif().get(0x0112, 1)
    declared = img.size
    target = None  # (w, h) of the stored image when it must shrink, before any rotation
    if max_side is not None and max(declared) > max_side:
        scale = max_side / max(declared)
        target = (max(1, round(declared[0] * scale)), max(1, round(declared[1] * scale)))
        if img.format == "JPEG":
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding, to no less than twice the
            # target (so the bicubic resize still filters: as close to the full-size path as its
            # own JPEG round trip). The whole bitstream is still decoded, so truncation is still
            # caught, at a fraction of the cost of a full-size decode and a large resize.
            img.draft(img.mode, (2 * target[0], 2 * target[1]))
    try:
        img.load()  # full decode: truncated or corrupt data fails here, not in the loader
    except Exception as e:  # noqa: BLE001
        raise BadImage(f"undecodable image: {path}: {type(e).__name__}: {e}") from None
    clock.lap("decode")
    if img.format == "JPEG" and img.mode in ("RGB", "L") and orientation == 1 and not target:
        return data, img.width, img.height
    # exif_transpose and convert copy the image even when there is nothing to do: skip them.
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        if target is not None and orientation in (5, 6, 7, 8):
            target = target[::-1]  # turned by 90 degrees
    if img.mode != "RGB":
        img = img.convert("RGB")
    if target is not None and img.size != target:
        img = img.resize(target, Image.BICUBIC)
    clock.lap("resize")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    clock.lap("encode")
    return buf.getvalue(), img.width, img.height


class _Clock:
    """Adds the CPU seconds since the previous lap to timings[name] (nothing when None)."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings
        self.t = time.process_time() if timings is not None else 0.0

    def lap(self, name: str) -> None:
        if self.timings is not None:
            now = time.process_time()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
            self.t = now


MAX_LINE_BYTES = 8 << 20
"""A JSONL line longer than this is rejected without holding it in memory."""


def parse_json(text: str | bytes) -> object:
    """json.loads, with every failure on untrusted input turned into BadRecord."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(f"not UTF-8: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(f"invalid JSON: {e}") from None
    except RecursionError:
        raise BadRecord("invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more than 4300 digits
        raise BadRecord(f"invalid JSON: {e}") from None


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of each non-blank line; None for a line over MAX_LINE_BYTES."""
    with open(path, "rb") as fh:
        n = 0
        while True:
            line = fh.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            n += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := fh.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the over-long line without keeping it
                yield n, None
            elif line.strip():
                yield n, line


def starts_with_list(path: str) -> bool:
    with open(path, "rb") as fh:
        while chunk := fh.read(4096):
            head = chunk.lstrip()
            if head.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                head = head[3:].lstrip()
            if head:
                return head[:1] == b"["
    return False


def iter_records(path: str) -> Iterator[tuple[str, object]]:
    """(source 'file:line', record or BadRecord) for a .jsonl or .json (list) file, in order.

    A .json file that cannot be read as a whole (not UTF-8, invalid, not a list) yields one
    BadRecord with its path as the source; a bad JSONL line yields a BadRecord for that line.
    A .jsonl file whose first non-blank character is '[' is read as a .json list: upstream
    FG-CLIP loads .jsonl files with json.load (fgclip/train/train_fgclip.py), so FineHARD-style
    lists are named .jsonl in the wild.
    """
    if path.endswith(".jsonl") and not starts_with_list(path):
        for n, line in _jsonl_lines(path):
            if line is None:
                yield f"{path}:{n}", BadRecord(f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            try:
                yield f"{path}:{n}", parse_json(line)
            except BadRecord as e:
                yield f"{path}:{n}", e
        return
    try:
        with open(path, "rb") as fh:
            data = parse_json(fh.read())
    except BadRecord as e:
        yield path, BadRecord(f"{path} is unreadable: {e}")
        return
    if not isinstance(data, list):
        yield path, BadRecord(f"{path}: top level must be a list of records")
        return
    for n, rec in enumerate(data):
        yield f"{path}[{n}]", rec


def input_files(path: str) -> list[str]:
    """The annotation files of `path`: itself, the files a .txt lists, or a directory's .json(l).

    Raises FileNotFoundError naming the path (or the list file and line) of a missing input.
    """
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".json", ".jsonl")))
        return [os.path.join(path, n) for n in names]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation input {path} does not exist")
    if path.endswith(".txt"):
        files = []
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                name = line.strip()
                if not name:
                    continue
                if not os.path.isfile(name):
                    raise FileNotFoundError(f"{path}:{n} names {name!r}, which is not a file")
                files.append(name)
        return files
    return [path]
