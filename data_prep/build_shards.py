"""FineHARD JSON(L) + image folder -> zarr v3 shards: the command line of the library's builder.

One machine:

    python -m data_prep.build_shards --annotations ann/ --images img/ --out shards/ \
        --shard-size 4096 --workers 8 [--max-side 1024] [--max-boxes 4]

Many machines (or processes): choose --buckets once for the data set (at least the most parts
you will ever run, e.g. 256; it fixes the layout), run part I of N anywhere, then merge:

    python -m data_prep.build_shards ... --buckets 256 --part I --num-parts N   # each I
    python -m data_prep.build_shards merge --out shards/ [--num-parts N] [OTHER_OUT ...]

Parts may share one --out (a shared filesystem) or each write its own; the merge copies the
shards of OTHER_OUT directories into --out. The merged directory holds the same bytes as one
process building with the same --buckets (`--num-parts 1`, the default), whatever N. A part
killed midway is rerun with the same command (it reuses its finished shards); the merge refuses
missing or overlapping parts. `--parts-local K` runs K parts as processes here, then merges.
Slurm: run/slurm/build_shards.sbatch. Resumable and validating; bad records are skipped and
listed in OUT/report.json. What is checked and how a rerun reuses finished shards: see
`fgclip_mega.data.build`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from fgclip_mega.data.shards import SHORT_PREFIX, build_shards, merge_parts


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
    p.add_argument(
        "--buckets", type=int, default=1, help="hash buckets of record keys (layout; >= parts)"
    )
    p.add_argument("--part", type=int, default=0, help="which part to build (0-based)")
    p.add_argument("--num-parts", type=int, default=1, help="parts in all; 1 builds and merges")
    p.add_argument(
        "--parts-local", type=int, default=0, help="run K parts as processes here, then merge"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def parse_merge_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="build_shards merge", description="merge the parts of a partitioned build"
    )
    p.add_argument("--out", required=True, help="build directory to write index.json into")
    p.add_argument("sources", nargs="*", help="other part directories to copy shards from")
    p.add_argument("--num-parts", type=int, default=None, help="names the parts to rerun")
    return p.parse_args(argv)


def _run_local_parts(args: argparse.Namespace, argv: list[str]) -> dict:
    """K parts as child processes of this one (workers split among them), then the merge."""
    k = args.parts_local
    base = [a for a in argv if not a.startswith("--parts-local")]
    if "--parts-local" in argv:  # '--parts-local K' as two words
        i = argv.index("--parts-local")
        base = argv[:i] + argv[i + 2 :]
    workers = max(1, args.workers // k)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "data_prep.build_shards", *base]
            + ["--part", str(i), "--num-parts", str(k), "--workers", str(workers)]
        )
        for i in range(k)
    ]
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise SystemExit(f"build_shards: parts {failed} of {k} failed; rerun the same command")
    return _merged(merge_parts(args.out, num_parts=k), args.out)


def _merged(report: dict, out: str) -> dict:
    print(
        f"[build_shards] merged: {report['samples']}/{report['records']} records, "
        f"{report['skipped_records']} skipped -> {os.path.join(out, 'index.json')}"
    )
    return report


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["merge"]:
            m = parse_merge_args(argv[1:])
            return _merged(merge_parts(m.out, m.sources, num_parts=m.num_parts), m.out)
        args = parse_args(argv)
        if args.parts_local:
            if args.num_parts != 1 or args.part:
                raise ValueError("--parts-local runs all parts: leave --part/--num-parts out")
            return _run_local_parts(args, argv)
        kw = {k: v for k, v in vars(args).items() if k != "parts_local"}
        return build_shards(**kw)
    except (FileNotFoundError, ValueError) as e:  # bad arguments: one clear line, no traceback
        raise SystemExit(f"build_shards: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
