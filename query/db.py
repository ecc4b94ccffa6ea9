"""DuckDB over the store: one view per table, and the sandbox outside SQL runs in.

A connection is cheap (an in-memory DuckDB plus a directory listing), so each
query opens a fresh one and sees whatever live runs flushed a moment ago.
Files are validated once (footer + schema, cached by size and mtime); a
corrupt or foreign file is left out of the views with a warning naming it.

Sandbox: after the views are built, DuckDB's own settings lock the connection
(``enable_external_access=false`` with the store as the only allowed
directory, then ``lock_configuration``), and only read statements are
accepted. We rely on DuckDB for this rather than parsing SQL ourselves.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from flightlog import _config
from flightlog._errors import QueryError, RunNotFound, StoreError
from flightlog.collector import schema as _schema
from flightlog.collector import store as _store

log = logging.getLogger("flightlog")

_READ_TYPES = {"SELECT", "EXPLAIN", "PRAGMA"}
_valid_cache: dict[str, tuple[int, int, bool, tuple]] = {}
_cache_lock = threading.Lock()
_warned_files: set[str] = set()

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.float64(): "DOUBLE",
    pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN",
    _schema.TS: "TIMESTAMPTZ",
}


class StoreWarning(UserWarning):
    """A file in the store was skipped by readers."""


def _arrow(res) -> pa.Table:
    fn = getattr(res, "to_arrow_table", None) or getattr(res, "fetch_arrow_table")
    return fn()


def sql_arrow(con: duckdb.DuckDBPyConnection, sql, params: Any = None) -> pa.Table:
    """Run one statement and return Arrow without DuckDB's DB-API copy."""
    rel = con.sql(sql, params=params) if params is not None else con.sql(sql)
    if rel is None:
        return pa.table({})
    return _arrow(rel)


def _file_ok(path: Path, table: str) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    key = str(path)
    with _cache_lock:
        hit = _valid_cache.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    ok, why = True, ""
    names: tuple = ()
    try:
        sch = pq.read_schema(path)
        names = tuple(sch.names)
        target = _schema.schema(table)
        for f in sch:
            i = target.get_field_index(f.name)
            if i < 0:
                ok, why = False, f"unknown column {f.name!r}"
                break
            tt = target.field(i).type
            if not (f.type.equals(tt) or pa.types.is_null(f.type) or
                    (pa.types.is_dictionary(f.type) and f.type.value_type.equals(tt))):
                ok, why = False, f"column {f.name!r} is {f.type}, expected {tt}"
                break
        if ok and "run_id" not in sch.names:
            ok, why = False, "no run_id column"
    except Exception as e:
        ok, why = False, f"not a readable Parquet file ({type(e).__name__}: {str(e)[:120]})"
    if not ok and key not in _warned_files:
        _warned_files.add(key)
        warnings.warn(f"flightlog: skipping {path}: {why}", StoreWarning, stacklevel=4)
    with _cache_lock:
        _valid_cache[key] = (st.st_size, st.st_mtime_ns, ok, names)
    return ok


def _columns_of(path: Path) -> tuple:
    with _cache_lock:
        hit = _valid_cache.get(str(path))
    return hit[3] if hit else ()


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _empty_select(table: str) -> str:
    cols = ", ".join(f"CAST(NULL AS {_DUCK_TYPES[f.type]}) AS {f.name}" for f in _schema.schema(table))
    return f"SELECT {cols} WHERE false"


def _files_select(table: str, files: Sequence[Path]) -> str:
    # Columns added to a schema later are missing from older files: select NULL for
    # a column no file has (union_by_name fills the ones only some files have).
    lst = ", ".join(_sql_str(str(f)) for f in files)
    present: set[str] = set()
    for f in files:
        present.update(_columns_of(f))
    cols = ", ".join(f.name if f.name in present else f"CAST(NULL AS {_DUCK_TYPES[f.type]}) AS {f.name}"
                     for f in _schema.schema(table))
    return f"SELECT {cols} FROM read_parquet([{lst}], union_by_name=true)"


def read_runs(root: str) -> pa.Table:
    """The runs table with one row per run (newest row wins) and derived status.

    A run still ``running`` whose process is gone (same host) or whose
    heartbeat is older than ``STALE_SECONDS`` reads as ``crashed``.
    """
    files = [f for f in _store.table_files(root, "runs") if _file_ok(f, "runs")]
    if not files:
        return _schema.RUNS.empty_table()
    parts = []
    for f in files:
        try:
            parts.append(_schema.conform("runs", pq.ParquetFile(f).read()))
        except Exception as e:
            warnings.warn(f"flightlog: skipping {f}: {e}", StoreWarning, stacklevel=3)
    if not parts:
        return _schema.RUNS.empty_table()
    t = pa.concat_tables(parts)
    rows = t.to_pylist()
    latest: dict[str, dict] = {}
    for r in rows:
        cur = latest.get(r["run_id"])
        if cur is None or _rank(r) >= _rank(cur):
            latest[r["run_id"]] = r
    now = time.time()
    host = socket.gethostname()
    for r in latest.values():
        if r["status"] == "running" and _looks_dead(root, r, now, host):
            r["status"] = "crashed"
    out = sorted(latest.values(), key=lambda r: r["started_at"] or 0)
    return pa.Table.from_pylist(out, schema=_schema.RUNS)


def _create_runs(con: duckdb.DuckDBPyConnection, root: str) -> None:
    """The runs table: newest row per run, then ``crashed`` for runs whose process is gone.

    Built in SQL from the files (no Arrow registration: that makes DuckDB import pandas,
    ~0.2 s of start-up for every CLI command).
    """
    files = [f for f in _store.table_files(root, "runs") if _file_ok(f, "runs")]
    body = _files_select("runs", files) if files else _empty_select("runs")
    con.execute(f"""CREATE TABLE runs AS SELECT * FROM ({body})
        QUALIFY row_number() OVER (PARTITION BY run_id
                                   ORDER BY (status <> 'running') DESC, updated_at DESC NULLS LAST) = 1
        ORDER BY started_at""")
    live = con.execute("SELECT run_id, host, pid, updated_at FROM runs WHERE status = 'running'").fetchall()
    if not live:
        return
    now, host = time.time(), socket.gethostname()
    dead = [rid for rid, h, pid, upd in live
            if _looks_dead(root, {"run_id": rid, "host": h, "pid": pid, "updated_at": upd}, now, host)]
    if dead:
        con.execute(f"UPDATE runs SET status = 'crashed' WHERE run_id IN ({', '.join('?' for _ in dead)})", dead)


def _rank(r: dict):
    final = r["status"] != "running"
    return (final, r["updated_at"] or r["started_at"])


def _looks_dead(root: str, r: dict, now: float, host: str) -> bool:
    if r.get("host") == host and r.get("pid"):
        if not _pid_alive(int(r["pid"])):
            return True
    age = _store.heartbeat_age(root, r["run_id"], now)
    if age is None:
        upd = r["updated_at"]
        age = now - upd.timestamp() if upd else None
    return age is not None and age > _config.STALE_SECONDS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def connect(store: str | os.PathLike | None = None, *, sandbox: bool = True,
            must_exist: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view per table of ``store``."""
    root = _config.store_home(os.fspath(store) if store is not None else None)
    if must_exist and not os.path.isdir(root):
        raise StoreError(f"no flightlog store at {root} (set FLIGHTLOG_HOME or pass --store)")
    con = duckdb.connect(":memory:")
    for setting in ("SET TimeZone='UTC'", "SET enable_progress_bar=false"):
        try:
            con.execute(setting)
        except duckdb.Error:
            pass
    _create_runs(con, root)
    for table in _schema.TABLES:
        if table == "runs":
            continue
        files = [f for f in _store.table_files(root, table) if _file_ok(f, table)]
        body = _files_select(table, files) if files else _empty_select(table)
        con.execute(f"CREATE VIEW {table} AS {body}")
    _extra_views(con)
    if sandbox:
        real = os.path.realpath(root)
        dirs = sorted({root.rstrip(os.sep) + os.sep, real.rstrip(os.sep) + os.sep})
        con.execute(f"SET allowed_directories=[{', '.join(_sql_str(d) for d in dirs)}]")
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
    return con


_EXTRA_VIEWS: list = []


def register_view(fn) -> Any:
    """Register ``fn(con)`` that creates derived views (lineage, ...) on every connection."""
    _EXTRA_VIEWS.append(fn)
    return fn


def _extra_views(con) -> None:
    import flightlog.query.lineage  # noqa: F401  (registers the lineage_edges view)

    for fn in _EXTRA_VIEWS:
        try:
            fn(con)
        except duckdb.Error as e:
            log.warning("flightlog: view %s failed: %s", getattr(fn, "__name__", fn), e)


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but read statements, using DuckDB's own parser."""
    try:
        stmts = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"SQL error: {_clean(e)}") from e
    if not stmts:
        raise QueryError("empty SQL statement")
    for s in stmts:
        kind = str(s.type).split(".")[-1]
        if kind not in _READ_TYPES:
            raise QueryError(f"only read-only queries are allowed here ({kind} statements are refused)")


def _clean(e: Exception) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def run_sql(sql: str, params: Any = None, store: str | os.PathLike | None = None,
            con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Run one read-only query in the sandbox; errors become QueryError."""
    if not isinstance(sql, str):
        raise QueryError("SQL must be a string")
    own = con is None
    con = con or connect(store)
    try:
        check_read_only(con, sql)
        stmts = con.extract_statements(sql)
        try:
            for s in stmts[:-1]:
                con.execute(s)
            last = stmts[-1] if len(stmts) > 1 else sql
            return sql_arrow(con, last, params)
        except duckdb.PermissionException as e:
            raise QueryError(f"refused: {_clean(e)} (queries may only read the store)") from e
        except duckdb.Error as e:
            raise QueryError(f"SQL error: {_clean(e)}") from e
    finally:
        if own:
            con.close()


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None):
    rows = con.execute(sql, params).fetchall() if params is not None else con.execute(sql).fetchall()
    return rows[0] if rows else None


def resolve_run(con: duckdb.DuckDBPyConnection, run: str | None) -> str:
    """A full run id from ``latest``, a full id or a unique prefix."""
    if run is None or run == "latest":
        row = _one(con, "SELECT run_id FROM runs WHERE kind IS DISTINCT FROM 'replay' "
                          "ORDER BY started_at DESC LIMIT 1")
        if row is None:
            raise RunNotFound("the store holds no runs yet")
        return row[0]
    if not isinstance(run, str):
        raise RunNotFound(f"bad run id {run!r}")
    rows = con.execute("SELECT run_id FROM runs WHERE run_id = ? OR starts_with(run_id, ?) "
                       "ORDER BY run_id", [run, run]).fetchall()
    exact = [r[0] for r in rows if r[0] == run]
    if exact:
        return exact[0]
    if not rows:
        raise RunNotFound(f"no run {run!r} in the store")
    if len(rows) > 1:
        raise RunNotFound(f"run id {run!r} is ambiguous: {', '.join(r[0] for r in rows[:5])}")
    return rows[0][0]


def run_chain(con: duckdb.DuckDBPyConnection, run_id: str) -> list[str]:
    """``run_id`` and the runs it resumed from, oldest first."""
    chain = [run_id]
    seen = {run_id}
    while True:
        row = _one(con, "SELECT parent_run_id, kind FROM runs WHERE run_id = ?", [chain[0]])
        if not row or not row[0] or row[1] != "resume" or row[0] in seen:
            return chain
        chain.insert(0, row[0])
        seen.add(row[0])


def params_of(con: duckdb.DuckDBPyConnection, run_id: str) -> dict:
    row = _one(con, "SELECT params FROM runs WHERE run_id = ?", [run_id])
    return json.loads(row[0]) if row and row[0] else {}
