"""The hot path: column buffers, the flush thread and the sink behind them.

``fl.log`` appends one tuple to a Python list (a single atomic append, so
threads logging at once never misalign columns). A daemon thread polls the
buffer every 100 ms and turns it into an Arrow batch when it is a second old
or large; a second step hands batches to the sink. Training never waits for
the disk: when the sink fails (disk full, collector down) batches wait in a
bounded queue and the oldest are dropped, counted, once it is full.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from flightlog import _config, _warn
from flightlog.collector import schema as _schema

log = logging.getLogger("flightlog")

NO_CTX = (None, None, None)


class Sink(Protocol):
    """Where finished batches go: a local store, a collector, or memory (tests).

    Everything a run writes goes through its sink: metrics, params, checkpoints
    rows, and ``@fl.step`` spans and io rows (in remote mode too). Plug your own
    with ``fl.init(sink=...)``; these are all the members the recorder and the
    run call (on the flush thread, never on the training thread):

    - ``writer``: a short id unique to this process; a forked child gets a new one.
    - ``write(table, data)``: store one Arrow batch of a table of ``collector.schema``;
      raising means "not stored": the recorder warns, counts ``write_failed`` and
      retries the batch later, dropping (and counting) the oldest when its queue is full.
    - ``heartbeat(run_id)``: the run is alive (every few seconds); failures are ignored.
    - ``compact(run_id)``: the run ended; merge what this writer wrote (may do nothing).
    - ``close()``: the last call.

    Optional: ``finishing()``, called once when the run starts to finish (a remote
    sink starts its deadline for network time then).
    """

    writer: str

    def write(self, table: str, data: pa.Table) -> None: ...
    def heartbeat(self, run_id: str) -> None: ...
    def compact(self, run_id: str) -> None: ...
    def close(self) -> None: ...


SINK_MEMBERS = ("writer", "write", "heartbeat", "compact", "close")


def missing_sink_members(sink: Any) -> list[str]:
    """The :class:`Sink` members ``sink`` lacks (empty: it can be plugged in)."""
    return [m for m in SINK_MEMBERS if not hasattr(sink, m) or (m != "writer" and not callable(getattr(sink, m)))]


class MemorySink:
    """Keeps every batch in memory: ``fl.init(sink=MemorySink())`` records without a store (tests)."""

    def __init__(self, writer: str = "memory") -> None:
        self.writer = writer
        self.batches: dict[str, list[pa.Table]] = {}
        self.beats = 0
        self.compacted: list[str] = []
        self.closed = False

    def write(self, table: str, data: pa.Table) -> None:
        self.batches.setdefault(table, []).append(data)

    def heartbeat(self, run_id: str) -> None:
        self.beats += 1

    def compact(self, run_id: str) -> None:
        self.compacted.append(run_id)

    def close(self) -> None:
        self.closed = True

    def table(self, name: str) -> pa.Table:
        parts = self.batches.get(name, [])
        if not parts:
            return _schema.schema(name).empty_table()
        return pa.concat_tables(parts)


def _f64(a: np.ndarray) -> pa.Array:
    a = np.ascontiguousarray(a, dtype=np.float64)
    return pa.Array.from_buffers(pa.float64(), len(a), [None, pa.py_buffer(a)])


def _i64(a: np.ndarray, valid: np.ndarray | None = None, typ: pa.DataType = pa.int64()) -> pa.Array:
    a = np.ascontiguousarray(a, dtype=np.int64)
    if valid is None or valid.all():
        return pa.Array.from_buffers(typ, len(a), [None, pa.py_buffer(a)])
    bits = np.packbits(valid.astype(np.uint8), bitorder="little")
    return pa.Array.from_buffers(typ, len(a), [pa.py_buffer(bits), pa.py_buffer(a)],
                                 null_count=int(len(a) - valid.sum()))


def _strings(values: list) -> pa.Array:
    """A small string array built from buffers (pa.array would import pandas: 0.2 s, 50 MB)."""
    n = len(values)
    valid = np.array([v is not None for v in values], dtype=bool)
    enc = [v.encode() if v is not None else b"" for v in values]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum([len(b) for b in enc], out=offsets[1:])
    data = pa.py_buffer(b"".join(enc))
    bits = None if valid.all() else pa.py_buffer(np.packbits(valid.astype(np.uint8), bitorder="little"))
    return pa.Array.from_buffers(pa.string(), n, [bits, pa.py_buffer(offsets), data],
                                 null_count=int(n - valid.sum()))


def _dict_column(codes: np.ndarray, uniques: list) -> pa.Array:
    idx = pa.Array.from_buffers(pa.int32(), len(codes), [None, pa.py_buffer(np.ascontiguousarray(codes, np.int32))])
    return pa.DictionaryArray.from_arrays(idx, _strings(uniques))


def _valid_bits(valid: np.ndarray):
    if valid.all():
        return None, 0
    return pa.py_buffer(np.packbits(valid.astype(np.uint8), bitorder="little")), int(len(valid) - valid.sum())


def _column(values: list, typ: pa.DataType) -> pa.Array:
    """One column from Python values, built from buffers (no pandas import, unlike pa.array)."""
    n = len(values)
    if pa.types.is_string(typ):
        return _strings([v if v is None or isinstance(v, str) else str(v) for v in values])
    valid = np.array([v is not None for v in values], dtype=bool)
    bits, nulls = _valid_bits(valid)
    if pa.types.is_floating(typ):
        data = np.array([float(v) if v is not None else 0.0 for v in values], dtype=np.float64)
    elif pa.types.is_timestamp(typ):
        data = np.array([_micros(v) if v is not None else 0 for v in values], dtype=np.int64)
    elif pa.types.is_boolean(typ):
        b = np.packbits(np.array([bool(v) for v in values], dtype=np.uint8), bitorder="little")
        return pa.Array.from_buffers(typ, n, [bits, pa.py_buffer(b)], null_count=nulls)
    elif pa.types.is_integer(typ):
        data = np.array([int(v) if v is not None else 0 for v in values], dtype=np.int64)
    else:
        return pa.array(values, typ)
    return pa.Array.from_buffers(typ, n, [bits, pa.py_buffer(data)], null_count=nulls)


def _micros(v) -> int:
    if isinstance(v, (int, float)):
        return int(v * 1e6) if isinstance(v, float) else int(v)
    ts = v.timestamp()  # aware datetimes; naive ones are taken as UTC below
    if v.tzinfo is None:
        import calendar

        ts = calendar.timegm(v.timetuple()) + v.microsecond / 1e6
    return int(round(ts * 1e6))


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """A table of ``schema`` from dict rows (missing keys are nulls)."""
    cols = [_column([r.get(f.name) for r in rows], f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def dict_batch(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Dict rows → Arrow. pyarrow's C converter is ~5× faster on wide rows but imports pandas on
    first use (0.2 s, 50 MB): a run that only writes a few rows (run, checkpoint index) does not
    pay that; many step/io rows do, once."""
    if len(rows) >= 256 or "pandas" in sys.modules:
        return pa.Table.from_pylist(rows, schema=schema)  # big batches amortise the one-time import
    return rows_table(rows, schema)


def _rank_column(n: int) -> pa.Array:
    """The process's distributed rank (env ``RANK``, set by torchrun/Lightning/accelerate) for every row."""
    raw = os.environ.get("RANK")
    try:
        rank = int(raw) if raw not in (None, "") else None
    except ValueError:
        rank = None
    return pa.nulls(n, pa.int64()) if rank is None else _i64(np.full(n, rank, dtype=np.int64))  # never pa.array(ndarray): it imports pandas


def metric_batch(rows: list, run_id: str, source: str, writer: str) -> pa.Table:
    """Turn buffered ``(name, value, step, time, ctx)`` tuples into a metrics batch.

    Column by column with list comprehensions and numpy, strings through small
    dictionaries: ~0.25 µs a row, so the flush thread keeps up with a hot loop.
    """
    n = len(rows)
    name_ids: dict = {}
    codes = np.fromiter((name_ids.setdefault(r[0], len(name_ids)) for r in rows), np.int32, n)
    try:
        vals = np.fromiter((r[1] for r in rows), np.float64, n)
    except (TypeError, ValueError, OverflowError):
        vals = np.array([float(r[1]) for r in rows], dtype=np.float64)
    try:
        steps = np.fromiter((r[2] for r in rows), np.int64, n)
    except OverflowError:  # a step beyond int64: clamp rather than lose the batch
        steps = np.array([min(max(r[2], -2**63), 2**63 - 1) for r in rows], dtype=np.int64)
    times = (np.fromiter((r[3] for r in rows), np.float64, n) * 1e6).astype(np.int64)
    ctx_ids: dict = {}
    ctx_objs: list = []

    def cid(c):
        k = id(c)
        i = ctx_ids.get(k)
        if i is None:
            i = ctx_ids[k] = len(ctx_objs)
            ctx_objs.append(c)
        return i

    cidx = np.fromiter((cid(r[4]) for r in rows), np.int32, n)
    ep = np.array([(-1 if c[0] is None else c[0]) for c in ctx_objs], dtype=np.int64)
    bt = np.array([(-1 if c[1] is None else c[1]) for c in ctx_objs], dtype=np.int64)
    ep_valid = np.array([c[0] is not None for c in ctx_objs], dtype=bool)[cidx]
    bt_valid = np.array([c[1] is not None for c in ctx_objs], dtype=bool)[cidx]
    # nulls go in the indices: Parquet cannot write a null inside a dictionary
    texts = [c[2] for c in ctx_objs if c[2] is not None]
    pos, k = [], 0
    for c in ctx_objs:
        pos.append(k if c[2] is not None else -1)
        k += c[2] is not None
    ci = np.array(pos, dtype=np.int32)[cidx]
    ci_valid = ci >= 0
    if ci_valid.all():
        ci_arr = pa.Array.from_buffers(pa.int32(), n, [None, pa.py_buffer(ci)])
    else:
        ci = np.where(ci_valid, ci, 0).astype(np.int32)
        ci_arr = pa.Array.from_buffers(pa.int32(), n, [pa.py_buffer(np.packbits(ci_valid.astype(np.uint8),
                                                                                bitorder="little")),
                                                       pa.py_buffer(ci)], null_count=int(n - ci_valid.sum()))
    ctx_col = pa.DictionaryArray.from_arrays(ci_arr, _strings(texts))
    zeros = np.zeros(n, dtype=np.int32)
    cols = [
        _dict_column(zeros, [run_id]),
        _dict_column(codes, list(name_ids)),
        _f64(vals),
        _i64(steps),
        _i64(ep[cidx], ep_valid),
        _i64(bt[cidx], bt_valid),
        ctx_col,
        _i64(times, typ=_schema.TS),
        _dict_column(zeros, [source]),
        _dict_column(zeros, [writer]),
        pa.nulls(n, pa.string()),  # replay_id: replay rows are built by the replay mode
        _rank_column(n),
    ]
    # String columns stay dictionary-encoded (20 bytes a row in memory instead of ~130);
    # Parquet stores them as dictionaries anyway and readers see strings.
    return pa.Table.from_arrays(cols, names=_schema.METRICS.names)


class Recorder:
    """Buffers of one run and the daemon thread that drains them into a sink."""

    def __init__(self, run: Any, sink: Sink, flush_interval: float | None = None) -> None:
        self.run = run
        self.sink = sink
        self.interval = float(_config.resolve(flush_interval, _config.ENV_FLUSH_INTERVAL,
                                              _config.DEFAULT_FLUSH_INTERVAL, float))
        run.buf = []  # metric tuples, on the Run for the hot path; swapped out whole by the flush thread
        # Swapped-out buffers of the last few seconds and how much of each was taken: a logging
        # thread preempted between reading run.buf and appending to it may append to a buffer
        # after one, or several, swaps (relief by other logging threads swaps often).
        self._olds: list[list] = []  # [buffer, taken, monotonic time of the swap]
        # Everything waiting to be encoded, in the order it was produced: [table, payload, kind]
        # with kind "rows" (dict rows), "table" (a ready batch) or "slot" (metric rows taken from
        # the buffer and being encoded by some thread; the flush stops there until it is filled).
        self._inbox: list[list] = []
        self._rows_lock = threading.Lock()
        self._pending: list[tuple[str, pa.Table]] = []
        self._pending_rows = 0
        self._flush_lock = threading.Lock()
        self._take_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_flush = time.monotonic()
        self._last_beat = 0.0
        self._last_forced = float("-inf")
        # Asked-for flushes (a checkpoint's index row, every epoch) come at most once per force gap
        # (_config: 1 s on object stores, where every flush is a PUT per table and, for a small
        # partition, the DELETE of the file it replaces; none on a local disk). Urgent requests
        # (memory to free) are never held back.
        remote = getattr(sink, "spool", None) is not None
        self._force_gap = min(self.interval, _config.FORCE_GAP_REMOTE if remote else _config.FORCE_GAP_LOCAL)
        self._force = False
        self._urgent = False
        self._sink_ok = True
        self.on_flush: list = []  # callables run on the flush thread after each flush

    @property
    def buf(self) -> list:
        """The metric buffer (it lives on the Run so that fl.log reaches it in one step)."""
        return self.run.buf

    # -- producer side ------------------------------------------------------

    def emit(self, table: str, row: dict) -> None:
        """Queue one row of any table (checkpoints index, spans, io, ...)."""
        with self._rows_lock:
            inbox = self._inbox
            last = inbox[-1] if inbox else None
            if last is not None and last[2] == "rows" and last[0] == table:
                last[1].append(row)
            else:
                inbox.append([table, [row], "rows"])

    def request_flush(self, urgent: bool = False) -> None:
        """Ask the flush thread to write soon (a checkpoint index row: at most once per force gap);
        ``urgent``: at once (encoded batches waiting, memory to free)."""
        if urgent:
            self._urgent = True
        self._force = True
        self._wake.set()

    def emit_table(self, table: str, data: pa.Table) -> None:
        """Queue a ready Arrow batch; never waits for a write in progress."""
        with self._rows_lock:
            self._inbox.append([table, data, "table"])

    # -- thread -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="flightlog-flush", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        poll = min(0.05, self.interval)
        while not self._stop:
            self._wake.wait(poll)
            self._wake.clear()
            if self._stop:
                break
            try:
                now = time.monotonic()
                forced = self._urgent or (self._force and now - self._last_forced >= self._force_gap)
                if forced or len(self.run.buf) >= _config.FLUSH_ROWS or now - self._last_flush >= self.interval:
                    self._force = self._urgent = False
                    self._last_forced = now
                    self.flush()
                if now - self._last_beat >= getattr(self.sink, "heartbeat_seconds", _config.HEARTBEAT_SECONDS):
                    self._last_beat = now
                    self.sink.heartbeat(self.run.run_id)
            except Exception as e:  # the thread must survive anything
                _warn.problem("flush_error", f"background flush failed: {e!r}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the flush thread (the run is finishing): a remote sink starts its finish deadline now."""
        fin = getattr(self.sink, "finishing", None)
        if fin is not None:
            try:
                fin()
            except Exception:
                pass
        self._stop = True
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    # -- draining -------------------------------------------------------------

    def _take_metrics(self) -> list:
        rows: list = []
        now = time.monotonic()
        olds = self._olds
        for e in olds:
            # Stragglers: rows a preempted thread appended to an earlier buffer after its swap.
            old, taken = e[0], e[1]
            k = len(old)
            if k > taken:
                rows.extend(old[taken:k])
                e[1] = k
        if len(olds) > 16:  # the newest 16 buffers, older ones while younger than 1 s (at most 64)
            n = len(olds)
            self._olds = olds = [e for i, e in enumerate(olds) if i >= n - 16 or (i >= n - 64 and now - e[2] < 1.0)]
        run = self.run
        buf, run.buf = run.buf, []
        k = len(buf)  # read once: rows appended after this are taken next time
        rows.extend(buf[:k])
        olds.append([buf, k, now])
        return rows

    def _release_old(self) -> None:
        """Drop the taken rows from the previous buffer (its stragglers, if any, stay)."""
        with self._take_lock:
            for e in self._olds:
                if e[1]:
                    del e[0][:e[1]]
                    e[1] = 0

    def _take_slot(self) -> tuple[list, list | None]:
        """Take the buffered metric rows and reserve their place in the write order (take lock held)."""
        rows = self._take_metrics()
        if not rows:
            return rows, None
        slot = ["metrics", None, "slot"]
        with self._rows_lock:
            self._inbox.append(slot)
        return rows, slot

    def _fill(self, slot: list, rows: list) -> None:
        """Encode taken metric rows into their reserved slot; a failure is counted, never raised."""
        run = self.run
        try:
            slot[1] = metric_batch(rows, run.run_id, run.source, run.writer)
            slot[2] = "table"
        except Exception as e:
            run.dropped_rows += len(rows)
            _warn.problem("encode_error", f"could not encode {len(rows)} buffered rows: {e!r}", len(rows))
            slot[2] = "lost"

    def relieve(self) -> None:
        """Called by the logging thread when the buffer is over its hard cap.

        In a loop that logs faster than the flush thread can encode (it gets only part
        of the GIL), the logging thread encodes the batch itself: a few ms now and then,
        in exchange for bounded memory. The batch keeps the place in the write order it
        got when its rows were taken; the disk write stays on the flush thread.
        """
        if not self._take_lock.acquire(blocking=False):
            return
        try:
            rows, slot = self._take_slot()
        finally:
            self._take_lock.release()
        if slot is None:
            return
        self._fill(slot, rows)
        del rows
        self._release_old()
        self.request_flush(urgent=True)
        # Encoded batches waiting for a healthy writer: yield the GIL briefly so it can
        # write them (memory stays bounded); never wait for a failing sink.
        deadline = time.monotonic() + 0.05
        waiting = self._inbox_rows()
        while (self._sink_ok and waiting + self._pending_rows > 2 * _config.FLUSH_ROWS
               and time.monotonic() < deadline):
            time.sleep(0.0005)
            waiting = self._inbox_rows()

    def _inbox_rows(self) -> int:
        with self._rows_lock:
            return sum(e[1].num_rows for e in self._inbox if e[2] == "table")

    def flush(self) -> None:
        """Turn buffered rows into batches and write them in the order they were produced; never raises.

        Order matters for crashes: batches of a table reach the sink strictly in the
        order their rows were logged, so a process killed at any moment leaves a
        prefix of what it logged, never a hole.
        """
        with self._flush_lock:
            self._last_flush = time.monotonic()
            try:
                with self._take_lock:
                    rows, slot = self._take_slot()
                if slot is not None:
                    self._fill(slot, rows)
                    del rows
                    self._release_old()
                with self._rows_lock:
                    inbox = self._inbox
                    k = 0
                    while k < len(inbox) and inbox[k][2] != "slot":
                        k += 1  # a slot still being encoded by the logging thread: the rest waits
                    ready = inbox[:k]
                    del inbox[:k]
                for table, payload, kind in ready:
                    if kind == "table":
                        self._queue(table, payload)
                    elif kind == "rows":
                        try:
                            self._queue(table, dict_batch(payload, _schema.schema(table)))
                        except Exception as e:
                            self.run.dropped_rows += len(payload)
                            _warn.problem("encode_error", f"could not encode {len(payload)} {table} rows: {e!r}",
                                          len(payload))
            except Exception as e:
                _warn.problem("encode_error", f"could not encode buffered rows: {e!r}")
            self._drain()
            for fn in list(self.on_flush):
                try:
                    fn()
                except Exception as e:
                    _warn.problem("flush_hook_error", f"flush hook failed: {e!r}")

    def _queue(self, table: str, data: pa.Table) -> None:
        self._pending.append((table, data))
        self._pending_rows += data.num_rows
        while self._pending_rows > _config.MAX_PENDING_ROWS and len(self._pending) > 1:
            t, d = self._pending.pop(0)
            self._pending_rows -= d.num_rows
            self.run.dropped_rows += d.num_rows
            _warn.problem("dropped_rows", f"write backlog full: dropped {d.num_rows} {t} rows", d.num_rows)

    def _drain(self) -> None:
        # Strictly in order within a table: once a batch of a table fails, the later batches of
        # that table wait behind it (a later batch stored before an earlier one would leave a hole
        # if the process died now). A table whose writes fail does not hold up the others.
        kept = []
        failed: set[str] = set()
        for table, data in self._pending:
            if table in failed:
                kept.append((table, data))
                continue
            try:
                self.sink.write(table, data)
            except Exception as e:
                _warn.problem("write_failed", f"could not write {table} rows ({e}); will retry")
                kept.append((table, data))
                failed.add(table)
        self._sink_ok = not failed
        self._pending = kept
        self._pending_rows = sum(d.num_rows for _, d in kept)

    def abandon_pending(self) -> int:
        """Count what could never be written (at exit); returns the rows lost."""
        lost = self._pending_rows
        if lost:
            self.run.dropped_rows += lost
            _warn.problem("dropped_rows", f"{lost} rows could not be written before exit", lost)
        self._pending.clear()
        self._pending_rows = 0
        return lost

    def reset_after_fork(self) -> None:
        self.run.buf = []
        self._olds = []
        self._inbox = []
        self._rows_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._take_lock = threading.Lock()
        self._pending = []
        self._pending_rows = 0
        self._wake = threading.Event()
        self._thread = None


def coerce(value: Any) -> float | int | None:
    """A number from Python/numpy scalars, 0-d arrays and 0-d tensors; None when not numeric."""
    t = type(value)
    if t is bool:
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        try:
            return value.item() if value.dtype.kind in "biuf" else None
        except Exception:
            return None
    item = getattr(value, "item", None)
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    if item is not None:
        try:
            n = numel() if callable(numel) else numel
            if n == 1:
                v = item()
                if isinstance(v, bool):
                    return int(v)
                if isinstance(v, (int, float)):
                    return v
        except Exception:
            return None
    if isinstance(value, str):
        return None
    try:
        v = float(value)  # Decimal, Fraction, ...
        return v if not math.isnan(v) or value != value else v
    except Exception:
        return None


def pid_writer() -> str:
    import socket

    rank = os.environ.get("RANK")
    base = f"{socket.gethostname()}:{os.getpid()}"
    return f"{base}:{rank}" if rank is not None else base
