"""Health checks: SQL files run against one run, each a pass/warn/fail with evidence rows.

A check is one ``.sql`` file (``query/checks/`` ships the built-ins; users add
a folder with ``--checks-dir`` or ``./flightlog_checks/``). Its header comment
says what it is::

    -- name: divergence
    -- severity: error            (error -> the check fails, warn -> it warns)
    -- description: a loss spikes far above its running minimum
    -- param factor = 3.0 : what the threshold means
    -- post: drift                (optional: a built-in Python post-step, query/drift.py)

The body is one read-only SELECT. Every row it returns is evidence of a
problem; no rows means the check passes. Values come in as DuckDB named
parameters, never by string formatting: ``$run_id`` (the run checked),
``$run_ids`` (it and the runs it resumed from), ``$reference`` (the run given
with ``--reference``, or ``''``) and one ``$<param>`` per header param, whose
default the user overrides with ``--set <check>.<param>=VALUE``.

Before the checks run, the engine builds ``metric_points`` once: the run's
metrics summarised per point (an epoch when the metric has epochs, else one of
~200 step buckets), so that a dozen metric checks over 10M rows cost one scan.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa

from flightlog._errors import QueryError
from flightlog.query.drift import POST_STEPS

BUILTIN_DIR = Path(__file__).parent / "checks"
USER_DIR_NAME = "flightlog_checks"
SEVERITIES = ("error", "warn")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PARAM_LINE = re.compile(r"^param\s+([a-z][a-z0-9_]*)\s*=\s*('[^']*'|\"[^\"]*\"|[^\s:]+)\s*(?::\s*(.*))?$")
_PARAM_REF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_RESERVED = {"run_id", "run_ids", "reference"}
_BLOCK = 128  # steps per block of the metric pre-aggregation
_POINTS = 200  # points per metric when it has no epochs


# -- check files --------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    """One parsed check file."""

    name: str
    severity: str
    description: str
    sql: str
    params: dict[str, Any]
    param_help: dict[str, str]
    post: str | None
    path: str
    builtin: bool
    # (what, SQL) from "-- needs: what | SQL" lines: when a SQL's first value is 0/NULL/no row,
    # the check has nothing to look at and says SKIP ("no <what>") instead of PASS
    needs: list = dataclasses.field(default_factory=list)


def _parse_value(raw: str) -> Any:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw


def parse_check(text: str, path: str = "<string>", builtin: bool = False) -> Check:
    """Parse a check file's header and body; QueryError says what is wrong."""
    meta: dict[str, str] = {}
    params: dict[str, Any] = {}
    helps: dict[str, str] = {}
    needs: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines) and (lines[i].strip().startswith("--") or not lines[i].strip()):
        line = lines[i].strip()[2:].strip() if lines[i].strip() else ""
        i += 1
        m = _PARAM_LINE.match(line)
        if m:
            params[m.group(1)] = _parse_value(m.group(2))
            helps[m.group(1)] = (m.group(3) or "").strip()
            continue
        if line.startswith("param ") or line.startswith("param\t"):
            raise QueryError(f"check file {path}: cannot read {line!r} (expected: param NAME = VALUE : help)")
        k, sep, v = line.partition(":")
        if sep and k.strip() == "needs":
            what, bar, q = v.partition("|")
            if not bar or not what.strip() or not q.strip():
                raise QueryError(f"check file {path}: cannot read {line!r} (expected: needs: WHAT | SQL)")
            needs.append((what.strip(), q.strip()))
            continue
        if sep and k.strip() in ("name", "severity", "description", "post"):
            meta[k.strip()] = v.strip()
    body = "\n".join(lines[i:]).strip().rstrip(";").strip()
    name = meta.get("name") or Path(path).stem
    where = f"check file {path}"
    if not _NAME.match(name):
        raise QueryError(f"{where}: check name {name!r} must be lower_snake_case")
    sev = meta.get("severity", "error")
    if sev not in SEVERITIES:
        raise QueryError(f"{where}: severity {sev!r} must be one of {', '.join(SEVERITIES)}")
    if not body:
        raise QueryError(f"{where}: no SQL after the header")
    bad = set(params) & _RESERVED
    if bad:
        raise QueryError(f"{where}: param name(s) {', '.join(sorted(bad))} are reserved")
    post = meta.get("post") or None
    if post is not None and post not in POST_STEPS:
        raise QueryError(f"{where}: unknown post-step {post!r} (known: {', '.join(POST_STEPS)})")
    return Check(name, sev, meta.get("description", ""), body, params, helps, post, path, builtin, needs)


def _dirs(checks_dir: str | os.PathLike | Sequence | None) -> list[tuple[Path, bool]]:
    out = [(BUILTIN_DIR, True)]
    if checks_dir is None:
        cwd_dir = Path.cwd() / USER_DIR_NAME
        if cwd_dir.is_dir():
            out.append((cwd_dir, False))
        return out
    dirs = [checks_dir] if isinstance(checks_dir, (str, os.PathLike)) else list(checks_dir)
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise QueryError(f"checks directory {p} does not exist")
        out.append((p, False))
    return out


def load_checks(checks_dir: str | os.PathLike | Sequence | None = None) -> dict[str, Check]:
    """Built-in checks plus the user's (a user check with a built-in's name replaces it)."""
    checks: dict[str, Check] = {}
    for d, builtin in _dirs(checks_dir):
        for f in sorted(d.glob("*.sql")):
            try:
                text = f.read_text()
            except OSError as e:
                raise QueryError(f"cannot read check file {f}: {e}") from e
            c = parse_check(text, str(f), builtin)
            checks[c.name] = c
    return checks


def _coerce_override(check: Check, param: str, value: Any) -> Any:
    default = check.params[param]
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise QueryError(f"--set {check.name}.{param}: {value!r} is not a {type(default).__name__}") from None
    return value


def apply_overrides(checks: dict[str, Check], overrides: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each check's params after ``check.param=value`` overrides; unknown names are an error."""
    out = {name: dict(c.params) for name, c in checks.items()}
    for key, value in (overrides or {}).items():
        cname, dot, param = str(key).partition(".")
        if not dot or cname not in checks:
            raise QueryError(f"--set {key}: expected CHECK.PARAM with CHECK one of: {', '.join(sorted(checks))}")
        c = checks[cname]
        if param not in c.params:
            known = ", ".join(sorted(c.params)) or "none"
            raise QueryError(f"--set {key}: check {cname!r} has no param {param!r} (params: {known})")
        out[cname][param] = _coerce_override(c, param, value)
    return out


# -- results ------------------------------------------------------------------------


@dataclasses.dataclass
class CheckResult:
    """The outcome of one check: status is pass, warn, fail, skip (nothing to look at) or error (it broke)."""

    name: str
    severity: str
    status: str
    description: str
    evidence: pa.Table
    params: dict[str, Any]
    error: str | None = None
    seconds: float = 0.0
    reason: str | None = None  # why it was skipped

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "warn", "skip")

    def __repr__(self) -> str:
        extra = f", {self.evidence.num_rows} evidence rows" if self.evidence.num_rows else ""
        if self.error:
            extra = f", error: {self.error}"
        return f"<CheckResult {self.name}: {self.status}{extra}>"


class HealthReport(list):
    """The results of one ``health`` call, in check order; ``ok`` is False when any check failed."""

    def __init__(self, results: Iterable[CheckResult], run_id: str, reference: str | None) -> None:
        super().__init__(results)
        self.run_id = run_id
        self.reference = reference

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self)

    def failed(self, level: str = "error") -> list[CheckResult]:
        """Results that count as failures at ``level`` (``error``: fail/error; ``warn``: also warn)."""
        bad = {"fail", "error"} | ({"warn"} if level == "warn" else set())
        return [r for r in self if r.status in bad]

    def __getitem__(self, key):  # report["divergence"] as well as report[0]
        if isinstance(key, str):
            for r in self:
                if r.name == key:
                    return r
            raise KeyError(key)
        return super().__getitem__(key)

    def summary(self) -> dict[str, int]:
        counts = {"pass": 0, "warn": 0, "fail": 0, "error": 0, "skip": 0}
        for r in self:
            counts[r.status] += 1
        return counts

    def to_table(self) -> pa.Table:
        """One row per check: name, severity, status, evidence row count, description."""
        return pa.table({
            "check": [r.name for r in self],
            "severity": [r.severity for r in self],
            "status": [r.status for r in self],
            "evidence_rows": pa.array([r.evidence.num_rows for r in self], pa.int64()),
            "description": [r.error or r.reason or r.description for r in self],
        })

    def __repr__(self) -> str:
        s = self.summary()
        head = (f"<HealthReport run={self.run_id} ok={self.ok}: {s['pass']} pass, {s['warn']} warn, "
                f"{s['fail']} fail, {s['error']} error, {s['skip']} skip>")
        lines = [head] + [f"  {r.status.upper():5} {r.name}"
                          + (f" ({r.evidence.num_rows} rows)" if r.evidence.num_rows else "")
                          + (f": {r.error}" if r.error else "") + (f": {r.reason}" if r.reason else "")
                          for r in self if r.status != "pass"]
        return "\n".join(lines)


# -- running --------------------------------------------------------------------------


def _prepare_metric_points(con, run_ids: list[str]) -> None:
    names = {f"r{i}": rid for i, rid in enumerate(run_ids)}
    cond = " OR ".join(f"run_id = ${k}" for k in names)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE metric_points AS
        WITH raw AS (
            SELECT name, epoch, step, CASE WHEN isfinite(value) THEN value END AS v
            FROM metrics WHERE ({cond}) AND value IS NOT NULL
        ), b AS (
            SELECT name, epoch, step // {_BLOCK} AS blk, count(*) AS n, count(*) - count(v) AS n_bad,
                   min(CASE WHEN v IS NULL THEN step END) AS first_bad_step,
                   sum(v) AS s, count(v) AS nf, min(v) AS lo, max(v) AS hi,
                   min(step) AS first_step, max(step) AS last_step
            FROM raw
            GROUP BY name, epoch, blk
        ), info AS (
            SELECT name, bool_or(epoch IS NOT NULL) AS has_epoch, max(blk) AS max_blk FROM b GROUP BY name
        ), p AS (
            SELECT b.*, CASE WHEN i.has_epoch THEN b.epoch
                             ELSE CAST(CAST(b.blk AS HUGEINT) * {_POINTS} // (CAST(i.max_blk AS HUGEINT) + 1)
                                       AS BIGINT) END AS point
            FROM b JOIN info i ON i.name = b.name
        )
        SELECT name, point, min(epoch) AS epoch, CAST(sum(n) AS BIGINT) AS n, CAST(sum(n_bad) AS BIGINT) AS n_bad,
               min(first_bad_step) AS first_bad_step,
               sum(s) / nullif(sum(nf), 0) AS mean, min(lo) AS min, max(hi) AS max,
               min(first_step) AS first_step, max(last_step) AS last_step
        FROM p GROUP BY name, point""", names)


def _bind(sql: str, params: dict[str, Any]) -> dict[str, Any]:
    used = set(_PARAM_REF.findall(sql))
    missing = used - set(params)
    if missing:
        raise QueryError(f"unknown parameter(s) {', '.join('$' + m for m in sorted(missing))}")
    return {k: v for k, v in params.items() if k in used}


def _run_check(con, check: Check, params: dict[str, Any], base: dict[str, Any]) -> CheckResult:
    import duckdb

    from flightlog.query import db

    t0 = time.perf_counter()
    try:
        for what, q in check.needs:
            db.check_read_only(con, q)
            got = con.execute(q, _bind(q, {**base, **params})).fetchall()
            if not got or not got[0] or not got[0][0]:
                shown = _PARAM_REF.sub(lambda m: repr(params.get(m.group(1), "$" + m.group(1))), what)
                return CheckResult(check.name, check.severity, "skip", check.description, pa.table({}), params,
                                   seconds=time.perf_counter() - t0, reason=f"nothing to look at: no {shown}")
        db.check_read_only(con, check.sql)
        binds = _bind(check.sql, {**base, **params})
        table = db.sql_arrow(con, check.sql, binds)
        if check.post:
            table = POST_STEPS[check.post](table, params)
    except (duckdb.Error, QueryError, ValueError, TypeError, KeyError) as e:
        msg = db._clean(e)
        return CheckResult(check.name, check.severity, "error", check.description, pa.table({}), params,
                           error=msg, seconds=time.perf_counter() - t0)
    status = "pass" if table.num_rows == 0 else ("fail" if check.severity == "error" else "warn")
    return CheckResult(check.name, check.severity, status, check.description, table, params,
                       seconds=time.perf_counter() - t0)


def health(run: str = "latest", *, store: str | os.PathLike | None = None, checks: Sequence[str] | None = None,
           params: dict[str, Any] | None = None, reference: str | None = None,
           checks_dir: str | os.PathLike | Sequence | None = None) -> HealthReport:
    """Run the health checks on ``run`` and return a :class:`HealthReport` (``.ok``, one result per check).

    ``params`` overrides thresholds as ``{"divergence.factor": 5}``; ``reference``
    is the run drift/schema compare against (default: the previous finished run
    of the same project that called the same step).
    """
    from flightlog._read import active_store
    from flightlog.query import db

    store = active_store(store)
    available = load_checks(checks_dir)
    chosen = list(available) if not checks else list(dict.fromkeys(checks))
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise QueryError(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(sorted(available))}")
    all_params = apply_overrides(available, params)
    con = db.connect(store)
    try:
        rid = db.resolve_run(con, run)
        ref = db.resolve_run(con, reference) if reference else ""
        chain = db.run_chain(con, rid)
        if any("metric_points" in available[c].sql for c in chosen):
            try:
                _prepare_metric_points(con, chain)
            except __import__("duckdb").Error as e:  # stored values it cannot digest: the checks that need it report an error
                logging.getLogger("flightlog").warning("flightlog: metric summary for the health checks failed: %s", str(e).splitlines()[0])
        base = {"run_id": rid, "run_ids": chain, "reference": ref}
        results = [_run_check(con, available[c], all_params[c], base) for c in chosen]
    finally:
        con.close()
    return HealthReport(results, rid, ref or None)
