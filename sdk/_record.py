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
    """Where finished batches go: a local store, a collector, or memory (tests)."""

    def write(self, table: str, data: pa.Table) -> None: ...
    def heartbeat(self, run_id: str) -> None: ...
    def close(self) -> None: ...


class MemorySink:
    """Keeps every batch in memory; the in-process sink tests use."""

    def __init__(self) -> None:
        self.batches: dict[str, list[pa.Table]] = {}
        self.beats = 0

    def write(self, table: str, data: pa.Table) -> None:
        self.batches.setdefault(table, []).append(data)

    def heartbeat(self, run_id: str) -> None:
        self.beats += 1

    def close(self) -> None:
        pass

    def table(self, name: str) -> pa.Table:
        parts = self.batches.get(name, [])
        if not parts:
            return _schema.schema(name).empty_table()
        return pa.concat_tables(parts)


def metric_batch(rows: list, run_id: str, source: str, writer: str) -> pa.Table:
    """Turn buffered ``(name, value, step, time, ctx)`` tuples into a metrics batch."""
    n = len(rows)
    names, values, steps, times, ctxs = zip(*rows)
    try:
        vals = pa.array(values, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        vals = pa.array([float(v) for v in values], pa.float64())
    ts = (np.fromiter(times, dtype=np.float64, count=n) * 1e6).astype(np.int64)
    cols = {
        "run_id": pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([run_id])),
        "name": pa.array(names, pa.string()),
        "value": vals,
        "step": pa.array(steps, pa.int64()),
        "epoch": pa.array([c[0] for c in ctxs], pa.int64()),
        "batch": pa.array([c[1] for c in ctxs], pa.int64()),
        "ctx": pa.array([c[2] for c in ctxs], pa.string()),
        "wall_time": pa.array(ts, _schema.TS),
        "source": pa.array([source] * n, pa.string()),
        "writer": pa.array([writer] * n, pa.string()),
    }
    cols["run_id"] = cols["run_id"].cast(pa.string())
    return pa.Table.from_pydict(cols, schema=_schema.METRICS)


class Recorder:
    """Buffers of one run and the daemon thread that drains them into a sink."""

    def __init__(self, run: Any, sink: Sink, flush_interval: float | None = None) -> None:
        self.run = run
        self.sink = sink
        self.interval = float(_config.resolve(flush_interval, _config.ENV_FLUSH_INTERVAL,
                                              _config.DEFAULT_FLUSH_INTERVAL, float))
        self.buf: list = []  # metric tuples; swapped out whole by the flush thread
        self._old: list | None = None  # last swapped-out buffer and how much of it was taken
        self._old_taken = 0
        self._rows: dict[str, list[dict]] = {}
        self._tables: list[tuple[str, pa.Table]] = []
        self._rows_lock = threading.Lock()
        self._pending: list[tuple[str, pa.Table]] = []
        self._pending_rows = 0
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_flush = time.monotonic()
        self._last_beat = 0.0
        self._force = False
        self.on_flush: list = []  # callables run on the flush thread after each flush

    # -- producer side ------------------------------------------------------

    def emit(self, table: str, row: dict) -> None:
        """Queue one row of any table (checkpoints index, spans, io, ...)."""
        with self._rows_lock:
            self._rows.setdefault(table, []).append(row)

    def request_flush(self) -> None:
        """Ask the flush thread to write soon (e.g. a checkpoint index row)."""
        self._force = True
        self._wake.set()

    def emit_table(self, table: str, data: pa.Table) -> None:
        """Queue a ready Arrow batch; never waits for a write in progress."""
        with self._rows_lock:
            self._tables.append((table, data))

    # -- thread -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="flightlog-flush", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        poll = min(0.1, self.interval)
        while not self._stop:
            self._wake.wait(poll)
            self._wake.clear()
            if self._stop:
                break
            try:
                now = time.monotonic()
                if self._force or len(self.buf) >= _config.FLUSH_ROWS or now - self._last_flush >= self.interval:
                    self._force = False
                    self.flush()
                if now - self._last_beat >= _config.HEARTBEAT_SECONDS:
                    self._last_beat = now
                    self.sink.heartbeat(self.run.run_id)
            except Exception as e:  # the thread must survive anything
                _warn.problem("flush_error", f"background flush failed: {e!r}")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop = True
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    # -- draining -------------------------------------------------------------

    def _take_metrics(self) -> list:
        rows: list = []
        old = self._old
        if old is not None and len(old) > self._old_taken:
            # A thread preempted between reading self.buf and appending to it
            # may have added rows after the swap: pick them up now.
            rows.extend(old[self._old_taken:])
        buf, self.buf = self.buf, []
        rows.extend(buf)
        self._old, self._old_taken = buf, len(buf)
        return rows

    def flush(self) -> None:
        """Turn buffered rows into batches and write them; never raises."""
        with self._flush_lock:
            self._last_flush = time.monotonic()
            run = self.run
            try:
                rows = self._take_metrics()
                if rows:
                    self._queue("metrics", metric_batch(rows, run.run_id, run.source, run.writer))
                with self._rows_lock:
                    other, self._rows = self._rows, {}
                    tables, self._tables = self._tables, []
                for table, data in tables:
                    self._queue(table, data)
                for table, dict_rows in other.items():
                    self._queue(table, pa.Table.from_pylist(dict_rows, schema=_schema.schema(table)))
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
        # Each batch on its own: a table whose writes fail must not hold up the others.
        kept = []
        for table, data in self._pending:
            try:
                self.sink.write(table, data)
            except Exception as e:
                _warn.problem("write_failed", f"could not write {table} rows ({e}); will retry")
                kept.append((table, data))
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
        self.buf = []
        self._old = None
        self._old_taken = 0
        self._rows = {}
        self._tables = []
        self._rows_lock = threading.Lock()
        self._flush_lock = threading.Lock()
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
