"""FineHARD JSON(L) + image folder -> zarr v3 shards, multiprocess, resumable, validated.

    python -m data_prep.build_shards --annotations ann/ --images img/ --out shards/ \
        --shard-size 4096 --workers 8 [--max-side 1024] [--max-boxes 4]

Input records are taken in order (files sorted) and cut into chunks of --shard-size records;
chunk i becomes shard i. A shard is finished once its completion marker exists: a rerun skips
finished shards and rebuilds partial ones, and gives the same shards as an uninterrupted run.
Invalid input never stops the build: a malformed record, a missing/undecodable image (full PIL
decode) is skipped; a bad box (NaN, x2 < x1, outside [0, 1] beyond the tolerance) is dropped
from its record. Each culprit is listed in OUT/report.json with its key, source line and reason.
OUT/index.json (sample counts per shard) is written last, atomically.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from fgclip_mega.data.ingest import (
    BOX_TOLERANCE,
    BadImage,
    BadRecord,
    Problem,
    input_files,
    iter_records,
    load_image,
    parse_record,
)
from fgclip_mega.data.shards import (
    SHORT_PREFIX,
    read_marker,
    shard_name,
    write_index,
    write_shard,
)

# Parameters that change shard contents; a rerun with different values needs a fresh --out.
_CONTENT_PARAMS = (
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


def _raw_items(files: list[str]) -> Iterator[tuple[str, object]]:
    """(source, raw JSONL line or parsed .json record) in input order; JSON is parsed later."""
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        yield f"{path}:{n}", line
        else:
            try:
                yield from iter_records(path)
            except BadRecord as e:  # the whole file is unreadable: one culprit
                yield path, e


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _build_one(task: tuple[int, list, dict]) -> dict:
    """Worker: one chunk of records -> one shard; returns its completion marker."""
    index, items, p = task
    samples, problems = [], []
    for source, raw in items:
        key = source
        try:
            rec = raw
            if isinstance(raw, BadRecord):
                raise raw
            if isinstance(raw, str):
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise BadRecord(f"invalid JSON: {e}") from None
            if isinstance(rec, dict) and isinstance(rec.get("f_path"), str) and rec["f_path"]:
                key = rec["f_path"].removeprefix(p["strip_prefix"])  # named even if rejected
            sample, f_path, box_problems = parse_record(
                rec,
                p["num_negatives"],
                p["max_boxes"],
                p["strip_prefix"],
                source,
                p["box_tolerance"],
            )
            key = sample.key
            image_path = os.path.join(p["images"], f_path)
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
    path = out / "build.json"
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        changed = {k: (old.get(k), params[k]) for k in _CONTENT_PARAMS if old.get(k) != params[k]}
        if changed:
            raise SystemExit(
                f"{out} was built with other parameters {changed} (old, new); "
                "use a fresh --out or the old parameters"
            )
    else:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(params, fh, indent=1)


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
) -> dict:
    """Builds (or finishes) the shard set in `out`; returns the report (also in report.json)."""
    params = {k: v for k, v in locals().items() if k not in ("workers", "progress")}
    params["annotations"] = os.path.abspath(annotations)
    params["images"] = os.path.abspath(images)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_params(out_dir, params)
    files = input_files(annotations)
    if not files:
        raise SystemExit(f"no .json/.jsonl annotation files in {annotations}")
    t0 = time.time()
    bar = tqdm(total=_count_records(files), unit="rec", desc="shards", disable=not progress)
    markers: dict[int, dict] = {}
    reused = 0

    def tasks() -> Iterator[tuple[int, list, dict]]:
        nonlocal reused
        for i, chunk in enumerate(_chunks(_raw_items(files), shard_size)):
            done = read_marker(out_dir / shard_name(i))
            same = done and (done.get("first_source"), done.get("last_source")) == (
                chunk[0][0],
                chunk[-1][0],
            )
            if same and done["records"] == len(chunk):
                markers[i] = done
                reused += 1
                bar.update(len(chunk))
                continue
            yield i, chunk, {**params, "out": str(out_dir)}

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
    with open(out_dir / "report.json", "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    write_index(out_dir, shards, {"num_negatives": num_negatives, "short_prefix": short_prefix})
    rate = total_records / max(report["seconds"], 1e-9)
    print(
        f"[build_shards] {report['samples']}/{total_records} records -> {len(shards)} shards "
        f"({reused} reused) in {report['seconds']} s ({rate:.0f} rec/s); "
        f"{report['skipped_records']} skipped, {report['box_problems']} box problems "
        f"-> {out_dir / 'report.json'}"
    )
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--annotations", required=True, help=".json/.jsonl file, a dir of them, or .txt")
    p.add_argument("--images", required=True, help="root that records' f_path is relative to")
    p.add_argument("--out", required=True, help="output directory of shards + index.json")
    p.add_argument("--shard-size", type=int, default=4096, help="records per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--num-negatives", type=int, default=10)
    p.add_argument("--max-boxes", type=int, default=None, help="keep the first N valid boxes")
    p.add_argument("--max-side", type=int, default=None, help="re-encode larger images")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--strip-prefix", default="", help="removed from the start of f_path")
    p.add_argument("--short-prefix", default=SHORT_PREFIX, help="prepended to short captions")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args(sys.argv[1:])
    build_shards(**vars(a))
