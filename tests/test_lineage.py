"""Lineage across steps, runs and processes; the lineage/history commands; replay-step of failing calls."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import flightlog as fl
from flightlog import _steps
from flightlog.cli import main
from flightlog.query import db, lineage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "pipeline")


def cli(*args, input=None):
    """Run the flightlog CLI in a fresh interpreter; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "flightlog.cli", *args], capture_output=True, text=True,
                          input=input, timeout=120, env=dict(os.environ))


def _chain():
    @fl.step(name="make")
    def make(n):
        return np.arange(n, dtype=np.float64)

    @fl.step(name="scale")
    def scale(x, k):
        return x * k

    @fl.step(name="total")
    def total(x, flag=True):
        return float(x.sum())

    return make, scale, total


def test_lineage_edges_view_links_outputs_to_inputs():
    """An output fingerprint used as a later input is an edge; scalars and short strings never are."""
    make, scale, total = _chain()
    fl.init(project="t")
    total(scale(make(10), 2))
    total(np.arange(3.0), flag=True)  # same flag value (True) must not link the two total calls
    _steps.flush()
    edges = fl.query("select src_step, dst_step, dst_arg from lineage_edges order by produced_at").to_pylist()
    assert [(e["src_step"], e["dst_step"], e["dst_arg"]) for e in edges] == [("make", "scale", "x"),
                                                                          ("scale", "total", "x")]


def test_lineage_up_down_and_targets(store, capsys):
    """lineage walks up and down from a span, a fingerprint prefix or a data node; bad targets are errors."""
    make, scale, total = _chain()
    fl.init(project="t")
    total(scale(make(10), 2))
    fl.finish()
    con = db.connect(store)
    try:
        last = con.execute("select span_id from spans where name = 'total'").fetchall()[0][0]
        first = con.execute("select span_id from spans where name = 'make'").fetchall()[0][0]
        fp = con.execute("select fingerprint from io where step_name = 'scale' and direction = 'output'"
                         ).fetchall()[0][0]
        up = lineage.lineage(con, last[:8], "up")
        assert lineage.tree_depth(up) == 3
        down = lineage.lineage(con, first, "down")
        assert lineage.tree_depth(down) == 3
        short = lineage.lineage(con, last, "up", depth=1)
        assert lineage.tree_depth(short) == 2  # the call and one level of producers
        data = lineage.lineage(con, fp[:10], "down")
        assert data["kind"] == "data" and data["calls"][0]["step"] == "total"
        with pytest.raises(fl.FlightlogError, match="nothing matches"):
            lineage.lineage(con, "zzzz-not-there", "up")
        with pytest.raises(fl.FlightlogError, match="depth"):
            lineage.lineage(con, last, "up", depth=0)
    finally:
        con.close()
    assert main(["lineage", last, "--store", store]) == 0
    out = capsys.readouterr().out
    assert out.index("total") < out.index("scale") < out.index("make")
    assert main(["lineage", last, "--store", store, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == "total"
    assert main(["lineage", "ffff0000ffff", "--store", store]) == 2
    assert "flightlog: error:" in capsys.readouterr().err


def test_history_flags_old_and_superseded_inputs(store, capsys):
    """history lists calls newest first and flags inputs older than --stale and inputs with a newer version."""
    make, scale, total = _chain()
    fl.init(project="t")
    v1 = make(5)
    time.sleep(0.05)
    scale(v1, 2)  # uses v1
    make(6)  # a newer version of make's output now exists
    scale(make(7), 3)  # uses the newest one
    fl.finish()
    con = db.connect(store)
    try:
        rows = lineage.history(con, "scale", stale_days=0.0000001).to_pylist()
        fresh = lineage.history(con, "scale", stale_days=1).to_pylist()
        with pytest.raises(fl.FlightlogError, match="no calls of step"):
            lineage.history(con, "nope")
    finally:
        con.close()
    assert len(rows) == 2 and rows[0]["start_time"] > rows[1]["start_time"]
    newest, oldest = rows
    assert "newer x since" in oldest["stale"] and "d old" in oldest["stale"]
    assert "newer" not in (newest["stale"] or "")
    assert fresh[0]["stale"] is None and "newer x" in fresh[1]["stale"]
    assert "x=" in oldest["inputs"] and "k=" in oldest["inputs"]
    assert main(["history", "scale", "--store", store]) == 0
    assert "(2 rows)" in capsys.readouterr().out
    assert main(["history", "scale", "--store", store, "--stale", "-1"]) == 2


@pytest.mark.slow
def test_example_pipeline_lineage_crosses_processes(tmp_path, store):
    """The example's training step traces back through a file written by another process to the raw CSV."""
    data = tmp_path / "data"
    for script in ("prepare.py", "train.py"):
        p = subprocess.run([sys.executable, os.path.join(EXAMPLE, script), "--data", str(data)],
                           capture_output=True, text=True, timeout=180, env=dict(os.environ))
        assert p.returncode == 0, p.stderr
    con = db.connect(store)
    try:
        span = con.execute("select span_id from spans where name = 'train'").fetchall()[0][0]
        runs = con.execute("select count(distinct run_id) from spans").fetchall()[0][0]
    finally:
        con.close()
    assert runs == 2
    out = cli("lineage", span, "--store", store)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in ("train", "split", "featurize", "clean", "load", "wine.csv", "features.parquet"):
        assert name in text, text
    assert text.index("featurize") < text.index("clean") < text.index("load") < text.index("wine.csv")
    down = cli("lineage", str(data / "wine.csv"), "--down", "--store", store)
    assert down.returncode == 0 and "split" in down.stdout and "evaluate" in down.stdout


FAILING = '''
import sys
import flightlog as fl

@fl.step
def divide(table, key, *, by):
    return table[key] / by

@fl.step(capture="full")
def ok(x):
    return [v * 2 for v in x]

if __name__ == "__main__":
    fl.init(project="t")
    ok([1, 2, 3])
    try:
        divide({"a": 1.0}, "a", by=0)
    except ZeroDivisionError:
        pass
    print("done")
'''


@pytest.mark.slow
def test_replay_step_reproduces_and_detects_fix(tmp_path, store):
    """replay-step re-runs a failed call with its recorded inputs; a fixed function reports different behaviour."""
    script = tmp_path / "job.py"
    script.write_text(FAILING)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ), cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    con = db.connect(store)
    try:
        failed = con.execute("select span_id from spans where status = 'error'").fetchall()[0][0]
        good = con.execute("select span_id from spans where name = 'ok'").fetchall()[0][0]
    finally:
        con.close()
    r = cli("replay-step", failed, "--store", store)
    assert r.returncode == 0 and "same failure" in r.stdout and "ZeroDivisionError" in r.stdout, r.stdout + r.stderr
    r = cli("replay-step", good[:6], "--store", store)
    assert r.returncode == 0 and "same result" in r.stdout, r.stdout + r.stderr
    r = cli("replay-step", failed, "--pdb", "--store", store, input="p by\nq\n")
    assert "(Pdb)" in r.stdout and "0" in r.stdout
    script.write_text(FAILING.replace("return table[key] / by", "return table[key] / (by or 1)"))
    r = cli("replay-step", failed, "--store", store)
    assert r.returncode == 1 and "no longer fails" in r.stdout
    r = cli("replay-step", "abcdef123456", "--store", store)
    assert r.returncode == 2 and r.stderr.startswith("flightlog: error:")


def test_replay_step_without_captured_inputs(store):
    """A successful call under capture='fingerprint' cannot be replayed, and the error says why."""
    fl.init(project="t")

    @fl.step(name="plain")
    def plain(x):
        return x

    plain(np.ones(3))
    fl.finish()
    con = db.connect(store)
    span = con.execute("select span_id from spans").fetchall()[0][0]
    con.close()
    r = cli("replay-step", span, "--store", store)
    assert r.returncode == 2 and "capture='full'" in r.stderr
