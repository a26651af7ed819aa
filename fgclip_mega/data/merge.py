"""Merge the parts of a partitioned shard build into one index.json and one report.json.

Each part (`build.build_shards(..., part=I, num_parts=N)`) leaves one manifest per bucket it
finished. The merge takes the build directory `out` and, optionally, other build directories
(parts built on machines without a shared filesystem, copied over or mounted), and:

  - refuses builds with different content parameters (build.json), naming the parameter;
  - refuses overlapping parts (a bucket in two directories) and missing ones (a bucket in none:
    its part never ran or was killed), naming the buckets and, given N, the parts to rerun;
  - checks that every shard a manifest lists is finished with the hash the manifest names;
  - copies the shards of the other directories into `out` (each shard's marker last);
  - writes report.json (bad-record reports of all parts, in bucket/shard order) and index.json
    (shards in bucket/shard order with their record counts and input hashes), index.json last.

The result depends only on the input and the content parameters: the same bytes whatever the
number of parts, which machine built which part, or how often a part was rerun.
"""

from __future__ import annotations

import collections
import re

from fgclip_mega.data.build_store import (
    BUILD_NAME,
    CONTENT_PARAMS,
    DEFAULTS,
    REPORT_NAME,
    BuildStore,
    bucket_manifest_name,
    part_buckets,
)
from fgclip_mega.data.shards import write_index


class MergeError(ValueError):
    """The parts cannot be merged; the message says which and why."""


def summarise(markers: list[dict]) -> dict:
    """Counts and the problem list of finished shards' markers, in the order given."""
    problems = [pr for m in markers for pr in m["problems"]]
    skipped = [pr for pr in problems if pr["kind"] != "box"]
    box_notes = [pr for pr in problems if pr["kind"] == "box"]
    # Reason category = text before the first ':', box indices folded: "bbox_info[].bbox ...".
    reasons = collections.Counter(
        re.sub(r"\[\d+\]", "[]", pr["reason"].split(":")[0]) for pr in problems
    )
    return {
        "records": sum(m["records"] for m in markers),
        "samples": sum(m["num_samples"] for m in markers),
        "boxes": sum(m["num_boxes"] for m in markers),
        "skipped_records": len(skipped),
        "box_problems": len(box_notes),
        "reasons": dict(reasons.most_common()),
        "problems": problems,
    }


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def _params(store: BuildStore) -> dict:
    try:
        params = store.read_json(BUILD_NAME)
    except ValueError as e:
        raise MergeError(f"{store.path(BUILD_NAME)} is corrupt ({e}): rerun a part there") from None
    if not isinstance(params, dict):
        raise MergeError(f"{store} holds no {BUILD_NAME}: it is not a shard build directory")
    return {k: params.get(k, DEFAULTS.get(k)) for k in CONTENT_PARAMS}


def _missing_message(missing: list[int], buckets: int, num_parts: int | None) -> str:
    msg = f"missing parts: buckets {_ranges(missing)} of {buckets} were not built to the end"
    if num_parts:
        parts = sorted(
            {
                i
                for i in range(num_parts)
                for b in missing
                if b in part_buckets(i, num_parts, buckets)
            }
        )
        msg += f" (with --num-parts {num_parts}: rerun --part {', '.join(map(str, parts))})"
    else:
        msg += " (part I of N builds buckets [I*B//N, (I+1)*B//N); rerun the parts that own them)"
    return msg + "; a rerun reuses every finished shard"


def merge_parts(
    out: str,
    sources: list[str] | tuple[str, ...] = (),
    index_meta: dict | None = None,
    num_parts: int | None = None,
) -> dict:
    """Merges the parts in `out` and `sources` into `out`; returns the report (= report.json).

    `num_parts` only makes the message about missing parts name the parts to rerun.
    """
    target = BuildStore(out)
    stores = [target] + [s for s in map(BuildStore, sources) if not s.same_as(target)]
    present = [s for s in stores if s.read_json(BUILD_NAME) is not None or s is not target]
    if not present:
        raise MergeError(f"{target} holds no {BUILD_NAME}: no part was built there")
    params = _params(present[0])
    for s in present[1:]:
        other = _params(s)
        changed = {k: (params[k], other[k]) for k in CONTENT_PARAMS if params[k] != other[k]}
        if changed:
            raise MergeError(
                f"{s} was built with other parameters than {present[0]}: {changed}; "
                "parts of one build need the same parameters"
            )
    buckets = params["buckets"]

    owner: dict[int, tuple[BuildStore, dict]] = {}
    overlaps = []
    for s in present:
        for rel in s.bucket_manifests():
            try:
                manifest = s.read_json(rel)
            except ValueError as e:
                raise MergeError(f"{s.path(rel)} is corrupt ({e}): rerun its part") from None
            b = manifest["bucket"]
            if manifest.get("buckets") != buckets or not 0 <= b < buckets:
                raise MergeError(
                    f"{s.path(rel)} is for {manifest.get('buckets')} buckets, "
                    f"the build has {buckets}"
                )
            if b in owner:
                overlaps.append((b, owner[b][0], s))
                continue
            owner[b] = (s, manifest)
    if overlaps:
        pairs = collections.defaultdict(list)
        for b, first, second in overlaps:
            pairs[str(first), str(second)].append(b)
        detail = "; ".join(
            f"buckets {_ranges(bs)} in both {a} and {b}" for (a, b), bs in pairs.items()
        )
        raise MergeError(
            f"overlapping parts: {detail}. Each bucket must come from one directory (parts "
            "of different --num-parts, or one part built twice in two places)"
        )
    missing = [b for b in range(buckets) if b not in owner]
    if missing:
        raise MergeError(_missing_message(missing, buckets, num_parts))

    markers, shards = [], []
    for b in range(buckets):
        s, manifest = owner[b]
        for entry in manifest["shards"]:
            marker = s.marker(entry["path"])
            if marker is None or marker.get("input_hash") != entry["input_hash"]:
                raise MergeError(
                    f"{s.path(entry['path'])} (bucket {b}) is not the finished shard its "
                    "manifest lists (no marker, or another hash): rerun its part"
                )
            markers.append(marker)
            shards.append(
                {
                    "path": entry["path"],
                    "num_samples": marker["num_samples"],
                    "num_boxes": marker["num_boxes"],
                    "input_hash": marker["input_hash"],
                }
            )
    target.create()
    if target.read_json(BUILD_NAME) is None:
        target.copy_file_from(present[0], BUILD_NAME)
    for b in range(buckets):
        s, manifest = owner[b]
        if s is target:
            continue
        for entry in manifest["shards"]:
            target.copy_shard_from(s, entry["path"])
        target.copy_file_from(s, bucket_manifest_name(b))
    target.remove_stray_temporaries()
    report = summarise(markers)
    target.write_json(REPORT_NAME, report)
    meta = {
        "num_negatives": params["num_negatives"],
        "short_prefix": params["short_prefix"],
        "buckets": buckets,
        **(index_meta or {}),
    }
    write_index(target.root, shards, meta)
    return report
