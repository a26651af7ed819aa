"""FineHARD's published record format (upstream FG-CLIP's stage-2 loader) goes through
build_shards unchanged, then trains and evaluates (issue 24)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fgclip_mega.data import tokenizer
from fgclip_mega.data.build import build_shards
from fgclip_mega.data.shards import SHORT_PREFIX, ShardReader, open_shard_set
from tests.finehard_fixture import PREFIX, write_finehard

ROOT = Path(__file__).resolve().parents[1]
MAX_BOXES = 4  # upstream's max_anns (train_fgclip.py:184)


def _expected(rec: dict) -> dict:
    """What upstream's loader takes from a record, read from the raw JSON with upstream's rules."""
    boxes = rec["bbox_info"][:MAX_BOXES]
    return {
        "key": rec["f_path"].replace(PREFIX, ""),  # train_fgclip.py:206
        "caption": rec["caption"],
        "short_caption": rec["short_caption"],
        "boxes": [b["bbox"][:4] for b in boxes],  # :237, normalised xyxy
        "short_exprs": [b["short_expr"] for b in boxes],
        "long_exprs": [b["long_expr"] for b in boxes],
        "neg_flags": [b["flag_short_neg"] for b in boxes],
        # :271-275: negatives only when the flag is 1, in the dict's key order
        "negs": [
            [b["short_expr_negs"][k] for k in b["short_expr_negs"]] if b["flag_short_neg"] else []
            for b in boxes
        ],
    }


@pytest.fixture(scope="module")
def finehard(tmp_path_factory):
    root = tmp_path_factory.mktemp("finehard")
    ann, images, records = write_finehard(root, n=16)
    out = root / "shards"
    report = build_shards(
        str(ann), str(images), str(out), shard_size=8, max_boxes=MAX_BOXES, strip_prefix=PREFIX,
        progress=False,
    )  # fmt: skip
    return root, images, records, out, report


def test_every_field_and_convention_comes_through(finehard):
    root, images, records, out, report = finehard
    assert report["problems"] == [] and report["samples"] == len(records) == 16
    samples = [s for p in open_shard_set(out).paths for s in ShardReader(p).samples()]
    # Files in name order (.json before .jsonl, as listed), records in file order.
    assert [s.key for s in samples] == [r["f_path"].removeprefix(PREFIX) for r in records]
    assert any(len(r["bbox_info"]) > MAX_BOXES for r in records)  # the cut is exercised
    for rec, s in zip(records, samples, strict=True):
        want = _expected(rec)
        got = {k: getattr(s, k) for k in want}
        got["boxes"] = s.boxes.tolist()  # float32: compared within float32 rounding below
        got_boxes, want_boxes = np.array(got.pop("boxes")), np.array(want.pop("boxes"))
        np.testing.assert_allclose(got_boxes.reshape(-1, 4), want_boxes.reshape(-1, 4), atol=1e-7)
        assert got == want
        # The photograph's JPEG is stored as is (RGB JPEG, no EXIF rotation, no size limit).
        assert s.image == (images / s.key).read_bytes()
    reader = ShardReader(open_shard_set(out).paths[0])
    blk = reader.read_block(0, reader.num_samples)
    short = [SHORT_PREFIX + r["short_caption"] for r in records[: reader.num_samples]]
    assert SHORT_PREFIX == "a photo of "  # train_fgclip.py:203
    np.testing.assert_array_equal(blk.short_tokens, tokenizer.tokenize(short, 77))


@pytest.mark.slow
def test_build_train_eval(finehard):
    root, _, records, out, _ = finehard
    run = root / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    index = out / "index.json"
    train = [
        sys.executable, "-m", "fgclip_mega.train", "--preset", "tiny", "model.vision.layers=1",
        "model.text.layers=1", "data.micro_batch_size=4", f"data.shards={index}",
        f"data.max_boxes={MAX_BOXES}", "train.stage=regional", "train.steps=3",
        "train.log_interval=1", "train.eval_batches=0", f"train.output_dir={run}",
    ]  # fmt: skip
    res = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    final = json.loads(res.stdout.strip().splitlines()[-1])["final"]
    assert final["step"] == 3 and final["n_region"] > 0 and final["n_hard"] > 0
    assert all(math.isfinite(final[k]) for k in ("long", "short", "region", "hard", "loss"))

    evaluate = [
        sys.executable, "-m", "fgclip_mega.eval", "--checkpoint", str(run), "--data", str(index),
        "--micro-batch", "4", "--max-boxes", str(MAX_BOXES), "--out", str(root / "eval"),
    ]  # fmt: skip
    res = subprocess.run(evaluate, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(records)} held-out samples" in res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])["model0"]
    for key in ("hard_neg_acc", "hard_neg_no_info", "i2t_long_r1", "t2i_short_r1"):
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    # Every hard negative of the first MAX_BOXES boxes reached the evaluation: 10 pairs per box.
    result = json.loads((root / "eval" / "eval.json").read_text())["model0"]
    flagged = sum(b["flag_short_neg"] for r in records for b in r["bbox_info"][:MAX_BOXES])
    pairs = sum(v["pairs"] for v in result["hard_negative"]["pairwise_by_change"].values())
    assert pairs == 10 * flagged > 0
