"""Benchmark: cost of ``@fl.step`` per call, fingerprint throughput, lineage query time.

Run from the repository root with the project venv:

    .venv/bin/python bench/step_overhead.py            # everything (~1-2 min)
    .venv/bin/python bench/step_overhead.py --quick    # fewer repetitions, 100 MB array, 10k-call lineage store
    .venv/bin/python bench/step_overhead.py --only calls|fingerprint|lineage|mltrace

Per-call numbers interleave the contenders in blocks (bare function, bare
OpenTelemetry SDK span with 5 attributes via ``start_as_current_span``,
``@fl.step``) and report the median over blocks of the per-call time, in µs
of wall time and of CPU time of the calling thread (``thread_time``); the
flush thread's work (Arrow encoding + Parquet writes) is measured separately
as process CPU per call. The machine is shared, so medians of many blocks.

mltrace's ``@register`` needs a PostgreSQL server; it runs in bench/.venv
(never in the project venv) when it can, otherwise the reason is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_PY = HERE / ".venv" / "bin" / "python"


def _median_per_call(fn, n: int, blocks: int, clock=time.perf_counter) -> float:
    per = []
    for _ in range(blocks):
        t = clock()
        fn(n)
        per.append((clock() - t) / n * 1e6)
    return statistics.median(per)


def bench_calls(blocks: int, n: int) -> dict:
    os.environ["FLIGHTLOG_HOME"] = tempfile.mkdtemp(prefix="fl-bench-")
    import flightlog as fl
    from opentelemetry.sdk.trace import TracerProvider

    run = fl.init(project="bench")
    tp = TracerProvider()
    tracer = tp.get_tracer("bench")

    def bare(a, b):
        return a + b

    @fl.step
    def stepped(a, b):
        return a + b

    def loop_bare(k):
        for i in range(k):
            bare(i, 2)

    def loop_otel(k):
        for i in range(k):
            with tracer.start_as_current_span("bare", attributes={"a": i, "b": 2, "code.function.name": "bare",
                                                                   "code.namespace": "__main__", "run": "x"}):
                bare(i, 2)

    def loop_step(k):
        for i in range(k):
            stepped(i, 2)

    contenders = {"bare function": loop_bare, "bare OTel SDK span (5 attrs)": loop_otel, "@fl.step": loop_step}
    for f in contenders.values():  # warm up
        f(2000)
    res: dict[str, dict[str, list]] = {k: {"wall": [], "cpu": []} for k in contenders}
    for _ in range(blocks):
        for name, f in contenders.items():
            t, c = time.perf_counter(), time.thread_time()
            f(n)
            res[name]["wall"].append((time.perf_counter() - t) / n * 1e6)
            res[name]["cpu"].append((time.thread_time() - c) / n * 1e6)
    # flush-thread cost: process CPU of flushing what the step calls queued
    from flightlog import _steps

    _steps.flush()
    c0 = time.process_time()
    loop_step(n)
    c1 = time.process_time()
    _steps.flush()  # rows from the queued calls, then Arrow encoding + Parquet write
    flush_cpu = (time.process_time() - c1) / n * 1e6
    fl.finish()
    out = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    out["flush (background thread, per call)"] = {"wall": float("nan"), "cpu": flush_cpu}
    del c0
    return out


def bench_fingerprint(array_bytes: int, rows: int, reps: int) -> list[tuple[str, float, float]]:
    import numpy as np
    import pandas as pd

    from flightlog import _fingerprint as F

    out = []
    a = np.random.default_rng(0).random(array_bytes // 8)
    for label, summary in (("hash only", False), ("hash + summary", True)):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            F.describe(a, summary=summary)
            ts.append(time.perf_counter() - t)
        m = statistics.median(ts)
        out.append((f"numpy float64 {a.nbytes / 1e9:.2f} GB, {label}", m * 1e3, a.nbytes / m / 1e9))
    del a
    rng = np.random.default_rng(1)
    df = pd.DataFrame({f"x{i}": rng.random(rows) for i in range(8)})
    df["i"] = rng.integers(0, 1000, rows)
    df["cat"] = pd.Series(rng.choice(["a", "b", "c", "d", "e"], rows)).astype(str)
    nbytes = int(df.memory_usage(index=True, deep=True).sum())
    for label, summary in (("hash only", False), ("hash + summary", True)):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            F.describe(df, summary=summary)
            ts.append(time.perf_counter() - t)
        m = statistics.median(ts)
        out.append((f"pandas {rows:,} rows x 10 cols ({nbytes / 1e6:.0f} MB), {label}", m * 1e3, nbytes / m / 1e9))
    return out


def bench_lineage(calls: int, chain: int, reps: int) -> dict:
    """A store with ``calls`` step calls in chains of ``chain`` steps; time lineage of one chain end."""
    store = tempfile.mkdtemp(prefix="fl-lineage-")
    os.environ["FLIGHTLOG_HOME"] = store
    import numpy as np

    import flightlog as fl
    from flightlog.query import db, lineage

    steps = []
    for k in range(chain):
        def f(x, k=k):
            return x + 1

        f.__name__ = f.__qualname__ = f"s{k}"
        steps.append(fl.step(f))
    t = time.perf_counter()
    runs = 10
    per_run = calls // chain // runs
    last = None
    for r in range(runs):
        fl.init(project="lineage-bench")
        for c in range(per_run):
            x = np.full(4, (r * per_run + c) * 100, dtype=np.int64)  # chains never share values
            for s in steps:
                x = s(x)
        last = fl._run.ACTIVE.run_id
        fl.finish()
    build_s = time.perf_counter() - t
    con = db.connect(store)
    n_calls = con.execute("select count(*) from spans").fetchall()[0][0]
    target = con.execute(f"select span_id from spans where run_id = ? and name = 's{chain - 1}' "
                         "order by start_time desc limit 1", [last]).fetchall()[0][0]
    con.close()
    ts_conn, ts_q, ts_total = [], [], []
    depth = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        con = db.connect(store)
        t1 = time.perf_counter()
        tree = lineage.lineage(con, target, direction="up", depth=chain + 5)
        t2 = time.perf_counter()
        con.close()
        ts_conn.append(t1 - t0)
        ts_q.append(t2 - t1)
        ts_total.append(t2 - t0)
        depth = lineage.tree_depth(tree)
    # the CLI end to end (a fresh interpreter: imports + connect + query + print)
    cli = []
    for _ in range(max(1, reps // 2)):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flightlog.cli", "lineage", target, "--store", store],
                       check=True, capture_output=True)
        cli.append(time.perf_counter() - t)
    return {"calls": n_calls, "depth": depth, "build_s": build_s, "connect_ms": statistics.median(ts_conn) * 1e3,
            "query_ms": statistics.median(ts_q) * 1e3, "total_ms": statistics.median(ts_total) * 1e3,
            "cli_ms": statistics.median(cli) * 1e3}


MLTRACE_SNIPPET = r"""
import os, statistics, sys, time
from mltrace import register, set_db_uri
set_db_uri(os.environ["MLTRACE_DB_URI"])
@register(component_name="bench", input_vars=["a", "b"], output_vars=["c"])
def f(a, b):
    c = a + b
    return c
def bare(a, b):
    return a + b
n = int(sys.argv[1]); blocks = int(sys.argv[2])
for _ in range(20): f(1, 2)
per, per_bare = [], []
for _ in range(blocks):
    t = time.perf_counter()
    for i in range(n): f(i, 2)
    per.append((time.perf_counter() - t) / n * 1e6)
    t = time.perf_counter()
    for i in range(n): bare(i, 2)
    per_bare.append((time.perf_counter() - t) / n * 1e6)
print(statistics.median(per), statistics.median(per_bare))
"""


def bench_mltrace(n: int, blocks: int) -> str:
    if not BENCH_PY.exists():
        return "bench/.venv missing (create it: see docs/steps.md)"
    probe = subprocess.run([str(BENCH_PY), "-c", "import mltrace"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "mltrace is not installed in bench/.venv: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
    uri = os.environ.get("MLTRACE_DB_URI")
    if not uri:
        return ("cannot run: mltrace's @register writes every call to PostgreSQL and needs a server "
                "(set MLTRACE_DB_URI=postgresql://user:pw@host:5432/db)")
    p = subprocess.run([str(BENCH_PY), "-c", MLTRACE_SNIPPET, str(n), str(blocks)], capture_output=True, text=True,
                       env=dict(os.environ, MLTRACE_DB_URI=uri), timeout=600)
    if p.returncode != 0:
        return "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    us, bare = (float(x) for x in p.stdout.split())
    return f"{us:.1f} µs per call (bare function {bare:.2f} µs), same machine"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("calls", "fingerprint", "lineage", "mltrace"))
    args = ap.parse_args()
    q = args.quick
    print(f"# flightlog step benchmark  {time.strftime('%Y-%m-%d %H:%M')}  python {sys.version.split()[0]}  "
          f"cpus {os.cpu_count()}")
    if args.only in (None, "calls"):
        r = bench_calls(blocks=15 if q else 41, n=2000 if q else 5000)
        otel = r["bare OTel SDK span (5 attrs)"]
        print("\n## per call (median over blocks)")
        print(f"{'contender':40} {'wall µs':>9} {'cpu µs':>9} {'x OTel (cpu)':>13}")
        for k, v in r.items():
            print(f"{k:40} {v['wall']:9.2f} {v['cpu']:9.2f} {v['cpu'] / otel['cpu']:13.2f}")
        print(f"@fl.step / bare OTel span: {r['@fl.step']['wall'] / otel['wall']:.2f}x wall, "
              f"{r['@fl.step']['cpu'] / otel['cpu']:.2f}x cpu (target <= 1.5x)")
    if args.only in (None, "mltrace"):
        print("\nmltrace @register:", bench_mltrace(200 if q else 500, 5 if q else 11))
    if args.only in (None, "fingerprint"):
        print("\n## fingerprint throughput (median)")
        for label, ms, gbs in bench_fingerprint(100_000_000 if q else 1_000_000_000, 1_000_000, 3 if q else 5):
            print(f"{label:60} {ms:9.1f} ms {gbs:7.2f} GB/s")
    if args.only in (None, "lineage"):
        r = bench_lineage(10_000 if q else 100_000, 10, 5 if q else 9)
        print(f"\n## lineage of a 10-step chain over {r['calls']:,} step calls "
              f"(store built in {r['build_s']:.1f} s; tree depth {r['depth']})")
        print(f"connect (views over the store)  {r['connect_ms']:8.1f} ms")
        print(f"lineage query (up, whole chain) {r['query_ms']:8.1f} ms")
        print(f"connect + query                 {r['total_ms']:8.1f} ms")
        print(f"`flightlog lineage` CLI, fresh process {r['cli_ms']:8.1f} ms")


if __name__ == "__main__":
    main()
