"""The files of a shard build, and the one place the builder and the merge touch them.

A build directory holds:

    build.json                  content parameters (a rerun or a merge with others is refused)
    shard-*.zarr/ + shard-*.done.json   the shards and their completion markers (`shards.py`)
    buckets/bucket-NNNNN.json   one per finished bucket: its records and its shards in order
    report.json, index.json     written by the merge, index.json last

Records are spread over `buckets` buckets by a hash of their key; a part of a partitioned build
owns a contiguous range of buckets. Everything here takes the build root, so that another store
(an object store through fsspec) can stand in for the local filesystem by replacing this class.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from fgclip_mega.data.shards import (
    INDEX_NAME,
    atomic_write_json,
    marker_path,
    read_marker,
    shard_name,
)

BUILD_NAME = "build.json"
REPORT_NAME = "report.json"
BUCKETS_DIR = "buckets"
# Parameters that change shard contents; a rerun with different values needs a fresh out dir.
CONTENT_PARAMS = (
    "annotations",
    "images",
    "shard_size",
    "num_negatives",
    "max_boxes",
    "max_side",
    "quality",
    "strip_prefix",
    "short_prefix",
    "box_tolerance",
    "buckets",
)
DEFAULTS = {"buckets": 1}
"""Values of parameters that builds made before the parameter existed had."""
_TMP = re.compile(r"\.tmp\d+$")  # atomic_write_json's temporary names


def bucket_of(key: str, buckets: int) -> int:
    """Bucket of a record key: a stable hash, the same on every machine and Python run."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def part_buckets(part: int, num_parts: int, buckets: int) -> range:
    """The contiguous bucket range that part `part` of `num_parts` builds."""
    return range(part * buckets // num_parts, (part + 1) * buckets // num_parts)


def bucket_shard_name(bucket: int, chunk: int, buckets: int) -> str:
    """Shard `chunk` of `bucket`; one bucket keeps the unpartitioned names shard-NNNNNN.zarr."""
    return shard_name(chunk) if buckets == 1 else f"shard-{bucket:05d}-{chunk:06d}.zarr"


def bucket_manifest_name(bucket: int) -> str:
    return f"{BUCKETS_DIR}/bucket-{bucket:05d}.json"


class BuildStore:
    """A build directory on the local filesystem (or a shared one: NFS, Lustre, GPFS).

    `BuildStore("s3://bucket/prefix")` (any fsspec URL) is a `build_store_url.UrlBuildStore`.
    """

    def __new__(cls, root: str | os.PathLike):
        from fgclip_mega.data.storage import is_url

        if cls is BuildStore and is_url(root):
            from fgclip_mega.data.build_store_url import UrlBuildStore

            return super().__new__(UrlBuildStore)
        return super().__new__(cls)

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def same_as(self, other: BuildStore) -> bool:
        return os.path.realpath(self.root) == os.path.realpath(other.root)

    def create(self) -> None:
        (self.root / BUCKETS_DIR).mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        """Local path of `rel` (shards are written there by `shards.write_shard`)."""
        return self.root / rel

    def read_json(self, rel: str) -> object:
        """The parsed file; None when it does not exist. Corrupt JSON raises ValueError."""
        try:
            with open(self.root / rel, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, obj: object) -> None:
        atomic_write_json(self.root / rel, obj)

    def remove(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def marker(self, shard: str) -> dict | None:
        return read_marker(self.root / shard)

    def bucket_manifests(self) -> list[str]:
        """Relative names of the bucket manifests present, sorted."""
        folder = self.root / BUCKETS_DIR
        if not folder.is_dir():
            return []
        names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"bucket-\d+\.json", n))
        return [f"{BUCKETS_DIR}/{n}" for n in names]

    def copy_shard_from(self, src: BuildStore, shard: str) -> None:
        """Copies a finished shard (directory, then its marker last) from another build."""
        dst = self.root / shard
        self.remove(marker_path(dst).name)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src.root / shard, dst)
        shutil.copyfile(marker_path(src.root / shard), marker_path(dst))

    def copy_file_from(self, src: BuildStore, rel: str) -> None:
        tmp = self.root / (rel + f".tmp{os.getpid()}")
        shutil.copyfile(src.root / rel, tmp)
        os.replace(tmp, self.root / rel)

    def remove_stray_temporaries(self) -> list[str]:
        """Deletes temporaries of JSON writes that a killed process left (merge time only)."""
        gone = []
        for folder in (self.root, self.root / BUCKETS_DIR):
            if folder.is_dir():
                for name in os.listdir(folder):
                    if _TMP.search(name) and (folder / name).is_file():
                        (folder / name).unlink()
                        gone.append(str(folder / name))
        return gone

    def index_exists(self) -> bool:
        return (self.root / INDEX_NAME).is_file()
