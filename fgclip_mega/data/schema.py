"""The sample schema: one table for the shard arrays and one for the reader's per-sample outputs.

`SHARD` drives `write_shard` (which arrays exist, their dtype and row shape) and is checked on
write; `OUTPUTS` drives `SampleSource.batch` (allocation), the DALI external source (output
order and dtypes) and the host-side Batch assembly (`batch.batch_from_arrays` packs exactly these
names). Shapes use symbolic sizes, resolved by `dims`:
    LONG, SHORT  token contexts (shards store LONG_CONTEXT / SHORT_CONTEXT; readers re-cut)
    M            max boxes per sample in a batch;  K  hard negatives per box
Rows: 'sample' arrays have one row per sample, 'box' arrays one per box (of all samples),
'offsets' have N+1 entries, 'bytes' is flat. Torch-free: DALI's reader processes import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LONG_CONTEXT = 248
SHORT_CONTEXT = 77


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str
    """numpy dtype name, or 'str' for variable-length strings."""
    rows: str
    """'sample', 'box', 'offsets' (N+1) or 'bytes' (flat)."""
    shape: tuple = ()
    """Per-row shape; ints or symbolic sizes ('LONG', 'SHORT', 'K', 'M', '1+K')."""
    doc: str = ""


SHARD = (
    Field("image_bytes", "uint8", "bytes", (), "concatenated JPEGs, uncompressed"),
    Field("image_offsets", "int64", "offsets", (), "sample i = image_bytes[off[i]:off[i+1]]"),
    Field("image_sizes", "int32", "sample", (2,), "(width, height)"),
    Field("keys", "str", "sample", (), "the records' f_path"),
    Field("captions", "str", "sample"),
    Field("short_captions", "str", "sample"),
    Field("long_tokens", "int32", "sample", ("LONG",), "caption tokens"),
    Field("short_tokens", "int32", "sample", ("SHORT",), "short_prefix + short caption"),
    Field("box_offsets", "int64", "offsets", (), "boxes of sample i: rows off[i]:off[i+1]"),
    Field("boxes", "float32", "box", (4,), "normalised xyxy"),
    Field("box_short_tokens", "int32", "box", ("SHORT",), "short_expr tokens"),
    Field("box_long_tokens", "int32", "box", ("SHORT",), "long_expr tokens"),
    Field("box_short_exprs", "str", "box"),
    Field("box_long_exprs", "str", "box"),
    Field("neg_flags", "uint8", "box", (), "1 = the box has K hard negatives"),
    Field("neg_tokens", "int32", "box", ("K", "SHORT"), "zeros where the flag is 0"),
    Field("neg_texts", "str", "box", ("K",)),
)

# Per-sample outputs of SampleSource, in DALI output order ('jpeg' is ragged).
OUTPUTS = (
    Field("jpeg", "uint8", "sample", (None,), "encoded image, ragged"),
    Field("long_tokens", "int32", "sample", ("LONG",)),
    Field("short_tokens", "int32", "sample", ("SHORT",)),
    Field("boxes", "float32", "sample", ("M", 4), "normalised xyxy, zero rows after the count"),
    Field("box_counts", "int32", "sample", ()),
    Field("region_tokens", "int32", "sample", ("M", "SHORT"), "short or long expr per box"),
    Field("hardneg_tokens", "int32", "sample", ("M", "1+K", "SHORT"), "[short_expr, K negs]"),
    Field("hardneg_valid", "uint8", "sample", ("M",)),
    Field("sample_ids", "int64", "sample", (), "global id (index order)"),
    Field("positions", "int64", "sample", (), "stream position, checked by the loader"),
)
OUTPUT_NAMES = tuple(f.name for f in OUTPUTS)


def resolve(shape: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    out = []
    for s in shape:
        if isinstance(s, str):
            out.append(1 + dims["K"] if s == "1+K" else dims[s])
        else:
            out.append(s)
    return tuple(out)


def allocate_outputs(batch_size: int, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """Zero arrays (B, *shape) for every dense output (all but 'jpeg')."""
    return {
        f.name: np.zeros((batch_size, *resolve(f.shape, dims)), f.dtype)
        for f in OUTPUTS
        if f.name != "jpeg"
    }


def check_shard_arrays(arrays: dict[str, np.ndarray], n: int, m: int, k: int) -> None:
    """Raises ValueError naming the first array that does not match SHARD (n samples, m boxes)."""
    dims = {"LONG": LONG_CONTEXT, "SHORT": SHORT_CONTEXT, "K": k}
    missing = {f.name for f in SHARD} - set(arrays)
    extra = set(arrays) - {f.name for f in SHARD}
    if missing or extra:
        raise ValueError(f"shard arrays: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for f in SHARD:
        a = arrays[f.name]
        lead = {"sample": (n,), "box": (m,), "offsets": (n + 1,), "bytes": a.shape[:1]}[f.rows]
        want_shape = lead + resolve(f.shape, dims)
        want_dtype = np.dtype(object) if f.dtype == "str" else np.dtype(f.dtype)
        if a.shape != want_shape or a.dtype != want_dtype:
            raise ValueError(
                f"shard array {f.name!r}: {a.dtype}{list(a.shape)}, "
                f"schema says {want_dtype}{list(want_shape)}"
            )
