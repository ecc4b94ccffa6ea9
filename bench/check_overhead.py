"""Overhead of model assertions and training rules.

1. ``fl.check`` with three assertions (finite, range, a custom top-probability
   rule) on a batch of 1,024 outputs (10 class probabilities each, ~1% of items
   failing), recording into a live run, vs calling the same three Python
   functions directly. Median microseconds per batch.
2. ``fl.watch(model)`` at its default interval on a small CNN trained on
   sklearn's ``load_digits``: training time with and without the watch,
   alternating, same seed. Median seconds per run and overhead in percent.

Numbers, not assertions:

    .venv/bin/python bench/check_overhead.py [--repeat 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def bench_check(repeat: int, calls: int = 500) -> None:
    import flightlog as fl
    from flightlog import _assertions as A

    os.environ["FLIGHTLOG_HOME"] = tempfile.mkdtemp(prefix="fl-bench-")
    fl.init(project="bench")
    fl.assertion.clear()
    finite = fl.assertion.finite()
    rng_ = fl.assertion.range(0.0, 1.0)

    @fl.assertion
    def confident(inputs, outputs):
        return outputs.max(axis=1) > 0.15

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (1024, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[rng.choice(1024, 5, replace=False), 3] = np.nan
    ids = [f"item{i}" for i in range(1024)]
    fns = [finite, rng_, confident]

    def direct():
        for f in fns:
            A.severities(f(None, probs))  # the same functions, their results turned into severities

    def bare():
        for f in fns:
            f(None, probs)

    def checked():
        fl.check(probs, ids=ids)

    res = {}
    for name, fn in (("bare functions", bare), ("functions + severities", direct), ("fl.check", checked)):
        fn()
        per = []
        for _ in range(repeat):
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            per.append((time.perf_counter() - t) / calls * 1e6)
        res[name] = statistics.median(per)
    fl.finish()
    print(f"fl.check, 3 assertions, batch of 1,024 outputs x 10 ({calls} calls x {repeat} repeats, median):")
    for k, v in res.items():
        print(f"  {k:<24} {v:9.1f} us/batch")
    print(f"  fl.check overhead vs bare functions: {res['fl.check'] - res['bare functions']:.1f} us/batch "
          f"(ratio {res['fl.check'] / res['bare functions']:.2f}x)")


def _train(watch: bool, epochs: int, every: int | None) -> tuple[float, float]:
    import torch
    from sklearn.datasets import load_digits

    import flightlog as fl

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(512, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    fl.init(project="bench")
    w = (fl.watch(net) if every is None else fl.watch(net, every=every)) if watch else None
    t, c = time.perf_counter(), time.process_time()
    for epoch in fl.loop("epoch", range(epochs)):
        for i in fl.loop("batch", range(0, len(X), 32)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(X[i:i + 32]), y[i:i + 32])
            loss.backward()
            opt.step()
            fl.log("loss", loss)
    dt_, cpu = time.perf_counter() - t, time.process_time() - c
    if w is not None:
        w.remove()
    fl.finish()
    return dt_, cpu


def bench_watch(repeat: int, epochs: int, every: int | None) -> None:
    import torch

    torch.set_num_threads(1)
    from flightlog._watch import DEFAULT_WATCH_EVERY

    os.environ["FLIGHTLOG_HOME"] = tempfile.mkdtemp(prefix="fl-bench-")
    _train(False, 1, None)  # warm-up
    base, watched = [], []
    for _ in range(repeat):
        base.append(_train(False, epochs, None))
        watched.append(_train(True, epochs, every))
    steps = epochs * -(-1797 // 32)
    print(f"fl.watch(every={every or DEFAULT_WATCH_EVERY}) on a 4-layer CNN, load_digits, {epochs} epochs "
          f"= {steps} steps, batch 32, 1 torch thread ({repeat} alternating runs, median):")
    for k, label in ((0, "wall time"), (1, "CPU time (all threads of the process)")):
        b = statistics.median(x[k] for x in base)
        w = statistics.median(x[k] for x in watched)
        pair = statistics.median(100 * (y[k] - x[k]) / x[k] for x, y in zip(base, watched))
        print(f"  {label}: without {b:.3f} s, with {w:.3f} s, overhead {100 * (w - b) / b:+.2f} % "
              f"(median of paired differences {pair:+.2f} %)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--every", type=int, default=None, help="watch interval (default: fl.watch's default)")
    args = ap.parse_args()
    bench_check(args.repeat)
    bench_watch(args.repeat, args.epochs, args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
