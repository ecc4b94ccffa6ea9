"""The collector server: ``flightlog serve``.

One FastAPI app on uvicorn that writes exactly the store the embedded writer
writes (same schemas, same layout, same atomic part writer), so every reader
works unchanged on a collector's store.

Endpoints

* ``POST /v1/traces`` — OTLP/HTTP traces, protobuf or JSON, optionally gzip;
  replies ``ExportTraceServiceResponse`` (partial success for rejected spans).
* ``POST /v1/ingest/{table}`` — an Arrow IPC stream of one flightlog table.
* ``POST /v1/heartbeat``, ``POST /v1/compact`` — what remote-mode runs need.
* ``POST /v1/query`` — read-only SQL (the CLI's sandbox), JSON or Arrow,
  with a row limit and a time limit.
* ``GET /v1/runs``, ``GET /healthz``, ``GET /openapi.json``.

Durability: a 2xx reply is sent only after the request's rows are in renamed,
fsynced Parquet files, so a crash after the reply loses nothing.

Exactly-once: a client names each batch ``<writer>-<seq>`` (header
``X-Flightlog-Batch``) and the server names the part file after it
(``part-<seq>-<writer>.parquet``). A resend of a batch whose first reply was
lost finds its file (or a compact file covering it) and is acknowledged
without writing again; two copies racing each other rename identical bytes to
the same name. OTLP requests are named by a hash of their content for the
same reason.
"""
import argparse
import hmac
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from flightlog import _config
from flightlog.collector import otlp as _otlp
from flightlog.collector import schema as _schema
from flightlog.collector import store as _store

log = logging.getLogger("flightlog.collector")

ARROW_STREAM = "application/vnd.apache.arrow.stream"
BATCH_HEADER = "x-flightlog-batch"
ATTEMPT_HEADER = "x-flightlog-attempt"
DEFAULT_PORT = 4318
DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_QUERY_TIMEOUT = 30.0
DEFAULT_MAX_ROWS = 100_000
DEFAULT_READ_TIMEOUT = 60.0  # a client has this long to send a whole request (headers + body)
HEADER_TIMEOUT = 10.0  # ... and at most this long (or the read timeout, if shorter) for its headers
DEFAULT_QUERY_MEMORY = 1 << 30  # bytes one /v1/query may allocate (its process's data segment)
DEFAULT_MAX_RESPONSE = 128 << 20  # bytes one /v1/query may return
DEFAULT_MAX_QUERIES = 4  # queries running at once; more wait for a slot within their time limit
DECODED_FACTOR = 4  # rows of one request may take this many times the body limit once converted
JSON_BODY_LIMIT = 4 << 20  # bodies of the JSON endpoints (/v1/query, /v1/heartbeat, /v1/compact)
_BATCH_RE = re.compile(r"^([A-Za-z0-9]{1,64})-(\d{1,15})$")
_WRITER_RE = re.compile(r"^[A-Za-z0-9]{1,64}$")


class BadRequest(Exception):
    """A client error: becomes a 4xx with ``message``; nothing was written."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- the storage side (no FastAPI here: unit-testable and used by the bench) ----------

def parse_batch_id(value: str | None) -> tuple[str, int] | None:
    """``(writer, seq)`` from an ``X-Flightlog-Batch`` header; None when absent."""
    if value is None or value == "":
        return None
    m = _BATCH_RE.match(value.strip())
    if not m:
        raise BadRequest(400, f"bad {BATCH_HEADER} header {value[:80]!r}: expected <letters/digits>-<number>")
    return m.group(1), int(m.group(2))


def _covered_by_compact(d: Path, writer: str, seq: int) -> bool:
    # Membership, not the name's range: a spooled batch delivered after a merge lies inside the range.
    return _store.compact_holds(d, writer, seq)


def write_batch(root: str | os.PathLike, table: str, data: pa.Table, writer: str, seq: int,
                retry: bool = True, fsync: bool = True) -> tuple[int, int]:
    """Write one batch as ``part-<seq>-<writer>`` in each run partition it touches.

    Returns ``(rows written, rows already stored)``. Raises BadRequest for rows
    that do not fit the table. ``retry=False`` (a batch's first transmission)
    skips the scan for compact files that may already hold it.
    """
    try:
        data = _schema.conform(table, data)
    except KeyError as e:
        raise BadRequest(404, str(e.args[0])) from None
    except (ValueError, TypeError, pa.ArrowException) as e:
        raise BadRequest(400, f"rows do not fit table {table!r}: {str(e).splitlines()[0][:300]}") from None
    if data.num_rows == 0:
        return 0, 0
    runs = data.column("run_id")
    if runs.null_count:
        raise BadRequest(400, f"{runs.null_count} {table} row(s) have no run_id")
    uniq = pc.unique(runs).to_pylist()
    for rid in uniq:
        try:
            _store.check_run_id(rid)
        except ValueError as e:
            raise BadRequest(400, str(e)) from None
    written = dup = 0
    for rid in uniq:
        sub = data if len(uniq) == 1 else data.filter(pc.equal(runs, rid))
        d = _store.part_dir(root, table, rid)
        path = d / f"part-{seq:08d}-{writer}.parquet"
        if path.exists() or (retry and _covered_by_compact(d, writer, seq)):
            dup += sub.num_rows
            continue
        _store.write_parquet_atomic(path, sub, table, fsync=fsync)
        written += sub.num_rows
    return written, dup


def read_arrow_stream(body: bytes) -> pa.Table:
    """The table in an Arrow IPC stream; BadRequest when it is not one."""
    if not body:
        raise BadRequest(400, "empty body: expected an Arrow IPC stream")
    try:
        with ipc.open_stream(pa.py_buffer(body)) as reader:
            return reader.read_all()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadRequest(400, f"malformed Arrow IPC stream: {str(e).splitlines()[0][:300]}") from None


def gunzip(body: bytes, limit: int) -> bytes:
    """Inflate a gzip body, refusing to grow past ``limit`` bytes (zip bombs)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise BadRequest(413, f"decompressed body is larger than the limit of {limit} bytes")
        out += d.flush()
    except zlib.error as e:
        raise BadRequest(400, f"malformed gzip body: {e}") from None
    if not d.eof:
        raise BadRequest(400, "truncated gzip body")
    return out


class Stats:
    """Counters shown by ``/healthz``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.c: dict[str, int] = {"requests": 0, "rows": 0, "spans": 0, "duplicate_rows": 0,
                                  "rejected_spans": 0, "client_errors": 0, "server_errors": 0}

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                self.c[k] = self.c.get(k, 0) + v

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.c)


# -- the app ---------------------------------------------------------------------------

def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def create_app(store: str | os.PathLike | None = None, token: str | None = None, *,
               max_body: int = DEFAULT_MAX_BODY, query_timeout: float = DEFAULT_QUERY_TIMEOUT,
               max_rows: int = DEFAULT_MAX_ROWS):
    """Build the FastAPI app over ``store`` (created if missing)."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool

    from flightlog import __version__

    root = _config.store_home(os.fspath(store) if store is not None else None)
    os.makedirs(root, exist_ok=True)
    stats = Stats()
    tok = token.encode() if token else None

    def auth(request: Request) -> None:
        if tok is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, cred = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(cred.strip().encode(), tok):
            stats.add(client_errors=1)
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="flightlog collector", version=__version__,
                  description="OTLP/HTTP traces, Arrow ingest of flightlog tables, read-only SQL over the store.")
    app.state.store = root
    app.state.stats = stats
    secured = [Depends(auth)]

    async def read_body(request: Request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise BadRequest(400, "bad Content-Length header") from None
            if n > max_body:
                raise BadRequest(413, f"body of {n} bytes is larger than the limit of {max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise BadRequest(413, f"body is larger than the limit of {max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def decode_encoding(request: Request, body: bytes) -> bytes:
        enc = (request.headers.get("content-encoding") or "identity").strip().lower()
        if enc in ("identity", ""):
            return body
        if enc == "gzip":
            return gunzip(body, max_body)
        raise BadRequest(415, f"unsupported Content-Encoding {enc!r} (use gzip or none)")

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, e: BadRequest):
        stats.add(client_errors=1)
        return JSONResponse({"detail": e.message}, status_code=e.status)

    # -- OTLP -------------------------------------------------------------------------

    def ingest_traces(body: bytes, ctype: str, request: Request) -> tuple[int, int, int, str]:
        body = decode_encoding(request, body)
        req = _otlp.parse_request(body, ctype)
        peer = request.client.host if request.client else None
        table, rejected, why = _otlp.spans_table(req, default_writer=f"peer:{peer}" if peer else None)
        import xxhash

        writer = "o" + xxhash.xxh3_128_hexdigest(body)[:24]
        n, dup = write_batch(root, "spans", table, writer, 0, retry=False) if table.num_rows else (0, 0)
        return n, dup, rejected, why

    @app.post("/v1/traces", dependencies=secured, tags=["ingest"],
              summary="OTLP/HTTP trace export (protobuf or JSON, optionally gzip)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  _otlp.PROTOBUF: {"schema": {"type": "string", "format": "binary"}},
                  _otlp.JSON: {"schema": {"type": "object"}}}}})
    async def traces(request: Request):
        ctype = _media_type(request.headers.get("content-type"))
        if ctype not in (_otlp.PROTOBUF, _otlp.JSON):
            stats.add(client_errors=1)
            return Response(_otlp.error_body(f"unsupported content type {ctype!r}: use {_otlp.PROTOBUF} "
                                             f"or {_otlp.JSON}", _otlp.JSON), status_code=415,
                            media_type=_otlp.JSON)
        try:
            body = await read_body(request)
            n, dup, rejected, why = await run_in_threadpool(ingest_traces, body, ctype, request)
        except (BadRequest, _otlp.OTLPDecodeError) as e:
            status = e.status if isinstance(e, BadRequest) else 400
            msg = e.message if isinstance(e, BadRequest) else str(e)
            stats.add(client_errors=1)
            return Response(_otlp.error_body(msg, ctype), status_code=status, media_type=ctype)
        except OSError as e:
            stats.add(server_errors=1)
            log.error("flightlog collector: cannot write spans: %s", e)
            return Response(_otlp.error_body(f"cannot write to the store: {e}", ctype, code=14),
                            status_code=503, media_type=ctype, headers={"Retry-After": "2"})
        stats.add(requests=1, spans=n, duplicate_rows=dup, rejected_spans=rejected)
        return Response(_otlp.response_body(rejected, why, ctype), media_type=ctype)

    # -- Arrow ingest ------------------------------------------------------------------

    def ingest_arrow(table: str, body: bytes, request: Request, batch: tuple[str, int] | None,
                     attempt: int) -> tuple[int, int]:
        body = decode_encoding(request, body)
        data = read_arrow_stream(body)
        if batch is None:
            writer, seq, retry = "s" + uuid.uuid4().hex[:16], 0, False
        else:
            (writer, seq), retry = batch, attempt > 1
        return write_batch(root, table, data, writer, seq, retry=retry)

    @app.post("/v1/ingest/{table}", dependencies=secured, tags=["ingest"],
              summary="Append rows of a flightlog table (Arrow IPC stream)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}},
                  "parameters": [
                      {"name": "X-Flightlog-Batch", "in": "header", "required": False,
                       "schema": {"type": "string"}, "description": "<writer>-<seq>: makes resends idempotent"},
                      {"name": "X-Flightlog-Attempt", "in": "header", "required": False,
                       "schema": {"type": "integer"}, "description": "1 for a first send, more for a resend"}]})
    async def ingest(table: str, request: Request):
        if table not in _schema.TABLES:
            raise BadRequest(404, f"unknown table {table!r}; known: {', '.join(_schema.TABLES)}")
        ctype = _media_type(request.headers.get("content-type"))
        if ctype not in (ARROW_STREAM, "application/octet-stream"):
            raise BadRequest(415, f"unsupported content type {ctype!r}: send an Arrow IPC stream as {ARROW_STREAM}")
        batch = parse_batch_id(request.headers.get(BATCH_HEADER))
        try:
            attempt = int(request.headers.get(ATTEMPT_HEADER) or 2)
        except ValueError:
            raise BadRequest(400, f"bad {ATTEMPT_HEADER} header") from None
        body = await read_body(request)
        try:
            n, dup = await run_in_threadpool(ingest_arrow, table, body, request, batch, attempt)
        except OSError as e:
            stats.add(server_errors=1)
            log.error("flightlog collector: cannot write %s: %s", table, e)
            return JSONResponse({"detail": f"cannot write to the store: {e}"}, status_code=503,
                                headers={"Retry-After": "2"})
        stats.add(requests=1, rows=n, duplicate_rows=dup)
        return {"table": table, "rows": n, "duplicate_rows": dup}

    # -- remote-mode helpers ---------------------------------------------------------

    class RunWriter(BaseModel):
        run_id: str = Field(min_length=1, max_length=128)
        writer: str = Field(pattern=r"^[A-Za-z0-9]{1,64}$")

    def _run_dir_ok(run_id: str) -> None:
        try:
            _store.check_run_id(run_id)
        except ValueError as e:
            raise BadRequest(400, str(e)) from None

    @app.post("/v1/heartbeat", dependencies=secured, status_code=204, response_class=Response, tags=["runs"],
              summary="A live run's heartbeat (readers call a silent running run crashed)")
    def heartbeat(body: RunWriter):
        _run_dir_ok(body.run_id)
        _store.touch_heartbeat(root, body.run_id, body.writer)
        return Response(status_code=204)

    @app.post("/v1/compact", dependencies=secured, tags=["runs"],
              summary="Merge one writer's parts of a run (sent by a client whose batches are all acknowledged)")
    def compact(body: RunWriter) -> dict:
        _run_dir_ok(body.run_id)
        merged = 0
        for table in _schema.TABLES:
            d = _store.part_dir(root, table, body.run_id)
            if d.is_dir() and _store.compact_dir(d, table, body.writer, fsync=True) is not None:
                merged += 1
        return {"merged_partitions": merged}

    # -- reading -----------------------------------------------------------------------

    class QueryRequest(BaseModel):
        sql: str = Field(min_length=1, max_length=100_000)
        params: list[Any] | dict[str, Any] | None = None
        format: Literal["json", "arrow"] = "json"
        max_rows: int | None = Field(default=None, ge=1)
        timeout_s: float | None = Field(default=None, gt=0)

    @app.post("/v1/query", dependencies=secured, tags=["query"],
              summary="Read-only SQL over the store (JSON or Arrow IPC stream)")
    def query(body: QueryRequest, request: Request):
        limit = min(body.max_rows or max_rows, max_rows)
        timeout = min(body.timeout_s or query_timeout, query_timeout)
        fmt = body.format
        if ARROW_STREAM in (request.headers.get("accept") or ""):
            fmt = "arrow"
        table, truncated = run_query(root, body.sql, body.params, limit, timeout)
        if fmt == "arrow":
            sink = pa.BufferOutputStream()
            with ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM,
                            headers={"X-Flightlog-Truncated": "true" if truncated else "false"})
        from flightlog import _format

        cols = json.dumps([{"name": f.name, "type": str(f.type)} for f in table.schema])
        text = (f'{{"columns": {cols}, "row_count": {table.num_rows}, '
                f'"truncated": {"true" if truncated else "false"}, "rows": {_format.to_json(table)}}}')
        return Response(text, media_type="application/json")

    @app.get("/v1/runs", dependencies=secured, tags=["query"], summary="Runs in the store, newest first")
    def runs(project: str | None = None, limit: int = 100):
        from flightlog import _format
        from flightlog.query import db

        t = db.read_runs(root)
        if project is not None:
            t = t.filter(pc.equal(t.column("project"), project))
        t = t.take(pc.sort_indices(t, [("started_at", "descending")])).slice(0, max(1, min(limit, 10_000)))
        return Response(_format.to_json(t), media_type="application/json")

    @app.get("/healthz", tags=["health"], summary="Liveness and counters (no token needed)")
    def healthz() -> dict:
        return {"status": "ok", "version": __version__, "uptime_s": round(time.time() - stats.started, 1),
                **stats.snapshot()}

    try:  # the web UI (flightlog.ui) under /ui: same store, same token
        from flightlog.ui import create_app as _ui_app
    except ImportError:
        pass
    else:
        app.mount("/ui", _ui_app(root, token))
    return app


def run_query(root: str, sql: str, params: Any, limit: int, timeout: float) -> tuple[pa.Table, bool]:
    """Run read-only SQL in the CLI's sandbox; stop at ``limit`` rows and ``timeout`` seconds."""
    import duckdb

    from flightlog._errors import FlightlogError, QueryError
    from flightlog.query import db

    try:
        con = db.connect(root)
    except FlightlogError as e:
        raise BadRequest(400, str(e)) from None
    timer = threading.Timer(timeout, con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        db.check_read_only(con, sql)
        stmts = con.extract_statements(sql)
        for s in stmts[:-1]:
            con.execute(s)
        rel = con.sql(stmts[-1] if len(stmts) > 1 else sql, params=params)
        if rel is None:
            return pa.table({}), False
        table = db._arrow(rel.limit(limit + 1))  # DuckDB stops producing rows at the limit
        truncated = table.num_rows > limit
        return (table.slice(0, limit) if truncated else table), truncated
    except QueryError as e:
        raise BadRequest(400, str(e)) from None
    except duckdb.InterruptException:
        raise BadRequest(408, f"query exceeded the time limit of {timeout:g} s") from None
    except duckdb.PermissionException as e:
        raise BadRequest(403, f"refused: {db._clean(e)} (queries may only read the store)") from None
    except (duckdb.Error, pa.ArrowException) as e:
        if "interrupt" in str(e).lower():
            raise BadRequest(408, f"query exceeded the time limit of {timeout:g} s") from None
        raise BadRequest(400, f"SQL error: {db._clean(e)}") from None
    finally:
        timer.cancel()
        con.close()


class ServerThread:
    """A collector on a loopback port in a background thread: for tests, notebooks and benchmarks.

    ``with ServerThread(store) as srv: ... srv.url ...``; ``port=0`` picks a free port.
    """

    def __init__(self, store: str | os.PathLike, token: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, **app_kw: Any) -> None:
        import socket

        import uvicorn

        self.app = create_app(store, token, **app_kw)
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        # uvicorn binds itself: handing it a pre-bound socket made every reply ~40 ms slower here
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="critical",
                                                     access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._run, name="flightlog-collector", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                raise OSError(f"the collector could not listen on {host}:{port}")
            time.sleep(0.01)

    def _run(self) -> None:
        try:
            self._server.run()
        except SystemExit:  # uvicorn's start-up failure (port in use): the constructor reports it
            pass

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# -- CLI -------------------------------------------------------------------------------

def configure_serve(p: argparse.ArgumentParser) -> None:
    from flightlog._cli_core import add_store

    add_store(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; use 0.0.0.0 only with --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, OTLP/HTTP's)")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' (default: ${_config.ENV_TOKEN}, else none)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY / 2**20,
                   help="largest request body accepted, MiB (default 64)")
    p.add_argument("--query-timeout", type=float, default=DEFAULT_QUERY_TIMEOUT,
                   help="seconds a /v1/query may run (default 30)")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows a /v1/query returns at most")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def run_serve(args: argparse.Namespace) -> int:
    import sys

    import uvicorn

    token = args.token if args.token is not None else (os.environ.get(_config.ENV_TOKEN) or None)
    app = create_app(args.store, token, max_body=int(args.max_body_mb * 2**20),
                     query_timeout=args.query_timeout, max_rows=args.max_rows)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"flightlog: warning: serving on {args.host} without --token: anyone who can reach it "
              "can write and read the store", file=sys.stderr)
    print(f"flightlog collector on http://{args.host}:{args.port}  store {app.state.store}"
          f"{'  (token required)' if token else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
