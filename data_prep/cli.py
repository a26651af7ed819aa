"""fgclip-prep: the data preparation commands behind one entry point.

    fgclip-prep synthetic --out data/raw --num-train 10000    # python -m data_prep.synthetic
    fgclip-prep shards --annotations data/raw/train.jsonl \\
        --images data/raw/images --out data/shards            # python -m data_prep.build_shards
    fgclip-prep shards merge ...                              # merge parts built apart
"""

from __future__ import annotations

import sys

COMMANDS = {
    "synthetic": "synthetic FineHARD-style JSONL + images (data_prep.synthetic)",
    "shards": "FineHARD JSON(L) + images -> zarr shards (data_prep.build_shards)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<10} {what}" for name, what in COMMANDS.items())
        print(f"usage: fgclip-prep COMMAND [ARGS] (COMMAND --help for its options)\n{listing}")
        known = not argv or argv[0] in ("-h", "--help")
        if not known:
            print(f"fgclip-prep: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if known else 2
    command, rest = argv[0], argv[1:]
    sys.argv[0] = f"fgclip-prep {command}"  # the subcommand's usage lines name it
    if command == "synthetic":
        from data_prep.synthetic import generate, parse_args

        generate(parse_args(rest))
    else:
        from data_prep.build_shards import main as build_shards

        build_shards(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
