"""The post-steps of the drift and schema checks: one run's io summaries compared with a reference run's.

The SQL of ``checks/drift.sql`` and ``checks/schema.sql`` selects the input summaries of the run
checked and of its reference run (one row per call: step, arg, side, reference_run, summary);
a check file that says ``-- post: drift`` or ``-- post: schema`` hands those rows to
:data:`POST_STEPS`. Histograms from different runs have different bin edges, so the drift
post-step merges each column's calls, rebins both sides onto the reference's range and computes
PSI and KS; the schema post-step compares columns, dtypes, null rates, ranges and categories.

Summaries are JSON written by ``@fl.step`` (docs/steps.md), read leniently: a top-level
``{"columns": {name: stats}}`` (or a list of ``{"name": ...}``), or one stats object for an
array-like value. Numeric stats: count, nulls, min, max, mean, histogram as
``{"edges", "counts"}`` / ``{"bins", "counts"}`` / ``[[lo, hi, count], ...]``. Categorical
stats: frequencies as a dict or ``[[value, count], ...]`` under top / values / frequencies /
categories.
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

import pyarrow as pa

_HIST_KEYS = ("histogram", "hist")
_FREQ_KEYS = ("frequencies", "freq", "categories", "top", "top_values", "values", "value_counts")
_EPS = 1e-4


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _hist(raw: Any) -> tuple[list[float], list[float]] | None:
    if isinstance(raw, dict):
        edges = raw.get("edges", raw.get("bins", raw.get("bin_edges")))
        counts = raw.get("counts", raw.get("count", raw.get("freq")))
        if isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1:
            e = [_num(x) for x in edges]
            c = [_num(x) or 0.0 for x in counts]
            if all(x is not None for x in e):
                return e, c
        return None
    if isinstance(raw, list) and raw and all(isinstance(b, (list, tuple)) and len(b) == 3 for b in raw):
        e = [_num(raw[0][0])] + [_num(b[1]) for b in raw]
        if all(x is not None for x in e):
            return e, [_num(b[2]) or 0.0 for b in raw]
    return None


def _freqs(stats: dict) -> dict[str, float] | None:
    for k in _FREQ_KEYS:
        raw = stats.get(k)
        if isinstance(raw, dict) and raw:
            return {str(a): _num(b) or 0.0 for a, b in raw.items()}
        if isinstance(raw, list) and raw:
            out = {}
            for item in raw:
                if isinstance(item, (list, tuple)) and len(item) == 2:
                    out[str(item[0])] = _num(item[1]) or 0.0
                elif isinstance(item, dict) and "value" in item:
                    out[str(item["value"])] = _num(item.get("count", item.get("n"))) or 0.0
            if out:
                return out
    return None


def _columns(summary: Any) -> dict[str, dict]:
    if isinstance(summary, str):
        try:
            summary = json.loads(summary)
        except ValueError:
            return {}
    if not isinstance(summary, dict):
        return {}
    cols = summary.get("columns")
    rows = _num(summary.get("rows", summary.get("n_rows", summary.get("length"))))
    out: dict[str, dict] = {}
    if isinstance(cols, dict):
        items = [(str(k), v) for k, v in cols.items() if isinstance(v, dict)]
    elif isinstance(cols, list):
        items = [(str(c.get("name")), c) for c in cols if isinstance(c, dict) and c.get("name") is not None]
    elif any(k in summary for k in ("min", "max", "mean") + _HIST_KEYS + _FREQ_KEYS):
        items = [("", summary)]
    else:
        items = []
    for name, st in items:
        d = dict(st)
        if rows is not None:
            d.setdefault("_rows", rows)
        out[name] = d
    return out


class _Profile:
    """One column's statistics merged over several calls."""

    def __init__(self) -> None:
        self.dtype: str | None = None
        self.count = 0.0
        self.nulls = 0.0
        self.rows = 0.0
        self.min: float | None = None
        self.max: float | None = None
        self.hists: list[tuple[list[float], list[float]]] = []
        self.freq: dict[str, float] | None = None
        self.distinct = 0.0
        self.complete = True  # frequencies cover every category

    def add(self, st: dict) -> None:
        dt = st.get("dtype", st.get("type"))
        if dt is not None:
            self.dtype = str(dt)
        cnt = _num(st.get("count", st.get("n"))) or 0.0
        nul = _num(st.get("nulls", st.get("null_count", st.get("missing")))) or 0.0
        self.count += cnt
        self.nulls += nul
        # count and nulls describe the same (possibly sampled) values; rows is the fallback
        self.rows += (cnt + nul) or _num(st.get("rows", st.get("_rows"))) or 0.0
        for k, agg in (("min", min), ("max", max)):
            v = _num(st.get(k))
            if v is not None:
                cur = getattr(self, k)
                setattr(self, k, v if cur is None else agg(cur, v))
        h = next((_hist(st[k]) for k in _HIST_KEYS if k in st), None)
        if h:
            self.hists.append(h)
        f = _freqs(st)
        if f is not None:
            self.freq = self.freq or {}
            for a, b in f.items():
                self.freq[a] = self.freq.get(a, 0.0) + b
            distinct = _num(st.get("distinct", st.get("n_distinct", st.get("unique"))))
            if distinct is not None and distinct > len(f):
                self.complete = False
            self.distinct = max(self.distinct, distinct or len(f))

    @property
    def numeric(self) -> bool:
        return self.min is not None or bool(self.hists)

    @property
    def null_rate(self) -> float:
        return self.nulls / self.rows if self.rows else 0.0

    def mass(self, edges: list[float]) -> list[float]:
        """Histogram mass on ``edges`` (plus under/overflow bins), spreading each bin uniformly."""
        out = [0.0] * (len(edges) + 1)
        for e, c in self.hists:
            for lo, hi, n in zip(e[:-1], e[1:], c):
                if n <= 0:
                    continue
                if hi <= lo:  # a point mass
                    out[_bin_of(edges, lo)] += n
                    continue
                for j in range(len(out)):
                    a = -math.inf if j == 0 else edges[j - 1]
                    b = math.inf if j == len(edges) else edges[j]
                    ov = min(hi, b) - max(lo, a)
                    if ov > 0:
                        out[j] += n * ov / (hi - lo)
        return out


def _bin_of(edges: list[float], x: float) -> int:
    import bisect

    return bisect.bisect_right(edges, x) if x != edges[-1] else len(edges) - 1


def _profiles(table: pa.Table) -> dict[tuple, dict[str, dict[str, _Profile]]]:
    """(step, arg, reference_run) -> side -> column -> merged profile."""
    out: dict[tuple, dict[str, dict[str, _Profile]]] = {}
    for row in table.to_pylist():
        key = (row["step"], row["arg"], row["reference_run"])
        side = out.setdefault(key, {"current": {}, "reference": {}})[row["side"]]
        for col, st in _columns(row["summary"]).items():
            side.setdefault(col, _Profile()).add(st)
    return out


def _psi(p: Sequence[float], q: Sequence[float]) -> float:
    sp, sq = sum(p), sum(q)
    if sp <= 0 or sq <= 0:
        return 0.0
    total = 0.0
    for a, b in zip(p, q):
        a, b = max(a / sp, _EPS), max(b / sq, _EPS)
        total += (a - b) * math.log(a / b)
    return total


def _ks(p: Sequence[float], q: Sequence[float]) -> float:
    sp, sq = sum(p), sum(q)
    if sp <= 0 or sq <= 0:
        return 0.0
    fa = fb = best = 0.0
    for a, b in zip(p, q):
        fa += a / sp
        fb += b / sq
        best = max(best, abs(fa - fb))
    return best


def _grid(ref: _Profile, cur: _Profile, bins: int = 20) -> list[float] | None:
    lo = ref.min if ref.min is not None else min((h[0][0] for h in ref.hists), default=None)
    hi = ref.max if ref.max is not None else max((h[0][-1] for h in ref.hists), default=None)
    if lo is None or hi is None:
        return None
    if hi <= lo:
        return [lo, lo]
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


_DRIFT_SCHEMA = pa.schema([("step", pa.string()), ("arg", pa.string()), ("column", pa.string()),
                           ("kind", pa.string()), ("psi", pa.float64()), ("ks", pa.float64()),
                           ("reference_run", pa.string())])


def _drift_post(table: pa.Table, params: dict[str, Any]) -> pa.Table:
    """PSI (numeric and categorical) and KS (numeric) of each input column vs the reference."""
    rows = []
    for (step, arg, ref_run), sides in _profiles(table).items():
        for col, cur in sides["current"].items():
            ref = sides["reference"].get(col)
            if ref is None:
                continue
            psi = ks = None
            kind = "numeric"
            if ref.hists and cur.hists:
                edges = _grid(ref, cur)
                if edges is not None:
                    p, q = cur.mass(edges), ref.mass(edges)
                    psi, ks = _psi(p, q), _ks(p, q)
            elif ref.freq and cur.freq:
                kind = "categorical"
                cats = sorted(set(ref.freq) | set(cur.freq))
                p = [cur.freq.get(c, 0.0) for c in cats]
                q = [ref.freq.get(c, 0.0) for c in cats]
                psi = _psi(p, q)
            if psi is None:
                continue
            if psi > float(params.get("psi", 0.2)) or (ks is not None and ks > float(params.get("ks", 0.2))):
                rows.append({"step": step, "arg": arg, "column": col, "kind": kind, "psi": round(psi, 4),
                             "ks": None if ks is None else round(ks, 4), "reference_run": ref_run})
    return pa.Table.from_pylist(rows, schema=_DRIFT_SCHEMA)


_SCHEMA_SCHEMA = pa.schema([("step", pa.string()), ("arg", pa.string()), ("column", pa.string()),
                            ("problem", pa.string()), ("reference", pa.string()), ("current", pa.string()),
                            ("reference_run", pa.string())])


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _schema_post(table: pa.Table, params: dict[str, Any]) -> pa.Table:
    """Compare each input's column profile with the one inferred from the reference run."""
    tol = float(params.get("null_tolerance", 0.05))
    margin = float(params.get("range_margin", 0.25))
    min_share = float(params.get("min_share", 0.01))
    rows = []
    for (step, arg, ref_run), sides in _profiles(table).items():
        cur_cols, ref_cols = sides["current"], sides["reference"]
        if not ref_cols:
            continue

        def bad(col, problem, ref, cur):
            rows.append({"step": step, "arg": arg, "column": col, "problem": problem,
                         "reference": _fmt(ref), "current": _fmt(cur), "reference_run": ref_run})

        for col in sorted(set(ref_cols) - set(cur_cols)):
            bad(col, "missing column", "present", "absent")
        for col in sorted(set(cur_cols) - set(ref_cols)):
            bad(col, "unexpected column", "absent", "present")
        for col in sorted(set(cur_cols) & set(ref_cols)):
            c, r = cur_cols[col], ref_cols[col]
            if c.dtype and r.dtype and c.dtype != r.dtype:
                bad(col, "dtype changed", r.dtype, c.dtype)
            if c.null_rate > r.null_rate + tol:
                bad(col, "null rate", round(r.null_rate, 4), round(c.null_rate, 4))
            if r.min is not None and r.max is not None and c.min is not None and c.max is not None:
                span = max(r.max - r.min, abs(r.max) * 1e-9, 1e-12)
                if c.min < r.min - margin * span or c.max > r.max + margin * span:
                    bad(col, "out of range", f"[{r.min:.6g}, {r.max:.6g}]", f"[{c.min:.6g}, {c.max:.6g}]")
            if r.freq is not None and c.freq is not None:
                total = sum(r.freq.values()) or 1.0
                if r.complete:
                    new = sorted(k for k, v in c.freq.items() if v > 0 and k not in r.freq)
                    if new:
                        bad(col, "new categories", f"{len(r.freq)} known", ", ".join(new[:10]))
                if c.complete:
                    gone = sorted(k for k, v in r.freq.items() if v / total >= min_share and c.freq.get(k, 0) <= 0)
                    if gone:
                        bad(col, "missing categories", ", ".join(gone[:10]), "absent")
    return pa.Table.from_pylist(rows, schema=_SCHEMA_SCHEMA)


# what ``-- post: NAME`` in a check file names: called with the check's rows and params, returns the evidence
POST_STEPS = {"drift": _drift_post, "schema": _schema_post}
