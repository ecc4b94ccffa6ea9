"""The predictions a run logged, read as the tables a study takes.

``fl.log_predictions`` stores one ``predictions`` row per example (``y_true``, ``y_pred``,
``loss``, a JSON ``features`` object). The readers here select one run's rows (and the
runs it resumed from) at one epoch, keep the newest row per ``(epoch, batch, item_id)``
(a replay re-running an epoch, an item logged again), and turn the JSON features into
typed columns inside DuckDB (``json_group_structure`` + ``json_transform``, so numbers
stay numbers and strings stay categories):

* :func:`load_predictions` / :func:`from_sql`: features and per-row errors for slice
  finding (``flightlog slices``, the UI's slices page);
* :func:`load_run` / :func:`load_parquet`: features and labels for the feasibility study;
* :func:`load_stats`: two runs' predictions joined by item into the counts the gate decides on.

Their arguments and output as commands are in sdk/_slices_cli.py, _feasibility_cli.py and
_gate_cli.py. See docs/slices.md, "From the store".
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flightlog._errors import QueryError, StoreError
from flightlog.query.feasibility import FeasibilityError

__all__ = ["ERRORS", "epoch_arg", "load_predictions", "from_sql", "expand", "load_run", "load_parquet",
           "load_stats"]

ERRORS = ("loss", "misclassified")
_PLAIN = {"DOUBLE", "FLOAT", "BIGINT", "UBIGINT", "INTEGER", "UINTEGER", "SMALLINT", "USMALLINT",
          "TINYINT", "UTINYINT", "HUGEINT", "UHUGEINT", "BOOLEAN", "VARCHAR", "NULL"}


# -- features ------------------------------------------------------------------------------------


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


def expand(con, rel: str, params: list, keep: list[str], wanted: list[str] | None,
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


# -- selecting rows ---------------------------------------------------------------------------------


def epoch_arg(v: str | None) -> int | str | None:
    if v is None:
        return None
    s = str(v).strip().lower()
    if s in ("all", "none"):
        return s
    try:
        return int(s)
    except ValueError:
        raise QueryError(f"--epoch must be an integer, 'none' or 'all', got {v!r}") from None


# -- slices: features and errors ------------------------------------------------------------------


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
    rest, X = expand(con, rel, params, ["_err"], features, f"the predictions of run {rid}", order=order)
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
            _, F = expand(mem, "SELECT * FROM _q", [], ["_row"], keys, "the --sql result", order="ORDER BY _row")
            cols += F.columns
            names += F.column_names
        return pa.Table.from_arrays(cols, names=names)
    finally:
        mem.close()


# -- feasibility: features and labels --------------------------------------------------------------


def _numeric(t: pa.Table, wanted: list[str] | None, what: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(float64 matrix, used columns, left-out non-numeric columns) of ``t``; nulls become NaN."""
    used, left = [], []
    for name in t.column_names:
        typ = t.schema.field(name).type
        ok = pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ) \
            or pa.types.is_decimal(typ) or pa.types.is_null(typ)
        if ok:
            used.append(name)
        elif wanted is not None:
            raise FeasibilityError(f"feature {name!r} of {what} is not numeric ({typ}); "
                                   "the estimate needs numeric or boolean features")
        else:
            left.append(name)
    if not used:
        raise FeasibilityError(f"{what} has no numeric feature columns"
                               + (f" (non-numeric: {', '.join(left[:10])})" if left else ""))
    cols = []
    for name in used:
        col = t.column(name)
        if pa.types.is_boolean(col.type) or pa.types.is_null(col.type) or pa.types.is_decimal(col.type):
            col = col.cast(pa.float64())
        cols.append(col.to_numpy().astype(np.float64, copy=False) if col.null_count == 0
                    else col.cast(pa.float64()).fill_null(float("nan")).to_numpy())
    return np.column_stack(cols), used, left


def _labels(col: Any) -> np.ndarray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return col.cast(pa.float64()).fill_null(float("nan")).to_numpy()
    return np.asarray(col.to_pylist(), dtype=object)


def load_parquet(path: str, label: str | None, features: list[str] | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(X, y, notes) from a Parquet file."""
    import pyarrow.parquet as pq

    if not label:
        raise FeasibilityError("--parquet needs --label COLUMN (the column holding the class)")
    if not os.path.isfile(path):
        raise FeasibilityError(f"{'not a regular file' if os.path.exists(path) else 'no such file'}: {path}")
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except (OSError, pa.ArrowException) as e:
        raise FeasibilityError(f"cannot read {path} as Parquet: {str(e).splitlines()[0] if str(e) else e}") from None
    if label not in names:
        raise FeasibilityError(f"{path} has no column {label!r}; columns: {_shown(names)}")
    if features is not None:
        missing = [f for f in features if f not in names]
        if missing:
            raise FeasibilityError(f"{path} has no column(s) {', '.join(map(repr, missing))}; columns: {_shown(names)}")
        if label in features:
            raise FeasibilityError(f"--label {label!r} is also in --features")
        cols = features
    else:
        cols = [n for n in names if n != label]
    try:
        t = pf.read(columns=list(dict.fromkeys(cols + [label])))
    except (OSError, pa.ArrowException) as e:
        raise FeasibilityError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    X, used, left = _numeric(t.select(cols), features, path)
    y = _labels(t.column(label))
    return X, y, {"input": f"parquet {os.path.basename(path)} label {label}", "features": used, "left_out": left}


def _shown(names: list[str]) -> str:
    return ", ".join(names[:30]) + (f", … ({len(names)} in all)" if len(names) > 30 else "") if names else "(none)"


def load_run(con, run: str | None, label: str | None, features: list[str] | None,
             epoch: Any = None) -> tuple[str, np.ndarray, np.ndarray, dict]:
    """(run id, X, y, notes) from the predictions a run logged."""
    from flightlog.query import db

    label = label or "y_true"
    epoch = epoch_arg(epoch)
    rid = db.resolve_run(con, run)
    chain = db.run_chain(con, rid)
    counts = con.execute("SELECT epoch, count(*), "
                         "count(item_id) - count(DISTINCT (batch, item_id)) FILTER (WHERE item_id IS NOT NULL) "
                         "FROM predictions WHERE list_contains(?, run_id) "
                         "GROUP BY epoch ORDER BY epoch NULLS LAST", [chain]).fetchall()
    if not counts:
        raise StoreError(f"run {rid} has no predictions (record features and labels with fl.log_predictions)")
    epochs = [c[0] for c in counts if c[0] is not None]
    if epoch is None:
        epoch = max(epochs) if epochs else "all"
    if epoch == "all":
        where, eparams, desc = "true", [], "all epochs" if epochs else "all rows"
    elif epoch == "none":
        where, eparams, desc = "epoch IS NULL", [], "rows outside fl.loop"
    else:
        where, eparams, desc = "epoch = ?", [int(epoch)], f"epoch {epoch}"
    chosen = [c for c in counts if epoch == "all" or (epoch == "none" and c[0] is None) or c[0] == epoch]
    if not chosen:
        raise StoreError(f"run {rid} has no predictions at {desc}; epochs with predictions: "
                         f"{', '.join(map(str, epochs)) or 'none'}")
    rel = (f"SELECT y_true, y_pred, features, time, epoch, batch, item_id FROM predictions "
           f"WHERE list_contains(?, run_id) AND {where}")
    order = ""
    if sum(c[2] for c in chosen):  # a key logged twice (a replay re-ran the epoch): the newest row wins
        rel += (" QUALIFY item_id IS NULL OR row_number() OVER "
                "(PARTITION BY epoch, batch, item_id ORDER BY time DESC, run_id DESC) = 1")
        order = "ORDER BY time, epoch, batch, item_id"
    params = [chain] + eparams
    what = f"the predictions of run {rid}"
    if label in ("y_true", "y_pred"):
        wanted = features
    else:
        if features is not None and label in features:
            raise FeasibilityError(f"--label {label!r} is also in --features")
        wanted = None if features is None else features + [label]
    n_feat = con.execute(f"SELECT count(features) FROM ({rel}) AS _r", params).fetchall()[0][0]
    if n_feat == 0:
        raise FeasibilityError(f"{what} at {desc} hold no features (pass them to fl.log_predictions)")
    kept, F = expand(con, rel, params, ["y_true", "y_pred"], wanted, what, order=order)
    if label in ("y_true", "y_pred"):
        ycol = kept.column(label)
    else:
        if label not in F.column_names:
            raise FeasibilityError(f"{what} have no column {label!r}; labels: y_true, y_pred; features: "
                                   f"{_shown(F.column_names)}")
        ycol = F.column(label)
        F = F.drop_columns([label])
    if ycol.null_count == len(ycol):
        raise FeasibilityError(f"{what} at {desc} have no {label} values"
                               + (" (log y_true with fl.log_predictions, or pick --label)" if label == "y_true" else ""))
    X, used, left = _numeric(F, features, what)
    y = _labels(ycol)
    return rid, X, y, {"input": f"predictions {desc} label {label}", "features": used, "left_out": left}


# -- gate: two runs joined by item ------------------------------------------------------------------


def _rows_of(con, rid: str, epoch) -> tuple[str, list, str]:
    """(SQL filter, params, label) selecting one run's predictions rows at ``epoch``."""
    from flightlog.query import db

    chain = db.run_chain(con, rid)
    epochs = con.execute("SELECT DISTINCT epoch FROM predictions WHERE list_contains(?, run_id) "
                         "ORDER BY epoch NULLS LAST", [chain]).fetchall()
    if not epochs:
        raise StoreError(f"run {rid} has no predictions (record them with fl.log_predictions)")
    have = [e[0] for e in epochs if e[0] is not None]
    outside = any(e[0] is None for e in epochs)
    if epoch is None:
        epoch = max(have) if have else "all"
    if epoch == "all":
        return "list_contains(?, run_id)", [chain], "all epochs" if have else "all rows"
    if epoch == "none":
        if not outside:
            raise StoreError(f"run {rid} has no predictions outside fl.loop; epochs with predictions: "
                             f"{', '.join(map(str, have))}")
        return "list_contains(?, run_id) AND epoch IS NULL", [chain], "rows outside fl.loop"
    if epoch not in have:
        raise StoreError(f"run {rid} has no predictions at epoch {epoch}; epochs with predictions: "
                         f"{', '.join(map(str, have)) or 'none'}" + (" (and rows outside fl.loop: --epoch none)"
                                                                     if outside else ""))
    return "list_contains(?, run_id) AND epoch = ?", [chain, int(epoch)], f"epoch {epoch}"


def load_stats(con, candidate: str, baseline: str, epoch=None) -> tuple[dict, dict]:
    """(counts for :func:`gate.decide`, notes) from the two runs' predictions, joined in DuckDB."""
    from flightlog.query import db

    cid = db.resolve_run(con, candidate)
    bid = db.resolve_run(con, baseline)
    if cid == bid:
        raise QueryError(f"--candidate and --baseline are the same run ({cid})")
    cw, cp, clabel = _rows_of(con, cid, epoch)
    bw, bp, blabel = _rows_of(con, bid, epoch)
    # ids that repeat across batches (positional default ids) need the batch in the key
    rep = con.execute(f"""SELECT
        (SELECT count(DISTINCT item_id) <> count(DISTINCT (batch, item_id)) FROM predictions WHERE {cw}),
        (SELECT count(DISTINCT item_id) <> count(DISTINCT (batch, item_id)) FROM predictions WHERE {bw})""",
                      cp + bp).fetchone()
    by_batch = bool(rep[0]) or bool(rep[1])
    key = "coalesce(CAST(batch AS VARCHAR), '') || ':' || item_id" if by_batch else "item_id"
    newest = (f"SELECT {key} AS k, y_true, y_pred FROM predictions WHERE {{w}} AND item_id IS NOT NULL "
              f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY time DESC, run_id DESC) = 1")
    sql = f"""
    WITH c AS ({newest.format(w=cw)}), b AS ({newest.format(w=bw)}),
    j AS (SELECT c.k, c.y_pred AS cp, b.y_pred AS bp, c.y_true AS ct, b.y_true AS bt,
                 coalesce(c.y_true, b.y_true) AS y
          FROM c JOIN b ON c.k = b.k WHERE c.y_pred IS NOT NULL AND b.y_pred IS NOT NULL)
    SELECT
      (SELECT count(*) FROM c WHERE k NOT IN (SELECT k FROM b)),
      (SELECT count(*) FROM b WHERE k NOT IN (SELECT k FROM c)),
      (SELECT count(*) FROM c JOIN b ON c.k = b.k WHERE c.y_pred IS NULL OR b.y_pred IS NULL),
      count(*),
      count(y),
      count(*) FILTER (WHERE y IS NOT NULL AND cp = y),
      count(*) FILTER (WHERE y IS NOT NULL AND bp = y),
      count(*) FILTER (WHERE cp <> bp),
      count(*) FILTER (WHERE cp <> bp AND y IS NULL),
      count(*) FILTER (WHERE ct IS NOT NULL AND bt IS NOT NULL AND ct <> bt),
      sha256(coalesce(string_agg(k, chr(10) ORDER BY k), ''))
    FROM j"""
    (only_c, only_b, no_pred, joined, labelled, nc, oc, differ, differ_unl, conflicts,
     digest) = con.execute(sql, cp + bp).fetchone()  # parameters: c's filter, then b's
    if conflicts:
        raise QueryError(f"the runs disagree on y_true for {conflicts} item(s); the gate needs one label per item "
                         "(check that both runs logged the same test set with the same ids)")
    if joined == 0:
        raise QueryError(f"no item was predicted by both runs (candidate {cid}: {clabel}, baseline {bid}: "
                         f"{blabel}; {only_c} items only in the candidate, {only_b} only in the baseline); "
                         "log predictions with the same ids= in both runs")
    stats = {"examples": joined, "labelled": labelled, "new_correct": nc, "old_correct": oc, "differ": differ,
             "differ_unlabelled": differ_unl}
    notes = {"candidate": cid, "baseline": bid, "candidate_rows": clabel, "baseline_rows": blabel,
             "only_candidate": only_c, "only_baseline": only_b, "without_prediction": no_pred,
             "key": "(batch, item_id)" if by_batch else "item_id", "fingerprint": digest}
    return stats, notes
