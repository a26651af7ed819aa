"""The shard builder fed hostile input: each culprit is rejected with its reason, the rest kept.

Every case here once stopped the build, read outside the image folder, or was kept silently.
"""

import io
import json
import os
import re
import struct
import zlib

import pytest
from PIL import Image

from fgclip_mega.data.build import build_shards
from fgclip_mega.data.ingest import BadImage, load_image
from fgclip_mega.data.shards import ShardReader, open_shard_set
from tests.builders import jpeg_bytes as _jpeg


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG file whose header declares width x height pixels (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _rec(f_path, **kw) -> dict:
    box = {"bbox": [0.1, 0.1, 0.5, 0.5], "short_expr": "a red box", "long_expr": "a red box here",
           "flag_short_neg": 0}  # fmt: skip
    return {"f_path": f_path, "caption": "a caption", "short_caption": "short",
            "bbox_info": [box], **kw}  # fmt: skip


def _keys(out) -> list[str]:
    return [k for p in open_shard_set(out).paths for k in ShardReader(p).keys()]


def _build(ann, images, out, **kw) -> dict:
    return build_shards(str(ann), str(images), str(out), progress=False, **kw)


@pytest.fixture
def tree(tmp_path):
    """images/ok{0..9}.jpg, images/sub/ok.jpg, and a secret image outside the image folder."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(10):
        (images / f"ok{i}.jpg").write_bytes(_jpeg())
    (images / "sub/ok.jpg").write_bytes(_jpeg("blue"))
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret/x.jpg").write_bytes(_jpeg("green"))
    return tmp_path, images


def _problems_by_key(report) -> dict:
    return {p["key"]: p for p in report["problems"] if p["kind"] != "box"}


def test_hostile_jsonl_records_are_rejected_with_reasons(tree):
    root, images = tree
    os.symlink(root / "secret/x.jpg", images / "link_out.jpg")
    os.symlink(images / "ok0.jpg", images / "link_in.jpg")  # stays inside: fine
    (images / "bomb.png").write_bytes(_png_declaring(10000, 9000))  # 90 Mpx > PIL's 89.5 Mpx
    box = _rec("x")["bbox_info"][0]
    nested = "[" * 5000 + "]" * 5000
    cases = [  # (line, key in the report, reason prefix)
        (_rec("../secret/x.jpg"), "../secret/x.jpg", "image path outside the image folder"),
        (_rec(str(root / "secret/x.jpg")), str(root / "secret/x.jpg"), "image path outside"),
        (_rec("link_out.jpg"), "link_out.jpg", "image path outside the image folder"),
        (_rec("sub/../../secret/x.jpg"), "sub/../../secret/x.jpg", "image path outside"),
        (_rec("ok\u0000.jpg"), "ok\u0000.jpg", "image path outside the image folder"),
        (_rec("bomb.png"), "bomb.png", "image too large"),
        (_rec("ok1.jpg", caption="x" * 30_000), "ok1.jpg", "caption is too long"),
        (_rec("ok4.jpg", caption="\ud800 lone surrogate"), "ok4.jpg", "caption is not valid"),
        (_rec("ok2.jpg", bbox_info=[box] * 1001), "ok2.jpg", "bbox_info has 1001 boxes"),
        (_rec("ok3.jpg", bbox_info=[[box]]), None, None),  # a nested box: box dropped, kept
        (5, "L", "record is int"),
        ("a string", "L", "record is str"),
        (None, "L", "record is NoneType"),
        (f'{{"f_path": "ok5.jpg", "deep": {nested}}}', "L", "invalid JSON: nested too deeply"),
        ('{"f_path": "ok6.jpg", "n": ' + "1" * 5000 + "}", "L", "invalid JSON"),
        (_rec("link_in.jpg"), None, None),
        (_rec("sub/ok.jpg"), None, None),
        (_rec("sub/../ok7.jpg"), None, None),  # '..' that stays inside is fine
    ]
    lines = [c if isinstance(c, str) and c.startswith("{") else json.dumps(c) for c, _, _ in cases]
    ann = root / "ann.jsonl"
    ann.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    report = _build(ann, images, root / "out", shard_size=5, workers=2)
    assert _keys(root / "out") == ["ok3.jpg", "link_in.jpg", "sub/ok.jpg", "sub/../ok7.jpg"]
    skipped = [p for p in report["problems"] if p["kind"] != "box"]
    expected = [(n, k, r) for n, (_, k, r) in enumerate(cases, 1) if r]
    assert len(skipped) == len(expected)
    for p, (n, key, reason) in zip(skipped, expected, strict=True):
        assert p["source"] == f"{ann}:{n}" and p["reason"].startswith(reason), (p, reason)
        assert p["key"] == (p["source"] if key == "L" else key)
    # Nothing outside the image folder was read into a shard.
    secret = (root / "secret/x.jpg").read_bytes()
    for p in open_shard_set(root / "out").paths:
        assert all(s.image != secret for s in ShardReader(p).samples())


def test_hostile_boxes_are_dropped_with_reasons(tree):
    root, images = tree
    good = _rec("x")["bbox_info"][0]
    bad_boxes = [
        ({**good, "bbox": "0.1,0.1,0.5,0.5"}, "bbox_info[].bbox must be a list"),
        ({**good, "bbox": [True, 0.1, 0.5, 0.5]}, "bbox_info[].bbox has a non-number"),
        ({**good, "bbox": None}, "bbox_info[].bbox must be a list"),
        ({**good, "bbox": [[0.1, 0.1], [0.5, 0.5]]}, "bbox_info[].bbox must be a list"),
        ({**good, "bbox": [[0.1], 0.1, 0.5, 0.5]}, "bbox_info[].bbox has a non-number"),
        ({**good, "bbox": [0, 0, 10**400, 1]}, "bbox_info[].bbox has NaN/inf"),
        ({**good, "flag_short_neg": True}, "bbox_info[].flag_short_neg must be 0 or 1"),
        ({**good, "short_expr": "y" * 30_000}, "bbox_info[].short_expr is too long"),
        ("box", "bbox_info[] is str"),
    ]
    negs = {**good, "flag_short_neg": 1, "short_expr_negs": ["n"] * 9 + ["\ud800"]}
    rec = _rec("ok0.jpg", bbox_info=[good, *[b for b, _ in bad_boxes], negs])
    ann = root / "ann.jsonl"
    ann.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    report = _build(ann, images, root / "out")
    got = [(p["box"], p["reason"]) for p in report["problems"]]
    assert [b for b, _ in got] == list(range(1, len(bad_boxes) + 2))
    for (_, reason), (_, want) in zip(got, bad_boxes, strict=False):
        assert re.sub(r"\[\d+\]", "[]", reason).startswith(want), (reason, want)
    assert "not valid Unicode" in got[-1][1] and "negatives dropped" in got[-1][1]
    (sample,) = ShardReader(open_shard_set(root / "out").paths[0]).samples()
    assert len(sample.boxes) == 2 and sample.neg_flags == [0, 0]


def test_json_list_strings_are_not_parsed_again(tree):
    root, images = tree
    ann = root / "ann"
    ann.mkdir()
    hidden = json.dumps(_rec("ok1.jpg"))
    (ann / "a.json").write_text(json.dumps([_rec("ok0.jpg"), hidden]))
    report = _build(ann, images, root / "out")
    assert _keys(root / "out") == ["ok0.jpg"]
    (p,) = report["problems"]
    assert p["reason"] == "record is str, expected an object" and p["source"].endswith("[1]")


def test_non_utf8_line_and_file_are_rejected_and_the_build_goes_on(tree):
    root, images = tree
    ann = root / "ann"
    ann.mkdir()
    lines = [json.dumps(_rec("ok0.jpg")).encode(), b'{"f_path": "ok1.jpg\xff"}',
             json.dumps(_rec("ok2.jpg")).encode()]  # fmt: skip
    (ann / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (ann / "b.json").write_bytes(json.dumps([_rec("ok3.jpg")]).encode()[:-2] + b"\xfe]")
    (ann / "c.json").write_text(json.dumps([_rec("sub/ok.jpg")]))
    report = _build(ann, images, root / "out")
    assert _keys(root / "out") == ["ok0.jpg", "ok2.jpg", "sub/ok.jpg"]
    reasons = [(p["source"], p["reason"]) for p in report["problems"]]
    assert reasons[0][0] == f"{ann / 'a.jsonl'}:2" and reasons[0][1].startswith("not UTF-8")
    assert reasons[1][0] == str(ann / "b.json") and "not UTF-8" in reasons[1][1]
    assert len(reasons) == 2


def test_duplicate_keys_and_missing_list_entries(tree):
    root, images = tree
    ann = root / "ann.jsonl"
    recs = [_rec("ok0.jpg"), _rec("ok1.jpg"), _rec("ok0.jpg", caption="again"), _rec("ok1.jpg")]
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = _build(ann, images, root / "out", shard_size=2)
    assert _keys(root / "out") == ["ok0.jpg", "ok1.jpg"]
    dups = [(p["key"], p["source"]) for p in report["problems"]]
    assert dups == [("ok0.jpg", f"{ann}:3"), ("ok1.jpg", f"{ann}:4")]
    assert all(p["reason"].startswith("duplicate f_path") for p in report["problems"])

    listing = root / "list.txt"
    listing.write_text(f"{ann}\n\n{root / 'nope.jsonl'}\n")
    with pytest.raises(FileNotFoundError, match=rf"{listing}:3 names .*nope\.jsonl"):
        _build(listing, images, root / "out2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _build(root / "missing.jsonl", images, root / "out3")


def test_edited_input_rebuilds_exactly_the_affected_shard(tree):
    root, images = tree
    ann = root / "ann.jsonl"
    names = ["ok0.jpg", "ok1.jpg", "ok2.jpg", "ok3.jpg", "sub/ok.jpg"]
    recs = [_rec(n, caption=f"caption {i}") for i, n in enumerate(names)]
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = root / "out"
    _build(ann, images, out, shard_size=2)
    # Edit the middle record of shard 1 (first and last record and the count stay the same).
    recs[2]["caption"] = "an edited caption"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = _build(ann, images, out, shard_size=2)
    assert report["reused_shards"] == 2
    captions = [s.caption for p in open_shard_set(out).paths for s in ShardReader(p).samples()]
    assert captions == ["caption 0", "caption 1", "an edited caption", "caption 3", "caption 4"]

    # A truncated build.json (an interrupted non-atomic write) is reported and rewritten.
    build_json = out / "build.json"
    build_json.write_text(build_json.read_text()[:20])
    report = _build(ann, images, out, shard_size=2)
    assert report["reused_shards"] == 3 and json.loads(build_json.read_text())["shard_size"] == 2


def test_load_image_limits(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg(size=(40, 30)))
    with pytest.raises(BadImage, match="image file too large"):
        load_image(str(path), max_bytes=100)
    with pytest.raises(BadImage, match="40x30 pixels declared"):
        load_image(str(path), max_pixels=1000)
    assert load_image(str(path), max_pixels=1200)[1:] == (40, 30)
