"""Benchmark: collector ingest (OTLP spans, Arrow metric batches) vs MLflow's tracking server.

Setup (once; MLflow must stay out of the project venv, and bench/.venv is shared:
only ever *add* packages to it):

    [ -d bench/.venv ] || python3 -m venv bench/.venv
    bench/.venv/bin/pip install mlflow

Run from the repository root with the project venv:

    .venv/bin/python bench/collector_ingest.py            # full run (~2 min)
    .venv/bin/python bench/collector_ingest.py --quick    # fewer repetitions

What is measured (every figure is the median of --reps runs; servers run as
their own processes on loopback, one at a time, on the same machine):

1. spans/s through the stock ``opentelemetry-exporter-otlp-proto-http``
   exporter (BatchSpanProcessor, 512 spans per export) into ``flightlog
   serve``: span creation + encoding + HTTP + server decode + fsynced Parquet.
2. server-side spans/s: the same OTLP protobuf bodies (512 spans each, built
   once with the exporter's own encoder) posted by 2 client threads, so the
   exporter's Python encoding is out of the figure; plus the in-process
   decode-to-Parquet rate with no HTTP at all.
3. metric rows/s as Arrow batches through ``CollectorSink`` (what remote-mode
   runs use), at MLflow's batch size (1,000 rows) and at a realistic
   flightlog flush size (100,000 rows).
4. MLflow: ``mlflow server`` with a sqlite backend store, ``MlflowClient.log_batch``
   with 1,000 metrics per call (MLflow's per-request maximum), the same rows.

The ratio line divides flightlog's Arrow metric rate by MLflow's. Numbers are
printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_PY = HERE / ".venv" / "bin" / "python"
BENCH_MLFLOW = HERE / ".venv" / "bin" / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class FlightlogServer:
    def __init__(self, root: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "flightlog.cli", "serve", "--store", root,
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL)
        wait_http(self.url + "/healthz", self.proc)

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url + "/healthz").json()

    def close(self) -> None:
        stop(self.proc)


# -- 1. the stock exporter ------------------------------------------------------------------

def spans_stock_exporter(url: str, n: int) -> float:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    tp = TracerProvider(resource=Resource.create({"service.name": "bench", "flightlog.run_id": "bench-otel"}))
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url + "/v1/traces"),
                                             max_queue_size=n + 1024, max_export_batch_size=512,
                                             schedule_delay_millis=100))
    tr = tp.get_tracer("bench")
    t0 = time.perf_counter()
    for i in range(n // 8):
        with tr.start_as_current_span("epoch") as ep:
            ep.set_attribute("ml.epoch", i)
            for b in range(7):
                with tr.start_as_current_span("step") as s:
                    s.set_attribute("ml.epoch", i)
                    s.set_attribute("ml.batch", b)
                    s.set_attribute("loss", 0.25)
    assert tp.force_flush(120_000)
    dt = time.perf_counter() - t0
    tp.shutdown()
    return n / dt


def otlp_bodies(n_bodies: int, per_body: int = 512) -> list[bytes]:
    """Protobuf export requests built by the exporter's own encoder, with new ids per body."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Capture(SpanExporter):
        def __init__(self):
            self.spans = []

        def export(self, spans):
            self.spans.extend(spans)
            return SpanExportResult.SUCCESS

    cap = Capture()
    tp = TracerProvider(resource=Resource.create({"service.name": "bench", "flightlog.run_id": "bench-raw"}))
    tp.add_span_processor(SimpleSpanProcessor(cap))
    tr = tp.get_tracer("bench")
    for i in range(n_bodies * per_body // 8):
        with tr.start_as_current_span("epoch") as ep:
            ep.set_attribute("ml.epoch", i)
            for b in range(7):
                with tr.start_as_current_span("step") as s:
                    s.set_attribute("ml.epoch", i)
                    s.set_attribute("ml.batch", b)
                    s.set_attribute("loss", 0.25)
    spans = cap.spans
    return [encode_spans(spans[k * per_body:(k + 1) * per_body]).SerializeToString() for k in range(n_bodies)]


def post_parallel(url: str, bodies: list[bytes], headers_for, threads: int = 2) -> float:
    import httpx

    chunks = [bodies[k::threads] for k in range(threads)]
    errors = []

    def run(chunk):
        with httpx.Client(timeout=60) as c:
            for i, b in enumerate(chunk):
                r = c.post(url, content=b, headers=headers_for(i))
                if r.status_code != 200:
                    errors.append(r.text)

    ts = [threading.Thread(target=run, args=(ch,)) for ch in chunks]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[:3])
    return dt


def spans_in_process(bodies: list[bytes], root: str) -> float:
    from flightlog.collector import otlp
    from flightlog.collector.server import write_batch

    t0 = time.perf_counter()
    n = 0
    for i, b in enumerate(bodies):
        table, _, _ = otlp.spans_table(otlp.parse_request(b, otlp.PROTOBUF))
        write_batch(root, "spans", table, f"inproc{i}", 0, retry=False)
        n += table.num_rows
    return n / (time.perf_counter() - t0)


# -- 3. Arrow metrics -----------------------------------------------------------------------

def metric_rows(n: int, run_id: str):
    """``n`` metric rows as flightlog's recorder builds them (8 names, steps, loop context)."""
    import numpy as np

    from flightlog._record import metric_batch

    rng = np.random.default_rng(0)
    vals = rng.random(n)
    now = time.time()
    rows = [(f"m{i % 8}", float(vals[i]), i // 8, now + i * 1e-4, (i // 100_000, (i // 8) % 1000, None))
            for i in range(n)]
    return rows, metric_batch(rows, run_id, "record", "benchhost:1")


def arrow_ingest(url: str, table, batch_rows: int, spool: str) -> float:
    from flightlog.collector.client import CollectorSink

    sink = CollectorSink(url, spool=spool, timeout=60)
    parts = [table.slice(k, batch_rows) for k in range(0, table.num_rows, batch_rows)]
    t0 = time.perf_counter()
    for p in parts:
        sink.write("metrics", p)
    dt = time.perf_counter() - t0
    sink.close()
    if sink.pending() or sink.sent != len(parts):
        raise RuntimeError(f"not all batches acknowledged: {sink.last_error}")
    return table.num_rows / dt


# -- 4. MLflow (runs in bench/.venv) --------------------------------------------------------

MLFLOW_CLIENT = r"""
import json, sys, time
from mlflow.tracking import MlflowClient
from mlflow.entities import Metric
url, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = MlflowClient(tracking_uri=url)
exp = c.create_experiment(f"bench-{time.time()}")
rates = []
for rep in range(reps):
    run = c.create_run(exp)
    now = int(time.time() * 1000)
    ms = [Metric(f"m{i % 8}", float(i) * 0.001, now + i, i // 8) for i in range(n)]
    t0 = time.perf_counter()
    for k in range(0, n, 1000):
        c.log_batch(run.info.run_id, metrics=ms[k:k + 1000], synchronous=True)
    rates.append(n / (time.perf_counter() - t0))
    c.set_terminated(run.info.run_id)
got = c.get_metric_history(run.info.run_id, "m0")
print(json.dumps({"rates": rates, "m0_rows": len(got)}))
"""


def mlflow_ingest(n: int, reps: int, tmp: str) -> dict:
    if not BENCH_MLFLOW.exists():
        return {"error": f"{BENCH_MLFLOW} missing: bench/.venv/bin/pip install mlflow"}
    port = free_port()
    db = os.path.join(tmp, "mlflow.db")
    art = os.path.join(tmp, "mlartifacts")
    proc = subprocess.Popen([str(BENCH_MLFLOW), "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--default-artifact-root", art, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=180)
        out = subprocess.run([str(BENCH_PY), "-c", MLFLOW_CLIENT, f"http://127.0.0.1:{port}", str(n), str(reps)],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            return {"error": out.stderr[-1500:]}
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:
        err = proc.stderr.read().decode()[-1500:] if proc.poll() is not None else ""
        return {"error": f"{e} {err}"}
    finally:
        stop(proc)


def mlflow_version() -> str:
    try:
        out = subprocess.run([str(BENCH_PY), "-c", "import mlflow; print(mlflow.__version__)"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip() or "?"
    except Exception:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer spans/rows and repetitions")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 5)
    n_spans = 20_480 if args.quick else 40_960
    n_bodies = 40 if args.quick else 80
    n_rows = 1_000_000 if args.quick else 3_000_000
    n_ml = 20_000 if args.quick else 50_000
    tmp = tempfile.mkdtemp(prefix="flightlog-bench-")
    med = statistics.median
    res: dict = {}
    try:
        srv = FlightlogServer(os.path.join(tmp, "store"))
        try:
            spans_stock_exporter(srv.url, 4096)  # warm-up
            res["otlp_stock"] = [spans_stock_exporter(srv.url, n_spans) for _ in range(reps)]
            # distinct bodies per repetition: the server acknowledges a repeated body without rewriting it
            all_bodies = otlp_bodies(n_bodies * reps)
            ph = {"Content-Type": "application/x-protobuf"}
            rates = []
            for rep in range(reps):
                bodies = all_bodies[rep * n_bodies:(rep + 1) * n_bodies]
                dt = post_parallel(srv.url + "/v1/traces", bodies, lambda i: ph)
                rates.append(len(bodies) * 512 / dt)
            res["otlp_server"] = rates
            _, table = metric_rows(n_rows, "bench-metrics")
            for rows in (1_000, 100_000):
                n = min(n_rows, rows * 200)
                res[f"arrow_{rows}"] = [arrow_ingest(srv.url, table.slice(0, n), rows, os.path.join(tmp, "spool"))
                                        for _ in range(reps)]
            st = srv.stats()
        finally:
            srv.close()
        res["otlp_inproc"] = [spans_in_process(all_bodies[rep * n_bodies:(rep + 1) * n_bodies],
                                               os.path.join(tmp, f"inproc{rep}")) for rep in range(reps)]
        ml = mlflow_ingest(n_ml, reps, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import platform

    print(f"flightlog collector ingest benchmark  {time.strftime('%Y-%m-%d')}  "
          f"python {platform.python_version()}  cpus {os.cpu_count()}  reps {reps} (medians)")
    print(f"  server counters after the flightlog part: spans={st['spans']} rows={st['rows']} "
          f"duplicate_rows={st['duplicate_rows']} errors={st['client_errors'] + st['server_errors']}")
    rows = [
        ("OTLP spans/s, stock exporter -> flightlog serve", med(res["otlp_stock"])),
        ("OTLP spans/s, server side (pre-encoded, 2 clients)", med(res["otlp_server"])),
        ("OTLP spans/s, decode-to-Parquet in process", med(res["otlp_inproc"])),
        ("Arrow metric rows/s, 1,000-row batches", med(res["arrow_1000"])),
        ("Arrow metric rows/s, 100,000-row batches", med(res["arrow_100000"])),
    ]
    if "rates" in ml:
        rows.append((f"MLflow {mlflow_version()} server (sqlite) log_batch rows/s, 1,000/batch", med(ml["rates"])))
    for name, v in rows:
        print(f"  {name:<62} {v:>14,.0f}")
    if "rates" in ml:
        m = med(ml["rates"])
        print(f"  ratio flightlog/MLflow, same 1,000-row batches:   {med(res['arrow_1000']) / m:8.1f}x")
        print(f"  ratio flightlog/MLflow, flightlog's 100k batches: {med(res['arrow_100000']) / m:8.1f}x")
    else:
        print(f"  MLflow: not measured: {ml.get('error')}")
    print(json.dumps({k: [round(x) for x in v] for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
