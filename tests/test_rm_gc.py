"""`flightlog rm` and `flightlog gc` on a real store: rows, blobs, replays, retention, leftovers, refusals."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import flightlog as fl
from flightlog import cli
from flightlog.collector import blobs as _blobs
from flightlog.collector import store as st


def flcli(capsys, *args):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def record(name: str, seed: int, epochs: int = 4) -> str:
    """A finished run with one checkpoint per epoch of a numpy state that differs per run."""
    r = fl.init(project="demo", name=name, system_metrics=False)
    w = np.random.default_rng(seed).normal(size=2000)
    with fl.checkpointing(weights=w, every=1):
        for e in fl.loop("epoch", range(epochs)):
            w += 0.1
            fl.log("loss", float(np.abs(w).mean()))
    fl.finish()
    return r.run_id


@pytest.fixture(scope="module")
def _two_store(tmp_path_factory):
    """Runs a and b (different weights, so different checkpoint blobs), recorded once per module."""
    from flightlog import _run

    home = str(tmp_path_factory.mktemp("two") / "store")
    old = os.environ.get("FLIGHTLOG_HOME")
    os.environ["FLIGHTLOG_HOME"] = home
    try:
        ids = [record("a", 1), record("b", 2)]
    finally:
        _run._ENDED_ONCE = False
        if old is None:
            os.environ.pop("FLIGHTLOG_HOME", None)
        else:
            os.environ["FLIGHTLOG_HOME"] = old
    return home, ids


@pytest.fixture
def two(_two_store, store):
    """A private copy of the two-run store at this test's store path (mtimes kept); [a, b] run ids."""
    import shutil

    shutil.copytree(_two_store[0], store)
    return _two_store[1]


def blobs(store) -> set[str]:
    """Names of the blob files in the store."""
    return {p.name for p in Path(store, "blobs").glob("*/*")}


def rows(store, table: str, run_id: str) -> int:
    """Rows of ``table`` the readers see for ``run_id``."""
    return fl.query(f"SELECT count(*) AS n FROM {table} WHERE run_id = ?", [run_id], store=store).to_pylist()[0]["n"]


def test_rm_removes_rows_and_only_unshared_blobs(two, store, capsys):
    """rm deletes the run from every table and the blobs only it used; the other run stays whole."""
    a, b = two
    ck_a = {r["content_hash"] for r in fl.query("SELECT content_hash FROM checkpoints WHERE run_id = ?", [a],
                                                store=store).to_pylist()}
    before = blobs(store)
    rc, out, _ = flcli(capsys, "rm", "a", "--yes")
    assert rc == 0 and f"removed run {a}" in out and "freed" in out
    assert all(rows(store, t, a) == 0 for t in ("runs", "metrics", "checkpoints"))
    assert rows(store, "metrics", b) == 4 and rows(store, "checkpoints", b) == 5
    after = blobs(store)
    assert ck_a <= before and not (ck_a & after)
    for h in fl.query("SELECT content_hash FROM checkpoints WHERE run_id = ?", [b], store=store).column(0).to_pylist():
        assert _blobs.read_blob(store, h)  # every blob b references is still there and intact
    freed = int(out.rsplit("(", 1)[1].split()[0])
    gone = sum(len(h) for h in ck_a)  # at least the removed checkpoints' blobs were counted
    assert freed > gone


def test_rm_dry_run_and_refusals(two, store, capsys):
    """--dry-run removes nothing; no --yes with stdin not a terminal, a live run and an unknown run are refused."""
    a = two[0]
    before = blobs(store)
    rc, out, _ = flcli(capsys, "rm", a, "--dry-run")
    assert rc == 0 and "would free" in out and blobs(store) == before and rows(store, "runs", a) == 1
    rc, _, err = flcli(capsys, "rm", a)  # pytest's stdin is not a terminal
    assert rc == 2 and "without --yes (stdin is not a terminal)" in err and rows(store, "runs", a) == 1
    rc, _, err = flcli(capsys, "rm", "nosuch", "--yes")
    assert rc == 2 and "no run 'nosuch'" in err
    live = fl.init(project="demo", name="live", system_metrics=False)
    fl.log("loss", 1.0)
    live.rec.flush()
    rc, _, err = flcli(capsys, "rm", "live", "--yes")
    assert rc == 2 and "still being written" in err and rows(store, "runs", live.run_id) == 1
    fl.finish()


@pytest.mark.slow
def test_rm_a_replay_by_its_id(two, store, capsys):
    """rm rp<id> removes one replay's rows (its replays row and the metrics it added), not the run."""
    a = two[0]
    rp = "rp0123abcd"
    st.LocalSink(store, writer=rp).write("replays", pa.table({
        "run_id": [a], "replay_id": [rp], "segment": ["0:4"], "status": ["failed"], "fidelity": ["failed"]}))
    st.LocalSink(store, writer=rp + "w0").write("metrics", pa.table({
        "run_id": [a], "name": ["grad_norm"], "value": [1.0], "step": [0], "source": ["replay"],
        "replay_id": [rp]}))
    assert rows(store, "replays", a) == 1 and rows(store, "metrics", a) == 5
    rc, out, _ = flcli(capsys, "rm", rp, "--yes")
    assert rc == 0 and f"removed replay {rp} of run {a}" in out
    assert rows(store, "replays", a) == 0 and rows(store, "metrics", a) == 4 and rows(store, "runs", a) == 1


@pytest.mark.slow
def test_gc_keep_last_prunes_checkpoints_and_says_what_replay_loses(two, store, capsys):
    """gc --keep-last 1 keeps each run's newest checkpoint, frees the others' blobs, and says what replay loses."""
    a = two[0]
    old = {r["iteration"]: r["content_hash"] for r in fl.query(
        "SELECT iteration, content_hash FROM checkpoints WHERE run_id = ?", [a], store=store).to_pylist()}
    rc, out, _ = flcli(capsys, "gc", "--keep-last", "1", "--dry-run")
    assert rc == 0 and "would remove 8 checkpoint(s) of 2 run(s)" in out and rows(store, "checkpoints", a) == 5
    assert "would remove 8 unreferenced blob(s)" in out
    rc, out, _ = flcli(capsys, "gc", "--keep-last", "1")
    assert rc == 0 and "re-executes from the run's start" in out and "epochs after 3" in out
    left = fl.query("SELECT iteration FROM checkpoints WHERE run_id = ?", [a], store=store).column(0).to_pylist()
    assert left == [3]
    assert _blobs.has_blob(store, old[3]) and not any(_blobs.has_blob(store, old[i]) for i in (-1, 0, 1, 2))
    assert "freed" in out and rows(store, "metrics", a) == 4
    rc, out, _ = flcli(capsys, "gc", "--older-than", "1")  # the run is minutes old: nothing pruned
    assert rc == 0 and "checkpoint(s)" not in out and rows(store, "checkpoints", a) == 1


def test_gc_removes_old_unreferenced_blobs_and_temp_files_only(two, store, capsys):
    """Unreferenced blobs and temp files older than the grace period go; fresh ones (a live writer's) stay."""
    past = time.time() - 2 * 86400
    orphan_old, _ = _blobs.put_blob(store, "a" * 32, b"old orphan")
    os.utime(orphan_old, (past, past))
    orphan_new, _ = _blobs.put_blob(store, "b" * 32, b"new orphan")
    tmp_old = Path(store, "metrics", ".part-x.parquet.1234.tmp")
    tmp_old.write_bytes(b"x" * 100)
    os.utime(tmp_old, (past, past))
    tmp_new = Path(store, "metrics", ".part-y.parquet.5678.tmp")
    tmp_new.write_bytes(b"y")
    scratch = Path(store, "scratch", "rpffffffff")
    scratch.mkdir(parents=True)
    (scratch / "f.txt").write_text("z")
    os.utime(scratch, (past, past))
    rc, out, _ = flcli(capsys, "gc")
    assert rc == 0
    assert not orphan_old.exists() and orphan_new.exists() and not tmp_old.exists() and tmp_new.exists()
    assert not scratch.exists()
    assert "removed 1 unreferenced blob(s)" in out and "removed 2 leftover" in out
    assert fl.query("SELECT count(*) AS n FROM checkpoints", store=store).to_pylist()[0]["n"] == 10


def test_gc_bad_inputs(two, store, capsys):
    """Negative retention values are one-line errors."""
    assert flcli(capsys, "gc", "--keep-last", "-1")[0] == 2
    assert flcli(capsys, "gc", "--older-than", "-2")[0] == 2


def test_compare_counts_checkpoints(two, store, capsys):
    """compare lists each run's checkpoints (count, MB, last iteration), in the table and in JSON."""
    rc, out, _ = flcli(capsys, "compare", "a", "b", "--no-health")
    assert rc == 0
    ck = out.split("\ncheckpoints\n")[1].splitlines()
    assert ck[2].split() == ["ok", "5", "5"] and ck[5].split() == ["last", "iteration", "3", "3"]
    rc, out, _ = flcli(capsys, "compare", "a", "b", "--no-health", "--format", "json")
    runs = json.loads(out)["runs"]
    assert [r["checkpoints"]["ok"] for r in runs] == [5, 5] and all(r["checkpoints"]["bytes"] > 16000 for r in runs)
