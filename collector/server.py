"""The collector server: ``flightlog serve`` (its arguments and start-up: sdk/_serve_cli.py).

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
from flightlog.query.isolated import DEFAULT_MAX_RESPONSE, DEFAULT_QUERY_MEMORY, BadRequest, query_in_process

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
DEFAULT_MAX_QUERIES = 4  # queries running at once; more wait for a slot within their time limit
DECODED_FACTOR = 4  # rows of one request may take this many times the body limit once converted
MAX_SPANS = 100_000  # spans in one OTLP request
OTLP_JSON_LIMIT = 8 << 20  # OTLP/JSON bodies (decoded to Python objects first)
JSON_BODY_LIMIT = 4 << 20  # bodies of the JSON endpoints (/v1/query, /v1/heartbeat, /v1/compact)
_BATCH_RE = re.compile(r"^([A-Za-z0-9]{1,64})-(\d{1,15})$")


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


def _string_like(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or \
        pa.types.is_large_binary(t)


def _flat(t: pa.DataType) -> bool:
    """Types whose converted size is bounded by their row count (no views, run-ends or nesting)."""
    return (pa.types.is_null(t) or pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
            or pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_decimal(t) or _string_like(t))


def check_column_types(sch: pa.Schema) -> None:
    """Refuse column types that could make a small body expand without bound when converted.

    Plain scalars, strings/binaries and dictionaries of those are accepted;
    string views, run-end encoding, lists, structs, maps, unions and extension
    types are not (no flightlog table has such a column).
    """
    for f in sch:
        t = f.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not _flat(t):
            raise BadRequest(400, f"column {f.name[:80]!r} has type {str(f.type)[:80]}, which no flightlog table "
                                  "takes: send plain scalar, string or dictionary-encoded columns")


def decoded_size(table: str, data: pa.Table) -> int:
    """Bytes that converting ``data`` to ``table``'s schema would allocate (an upper estimate).

    Counted before converting, because a few bytes on the wire can stand for
    many rows: a dictionary of one long string, an absent column (nulls for
    every row), a batch that declares rows but sends no columns.
    """
    rows = data.num_rows
    total = 0
    for field in _schema.schema(table):
        target = field.type
        width = 4 if pa.types.is_string(target) else 1 if pa.types.is_boolean(target) else 8
        base = rows * width + rows // 8 + 64
        if field.name not in data.column_names:
            total += base
            continue
        col = data.column(field.name)
        t = col.type
        if pa.types.is_dictionary(t) and _string_like(t.value_type):
            # Counted decoded even when kept as a dictionary: the Parquet writer falls back to
            # plain pages when the dictionary is large, and run_id is decoded to split the batch.
            total += base + _dictionary_string_bytes(col)
            continue
        if field.name == "run_id" or not (t.equals(target) or
                                          (pa.types.is_dictionary(t) and t.value_type.equals(target))):
            total += base
            if pa.types.is_string(target):
                total += col.nbytes if _string_like(t) else rows * 48  # numbers etc. written out as text
    return total


def _dictionary_string_bytes(col: pa.ChunkedArray) -> int:
    """Bytes of the strings a dictionary column stands for, once decoded."""
    n = 0
    for chunk in col.chunks:
        lengths = pc.binary_length(chunk.dictionary)
        s = pc.sum(pc.take(lengths, chunk.indices)).as_py()
        n += s or 0
    return n


def write_batch(root: str | os.PathLike, table: str, data: pa.Table, writer: str, seq: int,
                retry: bool = True, fsync: bool = True, max_decoded: int | None = None) -> tuple[int, int]:
    """Write one batch as ``part-<seq>-<writer>`` in each run partition it touches.

    Returns ``(rows written, rows already stored)``. Raises BadRequest for rows
    that do not fit the table. ``retry=False`` (a batch's first transmission)
    skips the scan for compact files that may already hold it. ``max_decoded``
    refuses (413) a batch whose conversion to the table's types would allocate
    more bytes than that. ``data`` must have passed full validation
    (``Table.validate(full=True)``): nothing here reads unvalidated buffers.
    """
    try:
        _schema.schema(table)
    except KeyError as e:
        raise BadRequest(404, str(e.args[0])) from None
    extra = [n for n in data.column_names if _schema.schema(table).get_field_index(n) < 0]
    if extra:
        raise BadRequest(400, f"rows do not fit table {table!r}: no column(s) {', '.join(extra)[:300]}")
    if max_decoded is not None:
        check_column_types(data.schema)
        need = decoded_size(table, data)
        if need > max_decoded:
            raise BadRequest(413, f"{data.num_rows} {table} row(s) would take {need} bytes once converted to the "
                                  f"table's types, more than the limit of {max_decoded} bytes: send smaller batches")
    try:
        data = _schema.conform(table, data, keep_dictionary=True)
    except (ValueError, TypeError, pa.ArrowException) as e:
        raise BadRequest(400, f"rows do not fit table {table!r}: {str(e).splitlines()[0][:300]}") from None
    if data.num_rows == 0:
        return 0, 0
    runs = data.column("run_id")
    if pa.types.is_dictionary(runs.type):
        runs = runs.cast(pa.string())
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
        if _store.exists(path) or (retry and _covered_by_compact(d, writer, seq)):
            dup += sub.num_rows
            continue
        existed = _store.is_dir(d)
        try:
            _store.write_parquet_atomic(path, sub, table, fsync=fsync)
        except BaseException:
            if not existed:  # a failed request leaves no empty partition behind
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            raise
        written += sub.num_rows
    return written, dup


def read_arrow_stream(body: bytes, max_decompressed: int | None = None) -> pa.Table:
    """The table in an Arrow IPC stream, fully validated; BadRequest when it is not one.

    pyarrow's reader checks only what is cheap (buffer sizes, first and last
    offsets); a crafted body whose inner string offsets point elsewhere passes
    that and crashes the process later, on a cast or a write. So every batch
    gets ``validate(full=True)`` before anything reads its values.

    IPC buffer compression (LZ4/ZSTD) is accepted, but the uncompressed sizes
    the stream declares are summed first and a stream declaring more than
    ``max_decompressed`` bytes is refused (413) before anything is inflated;
    Arrow inflates a buffer into exactly its declared size, so the declared
    sum bounds the memory. Column types that could expand without bound on
    conversion (views, run-end encoding, nested types) are refused (400).
    """
    if not body:
        raise BadRequest(400, "empty body: expected an Arrow IPC stream")
    buf = pa.py_buffer(body)
    try:
        if max_decompressed is not None:
            declared = ipc_decompressed_size(buf)
            if declared > max_decompressed:
                raise BadRequest(413, f"the Arrow stream's compressed buffers declare {declared} bytes uncompressed, "
                                      f"more than the limit of {max_decompressed} bytes")
        with ipc.open_stream(buf) as reader:
            check_column_types(reader.schema)
            table = reader.read_all()
        table.validate(full=True)
        return table
    except (pa.ArrowException, OSError, ValueError, struct.error) as e:
        raise BadRequest(400, f"malformed Arrow IPC stream: {str(e).splitlines()[0][:300]}") from None


# Arrow IPC metadata is a FlatBuffer (format/Message.fbs). Only what bounds decompression is read:
# Message.header_type (field 1) and header (2); DictionaryBatch.data (1); RecordBatch.buffers (2)
# and compression (3). Every read is bounds-checked: the bytes are the client's.
_HEADER_DICTIONARY, _HEADER_RECORD_BATCH = 2, 3


def _fb_read(fmt: str, buf, pos: int):
    size = struct.calcsize(fmt)
    if pos < 0 or pos + size > len(buf):
        raise ValueError("IPC metadata points outside itself")
    return struct.unpack_from(fmt, buf, pos)[0]


def _fb_field(buf, table: int, index: int) -> int | None:
    """Absolute position of field ``index`` of the FlatBuffer table at ``table``; None when absent."""
    vtable = table - _fb_read("<i", buf, table)
    vsize = _fb_read("<H", buf, vtable)
    slot = 4 + 2 * index
    if slot + 2 > vsize:
        return None
    off = _fb_read("<H", buf, vtable + slot)
    return table + off if off else None


def _fb_deref(buf, pos: int) -> int:
    return pos + _fb_read("<I", buf, pos)


def ipc_decompressed_size(stream: pa.Buffer) -> int:
    """Sum of the uncompressed sizes that the compressed buffers of an IPC stream declare.

    Uncompressed buffers count nothing (they are read in place). Reading the
    messages does not inflate anything.
    """
    total = 0
    reader = ipc.MessageReader.open_stream(stream)
    while True:
        try:
            msg = reader.read_next_message()
        except StopIteration:
            return total
        if msg.type not in ("record batch", "dictionary"):
            continue
        md = memoryview(msg.metadata)
        root = _fb_deref(md, 0)
        kind_at = _fb_field(md, root, 1)
        header_at = _fb_field(md, root, 2)
        if kind_at is None or header_at is None:
            continue
        kind = _fb_read("<B", md, kind_at)
        batch = _fb_deref(md, header_at)
        if kind == _HEADER_DICTIONARY:
            data_at = _fb_field(md, batch, 1)
            if data_at is None:
                continue
            batch = _fb_deref(md, data_at)
        elif kind != _HEADER_RECORD_BATCH:
            continue
        if _fb_field(md, batch, 3) is None:  # no BodyCompression: buffers are stored as they are
            continue
        buffers_at = _fb_field(md, batch, 2)
        if buffers_at is None:
            continue
        vec = _fb_deref(md, buffers_at)
        n = _fb_read("<I", md, vec)
        if vec + 4 + 16 * n > len(md):
            raise ValueError("IPC metadata lists more buffers than it holds")
        body = memoryview(msg.body) if msg.body is not None else memoryview(b"")
        for offset, length in struct.iter_unpack("<qq", md[vec + 4: vec + 4 + 16 * n]):
            if length == 0:
                continue
            if offset < 0 or length < 8 or offset + length > len(body):
                raise ValueError("a compressed IPC buffer lies outside the message body")
            size = struct.unpack_from("<q", body, offset)[0]  # Arrow's prefix: uncompressed length, -1 = stored
            if size < -1:
                raise ValueError("a compressed IPC buffer declares a negative length")
            total += length - 8 if size == -1 else size


def gunzip(body: bytes, limit: int) -> bytes:
    """Inflate a gzip body, every member of it, refusing to grow past ``limit`` bytes (zip bombs).

    A gzip file may be several members one after another (``cat a.gz b.gz``);
    all are read, as ``gzip -d`` does. Bytes after the last member that are
    not another member are an error, not silently dropped.
    """
    parts, total, rest = [], 0, body
    try:
        while True:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(rest, limit - total + 1)
            total += len(out)
            if total > limit:
                raise BadRequest(413, f"decompressed body is larger than the limit of {limit} bytes")
            parts.append(out)
            if not d.eof:
                raise BadRequest(400, "truncated gzip body")
            rest = d.unused_data
            if not rest:
                return b"".join(parts)
    except zlib.error as e:
        raise BadRequest(400, f"malformed gzip body: {e}") from None


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


def check_token(token: str | None) -> str | None:
    """``token`` when it can protect the server, None for no token; ValueError for one that cannot.

    An empty token is what ``--token "$TOKEN"`` gives when TOKEN is unset; taking
    it as "no token" would silently open the server, so it is refused instead.
    """
    if token is None:
        return None
    if not isinstance(token, str) or token == "":
        raise ValueError("the token is empty (is the variable you passed unset?); give a real token, or none "
                         "at all to serve without one")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError("the token may hold only visible ASCII characters (no spaces, newlines or control "
                         "characters): a bearer header could never carry it")
    return token


class _JsonBodyLimit:
    """Bounds the bodies FastAPI reads whole before any handler runs (the JSON endpoints).

    The ingest endpoints read their bodies themselves, under ``max_body``.
    """

    def __init__(self, app: Any, limit: int, own_paths: tuple[str, ...]) -> None:
        self.app, self.limit, self.own_paths = app, limit, own_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.own_paths):
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        limit = self.limit
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = -1
                if n < 0 or n > limit:
                    msg = "bad Content-Length header" if n < 0 else \
                        f"body of {n} bytes is larger than the limit of {limit} bytes for this endpoint"
                    status = 400 if n < 0 else 413
                    body = json.dumps({"detail": msg}).encode()
                    await send({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                            (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
        seen = 0

        async def bounded() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:  # FastAPI lets an HTTPException from here through as it is
                    raise HTTPException(413, f"body is larger than the limit of {limit} bytes for this endpoint")
            return msg

        await self.app(scope, bounded, send)


def create_app(store: str | os.PathLike | None = None, token: str | None = None, *,
               max_body: int = DEFAULT_MAX_BODY, query_timeout: float = DEFAULT_QUERY_TIMEOUT,
               max_rows: int = DEFAULT_MAX_ROWS, query_memory: int = DEFAULT_QUERY_MEMORY,
               max_response: int = DEFAULT_MAX_RESPONSE, max_queries: int = DEFAULT_MAX_QUERIES):
    """Build the FastAPI app over ``store`` (created if missing).

    Limits (each refusal is a 4xx saying which limit): ``max_body`` bytes per
    request body, decompressed (gzip, Arrow IPC compression) included, and
    ``DECODED_FACTOR`` times that once rows are converted; ``/v1/query`` runs
    in its own process, killed at ``query_timeout`` seconds, with
    ``query_memory`` bytes of memory, ``max_response`` bytes of reply and at
    most ``max_queries`` at once. Slow senders are cut off by the protocol
    (``ServerThread``/``flightlog serve`` set it up, see ``guarded_protocol``).
    """
    import asyncio

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    from flightlog import __version__

    token = check_token(token)
    root = _config.store_home(os.fspath(store) if store is not None else None)
    if not _store._fs.is_remote(root):  # an object store has no folder to create
        _store.make_private_dirs(root)
    stats = Stats()
    tok = token.encode() if token else None
    max_decoded = DECODED_FACTOR * max_body
    query_slots = asyncio.Semaphore(max(1, max_queries))

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
    app.add_middleware(_JsonBodyLimit, limit=min(max_body, JSON_BODY_LIMIT), own_paths=("/v1/ingest/", "/v1/traces"))
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
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise BadRequest(413, f"body is larger than the limit of {max_body} bytes")
                chunks.append(chunk)
        except ClientDisconnect:  # gone, or cut off by the read timeout: nobody reads the reply
            raise BadRequest(408, "the request body did not arrive in time") from None
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
        stats.add(client_errors=1 if e.status < 500 else 0, server_errors=1 if e.status >= 500 else 0)
        return JSONResponse({"detail": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        # FastAPI's own handler echoes the input back, and fails (HTTP 500) on bytes that are not UTF-8
        stats.add(client_errors=1)
        errors = [{"loc": [str(x)[:80] for x in err.get("loc", ())], "msg": str(err.get("msg", ""))[:300],
                   "type": str(err.get("type", ""))} for err in e.errors()[:20]]
        return JSONResponse({"detail": errors}, status_code=422)

    # -- OTLP -------------------------------------------------------------------------

    def ingest_traces(body: bytes, ctype: str, request: Request) -> tuple[int, int, int, str]:
        body = decode_encoding(request, body)
        if ctype == _otlp.JSON and len(body) > min(max_body, OTLP_JSON_LIMIT):  # json.loads: ~15x the text
            raise BadRequest(413, f"OTLP/JSON body of {len(body)} bytes is larger than the limit of "
                                  f"{min(max_body, OTLP_JSON_LIMIT)} bytes: export protobuf or smaller batches")
        req = _otlp.parse_request(body, ctype)
        spans = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        if spans > MAX_SPANS:  # each span becomes ~20 Python objects before it is Arrow: ~25x the body
            raise BadRequest(413, f"{spans} spans in one request, more than the limit of {MAX_SPANS}: export "
                                  "smaller batches (the SDK's BatchSpanProcessor sends 512)")
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
        data = read_arrow_stream(body, max_decompressed=max_body)
        if batch is None:
            writer, seq, retry = "s" + uuid.uuid4().hex[:16], 0, False
        else:
            (writer, seq), retry = batch, attempt > 1
        return write_batch(root, table, data, writer, seq, retry=retry, max_decoded=max_decoded)

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
            if _store.is_dir(d) and _store.compact_dir(d, table, body.writer, fsync=True) is not None:
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
    async def query(body: QueryRequest, request: Request):
        limit = min(body.max_rows or max_rows, max_rows)
        timeout = min(body.timeout_s or query_timeout, query_timeout)
        fmt = body.format
        if ARROW_STREAM in (request.headers.get("accept") or ""):
            fmt = "arrow"
        t0 = time.monotonic()
        try:  # waiting for a slot is part of the query's time, and holds no thread
            await asyncio.wait_for(query_slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise BadRequest(503, f"{max_queries} queries are already running; none finished within the time "
                                  f"limit of {timeout:g} s (retry later)") from None
        try:
            left = max(0.05, timeout - (time.monotonic() - t0))
            out, truncated, _ = await run_in_threadpool(
                query_in_process, root, body.sql, body.params, limit, left, fmt,
                memory=query_memory, max_bytes=max_response, timeout_label=timeout)
        finally:
            query_slots.release()
        flag = {"X-Flightlog-Truncated": "true" if truncated else "false"}
        return Response(out, media_type=ARROW_STREAM if fmt == "arrow" else "application/json", headers=flag)

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
    async def healthz() -> dict:  # on the event loop: no worker thread needed, so busy threads never stall it
        return {"status": "ok", "version": __version__, "uptime_s": round(time.time() - stats.started, 1),
                **stats.snapshot()}

    try:  # the web UI (flightlog.ui) under /ui: same store, same token
        from flightlog.ui import create_app as _ui_app
    except ImportError:
        pass
    else:
        app.mount("/ui", _ui_app(root, token))
    return app


def guarded_protocol(read_timeout: float = DEFAULT_READ_TIMEOUT, header_timeout: float = HEADER_TIMEOUT,
                     parser: str = "auto") -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11), plus deadlines for slow senders.

    uvicorn times out idle keep-alive connections but not a request that is
    being sent: a client that opens a connection and trickles (or stops
    sending) its headers or body holds a socket forever, and enough of them
    exhaust the process's file descriptors, locking every client out. Here a
    connection must deliver complete headers within ``min(header_timeout,
    read_timeout)`` seconds of its first byte (or of opening), and the whole
    body within ``read_timeout`` seconds of the headers; otherwise it gets a
    408 (when no reply was started) and is closed. A request whose body has
    arrived is never cut off, however long the server takes to answer it.
    ``parser="h11"`` forces the pure-Python parser.
    """
    head_s = min(header_timeout, read_timeout)
    reply = json.dumps({"detail": "request not received in time"}).encode()
    timeout_reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: " + str(len(reply)).encode() + b"\r\n\r\n" + reply)

    class Deadlines:
        """The timer shared by both parsers; ``_phase`` is "headers"/"body" while a request is incomplete."""

        _timer: Any = None
        _phase: str | None = None
        _started = False  # a byte of the current request has arrived

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _expired(self) -> None:
            self._timer = None
            if self._phase is None or self.transport.is_closing():
                return
            self._phase = None
            cycle = self.cycle
            active = cycle is not None and not cycle.response_complete
            if (active and not cycle.response_started) or (not active and self._started):
                self.transport.write(timeout_reply)
            if active:  # the app's receive() now reports a disconnect and its reply is dropped
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()

    HttpToolsProtocol = None
    if parser != "h11":
        try:
            import httptools  # noqa: F401  (what uvicorn's "auto" picks)
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:
            pass

    if HttpToolsProtocol is not None:
        class GuardedHttpToolsProtocol(Deadlines, HttpToolsProtocol):
            def connection_made(self, transport: Any) -> None:
                super().connection_made(transport)
                self._arm("headers", head_s)

            def data_received(self, data: bytes) -> None:
                if self._phase is None:  # the first bytes of a request on a kept-alive connection
                    self._arm("headers", head_s)
                if self._phase == "headers":
                    self._started = True
                super().data_received(data)

            def on_headers_complete(self) -> None:
                self._arm("body", read_timeout)
                super().on_headers_complete()

            def on_message_complete(self) -> None:
                self._disarm()
                self._started = False
                super().on_message_complete()

            def connection_lost(self, exc: Exception | None) -> None:
                self._disarm()
                super().connection_lost(exc)

        return GuardedHttpToolsProtocol

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(Deadlines, H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm("headers", head_s)

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._started = True
                if self._timer is None:  # the first bytes of a request on a kept-alive connection
                    self._arm("headers", head_s)
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _follow(self) -> None:
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body", read_timeout)
            elif state is not h11.IDLE:  # the request is in (or the connection is over): no deadline
                self._disarm()
                self._started = False

    return GuardedH11Protocol


def uvicorn_config(app: Any, host: str, port: int, read_timeout: float, parser: str = "auto", **kw: Any):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(read_timeout, parser=parser),
                          timeout_keep_alive=5, access_log=False, **kw)


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (more sockets before accept() fails)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        return soft
    except (ImportError, ValueError, OSError):
        return -1


class ServerThread:
    """A collector on a loopback port in a background thread: for tests, notebooks and benchmarks.

    ``with ServerThread(store) as srv: ... srv.url ...``; ``port=0`` picks a free port.
    """

    def __init__(self, store: str | os.PathLike, token: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, read_timeout: float = DEFAULT_READ_TIMEOUT, http: str = "auto",
                 **app_kw: Any) -> None:
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
        self._server = uvicorn.Server(uvicorn_config(self.app, host, port, read_timeout, http,
                                                      log_level="critical", lifespan="off"))
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
