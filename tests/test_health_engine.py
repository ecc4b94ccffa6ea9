"""The health engine: check files, user folders, thresholds, sandbox, fl.health and the CLI."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pyarrow as pa
import pytest

import flightlog as fl
from flightlog._errors import FlightlogError, QueryError, RunNotFound
from flightlog.cli import main
from flightlog.collector import schema as sch
from flightlog.collector.store import LocalSink
from flightlog.query.health import BUILTIN_DIR, CheckResult, HealthReport, health, load_checks, parse_check

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)

BUILTINS = {"nonfinite", "divergence", "plateau", "overfitting", "failed_steps", "step_duration", "stale_inputs",
            "assertion_rate", "replay_divergence", "lost_records", "drift", "schema", "vanishing_gradients",
            "exploding_gradients", "loss_not_decreasing", "update_ratio", "dead_relu"}


def plant(store, table, rows):
    LocalSink(store).write(table, pa.Table.from_pylist(rows, schema=sch.schema(table)))


def make_run(store, rid="r1", losses=(2.0, 1.0, 0.5, 0.3, 0.2, 0.15), started=T0):
    plant(store, "runs", [dict(run_id=rid, project="p", kind="train", status="finished", started_at=started,
                               updated_at=started)])
    plant(store, "metrics", [dict(run_id=rid, name="loss", value=v, step=e, epoch=e) for e, v in enumerate(losses)])


BAD = (2.0, 1.0, 0.5, 0.3, 5.0, float("nan"))


def test_builtin_checks_parse_with_headers():
    """Every shipped check file has a name, a valid severity, a description and typed params."""
    checks = load_checks()
    assert BUILTINS <= set(checks)
    for c in checks.values():
        assert c.builtin and c.description and c.severity in ("error", "warn")
    assert checks["divergence"].params == {"factor": 3.0, "metrics": "loss", "min_points": 2}
    assert checks["drift"].post == "drift" and checks["schema"].post == "schema"


def test_health_report_shape_and_repr(store):
    """fl.health returns one result per check with ok, status, evidence and a readable repr."""
    make_run(store, losses=BAD)
    rep = fl.health(store=store)
    assert isinstance(rep, HealthReport) and not rep.ok and rep.run_id == "r1"
    assert {r.name for r in rep} >= BUILTINS
    assert isinstance(rep["nonfinite"], CheckResult) and rep["nonfinite"].status == "fail"
    assert rep["nonfinite"].evidence.num_rows == 1
    text = repr(rep)
    assert "ok=False" in text and "FAIL  nonfinite" in text and "divergence" in text
    assert "pass" not in repr(rep).split("\n", 1)[1].lower().split()  # only problems are listed
    assert rep.to_table().num_rows == len(rep)
    assert rep.failed("error") and set(r.name for r in rep.failed("warn")) >= set(r.name for r in rep.failed())


def test_clean_run_is_ok(store):
    """A healthy run passes every built-in check that has something to look at; the others say SKIP and why."""
    make_run(store)
    rep = health(store=store)
    assert rep.ok, rep
    assert all(r.status in ("pass", "skip") for r in rep), rep
    assert rep["nonfinite"].status == "pass" and rep["lost_records"].status == "pass"
    assert all(r.reason.startswith("nothing to look at: no ") for r in rep if r.status == "skip")
    assert rep["failed_steps"].status == "skip"  # the planted run has no @fl.step calls


def test_run_selection_latest_prefix_and_unknown(store):
    """--run accepts latest (default), an id prefix; an unknown run is RunNotFound."""
    make_run(store, "20240301-a", losses=BAD, started=T0)
    make_run(store, "20240302-b", started=T0 + dt.timedelta(days=1))
    assert health(store=store).ok
    assert not health("20240301", store=store).ok
    with pytest.raises(RunNotFound):
        health("nope", store=store)


def test_user_checks_dir_adds_and_overrides_checks(store, tmp_path):
    """A --checks-dir check runs with its own params; one with a built-in's name replaces it."""
    make_run(store)
    d = tmp_path / "mine"
    d.mkdir()
    (d / "too_few_metrics.sql").write_text(
        "-- name: too_few_metrics\n-- severity: warn\n-- description: fewer metric rows than expected\n"
        "-- param min_rows = 100 : rows expected\n"
        "SELECT count(*) AS n FROM metrics WHERE run_id = $run_id HAVING count(*) < $min_rows\n")
    (d / "nonfinite.sql").write_text("-- name: nonfinite\n-- severity: warn\nSELECT 1 AS always\n")
    rep = health(store=store, checks_dir=str(d))
    assert rep["too_few_metrics"].status == "warn" and rep["too_few_metrics"].evidence.to_pylist() == [{"n": 6}]
    assert rep["nonfinite"].status == "warn"
    rep = health(store=store, checks_dir=str(d), checks=["too_few_metrics"], params={"too_few_metrics.min_rows": "3"})
    assert [r.status for r in rep] == ["pass"]


def test_flightlog_checks_folder_in_cwd_is_picked_up(store, tmp_path, monkeypatch):
    """A flightlog_checks/ folder in the working directory is loaded without flags."""
    make_run(store)
    d = tmp_path / "proj" / "flightlog_checks"
    d.mkdir(parents=True)
    (d / "has_loss.sql").write_text("-- severity: error\nSELECT 'x' AS why WHERE false\n")
    monkeypatch.chdir(d.parent)
    rep = health(store=store, checks=["has_loss"])
    assert rep["has_loss"].status == "pass" and rep["has_loss"].severity == "error"


@pytest.mark.parametrize("text, why", [
    ("-- severity: fatal\nSELECT 1", "severity"),
    ("-- name: Bad-Name\nSELECT 1", "lower_snake_case"),
    ("-- name: x\n-- param oops\nSELECT 1", "param NAME = VALUE"),
    ("-- name: x\n-- param run_id = 3\nSELECT 1", "reserved"),
    ("-- name: x\n-- post: magic\nSELECT 1", "post-step"),
    ("-- name: x\n", "no SQL"),
])
def test_bad_check_files_are_rejected_with_a_reason(text, why):
    """A malformed check header is a QueryError that says what is wrong."""
    with pytest.raises(QueryError, match=why):
        parse_check(text, "x.sql")


def test_broken_or_writing_user_checks_error_without_stopping_others(store, tmp_path):
    """A user check with bad SQL, a write, a file read or an unknown $param errors; the others still run."""
    make_run(store, losses=BAD)
    d = tmp_path / "c"
    d.mkdir()
    (d / "syntax.sql").write_text("SELEC nonsense")
    (d / "writer.sql").write_text("CREATE TABLE t AS SELECT 1")
    (d / "reader.sql").write_text("SELECT * FROM read_csv('/etc/passwd')")
    (d / "param.sql").write_text("SELECT 1 WHERE $nope = 1")
    rep = health(store=store, checks_dir=d)
    for name in ("syntax", "writer", "reader", "param"):
        assert rep[name].status == "error" and rep[name].error, name
    assert "read-only" in rep["writer"].error and "$nope" in rep["param"].error
    assert rep["nonfinite"].status == "fail" and not rep.ok


def test_threshold_overrides_are_validated(store):
    """--set needs a known check and param and a value of the default's type."""
    make_run(store)
    for bad, why in (({"nope.x": 1}, "CHECK.PARAM"), ({"divergence": 1}, "CHECK.PARAM"),
                     ({"divergence.nope": 1}, "no param 'nope'"), ({"divergence.factor": "abc"}, "not a float")):
        with pytest.raises(QueryError, match=why):
            health(store=store, params=bad)
    with pytest.raises(QueryError, match="unknown check"):
        health(store=store, checks=["nope"])
    with pytest.raises(QueryError, match="does not exist"):
        health(store=store, checks_dir="/nonexistent/dir")


def test_user_values_are_bound_not_formatted(store):
    """A threshold value with SQL in it is a bound parameter, not injected text."""
    make_run(store)
    rep = health(store=store, checks=["divergence"], params={"divergence.metrics": "zz' OR '1'='1"})
    # bound: no metric is named like that text, so the check has nothing to look at
    assert rep[0].status == "skip" and rep[0].error is None and "zz' OR '1'='1" in rep[0].reason


def test_resumed_run_includes_its_parent_metrics(store):
    """Metric checks read a resumed run together with the run it resumed from."""
    plant(store, "runs", [dict(run_id="a", project="p", kind="train", status="killed", started_at=T0, updated_at=T0),
                          dict(run_id="b", project="p", kind="resume", parent_run_id="a", status="finished",
                               started_at=T0 + dt.timedelta(hours=1), updated_at=T0)])
    plant(store, "metrics", [dict(run_id="a", name="loss", value=float("nan"), step=0, epoch=0)])
    plant(store, "metrics", [dict(run_id="b", name="loss", value=0.5, step=1, epoch=1)])
    assert health("b", store=store, checks=["nonfinite"])[0].status == "fail"


def test_empty_store_and_missing_store_are_errors(tmp_path):
    """health on a store without runs or without a directory raises a FlightlogError."""
    with pytest.raises(FlightlogError):
        health(store=str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFound):
        health(store=str(tmp_path / "empty"))


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_exit_codes_follow_fail_on(store, capsys):
    """Exit 1 when a check fails; warnings fail only with --fail-on warn; a clean run exits 0."""
    make_run(store, losses=(2.0, 1.0, 0.5) + (0.5,) * 7)  # plateau: a warning only
    assert main(["health", "--store", store]) == 0
    assert main(["health", "--store", store, "--fail-on", "warn"]) == 1
    out = capsys.readouterr().out
    assert "WARN   plateau" in out and "best_epoch" in out and "0 failed" in out
    make_run(store, "r2", losses=BAD, started=T0 + dt.timedelta(days=1))
    assert main(["health", "--store", store]) == 1
    out = capsys.readouterr().out
    assert "FAIL   nonfinite" in out and "health of run r2" in out


def test_cli_json_check_selection_and_set(store, capsys):
    """--format json is machine readable; --check selects checks; --set changes a threshold."""
    make_run(store, losses=BAD)
    rc = main(["health", "--store", store, "--format", "json", "--check", "nonfinite", "divergence",
               "--set", "divergence.factor=100"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["ok"] is False and data["run_id"] == "r1"
    assert [c["name"] for c in data["checks"]] == ["nonfinite", "divergence"]
    assert data["checks"][0]["evidence"][0]["metric"] == "loss"
    assert data["checks"][1]["status"] == "pass" and data["checks"][1]["params"]["factor"] == 100.0


def test_cli_errors_are_one_line_exit_2(store, capsys):
    """Bad input (unknown run, bad --set, missing store) prints one error line and exits 2."""
    make_run(store)
    assert main(["health", "--store", store, "--run", "zzz"]) == 2
    assert main(["health", "--store", store, "--set", "divergence.factor=abc"]) == 2
    assert main(["health", "--store", store + "-missing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("flightlog: error: ") for line in err)
    with pytest.raises(SystemExit):
        main(["health", "--store", store, "--set", "novalue"])


def test_cli_list_shows_checks_and_params(capsys):
    """--list prints every check with its --set lines."""
    assert main(["health", "--list"]) == 0
    out = capsys.readouterr().out
    assert "--set divergence.factor=3.0" in out and "stale_inputs" in out


@pytest.mark.slow
def test_cli_subprocess_gates_ci(store):
    """The installed `flightlog health` command exits non-zero on a failing run (the CI gate)."""
    make_run(store, losses=BAD)
    p = subprocess.run([sys.executable, "-m", "flightlog.cli", "health", "--store", store, "--check", "nonfinite"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "FAIL" in p.stdout


def test_builtin_dir_ships_only_sql():
    """The checks folder holds only .sql files (package data)."""
    assert all(p.suffix == ".sql" for p in BUILTIN_DIR.iterdir())
