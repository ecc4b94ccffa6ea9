"""Benchmark: recording 100k per-example predictions, and `flightlog slices` end to end.

1. ``fl.log_predictions`` on 100k rows (two feature mixes), timed until the call
   returns and until the rows are on disk (``rec.flush()``); side by side with a
   naive per-row ``json.dumps`` of the features (same process) and with
   ``mlflow.log_table`` of the same DataFrame plus labels and loss (MLflow's way
   to record per-example predictions; runs in bench/.venv, SQLite tracking store, local artifacts).
2. ``flightlog slices`` in a fresh process over 100k and 1M logged predictions
   (10 features: 4 string, 3 small-int, 3 float; a planted failing slice).

Setup (once; mlflow must stay out of the project venv; only ever *add* packages):

    [ -d bench/.venv ] || python3 -m venv bench/.venv
    bench/.venv/bin/pip install -e . mlflow pandas

Run from the repository root with the project venv:

    .venv/bin/python bench/predictions.py [--quick]     # --quick: skip the 1M-row slices run

Medians: 5 runs for flightlog and the naive baseline, 3 for mlflow and for slices.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
BENCH_PY = HERE / ".venv" / "bin" / "python"
N = 100_000

_MLFLOW = r"""
import json, os, statistics, sys, tempfile, time
import numpy as np, pandas as pd
import mlflow
df = pd.read_parquet(sys.argv[1])
tmp = tempfile.mkdtemp()
mlflow.set_tracking_uri("sqlite:///" + os.path.join(tmp, "mlflow.db"))  # the file store is in maintenance mode
exp = mlflow.create_experiment("bench", artifact_location=os.path.join(tmp, "artifacts"))
ts = []
with mlflow.start_run(experiment_id=exp):
    for i in range(3):
        t0 = time.perf_counter()
        mlflow.log_table(data=df, artifact_file=f"predictions_{i}.json")
        ts.append(time.perf_counter() - t0)
print(json.dumps({"median": statistics.median(ts), "version": mlflow.__version__}))
"""


def _cases(rng) -> dict[str, pd.DataFrame]:
    return {
        "20 float columns": pd.DataFrame(rng.random((N, 20)), columns=[f"x{i}" for i in range(20)]),
        "5 str + 5 int + 5 float": pd.DataFrame(
            {**{f"s{i}": rng.choice(["BR", "US", "DE", "IN"], N) for i in range(5)},
             **{f"i{i}": rng.integers(0, 100, N) for i in range(5)},
             **{f"x{i}": rng.random(N) for i in range(5)}}),
    }


def _mlflow(df: pd.DataFrame, y, p, loss) -> str:
    if not BENCH_PY.exists():
        return "not run (no bench/.venv)"
    full = df.assign(y_true=y, y_pred=p, loss=loss)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "df.parquet")
        full.to_parquet(path)
        r = subprocess.run([str(BENCH_PY), "-c", _MLFLOW, path], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:120]
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_logging() -> None:
    import flightlog as fl
    from flightlog import _run

    rng = np.random.default_rng(0)
    y, p, loss = rng.integers(0, 2, N), rng.integers(0, 2, N), rng.random(N)
    os.environ["FLIGHTLOG_HOME"] = tempfile.mkdtemp(prefix="flightlog-bench-")
    fl.init(project="bench-predictions")
    print(f"fl.log_predictions, {N} rows: seconds (median)")
    print(f"{'features':<24} | {'call':>6} | {'on disk':>7} | {'naive':>6} | {'mlflow':>6} | naive/call | mlflow/on disk")
    for name, df in _cases(rng).items():
        call, disk = [], []
        for _ in range(5):
            _run.ACTIVE.rec.flush()
            t0 = time.perf_counter()
            fl.log_predictions(df, y, p, loss=loss)
            call.append(time.perf_counter() - t0)
            _run.ACTIVE.rec.flush()
            disk.append(time.perf_counter() - t0)
        cols, names = [df[c].tolist() for c in df.columns], list(df.columns)
        naive = []
        for _ in range(5):
            t0 = time.perf_counter()
            [json.dumps(dict(zip(names, r))) for r in zip(*cols)]
            naive.append(time.perf_counter() - t0)
        c, d, nv = statistics.median(call), statistics.median(disk), statistics.median(naive)
        ml = _mlflow(df, y, p, loss)
        mls = f"{ml['median']:6.3f}" if isinstance(ml, dict) else "     -"
        ratio = f"{ml['median'] / d:13.1f}x" if isinstance(ml, dict) else f"  {ml}"
        print(f"{name:<24} | {c:6.3f} | {d:7.3f} | {nv:6.3f} | {mls} | {nv / c:9.1f}x | {ratio}")
        if isinstance(ml, dict):
            version = ml["version"]
    fl.finish()
    if "version" in locals():
        print(f"(mlflow {version}: mlflow.log_table of the same DataFrame + y_true, y_pred, loss)")


def bench_slices(sizes: list[int]) -> None:
    import flightlog as fl
    from flightlog import _run

    print("\nflightlog slices (fresh process, default options), 10 features: seconds (median of 3)")
    rng = np.random.default_rng(1)
    for rows in sizes:
        store = tempfile.mkdtemp(prefix="flightlog-bench-")
        os.environ["FLIGHTLOG_HOME"] = store
        _run._ENDED_ONCE = False
        fl.init(project="bench-slices")
        feats = {**{f"s{i}": rng.choice(["a", "b", "c", "d", "e"], rows) for i in range(4)},
                 **{f"i{i}": rng.integers(0, 6, rows) for i in range(3)},
                 **{f"x{i}": rng.random(rows) for i in range(3)}}
        bad = (feats["s1"] == "b") & (feats["i2"] == 3)
        y = rng.integers(0, 2, rows)
        wrong = np.where(bad, rng.random(rows) < 0.6, rng.random(rows) < 0.1)
        fl.log_predictions(feats, y, np.where(wrong, 1 - y, y))
        fl.finish()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "flightlog.cli", "slices", "--format", "json"],
                                 capture_output=True, text=True, check=True).stdout
            ts.append(time.perf_counter() - t0)
        print(f"{rows:>9} rows | {statistics.median(ts):6.2f} s | top slice: {json.loads(out)[0]['slice']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the 1M-row slices run")
    args = ap.parse_args()
    os.environ["FLIGHTLOG_PROGRESS"] = "0"
    bench_logging()
    bench_slices([100_000] if args.quick else [100_000, 1_000_000])


if __name__ == "__main__":
    main()
