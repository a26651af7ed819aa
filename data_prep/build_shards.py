"""FineHARD JSON(L) + image folder -> zarr v3 shards: the command line of the library's builder.

    python -m data_prep.build_shards --annotations ann/ --images img/ --out shards/ \
        --shard-size 4096 --workers 8 [--max-side 1024] [--max-boxes 4]

Resumable and validating; bad records are skipped and listed in OUT/report.json. What is checked
and how a rerun reuses finished shards: see `fgclip_mega.data.build`.
"""

from __future__ import annotations

import argparse
import os
import sys

from fgclip_mega.data.shards import SHORT_PREFIX, build_shards


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return build_shards(**vars(args))
    except (FileNotFoundError, ValueError) as e:  # bad arguments: one clear line, no traceback
        raise SystemExit(f"build_shards: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
