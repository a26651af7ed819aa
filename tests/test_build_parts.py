"""Partitioned shard builds (issue 24): parts built anywhere, one killed and rerun, merge to the
same bytes as one process; the merge refuses overlapping and missing parts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fgclip_mega.data.build import build_shards
from fgclip_mega.data.build_store import bucket_of, part_buckets
from fgclip_mega.data.merge import MergeError, merge_parts
from fgclip_mega.data.shards import ShardReader, open_shard_set
from tests.builders import jpeg_bytes, read_jsonl, write_raw

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = 5
SHARD = 4


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _assert_same_tree(got: Path, want: Path) -> None:
    a, b = _all_files(got), _all_files(want)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, differ


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 synthetic records plus culprits (a duplicate, a missing image, a broken line)."""
    root = tmp_path_factory.mktemp("parts")
    jsonl = write_raw(root, 60, seed=7)
    records = read_jsonl(jsonl)
    (root / "images" / "extra.jpg").write_bytes(jpeg_bytes("green"))
    lines = [json.dumps(r) for r in records]
    lines.insert(10, json.dumps(records[3]))  # a duplicate key
    lines.insert(20, json.dumps({**records[0], "f_path": "missing.jpg"}))
    lines.insert(30, "{broken")
    lines.append(json.dumps({**records[1], "f_path": "extra.jpg"}))
    ann = root / "ann.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    single = root / "single"
    build_shards(
        str(ann), str(root / "images"), str(single), shard_size=SHARD, buckets=BUCKETS,
        progress=False,
    )  # fmt: skip
    return root, ann, single, records


def _cli(ann: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "data_prep.build_shards", "--annotations", str(ann),
        "--images", str(images), "--out", str(out), "--shard-size", str(SHARD),
        "--buckets", str(BUCKETS), "--no-progress", *extra,
    ]  # fmt: skip


def test_single_build_keeps_every_record_in_its_bucket(data):
    root, ann, single, records = data
    shard_set = open_shard_set(single)
    keys = [k for p in shard_set.paths for k in ShardReader(p).keys()]
    want = [r["f_path"] for r in records] + ["extra.jpg"]
    assert sorted(keys) == sorted(want)  # every valid record once; culprits left out
    # Shards follow bucket order, records keep input order inside a bucket.
    expected = sorted(want, key=lambda k: (bucket_of(k, BUCKETS), want.index(k)))
    assert keys == expected
    report = json.loads((single / "report.json").read_text())
    reasons = sorted(p["reason"].split(":")[0] for p in report["problems"])
    assert reasons == ["duplicate f_path", "invalid JSON", "missing image file"]
    assert report["records"] == len(records) + 4


@pytest.mark.slow
def test_three_parts_one_killed_then_rerun_merge_to_the_single_build(data, tmp_path):
    root, ann, single, _ = data
    out = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    for part in (0, 2):
        cmd = _cli(ann, root / "images", out, "--part", str(part), "--num-parts", "3")
        assert subprocess.run(cmd + ["--workers", "1"], **run).returncode == 0

    # Part 1 with 2 pool workers, killed (SIGKILL, no cleanup) once it finished a few shards.
    cmd = _cli(ann, root / "images", out, "--part", "1", "--num-parts", "3", "--workers", "2")
    own = part_buckets(1, 3, BUCKETS)
    mine = [f"shard-{b:05d}-" for b in own]

    def finished() -> list[str]:
        return [n for n in os.listdir(out) if n.endswith(".done.json") and n[:12] in mine]

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(finished()) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "part 1 ended before it could be killed: give it more records"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(finished())
    assert n_done >= 2
    assert not any((out / "buckets" / f"bucket-{b:05d}.json").exists() for b in own)
    with pytest.raises(MergeError, match=r"missing parts: buckets 1-2 of 5 .* rerun --part 1"):
        merge_parts(str(out), num_parts=3)
    time.sleep(0.6)  # the pool workers' parent watch (0.5 s) has fired if PDEATHSIG did not

    res = subprocess.run(cmd, **run)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "data_prep.build_shards", "merge", "--out", str(out)], **run
    )
    assert res.returncode == 0, res.stderr
    assert "merged" in res.stdout
    _assert_same_tree(out, single)


def test_parts_in_separate_directories_merge_and_refuse_overlaps_and_gaps(data, tmp_path):
    root, ann, single, _ = data
    parts = []
    for part in range(3):
        d = tmp_path / f"part{part}"
        build_shards(
            str(ann), str(root / "images"), str(d), shard_size=SHARD, buckets=BUCKETS,
            part=part, num_parts=3, progress=False,
        )  # fmt: skip
        assert not (d / "index.json").exists()  # a part does not merge
        parts.append(str(d))
    merged = tmp_path / "merged"
    merge_parts(str(merged), parts)
    _assert_same_tree(merged, single)

    other = tmp_path / "other_n"  # part 0 of 2 holds buckets 0-1: part0 and part1 hold them too
    build_shards(
        str(ann), str(root / "images"), str(other), shard_size=SHARD, buckets=BUCKETS,
        part=0, num_parts=2, progress=False,
    )  # fmt: skip
    with pytest.raises(MergeError, match=r"overlapping parts: buckets 0 in both .*part0 and "):
        merge_parts(str(tmp_path / "m2"), [*parts, str(other)])
    with pytest.raises(MergeError, match=r"missing parts: buckets 1-2 of 5.*rerun --part 1\)"):
        merge_parts(str(tmp_path / "m3"), [parts[0], parts[2]], num_parts=3)
    with pytest.raises(MergeError, match=r"missing parts: buckets 1-2 of 5 .*\[I\*B//N"):
        merge_parts(str(tmp_path / "m4"), [parts[0], parts[2]])
    assert not (tmp_path / "m3" / "index.json").exists()

    # Parts built with other parameters are refused, naming the parameter.
    odd = tmp_path / "odd"
    build_shards(
        str(ann), str(root / "images"), str(odd), shard_size=SHARD + 1, buckets=BUCKETS,
        part=1, num_parts=3, progress=False,
    )  # fmt: skip
    with pytest.raises(MergeError, match=r"other parameters .*'shard_size.: \(4, 5\)"):
        merge_parts(str(tmp_path / "m5"), [parts[0], str(odd), parts[2]])

    # Bad part arguments are one clear error.
    for kw, msg in [
        ({"part": 3, "num_parts": 3}, "need 0 <= part < num_parts=3"),
        ({"part": 0, "num_parts": 6}, "num_parts=6 with buckets=5"),
    ]:
        with pytest.raises(ValueError, match=msg):
            build_shards(str(ann), str(root / "images"), str(tmp_path / "x"), buckets=5, **kw)


@pytest.mark.slow
def test_parts_local_runs_processes_and_merges_to_the_single_build(data, tmp_path):
    root, ann, single, _ = data
    out = tmp_path / "local"
    cmd = _cli(ann, root / "images", out, "--parts-local", "3", "--workers", "3")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "merged" in res.stdout
    _assert_same_tree(out, single)
