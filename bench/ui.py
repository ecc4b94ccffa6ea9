"""Benchmark: the web UI (`flightlog ui`) on big metrics and many runs, and TensorBoard's reader.

    .venv/bin/python bench/ui.py                 # builds the stores once under bench/results/ui/
    .venv/bin/python bench/ui.py --repeat 9      # more samples per median
    .venv/bin/python bench/ui.py --rebuild       # record the stores again

Measures (medians of --repeat runs, warm server unless marked cold):

1. ``GET /api/series`` over real HTTP (uvicorn on loopback) for a 10M-point and a 1M-point
   metric at points=2000 — both recorded with ``fl.log`` in a real run, so the Parquet layout is
   the recorder's (one part per flush, then compaction at exit). Cold = first request after the
   server started.
2. The runs page of a store with 5,000 runs: first contentful paint in headless Chromium
   (Debian's chromium through playwright's ``executable_path``), a fresh page per sample; and
   the same for the very first load (cold: the server builds its runs index).
3. A chart of the 1M-point metric: navigation start → chart drawn (data fetched, uPlot drawn).
4. TensorBoard's reader on the same 1M points (written with tensorboardX ``add_scalar``, read with
   ``EventAccumulator``): its time and how many points it returns with its default size
   guidance (reservoir sampling), and whether a planted one-step spike survives, next to
   flightlog's 2,000-point answer. Runs in bench/.venv (``bash bench/_peers_setup.sh``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "ui")
SPIKE_AT = 654_321
SPIKE = 50.0


def _values(n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    v = 2.0 * np.exp(-np.arange(n) / (n / 4)) + rng.normal(0, 0.05, n)
    if n > SPIKE_AT:
        v[SPIKE_AT] = SPIKE
    return v


def _record(store: str, name: str, n: int) -> None:
    """One real run logging ``n`` points of "loss" with fl.log (in a subprocess: a clean recorder)."""
    code = f"""
import sys; sys.path.insert(0, {os.path.join(ROOT, 'bench')!r})
import flightlog as fl
from ui import _values
vals = _values({n}, {n % 97}).tolist()
fl.init(project="bench-ui", name={name!r}, store={store!r})
log = fl.log
for x in vals:
    log("loss", x)
fl.finish()
"""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, FLIGHTLOG_PROGRESS="0"))
    print(f"  recorded {name}: {n:,} points in {time.perf_counter() - t:.1f} s", flush=True)


def _many_runs(store: str, n: int) -> None:
    """``n`` finished runs with params and 3 metrics x 50 steps each, one part per run and table."""
    import pyarrow as pa

    from flightlog.collector import schema as S
    from flightlog.collector import store as st

    sink = st.LocalSink(store)
    now = dt.datetime.now(dt.timezone.utc)
    for i in range(n):
        rid = f"bench-{i:05d}"
        t0 = now - dt.timedelta(minutes=n - i)
        sink.write("runs", pa.table({
            "run_id": [rid], "project": [f"proj-{i % 5}"], "name": [f"sweep {i}"], "kind": ["train"],
            "status": ["finished" if i % 13 else "failed"], "started_at": pa.array([t0], S.TS),
            "ended_at": pa.array([t0 + dt.timedelta(seconds=30 + i % 50)], S.TS),
            "updated_at": pa.array([t0 + dt.timedelta(seconds=30 + i % 50)], S.TS), "host": ["bench"],
            "params": [json.dumps({"lr": [1e-3, 3e-3, 1e-2][i % 3], "batch": 64, "seed": i % 10})]}))
        names = [m for m in ("loss", "val_acc", "lr") for _ in range(50)]
        sink.write("metrics", pa.table({
            "run_id": [rid] * 150, "name": names, "value": [float(k % 50) / (i + 1) for k in range(150)],
            "step": [k % 50 for k in range(150)], "source": ["record"] * 150}))


def build(rebuild: bool) -> dict:
    stores = {"big": os.path.join(OUT, "big"), "many": os.path.join(OUT, "many")}
    if rebuild:
        for s in stores.values():
            shutil.rmtree(s, ignore_errors=True)
    if not os.path.isdir(stores["big"]):
        print("building the big-metric store (10M + 1M points with fl.log) ...", flush=True)
        _record(stores["big"], "ten-million", 10_000_000)
        _record(stores["big"], "one-million", 1_000_000)
    if not os.path.isdir(stores["many"]):
        print("building the 5,000-run store ...", flush=True)
        t = time.perf_counter()
        _many_runs(stores["many"], 5000)
        print(f"  5,000 runs written in {time.perf_counter() - t:.1f} s", flush=True)
    return stores


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.0f} ms (min {min(xs):.0f}, max {max(xs):.0f}, n={len(xs)})"


def bench_series(store: str, repeat: int) -> dict:
    import httpx

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _ui_store import UIServer

    from flightlog.ui import create_app

    srv = UIServer(create_app(store))
    res = {}
    try:
        c = httpx.Client(base_url=srv.url, timeout=60)
        runs = {r["name"]: r["run_id"] for r in c.get("/api/runs").json()["runs"]}
        for label in ("ten-million", "one-million"):
            rid = runs[label]
            times = []
            for i in range(repeat + 1):
                t = time.perf_counter()
                r = c.get("/api/series", params={"run": rid, "name": "loss", "points": 2000})
                times.append((time.perf_counter() - t) * 1000)
                d = r.json()
            assert r.status_code == 200, r.text
            spike = any(x == SPIKE_AT and y == SPIKE for x, y in zip(d["x"], d["y"]))
            res[label] = {"cold_ms": times[0], "warm": times[1:], "n_total": d["n_total"], "returned": len(d["x"]),
                          "spike_kept": spike, "run": rid}
            print(f"/api/series {label:12} n_total={d['n_total']:,} -> {len(d['x'])} points, "
                  f"spike at step {SPIKE_AT} kept: {spike}; cold {times[0]:.0f} ms, warm median {_med(times[1:])}",
                  flush=True)
            zt = []
            for i in range(repeat):
                t = time.perf_counter()
                z = c.get("/api/series", params={"run": rid, "name": "loss", "points": 2000,
                                                 "lo": SPIKE_AT - 1000, "hi": SPIKE_AT + 999}).json()
                zt.append((time.perf_counter() - t) * 1000)
            print(f"  zoomed to 2,000 steps around the spike: {len(z['x'])} points (full resolution), {_med(zt)}")
    finally:
        srv.stop()
    return res


def _chromium() -> str | None:
    for c in (os.environ.get("FLIGHTLOG_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium")):
        if c and os.path.isfile(c):
            return c
    return None


def bench_browser(stores: dict, series: dict, repeat: int) -> None:
    exe = _chromium()
    if exe is None:
        print("browser: chromium not installed, skipped (apt-get install chromium)")
        return
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _ui_store import UIServer

    from flightlog.ui import create_app

    fcp_js = "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        app = create_app(stores["many"])
        t = time.perf_counter()
        app.state.index.table()  # the server builds it in the background at start; wait for it here
        print(f"runs index of 5,000 runs built in {time.perf_counter() - t:.1f} s after server start "
              "(once per server process; later requests re-read only new or live runs' files)",
              flush=True)
        srv = UIServer(app)
        try:
            paints = []
            for i in range(repeat + 1):
                ctx = b.new_context(viewport={"width": 1280, "height": 900})
                pg = ctx.new_page()
                pg.goto(srv.url + "/", wait_until="load", timeout=120_000)
                pg.wait_for_function(fcp_js)
                paints.append(pg.evaluate(fcp_js))
                rows = pg.locator("#runs-body tr").count()
                total = pg.locator(".bar span").first.inner_text()
                ctx.close()
            print(f"runs page, 5,000 runs ({total}, {rows} rows rendered): first contentful paint "
                  f"first load {paints[0]:.0f} ms, then median {_med(paints[1:])}", flush=True)
        finally:
            srv.stop()
        from flightlog.ui import data as D

        D._PYRAMIDS.clear()  # the first chart load below is cold: it builds the series' M4 pyramid
        srv = UIServer(create_app(stores["big"]))
        try:
            rid = series["one-million"]["run"]
            ready = []
            for i in range(repeat + 1):
                ctx = b.new_context(viewport={"width": 1280, "height": 900})
                pg = ctx.new_page()
                pg.goto(f"{srv.url}/runs/{rid}", timeout=120_000)
                pg.wait_for_selector('.chart[data-ready="1"]', timeout=60_000)
                t = float(pg.get_attribute(".chart", "data-t-ready"))
                n = pg.evaluate("() => document.querySelector('.chart')._uplot.data[0].length")
                ready.append(t)
                ctx.close()
            print(f"1M-point chart: navigation start -> drawn ({n} points drawn) "
                  f"cold {ready[0]:.0f} ms, warm median {_med(ready[1:])}", flush=True)
        finally:
            srv.stop()
        b.close()


def _tb_part(n: int, logdir: str) -> None:
    """(in bench/.venv) write n scalars with tensorboardX, read them with EventAccumulator."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboardX import SummaryWriter

    vals = _values(n, n % 97).tolist()
    if not os.path.isdir(logdir) or not os.listdir(logdir):
        w = SummaryWriter(logdir)
        for i, x in enumerate(vals):
            w.add_scalar("loss", x, i)
        w.close()
    out = {}
    for label, guidance in (("default", ea.DEFAULT_SIZE_GUIDANCE), ("keep all", {ea.SCALARS: 0})):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            acc = ea.EventAccumulator(logdir, size_guidance=guidance)
            acc.Reload()
            s = acc.Scalars("loss")
            times.append((time.perf_counter() - t) * 1000)
        spike = any(e.step == SPIKE_AT and abs(e.value - SPIKE) < 1e-3 for e in s)
        out[label] = {"ms": statistics.median(times), "returned": len(s), "spike_kept": spike}
    print(json.dumps(out))


def bench_tensorboard(fl_series: dict) -> None:
    py = os.path.join(ROOT, "bench", ".venv", "bin", "python")
    if not os.path.exists(py):
        print("tensorboard: bench/.venv missing (bash bench/_peers_setup.sh), skipped")
        return
    logdir = os.path.join(OUT, "tb-1m")
    p = subprocess.run([py, os.path.abspath(__file__), "--tb-part", logdir], capture_output=True, text=True)
    if p.returncode != 0:
        print("tensorboard part failed:", p.stderr[-800:])
        return
    r = json.loads(p.stdout.strip().splitlines()[-1])
    fl1 = fl_series.get("one-million", {})
    print("\n1M points of one scalar, side by side (median of 3 for TensorBoard):")
    print(f"  {'reader':42} {'time':>10} {'points returned':>16} {'spike kept':>11}")
    for label, d in r.items():
        print(f"  {'TensorBoard EventAccumulator (' + label + ')':42} {d['ms']:8.0f} ms {d['returned']:>16,} "
              f"{str(d['spike_kept']):>11}")
    if fl1:
        print(f"  {'flightlog /api/series points=2000 (HTTP)':42} {statistics.median(fl1['warm']):8.0f} ms "
              f"{fl1['returned']:>16,} {str(fl1['spike_kept']):>11}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--tb-part", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tb_part:
        _tb_part(1_000_000, a.tb_part)
        return
    stores = build(a.rebuild)
    series = bench_series(stores["big"], a.repeat)
    bench_browser(stores, series, a.repeat)
    bench_tensorboard(series)


if __name__ == "__main__":
    main()
