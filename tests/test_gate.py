"""`flightlog gate` (ease.ml/ci): sample sizes, decisions and their error rates, the CLI, the budget."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import flightlog as fl
from flightlog.cli import main as cli
from flightlog.query import db
from flightlog.query import gate as g

# -- sample sizes: computed here from the paper's formulas --------------------------------------


def _hoeffding(eps, r, c, reliability, clauses, steps, full):
    """N = −c²r²·ln δ/(2ε²), δ = (1−reliability)/(r·clauses·steps) (2^steps under full adaptivity)."""
    delta = (1 - reliability) / (r * clauses * (2 ** steps if full else steps))
    return math.ceil(-c * c * r * r * math.log(delta) / (2 * eps * eps))


@pytest.mark.parametrize("condition, reliability, adaptivity, steps, r, c, eps, clauses", [
    ("n - o > 0.1 +/- 0.1", 0.99, "full", 32, 2, 1, 0.1, 1),  # ease.ml/ci's sample notebook: 5496
    ("n - o > 0.02 +/- 0.01", 0.999, "none", 32, 2, 1, 0.01, 1),  # the paper's running example
    ("n - o > 0.02 +/- 0.01", 0.999, "full", 32, 2, 1, 0.01, 1),
    ("n - o > 0.02 +/- 0.01", 0.999, "firstChange", 32, 2, 1, 0.01, 1),
    ("d < 0.1 +/- 0.01", 0.9999, "none", 8, 1, 1, 0.01, 1),
    ("n > 0.8 +/- 0.05", 0.999, "full", 16, 1, 1, 0.05, 1),
    ("2*n - o > 0.9 +/- 0.02", 0.99, "none", 10, 2, 2, 0.02, 1),
])
def test_hoeffding_sample_sizes_match_the_formula(condition, reliability, adaptivity, steps, r, c, eps, clauses):
    """plan() gives −c²r²·ln δ/(2ε²) with the paper's δ for each adaptivity (and 5496 for ease.ml/ci's example)."""
    pl = g.plan(condition, reliability, adaptivity, steps)
    want = _hoeffding(eps, r, c, reliability, clauses, steps, adaptivity == "full")
    assert pl.examples == want
    if condition == "n - o > 0.1 +/- 0.1":
        assert want == 5496  # the number ease.ml/ci's SampleCalculator prints for this configuration
    if condition.startswith("d"):
        assert pl.labels == 0  # d needs no labels


def test_conjunction_splits_delta_over_clauses():
    """Two clauses: δ is divided by 2 in each, and the condition needs the larger clause's N."""
    pl = g.plan("n - o > 0.02 +/- 0.01 /\\ d < 0.1 +/- 0.01", 0.999, "none", 32)
    n1 = _hoeffding(0.01, 2, 1, 0.999, 2, 32, False)
    n2 = _hoeffding(0.01, 1, 1, 0.999, 2, 32, False)
    assert [c.examples for c in pl.clauses] == [n1, n2]
    assert pl.examples == n1


def test_variance_bound_matches_bennett_and_saves_labels():
    """With d ≤ 0.1, n − o needs Bennett's N (one variable, Var ≤ 0.1, range 1.1) and labels ≈ 0.1·N only."""
    pl = g.plan("n - o > 0.02 +/- 0.01", 0.999, "none", 32, max_disagreement=0.1)
    delta = 0.001 / (2 * 1 * 32)  # n − o and the check of d ≤ p share δ
    v, b, eps = 0.1, 1.1, 0.01
    u = b * eps / v
    want = math.ceil(b * b * math.log(1 / delta) / (v * ((1 + u) * math.log(1 + u) - u)))
    cp = pl.clauses[0]
    assert cp.variance["examples"] == want
    assert cp.variance["bernstein_examples"] == math.ceil(math.log(1 / delta) * (2 * v + 2 * b * eps / 3) / eps ** 2)
    assert cp.variance["bernstein_examples"] >= want  # Bennett is the tighter of the two
    assert pl.variance_labels == math.ceil(0.1 * want)
    assert pl.labels / pl.variance_labels > 90  # about two orders of magnitude fewer labels
    # a clause not on n − o gains nothing
    assert g.plan("n > 0.8 +/- 0.01", 0.999, "none", 32, 0.1).clauses[0].variance is None


def test_halfwidths_invert_the_sample_sizes():
    """At the planned N the Hoeffding and Bennett half-widths are at most the tolerance, and above it just below."""
    ld = g.log_delta(0.999, 2, 1, 32, "none")
    n = g.hoeffding_n(0.01, 2, 1, ld)
    assert 2 * g.hoeffding_halfwidth(n, ld) <= 0.01 < 2 * g.hoeffding_halfwidth(n - 50, ld)
    nb = g.bennett_n(0.01, 0.1, 1.1, ld)
    assert g.bennett_halfwidth(nb, 0.1, 1.1, ld) <= 0.01 < g.bennett_halfwidth(nb - 50, 0.1, 1.1, ld)
    assert math.isinf(float(g.hoeffding_halfwidth(0, ld))) and math.isinf(float(g.bennett_halfwidth(0, .1, 1.1, ld)))


# -- conditions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, canon, coefs, threshold", [
    ("n - o > 0.02 +/- 0.01", "n - o > 0.02 +/- 0.01", {"n": 1, "o": -1}, 0.02),
    ("  n-o>0.02+/-0.01 ", "n - o > 0.02 +/- 0.01", {"n": 1, "o": -1}, 0.02),
    ("d < 0.1 +/- 0.01", "d < 0.1 +/- 0.01", {"d": -1}, -0.1),
    ("2*n - 0.5 o + 0.1 > o - .5 +/- 1e-2", "2*n - 1.5*o > -0.6 +/- 0.01", {"n": 2, "o": -1.5}, -0.6),
    ("n > 0.5 ± 0.05", "n > 0.5 +/- 0.05", {"n": 1}, 0.5),
])
def test_parse_condition(text, canon, coefs, threshold):
    """Clauses normalise to Σ a·v > t (a '<' clause negated) and print canonically."""
    (cl,) = g.parse_condition(text).clauses
    assert cl.text == canon
    assert cl.coefs == pytest.approx(coefs) and cl.threshold == pytest.approx(threshold)


@pytest.mark.parametrize("text, msg", [
    ("", "empty condition"),
    ("n - o > 0.02", "no tolerance"),
    ("n - o >= 0.02 +/- 0.01", "use > or <"),
    ("n - x > 0.02 +/- 0.01", "unknown variable 'x'"),
    ("n * o > 0.02 +/- 0.01", "expected a number after"),
    ("n - o > 0.02 +/- 0", "tolerance must be in (0, 1)"),
    ("n - o > 0.02 +/- 0.01 +/- 0.01", "more than one"),
    ("n - n > 0.02 +/- 0.01", "no variable"),
    ("n - o > 0.02 +/- 0.01 /\\ ", "empty clause"),
    ("(n - o) > 0.02 +/- 0.01", "parentheses"),
    ("n - o > 0.02 +/- 0.01; rm -rf /", "cannot read"),
    ("n o > 0.02 +/- 0.01", "expected + or -"),
    ("n - o > 0.02 < 1 +/- 0.01", "exactly one comparison"),
])
def test_bad_conditions_are_refused(text, msg):
    """Malformed conditions raise ConditionError naming the problem."""
    with pytest.raises(g.ConditionError, match=re.escape(msg)):
        g.parse_condition(text)


# -- decisions and their error rates over many simulated test sets --------------------------------


def _simulate(rng, sets, N, p_only_new, p_only_old, p_both_right, p_differ_both_wrong=0.0, labelled=None):
    """Counts of `sets` test sets of N items drawn from the four joint outcomes of two classifiers."""
    p_agree_wrong = 1 - p_only_new - p_only_old - p_both_right - p_differ_both_wrong
    cells = rng.multinomial(N, [p_only_new, p_only_old, p_both_right, p_differ_both_wrong, p_agree_wrong], sets)
    return {"examples": np.full(sets, N), "labelled": np.full(sets, N if labelled is None else labelled),
            "new_correct": cells[:, 0] + cells[:, 2], "old_correct": cells[:, 1] + cells[:, 2],
            "differ": cells[:, 0] + cells[:, 1] + cells[:, 3], "differ_unlabelled": np.zeros(sets)}


@pytest.mark.parametrize("reliability", [0.99, 0.9])
def test_false_pass_rate_below_one_minus_reliability(reliability):
    """1,000 test sets where n − o sits exactly on the threshold: fp-free passes < 1 − reliability of them."""
    rng = np.random.default_rng(7)
    cond = "n - o > 0.02 +/- 0.01"
    N = g.plan(cond, reliability, "none", 1).examples
    st = _simulate(rng, 1000, N, 0.07, 0.05, 0.78)  # n − o = 0.02: the condition is false
    res = g.decide(cond, st, reliability, "fp-free", "none", 1)["result"]
    assert set(res) <= {"pass", "fail"}  # enough examples: always decided
    assert (res == "pass").mean() < 1 - reliability
    naive = (st["new_correct"] - st["old_correct"]) / N > 0.02  # no tolerance, no bound: a coin flip
    assert naive.mean() > 0.3
    # fn-free mirrors it: a condition that truly holds (n − o = 0.021) is failed < 1 − reliability of the time
    st = _simulate(rng, 1000, N, 0.071, 0.05, 0.78)
    res = g.decide(cond, st, reliability, "fn-free", "none", 1)["result"]
    assert (res == "fail").mean() < 1 - reliability


def test_false_pass_rate_with_few_examples_and_with_the_variance_bound():
    """Early decisions on small samples and the Bennett path keep the false-pass rate below 1 − reliability."""
    rng = np.random.default_rng(11)
    cond, rel = "n - o > 0.02 +/- 0.01", 0.9
    for N in (500, 3000, 20000):
        st = _simulate(rng, 1000, N, 0.07, 0.05, 0.78)
        res = g.decide(cond, st, rel, "fp-free", "none", 1)["result"]
        assert (res == "pass").mean() < 1 - rel
    # d = 0.08 <= 0.1: the Bennett path is taken and needs far fewer examples
    N = g.plan(cond, rel, "none", 1, max_disagreement=0.1).variance_examples
    st = _simulate(rng, 1000, N, 0.05, 0.03, 0.80)
    out = g.decide(cond, st, rel, "fp-free", "none", 1, max_disagreement=0.1)
    bennett = out["clauses"][0]["bound"] == "bennett"
    assert bennett.mean() > 0.99
    assert set(out["result"][bennett]) <= {"pass", "fail"}  # Bennett's N suffices to decide
    assert (out["result"] == "pass").mean() < 1 - rel


def test_variance_bound_falls_back_when_d_is_large():
    """When the data do not support d ≤ p the clause uses Hoeffding (never the Bennett bound on a false premise)."""
    rng = np.random.default_rng(3)
    st = _simulate(rng, 200, 20000, 0.2, 0.1, 0.6)  # d = 0.3
    out = g.decide("n - o > 0.02 +/- 0.01", st, 0.99, "fp-free", "none", 1, max_disagreement=0.1)
    assert set(out["clauses"][0]["bound"]) == {"hoeffding"}


def test_decisions_of_a_better_and_a_worse_model():
    """A 5-point better model passes, a 5-point worse one fails, and a small sample is 'insufficient' with N − n more."""
    rng = np.random.default_rng(5)
    cond, rel = "n - o > 0.02 +/- 0.01", 0.999
    need = g.plan(cond, rel, "none", 32).examples
    better = g.decide(cond, _simulate(rng, 50, need, 0.08, 0.03, 0.80), rel)
    assert set(better["result"]) == {"pass"} and set(better["more"]) == {0}
    worse = g.decide(cond, _simulate(rng, 50, need, 0.03, 0.08, 0.80), rel)
    assert set(worse["result"]) == {"fail"}
    small = g.decide(cond, _simulate(rng, 50, 1000, 0.08, 0.03, 0.80), rel)
    assert set(small["result"]) == {"insufficient"} and set(small["more"]) == {need - 1000}
    # fn-free on the same small samples: undecided too (the tolerance band is wider than the data allow)
    assert set(g.decide(cond, _simulate(rng, 50, 1000, 0.08, 0.03, 0.80), rel, "fn-free")["result"]) == \
        {"insufficient"}


# -- the command, end to end on logged predictions ---------------------------------------------------


def _log_run(name, y, pred, ids=None, epochs=1, extra=None):
    """One run that logs the same predictions at each of `epochs` epochs (plus an optional later call)."""
    r = fl.init(project="gate", name=name)
    for _ in fl.loop("epoch", range(epochs)):
        fl.log_predictions(None, y, pred, ids=ids)
    if extra is not None:
        fl.log_predictions(None, *extra)
    fl.finish()
    return r.run_id


def _models(n, acc_old, delta, seed=0, classes=10):
    """Labels and two prediction vectors: the candidate fixes (or breaks) items so n − o ≈ delta."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    old = np.where(rng.random(n) < acc_old, y, (y + 1 + rng.integers(0, classes - 1, n)) % classes)
    new = old.copy()
    if delta > 0:
        fix = (old != y) & (rng.random(n) < delta / (1 - acc_old))
        new[fix] = y[fix]
    else:
        brk = (old == y) & (rng.random(n) < -delta / acc_old)
        new[brk] = (y[brk] + 1) % classes
    return y, old, new


def _gate(capsys, *argv):
    capsys.readouterr()
    rc = cli(["gate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def _big():
    return _models(60000, 0.85, 0.05, seed=1)


def test_cli_passes_better_fails_worse(capsys, _big):
    """Logged runs: 5 points better passes (exit 0), 5 points worse fails (exit 1); each is recorded in gates."""
    y, old, new = _big
    ids = np.arange(len(y))
    base = _log_run("base", y, old, ids)
    cand = _log_run("cand", y, new, ids)
    cond = "n - o > 0.01 +/- 0.02"
    assert g.plan(cond).examples <= len(y)
    rc, out, err = _gate(capsys, "--candidate", cand, "--baseline", base, "--condition", cond)
    assert rc == 0, out + err
    assert "gate: PASS" in out and "60,000 items predicted by both" in out
    rc, out, err = _gate(capsys, "--candidate", base, "--baseline", cand, "--condition", cond, "--format", "json")
    assert rc == 1, out + err
    o = json.loads(out)
    assert o["result"] == "fail" and o["n"] < o["o"] and o["more"] == 0
    rows = db.run_sql("SELECT run_id, baseline_run_id, result, step, examples, testset, condition FROM gates "
                      "ORDER BY time").to_pylist()
    assert [(r["run_id"], r["result"], r["step"]) for r in rows] == [(cand, "pass", 1), (base, "fail", 2)]
    assert rows[0]["testset"] == rows[1]["testset"].strip() and rows[0]["testset"].startswith("ids-")
    assert rows[0]["condition"] == cond and rows[0]["examples"] == len(y)


def test_cli_not_enough_examples_says_how_many_more(capsys):
    """2,000 items cannot decide a 1-point tolerance at 0.999: exit 3 and the number of examples still missing."""
    y, old, new = _models(2000, 0.85, 0.03, seed=2)
    base, cand = _log_run("b", y, old), _log_run("c", y, new)
    cond = "n - o > 0.02 +/- 0.01"
    rc, out, err = _gate(capsys, "--candidate", cand, "--baseline", base, "--condition", cond)
    assert rc == 3, out + err
    need = g.plan(cond).examples
    assert "NOT ENOUGH EXAMPLES" in out and f"{need - 2000:,} more needed" in out
    rc, out, _ = _gate(capsys, "--candidate", cand, "--baseline", base, "--condition", cond,
                       "--max-disagreement", "0.2", "--format", "json")
    o = json.loads(out)
    assert rc == 3 and o["needed"] == g.plan(cond, max_disagreement=0.2).variance_examples < need


def test_cli_join_epochs_duplicates_and_dropped_items(capsys):
    """Last epoch by default, newest row per item, items only in one run counted, positional ids keyed by batch."""
    y, old, new = _models(3000, 0.8, 0.1, seed=3)
    ids = [f"item-{i}" for i in range(3000)]
    # the baseline logs a stale first epoch (all wrong) and, in its last epoch, 100 items the candidate lacks
    r = fl.init(project="gate", name="base")
    for e in fl.loop("epoch", range(2)):
        fl.log_predictions(None, y, old if e == 1 else (y + 1) % 10, ids=ids)
        if e == 1:
            fl.log_predictions(None, np.zeros(100, int), np.zeros(100, int), ids=[f"x{i}" for i in range(100)])
    fl.finish()
    base = r.run_id
    # the candidate logs items 0..9 a second time with wrong predictions: the newest row wins
    r = fl.init(project="gate", name="cand")
    for _ in fl.loop("epoch", range(1)):
        fl.log_predictions(None, y, new, ids=ids)
        fl.log_predictions(None, y[:10], (y[:10] + 1) % 10, ids=ids[:10])
    fl.finish()
    cand = r.run_id
    rc, out, err = _gate(capsys, "--candidate", cand, "--baseline", base, "--condition", "n - o > 0.0 +/- 0.2",
                         "--reliability", "0.9", "--format", "json")
    assert rc in (0, 1, 3), out + err
    o = json.loads(out)
    assert o["baseline_rows"] == "epoch 1" and o["candidate_rows"] == "epoch 0"
    assert o["left_out"] == {"only_candidate": 0, "only_baseline": 100, "without_prediction": 0}
    assert o["examples"] == 3000 and o["key"] == "item_id"
    assert o["n"] == pytest.approx(np.r_[np.zeros(10, bool), (new == y)[10:]].mean())
    assert o["o"] == pytest.approx((old == y).mean())
    rc, out, _ = _gate(capsys, "--candidate", cand, "--baseline", base, "--condition", "n - o > 0.0 +/- 0.2",
                       "--reliability", "0.9", "--epoch", "0", "--format", "json")
    assert json.loads(out)["o"] == 0.0  # the stale epoch when asked for
    rc, out, _ = _gate(capsys, "--candidate", cand, "--baseline", base, "--condition", "n - o > 0.0 +/- 0.2",
                       "--reliability", "0.9", "--format", "text")
    assert "100 only in the baseline" in out
    # positional ids (no ids=) repeat in every batch: the key includes the batch
    r = fl.init(project="gate", name="pos-base")
    for _ in fl.loop("epoch", range(1)):
        for b in fl.loop("batch", range(3)):
            fl.log_predictions(None, y[b * 1000:(b + 1) * 1000], old[b * 1000:(b + 1) * 1000])
    fl.finish()
    r2 = fl.init(project="gate", name="pos-cand")
    for _ in fl.loop("epoch", range(1)):
        for b in fl.loop("batch", range(3)):
            fl.log_predictions(None, y[b * 1000:(b + 1) * 1000], new[b * 1000:(b + 1) * 1000])
    fl.finish()
    rc, out, err = _gate(capsys, "--candidate", r2.run_id, "--baseline", r.run_id, "--condition",
                         "n - o > 0.0 +/- 0.2", "--reliability", "0.9", "--format", "json")
    o = json.loads(out)
    assert o["key"] == "(batch, item_id)" and o["examples"] == 3000
    assert o["n"] == pytest.approx((new == y).mean()) and o["o"] == pytest.approx((old == y).mean())


def test_cli_label_conflict_is_refused(capsys):
    """Runs that disagree on y_true for an item are refused with a one-line error (exit 2)."""
    y, old, new = _models(500, 0.8, 0.1, seed=4)
    base = _log_run("b", y, old, np.arange(500))
    y2 = y.copy()
    y2[:5] = (y2[:5] + 1) % 10
    cand = _log_run("c", y2, new, np.arange(500))
    rc, out, err = _gate(capsys, "--candidate", cand, "--baseline", base, "--condition", "n > 0.5 +/- 0.1")
    assert rc == 2 and err.count("\n") == 1 and "disagree on y_true for 5 item(s)" in err


@pytest.mark.slow
def test_budget_full_adaptivity_and_reuse_warnings(capsys):
    """full: the (steps+1)-th use exits 3 'new test set needed'; none: a second use warns; firstChange retires."""
    y, old, new = _models(4000, 0.8, 0.1, seed=6)
    base, cand = _log_run("b", y, old), _log_run("c", y, new)
    cond = "n - o > 0.0 +/- 0.04"  # fp-free passes when the estimate clears the tolerance
    common = ["--candidate", cand, "--baseline", base, "--condition", cond, "--reliability", "0.9"]
    for step in (1, 2):
        rc, out, err = _gate(capsys, *common, "--adaptivity", "full", "--steps", "2", "--testset", "ts-full")
        assert rc == 0 and f"use {step} of 2" in out
    rc, out, err = _gate(capsys, *common, "--adaptivity", "full", "--steps", "2", "--testset", "ts-full")
    assert rc == 3 and "new test set needed" in out
    assert db.run_sql("SELECT count(*) AS c FROM gates WHERE testset = 'ts-full'").column("c")[0].as_py() == 2
    rc, out, err = _gate(capsys, *common, "--testset", "ts-none")
    assert rc == 0 and not err
    rc, out, err = _gate(capsys, *common, "--testset", "ts-none")
    assert rc == 0 and "already used 1 time(s)" in err and err.startswith("flightlog: warning:")
    # firstChange: pass, then a fail (the other direction) → the test set retires
    rev = ["--candidate", base, "--baseline", cand, "--condition", cond, "--reliability", "0.9"]
    assert _gate(capsys, *common, "--adaptivity", "firstChange", "--testset", "ts-fc")[0] == 0
    assert _gate(capsys, *common, "--adaptivity", "firstChange", "--testset", "ts-fc")[0] == 0
    assert _gate(capsys, *rev, "--adaptivity", "firstChange", "--testset", "ts-fc")[0] == 1
    rc, out, _ = _gate(capsys, *common, "--adaptivity", "firstChange", "--testset", "ts-fc")
    assert rc == 3 and "retires when its result first changes" in out


@pytest.mark.parametrize("argv, msg", [
    (["--condition", "n - o > 0.02"], "no tolerance"),
    (["--condition", "n - o >= 0.02 +/- 0.01"], "use > or <"),
    (["--condition", "n - q > 0.02 +/- 0.01"], "unknown variable 'q'"),
    (["--condition", "n > 0.5 +/- 0.1", "--reliability", "1.5"], "reliability must be in (0, 1)"),
    (["--condition", "n > 0.5 +/- 0.1", "--steps", "0"], "steps must be"),
    (["--condition", "n > 0.5 +/- 0.1", "--max-disagreement", "2"], "--max-disagreement must be"),
    (["--condition", "n > 0.5 +/- 0.1", "--candidate", "nope"], "--candidate and --baseline are required"),
    (["--condition", "n > 0.5 +/- 0.1", "--candidate", "nope", "--baseline", "latest"], "no run 'nope'"),
    (["--condition", "n > 0.5 +/- 0.1", "--candidate", "latest", "--baseline", "NOPRED"], "has no predictions"),
    (["--condition", "n > 0.5 +/- 0.1", "--candidate", "latest", "--baseline", "latest"], "same run"),
    (["--condition", "n > 0.5 +/- 0.1", "--candidate", "latest", "--baseline", "NOPRED", "--epoch", "x"],
     "--epoch must be"),
    (["--plan", "--condition", "n > 0.5 +/- 0.1", "--candidate", "latest"], "--plan reads no runs"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, msg):
    """Bad conditions, unknown runs, runs without predictions: one line `flightlog: error: …`, exit 2."""
    if "--baseline" in argv:  # the store matters only once both runs are named
        y, old, _ = _models(200, 0.8, 0.0, seed=8)
        nopred = fl.init(project="gate", name="nopred")
        fl.log("loss", 1.0)
        fl.finish()
        _log_run("with-preds", y, old)
        argv = [nopred.run_id if a == "NOPRED" else a for a in argv]
    rc, out, err = _gate(capsys, *argv)
    assert rc == 2, out + err
    assert err.startswith("flightlog: error: ") and err.count("\n") == 1 and msg in err


def test_plan_output_shows_both_bounds(capsys):
    """--plan prints the Hoeffding N and, with --max-disagreement, Bennett's N and the labels saved."""
    rc, out, err = _gate(capsys, "--plan", "--condition", "n - o > 0.02 +/- 0.01", "--max-disagreement", "0.1")
    pl = g.plan("n - o > 0.02 +/- 0.01", max_disagreement=0.1)
    assert rc == 0 and f"{pl.examples:,} examples" in out and f"{pl.variance_examples:,} examples" in out
    assert f"labels saved: {pl.labels - pl.variance_labels:,}" in out
    rc, out, _ = _gate(capsys, "--plan", "--condition", "n - o > 0.02 +/- 0.01", "--format", "json")
    assert json.loads(out)["hoeffding_examples"] == pl.examples


@pytest.mark.slow
def test_gate_via_subprocess_exit_code(tmp_path):
    """The installed entry point returns the gate's exit code to the shell (what a CI step sees)."""
    import subprocess
    import sys

    y, old, new = _models(1500, 0.85, -0.05, seed=9)
    base, cand = _log_run("b", y, old), _log_run("c", y, new)
    p = subprocess.run([sys.executable, "-m", "flightlog.cli", "gate", "--candidate", cand, "--baseline", base,
                        "--condition", "n - o > 0 +/- 0.2", "--reliability", "0.99"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "gate: FAIL" in p.stdout
