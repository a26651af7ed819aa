"""Small synthetic FineHARD datasets on disk, shared by the data tests (not a test module)."""

from __future__ import annotations

import json
from pathlib import Path

from fgclip_mega.data.synthetic import make_scene


def write_raw(root: Path, n: int, seed: int = 0, width: int = 160, height: int = 120) -> Path:
    """n synthetic records as root/train.jsonl + root/images/train/*.jpg; returns the jsonl."""
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    jsonl = root / "train.jsonl"
    with open(jsonl, "w", encoding="utf-8") as fh:
        for i in range(n):
            f_path, jpeg, rec = make_scene(seed, "train", i, width, height)
            (root / "images" / f_path).write_bytes(jpeg)
            fh.write(json.dumps(rec) + "\n")
    return jsonl


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
