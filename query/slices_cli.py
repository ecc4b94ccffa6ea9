"""``flightlog slices``: slice finding over the predictions a run logged.

Reads the ``predictions`` rows of one run (and the runs it resumed from) at one
epoch, turns the JSON ``features`` column into typed columns inside DuckDB
(``json_group_structure`` + ``json_transform``, so numbers stay numbers and are
binned, strings stay categories), derives the error (0/1 misclassification or
the logged loss) and runs :func:`flightlog.query.slices.find`. ``--sql`` takes
any read-only query result instead. Rows are keyed by ``(epoch, batch,
item_id)``; when a key was logged twice (a replay re-running an epoch, an item
logged again) the newest row wins. See docs/slices.md, "From the store".
"""
from __future__ import annotations

import argparse
import json
import sys
import pyarrow as pa
import pyarrow.compute as pc

from flightlog import _format
from flightlog._cli_core import add_store
from flightlog._errors import QueryError, StoreError

__all__ = ["configure_slices", "run_slices", "load_predictions", "from_sql"]

ERRORS = ("loss", "misclassified")
_SHOWN = ["rank", "slice", "size", "error_sum", "error_mean", "score"]
_PLAIN = {"DOUBLE", "FLOAT", "BIGINT", "UBIGINT", "INTEGER", "UINTEGER", "SMALLINT", "USMALLINT",
          "TINYINT", "UTINYINT", "HUGEINT", "UHUGEINT", "BOOLEAN", "VARCHAR", "NULL"}


def configure_slices(p: argparse.ArgumentParser) -> None:
    add_store(p)
    p.add_argument("--run", default=None, help="run id, unique prefix or 'latest' (default: latest)")
    p.add_argument("--features", default=None,
                   help="comma-separated feature names to slice on (default: every logged feature)")
    p.add_argument("--error", default=None, metavar="{loss,misclassified}",
                   help="per-row error: 'misclassified' = y_true != y_pred as 0/1, 'loss' = the logged loss "
                        "(default: loss when the rows have one, else misclassified)")
    p.add_argument("--epoch", default=None,
                   help="epoch whose predictions to use: N, 'none' (rows logged outside fl.loop) or 'all' "
                        "(default: the last epoch that logged predictions; all rows if none has an epoch)")
    p.add_argument("--sql", default=None,
                   help="slice the result of this read-only query instead: feature columns plus an error column "
                        "(a JSON-object column named 'features' is expanded into columns)")
    p.add_argument("--error-column", default="error", help="the error column of the --sql result (default: error)")
    p.add_argument("--k", type=int, default=10, help="number of slices to show (default 10)")
    p.add_argument("--alpha", type=float, default=0.95,
                   help="weight of error vs size in the score, in (0, 1] (default 0.95)")
    p.add_argument("--min-support", default=None,
                   help="minimum slice size: a row count, or a fraction of rows if < 1 "
                        "(default: max(32, 1%% of rows))")
    p.add_argument("--max-level", type=int, default=3, help="most predicates per slice (default 3)")
    p.add_argument("--bins", type=int, default=10, help="bins per numeric feature (default 10)")
    p.add_argument("--binning", choices=("quantile", "equal"), default="quantile",
                   help="numeric bin edges (default quantile)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--output", default=None, help="write to this file instead of stdout")


# -- helpers ------------------------------------------------------------------------------------


def _names(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise QueryError("--features is empty; give comma-separated feature names")
    return list(dict.fromkeys(names))


def _min_support(v: str | None) -> int | float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except ValueError:
        raise QueryError(f"--min-support must be a row count or a fraction in (0, 1), got {v!r}") from None
    if 0 < x < 1:
        return x
    if x >= 1 and x == int(x):
        return int(x)
    raise QueryError(f"--min-support must be a row count >= 1 or a fraction in (0, 1), got {v!r}")


def _pick(available: list[str], wanted: list[str] | None, what: str) -> list[str]:
    """The feature names to slice on; unknown names are an error that lists the known ones."""
    if wanted is None:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        shown = ", ".join(available[:30]) + (f", … ({len(available)} in all)" if len(available) > 30 else "")
        raise QueryError(f"unknown feature{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"in {what}; known: {shown or '(none)'}")
    return wanted


_INTS = {"UBIGINT", "BIGINT"}


def _merge_type(a: str, b: str) -> str:
    """The one type that holds values of JSON types ``a`` and ``b`` (text when they disagree)."""
    if a == b or b == "NULL":
        return a
    if a == "NULL":
        return b
    if a in _INTS and b in _INTS:
        return "BIGINT"
    if {a, b} <= _INTS | {"DOUBLE"}:
        return "DOUBLE"
    return "VARCHAR"


def _structure(con, rel: str, params: list) -> dict[str, str]:
    """Key → DuckDB type of the JSON objects in ``rel``'s ``features`` column.

    Merges the distinct per-row structures (fl.log_predictions writes few: one
    per call, plus variants with nulls), which costs a third of DuckDB's
    ``json_group_structure`` over every row. Keys that mix types, are always
    null or hold lists/objects are read as text.
    """
    import duckdb

    try:
        rows = con.execute(f"SELECT DISTINCT json_structure(TRY_CAST(features AS JSON)) FROM ({rel}) AS _r",
                           params).fetchall()
    except duckdb.Error as e:
        raise QueryError(f"cannot read the features column: {str(e).splitlines()[0]}") from e
    merged: dict[str, str] = {}
    for (raw,) in sorted(rows, key=lambda r: (r[0] is None, r[0] or "")):
        try:
            struct = json.loads(raw) if raw else None
        except (TypeError, ValueError):
            continue
        if not isinstance(struct, dict):
            continue
        for k, v in struct.items():
            t = v if isinstance(v, str) and v in _PLAIN else "VARCHAR"
            merged[k] = _merge_type(merged[k], t) if k in merged else t
    return {k: ("VARCHAR" if v == "NULL" else v) for k, v in merged.items()}


def _python_expand(strings: list, keys: list[str]) -> list[pa.Array]:
    """Feature columns parsed in Python: the fallback when DuckDB cannot build the struct."""
    cols: dict[str, list] = {k: [] for k in keys}
    for s in strings:
        try:
            obj = json.loads(s) if s else None
        except (TypeError, ValueError):
            obj = None
        if not isinstance(obj, dict):
            obj = {}
        for k in keys:
            cols[k].append(obj.get(k))
    out = []
    for k in keys:
        vals = [json.dumps(v) if isinstance(v, (list, dict)) else v for v in cols[k]]
        try:
            out.append(pa.array(vals))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            out.append(pa.array([None if v is None else str(v) for v in vals], pa.string()))
    return out


def _expand(con, rel: str, params: list, keep: list[str], wanted: list[str] | None,
            what: str, order: str = "") -> tuple[pa.Table, pa.Table]:
    """(the ``keep`` columns, the feature table) of ``rel``, whose ``features`` column holds JSON objects."""
    import duckdb

    from flightlog.query.db import sql_arrow

    struct = _structure(con, rel, params)
    keys = _pick(list(struct), wanted, what)
    if not keys:
        raise QueryError(f"{what} has no features to slice on (log them with fl.log_predictions(features, …))")
    sel = ", ".join(keep)
    try:
        spec = json.dumps({k: struct[k] for k in keys})
        t = sql_arrow(con, f"SELECT {sel}, json_transform(TRY_CAST(features AS JSON), ?) AS _f "
                           f"FROM ({rel}) AS _r {order}", [spec] + params)
        f = t.column("_f").combine_chunks()
        X = pa.Table.from_arrays(f.flatten(), names=keys)
        return t.drop_columns(["_f"]), X
    except (duckdb.Error, pa.ArrowException, ValueError):  # e.g. keys equal up to case: one struct cannot hold them
        t = sql_arrow(con, f"SELECT {sel}, features FROM ({rel}) AS _r {order}", params)
        X = pa.Table.from_arrays(_python_expand(t.column("features").to_pylist(), keys), names=keys)
        return t.drop_columns(["features"]), X


def _finite_errors(err: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(errors with null/NaN/inf rows removed, the keep mask)."""
    err = pc.cast(err, pa.float64())
    keep = pc.fill_null(pc.is_finite(err), False)
    return pc.filter(err, keep), keep


def _check_nonnegative(err: pa.Array, name: str) -> None:
    if len(err) and pc.min(err).as_py() < 0:
        raise QueryError(f"{name} has negative values (min {pc.min(err).as_py():.6g}); slice finding needs "
                         "errors >= 0 (e.g. a loss, or 0/1 misclassification)")


# -- predictions of a run -----------------------------------------------------------------------


def _epoch_arg(v: str | None) -> int | str | None:
    if v is None:
        return None
    s = str(v).strip().lower()
    if s in ("all", "none"):
        return s
    try:
        return int(s)
    except ValueError:
        raise QueryError(f"--epoch must be an integer, 'none' or 'all', got {v!r}") from None


def load_predictions(con, run: str | None = None, epoch: int | str | None = None, error: str | None = None,
                     features: list[str] | None = None) -> tuple[pa.Table, pa.Array, dict]:
    """(feature table, per-row errors, notes) of one run's predictions, ready for ``find``.

    ``epoch``: an int, ``"none"`` (rows logged outside loops), ``"all"``, or
    None for the last epoch with predictions (all rows when none has an epoch).
    ``error``: ``"loss"``, ``"misclassified"`` or None (loss when logged).
    """
    from flightlog.query import db

    if error is not None and error not in ERRORS:
        raise QueryError(f"--error must be 'loss' or 'misclassified', got {error!r} "
                         "(use --sql with --error-column for another error)")
    rid = db.resolve_run(con, run)
    chain = db.run_chain(con, rid)
    counts = con.execute("SELECT epoch, count(*), count(loss), "
                         "count(item_id) - count(DISTINCT (batch, item_id)) FILTER (WHERE item_id IS NOT NULL) "
                         "FROM predictions WHERE list_contains(?, run_id) "
                         "GROUP BY epoch ORDER BY epoch NULLS LAST", [chain]).fetchall()
    if not counts:
        raise StoreError(f"run {rid} has no predictions (record them with fl.log_predictions)")
    epochs = [c[0] for c in counts if c[0] is not None]
    if epoch is None:
        epoch = max(epochs) if epochs else "all"
    if epoch == "all":
        where, eparams, label = "true", [], ("all epochs" if epochs else "all rows (no epochs)")
    elif epoch == "none":
        where, eparams, label = "epoch IS NULL", [], "rows outside fl.loop"
    else:
        where, eparams, label = "epoch = ?", [int(epoch)], f"epoch {epoch}"
    chosen = [c for c in counts if epoch == "all" or (epoch == "none" and c[0] is None) or c[0] == epoch]
    if not chosen:
        have = ", ".join(str(e) for e in epochs) or "none"
        outside = any(c[0] is None for c in counts)
        raise StoreError(f"run {rid} has no predictions at {label}; epochs with predictions: {have}"
                         + (" (and rows outside fl.loop: --epoch none)" if outside else ""))
    n_loss = sum(c[2] for c in chosen)
    if error is None:
        error = "loss" if n_loss else "misclassified"
    if error == "loss" and not n_loss:
        raise QueryError(f"the predictions of run {rid} at {label} have no loss "
                         "(pass loss= to fl.log_predictions, or use --error misclassified)")
    err_sql = ("loss" if error == "loss" else
               "CASE WHEN y_true IS NULL OR y_pred IS NULL THEN NULL ELSE CAST(y_true <> y_pred AS DOUBLE) END")
    rel = (f"SELECT {err_sql} AS _err, features, time, epoch, batch, item_id FROM predictions "
           f"WHERE list_contains(?, run_id) AND {where}")
    order = ""
    if sum(c[3] for c in chosen):  # some key was logged twice: keep the newest row per key
        rel += (" QUALIFY item_id IS NULL OR row_number() OVER "
                "(PARTITION BY epoch, batch, item_id ORDER BY time DESC, run_id DESC) = 1")
        order = "ORDER BY time, epoch, batch, item_id"  # the window loses the scan order
    params = [chain] + eparams
    rest, X = _expand(con, rel, params, ["_err"], features, f"the predictions of run {rid}", order=order)
    total = rest.num_rows
    err, keep = _finite_errors(rest.column("_err").combine_chunks())
    if len(err) == 0:
        raise QueryError(f"no rows of run {rid} at {label} have a usable {error} "
                         + ("(y_true and y_pred must both be logged)" if error == "misclassified"
                            else "(all losses are missing or not finite)"))
    if len(err) < total:
        X = X.filter(keep)
    _check_nonnegative(err, "the loss")
    notes = {"run": rid, "epochs": label, "error": error, "rows": len(err), "skipped": total - len(err),
             "features": X.column_names}
    return X, err, notes


# -- any query ----------------------------------------------------------------------------------


def from_sql(con, sql: str, error_column: str = "error",
             features: list[str] | None = None) -> tuple[pa.Table, pa.Array, dict]:
    """(feature table, errors, notes) from a read-only query run in the store's sandbox."""
    from flightlog.query import db

    t = db.run_sql(sql, con=con)
    if t.num_rows == 0:
        raise QueryError("the --sql query returned no rows")
    cols = t.column_names
    if error_column not in cols:
        raise QueryError(f"the --sql result has no error column {error_column!r}; columns: "
                         f"{', '.join(cols) or '(none)'} (name it with --error-column)")
    et = t.schema.field(error_column).type
    if not (pa.types.is_integer(et) or pa.types.is_floating(et) or pa.types.is_boolean(et)
            or pa.types.is_decimal(et) or pa.types.is_null(et)):
        raise QueryError(f"error column {error_column!r} must be numeric or boolean, got {et}")
    X = t.drop_columns([error_column])
    if "features" in X.column_names and pa.types.is_string(X.schema.field("features").type):
        X = _expand_sql_features(X, features)
    else:
        X = X.select(_pick(X.column_names, features, "the --sql result"))
    if X.num_columns == 0:
        raise QueryError("the --sql result has no feature columns besides the error column")
    err, mask = _finite_errors(t.column(error_column).combine_chunks())
    if len(err) == 0:
        raise QueryError(f"error column {error_column!r} has no finite values")
    total = t.num_rows
    if len(err) < total:
        X = X.filter(mask)
    _check_nonnegative(err, f"error column {error_column!r}")
    notes = {"run": None, "epochs": None, "error": error_column, "rows": len(err), "skipped": total - len(err),
             "features": X.column_names}
    return X, err, notes


def _expand_sql_features(X: pa.Table, features: list[str] | None) -> pa.Table:
    """Replace a JSON ``features`` column (as fl.log_predictions stores it) by its keys, in row order."""
    import duckdb

    others = [c for c in X.column_names if c != "features"]
    mem = duckdb.connect(":memory:")  # private and in-memory: it only sees this result
    try:
        mem.register("_q", X.select(["features"]).append_column("_row", pa.array(range(X.num_rows), pa.int64())))
        struct = _structure(mem, "SELECT features FROM _q", [])
        avail = others + [k for k in struct if k not in others]
        picked = _pick(avail, features, "the --sql result")
        plain = [c for c in picked if c in others]
        keys = [c for c in picked if c not in others]
        cols, names = [X.column(c) for c in plain], list(plain)
        if keys:
            _, F = _expand(mem, "SELECT * FROM _q", [], ["_row"], keys, "the --sql result", order="ORDER BY _row")
            cols += F.columns
            names += F.column_names
        return pa.Table.from_arrays(cols, names=names)
    finally:
        mem.close()


# -- the command --------------------------------------------------------------------------------


def run_slices(args: argparse.Namespace) -> int:
    from flightlog.query import db
    from flightlog.query.slices import find

    feats = _names(args.features)
    support = _min_support(args.min_support)
    if args.sql is not None:
        for flag, val in (("--run", args.run), ("--epoch", args.epoch), ("--error", args.error)):
            if val is not None:
                raise QueryError(f"{flag} selects logged predictions and does not apply to --sql "
                                 "(filter in the query; name the error column with --error-column)")
    elif args.error is not None and args.error not in ERRORS:
        raise QueryError(f"--error must be 'loss' or 'misclassified', got {args.error!r}")
    epoch = _epoch_arg(args.epoch)
    con = db.connect(args.store)
    try:
        if args.sql is not None:
            X, err, notes = from_sql(con, args.sql, args.error_column, feats)
        else:
            if con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 0:
                from flightlog import _config

                raise StoreError(f"the store at {_config.store_home(args.store)} holds no runs yet")
            X, err, notes = load_predictions(con, args.run, epoch, args.error, feats)
    finally:
        con.close()
    try:
        top = find(X, err, k=args.k, alpha=args.alpha, min_support=support, max_level=args.max_level,
                   bins=args.bins, binning=args.binning)
    except ValueError as e:
        raise QueryError(f"slice finding: {e}") from e
    if args.format == "json":
        _format.write(top, "json", args.output)
        return 0
    mean = float(pc.mean(err).as_py()) if len(err) else 0.0
    where = f"run {notes['run']}, {notes['epochs']}" if notes["run"] else "--sql result"
    head = [f"{where}: {notes['rows']} rows, {len(notes['features'])} features, "
            f"error = {notes['error']} (mean {mean:.4g})"]
    if notes["skipped"]:
        head.append(f"({notes['skipped']} rows without a usable error were left out)")
    body = (_format.text_table(top.select(_SHOWN), width=160) if top.num_rows else
            "no slice scores above 0: no group of rows large enough has a clearly higher error "
            "(try a smaller --min-support or --alpha closer to 1)")
    text = "\n".join(head) + "\n\n" + body + "\n"
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0
