"""Writes the synthetic fine-grained set as FineHARD JSONL + an image folder.

    python -m data_prep.synthetic --out data/synth --num-train 10000 --num-val 500 --num-test 500

Output: OUT/{train,val,test}.jsonl and OUT/images/{split}/NNNNNNNN.jpg, each record's f_path
relative to OUT/images. Deterministic from --seed (any --workers gives the same bytes); build
shards with `python -m data_prep.build_shards --annotations OUT/train.jsonl --images OUT/images`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from functools import partial

from tqdm import tqdm

from fgclip_mega.data.synthetic import SPLITS, make_scene


def _one(index: int, split: str, args: argparse.Namespace, image_dir: str) -> str:
    f_path, jpeg, record = make_scene(
        args.seed, split, index, args.width, args.height, args.max_objects, args.num_negatives
    )
    with open(os.path.join(image_dir, f_path), "wb") as fh:
        fh.write(jpeg)
    return json.dumps(record)


def generate(args: argparse.Namespace) -> dict[str, int]:
    image_dir = os.path.join(args.out, "images")
    counts = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    total = sum(counts.values())
    bar = tqdm(total=total, unit="img", desc="synthetic", disable=not args.progress)
    t0 = time.time()
    with mp.Pool(args.workers) as pool:
        for split in SPLITS:
            os.makedirs(os.path.join(image_dir, split), exist_ok=True)
            tmp = os.path.join(args.out, f"{split}.jsonl.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                work = partial(_one, split=split, args=args, image_dir=image_dir)
                for line in pool.imap(work, range(counts[split]), chunksize=16):
                    fh.write(line + "\n")
                    bar.update()
            # The JSONL appears only complete: a consumer never sees a half-written split.
            os.replace(tmp, os.path.join(args.out, f"{split}.jsonl"))
    bar.close()
    dt = time.time() - t0
    rate = total / max(dt, 1e-9)
    print(f"[synthetic] {total} images in {dt:.1f} s ({rate:.0f} img/s) -> {args.out}")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--max-objects", type=int, default=5)
    p.add_argument("--num-negatives", type=int, default=10)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


if __name__ == "__main__":
    generate(parse_args(sys.argv[1:]))
