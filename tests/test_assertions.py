"""Model assertions: fl.assertion, fl.check recording and modes, built-ins, and the assertions report."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import flightlog as fl
from flightlog import _assertions as A
from flightlog._errors import FlightlogError
from flightlog._warn import FlightlogWarning
from flightlog.cli import main
from flightlog.query.assertions import report, select_items
from flightlog.query.health import health


@pytest.fixture(autouse=True)
def _clean_registry():
    """Each test starts with no registered assertions."""
    fl.assertion.clear()
    yield
    fl.assertion.clear()


def rows(sql="SELECT * FROM assertions ORDER BY time, item_id NULLS FIRST"):
    return fl.query(sql).to_pylist()


def test_check_records_summary_and_failure_rows_with_loop_context(store):
    """fl.check writes a summary row per assertion and a row per failing item with ids and loop position."""
    fl.init(project="p")

    @fl.assertion
    def positive(inputs, outputs):
        return np.maximum(-np.asarray(outputs), 0.0)  # severity: how negative

    for epoch in fl.loop("epoch", range(2)):
        for b in fl.loop("batch", range(2)):
            out = fl.check(np.array([1.0, -1.0, 2.0, -3.0]) * (epoch + 1), ids=["a", "b", "c", "d"])
            assert not out.ok and out["positive"].failed == 2
            assert out["positive"].failed_items == [("d", 3.0 * (epoch + 1)), ("b", 1.0 * (epoch + 1))]
    got = rows()
    summaries = [r for r in got if r["item_id"] is None]
    assert len(summaries) == 4 and all(r["severity"] == 4.0 for r in summaries)
    assert json.loads(summaries[0]["message"]) == {"checked": 4, "failed": 2, "max_severity": 3.0}
    fails = [r for r in got if r["item_id"] is not None]
    assert {r["item_id"] for r in fails} == {"b", "d"} and len(fails) == 8
    assert {(r["epoch"], r["batch"]) for r in fails} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert json.loads(fails[0]["ctx"]) == {"epoch": 0, "batch": 0}


def test_severity_conventions():
    """True/0 pass; False/positive numbers fail; arrays are per item; NaN counts as a failure; 2-D reduces."""
    sev = lambda raw: A.severities(raw)[0].tolist()  # noqa: E731
    assert sev(True) == [0.0] and sev(False) == [1.0] and sev(0) == [0.0] and sev(2.5) == [2.5]
    assert sev(np.array([True, False])) == [0.0, 1.0]
    assert sev([0.0, float("nan"), -1.0, 3.0]) == [0.0, 1.0, 0.0, 3.0]
    assert sev(np.array([[0.0, 2.0], [0.0, 0.0]])) == [2.0, 0.0]
    assert sev(np.array([[True, False], [True, True]])) == [1.0, 0.0]
    assert A.severities(True)[1] is True and A.severities([1.0])[1] is False


def test_scalar_result_is_one_batch_item(store):
    """An assertion returning one verdict records item 'batch'."""
    fl.init()
    fl.assertion(lambda i, o: float(np.mean(o)) < 0.5, name="mean_small")
    out = fl.check(np.ones(10))
    assert out["mean_small"].checked == 1 and out["mean_small"].failed_items == [("batch", 1.0)]


def test_torch_tensor_results(store):
    """Assertions may return torch tensors (bool or float)."""
    import torch

    fl.init()
    fl.assertion(lambda i, o: o.isfinite().all(dim=1), name="tfinite")
    t = torch.ones(5, 3)
    t[2, 1] = float("inf")
    assert fl.check(t)["tfinite"].failed_items == [("2", 1.0)]


def test_builtin_finite_and_range(store):
    """finite flags NaN/inf items; range grades severity by distance outside [low, high]."""
    fl.init()
    fl.assertion.finite()
    fl.assertion.range(0.0, 1.0, name="prob")
    x = np.array([[0.2, 0.8], [0.1, np.nan], [1.5, -0.5], [0.0, 1.0]])
    out = fl.check(x)
    assert out["finite"].failed_items == [("1", 1.0)]
    assert out["prob"].failed_items[0] == ("1", 1.0) and out["prob"].failed_items[1] == ("2", 0.5)
    with pytest.raises(ValueError):
        fl.assertion.range(2, 1)


def test_consistency_offers_majority_as_correction(store):
    """Items with the same id must agree; the minority item fails and gets the majority value as correction."""
    fl.init()
    fl.assertion.consistency(["label", "color"], key="track")
    outs = [dict(track=1, label="car", color="red"), dict(track=1, label="car", color="red"),
            dict(track=1, label="bus", color="blue"), dict(track=2, label="cat", color="x"),
            dict(track=3, label="dog", color="y"), dict(track=3, label="dog", color="y")]
    out = fl.check(outs, ids=[f"det{i}" for i in range(6)])
    assert out["consistency"].failed_items == [("det2", 2.0)]
    fail = [r for r in rows() if r["item_id"] == "det2"][0]
    assert json.loads(fail["correction"]) == {"label": "car", "color": "red"}
    assert "2 of 3 say" in fail["message"]


def test_consistency_with_pandas_and_ids_as_key(store):
    """consistency reads a DataFrame and uses fl.check ids as the identifier when no key is given."""
    import pandas as pd

    fl.init()
    fl.assertion.consistency("species")
    df = pd.DataFrame({"species": ["a", "a", "b", "c"]})
    assert fl.check(df, ids=["x", "x", "x", "y"])["consistency"].failed_items == [("x", 1.0)]


def test_flicker_across_calls_and_within_a_batch(store):
    """flicker flags an id that disappears and reappears within the window, across calls or by a frame column."""
    fl.init()
    fl.assertion.flicker(window=2)
    res = [fl.check(None, ids=ids)["flicker"] for ids in (["a", "b"], ["b"], ["a", "b"], ["b"], ["b"], ["b"], ["a"])]
    assert res[2].failed_items == [("a", 1.0)]  # gone for one frame
    assert res[6].failed == 0  # gone for 3 frames: left the scene, not flicker
    fl.assertion.clear()
    fl.assertion.flicker(key="obj", frame="t", name="flicker_t")
    out = fl.check({"obj": ["a", "a", "b", "a"], "t": [10, 11, 12, 13]})
    assert out["flicker_t"].failed_items == [("3", 1.0)]
    fail = [r for r in rows() if r["assertion"] == "flicker_t" and r["item_id"]][0]
    assert json.loads(fail["correction"]) == {"missing_frames": [12]}


def test_modes_warn_and_raise(store):
    """mode='warn' warns, mode='raise' raises AssertionFailed (a FlightlogError) after recording."""
    fl.init()
    fl.assertion(lambda i, o: np.asarray(o) < 1, name="small")
    with pytest.warns(A.AssertionWarning, match="small: 1 of 3"):
        fl.check([0, 5, 0], mode="warn")
    with pytest.raises(FlightlogError) as ei:
        fl.check([0, 5, 7], ids=["p", "q", "r"], mode="raise")
    assert isinstance(ei.value, A.AssertionFailed) and ei.value.outcome["small"].failed == 2
    assert "first: q, r" in str(ei.value)
    assert fl.check([0, 0], mode="raise").ok
    summaries = [r for r in rows() if r["item_id"] is None]
    assert len(summaries) == 3


def test_faulty_assertions_and_bad_arguments_never_raise(store):
    """A crashing assertion is skipped with a warning; a bad mode or unknown name warns; others still run."""
    fl.init()

    @fl.assertion
    def broken(inputs, outputs):
        raise RuntimeError("bug in my assertion")

    fl.assertion.finite()
    with pytest.warns(FlightlogWarning):
        out = fl.check([1.0, float("nan")], mode="sometimes")
    assert list(out) == ["finite"] and out["finite"].failed == 1
    with pytest.warns(FlightlogWarning, match="no assertion named"):
        out = fl.check([1.0], names=["nope", "finite"])
    assert list(out) == ["finite"]
    fl.assertion.clear()
    with pytest.warns(FlightlogWarning, match="no assertions registered"):
        assert fl.check([1.0]).ok


def test_names_select_assertions(store):
    """names= runs only the named (or given) assertions."""
    fl.init()
    f = fl.assertion.finite()
    fl.assertion.range(0, 1)
    assert list(fl.check([2.0], names=["range"])) == ["range"]
    assert list(fl.check([2.0], names=[f])) == ["finite"]
    assert fl.assertion.registered() == ["finite", "range"]


def test_failure_rows_are_capped_but_counts_are_exact(store, monkeypatch):
    """At most MAX_ITEM_ROWS failure rows per call (most severe first); the summary counts every failure."""
    monkeypatch.setattr(A, "MAX_ITEM_ROWS", 50)
    fl.init()
    fl.assertion.range(0, 1)
    out = fl.check(np.linspace(1.5, 100, 5000))
    assert out["range"].failed == 5000 and len(out["range"].failed_items) == 50
    got = rows()
    assert json.loads(got[0]["message"])["failed"] == 5000 and len(got) == 51
    assert max(r["severity"] for r in got[1:]) == pytest.approx(99.0)


def test_check_without_a_run_still_evaluates(monkeypatch):
    """With recording disabled, fl.check evaluates and returns the outcome without writing."""
    monkeypatch.setenv("FLIGHTLOG_DISABLED", "1")
    fl.assertion.finite()
    assert fl.check([float("nan")])["finite"].failed == 1
    with pytest.raises(A.AssertionFailed):
        fl.check([float("nan")], mode="raise")


def test_check_inside_a_step_links_the_span(store):
    """fl.check inside an @fl.step call records that call's span id."""
    fl.init()
    fl.assertion.finite()

    @fl.step
    def predict(x):
        fl.check(np.array([np.nan]))
        return x

    predict(1)
    fl.finish()
    sid = fl.query("SELECT span_id FROM spans WHERE name LIKE '%predict%'", store=store).column(0).to_pylist()
    got = {r["span_id"] for r in fl.query("SELECT span_id FROM assertions", store=store).to_pylist()}
    assert len(sid) == 1 and got == {sid[0]}


def test_health_assertion_rate_from_real_checks(store):
    """Rates from fl.check summary rows drive the assertion_rate health check."""
    fl.init()
    fl.assertion.range(0, 1)
    for epoch in fl.loop("epoch", range(3)):
        x = np.full(100, 0.5)
        if epoch == 2:
            x[:30] = 3.0
        fl.check(x)
    fl.finish()
    res = health(store=store, checks=["assertion_rate"])[0]
    assert res.status == "fail"
    assert res.evidence.to_pylist() == [dict(assertion="range", checked=300, failed=30, rate=0.1, first_epoch=2)]


# -- the report ---------------------------------------------------------------------------------


def test_select_items_spreads_across_assertions_and_boosts_agreement():
    """The BAL-like pick alternates between assertions and ranks items flagged by several assertions first."""
    items = [dict(assertion="a", item_id=f"a{i}", severity=100.0 - i, times_flagged=1) for i in range(20)]
    items += [dict(assertion="b", item_id=f"b{i}", severity=1.0 - i / 100, times_flagged=1) for i in range(20)]
    items += [dict(assertion="c", item_id="a5", severity=0.1, times_flagged=1)]
    got = select_items(items, 6)
    assert got[0]["item_id"] == "a5" and got[0]["also_flagged_by"] in ("a", "c")
    assert {g["assertion"] for g in got} >= {"a", "b"}
    assert len({g["item_id"] for g in got}) == 6
    assert select_items(items, 0) == [] and select_items([], 5) == []
    assert len(select_items(items, 1000)) == 40  # every distinct item once


def test_assertions_report_and_cli(store, capsys):
    """`flightlog assertions` shows failure counts per epoch and the top items; json is parseable."""
    fl.init()
    fl.assertion.range(0, 1)
    fl.assertion.finite()
    for epoch in fl.loop("epoch", range(3)):
        x = np.full(50, 0.5)
        x[: epoch * 5] = 2.0 + np.arange(epoch * 5)
        x[40] = np.nan if epoch == 1 else 0.5
        fl.check(x, ids=[f"img{i}" for i in range(50)])
    fl.finish()
    rep = report(store=store, top=4)
    per = rep["per_epoch"].to_pylist()
    assert [(r["assertion"], r["epoch"], r["failed"]) for r in per] == [
        ("finite", 0, 0), ("finite", 1, 1), ("finite", 2, 0), ("range", 0, 0), ("range", 1, 6), ("range", 2, 10)]
    top = rep["top"].to_pylist()
    assert len(top) == 4 and {t["assertion"] for t in top} == {"range", "finite"}
    assert top[0]["item_id"] == "img40"  # flagged by both assertions
    assert main(["assertions", "--store", store, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "failed / checked items per epoch" in out and "img40" in out and "6/50 (12.0%)" in out
    assert main(["assertions", "--store", store, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["top"]) == 10 and data["per_epoch"][0]["checked"] == 50


def test_assertions_cli_on_run_without_checks(store, capsys):
    """A run without fl.check calls reports that, and an unknown run exits 2."""
    fl.init()
    fl.log("loss", 1.0)
    fl.finish()
    assert main(["assertions", "--store", store]) == 0
    assert "no fl.check calls recorded" in capsys.readouterr().out
    assert main(["assertions", "--store", store, "--run", "nope"]) == 2
