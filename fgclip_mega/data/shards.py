"""Zarr v3 shard format: writer, reader, the shard index, and (lazily) the builders.

A shard is one zarr group `shard-NNNNNN.zarr` of N samples with M boxes in total, holding the
arrays of `schema.SHARD` (checked on write):

    image_bytes      (total,) uint8    concatenated JPEGs, uncompressed (JPEG is compressed)
    image_offsets    (N+1,) int64      sample i = image_bytes[off[i]:off[i+1]]
    image_sizes      (N, 2) int32      (width, height)
    keys, captions, short_captions (N,) str
    long_tokens      (N, 248) int32    caption tokens
    short_tokens     (N, 77) int32     short_prefix + short caption tokens
    box_offsets      (N+1,) int64      boxes of sample i = rows box_off[i]:box_off[i+1]
    boxes            (M, 4) float32    normalised xyxy
    box_short_tokens (M, 77) int32     short_expr tokens;  box_short_exprs (M,) str
    box_long_tokens  (M, 77) int32     long_expr tokens;   box_long_exprs (M,) str
    neg_flags        (M,) uint8        1 = the box has K hard negatives
    neg_tokens       (M, K, 77) int32  zeros where the flag is 0;  neg_texts (M, K) str

Large arrays use zarr sharding (few files per shard); token arrays are zstd-compressed in
256-row chunks so that a block read of 256+ samples touches one or two chunks. A shard counts as
finished only once `shard-NNNNNN.done.json` (the completion marker) exists; `index.json` lists
finished shards with their sample counts and is written last, atomically.

Every path here may also be an fsspec URL (s3://bucket/prefix/...): `storage.py` opens it, with
bounded retries on transient errors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgclip_mega.data import storage, tokenizer
from fgclip_mega.data.ingest import Sample
from fgclip_mega.data.schema import LONG_CONTEXT, SHARD, SHORT_CONTEXT, check_shard_arrays

FORMAT = "fgclip_mega.shards"
VERSION = 1
SHORT_PREFIX = "a photo of "
"""Upstream FG-CLIP tokenizes 'a photo of ' + short_caption."""
INDEX_NAME = "index.json"
_ROW_CHUNK = 256
_BYTE_CHUNK = 1 << 20  # 1 MiB inner chunks; 64 of them per zarr shard file
_BYTE_SHARD = 64 * _BYTE_CHUNK


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.zarr"


def marker_path(shard_path: str | Path) -> Path | str:
    """shard-N.zarr -> shard-N.done.json beside it (a Path, or a URL string for a URL)."""
    if storage.is_url(shard_path):
        name = storage.basename(shard_path).removesuffix(".zarr") + ".done.json"
        return storage.join(storage.parent(shard_path), name)
    p = Path(shard_path)
    return p.with_name(p.name.removesuffix(".zarr") + ".done.json")


def atomic_write_json(path: Path | str, obj: object) -> None:
    """A temporary file renamed into place (one PUT on an object store: atomic as well)."""
    storage.write_json(path, obj)


def read_marker(shard_path: str | Path) -> dict | None:
    """The completion marker of a finished shard, or None (missing or half-written)."""
    try:
        return storage.read_json(marker_path(shard_path))
    except (FileNotFoundError, ValueError):
        return None


# ----------------------------------------------------------------------------- writing


def _strings(texts: list[str]) -> np.ndarray:
    out = np.empty(len(texts), dtype=object)  # 1-D even when texts is empty
    out[:] = texts
    return out


def _tokens_of(texts: list[str], n_rows: int, context: int) -> np.ndarray:
    return tokenizer.tokenize(texts, context) if texts else np.zeros((n_rows, context), np.int32)


def write_shard(
    path: str | Path,
    samples: Sequence[Sample],
    num_negatives: int = 10,
    short_prefix: str = SHORT_PREFIX,
    marker: dict | None = None,
) -> dict:
    """Writes `samples` as one shard at `path` (replacing anything there), then its marker.

    Returns the marker: num_samples, num_boxes, num_bytes plus everything in `marker`.
    """
    import zarr
    from zarr.codecs import ZstdCodec

    storage.remove(marker_path(path))
    storage.remove_tree(path)
    n = len(samples)
    k = num_negatives
    counts = np.array([len(s.boxes) for s in samples], dtype=np.int64)
    m = int(counts.sum())
    sizes = np.array([len(s.image) for s in samples], dtype=np.int64)
    image_offsets = np.concatenate([[0], np.cumsum(sizes)])
    box_offsets = np.concatenate([[0], np.cumsum(counts)])

    flat_boxes = [b for s in samples for b in s.boxes]
    short_exprs = [t for s in samples for t in s.short_exprs]
    long_exprs = [t for s in samples for t in s.long_exprs]
    flags = np.array([f for s in samples for f in s.neg_flags], dtype=np.uint8)
    neg_texts = np.full((m, k), "", dtype=object)
    neg_tokens = np.zeros((m, k, SHORT_CONTEXT), dtype=np.int32)
    box_negs = [negs for s in samples for negs in s.negs]
    with_negs = [(i, negs) for i, negs in enumerate(box_negs) if negs]
    if with_negs:
        rows = np.array([i for i, _ in with_negs])
        texts = [t for _, negs in with_negs for t in negs]
        neg_texts[rows] = np.array(texts, dtype=object).reshape(-1, k)
        neg_tokens[rows] = tokenizer.tokenize(texts, SHORT_CONTEXT).reshape(-1, k, SHORT_CONTEXT)

    arrays = {
        "image_bytes": np.frombuffer(b"".join(s.image for s in samples), dtype=np.uint8),
        "image_offsets": image_offsets,
        "image_sizes": np.array([[s.width, s.height] for s in samples], np.int32).reshape(-1, 2),
        "keys": _strings([s.key for s in samples]),
        "captions": _strings([s.caption for s in samples]),
        "short_captions": _strings([s.short_caption for s in samples]),
        "long_tokens": _tokens_of([s.caption for s in samples], n, LONG_CONTEXT),
        "short_tokens": _tokens_of(
            [short_prefix + s.short_caption for s in samples], n, SHORT_CONTEXT
        ),
        "box_offsets": box_offsets,
        "boxes": np.asarray(flat_boxes, dtype=np.float32).reshape(m, 4),
        "box_short_tokens": _tokens_of(short_exprs, m, SHORT_CONTEXT),
        "box_long_tokens": _tokens_of(long_exprs, m, SHORT_CONTEXT),
        "box_short_exprs": _strings(short_exprs),
        "box_long_exprs": _strings(long_exprs),
        "neg_flags": flags,
        "neg_tokens": neg_tokens,
        "neg_texts": neg_texts,
    }
    check_shard_arrays(arrays, n, m, k)
    group = zarr.open_group(store=storage.open_store(path, "w"), mode="w", zarr_format=3)
    total = int(image_offsets[-1])
    for field in SHARD:
        value = arrays[field.name]
        if field.rows == "bytes":  # flat bytes: big uncompressed chunks inside few files
            arr = group.create_array(
                field.name,
                shape=value.shape,
                dtype=value.dtype,
                chunks=(_BYTE_CHUNK,),
                shards=(_BYTE_SHARD,),
                compressors=None,
            )
        else:
            is_str = field.dtype == "str"
            chunks = (max(1, min(_ROW_CHUNK, len(value))),) + value.shape[1:]
            arr = group.create_array(
                field.name,
                shape=value.shape,
                dtype=str if is_str else value.dtype,
                chunks=chunks,
                compressors=ZstdCodec(level=3) if value.ndim > 1 and not is_str else "auto",
            )
        if value.size:
            arr[...] = value
    group.attrs.update(
        {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": n,
            "num_boxes": m,
            "num_negatives": k,
            "short_prefix": short_prefix,
            "long_context": LONG_CONTEXT,
            "short_context": SHORT_CONTEXT,
        }
    )
    done = {"num_samples": n, "num_boxes": m, "num_bytes": total, **(marker or {})}
    atomic_write_json(marker_path(path), done)
    return done


# ----------------------------------------------------------------------------- reading


@dataclass
class Block:
    """Samples [start, end) of one shard, as contiguous arrays (offsets are block-relative)."""

    image_offsets: np.ndarray  # (n+1,) int64
    image_bytes: np.ndarray  # (total,) uint8
    long_tokens: np.ndarray  # (n, 248) int32
    short_tokens: np.ndarray  # (n, 77) int32
    box_offsets: np.ndarray  # (n+1,) int64
    boxes: np.ndarray  # (m, 4) float32
    box_short_tokens: np.ndarray  # (m, 77) int32
    box_long_tokens: np.ndarray  # (m, 77) int32
    neg_flags: np.ndarray  # (m,) uint8
    neg_tokens: np.ndarray  # (m, K, 77) int32

    def __len__(self) -> int:
        return len(self.long_tokens)

    def jpeg(self, i: int) -> np.ndarray:
        return self.image_bytes[self.image_offsets[i] : self.image_offsets[i + 1]]


class ShardReader:
    """Reads one shard; arrays are opened once and sliced in contiguous ranges."""

    def __init__(self, path: str | Path, policy: storage.RetryPolicy = storage.DEFAULT_POLICY):
        import zarr

        self.path = str(path)
        store = storage.open_store(self.path, "r", policy)
        self.group = zarr.open_group(store=store, mode="r", zarr_format=3)
        attrs = dict(self.group.attrs)
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not an {FORMAT} shard (format={attrs.get('format')})")
        if attrs.get("version") != VERSION:
            raise ValueError(f"{self.path}: shard version {attrs.get('version')} != {VERSION}")
        self.attrs = attrs
        self.num_samples = int(attrs["num_samples"])
        self.num_negatives = int(attrs["num_negatives"])
        self._arrays: dict = {}

    def _a(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def read_block(self, start: int, end: int) -> Block:
        if not 0 <= start <= end <= self.num_samples:
            raise IndexError(f"{self.path}: block [{start}, {end}) outside 0..{self.num_samples}")
        img_off = self._a("image_offsets")[start : end + 1]
        box_off = self._a("box_offsets")[start : end + 1]
        b0, b1 = int(box_off[0]), int(box_off[-1])
        return Block(
            image_offsets=img_off - img_off[0],
            image_bytes=self._a("image_bytes")[int(img_off[0]) : int(img_off[-1])],
            long_tokens=self._a("long_tokens")[start:end],
            short_tokens=self._a("short_tokens")[start:end],
            box_offsets=box_off - b0,
            boxes=self._a("boxes")[b0:b1],
            box_short_tokens=self._a("box_short_tokens")[b0:b1],
            box_long_tokens=self._a("box_long_tokens")[b0:b1],
            neg_flags=self._a("neg_flags")[b0:b1],
            neg_tokens=self._a("neg_tokens")[b0:b1],
        )

    def keys(self) -> list[str]:
        return [str(k) for k in self._a("keys")[:]] if self.num_samples else []

    def samples(self) -> list[Sample]:
        """Every sample with its texts and JPEG bytes (the round trip of `write_shard`)."""
        if not self.num_samples:
            return []
        n = self.num_samples
        get = {name: self._a(name)[...] for name in self.group.array_keys()}
        out = []
        for i in range(n):
            b0, b1 = int(get["box_offsets"][i]), int(get["box_offsets"][i + 1])
            i0, i1 = int(get["image_offsets"][i]), int(get["image_offsets"][i + 1])
            flags = [int(f) for f in get["neg_flags"][b0:b1]]
            negs = [
                [str(t) for t in get["neg_texts"][j]] if flags[j - b0] else []
                for j in range(b0, b1)
            ]
            out.append(
                Sample(
                    key=str(get["keys"][i]),
                    caption=str(get["captions"][i]),
                    short_caption=str(get["short_captions"][i]),
                    boxes=np.asarray(get["boxes"][b0:b1], np.float32).reshape(-1, 4),
                    short_exprs=[str(t) for t in get["box_short_exprs"][b0:b1]],
                    long_exprs=[str(t) for t in get["box_long_exprs"][b0:b1]],
                    neg_flags=flags,
                    negs=negs,
                    image=get["image_bytes"][i0:i1].tobytes(),
                    width=int(get["image_sizes"][i][0]),
                    height=int(get["image_sizes"][i][1]),
                )
            )
        return out


# ----------------------------------------------------------------------------- index


def write_index(root: str | Path, shards: list[dict], meta: dict) -> Path | str:
    """Writes root/index.json atomically; `shards` items have path (relative), num_samples."""
    index = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": int(sum(s["num_samples"] for s in shards)),
        "num_shards": len(shards),
        **meta,
        "shards": shards,
    }
    path = storage.join(root, INDEX_NAME) if storage.is_url(root) else Path(root) / INDEX_NAME
    atomic_write_json(path, index)
    return path


@dataclass
class ShardSet:
    """The shards of one index: absolute paths and sample counts, in index order."""

    root: str
    paths: list[str]
    sizes: np.ndarray  # (S,) int64
    meta: dict

    @property
    def num_samples(self) -> int:
        return int(self.sizes.sum())

    @property
    def offsets(self) -> np.ndarray:
        """(S+1,) global sample id of each shard's first sample."""
        return np.concatenate([[0], np.cumsum(self.sizes)])

    @property
    def fingerprint(self) -> str:
        pairs = zip(self.paths, self.sizes, strict=True)
        text = json.dumps([[os.path.basename(p), int(n)] for p, n in pairs])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_shard_set(
    path: str | Path, policy: storage.RetryPolicy = storage.DEFAULT_POLICY
) -> ShardSet:
    """Reads an index.json (or the one inside a directory, local or at a URL ending in '/');
    empty shards are left out."""
    if storage.is_url(path):
        url = str(path)
        index_path = url if url.endswith(".json") else storage.join(url, INDEX_NAME)
        where = storage.redact(index_path)
        try:
            index = storage.read_json(index_path, policy)
        except FileNotFoundError:
            msg = f"no shard index at {where} (build it with data_prep)"
            raise FileNotFoundError(msg) from None
    else:
        path = Path(storage.local_path(path))
        index_path = path / INDEX_NAME if path.is_dir() else path
        where = str(index_path)
        if not index_path.is_file():
            raise FileNotFoundError(f"no shard index at {index_path} (build it with data_prep)")
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{where}: not an {FORMAT} v{VERSION} index")
    root = storage.parent(index_path)
    shards = [s for s in index["shards"] if s["num_samples"] > 0]
    if not shards:
        raise ValueError(f"{where}: the index lists no samples")
    meta = {k: v for k, v in index.items() if k != "shards"}
    return ShardSet(
        root=root,
        paths=[storage.join(root, s["path"]) for s in shards],
        sizes=np.array([s["num_samples"] for s in shards], dtype=np.int64),
        meta=meta,
    )


# ----------------------------------------------------------------------------- building

# The producers of shard input are part of this module's API (data_prep/ imports only this
# module and the tokenizer), loaded on first use: the build loop imports this module, and the
# readers in DALI's worker processes need neither.
_BUILD_API = {
    "build_shards": "fgclip_mega.data.build",  # annotations + images -> shards
    "merge_parts": "fgclip_mega.data.merge",  # parts of a partitioned build -> one index
    "write_raw_split": "fgclip_mega.data.synthetic",  # synthetic annotations + images
    "MixedSizes": "fgclip_mega.data.synthetic",  # their mixed sizes / aspect ratios (NaFlex)
    "write_tokenizer": "fgclip_mega.data.synthetic_tokenizer",  # their FG-CLIP 2 tokenizer.json
}


def __getattr__(name: str):
    if name in _BUILD_API:
        import importlib

        return getattr(importlib.import_module(_BUILD_API[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
