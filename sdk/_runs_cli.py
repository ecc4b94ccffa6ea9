"""``flightlog runs | compare | tag | note``: see, compare, find and label runs.

``runs`` lists runs with what tells them apart: name, tags, the params that
differ between the listed runs and the last value of the main metrics.
``compare`` puts two or more runs side by side. ``tag`` and ``note`` append a
newer ``runs`` row carrying the new tags/notes (the table is append-only; the
row with the newest ``annotated_at`` decides tags and notes, so a live run's
own heartbeat rows do not undo them).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from typing import Any

import pyarrow as pa

from flightlog import _format
from flightlog._cli_core import _con, add_store
from flightlog._errors import QueryError, StoreError

STATUSES = ("running", "finished", "failed", "killed", "crashed")
SYS_PREFIX = "sys/"
MAIN_METRICS = 3  # the most logged metrics shown when --metrics is not given


def _width() -> int:
    try:
        return max(60, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return shutil.get_terminal_size((100, 24)).columns


def _tags(raw: Any) -> list[str]:
    try:
        v = json.loads(raw) if raw else []
    except (TypeError, ValueError):
        return []
    return [str(t) for t in v] if isinstance(v, list) else []


def _params(raw: Any) -> dict:
    try:
        v = json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=repr)


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=repr)
    return str(v)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_type(values: list) -> str:
    vals = [v for v in values if v is not None]
    if vals and all(isinstance(v, bool) for v in vals):
        return "BOOLEAN"
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return "DOUBLE"
    return "VARCHAR"


# -- runs ------------------------------------------------------------------------------

def configure_runs(p):
    add_store(p)
    p.add_argument("--project", default=None, help="only runs of this project")
    p.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="only runs with this tag (repeat: runs with every one of them)")
    p.add_argument("--status", default=None, metavar="STATUS[,STATUS]",
                   help=f"only runs with this status ({', '.join(STATUSES)}; comma-separated for several)")
    p.add_argument("--where", default=None, metavar="SQL",
                   help="only runs for which this SQL predicate holds; columns: those of the runs table, "
                        "and each param by name (also as p.<name>), e.g. \"lr < 0.01 AND status = 'finished'\"")
    p.add_argument("--metrics", default=None, metavar="NAME[,NAME]",
                   help=f"show the last value of these metrics (default: the {MAIN_METRICS} most logged, "
                        "sys/... excluded)")
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--output", default=None, help="write to this file instead of stdout")


def _where_sql(con, where: str) -> tuple[str, list[str]]:
    """A SELECT of run ids for ``--where``: runs' columns plus one column per param (and struct ``p``)."""
    rows = con.execute("SELECT params FROM runs").fetchall()
    values: dict[str, list] = {}
    for (raw,) in rows:
        for k, v in _params(raw).items():
            values.setdefault(k, []).append(v)
    run_cols = {d[0].lower() for d in con.execute("SELECT * FROM runs LIMIT 0").description}
    exprs, struct = [], []
    for k, vals in sorted(values.items()):
        typ = _sql_type(vals)
        path = "'$." + json.dumps(k).replace("'", "''") + "'"
        e = (f"TRY_CAST(json_extract(params, {path}) AS {typ})" if typ != "VARCHAR"
             else f"json_extract_string(params, {path})")
        struct.append(f"{_sql_str(k)}: {e}")
        if k.lower() not in run_cols and k.lower() != "p":
            exprs.append(f"{e} AS {_ident(k)}")
    cols = ", ".join(["r.*"] + exprs + ([f"{{{', '.join(struct)}}} AS p"] if struct else []))
    return f"SELECT run_id FROM (SELECT {cols} FROM runs r) WHERE ({where})", list(values)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _last_values(con, run_ids: list[str], names: list[str]) -> dict[tuple[str, str], float]:
    if not run_ids or not names:
        return {}
    rows = con.execute(
        "SELECT run_id, name, arg_max(value, (step, wall_time)) FROM metrics "
        "WHERE list_contains(?, run_id) AND list_contains(?, name) GROUP BY 1, 2", [run_ids, names]).fetchall()
    return {(r, n): v for r, n, v in rows}


def _main_metrics(con, run_ids: list[str], asked: str | None) -> list[str]:
    if asked is not None:
        names = [n.strip() for n in asked.split(",") if n.strip()]
        if not names:
            raise QueryError("--metrics needs at least one metric name")
        known = {r[0] for r in con.execute("SELECT DISTINCT name FROM metrics WHERE list_contains(?, run_id)",
                                           [run_ids]).fetchall()}
        missing = [n for n in names if n not in known]
        if missing and run_ids:
            import difflib

            hints = [f"{m} (did you mean {', '.join(difflib.get_close_matches(m, sorted(known), 3))}?)"
                     if difflib.get_close_matches(m, sorted(known), 3) else m for m in missing]
            raise QueryError(f"no metric named {'; '.join(hints)} in the listed runs")
        return names
    rows = con.execute(
        "SELECT name FROM metrics WHERE list_contains(?, run_id) AND NOT starts_with(name, ?) "
        "GROUP BY name ORDER BY count(*) DESC, name LIMIT ?", [run_ids, SYS_PREFIX, MAIN_METRICS]).fetchall()
    return [r[0] for r in rows]


def list_runs(args) -> dict:
    """The runs ``flightlog runs`` shows: rows, differing param names and metric names."""
    from flightlog.query import db

    statuses = None
    if args.status:
        statuses = [s.strip() for s in args.status.split(",") if s.strip()]
        bad = [s for s in statuses if s not in STATUSES]
        if bad or not statuses:
            raise QueryError(f"unknown status {', '.join(bad) or repr(args.status)}; known: {', '.join(STATUSES)}")
    if args.limit < 1:
        raise QueryError(f"--limit must be at least 1, got {args.limit}")
    con = _con(args)
    try:
        conds = ["kind IS DISTINCT FROM 'replay'"]
        params: list = []
        if args.project is not None:
            conds.append("project = ?")
            params.append(args.project)
        for t in args.tag:
            conds.append("coalesce(list_contains(TRY_CAST(TRY_CAST(tags AS JSON) AS VARCHAR[]), ?), false)")
            params.append(t)
        if statuses:
            conds.append("list_contains(?, status)")
            params.append(statuses)
        if args.where:
            sub, _ = _where_sql(con, args.where)
            db.check_read_only(con, sub)
            conds.append(f"run_id IN ({sub})")
        sql = ("SELECT run_id, project, name, kind, status, started_at, ended_at, "
               "round(epoch(coalesce(ended_at, updated_at)) - epoch(started_at), 1) AS duration_s, "
               "tags, notes, params, parent_run_id FROM runs WHERE " + " AND ".join(conds) +
               " ORDER BY started_at DESC LIMIT ?")
        try:
            rows = db.sql_arrow(con, sql, params + [args.limit]).to_pylist()
        except Exception as e:
            import duckdb

            if isinstance(e, duckdb.Error) and args.where:
                raise QueryError(f"bad --where predicate {args.where!r}: {db._clean(e)}") from e
            raise
        ids = [r["run_id"] for r in rows]
        metrics = _main_metrics(con, ids, args.metrics)
        last = _last_values(con, ids, metrics)
    finally:
        con.close()
    plist = [_params(r["params"]) for r in rows]
    keys: list[str] = []
    for p in plist:
        keys.extend(k for k in p if k not in keys)
    if len(rows) > 1:
        differing = [k for k in keys if len({_canon(p.get(k, "\0missing")) for p in plist}) > 1]
    else:
        differing = keys
    for r, p in zip(rows, plist):
        r["tags"] = _tags(r["tags"])
        r["params"] = p
        r["metrics"] = {m: last.get((r["run_id"], m)) for m in metrics}
    return {"runs": rows, "params": differing, "metrics": metrics}


def _duration(s: Any) -> str:
    if s is None:
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.1f}h"


def _fit(cells: list[list[str]], header: list[str], right: list[bool], width: int,
         fixed: int) -> tuple[str, list[str]]:
    """Render the first ``fixed`` columns always and the others while they fit ``width``."""
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]
    keep, used, dropped = [], 0, []
    for i, w in enumerate(widths):
        need = w + (2 if keep else 0)
        if i < fixed or used + need <= width:
            keep.append(i)
            used += need
        else:
            dropped.append(header[i])

    def line(vals):
        return "  ".join(vals[i].rjust(widths[i]) if right[i] else vals[i].ljust(widths[i]) for i in keep).rstrip()

    out = [line(header), "  ".join("-" * widths[i] for i in keep)] + [line(r) for r in cells]
    return "\n".join(out), dropped


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def render_runs(res: dict, width: int) -> str:
    rows = res["runs"]
    if not rows:
        return "(no runs match)"
    pnames, mnames = res["params"], res["metrics"]
    header = ["run", "name", "status", "started", "dur", "tags"]
    taken = set(header)
    pcols = [("param " + k) if k in taken else k for k in pnames]
    taken |= set(pcols)
    mcols = [("last " + m) if m in taken else m for m in mnames]
    cells, right = [], [False] * 4 + [True, False] + [False] * len(pcols) + [True] * len(mcols)
    for r in rows:
        started = r["started_at"].strftime("%m-%d %H:%M") if isinstance(r["started_at"], _dt.datetime) else "-"
        row = [r["run_id"], _clip(r["name"] or "", 16), r["status"] or "", started, _duration(r["duration_s"]),
               _clip(",".join(r["tags"]), 16)]
        row += [_clip(_show(r["params"].get(k)), 12) for k in pnames]
        row += [_show(r["metrics"].get(m)) if r["metrics"].get(m) is not None else "-" for m in mnames]
        cells.append(row)
    header = header + [_clip(c, 16) for c in pcols] + [_clip(c, 16) for c in mcols]
    text, dropped = _fit(cells, header, right, width, fixed=5)
    text += f"\n({len(rows)} run{'s' if len(rows) != 1 else ''})"
    if dropped:
        import textwrap

        text += "\n" + textwrap.fill(f"not shown ({width} columns): {', '.join(dropped)}; see `flightlog compare`, "
                                     "--format csv/json, or pick columns with --metrics", width)
    return text


def run_runs(args) -> int:
    res = list_runs(args)
    if args.format == "json":
        text = json.dumps(_format._clean_float(res["runs"]), default=_format._json_default, indent=2) + "\n"
    elif args.format == "csv":
        cols: dict[str, list] = {c: [] for c in ("run_id", "project", "name", "kind", "status", "started_at",
                                                 "ended_at", "duration_s", "tags", "notes", "parent_run_id")}
        for k in res["params"]:
            cols.setdefault(f"param:{k}", [])
        for m in res["metrics"]:
            cols.setdefault(f"last:{m}", [])
        for r in res["runs"]:
            for c in cols:
                if c.startswith("param:"):
                    v = r["params"].get(c[6:])
                    cols[c].append(None if v is None else (_show(v) if not isinstance(v, (int, float)) else v))
                elif c.startswith("last:"):
                    cols[c].append(r["metrics"].get(c[5:]))
                elif c == "tags":
                    cols[c].append(",".join(r["tags"]))
                else:
                    cols[c].append(r[c])
        t = pa.table({c: pa.array([None if v is None else str(v) if isinstance(v, (dict, list)) else v
                                   for v in vals]) if vals else pa.array([], pa.string())
                      for c, vals in cols.items()})
        _format.write(t, "csv", args.output)
        return 0
    else:
        text = render_runs(res, _width()) + "\n"
    _write_text(text, args.output)
    return 0


def _write_text(text: str, output: str | None) -> None:
    if output:
        _format.check_output(output)
        with open(output, "w") as fh:
            fh.write(text)
    else:
        import sys

        sys.stdout.write(text)


# -- compare ---------------------------------------------------------------------------

def configure_compare(p):
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more runs: id, unique prefix, name or 'latest'")
    add_store(p)
    p.add_argument("--metrics", default=None, metavar="NAME[,NAME]", help="only these metrics (default: all)")
    p.add_argument("--no-health", action="store_true", help="skip the health checks (faster)")
    p.add_argument("--format", choices=("table", "json"), default="table")


def compare(args) -> dict:
    """Everything ``flightlog compare`` shows, as plain data."""
    from flightlog.query import db

    if len(args.runs) < 2:
        raise QueryError("compare needs at least two runs (e.g. flightlog compare RUN_A RUN_B)")
    con = _con(args)
    try:
        ids = [db.resolve_run(con, r) for r in args.runs]
        if len(set(ids)) < len(ids):
            dup = [f"{a!r} -> {i}" for a, i in zip(args.runs, ids) if ids.count(i) > 1]
            raise QueryError(f"the same run was given twice ({', '.join(dup)}); compare needs different runs")
        info = {r["run_id"]: r for r in db.sql_arrow(con, """
            SELECT run_id, project, name, kind, status, started_at, ended_at, tags, notes, params, script,
                   git_commit, round(epoch(coalesce(ended_at, updated_at)) - epoch(started_at), 1) AS duration_s
            FROM runs WHERE list_contains(?, run_id)""", [ids]).to_pylist()}
        where = "list_contains(?, run_id)"
        binds: list = [ids]
        if args.metrics:
            names = [n.strip() for n in args.metrics.split(",") if n.strip()]
            where += " AND list_contains(?, name)"
            binds.append(names)
        summ = db.sql_arrow(con, f"""
            SELECT run_id, name, count(*) AS n, min(value) AS min, max(value) AS max,
                   arg_max(value, (step, wall_time)) AS last, max(step) AS last_step
            FROM metrics WHERE {where} GROUP BY 1, 2""", binds).to_pylist()
        # the largest step every compared run logged, per metric: values there are comparable
        common = db.sql_arrow(con, f"""
            WITH s AS (SELECT name, step, count(DISTINCT run_id) AS k FROM metrics WHERE {where} GROUP BY 1, 2)
            SELECT name, max(step) AS step FROM s WHERE k = ? GROUP BY 1""", binds + [len(ids)]).to_pylist()
        at = {}
        if common:
            vals = db.sql_arrow(con, f"""
                WITH c AS (SELECT unnest(?) AS name, unnest(?) AS step)
                SELECT m.run_id, m.name, m.step, arg_max(m.value, m.wall_time) AS value
                FROM metrics m JOIN c ON m.name = c.name AND m.step = c.step
                WHERE list_contains(?, m.run_id) GROUP BY 1, 2, 3""",
                [[c["name"] for c in common], [c["step"] for c in common], ids]).to_pylist()
            for v in vals:
                at[(v["run_id"], v["name"])] = (v["step"], v["value"])
        ck = {r["run_id"]: r for r in db.sql_arrow(con, """
            SELECT run_id, count(*) FILTER (WHERE status = 'ok') AS ok, count(*) FILTER (WHERE status <> 'ok') AS failed,
                   CAST(sum(bytes) FILTER (WHERE status = 'ok') AS BIGINT) AS bytes, max(iteration) AS last_iteration
            FROM checkpoints WHERE list_contains(?, run_id) GROUP BY 1""", [ids]).to_pylist()}
    finally:
        con.close()
    params = {i: _params(info[i]["params"]) for i in ids}
    keys: list[str] = []
    for i in ids:
        keys.extend(k for k in params[i] if k not in keys)
    prows = [{"param": k, "differs": len({_canon(params[i].get(k, "\0missing")) for i in ids}) > 1,
              "values": {i: params[i].get(k) for i in ids}} for k in keys]
    prows.sort(key=lambda r: not r["differs"])
    by = {(s["run_id"], s["name"]): s for s in summ}
    mnames = sorted({s["name"] for s in summ}, key=lambda n: (n.startswith(SYS_PREFIX), n))
    mrows = []
    for n in mnames:
        row = {"metric": n, "runs": {}}
        cstep = next((c["step"] for c in common if c["name"] == n), None)
        row["common_step"] = cstep
        for i in ids:
            s = by.get((i, n))
            row["runs"][i] = None if s is None else {
                "n": s["n"], "last": s["last"], "min": s["min"], "max": s["max"], "last_step": s["last_step"],
                "at_common_step": at.get((i, n), (None, None))[1]}
        mrows.append(row)
    health = {}
    if not args.no_health:
        from flightlog.query.health import health as _health

        for i in ids:
            try:
                rep = _health(i, store=args.store)
                health[i] = {"summary": rep.summary(),
                             "not_ok": [{"check": r.name, "status": r.status} for r in rep
                                        if r.status not in ("pass", "skip")]}
            except Exception as e:  # a broken check must not hide the rest of the comparison
                health[i] = {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    runs = []
    for i in ids:
        r = info[i]
        runs.append({"run_id": i, "name": r["name"], "project": r["project"], "status": r["status"],
                     "started_at": r["started_at"], "duration_s": r["duration_s"], "tags": _tags(r["tags"]),
                     "notes": r["notes"], "script": r["script"], "git_commit": r["git_commit"],
                     "checkpoints": {k: v for k, v in (ck.get(i) or {"ok": 0, "failed": 0, "bytes": 0,
                                                                      "last_iteration": None}).items()
                                     if k != "run_id"},
                     "health": health.get(i)})
    return {"runs": runs, "params": prows, "metrics": mrows}


def _labels(runs: list[dict]) -> list[str]:
    names = [r["name"] for r in runs]
    out = []
    for r in runs:
        if r["name"] and names.count(r["name"]) == 1:
            out.append(_clip(r["name"], 18))
        else:
            out.append(r["run_id"][-6:] if r["run_id"] else "?")
    return out


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(vals):
        return "  ".join(v.rjust(w) if i >= right_from else v.ljust(w)
                         for i, (v, w) in enumerate(zip(vals, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def render_compare(res: dict) -> str:
    runs = res["runs"]
    ids = [r["run_id"] for r in runs]
    labels = _labels(runs)
    wide = 10 + sum(max(len(r["run_id"]), len(lb)) + 2 for r, lb in zip(runs, labels)) > _width()
    out = ["runs"]
    if wide:  # ids as a legend: a row of full ids would not fit the terminal
        out += [f"  {lb:<{max(map(len, labels))}}  {r['run_id']}" for r, lb in zip(runs, labels)] + [""]
    out.append(_table(["", *labels], ([] if wide else [["run id", *[r["run_id"] for r in runs]]]) + [
        ["status", *[r["status"] or "-" for r in runs]],
        ["started", *[r["started_at"].strftime("%Y-%m-%d %H:%M") if isinstance(r["started_at"], _dt.datetime)
                      else "-" for r in runs]],
        ["duration", *[_duration(r["duration_s"]) for r in runs]],
        ["tags", *[_clip(",".join(r["tags"]) or "-", 16 if wide else 24) for r in runs]],
        ["script", *[_clip(os.path.basename(r["script"] or "-"), 16 if wide else 24) for r in runs]],
    ]))
    out.append("\nparams (differences first, marked *)")
    if res["params"]:
        out.append(_table(["", *labels], [[("* " if p["differs"] else "  ") + p["param"],
                                           *[_clip(_show(p["values"][i]), 24) for i in ids]]
                                          for p in res["params"]]))
    else:
        out.append("  (no params recorded)")
    two = len(ids) == 2
    out.append("\nmetrics (last / min / max over the run; @step: the last step every run logged)")
    if res["metrics"]:
        rows = []
        for m in res["metrics"]:
            for stat in ("last", "min", "max", "at"):
                if stat == "at" and m["common_step"] is None:
                    continue
                key = "at_common_step" if stat == "at" else stat
                vals = [None if m["runs"][i] is None else m["runs"][i][key] for i in ids]
                label = f"@step {m['common_step']}" if stat == "at" else stat
                row = [m["metric"] if stat == "last" else "", label] + [_show(v) for v in vals]
                if two:
                    row.append(_show(vals[1] - vals[0]) if None not in vals else "-")
                rows.append(row)
        header = ["metric", "", *labels] + (["B - A"] if two else [])
        out.append(_table(header, rows, right_from=2))
    else:
        out.append("  (no metrics)")
    out.append("\ncheckpoints")
    out.append(_table(["", *labels], [
        ["ok", *[str(r["checkpoints"]["ok"]) for r in runs]],
        ["failed", *[str(r["checkpoints"]["failed"]) for r in runs]],
        ["MB", *[f"{(r['checkpoints']['bytes'] or 0) / 1e6:.2f}" for r in runs]],
        ["last iteration", *[_show(r["checkpoints"]["last_iteration"]) for r in runs]],
    ]))
    if any(r["health"] is not None for r in runs):
        out.append("\nhealth")
        hrows = []
        for r in runs:
            h = r["health"]
            hrows.append(h)
        verdict = []
        for h in hrows:
            if h is None:
                verdict.append("-")
            elif "error" in h:
                verdict.append("error: " + _clip(h["error"], 30))
            else:
                s = h["summary"]
                bad = [f"{x['status'].upper()} {x['check']}" for x in h["not_ok"]]
                verdict.append(("ok" if not any(x["status"] in ("fail", "error") for x in h["not_ok"]) else "FAIL")
                               + f" ({s.get('pass', 0)} pass" + (f", {s.get('skip', 0)} skip" if s.get("skip") else "")
                               + ")" + (": " + ", ".join(bad) if bad else ""))
        out.append(_table(["", *labels], [["verdict", *verdict]], right_from=99))
    if two:
        out.append(f"\n(A = {labels[0]}, B = {labels[1]})")
    return "\n".join(out)


def run_compare(args) -> int:
    res = compare(args)
    if args.format == "json":
        print(json.dumps(_format._clean_float(res), default=_format._json_default, indent=2))
    else:
        print(render_compare(res))
    return 0


# -- tag / note --------------------------------------------------------------------------

def configure_tag(p):
    p.add_argument("run", help="run id, unique prefix, name or 'latest'")
    p.add_argument("tags", nargs="+", metavar="TAG", help="tags to add (or remove with --remove)")
    p.add_argument("--remove", action="store_true", help="remove these tags instead of adding them")
    add_store(p)


def configure_note(p):
    p.add_argument("run", help="run id, unique prefix, name or 'latest'")
    p.add_argument("text", help="the note (replaces the run's note; \"\" clears it)")
    add_store(p)


def _newest_row(root: str, run_id: str) -> dict:
    """The run's newest stored row (raw: not the reader's derived status), by the readers' order."""
    import pyarrow.parquet as pq

    from flightlog.collector import schema, store

    best, key = None, None
    for f in store.table_files(root, "runs", [run_id]):
        try:
            from flightlog.collector import fs as _fs

            t = schema.conform("runs", pq.read_table(_fs.open_input(f) if _fs.is_remote(f) else f))
        except Exception:
            continue
        import pyarrow.compute as pc

        upd = pc.cast(t.column("updated_at"), pa.int64()).to_pylist()
        for j, st in enumerate(t.column("status").to_pylist()):
            k = (st is not None and st != "running", upd[j] if upd[j] is not None else -1)
            if key is None or k >= key:
                best, key = t.slice(j, 1), k
    if best is None:
        raise StoreError(f"run {run_id} has no readable runs row")
    return best


def annotate(store_arg: str | None, run: str, *, add: list[str] | None = None, remove: list[str] | None = None,
             notes: str | None = None) -> dict:
    """Append a runs row with new tags/notes for ``run``; returns {"run_id", "tags", "notes"}."""
    import pyarrow.compute as pc

    from flightlog import _config
    from flightlog.collector import store
    from flightlog.query import db

    for t in (add or []) + (remove or []):
        if not t.strip() or t != t.strip() or "," in t:
            raise QueryError(f"bad tag {t!r}: tags are non-empty, without commas or surrounding spaces")
    root = _config.store_home(store_arg)
    con = db.connect(store_arg)
    try:
        rid = db.resolve_run(con, run)
        cur = con.execute("SELECT tags, notes FROM runs WHERE run_id = ?", [rid]).fetchall()[0]
    finally:
        con.close()
    tags = _tags(cur[0])
    for t in add or []:
        if t not in tags:
            tags.append(t)
    gone = [t for t in remove or [] if t not in tags]
    if gone:
        raise QueryError(f"run {rid} has no tag {', '.join(map(repr, gone))} (its tags: {', '.join(tags) or 'none'})")
    tags = [t for t in tags if t not in (remove or [])]
    new_notes = cur[1] if notes is None else (notes or None)
    row = _newest_row(root, rid)
    now = _dt.datetime.now(_dt.timezone.utc)
    upd = pc.cast(row.column("updated_at"), pa.int64())[0].as_py()
    cols = {c: row.column(c) for c in row.column_names}
    cols["tags"] = pa.array([json.dumps(tags)], pa.string())
    cols["notes"] = pa.array([new_notes], pa.string())
    cols["annotated_at"] = pa.array([now], row.schema.field("annotated_at").type)
    if upd is not None:  # one microsecond newer: readers that take the newest row see the new labels too
        cols["updated_at"] = pa.array([upd + 1], pa.int64()).cast(row.schema.field("updated_at").type)
    store.LocalSink(root).write("runs", pa.table(cols))
    return {"run_id": rid, "tags": tags, "notes": new_notes}


def run_tag(args) -> int:
    res = annotate(args.store, args.run, add=None if args.remove else args.tags,
                   remove=args.tags if args.remove else None)
    print(f"run {res['run_id']}: tags {', '.join(res['tags']) or '(none)'}")
    return 0


def run_note(args) -> int:
    res = annotate(args.store, args.run, notes=args.text)
    print(f"run {res['run_id']}: " + (f"note {res['notes']!r}" if res["notes"] else "note cleared"))
    return 0
