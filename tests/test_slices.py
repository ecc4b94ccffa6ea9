"""Tests for flightlog.query.slices.find: exactness against brute force, planted
slices, binning, input types and input validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.query import slices
from flightlog.query.slices import find

# ---------------------------------------------------------------------------
# brute-force reference (independent of the implementation's encoding)
# ---------------------------------------------------------------------------


def _category_ranks(values: list) -> tuple[list, list]:
    """Per-row code and label: sorted distinct non-missing values, missing last."""

    def is_missing(v):
        return v is None or (isinstance(v, float) and math.isnan(v))

    distinct = sorted({v for v in values if not is_missing(v)})
    rank = {v: i for i, v in enumerate(distinct)}
    codes = [len(distinct) if is_missing(v) else rank[v] for v in values]
    labels = [repr(v) if isinstance(v, str) else str(v) for v in distinct] + ["<missing>"]
    return codes, labels


def brute_force(df: pd.DataFrame, e: np.ndarray, k: int, alpha: float, sigma: int, max_level: int):
    """Enumerate every conjunction of <= max_level predicates on distinct columns.

    Returns [(score, size, key, error_sum, error_max)], best first, with the documented
    tie rule: larger score, then larger size, then smaller (column position, category rank).
    """
    n = len(df)
    ebar = float(np.mean(e))
    if ebar == 0:
        return []
    enc = [_category_ranks(df[c].tolist())[0] for c in df.columns]
    found = []
    for level in range(1, max_level + 1):
        for combo in itertools.combinations(range(len(enc)), level):
            stats: dict[tuple, list] = {}
            for r in range(n):
                key = tuple((f, enc[f][r]) for f in combo)
                s = stats.setdefault(key, [0, 0.0, 0.0])
                s[0] += 1
                s[1] += float(e[r])
                s[2] = max(s[2], float(e[r]))
            for key, (ss, se, sm) in stats.items():
                if ss < sigma:
                    continue
                sc = alpha * ((se / ss) / ebar - 1.0) - (1.0 - alpha) * (n / ss - 1.0)
                if sc > 0:
                    found.append((sc, ss, key, se, sm))
    found.sort(key=lambda t: (-t[0], -t[1], t[2]))
    return found[:k]


def _keys_of(table: pa.Table, df: pd.DataFrame) -> list[tuple]:
    """Map find()'s predicates back to (column position, category rank) keys."""
    pos = {c: i for i, c in enumerate(df.columns)}
    labels = {c: _category_ranks(df[c].tolist())[1] for c in df.columns}
    keys = []
    for preds in table.column("predicates").to_pylist():
        key = []
        for p in preds:
            labs = labels[p["column"]]
            key.append((pos[p["column"]], labs.index(p["value"])))
        keys.append(tuple(key))
    return keys


def _random_frame(rng: np.random.Generator, n: int, n_cols: int) -> pd.DataFrame:
    cols = {}
    for j in range(n_cols):
        kind = rng.choice(["str", "int", "single", "many", "dup", "missing"])
        if kind == "str":
            card = int(rng.integers(1, 6))
            vals = np.array([chr(97 + i) for i in range(card)], dtype=object)[rng.integers(0, card, n)]
        elif kind == "int":
            vals = rng.integers(0, int(rng.integers(1, 6)), n)
        elif kind == "single":
            vals = np.array(["only"] * n, dtype=object)
        elif kind == "many":
            vals = np.array([f"c{v:03d}" for v in rng.integers(0, 130, n)], dtype=object)
        elif kind == "dup" and cols:
            vals = np.asarray(list(cols.values())[-1]).copy()
        else:
            card = int(rng.integers(1, 4))
            vals = np.array([chr(97 + i) for i in range(card)], dtype=object)[rng.integers(0, card, n)]
            vals[rng.random(n) < 0.3] = None
        cols[f"c{j}"] = vals
    return pd.DataFrame(cols)


def _random_errors(rng: np.random.Generator, n: int, kind: str, df: pd.DataFrame) -> np.ndarray:
    if kind == "binary":
        return (rng.random(n) < rng.uniform(0.05, 0.6)).astype(float)
    if kind == "planted":
        # raise the error rate on a random conjunction so deep slices score > 0
        mask = np.ones(n, dtype=bool)
        for c in rng.choice(df.columns, size=min(len(df.columns), int(rng.integers(1, 4))), replace=False):
            mask &= (df[c] == df[c].iloc[int(rng.integers(0, n))]).to_numpy()
        return (rng.random(n) < np.where(mask, 0.8, 0.15)).astype(float)
    if kind == "ints":
        return rng.integers(0, 4, n).astype(float)
    if kind == "zero":
        return np.zeros(n)
    return rng.exponential(1.0, n) * (rng.random(n) < 0.7)


def _assert_matches(got: pa.Table, ref: list, df: pd.DataFrame, exact_ties: bool) -> None:
    scores = np.array(got.column("score").to_pylist(), dtype=float)
    ref_scores = np.array([r[0] for r in ref], dtype=float)
    assert len(scores) == len(ref_scores)
    assert np.allclose(scores, ref_scores, rtol=1e-9, atol=1e-12)
    keys = _keys_of(got, df)
    ref_keys = [r[2] for r in ref]
    if exact_ties:
        assert keys == ref_keys
        assert got.column("size").to_pylist() == [r[1] for r in ref]
    else:
        # sums of real-valued losses in a different order may flip exact ties:
        # the sets may differ only among slices tied with the K-th score.
        kth = ref_scores[-1] if len(ref_scores) else 0.0
        for key, sc in zip(keys, scores):
            assert key in ref_keys or np.isclose(sc, kth, rtol=1e-9)
    np.testing.assert_allclose(got.column("error_sum").to_pylist(), [r[3] for r in ref], rtol=1e-9)
    np.testing.assert_allclose(got.column("error_max").to_pylist(), [r[4] for r in ref], rtol=1e-12)
    assert got.column("rank").to_pylist() == list(range(1, len(ref) + 1))
    assert got.column("level").to_pylist() == [len(r[2]) for r in ref]


# ---------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 160),
    n_cols=st.integers(1, 5),
    err_kind=st.sampled_from(["planted", "planted", "binary", "ints", "loss", "zero"]),
    k=st.integers(1, 8),
    alpha=st.sampled_from([0.3, 0.8, 0.95, 0.95, 1.0]),
    sigma=st.integers(1, 12),
    max_level=st.integers(1, 4),
)
@pytest.mark.slow
def test_find_equals_brute_force(seed, n, n_cols, err_kind, k, alpha, sigma, max_level):
    """find() returns exactly the brute-force top-K (set, order, scores, stats) on random data."""
    rng = np.random.default_rng(seed)
    df = _random_frame(rng, n, n_cols)
    e = _random_errors(rng, n, err_kind, df)
    got = find(df, e, k=k, alpha=alpha, min_support=sigma, max_level=max_level, bins=10)
    ref = brute_force(df, e, k, alpha, sigma, max_level)
    _assert_matches(got, ref, df, exact_ties=err_kind != "loss")


def test_find_exact_with_heavy_ties():
    """Many identical slices (duplicated columns, constant errors per group) are ranked by the tie rule."""
    rng = np.random.default_rng(7)
    n = 400
    a = rng.integers(0, 3, n)
    df = pd.DataFrame({"a": a, "b": a.copy(), "c": a.copy(), "d": rng.integers(0, 2, n)})
    e = (a == 1).astype(float)
    for k in (1, 2, 3, 5, 9, 20):
        got = find(df, e, k=k, min_support=5, max_level=4)
        ref = brute_force(df, e, k, 0.95, 5, 4)
        _assert_matches(got, ref, df, exact_ties=True)


def test_find_exact_with_many_categories():
    """A 150-category column next to small ones matches brute force (no key collisions)."""
    rng = np.random.default_rng(3)
    n = 3000
    df = pd.DataFrame(
        {
            "big": [f"v{v:03d}" for v in rng.integers(0, 150, n)],
            "s": rng.choice(["x", "y", "z"], n),
            "t": rng.integers(0, 4, n),
        }
    )
    e = (rng.random(n) < np.where(df["s"] == "x", 0.4, 0.1)).astype(float)
    got = find(df, e, k=10, min_support=8, max_level=3)
    ref = brute_force(df, e, 10, 0.95, 8, 3)
    _assert_matches(got, ref, df, exact_ties=True)


def test_find_exact_with_huge_pair_domain():
    """Two 300-category columns (pair domain > 65536 codes, compact counting path) match brute force."""
    rng = np.random.default_rng(11)
    n = 5000
    df = pd.DataFrame(
        {
            "u": [f"u{v:03d}" for v in rng.integers(0, 300, n)],
            "v": [f"v{v:03d}" for v in rng.integers(0, 300, n)],
            "w": rng.integers(0, 3, n),
        }
    )
    df.loc[:199, "u"], df.loc[:199, "v"] = "u000", "v000"
    e = (rng.random(n) < np.where(np.arange(n) < 200, 0.7, 0.1)).astype(float)
    got = find(df, e, k=6, min_support=3, max_level=3)
    ref = brute_force(df, e, 6, 0.95, 3, 3)
    _assert_matches(got, ref, df, exact_ties=True)
    assert got.column("slice")[0].as_py() == "u = 'u000' AND v = 'v000'"


def test_id_like_column_is_fast():
    """A 200k-distinct id column never allocates dense pair grids and finishes quickly."""
    rng = np.random.default_rng(0)
    n = 200_000
    df = pd.DataFrame({"id": np.arange(n).astype(str), "g": rng.integers(0, 5, n), "h": rng.integers(0, 4, n)})
    e = (rng.random(n) < np.where(df["g"] == 1, 0.4, 0.1)).astype(float)
    got = find(df, e, k=3)
    assert got.column("slice")[0].as_py() == "g = 1"


def test_all_zero_errors_returns_empty_table():
    """All-zero errors give an empty table with the documented schema."""
    df = pd.DataFrame({"a": ["x", "y"] * 50})
    got = find(df, np.zeros(100))
    assert got.num_rows == 0
    assert got.column_names == [
        "rank", "slice", "predicates", "level", "size", "error_sum", "error_mean", "error_max", "score",
    ]


def test_row_keys_exact_beyond_int64():
    """Wide predicate keys fall back to exact byte keys whose lookups and order match tuples."""
    rng = np.random.default_rng(0)
    D = 2**20
    ids = np.sort(rng.integers(0, D, (500, 4)), axis=1).astype(np.int32)
    keys = slices._row_keys(ids, D)
    assert keys.dtype.kind == "V"
    order = np.argsort(keys, kind="stable")
    tuples = [tuple(r) for r in ids.tolist()]
    assert [tuples[i] for i in order] == sorted(tuples)
    sk = keys[order]
    probe = np.concatenate([ids[:50], ids[:50] + 1])
    pos = slices._lookup(sk, slices._row_keys(probe, D))
    present = set(tuples)
    for row, p in zip(probe.tolist(), pos.tolist()):
        assert (p >= 0) == (tuple(row) in present)


# ---------------------------------------------------------------------------
# planted slices
# ---------------------------------------------------------------------------


def _planted(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cards = [3, 5, 4, 6, 8, 3, 7, 5, 4, 6]
    df = pd.DataFrame({f"f{j}": rng.integers(0, c, n) for j, c in enumerate(cards)})
    p = np.where((df["f3"] == 2) & (df["f7"] == 0), 0.6, 0.1)
    e = (rng.random(n) < p).astype(float)
    return df, e


def test_planted_slice_is_top():
    """Rows with f3=2 AND f7=0 (60% error vs 10%) come out as the top slice."""
    df, e = _planted(30_000)
    got = find(df, e, k=5, alpha=0.95, min_support=0.01, max_level=3)
    assert got.column("slice")[0].as_py() == "f3 = 2 AND f7 = 0"
    assert got.column("level")[0].as_py() == 2
    assert got.column("error_mean")[0].as_py() > 0.5
    # every reported slice is the planted one or a refinement of it
    for preds in got.column("predicates").to_pylist():
        cols = {p["column"]: p["value"] for p in preds}
        assert cols.get("f3") == "2" or cols.get("f7") == "0"


def test_planted_slice_on_binned_numeric():
    """A planted region of a continuous column is found as the matching quantile bin."""
    rng = np.random.default_rng(1)
    n = 20_000
    age = rng.uniform(0, 100, n)
    g = rng.choice(["a", "b", "c"], n)
    e = (rng.random(n) < np.where((age >= 90) & (g == "b"), 0.7, 0.05)).astype(float)
    got = find(pd.DataFrame({"age": age, "g": g}), e, k=3, bins=10)
    top = got.to_pylist()[0]
    assert top["slice"].startswith("age in [") and top["slice"].endswith("] AND g = 'b'")
    age_pred = top["predicates"][0]
    assert age_pred["op"] == "in" and abs(age_pred["low"] - 90) < 1.5 and age_pred["high"] == age.max()


# ---------------------------------------------------------------------------
# binning and labels
# ---------------------------------------------------------------------------


def test_quantile_and_equal_binning_labels():
    """Quantile bins use unique np.quantile edges, equal bins equi-width; last bin is closed."""
    x = np.arange(100, dtype=float)
    col = slices._numeric("x", x, 4, "quantile")
    assert col.labels == ["[0.0, 24.75)", "[24.75, 49.5)", "[49.5, 74.25)", "[74.25, 99.0]"]
    assert np.bincount(col.codes).tolist() == [25, 25, 25, 25]
    col = slices._numeric("x", np.r_[x, np.nan], 2, "equal")
    assert col.labels == ["[0.0, 49.5)", "[49.5, 99.0]", "<missing>"]
    assert col.codes[-1] == 2
    # heavy duplicates collapse quantile edges instead of producing empty bins
    col = slices._numeric("x", np.r_[np.zeros(90), np.arange(10.0)], 10, "quantile")
    assert len(set(col.labels)) == len(col.labels) and (np.bincount(col.codes) > 0).all()
    col = slices._numeric("x", np.full(10, 3.0), 10, "quantile")
    assert col.labels == ["[3.0, 3.0]"]


def test_integer_columns_categorical_up_to_bins():
    """Integers with <= bins distinct values stay categories; more distinct values get binned."""
    rng = np.random.default_rng(0)
    n = 2000
    df = pd.DataFrame({"few": rng.integers(0, 5, n), "many": rng.integers(0, 1000, n)})
    e = (rng.random(n) < np.where((df["few"] == 3), 0.5, 0.1)).astype(float)
    got = find(df, e, k=20, bins=5, max_level=2)
    ops = {p["column"]: p["op"] for preds in got.column("predicates").to_pylist() for p in preds}
    assert ops.get("few") == "="
    assert ops.get("many", "in") == "in"
    assert got.column("slice")[0].as_py() == "few = 3"


# ---------------------------------------------------------------------------
# input types
# ---------------------------------------------------------------------------


def _mixed(n: int = 3000, seed: int = 5):
    rng = np.random.default_rng(seed)
    s = rng.choice(np.array(["u", "v", "w"], dtype=object), n)
    s[rng.random(n) < 0.1] = None
    x = rng.normal(size=n)
    x[rng.random(n) < 0.1] = np.nan
    i = rng.integers(0, 4, n)
    e = (rng.random(n) < np.where(pd.isna(s), 0.6, 0.1)).astype(float)
    return s, x, i, e


def test_input_types_agree_and_missing_is_a_category():
    """pandas, pyarrow and numpy inputs give identical slices; None/NaN become '<missing>'."""
    s, x, i, e = _mixed()
    df = pd.DataFrame({"f0": s, "f1": x, "f2": i})
    tbl = pa.table({"f0": pa.array(s.tolist()), "f1": pa.array(x, from_pandas=True), "f2": i})
    arr_obj = np.empty((len(s), 3), dtype=object)
    arr_obj[:, 0], arr_obj[:, 1], arr_obj[:, 2] = s, x, i
    results = [find(v, e, k=5) for v in (df, tbl)]
    results.append(find(arr_obj[:, [0]], e, k=5))
    assert results[0].column("slice")[0].as_py() == "f0 = <missing>"
    assert results[0].equals(results[1])
    assert results[2].column("slice")[0].as_py() == "f0 = <missing>"
    num = find(np.column_stack([x, i.astype(float)]), e, k=5)
    assert "f0 = <missing>" in num.column("slice").to_pylist() or num.num_rows >= 0
    assert find(pd.DataFrame({"f1": x, "f2": i}), e, k=5).column("slice").to_pylist() == num.column(
        "slice"
    ).to_pylist()


def test_pandas_categorical_bool_and_nullable_int():
    """pandas category, bool and nullable Int64 columns are categories with missing handled."""
    n = 600
    rng = np.random.default_rng(2)
    df = pd.DataFrame(
        {
            "cat": pd.Categorical(rng.choice(["lo", "hi"], n)),
            "flag": rng.random(n) < 0.5,
            "cnt": pd.array(np.where(rng.random(n) < 0.2, None, rng.integers(0, 3, n)), dtype="Int64"),
        }
    )
    e = (rng.random(n) < np.where(df["flag"] & df["cnt"].isna(), 0.8, 0.1)).astype(float)
    got = find(df, e, k=3, min_support=10)
    assert got.column("slice")[0].as_py() == "flag = True AND cnt = <missing>"
    ref = brute_force(df.astype(object).where(df.notna(), None), e, 3, 0.95, 10, 3)
    assert np.allclose(got.column("score").to_pylist(), [r[0] for r in ref])


def test_duplicate_and_non_string_column_names():
    """Duplicate or integer pandas column names are handled by position and rendered as text."""
    n = 400
    a = np.array(["x", "y"] * (n // 2), dtype=object)
    df = pd.DataFrame([a, a]).T
    df.columns = [0, 0]
    e = (a == "x").astype(float)
    got = find(df, e, k=2, max_level=1)
    assert got.column("slice").to_pylist() == ["0 = 'x'", "0 = 'x'"]


def test_polars_input_if_installed():
    """A polars DataFrame gives the same result as the equivalent pandas one."""
    pl = pytest.importorskip("polars")
    s, x, i, e = _mixed()
    pdf = pd.DataFrame({"f0": s, "f1": x, "f2": i})
    got = find(pl.from_pandas(pdf), e, k=5)
    assert got.column("slice").to_pylist() == find(pdf, e, k=5).column("slice").to_pylist()


@pytest.mark.parametrize(
    "X, errors, match",
    [
        (pd.DataFrame({"a": [1, 2, 3]}), [0, 1], "2 entries but X has 3 rows"),
        (pd.DataFrame({"a": [1, 2, 3]}), [0, -1, 1], "negative"),
        (pd.DataFrame({"a": [1, 2, 3]}), [0, np.nan, 1], "NaN"),
        (pd.DataFrame({"a": []}), [], "no rows"),
        (pd.DataFrame(index=range(3)), [0, 1, 0], "no columns"),
        (np.zeros(5), np.zeros(5), "2-D"),
    ],
)
def test_bad_input_raises_value_error(X, errors, match):
    """Length mismatch, negative/NaN errors, empty X and 1-D arrays raise a clear ValueError."""
    with pytest.raises(ValueError, match=match):
        find(X, errors)


def test_bad_parameters_raise():
    """Out-of-range k, alpha, min_support and binning raise ValueError."""
    df, e = pd.DataFrame({"a": [1, 2] * 50}), np.ones(100)
    for kwargs in ({"k": 0}, {"alpha": 0.0}, {"alpha": 1.5}, {"min_support": 0}, {"binning": "log"}):
        with pytest.raises(ValueError):
            find(df, e, **kwargs)


def test_default_min_support_is_max_32_or_1_percent():
    """Default sigma = max(32, ceil(1% of rows)): a 31-row slice is never reported."""
    n = 1000
    a = np.array(["small"] * 31 + ["big"] * (n - 31), dtype=object)
    e = np.r_[np.ones(31), np.zeros(n - 31)]
    e[-50:] = 1
    got = find(pd.DataFrame({"a": a}), e, k=5)
    assert "a = 'small'" not in got.column("slice").to_pylist()
    got = find(pd.DataFrame({"a": a}), e, k=5, min_support=31)
    assert got.column("slice")[0].as_py() == "a = 'small'"
