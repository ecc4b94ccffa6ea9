"""The Sink seam: plugged sinks (fl.init(sink=...)), failing sinks, per-run problem counters, remote steps with a token."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pyarrow as pa
import pytest

import flightlog as fl
from flightlog import _steps, _warn
from flightlog.collector.store import LocalSink
from flightlog.query import db

from conftest import run_script


class FlakySink:
    """A real LocalSink behind a switch: while ``failing``, every write raises like a full disk."""

    def __init__(self, root: str) -> None:
        self.inner = LocalSink(root)
        self.failing = True
        self.refused = 0

    @property
    def writer(self) -> str:
        return self.inner.writer

    @writer.setter
    def writer(self, value: str) -> None:
        self.inner.writer = value

    def write(self, table: str, data: pa.Table) -> None:
        if self.failing:
            self.refused += 1
            raise OSError(28, "No space left on device")
        self.inner.write(table, data)

    def heartbeat(self, run_id: str) -> None:
        self.inner.heartbeat(run_id)

    def compact(self, run_id: str) -> None:
        self.inner.compact(run_id)

    def close(self) -> None:
        self.inner.close()


def test_memory_sink_receives_every_table(store):
    """fl.init(sink=MemorySink()) sends metrics, the run row, step spans and io rows to it, then compacts and closes it."""
    sink = fl.MemorySink()
    r = fl.init(project="mem", sink=sink)

    @fl.step(name="double")
    def double(x):
        return 2 * x

    for i in range(5):
        fl.log("loss", float(i))
    assert double(21) == 42
    fl.finish()
    assert sink.table("metrics").column("value").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sink.table("spans").column("name").to_pylist() == ["double"]
    assert sorted(sink.table("io").column("direction").to_pylist()) == ["input", "output"]
    assert sink.table("runs").column("status").to_pylist()[-1] == "finished"
    assert sink.compacted == [r.run_id] and sink.closed
    assert not os.path.exists(os.path.join(store, "runs"))  # nothing went to the store


def test_failing_sink_warns_counts_and_recovers(store):
    """A sink whose writes fail: training goes on, one warning, write_failed counted, every row arrives after recovery."""
    sink = FlakySink(store)
    with pytest.warns(fl.FlightlogWarning, match="could not write"):
        fl.init(project="flaky", flush_interval=0.05, sink=sink)
        for i in range(100):
            fl.log("loss", float(i))
        deadline = time.monotonic() + 10
        while sink.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert sink.refused > 0 and _warn.counters["write_failed"] >= 1
    sink.failing = False
    fl.finish()
    got = db.run_sql("SELECT count(*) AS n, sum(value) AS s FROM metrics", store=store).to_pylist()
    assert got == [{"n": 100, "s": 4950.0}]
    counters = json.loads(db.run_sql("SELECT counters FROM runs", store=store).column("counters")[0].as_py())
    assert counters["write_failed"] >= 1  # the run's row says the record had trouble


def test_sink_without_the_interface_falls_back_to_the_store(store):
    """fl.init(sink=obj) with an object lacking Sink members warns (bad_sink) and records into the store."""
    with pytest.warns(fl.FlightlogWarning, match="lacks"):
        fl.init(project="bad", sink=object())
    fl.log("x", 1.0)
    fl.finish()
    assert _warn.counters["bad_sink"] == 1
    assert db.run_sql("SELECT count(*) AS n FROM metrics", store=store).to_pylist() == [{"n": 1}]


def test_second_run_does_not_report_the_first_runs_problems(store):
    """Problem counters belong to the run: a second run in the process starts at zero and lost_records passes for it."""
    first = fl.init(project="p")
    with pytest.warns(fl.FlightlogWarning):
        fl.log("loss", "not a number")
    fl.finish()
    second = fl.init(project="p")
    fl.log("loss", 1.0)
    fl.finish()
    rows = {r["run_id"]: json.loads(r["counters"])
            for r in db.run_sql("SELECT run_id, counters FROM runs", store=store).to_pylist()}
    assert rows[first.run_id] == {"bad_value": 1}
    assert rows[second.run_id] == {}
    params = {"lost_records.counters": "bad_value"}  # count this problem as a lost record
    assert fl.health(first.run_id, store=store, checks=["lost_records"], params=params)[0].status == "fail"
    assert fl.health(second.run_id, store=store, checks=["lost_records"], params=params)[0].status == "pass"


def test_lost_records_counts_rows_the_collector_refused(store):
    """Export failures the run counted (collector_rejected / _unconfirmed, step_record_failed) fail lost_records."""
    import datetime as dt

    from flightlog.collector import schema as sch

    t0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
    for rid, counters in (("r-ok", {"collector_auth": 3}), ("r-lost", {"collector_rejected": 2})):
        row = dict(run_id=rid, project="p", kind="train", status="finished", started_at=t0, updated_at=t0,
                   ended_at=t0, dropped_rows=0, counters=json.dumps(counters))
        LocalSink(store).write("runs", pa.Table.from_pylist([row], schema=sch.schema("runs")))
    assert fl.health("r-ok", store=store, checks=["lost_records"])[0].status == "pass"  # spooled, not lost
    res = fl.health("r-lost", store=store, checks=["lost_records"])[0]
    assert res.status == "fail" and res.evidence.column("location").to_pylist() == ["collector_rejected"]


# -- remote mode: @fl.step spans go through the collector sink, with the token ---------------------

STEP_SCRIPT = """
import numpy as np, flightlog as fl
from flightlog import _warn

@fl.step(name="normalize")
def normalize(x):
    return (x - x.mean()) / x.std()

for epoch in fl.loop("epoch", range(2)):
    out = normalize(np.arange(10.0) + epoch)
    fl.log("m", float(out.sum()))
fl.finish()
print("result", round(float(out.max()), 3), "auth_problems", _warn.counters.get("collector_auth", 0))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def secured_collector(tmp_path):
    """A real `flightlog serve --token` (uvicorn) on loopback; yields (url, token, its store)."""
    root, port, token = str(tmp_path / "collector_store"), _free_port(), "s3cret-token-14"
    p = subprocess.Popen([sys.executable, "-m", "flightlog.cli", "serve", "--store", root, "--port", str(port),
                          "--token", token], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "collector did not start"
            time.sleep(0.05)
        yield url, token, root
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        p.stderr.close()


def _spans(root: str) -> list[dict]:
    return db.run_sql("SELECT name, epoch FROM spans ORDER BY epoch", store=root).to_pylist()


@pytest.mark.slow
def test_remote_steps_with_a_token_reach_the_collector(secured_collector, tmp_path):
    """With --token and FLIGHTLOG_TOKEN, @fl.step spans and io rows arrive at the collector (they used to get 401)."""
    url, token, root = secured_collector
    res = run_script(STEP_SCRIPT, tmp_path, env={"FLIGHTLOG_COLLECTOR": url, "FLIGHTLOG_TOKEN": token})
    assert res.returncode == 0, res.stderr
    assert "auth_problems 0" in res.stdout and "FlightlogWarning" not in res.stderr
    assert _spans(root) == [{"name": "normalize", "epoch": 0}, {"name": "normalize", "epoch": 1}]
    assert db.run_sql("SELECT count(*) AS n FROM io", store=root).to_pylist() == [{"n": 4}]


@pytest.mark.slow
def test_remote_steps_with_a_wrong_token_warn_count_and_keep_the_rows(secured_collector, tmp_path):
    """A wrong token: the program runs unchanged, one warning, collector_auth counted, spans kept in the spool for sync."""
    url, token, root = secured_collector
    res = run_script(STEP_SCRIPT, tmp_path, env={"FLIGHTLOG_COLLECTOR": url, "FLIGHTLOG_TOKEN": "wrong"})
    assert res.returncode == 0, res.stderr
    assert "result 1.567" in res.stdout  # the user's program computed what it computes without flightlog
    assert res.stderr.count("refused the token") == 1
    assert "auth_problems 0" not in res.stdout
    assert not os.path.isdir(os.path.join(root, "spans"))  # nothing got in with the wrong token
    local = os.environ["FLIGHTLOG_HOME"]
    assert any(".spans." in f for f in os.listdir(os.path.join(local, "spool")))
    sync = subprocess.run([sys.executable, "-m", "flightlog.cli", "sync", "--collector", url, "--token", token],
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stderr
    assert _spans(root) == [{"name": "normalize", "epoch": 0}, {"name": "normalize", "epoch": 1}]


def test_steps_have_no_side_channel():
    """@fl.step builds no exporter of its own: spans reach the store or collector only through the run's sink."""
    assert not hasattr(_steps, "StoreSpanProcessor") and not hasattr(_steps, "_processor")
    assert set(fl.Sink.__annotations__) == {"writer"} and {"write", "heartbeat", "compact", "close"} <= set(vars(fl.Sink))
