"""What the UI reads from a store: a cached runs index, run-scoped DuckDB views, downsampled series.

Why not ``db.connect`` for every request: it builds views over every file of
every table, which costs seconds on a store with thousands of runs. The UI
keeps an incrementally refreshed index of the runs table (one directory
``stat`` per run per refresh, a file is parsed again only when its size or
mtime changed) and opens, per request, a sandboxed DuckDB connection whose
views cover only the runs the page shows. Files are validated with the query
side's own checks (``db._file_ok``) and views are built with its SELECT
(``db._files_select``), so the UI reads exactly what ``flightlog sql`` reads.
Whole-store pages (SQL box, lineage, health) use ``db.connect`` itself.
"""
from __future__ import annotations

import datetime as dt
import difflib
import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flightlog._errors import FlightlogError, QueryError
from flightlog.collector import blobs as _blobs
from flightlog.collector import schema as _schema
from flightlog.collector import store as _store
from flightlog.query import db

X_AXES = ("step", "epoch", "time")
MAX_POINTS = 20_000


class NotFound(FlightlogError):
    """A run, metric or blob the request names is not in the store (HTTP 404)."""


class BadInput(FlightlogError):
    """A request parameter is malformed (HTTP 400)."""


# -- the runs index ---------------------------------------------------------------------

class RunsIndex:
    """The runs table (newest row per run, ``crashed`` derived), kept current without rescanning the store.

    Every ``ttl`` seconds a request checks the runs folder's mtime (new or removed runs) and the
    folders of runs still ``running`` (their status rows); every ``full_every`` seconds a
    background thread stats every run folder (rows rewritten in a finished run's folder, e.g.
    by compaction). A file is parsed again only when its size or mtime changed.
    """

    def __init__(self, root: str, ttl: float = 1.0, full_every: float = 30.0) -> None:
        self.root = root
        self.ttl = ttl
        self.full_every = full_every
        self._lock = threading.Lock()
        self._dirs: dict[str, int] = {}  # run dir name -> mtime_ns when last listed
        self._files: dict[str, tuple[int, int, list[dict]]] = {}  # path -> (size, mtime_ns, rows)
        self._by_dir: dict[str, list[str]] = {}
        self._latest: dict[str, dict] = {}
        self._table: pa.Table = _schema.RUNS.empty_table()
        self._checked = 0.0
        self._full_at = 0.0
        self._top_mtime: int | None = None
        self._full_running = False
        self._sig: tuple = ()

    def table(self) -> pa.Table:
        """The runs as Arrow, oldest first (status derived now for running runs)."""
        now = time.monotonic()
        start_full = False
        with self._lock:
            if not self._full_at:
                self._refresh(None)  # the first build: every run folder
                self._full_at = self._checked = time.monotonic()
            elif now - self._checked >= self.ttl:
                self._refresh(self._quick_names())
                self._checked = time.monotonic()
                if now - self._full_at >= self.full_every and not self._full_running:
                    self._full_running = start_full = True
            t = self._table
        if start_full:
            threading.Thread(target=self._full, name="flightlog-ui-rescan", daemon=True).start()
        return t

    def _full(self) -> None:
        try:
            with self._lock:
                self._refresh(None)
                self._full_at = time.monotonic()
        finally:
            self._full_running = False

    def _quick_names(self) -> list[str]:
        tdir = Path(self.root) / "runs"
        try:
            top = tdir.stat().st_mtime_ns
        except OSError:
            top = None
        names = [f"run_id={r['run_id']}" for r in self._latest.values() if r["status"] == "running"]
        names += [n for n, files in self._by_dir.items() if not files]  # created, first rows not yet in
        # a finished run that got a new row (flightlog tag/note, compaction): its folder's mtime moved
        # (one stat per run: ~10 ms for 5,000 runs, once per ttl)
        for n, m in self._dirs.items():
            try:
                if os.stat(tdir / n).st_mtime_ns != m:
                    names.append(n)
            except OSError:
                names.append(n)
        if top != self._top_mtime:
            try:
                names += [n for n in os.listdir(tdir) if n.startswith("run_id=") and n not in self._dirs]
            except OSError:
                pass
        return names

    def ids(self) -> set[str]:
        return set(self.table().column("run_id").to_pylist())

    def _refresh(self, only: list[str] | None) -> None:
        tdir = Path(self.root) / "runs"
        try:
            self._top_mtime = tdir.stat().st_mtime_ns
        except OSError:
            self._top_mtime = None
        if only is None:
            try:
                names = [n for n in os.listdir(tdir) if n.startswith("run_id=")]
            except OSError:
                names = []
        else:
            names = only
        changed = False
        todo: list[tuple[str, int, int]] = []
        live = set(names) if only is None else set(self._dirs) | set(names)
        for gone in [d for d in self._dirs if d not in live]:
            self._dirs.pop(gone, None)
            for f in self._by_dir.pop(gone, []):
                self._files.pop(f, None)
            changed = True
        for n in names:
            d = tdir / n
            try:
                m = d.stat().st_mtime_ns
            except OSError:
                continue
            if self._dirs.get(n) == m:
                continue
            self._dirs[n] = m
            files = [str(f) for f in _store.visible_files(d)]
            for old in self._by_dir.get(n, []):
                if old not in files:
                    self._files.pop(old, None)
            self._by_dir[n] = files
            for f in files:
                try:
                    st = os.stat(f)
                except OSError:
                    continue
                hit = self._files.get(f)
                if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                    continue
                todo.append((f, st.st_size, st.st_mtime_ns))
            changed = True
        if todo:  # parse in a few threads: pyarrow reads without the GIL (2x on the first build)
            if len(todo) > 16:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(4) as ex:
                    parsed = list(ex.map(_read_runs_file, [t[0] for t in todo]))
            else:
                parsed = [_read_runs_file(t[0]) for t in todo]
            for (f, size, mt), rows in zip(todo, parsed):
                self._files[f] = (size, mt, rows)
        if changed:
            latest: dict[str, dict] = {}
            notes: dict[str, dict] = {}  # tags/notes come from the newest annotated row (as the CLI reads them)
            for _size, _m, rows in self._files.values():  # in the order the files were written
                for r in rows:
                    cur = latest.get(r["run_id"])
                    if cur is None or _rank(r) >= _rank(cur):
                        latest[r["run_id"]] = r
                    a = r.get("annotated_at")
                    if a is not None:
                        had = notes.get(r["run_id"])
                        if had is None or (had.get("annotated_at") or 0) <= a:
                            notes[r["run_id"]] = r
            for rid, a in notes.items():
                if latest[rid] is not a:
                    latest[rid] = dict(latest[rid], tags=a.get("tags"), notes=a.get("notes"),
                                       annotated_at=a.get("annotated_at"))
            self._latest = latest
        now, host = time.time(), socket.gethostname()
        out = []
        for r in self._latest.values():
            if r["status"] == "running" and db._looks_dead(self.root, r, now, host):
                r = dict(r, status="crashed")
            out.append(r)
        sig = tuple(r["status"] for r in out)
        if changed or sig != self._sig:
            self._sig = sig
            out.sort(key=lambda r: (r["started_at"] is None, r["started_at"] or 0, r["run_id"]))
            self._table = pa.Table.from_pylist(out, schema=_schema.RUNS)

    def get(self, run: str) -> dict:
        """One run's row by full id or unique prefix; NotFound otherwise."""
        if not isinstance(run, str) or not run or len(run) > 128:
            raise NotFound(f"no run {str(run)[:80]!r} in the store")
        t = self.table()
        ids = t.column("run_id").to_pylist()
        if run in ids:
            return t.slice(ids.index(run), 1).to_pylist()[0]
        hits = [i for i, r in enumerate(ids) if r.startswith(run)]
        if not hits:
            raise NotFound(f"no run {run!r} in the store")
        if len(hits) > 1:
            raise NotFound(f"run id {run!r} is ambiguous: {', '.join(ids[i] for i in hits[:5])}")
        return t.slice(hits[0], 1).to_pylist()[0]


def _read_runs_file(f: str) -> list[dict]:
    """Rows of one runs file, or none when the query side's validator refuses it (it warns once).

    A row's run is the folder it is stored in (``run_id=<id>``), as in every SQL view of the store.
    """
    if not db._file_ok(Path(f), "runs"):
        return []
    try:
        rows = _schema.conform("runs", pq.ParquetFile(f).read()).to_pylist()
    except Exception:  # a file the validator accepted but cannot be read: skip it
        return []
    run_id = Path(f).parent.name.partition("=")[2]
    for r in rows:
        r["run_id"] = run_id
    return rows


def _rank(r: dict):
    """The runs table's rule (``query.db._NEWEST_ROW``): a final row first, then the newest updated_at
    (unknown last); on a tie the row read later wins (the caller compares with ``>=``): the one written later."""
    st, upd = r["status"], r["updated_at"]
    return (st is not None and st != "running", upd is not None, upd or 0)


# -- scoped, sandboxed connections ----------------------------------------------------------

_DBS: dict[str, duckdb.DuckDBPyConnection] = {}
_DBS_LOCK = threading.Lock()


def _db(root: str) -> duckdb.DuckDBPyConnection:
    """One sandboxed in-memory DuckDB per store: only the store's directory is readable, settings locked.

    Requests use cursors of it (a new DuckDB connection costs ~0.1-0.2 s, a cursor microseconds)
    and create their views as TEMP objects, which belong to the cursor alone.
    """
    with _DBS_LOCK:
        con = _DBS.get(root)
        if con is None:
            con = duckdb.connect(":memory:")
            con.execute("SET GLOBAL TimeZone='UTC'")
            con.execute("SET enable_progress_bar=false")
            real = os.path.realpath(root)
            dirs = sorted({root.rstrip(os.sep) + os.sep, real.rstrip(os.sep) + os.sep})
            con.execute(f"SET allowed_directories=[{', '.join(db._sql_str(d) for d in dirs)}]")
            con.execute("SET enable_external_access=false")
            con.execute("SET lock_configuration=true")
            _DBS[root] = con
        return con


def _new_con(root: str) -> duckdb.DuckDBPyConnection:
    return _db(root).cursor()


def scoped(root: str, runs: pa.Table, run_ids: Iterable[str],
           tables: Iterable[str] | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only cursor: ``runs`` from the index, other tables over ``run_ids``' files only."""
    ids = [_store.check_run_id(r) for r in dict.fromkeys(run_ids)]
    con = _new_con(root)
    con.register("runs", runs)
    for table in (tables if tables is not None else [t for t in _schema.TABLES if t != "runs"]):
        files = [f for f in _store.table_files(root, table, ids) if db._file_ok(f, table)]
        body = db._files_select(table, files) if files else db._empty_select(table)
        con.execute(f"CREATE TEMP VIEW {table} AS {body}")
    return con


def rows(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> list[dict]:
    return db.sql_arrow(con, sql, params).to_pylist()


# -- series -------------------------------------------------------------------------------

def _num(v: Any, what: str) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise BadInput(f"{what} must be a number, got {str(v)[:40]!r}") from None
    if not math.isfinite(f):
        raise BadInput(f"{what} must be finite, got {v!r}")
    return f


def parse_series_args(points: Any, x: Any, lo: Any, hi: Any) -> tuple[int, str, float | None, float | None]:
    """Validated ``(points, x, lo, hi)``; BadInput names the bad one."""
    try:
        n = int(points)
    except (TypeError, ValueError):
        raise BadInput(f"points must be an integer, got {str(points)[:40]!r}") from None
    if not 4 <= n <= MAX_POINTS:
        raise BadInput(f"points must be between 4 and {MAX_POINTS}, got {n}")
    if x not in X_AXES:
        raise BadInput(f"x must be one of {', '.join(X_AXES)}, got {str(x)[:40]!r}")
    a, b = _num(lo, "lo"), _num(hi, "hi")
    if a is not None and b is not None and a > b:
        raise BadInput(f"lo ({a:g}) is greater than hi ({b:g})")
    return n, x, a, b


_X_COL = {"step": "step", "epoch": "epoch", "time": "wall_time"}
_X_EXPR = {"step": "CAST(step AS DOUBLE)", "epoch": "CAST(epoch AS DOUBLE)",
           "time": "epoch_us(wall_time) / 1e6"}
PYRAMID_MIN_ROWS = 200_000  # runs whose metric files hold fewer rows are always read directly
PYRAMID_BUCKETS = 8192
_PYRAMIDS: "dict[tuple, dict]" = {}
_PYRAMID_LOCK = threading.Lock()
_PYRAMID_MAX = 32


def _range_sql(x: str, lo: float | None, hi: float | None) -> list[str]:
    """Filters on the raw column (numbers inlined, validated finite) so DuckDB prunes row groups by stats."""
    col, out = _X_COL[x], []
    if x == "time":
        if lo is not None:
            out.append(f"{col} >= make_timestamp(CAST({math.floor(lo * 1e6)} AS BIGINT))")
        if hi is not None:
            out.append(f"{col} <= make_timestamp(CAST({math.ceil(hi * 1e6)} AS BIGINT))")
    else:
        if lo is not None:
            out.append(f"{col} >= {math.ceil(lo)}")
        if hi is not None:
            out.append(f"{col} <= {math.floor(hi)}")
    return out


def _base_sql(x: str, lo: float | None, hi: float | None) -> str:
    xe = _X_EXPR[x]
    where = ["name = $name", f"{_X_COL[x]} IS NOT NULL"] + _range_sql(x, lo, hi)
    if lo is not None:
        where.append(f"{xe} >= {float(lo)!r}")
    if hi is not None:
        where.append(f"{xe} <= {float(hi)!r}")
    return f"SELECT {xe} AS x, value AS y, coalesce(source, 'record') AS src FROM m WHERE {' AND '.join(where)}"


_FIN = "isfinite(y)"
_BAD = "(y IS NULL OR NOT isfinite(y))"
_M4_COLS = (f"count(*) FILTER (WHERE {_FIN}), count(*) FILTER (WHERE {_BAD}), min(x) FILTER (WHERE {_BAD}), "
            f"min(x) FILTER (WHERE {_FIN}), arg_min(y, x) FILTER (WHERE {_FIN}), "
            f"max(x) FILTER (WHERE {_FIN}), arg_max(y, x) FILTER (WHERE {_FIN}), "
            f"arg_min(x, y) FILTER (WHERE {_FIN}), min(y) FILTER (WHERE {_FIN}), "
            f"arg_max(x, y) FILTER (WHERE {_FIN}), max(y) FILTER (WHERE {_FIN})")


def _open_metrics(root: str, run_id: str) -> tuple[list[Path], duckdb.DuckDBPyConnection]:
    files = [f for f in _store.table_files(root, "metrics", [_store.check_run_id(run_id)])
             if db._file_ok(f, "metrics")]
    if not files:
        raise NotFound(f"run {run_id} has no metrics")
    con = _new_con(root)
    con.execute(f"CREATE TEMP VIEW m AS {db._files_select('metrics', files)}")
    return files, con


def series(root: str, run_id: str, name: str, points: int, x: str = "step",
           lo: float | None = None, hi: float | None = None) -> dict:
    """One metric of one run, at most ``points`` points, every local extreme kept.

    M4 aggregation: the range [lo, hi] is cut into ``points // 4`` equal-width
    buckets per source; each bucket contributes its first, last, lowest and
    highest point, so a line drawn through them has the same envelope as the
    full series at any pixel width down to one bucket. When the range holds at
    most ``points`` values they are all returned (zooming in re-queries the
    visible range at full resolution). Values that are NaN, infinite or null
    cannot be drawn: they are counted in ``n_nonfinite`` and the first one's x
    is given, not dropped silently.

    Big series (runs with >= 200k metric rows) go through a cached M4 pyramid:
    one DuckDB pass computes 8192 base buckets per source, and every later
    request over a range spanning enough base buckets is answered from them
    (an M4 of M4 buckets keeps the same extremes), with the partial buckets at
    the range's ends read exactly from the files. The cache key includes every
    file's size and mtime, so a live run's new rows are seen at once.
    """
    if not isinstance(name, str) or not name or len(name) > 1000:
        raise BadInput("name must be a metric name (1 to 1000 characters)")
    files, con = _open_metrics(root, run_id)
    try:
        out: dict[str, Any] = {"run": run_id, "name": name, "x_axis": x, "lo": lo, "hi": hi}
        rows = sum(_meta(f)[0] for f in files)
        res = None
        if rows >= PYRAMID_MIN_ROWS:
            pyr = _pyramid(con, files, name, x)
            if pyr is not None:
                res = _from_pyramid(con, pyr, name, x, points, lo, hi)
        if res is None:
            res = _series_raw(con, name, x, points, lo, hi)
        if res["n_total"] == 0:
            known = con.execute("SELECT count(*) FROM m WHERE name = $name", {"name": name}).fetchone()[0]
            if not known:
                raise NotFound(f"run {run_id} has no metric {name!r}")
        out.update(res)
        pts = out.pop("pts")
        if x != "time":  # steps and epochs are integers (the SQL cast them for bucketing)
            pts = [(int(p[0]), p[1], p[2]) for p in pts]
        out["x"] = [p[0] for p in pts]
        out["y"] = [p[1] for p in pts]
        out["source"] = [p[2] for p in pts]
        return out
    finally:
        con.close()


def _m4_points(res: Iterable[tuple]) -> list[tuple]:
    seen: set = set()
    pts = []
    for src, x0, y0, x1, y1, xl, yl, xh, yh in res:
        if x0 is None:
            continue
        for p in ((x0, y0), (xl, yl), (xh, yh), (x1, y1)):
            k = (src, p[0], p[1])
            if k not in seen:
                seen.add(k)
                pts.append((p[0], p[1], src))
    pts.sort(key=lambda p: (p[0], p[2]))
    return pts


def _series_raw(con, name: str, x: str, points: int, lo: float | None, hi: float | None) -> dict:
    """M4 (or every point) straight from the files."""
    base = _base_sql(x, lo, hi)
    params: dict[str, Any] = {"name": name}
    st = con.execute(f"""SELECT count(*), count(*) FILTER (WHERE {_BAD}), min(x) FILTER (WHERE {_FIN}),
                                max(x) FILTER (WHERE {_FIN}), min(src), max(src), min(x) FILTER (WHERE {_BAD})
                         FROM ({base})""", params).fetchone()
    n_total, n_bad, xmin, xmax, src_lo, src_hi, bad_x = st
    out = {"n_total": int(n_total), "n_nonfinite": int(n_bad), "first_nonfinite_x": bad_x,
           "downsampled": False, "pts": []}
    n_fin = n_total - n_bad
    if n_fin == 0:
        return out
    if n_fin <= points:
        out["pts"] = con.execute(f"SELECT x, y, src FROM ({base}) WHERE {_FIN} ORDER BY x, src", params).fetchall()
        return out
    # sources are 'record' and 'replay'; count the distinct ones only when there is more than one
    nsrc = 1 if src_lo == src_hi else con.execute(f"SELECT count(DISTINCT src) FROM ({base})", params).fetchone()[0]
    nb = max(1, points // (4 * max(1, nsrc)))
    scale = nb / ((xmax - xmin) or 1.0)
    res = con.execute(f"""
        SELECT src, min(x), arg_min(y, x), max(x), arg_max(y, x), arg_min(x, y), min(y), arg_max(x, y), max(y)
        FROM (SELECT src, x, y, least({nb - 1}, CAST(floor((x - {float(xmin)!r}) * {scale!r}) AS BIGINT)) AS b
              FROM ({base}) WHERE {_FIN})
        GROUP BY src, b""", params).fetchall()
    out["pts"] = _m4_points(res)
    out["downsampled"] = True
    return out


_META: dict[tuple, tuple] = {}


def _meta(f: Path) -> tuple[int, dict]:
    """(rows, {column: (min, max)}) of a Parquet file from its footer, cached by size and mtime."""
    st = f.stat()
    key = (str(f), st.st_size, st.st_mtime_ns)
    hit = _META.get(key)
    if hit is not None:
        return hit
    md = pq.ParquetFile(f).metadata
    rng: dict[str, list] = {}
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        for j in range(rg.num_columns):
            c = rg.column(j)
            name = c.path_in_schema
            if name not in ("step", "epoch", "wall_time"):
                continue
            s = c.statistics
            if s is None or not s.has_min_max:
                rng[name] = [None, None, False]
                continue
            cur = rng.setdefault(name, [s.min, s.max, True])
            if cur[2]:
                cur[0], cur[1] = min(cur[0], s.min), max(cur[1], s.max)
    if len(_META) > 10_000:
        _META.clear()
    _META[key] = hit = (md.num_rows, {k: (v[0], v[1]) for k, v in rng.items() if v[2]})
    return hit


def _x_bounds(con, files: list[Path], name: str, x: str) -> tuple[float, float] | None:
    """min/max of the x column over the files, from footers when every file has statistics."""
    col = _X_COL[x]
    lo = hi = None
    for f in files:
        r = _meta(f)[1].get(col)
        if r is None:
            lo = None
            break
        a, b = r
        if x == "time":
            a, b = (t.replace(tzinfo=t.tzinfo or dt.timezone.utc).timestamp() for t in (a, b))
        lo = a if lo is None else min(lo, a)
        hi = b if hi is None else max(hi, b)
    if lo is None:
        row = con.execute(f"SELECT min({_X_EXPR[x]}), max({_X_EXPR[x]}) FROM m WHERE name = $name",
                          {"name": name}).fetchone()
        if row[0] is None:
            return None
        lo, hi = row
    return float(lo), float(hi)


def _pyramid(con, files: list[Path], name: str, x: str) -> dict | None:
    key = (tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files), name, x)
    with _PYRAMID_LOCK:
        hit = _PYRAMIDS.pop(key, None)
        if hit is not None:
            _PYRAMIDS[key] = hit  # most recently used last
            return hit
    bounds = _x_bounds(con, files, name, x)
    if bounds is None:
        return None
    xmin, xmax = bounds
    K = PYRAMID_BUCKETS
    scale = K / ((xmax - xmin) or 1.0)
    bexpr = f"least({K - 1}, greatest(0, CAST(floor((x - {xmin!r}) * {scale!r}) AS BIGINT)))"
    res = con.execute(f"""
        SELECT src, {bexpr} AS b, {_M4_COLS}
        FROM ({_base_sql(x, None, None)}) GROUP BY src, b ORDER BY src, b""", {"name": name}).fetchall()
    srcs: dict[str, dict] = {}
    cols = ("b", "n", "nbad", "badx", "x0", "y0", "x1", "y1", "xl", "yl", "xh", "yh")
    for src in sorted({r[0] for r in res}):
        sub = [r[1:] for r in res if r[0] == src]
        arrs = {c: np.array([r[i] for r in sub], dtype=float) for i, c in enumerate(cols)}
        arrs["b"] = arrs["b"].astype(np.int64)
        srcs[src] = arrs
    pyr = {"xmin": xmin, "xmax": xmax, "scale": scale, "K": K, "bexpr": bexpr, "srcs": srcs}
    with _PYRAMID_LOCK:
        _PYRAMIDS[key] = pyr
        while len(_PYRAMIDS) > _PYRAMID_MAX:
            _PYRAMIDS.pop(next(iter(_PYRAMIDS)))
    return pyr


def _from_pyramid(con, pyr: dict, name: str, x: str, points: int, lo: float | None,
                  hi: float | None) -> dict | None:
    """M4 over the cached base buckets inside [lo, hi] plus the exact rows of the partial end buckets.

    None when the range spans too few base buckets (then the files are read directly).
    """
    K, xmin, scale = pyr["K"], pyr["xmin"], pyr["scale"]
    L = xmin if lo is None else max(lo, xmin)  # coarse buckets span the data inside the range only
    H = pyr["xmax"] if hi is None else min(hi, pyr["xmax"])
    # base buckets wholly inside [L, H]; the SQL assigns b = floor((x - xmin) * scale), clamped
    b_lo = 0 if lo is None or lo <= xmin else math.floor((lo - xmin) * scale) + 1
    b_hi = K - 1 if hi is None or hi >= pyr["xmax"] else math.floor((hi - xmin) * scale) - 1
    nsrc = max(1, len(pyr["srcs"]))
    nb = max(1, points // (4 * nsrc))
    if b_hi - b_lo + 1 < 2 * nb:
        return None
    # rows of the partial buckets at the ends, exactly (bucket ids computed by the same SQL expression)
    edge_rows: list[tuple] = []
    bexpr = pyr["bexpr"]
    width = 1.0 / scale
    edges = []
    if b_lo > 0:  # lo is inside the data: rows of buckets below b_lo that are >= lo
        edges.append((f"b < {b_lo}", lo, xmin + (b_lo + 1) * width))
    if b_hi < K - 1:  # hi is inside the data: rows of buckets above b_hi that are <= hi
        edges.append((f"b > {b_hi}", xmin + (b_hi - 1) * width, hi))
    for cond, a, b in edges:  # a, b: a bucket of margin around the edge, for row-group pruning
        edge_rows += con.execute(f"SELECT src, x, y FROM (SELECT *, {bexpr} AS b FROM ({_base_sql(x, a, b)})) "
                                 f"WHERE {cond}", {"name": name}).fetchall()
    n_total = n_bad = 0
    bad_x = None
    pts: list[tuple] = []
    n_fin = 0
    for src in sorted(set(pyr["srcs"]) | {r[0] for r in edge_rows}):
        a = pyr["srcs"].get(src)
        if a is not None:
            m = (a["b"] >= b_lo) & (a["b"] <= b_hi)
            sel = {k: v[m] for k, v in a.items()}
        else:
            sel = {k: np.array([]) for k in ("n", "nbad", "badx", "x0", "y0", "x1", "y1", "xl", "yl", "xh", "yh")}
        n_total += int(sel["n"].sum() + sel["nbad"].sum())
        n_bad += int(sel["nbad"].sum())
        n_fin += int(sel["n"].sum())
        bx = sel["badx"][~np.isnan(sel["badx"])]
        if bx.size:
            bad_x = float(bx.min()) if bad_x is None else min(bad_x, float(bx.min()))
        er = [(r[1], r[2]) for r in edge_rows if r[0] == src]
        for ex, ey in er:
            n_total += 1
            if ey is None or not math.isfinite(ey):
                n_bad += 1
                bad_x = ex if bad_x is None else min(bad_x, ex)
            else:
                n_fin += 1
        fin = [(ex, ey) for ex, ey in er if ey is not None and math.isfinite(ey)]
        keep = sel["n"] > 0
        ex_ = np.array([p[0] for p in fin], dtype=float)
        ey_ = np.array([p[1] for p in fin], dtype=float)
        x0 = np.concatenate([sel["x0"][keep], ex_])
        if not x0.size:
            continue
        cat = {k: np.concatenate([sel[k][keep], ex_ if k[0] == "x" else ey_])
               for k in ("x0", "y0", "x1", "y1", "xl", "yl", "xh", "yh")}
        order = np.argsort(cat["x0"], kind="stable")
        cat = {k: v[order] for k, v in cat.items()}
        c = np.clip(np.floor((cat["x0"] - L) * (nb / ((H - L) or 1.0))), 0, nb - 1).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        ends = np.r_[starts[1:], c.size] - 1
        imin = np.lexsort((cat["yl"], c))
        imax = np.lexsort((-cat["yh"], c))
        firsts_min = imin[np.flatnonzero(np.r_[True, c[imin][1:] != c[imin][:-1]])]
        firsts_max = imax[np.flatnonzero(np.r_[True, c[imax][1:] != c[imax][:-1]])]
        rows = zip(cat["x0"][starts], cat["y0"][starts], cat["x1"][ends], cat["y1"][ends],
                   cat["xl"][firsts_min], cat["yl"][firsts_min], cat["xh"][firsts_max], cat["yh"][firsts_max])
        pts += _m4_points((src, *map(float, r)) for r in rows)
    if n_fin <= points:
        return None  # few enough to send them all: read them
    pts.sort(key=lambda p: (p[0], p[2]))
    return {"n_total": n_total, "n_nonfinite": n_bad, "first_nonfinite_x": bad_x, "downsampled": True, "pts": pts}


# -- runs listing -----------------------------------------------------------------------------

def filter_runs(root: str, runs: pa.Table, project: str | None = None, tag: str | None = None, status: str | None = None,
                where: str | None = None) -> pa.Table:
    """Runs matching the filters, newest first. ``where`` is a SQL predicate over the runs table.

    The predicate runs in a sandboxed DuckDB connection that holds only the
    runs table, with external access off and the configuration locked.
    """
    if not (where and where.strip()):  # no SQL predicate: filter with Arrow, no DuckDB round trip
        import pyarrow.compute as pc

        mask = pc.invert(pc.fill_null(pc.equal(runs["kind"], "replay"), False))
        if project:
            mask = pc.and_(mask, pc.fill_null(pc.equal(runs["project"], project), False))
        if status:
            mask = pc.and_(mask, pc.fill_null(pc.equal(runs["status"], status), False))
        if tag:
            m = pc.fill_null(pc.or_kleene(pc.or_kleene(pc.equal(runs["kind"], tag), pc.equal(runs["host"], tag)),
                                          pc.or_kleene(pc.equal(runs["project"], tag),
                                                       pc.starts_with(runs["git_commit"], tag))), False)
            if tag == "dirty":
                m = pc.or_(m, pc.fill_null(runs["git_dirty"], False))
            if "tags" in runs.column_names:  # user tags (fl.init(tags=), flightlog tag): a JSON list
                m = pc.or_(m, pa.array([tag in user_tags(v) for v in runs["tags"].to_pylist()], pa.bool_()))
            mask = pc.and_(mask, m)
        t = runs.filter(mask)
        # newest first; the index is sorted oldest first with ties on run_id
        return t.take(pc.sort_indices(t, [("started_at", "descending"), ("run_id", "ascending")]))
    con = _new_con(root)
    try:
        con.register("runs", runs)
        conds, params = ["kind IS DISTINCT FROM 'replay'"], []
        if project:
            conds.append("project = ?")
            params.append(project)
        if status:
            conds.append("status = ?")
            params.append(status)
        if tag:
            conds.append("(kind = ? OR host = ? OR project = ? OR starts_with(git_commit, ?) "
                         "OR (? = 'dirty' AND git_dirty) "
                         "OR coalesce(list_contains(TRY_CAST(TRY_CAST(tags AS JSON) AS VARCHAR[]), ?), false))")
            params += [tag, tag, tag, tag, tag, tag]
        sql = f"SELECT * FROM runs WHERE {' AND '.join(conds)}"
        if where and where.strip():
            pred = where.strip()
            db.check_read_only(con, f"SELECT 1 FROM runs WHERE ({pred})")  # one plain query, or refused
            sql += f" AND ({pred})"
        sql += " ORDER BY started_at DESC NULLS LAST, run_id"
        try:
            return db.sql_arrow(con, sql, params)
        except duckdb.Error as e:
            raise QueryError(f"bad filter: {db._clean(e)}") from None
    finally:
        con.close()


def user_tags(raw: Any) -> list[str]:
    """The user's tags of a runs row (a JSON list of strings); anything else reads as no tags."""
    if not isinstance(raw, str) or not raw:
        return []
    try:
        v = json.loads(raw)
    except ValueError:
        return []
    return [t for t in v if isinstance(t, str)] if isinstance(v, list) else []


def differing_params(param_dicts: list[dict]) -> list[str]:
    """Param names whose values are not the same in every run given (missing counts as different)."""
    keys: dict[str, None] = {}
    for p in param_dicts:
        keys.update(dict.fromkeys(p))
    out = []
    for k in keys:
        vals = {json.dumps(p.get(k, "\0missing"), sort_keys=True, default=str) for p in param_dicts}
        if len(vals) > 1:
            out.append(k)
    return out


def params_of(row: dict) -> dict:
    try:
        v = json.loads(row.get("params") or "{}")
        return v if isinstance(v, dict) else {"params": v}
    except (TypeError, ValueError):
        return {"params (unparsable)": row.get("params")}


_LAST: dict[str, tuple[tuple, dict]] = {}


def last_metrics(root: str, runs: pa.Table, run_ids: list[str], limit_names: int = 4) -> dict[str, dict]:
    """{run_id: {metric: last value by step}} for a page of runs (their files only).

    Cached per run until one of its metric files changes, so a page of finished runs
    costs a directory listing per run, not a scan.
    """
    out: dict[str, dict] = {}
    todo: dict[str, tuple] = {}
    for rid in run_ids:
        sig = []
        for f in _store.table_files(root, "metrics", [_store.check_run_id(rid)]):
            try:
                st = f.stat()
            except OSError:
                continue
            sig.append((f.name, st.st_size, st.st_mtime_ns))
        hit = _LAST.get(rid)
        if hit is not None and hit[0] == tuple(sig):
            out[rid] = hit[1]
        else:
            todo[rid] = tuple(sig)
    if todo:
        con = scoped(root, runs, list(todo), tables=["metrics"])
        try:
            res = con.execute("SELECT run_id, name, arg_max(value, step) FROM metrics "
                              "WHERE source IS DISTINCT FROM 'replay' GROUP BY ALL ORDER BY run_id, name").fetchall()
        finally:
            con.close()
        fresh: dict[str, dict] = {rid: {} for rid in todo}
        for rid, name, v in res:
            d = fresh.setdefault(rid, {})
            if len(d) < limit_names:
                d[name] = v
        if len(_LAST) > 50_000:
            _LAST.clear()
        for rid, d in fresh.items():
            _LAST[rid] = (todo.get(rid, ()), d)
            out[rid] = d
    return out


# -- code snapshots -----------------------------------------------------------------------------

def read_blob_verified(root: str, digest: str) -> bytes:
    """A blob's bytes, refused (NotFound) unless its name is a digest and its content hashes to it."""
    try:
        _blobs.check_blob_id(digest)
    except _blobs.BlobError:
        raise NotFound(f"not a blob digest: {str(digest)[:80]!r}") from None
    try:
        return _blobs.read_blob(root, digest)  # verifies the content hashes to ``digest``
    except OSError:
        raise NotFound(f"blob {digest} is missing from the store") from None
    except FlightlogError as e:  # the store's own verification (tampered content, symlink out)
        raise NotFound(str(e)) from None


def snapshot(root: str, snapshot_id: str | None) -> dict:
    """{"script", "files": {rel: text or None}, "errors": {rel: why}} of a code snapshot."""
    if not snapshot_id:
        raise NotFound("the run has no code snapshot")
    try:
        man = json.loads(read_blob_verified(root, snapshot_id))
        files = man["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise NotFound(f"snapshot {snapshot_id} is not a manifest") from None
    out: dict[str, Any] = {"script": str(man.get("script") or ""), "root": str(man.get("root") or ""),
                           "files": {}, "errors": {}}
    for rel, d in sorted(files.items())[:1000]:
        try:
            out["files"][str(rel)] = read_blob_verified(root, d).decode("utf-8", errors="replace")
        except NotFound as e:
            out["files"][str(rel)] = None
            out["errors"][str(rel)] = str(e)
    return out


def code_diff(a: dict, b: dict, a_label: str, b_label: str) -> list[dict]:
    """Per-file unified diff lines from snapshot ``b`` (the other run) to ``a`` (this run)."""
    out = []
    for rel in sorted(set(a["files"]) | set(b["files"])):
        ta, tb = a["files"].get(rel), b["files"].get(rel)
        if ta == tb:
            continue
        lines = list(difflib.unified_diff((tb or "").splitlines(), (ta or "").splitlines(),
                                          f"{b_label}/{rel}", f"{a_label}/{rel}", lineterm="", n=3))
        out.append({"file": rel, "status": "added" if tb is None else "removed" if ta is None else "changed",
                    "lines": lines})
    return out
