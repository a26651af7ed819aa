"""Hard negatives keep their record order through the multiprocess builder (issue 24 bug)."""

import json

import pytest

from fgclip_mega.data.build import build_shards
from fgclip_mega.data.shards import ShardReader, open_shard_set
from tests.builders import jpeg_bytes


@pytest.mark.parametrize("workers", [1, 2])
def test_more_than_ten_negatives_keep_record_order(tmp_path, workers):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg_bytes())
    negs = {str(i): f"neg #{i}" for i in range(12)}  # FineHARD's dict form, keys "0".."11"
    box = {
        "bbox": [0.1, 0.1, 0.5, 0.5],
        "short_expr": "a cat",
        "long_expr": "a small grey cat",
        "flag_short_neg": 1,
        "short_expr_negs": negs,
    }
    rec = {"f_path": "a.jpg", "caption": "c", "short_caption": "s", "bbox_info": [box]}
    # A list form of the same 12 negatives, in a second record.
    as_list = {**box, "short_expr_negs": list(negs.values())}
    rec2 = {**rec, "f_path": "b.jpg", "bbox_info": [as_list]}
    (tmp_path / "img" / "b.jpg").write_bytes(jpeg_bytes("blue"))
    ann = tmp_path / "ann.jsonl"
    ann.write_text(json.dumps(rec) + "\n" + json.dumps(rec2) + "\n")
    out = tmp_path / "out"
    build_shards(str(ann), str(tmp_path / "img"), str(out), workers=workers, progress=False)
    (path,) = open_shard_set(out).paths
    samples = ShardReader(path).samples()
    want = [f"neg #{i}" for i in range(10)]
    assert [s.negs for s in samples] == [[want], [want]]
