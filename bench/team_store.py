"""The team setup measured: a store on S3 (moto's server on loopback) and replay on a local Ray cluster.

    .venv/bin/python bench/team_store.py [--runs 3] [--epochs 8] [--rows 10000000] [--skip record,query,ray]
                                         [--ray-size 16 28]

Three numbers (issue 18 targets), medians of ``--runs`` repetitions:

* record overhead: bench/train_digits.py plain, recorded into a local store and recorded into an
  ``s3://`` store, as fresh processes in rotating order; overhead = wall(recorded) - wall(plain);
  target: S3 overhead <= 1.5x the local overhead;
* ``fl.query`` over ``--rows`` metric rows stored on S3 (10 runs, one part each): a GROUP BY over
  every row and a one-run lookup, each including the connection (listing + validation); target
  < 3 s for the full scan;
* Ray replay: the recorded S3 run replayed with a new batch-level statement (--executor ray) with 1
  and 2 workers on a 2-CPU ``ray start --head``; target: 2 workers >= 1.6x faster than 1.

moto serves from memory in one Python process, so S3 numbers here are a pessimistic stand-in for
a real object store (latency of loopback, throughput of one Python server).
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
BUCKET = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc, what: str, limit: float = 180) -> None:
    deadline = time.time() + limit
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.2)


def start_moto():
    port = free_port()
    p = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, p, "moto")
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                      access_key="bench", secret_key="bench", allow_bucket_creation=True).create_dir(BUCKET)
    return p, env


def stop(p) -> None:
    p.terminate()
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


_cpu: list[float] = []  # CPU seconds (user + sys) of the last timed() child
_last: dict = {}  # the JSON line the last timed() child printed (train_digits.py: its own phase timings)


def timed(cmd, env, cwd) -> float:
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    _cpu[:] = [(r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)]
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{r.stderr[-3000:]}")
    _last.clear()
    try:
        _last.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError):
        pass
    return wall


def bench_record(base_env: dict, tmp: str, runs: int, epochs: int) -> dict:
    script = os.path.join(HERE, "train_digits.py")
    args = ["--epochs", str(epochs)]
    variants = {
        "plain": ([PY, script, "--mode", "plain", *args], {}),
        "local": ([PY, script, "--mode", "flightlog", *args], {"FLIGHTLOG_HOME": os.path.join(tmp, "local")}),
        "s3": ([PY, script, "--mode", "flightlog", *args], {"FLIGHTLOG_HOME": f"s3://{BUCKET}/record"}),
    }
    walls: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    finish: dict[str, list[float]] = {k: [] for k in variants}  # train_digits' own finish_s: fl.finish() alone
    phases: dict[str, dict[str, list[float]]] = {k: {"startup_s": [], "loop_s": []} for k in variants}
    order = list(variants)
    for i in range(runs):
        for k in order[i % 3:] + order[:i % 3]:
            cmd, extra = variants[k]
            walls[k].append(timed(cmd, dict(base_env, **extra), tmp))
            cpus[k].append(_cpu[0])
            if "finish_s" in _last:
                finish[k].append(_last["finish_s"])
            for ph in phases[k]:
                if ph in _last:
                    phases[k][ph].append(_last[ph])
    med = {k: statistics.median(v) for k, v in walls.items()}
    cmed = {k: statistics.median(v) for k, v in cpus.items()}
    over_local = med["local"] - med["plain"]
    over_s3 = med["s3"] - med["plain"]
    cover_local, cover_s3 = cmed["local"] - cmed["plain"], cmed["s3"] - cmed["plain"]
    # paired: each round runs the three back to back, so a slow stretch of the machine hits all three
    paired_local = statistics.median(b - a for a, b in zip(walls["plain"], walls["local"]))
    paired_s3 = statistics.median(b - a for a, b in zip(walls["plain"], walls["s3"]))
    # CPU time of the training process is far less sensitive to other load on a shared machine than wall time
    return {"paired_overhead_local_s": paired_local, "paired_overhead_s3_s": paired_s3,
            "paired_s3_over_local": paired_s3 / paired_local if paired_local > 0 else None,
            "phase_median_s": {k: {ph: statistics.median(v) for ph, v in d.items() if v} for k, d in phases.items()},
            "wall_s": walls, "median_s": med, "overhead_local_s": over_local, "overhead_s3_s": over_s3,
            "s3_over_local_overhead": over_s3 / over_local if over_local > 0 else None,
            "s3_over_local_wall": med["s3"] / med["local"],
            "finish_s": finish, "finish_median_s": {k: statistics.median(v) for k, v in finish.items() if v},
            "cpu_s": cpus, "cpu_median_s": cmed, "cpu_overhead_local_s": cover_local, "cpu_overhead_s3_s": cover_s3,
            "s3_over_local_cpu_overhead": cover_s3 / cover_local if cover_local > 0 else None}


def bench_query(base_env: dict, rows: int, runs: int) -> dict:
    os.environ.update(base_env)
    import numpy as np
    import pyarrow as pa

    import flightlog as fl
    from flightlog.collector import store

    root = f"s3://{BUCKET}/query"
    sink = store.LocalSink(root)
    per = rows // 10
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for r in range(10):
        sink.write("metrics", pa.table({
            "run_id": pa.array([f"run{r:02d}"] * per).dictionary_encode(),
            "name": pa.array(np.array(["loss", "acc", "lr", "grad"])[np.arange(per) % 4]).dictionary_encode(),
            "value": rng.standard_normal(per), "step": np.arange(per, dtype=np.int64)}))
    write_s = time.perf_counter() - t0
    full, one = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        t = fl.query("SELECT name, count(*) AS n, avg(value) AS mean, max(step) AS steps FROM metrics GROUP BY name",
                     store=root)
        full.append(time.perf_counter() - t0)
        assert sum(t.column("n").to_pylist()) == per * 10
        t0 = time.perf_counter()
        t = fl.query("SELECT count(*) AS n FROM metrics WHERE run_id = 'run03' AND name = 'loss'", store=root)
        one.append(time.perf_counter() - t0)
        assert t.column("n")[0].as_py() == per // 4
    return {"rows": per * 10, "write_s": write_s, "full_scan_s": full, "full_scan_median_s": statistics.median(full),
            "one_run_s": one, "one_run_median_s": statistics.median(one)}


def bench_ray(base_env: dict, tmp: str, runs: int, epochs: int, size: int = 16) -> dict:
    port = free_port()
    ray_bin = os.path.join(os.path.dirname(PY), "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = dict(base_env, FLIGHTLOG_HOME=f"s3://{BUCKET}/replay", FLIGHTLOG_PROGRESS="0",
               FLIGHTLOG_REPLAY_POOL_DIR=os.path.join(tmp, "pools"))
    try:
        wait_port(port, head, "ray head")
        src = os.path.join(HERE, "train_digits.py")
        # a batch-level statement: every batch of the replayed epochs runs again, so the segments' work
        # (not process start-up) is what two workers share
        train_args = ["--epochs", str(epochs), "--size", str(size)]
        timed([PY, src, "--mode", "flightlog", *train_args], env, tmp)
        mod = os.path.join(tmp, "train_digits_new.py")
        with open(src) as fh:
            s = fh.read()
        s = s.replace('            fl.log("loss", loss)\n', '            fl.log("loss", loss)\n'
                      '            fl.log("grad_norm", torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())))\n')
        with open(mod, "w") as fh:
            fh.write(s)
        out: dict[str, list[float]] = {"1": [], "2": []}
        # untimed: the first Ray task starts this node's warm pool (replay/pool.py), which every later task
        # forks its worker from; the timed rows compare 1 and 2 workers with the pool running
        timed([PY, "-m", "flightlog.cli", "replay", mod, "--run", "latest", "--workers", "1", "--epochs", "0",
               "--executor", "ray", "--address", f"127.0.0.1:{port}", "--no-verify", "--", *train_args], env, tmp)
        for i in range(runs):
            for w in (("1", "2") if i % 2 == 0 else ("2", "1")):
                cmd = [PY, "-m", "flightlog.cli", "replay", mod, "--run", "latest", "--workers", w,
                       "--executor", "ray", "--address", f"127.0.0.1:{port}", "--no-verify", "--", *train_args]
                out[w].append(timed(cmd, env, tmp))
        m1, m2 = statistics.median(out["1"]), statistics.median(out["2"])
        return {"wall_s": out, "median_1_s": m1, "median_2_s": m2, "speedup": m1 / m2}
    finally:
        subprocess.run([PY, "-m", "flightlog.cli", "replay", "--stop"], env=env, capture_output=True)
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--skip", default="", help="comma list of record,query,ray")
    ap.add_argument("--ray-size", type=int, nargs="+", default=[16, 28],
                    help="image sizes of the Ray rows: 16 = a short run (fixed costs weigh), 28 = bench/replay_speed's CNN")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    moto, env = start_moto()
    tmp = tempfile.mkdtemp(prefix="flightlog-team-bench-")
    base = dict(os.environ, **env, FLIGHTLOG_SYSTEM_METRICS="0", FLIGHTLOG_QUIET="1",
                XDG_CACHE_HOME=os.path.join(tmp, "cache"))
    res = {}
    try:
        if "record" not in skip:
            res["record"] = bench_record(base, tmp, a.runs, a.epochs)
            print(json.dumps({"record": res["record"]}), flush=True)
        if "query" not in skip:
            res["query"] = bench_query(base, a.rows, a.runs)
            print(json.dumps({"query": res["query"]}), flush=True)
        if "ray" not in skip:
            for size in a.ray_size:
                res[f"ray{size}"] = bench_ray(base, tmp, a.runs, a.epochs, size)
                print(json.dumps({f"ray{size}": res[f"ray{size}"]}), flush=True)
    finally:
        stop(moto)
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nsummary (medians):")
    if "record" in res:
        r = res["record"]
        print(f"  record: plain {r['median_s']['plain']:.2f}s  local {r['median_s']['local']:.2f}s  "
              f"s3 {r['median_s']['s3']:.2f}s  -> S3 overhead / local overhead = "
              f"{r['s3_over_local_overhead'] if r['s3_over_local_overhead'] is None else round(r['s3_over_local_overhead'], 2)}"
              f" (target <= 1.5); s3 / local wall {r['s3_over_local_wall']:.2f}")
        pr = r["paired_s3_over_local"]
        print(f"  paired (median over rounds of recorded - plain): local +{r['paired_overhead_local_s']:.2f}s  "
              f"s3 +{r['paired_overhead_s3_s']:.2f}s  -> ratio {pr if pr is None else round(pr, 2)}")
        ph = r["phase_median_s"]
        if all(ph.get(k) for k in ("plain", "local", "s3")):
            print("  phases (startup / loop): " + "  ".join(
                f"{k} {ph[k].get('startup_s', 0):.2f}/{ph[k].get('loop_s', 0):.2f}s" for k in ("plain", "local", "s3")))
        f = r["finish_median_s"]
        if "local" in f and "s3" in f:
            print(f"  fl.finish() alone (train_digits' finish_s): local {f['local']:.3f}s  s3 {f['s3']:.3f}s")
        c = r["cpu_median_s"]
        print(f"  record CPU: plain {c['plain']:.2f}s  local {c['local']:.2f}s  s3 {c['s3']:.2f}s  -> "
              f"S3 CPU overhead / local CPU overhead = {r['s3_over_local_cpu_overhead']}")
    if "query" in res:
        q = res["query"]
        print(f"  fl.query over {q['rows']:,} rows on S3: full scan {q['full_scan_median_s']:.2f}s (target < 3 s), "
              f"one run {q['one_run_median_s']:.2f}s")
    for key in [k for k in res if k.startswith("ray")]:
        y = res[key]
        print(f"  ray replay, batch level, {a.epochs} epochs of the digits CNN at {key[3:]}x{key[3:]}: 1 worker "
              f"{y['median_1_s']:.1f}s, 2 workers {y['median_2_s']:.1f}s -> {y['speedup']:.2f}x (target >= 1.6x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
