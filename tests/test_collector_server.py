"""The collector server: OTLP/HTTP traces from the stock exporter, Arrow ingest, SQL and run endpoints."""
from __future__ import annotations

import gzip
import json

import httpx
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from flightlog import cli
from flightlog.collector import client as fl_client
from flightlog.collector.server import ServerThread


@pytest.fixture
def server(store):
    """A collector on a free loopback port, writing the test's store."""
    with ServerThread(store) as srv:
        yield srv


def _tracer(url: str, resource: dict, **exporter_kw):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mem = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource.create(resource))
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url + "/v1/traces", **exporter_kw)))
    tp.add_span_processor(SimpleSpanProcessor(mem))
    return tp, mem


def _sql(capsys, store: str, sql: str) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["sql", sql, "--store", store, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_stock_exporter_spans_arrive_with_parent_links(server, store, capsys):
    """Spans exported by the stock OTLP/HTTP exporter appear in `flightlog sql` with the same ids and parents."""
    tp, mem = _tracer(server.url, {"service.name": "pipeline", "flightlog.run_id": "run-otel",
                                   "host.name": "hostA", "process.pid": 4242})
    tr = tp.get_tracer("test")
    for epoch in range(2):
        with tr.start_as_current_span("epoch") as ep:
            ep.set_attribute("ml.epoch", epoch)
            for b in range(3):
                with tr.start_as_current_span("step") as st:
                    st.set_attribute("ml.epoch", epoch)
                    st.set_attribute("ml.batch", b)
                    with tr.start_as_current_span("load"):
                        pass
    with pytest.raises(ZeroDivisionError):
        with tr.start_as_current_span("boom"):
            1 / 0
    assert tp.force_flush(10_000)
    tp.shutdown()
    sent = {(s.context.trace_id, s.context.span_id): s for s in mem.get_finished_spans()}
    rows = _sql(capsys, store, "SELECT * FROM spans")
    assert len(rows) == len(sent) == 2 * (1 + 3 * 2) + 1
    by_id = {r["span_id"]: r for r in rows}
    for (tid, sid), s in sent.items():
        r = by_id[format(sid, "016x")]
        assert r["trace_id"] == format(tid, "032x")
        assert r["parent_span_id"] == (format(s.parent.span_id, "016x") if s.parent else None)
        assert r["name"] == s.name and r["run_id"] == "run-otel" and r["service_name"] == "pipeline"
        assert r["writer"] == "hostA:4242"
    steps = [r for r in rows if r["name"] == "step"]
    assert sorted((r["epoch"], r["batch"]) for r in steps) == [(e, b) for e in range(2) for b in range(3)]
    boom = [r for r in rows if r["name"] == "boom"][0]
    assert boom["status"] == "error" and boom["error_type"] == "ZeroDivisionError"
    # a recursive query over the parent links walks every tree from its root
    depth = _sql(capsys, store, """
        WITH RECURSIVE t(span_id, d) AS (
            SELECT span_id, 0 FROM spans WHERE parent_span_id IS NULL
            UNION ALL SELECT s.span_id, t.d + 1 FROM spans s JOIN t ON s.parent_span_id = t.span_id)
        SELECT max(d) AS depth, count(*) AS n FROM t""")
    assert depth == [{"depth": 2, "n": len(sent)}]


def test_gzip_exporter_and_run_id_fallback(server, store, capsys):
    """The exporter's gzip compression works; without a run id attribute the service name is the run id.

    A service name that is not a valid run id gets a hash of the exact name appended (no look-alike collisions).
    """
    from opentelemetry.exporter.otlp.proto.http import Compression

    tp, mem = _tracer(server.url, {"service.name": "etl job/1"}, compression=Compression.Gzip)
    tr = tp.get_tracer("t")
    with tr.start_as_current_span("a"):
        with tr.start_as_current_span("b") as b:
            b.set_attribute("ml.run_id", "explicit-run")
    tp.shutdown()
    rows = _sql(capsys, store, "SELECT name, run_id FROM spans ORDER BY name")
    import hashlib

    tail = hashlib.sha256(b"etl job/1").hexdigest()[:8]
    assert rows == [{"name": "a", "run_id": f"etl_job_1-{tail}"}, {"name": "b", "run_id": "explicit-run"}]


def _otlp_json(spans: list[dict], resource: dict | None = None) -> bytes:
    attrs = [{"key": k, "value": {"stringValue": v}} for k, v in (resource or {}).items()]
    return json.dumps({"resourceSpans": [{"resource": {"attributes": attrs},
                                          "scopeSpans": [{"scope": {"name": "x"}, "spans": spans}]}]}).encode()


def test_otlp_json_with_hex_ids(server, store, capsys):
    """OTLP/JSON bodies (hex ids, string int64s, integer enums) are decoded and answered in JSON."""
    tid = "5b8efff798038103d269b633813fc60c"
    spans = [
        {"traceId": tid, "spanId": "eee19b7ec3c1b174", "name": "parent", "kind": 2,
         "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000500000000",
         "attributes": [{"key": "ml.epoch", "value": {"intValue": "7"}},
                        {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}]}}}],
         "status": {"code": 1}},
        {"traceId": tid, "spanId": "eee19b7ec3c1b173", "parentSpanId": "eee19b7ec3c1b174", "name": "child",
         "startTimeUnixNano": 1700000000100000000, "endTimeUnixNano": 1700000000200000000,
         "status": {"code": 2, "message": "bad row"}},
    ]
    r = httpx.post(server.url + "/v1/traces", content=_otlp_json(spans, {"flightlog.run_id": "jr"}),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {}
    rows = _sql(capsys, store, "SELECT name, kind, parent_span_id, epoch, duration_ms, status, error_message, "
                               "attributes FROM spans ORDER BY name")
    assert rows[0]["name"] == "child" and rows[0]["parent_span_id"] == "eee19b7ec3c1b174"
    assert rows[0]["status"] == "error" and rows[0]["error_message"] == "bad row"
    assert rows[1]["kind"] == "server" and rows[1]["epoch"] == 7 and rows[1]["duration_ms"] == 500.0
    assert json.loads(rows[1]["attributes"]) == {"ml.epoch": 7, "tags": ["a"]}


def test_partial_success_keeps_good_spans(server, store, capsys):
    """A span with malformed ids is rejected alone: the reply reports partial success, the rest is stored."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

    req = pb.ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    good = ss.spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="good", start_time_unix_nano=10**18)
    good.end_time_unix_nano = 10**18 + 1000
    ss.spans.add(trace_id=b"\x01" * 16, span_id=b"\x03" * 4, name="bad-id")
    ss.spans.add(trace_id=b"\x00" * 16, span_id=b"\x04" * 8, name="zero-trace")
    r = httpx.post(server.url + "/v1/traces", content=req.SerializeToString(),
                   headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 200
    resp = pb.ExportTraceServiceResponse.FromString(r.content)
    assert resp.partial_success.rejected_spans == 2 and "span_id" in resp.partial_success.error_message
    assert _sql(capsys, store, "SELECT name, run_id FROM spans") == [{"name": "good", "run_id": "otel"}]


def _metrics(run_id: str, values: list[float]) -> pa.Table:
    return pa.table({"run_id": [run_id] * len(values), "name": ["loss"] * len(values),
                     "value": values, "step": list(range(len(values)))})


def _ingest(url: str, table: str, data: pa.Table, batch: str | None = None, attempt: int = 1, **kw):
    headers = {"Content-Type": fl_client.ARROW_STREAM, "X-Flightlog-Attempt": str(attempt)}
    if batch:
        headers["X-Flightlog-Batch"] = batch
    return httpx.post(f"{url}/v1/ingest/{table}", content=fl_client.encode(data), headers=headers, **kw)


def test_arrow_ingest_writes_the_embedded_layout(server, store):
    """Arrow batches land as part-<seq>-<writer>.parquet files that the standard query views read."""
    from flightlog.query import db

    r = _ingest(server.url, "metrics", _metrics("r1", [1.0, 2.0, 3.0]), batch="abc-7")
    assert r.status_code == 200 and r.json() == {"table": "metrics", "rows": 3, "duplicate_rows": 0}
    mixed = pa.concat_tables([_metrics("r1", [4.0]), _metrics("r2", [5.0, 6.0])])
    assert _ingest(server.url, "metrics", mixed, batch="abc-8").json()["rows"] == 3
    import os

    assert sorted(os.listdir(os.path.join(store, "metrics", "run_id=r1"))) == \
        ["part-00000007-abc.parquet", "part-00000008-abc.parquet"]
    out = db.run_sql("SELECT run_id, count(*) AS n, sum(value) AS s FROM metrics GROUP BY 1 ORDER BY 1", store=store)
    assert out.to_pylist() == [{"run_id": "r1", "n": 4, "s": 10.0}, {"run_id": "r2", "n": 2, "s": 11.0}]


def test_resent_batch_is_stored_once_even_after_compaction(server, store):
    """A batch resent with the same id (a lost reply) is acknowledged without a second copy, also once compacted."""
    from flightlog.query import db

    for seq in (1, 2):
        assert _ingest(server.url, "metrics", _metrics("r1", [float(seq)] * 5), batch=f"w1-{seq}").status_code == 200
    again = _ingest(server.url, "metrics", _metrics("r1", [1.0] * 5), batch="w1-1", attempt=2)
    assert again.json() == {"table": "metrics", "rows": 0, "duplicate_rows": 5}
    r = httpx.post(server.url + "/v1/compact", json={"run_id": "r1", "writer": "w1"})
    assert r.json() == {"merged_partitions": 1}
    again = _ingest(server.url, "metrics", _metrics("r1", [2.0] * 5), batch="w1-2", attempt=2)
    assert again.json()["duplicate_rows"] == 5
    assert db.run_sql("SELECT count(*) AS n, sum(value) AS s FROM metrics", store=store).to_pylist() == \
        [{"n": 10, "s": 15.0}]
    assert httpx.get(server.url + "/healthz").json()["duplicate_rows"] == 10


def test_query_endpoint_json_arrow_limits(server, store):
    """/v1/query answers JSON or Arrow, takes parameters, truncates at max_rows and stops at the time limit."""
    _ingest(server.url, "metrics", _metrics("r1", [float(i) for i in range(50)]), batch="q-1")
    u = server.url + "/v1/query"
    j = httpx.post(u, json={"sql": "SELECT step, value FROM metrics WHERE value >= ? ORDER BY step",
                            "params": [45]}).json()
    assert j["row_count"] == 5 and not j["truncated"] and j["rows"][0] == {"step": 45, "value": 45.0}
    j = httpx.post(u, json={"sql": "SELECT * FROM metrics ORDER BY step", "max_rows": 7}).json()
    assert j["row_count"] == 7 and j["truncated"]
    r = httpx.post(u, json={"sql": "SELECT step FROM metrics ORDER BY step", "format": "arrow"})
    t = ipc.open_stream(r.content).read_all()
    assert r.headers["content-type"] == fl_client.ARROW_STREAM and t.column("step").to_pylist() == list(range(50))
    r = httpx.post(u, json={"sql": "SELECT count(*) FROM range(1000000000) a, range(1000) b", "timeout_s": 0.5},
                   timeout=30)
    assert r.status_code == 408 and "time limit" in r.json()["detail"]
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"


def test_runs_endpoint_and_openapi(server, store):
    """GET /v1/runs lists ingested runs newest first with derived status; the OpenAPI schema lists every route."""
    import datetime as dt

    from flightlog.collector import schema

    now = dt.datetime.now(dt.timezone.utc)
    rows = [{"run_id": rid, "project": "p", "status": st, "started_at": now + dt.timedelta(seconds=i),
             "updated_at": now, "kind": "train"} for i, (rid, st) in enumerate([("old", "finished"), ("new", "failed")])]
    assert _ingest(server.url, "runs", pa.Table.from_pylist(rows, schema=schema.RUNS)).status_code == 200
    runs = httpx.get(server.url + "/v1/runs").json()
    assert [(r["run_id"], r["status"]) for r in runs] == [("new", "failed"), ("old", "finished")]
    assert httpx.get(server.url + "/v1/runs", params={"project": "nope"}).json() == []
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v1/traces", "/v1/ingest/{table}", "/v1/query", "/v1/runs", "/healthz"} <= set(paths)


def test_gzip_arrow_ingest(server, store):
    """Arrow bodies may be gzip-compressed like OTLP ones."""
    body = gzip.compress(fl_client.encode(_metrics("gz", [1.5, 2.5])))
    r = httpx.post(server.url + "/v1/ingest/metrics", content=body,
                   headers={"Content-Type": fl_client.ARROW_STREAM, "Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["rows"] == 2
