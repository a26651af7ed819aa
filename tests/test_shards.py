"""Shard format round trip, the validating builder, its report and its resume."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fgclip_mega.data import tokenizer
from fgclip_mega.data.build import build_shards
from fgclip_mega.data.ingest import BadRecord, load_image, parse_record
from fgclip_mega.data.shards import (
    SHORT_PREFIX,
    ShardReader,
    marker_path,
    open_shard_set,
    read_marker,
    write_shard,
)
from tests.builders import read_jsonl, write_raw


def _expected(rec: dict, k: int = 10) -> dict:
    """What a valid record must come back as, computed from the raw JSON (not the ingest code)."""
    boxes = rec.get("bbox_info") or []
    return {
        "key": rec["f_path"],
        "caption": rec["caption"],
        "short_caption": rec["short_caption"],
        "boxes": np.array([b["bbox"][:4] for b in boxes], np.float32).reshape(-1, 4),
        "short_exprs": [b["short_expr"] for b in boxes],
        "long_exprs": [b["long_expr"] for b in boxes],
        "neg_flags": [b["flag_short_neg"] for b in boxes],
        "negs": [
            list(b["short_expr_negs"].values())[:k] if b["flag_short_neg"] else [] for b in boxes
        ],
    }


def _as_dict(s) -> dict:
    return {
        name: getattr(s, name)
        for name in _expected({"f_path": "", "caption": "", "short_caption": ""})
    }


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        if name == "boxes":
            np.testing.assert_array_equal(got[name], want[name])
        else:
            assert got[name] == want[name], name


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return root, write_raw(root, 40, seed=3)


def test_round_trip_exact(raw, tmp_path):
    root, jsonl = raw
    records = read_jsonl(jsonl)
    records.append({"f_path": records[0]["f_path"], "caption": "stage one", "short_caption": "s1"})
    samples = []
    for rec in records:
        sample, f_path, problems = parse_record(rec)
        assert not problems
        sample.image, sample.width, sample.height = load_image(str(root / "images" / f_path))
        samples.append(sample)
    done = write_shard(tmp_path / "s.zarr", samples, marker={"note": 1})
    assert done["num_samples"] == len(records) and done["note"] == 1
    assert read_marker(tmp_path / "s.zarr") == done

    reader = ShardReader(tmp_path / "s.zarr")
    back = reader.samples()
    assert len(back) == len(records)
    for rec, got in zip(records, back, strict=True):
        _assert_same(_as_dict(got), _expected(rec))
        # Original JPEG bytes are stored untouched.
        assert got.image == (root / "images" / rec["f_path"]).read_bytes()
    assert back[-1].boxes.shape == (0, 4)  # stage-1 record: no boxes

    # Token arrays equal an independent tokenization of the same texts.
    blk = reader.read_block(3, 37)
    texts = records[3:37]
    np.testing.assert_array_equal(
        blk.long_tokens, tokenizer.tokenize([r["caption"] for r in texts], 248)
    )
    short = [SHORT_PREFIX + r["short_caption"] for r in texts]
    np.testing.assert_array_equal(blk.short_tokens, tokenizer.tokenize(short, 77))
    exprs = [b["short_expr"] for r in texts for b in r["bbox_info"]]
    np.testing.assert_array_equal(blk.box_short_tokens, tokenizer.tokenize(exprs, 77))
    flagged = [b for r in texts for b in r["bbox_info"] if b["flag_short_neg"]]
    negs = [n for b in flagged for n in b["short_expr_negs"].values()]
    np.testing.assert_array_equal(
        blk.neg_tokens[blk.neg_flags == 1].reshape(-1, 77), tokenizer.tokenize(negs, 77)
    )
    assert not blk.neg_tokens[blk.neg_flags == 0].any()
    for i, r in enumerate(texts):
        assert blk.jpeg(i).tobytes() == (root / "images" / r["f_path"]).read_bytes()
        assert blk.box_offsets[i + 1] - blk.box_offsets[i] == len(r["bbox_info"])


def _jpeg(color, size=(64, 48), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _corrupt_dataset(root):
    """The raw set plus one culprit of every kind; returns (jsonl, expected keys, culprits)."""
    records = read_jsonl(root / "train.jsonl")
    img = root / "images"
    good = records[:30]
    (img / "bad").mkdir(exist_ok=True)
    full = _jpeg("red", (200, 150))
    (img / "bad/truncated.jpg").write_bytes(full[: len(full) // 2])
    (img / "bad/garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 20)
    (img / "bad/empty.jpg").write_bytes(b"")
    Image.new("RGB", (80, 60), "blue").save(img / "bad/ok.png")
    base = dict(records[30])
    box = base["bbox_info"][0]

    def rec(f_path, **kw):
        return {**base, "f_path": f_path, **kw}

    bad_records = [
        (rec("bad/missing.jpg"), "image", "missing image file"),
        (rec("bad/truncated.jpg"), "image", "undecodable image"),
        (rec("bad/garbage.jpg"), "image", "undecodable image"),
        (rec("bad/empty.jpg"), "image", "empty image file"),
        (rec(records[31]["f_path"], caption=None), "record", "caption is NoneType"),
        (rec(records[32]["f_path"], bbox_info={"a": 1}), "record", "bbox_info is dict"),
        ({"caption": "no path"}, "record", "f_path is NoneType"),
    ]
    nan_box = {**box, "bbox": [float("nan"), 0.1, 0.5, 0.5]}
    flipped = {**box, "bbox": [0.6, 0.1, 0.2, 0.5]}
    outside = {**box, "bbox": [0.1, 0.1, 1.2, 0.5]}
    few_negs = {**box, "flag_short_neg": 1, "short_expr_negs": {"0": "a", "1": "b"}}
    slightly_out = {**box, "bbox": [-0.0005, 0.0, 1.0004, 0.5]}  # within tolerance: clipped
    box_rec = rec(
        records[33]["f_path"], bbox_info=[box, nan_box, flipped, outside, few_negs, slightly_out]
    )
    png_rec = rec("bad/ok.png")
    lines = [json.dumps(r) for r in good]
    lines += [json.dumps(r) for r, _, _ in bad_records]
    lines += ["{not json", json.dumps([1, 2]), json.dumps(box_rec), json.dumps(png_rec)]
    jsonl = root / "mixed.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    keep = [r["f_path"] for r in good] + [box_rec["f_path"], png_rec["f_path"]]
    return jsonl, keep, bad_records, box_rec


def test_build_reports_culprits_and_keeps_the_rest(raw, tmp_path):
    root, _ = raw
    jsonl, keep, bad_records, box_rec = _corrupt_dataset(root)
    report = build_shards(
        str(jsonl),
        str(root / "images"),
        str(tmp_path / "out"),
        shard_size=8,
        workers=2,
        progress=False,
    )
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    # report.json leaves out what differs between runs (so rebuilds give the same bytes)
    assert on_disk == {k: v for k, v in report.items() if k not in ("seconds", "reused_shards")}

    shard_set = open_shard_set(tmp_path / "out")
    keys = [k for p in shard_set.paths for k in ShardReader(p).keys()]
    assert keys == keep  # every valid record kept, in input order
    assert report["samples"] == len(keep) and report["records"] == len(keep) + len(bad_records) + 2

    problems = report["problems"]
    skipped = [p for p in problems if p["kind"] != "box"]
    assert len(skipped) == len(bad_records) + 2 == report["skipped_records"]
    for (r, kind, reason), p in zip(bad_records, skipped, strict=False):
        assert p["kind"] == kind and p["reason"].startswith(reason), (p, reason)
        assert p["key"] == r.get("f_path", p["source"]) and p["source"].startswith(str(jsonl))
    assert "invalid JSON" in skipped[-2]["reason"] and skipped[-2]["source"].endswith(
        f":{len(keep) + len(bad_records) - 1}"
    )
    assert "record is list" in skipped[-1]["reason"]

    box_problems = [p for p in problems if p["kind"] == "box"]
    assert [(p["key"], p["box"]) for p in box_problems] == [
        (box_rec["f_path"], i) for i in (1, 2, 3, 4)
    ]
    assert "NaN" in box_problems[0]["reason"] and "x2 < x1" in box_problems[1]["reason"]
    assert "outside [0, 1]" in box_problems[2]["reason"] and "need 10" in box_problems[3]["reason"]
    assert report["reasons"]["bbox_info[].bbox has NaN/inf"] == 1

    # The record with bad boxes keeps its good ones: box 0, box 4 without negatives, box 5 clipped.
    by_key = {s.key: s for p in shard_set.paths for s in ShardReader(p).samples()}
    got = by_key[box_rec["f_path"]]
    assert len(got.boxes) == 3
    assert got.neg_flags == [
        box_rec["bbox_info"][0]["flag_short_neg"],
        0,
        box_rec["bbox_info"][0]["flag_short_neg"],
    ]
    np.testing.assert_array_equal(got.boxes[2], np.array([0.0, 0.0, 1.0, 0.5], np.float32))
    # A PNG is re-encoded to an RGB JPEG with the same pixels (up to JPEG loss).
    png = by_key["bad/ok.png"]
    assert png.image[:2] == b"\xff\xd8" and (png.width, png.height) == (80, 60)
    assert np.abs(np.asarray(Image.open(io.BytesIO(png.image)), int) - (0, 0, 255)).max() <= 3


def _snapshot(out):
    shard_set = open_shard_set(out)
    return json.loads((out / "index.json").read_text()), [
        [(s.key, s.image, s.boxes.tobytes(), s.negs) for s in ShardReader(p).samples()]
        for p in shard_set.paths
    ]


def test_interrupted_build_resumes_to_the_same_result(raw, tmp_path):
    root, jsonl = raw
    out = tmp_path / "out"
    args = (str(jsonl), str(root / "images"), str(out))
    build_shards(*args, shard_size=6, workers=2, progress=False)
    before = _snapshot(out)
    finished = {i: os.path.getmtime(marker_path(out / f"shard-{i:06d}.zarr")) for i in range(7)}

    # An interruption: index/report not written yet, shard 2 half-written (no marker, a chunk
    # file truncated), shard 5 never started, shard 6 started with an empty directory.
    (out / "index.json").unlink()
    (out / "report.json").unlink()
    marker_path(out / "shard-000002.zarr").unlink()
    victim = next(
        p
        for p in sorted((out / "shard-000002.zarr").rglob("*"))
        if p.is_file() and p.stat().st_size > 1000
    )
    victim.write_bytes(victim.read_bytes()[:100])
    shutil.rmtree(out / "shard-000005.zarr")
    marker_path(out / "shard-000005.zarr").unlink()
    marker_path(out / "shard-000006.zarr").unlink()
    shutil.rmtree(out / "shard-000006.zarr")
    (out / "shard-000006.zarr").mkdir()

    report = build_shards(*args, shard_size=6, workers=1, progress=False)
    assert report["reused_shards"] == 4  # shards 0, 1, 3, 4
    assert _snapshot(out) == before
    for i in (0, 1, 3, 4):  # finished shards were not touched
        assert os.path.getmtime(marker_path(out / f"shard-{i:06d}.zarr")) == finished[i]

    with pytest.raises(SystemExit, match="shard_size"):
        build_shards(*args, shard_size=7, workers=1, progress=False)


def test_load_image_reencodes_big_and_rotated(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg("green", (400, 100)))
    data, w, h = load_image(str(path), max_side=200)
    assert (w, h) == (200, 50) and Image.open(io.BytesIO(data)).size == (200, 50)
    data, w, h = load_image(str(path))
    assert data == path.read_bytes() and (w, h) == (400, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored upright
    Image.new("RGB", (40, 20), "white").save(tmp_path / "rot.jpg", exif=exif)
    data, w, h = load_image(str(tmp_path / "rot.jpg"))
    assert (w, h) == (20, 40) and not Image.open(io.BytesIO(data)).getexif().get(0x0112)


def test_parse_record_rejects_malformed():
    ok = {"f_path": "a.jpg", "caption": "c", "short_caption": "s"}
    assert parse_record(ok)[0].boxes.shape == (0, 4)
    for bad, reason in [
        ([], "record is list"),
        ({**ok, "f_path": ""}, "f_path is empty"),
        ({**ok, "short_caption": 3}, "short_caption is int"),
        ({**ok, "bbox_info": "x"}, "bbox_info is str"),
    ]:
        with pytest.raises(BadRecord, match=reason):
            parse_record(bad)
    box = {"bbox": [0.1, 0.1, 0.2, 0.2], "short_expr": "a", "long_expr": "b", "flag_short_neg": 0}
    for broken, reason in [
        ({**box, "bbox": [0.1, 0.2, 0.3]}, "list of 4"),
        ({**box, "bbox": [0.1, 0.2, 0.3, "x"]}, "non-number"),
        ({**box, "short_expr": None}, "short_expr is NoneType"),
        ({**box, "flag_short_neg": 2}, "flag_short_neg must be 0 or 1"),
        ("box", "expected an object"),
    ]:
        sample, _, problems = parse_record({**ok, "bbox_info": [box, broken]})
        assert len(sample.boxes) == 1 and len(problems) == 1
        assert reason in problems[0].reason and problems[0].box == 1
    sample, _, _ = parse_record({**ok, "bbox_info": [box] * 6}, max_boxes=4)
    assert len(sample.boxes) == 4


def test_json_list_dir_and_txt_inputs_give_the_same_shards(raw, tmp_path):
    root, jsonl = raw
    records = read_jsonl(jsonl)
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "a.json").write_text(json.dumps(records[:15]))  # FineHARD ships .json lists
    (ann / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[15:]))
    (tmp_path / "list.txt").write_text(f"{ann / 'a.json'}\n{ann / 'b.jsonl'}\n")
    keys = []
    for i, source in enumerate([ann, tmp_path / "list.txt"]):
        out = tmp_path / f"out{i}"
        build_shards(str(source), str(root / "images"), str(out), shard_size=16, progress=False)
        keys.append([k for p in open_shard_set(out).paths for k in ShardReader(p).keys()])
    assert keys[0] == keys[1] == [r["f_path"] for r in records]
