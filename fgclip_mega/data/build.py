"""FineHARD JSON(L) + image folder -> zarr v3 shards, multiprocess, resumable, validated.

Layout. Each record has a key: its f_path (after `strip_prefix`), or its source 'file:line' when
it has no usable f_path. A stable hash of the key puts the record in one of `buckets` buckets
(`build_store.bucket_of`). Each bucket's records, in input order (files sorted), are cut into
chunks of `shard_size`; chunk c of bucket b becomes shard `bucket_shard_name(b, c)`. With the
default `buckets=1` this is the plain layout: chunk i of the input is shard-00000i.

Partitioned builds. Part I of N (`part`, `num_parts`) builds the buckets
`part_buckets(I, N, buckets)` and nothing else: every part reads all annotations (JSON only; it
opens only its own images) and keeps the records whose key hashes into its range. Shards depend
only on the input and the content parameters (buckets included), never on N or on which machine
ran a part, so parts built anywhere and merged (`merge.merge_parts`) give the same bytes as one
process building everything. An unpartitioned build is part 0 of 1 followed by the merge.
Duplicates of an f_path share its key, hence its bucket and its part: the duplicate check needs
no coordination. Memory: up to `shard_size` pending records per owned bucket (their JSON text),
plus every key seen (~100 bytes per record).

Resume. A shard is finished once its completion marker exists. Each marker carries a content
hash of its chunk (the input records' bytes, their verdicts, and the content parameters): a
rerun reuses exactly the shards whose hash matches and rebuilds the others, so an edited record
rebuilds its shard and an interrupted part finishes to the same result as an uninterrupted one.
A part writes its buckets' manifests (buckets/bucket-NNNNN.json) only when all their shards are
finished, and deletes them when it starts: a part killed midway leaves its buckets missing, and
the merge refuses to run until it is rerun. Image files are not hashed (edit an image: use a
fresh `out`).

Invalid input never stops the build; every culprit is listed in OUT/report.json with its key,
source line and reason:
  - unreadable input: a non-UTF-8 line or .json file, invalid or too deeply nested JSON, a line
    over MAX_LINE_BYTES, a .json file whose top level is not a list;
  - a record that is not an object, lacks/has a bad f_path, caption or bbox_info, has over-long
    or non-Unicode texts, too many boxes, or repeats the f_path of an earlier record (the first
    record naming a path claims it, even if that one is rejected later for another reason);
  - an image outside the image folder (absolute, '..', symlink out), missing, too large (bytes or
    declared pixels), or undecodable (full PIL decode);
  - a bad box (not numbers, NaN, x2 < x1, outside [0, 1] beyond the tolerance) is dropped from
    its record; bad hard negatives are dropped from their box.
OUT/report.json and OUT/index.json (index last) are written by the merge, atomically; neither
holds timings, so they are the same bytes for the same input.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict

from fgclip_mega.data.build_store import (
    BUILD_NAME,
    CONTENT_PARAMS,
    DEFAULTS,
    BuildStore,
    bucket_manifest_name,
    bucket_of,
    bucket_shard_name,
    part_buckets,
)
from fgclip_mega.data.ingest import (
    BOX_TOLERANCE,
    BadImage,
    BadRecord,
    Problem,
    input_files,
    iter_records,
    load_image,
    parse_json,
    parse_record,
    resolve_image,
    starts_with_list,
)
from fgclip_mega.data.merge import merge_parts, summarise
from fgclip_mega.data.shards import INDEX_NAME, SHORT_PREFIX, write_shard
from fgclip_mega.data.worker_guard import guard_worker

# An item handed to a worker: (source 'file:line', record JSON text or None, reason to reject
# it or None).
Item = tuple[str, str | None, str | None]


def record_key(rec: object, source: str, strip_prefix: str) -> str:
    """The key that places a record in its bucket: f_path without the prefix, else the source."""
    f_path = rec.get("f_path") if isinstance(rec, dict) else None
    if isinstance(f_path, str) and f_path:
        return f_path.removeprefix(strip_prefix)
    return source


def _items(
    files: list[str], strip_prefix: str, buckets: int, owned: range
) -> Iterator[tuple[int, Item]]:
    """(bucket, item) of every input record in an owned bucket, in input order.

    Runs in the main process: it sees all records of its buckets, and duplicates of an f_path
    share a bucket, so it rejects later duplicates. Records travel to workers as JSON text (cheap
    to send, no deep-structure pickling).
    """
    seen: set[str] = set()
    for path in files:
        for source, rec in iter_records(path):
            key = record_key(rec, source, strip_prefix)
            bucket = bucket_of(key, buckets)
            if bucket not in owned:
                continue
            if isinstance(rec, BadRecord):
                yield bucket, (source, None, str(rec))
                continue
            try:
                # Key order is kept (no sort_keys): short_expr_negs' dict order is record order,
                # and sorted keys would put "10" before "2".
                text = json.dumps(rec, ensure_ascii=False)
            except (RecursionError, ValueError) as e:
                yield bucket, (source, None, f"invalid JSON: {type(e).__name__}")
                continue
            if key != source:  # the record names an f_path
                if key in seen:
                    reason = f"duplicate f_path: {key!r} appeared in an earlier record"
                    yield bucket, (source, text, reason)
                    continue
                seen.add(key)
            yield bucket, (source, text, None)


def chunk_hash(chunk: list[Item], params: dict) -> str:
    h = hashlib.sha256(json.dumps({k: params[k] for k in CONTENT_PARAMS}).encode())
    for source, text, reason in chunk:
        for part in (source, text or "", reason or ""):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _build_one(task: tuple[str, list[Item], dict, str]) -> dict:
    """Worker: one chunk of records -> one shard; returns its completion marker."""
    name, items, p, digest = task
    samples, problems = [], []
    for source, text, reason in items:
        rec = parse_json(text) if text is not None else None  # text came from json.dumps
        key = record_key(rec, source, p["strip_prefix"])  # named even if rejected
        try:
            if reason is not None:
                raise BadRecord(reason)
            sample, f_path, box_problems = parse_record(
                rec,
                p["num_negatives"],
                p["max_boxes"],
                p["strip_prefix"],
                source,
                p["box_tolerance"],
            )
            key = sample.key
            image_path = resolve_image(p["images"], f_path)
            sample.image, sample.width, sample.height = load_image(
                image_path, p["max_side"], p["quality"]
            )
        except BadRecord as e:
            kind = "image" if isinstance(e, BadImage) else "record"
            problems.append(Problem(key, str(e), kind, None, source))
            continue
        problems.extend(box_problems)
        samples.append(sample)
    marker = {
        "records": len(items),
        "input_hash": digest,
        "first_source": items[0][0],
        "last_source": items[-1][0],
        "problems": [asdict(pr) for pr in problems],
    }
    return write_shard(
        BuildStore(p["out"]).path(name),
        samples,
        p["num_negatives"],
        p["short_prefix"],
        marker,
    )


def _count_records(files: list[str]) -> int | None:
    """Record count for the progress bar (JSONL only: counting is a cheap newline scan)."""
    if not all(f.endswith(".jsonl") and not starts_with_list(f) for f in files):
        return None
    total = 0
    for path in files:
        with open(path, "rb") as fh:
            for line in fh:
                total += bool(line.strip())
    return total


def check_params(store: BuildStore, params: dict) -> None:
    """Refuses a rerun with other content parameters; rewrites a missing or corrupt build.json.

    A corrupt build.json (an interrupted write by an older version) is safe to replace: every
    shard marker's hash covers the content parameters, so no shard built with other parameters
    is reused.
    """
    old = None
    try:
        old = store.read_json(BUILD_NAME)
        if old is not None and not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        print(
            f"[build_shards] {store.path(BUILD_NAME)} is corrupt ({type(e).__name__}: {e}); "
            "rewriting it. Shards are reused only where their content hash matches.",
            file=sys.stderr,
        )
        old = None
    if old is not None:
        changed = {
            k: (old.get(k, DEFAULTS.get(k)), params[k])
            for k in CONTENT_PARAMS
            if old.get(k, DEFAULTS.get(k)) != params[k]
        }
        if changed:
            raise SystemExit(
                f"{store} was built with other parameters {changed} (old, new); "
                "use a fresh --out or the old parameters"
            )
        if set(old) != set(params):  # written by an older version: same values, new fields
            store.write_json(BUILD_NAME, params)
    else:
        store.write_json(BUILD_NAME, params)


def _check_layout(shard_size: int, workers: int, buckets: int, part: int, num_parts: int) -> None:
    if shard_size < 1 or workers < 1:
        raise ValueError(f"shard_size={shard_size}, workers={workers}: need >= 1")
    if buckets < 1:
        raise ValueError(f"buckets={buckets}: need >= 1")
    if not 1 <= num_parts <= buckets:
        raise ValueError(
            f"num_parts={num_parts} with buckets={buckets}: need 1 <= num_parts <= buckets "
            "(choose --buckets once for the data set, at least the most parts you will run)"
        )
    if not 0 <= part < num_parts:
        raise ValueError(f"part={part}: need 0 <= part < num_parts={num_parts}")


def build_shards(
    annotations: str,
    images: str,
    out: str,
    shard_size: int = 4096,
    workers: int = 1,
    num_negatives: int = 10,
    max_boxes: int | None = None,
    max_side: int | None = None,
    quality: int = 90,
    strip_prefix: str = "",
    short_prefix: str = SHORT_PREFIX,
    box_tolerance: float = BOX_TOLERANCE,
    progress: bool = True,
    index_meta: dict | None = None,
    buckets: int = 1,
    part: int = 0,
    num_parts: int = 1,
) -> dict:
    """Builds (or finishes) the shards of part `part` of `num_parts` in `out`; returns the report.

    With num_parts=1 the part is the whole input and the merge follows (report.json and
    index.json written); otherwise run `merge.merge_parts` once every part has finished.
    `index_meta` is merged into index.json (e.g. the generation parameters of synthetic data).
    """
    from tqdm import tqdm

    _check_layout(shard_size, workers, buckets, part, num_parts)
    params = {
        "annotations": os.path.abspath(annotations),
        "images": os.path.abspath(images),
        "shard_size": shard_size,
        "num_negatives": num_negatives,
        "max_boxes": max_boxes,
        "max_side": max_side,
        "quality": quality,
        "strip_prefix": strip_prefix,
        "short_prefix": short_prefix,
        "box_tolerance": box_tolerance,
        "buckets": buckets,
    }
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder {images} does not exist")
    files = input_files(annotations)
    if not files:
        raise FileNotFoundError(f"no .json/.jsonl annotation files in {annotations}")
    store = BuildStore(out)
    store.create()
    check_params(store, params)
    owned = part_buckets(part, num_parts, buckets)
    # This part's buckets are unfinished until it ends; the index is stale until the merge.
    for b in owned:
        store.remove(bucket_manifest_name(b))
    store.remove(INDEX_NAME)
    t0 = time.time()
    total = _count_records(files)
    if total is not None and num_parts > 1:
        total = round(total * len(owned) / buckets)  # expected share of this part
    bar = tqdm(total=total, unit="rec", desc=f"part {part}/{num_parts}", disable=not progress)
    markers: dict[tuple[int, int], dict] = {}
    reused = 0
    task_params = {**params, "out": str(store)}

    def tasks() -> Iterator[tuple[tuple[int, int], tuple[str, list[Item], dict, str]]]:
        nonlocal reused
        pending: dict[int, list[Item]] = {b: [] for b in owned}
        next_chunk = dict.fromkeys(owned, 0)

        def emit(b: int) -> Iterable:
            nonlocal reused
            chunk, pending[b] = pending[b], []
            c = next_chunk[b]
            next_chunk[b] += 1
            name = bucket_shard_name(b, c, buckets)
            digest = chunk_hash(chunk, params)
            done = store.marker(name)
            if done and done.get("input_hash") == digest:
                markers[b, c] = done
                reused += 1
                bar.update(len(chunk))
                return
            yield (b, c), (name, chunk, task_params, digest)

        for b, item in _items(files, strip_prefix, buckets, owned):
            pending[b].append(item)
            if len(pending[b]) == shard_size:
                yield from emit(b)
        for b in owned:
            if pending[b]:
                yield from emit(b)

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = None
    if workers > 1:
        # Workers die with this process (SIGKILL included): a rerun never races an orphan
        # still writing the same shard.
        main_thread = threading.current_thread() is threading.main_thread()
        pool = ctx.Pool(workers, initializer=guard_worker, initargs=(os.getpid(), main_thread))
    pending: collections.deque = collections.deque()

    def finish_oldest() -> None:
        bc, n, result = pending.popleft()
        markers[bc] = result.get() if pool else result
        bar.update(n)
        bar.set_postfix(
            shards=len(markers), problems=sum(len(m["problems"]) for m in markers.values())
        )

    try:
        for bc, task in tasks():
            result = pool.apply_async(_build_one, (task,)) if pool else _build_one(task)
            pending.append((bc, len(task[1]), result))
            # At most 2 chunks per worker in flight: memory stays bounded on huge inputs.
            while len(pending) >= 2 * workers:
                finish_oldest()
        while pending:
            finish_oldest()
    except BaseException:
        if pool:
            pool.terminate()  # finished shards keep their markers; the rest rebuild on rerun
        raise
    if pool:
        pool.close()
        pool.join()
    bar.close()
    _write_bucket_manifests(store, owned, markers, buckets)
    ordered = [markers[bc] for bc in sorted(markers)]
    if num_parts == 1:
        report = merge_parts(out, index_meta=index_meta)
    else:
        report = summarise(ordered)
    dt = time.time() - t0
    report = {**report, "reused_shards": reused, "seconds": round(dt, 2)}
    if progress:
        what = "" if num_parts == 1 else f"part {part}/{num_parts} (buckets {owned.start}-"
        what += "" if num_parts == 1 else f"{owned.stop - 1} of {buckets}): "
        rate = report["records"] / max(dt, 1e-9)
        print(
            f"[build_shards] {what}{report['samples']}/{report['records']} records -> "
            f"{len(ordered)} shards ({reused} reused) in {dt:.1f} s ({rate:.0f} rec/s); "
            f"{report['skipped_records']} skipped, {report['box_problems']} box problems"
            + (f" -> {store.path('report.json')}" if num_parts == 1 else "; merge when all end")
        )
    return report


def _write_bucket_manifests(
    store: BuildStore, owned: range, markers: dict[tuple[int, int], dict], buckets: int
) -> None:
    """One manifest per owned bucket (empty ones too: the merge sees the bucket was built)."""
    by_bucket: dict[int, list[tuple[int, dict]]] = {b: [] for b in owned}
    for (b, c), m in sorted(markers.items()):
        by_bucket[b].append((c, m))
    for b in owned:
        shards = [
            {
                "path": bucket_shard_name(b, c, buckets),
                "num_samples": m["num_samples"],
                "num_boxes": m["num_boxes"],
                "records": m["records"],
                "input_hash": m["input_hash"],
            }
            for c, m in by_bucket[b]
        ]
        manifest = {
            "bucket": b,
            "buckets": buckets,
            "records": sum(s["records"] for s in shards),
            "shards": shards,
        }
        store.write_json(bucket_manifest_name(b), manifest)
