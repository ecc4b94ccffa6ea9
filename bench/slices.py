"""Benchmark: flightlog.query.slices.find vs sliceline.Slicefinder (PyPI sliceline 0.3.0).

Setup (once; sliceline must stay out of the project venv). Only ever *add*
packages to bench/.venv, other benchmarks share it:

    [ -d bench/.venv ] || python3 -m venv bench/.venv
    bench/.venv/bin/pip install sliceline==0.3.0 numpy pandas

Run from the repository root with the project venv:

    .venv/bin/python bench/slices.py                  # all sizes
    .venv/bin/python bench/slices.py --quick          # 10k and 100k rows only
    .venv/bin/python bench/slices.py --sizes 100kx10,1Mx30 --sliceline-sizes 10kx10,100kx10

Data: integer features with cardinality 3..20 (fixed seed), 0/1 errors with
rate 60% on the planted slice f3=2 AND f7=0 and 10% elsewhere. Both tools get
k=10, alpha=0.95, max_level=3, min_support=1% of rows; find() gets bins=20 so
every feature stays categorical, exactly as sliceline sees it.

Every measurement runs in a fresh child process so peak RSS (ru_maxrss,
including the generated input) is per size: flightlog reports the median
wall time of 3 runs; sliceline runs once in bench/.venv's python under a 300 s
timeout and a 16 GB RLIMIT_AS, recorded as TIMEOUT / OOM when hit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_PY = HERE / ".venv" / "bin" / "python"
K, ALPHA, MAX_LEVEL, SUPPORT = 10, 0.95, 3, 0.01
PLANTED = {3: 2, 7: 0}
SL_TIMEOUT_S = 300
SL_MEM_BYTES = 16 * 1024**3


def parse_size(spec: str) -> tuple[int, int]:
    rows, feats = spec.lower().split("x")
    mult = {"k": 1_000, "m": 1_000_000}.get(rows[-1], 1)
    return int(float(rows.rstrip("km")) * mult), int(feats)


def fmt_size(n: int, f: int) -> str:
    return (f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1_000}k") + f"x{f}"


def make_data(n: int, n_features: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    cards = rng.integers(3, 21, n_features)
    X = np.empty((n, n_features), dtype=np.int16)
    for j, c in enumerate(cards):
        X[:, j] = rng.integers(0, c, n, dtype=np.int16)
    mask = np.ones(n, dtype=bool)
    for f, v in PLANTED.items():
        mask &= X[:, f] == v
    errors = (rng.random(n) < np.where(mask, 0.6, 0.1)).astype(np.float64)
    return X, errors


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_flightlog(n: int, f: int, repeats: int) -> dict:
    from flightlog.query.slices import find

    X, e = make_data(n, f)
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = find(X, e, k=K, alpha=ALPHA, min_support=SUPPORT, max_level=MAX_LEVEL, bins=20)
        times.append(time.perf_counter() - t)
    target = " AND ".join(f"f{c} = {v}" for c, v in sorted(PLANTED.items()))
    texts = out.column("slice").to_pylist()
    return {
        "seconds": statistics.median(times),
        "peak_mb": peak_mb(),
        "rank": texts.index(target) + 1 if target in texts else None,
        "top": texts[:3],
    }


def child_sliceline(n: int, f: int) -> dict:
    resource.setrlimit(resource.RLIMIT_AS, (SL_MEM_BYTES, SL_MEM_BYTES))
    import numpy as np
    from sliceline.slicefinder import Slicefinder

    X, e = make_data(n, f)
    t = time.perf_counter()
    sf = Slicefinder(alpha=ALPHA, k=K, max_l=MAX_LEVEL, min_sup=SUPPORT, verbose=False)
    sf.fit(X, e)
    seconds = time.perf_counter() - t
    rank = None
    for i, row in enumerate(sf.top_slices_):
        preds = {j: v for j, v in enumerate(row) if v is not None and not (isinstance(v, float) and np.isnan(v))}
        if preds == PLANTED:
            rank = i + 1
            break
    return {"seconds": seconds, "peak_mb": peak_mb(), "rank": rank}


def run_child(python: str, args: list[str], timeout: float | None) -> dict:
    cmd = [python, str(Path(__file__).resolve()), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "TIMEOUT"}
    if proc.returncode != 0:
        err = proc.stderr
        oom = "MemoryError" in err or "Unable to allocate" in err or proc.returncode in (-9, 137)
        return {"status": "OOM" if oom else f"ERROR rc={proc.returncode}", "stderr": err[-2000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["status"] = "ok"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10kx10,10kx30,100kx10,100kx30,1Mx10,1Mx30,10Mx10,10Mx30")
    ap.add_argument("--quick", action="store_true", help="10k and 100k rows only")
    ap.add_argument("--sliceline-sizes", default=None, help="sizes to run sliceline on (default: all --sizes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        tool, n, f = args._child[0], int(args._child[1]), int(args._child[2])
        res = child_flightlog(n, f, args.repeats) if tool == "flightlog" else child_sliceline(n, f)
        print(json.dumps(res))
        return

    sizes = args.sizes.split(",")
    if args.quick:
        sizes = [s for s in sizes if parse_size(s)[0] <= 100_000]
    sl_sizes = set(sizes if args.sliceline_sizes is None else args.sliceline_sizes.split(","))
    have_sl = BENCH_PY.exists()

    header = (
        f"{'size':>8} | {'flightlog s':>11} | {'fl peak MB':>10} | {'sliceline s':>11} | "
        f"{'sl peak MB':>10} | {'ratio':>7} | {'planted (fl/sl)':>15}"
    )
    print(header)
    print("-" * len(header), flush=True)
    for spec in sizes:
        n, f = parse_size(spec)
        fl = run_child(sys.executable, ["--_child", "flightlog", str(n), str(f), "--repeats", str(args.repeats)], None)
        if spec in sl_sizes and have_sl:
            sl = run_child(str(BENCH_PY), ["--_child", "sliceline", str(n), str(f)], SL_TIMEOUT_S)
        else:
            sl = {"status": "not run" if have_sl else "no bench/.venv"}
        fl_s = f"{fl['seconds']:.3f}" if fl["status"] == "ok" else fl["status"]
        fl_m = f"{fl['peak_mb']:.0f}" if fl["status"] == "ok" else "-"
        sl_s = f"{sl['seconds']:.2f}" if sl["status"] == "ok" else sl["status"]
        sl_m = f"{sl['peak_mb']:.0f}" if sl["status"] == "ok" else "-"
        if fl["status"] == "ok" and sl["status"] == "ok":
            ratio = f"{sl['seconds'] / fl['seconds']:.0f}x"
        elif fl["status"] == "ok" and sl["status"] == "TIMEOUT":
            ratio = f">{SL_TIMEOUT_S / fl['seconds']:.0f}x"
        else:
            ratio = "-"

        def found(r):
            return "-" if r.get("status") != "ok" else (f"#{r['rank']}" if r["rank"] else "no")

        print(
            f"{fmt_size(n, f):>8} | {fl_s:>11} | {fl_m:>10} | {sl_s:>11} | {sl_m:>10} | {ratio:>7} | "
            f"{found(fl) + ' / ' + found(sl):>15}",
            flush=True,
        )
        for name, r in (("flightlog", fl), ("sliceline", sl)):
            if r.get("stderr"):
                print(f"    {name} stderr tail: {r['stderr'].strip().splitlines()[-1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
