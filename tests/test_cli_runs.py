"""`flightlog runs | compare | tag | note` and run references (id, prefix, latest, name) on a real store."""
from __future__ import annotations

import json

import pytest

import flightlog as fl
from flightlog import cli


def flcli(capsys, *args):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def _three_store(tmp_path_factory):
    """Three finished runs of one project, recorded once per module: lr and opt differ, seed is shared."""
    import os

    from flightlog import _run

    home = str(tmp_path_factory.mktemp("three") / "store")
    old = os.environ.get("FLIGHTLOG_HOME")
    os.environ["FLIGHTLOG_HOME"] = home
    ids = []
    try:
        for i, (lr, opt) in enumerate([(0.1, "sgd"), (0.01, "adam"), (0.001, "adam")]):
            r = fl.init(project="demo", name=f"r{i}", tags=["base", "best"] if i == 0 else ["base"],
                        notes="first" if i == 0 else None, params={"lr": lr, "opt": opt, "seed": 1},
                        system_metrics=False)
            ids.append(r.run_id)
            for s in range(10):
                fl.log({"loss": 1.0 / (s + 1) / (i + 1), "acc": s / 10})
            fl.log("val_acc", 0.5 + i / 10)
            fl.finish()
    finally:
        _run._ENDED_ONCE = False
        if old is None:
            os.environ.pop("FLIGHTLOG_HOME", None)
        else:
            os.environ["FLIGHTLOG_HOME"] = old
    return home, ids


@pytest.fixture
def three(_three_store, store):
    """A private copy of the three-run store at this test's store path; the run ids, oldest first."""
    import shutil

    shutil.copytree(_three_store[0], store)
    return _three_store[1]


def test_runs_shows_names_tags_differing_params_and_last_metrics(three, capsys):
    """The table has name, tags, only the differing params (lr, opt) and the main metrics' last values."""
    rc, out, _ = flcli(capsys, "runs")
    assert rc == 0
    lines = out.splitlines()
    head = lines[0].split()
    assert head[:6] == ["run", "name", "status", "started", "dur", "tags"]
    assert "lr" in head and "opt" in head and "seed" not in head
    assert "loss" in head and "acc" in head
    assert lines[2].startswith(three[2]) and " r2 " in lines[2] and "0.001" in lines[2]
    assert "base,best" in lines[4]
    assert all(len(line) <= 100 for line in lines)


def test_runs_filters_and_formats(three, capsys):
    """--tag, --status, --where over params, --metrics, --limit, --format json/csv all apply."""
    rc, out, _ = flcli(capsys, "runs", "--tag", "best", "--format", "json")
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["r0"] and rows[0]["tags"] == ["base", "best"]
    assert rows[0]["params"] == {"lr": 0.1, "opt": "sgd", "seed": 1}
    rc, out, _ = flcli(capsys, "runs", "--where", "lr < 0.05 AND opt = 'adam'", "--metrics", "val_acc",
                       "--format", "json")
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["r2", "r1"] and rows[0]["metrics"] == {"val_acc": 0.7}
    rc, out, _ = flcli(capsys, "runs", "--where", "p.lr >= 0.01", "--limit", "1", "--format", "csv")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and '"r1"' in lines[1] and "param:lr" in lines[0] and "last:loss" in lines[0]
    rc, out, _ = flcli(capsys, "runs", "--status", "failed")
    assert rc == 0 and "(no runs match)" in out
    rc, out, _ = flcli(capsys, "runs", "--project", "other", "--format", "json")
    assert json.loads(out) == []


@pytest.mark.parametrize("args, msg", [
    (["--where", "bogus > 1"], 'Referenced column "bogus" not found'),
    (["--where", "1=1; SELECT 1"], "syntax error"),
    (["--status", "done"], "unknown status done"),
    (["--metrics", "vall_acc"], "did you mean val_acc"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_runs_bad_inputs_are_one_line_errors(three, capsys, args, msg):
    """Bad filters give one `flightlog: error:` line and exit 2."""
    rc, out, err = flcli(capsys, "runs", *args)
    assert rc == 2 and msg in err and err.startswith("flightlog: error:") and len(err.strip().splitlines()) == 1


def test_runs_narrow_terminal_lists_what_it_left_out(three, capsys, monkeypatch):
    """In a narrow terminal the columns that do not fit are named below the table."""
    monkeypatch.setenv("COLUMNS", "70")
    rc, out, _ = flcli(capsys, "runs")
    assert "not shown (70 columns)" in out and all(len(x) <= 70 for x in out.splitlines()[:5])


@pytest.mark.slow
def test_compare_side_by_side(three, capsys):
    """compare: differing params first, last/min/max and the common step per metric, checkpoints, health."""
    rc, out, _ = flcli(capsys, "compare", "r0", "r1")
    assert rc == 0
    params = out.split("params (")[1].split("metrics (")[0].splitlines()
    assert params[3].startswith("* lr") and params[4].startswith("* opt") and params[5].startswith("  seed")
    assert "@step 9" in out and "B - A" in out and "verdict" in out
    rc, out, _ = flcli(capsys, "compare", three[0], "r1", "latest", "--format", "json", "--no-health")
    d = json.loads(out)
    assert [r["run_id"] for r in d["runs"]] == three
    loss = next(m for m in d["metrics"] if m["metric"] == "loss")
    assert loss["common_step"] == 9
    assert loss["runs"][three[1]]["last"] == pytest.approx(0.05) and loss["runs"][three[1]]["max"] == 0.5
    assert d["params"][0]["param"] == "lr" and d["params"][0]["differs"] and not d["params"][-1]["differs"]


def test_compare_bad_inputs(three, capsys):
    """compare refuses a single run, the same run twice and an unknown run."""
    assert flcli(capsys, "compare", "r0")[0] == 2
    rc, _, err = flcli(capsys, "compare", "r0", three[0])
    assert rc == 2 and "same run was given twice" in err
    rc, _, err = flcli(capsys, "compare", "r0", "nosuchrun")
    assert rc == 2 and "no run 'nosuchrun'" in err


def test_run_references_by_name_prefix_latest_and_ambiguous(three, capsys):
    """show accepts a run name; a name shared by two runs lists both candidates."""
    rc, out, _ = flcli(capsys, "show", "r1")
    assert rc == 0 and three[1] in out
    fl.init(project="demo", name="r1", system_metrics=False)
    fl.finish()
    rc, _, err = flcli(capsys, "show", "r1")
    assert rc == 2 and "ambiguous" in err and three[1] in err and "name 'r1'" in err
    rc, _, err = flcli(capsys, "show", "20")
    assert rc == 2 and "ambiguous" in err


def test_tag_and_note(three, capsys, store):
    """tag adds/removes tags, note sets/clears the note; runs --tag and show see them."""
    assert flcli(capsys, "tag", "r1", "good", "keep")[0] == 0
    rc, out, _ = flcli(capsys, "runs", "--tag", "good", "--tag", "keep", "--format", "json")
    assert [r["name"] for r in json.loads(out)] == ["r1"]
    assert flcli(capsys, "tag", "r1", "keep", "--remove")[0] == 0
    tags = fl.query("SELECT tags, notes FROM runs WHERE name = 'r1'", store=store).to_pylist()[0]
    assert json.loads(tags["tags"]) == ["base", "good"]
    rc, _, err = flcli(capsys, "tag", "r1", "nope", "--remove")
    assert rc == 2 and "has no tag 'nope'" in err
    assert flcli(capsys, "tag", "r1", "bad,tag")[0] == 2
    assert flcli(capsys, "note", "r0", "lr too high")[0] == 0
    assert fl.query("SELECT notes FROM runs WHERE name = 'r0'", store=store).to_pylist()[0]["notes"] == "lr too high"
    assert flcli(capsys, "note", "r0", "")[0] == 0
    assert fl.query("SELECT notes FROM runs WHERE name = 'r0'", store=store).to_pylist()[0]["notes"] is None
    # the run's status and times are unchanged by the extra row
    st = fl.query("SELECT status, count(*) OVER () AS n FROM runs WHERE name = 'r0'", store=store).to_pylist()
    assert st == [{"status": "finished", "n": 1}]


def test_tag_a_live_run_survives_its_heartbeat_rows(store, capsys):
    """A tag added while the run is still writing rows is kept when the run writes its later rows."""
    r = fl.init(project="demo", name="live", tags=["a"], system_metrics=False)
    fl.log("loss", 1.0)
    r.rec.flush()
    assert flcli(capsys, "tag", "live", "b")[0] == 0
    r.write_row_now()
    fl.finish()
    got = fl.query("SELECT tags, status FROM runs WHERE name = 'live'", store=store).to_pylist()[0]
    assert json.loads(got["tags"]) == ["a", "b"] and got["status"] == "finished"


def test_runs_and_compare_survive_hostile_rows(three, store, capsys):
    """Stored tags/params that are not what the SDK writes (bad JSON, wrong types) do not break runs or compare."""
    import datetime as dt

    import pyarrow as pa

    from flightlog.collector import store as st

    now = dt.datetime.now(dt.timezone.utc)
    st.LocalSink(store).write("runs", pa.table({
        "run_id": ["odd"], "project": ["demo"], "name": ["odd\nname"], "kind": ["train"], "status": ["finished"],
        "started_at": [now], "updated_at": [now], "params": ["[1, 2]"], "tags": ["not json"],
        "annotated_at": [now]}))
    rc, out, _ = flcli(capsys, "runs", "--tag", "base")
    assert rc == 0 and "odd" not in out and "(3 runs)" in out
    rc, out, _ = flcli(capsys, "runs", "--format", "json")
    odd = next(r for r in json.loads(out) if r["run_id"] == "odd")
    assert odd["tags"] == [] and odd["params"] == {}
    rc, out, _ = flcli(capsys, "compare", "odd", "r0", "--no-health")
    assert rc == 0 and "* lr" in out
