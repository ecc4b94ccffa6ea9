"""The only file system a sandboxed DuckDB connection has: the store's listed files, read-only, held open.

Why a file system of our own: DuckDB's ``allowed_paths``/``allowed_directories``
allow-lists grant writing as well as reading (``COPY … TO '<listed file>'
(USE_TMP_FILE false)`` overwrites an allowed file), and its ``access_mode=READ_ONLY``
covers only the database file. So a sandboxed connection gets
``disabled_filesystems='LocalFileSystem'`` — no path on the machine can be opened
at all — and reads the store through :class:`StoreFS`, which knows a fixed set of
files, opens them only for reading and refuses every other operation. A query can
then neither create, overwrite nor delete a file, whatever statement gets through.

Why held open: compaction deletes a run's parts after renaming the merged file in.
Each listed file is opened when it is listed (:meth:`Held.add`) and read through
that descriptor with ``pread``, so a reader keeps seeing the set it listed (the
parts, or the compacted file, never neither) even if the names are gone by the
time the query runs. Past a descriptor budget (a quarter of the process's open-file
limit) further files are read by name.
"""
from __future__ import annotations

import datetime as _dt
import io
import os
import threading
from typing import Any

PROTOCOL = "flightlog"
_PREFIX = PROTOCOL + "://"


def _fd_budget() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY or soft <= 0:
            soft = 65536
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(32, min(4096, soft // 4))


class _Entry:
    __slots__ = ("fd", "size", "mtime_ns")

    def __init__(self, fd: int | None, size: int, mtime_ns: int) -> None:
        self.fd, self.size, self.mtime_ns = fd, size, mtime_ns


class Held:
    """Files of one reader, each opened (read-only) when listed so later deletion cannot pull it away."""

    def __init__(self, max_open: int | None = None) -> None:
        self._files: dict[str, _Entry] = {}
        self._max = _fd_budget() if max_open is None else max_open
        self._open = 0
        self._lock = threading.Lock()

    def add(self, path: str) -> _Entry:
        """Hold ``path``; FileNotFoundError when it vanished since it was listed (the caller relists)."""
        path = os.fspath(path)
        with self._lock:
            hit = self._files.get(path)
            if hit is not None:
                return hit
            from flightlog.collector import fs as _fs

            if _fs.is_remote(path):  # an object cannot be held open: its size and time as listed
                size, mtime_ns = _fs.stat(path)
                e = self._files[path] = _Entry(None, size, mtime_ns)
                return e
            if self._open < self._max:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    st = os.fstat(fd)
                except OSError:
                    os.close(fd)
                    raise
                self._open += 1
            else:
                fd, st = None, os.stat(path)
            e = self._files[path] = _Entry(fd, st.st_size, st.st_mtime_ns)
            return e

    def drop(self, paths) -> None:
        """Stop holding ``paths`` (a listing that is being retried)."""
        with self._lock:
            for p in paths:
                e = self._files.pop(os.fspath(p), None)
                if e is not None and e.fd is not None:
                    self._open -= 1
                    try:
                        os.close(e.fd)
                    except OSError:
                        pass

    def entry(self, path: str) -> _Entry | None:
        return self._files.get(path)

    def stat(self, path: str) -> tuple[int, int]:
        """(size, mtime_ns) as of when the file was held."""
        e = self._files[os.fspath(path)]
        return e.size, e.mtime_ns

    def reader(self, path: str) -> io.RawIOBase:
        """A private read-only file object over a held file (its own position; the descriptor is shared)."""
        e = self._files.get(os.fspath(path))
        if e is None:
            raise PermissionError(f"not a file of this store snapshot: {path}")
        if e.fd is None:
            from flightlog.collector import fs as _fs

            if _fs.is_remote(path):  # read-only positional reads through pyarrow's file system
                return _fs.PositionalReader(path, e.size)
            return open(path, "rb", buffering=0)
        return _PreadFile(e.fd, e.size, path, self)

    def paths(self) -> list[str]:
        return list(self._files)

    def close(self) -> None:
        with self._lock:
            for e in self._files.values():
                if e.fd is not None:
                    try:
                        os.close(e.fd)
                    except OSError:
                        pass
            self._files.clear()
            self._open = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _PreadFile(io.RawIOBase):
    """Positioned reads on a shared descriptor: independent positions, never closes the descriptor."""

    def __init__(self, fd: int, size: int, name: str, owner: Held) -> None:
        super().__init__()
        self._fd, self._size, self._pos, self.name = fd, size, 0, name
        self._owner = owner  # the descriptor stays open while any reader of it is alive

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(0, self._size - self._pos)
        b = os.pread(self._fd, n, self._pos)
        self._pos += len(b)
        return b

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buf) -> int:
        b = self.read(len(buf))
        buf[: len(b)] = b
        return len(b)

    @property
    def size(self) -> int:
        return self._size


def url(path: str | os.PathLike) -> str:
    """How a sandboxed connection names a held file."""
    return _PREFIX + os.fspath(path)


def register(con: Any, held: Held) -> None:
    """Give ``con`` the read-only file system over ``held`` (fsspec is imported only here)."""
    con.register_filesystem(_fs_class()(held))


_FS_CLASS = None


def _fs_class():
    global _FS_CLASS
    if _FS_CLASS is not None:
        return _FS_CLASS
    from fsspec.spec import AbstractFileSystem

    def _refuse(self, *a, **k):
        raise PermissionError("the store is read-only to queries")

    class StoreFS(AbstractFileSystem):
        """fsspec file system over a :class:`Held` set: open for reading, stat, nothing else."""

        protocol = PROTOCOL
        cachable = False

        def __init__(self, held: Held) -> None:
            super().__init__()
            self._held = held

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            return path[len(_PREFIX):] if path.startswith(_PREFIX) else path

        def _entry(self, path) -> tuple[str, _Entry]:
            p = self._strip_protocol(path)
            e = self._held.entry(p)
            if e is None:
                raise PermissionError(f"not a file of this store snapshot: {p}")
            return p, e

        def _open(self, path, mode="rb", **kw):
            if mode != "rb":
                raise PermissionError(f"the store is read-only to queries (open {path!r} with mode {mode!r})")
            p, _ = self._entry(path)
            return self._held.reader(p)

        def info(self, path, **kw):
            p, e = self._entry(path)
            return {"name": p, "size": e.size, "type": "file", "mtime": e.mtime_ns / 1e9}

        def size(self, path):
            return self._entry(path)[1].size

        def modified(self, path):
            return _dt.datetime.fromtimestamp(self._entry(path)[1].mtime_ns / 1e9, tz=_dt.timezone.utc)

        def exists(self, path, **kw):
            return self._held.entry(self._strip_protocol(path)) is not None

        def isfile(self, path):
            return self.exists(path)

        def isdir(self, path):
            return False

        def ls(self, path, detail=True, **kw):
            i = self.info(path)
            return [i] if detail else [i["name"]]

        def glob(self, path, **kw):
            p, _ = self._entry(path)  # no patterns: only the exact names of held files
            return [p]

        rm = _rm = rm_file = rmdir = mv = _mv = mkdir = makedirs = touch = _refuse
        cp_file = copy = put = put_file = pipe = pipe_file = _put_file = _refuse

    _FS_CLASS = StoreFS
    return StoreFS
