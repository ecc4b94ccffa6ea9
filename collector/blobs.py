"""Content-addressed blobs: checkpoints, code snapshots and captured step inputs, stored once by hash.

A blob lives at ``<root>/blobs/<h[:2]>/<h>`` where ``h`` is the xxh3-128 of its bytes (32 lower-case
hex digits, the only names blobs have). Identical content is stored once. The store is a trust
boundary: a reference that is not a blob id never becomes a path, and :func:`read_blob` verifies
the bytes hash to their name (and, locally, that the file resolves inside ``<root>/blobs``) before
any caller unpickles them. On an object store a blob that cannot be uploaded waits in the local
spool (``fs.Spool``) and is read back from there until it is.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from flightlog._errors import StoreError
from flightlog.collector import fs as _fs
from flightlog.collector.store import write_bytes_atomic

_BLOB_ID = re.compile(r"^[0-9a-f]{32}$")  # xxh3-128, lower-case hex: the only names blobs have


class BlobError(StoreError):
    """A blob reference or a blob's content that the store must not trust (bad id, outside the store, tampered)."""


def check_blob_id(digest: Any) -> str:
    """``digest`` if it can name a blob (32 lower-case hex digits); BlobError otherwise, e.g. for ``../x``."""
    if not isinstance(digest, str) or not _BLOB_ID.match(digest):
        raise BlobError(f"invalid blob reference {str(digest)[:80]!r} (expected 32 hex digits)")
    return digest


def blob_path(root: str | os.PathLike, digest: str) -> Path:
    """Where the blob ``digest`` lives; BlobError for anything that is not a blob id (never a path outside)."""
    digest = check_blob_id(digest)
    return Path(root) / "blobs" / digest[:2] / digest


def has_blob(root: str | os.PathLike, digest: Any) -> bool:
    """Whether blob ``digest`` is stored; False for a reference that cannot name a blob."""
    try:
        p = blob_path(root, digest)
        return _fs.exists(p) if _fs.is_remote(p) else p.is_file()
    except BlobError:
        return False


def blob_digest(data) -> str:
    """The content hash blobs are named by (xxh3-128 of the bytes)."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def put_blob(root: str | os.PathLike, digest: str, data, fsync: bool = False,
             likely_new: bool = False) -> tuple[Path, bool]:
    """Store ``data`` (bytes, or a list of buffers written one after another) under its content hash.

    Identical blobs are stored once. Returns the path and whether a new file was written.
    ``likely_new`` (a checkpoint: its RNG states make it unique): on an object store, upload
    without asking first whether it exists (a HEAD per blob); a PUT of the same bytes is harmless.
    """
    path = blob_path(root, digest)
    if _fs.is_remote(path):  # content-addressed: an existing object already holds these bytes
        sp = _fs.spool_for(os.fspath(root))
        try:
            if not likely_new and not sp.unreachable and _fs.exists(path):
                return path, False
        except OSError:
            pass
        sp.put_bytes(path, data)  # uploaded now, or spooled locally until the store answers
        return path, True
    if path.exists():
        try:  # a fresh mtime: `flightlog gc` spares recent blobs whose reference may not be written yet
            os.utime(path)
            return path, False
        except FileNotFoundError:  # removed (gc) between the check and now: write it again
            pass
        except OSError:
            return path, False
    write_bytes_atomic(path, data, fsync=fsync)
    return path, True


def _open_blob(root: str | os.PathLike, digest: str, what: str):
    """``(path, binary reader)`` of blob ``digest``; BlobError for a bad id or a file that resolves
    outside ``<root>/blobs`` (a planted symlink), FileNotFoundError/OSError when it cannot be read."""
    path = blob_path(root, digest)
    if _fs.is_remote(path):  # object stores have no links: the key is the only name
        local = _fs.spool_for(os.fspath(root)).local_copy(path)  # written here, not uploaded yet
        return path, (open(local, "rb") if local is not None else _fs.open_stream(path))
    base = os.path.realpath(os.path.join(os.fspath(root), "blobs"))
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) != base:
        raise BlobError(f"{what} {digest} resolves outside the store ({real}); refusing to read it")
    return path, open(real, "rb")


def verify_blob(root: str | os.PathLike, digest: str, chunk: int = 8 << 20) -> bool:
    """Whether blob ``digest`` is stored, inside the store, and hashes to its name; read in chunks.

    For checking many (large) checkpoints before a replay plans with them: memory stays at one
    chunk per call, where :func:`read_blob` holds the whole blob. False for a bad id, a missing or
    unreadable blob, one outside the store, and tampered content.
    """
    import xxhash

    try:
        _, fh = _open_blob(root, digest, "blob")
        h = xxhash.xxh3_128()
        with fh:
            while b := fh.read(chunk):
                h.update(b)
        return h.hexdigest() == digest
    except (OSError, BlobError, ValueError):
        return False


def read_blob(root: str | os.PathLike, digest: str, what: str = "blob") -> bytes:
    """The bytes of blob ``digest``, verified: the store is a trust boundary.

    Refuses (BlobError) a reference that is not a blob id, a blob file that resolves
    outside ``<root>/blobs`` (a planted symlink), and content whose hash is not
    ``digest`` (tampered or damaged) -- before any caller unpickles it. A missing
    blob is FileNotFoundError.
    """
    path, fh = _open_blob(root, digest, what)
    with fh:
        data = fh.read()
    got = blob_digest(data)
    if got != digest:
        raise BlobError(f"{what} {digest} is corrupt or was tampered with: its content hashes to {got}; "
                        f"refusing to load it ({path})")
    return data
