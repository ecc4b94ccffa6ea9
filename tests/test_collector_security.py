"""The collector under bad input: clear 4xx replies, tokens, body limits, and stored data left intact."""
from __future__ import annotations

import gzip
import os
import socket

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.collector import client as fl_client
from flightlog.collector import schema
from flightlog.collector.server import ServerThread

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ARROW = {"Content-Type": fl_client.ARROW_STREAM, **AUTH}
PB = {"Content-Type": "application/x-protobuf", **AUTH}


def _metrics(run_id: str, n: int) -> pa.Table:
    return pa.table({"run_id": [run_id] * n, "name": ["loss"] * n, "value": [1.0] * n, "step": list(range(n))})


@pytest.fixture
def guarded(store):
    """A token-protected collector with a 1 MiB body limit and 10 metric rows already stored."""
    with ServerThread(store, token=TOKEN, max_body=1 << 20, query_timeout=5) as srv:
        r = httpx.post(srv.url + "/v1/ingest/metrics", content=fl_client.encode(_metrics("keep", 10)),
                       headers={**ARROW, "X-Flightlog-Batch": "seed-1"})
        assert r.status_code == 200
        yield srv


def _intact(srv, store: str) -> None:
    """The server is healthy, the seeded rows are still there and every stored file is complete."""
    assert httpx.get(srv.url + "/healthz").json()["status"] == "ok"
    r = httpx.post(srv.url + "/v1/query", json={"sql": "SELECT count(*) AS n FROM metrics WHERE run_id = 'keep'"},
                   headers=AUTH)
    assert r.json()["rows"] == [{"n": 10}]
    for dirpath, _, files in os.walk(store):
        for f in files:
            assert not f.endswith(".tmp"), f"left-over temporary {f}"
            if f.endswith(".parquet"):
                pq.read_table(os.path.join(dirpath, f))


def test_token_required_and_compared(guarded, store):
    """Without the bearer token, or with a wrong one, every data endpoint answers 401; /healthz stays open."""
    body = fl_client.encode(_metrics("x", 1))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic abc"}):
        h = {"Content-Type": fl_client.ARROW_STREAM, **headers}
        assert httpx.post(guarded.url + "/v1/ingest/metrics", content=body, headers=h).status_code == 401
        r = httpx.post(guarded.url + "/v1/traces", content=b"", headers={**h, "Content-Type": "application/x-protobuf"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.post(guarded.url + "/v1/query", json={"sql": "SELECT 1"}, headers=headers).status_code == 401
        assert httpx.get(guarded.url + "/v1/runs", headers=headers).status_code == 401
    assert httpx.get(guarded.url + "/healthz").status_code == 200
    _intact(guarded, store)


def test_truncated_protobuf_and_bad_json(guarded, store):
    """Truncated protobuf and malformed OTLP/JSON get 400 with a google.rpc.Status / JSON message."""
    from google.rpc import status_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

    req = pb.ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(20):
        ss.spans.add(trace_id=b"\x01" * 16, span_id=bytes([i + 1]) * 8, name=f"s{i}")
    raw = req.SerializeToString()
    r = httpx.post(guarded.url + "/v1/traces", content=raw[: len(raw) // 2], headers=PB)
    assert r.status_code == 400
    assert "malformed OTLP protobuf" in status_pb2.Status.FromString(r.content).message
    jh = {**AUTH, "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
                 b'{"resourceSpans": 5}'):
        r = httpx.post(guarded.url + "/v1/traces", content=body, headers=jh)
        assert r.status_code == 400 and r.json()["message"], body
    bad_gzip = httpx.post(guarded.url + "/v1/traces", content=b"\x1f\x8b\x08garbage",
                          headers={**PB, "Content-Encoding": "gzip"})
    assert bad_gzip.status_code == 400
    _intact(guarded, store)


def test_wrong_content_type_and_encoding(guarded, store):
    """Unsupported media types and content encodings get 415."""
    body = fl_client.encode(_metrics("x", 1))
    assert httpx.post(guarded.url + "/v1/traces", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}
                      ).status_code == 415
    assert httpx.post(guarded.url + "/v1/ingest/metrics", content=body,
                      headers={**AUTH, "Content-Type": "application/json"}).status_code == 415
    assert httpx.post(guarded.url + "/v1/ingest/metrics", content=body,
                      headers={**ARROW, "Content-Encoding": "br"}).status_code == 415
    _intact(guarded, store)


def test_huge_bodies_get_413(guarded, store):
    """Bodies over the limit get 413: declared, streamed without a length, and gzip bombs."""
    big = b"\0" * (2 << 20)
    r = httpx.post(guarded.url + "/v1/ingest/metrics", content=big, headers=ARROW)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():
        for _ in range(40):
            yield b"\0" * 65536

    r = httpx.post(guarded.url + "/v1/traces", content=chunks(), headers=PB)
    assert r.status_code == 413
    bomb = gzip.compress(b"\0" * (8 << 20))
    assert len(bomb) < (1 << 20)
    r = httpx.post(guarded.url + "/v1/traces", content=bomb, headers={**PB, "Content-Encoding": "gzip"})
    assert r.status_code == 413
    _intact(guarded, store)


def test_unknown_table_schema_mismatch_bad_rows(guarded, store):
    """Unknown tables get 404; extra columns, uncastable types, missing or unsafe run ids and non-Arrow bodies get 400."""
    u = guarded.url + "/v1/ingest/"
    ok = fl_client.encode(_metrics("x", 2))
    assert httpx.post(u + "nope", content=ok, headers=ARROW).status_code == 404
    assert httpx.post(u + "..%2F..%2Fetc", content=ok, headers=ARROW).status_code == 404
    cases = {
        "extra column": pa.table({"run_id": ["x"], "name": ["a"], "bogus": [1]}),
        "uncastable": pa.table({"run_id": ["x"], "value": ["not a number"]}),
        "no run id": pa.table({"run_id": pa.array([None], pa.string()), "name": ["a"]}),
        "unsafe run id": pa.table({"run_id": ["../../etc"], "name": ["a"]}),
        "slash run id": pa.table({"run_id": ["a/b"], "name": ["a"]}),
    }
    for why, t in cases.items():
        r = httpx.post(u + "metrics", content=fl_client.encode(t), headers=ARROW)
        assert r.status_code == 400 and r.json()["detail"], why
    for body in (b"", b"garbage", ok[: len(ok) // 2]):
        assert httpx.post(u + "metrics", content=body, headers=ARROW).status_code == 400
    r = httpx.post(u + "metrics", content=ok, headers={**ARROW, "X-Flightlog-Batch": "../x"})
    assert r.status_code == 400
    assert not os.path.exists(os.path.join(store, "metrics", "run_id=x"))
    _intact(guarded, store)


def test_sql_that_writes_or_reads_outside(guarded, store):
    """SQL that writes, attaches, copies out or reads /etc/passwd is refused with 4xx; bad SQL is 400."""
    u = guarded.url + "/v1/query"
    refused = [
        "CREATE TABLE t AS SELECT 1",
        "DELETE FROM metrics",
        "COPY metrics TO '/tmp/flightlog-leak.csv'",
        "ATTACH '/tmp/x.db' AS x",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SET enable_external_access=true",
        "INSTALL httpfs",
        "SELECT 1; DROP VIEW metrics",
        "SELEC 1",
        "SELECT * FROM no_such_table",
    ]
    for sql in refused:
        r = httpx.post(u, json={"sql": sql}, headers=AUTH)
        assert 400 <= r.status_code < 500, (sql, r.status_code, r.text)
        assert r.json()["detail"], sql
    assert not os.path.exists("/tmp/flightlog-leak.csv")
    for body in ({"sql": ""}, {"nosql": 1}, {"sql": "SELECT 1", "max_rows": 0}, {"sql": "SELECT 1", "format": "xml"}):
        assert httpx.post(u, json=body, headers=AUTH).status_code == 422
    assert httpx.post(u, content=b"{bad", headers={**AUTH, "Content-Type": "application/json"}).status_code == 422
    _intact(guarded, store)


def test_binds_loopback_by_default():
    """`flightlog serve` binds 127.0.0.1 unless told otherwise."""
    import argparse

    from flightlog import _serve_cli

    p = argparse.ArgumentParser()
    _serve_cli.configure_serve(p)
    args = p.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 4318


# -- fuzz -----------------------------------------------------------------------------------

_TYPES = [pa.int64(), pa.float64(), pa.string(), pa.bool_(), pa.int8(), pa.binary(), pa.timestamp("ms")]
_COLS = sorted({f.name for s in schema.TABLES.values() for f in s} | {"junk", ""})
_values = st.one_of(st.none(), st.integers(-2**40, 2**40), st.floats(allow_nan=True), st.text(max_size=12),
                    st.booleans())


@st.composite
def _arrow_tables(draw):
    names = draw(st.lists(st.sampled_from(_COLS), min_size=1, max_size=5, unique=True))
    n = draw(st.integers(0, 4))
    cols = {}
    for name in names:
        typ = draw(st.sampled_from(_TYPES))
        vals = draw(st.lists(_values, min_size=n, max_size=n))
        try:
            cols[name] = pa.array(vals, typ)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            cols[name] = pa.nulls(n, typ)
    if draw(st.booleans()):
        cols["run_id"] = pa.array(draw(st.lists(st.sampled_from(["r1", "r2", "..", "a/b", "", "ok.run:1"]),
                                                min_size=n, max_size=n)), pa.string())
    return pa.table(cols)


_bodies = st.one_of(
    st.binary(max_size=300),
    _arrow_tables().map(fl_client.encode),
    _arrow_tables().map(lambda t: fl_client.encode(t)[: max(1, len(fl_client.encode(t)) // 2)]),
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """One token-less collector shared by the fuzz examples (seeded with 10 rows of run 'keep')."""
    root = str(tmp_path_factory.mktemp("fuzz") / "store")
    with ServerThread(root, max_body=1 << 20) as srv:
        r = httpx.post(srv.url + "/v1/ingest/metrics", content=fl_client.encode(_metrics("keep", 10)),
                       headers={"Content-Type": fl_client.ARROW_STREAM})
        assert r.status_code == 200
        srv.root = root
        srv.http = httpx.Client(timeout=10)
        yield srv
        srv.http.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.sampled_from(sorted(schema.TABLES) + ["bogus", "runs "]), body=_bodies,
       ctype=st.sampled_from([fl_client.ARROW_STREAM, "application/x-protobuf", "application/json", "text/csv"]),
       batch=st.one_of(st.none(), st.sampled_from(["w-1", "w-2", "bad id", "x" * 80 + "-1", "w-99999999999"])))
def test_fuzz_ingest_endpoints(fuzz_server, table, body, ctype, batch):
    """Random bodies, tables, content types and batch ids to /v1/ingest and /v1/traces never get a 5xx."""
    h = {"Content-Type": ctype}
    if batch:
        h["X-Flightlog-Batch"] = batch
    for url in (f"{fuzz_server.url}/v1/ingest/{table}", f"{fuzz_server.url}/v1/traces"):
        r = fuzz_server.http.post(url, content=body, headers=h)
        assert r.status_code < 500, (url, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.content, "a 4xx must say why"


def test_fuzzed_server_still_healthy(fuzz_server):
    """After the fuzz run the server is healthy, the seeded rows are intact and every stored file is complete."""
    from flightlog.query import db

    assert fuzz_server.http.get(fuzz_server.url + "/healthz").json()["status"] == "ok"
    out = db.run_sql("SELECT count(*) AS n FROM metrics WHERE run_id = 'keep'", store=fuzz_server.root)
    assert out.to_pylist() == [{"n": 10}]
    for dirpath, _, files in os.walk(fuzz_server.root):
        for f in files:
            if f.endswith(".parquet"):
                pq.read_table(os.path.join(dirpath, f))


def test_port_in_use_is_a_clear_error(store):
    """Starting a collector on a busy port fails at once instead of hanging."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(OSError):
            ServerThread(store, port=s.getsockname()[1])
    finally:
        s.close()
