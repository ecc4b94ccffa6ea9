"""Record overhead: the digits CNN trained plain, with flightlog, and with FlorDB, side by side.

    .venv/bin/python bench/record_overhead.py [--runs 3] [--epochs 15] [--width 48] [--size 28] [--no-flor]

Each repetition runs the three variants as fresh processes in rotating order (bench/train_digits.py
for plain and flightlog; bench/_flordb.py's FlorDB copy, in a throwaway git repository with
bench/.venv, for FlorDB). Reports medians of wall and CPU time, the overhead ratios, checkpoint
bytes per run and the training-thread stall per checkpoint (copy time recorded in the
`checkpoints` table). Targets (issue 3): overhead <= 2% wall with a checkpoint every epoch; stall
< 5 ms per checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = os.path.join(ROOT, ".venv", "bin", "python")


def run_child(cmd: list[str], env: dict, cwd: str) -> dict:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{p.stderr[-2000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    out = json.loads(line)
    out["proc_wall_s"] = wall
    out["proc_cpu_s"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-flor", action="store_true")
    a = ap.parse_args()
    args = ["--epochs", str(a.epochs), "--width", str(a.width), "--size", str(a.size), "--threads", str(a.threads)]
    flor = None
    if not a.no_flor:
        try:
            sys.path.insert(0, HERE)
            import _flordb as flor  # noqa: F401
        except Exception as e:  # the FlorDB side is optional
            print(f"FlorDB side unavailable: {e}", file=sys.stderr)
            flor = None
    work = tempfile.mkdtemp(prefix="fl-record-bench-")
    results: dict[str, list[dict]] = {"plain": [], "flightlog": [], "flordb": []}
    ck_stats = []
    variants = ["plain", "flightlog"] + (["flordb"] if flor else [])
    try:
        for rep in range(a.runs):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                if v == "flordb":
                    import inspect

                    kw = dict(epochs=a.epochs, width=a.width, threads=a.threads)
                    if "size" in inspect.signature(flor.flor_record).parameters:
                        kw["size"] = a.size
                    r = flor.flor_record(**kw)
                    if r.get("ok", True) and "wall_s" in r:
                        results[v].append({"proc_wall_s": r["wall_s"], "proc_cpu_s": r.get("cpu_s"),
                                           "loop_s": r.get("loop_s"), "bytes": r.get("bytes")})
                        if r.get("repo"):
                            flor.cleanup(r["repo"])
                    else:
                        print(f"FlorDB run failed: {r.get('error')}", file=sys.stderr)
                    continue
                store = os.path.join(work, f"store-{v}-{rep}")
                env = dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0")
                r = run_child([PY, os.path.join(HERE, "train_digits.py"), "--mode", v, *args], env, work)
                results[v].append(r)
                if v == "flightlog":
                    import flightlog as fl

                    t = fl.query("SELECT count(*) AS n, sum(bytes)::DOUBLE AS bytes, median(copy_ms) AS med, "
                                 "max(copy_ms) AS mx, count(DISTINCT iteration) AS its FROM checkpoints",
                                 store=store).to_pylist()[0]
                    ck_stats.append(t)
                    shutil.rmtree(store, ignore_errors=True)
                print(f"rep {rep} {v:<9} wall {r['proc_wall_s']:.2f}s cpu {r['proc_cpu_s']:.2f}s "
                      f"loop {r.get('loop_s') or 0:.2f}s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(v, k):
        xs = [r[k] for r in results[v] if r.get(k) is not None]
        return statistics.median(xs) if xs else None

    base_w, base_c, base_l = med("plain", "proc_wall_s"), med("plain", "proc_cpu_s"), med("plain", "loop_s")
    print(f"\nrecord overhead — digits CNN (width {a.width}, {a.size}x{a.size}), {a.epochs} epochs, "
          f"torch threads {a.threads}, medians of {a.runs}")
    print(f"{'variant':<10} {'wall s':>8} {'cpu s':>8} {'loop s':>8} {'wall x':>8} {'cpu x':>8} {'loop x':>8}")
    for v in variants:
        w, c, lo = med(v, "proc_wall_s"), med(v, "proc_cpu_s"), med(v, "loop_s")
        if w is None:
            print(f"{v:<10} (no result)")
            continue
        fmt = lambda x, b: f"{x / b:8.3f}" if x is not None and b else "       -"  # noqa: E731
        print(f"{v:<10} {w:8.2f} {c or 0:8.2f} {lo or 0:8.2f} {fmt(w, base_w)} {fmt(c, base_c)} {fmt(lo, base_l)}")
    if ck_stats:
        n = statistics.median(s["n"] for s in ck_stats)
        b = statistics.median(float(s["bytes"] or 0) for s in ck_stats)
        print(f"\nflightlog checkpoints per run: {n:.0f} (epochs covered {ck_stats[0]['its']} incl. loop start), "
              f"{b / 1e6:.2f} MB per run; training-thread stall per checkpoint: median "
              f"{statistics.median(s['med'] for s in ck_stats):.2f} ms, max "
              f"{max(s['mx'] for s in ck_stats):.2f} ms")
    fb = med("flordb", "bytes")
    if fb:
        print(f"flordb bytes per run: {fb / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
