"""fl.log_predictions (round trips, bad input, faults) and the `flightlog slices` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import flightlog as fl
from flightlog import _run, _warn
from flightlog._warn import FlightlogWarning
from flightlog.cli import main as cli
from flightlog.query import db, predictions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(store: str) -> list[dict]:
    """Every predictions row of the store, in logging order."""
    t = db.run_sql("SELECT * FROM predictions ORDER BY time, epoch, batch, try_cast(item_id AS BIGINT), item_id",
                   store=store)
    return t.to_pylist()


def _log_and_read(store, features, y_true, y_pred, **kw) -> list[dict]:
    fl.init(store=store)
    fl.log_predictions(features, y_true, y_pred, **kw)
    fl.finish()
    return _rows(store)


def _planted(n: int, seed: int, slice_: tuple[str, str]):
    """Synthetic rows whose errors concentrate where country == slice_[0] and device == slice_[1]."""
    rng = np.random.default_rng(seed)
    country = rng.choice(["BR", "US", "DE", "IN"], n)
    device = rng.choice(["ios", "android", "web"], n)
    age = rng.integers(18, 80, n).astype(float)
    score = rng.random(n)
    y = rng.integers(0, 2, n)
    bad = (country == slice_[0]) & (device == slice_[1])
    wrong = np.where(bad, rng.random(n) < 0.7, rng.random(n) < 0.08)
    pred = np.where(wrong, 1 - y, y)
    loss = np.where(wrong, 2.0, 0.1) + rng.random(n) * 0.05
    feats = pd.DataFrame({"country": country, "device": device, "age": age, "score": score})
    return feats, y, pred, loss


def _slices(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli(["slices", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- round trips ---------------------------------------------------------------------------------


def test_round_trip_pandas_dataframe(store):
    """A pandas DataFrame's columns come back as a JSON object per row, with labels and loss."""
    df = pd.DataFrame({"age": [31.0, 45.5, 60.0], "city": ["Rio", 'Q"uote', "Zürich"],
                       "n": [1, 2, 3], "ok": [True, False, True],
                       "cat": pd.Categorical(["a", "b", "a"])})
    rows = _log_and_read(store, df, [1, 0, 1], [1, 1, 0], loss=[0.1, 2.3, 0.7])
    assert [json.loads(r["features"]) for r in rows] == [
        {"age": 31.0, "city": "Rio", "n": 1, "ok": True, "cat": "a"},
        {"age": 45.5, "city": 'Q"uote', "n": 2, "ok": False, "cat": "b"},
        {"age": 60.0, "city": "Zürich", "n": 3, "ok": True, "cat": "a"},
    ]
    assert [(r["y_true"], r["y_pred"], r["loss"]) for r in rows] == [("1", "1", 0.1), ("0", "1", 2.3), ("1", "0", 0.7)]
    assert [r["item_id"] for r in rows] == ["0", "1", "2"]
    assert all(r["run_id"] and r["time"] is not None and r["epoch"] is None for r in rows)


def test_round_trip_numpy_2d_names_columns_f0_fn(store):
    """A 2-D numpy array becomes columns f0..fN; integral floats stay floats in JSON."""
    X = np.array([[1.0, 0.25], [2.0, -3.5]])
    rows = _log_and_read(store, X, np.array([0, 1]), np.array([0.0, 1.0]))
    assert [r["features"] for r in rows] == ['{"f0":1.0,"f1":0.25}', '{"f0":2.0,"f1":-3.5}']
    assert [(r["y_true"], r["y_pred"]) for r in rows] == [("0", "0"), ("1", "1")]  # 1 and 1.0 print alike


def test_round_trip_arrow_table_and_dict_of_columns(store):
    """A pyarrow Table and a dict of columns record the same JSON."""
    cols = {"x": [1.5, None], "s": ["a", None]}
    fl.init(store=store)
    fl.log_predictions(pa.table(cols), ["a", "b"], ["a", "a"])
    fl.log_predictions(cols, ["a", "b"], ["a", "a"])
    fl.finish()
    feats = [r["features"] for r in _rows(store)]
    assert feats == ['{"x":1.5,"s":"a"}', '{"x":null,"s":null}'] * 2


def test_round_trip_list_of_row_dicts(store):
    """A list of row dicts (records) is a feature table; keys missing in a row are null."""
    rows = _log_and_read(store, [{"a": 1.5, "b": "x"}, {"a": 2.0}], [0, 1], [1, 1])
    assert [json.loads(r["features"]) for r in rows] == [{"a": 1.5, "b": "x"}, {"a": 2.0, "b": None}]


def test_round_trip_polars_and_series_labels(store):
    """A polars DataFrame and pandas Series labels are accepted."""
    pl = pytest.importorskip("polars")
    rows = _log_and_read(store, pl.DataFrame({"a": [1, 2]}), pd.Series(["cat", "dog"]), pd.Series(["cat", "cat"]))
    assert [(json.loads(r["features"]), r["y_true"], r["y_pred"]) for r in rows] == [
        ({"a": 1}, "cat", "cat"), ({"a": 2}, "dog", "cat")]


def test_round_trip_torch_tensors(store):
    """Torch tensors work for features, labels and loss (a 1-D feature tensor is one column f0)."""
    torch = pytest.importorskip("torch")
    X = torch.tensor([[0.5, 1.0], [2.0, 3.0]], requires_grad=True)
    loss = torch.tensor([0.25, float("nan")])
    rows = _log_and_read(store, X, torch.tensor([1, 0]), torch.tensor([1, 1]), loss=loss)
    assert [json.loads(r["features"]) for r in rows] == [{"f0": 0.5, "f1": 1.0}, {"f0": 2.0, "f1": 3.0}]
    assert [r["loss"] for r in rows] == [0.25, None]  # NaN loss is stored as unknown
    rows2 = _log_and_read(store, torch.tensor([7.0, 8.0]), [0, 1], [0, 1])
    assert json.loads(rows2[-1]["features"]) == {"f0": 8.0}


def test_nan_and_inf_features_become_null(store):
    """NaN and ±inf features are stored as JSON null, so the JSON stays valid."""
    X = np.array([[np.nan, 1.0], [np.inf, -np.inf]])
    rows = _log_and_read(store, X, [0, 1], [0, 1])
    assert [json.loads(r["features"]) for r in rows] == [{"f0": None, "f1": 1.0}, {"f0": None, "f1": None}]


def test_loop_context_and_default_item_ids(store):
    """Rows carry the fl.loop epoch/batch; default item ids count rows per loop position."""
    fl.init(store=store)
    for epoch in fl.loop("epoch", range(2)):
        for batch in fl.loop("batch", range(2)):
            fl.log_predictions({"x": [1, 2]}, [0, 1], [0, 0])
            fl.log_predictions({"x": [3]}, [0], [0])
    fl.finish()
    rows = _rows(store)
    assert len(rows) == 12
    first = [(r["epoch"], r["batch"], r["item_id"]) for r in rows if r["epoch"] == 1 and r["batch"] == 1]
    assert first == [(1, 1, "0"), (1, 1, "1"), (1, 1, "2")]


def test_explicit_ids_are_recorded(store):
    """ids= become the item ids (as strings)."""
    rows = _log_and_read(store, {"x": [1, 2]}, [0, 1], [0, 0], ids=np.array([1001, 1002]))
    assert [r["item_id"] for r in rows] == ["1001", "1002"]


@pytest.mark.slow
def test_big_batch_is_one_vectorised_write(store):
    """A 100k-row call is recorded completely (and reads back with the right count)."""
    n = 100_000
    rng = np.random.default_rng(0)
    fl.init(store=store)
    fl.log_predictions(rng.random((n, 5)), rng.integers(0, 2, n), rng.integers(0, 2, n), loss=rng.random(n))
    fl.finish()
    assert db.run_sql("SELECT count(*) AS n, count(DISTINCT item_id) AS ids FROM predictions",
                      store=store).to_pylist() == [{"n": n, "ids": n}]


# -- bad input and faults ------------------------------------------------------------------------


@pytest.mark.parametrize("args, kwargs", [
    (({"x": [1, 2, 3]}, [0, 1], [0, 1]), {}),                      # length mismatch
    ((np.zeros((2, 2, 2)), [0, 1], [0, 1]), {}),                   # 3-D features
    ((np.zeros((2, 2)), [0, 1], np.zeros((2, 3))), {}),            # class probabilities as y_pred
    ((np.zeros((2, 2)), "ab", "ab"), {}),                          # a string is not a label array
    ((np.zeros((2, 2)), [0, 1], [0, 1]), {"loss": ["a", "b"]}),    # non-numeric loss
    ((5, [0, 1], [0, 1]), {}),                                     # unsupported features type
    ((None, None, None), {}),                                      # nothing to record
    ((np.zeros((2, 2)), [0, 1], [0, 1]), {"ids": [1, 2, 3]}),      # ids length mismatch
    (({"a": [1, 2], "b": [1]}, [0, 1], [0, 1]), {}),               # ragged dict of columns
])
def test_bad_input_warns_and_records_nothing(store, args, kwargs):
    """Bad input warns once (bad_predictions), never raises, and writes no rows."""
    fl.init(store=store)
    with pytest.warns(FlightlogWarning, match="log_predictions"):
        assert fl.log_predictions(*args, **kwargs) is None
    fl.log("still_alive", 1.0)
    fl.finish()
    assert _warn.counters["bad_predictions"] == 1
    assert db.run_sql("SELECT count(*) AS n FROM predictions", store=store).to_pylist() == [{"n": 0}]
    assert db.run_sql("SELECT count(*) AS n FROM metrics", store=store).to_pylist() == [{"n": 1}]


def test_recorder_failure_is_swallowed(store, monkeypatch):
    """An internal failure while queueing rows becomes a counted warning, not an exception."""
    fl.init(store=store)

    def boom(table, data):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(_run.ACTIVE.rec, "emit_table", boom)
    with pytest.warns(FlightlogWarning, match="disk on fire"):
        fl.log_predictions({"x": [1]}, [0], [0])
    assert _warn.counters["predictions_error"] == 1


def test_after_finish_and_disabled_are_no_ops(store, monkeypatch):
    """After fl.finish the call warns; with FLIGHTLOG_DISABLED=1 it does nothing at all."""
    fl.init(store=store)
    fl.finish()
    with pytest.warns(FlightlogWarning, match="after the run finished"):
        fl.log_predictions({"x": [1]}, [0], [0])
    _run._ENDED_ONCE = False
    monkeypatch.setenv("FLIGHTLOG_DISABLED", "1")
    other = os.path.join(store, "..", "disabled-store")
    monkeypatch.setenv("FLIGHTLOG_HOME", other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fl.log_predictions({"x": [1]}, [0], [0])
    assert _run.ACTIVE is None and not os.path.exists(other)


def test_auto_starts_a_run(store):
    """Without fl.init the first call starts a run, like fl.log."""
    fl.log_predictions({"x": [1.0]}, ["a"], ["b"])
    assert _run.ACTIVE is not None
    fl.finish()
    assert len(_rows(store)) == 1


# -- flightlog slices ----------------------------------------------------------------------------


@pytest.fixture
def planted_run(store):
    """A run with two epochs of predictions: epoch 0 fails on (DE, web), epoch 1 on (BR, ios)."""
    fl.init(store=store)
    for epoch in fl.loop("epoch", range(2)):
        feats, y, pred, loss = _planted(4000, epoch, ("DE", "web") if epoch == 0 else ("BR", "ios"))
        fl.log_predictions(feats, y, pred, loss=loss)
    rid = _run.ACTIVE.run_id
    fl.finish()
    return rid


def test_slices_recovers_planted_slice_of_last_epoch(store, planted_run, capsys):
    """By default the last epoch is sliced by loss, and the planted slice is the top one."""
    rc, out, err = _slices(capsys, "--store", store, "--format", "json")
    assert rc == 0, err
    top = json.loads(out)
    assert top[0]["slice"] == "country = 'BR' AND device = 'ios'"
    assert 0 < len(top) <= 10
    rc, out, _ = _slices(capsys, "--store", store, "--run", planted_run[:12], "--k", "2")
    assert rc == 0
    assert f"run {planted_run}, epoch 1: 4000 rows, 4 features, error = loss" in out
    assert "1  country = 'BR' AND device = 'ios'" in out and "(2 rows)" in out


def test_slices_epoch_and_misclassified(store, planted_run, capsys):
    """--epoch 0 --error misclassified finds epoch 0's planted slice, on the chosen features in their order."""
    rc, out, err = _slices(capsys, "--store", store, "--epoch", "0", "--error", "misclassified",
                           "--features", "device,country", "--format", "json", "--max-level", "2")
    assert rc == 0, err
    top = json.loads(out)
    assert top[0]["slice"] == "device = 'web' AND country = 'DE'"
    assert top[0]["error_max"] == 1.0 and top[0]["level"] == 2


def test_slices_numeric_features_are_binned(store, capsys):
    """Numeric JSON features are binned (a planted age range is found as an interval)."""
    rng = np.random.default_rng(3)
    n = 3000
    age = rng.uniform(18, 90, n)
    wrong = np.where(age > 75, rng.random(n) < 0.6, rng.random(n) < 0.05)
    fl.init(store=store)
    fl.log_predictions({"age": age, "noise": rng.random(n)}, np.zeros(n, int), wrong.astype(int))
    fl.finish()
    rc, out, err = _slices(capsys, "--store", store, "--format", "json", "--bins", "5", "--binning", "equal")
    assert rc == 0, err
    top = json.loads(out)[0]
    assert top["predicates"][0]["column"] == "age" and top["predicates"][0]["op"] == "in"
    assert top["predicates"][0]["low"] >= 75 - 15  # the last equal-width bin of [18, 90]


def test_slices_newest_row_per_item_wins(store, capsys):
    """A key logged twice (as a replay re-running an epoch would) counts once, with its newest values."""
    n = 400
    feats = {"g": np.where(np.arange(n) < 100, "a", "b")}
    y = np.zeros(n, int)
    fl.init(store=store)
    for _ in fl.loop("epoch", range(1)):
        fl.log_predictions(feats, y, np.ones(n, int), ids=np.arange(n))   # all wrong …
        fl.log_predictions(feats, y, np.where(feats["g"] == "a", 1, 0), ids=np.arange(n))  # … then only 'a'
    fl.finish()
    rc, out, err = _slices(capsys, "--store", store, "--error", "misclassified", "--format", "json")
    assert rc == 0, err
    top = json.loads(out)
    assert top[0]["slice"] == "g = 'a'" and top[0]["size"] == 100 and top[0]["error_mean"] == 1.0


def test_slices_sql_path(store, planted_run, capsys):
    """--sql slices any read-only result: plain columns, or the JSON features column expanded."""
    sql = ("SELECT features->>'country' AS country, features->>'device' AS device, "
           "CAST(y_true <> y_pred AS INT) AS wrong FROM predictions WHERE epoch = 0")
    rc, out, err = _slices(capsys, "--store", store, "--sql", sql, "--error-column", "wrong", "--format", "json")
    assert rc == 0, err
    assert json.loads(out)[0]["slice"] == "country = 'DE' AND device = 'web'"
    sql = "SELECT features, loss AS error FROM predictions WHERE epoch = 1"
    rc, out, err = _slices(capsys, "--store", store, "--sql", sql, "--features", "country,device,age")
    assert rc == 0, err
    assert "--sql result: 4000 rows, 3 features, error = error" in out
    assert "1  country = 'BR' AND device = 'ios'" in out


@pytest.mark.parametrize("argv, message", [
    (["--run", "no-such-run"], "no run 'no-such-run'"),
    (["--features", "country,zipcode"], "unknown feature 'zipcode'"),
    (["--error", "mse"], "--error must be 'loss' or 'misclassified'"),
    (["--epoch", "7"], "no predictions at epoch 7; epochs with predictions: 0, 1"),
    (["--epoch", "x"], "--epoch must be an integer"),
    (["--min-support", "-3"], "--min-support must be"),
    (["--k", "0"], "k must be a positive integer"),
    (["--sql", "SELECT 1 AS x"], "no error column 'error'"),
    (["--sql", "SELECT 'a' AS g, 'bad' AS error"], "must be numeric or boolean"),
    (["--sql", "SELECT 'a' AS g, -1.0 AS error"], "negative values"),
    (["--sql", "DELETE FROM predictions"], "only read-only queries"),
    (["--sql", "SELECT * FROM read_csv('/etc/passwd')", "--error-column", "x"], "refused"),
    (["--sql", "SELECT 1 AS error", "--run", "latest"], "--run selects logged predictions"),
    (["--sql", "SELECT features, loss AS error FROM predictions WHERE false"], "returned no rows"),
])
def test_slices_errors_are_one_line_exit_2(store, planted_run, capsys, argv, message):
    """Bad arguments and queries print one 'flightlog: error:' line and exit 2."""
    rc, out, err = _slices(capsys, "--store", store, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("flightlog: error: ") and err.count("\n") == 1
    assert message in err, err


def test_slices_run_without_predictions_or_loss(store, capsys):
    """A run with no predictions, or --error loss on rows without loss, is a clear error."""
    fl.init(store=store)
    fl.log("x", 1.0)
    fl.finish()
    rc, _, err = _slices(capsys, "--store", store)
    assert rc == 2 and "has no predictions (record them with fl.log_predictions)" in err
    fl.init(store=store)
    fl.log_predictions({"g": ["a"] * 50}, [0] * 50, [1] * 50)
    fl.finish()
    rc, _, err = _slices(capsys, "--store", store, "--error", "loss")
    assert rc == 2 and "have no loss" in err
    rc, _, err = _slices(capsys, "--store", os.path.join(store, "missing"))
    assert rc == 2 and "no flightlog store" in err


def test_slices_mixed_and_case_colliding_keys(store, capsys):
    """Keys whose type changes between calls read as text; keys equal up to case still load."""
    n = 200
    fl.init(store=store)
    fl.log_predictions({"k": np.arange(n) % 3, "K": np.where(np.arange(n) < 50, "x", "y")},
                       np.zeros(n, int), (np.arange(n) < 50).astype(int))
    fl.log_predictions({"k": ["s"] * n, "K": ["y"] * n}, np.zeros(n, int), np.zeros(n, int))
    fl.finish()
    con = db.connect(store)
    try:
        X, err, notes = predictions.load_predictions(con, error="misclassified")
    finally:
        con.close()
    assert X.column_names == ["k", "K"] and X.num_rows == 2 * n and notes["rows"] == 2 * n
    assert set(X.column("k").to_pylist()) == {"0", "1", "2", "s"}
    rc, out, e = _slices(capsys, "--store", store, "--format", "json", "--features", "K")
    assert rc == 0, e
    assert json.loads(out)[0]["slice"] == "K = 'x'"


def test_slices_skips_rows_without_error_and_reports_no_slice(store, capsys):
    """Rows without a usable error are left out (and counted); even errors report no slice."""
    fl.init(store=store)
    fl.log_predictions({"g": ["a", "b"] * 50}, [0] * 100, [0, 1] * 50, loss=[np.nan] + [1.0] * 99)
    fl.finish()
    rc, out, err = _slices(capsys, "--store", store, "--error", "loss")
    assert rc == 0, err
    assert "99 rows" in out and "(1 rows without a usable error were left out)" in out
    assert "no slice scores above 0" in out


@pytest.mark.slow
def test_example_runs(tmp_path):
    """examples/slices_example.py logs real predictions and prints slices for each command."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "slices_example.py"),
                        "--store", str(tmp_path / "ex")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "logged 569 out-of-fold predictions" in r.stdout
    assert r.stdout.count("\nrank  slice") == 3
    assert "569 rows, 30 features, error = loss" in r.stdout
