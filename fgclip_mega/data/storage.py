"""Where shards live: a local path or an fsspec URL (s3://, gs://, ...), behind one small API.

Local paths go to the filesystem unchanged. A URL is opened with fsspec (`s3fs` for s3://) and
zarr's `FsspecStore`, wrapped in `RetryingStore`: every request is retried on transient errors
(timeouts, HTTP 5xx, dropped or reset connections, truncated bodies) up to `RetryPolicy.attempts`
times with exponential backoff, and then fails with a `StorageError` that names the object and
the last error. Permanent errors (missing object, access denied) are not retried. s3fs's and
botocore's own retry loops are turned off for this, so the budget is exactly one number.

Credentials and endpoint come only from the environment, the way each fsspec backend reads it
(for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE,
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_REGION), or from fsspec's own variables
(FSSPEC_S3='{"endpoint_url": ...}', FSSPEC_S3_<OPTION>=...). Nothing here prints or stores them:
messages carry the object's URL with any user:password part removed (`redact`).

Imports only the standard library, numpy-free: DALI's reader processes import it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")


def is_url(path: str | os.PathLike) -> bool:
    """True for 's3://bucket/key' and other fsspec URLs; file:// and plain paths are local."""
    m = _URL.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def local_path(path: str | os.PathLike) -> str:
    """A local path, 'file://' stripped."""
    text = str(path)
    return text[len("file://") :] if text.lower().startswith("file://") else text


def redact(text: str) -> str:
    """`text` with the user:password part of any URL in it removed ('s3://k:s@b' -> 's3://b')."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]*@", r"\1", str(text))


def join(base: str | os.PathLike, *parts: str) -> str:
    """base/part/...: '/'-joined for URLs, os.path.join for local paths."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(local_path(base), *parts)


def parent(path: str | os.PathLike) -> str:
    if is_url(path):
        head, _, _ = str(path).rstrip("/").rpartition("/")
        return head
    return str(Path(local_path(path)).parent)


def basename(path: str | os.PathLike) -> str:
    return str(path).rstrip("/").rpartition("/")[2] if is_url(path) else Path(path).name


# ----------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    """Tries per request (1 = no retry)."""
    backoff_s: float = 0.25
    """Wait before the first retry; doubles each time (with jitter), capped at max_backoff_s."""
    max_backoff_s: float = 8.0
    timeout_s: float = 30.0
    """Connect and per-read timeout of one request: a stalled response becomes a retry."""

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed try number `attempt` (0-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * rng.uniform(0.5, 1.0)


DEFAULT_POLICY = RetryPolicy()


class StorageError(OSError):
    """A storage request that failed for good: names the object, the tries and the last error."""

    def __init__(self, obj: str, attempts: int, cause: BaseException):
        self.object = redact(obj)
        self.attempts = attempts
        kind = "transient" if is_transient(cause) else "permanent"
        msg = (
            f"{self.object}: {kind} storage error after {attempts} attempt(s): "
            f"{type(cause).__name__}: {redact(str(cause))[:300]}"
        )
        super().__init__(errno.EIO, msg)

    def __str__(self) -> str:
        return self.args[1]


_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ThrottlingException",
    "Throttling",
    "503",
    "500",
    "502",
    "504",
}
_TRANSIENT_NAMES = {  # by class name: botocore / aiohttp / urllib3 need not be importable here
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ClientConnectionError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerTimeoutError",
    "ConnectionTimeoutError",
    "SocketTimeoutError",
    "ContentLengthError",
    "TransferEncodingError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "IncompleteRead",
    "ProtocolError",
    "HTTPClientError",
    "FSTimeoutError",
    "ResponseParserError",
}


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode")
        return int(status) if status else None
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    return status if isinstance(status, int) else None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: a timeout, a dropped connection, a truncated body or an HTTP 5xx/429."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageError):
            return False
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError, EOFError)):
            return True
        if type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__):
            return True
        status = _http_status(exc)
        if status is not None and (status >= 500 or status == 429):
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
            return True
        if isinstance(exc, OSError) and any(
            s in str(exc) for s in ("SlowDown", "Service Unavailable", "503", "Internal Error")
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _permanent_passthrough(exc: BaseException) -> bool:
    """Errors with a meaning of their own that callers handle (a missing object)."""
    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError))


def call(fn: Callable[[], T], obj: str, policy: RetryPolicy = DEFAULT_POLICY) -> T:
    """fn() with retries on transient errors; StorageError naming `obj` when they run out."""
    rng = random.Random()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as e:
            if _permanent_passthrough(e):
                raise
            if not is_transient(e) or attempt + 1 == policy.attempts:
                raise StorageError(obj, attempt + 1, e) from None
            time.sleep(policy.delay(attempt, rng))
    raise AssertionError("unreachable")


async def acall(fn: Callable[[], Awaitable[T]], obj: str, policy: RetryPolicy) -> T:
    """The async twin of `call` (zarr's event loop)."""
    rng = random.Random()
    for attempt in range(policy.attempts):
        try:
            return await fn()
        except Exception as e:
            if _permanent_passthrough(e):
                raise
            if not is_transient(e) or attempt + 1 == policy.attempts:
                raise StorageError(obj, attempt + 1, e) from None
            await asyncio.sleep(policy.delay(attempt, rng))
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- filesystems

_opened: list = []  # the filesystems this process created
_inherited: list = []  # a forked child's copies of its parent's: kept, never used or closed


def _after_fork_in_child() -> None:
    # fsspec gives a forked child fresh instances; the parent's copies hold its connections.
    # Collected here, aiohttp would warn "Unclosed client session" (closing them would touch
    # sockets the parent still uses): keep them alive and idle instead.
    _inherited.extend(_opened)
    _opened.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _options(protocol: str, policy: RetryPolicy) -> dict[str, Any]:
    """fsspec storage options: the user's FSSPEC_<PROTOCOL> settings, plus (for S3) our timeouts
    and a single try per request inside s3fs/botocore (our loop is the only retry loop)."""
    from fsspec.config import conf

    opts = dict(conf.get(protocol, {}))
    if protocol in ("s3", "s3a"):
        cfg = dict(opts.get("config_kwargs") or {})
        cfg.setdefault("connect_timeout", policy.timeout_s)
        cfg.setdefault("read_timeout", policy.timeout_s)
        cfg["retries"] = {"total_max_attempts": 1, "mode": "standard"}
        opts["config_kwargs"] = cfg
    return opts


def filesystem(url: str, policy: RetryPolicy = DEFAULT_POLICY):
    """(async fsspec filesystem, path inside it) for a URL.

    Always the asynchronous instance, driven on zarr's event loop (`_run`) also for the plain
    file operations here: one loop per process for every request. (A synchronous s3fs instance
    runs on fsspec's loop, and its finaliser, run by a garbage collection on zarr's loop thread,
    closes its session on the wrong loop.)
    """
    from fsspec.core import url_to_fs
    from zarr.storage._fsspec import _make_async

    protocol = _URL.match(url).group(1).lower()
    fs, path = url_to_fs(url, asynchronous=True, **_options(protocol, policy))
    if not fs.async_impl:
        fs = _make_async(fs)
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop (an attribute, not a constructor option)
    if not any(f is fs for f in _opened):
        _opened.append(fs)
    return fs, path


def _run(make: Callable[[], Awaitable[T]]) -> Callable[[], T]:
    """A blocking call of the coroutine `make()` on zarr's event loop."""

    def blocking() -> T:
        from zarr.core.sync import sync

        return sync(make())

    return blocking


def _store_class():
    from zarr.storage import WrapperStore

    class RetryingStore(WrapperStore):
        """A zarr store whose every request retries transient errors (see `RetryPolicy`)."""

        def __init__(self, store, url: str, policy: RetryPolicy):
            super().__init__(store)
            self.url = url
            self.policy = policy

        def _with_store(self, store):
            return type(self)(store, self.url, self.policy)

        def _name(self, key: str) -> str:
            return f"{self.url.rstrip('/')}/{key}"

        async def get(self, key, prototype, byte_range=None):
            store = self._store
            return await acall(
                lambda: store.get(key, prototype, byte_range), self._name(key), self.policy
            )

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

        async def exists(self, key):
            return await acall(lambda: self._store.exists(key), self._name(key), self.policy)

        async def set(self, key, value):
            await acall(lambda: self._store.set(key, value), self._name(key), self.policy)

        async def delete(self, key):
            await acall(lambda: self._store.delete(key), self._name(key), self.policy)

        async def getsize(self, key):
            return await acall(lambda: self._store.getsize(key), self._name(key), self.policy)

    return RetryingStore


def open_store(path: str | os.PathLike, mode: str = "r", policy: RetryPolicy = DEFAULT_POLICY):
    """What `zarr.open_group(store=...)` takes: the local path, or a retrying fsspec store."""
    if not is_url(path):
        return local_path(path)
    from zarr.storage import FsspecStore

    fs, inner = filesystem(str(path), policy)
    store = FsspecStore(fs=fs, path=inner, read_only=mode == "r")
    return _store_class()(store, str(path), policy)


# ----------------------------------------------------------------------------- files


def read_bytes(path: str | os.PathLike, policy: RetryPolicy = DEFAULT_POLICY) -> bytes:
    """The whole object; FileNotFoundError when it does not exist."""
    if not is_url(path):
        with open(local_path(path), "rb") as fh:
            return fh.read()
    fs, inner = filesystem(str(path), policy)
    return call(_run(lambda: fs._cat_file(inner)), str(path), policy)


def read_json(path: str | os.PathLike, policy: RetryPolicy = DEFAULT_POLICY) -> Any:
    """Parsed JSON; FileNotFoundError when missing, ValueError (naming the path) when corrupt."""
    data = read_bytes(path, policy)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{redact(str(path))}: corrupt JSON ({e})") from None


def write_json(path: str | os.PathLike, obj: object, policy: RetryPolicy = DEFAULT_POLICY) -> None:
    """Writes JSON atomically: a temporary file renamed locally, one PUT (atomic) on a store."""
    text = json.dumps(obj, indent=1)
    if not is_url(path):
        p = Path(local_path(path))
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        return
    fs, inner = filesystem(str(path), policy)
    call(_run(lambda: fs._pipe_file(inner, text.encode("utf-8"))), str(path), policy)


def exists(path: str | os.PathLike, policy: RetryPolicy = DEFAULT_POLICY) -> bool:
    if not is_url(path):
        return os.path.exists(local_path(path))
    fs, inner = filesystem(str(path), policy)
    return call(_run(lambda: fs._exists(inner)), str(path), policy)


def is_file(path: str | os.PathLike, policy: RetryPolicy = DEFAULT_POLICY) -> bool:
    if not is_url(path):
        return os.path.isfile(local_path(path))
    fs, inner = filesystem(str(path), policy)
    return call(_run(lambda: fs._isfile(inner)), str(path), policy)


def remove(path: str | os.PathLike, policy: RetryPolicy = DEFAULT_POLICY) -> None:
    """Deletes a file or object; nothing when it does not exist."""
    if not is_url(path):
        Path(local_path(path)).unlink(missing_ok=True)
        return
    fs, inner = filesystem(str(path), policy)

    async def rm() -> None:
        try:
            await fs._rm_file(inner)
        except FileNotFoundError:
            pass

    call(_run(rm), str(path), policy)


def remove_tree(path: str | os.PathLike, policy: RetryPolicy = DEFAULT_POLICY) -> None:
    """Deletes a directory (or every object under a prefix); nothing when absent."""
    if not is_url(path):
        p = local_path(path)
        if os.path.exists(p):
            shutil.rmtree(p)
        return
    fs, inner = filesystem(str(path), policy)

    async def rm() -> None:
        try:
            await fs._rm(inner, recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(inner)

    call(_run(rm), str(path), policy)


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local directory; object stores have no directories (nothing to do)."""
    if not is_url(path):
        os.makedirs(local_path(path), exist_ok=True)


def listdir(path: str | os.PathLike, policy: RetryPolicy = DEFAULT_POLICY) -> list[str]:
    """Names directly under `path` (files and subdirectories), sorted; [] when absent."""
    if not is_url(path):
        p = local_path(path)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    fs, inner = filesystem(str(path), policy)

    async def ls() -> list[str]:
        try:
            return [basename(e) for e in await fs._ls(inner, detail=False, refresh=True)]
        except FileNotFoundError:
            return []

    return sorted(call(_run(ls), str(path), policy))


def write_bytes(path: str | os.PathLike, data: bytes, policy: RetryPolicy = DEFAULT_POLICY) -> None:
    """Writes a whole file (a temporary renamed locally) or object (one PUT)."""
    if not is_url(path):
        p = Path(local_path(path))
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    fs, inner = filesystem(str(path), policy)
    call(_run(lambda: fs._pipe_file(inner, data)), str(path), policy)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, policy=DEFAULT_POLICY) -> None:
    """Copies a directory (or prefix) between any two of local / URL, file by file."""
    if not is_url(src) and not is_url(dst):
        shutil.copytree(local_path(src), local_path(dst))
        return
    if is_url(src):
        fs, inner = filesystem(str(src), policy)
        files = call(_run(lambda: fs._find(inner)), str(src), policy)
        rels = [f[len(inner) :].lstrip("/") for f in files]
    else:
        root = local_path(src)
        rels = sorted(
            os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            for d, _, names in os.walk(root)
            for f in names
        )
    for rel in rels:
        target = join(dst, rel)
        if not is_url(dst):
            os.makedirs(os.path.dirname(local_path(target)), exist_ok=True)
        write_bytes(target, read_bytes(join(src, rel), policy), policy)
