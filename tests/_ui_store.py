"""A real store for the UI tests: two recorded runs (subprocesses, real snapshots and checkpoints),
a replayed series written through the store writer, hostile names, and a UI server on loopback."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time

import pyarrow as pa

HOSTILE = "<script>alert('x')</script>"

TRAIN = r'''
import sys
import numpy as np
import flightlog as fl
from sklearn.datasets import load_digits

fl.init(project="ui-test", name=sys.argv[2])
X, y = load_digits(return_X_y=True)
X = X / 16.0
y = (y == 3).astype(float)
lr = fl.arg("lr", float(sys.argv[1]))
fl.arg("note", "<script>alert('param')</script>")
state = {"w": np.zeros(64), "b": np.zeros(1)}
with fl.checkpointing(state=state, every=1):
    for epoch in fl.loop("epoch", range(3)):
        for i in fl.loop("batch", range(0, 1400, 100)):
            xb, yb = X[i:i + 100], y[i:i + 100]
            p = 1 / (1 + np.exp(-(xb @ state["w"] + state["b"])))
            loss = float(-np.mean(yb * np.log(p + 1e-9) + (1 - yb) * np.log(1 - p + 1e-9)))
            g = p - yb
            state["w"] -= lr * xb.T @ g / len(yb)
            state["b"] -= lr * g.mean()
            fl.log("train/loss", loss)
        acc = float((((X[1400:] @ state["w"] + state["b"]) > 0) == y[1400:]).mean())
        fl.log("val/acc", acc)
        fl.log("<script>alert('metric')</script>", acc)
'''


def record_runs(tmp, store: str) -> list[str]:
    """Record two real runs (lr 0.5 and 1.0, the second from edited code); return their ids, oldest first."""
    before = set(_run_ids(store))
    env = dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0")
    env.pop("FLIGHTLOG_COLLECTOR", None)
    for lr, name, extra in (("0.5", f"one {HOSTILE}", ""), ("1.0", "two", "\n# tuned learning rate\n")):
        script = tmp / "train.py"
        script.write_text(TRAIN + extra)
        p = subprocess.run([sys.executable, str(script), lr, name], capture_output=True, text=True,
                           timeout=120, env=env, cwd=str(tmp))
        assert p.returncode == 0, p.stderr
    return [r for r in _run_ids(store) if r not in before]


def _run_ids(store: str) -> list[str]:
    from flightlog.query import db

    if not os.path.isdir(store):
        return []
    con = db.connect(store)
    try:
        return [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY started_at").fetchall()]
    finally:
        con.close()


def add_replay(store: str, run_id: str) -> None:
    """Replayed values of a new metric (source='replay') and the replay's verdict, via the store writer."""
    from flightlog.collector import schema as S
    from flightlog.collector import store as st

    sink = st.LocalSink(store)
    now = dt.datetime.now(dt.timezone.utc)
    n = 42
    sink.write("metrics", pa.table({
        "run_id": [run_id] * n, "name": ["grad_norm"] * n, "value": [1.0 / (i + 1) for i in range(n)],
        "step": list(range(n)), "epoch": [i // 14 for i in range(n)], "batch": [i % 14 for i in range(n)],
        "wall_time": pa.array([now] * n, S.TS), "source": ["replay"] * n}))
    sink.write("replays", pa.table({
        "run_id": [run_id], "replay_id": ["rp-test-1"], "segment": ["0:3"], "status": ["ok"],
        "fidelity": ["exact"], "compared": pa.array([42], pa.int64()), "max_abs_diff": [0.0],
        "new_names": [json.dumps(["grad_norm"])],
        "started_at": pa.array([now], S.TS), "ended_at": pa.array([now], S.TS)}))


class UIServer:
    """The UI app (or the collector with /ui) on a free loopback port in a thread."""

    def __init__(self, app) -> None:
        import socket

        import uvicorn

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                                     access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise OSError("UI server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


PIPELINE = r'''
import numpy as np
import flightlog as fl

fl.init(project="ui-test", name="pipeline")


@fl.step
def load(n):
    return np.arange(n, dtype=float)


@fl.step
def scale(a, k):
    return a * k


@fl.step
def check(a):
    if a.max() > 10:
        raise ValueError("values too large: <script>alert('err')</script>")
    return a


b = scale(load(5), 3.0)
try:
    check(b)
except ValueError:
    pass
'''


def record_pipeline(tmp, store: str) -> str:
    """A real @fl.step pipeline run whose last step fails; returns its run id."""
    before = set(_run_ids(store))
    env = dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0")
    env.pop("FLIGHTLOG_COLLECTOR", None)
    script = tmp / "pipeline.py"
    script.write_text(PIPELINE)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                       cwd=str(tmp))
    assert p.returncode == 0, p.stderr
    return [r for r in _run_ids(store) if r not in before][0]
