"""FineHARD JSON(L) + image folder -> zarr v3 shards, multiprocess, resumable, validated.

Input records are taken in order (files sorted) and cut into chunks of `shard_size` records;
chunk i becomes shard i. A shard is finished once its completion marker exists. Each marker
carries a content hash of its chunk (the input records' bytes, their verdicts from this process,
and the content parameters): a rerun reuses exactly the shards whose hash matches and rebuilds
the others, so an edited record rebuilds its shard and an interrupted build finishes to the same
result as an uninterrupted one. Image files are not hashed (edit an image: use a fresh `out`).

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
OUT/index.json (sample counts per shard) and OUT/report.json are written last, atomically.
Memory: the duplicate check keeps every f_path seen (~100 bytes per record).
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

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
)
from fgclip_mega.data.shards import (
    SHORT_PREFIX,
    atomic_write_json,
    read_marker,
    shard_name,
    write_index,
    write_shard,
)

BUILD_NAME = "build.json"
# Parameters that change shard contents; a rerun with different values needs a fresh out dir.
CONTENT_PARAMS = (
    "annotations",
    "images",
    "shard_size",
    "num_negatives",
    "max_boxes",
    "max_side",
    "quality",
    "strip_prefix",
    "short_prefix",
    "box_tolerance",
)

# An item handed to a worker: (source 'file:line', record JSON text or None, reason to reject
# it or None).
Item = tuple[str, str | None, str | None]


def _items(files: list[str], strip_prefix: str) -> Iterator[Item]:
    """Every input record in order, as JSON text, or with the reason it is rejected already.

    Runs in the main process: it sees all records, so it rejects later duplicates of an f_path.
    Records travel to workers as JSON text (cheap to send, no deep-structure pickling).
    """
    seen: set[str] = set()
    for path in files:
        for source, rec in iter_records(path):
            if isinstance(rec, BadRecord):
                yield source, None, str(rec)
                continue
            try:
                # Key order is kept (no sort_keys): short_expr_negs' dict order is record order,
                # and sorted keys would put "10" before "2".
                text = json.dumps(rec, ensure_ascii=False)
            except (RecursionError, ValueError) as e:
                yield source, None, f"invalid JSON: {type(e).__name__}"
                continue
            f_path = rec.get("f_path") if isinstance(rec, dict) else None
            if isinstance(f_path, str) and f_path:
                key = f_path.removeprefix(strip_prefix)
                if key in seen:
                    yield source, text, f"duplicate f_path: {key!r} appeared in an earlier record"
                    continue
                seen.add(key)
            yield source, text, None


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def chunk_hash(chunk: list[Item], params: dict) -> str:
    h = hashlib.sha256(json.dumps({k: params[k] for k in CONTENT_PARAMS}).encode())
    for source, text, reason in chunk:
        for part in (source, text or "", reason or ""):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _key_of(text: str | None, strip_prefix: str) -> str | None:
    try:
        rec = json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None
    f_path = rec.get("f_path") if isinstance(rec, dict) else None
    return f_path.removeprefix(strip_prefix) if isinstance(f_path, str) and f_path else None


def _build_one(task: tuple[int, list[Item], dict, str]) -> dict:
    """Worker: one chunk of records -> one shard; returns its completion marker."""
    index, items, p, digest = task
    samples, problems = [], []
    for source, text, reason in items:
        key = _key_of(text, p["strip_prefix"]) or source  # named even if rejected
        try:
            if reason is not None:
                raise BadRecord(reason)
            sample, f_path, box_problems = parse_record(
                parse_json(text),
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
        Path(p["out"]) / shard_name(index),
        samples,
        p["num_negatives"],
        p["short_prefix"],
        marker,
    )


def _count_records(files: list[str]) -> int | None:
    """Record count for the progress bar (JSONL only: counting is a cheap newline scan)."""
    if not all(f.endswith(".jsonl") for f in files):
        return None
    total = 0
    for path in files:
        with open(path, "rb") as fh:
            for line in fh:
                total += bool(line.strip())
    return total


def _check_params(out: Path, params: dict) -> None:
    """Refuses a rerun with other content parameters; rewrites a missing or corrupt build.json.

    A corrupt build.json (an interrupted write by an older version) is safe to replace: every
    shard marker's hash covers the content parameters, so no shard built with other parameters
    is reused.
    """
    path = out / BUILD_NAME
    old = None
    if path.is_file():
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            print(
                f"[build_shards] {path} is corrupt ({type(e).__name__}: {e}); rewriting it. "
                "Shards are reused only where their content hash matches.",
                file=sys.stderr,
            )
            old = None
    if old is not None:
        changed = {k: (old.get(k), params[k]) for k in CONTENT_PARAMS if old.get(k) != params[k]}
        if changed:
            raise SystemExit(
                f"{out} was built with other parameters {changed} (old, new); "
                "use a fresh --out or the old parameters"
            )
    else:
        atomic_write_json(path, params)


def _summarise(markers: list[dict], total_records: int, dt: float) -> dict:
    problems = [pr for m in markers for pr in m["problems"]]
    skipped = [pr for pr in problems if pr["kind"] != "box"]
    box_notes = [pr for pr in problems if pr["kind"] == "box"]
    # Reason category = text before the first ':', box indices folded: "bbox_info[].bbox ...".
    reasons = collections.Counter(
        re.sub(r"\[\d+\]", "[]", pr["reason"].split(":")[0]) for pr in problems
    )
    return {
        "records": total_records,
        "samples": sum(m["num_samples"] for m in markers),
        "boxes": sum(m["num_boxes"] for m in markers),
        "skipped_records": len(skipped),
        "box_problems": len(box_notes),
        "reasons": dict(reasons.most_common()),
        "seconds": round(dt, 2),
        "problems": problems,
    }


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
) -> dict:
    """Builds (or finishes) the shard set in `out`; returns the report (also in report.json).

    `index_meta` is merged into index.json (e.g. the generation parameters of synthetic data).
    """
    from tqdm import tqdm

    if shard_size < 1 or workers < 1:
        raise ValueError(f"shard_size={shard_size}, workers={workers}: need >= 1")
    params = {
        k: v for k, v in locals().items() if k not in ("workers", "progress", "index_meta", "tqdm")
    }
    params["annotations"] = os.path.abspath(annotations)
    params["images"] = os.path.abspath(images)
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder {images} does not exist")
    files = input_files(annotations)
    if not files:
        raise FileNotFoundError(f"no .json/.jsonl annotation files in {annotations}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_params(out_dir, params)
    t0 = time.time()
    bar = tqdm(total=_count_records(files), unit="rec", desc="shards", disable=not progress)
    markers: dict[int, dict] = {}
    reused = 0

    def tasks() -> Iterator[tuple[int, list[Item], dict, str]]:
        nonlocal reused
        for i, chunk in enumerate(_chunks(_items(files, strip_prefix), shard_size)):
            digest = chunk_hash(chunk, params)
            done = read_marker(out_dir / shard_name(i))
            if done and done.get("input_hash") == digest:
                markers[i] = done
                reused += 1
                bar.update(len(chunk))
                continue
            yield i, chunk, {**params, "out": str(out_dir)}, digest

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    pending: collections.deque = collections.deque()

    def finish_oldest() -> None:
        i, n, result = pending.popleft()
        markers[i] = result.get() if pool else result
        bar.update(n)
        bar.set_postfix(
            shards=len(markers), problems=sum(len(m["problems"]) for m in markers.values())
        )

    try:
        for task in tasks():
            result = pool.apply_async(_build_one, (task,)) if pool else _build_one(task)
            pending.append((task[0], len(task[1]), result))
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
    ordered = [markers[i] for i in sorted(markers)]
    shards = [
        {"path": shard_name(i), "num_samples": m["num_samples"], "num_boxes": m["num_boxes"]}
        for i, m in sorted(markers.items())
    ]
    total_records = sum(m["records"] for m in ordered)
    report = _summarise(ordered, total_records, time.time() - t0)
    report["reused_shards"] = reused
    atomic_write_json(out_dir / "report.json", report)
    meta = {"num_negatives": num_negatives, "short_prefix": short_prefix, **(index_meta or {})}
    write_index(out_dir, shards, meta)
    rate = total_records / max(report["seconds"], 1e-9)
    if progress:
        print(
            f"[build_shards] {report['samples']}/{total_records} records -> {len(shards)} shards "
            f"({reused} reused) in {report['seconds']} s ({rate:.0f} rec/s); "
            f"{report['skipped_records']} skipped, {report['box_problems']} box problems "
            f"-> {out_dir / 'report.json'}"
        )
    return report
