"""The foundation's CLI: runs, show, sql, compact — output formats, errors and the SQL sandbox."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import flightlog as fl


def cli(*args, store=None, check=False):
    env = dict(os.environ)
    if store:
        env["FLIGHTLOG_HOME"] = store
    p = subprocess.run([sys.executable, "-m", "flightlog.cli", *args], capture_output=True, text=True, env=env,
                       timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture
def two_runs(store):
    fl.init(project="demo", name="first", params={"lr": 0.1})
    for i in range(5):
        fl.log("loss", 1.0 / (i + 1))
    fl.finish()
    fl.init(project="demo", name="second")
    fl.log("loss", 0.5)
    fl.finish()
    return store


@pytest.mark.slow
def test_runs_lists_newest_first(two_runs):
    """`flightlog runs` lists runs newest first with their status."""
    out = cli("runs", store=two_runs, check=True).stdout
    lines = out.splitlines()
    assert "second" in lines[2] and "first" in lines[3] and "finished" in lines[2]


@pytest.mark.slow
def test_show_latest_and_prefix(two_runs):
    """`flightlog show` accepts latest and unique prefixes and prints params and metric summary."""
    first = fl.query("SELECT run_id FROM runs WHERE name = 'first'", store=two_runs).column("run_id")[0].as_py()
    out = cli("show", first[:-2], store=two_runs, check=True).stdout
    assert first in out and "lr=0.1" in out and "loss" in out
    j = json.loads(cli("show", "latest", "--format", "json", store=two_runs, check=True).stdout)
    assert j["run"]["name"] == "second" and j["metrics"][0]["n"] == 1


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_sql_formats(two_runs, fmt):
    """`flightlog sql` prints tables, CSV and JSON."""
    out = cli("sql", "SELECT name, count(*) AS n FROM metrics GROUP BY 1", "--format", fmt, store=two_runs,
              check=True).stdout
    if fmt == "json":
        assert json.loads(out) == [{"name": "loss", "n": 6}]
    elif fmt == "csv":
        assert out.splitlines()[1] == '"loss",6'
    else:
        assert "loss" in out and "6" in out


def test_sql_parquet_output(two_runs, tmp_path):
    """--format parquet --output FILE writes a Parquet file."""
    path = tmp_path / "out.parquet"
    cli("sql", "SELECT * FROM metrics", "--format", "parquet", "--output", str(path), store=two_runs, check=True)
    assert pq.read_table(path).num_rows == 6


@pytest.mark.parametrize("sql,msg", [
    ("SELECT * FROM read_csv('/etc/passwd')", "refused"),
    ("COPY metrics TO '/tmp/stolen.csv'", "COPY statements are refused"),
    ("ATTACH '/tmp/x.db' AS x", "refused"),
    ("INSTALL httpfs", "refused"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statements are refused"),
    ("SET enable_external_access = true", "refused"),
    ("SELECT * FROM read_parquet('/etc/*.parquet')", "refused"),
    ("SELEC 1", "SQL error"),
    ("SELECT * FROM no_such_table", "SQL error"),
])
def test_sql_is_read_only_and_sandboxed(two_runs, sql, msg):
    """Writes, file access outside the store and bad SQL get one clear line and exit code 2."""
    p = cli("sql", sql, store=two_runs)
    assert p.returncode == 2
    assert p.stderr.startswith("flightlog: error:") and msg in p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists("/tmp/stolen.csv")


@pytest.mark.slow
def test_errors_for_unknown_run_and_empty_store(two_runs, tmp_path):
    """Unknown runs, a missing store and an empty store are one-line errors with exit code 2."""
    p = cli("show", "nope", store=two_runs)
    assert p.returncode == 2 and "no run 'nope'" in p.stderr
    p = cli("runs", store=str(tmp_path / "missing"))
    assert p.returncode == 2 and "no flightlog store" in p.stderr
    (tmp_path / "empty").mkdir()
    p = cli("runs", store=str(tmp_path / "empty"))
    assert p.returncode == 2 and "holds no runs" in p.stderr
    p = cli("frobnicate")
    assert p.returncode == 2 and "unknown command" in p.stderr


@pytest.mark.slow
def test_compact_merges_parts_of_crashed_runs(tmp_path, store):
    """`flightlog compact` merges the parts a killed run left behind, without changing the data."""
    import signal

    script = tmp_path / "k.py"
    script.write_text("import time, flightlog as fl\nfl.init(flush_interval=0.05)\n"
                      "for i in range(10**9):\n    fl.log('x', 1.0)\n    time.sleep(0.001)\n")
    p = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, FLIGHTLOG_HOME=store))
    import glob
    import time

    # kill once it has flushed several parts (a fixed sleep was too short on a busy machine)
    deadline = time.monotonic() + 120
    try:
        while len(glob.glob(f"{store}/metrics/*/*.parquet")) < 3:
            assert p.poll() is None and time.monotonic() < deadline, "the script wrote no parts"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    before = fl.query("SELECT count(*) AS n FROM metrics", store=store).column("n")[0].as_py()
    out = cli("compact", store=store, check=True).stdout
    assert "compacted" in out
    after = fl.query("SELECT count(*) AS n FROM metrics", store=store).column("n")[0].as_py()
    assert before == after > 0
    assert len(glob.glob(f"{store}/metrics/*/*.parquet")) == 1


def test_unreachable_object_store_is_a_one_line_error(monkeypatch, capsys):
    """An object store that cannot be reached (no network to resolve the bucket's region, a refused
    endpoint) is a one-line `flightlog: error:` with exit 2, not a traceback."""
    from flightlog import cli as fl_cli
    from flightlog.collector import fs as _fs

    def unreachable(d):
        raise OSError("When resolving region for bucket 'b': AWS Error NETWORK_CONNECTION\nCould not resolve host")

    monkeypatch.setattr(_fs, "isdir", unreachable)
    rc = fl_cli.main(["runs", "--store", "s3://b/prefix"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("flightlog: error: cannot reach the store s3://b/prefix") and "\n" not in err
