"""Store layout, the atomic part writer, part listing and compaction.

Layout: ``<root>/<table>/run_id=<id>/<file>.parquet`` where ``<file>`` is

* ``part-<seq>-<writer>``: one flush of one writer (a process, or a server
  request), ``seq`` increasing per writer;
* ``compact-<writer>-<lo>-<hi>``: the merge of that writer's parts lo..hi.

Every file is written under a dot-prefixed temporary name and renamed, so a
reader never sees a torn file. Compaction renames the merged file in first and
deletes the parts after; readers skip parts covered by a compact file, so a
crash between the two steps never shows a row twice. Blobs live in
``<root>/blobs/<hash[:2]>/<hash>``.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flightlog.collector import schema as _schema

log = logging.getLogger("flightlog")

_PART = re.compile(r"^part-(\d+)-([A-Za-z0-9]+)\.parquet$")
_COMPACT = re.compile(r"^compact-([A-Za-z0-9]+)-(\d+)-(\d+)\.parquet$")
_SAFE_RUN = re.compile(r"^[A-Za-z0-9_.:@+=-]{1,128}$")

# Encoding choices measured on metric rows: byte-stream-split + zstd halves
# random float64 columns; dictionary encoding suits the repetitive strings.
_WRITE_OPTS = dict(compression="zstd", compression_level=3, write_statistics=True)


def new_writer_id() -> str:
    """A file-name-safe id, unique per process (and per fork)."""
    return f"p{os.getpid()}{uuid.uuid4().hex[:6]}"


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _SAFE_RUN.match(run_id) or run_id in (".", ".."):
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
    """Write ``data`` to ``path`` via a temporary name and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    enc = _column_encodings(table, data)
    try:
        pq.write_table(
            data,
            tmp,
            use_dictionary=[f.name for f in data.schema if f.name not in enc],
            column_encoding=enc or None,
            **_WRITE_OPTS,
        )
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
            write_parquet_atomic(path, sub, table, fsync=self.fsync)
            with self._lock:
                self._written.setdefault((table, run_id), []).append(seq)

    def compact(self, run_id: str, tables: Iterable[str] | None = None) -> None:
        """Merge this writer's parts of ``run_id`` into one file per table."""
        for table in tables or _schema.TABLES:
            d = part_dir(self.root, table, run_id)
            if d.is_dir():
                compact_dir(d, table, self.writer, fsync=self.fsync)

    def heartbeat(self, run_id: str) -> None:
        touch_heartbeat(self.root, run_id, self.writer)

    def close(self) -> None:
        pass


def compact_dir(d: Path, table: str, writer: str, fsync: bool = False) -> Path | None:
    """Merge every visible file of ``writer`` in partition ``d`` into one compact file."""
    files = [f for f in visible_files(d) if _file_writer(f.name) == writer]
    if len(files) < 2:
        return None
    seqs = []
    for f in files:
        m = _PART.match(f.name)
        if m:
            seqs.append(int(m.group(1)))
        else:
            m = _COMPACT.match(f.name)
            seqs += [int(m.group(2)), int(m.group(3))]
    lo, hi = min(seqs), max(seqs)
    target = d / f"compact-{writer}-{lo:08d}-{hi:08d}.parquet"
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    sch = _schema.schema(table)
    enc = {"value": "BYTE_STREAM_SPLIT"} if table == "metrics" else {}
    try:
        with pq.ParquetWriter(
            tmp,
            sch,
            use_dictionary=[f.name for f in sch if f.name not in enc],
            column_encoding=enc or None,
            **_WRITE_OPTS,
        ) as w:
            for f in files:
                try:
                    t = pq.ParquetFile(f).read()  # (read_table imports pyarrow.dataset and pandas)
                except Exception as e:  # a torn or foreign file: leave it where it is
                    log.warning("flightlog: not compacting unreadable file %s: %s", f, e)
                    raise
                w.write_table(_schema.conform(table, t).cast(sch))
        os.replace(tmp, target)
        if fsync:
            _fsync_dir(d)
    except Exception:
        try:
            tmp.unlink()
        except OSError:
            pass
        return None
    for f in files:
        try:
            f.unlink()
        except OSError:
            pass
    return target


def _file_writer(name: str) -> str | None:
    m = _PART.match(name)
    if m:
        return m.group(2)
    m = _COMPACT.match(name)
    return m.group(1) if m else None


def visible_files(d: Path) -> list[Path]:
    """Parquet files of one partition that readers should see, oldest first.

    Skips temporaries and parts already merged into a compact file.
    """
    try:
        names = os.listdir(d)
    except OSError:
        return []
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
    for w, ranges in compacts.items():
        for lo, hi in ranges:
            covered = any(a <= lo and hi <= b and (a, b) != (lo, hi) for a, b in ranges)
            if not covered:
                out.append((lo, d / f"compact-{w}-{lo:08d}-{hi:08d}.parquet"))
    for seq, w, n in parts:
        if any(lo <= seq <= hi for lo, hi in compacts.get(w, ())):
            continue
        out.append((seq, d / n))
    out.sort(key=lambda x: (x[0], x[1].name))
    return [p for _, p in out] + [d / n for n in sorted(others)]


def table_files(root: str | os.PathLike, table: str, run_ids: Iterable[str] | None = None) -> list[Path]:
    """Every visible Parquet file of ``table`` (optionally only some runs)."""
    tdir = table_dir(root, table)
    if run_ids is not None:
        dirs = [tdir / f"run_id={r}" for r in run_ids]
    else:
        try:
            dirs = sorted(tdir / n for n in os.listdir(tdir) if n.startswith("run_id="))
        except OSError:
            return []
    out: list[Path] = []
    for d in dirs:
        out.extend(visible_files(d))
    return out


# -- blobs -----------------------------------------------------------------

def blob_path(root: str | os.PathLike, digest: str) -> Path:
    return Path(root) / "blobs" / digest[:2] / digest


def write_bytes_atomic(path: Path, data, fsync: bool = False) -> None:
    """Write ``data`` (bytes, or a list of buffers written one after another) via a temp name + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
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


def put_blob(root: str | os.PathLike, digest: str, data, fsync: bool = False) -> tuple[Path, bool]:
    """Store ``data`` (bytes, or a list of buffers written one after another) under its content hash.

    Identical blobs are stored once. Returns the path and whether a new file was written.
    """
    path = blob_path(root, digest)
    if path.exists():
        return path, False
    write_bytes_atomic(path, data, fsync=fsync)
    return path, True


def read_blob(root: str | os.PathLike, digest: str) -> bytes:
    with open(blob_path(root, digest), "rb") as fh:
        return fh.read()


def touch_heartbeat(root: str | os.PathLike, run_id: str, writer: str) -> None:
    """Refresh the heartbeat file readers use to tell a live run from a crashed one."""
    d = part_dir(root, "runs", run_id)
    d.mkdir(parents=True, exist_ok=True)
    p = d / f".heartbeat-{writer}"
    try:
        os.utime(p)
    except FileNotFoundError:
        p.touch()


def heartbeat_age(root: str | os.PathLike, run_id: str, now: float) -> float | None:
    """Seconds since the newest heartbeat of ``run_id``, or None without one."""
    d = part_dir(root, "runs", run_id)
    newest = None
    try:
        for n in os.listdir(d):
            if n.startswith(".heartbeat-"):
                t = os.stat(d / n).st_mtime
                newest = t if newest is None or t > newest else newest
    except OSError:
        return None
    return None if newest is None else now - newest
