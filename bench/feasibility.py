"""Benchmark: exact 1-NN error R1 (flightlog.query.feasibility) vs scikit-learn's 1-NN classifier.

Run from the repository root with the project venv:

    .venv/bin/python bench/feasibility.py                      # 100kx64 and 1Mx32
    .venv/bin/python bench/feasibility.py --sizes 100kx64 --repeats 5 --peer-repeats 3
    .venv/bin/python bench/feasibility.py --sizes 1Mx32 --test-rows 2000 --big-repeats 3

scikit-learn is the peer (``KNeighborsClassifier(n_neighbors=1)`` fit + predict,
default algorithm). It runs in bench/.venv when that has scikit-learn
(``bash bench/_peers_setup.sh``), otherwise in this interpreter (scikit-learn
is in the project's test extra, not its dependencies), and the output says which.

Data: a mixture of 10 Gaussian classes in d dimensions (fixed seed, float64),
split 80/20 as fl.feasibility does (``test_size=0.2``). flightlog computes R1
with the convergence curve (8 nested training subsets, one pass), exactly as
``estimate`` does for one transformation; sklearn computes R1 once. Both get
the same rows, so R1 must agree exactly (continuous data: no distance ties).

Every measurement runs in a fresh child process, so the peak RSS (ru_maxrss) is
per tool and size; it includes the generated input (n x d float64), which is
also printed separately. Wall times are medians of ``--repeats`` runs; CPU
seconds (all threads) are printed too, since on a shared machine they say more
about the work than wall time does.
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
CLASSES = 10


def parse_size(spec: str) -> tuple[int, int]:
    rows, feats = spec.lower().split("x")
    mult = {"k": 1_000, "m": 1_000_000}.get(rows[-1], 1)
    return int(float(rows.rstrip("km")) * mult), int(feats)


def make_data(n: int, d: int, seed: int = 0, test_rows: int | None = None):
    import numpy as np

    rng = np.random.default_rng(seed)
    # class centres about as far apart as the spread of within-class distances: R1 well inside (0, 0.9)
    centers = rng.standard_normal((CLASSES, d)) * (0.5 * (2.0 * d) ** 0.25 / d ** 0.5)
    y = rng.integers(0, CLASSES, n)
    X = centers[y]
    X += rng.standard_normal((n, d)) * 0.5
    n_test = test_rows or -(-n // 5)  # ceil(0.2 n), as estimate(test_size=0.2)
    perm = rng.permutation(n)
    return X, y, perm[n_test:], perm[:n_test]


def cpu_s() -> float:
    """CPU seconds (user + system, all threads) of this process: less sensitive to a busy machine than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(tool: str, n: int, d: int, repeats: int, test_rows: int | None = None) -> dict:
    X, y, tr, te = make_data(n, d, test_rows=test_rows)
    Xtr, Xte, ytr, yte = X[tr], X[te], y[tr], y[te]
    del X
    base = peak_mb()
    times, cpus, r1, extra = [], [], None, {}
    for _ in range(repeats):
        c0 = cpu_s()
        if tool == "flightlog":
            from flightlog.query.feasibility import _curve_sizes, nn_error

            t = time.perf_counter()
            curve = nn_error(Xtr, ytr, Xte, yte, checkpoints=_curve_sizes(len(tr)))
            times.append(time.perf_counter() - t)
            cpus.append(cpu_s() - c0)
            r1 = curve[len(tr)]
            extra["curve_points"] = len(curve)
        else:
            from sklearn.neighbors import KNeighborsClassifier

            t = time.perf_counter()
            clf = KNeighborsClassifier(n_neighbors=1).fit(Xtr, ytr)
            pred = clf.predict(Xte)
            times.append(time.perf_counter() - t)
            cpus.append(cpu_s() - c0)
            r1 = float((pred != yte).sum() / len(yte))
            import sklearn

            extra["algorithm"] = clf._fit_method
            extra["version"] = sklearn.__version__
    return {"tool": tool, "n": n, "d": d, "n_train": len(tr), "n_test": len(te), "times": times, "median_s": statistics.median(times), "r1": r1,
            "cpu_times": cpus, "median_cpu_s": statistics.median(cpus),
            "input_mb": (Xtr.nbytes + Xte.nbytes) / 1e6, "rss_after_input_mb": base, "peak_rss_mb": peak_mb(),
            **extra}


def run_child(py: str, tool: str, n: int, d: int, repeats: int, timeout: float,
              test_rows: int | None = None) -> dict:
    cmd = [py, str(Path(__file__).resolve()), "--child", tool, "--sizes", f"{n}x{d}", "--repeats", str(repeats)]
    if test_rows:
        cmd += ["--test-rows", str(test_rows)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"tool": tool, "n": n, "d": d, "error": f"TIMEOUT after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"tool": tool, "n": n, "d": d, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def peer_python() -> tuple[str, str]:
    if BENCH_PY.exists():
        ok = subprocess.run([str(BENCH_PY), "-c", "import sklearn"], capture_output=True).returncode == 0
        if ok:
            return str(BENCH_PY), "bench/.venv"
    return sys.executable, "project venv (bench/.venv has no scikit-learn)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100kx64,1Mx32")
    ap.add_argument("--repeats", type=int, default=5, help="flightlog runs per size (median quoted)")
    ap.add_argument("--peer-repeats", type=int, default=3, help="sklearn runs per size")
    ap.add_argument("--big-repeats", type=int, default=3, help="runs per tool for sizes of 1M rows or more")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--test-rows", type=int, default=None,
                    help="held-out rows instead of 20%% (the rest trains): the same memory profile for a "
                         "fraction of the time; the work is n_train x n_test distance pairs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        n, d = parse_size(a.sizes)
        print(json.dumps(child(a.child, n, d, a.repeats, a.test_rows)))
        return
    py, where = peer_python()
    print(f"# host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; sklearn from {where}")
    for spec in a.sizes.split(","):
        n, d = parse_size(spec)
        big = n >= 1_000_000
        ours = run_child(sys.executable, "flightlog", n, d, a.big_repeats if big else a.repeats, a.timeout,
                         a.test_rows)
        theirs = None if a.no_peer else run_child(py, "sklearn", n, d, a.big_repeats if big else a.peer_repeats,
                                                   a.timeout, a.test_rows)
        for r in (ours, theirs):
            if r is None:
                continue
            if "error" in r:
                print(f"{spec:>9}  {r['tool']:<9}  {r['error']}")
                continue
            print(f"{spec:>9}  {r['tool']:<9}  {r.get('n_train', '?')}x{r.get('n_test', '?')}  median {r['median_s']:8.2f} s  (runs: "
                  f"{', '.join(f'{t:.2f}' for t in r['times'])})  CPU {r.get('median_cpu_s', float('nan')):.2f} s"
                  f"  R1 {r['r1']:.6f}  peak RSS {r['peak_rss_mb']:7.0f} MB"
                  f"  (input {r['input_mb']:.0f} MB, RSS after input {r['rss_after_input_mb']:.0f} MB)"
                  + (f"  [{r.get('algorithm')}, sklearn {r.get('version')}]" if r["tool"] == "sklearn" else ""))
        if theirs and "error" not in theirs and "error" not in ours:
            same = "same R1" if ours["r1"] == theirs["r1"] else f"R1 DIFFERS ({ours['r1']} vs {theirs['r1']})"
            print(f"{spec:>9}  {same}; sklearn / flightlog time: {theirs['median_s'] / ours['median_s']:.2f}x"
                  + (f", CPU: {theirs['median_cpu_s'] / ours['median_cpu_s']:.2f}x"
                     if "median_cpu_s" in ours and "median_cpu_s" in theirs else ""))
        print(f"# load average now {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
