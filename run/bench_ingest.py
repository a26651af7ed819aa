"""Ingest throughput of build_shards on real photographs: records/s per core, time by stage.

    .venv/bin/python run/bench_ingest.py [--num-images 2000] [--workers 1 2] [--out FILE]

Input: FineHARD-style records (4 boxes, 3 of them with 10 hard negatives, a ~150-word caption)
over distinct JPEGs cut from scikit-image's photographs (data_prep/photos.py), longer side
320-1400 px, stored with --max-side 512 (stage 2 trains at <= 336 px), so most images take the
bounded-resize path. Times are CPU seconds (process + children): the cost per core, whatever
else runs on the machine. Prints JSON lines (and appends them to --out):

  ingest_env     the machine and the settings;
  ingest_decode  oversized images: the resize path as it was (full-size decode, upright and RGB
                 copies, resize, encode; reproduced here) vs load_image now, ms per image, ratio;
  ingest_stages  one process over all records, the library's own steps timed one by one:
                 scan (the main process: read + parse the annotations, the duplicate check,
                 re-serialise for the workers; every part of a partitioned build does it for
                 all records), validate (parse_record: boxes, texts), read, decode (full decode,
                 the bad-image check), resize, encode (re-encode), tokenise (the tokenizer calls
                 write_shard makes), write (write_shard without its tokenising: zarr, marker);
                 ms per record and share of the total;
  ingest_build   build_shards end to end with W workers: records/s (wall), records per CPU
                 second (= per core when the cores are not shared).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "a the red green small large wooden metal old bright dark soft round square striped shiny "
    "table window person cat sky street building tree road light shadow corner wall floor "
    "near behind beside under above holding standing sitting looking with and of on in"
).split()


def _caption(rng, n_words: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + "."


def make_input(root: Path, n: int, seed: int, sides: tuple[int, int]) -> tuple[Path, Path]:
    """root/ann.jsonl + root/images/*.jpg: n FineHARD-style records on distinct photographs."""
    import numpy as np

    from data_prep.photos import jpeg, photo_crops

    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    t0 = time.time()
    for i, arr in enumerate(photo_crops(n, seed=seed, sides=sides)):
        name = f"{i // 1000:03d}/{i:07d}.jpg"
        (images / name).parent.mkdir(exist_ok=True)
        (images / name).write_bytes(jpeg(arr))
        boxes = []
        for j in range(4):
            x1, y1 = rng.uniform(0, 0.6, 2)
            box = {
                "bbox": [float(x1), float(y1), float(x1 + 0.3), float(y1 + 0.3), 0.9],
                "short_expr": _caption(rng, 3),
                "long_expr": _caption(rng, 14),
                "flag_short_neg": int(j < 3),
            }
            if j < 3:
                box["short_expr_negs"] = {str(k): _caption(rng, 3) for k in range(10)}
            boxes.append(box)
        rec = {"f_path": name, "caption": _caption(rng, 150), "short_caption": _caption(rng, 12),
               "bbox_info": boxes}  # fmt: skip
        lines.append(json.dumps(rec))
        if (i + 1) % 500 == 0:
            rate = (i + 1) / (time.time() - t0)
            eta = (n - i - 1) / rate
            msg = f"[bench_ingest] input {i + 1}/{n} ({rate:.0f}/s, ETA {eta:.0f} s)"
            print(msg, file=sys.stderr)
    ann = root / "ann.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    return ann, images


def _write_shard_texts(samples, short_prefix: str) -> None:
    """The tokenizer calls write_shard makes for these samples (shards.write_shard)."""
    from fgclip_mega.data import tokenizer

    tokenizer.tokenize([s.caption for s in samples], 248)
    tokenizer.tokenize([short_prefix + s.short_caption for s in samples], 77)
    tokenizer.tokenize([t for s in samples for t in s.short_exprs], 77)
    tokenizer.tokenize([t for s in samples for t in s.long_exprs], 77)
    negs = [t for s in samples for n in s.negs for t in n]
    if negs:
        tokenizer.tokenize(negs, 77)


def stages(ann: Path, images: Path, out: Path, shard_size: int, max_side: int) -> dict:
    from fgclip_mega.data.build import _items
    from fgclip_mega.data.ingest import load_image, parse_json, parse_record, resolve_image
    from fgclip_mega.data.shards import SHORT_PREFIX, write_shard

    t = collections.defaultdict(float)
    t0 = time.process_time()
    items = [item for _, item in _items([str(ann)], "", 1, range(1))]
    t["scan"] = time.process_time() - t0
    resized = 0
    for start in range(0, len(items), shard_size):
        samples = []
        for source, text, _ in items[start : start + shard_size]:
            t0 = time.process_time()
            sample, f_path, _ = parse_record(parse_json(text), 10, None, "", source)
            t1 = time.process_time()
            t["validate"] += t1 - t0
            path = resolve_image(str(images), f_path)
            t["read"] += time.process_time() - t1
            before = t.get("resize", 0.0)
            sample.image, sample.width, sample.height = load_image(path, max_side, timings=t)
            resized += t.get("resize", 0.0) != before
            samples.append(sample)
        t0 = time.process_time()
        _write_shard_texts(samples, SHORT_PREFIX)
        t1 = time.process_time()
        write_shard(out / f"s{start}.zarr", samples, 10, SHORT_PREFIX, {})
        t["tokenise"] += t1 - t0
        t["write"] += time.process_time() - t1 - (t1 - t0)  # write_shard tokenises the same texts
    n = len(items)
    total = sum(t.values())
    return {
        "bench": "ingest_stages",
        "records": n,
        "resized_fraction": round(resized / n, 3),
        "ms_per_record": {k: round(1e3 * v / n, 3) for k, v in t.items()},
        "share": {k: round(v / total, 3) for k, v in t.items()},
        "total_ms_per_record": round(1e3 * total / n, 3),
        "records_per_s_one_core": round(n / total, 1),
    }


def build(ann: Path, images: Path, out: Path, workers: int, shard_size: int, max_side: int):
    import resource

    from fgclip_mega.data.build import build_shards

    def cpu() -> float:
        own, kids = (
            resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    report = build_shards(str(ann), str(images), str(out), shard_size=shard_size,
                          workers=workers, max_side=max_side, progress=False)  # fmt: skip
    dt, cpu_s = time.perf_counter() - t0, cpu() - c0
    assert report["skipped_records"] == 0, report["reasons"]
    return {
        "bench": "ingest_build",
        "workers": workers,
        "records": report["records"],
        "seconds": round(dt, 2),
        "records_per_s": round(report["records"] / dt, 1),
        "records_per_s_per_core": round(report["records"] / dt / workers, 1),
        "cpu_seconds": round(cpu_s, 2),
        "records_per_cpu_s": round(report["records"] / cpu_s, 1),
    }


def decode_paths(images: Path, max_side: int, limit: int = 300) -> dict:
    """Oversized images: full decode + resize (baseline) vs draft decode + resize (load_image)."""
    import io

    from PIL import Image, ImageOps

    from fgclip_mega.data.ingest import load_image

    paths = []
    for p in sorted(images.rglob("*.jpg")):
        with Image.open(p) as img:
            if max(img.size) > max_side:
                paths.append(p)
        if len(paths) == limit:
            break

    def full(path: Path) -> None:  # load_image's resize path before this change, to compare
        img = Image.open(io.BytesIO(path.read_bytes()))
        img.load()
        img = ImageOps.exif_transpose(img).convert("RGB")
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img.resize(size, Image.BICUBIC).save(io.BytesIO(), "JPEG", quality=90)

    times = {}
    for name, fn in (("full", full), ("load_image", lambda p: load_image(str(p), max_side))):
        t0 = time.process_time()
        for p in paths:
            fn(p)
        times[name] = (time.process_time() - t0) / max(1, len(paths))
    return {
        "bench": "ingest_decode",
        "images": len(paths),
        "ms_full_decode_resize_encode": round(1e3 * times["full"], 2),
        "ms_load_image": round(1e3 * times["load_image"], 2),
        "speedup": round(times["full"] / times["load_image"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--sides", type=int, nargs=2, default=[320, 1400])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    args = p.parse_args(argv)

    def emit(obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    emit({"bench": "ingest_env", "cpus": os.cpu_count(), "python": platform.python_version(),
          "num_images": args.num_images, "max_side": args.max_side, "sides": args.sides,
          "shard_size": args.shard_size, "time": now})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        root = Path(tmp)
        ann, images = make_input(root, args.num_images, args.seed, tuple(args.sides))
        emit(decode_paths(images, args.max_side))
        (root / "stages").mkdir()
        emit(stages(ann, images, root / "stages", args.shard_size, args.max_side))
        for w in args.workers:
            emit(build(ann, images, root / f"build{w}", w, args.shard_size, args.max_side))


if __name__ == "__main__":
    main()
