"""Small synthetic FineHARD datasets on disk, shared by the data tests (not a test module)."""

from __future__ import annotations

import json
from pathlib import Path

from fgclip_mega.data.synthetic import write_raw_split


def write_raw(root: Path, n: int, seed: int = 0, width: int = 160, height: int = 120) -> Path:
    """n synthetic records as root/train.jsonl + root/images/train/*.jpg; returns the jsonl."""
    return write_raw_split(root, "train", n, seed=seed, width=width, height=height)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
