"""Where the store's bytes live: a local directory, or an object store named by a URI.

A store is a local directory or a URI that ``pyarrow.fs`` understands (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``abfs://container/prefix`` where pyarrow was built with them). Every
path the store layer hands around is still a ``pathlib.Path`` so that ``d / name``, ``.name``
and ``.parent`` keep working; a URI inside a ``Path`` is normalised to ``s3:/bucket/...`` (one
slash) and :func:`split` turns either spelling back into ``(FileSystem, path)``.

Configuration is each file system's standard one. For S3 that is the AWS credential chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
``~/.aws``), ``AWS_REGION``/``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for MinIO and other S3-compatible servers; options pyarrow takes in the
URI's query string (``?endpoint_override=...``) work as well.

Atomicity: object stores have no rename, so a file is serialised in memory and written once
under its final name (:func:`put`). An S3 object becomes visible only when its upload completes
(on close), so a writer killed mid-write leaves nothing behind. Objects under one upload part go
as a single PutObject, larger ones (checkpoint blobs) as a multipart upload completed at close.
"""
from __future__ import annotations

import io
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

# The URI syntax lives with the configuration (a leaf: _config.store_home needs it without the store).
from flightlog._config import LOCAL_SCHEMES as _LOCAL_SCHEMES, STORE_URI as _URI, canonical, is_remote  # noqa: F401

_fs_cache: dict[tuple, Any] = {}
_fs_lock = threading.Lock()


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _filesystem(scheme: str, bucket: str, query: str):
    """The pyarrow FileSystem for ``scheme://bucket`` (cached: S3 clients are costly to build)."""
    endpoint = _endpoint() if scheme == "s3" else None
    key = (scheme, bucket, query, endpoint, os.environ.get("AWS_PROFILE"), os.environ.get("AWS_ACCESS_KEY_ID"))
    with _fs_lock:
        hit = _fs_cache.get(key)
    if hit is not None:
        return hit
    import pyarrow.fs as pafs

    if scheme == "s3" and not query:
        # allow_delayed_open: an object smaller than one upload part is sent as a single PutObject at
        # close (still all or nothing) instead of a three-request multipart upload
        opts: dict[str, Any] = {"allow_delayed_open": True, "connect_timeout": 5, "request_timeout": 30}
        env_region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:  # pyarrow does not read AWS_ENDPOINT_URL itself
            scheme_, _, host = endpoint.partition("://")
            if not host:
                scheme_, host = "https", endpoint
            opts.update(endpoint_override=host.rstrip("/"), scheme=scheme_, region=env_region or "us-east-1")
        else:  # the bucket's own region, as from_uri would ask AWS for it
            try:
                opts["region"] = pafs.resolve_s3_region(bucket)
            except OSError:
                if not env_region:
                    raise
                opts["region"] = env_region
        fs = pafs.S3FileSystem(**opts)
    else:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))
    with _fs_lock:
        _fs_cache[key] = fs
    return fs


def split(p: Any) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a remote path (either spelling)."""
    m = _URI.match(os.fspath(p))
    if not m or m.group(1).lower() in _LOCAL_SCHEMES:
        raise ValueError(f"not a remote path: {p!r}")
    rest, _, query = m.group(2).partition("?")
    rest = rest.strip("/")
    bucket = rest.split("/", 1)[0]
    return _filesystem(m.group(1).lower(), bucket, query), rest


def uri(p: Any) -> str:
    """The ``scheme://...`` spelling of a remote path (for messages and for other tools)."""
    m = _URI.match(os.fspath(p))
    return f"{m.group(1).lower()}://{m.group(2).lstrip('/')}" if m else os.fspath(p)


# -- operations (remote paths only; the local store keeps its os-level code) ----------------------


def listdir(d: Any) -> dict[str, tuple[int, int]]:
    """``{name: (size, mtime_ns)}`` of the objects directly under ``d``; empty when there are none."""
    import pyarrow.fs as pafs

    fs, path = split(d)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for i in infos:
        mt = i.mtime_ns if i.type == pafs.FileType.File and i.mtime_ns is not None else 0
        out[i.base_name] = (i.size or 0, mt) if i.type == pafs.FileType.File else (-1, 0)
    return out


def isdir(d: Any) -> bool:
    """Whether anything is stored under ``d`` (object stores only have prefixes)."""
    import pyarrow.fs as pafs

    fs, path = split(d)
    try:
        if "/" not in path:  # a bucket
            return fs.get_file_info(path).type == pafs.FileType.Directory
        return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)))
    except OSError:
        return False


def stat(p: Any) -> tuple[int, int]:
    """``(size, mtime_ns)`` of an object; FileNotFoundError when it is not there."""
    import pyarrow.fs as pafs

    fs, path = split(p)
    i = fs.get_file_info(path)
    if i.type != pafs.FileType.File:
        raise FileNotFoundError(uri(p))
    return i.size or 0, i.mtime_ns or 0


def exists(p: Any) -> bool:
    try:
        stat(p)
        return True
    except FileNotFoundError:
        return False


def open_input(p: Any):
    """A random-access reader of an object (what pyarrow.parquet and DuckDB's scans take)."""
    fs, path = split(p)
    return fs.open_input_file(path)


def open_stream(p: Any):
    """A sequential reader of an object (one GET, no HEAD): for reading it in chunks."""
    fs, path = split(p)
    return fs.open_input_stream(path)


def read_bytes(p: Any) -> bytes:
    """The whole object in one GET (a stream needs no HEAD for the size first)."""
    fs, path = split(p)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def put(p: Any, data) -> None:
    """Write ``data`` (bytes, a pyarrow Buffer, or a list of them) as the object ``p``, all at once.

    The object appears complete when the upload finishes, or not at all (a killed writer
    never completes its upload). The bytes are gathered first so that no failure half-way
    through producing them can reach the store.
    """
    fs, path = split(p)
    parts = data if isinstance(data, (list, tuple)) else (data,)
    out = fs.open_output_stream(path)
    for part in parts:
        out.write(part)
    out.close()


def delete(p: Any) -> bool:
    """Delete one object; False when it was already gone or could not be deleted."""
    fs, path = split(p)
    try:
        fs.delete_file(path)
        return True
    except OSError:
        return False


def touch(p: Any) -> None:
    """Write an empty object (its modification time is the server's now): heartbeats."""
    put(p, b"")


def parquet_bytes(write) -> pa.Buffer:
    """Run ``write(sink)`` against an in-memory sink and return the bytes (for :func:`put`)."""
    sink = pa.BufferOutputStream()
    write(sink)
    return sink.getvalue()


# -- the local spool of an object-store store ------------------------------------------------------

def spool_dir(store: str) -> Path:
    """The local folder that holds parts for ``store`` while it cannot be reached (never on the store)."""
    import hashlib

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri(store))[:80]
    return Path(base) / "flightlog" / "spool" / f"{name}-{hashlib.sha1(uri(store).encode()).hexdigest()[:10]}"


_spools: dict[str, "Spool"] = {}


def spool_for(root: str) -> "Spool":
    """The one :class:`Spool` of this process for store ``root`` (shared by sinks and blob writes)."""
    key = uri(root).rstrip("/")
    with _fs_lock:
        sp = _spools.get(key)
        if sp is None:
            sp = _spools[key] = Spool(key)
    return sp


class Spool:
    """Parts for an object store that failed to upload, kept locally under their final names.

    A part that cannot be written goes to :func:`spool_dir` (``<table>/run_id=<id>/<part name>``,
    the same relative key it will have in the store) and the writer backs off for a few seconds;
    every later write and :meth:`drain` upload what is spooled, oldest first, and delete the local
    copy once the upload completed. Leftovers of a process that died meanwhile are uploaded by the
    next writer of the same store. Part names carry their writer and sequence number, so late
    parts never collide with anything and readers order them by name.
    """

    BACKOFF = 5.0

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.dir = spool_dir(root)
        self._lock = threading.Lock()
        self._until = 0.0
        self._pending = True  # leftovers of an earlier process: looked for at the first write
        self.spooled = 0
        self.uploaded = 0

    @property
    def unreachable(self) -> bool:
        """True while backing off after a failed upload, or while anything waits in the spool."""
        return time.monotonic() < self._until or self._pending and self._leftovers()

    def _leftovers(self) -> bool:
        try:
            return any(p.is_file() for p in self.dir.rglob("*") if not p.name.startswith("."))
        except OSError:
            return False

    def put_bytes(self, path: Path, data) -> None:
        """Upload a blob, or keep it in the spool when the store cannot be reached (OSError: local disk failed)."""
        key = self._key(path)
        if time.monotonic() >= self._until:
            try:
                put(path, data)
                return
            except OSError:
                self._until = time.monotonic() + self.BACKOFF
        local = self.dir / key
        local.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = local.with_name(f".{local.name}.tmp")
        with open(tmp, "wb") as fh:
            for part in data if isinstance(data, (list, tuple)) else (data,):
                fh.write(part)
        os.replace(tmp, local)
        with self._lock:
            self._pending = True
            self.spooled += 1

    def local_copy(self, path: Path) -> Path | None:
        """The spooled copy of ``path`` when it has not been uploaded yet."""
        try:
            p = self.dir / self._key(path)
        except ValueError:
            return None
        return p if p.is_file() else None

    def write(self, path: Path, data: pa.Table, table: str) -> None:
        from flightlog.collector import store as _store

        key = self._key(path)
        if time.monotonic() >= self._until:
            if self._pending:
                self.drain()
            try:
                _store.write_parquet_atomic(path, data, table)
                return
            except OSError as e:
                self.unreachable_for_now(e)
        local = self.dir / key
        _store.write_parquet_atomic(local, data, table)  # raises only when the local disk fails too
        with self._lock:
            self._pending = True
            self.spooled += 1

    def unreachable_for_now(self, err: BaseException) -> None:
        """An upload elsewhere just failed: back off (later parts go to the spool without trying)."""
        self._until = time.monotonic() + self.BACKOFF
        import logging

        logging.getLogger("flightlog").warning(
            "flightlog: store %s unreachable (%s); spooling parts in %s", uri(self.root), err, self.dir)

    def _key(self, path: Path) -> str:
        full, root = uri(path), uri(self.root)
        if not full.startswith(root + "/"):
            raise ValueError(f"{full} is outside the store {root}")
        return full[len(root) + 1:]

    def drain(self, deadline: float | None = None) -> int:
        """Upload spooled parts (oldest first); returns how many are still waiting."""
        with self._lock:
            try:
                files = sorted((p for p in self.dir.rglob("*") if p.is_file() and not p.name.startswith(".")
                                and "scratch" not in p.relative_to(self.dir).parts[:1]
                                and "collector" not in p.relative_to(self.dir).parts[:1]),
                               key=lambda p: p.name)
            except OSError:
                files = []
            left = len(files)
            for p in files:
                if deadline is not None and time.monotonic() > deadline:
                    break
                rel = p.relative_to(self.dir).as_posix()
                try:
                    put(f"{self.root}/{rel}", p.read_bytes())
                except OSError:
                    self._until = time.monotonic() + self.BACKOFF
                    break
                try:
                    p.unlink()
                except OSError:
                    pass
                left -= 1
                self.uploaded += 1
            self._pending = left > 0
            return left


class PositionalReader(io.RawIOBase):
    """A read-only file object over an object, safe to share between threads.

    DuckDB may read one handle from several threads (seek, then read); pyarrow releases the GIL
    while it fetches, so a shared position could move between one thread's seek and its read.
    Each thread keeps its own position here and every read is a positional ``read_at``.
    """

    def __init__(self, path: Any, size: int | None = None) -> None:
        super().__init__()
        self._f = open_input(path)
        self._size = self._f.size() if size is None else size
        self._pos = threading.local()
        self.name = uri(path)

    def _get(self) -> int:
        return getattr(self._pos, "v", 0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._get(), 2: self._size}[whence]
        self._pos.v = max(0, base + offset)
        return self._pos.v

    def tell(self) -> int:
        return self._get()

    def read(self, n: int = -1) -> bytes:
        pos = self._get()
        if n is None or n < 0:
            n = max(0, self._size - pos)
        n = max(0, min(n, self._size - pos))
        b = self._f.read_at(n, pos) if n else b""
        self._pos.v = pos + len(b)
        return bytes(b)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buf) -> int:
        b = self.read(len(buf))
        buf[: len(b)] = b
        return len(b)

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            super().close()
