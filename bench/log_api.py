"""Cost of the logging calls on the training thread: fl.log scalar (the hot path), fl.log(dict), fl.log_histogram.

    .venv/bin/python bench/log_api.py [--repeat 7] [--n 200000]

Prints the median and min over ``--repeat`` rounds, in µs per call. The scalar path is also timed
against the pre-dict version of ``fl.log`` (its source from git, run in the same process and
interleaved round by round) when ``--baseline COMMIT`` is given, so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time


def rounds(fn, n: int, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(n)
        out.append((time.perf_counter() - t) / n * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--baseline", default=None, help="git commit whose sdk/_run.py fl.log to time side by side")
    a = ap.parse_args()
    os.environ.setdefault("FLIGHTLOG_HOME", tempfile.mkdtemp())
    import numpy as np

    import flightlog as fl
    from flightlog import _run

    fl.init(project="bench", system_metrics=False)
    log = fl.log
    old = None
    if a.baseline:
        src = subprocess.run(["git", "show", f"{a.baseline}:sdk/_run.py"], capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
        body = src[src.index("def log("):src.index("\ndef _log_slow(")]
        ns = dict(vars(_run))
        exec(body, ns)  # the old function, bound to the live module's globals
        old = ns["log"]

    def scalar(n, f=log):
        for _ in range(n):
            f("loss", 0.5)

    d = {"loss": 0.5, "acc": 0.9, "lr": 1e-3}

    def dict3(n):
        for _ in range(n):
            log(d)

    def three(n):
        for _ in range(n):
            log("loss", 0.5)
            log("acc", 0.9)
            log("lr", 1e-3)

    x = np.random.default_rng(0).normal(size=10_000)

    def hist(n):
        for _ in range(n):
            fl.log_histogram("w", x, bins=64)

    res = {}
    if old is not None:
        new_r, old_r = [], []
        for _ in range(a.repeat):  # interleaved: the same noise for both
            new_r += rounds(scalar, a.n, 1)
            old_r += rounds(lambda n: scalar(n, old), a.n, 1)
        res["fl.log(name, v)  this tree"] = new_r
        res[f"fl.log(name, v)  at {a.baseline[:10]}"] = old_r
    else:
        res["fl.log(name, v)"] = rounds(scalar, a.n, a.repeat)
    res["fl.log({3 names})"] = rounds(dict3, a.n // 10, a.repeat)
    res["3 x fl.log(name, v)"] = rounds(three, a.n // 10, a.repeat)
    res["fl.log_histogram(10k values, 64 bins)"] = rounds(hist, 200, a.repeat)
    fl.finish()
    for k, v in res.items():
        print(f"{k:<42} median {statistics.median(v):8.3f} µs/call   min {min(v):8.3f}")


if __name__ == "__main__":
    main()
