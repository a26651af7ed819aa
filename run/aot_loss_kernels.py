"""Registers, spills and shared memory of every Triton loss-kernel binary, compiled for sm_90.

Compiles ahead of time (no GPU needed: kernels.contrastive.aot) each kernel x flag combination x
autotune tile, for the given dtypes and feature widths, at the aligned training specialisation
(every int and pointer 16-divisible), and prints one JSON line per binary, then one summary line
per (dtype, tile list): binaries, how many spill, the most registers and shared memory.

    python run/aot_loss_kernels.py                         # the launcher's GPU tiles, bf16 + fp32
    python run/aot_loss_kernels.py --tiles all --dtypes bf16   # the old 4-tile list too

The binary depends on D only through BLOCK_K (bf16: 64, fp32: 32 for every D >= 64), so D = 512
and 768 compile to the same code; both are listed when asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# The four tiles the launcher tuned over before the bf16 loss inputs (kept for the comparison).
OLD_TILES = ((64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--dims", nargs="+", type=int, default=[768])
    p.add_argument("--kernels", nargs="+", default=["fwd", "grad"], choices=["fwd", "grad"])
    p.add_argument("--tiles", choices=["gpu", "old", "all"], default="gpu")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args()

    import torch

    from kernels.contrastive import aot, launcher

    # {list name: {kernel: tiles}}
    tile_lists = {"gpu": launcher.GPU_TILES, "old": {"fwd": OLD_TILES, "grad": OLD_TILES}}
    if args.tiles != "all":
        tile_lists = {args.tiles: tile_lists[args.tiles]}
    total = (
        sum(
            len(tiles[k]) * len(aot.flag_sets(k))
            for tiles in tile_lists.values()
            for k in args.kernels
        )
        * len(args.dtypes)
        * len(args.dims)
    )
    done, t0 = 0, time.perf_counter()
    for list_name, tiles in tile_lists.items():
        for dname in args.dtypes:
            dtype = getattr(torch, DTYPES[dname])
            rows = []
            for D in args.dims:
                for kernel in args.kernels:
                    for flags in aot.flag_sets(kernel):
                        for tile in tiles[kernel]:
                            r = aot.compile_tile(kernel, dtype, D, tile, flags, args.arch)
                            rows.append(r)
                            done += 1
                            rate = done / (time.perf_counter() - t0)
                            line = {"tiles": list_name, **r.as_json()}
                            line["progress"] = f"{done}/{total}, ETA {(total - done) / rate:.0f} s"
                            print(json.dumps(line), flush=True)
            print(
                json.dumps(
                    {
                        "summary": True,
                        "tiles": list_name,
                        "tile_list": {k: [list(t) for t in v] for k, v in tiles.items()},
                        "dtype": dname,
                        "dims": args.dims,
                        "arch": f"sm_{args.arch}",
                        "binaries": len(rows),
                        "spilling": len([r for r in rows if r.n_spills]),
                        "spilling_tiles": sorted({r.tile for r in rows if r.n_spills}),
                        "max_regs": max(r.n_regs for r in rows),
                        "max_shared": max(r.shared for r in rows),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
