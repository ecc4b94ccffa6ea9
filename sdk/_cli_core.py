"""``flightlog show | sql | compact``: the reading commands of the foundation (``runs``: _runs_cli)."""
from __future__ import annotations

import argparse
import json

import pyarrow as pa

from flightlog import _format
from flightlog._errors import QueryError, StoreError


def add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="store directory (default: $FLIGHTLOG_HOME or ./.flightlog)")


def _con(args):
    from flightlog.query import db

    con = db.connect(args.store)
    n = con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
    if n == 0:
        con.close()
        from flightlog import _config

        raise StoreError(f"the store at {_config.store_home(args.store)} holds no runs yet")
    return con


# `flightlog runs` lives in _runs_cli (with compare, tag and note).


# -- show ------------------------------------------------------------------------

def configure_show(p):
    p.add_argument("run", nargs="?", default="latest", help="run id, unique prefix, run name, or 'latest'")
    add_store(p)
    p.add_argument("--format", choices=("table", "json"), default="table")


def run_show(args) -> int:
    from flightlog._read import GOOD_REPLAY_ROWS
    from flightlog.query import db

    con = _con(args)
    try:
        rid = db.resolve_run(con, args.run)
        run = db.sql_arrow(con, "SELECT * FROM runs WHERE run_id = ?", [rid]).to_pylist()[0]
        metrics = db.sql_arrow(con, f"""
            SELECT name, count(*) AS n, min(value) AS min, max(value) AS max,
                   arg_max(value, step) AS last, min(step) AS first_step, max(step) AS last_step,
                   count(*) FILTER (WHERE source = 'replay') AS replayed
            FROM metrics m WHERE run_id = ? AND {GOOD_REPLAY_ROWS} GROUP BY name ORDER BY name""", [rid])
        ckpts = db.sql_arrow(con, """
            SELECT loop, iteration, position, rank, bytes, content_hash, round(copy_ms, 2) AS copy_ms,
                   round(write_ms, 1) AS write_ms, status
            FROM checkpoints WHERE run_id = ? ORDER BY iteration, rank""", [rid])
        if ckpts.num_rows and ckpts.column("rank").null_count == ckpts.num_rows:
            ckpts = ckpts.drop_columns(["rank"])  # one process: no rank to show
        replays = db.sql_arrow(con, """
            SELECT replay_id, segment, status, fidelity, compared, first_divergence, new_names
            FROM replays WHERE run_id = ? ORDER BY started_at""", [rid])
        children = db.sql_arrow(con, "SELECT run_id, kind, status FROM runs WHERE parent_run_id = ? "
                                     "ORDER BY started_at", [rid])
        feas = _feasibility_rows(con, rid)
        ranks = db.sql_arrow(con, """
            SELECT rank, count(*) AS rows, count(DISTINCT name) AS names, max(step) AS last_step,
                   min(epoch) AS first_epoch, max(epoch) AS last_epoch, max(wall_time) AS last_row_at
            FROM metrics WHERE run_id = ? AND rank IS NOT NULL GROUP BY rank ORDER BY rank""", [rid])
        hists = db.sql_arrow(con, """
            SELECT name, count(*) AS n, max(step) AS last_step, arg_max(edges, step) AS edges,
                   arg_max(counts, step) AS counts, arg_max(count, step) AS count, arg_max(min, step) AS min,
                   arg_max(max, step) AS max, arg_max(mean, step) AS mean, arg_max(nonfinite, step) AS nonfinite
            FROM histograms WHERE run_id = ? GROUP BY name ORDER BY name""", [rid])
    finally:
        con.close()
    if args.format == "json":
        out = {"run": run, "metrics": metrics.to_pylist(), "checkpoints": ckpts.to_pylist(),
               "replays": replays.to_pylist(), "children": children.to_pylist(),
               "feasibility": feas[0].to_pylist(),
               "ranks": ranks.to_pylist(),
               "histograms": [{**h, "edges": _json_list(h["edges"]), "counts": _json_list(h["counts"])}
                              for h in hists.to_pylist()]}
        print(json.dumps(_format._clean_float(out), default=_format._json_default, indent=2))
        return 0
    params = _stored_json(run["params"], dict)
    argv = _stored_json(run["argv"], list)
    counters = _stored_json(run["counters"], dict)
    lines = [
        f"run        {run['run_id']}   ({run['kind']})",
        f"project    {run['project']}" + (f"   name {run['name']}" if run["name"] else ""),
        f"status     {run['status']}" + (f"   {run['error_type']}: {run['error_message']}" if run["error_type"] else ""),
        f"started    {_format._cell(run['started_at'])}   ended {_format._cell(run['ended_at']) or '-'}",
        f"script     {run['script'] or '-'}",
        f"argv       {' '.join(map(str, argv)) if isinstance(argv, list) else argv}",
        f"host       {run['host']} pid {run['pid']}   python {run['python_version']}"
        f"   numpy {run['numpy_version'] or '-'}   torch {run['torch_version'] or '-'}",
        f"git        {run['git_commit'] or '-'}" + (" (dirty)" if run["git_dirty"] else ""),
        f"tags       {', '.join(map(str, _json_list(run.get('tags')))) or '-'}"
        + (f"   notes {run['notes']}" if run.get("notes") else ""),
        f"snapshot   {run['code_snapshot'] or '-'}",
    ]
    if run["parent_run_id"]:
        lines.append(f"parent     {run['parent_run_id']}")
    if run["dropped_rows"]:
        lines.append(f"dropped    {run['dropped_rows']} rows could not be written")
    if isinstance(counters, str) or counters:
        lines.append("problems   " + (counters if isinstance(counters, str)
                                      else ", ".join(f"{k}={v}" for k, v in sorted(counters.items()))))
    lines.append("params     " + (params if isinstance(params, str)
                                  else (", ".join(f"{k}={v!r}" for k, v in params.items()) or "-")))
    print("\n".join(lines))
    print("\nmetrics")
    print(_format.text_table(metrics) if metrics.num_rows else "  (none)")
    if ranks.num_rows:
        per_rank = "rank" in ckpts.column_names and len(set(ckpts.column("rank").to_pylist()) - {None}) > 1
        whose = "each rank checkpointed its own state" if per_rank else "checkpoints are rank 0's"
        print(f"\nranks ({ranks.num_rows} processes recorded into this run; {whose})")
        print(_format.text_table(ranks))
    print(f"\ncheckpoints ({ckpts.num_rows}, "
          f"{sum(b or 0 for b in ckpts.column('bytes').to_pylist()) / 1e6:.2f} MB)")
    if ckpts.num_rows:
        print(_format.text_table(ckpts, max_rows=30))
    if hists.num_rows:
        print("\nhistograms (the last of each; flightlog sql \"SELECT * FROM histograms\" for all)")
        for h in hists.to_pylist():
            print(_hist_line(h))
    if replays.num_rows:
        print("\nreplays")
        print(_format.text_table(replays))
    if children.num_rows:
        print("\nchild runs")
        print(_format.text_table(children))
    if feas[0].num_rows:
        _print_feasibility(*feas)
    return 0


def _json_list(raw) -> list:
    try:
        v = json.loads(raw) if raw else []
    except (TypeError, ValueError):
        return []
    return v if isinstance(v, list) else []


_BARS = " ▁▂▃▄▅▆▇█"


def _hist_line(h: dict) -> str:
    """One histogram as a line: name, step, range, a bar per bin (at most 40) and summary numbers."""
    counts = [c if isinstance(c, (int, float)) and not isinstance(c, bool) else 0 for c in _json_list(h["counts"])]
    edges = _json_list(h["edges"])
    if len(counts) > 40:  # merge neighbouring bins to fit a line
        k = -(-len(counts) // 40)
        counts = [sum(counts[i:i + k]) for i in range(0, len(counts), k)]
    top = max(counts) if counts else 0
    bars = "".join(_BARS[0 if top <= 0 else max(0, min(8, int(-(-8 * c // top))))] for c in counts)
    rng = f"[{_format._cell(edges[0])}, {_format._cell(edges[-1])}]" if len(edges) >= 2 else "[]"
    extra = f", {h['nonfinite']} non-finite" if h.get("nonfinite") else ""
    return (f"  {h['name']:<16} step {h['last_step']!s:<5} {rng:<22} |{bars}|  n={h['count']}"
            f" mean={_format._cell(h['mean'])}{extra}" + (f"  ({h['n']} logged)" if h["n"] > 1 else ""))


def _feasibility_rows(con, rid: str) -> tuple[pa.Table, int]:
    """(rows of the run's newest feasibility study, number of studies); see flightlog.query.feasibility."""
    from flightlog.query import db

    t = db.sql_arrow(con, """
        SELECT transform, dims, n_train, n_test, classes, r1, r1_se, bound, slope, best, bound_min, projected,
               target_error, verdict, source, input, time
        FROM feasibility WHERE run_id = ? AND analysis_id =
             (SELECT arg_max(analysis_id, time) FROM feasibility WHERE run_id = ?)
        ORDER BY bound, transform""", [rid, rid])
    n = con.execute("SELECT count(DISTINCT analysis_id) FROM feasibility WHERE run_id = ?", [rid]).fetchall()[0][0]
    return t, n


def _print_feasibility(t: pa.Table, studies: int) -> None:
    r = t.slice(0, 1).to_pylist()[0]
    best = next((x for x in t.to_pylist() if x["best"]), r)
    head = (f"\nfeasibility ({r['input']}, {r['n_train']} train / {r['n_test']} held out, {r['classes']} classes"
            + (f"; newest of {studies} studies" if studies > 1 else "") + ")")
    print(head)
    line = f"  BER lower bound {_fmt4(r['bound_min'])} ({best['transform']})"
    if r["target_error"] is not None:
        line += f"   target error {r['target_error']:g}: {r['verdict']}"
    print(line)
    shown = t.select(["transform", "dims", "r1", "r1_se", "bound", "slope"])
    cols = [pa.array([None if v is None else round(v, 4) for v in shown.column(c).to_pylist()], pa.float64())
            if c in ("r1", "r1_se", "bound", "slope") else shown.column(c) for c in shown.column_names]
    print(_format.text_table(pa.table(cols, names=shown.column_names)))


def _fmt4(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _stored_json(text, kind: type):
    """A stored JSON column parsed as ``kind``; a marker string when it is not that (the store is untrusted)."""
    if not text:
        return kind()
    try:
        v = json.loads(text)
    except (ValueError, RecursionError):
        return "(unreadable: not JSON)"
    return v if isinstance(v, kind) else f"(unreadable: a JSON {type(v).__name__}, not a {kind.__name__})"


# -- sql --------------------------------------------------------------------------

def configure_sql(p):
    p.add_argument("query", help="a read-only SQL query; tables: runs, metrics, spans, io, checkpoints, "
                                 "assertions, predictions, replays, …")
    add_store(p)
    p.add_argument("--format", choices=_format.FORMATS, default="table")
    p.add_argument("--output", default=None, help="write to this file instead of stdout")


def run_sql(args) -> int:
    from flightlog.query import db

    if args.format == "parquet" and not args.output:
        raise QueryError("--format parquet needs --output FILE")
    con = db.connect(args.store)
    try:
        t = db.run_sql(args.query, con=con)
    finally:
        con.close()
    _format.write(t, args.format, args.output)
    return 0


# -- compact ------------------------------------------------------------------------

def configure_compact(p):
    add_store(p)
    p.add_argument("--run", default=None, help="only this run (default: every run that is not running)")


def run_compact(args) -> int:
    """Merge parts left behind by crashed or killed runs (one file per writer and table)."""
    from flightlog import _config
    from flightlog.collector import schema, store
    from flightlog.query import db

    con = _con(args)
    try:
        if args.run:
            runs = [db.resolve_run(con, args.run)]
        else:
            runs = [r[0] for r in con.execute("SELECT run_id FROM runs WHERE status <> 'running'").fetchall()]
    finally:
        con.close()
    root = _config.store_home(args.store)
    merged = 0
    for rid in runs:
        for table in schema.TABLES:
            d = store.part_dir(root, table, rid)
            writers = {store._file_writer(f.name) for f in store.visible_files(d)} - {None}
            for w in writers:
                if store.compact_dir(d, table, w) is not None:
                    merged += 1
    print(f"compacted {merged} partition(s) of {len(runs)} run(s)")
    return 0
