"""Checkpoint files that are verified before anything is loaded from them.

Every file of a checkpoint is written to a temp name, hashed (sha256 of the bytes as written,
computed while writing), fsynced and renamed; `manifest.json` lists each file's size and hash and
is written last, so a directory without a manifest is incomplete by definition. Reading a file
checks its size and hash first: a truncated, empty, bit-flipped or missing file becomes a
CheckpointError naming that file, never a bare PytorchStreamReader/EOFError/JSONDecodeError.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from fgclip_mega.checkpoint.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = 2  # checkpoint layout version (1 = per-rank files, no manifest)


class _HashingWriter(io.RawIOBase):
    """A binary file that hashes what passes through it (torch.save writes into it)."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = memoryview(data)
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: Path, obj: Any = None, data: bytes | None = None) -> dict[str, Any]:
    """Writes `obj` with torch.save (or raw `data`) atomically; returns its manifest entry."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        writer = _HashingWriter(fh)
        if data is not None:
            writer.write(data)
        else:
            torch.save(obj, writer)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"bytes": writer.size, "sha256": writer.sha.hexdigest()}


def write_json(path: Path, obj: Any) -> dict[str, Any]:
    return write_file(path, data=json.dumps(obj, indent=1).encode())


def write_manifest(directory: Path, entries: dict[str, dict[str, Any]], step: int) -> None:
    """Written after every listed file is durable: its presence marks the checkpoint complete."""
    write_json(directory / MANIFEST, {"format": FORMAT, "step": step, "files": entries})
    _fsync_dir(directory)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, the checkpoint is incomplete (save interrupted?)")
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        for name, entry in files.items():
            if not isinstance(name, str) or {"bytes", "sha256"} - set(entry):
                raise ValueError(f"bad entry {name!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    return manifest


def read_verified(directory: Path, name: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of `name`, after checking them against the manifest."""
    path = Path(directory) / name
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(f"{path}: not listed in {MANIFEST}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        raise CheckpointError(
            f"{path}: {len(data)} bytes, {MANIFEST} says {entry['bytes']} (truncated or replaced)"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"{path}: sha256 {digest[:16]}... does not match {MANIFEST} "
            f"({entry['sha256'][:16]}...): the file is corrupt"
        )
    return data


def verify(directory: Path) -> None:
    """Raises CheckpointError naming the first missing or corrupt file of a checkpoint."""
    manifest = read_manifest(directory)
    for name in manifest["files"]:
        read_verified(directory, name, manifest)


def load_torch(directory: Path, name: str, manifest: dict[str, Any]) -> Any:
    data = read_verified(directory, name, manifest)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure names the file
        raise CheckpointError(
            f"{Path(directory) / name}: cannot be loaded ({type(e).__name__}: {e})"
        ) from None


def load_json(directory: Path, name: str, manifest: dict[str, Any]) -> Any:
    data = read_verified(directory, name, manifest)
    try:
        return json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{Path(directory) / name}: not valid JSON ({e})") from None
