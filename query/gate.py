"""The statistics of ``flightlog gate``: ease.ml/ci conditions, sample sizes and decisions.

Reference: C. Renggli, B. Karlaš, B. Ding, F. Liu, K. Schawinski, W. Wu, C. Zhang,
"Continuous Integration of Machine Learning Models with ease.ml/ci: Towards a
Rigorous Yet Practical Treatment", MLSys 2019 (below: "the paper").

A condition is a conjunction (``/\\``) of clauses ``LHS > RHS +/- eps`` (or
``<``), linear in three variables measured on a test set both models predicted:

* ``n``: accuracy of the new model (the candidate) on the labelled items,
* ``o``: accuracy of the old model (the baseline) on the labelled items,
* ``d``: fraction of items where the two predictions differ (needs no labels).

Sample size (the paper's Hoeffding rule). A clause with ``r`` variables whose
largest coefficient (in absolute value) is ``c`` holds to within ``eps`` with
probability ``1 - r·δ`` once every variable is estimated to within
``eps/(c·r)``, which one-sided Hoeffding gives from

    N = −c²·r²·ln δ / (2·eps²)                                         (Hoeffding)

examples, where the failure budget ``1 − reliability`` is split over the
variables, the clauses and the uses of the test set:

    δ = (1 − reliability) / (r · clauses · steps)        adaptivity none, firstChange
    δ = (1 − reliability) / (r · clauses · 2^steps)      adaptivity full

(under full adaptivity each use leaks one bit that the developer may act on,
so the next model is one of 2^steps possible ones; under ``none`` the models
do not depend on earlier results; under ``firstChange`` the developer only
sees the results up to the first one that differs from the first, so at most
``steps`` histories are possible, and the test set retires at that change).

Variance bound (the paper's optimisation for conditions on ``n − o`` when the
models rarely disagree). Per item, ``X = [new correct] − [old correct]`` is
in {−1, 0, 1} and is 0 wherever the predictions agree, so ``Var X ≤ E[X²] ≤ d``
and ``|X − E X| ≤ 1 + d``. Bennett's inequality with variance ``v = p`` and range
``b = 1 + p`` for a known bound ``d ≤ p`` gives

    N = b²·ln(1/δ) / (v · h(b·eps'/v)),   h(u) = (1 + u)·ln(1 + u) − u     (Bennett)

for a tolerance ``eps'`` on ``n − o`` (Bernstein's closed form
``N = ln(1/δ)·(2v + 2b·eps'/3)/eps'²`` is a little looser and is reported next to
it). ``n − o`` is then one variable instead of two, and only the items where the
predictions differ need a label: the agreeing ones contribute 0 whatever their
label. The assumption ``d ≤ p`` is checked on the data, at confidence (Chernoff's
bound in KL form: ``n·KL(d̂‖p) ≥ ln(1/δ)``), with one more share of δ (so ``δ = (1 − reliability)/((r' + 1) · clauses · steps)``);
when the check does not pass, the clause falls back to the Hoeffding rule.

Decisions. With ``ĝ`` the estimate of ``LHS − RHS`` (a ``<`` clause is negated)
and ``η`` the half-width that holds with the clause's share of ``δ`` at the sample
size at hand (``η ≤ eps`` once the sample reaches ``N``), let ``m = max(eps, η)``:

* ``fp-free`` (no false positives): pass if ``ĝ > m``, fail if ``ĝ ≤ 2·eps − m``.
  A pass means the true condition holds; a fail means the true ``g ≤ 2·eps``.
* ``fn-free`` (no false negatives): pass if ``ĝ > m − 2·eps``, fail if ``ĝ ≤ −m``.
  A fail means the true condition is violated; a pass means ``g > −2·eps``.

With ``N`` examples (``η ≤ eps``) the two sides meet and every outcome is
decided, exactly as in the paper (fp-free evaluates ``ĝ − eps > 0``, fn-free
``ĝ + eps > 0``); with fewer, a clear result is still sound and anything else
is "insufficient" (the CLI's exit 3, with how many more examples are needed).
A conjunction fails when one clause fails and passes when all pass. Every
statement above holds with probability at least ``reliability``.

Everything here is plain numpy and vectorised over many test sets at once
(the tests simulate thousands); ``flightlog.query.predictions.load_stats`` gets the counts from
DuckDB, ``flightlog.query.gate_budget`` keeps each evaluation in the ``gates`` table, and the
command is sdk/_gate_cli.py.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flightlog._errors import FlightlogError

__all__ = ["ConditionError", "Clause", "Condition", "parse_condition", "log_delta", "hoeffding_n",
           "hoeffding_halfwidth", "bennett_n", "bennett_halfwidth", "bernstein_n", "plan", "decide",
           "MODES", "ADAPTIVITY", "VARIABLES"]

MODES = ("fp-free", "fn-free")
ADAPTIVITY = ("none", "full", "firstChange")
VARIABLES = ("n", "o", "d")


class ConditionError(FlightlogError):
    """A condition, reliability or budget the gate cannot use (the CLI exits 2)."""


# -- conditions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """One clause, normalised to ``Σ coefs[v]·v − threshold > 0`` with tolerance ``eps``."""

    coefs: dict[str, float]
    threshold: float
    eps: float
    text: str  # canonical form of what the user wrote
    op: str = ">"  # the user's direction; coefs/threshold are negated for "<"

    @property
    def variables(self) -> list[str]:
        return [v for v in VARIABLES if self.coefs.get(v, 0.0) != 0.0]

    @property
    def r(self) -> int:
        return len(self.variables)

    @property
    def c(self) -> float:
        return max(abs(self.coefs[v]) for v in self.variables)

    @property
    def needs_labels(self) -> bool:
        return any(v in self.coefs for v in ("n", "o"))

    def difference_coef(self) -> float | None:
        """``a`` when the clause reads ``a·(n − o) + …`` (the variance bound applies), else None."""
        a_n, a_o = self.coefs.get("n", 0.0), self.coefs.get("o", 0.0)
        if a_n != 0.0 and a_n == -a_o:
            return a_n
        return None


@dataclass(frozen=True)
class Condition:
    clauses: tuple[Clause, ...]

    @property
    def text(self) -> str:
        return " /\\ ".join(c.text for c in self.clauses)


_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<pm>\+/-|±)|(?P<var>[A-Za-z_]\w*)"
                    r"|(?P<op>>=|<=|==|!=|=|>|<)|(?P<sym>[-+*()]))")


def _tokens(text: str) -> list[tuple[str, str]]:
    out, i = [], 0
    text = text.rstrip()
    while i < len(text):
        m = _TOKEN.match(text, i)
        if not m or m.end() == i:
            raise ConditionError(f"cannot read {text[i:].strip()[:20]!r} in clause {text.strip()!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        i = m.end()
    return out


def _linear(toks: list[tuple[str, str]], clause: str) -> tuple[dict[str, float], float]:
    """Coefficients and constant of a linear expression like ``n - 0.5*o + 0.1``."""
    coefs: dict[str, float] = {}
    const = 0.0
    if not toks:
        raise ConditionError(f"missing expression in clause {clause!r}")
    i, sign, expect_term = 0, 1.0, True
    while i < len(toks):
        kind, val = toks[i]
        if kind == "sym" and val in "+-":
            sign = sign * (-1.0 if val == "-" else 1.0)
            expect_term = True
            i += 1
            continue
        if not expect_term:
            raise ConditionError(f"expected + or - before {val!r} in clause {clause!r}")
        num = None
        if kind == "num":
            num = float(val)
            i += 1
            if i < len(toks) and toks[i] == ("sym", "*"):
                i += 1
            if i < len(toks) and toks[i][0] == "var":
                kind, val = toks[i]
            else:
                const += sign * num
                sign, expect_term = 1.0, False
                continue
        if kind == "var":
            if val not in VARIABLES:
                raise ConditionError(f"unknown variable {val!r} in clause {clause!r}; the variables are "
                                     "n (new accuracy), o (old accuracy) and d (fraction of differing predictions)")
            coef = sign * (1.0 if num is None else num)
            i += 1
            if i < len(toks) and toks[i] == ("sym", "*"):  # n * 0.5
                if i + 1 < len(toks) and toks[i + 1][0] == "num":
                    coef *= float(toks[i + 1][1])
                    i += 2
                else:
                    raise ConditionError(f"expected a number after '*' in clause {clause!r}")
            coefs[val] = coefs.get(val, 0.0) + coef
            sign, expect_term = 1.0, False
            continue
        raise ConditionError(f"unexpected {val!r} in clause {clause!r} (conditions are linear in n, o, d; "
                             "e.g. 'n - o > 0.02 +/- 0.01')")
    if expect_term:
        raise ConditionError(f"expression ends with an operator in clause {clause!r}")
    return coefs, const


def _fmt_num(x: float) -> str:
    return f"{x:.12g}"


def _canonical(coefs: dict[str, float], const: float) -> str:
    parts: list[str] = []
    for v in VARIABLES:
        a = coefs.get(v, 0.0)
        if a == 0.0:
            continue
        mag = "" if abs(a) == 1.0 else _fmt_num(abs(a)) + "*"
        if not parts:
            parts.append(("-" if a < 0 else "") + mag + v)
        else:
            parts.append(("- " if a < 0 else "+ ") + mag + v)
    if const != 0.0:
        parts.append(("- " if const < 0 else "+ ") + _fmt_num(abs(const)) if parts else _fmt_num(const))
    return " ".join(parts) if parts else "0"


def _parse_clause(text: str) -> Clause:
    toks = _tokens(text)
    if not toks:
        raise ConditionError("empty clause (clauses are joined by /\\)")
    pms = [i for i, t in enumerate(toks) if t[0] == "pm"]
    if not pms:
        raise ConditionError(f"clause {text.strip()!r} has no tolerance: write e.g. "
                             "'n - o > 0.02 +/- 0.01' (the sample size grows as 1/eps²)")
    if len(pms) > 1:
        raise ConditionError(f"clause {text.strip()!r} has more than one '+/-'")
    tol = toks[pms[0] + 1:]
    if len(tol) != 1 or tol[0][0] != "num":
        raise ConditionError(f"the tolerance after '+/-' must be one positive number in clause {text.strip()!r}")
    eps = float(tol[0][1])
    if not (0 < eps < 1) or not math.isfinite(eps):
        raise ConditionError(f"the tolerance must be in (0, 1), got {tol[0][1]} in clause {text.strip()!r}")
    body = toks[:pms[0]]
    ops = [i for i, t in enumerate(body) if t[0] == "op"]
    if len(ops) != 1:
        raise ConditionError(f"clause {text.strip()!r} needs exactly one comparison, > or <")
    op = body[ops[0]][1]
    if op not in (">", "<"):
        raise ConditionError(f"comparison {op!r} is not supported in clause {text.strip()!r}; use > or < "
                             "(with a tolerance the boundary itself is never decided)")
    if any(t == ("sym", "(") or t == ("sym", ")") for t in body):
        raise ConditionError(f"parentheses are not supported in clause {text.strip()!r}; write the linear "
                             "expression out (e.g. n - o, 2*n - o)")
    lc, lk = _linear(body[:ops[0]], text.strip())
    rc, rk = _linear(body[ops[0] + 1:], text.strip())
    coefs = {v: lc.get(v, 0.0) - rc.get(v, 0.0) for v in VARIABLES}
    coefs = {v: a for v, a in coefs.items() if a != 0.0}
    if not coefs:
        raise ConditionError(f"clause {text.strip()!r} has no variable (n, o or d) once both sides are combined")
    threshold = rk - lk
    # canonical: variables on the left, constant on the right, the user's direction kept
    canon = f"{_canonical(coefs, 0.0)} {op} {_fmt_num(threshold)} +/- {_fmt_num(eps)}"
    if op == "<":
        coefs = {v: -a for v, a in coefs.items()}
        threshold = -threshold
    return Clause(coefs=coefs, threshold=threshold, eps=eps, text=canon, op=op)


def parse_condition(text: str) -> Condition:
    """Parse ``"n - o > 0.02 +/- 0.01 /\\ d < 0.1 +/- 0.01"``; ConditionError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionError("empty condition; e.g. --condition 'n - o > 0.02 +/- 0.01'")
    if len(text) > 2000:
        raise ConditionError("condition too long (over 2000 characters)")
    parts = re.split(r"/\\|∧|&&", text)
    clauses = tuple(_parse_clause(p) for p in parts)
    if len(clauses) > 64:
        raise ConditionError("at most 64 clauses")
    return Condition(clauses)


# -- the bounds -------------------------------------------------------------------------------


def _check_budget(reliability: float, adaptivity: str, steps: int) -> None:
    if not isinstance(reliability, (int, float)) or not (0 < reliability < 1) or not math.isfinite(reliability):
        raise ConditionError(f"reliability must be in (0, 1), e.g. 0.999; got {reliability!r}")
    if adaptivity not in ADAPTIVITY:
        raise ConditionError(f"adaptivity must be one of {', '.join(ADAPTIVITY)}; got {adaptivity!r}")
    if not isinstance(steps, int) or steps < 1 or steps > 100_000:
        raise ConditionError(f"steps must be an integer from 1 to 100000; got {steps!r}")


def log_delta(reliability: float, variables: int, clauses: int, steps: int, adaptivity: str) -> float:
    """ln δ with δ = (1 − reliability)/(variables·clauses·H), H = steps, or 2^steps under full adaptivity.

    Computed in logs: 2^steps overflows floats past steps = 1023.
    """
    _check_budget(reliability, adaptivity, steps)
    uses = steps * math.log(2.0) if adaptivity == "full" else math.log(steps)
    return math.log1p(-reliability) - math.log(variables) - math.log(clauses) - uses


def hoeffding_n(eps: float, r: int, c: float, log_delta_: float) -> int:
    """N = −c²·r²·ln δ / (2·eps²), rounded up (the paper's sample size for one clause)."""
    return int(math.ceil(c * c * r * r * (-log_delta_) / (2.0 * eps * eps) - 1e-9))


def hoeffding_halfwidth(n: Any, log_delta_: float) -> np.ndarray:
    """t with P(mean − μ ≥ t) ≤ δ for n examples in [0, 1]: sqrt(−ln δ / (2n)); inf where n = 0."""
    n = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(n > 0, np.sqrt(-log_delta_ / (2.0 * np.maximum(n, 1e-300))), np.inf)


def _h(u: np.ndarray) -> np.ndarray:
    return (1.0 + u) * np.log1p(u) - u


def bennett_n(eps: float, variance: float, bound: float, log_delta_: float) -> int:
    """Bennett: N = b²·ln(1/δ) / (v·h(b·eps/v)) for per-item deviations ≤ b and variance ≤ v."""
    u = bound * eps / variance
    return int(math.ceil(bound * bound * (-log_delta_) / (variance * float(_h(np.array(u)))) - 1e-9))


def bernstein_n(eps: float, variance: float, bound: float, log_delta_: float) -> int:
    """Bernstein: N = ln(1/δ)·(2v + 2b·eps/3) / eps² (a closed form a little looser than Bennett)."""
    return int(math.ceil((-log_delta_) * (2.0 * variance + 2.0 * bound * eps / 3.0) / (eps * eps) - 1e-9))


def bennett_halfwidth(n: Any, variance: float, bound: float, log_delta_: float) -> np.ndarray:
    """t with exp(−n·v/b²·h(b·t/v)) = δ, i.e. Bennett's one-sided half-width at n examples (inf at n = 0)."""
    n = np.asarray(n, dtype=float)
    target = np.where(n > 0, (-log_delta_) * bound * bound / (variance * np.maximum(n, 1e-300)), np.inf)
    # solve h(u) = target for u (h increases from 0); bracket then bisect, vectorised
    lo = np.zeros_like(target)
    hi = np.ones_like(target)
    finite = np.isfinite(target)
    for _ in range(200):
        grow = finite & (_h(hi) < target)
        if not grow.any():
            break
        hi = np.where(grow, hi * 2.0, hi)
    for _ in range(80):
        mid = (lo + hi) / 2.0
        below = _h(mid) < target
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return np.where(finite, hi * variance / bound, np.inf)


def _kl(a: np.ndarray, b: float) -> np.ndarray:
    """KL divergence between Bernoulli(a) and Bernoulli(b)."""
    a = np.clip(a, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(a > 0, a * np.log(a / b), 0.0)
        t2 = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
    return t1 + t2


def d_below(d_hat: Any, n: Any, p: float, log_delta_: float) -> np.ndarray:
    """True where the data show d <= p at confidence 1 − δ (Chernoff's bound in KL form).

    For a true d > p, P(d̂ ≤ a) ≤ exp(−n·KL(a‖p)) for every a < p, so accepting only when
    d̂ < p and n·KL(d̂‖p) ≥ ln(1/δ) wrongly accepts with probability at most δ.
    """
    d_hat = np.asarray(d_hat, dtype=float)
    n = np.asarray(n, dtype=float)
    ok = np.isfinite(d_hat) & (d_hat < p) & (n > 0)
    return ok & (n * _kl(np.nan_to_num(d_hat), p) >= -log_delta_)


# -- planning -------------------------------------------------------------------------------


@dataclass
class ClausePlan:
    """What one clause needs: the Hoeffding sample size and, when it applies, the variance-bound one."""

    clause: Clause
    r: int
    c: float
    log_delta: float
    examples: int  # Hoeffding N
    labels: int  # labelled examples among them (0 for a d-only clause)
    variance: dict | None = None  # the Bennett plan (see plan())

    def as_dict(self) -> dict:
        out = {"clause": self.clause.text, "variables": self.clause.variables, "r": self.r, "c": self.c,
               "delta": math.exp(self.log_delta), "hoeffding_examples": self.examples,
               "hoeffding_labels": self.labels}
        if self.variance is not None:
            out["variance"] = self.variance
        return out


@dataclass
class Plan:
    condition: Condition
    reliability: float
    adaptivity: str
    steps: int
    max_disagreement: float | None
    clauses: list[ClausePlan] = field(default_factory=list)

    @property
    def examples(self) -> int:
        return max(c.examples for c in self.clauses)

    @property
    def labels(self) -> int:
        return max(c.labels for c in self.clauses)

    @property
    def variance_examples(self) -> int | None:
        """Examples needed when the variance bound is used where it applies (None without a bound on d)."""
        if self.max_disagreement is None:
            return None
        return max(c.variance["examples"] if c.variance else c.examples for c in self.clauses)

    @property
    def variance_labels(self) -> int | None:
        """Labels expected under the variance bound: only disagreements need one (≤ p per example)."""
        if self.max_disagreement is None:
            return None
        return max(c.variance["labels"] if c.variance else c.labels for c in self.clauses)

    def as_dict(self) -> dict:
        return {"condition": self.condition.text, "reliability": self.reliability, "adaptivity": self.adaptivity,
                "steps": self.steps, "max_disagreement": self.max_disagreement,
                "hoeffding_examples": self.examples, "hoeffding_labels": self.labels,
                "variance_examples": self.variance_examples, "variance_labels": self.variance_labels,
                "clauses": [c.as_dict() for c in self.clauses]}


def _check_p(p: float | None) -> None:
    if p is not None and (not isinstance(p, (int, float)) or not (0 < p < 1) or not math.isfinite(p)):
        raise ConditionError(f"--max-disagreement must be in (0, 1), e.g. 0.1; got {p!r}")


def _variance_parts(cl: Clause, p: float, reliability: float, k: int, steps: int, adaptivity: str) -> dict | None:
    """The Bennett plan of a clause on ``a·(n − o) [+ e·d]`` under ``d ≤ p`` (None when it does not apply)."""
    a = cl.difference_coef()
    if a is None:
        return None
    others = [v for v in cl.variables if v not in ("n", "o")]  # only d can remain
    r2 = 1 + len(others)
    c2 = max([abs(a)] + [abs(cl.coefs[v]) for v in others])
    ld = log_delta(reliability, r2 + 1, k, steps, adaptivity)  # + 1: the check of d <= p
    eps_v = cl.eps / (c2 * r2)
    b = 1.0 + p
    n_w = bennett_n(eps_v, p, b, ld)
    n_d = hoeffding_n(cl.eps, r2, c2, ld) if others else 0
    examples = max(n_w, n_d)
    return {"variables": ["n - o"] + others, "r": r2, "c": c2, "delta": math.exp(ld), "log_delta": ld,
            "eps": eps_v, "variance": p, "range": b, "examples": examples, "difference_examples": n_w,
            "labels": int(math.ceil(p * n_w)), "bernstein_examples": bernstein_n(eps_v, p, b, ld)}


def plan(condition: Condition | str, reliability: float = 0.999, adaptivity: str = "none", steps: int = 32,
         max_disagreement: float | None = None) -> Plan:
    """Examples (and labels) each clause needs before any evaluation, by Hoeffding and by Bennett."""
    cond = parse_condition(condition) if isinstance(condition, str) else condition
    _check_budget(reliability, adaptivity, steps)
    _check_p(max_disagreement)
    k = len(cond.clauses)
    out = Plan(cond, reliability, adaptivity, steps, max_disagreement)
    for cl in cond.clauses:
        ld = log_delta(reliability, cl.r, k, steps, adaptivity)
        n = hoeffding_n(cl.eps, cl.r, cl.c, ld)
        var = _variance_parts(cl, max_disagreement, reliability, k, steps, adaptivity) \
            if max_disagreement is not None else None
        out.clauses.append(ClausePlan(cl, cl.r, cl.c, ld, n, n if cl.needs_labels else 0, var))
    return out


# -- deciding ----------------------------------------------------------------------------------

STAT_FIELDS = ("examples", "labelled", "new_correct", "old_correct", "differ", "differ_unlabelled")


def _arr(stats: dict, name: str) -> np.ndarray:
    try:
        return np.asarray(stats[name], dtype=float)
    except KeyError:
        raise ValueError(f"stats lack {name!r}; need {', '.join(STAT_FIELDS)}") from None


def decide(condition: Condition | str, stats: dict, reliability: float = 0.999, mode: str = "fp-free",
           adaptivity: str = "none", steps: int = 32, max_disagreement: float | None = None) -> dict:
    """Evaluate the condition on counts of one or many test sets (numpy arrays broadcast).

    ``stats``: ``examples`` (items both models predicted), ``labelled`` (of those, with a label),
    ``new_correct``/``old_correct`` (on the labelled items), ``differ`` (items whose predictions
    differ) and ``differ_unlabelled`` (differing items without a label; 0 means every
    disagreement is labelled, which lets the variance bound use all items for ``n − o``).

    Returns ``result`` (array of "pass" | "fail" | "insufficient"), the estimates ``n``, ``o``,
    ``d``, ``needed`` (examples the bound asks for) and ``more`` (how many are missing, 0 when
    decided on enough data), and ``clauses``: per clause the estimate, half-width, result and the
    bound used. See the module docstring for the rules and what each outcome guarantees.
    """
    cond = parse_condition(condition) if isinstance(condition, str) else condition
    if mode not in MODES:
        raise ConditionError(f"mode must be fp-free or fn-free; got {mode!r}")
    _check_budget(reliability, adaptivity, steps)
    _check_p(max_disagreement)
    N = _arr(stats, "examples")
    L = _arr(stats, "labelled")
    nc, oc, dif = _arr(stats, "new_correct"), _arr(stats, "old_correct"), _arr(stats, "differ")
    dif_unl = np.asarray(stats.get("differ_unlabelled", 0), dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_hat = np.where(L > 0, nc / np.maximum(L, 1), np.nan)
        o_hat = np.where(L > 0, oc / np.maximum(L, 1), np.nan)
        d_hat = np.where(N > 0, dif / np.maximum(N, 1), np.nan)
    est = {"n": n_hat, "o": o_hat, "d": d_hat}
    size = {"n": L, "o": L, "d": N}
    k = len(cond.clauses)
    shape = np.broadcast(N, L, nc, oc, dif).shape
    any_fail = np.zeros(shape, bool)
    all_pass = np.ones(shape, bool)
    needed = np.zeros(shape, float)
    more = np.zeros(shape, float)
    per: list[dict] = []
    for cl in cond.clauses:
        eps = cl.eps
        ld = log_delta(reliability, cl.r, k, steps, adaptivity)
        g = sum(cl.coefs[v] * est[v] for v in cl.variables) - cl.threshold
        eta = sum(abs(cl.coefs[v]) * hoeffding_halfwidth(size[v], ld) for v in cl.variables)
        need_h = hoeffding_n(eps, cl.r, cl.c, ld)
        need = np.full(shape, float(need_h))
        miss = np.zeros(shape, float)
        for v in cl.variables:
            miss = np.maximum(miss, need_h - size[v])
        bound = np.full(shape, "hoeffding", dtype=object)
        vp = _variance_parts(cl, max_disagreement, reliability, k, steps, adaptivity) \
            if max_disagreement is not None else None
        if vp is not None:
            p, b, ld2 = float(max_disagreement), vp["range"], vp["log_delta"]
            # the assumption d <= p, checked at confidence with its own share of δ
            ok = d_below(d_hat, N, p, ld2)
            complete = dif_unl == 0
            w_size = np.where(complete, N, L)
            with np.errstate(divide="ignore", invalid="ignore"):
                w_hat = np.where(w_size > 0, (nc - oc) / np.maximum(w_size, 1), np.nan)
            a = cl.difference_coef()
            others = [v for v in cl.variables if v not in ("n", "o")]
            g2 = a * w_hat + sum(cl.coefs[v] * est[v] for v in others) - cl.threshold
            eta2 = abs(a) * bennett_halfwidth(w_size, p, b, ld2) + \
                sum(abs(cl.coefs[v]) * hoeffding_halfwidth(size[v], ld2) for v in others)
            miss2 = np.maximum(0.0, vp["difference_examples"] - w_size)
            for v in others:
                miss2 = np.maximum(miss2, vp["examples"] - size[v])
            g = np.where(ok, g2, g)
            eta = np.where(ok, eta2, eta)
            need = np.where(ok, float(vp["examples"]), need)
            miss = np.where(ok, miss2, miss)
            bound = np.where(ok, "bennett", bound)
        m = np.maximum(eps, eta)
        if mode == "fp-free":
            ok_pass, ok_fail = g > m, g <= 2 * eps - m
        else:
            ok_pass, ok_fail = g > m - 2 * eps, g <= -m
        ok_pass = np.where(np.isnan(g), False, ok_pass)
        ok_fail = np.where(np.isnan(g), False, ok_fail)
        res = np.where(ok_fail, "fail", np.where(ok_pass, "pass", "insufficient"))
        any_fail |= ok_fail
        all_pass &= ok_pass
        needed = np.maximum(needed, need)
        more = np.maximum(more, np.where(res == "insufficient", np.maximum(miss, 0.0), 0.0))
        sign = 1.0 if cl.op == ">" else -1.0  # report the left side as the user wrote it
        per.append({"clause": cl.text, "estimate": sign * (g + cl.threshold), "threshold": sign * cl.threshold,
                    "eps": eps,
                    "halfwidth": eta, "result": res, "bound": bound, "needed": need})
    result = np.where(any_fail, "fail", np.where(all_pass, "pass", "insufficient"))
    return {"result": result, "n": n_hat, "o": o_hat, "d": d_hat, "needed": needed, "more": np.ceil(more),
            "clauses": per}
