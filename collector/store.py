"""Store layout, the atomic part writer, part listing and compaction.

Layout: ``<root>/<table>/run_id=<id>/<file>.parquet`` where ``<file>`` is

* ``part-<seq>-<writer>``: one flush of one writer (a process, or a server
  request), ``seq`` increasing per writer;
* ``compact-<writer>-<lo>-<hi>``: the merge of some of that writer's parts
  between lo and hi. The exact batch numbers it holds are in its footer
  (key ``flightlog.batches``, sorted ``[a, b]`` ranges): a batch spooled by a
  remote client and delivered after the merge falls inside lo..hi without
  being in the file, so membership, never the range, decides what it covers.

Every file is written under a dot-prefixed temporary name and renamed, so a
reader never sees a torn file. Compaction renames the merged file in first and
deletes the parts after; readers skip parts covered by a compact file, so a
crash between the two steps never shows a row twice. Blobs (``<root>/blobs/<hash[:2]>/<hash>``)
are ``blobs.py``.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flightlog import _config
from flightlog.collector import fs as _fs
from flightlog.collector import schema as _schema

log = logging.getLogger("flightlog")

_PART = re.compile(r"^part-(\d+)-([A-Za-z0-9]+)\.parquet$")
_COMPACT = re.compile(r"^compact-([A-Za-z0-9]+)-(\d+)-(\d+)\.parquet$")
_SAFE_RUN = re.compile(r"^[A-Za-z0-9_.:@+=-]{1,128}$")

# Encoding choices measured on metric rows: byte-stream-split + zstd halves
# random float64 columns; dictionary encoding suits the repetitive strings.
_WRITE_OPTS = dict(compression="zstd", compression_level=3, write_statistics=True)


# The store and the spool hold pickles and everything a run logged: owner-only, whatever the umask.
DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private_dirs(d: str | os.PathLike) -> None:
    """Create ``d`` and any missing parents as owner-only directories (0o700, whatever the umask).

    Directories that already exist are left as they are.
    """
    if _fs.is_remote(d):  # object stores have no directories
        return
    d = Path(d)
    if d.is_dir():
        return
    missing = []
    p = d
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(p, DIR_MODE)


def new_writer_id() -> str:
    """A file-name-safe id, unique per process (and per fork) and, by its random part, per host."""
    return f"p{os.getpid()}{uuid.uuid4().hex[:6]}"


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _SAFE_RUN.fullmatch(run_id) or run_id in (".", ".."):
        raise ValueError(f"invalid run id {run_id!r}")
    return run_id


def table_dir(root: str | os.PathLike, table: str) -> Path:
    _schema.schema(table)
    return Path(root) / table


def part_dir(root: str | os.PathLike, table: str, run_id: str) -> Path:
    return table_dir(root, table) / f"run_id={check_run_id(run_id)}"


def _column_encodings(table: str, data: pa.Table) -> dict:
    enc = {}
    for f in data.schema:
        if pa.types.is_float64(f.type) and f.name == "value":
            enc[f.name] = "BYTE_STREAM_SPLIT"
    return enc


def write_parquet_atomic(path: Path, data: pa.Table, table: str, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary name and a rename (object stores: once, under its name)."""
    enc = _column_encodings(table, data)
    if _fs.is_remote(path):
        _fs.put(path, _fs.parquet_bytes(lambda sink: pq.write_table(
            data, sink, use_dictionary=[f.name for f in data.schema if f.name not in enc],
            column_encoding=enc or None, **_WRITE_OPTS)))
        return
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(
            data,
            tmp,
            use_dictionary=[f.name for f in data.schema if f.name not in enc],
            column_encoding=enc or None,
            **_WRITE_OPTS,
        )
        os.chmod(tmp, FILE_MODE)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalSink:
    """Writes finished batches as Parquet parts under a local store directory.

    One instance per process; ``seq`` is per writer so names never collide
    across processes writing the same run partition.
    """

    def __init__(self, root: str | os.PathLike, writer: str | None = None, fsync: bool = False):
        self.root = Path(root)
        self.writer = writer or new_writer_id()
        self.fsync = fsync
        self._seq = 0
        self._lock = threading.Lock()
        self._written: dict[tuple[str, str], list[int]] = {}
        # object stores: parts that cannot be uploaded wait in a local spool (see fs.Spool)
        self.spool = _fs.spool_for(os.fspath(root)) if _fs.is_remote(root) else None
        # an object-store heartbeat is a PUT (an HTTP request, a billed call): every 10 s is enough
        # for readers, which call a run crashed after STALE_SECONDS (30 s) without one
        self.heartbeat_seconds = 10.0 if self.spool is not None else _config.HEARTBEAT_SECONDS
        # object stores: this writer's files per (table, run), kept in memory to merge without GETs
        self._kept: dict[tuple[str, str], _Kept] = {}
        self._kept_writer = self.writer
        self._finishing = False

    def write(self, table: str, data: pa.Table) -> None:
        """Write one batch (rows of possibly several runs) as one part per run."""
        if data.num_rows == 0:
            return
        data = _schema.conform(table, data, keep_dictionary=True)
        runs = data.column("run_id")
        if pa.types.is_dictionary(runs.type):
            runs = runs.cast(pa.string())
        uniq = pc.unique(runs).to_pylist()
        for run_id in uniq:
            if run_id is None:
                raise ValueError(f"{table}: rows without run_id")
            sub = data if len(uniq) == 1 else data.filter(pc.equal(runs, run_id))
            with self._lock:
                self._seq += 1
                seq = self._seq
            path = part_dir(self.root, table, run_id) / f"part-{seq:08d}-{self.writer}.parquet"
            merged = False
            if self.spool is not None:
                # a small partition, or a run that is ending: the batch goes straight into the
                # partition's merged file (one PUT, as a part would be, and no part left to merge)
                merged = self._write_merged(table, run_id, seq, sub)
                if not merged:
                    self.spool.write(path, sub, table)
            else:
                write_parquet_atomic(path, sub, table, fsync=self.fsync)
            with self._lock:
                self._written.setdefault((table, run_id), []).append(seq)
            if self.spool is not None:
                self._keep(table, run_id, seq, None if merged else sub)

    def finishing(self) -> None:
        """The run starts to finish (Sink's optional hook): on an object store, later batches are
        written merged with what the partition holds (one PUT, where a part would need a PUT now,
        and a GET or memory, a PUT and a DELETE at the merge)."""
        self._finishing = self.spool is not None

    # -- object stores: this writer's files in memory, merged as the run goes ------------------------

    def _kept_state(self) -> dict[tuple[str, str], "_Kept"]:
        """The kept files of the current writer (a forked child gets a new writer id: start afresh)."""
        if self._kept_writer != self.writer:
            for k in self._kept.values():
                k.forget()
            self._kept = {}
            self._kept_writer = self.writer
        return self._kept

    def _keep(self, table: str, run_id: str, seq: int, data: pa.Table | None) -> None:
        """Remember a stored part (``data``; None: it went into a merged file); merge the partition's
        parts when enough have gathered, and delete files replaced long enough ago (on the flush
        thread, while training goes on). Never raises: the batch is stored already."""
        try:
            kept = self._kept_state()
            with self._lock:
                k = kept.get((table, run_id))
                if k is None:
                    k = kept[(table, run_id)] = _Kept(part_dir(self.root, table, run_id), table, self.writer)
                every = list(kept.values())
            if data is not None:
                k.add(seq, data)
            if self.spool.unreachable:  # no round trips while the store cannot be reached
                return
            if k.should_merge():
                k.merge()
            for k in every:
                k.delete_doomed(older_than=DELETE_GRACE_SECONDS)
        except Exception as e:  # noqa: BLE001 - merging is an optimisation; the run's end merges anyway
            log.warning("flightlog: merging %s parts as the run goes failed: %r", table, e)

    def _write_merged(self, table: str, run_id: str, seq: int, data: pa.Table) -> bool:
        """Store batch ``seq`` inside a new merged file of its partition; False: write it as a part."""
        try:
            k = self._kept_state().get((table, run_id))
            if k is None or not k.complete or not (self._finishing or k.small(data)) or self.spool.unreachable:
                return False
            return k.merge(extra=(seq, data))
        except OSError as e:  # the store cannot be reached: straight to the spool, without a second try
            self.spool.unreachable_for_now(e)
            return False
        except Exception as e:  # noqa: BLE001 - the part path stores it
            log.warning("flightlog: could not write %s rows merged: %r", table, e)
            return False

    def _compact_remote(self, run_id: str, tables: Iterable[str] | None) -> None:
        """The run's end on an object store: one file per table, all tables at once.

        Partitions whose files are all in memory are merged without listing or GETs; the others
        (over the memory bound) through the store, as ``flightlog compact`` does. The replaced files
        are deleted last, all together.
        """
        kept = self._kept_state()
        with self._lock:
            keys = [key for key in kept if key[1] == run_id and (tables is None or key[0] in tables)]
        todo = [kept[key] for key in keys]

        def one(k: "_Kept") -> None:
            if k.complete:
                k.merge()
            if not k.complete:  # over the memory bound (or the merge from memory failed)
                compact_dir(k.dir, k.table, self.writer)
            k.drop_memory()  # the run is over: later writes (rare) merge through the store

        _each(one, todo)
        _each(_fs.delete, [p for k in todo for p in k.take_doomed()])

    def compact(self, run_id: str, tables: Iterable[str] | None = None) -> None:
        """Merge this writer's parts of ``run_id`` into one file per table."""
        if self.spool is not None and self.spool.unreachable:  # later: `flightlog compact` merges them
            return
        if self.spool is not None:
            self._compact_remote(run_id, tables)
            return
        for table in tables or _schema.TABLES:
            d = part_dir(self.root, table, run_id)
            if is_dir(d):
                compact_dir(d, table, self.writer, fsync=self.fsync)

    def heartbeat(self, run_id: str) -> None:
        touch_heartbeat(self.root, run_id, self.writer)

    def close(self) -> None:
        if self.spool is not None:  # a last try at uploading what waits in the local spool
            import time

            self.spool.drain(deadline=time.monotonic() + 10.0)
            with self._lock:
                for k in self._kept.values():
                    k.drop_memory()


def compact_dir(d: Path, table: str, writer: str, fsync: bool = False) -> Path | None:
    """Merge every visible file of ``writer`` in partition ``d`` into one compact file.

    One merge per writer and partition at a time (an advisory lock): two merges at once
    (the collector's at finish and ``flightlog compact``) could each delete the other's inputs.
    Object stores have no such lock: there merges of one writer are serialised within the
    process, and across processes two merges only repeat each other's work (each deletes only
    inputs it has written out, and readers skip files a compact file holds).
    """
    if _fs.is_remote(d):
        with _partition_lock(d, writer):
            return _compact_locked(d, table, writer, fsync)
    try:
        import fcntl
    except ImportError:  # no advisory locks here: merge unlocked
        return _compact_locked(d, table, writer, fsync)
    try:
        fd = os.open(d / f".compact-{writer}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _compact_locked(d, table, writer, fsync)
    finally:
        os.close(fd)


_partition_locks = [threading.Lock() for _ in range(64)]


def _partition_lock(d: Path, writer: str) -> threading.Lock:
    """The lock that serialises this process's merges of ``writer`` in partition ``d`` (object stores).

    A fixed pool: two partitions may share a lock (they then merge one after the other), never nested.
    """
    return _partition_locks[hash((str(d), writer)) % len(_partition_locks)]


# -- object stores: a writer's own files kept in memory ----------------------------------------------
#
# Merging a partition through the store costs a GET per part and a DELETE per part at the run's end,
# one round trip each. A writer on an object store therefore keeps what it stored in memory (up to
# KEEP_BYTES per process) and merges from there: while a partition is small (_SMALL_BYTES) every
# batch is written merged with it (one PUT, like a part); a bigger one is merged every MERGE_PARTS
# parts during the run (on the flush thread); once the run finishes its last batches are written
# merged too, so the end writes little more than its last batches and deletes the few files
# replaced within the grace. Files a merge replaced stay DELETE_GRACE_SECONDS for readers
# that listed them just before; the run's end deletes the rest. Readers never see a row twice or miss
# one at any moment: a merged file is written before anything it replaces is deleted, and holds every
# batch of the files it replaces (visible_files skips those).

KEEP_BYTES = 64 << 20
MERGE_PARTS = 8
DELETE_GRACE_SECONDS = 5.0
_CHEAP_MERGE_BYTES = 4 << 20
_SMALL_BYTES = 256 << 10  # a partition this small is rewritten whole at every write (no parts pile up)
_kept_bytes = 0
_kept_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # a lock held by another thread at the fork stays held forever in the child: start with fresh ones
    global _kept_lock, _partition_locks
    _kept_lock = threading.Lock()
    _partition_locks = [threading.Lock() for _ in range(64)]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def kept_bytes() -> int:
    """Bytes of stored parts this process holds in memory for merging (object stores)."""
    return _kept_bytes


def _reserve(n: int) -> bool:
    global _kept_bytes
    with _kept_lock:
        if n > 0 and _kept_bytes + n > KEEP_BYTES:
            return False
        _kept_bytes = max(0, _kept_bytes + n)
        return True


class _Kept:
    """One partition's files of one writer on an object store: the latest merged file and the parts
    written since, each with its rows in memory while ``complete`` (else merges go through the store)."""

    def __init__(self, d: Path, table: str, writer: str) -> None:
        self.dir, self.table, self.writer = d, table, writer
        self.lock = threading.Lock()
        self.complete = True
        self.merged: tuple[str, list[tuple[int, int]], list[pa.Table]] | None = None  # (name, batches, rows)
        self.merged_bytes = 0
        self.parts: dict[int, pa.Table] = {}
        self.parts_bytes = 0
        self.doomed: list[tuple[float, Path]] = []  # (when replaced, file)

    def add(self, seq: int, data: pa.Table) -> None:
        n = data.nbytes
        with self.lock:
            if not self.complete:
                return
            if not _reserve(n):  # over the process's bound: this partition merges through the store
                self._drop()
                return
            self.parts[seq] = data
            self.parts_bytes += n

    def small(self, data: pa.Table) -> bool:
        """Whether rewriting the whole partition with ``data`` costs about as little as a part."""
        with self.lock:
            return self.merged_bytes + self.parts_bytes + data.nbytes <= _SMALL_BYTES

    def should_merge(self) -> bool:
        """Enough parts gathered, and the rewrite of what is merged already is cheap enough for them."""
        with self.lock:
            if not self.complete or len(self.parts) < MERGE_PARTS:
                return False
            return (self.merged_bytes <= _CHEAP_MERGE_BYTES or len(self.parts) >= 8 * MERGE_PARTS
                    or 4 * self.parts_bytes >= self.merged_bytes)

    def merge(self, extra: tuple[int, pa.Table] | None = None) -> bool:
        """Write the merged file and the parts since as one merged file, from memory (no GET).

        ``extra``: a batch not stored yet, written inside the new file (the run's last batches).
        The replaced files join ``doomed``. False when nothing was written (nothing to merge, the store
        failed: everything stays as it was).
        """
        with _partition_lock(self.dir, self.writer):
            with self.lock:
                if not self.complete:
                    return False
                merged, parts = self.merged, sorted(self.parts.items())
            stored = len(parts) + (merged is not None)
            if stored + (extra is not None) < 2 or extra is not None and not _reserve(extra[1].nbytes):
                return False
            new = parts + ([extra] if extra is not None else [])
            spans = list(merged[1]) if merged else []
            members = _merge_spans(spans + [(q, q) for q, _ in new])
            lo, hi = members[0][0], members[-1][1]
            target = self.dir / f"compact-{self.writer}-{lo:08d}-{hi:08d}.parquet"
            rows = (merged[2] if merged else []) + [t for _, t in new]
            try:
                _fs.put(target, _encode_merged(self.table, members, rows))
            except Exception as e:
                if extra is not None:
                    _reserve(-extra[1].nbytes)
                if isinstance(e, OSError):  # the store failed: the parts stay; the end or `flightlog compact` retries
                    log.debug("flightlog: merge of %s failed: %s", target, e)
                    if extra is not None:
                        raise  # the caller spools the batch
                    return False
                log.warning("flightlog: could not merge %s in memory (%r); merging through the store", self.dir, e)
                with self.lock:  # a bug or bad rows: leave it to the merge through the store
                    self._drop()
                return False
            now = time.monotonic()
            old = ([merged[0]] if merged else []) + [f"part-{q:08d}-{self.writer}.parquet" for q, _ in parts]
            with self.lock:
                if not self.complete:  # dropped meanwhile: the file is written, its rows are no longer here
                    if extra is not None:
                        _reserve(-extra[1].nbytes)
                    self.merged = None
                else:
                    for q, _ in parts:
                        self.parts_bytes -= self.parts.pop(q).nbytes
                    self.merged = (target.name, members, rows)
                    self.merged_bytes += sum(t.nbytes for _, t in new)
                self.doomed.extend((now, self.dir / n) for n in old if n != target.name)
            return True

    def delete_doomed(self, older_than: float = 0.0) -> None:
        """Delete replaced files (a merged file holds their rows) replaced more than ``older_than`` s ago."""
        cut = time.monotonic() - older_than
        with self.lock:
            due = [p for t, p in self.doomed if t <= cut]
            self.doomed = [(t, p) for t, p in self.doomed if t > cut]
        if due:
            _each(_fs.delete, due)

    def take_doomed(self) -> list[Path]:
        with self.lock:
            due, self.doomed = [p for _, p in self.doomed], []
        return due

    def _drop(self) -> None:  # lock held
        _reserve(-(self.parts_bytes + self.merged_bytes))
        self.complete = False
        self.merged, self.parts = None, {}
        self.parts_bytes = self.merged_bytes = 0

    def drop_memory(self) -> None:
        """Forget the rows (the run ended, or memory is short); later merges go through the store."""
        with self.lock:
            self._drop()

    def forget(self) -> None:
        """Forget everything, doomed files included: in a forked child, whose writer id is new, these
        are its parent's (to delete, too). No lock: one may have been held by a thread the fork left behind."""
        self.lock = threading.Lock()
        self._drop()
        self.doomed = []


def _encode_merged(table: str, members: list[tuple[int, int]], rows: list[pa.Table]) -> pa.Buffer:
    """One compact file's bytes: ``rows`` in order, the batch numbers they hold in the footer."""
    sch = _schema.schema(table).with_metadata({MEMBERS_KEY: json.dumps(members, separators=(",", ":")).encode()})
    enc = {"value": "BYTE_STREAM_SPLIT"} if table == "metrics" else {}
    buf = pa.BufferOutputStream()
    with pq.ParquetWriter(buf, sch, use_dictionary=[f.name for f in sch if f.name not in enc],
                          column_encoding=enc or None, **_WRITE_OPTS) as w:
        for t in rows:
            w.write_table(_schema.conform(table, t).cast(sch))
    return buf.getvalue()


def is_dir(d: Path) -> bool:
    """Whether partition/folder ``d`` exists (object stores: whether anything is stored under it)."""
    return _fs.isdir(d) if _fs.is_remote(d) else d.is_dir()


def read_file(p: Path) -> pa.Table:
    """One stored Parquet file as a table (local or object store)."""
    return pq.ParquetFile(_fs.open_input(p) if _fs.is_remote(p) else p).read()


def remove(p: Path) -> None:
    """Delete one stored file (local or object store); OSError when it cannot be deleted locally."""
    if _fs.is_remote(p):
        _fs.delete(p)
    else:
        os.unlink(p)


def exists(p: Path) -> bool:
    """Whether file ``p`` is stored (local or object store)."""
    return _fs.exists(p) if _fs.is_remote(p) else p.exists()


def _compact_locked(d: Path, table: str, writer: str, fsync: bool) -> Path | None:
    remote = _fs.is_remote(d)
    hidden: list[Path] | None = [] if remote else None
    files = [f for f in visible_files(d, hidden) if _file_writer(f.name) == writer]
    # object stores: files a merged file holds but that were never deleted (a writer killed between its
    # merge and the deletes, a failed DELETE) are deleted here, so `flightlog compact` cleans them up
    covered = [f for f in hidden or () if _file_writer(f.name) == writer]
    if len(files) < 2:
        if covered:
            _each(_fs.delete, covered)
        return None
    spans: list[tuple[int, int]] = []
    for f in files:
        m = _PART.match(f.name)
        if m:
            spans.append((int(m.group(1)), int(m.group(1))))
        else:
            got = compact_members(f)
            if got is None:  # unreadable: leave this writer's files as they are
                return None
            spans.extend(got)
    members = _merge_spans(spans)
    lo, hi = members[0][0], members[-1][1]
    target = d / f"compact-{writer}-{lo:08d}-{hi:08d}.parquet"
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    sch = _schema.schema(table).with_metadata({MEMBERS_KEY: json.dumps(members, separators=(",", ":")).encode()})
    enc = {"value": "BYTE_STREAM_SPLIT"} if table == "metrics" else {}
    try:
        with pq.ParquetWriter(
            buf := pa.BufferOutputStream() if remote else tmp,
            sch,
            use_dictionary=[f.name for f in sch if f.name not in enc],
            column_encoding=enc or None,
            **_WRITE_OPTS,
        ) as w:
            for f, src in _sources(files, remote):
                try:
                    t = pq.ParquetFile(src).read()  # (read_table imports pandas)
                except Exception as e:  # a torn or foreign file: leave it where it is
                    log.warning("flightlog: not compacting unreadable file %s: %s", f, e)
                    raise
                w.write_table(_schema.conform(table, t).cast(sch))
        if remote:
            _fs.put(target, buf.getvalue())
        else:
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, target)
        if fsync and not remote:
            _fsync_dir(d)
    except Exception:
        try:
            if not remote:
                tmp.unlink()
        except OSError:
            pass
        return None
    old = [f for f in files if f.name != target.name]  # the same name: an earlier merge, replaced just now
    if remote:
        _each(_fs.delete, old + [f for f in covered if f.name != target.name])
        return target
    for f in old:
        try:
            f.unlink()
        except OSError:
            pass
    return target


_IO_THREADS = 8


def _each(fn, items: list) -> list:
    """``[fn(x) for x in items]`` over up to 8 plain threads (object-store round trips), in order.

    Plain threads, not an executor: runs usually end in an ``atexit`` handler, where
    ``concurrent.futures`` refuses new work. The first exception is raised after all finished.
    """
    if len(items) < 2:
        return [fn(x) for x in items]
    out: list = [None] * len(items)
    errors: list[BaseException] = []
    nxt = iter(range(len(items)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                k = next(nxt, None)
            if k is None:
                return
            try:
                out[k] = fn(items[k])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)

    threads = [threading.Thread(target=work, name="flightlog-io", daemon=True)
               for _ in range(min(_IO_THREADS, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _sources(files: list[Path], remote: bool):
    """``(file, readable)`` in order; on an object store fetched 8 at a time (one round trip each,
    and the run's end waits for them), never more than a window of parts in memory."""
    if not remote:
        yield from ((f, f) for f in files)
        return
    for i in range(0, len(files), _IO_THREADS):
        chunk = files[i:i + _IO_THREADS]
        try:
            got = _each(_fs.read_bytes, chunk)
        except Exception:  # one unreadable part: read them one by one, so the error names it
            got = [None] * len(chunk)
        for f, data in zip(chunk, got):
            yield f, (pa.BufferReader(data) if data is not None else _fs.open_input(f))


MEMBERS_KEY = b"flightlog.batches"
_MAX_SPANS = 1_000_000
_members_cache: dict[str, tuple[tuple[int, int, int], tuple[tuple[int, int], ...]]] = {}
_members_lock = threading.Lock()


def _merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ``(a, b)`` ranges covering exactly the given ones."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def compact_members(path: Path, listed: tuple[int, int] | None = None) -> tuple[tuple[int, int], ...] | None:
    """The batch numbers a compact file holds, as sorted ``(a, b)`` ranges; None if it cannot be read.

    Files written before the numbers were recorded hold their whole name range.
    Cached by inode, mtime and size: a compact file never changes once renamed in. On an object
    store ``listed`` is the ``(size, mtime_ns)`` a listing just gave (saves a HEAD per lookup).
    """
    m = _COMPACT.match(path.name)
    if not m:
        return None
    try:
        if _fs.is_remote(path):
            size, mtime = listed if listed is not None and listed[0] >= 0 and listed[1] else _fs.stat(path)
            key = (0, mtime, size)
        else:
            st = os.stat(path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return None
    with _members_lock:
        hit = _members_cache.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    lo, hi = int(m.group(2)), int(m.group(3))
    try:
        meta = pq.read_metadata(_fs.open_input(path) if _fs.is_remote(path) else path).metadata or {}
    except Exception:
        return None
    raw = meta.get(MEMBERS_KEY)
    spans: tuple[tuple[int, int], ...] = ((lo, hi),)
    if raw is not None:
        try:
            got = json.loads(raw)
            if not isinstance(got, list) or len(got) > _MAX_SPANS:
                raise ValueError("not a list of ranges")
            parsed = []
            for a, b in got:
                if type(a) is not int or type(b) is not int or not lo <= a <= b <= hi:
                    raise ValueError(f"range {a!r}-{b!r} outside {lo}-{hi}")
                parsed.append((a, b))
            spans = tuple(_merge_spans(parsed)) or spans
        except (ValueError, TypeError) as e:
            log.warning("flightlog: %s has an unreadable batch list (%s); taking its whole range", path, e)
    with _members_lock:
        if len(_members_cache) > 4096:
            _members_cache.clear()
        _members_cache[str(path)] = (key, spans)
    return spans


def _in_spans(spans: tuple[tuple[int, int], ...], seq: int) -> bool:
    i = bisect.bisect_right(spans, (seq, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= seq <= spans[i][1]


def compact_holds(d: Path, writer: str, seq: int) -> bool:
    """True when a compact file of ``writer`` in partition ``d`` holds batch ``seq`` (not just spans it)."""
    prefix = f"compact-{writer}-"
    try:
        names = _listdir(d)
    except OSError:
        return False
    for n in names:
        m = _COMPACT.match(n)
        if not m or m.group(1) != writer or not n.startswith(prefix):
            continue
        if int(m.group(2)) <= seq <= int(m.group(3)):
            spans = compact_members(d / n)
            if spans is not None and _in_spans(spans, seq):
                return True
    return False


def _file_writer(name: str) -> str | None:
    m = _PART.match(name)
    if m:
        return m.group(2)
    m = _COMPACT.match(name)
    return m.group(1) if m else None


def visible_files(d: Path, hidden: list[Path] | None = None) -> list[Path]:
    """Parquet files of one partition that readers should see, oldest first.

    Skips temporaries and parts already merged into a compact file. ``hidden``, when given, gets
    the skipped files whose every batch a readable compact file was seen to hold (safe to delete).
    """
    try:
        names = _fs.listdir(d) if _fs.is_remote(d) else os.listdir(d)  # object stores: {name: (size, mtime_ns)}
    except OSError:
        return []
    listed = names.get if isinstance(names, dict) else (lambda n: None)
    compacts: dict[str, list[tuple[int, int]]] = {}
    parts = []
    others = []
    for n in names:
        m = _COMPACT.match(n)
        if m:
            compacts.setdefault(m.group(1), []).append((int(m.group(2)), int(m.group(3))))
            continue
        m = _PART.match(n)
        if m:
            parts.append((int(m.group(1)), m.group(2), n))
        elif n.endswith(".parquet") and not n.startswith("."):
            others.append(n)  # foreign file: the reader validates it
    out = []

    def members(w: str, lo: int, hi: int):
        # Only read (cached) when a file falls inside a compact range: the moment between a
        # merge's rename and its deletes, or a batch delivered after the merge.
        n = f"compact-{w}-{lo:08d}-{hi:08d}.parquet"
        return compact_members(d / n, listed(n))

    def holds(w: str, lo: int, hi: int, spans) -> bool:
        got = members(w, lo, hi)
        if got is None:  # vanished or unreadable: its range, as before membership was recorded
            got = ((lo, hi),)
        return all(any(a <= x and y <= b for a, b in got) for x, y in spans)

    def proven(w: str, lo: int, hi: int, spans) -> bool:  # holds, by the batch list actually read
        got = members(w, lo, hi)
        return got is not None and all(any(a <= x and y <= b for a, b in got) for x, y in spans)

    for w, ranges in compacts.items():
        for lo, hi in ranges:
            outer = [(a, b) for a, b in ranges if a <= lo and hi <= b and (a, b) != (lo, hi)]
            if outer:
                mine = members(w, lo, hi)
                if any(holds(w, a, b, mine or ((lo, hi),)) for a, b in outer):
                    if hidden is not None and mine is not None and any(proven(w, a, b, mine) for a, b in outer):
                        hidden.append(d / f"compact-{w}-{lo:08d}-{hi:08d}.parquet")
                    continue
            out.append((lo, d / f"compact-{w}-{lo:08d}-{hi:08d}.parquet"))
    for seq, w, n in parts:
        if any(lo <= seq <= hi and holds(w, lo, hi, ((seq, seq),)) for lo, hi in compacts.get(w, ())):
            if hidden is not None and any(lo <= seq <= hi and proven(w, lo, hi, ((seq, seq),))
                                          for lo, hi in compacts.get(w, ())):
                hidden.append(d / n)
            continue
        out.append((seq, d / n))
    out.sort(key=lambda x: (x[0], x[1].name))
    return [p for _, p in out] + [d / n for n in sorted(others)]


def _listdir(d: Path) -> list[str]:
    return list(_fs.listdir(d)) if _fs.is_remote(d) else os.listdir(d)


def table_files(root: str | os.PathLike, table: str, run_ids: Iterable[str] | None = None) -> list[Path]:
    """Every visible Parquet file of ``table`` (optionally only some runs)."""
    tdir = table_dir(root, table)
    if run_ids is not None:
        dirs = [tdir / f"run_id={r}" for r in run_ids]
    else:
        try:
            dirs = sorted(tdir / n for n in _listdir(tdir) if n.startswith("run_id="))
        except OSError:
            return []
    out: list[Path] = []
    for d in dirs:
        out.extend(visible_files(d))
    return out


def write_bytes_atomic(path: Path, data, fsync: bool = False) -> None:
    """Write ``data`` (bytes, or a list of buffers written one after another) via a temp name + rename.

    The file is readable by its owner only (0o600), whatever the umask.
    On an object store the object is written once under its name (see ``fs.put``).
    """
    if _fs.is_remote(path):
        _fs.put(path, data)
        return
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
        with open(fd, "wb") as fh:
            os.fchmod(fd, FILE_MODE)
            for part in data if isinstance(data, (list, tuple)) else (data,):
                fh.write(part)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise



def touch_heartbeat(root: str | os.PathLike, run_id: str, writer: str) -> None:
    """Refresh the heartbeat file readers use to tell a live run from a crashed one."""
    d = part_dir(root, "runs", run_id)
    if _fs.is_remote(d):
        if not _fs.spool_for(os.fspath(root)).unreachable:  # no network retries while spooling
            _fs.touch(d / f".heartbeat-{writer}")
        return
    make_private_dirs(d)
    p = d / f".heartbeat-{writer}"
    try:
        os.utime(p)
    except FileNotFoundError:
        p.touch(mode=FILE_MODE)
        os.chmod(p, FILE_MODE)


def heartbeat_age(root: str | os.PathLike, run_id: str, now: float) -> float | None:
    """Seconds since the newest heartbeat of ``run_id``, or None without one."""
    d = part_dir(root, "runs", run_id)
    newest = None
    if _fs.is_remote(d):
        try:
            ts = [mt / 1e9 for n, (_, mt) in _fs.listdir(d).items() if n.startswith(".heartbeat-") and mt]
        except OSError:
            return None
        return now - max(ts) if ts else None
    try:
        for n in os.listdir(d):
            if n.startswith(".heartbeat-"):
                t = os.stat(d / n).st_mtime
                newest = t if newest is None or t > newest else newest
    except OSError:
        return None
    return None if newest is None else now - newest
