"""A shard build directory at an fsspec URL (`build_shards --out s3://bucket/prefix`).

The same files as `build_store.BuildStore` (build.json, shards and their markers, bucket
manifests, report.json, index.json last), written through `storage.py`: every request retried
on transient errors, each JSON file one PUT (atomic on an object store, so there are no
temporaries to clean up). `BuildStore(url)` returns one of these.
"""

from __future__ import annotations

import re

from fgclip_mega.data import storage
from fgclip_mega.data.build_store import BUCKETS_DIR, BuildStore
from fgclip_mega.data.shards import INDEX_NAME, marker_path, read_marker


class UrlBuildStore(BuildStore):
    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    def __str__(self) -> str:
        return self.root  # workers rebuild the store from it

    def same_as(self, other: BuildStore) -> bool:
        return isinstance(other, UrlBuildStore) and other.root == self.root

    def create(self) -> None:
        pass  # an object store has no directories

    def path(self, rel: str) -> str:
        return storage.join(self.root, rel)

    def read_json(self, rel: str) -> object:
        try:
            return storage.read_json(self.path(rel))
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, obj: object) -> None:
        storage.write_json(self.path(rel), obj)

    def remove(self, rel: str) -> None:
        storage.remove(self.path(rel))

    def marker(self, shard: str) -> dict | None:
        return read_marker(self.path(shard))

    def bucket_manifests(self) -> list[str]:
        names = storage.listdir(self.path(BUCKETS_DIR))
        return [f"{BUCKETS_DIR}/{n}" for n in names if re.fullmatch(r"bucket-\d+\.json", n)]

    def copy_shard_from(self, src: BuildStore, shard: str) -> None:
        """Copies a finished shard from another build (local or at a URL), its marker last."""
        dst = self.path(shard)
        storage.remove(marker_path(dst))
        storage.remove_tree(dst)
        storage.copy_tree(src.path(shard), dst)
        storage.write_bytes(marker_path(dst), storage.read_bytes(marker_path(src.path(shard))))

    def copy_file_from(self, src: BuildStore, rel: str) -> None:
        storage.write_bytes(self.path(rel), storage.read_bytes(src.path(rel)))

    def remove_stray_temporaries(self) -> list[str]:
        return []  # JSON files are single PUTs: nothing half-written is left behind

    def index_exists(self) -> bool:
        return storage.is_file(self.path(INDEX_NAME))
