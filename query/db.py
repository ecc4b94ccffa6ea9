"""DuckDB over the store: one view per table, and the sandbox outside SQL runs in.

A connection is cheap (an in-memory DuckDB plus a directory listing), so each
query opens a fresh one and sees whatever live runs flushed a moment ago.
Files are validated once (footer + schema, cached by size and mtime); a
corrupt or foreign file is left out of the views with a warning naming it.

Sandbox (``connect(sandbox=True)``, what every reader uses):

* statements are checked by what they are, with DuckDB's own parser
  (:func:`check_read_only`): one plain query (SELECT/WITH/VALUES/FROM/DESCRIBE/
  SHOW/SUMMARIZE, or EXPLAIN [ANALYZE] of one) and nothing else;
* the connection itself cannot touch the file system: DuckDB's local file
  system is disabled and the store's listed files are read through a
  read-only file system of our own (``query/_snapshot.py``) that holds each
  file open from the moment it is listed, so compaction cannot delete a file
  from under a query; external access, extension loading and temp-file spilling
  are off and the configuration is locked.
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
from flightlog._errors import FlightlogWarning, QueryError, RunNotFound, StoreError
from flightlog.collector import fs as _fs
from flightlog.collector import schema as _schema
from flightlog.collector import store as _store
from flightlog.query import _snapshot

log = logging.getLogger("flightlog")

_LIST_TRIES = 8
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


class StoreWarning(FlightlogWarning):
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
    """Whether readers use ``path`` (valid Parquet with a compatible schema); False also when it is gone."""
    try:
        return _check_file(path, table)
    except FileNotFoundError:
        return False


def _check_file(path: Path, table: str, held: _snapshot.Held | None = None) -> bool:
    """Validate one file (cached by size and mtime); FileNotFoundError when it vanished since listing."""
    if held is not None:
        size, mtime_ns = held.stat(str(path))
    elif _fs.is_remote(path):
        try:
            size, mtime_ns = _fs.stat(path)
        except FileNotFoundError:
            raise
        except OSError:
            return False
    else:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise
        except OSError:
            return False
        size, mtime_ns = st.st_size, st.st_mtime_ns
    key = str(path)
    with _cache_lock:
        hit = _valid_cache.get(key)
    if hit and hit[0] == size and hit[1] == mtime_ns:
        return hit[2]
    ok, why = True, ""
    names: tuple = ()
    try:
        src = held.reader(key) if held is not None else (_fs.open_input(path) if _fs.is_remote(path) else path)
        sch = pq.read_schema(src)
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
    except FileNotFoundError:
        raise
    except Exception as e:
        ok, why = False, f"not a readable Parquet file ({type(e).__name__}: {str(e)[:120]})"
    if not ok and key not in _warned_files:
        _warned_files.add(key)
        warnings.warn(f"flightlog: skipping {path}: {why}", StoreWarning, stacklevel=4)
    with _cache_lock:
        _valid_cache[key] = (size, mtime_ns, ok, names)
    return ok


def _listed(root: str, table: str, held: _snapshot.Held | None) -> list[Path]:
    """The visible, valid files of ``table``; with ``held``, each one held open as it is listed.

    A file that vanishes between the directory listing and its opening was compacted
    away, and its rows are now in a file this listing missed: list again.
    """
    for _ in range(_LIST_TRIES):
        files = _store.table_files(root, table)
        out: list[Path] = []
        taken: list[str] = []
        try:
            for f in files:
                if held is not None:
                    held.add(str(f))
                    taken.append(str(f))
                if _check_file(f, table, held):
                    out.append(f)
            return out
        except FileNotFoundError:
            if held is not None:
                held.drop(taken)
            time.sleep(0.005)
    raise StoreError(f"the {table} table kept changing while it was read ({_LIST_TRIES} listings); try again")


def _columns_of(path: Path) -> tuple:
    with _cache_lock:
        hit = _valid_cache.get(str(path))
    return hit[3] if hit else ()


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _empty_select(table: str) -> str:
    cols = ", ".join(f"CAST(NULL AS {_DUCK_TYPES[f.type]}) AS {f.name}" for f in _schema.schema(table))
    return f"SELECT {cols} WHERE false"


def _files_select(table: str, files: Sequence[Path], ref=str, written: bool = False) -> str:
    """SELECT of every row of ``files`` in ``table``'s schema; ``written`` adds each row's file (``_fn``) and row (``_row``)."""
    # Columns added to a schema later are missing from older files: select NULL for
    # a column no file has (union_by_name fills the ones only some files have).
    lst = ", ".join(_sql_str(ref(f)) for f in files)
    present: set[str] = set()
    for f in files:
        present.update(_columns_of(f))
    cols = ", ".join(_column(f) if f.name in present else f"CAST(NULL AS {_DUCK_TYPES[f.type]}) AS {f.name}"
                     for f in _schema.schema(table))
    if written:
        return (f"SELECT {cols}, filename AS _fn, file_row_number AS _row "
                f"FROM read_parquet([{lst}], union_by_name=true, filename=true, file_row_number=true)")
    return f"SELECT {cols} FROM read_parquet([{lst}], union_by_name=true)"


# Stored times are untrusted: one outside what every client can represent (years 1-9999)
# reads as NULL (unknown) instead of making Python conversions of any result raise.
_TS_RANGE = "TIMESTAMPTZ '0001-01-02 00:00:00+00' AND TIMESTAMPTZ '9999-12-30 00:00:00+00'"


def _column(f: pa.Field) -> str:
    if f.type == _schema.TS:
        return f"CASE WHEN {f.name} BETWEEN {_TS_RANGE} THEN {f.name} END AS {f.name}"
    return f.name


def read_runs(root: str) -> pa.Table:
    """The runs table with one row per run (newest row wins) and derived status, oldest first.

    The same table every connection has (:func:`_create_runs` builds both): a run still
    ``running`` whose process is gone (same host) or whose heartbeat is older than
    ``STALE_SECONDS`` reads as ``crashed``. Every stored value is untrusted: nothing here
    converts a stored timestamp to a Python datetime or hands a stored pid to the OS unchecked.
    """
    held = _snapshot.Held()
    con = duckdb.connect(":memory:")
    try:
        _settings(con)
        _snapshot.register(con, held)
        _create_runs(con, root, _listed(root, "runs", held), _snapshot.url)
        t = sql_arrow(con, f"SELECT * FROM runs ORDER BY {_RUNS_ORDER}")
    finally:
        con.close()
        held.close()
    return _schema.conform("runs", t)


# The one rule for which stored row of a run is its row: a final row (any status but running)
# before a running one, then the newest updated_at (unknown last), then the row written last
# (the later file in the listing order of ``store.visible_files``, then the later row in it).
# A status that is NULL is not final. tags and notes come from the row with the newest
# annotated_at (``flightlog tag``/``note`` on a live run), ties again to the row written last.
_NEWEST_ROW = "coalesce(status <> 'running', false) DESC, updated_at DESC NULLS LAST, _file DESC, _row DESC"
_RUNS_ORDER = "started_at NULLS LAST, run_id"


def _settings(con: duckdb.DuckDBPyConnection) -> None:
    for setting in ("SET TimeZone='UTC'", "SET enable_progress_bar=false"):
        try:
            con.execute(setting)
        except duckdb.Error:
            pass


def _create_runs(con: duckdb.DuckDBPyConnection, root: str, files: Sequence[Path], ref=str) -> None:
    """The runs table: newest row per run (:data:`_NEWEST_ROW`), then ``crashed`` for runs whose process is gone.

    Built in SQL from the files (no Arrow registration: that makes DuckDB import pandas,
    ~0.2 s of start-up for every CLI command). As in every view, a row's ``run_id`` is the
    folder it is stored in (``run_id=<id>``, DuckDB's hive partitioning), whatever the file says.
    """
    if files:  # each row's place in the write order: its file's position in the listing, its row in the file
        sel = _files_select("runs", files, ref, written=True)
        pos = ", ".join(f"({_sql_str(ref(f))}, {i})" for i, f in enumerate(files))
        body = f"SELECT s.* EXCLUDE (_fn), o._file FROM ({sel}) s JOIN (VALUES {pos}) o(_fn, _file) ON s._fn = o._fn"
    else:
        body = f"SELECT *, 0 AS _row, 0 AS _file FROM ({_empty_select('runs')})"
    con.execute(f"""CREATE TABLE runs AS SELECT * EXCLUDE (_ann, _file, _row) REPLACE (
            CASE WHEN _ann IS NULL THEN tags ELSE _ann.t END AS tags,
            CASE WHEN _ann IS NULL THEN notes ELSE _ann.n END AS notes)
        FROM (SELECT *, first_value(CASE WHEN annotated_at IS NOT NULL THEN {{'t': tags, 'n': notes}} END)
                            OVER (PARTITION BY run_id ORDER BY annotated_at DESC NULLS LAST, _file DESC, _row DESC) AS _ann
              FROM ({body})
              QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY {_NEWEST_ROW}) = 1)
        ORDER BY {_RUNS_ORDER}""")
    # epoch_us, not the timestamp: a stored value outside Python's datetime range must not raise here
    live = con.execute("SELECT run_id, host, pid, epoch_us(updated_at) FROM runs WHERE status = 'running'").fetchall()
    if not live:
        return
    now, host = time.time(), socket.gethostname()
    dead = [rid for rid, h, pid, upd in live
            if _looks_dead(root, {"run_id": rid, "host": h, "pid": pid, "updated_at": upd}, now, host)]
    if dead:
        con.execute(f"UPDATE runs SET status = 'crashed' WHERE run_id IN ({', '.join('?' for _ in dead)})", dead)


def _epoch_s(v: Any) -> float | None:
    """Seconds since the epoch of a stored time (datetime, or int microseconds); None when unusable."""
    try:
        if v is None or isinstance(v, bool):
            return None
        if isinstance(v, int):
            x = v / 1e6
        elif hasattr(v, "timestamp"):
            x = float(v.timestamp())
        else:
            return None
    except (ValueError, OverflowError, OSError, TypeError):
        return None
    return x if x == x and abs(x) < 1e11 else None  # NaN or beyond year ~5000: unknown


def _looks_dead(root: str, r: dict, now: float, host: str) -> bool:
    """Whether a ``running`` run is gone: its local process died, or its heartbeat is stale."""
    if r.get("host") == host and _pid_alive(r.get("pid")) is False:
        return True
    try:
        age = _store.heartbeat_age(root, r["run_id"], now)
    except (ValueError, OSError):  # a run id no partition can have
        age = None
    if age is None:
        upd = _epoch_s(r.get("updated_at"))
        age = now - upd if upd is not None else None
    return age is not None and age > _config.STALE_SECONDS


_PID_MAX = 1 << 22  # Linux's largest pid_max; anything above cannot be a process here


def _pid_alive(pid: Any) -> bool | None:
    """True/False for a live/dead local process; None when ``pid`` cannot be a process id (unknown)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= _PID_MAX:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return None
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def connect(store: str | os.PathLike | None = None, *, sandbox: bool = True,
            must_exist: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view per table of ``store`` (sandboxed: see the module docstring)."""
    root = _config.store_home(os.fspath(store) if store is not None else None)
    remote = _fs.is_remote(root)
    try:
        exists = not must_exist or (_fs.isdir(root) if remote else os.path.isdir(root))
    except OSError as e:  # an object store that cannot be reached (no network, no region, refused)
        msg = " ".join(str(e).split())[:300]
        raise StoreError(f"cannot reach the store {root}: {msg} (S3: check AWS_ENDPOINT_URL, AWS_REGION and "
                         "the credentials)") from None
    if not exists:
        raise StoreError(f"no flightlog store at {root} (set FLIGHTLOG_HOME or pass --store)")
    con = duckdb.connect(":memory:")
    try:
        _settings(con)
        held = _snapshot.Held()  # views read what was listed, even if compaction deletes it meanwhile
        _snapshot.register(con, held)
        ref = _snapshot.url
        _create_runs(con, root, _listed(root, "runs", held), ref)
        for table in _schema.TABLES:
            if table == "runs":
                continue
            files = _listed(root, table, held)
            body = _files_select(table, files, ref) if files else _empty_select(table)
            con.execute(f"CREATE VIEW {table} AS {body}")
        _extra_views(con)
        if sandbox:
            _lock(con, [_snapshot.url(p) for p in held.paths()])
    except BaseException:
        con.close()
        raise
    return con


def _lock(con: duckdb.DuckDBPyConnection, urls: Sequence[str]) -> None:
    """Take the file system, external access, extensions and settings away from ``con`` (in this order).

    ``allowed_paths`` names the held files exactly (it is what lets DuckDB read them once
    external access is off); no directory is allowed, so no new name can be created.
    """
    con.execute(f"SET allowed_paths=[{', '.join(_sql_str(u) for u in urls)}]")
    for setting in (
        "SET autoinstall_known_extensions=false",
        "SET autoload_known_extensions=false",
        "SET allow_community_extensions=false",
        "SET temp_directory=''",  # no spilling: a query past memory fails instead of writing files
        "SET enable_external_access=false",
        "SET disabled_filesystems='LocalFileSystem'",
        "SET lock_configuration=true",
    ):
        con.execute(setting)


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


_ALLOWED_HINT = "a single SELECT/WITH/VALUES/FROM/DESCRIBE/SHOW/SUMMARIZE query, or EXPLAIN [ANALYZE] of one"


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Accept exactly one plain query, judged by DuckDB's parser (what the statement is, not its first word).

    Refused: more than one statement; every statement type but SELECT (PRAGMA, CALL, COPY,
    EXPORT/IMPORT, SET, ATTACH, INSTALL/LOAD, DDL, DML, ...); EXPLAIN [ANALYZE] of anything
    that is not itself one plain query. This is the one statement check: ``flightlog sql``,
    ``fl.query``, the health checks and the collector's ``/v1/query`` all call it.
    """
    if not isinstance(sql, str):
        raise QueryError("SQL must be a string")
    stmts = _statements(con, sql)
    if not stmts:
        raise QueryError("empty SQL statement")
    if len(stmts) > 1:
        raise QueryError(f"only one statement per query is allowed ({len(stmts)} given); run them one at a time")
    kind = _kind(stmts[0])
    if kind == "SELECT":
        return
    if kind == "EXPLAIN":
        inner = _explained(stmts[0].query)
        if inner is not None:
            sub = _statements(con, inner)
            if len(sub) == 1 and _kind(sub[0]) == "SELECT":
                return
            what = _kind(sub[0]) if len(sub) == 1 else "several"
        else:
            what = "an unrecognised"
        raise QueryError(f"only read-only queries are allowed here (EXPLAIN of {what} statement is refused; "
                         f"allowed: {_ALLOWED_HINT})")
    raise QueryError(f"only read-only queries are allowed here ({kind} statements are refused; "
                     f"allowed: {_ALLOWED_HINT})")


def _statements(con: duckdb.DuckDBPyConnection, sql: str) -> list:
    try:
        return list(con.extract_statements(sql))
    except duckdb.Error as e:
        raise QueryError(f"SQL error: {_clean(e)}") from e


def _kind(stmt) -> str:
    return str(stmt.type).split(".")[-1]


def _explained(text: str) -> str | None:
    """The statement an ``EXPLAIN [ANALYZE] [(options)]`` wraps, or None when the prefix is not that."""
    i, n = 0, len(text)

    def skip(i: int) -> int:
        while i < n:
            if text[i].isspace():
                i += 1
            elif text.startswith("--", i):
                j = text.find("\n", i)
                i = n if j < 0 else j + 1
            elif text.startswith("/*", i):
                j = text.find("*/", i + 2)
                if j < 0:
                    return n
                i = j + 2
            else:
                break
        return i

    def word(i: int) -> tuple[str, int]:
        j = i
        while j < n and (text[j].isalnum() or text[j] == "_"):
            j += 1
        return text[i:j].upper(), j

    i = skip(i)
    w, j = word(i)
    if w != "EXPLAIN":
        return None
    i = skip(j)
    w, j = word(i)
    if w in ("ANALYZE", "ANALYSE"):
        i = skip(j)
    if i < n and text[i] == "(":  # EXPLAIN (FORMAT json) ...: plain option words only
        j = text.find(")", i)
        if j < 0 or any(c in text[i + 1:j] for c in "'\";(/-"):
            return None
        i = skip(j + 1)
    rest = text[i:]
    return rest if rest.strip() else None


def _clean(e: Exception) -> str:
    """DuckDB's message on one line: the first line plus its hints ("Did you mean …", candidate bindings)."""
    msg = str(e).strip()
    if not msg:
        return type(e).__name__
    lines = [ln.strip() for ln in msg.splitlines()]
    hints = [ln for ln in lines[1:] if ln.startswith(("Did you mean", "Candidate bindings", "Candidate"))]
    return " ".join([lines[0]] + hints)


def run_sql(sql: str, params: Any = None, store: str | os.PathLike | None = None,
            con: duckdb.DuckDBPyConnection | None = None, *, limit: int | None = None) -> pa.Table:
    """Run one read-only query in the sandbox; errors become QueryError, with DuckDB's error as its cause.

    The one way user SQL runs: ``fl.query``, ``flightlog sql`` and the collector's ``/v1/query``
    (which tells a refusal, a timeout and running out of memory apart by the cause). With
    ``limit``, DuckDB stops after that many rows.
    """
    if not isinstance(sql, str):
        raise QueryError("SQL must be a string")
    own = con is None
    con = con or connect(store)
    try:
        check_read_only(con, sql)
        try:
            rel = con.sql(sql, params=params) if params is not None else con.sql(sql)
            if rel is None:
                return pa.table({})
            return _arrow(rel if limit is None else rel.limit(limit))
        except duckdb.PermissionException as e:
            raise QueryError(f"refused: {_clean(e)} (queries may only read the store)") from e
        except (duckdb.Error, pa.ArrowException, TypeError, ValueError, OverflowError) as e:  # bad SQL or params
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
        row = _one(con, "SELECT run_id FROM runs WHERE kind IS DISTINCT FROM 'replay' AND run_id IS NOT NULL "
                          "ORDER BY started_at DESC NULLS LAST LIMIT 1")
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
    # a run name (fl.init(name=...)): replays carry their source's name, so they never match by name
    named = con.execute("SELECT run_id, status, strftime(started_at, '%Y-%m-%d %H:%M') FROM runs "
                        "WHERE name = ? AND kind IS DISTINCT FROM 'replay' ORDER BY started_at DESC",
                        [run]).fetchall()
    if len(named) == 1 and not rows:
        return named[0][0]
    if not rows and not named:
        raise RunNotFound(f"no run {run!r} in the store (give a run id, a unique prefix, a run name or 'latest')")
    if len(rows) + len(named) > 1:
        cands = [f"{r[0]} (name {run!r}, {r[1]}, started {r[2]})" for r in named[:8]]
        cands += [r[0] for r in rows[:max(0, 8 - len(cands))]]
        more = len(rows) + len(named) - len(cands)
        raise RunNotFound(f"run {run!r} is ambiguous: {len(rows) + len(named)} runs match: {'; '.join(cands)}"
                          + (f"; and {more} more" if more > 0 else "") + " (give more of the run id)")
    return rows[0][0] if rows else named[0][0]


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
