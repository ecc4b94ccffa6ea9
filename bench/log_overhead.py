"""Benchmark: cost of ``fl.log("loss", x, step=i)`` against other experiment loggers.

Run from the repository root (peers live only in bench/.venv; ``bash bench/_peers_setup.sh``
installs them there):

    bench/.venv/bin/python bench/log_overhead.py            # everything, ~6-9 min on 2 shared cores
    bench/.venv/bin/python bench/log_overhead.py --quick    # smoke test: 2 runs, 10x fewer calls
    bench/.venv/bin/python bench/log_overhead.py --runs 3 --only flightlog,floor,tensorboard
    bench/.venv/bin/python bench/log_overhead.py --skip-10m # the side-by-side table only

Every (tool, run) pair runs in its own fresh subprocess of bench/.venv/bin/python, in its
own temporary directory, so imports, caches and memory never leak from one tool into the
next; runs are interleaved (run 1 of every tool, then run 2, ...) so that load from the other
users of the machine spreads over all tools. Each subprocess:

* builds the values first (a noisy, decaying loss curve as Python floats, 1M per chunk),
* resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and notes the RSS,
* times the bare hot loop only (``for i, x in enumerate(vals): <log call>``),
* times the close/flush (``fl.finish()``, ``writer.close()``, ``mlflow.end_run()``, ...),
* reports bytes on disk (sum of file sizes under its directory, after close), the growth of
  the peak RSS over the pre-loop RSS (plus the RSS growth of helper processes such as
  wandb-core), and the CPU time of the process and its helpers per point.

Bytes per 1M points are marginal: an empty run of each tool (0 points) is measured once and
its fixed cost (run metadata, code snapshot, database schema) is subtracted. Slow peers get
fewer calls (their µs per call does not depend on the count); the table says how many.

The floor is a bare ``rows.append(("loss", x, i, time()))`` into a Python list, written to
Parquet with pyarrow's defaults at close.

A second section logs 10M points with flightlog (RSS growth, flush at exit) and reads the
metric back with ``fl.query`` (min, and a 100-step moving average materialised as an Arrow
table) in a fresh process, next to the floor at 10M and to TensorBoard's own reader
(``EventAccumulator`` with size_guidance 0 = keep all) on 1M points.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_PY = HERE / ".venv" / "bin" / "python"
CHUNK = 1_000_000
MB = 1024 * 1024

# tool -> (label, calls full, calls --quick, what the loop calls)
TOOLS = {
    "floor": ("floor: list.append", 1_000_000, 100_000, 'rows.append(("loss", x, i, time()))'),
    "flightlog": ("flightlog", 1_000_000, 100_000, 'fl.log("loss", x, step=i)'),
    "tensorboard": ("TensorBoard", 1_000_000, 50_000, 'SummaryWriter.add_scalar("loss", x, i)'),
    "mlflow_metric": ("MLflow log_metric", 500, 100, 'mlflow.log_metric("loss", x, step=i), sqlite'),
    "mlflow_batch": ("MLflow log_batch", 50_000, 10_000, "client.log_batch(1000 Metric per call), sqlite"),
    "wandb": ("W&B offline", 20_000, 5_000, 'run.log({"loss": x}, step=i), WANDB_MODE=offline'),
    "aim": ("Aim", 20_000, 5_000, 'run.track(x, name="loss", step=i)'),
}
ORDER = list(TOOLS)


# ---------------------------------------------------------------------------------------
# worker side: one tool, one run, in a fresh process
# ---------------------------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", fh.read())
    return int(m.group(1)) * 1024 if m else 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _helpers() -> tuple[int, float]:
    """RSS and CPU seconds of this process's descendants (wandb-core, ...)."""
    try:
        import psutil
    except ImportError:
        return 0, 0.0
    rss, cpu = 0, 0.0
    for c in psutil.Process().children(recursive=True):
        try:
            rss += c.memory_info().rss
            t = c.cpu_times()
            cpu += t.user + t.system
        except psutil.Error:
            pass
    return rss, cpu


def _dir_bytes(d: str, sub: str | None = None) -> int:
    total = 0
    for root, _, files in os.walk(os.path.join(d, sub) if sub else d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class Probe:
    """Times the hot loop chunk by chunk and takes the memory/CPU readings around it."""

    def __init__(self) -> None:
        self.loop_s = 0.0
        self.close_s = 0.0
        self.base_rss = 0
        self.hwm_ok = False
        self.helper0 = (0, 0.0)
        self.helper1 = (0, 0.0)
        self.cpu0 = 0.0
        self.started = False
        self.loop_peak = 0

    def _begin(self) -> None:
        import gc

        gc.collect()
        self.helper0 = _helpers()
        self.hwm_ok = _reset_hwm()
        self.base_rss = _rss()
        self.cpu0 = time.process_time()
        self.started = True

    def chunks(self, n: int):
        """Yield ``(offset, values)``; only the caller's loop body between yields is timed.

        One list object is refilled in place, so at most one chunk of values is alive.
        """
        import numpy as np

        vals: list = []
        for off in range(0, n, CHUNK):
            m = min(CHUNK, n - off)
            vals.clear()
            rng = np.random.default_rng(1234 + off)
            k = np.arange(off, off + m, dtype=np.float64)
            curve = 2.3 * np.exp(-k / max(n / 4, 1.0)) + 0.2 + 0.05 * rng.standard_normal(m)
            vals.extend(curve.tolist())
            del k, curve
            if not self.started:
                self._begin()
            t = time.perf_counter()
            yield off, vals
            self.loop_s += time.perf_counter() - t
        if not self.started:
            self._begin()
        self.helper1 = _helpers()
        self.loop_peak = _hwm() if self.hwm_ok else _rss()

    def close(self, fn) -> None:
        t = time.perf_counter()
        fn()
        self.close_s = time.perf_counter() - t

    def result(self, n: int, d: str, **extra) -> dict:
        peak = _hwm() if self.hwm_ok else max(_rss(), self.base_rss)
        h_end = _helpers()
        return {
            "n": n,
            "loop_s": self.loop_s,
            "us_per_call": self.loop_s / n * 1e6 if n else None,
            "close_s": self.close_s,
            "bytes": _dir_bytes(d),
            "growth_mb": (peak - self.base_rss + max(0, self.helper1[0] - self.helper0[0])) / MB,
            "loop_growth_mb": (self.loop_peak - self.base_rss) / MB,
            "helper_growth_mb": max(0, self.helper1[0] - self.helper0[0]) / MB,
            "cpu_s": (time.process_time() - self.cpu0) + (h_end[1] - self.helper0[1]),
            "hwm_exact": self.hwm_ok,
            **extra,
        }


def w_floor(n: int, d: str, P: Probe) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from time import time

    rows: list = []
    for off, vals in P.chunks(n):
        for i, x in enumerate(vals, off):
            rows.append(("loss", x, i, time()))

    def close():
        if rows:
            names, values, steps, times = zip(*rows)
        else:
            names = values = steps = times = ()
        t = pa.table({"name": pa.array(names, pa.string()), "value": pa.array(values, pa.float64()),
                      "step": pa.array(steps, pa.int64()), "wall_time": pa.array(times, pa.float64())})
        pq.write_table(t, os.path.join(d, "floor.parquet"))
        rows.clear()

    P.close(close)
    return P.result(n, d)


def w_flightlog(n: int, d: str, P: Probe) -> dict:
    os.environ["FLIGHTLOG_HOME"] = os.path.join(d, "store")
    import flightlog as fl

    run = fl.init(project="bench", name="log_overhead")
    run_id = run.run_id if run is not None else None
    compact_s = {}
    orig = getattr(getattr(run, "sink", None), "compact", None)
    if orig is not None:  # time the end-of-run compaction apart from the final flush

        def timed_compact(*args, **kw):
            t = time.perf_counter()
            try:
                return orig(*args, **kw)
            finally:
                compact_s["s"] = time.perf_counter() - t

        run.sink.compact = timed_compact
    for off, vals in P.chunks(n):
        for i, x in enumerate(vals, off):
            fl.log("loss", x, step=i)
    P.close(fl.finish)
    from flightlog import _warn

    return P.result(n, d, run_id=run_id, store=os.path.join(d, "store"),
                    metrics_bytes=_dir_bytes(os.path.join(d, "store"), "metrics"), compact_s=compact_s.get("s"),
                    warnings=dict(_warn.counters))


def w_tensorboard(n: int, d: str, P: Probe) -> dict:
    try:
        from torch.utils.tensorboard import SummaryWriter

        impl = "torch.utils.tensorboard"
    except ImportError:
        from tensorboardX import SummaryWriter

        impl = "tensorboardX"
    w = SummaryWriter(log_dir=os.path.join(d, "tb"))
    for off, vals in P.chunks(n):
        for i, x in enumerate(vals, off):
            w.add_scalar("loss", x, i)
    P.close(w.close)
    return P.result(n, d, impl=impl, logdir=os.path.join(d, "tb"))


def _mlflow_start(d: str):
    import logging

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    import mlflow

    mlflow.set_tracking_uri("sqlite:///" + os.path.join(d, "mlflow.db"))
    return mlflow, mlflow.start_run()


def w_mlflow_metric(n: int, d: str, P: Probe) -> dict:
    mlflow, _ = _mlflow_start(d)
    for off, vals in P.chunks(n):
        for i, x in enumerate(vals, off):
            mlflow.log_metric("loss", x, step=i)
    P.close(mlflow.end_run)
    return P.result(n, d)


def w_mlflow_batch(n: int, d: str, P: Probe) -> dict:
    mlflow, run = _mlflow_start(d)
    from time import time

    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    rid = run.info.run_id
    for off, vals in P.chunks(n):
        batch: list = []
        for i, x in enumerate(vals, off):
            batch.append(Metric("loss", x, int(time() * 1000), i))
            if len(batch) == 1000:  # MLflow's limit per log_batch request
                client.log_batch(rid, metrics=batch)
                batch = []
        if batch:
            client.log_batch(rid, metrics=batch)
    P.close(mlflow.end_run)
    return P.result(n, d)


def w_wandb(n: int, d: str, P: Probe) -> dict:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=d, WANDB_CONSOLE="off")
    import wandb

    settings = wandb.Settings(x_disable_stats=True, x_disable_machine_info=True, disable_code=True,
                              disable_git=True, console="off")
    run = wandb.init(project="bench", mode="offline", dir=d, settings=settings)
    for off, vals in P.chunks(n):
        for i, x in enumerate(vals, off):
            run.log({"loss": x}, step=i)
    P.close(run.finish)
    return P.result(n, d, version=wandb.__version__)


def w_aim(n: int, d: str, P: Probe) -> dict:
    from aim import Run

    run = Run(repo=d, experiment="bench", system_tracking_interval=None, log_system_params=False,
              capture_terminal_logs=False)
    for off, vals in P.chunks(n):
        for i, x in enumerate(vals, off):
            run.track(x, name="loss", step=i)
    P.close(run.close)
    return P.result(n, d)


def w_flread(n: int, d: str, P: Probe) -> dict:
    """Read one metric back with fl.query: min, then a 100-step moving average (Arrow)."""
    meta = json.loads(Path(d, "meta.json").read_text())
    store, run_id = meta["store"], meta["run_id"]
    t = time.perf_counter()
    import flightlog as fl

    t_import_fl = time.perf_counter() - t
    t = time.perf_counter()
    import duckdb  # noqa: F401  (import cost reported apart from the queries)

    t_import_duckdb = time.perf_counter() - t
    q_min = "SELECT min(value) AS min_loss, count(*) AS n FROM metrics WHERE run_id = ? AND name = 'loss'"
    q_ma = ("SELECT step, avg(value) OVER (ORDER BY step ROWS BETWEEN 99 PRECEDING AND CURRENT ROW) AS ma "
            "FROM metrics WHERE run_id = ? AND name = 'loss' ORDER BY step")
    out: dict = {"import_flightlog_s": t_import_fl, "import_duckdb_s": t_import_duckdb}
    for key, sql in (("min", q_min), ("ma", q_ma)):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            res = fl.query(sql, [run_id], store=store)
            times.append(time.perf_counter() - t)
        out[f"{key}_first_s"] = times[0]
        out[f"{key}_s"] = statistics.median(times)
        out[f"{key}_rows"] = res.num_rows
        if key == "min":
            out["count"] = res.column("n")[0].as_py()
            out["min_value"] = res.column("min_loss")[0].as_py()
    out["ok"] = out["count"] == meta["n"] and out["ma_rows"] == meta["n"]
    return out


def w_tbread(n: int, d: str, P: Probe) -> dict:
    """TensorBoard's Python reader over the same kind of event file: load all, min + moving average."""
    meta = json.loads(Path(d, "meta.json").read_text())
    import numpy as np

    t = time.perf_counter()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t_import = time.perf_counter() - t
    t = time.perf_counter()
    ea = EventAccumulator(meta["logdir"], size_guidance={"scalars": 0})
    ea.Reload()
    ev = ea.Scalars("loss")
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    v = np.fromiter((e.value for e in ev), np.float64, len(ev))
    s = np.fromiter((e.step for e in ev), np.int64, len(ev))
    v = v[np.argsort(s, kind="stable")]
    mn = float(v.min()) if len(v) else None
    c = np.cumsum(np.concatenate([[0.0], v]))
    k = np.minimum(np.arange(1, len(v) + 1), 100)
    ma = (c[1:] - c[np.arange(1, len(v) + 1) - k]) / k
    t_compute = time.perf_counter() - t
    return {"import_s": t_import, "load_s": t_load, "compute_s": t_compute, "count": len(ev), "min_value": mn,
            "ma_rows": int(len(ma)), "ok": len(ev) == meta["n"]}


WORKERS = {
    "floor": w_floor, "flightlog": w_flightlog, "tensorboard": w_tensorboard, "mlflow_metric": w_mlflow_metric,
    "mlflow_batch": w_mlflow_batch, "wandb": w_wandb, "aim": w_aim, "flread": w_flread, "tbread": w_tbread,
}


def worker_main(tool: str, n: int, d: str) -> None:
    res = WORKERS[tool](n, d, Probe())
    sys.stdout.flush()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------

def run_worker(py: str, tool: str, n: int, d: str, timeout: float) -> dict:
    """One fresh subprocess; returns its result dict, or {"error": why}."""
    os.makedirs(d, exist_ok=True)
    env = dict(os.environ)
    env.pop("FLIGHTLOG_HOME", None)
    env.setdefault("PYTHONHASHSEED", "0")
    cmd = [py, str(Path(__file__).resolve()), "--worker", tool, "--n", str(n), "--dir", d]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["process_s"] = wall
            return res
    tail = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return {"error": f"exit {p.returncode}: {tail[0][:300]}"}


def _med(results: list[dict], key: str):
    vals = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(headers)))
    print("  ".join("-" * w[i] for i in range(len(headers))))
    for r in rows:
        print("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 runs, ~10x fewer calls, 1M instead of 10M")
    ap.add_argument("--runs", type=int, default=None, help="runs per tool (median quoted); default 5, 2 with --quick")
    ap.add_argument("--only", default=None, help=f"comma-separated tools of: {','.join(ORDER)}")
    ap.add_argument("--skip-10m", action="store_true", help="skip the 10M-point RSS / read-back section")
    ap.add_argument("--python", default=None, help="interpreter for the workers (default bench/.venv/bin/python)")
    ap.add_argument("--json", default=None, help="also write all raw results to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker_main(a.worker, a.n, a.dir)
        return 0

    runs = a.runs or (2 if a.quick else 5)
    tools = [t for t in ORDER if a.only is None or t in a.only.split(",")]
    py = a.python or (str(BENCH_PY) if BENCH_PY.exists() else sys.executable)
    if not BENCH_PY.exists() and a.python is None:
        print(f"note: {BENCH_PY} missing (run bash bench/_peers_setup.sh); peers will fail to import")
    big = 1_000_000 if a.quick else 10_000_000
    root = tempfile.mkdtemp(prefix="fl-logbench-")
    t_all = time.perf_counter()
    raw: dict = {"runs": runs, "python": py, "tools": {}, "empty": {}, "big": {}}
    print(f"log_overhead: {runs} runs per tool, workers: {py}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    try:
        # fixed cost of an empty run (0 points): subtracted from bytes on disk
        for tool in tools:
            raw["empty"][tool] = run_worker(py, tool, 0, os.path.join(root, f"empty-{tool}"), 300)
            shutil.rmtree(os.path.join(root, f"empty-{tool}"), ignore_errors=True)
        results: dict[str, list[dict]] = {t: [] for t in tools}
        errors: dict[str, str] = {}
        keep: dict[str, str] = {}
        for r in range(runs):
            for tool in tools:
                if tool in errors:
                    continue
                n = TOOLS[tool][2] if a.quick else TOOLS[tool][1]
                d = os.path.join(root, f"{tool}-{r}")
                res = run_worker(py, tool, n, d, 600)
                if "error" in res:
                    errors[tool] = res["error"]
                    print(f"  {tool}: FAILED: {res['error']}", flush=True)
                else:
                    results[tool].append(res)
                    print(f"  run {r + 1}/{runs} {tool:14s} {res['us_per_call']:10.2f} µs/call  "
                          f"close {res['close_s']:.3f} s", flush=True)
                if r == runs - 1 and tool in ("flightlog", "tensorboard") and "error" not in res:
                    keep[tool] = d  # read back in the second section
                else:
                    shutil.rmtree(d, ignore_errors=True)
        raw["tools"] = results
        raw["errors"] = errors

        fl_us = _med(results.get("flightlog", []), "us_per_call")
        rows = []
        for tool in tools:
            label, _, _, call = TOOLS[tool]
            res = results[tool]
            if not res:
                why = errors.get(tool) or raw["empty"].get(tool, {}).get("error", "not run")
                rows.append([label, "-", "-", "-", "-", "-", "-", "-", f"failed: {why[:80]}"])
                continue
            if tool == "tensorboard" and res[0].get("impl"):
                label = f"TensorBoard ({res[0]['impl']})"
            n = res[0]["n"]
            us = _med(res, "us_per_call")
            empty = raw["empty"].get(tool, {}).get("bytes", 0) if "error" not in raw["empty"].get(tool, {}) else 0
            mb_1m = statistics.median([(x["bytes"] - empty) / x["n"] * 1e6 / 1e6 for x in res])
            cpu = statistics.median([x["cpu_s"] / x["n"] * 1e6 for x in res])
            ratio = us / fl_us if fl_us else None
            rows.append([label, f"{n:,}", f"{us:,.2f}", f"{_med(res, 'close_s'):.3f}", f"{mb_1m:.1f}",
                         f"{empty / 1e3:,.0f}", f"{max(0.0, _med(res, 'growth_mb')):,.1f}", f"{cpu:,.2f}",
                         "1.0x" if tool == "flightlog" else (f"{ratio:,.1f}x" if ratio else "-")])
        print()
        print(f"Per-call cost, median of {runs} runs, each in a fresh process "
              f"(MB = 10^6 bytes on disk, marginal over an empty run; RSS growth in MiB):")
        print_table(["tool", "calls", "µs/call", "close s", "MB/1M pts", "fixed kB", "RSS growth MB",
                     "CPU µs/pt", "vs flightlog"], rows)
        for tool in tools:
            for r in results[tool][:1]:
                if r.get("warnings"):
                    print(f"  note: {tool} warnings: {r['warnings']}")
                if r.get("helper_growth_mb"):
                    print(f"  note: {tool} RSS growth includes {r['helper_growth_mb']:.1f} MB of helper processes")
        for tool in tools:
            print(f"  {TOOLS[tool][0]}: {TOOLS[tool][3]}")
        print("  calls: slow peers log fewer points (µs/call does not depend on the count).")
        print("  CPU µs/pt: CPU seconds of the process and its helpers over loop + close, per point.")

        if not a.skip_10m and "flightlog" in tools:
            big_section(py, root, big, keep, raw)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f} at end")
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1, default=str))
    return 0


def big_section(py: str, root: str, big: int, keep: dict, raw: dict) -> None:
    print(f"\n{big:,} points: flightlog vs the floor (1 run each), read-back with fl.query in a fresh process")
    out = raw["big"]
    rows = []
    for tool in ("floor", "flightlog"):
        d = os.path.join(root, f"big-{tool}")
        res = run_worker(py, tool, big, d, 600)
        out[tool] = res
        if "error" in res:
            rows.append([TOOLS[tool][0], f"{big:,}", "failed", res["error"][:80], "", "", ""])
            shutil.rmtree(d, ignore_errors=True)
            continue
        rows.append([TOOLS[tool][0], f"{big:,}", f"{res['us_per_call']:.2f}", f"{res['close_s']:.2f}",
                     f"{res['bytes'] / big:.1f}", f"{res['loop_growth_mb']:,.0f}", f"{res['growth_mb']:,.0f}"])
        if tool == "flightlog":
            keep["flightlog-big"] = d
        else:
            shutil.rmtree(d, ignore_errors=True)
    print_table(["tool", "points", "µs/call", "close s", "bytes/pt", "RSS growth in loop MB",
                 "RSS growth incl. close MB"], rows)
    f = out.get("flightlog", {})
    if f.get("compact_s") is not None:
        print(f"  flightlog close = final flush + compaction of the run's parts ({f['compact_s']:.2f} s of it)")

    # read back: flightlog at 1M (main table's last run) and at `big`; TensorBoard at 1M
    print("\nRead one metric back: min + 100-step moving average (median of 3 queries, fresh process)")
    rrows = []
    for key in ("flightlog", "flightlog-big"):
        d = keep.get(key)
        if not d:
            continue
        src = raw["tools"]["flightlog"][-1] if key == "flightlog" else out["flightlog"]
        Path(d, "meta.json").write_text(json.dumps({"store": src["store"], "run_id": src["run_id"], "n": src["n"]}))
        res = run_worker(py, "flread", src["n"], d, 600)
        out[f"read-{key}"] = res
        if "error" in res:
            rrows.append([f"flightlog fl.query ({src['n']:,} pts)", "failed", res["error"][:80], "", "", ""])
        else:
            total = res["min_s"] + res["ma_s"]
            rrows.append([f"flightlog fl.query ({src['n']:,} pts)", f"{res['import_duckdb_s']:.2f}",
                          f"{res['min_s']:.3f}", f"{res['ma_s']:.3f}", f"{total:.3f}",
                          "ok" if res["ok"] else f"count {res['count']} / ma rows {res['ma_rows']}"])
        shutil.rmtree(d, ignore_errors=True)
    d = keep.get("tensorboard")
    if d:
        src = raw["tools"]["tensorboard"][-1]
        Path(d, "meta.json").write_text(json.dumps({"logdir": src["logdir"], "n": src["n"]}))
        res = run_worker(py, "tbread", src["n"], d, 600)
        out["read-tensorboard"] = res
        if "error" in res:
            rrows.append([f"TensorBoard EventAccumulator ({src['n']:,} pts)", "failed", res["error"][:80], "", "", ""])
        else:
            total = res["load_s"] + res["compute_s"]
            rrows.append([f"TensorBoard EventAccumulator ({src['n']:,} pts)", f"{res['import_s']:.2f}",
                          f"{res['load_s']:.3f} (load all)", f"{res['compute_s']:.3f} (numpy min+MA)",
                          f"{total:.3f}", "ok" if res["ok"] else f"count {res['count']}"])
        shutil.rmtree(d, ignore_errors=True)
    print_table(["reader", "import s", "min s", "moving avg s", "total s", "check"], rrows)
    fl_big = out.get("read-flightlog-big", {})
    tb = out.get("read-tensorboard", {})
    fl_1m = out.get("read-flightlog", {})
    if "min_s" in fl_1m and "load_s" in tb:
        print(f"  TensorBoard / flightlog read time at the same size: "
              f"{(tb['load_s'] + tb['compute_s']) / (fl_1m['min_s'] + fl_1m['ma_s']):.1f}x")
    if "min_s" in fl_big:
        print(f"  flightlog at {big:,}: first min query {fl_big['min_first_s']:.3f} s, first moving average "
              f"{fl_big['ma_first_s']:.3f} s (after a {fl_big['import_duckdb_s']:.2f} s duckdb import)")


if __name__ == "__main__":
    sys.exit(main())
