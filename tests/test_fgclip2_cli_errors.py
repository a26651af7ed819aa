"""FG-CLIP 2 bad input at the training CLI (issue 23): a tokenizer path missing, empty, a bare
SentencePiece model or not a tokenizer, a patch budget outside the allowed set, an image smaller
than one patch in the shards. Each is one `error:` line, exit code 2, no traceback, nothing
trained; the six processes run at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.builders import run_at_once


def _cli(out: Path, data: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "fgclip_mega.train", "--preset", "fgclip2_tiny",
            "data.micro_batch_size=4", "data.synthetic_num_samples=16",
            f"data.synthetic_dir={data}", f"train.output_dir={out}", "train.steps=2",
            "train.eval_batches=0", *overrides]  # fmt: skip


def _tiny_image_shards(root: Path) -> tuple[Path, str]:
    """A shard set (the project's shard writer) whose second image is 5 x 40 px: smaller than one
    8-px patch of fgclip2_tiny."""
    import io

    from PIL import Image

    from fgclip_mega.data.ingest import Sample
    from fgclip_mega.data.shards import write_index, write_shard

    def sample(i, width, height):
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "JPEG")
        s = Sample(key=f"tiny{i:02d}.jpg", caption=f"a red square {i}", short_caption="red",
                   image=buf.getvalue(), width=width, height=height)  # fmt: skip
        s.short_exprs, s.long_exprs, s.neg_flags = ["red square"], ["a red square"], [1]
        s.negs = [[f"blue square {m}" for m in range(10)]]
        s.boxes = np.array([[0.1, 0.1, 0.9, 0.9]], np.float32)
        return s

    root.mkdir(parents=True)
    samples = [sample(i, 64, 48) for i in range(7)]
    samples.insert(1, sample(7, 5, 40))
    write_shard(root / "shard-000000.zarr", samples, 10)
    write_index(root, [{"path": "shard-000000.zarr", "num_samples": len(samples)}], {})
    return root, "tiny07.jpg"


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    """(exit code, stdout, stderr, output dir) of `python -m fgclip_mega.train --preset
    fgclip2_tiny` per bad input, all started at once."""
    from fgclip_mega.data.synthetic_tokenizer import write_tokenizer

    tmp = tmp_path_factory.mktemp("fgclip2_cli")
    (tmp / "no_tokenizer_here").mkdir()
    (tmp / "sp").mkdir()
    (tmp / "sp" / "tokenizer.model").write_bytes(b"\x0a\x05not a sentencepiece model")
    (tmp / "other.json").write_text('{"not": "a tokenizer"}')
    write_tokenizer(tmp / "tok")
    shards, key = _tiny_image_shards(tmp / "tiny_shards")
    cases = {
        "missing": ([f"data.tokenizer={tmp / 'nope' / 'tokenizer.json'}"],
                    ["data.tokenizer", str(tmp / "nope")]),
        "empty_dir": ([f"data.tokenizer={tmp / 'no_tokenizer_here'}"],
                      ["no tokenizer.json", str(tmp / "no_tokenizer_here")]),
        "sentencepiece": ([f"data.tokenizer={tmp / 'sp' / 'tokenizer.model'}"],
                          ["tokenizer.model", "SentencePiece"]),
        "not_a_tokenizer": ([f"data.tokenizer={tmp / 'other.json'}"],
                            ["other.json", "not a HF tokenizer.json"]),
        "budget": (["data.max_patch_budget=300"], ["data.max_patch_budget", "300"]),
        "tiny_image": ([f"data.shards={shards}", f"data.tokenizer={tmp / 'tok'}"],
                       [key, "smaller than one 8x8 patch", "row 1"]),
    }  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {name: _cli(tmp / name, tmp / "data", *args) for name, (args, _) in cases.items()}
    return {
        name: (*result, tmp / name, cases[name][1])
        for name, result in run_at_once(commands, env, timeout=300).items()
    }


@pytest.mark.slow  # ~60 s for the six processes (the tiny-image one builds and starts training)
@pytest.mark.parametrize(
    "case", ["missing", "empty_dir", "sentencepiece", "not_a_tokenizer", "budget", "tiny_image"]
)
def test_bad_input_fails_in_one_error_line(bad_input, case):
    rc, stdout, stderr, out, needles = bad_input[case]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert rc == 2, (case, stderr[-3000:])
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], stderr[-3000:]  # one error line, the last one
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert stdout == ""
    if case != "tiny_image":  # caught before anything is built or written
        assert not out.exists(), stderr[-3000:]
