"""FG-OVD's own benchmark JSON read by fgclip_mega's reader vs FG-CLIP's JSONL of the same level.

    python run/check_fgovd_format.py FG-OVD/benchmarks/3_attributes.json \
        FG-CLIP/data/fgovd/e_attributes_llava.jsonl

Prints one JSON line: items on each side, how many are identical (image path, box, positive and
negatives in order, captions with the "." FG-CLIP appends), skips, and the first difference.
Both files go through fgovd.read_items, so this checks the JSON reader against upstream's own
conversion, item by item.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("original", type=Path, help="FG-OVD benchmarks/<level>.json")
    p.add_argument("jsonl", type=Path, help="FG-CLIP data/fgovd/<level>_llava.jsonl")
    args = p.parse_args()
    from fgclip_mega.eval.benchmarks.common import Skips
    from fgclip_mega.eval.benchmarks.fgovd import read_items

    skips = {"original": Skips(), "jsonl": Skips()}
    kind_a, a = read_items(args.original, skips["original"])
    kind_b, b = read_items(args.jsonl, skips["jsonl"])
    same = 0
    first = None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        key = ("img", "box", "texts")
        if all(x[k] == y[k] for k in key):
            same += 1
        elif first is None:
            first = {
                "index": i,
                **{n: {k: it[k] for k in key} for n, it in (("original", x), ("jsonl", y))},
            }
    verbatim = [t for it in a for t in it["texts"]]
    print(
        json.dumps(
            {
                "formats": [kind_a, kind_b],
                "items": [len(a), len(b)],
                "identical": same,
                "captions": len(verbatim),
                "skipped": {k: v.as_dict() for k, v in skips.items()},
                "first_difference": first,
            }
        )
    )


if __name__ == "__main__":
    main()
