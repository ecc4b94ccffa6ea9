"""How long `flightlog health` takes on a big store: 10M metric rows and 100k step calls.

The store is generated synthetically with LocalSink (kept between runs under
bench/results/health_store unless --fresh). Layout: the run checked ("latest")
holds all 10M metric rows (20 metrics x 500k steps over 100 epochs, as compacted
parts of 1M rows) and 50k step calls (spans + one input and one output io row
each, with real summary JSON); four earlier runs of the project hold the other
50k step calls (history for step_duration, references for drift/schema,
producers for stale_inputs).

Prints the median wall time of the whole built-in suite, in-process
(`fl.health`) and as the CLI (`flightlog health`, a fresh process: imports
included), plus each check's median time. Numbers, not assertions.

    .venv/bin/python bench/health_speed.py [--repeat 5] [--fresh]
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

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))
T0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
N_METRICS = 10_000_000
N_NAMES = 20
N_CALLS = 100_000
CHUNK = 1_000_000


def _summary(rng, shift):
    from flightlog._fingerprint import describe, summary_json
    import pandas as pd

    df = pd.DataFrame({"x": rng.normal(shift, 1, 200), "city": rng.choice(["a", "b", "c"], 200)})
    return summary_json(describe(df))


def generate(root: str) -> None:
    from flightlog.collector import schema as sch
    from flightlog.collector.store import LocalSink

    rng = np.random.default_rng(0)
    sink = LocalSink(root, writer="bench")
    runs = [f"run{k}" for k in range(5)]
    rows = [dict(run_id=r, project="bench", kind="train", status="finished", started_at=T0 + dt.timedelta(days=k),
                 updated_at=T0 + dt.timedelta(days=k), ended_at=T0 + dt.timedelta(days=k, hours=5))
            for k, r in enumerate(runs)]
    sink.write("runs", pa.Table.from_pylist(rows, schema=sch.RUNS))
    names = ["loss", "val_loss", "acc", "val_acc", "lr"] + [f"grad_norm/layer{i}.weight" for i in range(5)] + \
            [f"weight_norm/layer{i}.weight" for i in range(5)] + [f"update_ratio/layer{i}.weight" for i in range(5)]
    assert len(names) == N_NAMES
    steps_per_name = N_METRICS // N_NAMES
    batches = steps_per_name // 100
    for start in range(0, N_METRICS, CHUNK):
        idx = np.arange(start, start + CHUNK)
        name_i = idx // steps_per_name
        step = idx % steps_per_name
        value = 1.0 / (1 + step / 1000.0) + 0.01 * rng.standard_normal(CHUNK)
        t = pa.table({
            "run_id": pa.array(["run4"] * CHUNK),
            "name": pa.DictionaryArray.from_arrays(pa.array(name_i.astype(np.int32)), pa.array(names)).cast(pa.string()),
            "value": value, "step": step, "epoch": step // batches, "batch": step % batches,
            "wall_time": pa.array((T0.timestamp() * 1e6 + step * 1e4).astype(np.int64), sch.TS),
            "source": pa.array(["record"] * CHUNK),
        })
        sink.write("metrics", t)
    per_run = [12_500] * 4 + [50_000]
    for k, (rid, n) in enumerate(zip(runs, per_run)):
        base = (T0 + dt.timedelta(days=k)).timestamp() * 1e6
        starts = (base + np.arange(n) * 2e5).astype(np.int64)
        step_names = np.array(["load", "clean", "featurize", "train_step"])[np.arange(n) % 4]
        dur = rng.gamma(4.0, 2.5, n) * (1.0 if k < 4 else 1.05)
        status = np.where(rng.random(n) < 0.0005, "error", "ok")
        span_ids = np.char.add(f"{rid}-", np.arange(n).astype(str))
        sink.write("spans", pa.table({
            "run_id": pa.array([rid] * n), "trace_id": pa.array([rid] * n), "span_id": span_ids,
            "name": step_names, "start_time": pa.array(starts, sch.TS),
            "end_time": pa.array(starts + (dur * 1000).astype(np.int64), sch.TS), "duration_ms": dur,
            "status": status}))
        summaries = [_summary(rng, 0.0 if k < 4 else 0.3) for _ in range(8)]
        fp_in = np.char.add(f"{rid}-in-", (np.arange(n) // 4).astype(str))
        fp_out = np.char.add(f"{rid}-out-", np.arange(n).astype(str))
        io = {
            "run_id": pa.array([rid] * (2 * n)), "span_id": np.concatenate([span_ids, span_ids]),
            "step_name": np.concatenate([step_names, step_names]),
            "direction": np.array(["input"] * n + ["output"] * n),
            "arg": np.array(["df"] * n + ["return"] * n),
            "fingerprint": np.concatenate([fp_in, fp_out]),
            "type": pa.array(["pandas.DataFrame"] * (2 * n)),
            "summary": pa.array([summaries[i % 8] for i in range(2 * n)]),
            "time": pa.array(np.concatenate([starts, starts + 1000]), sch.TS),
        }
        sink.write("io", pa.table(io))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--fresh", action="store_true", help="regenerate the store")
    ap.add_argument("--store", default=os.path.join(HERE, "results", "health_store"))
    args = ap.parse_args()
    root = args.store
    marker = os.path.join(root, ".complete")
    if args.fresh and os.path.isdir(root):
        shutil.rmtree(root)
    if not os.path.exists(marker):
        t = time.perf_counter()
        os.makedirs(root, exist_ok=True)
        generate(root)
        open(marker, "w").close()
        print(f"generated store in {time.perf_counter() - t:.1f} s: {root}")
    from flightlog.query import db
    from flightlog.query.health import health

    con = db.connect(root)
    counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("metrics", "spans", "io")}
    con.close()
    print(f"store: {counts['metrics']:,} metric rows, {counts['spans']:,} step calls (spans), {counts['io']:,} io rows")

    health(store=root)  # warm the file-validation cache and the OS page cache once
    walls, per_check = [], {}
    for _ in range(args.repeat):
        t = time.perf_counter()
        rep = health(store=root)
        walls.append(time.perf_counter() - t)
        for r in rep:
            per_check.setdefault(r.name, []).append(r.seconds)
    cli = []
    for _ in range(max(1, args.repeat // 2)):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "flightlog.cli", "health", "--store", root],
                           capture_output=True, text=True)
        cli.append(time.perf_counter() - t)
    print(f"statuses: " + ", ".join(f"{r.name}={r.status}" for r in rep if r.status != "pass") + " (others pass)")
    print(f"fl.health, whole built-in suite ({len(rep)} checks): median {statistics.median(walls):.3f} s "
          f"over {len(walls)} runs (min {min(walls):.3f}, max {max(walls):.3f})")
    print(f"`flightlog health` CLI (new process, exit {p.returncode}): median {statistics.median(cli):.3f} s "
          f"over {len(cli)} runs")
    print("per check (median s): " + ", ".join(f"{k} {statistics.median(v):.3f}"
                                               for k, v in sorted(per_check.items(), key=lambda kv: -max(kv[1]))))
    print(json.dumps({"metric_rows": counts["metrics"], "step_calls": counts["spans"],
                      "health_median_s": round(statistics.median(walls), 3),
                      "cli_median_s": round(statistics.median(cli), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
