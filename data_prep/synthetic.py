"""Writes the synthetic fine-grained set as FineHARD JSONL + an image folder.

    python -m data_prep.synthetic --out data/synth --num-train 10000 --num-val 500 --num-test 500

Output: OUT/{train,val,test}.jsonl and OUT/images/{split}/NNNNNNNN.jpg, each record's f_path
relative to OUT/images. Deterministic from --seed (any --workers gives the same bytes); textures
and objects are sized for training at --train-size (see fgclip_mega.data.synthetic). Build shards
with `python -m data_prep.build_shards --annotations OUT/train.jsonl --images OUT/images`.

FG-CLIP 2 (NaFlex) data: scenes of mixed sizes and aspect ratios, and a SigLIP-2-style
tokenizer.json for their vocabulary written to OUT/tokenizer.json:

    python -m data_prep.synthetic --out data/synth2 --sizes mixed --tokenizer

`--sizes mixed` spans the CPU patch budgets 128/256 at patch 8 (fgclip2_tiny), `mixed-gpu` the
budgets 256..1024 at patch 16 (see fgclip_mega.data.synthetic.MixedSizes); --width, --height
and --train-size are then unused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from fgclip_mega.data.shards import write_raw_split

SPLITS = ("train", "val", "test")


def generate(args: argparse.Namespace) -> dict[str, int]:
    counts = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    sizes = None
    if args.sizes != "fixed":
        from fgclip_mega.data.shards import MixedSizes

        sizes = MixedSizes() if args.sizes == "mixed" else MixedSizes.gpu()
    t0 = time.time()
    for split in SPLITS:
        write_raw_split(
            args.out, split, counts[split], seed=args.seed, width=args.width,
            height=args.height, max_objects=args.max_objects, num_negatives=args.num_negatives,
            train_size=args.train_size, workers=args.workers, progress=args.progress,
            sizes=sizes,
        )  # fmt: skip
    if args.tokenizer:
        from fgclip_mega.data.shards import write_tokenizer

        print(f"[synthetic] tokenizer -> {write_tokenizer(args.out)}")
    dt = time.time() - t0
    total = sum(counts.values())
    print(
        f"[synthetic] {total} images in {dt:.1f} s "
        f"({total / max(dt, 1e-9):.0f} img/s) -> {args.out}"
    )
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
    p.add_argument("--train-size", type=int, default=224, help="model input size (textures)")
    p.add_argument("--max-objects", type=int, default=5)
    p.add_argument("--num-negatives", type=int, default=10)
    p.add_argument(
        "--sizes",
        choices=("fixed", "mixed", "mixed-gpu"),
        default="fixed",
        help="fixed: every image --width x --height; mixed: per-scene sizes and aspect ratios "
        "for NaFlex at patch 8, budgets <= 256; mixed-gpu: patch 16, budgets <= 1024",
    )
    p.add_argument(
        "--tokenizer",
        action="store_true",
        help="also write OUT/tokenizer.json: a SigLIP-2-style BPE of the synthetic vocabulary",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


if __name__ == "__main__":
    generate(parse_args(sys.argv[1:]))
