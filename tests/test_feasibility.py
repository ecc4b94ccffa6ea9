"""Tests for the feasibility study (query/feasibility.py, fl.feasibility, flightlog feasibility):
exactness of the chunked 1-NN error against brute force, the Cover–Hart bound on data with a
known Bayes error, the verdict, recording with the run, the command and its bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flightlog as fl
from flightlog.cli import main
from flightlog.query import feasibility as F
from flightlog.query.feasibility import FeasibilityError, cover_hart_bound, estimate, nn_error, nn_error_exact

DELTA = 1e-3  # failure probability allowed to each concentration bound below


def hoeffding(n: int, delta: float = DELTA) -> float:
    """Two-sided Hoeffding deviation of a mean of n values in [0, 1] at confidence 1 - delta."""
    return math.sqrt(math.log(2 / delta) / (2 * n))


def r1_tolerance(n_test: int) -> float:
    """Deviation allowed to the held-out R1 around its expectation.

    Given the training split the held-out errors are independent ([0, 1]-valued), so one
    Hoeffding term covers the test labels; a second covers the training labels the nearest
    neighbours carry (the conditional mean moves with them). Both at DELTA.
    """
    return 2 * hoeffding(n_test)


def bound_tolerance(r_inf: float, n_test: int, classes: int) -> float:
    """How far the bound may move when R1 moves by r1_tolerance (the bound is increasing and concave)."""
    eps = r1_tolerance(n_test)
    g = cover_hart_bound
    return max(g(min(r_inf + eps, 1.0), classes) - g(r_inf, classes),
               g(r_inf, classes) - g(max(r_inf - eps, 0.0), classes))


def Phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# -- the bound -------------------------------------------------------------------------------------


def test_cover_hart_bound_values():
    """The bound inverts the Cover–Hart relation R = 2B − C/(C−1)·B² and saturates at chance."""
    for c in (2, 3, 10):
        for b in (0.0, 0.05, 0.2, (c - 1) / c * 0.99):
            r = 2 * b - c / (c - 1) * b * b
            assert cover_hart_bound(r, c) == pytest.approx(b, abs=1e-12)
        assert cover_hart_bound((c - 1) / c, c) == pytest.approx((c - 1) / c)
        assert cover_hart_bound(0.99, c) == pytest.approx((c - 1) / c)  # above chance: chance
    with pytest.raises(FeasibilityError):
        cover_hart_bound(0.1, 1)


# -- exactness ---------------------------------------------------------------------------------------


def _split(X, y, n_test):
    return X[n_test:], y[n_test:], X[:n_test], y[:n_test]


def _continuous(n=600, n_test=150):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((n, 4))
    y = rng.integers(0, 3, n)
    X[:, 0] += y
    return _split(X, y, n_test)


def test_chunked_equals_brute_force():
    """Every block size gives bit-identical per-row errors, equal to a brute-force float64 computation."""
    Xtr, ytr, Xte, yte = _continuous()
    ref = nn_error_exact(Xtr, ytr, Xte, yte, per_row=True)
    for block in ((13, 37), (64, 50), (1024, 4096), (150, 450)):
        got = nn_error(Xtr, ytr, Xte, yte, block=block, per_row=True)[450]
        assert np.array_equal(got, ref), block


@pytest.mark.slow
def test_same_errors_as_sklearn_1nn():
    """On continuous data (no ties) R1 counts exactly the rows scikit-learn's 1-NN classifier gets wrong."""
    from sklearn.neighbors import KNeighborsClassifier

    Xtr, ytr, Xte, yte = _continuous(3000, 600)
    got = nn_error(Xtr, ytr, Xte, yte, per_row=True)[2400]
    pred = KNeighborsClassifier(n_neighbors=1).fit(Xtr, ytr).predict(Xte)
    assert np.array_equal(got, (pred != yte).astype(float))


@pytest.mark.parametrize("data", ["small_integers", pytest.param("digits", marks=pytest.mark.slow)])
def test_ties_on_integer_data_match_exact_integer_reference(data):
    """Integer features (many exact ties): fractional tie errors equal an int64 brute force."""
    if data == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.data[:1300], d.target[:1300]
    else:
        rng = np.random.default_rng(8)
        X = rng.integers(0, 4, (1300, 5)).astype(np.float64)
        y = (X[:, 0] + rng.integers(0, 3, 1300)) % 3
    Xtr, ytr, Xte, yte = _split(X, y, 300)
    Ti, Si = Xtr.astype(np.int64), Xte.astype(np.int64)
    want = np.empty(len(Si))
    n_tied_rows = 0
    for i, row in enumerate(Si):
        dist = ((Ti - row) ** 2).sum(axis=1)  # exact in int64
        at = dist == dist.min()
        n_tied_rows += at.sum() > 1
        want[i] = np.count_nonzero(ytr[at] != yte[i]) / np.count_nonzero(at)
    assert n_tied_rows > 0  # the data do exercise ties
    for block in ((32, 100), (1024, 4096)):
        got = nn_error(Xtr, ytr, Xte, yte, block=block, per_row=True)[1000]
        assert np.array_equal(got, want)


def test_many_exact_duplicates_count_every_tie():
    """Rows repeated hundreds of times: every duplicate is a tie, counted in bounded batches."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 3)) * 5
    idx = rng.integers(0, 4, 1500)
    X = base[idx]
    y = rng.integers(0, 2, 1500)
    Xtr, ytr, Xte, yte = _split(X, y, 300)
    itr, ite = idx[300:], idx[:300]
    want = np.array([np.mean(ytr[itr == ite[i]] != yte[i]) for i in range(300)])
    got = nn_error(Xtr, ytr, Xte, yte, block=(50, 64), per_row=True)[1200]
    assert np.allclose(got, want, rtol=0, atol=1e-15)
    assert np.array_equal(got, nn_error_exact(Xtr, ytr, Xte, yte, per_row=True))


@pytest.mark.parametrize("offset,scale", [(1e6, 1.0), (0.0, 1e-9), (-3e4, 1e3), (0.0, 1e-30), (1e25, 1e20)])
def test_exact_under_large_offsets_and_scales(offset, scale):
    """Cancellation in ‖a‖²+‖b‖²−2ab is covered by the margin: results equal brute force at any offset/scale."""
    rng = np.random.default_rng(1)
    X = offset + scale * rng.standard_normal((700, 6))
    y = rng.integers(0, 2, 700)
    X[:, 1] += scale * y
    Xtr, ytr, Xte, yte = _split(X, y, 150)
    assert np.array_equal(nn_error(Xtr, ytr, Xte, yte, block=(40, 90), per_row=True)[550],
                          nn_error_exact(Xtr, ytr, Xte, yte, per_row=True))


def test_curve_points_equal_separate_prefix_runs():
    """One pass gives, at every checkpoint, the R1 of the training prefix computed on its own."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1000, 3))
    y = (X[:, 0] + 0.5 * rng.standard_normal(1000) > 0).astype(int)
    Xtr, ytr, Xte, yte = _split(X, y, 200)
    cps = [25, 100, 333, 800]
    curve = nn_error(Xtr, ytr, Xte, yte, checkpoints=cps, block=(64, 57))
    for c in cps:
        assert curve[c] == nn_error_exact(Xtr[:c], ytr[:c], Xte, yte)


# -- known Bayes error ---------------------------------------------------------------------------------


def _noisy_clusters(n, classes, rho, seed):
    """Separable clusters, labels replaced by a uniform class with probability rho: BER = rho (C−1)/C."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.standard_normal((n, 5)) * 0.1 + np.eye(classes, 5)[y] * 10
    noisy = np.where(rng.random(n) < rho, rng.integers(0, classes, n), y)
    return X, noisy


def test_label_noise_bound_matches_known_ber_and_verdict_flips():
    """Uniform label noise ρ on separable data: the bound is the BER ρ(C−1)/C within the derived tolerance."""
    C, rho, n = 4, 0.3, 16000
    X, y = _noisy_clusters(n, C, rho, seed=5)
    ber = rho * (C - 1) / C
    r_inf = 1 - ((1 - rho + rho / C) ** 2 + (C - 1) * (rho / C) ** 2)  # 1-NN asymptote; Cover–Hart is tight here
    tol = bound_tolerance(r_inf, 3200, C)
    r = estimate(X, y, target_error=ber + tol, transforms=("raw",))
    assert r.n_test == 3200
    assert abs(r["raw"].r1 - r_inf) <= r1_tolerance(r.n_test)
    assert r.bound <= ber + tol  # a lower bound, up to the estimate's noise
    assert r.bound >= ber - tol  # and a tight one where Cover–Hart is an equality
    assert r.verdict == "feasible"
    t = r["raw"]
    assert F.verdict(r.bound, t.bound_se, t.slope, t.slope_se, ber - 2 * tol)[0] == "unlikely"


def test_two_gaussians_bound_is_below_analytic_ber():
    """N(±μ, I): the estimate stays below BER = Φ(−‖μ‖) and reaches the Cover–Hart value of the 1-NN asymptote."""
    m, n = 1.0, 16000
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, 2))
    X[:, 0] += np.where(y == 1, m, -m)
    ber = Phi(-m)
    x = np.linspace(-12, 12, 200001)  # R∞ = E[2η(1−η)] along the mean axis, numerically
    p1 = np.exp(-0.5 * (x - m) ** 2)
    p0 = np.exp(-0.5 * (x + m) ** 2)
    eta = p1 / (p0 + p1)
    dens = 0.5 * (p0 + p1) / math.sqrt(2 * math.pi)
    r_inf = float(np.sum(2 * eta * (1 - eta) * dens) * (x[1] - x[0]))
    r = estimate(X, y, transforms=("raw",))
    tol = bound_tolerance(r_inf, r.n_test, 2)
    assert cover_hart_bound(r_inf, 2) <= ber  # the theorem itself
    assert r.bound <= ber + tol
    assert r.bound >= cover_hart_bound(r_inf, 2) - tol  # finite n only biases R1 upwards (plus noise)


def test_undecided_while_the_curve_still_falls():
    """High-dimensional data with few rows: the bound overshoots the true BER, and the verdict says undecided."""
    rng = np.random.default_rng(0)
    n, d, m = 3000, 40, 1.5
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, d))
    X[:, 0] += np.where(y == 1, m, -m)
    ber = Phi(-m)
    r = estimate(X, y, target_error=ber, transforms=("raw",))
    assert r.bound > ber  # finite-sample bias: the estimate alone would be wrong here
    assert r.slope is not None and r.slope < 0
    assert r.verdict == "undecided"
    assert r.projected < ber


def test_verdict_flips_exactly_at_bound_and_projection():
    """feasible at the bound, undecided just below it, unlikely below the pessimistic projection."""
    X, y = _noisy_clusters(4000, 3, 0.3, seed=1)
    r = estimate(X, y, transforms=("raw",))
    assert r.projected is not None and 0 < r.projected < r.bound
    v = lambda t: F.verdict(r.bound, r["raw"].bound_se, r.slope, r["raw"].slope_se, t)[0]  # noqa: E731
    assert v(r.bound) == "feasible"
    assert v(r.bound - 1e-9) == "undecided"
    assert v(r.projected + 1e-9) == "undecided"
    assert v(r.projected - 1e-9) == "unlikely"
    assert v(None) is None
    assert F.verdict(0.2, 0.01, None, None, 0.1)[0] == "undecided"  # too few curve points to tell


# -- transforms and input ----------------------------------------------------------------------------


def test_user_transforms_and_minimum_over_transforms():
    """Callables, (name, callable) pairs and dicts are used as given; the minimal bound wins."""
    rng = np.random.default_rng(4)
    n = 1200
    y = rng.integers(0, 2, n)
    signal = y + 0.1 * rng.standard_normal(n)
    X = np.column_stack([signal, rng.standard_normal((n, 30)) * 3])

    def informative(Z):
        return Z[:, :1]

    r = estimate(X, y, transforms=["raw", informative, ("noise", lambda Z: Z[:, 1:])])
    assert [t.name for t in r.transforms] == ["raw", "informative", "noise"]
    assert r.best == "informative" and r["informative"].dims == 1
    assert r.bound == min(t.bound for t in r.transforms)
    assert r["noise"].r1 > 0.3
    r2 = estimate(X, y, transforms={"first": informative})
    assert r2.best == "first" and r2.bound == r["informative"].bound


@pytest.mark.slow
def test_torch_module_as_embedding():
    """A torch module is applied as an embedding (float32 batches, no gradients) like any callable."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    n = 5000
    y = rng.integers(0, 2, n)
    X = np.column_stack([y + 0.1 * rng.standard_normal(n), rng.standard_normal((n, 20)) * 3])
    emb = torch.nn.Linear(21, 1, bias=False)
    with torch.no_grad():
        emb.weight.zero_()
        emb.weight[0, 0] = 1.0  # keeps the informative column only
    r = estimate(X, y, transforms=[("emb", emb), "raw"])
    assert r.best == "emb" and r["emb"].dims == 1 and r["emb"].r1 < r["raw"].r1
    assert emb.weight.grad is None


def test_bad_input_is_refused_with_reasons():
    """Bad input raises FeasibilityError (a ValueError) that says what is wrong."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 3))
    y = rng.integers(0, 2, 100)
    cases = [
        (lambda: estimate(X, np.zeros(100)), "single class"),
        (lambda: estimate(X, y[:50]), "labels"),
        (lambda: estimate(X, y, target_error=1.5), "target_error"),
        (lambda: estimate(X, y, test_size=0), "test_size"),
        (lambda: estimate(X, y, test_size=100), "both need at least one"),
        (lambda: estimate(X, y, transforms=["nope"]), "unknown transform"),
        (lambda: estimate(X, y, transforms=[lambda Z: Z[:10]]), "one row per input row"),
        (lambda: estimate(X, y, transforms=[lambda Z: 1 / 0]), "ZeroDivisionError"),
        (lambda: estimate(X, y, transforms=[lambda Z: Z * np.nan]), "NaN"),
        (lambda: estimate(X, rng.standard_normal(100)), "continuous"),
        (lambda: estimate(np.full((100, 3), np.nan), y), "usable rows"),
        (lambda: estimate([["a", "b"]] * 100, y), "numeric"),
        (lambda: estimate(X * 1e200, y), "too large"),
    ]
    for call, words in cases:
        with pytest.raises(FeasibilityError, match=words):
            call()
    assert issubclass(FeasibilityError, ValueError) and issubclass(FeasibilityError, fl.FlightlogError)


def test_rows_with_missing_values_are_left_out_and_counted():
    """NaN features or missing labels drop the row, and the result says how many."""
    X, y = _noisy_clusters(600, 3, 0.0, seed=2)
    X[:7, 2] = np.nan
    labels = y.astype(object)
    labels[10:13] = None
    r = estimate(X, labels, transforms=("raw",))
    assert r.rows_skipped == 10 and r.n == 590
    assert r.bound == 0.0  # the rest is perfectly separable
    assert "10 rows skipped" in r.summary()


def test_constant_columns_and_test_size_as_count():
    """standardize drops constant columns; an integer test_size is a row count."""
    X, y = _noisy_clusters(500, 2, 0.0, seed=3)
    X = np.column_stack([X, np.ones(500)])
    r = estimate(X, y, transforms=("standardize", "pca"), test_size=123)
    assert r.n_test == 123 and r.n_train == 377
    assert r["standardize"].dims == 5
    assert 1 <= r["pca"].dims <= 6


# -- recording ----------------------------------------------------------------------------------------


def test_fl_feasibility_records_curve_metrics_and_table(store, capsys):
    """fl.feasibility logs feasibility/r1/<transform> per subset size and rows that flightlog show lists."""
    X, y = _noisy_clusters(1000, 3, 0.2, seed=7)
    fl.init(project="feas")
    r = fl.feasibility(X, y, target_error=0.01, transforms=("raw", "standardize"))
    fl.finish()
    assert isinstance(r, F.FeasibilityResult) and r.verdict in ("unlikely", "undecided")
    m = fl.query("SELECT name, step, value FROM metrics WHERE name LIKE 'feasibility/%' ORDER BY name, step")
    rows = m.to_pylist()
    raw = [(x["step"], x["value"]) for x in rows if x["name"] == "feasibility/r1/raw"]
    assert raw == [(int(n), v) for n, v in r["raw"].curve]
    assert {x["name"] for x in rows} == {"feasibility/r1/raw", "feasibility/r1/standardize"}
    t = fl.query("SELECT transform, r1, bound, best, verdict, curve, source, bound_min FROM feasibility "
                 "ORDER BY transform").to_pylist()
    assert [x["transform"] for x in t] == ["raw", "standardize"]
    assert all(x["verdict"] == r.verdict and x["source"] == "sdk" and x["bound_min"] == r.bound for x in t)
    assert json.loads(t[0]["curve"]) == [[n, v] for n, v in r["raw"].curve]
    assert sum(x["best"] for x in t) == 1
    assert main(["show", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "feasibility (fl.feasibility" in out and f"BER lower bound {r.bound:.4f}" in out
    assert "target error 0.01: " + r.verdict in out


def test_recording_failure_never_raises(store, monkeypatch):
    """A failure while recording is a warning and a counter; the caller still gets the result."""
    from flightlog import _warn

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(F, "to_table", boom)
    X, y = _noisy_clusters(300, 2, 0.1, seed=1)
    fl.init(project="feas")
    with pytest.warns(Warning, match="recording the result failed"):
        r = fl.feasibility(X, y, transforms=("raw",))
    assert r.bound >= 0 and _warn.counters["feasibility_record_error"] == 1


def test_import_flightlog_stays_light():
    """`import flightlog` does not import the feasibility modules; fl.feasibility resolves lazily."""
    code = ("import sys, flightlog as fl; assert 'flightlog._feasibility' not in sys.modules; "
            "assert 'flightlog.query.feasibility' not in sys.modules; "
            "assert 'feasibility' in fl.__all__; f = fl.feasibility; print(f.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "flightlog._feasibility"


# -- the command ----------------------------------------------------------------------------------------


def test_cli_run_end_to_end_stores_with_the_run(store, capsys):
    """flightlog feasibility --run reads logged predictions, prints the study and stores it with the run."""
    from flightlog import _run

    X, y = _noisy_clusters(900, 3, 0.2, seed=0)
    fl.init(project="feas-cli")
    rid = _run.ACTIVE.run_id
    for _epoch in fl.loop("epoch", range(2)):
        fl.log_predictions({f"f{i}": X[:, i] for i in range(X.shape[1])} | {"tag": ["a"] * 900}, y, y)
    fl.finish()
    capsys.readouterr()
    assert main(["feasibility", "--run", rid[:10], "--store", store, "--target-error", "0.05"]) == 0
    out = capsys.readouterr().out
    assert f"run {rid}: predictions epoch 1 label y_true, 5 features" in out
    assert "left out non-numeric columns: tag" in out
    want = estimate(X, y, target_error=0.05)
    assert f"BER lower bound {want.bound:.4f}" in out and f"target error 0.05: {want.verdict}" in out
    t = fl.query("SELECT DISTINCT analysis_id, source, input, verdict FROM feasibility WHERE run_id = ?",
                 [rid]).to_pylist()
    assert len(t) == 1 and t[0]["source"] == "cli" and t[0]["verdict"] == want.verdict
    assert main(["show", rid, "--store", store]) == 0
    assert "feasibility (predictions epoch 1 label y_true" in capsys.readouterr().out
    assert main(["feasibility", "--run", rid, "--store", store, "--format", "json", "--no-save",
                 "--features", "f0,f1", "--transforms", "raw", "--test-size", "300", "--seed", "3"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["saved"] is False and j["n_test"] == 300 and j["features"] == ["f0", "f1"]
    assert len(fl.query("SELECT DISTINCT analysis_id FROM feasibility").to_pylist()) == 1


def test_cli_parquet_end_to_end(tmp_path, capsys):
    """--parquet FILE --label COLUMN uses the numeric columns and matches fl.feasibility's numbers."""
    X, y = _noisy_clusters(800, 4, 0.1, seed=9)
    t = pa.table({**{f"x{i}": X[:, i] for i in range(5)}, "cls": [f"c{v}" for v in y], "note": ["n"] * 800})
    path = tmp_path / "data.parquet"
    pq.write_table(t, path)
    assert main(["feasibility", "--parquet", str(path), "--label", "cls", "--format", "json"]) == 0
    j = json.loads(capsys.readouterr().out)
    want = estimate(X, y)
    assert j["bound"] == want.bound and j["classes"] == 4 and j["left_out"] == ["note"] and j["run"] is None


def _err(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flightlog: error: "), err
    return lines[0]


def test_cli_bad_input_one_line_errors(store, tmp_path, capsys):
    """Unknown run, a run without predictions, a missing label column and other bad input: one line, exit 2."""
    from flightlog import _run

    fl.init(project="plain")
    fl.log("loss", 1.0)
    plain = _run.ACTIVE.run_id
    fl.finish()
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0, 4.0] * 10, "s": ["x"] * 40, "y": [0, 1] * 20}), good)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    assert "no run 'nope'" in _err(capsys, ["feasibility", "--run", "nope", "--store", store])
    assert "has no predictions" in _err(capsys, ["feasibility", "--run", plain, "--store", store])
    assert "has no column 'label'" in _err(capsys, ["feasibility", "--parquet", str(good), "--label", "label"])
    assert "needs --label" in _err(capsys, ["feasibility", "--parquet", str(good)])
    assert "cannot read" in _err(capsys, ["feasibility", "--parquet", str(junk), "--label", "y"])
    assert "no such file" in _err(capsys, ["feasibility", "--parquet", str(tmp_path / "x.parquet"), "--label", "y"])
    assert "not numeric" in _err(capsys, ["feasibility", "--parquet", str(good), "--label", "y", "--features", "s"])
    assert "--test-size" in _err(capsys, ["feasibility", "--parquet", str(good), "--label", "y", "--test-size", "-1"])
    assert "--target-error" in _err(capsys, ["feasibility", "--parquet", str(good), "--label", "y",
                                             "--target-error", "2"])
    assert "unknown transform" in _err(capsys, ["feasibility", "--parquet", str(good), "--label", "y",
                                                "--transforms", "raw,umap"])
    assert "applies to --run" in _err(capsys, ["feasibility", "--parquet", str(good), "--label", "y", "--epoch", "1"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no runs" in _err(capsys, ["feasibility", "--run", "latest", "--store", str(empty)])


def test_cli_run_label_choices(store, capsys):
    """--label may name y_pred or a logged feature; an unknown label lists what exists."""
    from flightlog import _run

    X, y = _noisy_clusters(400, 2, 0.0, seed=4)
    fl.init(project="feas-cli")
    rid = _run.ACTIVE.run_id
    fl.log_predictions({"a": X[:, 0], "b": X[:, 1], "grp": y}, None, y)
    fl.finish()
    capsys.readouterr()
    assert "have no y_true values" in _err(capsys, ["feasibility", "--run", rid, "--store", store])
    assert main(["feasibility", "--run", rid, "--store", store, "--label", "y_pred", "--no-save"]) == 0
    assert "label y_pred, 3 features" in capsys.readouterr().out
    assert main(["feasibility", "--run", rid, "--store", store, "--label", "grp", "--no-save"]) == 0
    assert "label grp, 2 features" in capsys.readouterr().out
    assert "no column 'zz'" in _err(capsys, ["feasibility", "--run", rid, "--store", store, "--label", "zz"])


# -- real data --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine"])
def test_real_datasets_bound_below_trained_model_error(name):
    """On digits, breast_cancer and wine the bound is not above a cross-validated logistic regression's error."""
    from sklearn import datasets
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = getattr(datasets, f"load_{name}")()
    r = estimate(d.data, d.target)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    err = float(np.mean(cross_val_predict(model, d.data, d.target, cv=5) != d.target))
    se_model = math.sqrt(max(err * (1 - err), 1 / len(d.target)) / len(d.target))
    best = r[r.best]
    assert 0 <= r.bound < 0.2
    assert r.bound - 2 * best.bound_se <= err + 2 * se_model, (r.bound, best.bound_se, err)


@pytest.mark.slow
def test_digits_with_injected_label_noise_tracks_the_noise():
    """Digits with uniform label noise ρ: the bound rises with ρ and stays below the noisy data's BER ceiling."""
    from sklearn.datasets import load_digits

    d = load_digits()
    C = 10
    clean = estimate(d.data, d.target)
    bounds = []
    for rho in (0.1, 0.2, 0.4):
        rng = np.random.default_rng(0)
        y = np.where(rng.random(len(d.target)) < rho, rng.integers(0, C, len(d.target)), d.target)
        r = estimate(d.data, y)
        # BER(noisy) = (1−ρ)·BER + ρ(C−1)/C, and BER ≤ the clean bound's ceiling: the clean 1-NN R1
        ceiling = (1 - rho) * clean[clean.best].r1 + rho * (C - 1) / C
        tol = bound_tolerance(ceiling, r.n_test, C)
        assert r.bound <= ceiling + tol
        bounds.append(r.bound)
    assert bounds == sorted(bounds) and bounds[0] > 0.05
