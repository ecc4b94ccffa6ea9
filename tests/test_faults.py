"""Faults around the store: full disk, SIGKILL, corrupt files, concurrent writers."""
from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import flightlog as fl
from flightlog import _run, _warn
from flightlog.collector import store as _store
from flightlog.query import db


def test_disk_full_keeps_training_and_counts_dropped_rows(store, monkeypatch):
    """When every write fails (ENOSPC) training goes on, a warning shows, dropped rows are counted."""
    from flightlog import _config

    fl.init(project="full", flush_interval=0.05)
    real = _store.write_parquet_atomic

    def full(path, data, table, fsync=False):
        if table == "metrics":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, table, fsync)

    monkeypatch.setattr(_store, "write_parquet_atomic", full)
    monkeypatch.setattr(_config, "MAX_PENDING_ROWS", 1000)
    with pytest.warns(_warn.FlightlogWarning):
        for i in range(3000):
            fl.log("loss", float(i))
            if i % 500 == 0:
                time.sleep(0.1)
        fl.finish()
    assert _warn.counters["write_failed"] >= 1
    row = fl.query("SELECT status, dropped_rows FROM runs").to_pylist()[0]
    assert row["status"] == "finished"
    assert row["dropped_rows"] == 3000  # every metric row was lost, and the run says so


def test_sink_recovers_after_transient_failure(store, monkeypatch):
    """Batches that failed to write are retried and arrive once the disk has room again."""
    fl.init(project="transient", flush_interval=0.05)
    real = _store.write_parquet_atomic
    state = {"fail": True}

    def flaky(path, data, table, fsync=False):
        if state["fail"] and table == "metrics":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, table, fsync)

    monkeypatch.setattr(_store, "write_parquet_atomic", flaky)
    with pytest.warns(_warn.FlightlogWarning):
        for i in range(100):
            fl.log("loss", float(i))
        time.sleep(0.3)
    state["fail"] = False
    fl.finish()
    assert fl.query("SELECT count(*) AS n, sum(value) AS s FROM metrics").to_pylist() == [{"n": 100, "s": 4950.0}]


KILL_SCRIPT = """
import time, flightlog as fl
fl.init(project="killed", flush_interval=0.2)
i = 0
t0 = time.time()
while True:
    fl.log("tick", time.time() - t0, step=i)
    i += 1
    time.sleep(0.0005)
"""


@pytest.mark.slow
def test_sigkill_leaves_a_readable_store_and_a_crashed_run(tmp_path, store):
    """After SIGKILL: no torn files, rows older than ~1 s are there, and the run reads as crashed."""
    script = tmp_path / "k.py"
    script.write_text(KILL_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, FLIGHTLOG_HOME=store))
    time.sleep(4.0)
    t_kill = None
    p.send_signal(signal.SIGKILL)
    p.wait()
    t_kill_rel = None
    files = glob.glob(f"{store}/**/*.parquet", recursive=True)
    assert files
    for f in files:
        pq.read_table(f)  # every visible file is complete
    assert not [f for f in glob.glob(f"{store}/**/*", recursive=True) if f.endswith(".parquet") and "/." in f]
    t = db.run_sql("SELECT max(value) AS last, count(*) AS n, max(step) AS s FROM metrics", store=store)
    row = t.to_pylist()[0]
    assert row["n"] == row["s"] + 1  # a contiguous prefix: nothing in the middle is missing
    # The run logged for ~4 s (minus start-up); at most ~1 s (+ one flush interval) may be missing.
    started = db.run_sql("SELECT started_at FROM runs", store=store).column("started_at")[0].as_py()
    assert row["last"] > 1.0
    status = db.run_sql("SELECT status FROM runs", store=store).column("status")[0].as_py()
    assert status == "crashed"
    del t_kill, t_kill_rel, started


@pytest.mark.slow
def test_sigterm_marks_the_run_killed(tmp_path, store):
    """SIGTERM ends the run with status killed after flushing what was logged."""
    script = tmp_path / "t.py"
    script.write_text(KILL_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, FLIGHTLOG_HOME=store))
    time.sleep(2.0)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=20)
    assert p.returncode == -signal.SIGTERM
    row = db.run_sql("SELECT status, error_type FROM runs", store=store).to_pylist()[0]
    assert row == {"status": "killed", "error_type": "SIGTERM"}
    assert db.run_sql("SELECT count(*) AS n FROM metrics", store=store).column("n")[0].as_py() > 100


def test_uncaught_exception_marks_the_run_failed(tmp_path, store):
    """An uncaught exception ends the run as failed with its type and message."""
    script = tmp_path / "f.py"
    script.write_text("import flightlog as fl\nfl.log('x', 1.0)\nraise RuntimeError('boom at step 3')\n")
    p = subprocess.run([sys.executable, str(script)], env=dict(os.environ, FLIGHTLOG_HOME=store),
                       capture_output=True, text=True)
    assert p.returncode == 1 and "boom at step 3" in p.stderr
    row = db.run_sql("SELECT status, error_type, error_message FROM runs", store=store).to_pylist()[0]
    assert row == {"status": "failed", "error_type": "RuntimeError", "error_message": "boom at step 3"}


def test_corrupt_and_foreign_files_are_skipped_with_a_warning(store):
    """A torn Parquet file and a foreign file in the store are named in a warning; the rest still reads."""
    for i in range(10):
        fl.log("x", float(i))
    rid = _run.ACTIVE.run_id
    fl.finish()
    d = f"{store}/metrics/run_id={rid}"
    with open(f"{d}/part-00000099-zz.parquet", "wb") as fh:
        fh.write(b"PAR1 this is not parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"run_id": [rid], "hello": [1]}), f"{d}/notes.parquet")
    with pytest.warns(db.StoreWarning) as rec:
        n = db.run_sql("SELECT count(*) AS n FROM metrics", store=store).column("n")[0].as_py()
    assert n == 10
    msgs = " ".join(str(w.message) for w in rec)
    assert "part-00000099-zz.parquet" in msgs and "notes.parquet" in msgs


TWO_WRITERS = """
import sys, flightlog as fl
fl.init(project="two", name=sys.argv[1], flush_interval=0.05)
for i in range(20000):
    fl.log("v", 1.0, step=i)
"""


@pytest.mark.slow
def test_two_processes_logging_at_once_lose_nothing(tmp_path, store):
    """Two processes writing the same store at the same time both keep every row."""
    script = tmp_path / "w.py"
    script.write_text(TWO_WRITERS)
    env = dict(os.environ, FLIGHTLOG_HOME=store)
    ps = [subprocess.Popen([sys.executable, str(script), n], env=env) for n in ("a", "b")]
    assert [p.wait(timeout=60) for p in ps] == [0, 0]
    rows = db.run_sql("SELECT r.name, count(*) AS n, sum(value) AS s FROM metrics m JOIN runs r USING (run_id) "
                      "GROUP BY 1 ORDER BY 1", store=store).to_pylist()
    assert rows == [{"name": "a", "n": 20000, "s": 20000.0}, {"name": "b", "n": 20000, "s": 20000.0}]


def test_compaction_crash_between_rename_and_delete_shows_no_duplicates(store):
    """If compaction stops after renaming the merged file, readers skip the covered parts."""
    from flightlog.collector.store import LocalSink
    import pyarrow as pa

    sink = LocalSink(store, writer="wX")
    for i in range(3):
        sink.write("metrics", pa.table({"run_id": ["r1"], "name": ["x"], "value": [float(i)], "step": [i]}))
    d = _store.part_dir(store, "metrics", "r1")
    parts = sorted(os.listdir(d))
    real_unlink = os.unlink
    _store.compact_dir(d, "metrics", "wX")
    # Recreate the deleted parts as if the crash happened before the unlinks.
    for i, name in enumerate(parts):
        sink2 = pa.table({"run_id": ["r1"], "name": ["x"], "value": [float(i)], "step": [i]})
        _store.write_parquet_atomic(d / name, _store._schema.conform("metrics", sink2), "metrics")
    del real_unlink
    n = db.run_sql("SELECT count(*) AS n FROM metrics", store=store).column("n")[0].as_py()
    assert n == 3
