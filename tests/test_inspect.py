"""fl.inspect: pandas / scikit-learn operations recorded as step calls, and the bias / illegal-feature checks."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

import flightlog as fl
from flightlog import _inspect, _steps
from flightlog.query import db, lineage

CHECKS = ["no_bias_introduced", "similar_removal_probabilities", "no_illegal_features"]


def census(n: int = 4000, seed: int = 0) -> pd.DataFrame:
    """A census-like table with planted columns: sex, race, age_years, income, label."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age_years": rng.integers(18, 90, n),
        "income": rng.normal(50_000, 15_000, n).round(2),
        "hours": np.where(rng.random(n) < 0.05, np.nan, rng.integers(1, 80, n).astype(float)),
        "sex": rng.choice(["Female", "Male"], n),
        "race": rng.choice(["White", "Black", "Asian"], n, p=[0.5, 0.3, 0.2]),
        "zip": rng.integers(0, 50, n),
        "label": rng.integers(0, 2, n),
    })


def spans(where: str = "true") -> list[dict]:
    _steps.flush()
    rows = fl.query(f"SELECT name, status, span_id, parent_span_id, attributes FROM spans WHERE {where} "
                    "ORDER BY start_time").to_pylist()
    for r in rows:
        r["a"] = json.loads(r["attributes"])
    return rows


def ops() -> list[dict]:
    return [s for s in spans() if s["a"].get("flightlog.inspect.kind") not in (None, "block")]


def checks(**params):
    _steps.flush()
    return fl.health(checks=CHECKS, params=params or None)


def test_planted_bias_flagged_at_the_filter_line(tmp_path):
    """A filter that removes most rows of one group fails no_bias_introduced at that operation and line."""
    fl.init(project="t")
    path = tmp_path / "people.csv"
    census().to_csv(path, index=False)
    with fl.inspect(sensitive=["sex", "race"]):
        df = pd.read_csv(path)
        df = df.dropna()
        line = sys._getframe().f_lineno + 1
        df = df[(df["race"] != "Black") | (df["income"] > 75_000)]
        df = df.assign(income_k=df["income"] / 1000)
    rep = checks()
    bias = rep["no_bias_introduced"]
    assert bias.status == "fail", bias
    rows = bias.evidence.to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert row["op"] == "DataFrame[]" and row["kind"] == "filter" and row["line"] == line
    assert row["file"] == __file__ and row["column"] == "race" and row["group"] == "Black"
    assert row["rows_after"] < 0.1 * row["rows_before"] and row["relative_change"] < -0.8
    assert row["share_after"] == pytest.approx(row["rows_after"] / df.shape[0], abs=1e-4)
    assert "df[(df[\"race\"] != \"Black\")" in row["code"]
    removal = rep["similar_removal_probabilities"]
    assert removal.status == "warn"
    rr = removal.evidence.to_pylist()
    assert [(r["line"], r["group"], r["lowest_removal_probability"]) for r in rr] == [(line, "Black", 0.0)]
    assert rep["no_illegal_features"].status == "skip"  # no model was fitted
    # exact before/after counts: the recorded groups match pandas' own value counts
    f = [s for s in ops() if s["a"]["code.line.number"] == line and s["a"]["flightlog.inspect.kind"] == "filter"]
    groups = json.loads(f[0]["a"]["flightlog.inspect.groups"])
    after = {g["value"]: g["after"] for g in groups if g["column"] == "race"}
    assert after == df["race"].value_counts().to_dict()


def test_clean_pipeline_passes_and_records_the_dag(tmp_path, store):
    """A pipeline whose filters do not depend on the groups passes all three checks; ops form a lineage DAG."""
    fl.init(project="t")
    path = tmp_path / "people.csv"
    data = census()
    data.to_csv(path, index=False)
    zips = pd.DataFrame({"zip": np.arange(50), "region": [f"r{i % 5}" for i in range(50)]})
    with fl.inspect(sensitive=["sex", "race"]):
        df = pd.read_csv(path)
        df = df.merge(zips, on="zip")
        df = df[df["income"] > 0]
        df = df.dropna()
        per_region = df.groupby("region").agg(mean_income=("income", "mean"))
        X = df[["income", "hours", "zip"]]
        X_tr, X_te, y_tr, y_te = train_test_split(X, df["label"], random_state=0)
        model = LogisticRegression(max_iter=50).fit(X_tr, y_tr)
        model.predict(X_te)
    rep = checks()
    assert [r.status for r in rep] == ["pass", "pass", "pass"], rep
    kinds = [(s["a"]["flightlog.inspect.op"], s["a"]["flightlog.inspect.kind"]) for s in ops()]
    for expected in [("pandas.read_csv", "source"), ("DataFrame.merge", "join"), ("DataFrame[]", "filter"),
                     ("DataFrame.dropna", "filter"), ("groupby.agg", "aggregate"), ("DataFrame[]", "projection"),
                     ("sklearn.train_test_split", "split"), ("LogisticRegression.fit", "fit"),
                     ("LogisticRegression.predict", "predict")]:
        assert expected in kinds, (expected, kinds)
    assert per_region.shape == (5, 1)
    # every op span is a child of the fl.inspect block span and carries the call site
    block = [s for s in spans() if s["a"].get("flightlog.inspect.kind") == "block"]
    assert len(block) == 1 and all(s["parent_span_id"] == block[0]["span_id"] for s in ops())
    assert all(s["a"]["code.file.path"] == __file__ for s in ops())
    # lineage: walking up from the fit reaches the CSV read through split, projection, dropna, filter, merge
    fit = [s for s in ops() if s["a"]["flightlog.inspect.kind"] == "fit"][0]
    con = db.connect(store)
    try:
        tree = lineage.lineage(con, fit["span_id"], "up", depth=20)
    finally:
        con.close()
    names = json.dumps(tree, default=str)
    for op in ("sklearn.train_test_split", "DataFrame.dropna", "DataFrame.merge", "pandas.read_csv"):
        assert op in names, op


def test_illegal_feature_reaching_fit_is_flagged():
    """Fitting a model on one-hot race columns fails no_illegal_features; a pipeline that drops race passes."""
    fl.init(project="t")
    data = census()
    with fl.inspect(sensitive=["race"]):
        X = pd.get_dummies(data[["income", "race"]])
        line = sys._getframe().f_lineno + 1
        LogisticRegression(max_iter=50).fit(X, data["label"])
    res = checks()["no_illegal_features"]
    assert res.status == "fail"
    rows = res.evidence.to_pylist()
    assert {r["feature"] for r in rows} == {"race_Asian", "race_Black", "race_White"}
    assert {r["line"] for r in rows} == {line} and {r["illegal_name"] for r in rows} == {"race"}
    assert rows[0]["op"] == "LogisticRegression.fit"


def test_pipeline_features_are_what_the_model_sees():
    """A ColumnTransformer that drops race: the model's features (cat__sex_*, num__*) are legal; extra= adds names."""
    fl.init(project="t")
    data = census()
    pipe = Pipeline([("ct", ColumnTransformer([("num", StandardScaler(), ["income"]),
                                               ("cat", OneHotEncoder(), ["sex"])])),
                     ("clf", LogisticRegression(max_iter=50))])
    with fl.inspect(sensitive=["race"]):
        pipe.fit(data[["income", "sex", "race"]], data["label"])
    assert checks()["no_illegal_features"].status == "pass"
    fit = [s for s in ops() if s["a"]["flightlog.inspect.kind"] == "fit"]
    assert len(fit) == 1  # the pipeline's inner fit/transform calls are not separate steps
    assert json.loads(fit[0]["a"]["flightlog.inspect.features"]) == ["num__income", "cat__sex_Female",
                                                                     "cat__sex_Male"]
    res = checks(**{"no_illegal_features.extra": "sex"})["no_illegal_features"]
    assert res.status == "fail" and {r["feature"] for r in res.evidence.to_pylist()} == {"cat__sex_Female",
                                                                                          "cat__sex_Male"}


def _pipeline(data: pd.DataFrame):
    df = data.dropna()
    df = df[df["income"] > 30_000]
    df = df.merge(df.groupby("zip").agg(n=("label", "size")), left_on="zip", right_index=True)
    df = df.assign(ratio=df["income"] / (df["hours"] + 1))
    both = pd.concat([df.head(100), df.tail(100)])
    X_tr, X_te, y_tr, y_te = train_test_split(df[["income", "hours", "ratio", "n"]], df["label"], random_state=1)
    sc = StandardScaler().fit(X_tr)
    model = LogisticRegression(max_iter=100).fit(sc.transform(X_tr), y_tr)
    return df, both, X_tr, X_te, model.predict_proba(sc.transform(X_te))


def test_patched_and_unpatched_outputs_are_identical():
    """The same pipeline inside and outside fl.inspect returns equal frames and bit-identical predictions."""
    fl.init(project="t")
    data = census()
    plain = _pipeline(data)
    with fl.inspect(sensitive=["sex", "race"]):
        inspected = _pipeline(data)
    for a, b in zip(plain[:4], inspected[:4]):
        pdt.assert_frame_equal(a, b, check_exact=True)
    assert np.array_equal(plain[4], inspected[4]) and plain[4].tobytes() == inspected[4].tobytes()
    assert len(ops()) >= 10


def test_unsupported_calls_are_recorded_as_opaque():
    """pipe/apply and a callable key become opaque steps (with row counts); nothing inside them is recorded."""
    fl.init(project="t")
    data = census(500)
    with fl.inspect(sensitive=["race"]):
        out = data.pipe(lambda d: d[d["race"] == "White"])
        data.apply(lambda r: r["income"] * 2, axis=1)
        data[lambda d: d["income"] > 0]
    rec = ops()
    assert [s["a"]["flightlog.inspect.op"] for s in rec] == ["DataFrame.pipe", "DataFrame.apply", "DataFrame[]"]
    assert all(s["a"]["flightlog.inspect.kind"] == "opaque" for s in rec)
    assert rec[0]["a"]["flightlog.inspect.rows_out"] == out.shape[0] < 500
    assert rec[2]["a"]["flightlog.inspect.note"] == "callable key"
    # an opaque call that dropped rows is judged by the bias checks like a filter
    bias = checks()["no_bias_introduced"]
    assert bias.status == "fail" and bias.evidence.to_pylist()[0]["op"] == "DataFrame.pipe"


def test_patches_undone_after_an_exception_and_the_failing_op_recorded():
    """An exception inside the block propagates unchanged, every patch is undone, the failing call is an error span."""
    import sklearn.linear_model as lm
    from sklearn.base import TransformerMixin

    fl.init(project="t")
    before = (pd.DataFrame.__getitem__, pd.read_csv, pd.merge, lm.LogisticRegression.fit,
              TransformerMixin.fit_transform, pd.core.indexing._LocationIndexer.__getitem__)
    data = census(200)
    with pytest.raises(KeyError, match="no_such_column"):
        with fl.inspect(sensitive=["race"]):
            assert pd.DataFrame.__getitem__ is not before[0]
            data["no_such_column"]
    after = (pd.DataFrame.__getitem__, pd.read_csv, pd.merge, lm.LogisticRegression.fit,
             TransformerMixin.fit_transform, pd.core.indexing._LocationIndexer.__getitem__)
    assert all(a is b for a, b in zip(before, after))
    assert not _inspect._patches and not _inspect._configs
    rec = spans()
    failing = [s for s in rec if s["a"].get("flightlog.inspect.op") == "DataFrame[]"]
    assert len(failing) == 1 and failing[0]["status"] == "error"
    assert [s["status"] for s in rec if s["a"].get("flightlog.inspect.kind") == "block"] == ["error"]
    data[["race"]]  # outside the block nothing is recorded
    assert len(spans()) == len(rec)


def test_in_place_mutation_between_operations_is_seen():
    """A .loc assignment that relabels a group changes the next operation's before-counts (no stale cache)."""
    fl.init(project="t")
    data = census(1000)
    with fl.inspect(sensitive=["race"]):
        df = data.dropna()
        df.loc[df["race"] == "Asian", "race"] = "White"
        df = df[df["income"] > 0]
    filt = [s for s in ops() if s["a"]["flightlog.inspect.kind"] == "filter"][-1]
    before = {g["value"]: g["before"] for g in json.loads(filt["a"]["flightlog.inspect.groups"])}
    assert "Asian" not in before and before["White"] == int((df["race"] == "White").sum())


def test_nested_blocks_threads_and_site_cap():
    """Nested blocks patch once; calls from another thread are recorded; a call in a loop is capped per line."""
    import threading

    fl.init(project="t")
    data = census(300)
    with fl.inspect(sensitive=["race"]):
        with fl.inspect(sensitive=["sex"]):
            data.dropna()
        assert _inspect._patches  # still patched for the outer block
        t = threading.Thread(target=lambda: data.dropna())
        t.start()
        t.join()
        for _ in range(_inspect.MAX_CALLS_PER_SITE + 5):
            data.head(3)
    assert not _inspect._patches
    rec = ops()
    drops = [s for s in rec if s["a"]["flightlog.inspect.op"] == "DataFrame.dropna"]
    assert len(drops) == 2
    assert {g["column"] for g in json.loads(drops[0]["a"]["flightlog.inspect.groups"])} == {"sex"}
    assert len([s for s in rec if s["a"]["flightlog.inspect.op"] == "DataFrame.head"]) == _inspect.MAX_CALLS_PER_SITE


def test_numpy_features_keep_their_names():
    """X = df.to_numpy(): the fit still knows the feature names (and flags race); df[df > 0] is opaque."""
    fl.init(project="t")
    data = census(300)
    with fl.inspect(sensitive=["race"], illegal=["income"]):
        X = data[["income", "hours"]].fillna(0).to_numpy()
        LogisticRegression(max_iter=20).fit(X, data["label"])
        data[["income"]][data[["income"]] > 0]
    rec = ops()
    fit = [s for s in rec if s["a"]["flightlog.inspect.kind"] == "fit"][0]
    assert json.loads(fit["a"]["flightlog.inspect.features"]) == ["income", "hours"]
    assert [r["feature"] for r in checks()["no_illegal_features"].evidence.to_pylist()] == ["income"]
    assert rec[-1]["a"]["flightlog.inspect.kind"] == "opaque"


def test_bad_arguments_raise_before_patching():
    """sensitive/illegal must be column names: a TypeError at the with statement, nothing patched."""
    with pytest.raises(TypeError):
        with fl.inspect(sensitive=[1]):
            pass
    with pytest.raises(TypeError):
        with fl.inspect(illegal=5):
            pass
    assert not _inspect._patches


def test_runs_without_inspect_skip_the_checks():
    """On a run with only ordinary @fl.step spans the three checks say SKIP with the reason (no error)."""
    fl.init(project="t")

    @fl.step
    def clean(df):
        return df[df["income"] > 0]

    clean(census(100))
    rep = checks()
    assert [r.status for r in rep] == ["skip", "skip", "skip"] and rep.ok
    assert "fl.inspect" in rep["no_bias_introduced"].reason and "model fits" in rep["no_illegal_features"].reason


def test_import_flightlog_stays_light():
    """import flightlog (and fl.inspect's module) loads neither pandas nor scikit-learn."""
    code = ("import sys, flightlog, flightlog._inspect; fl = flightlog; fl.inspect; "
            "assert 'pandas' not in sys.modules and 'sklearn' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_group_counts_are_exact_for_chunked_categorical_and_null_columns():
    """Value counts match pandas for multi-chunk Arrow strings, categoricals, numbers and nulls."""
    import pyarrow as pa

    rng = np.random.default_rng(3)
    vals = rng.choice(["a", "b", "c", None], 30_000).tolist()
    chunked = pa.chunked_array([vals[:10_000], vals[10_000:25_000], vals[25_000:]], pa.string())
    df = pd.DataFrame({"s": pd.arrays.ArrowStringArray(chunked) if hasattr(pd.arrays, "ArrowStringArray")
                       else pd.Series(vals, dtype="string[pyarrow]"),
                       "c": pd.Categorical(rng.choice(["x", "y"], 30_000)),
                       "n": rng.integers(0, 3, 30_000).astype(float)})
    df.loc[::7, "n"] = np.nan
    d = _inspect._describe(df, ("s", "c", "n"))
    for col in ("s", "c", "n"):
        expected = {(None if pd.isna(k) else str(k)): int(v)
                    for k, v in df[col].value_counts(dropna=False).items()}
        assert dict(d.hist[col]) == expected, col
        assert d.totals[col] == 30_000


def test_large_frame_fingerprints_follow_content():
    """Frames past FAST_FP_ROWS: equal content -> equal fingerprint; one changed value or row order -> different."""
    n = _inspect.FAST_FP_ROWS + 10
    rng = np.random.default_rng(5)
    a = pd.DataFrame({"x": rng.random(n), "race": rng.choice(["W", "B"], n), "k": rng.integers(0, 9, n)})
    b = a.copy(deep=True)
    fp = lambda df: _inspect._fast_info(df).fingerprint  # noqa: E731
    assert fp(a) == fp(b) and fp(a) == fp(a.assign(x=a["x"]))
    c = a.copy(deep=True)
    c.iloc[n // 2, 0] = -1.0
    d = a.copy(deep=True)
    d.loc[n - 1, "race"] = "Z"
    shuffled = a.iloc[::-1]
    assert len({fp(a), fp(c), fp(d), fp(shuffled), fp(shuffled.reset_index(drop=True))}) == 5


def test_loc_mask_and_head_counts_match_pandas():
    """df.loc[mask, cols], iloc slices and head(): recorded after-counts equal pandas' own value counts."""
    fl.init(project="t")
    data = census(2000)
    with fl.inspect(sensitive=["race"]):
        a = data.loc[data["income"] > 50_000, ["income", "race"]]
        b = a.iloc[10:500]
        c = b.head(100)
    rec = [s for s in ops() if s["a"]["flightlog.inspect.kind"] == "filter"]
    assert [s["a"]["flightlog.inspect.op"] for s in rec] == ["DataFrame.loc[]", "DataFrame.iloc[]", "DataFrame.head"]
    for span, frame in zip(rec, (a, b, c)):
        after = {g["value"]: g["after"] for g in json.loads(span["a"]["flightlog.inspect.groups"])}
        assert after == frame["race"].value_counts().to_dict()
        assert span["a"]["flightlog.inspect.rows_out"] == len(frame)
