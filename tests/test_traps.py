"""The CLI traps a new user falls into: each is a one-line error with the fix, or a warning, not a surprise."""
from __future__ import annotations

import socket
import subprocess
import sys
import warnings

import pytest

import flightlog as fl
from flightlog import cli


def flcli(capsys, *args):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def one_run(store):
    """One finished run logging loss and acc."""
    fl.init(project="p", name="one", system_metrics=False)
    for i in range(3):
        fl.log({"loss": 1.0 / (i + 1), "acc": i / 3})
    fl.finish()
    return store


def test_replay_refuses_unknown_options_with_did_you_mean(one_run, capsys, tmp_path):
    """`replay --dryrun` is an error naming --dry-run, not an option passed to the script and a real replay."""
    script = tmp_path / "train.py"
    script.write_text("import flightlog as fl\n")
    rc, out, err = flcli(capsys, "replay", str(script), "--run", "one", "--dryrun")
    assert rc == 2 and "unknown option --dryrun" in err and "did you mean --dry-run?" in err
    assert "-- --dryrun" in err and len(err.strip().splitlines()) == 1
    assert fl.query("SELECT count(*) AS n FROM replays", store=one_run).to_pylist()[0]["n"] == 0


def test_replay_epochs_empty_or_reversed_is_an_error():
    """An empty or reversed --epochs range is an error, not a replay of nothing."""
    from flightlog._errors import ReplayError
    from flightlog.replay.planner import parse_epochs

    with pytest.raises(ReplayError, match="is empty"):
        parse_epochs("5:3", list(range(10)))
    with pytest.raises(ReplayError, match="is empty"):
        parse_epochs("4:4", list(range(10)))
    with pytest.raises(ReplayError, match="selects no epoch"):
        parse_epochs(" ", list(range(10)))
    assert parse_epochs("3:5", list(range(10))) == [3, 4] and parse_epochs("8:", list(range(10))) == [8, 9]


def test_duckdb_hints_stay_on_the_error_line(one_run, capsys):
    """`sql` errors keep DuckDB's 'Did you mean' and candidate bindings, on one line."""
    rc, _, err = flcli(capsys, "sql", "SELECT nme FROM runs")
    assert rc == 2 and 'Candidate bindings: "name"' in err and len(err.strip().splitlines()) == 1
    rc, _, err = flcli(capsys, "sql", "SELECT * FROM runz")
    assert rc == 2 and 'Did you mean "runs"' in err and len(err.strip().splitlines()) == 1


def test_sql_output_into_a_missing_folder(one_run, capsys, tmp_path):
    """--output into a folder that does not exist is one line with the mkdir that fixes it."""
    rc, _, err = flcli(capsys, "sql", "SELECT 1 AS x", "--output", str(tmp_path / "no" / "x.csv"), "--format", "csv")
    assert rc == 2 and "does not exist" in err and f"mkdir -p {tmp_path / 'no'}" in err
    rc, _, err = flcli(capsys, "sql", "SELECT 1 AS x", "--output", str(tmp_path))
    assert rc == 2 and "is a folder" in err


def test_serve_without_the_server_extra(tmp_path):
    """`flightlog serve` without fastapi/uvicorn says to pip install 'flightlog[server]', in one line."""
    code = ("import sys, importlib.abc\n"
            "class B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('fastapi', 'uvicorn'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, B())\n"
            "from flightlog import cli\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", code, "serve", "--store", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == (
        "flightlog: error: flightlog serve needs the server extra (uvicorn is not installed): "
        "pip install 'flightlog[server]'")


def test_dataframe_warns_about_unknown_names(one_run):
    """fl.dataframe('los') warns with the close match; known names give their columns."""
    with pytest.warns(UserWarning, match=r"no metric named 'los' \(did you mean 'loss'\?\)"):
        df = fl.dataframe("los", "acc", store=one_run)
    assert list(df["acc"]) == pytest.approx([0, 1 / 3, 2 / 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fl.dataframe("loss", store=one_run)  # no warning for a known name


def test_sync_takes_the_collector_url_from_the_spool(store, capsys, tmp_path):
    """`flightlog sync` with no URL uses the one the spool recorded, or says how to pass one."""
    from flightlog.collector import client

    spool = tmp_path / "store" / "spool"
    spool.mkdir(parents=True)
    (spool / "w1-1.metrics.arrows").write_bytes(b"")  # a spooled batch (unreadable: it stays)
    rc, _, err = flcli(capsys, "sync")
    assert rc == 2 and "pass --collector URL" in err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client._remember_url(spool, f"http://127.0.0.1:{port}")
    rc, out, err = flcli(capsys, "sync", "--timeout", "0.5")
    assert f"collector http://127.0.0.1:{port} (recorded in" in out
    assert rc == 1


@pytest.mark.slow
def test_replay_says_first_when_the_script_is_not_the_runs(store, tmp_path, capsys):
    """Replaying evaluate.py against a run of train.py names both scripts instead of printing a diff."""
    from conftest import run_script

    code = ("import flightlog as fl\n"
            "for e in fl.loop('epoch', range(2)):\n"
            "    fl.log('loss', 1.0 / (e + 1))\n")
    p = run_script(code, tmp_path)
    assert p.returncode == 0, p.stderr
    other = tmp_path / "evaluate.py"
    other.write_text(code.replace("range(2)", "range(5)") + "    fl.log('new', 1.0)\n")
    rc, _, err = flcli(capsys, "replay", str(other), "--run", "latest", "--dry-run")
    assert rc == 2 and err.startswith("flightlog: error: run ") and "recorded script.py, not evaluate.py" in err


def test_lineage_down_says_where_a_repeated_call_is_shown(store, capsys):
    """A call reached twice in a --down tree points to its full entry with 'above' or 'below', whichever is true."""
    import numpy as np

    @fl.step(name="make")
    def make(n):
        return np.arange(n, dtype=np.float64)

    @fl.step(name="scale")
    def scale(x):
        return x * 2

    @fl.step(name="join")
    def join(a, b):
        return a + b

    fl.init(project="t", system_metrics=False)
    x = make(5)
    join(scale(x), x)  # join uses make's output directly and through scale
    fl.finish()
    first = fl.query("SELECT span_id FROM spans WHERE name = 'make'", store=store).to_pylist()[0]["span_id"]
    assert cli.main(["lineage", first, "--down"]) == 0
    lines = capsys.readouterr().out.splitlines()
    full = [i for i, line in enumerate(lines) if "join  [span" in line]
    refs = [i for i, line in enumerate(lines) if "shown " in line]
    assert len(full) == 1 and refs
    for i in refs:
        assert ("shown below" in lines[i]) == (i < full[0]) and ("shown above" in lines[i]) == (i > full[0])


def test_a_spooling_sink_records_its_collector_url(tmp_path):
    """A batch spooled because the collector is down leaves the collector URL in the spool for `flightlog sync`."""
    import pyarrow as pa

    from flightlog.collector import client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    sink = client.CollectorSink(url, spool=tmp_path / "spool", timeout=0.5)
    sink.write("metrics", pa.table({"run_id": ["r"], "name": ["loss"], "value": [1.0], "step": [0]}))
    assert client.spool_files(tmp_path / "spool") and client.spooled_url(tmp_path / "spool") == url
    (tmp_path / "spool" / client.URL_FILE).write_text("file:///etc/passwd")
    assert client.spooled_url(tmp_path / "spool") is None  # only http(s) URLs are taken from a spool
