"""``flightlog feasibility``: the snoopy feasibility study over stored data.

Two inputs: ``--run RUN`` takes the features and labels a run logged with
``fl.log_predictions`` (the last epoch that logged predictions unless
``--epoch`` says otherwise; the newest row per ``(epoch, batch, item_id)``),
``--parquet FILE --label COLUMN`` any Parquet file with numeric feature
columns. The estimate is ``flightlog.query.feasibility.estimate``; with
``--run`` the result is stored with that run (``feasibility`` table, shown by
``flightlog show``) unless ``--no-save``. See docs/feasibility.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np
import pyarrow as pa

from flightlog._cli_core import add_store
from flightlog._errors import StoreError
from flightlog.query.feasibility import BUILTIN, FeasibilityError

__all__ = ["configure_feasibility", "run_feasibility", "load_run", "load_parquet"]


def configure_feasibility(p: argparse.ArgumentParser) -> None:
    add_store(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default=None,
                     help="run id, unique prefix or 'latest': use the features and labels it logged "
                          "with fl.log_predictions")
    src.add_argument("--parquet", default=None, metavar="FILE",
                     help="a Parquet file with one row per example (numeric feature columns and --label)")
    p.add_argument("--label", default=None, metavar="COLUMN",
                   help="the label column: required with --parquet; with --run y_true (default), y_pred or "
                        "a logged feature")
    p.add_argument("--features", default=None,
                   help="comma-separated feature columns (default: every numeric or boolean column)")
    p.add_argument("--epoch", default=None,
                   help="with --run: epoch whose predictions to use: N, 'none' or 'all' "
                        "(default: the last epoch that logged predictions)")
    p.add_argument("--target-error", type=float, default=None, metavar="ERROR",
                   help="the error rate you hope to reach, e.g. 0.05; gives the verdict "
                        "feasible / unlikely / undecided")
    p.add_argument("--transforms", default=",".join(BUILTIN),
                   help=f"comma-separated transformations (default {','.join(BUILTIN)})")
    p.add_argument("--test-size", default="0.2",
                   help="held-out rows: a fraction in (0, 1) or a row count (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/held-out shuffle (default 0)")
    p.add_argument("--no-save", action="store_true", help="with --run: do not store the result with the run")
    p.add_argument("--format", choices=("table", "json"), default="table")


# -- inputs ---------------------------------------------------------------------------------------


def _names(spec: str | None, flag: str) -> list[str] | None:
    if spec is None:
        return None
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise FeasibilityError(f"{flag} is empty; give comma-separated names")
    return names


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
    from flightlog.query.slices_cli import _epoch_arg, _expand

    label = label or "y_true"
    epoch = _epoch_arg(epoch)
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
    kept, F = _expand(con, rel, params, ["y_true", "y_pred"], wanted, what, order=order)
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


# -- the command ------------------------------------------------------------------------------------


def _test_size(v: str) -> float | int:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise FeasibilityError(f"--test-size must be a fraction in (0, 1) or a row count, got {v!r}") from None
    if 0 < x < 1:
        return x
    if x >= 1 and x.is_integer():
        return int(x)
    raise FeasibilityError(f"--test-size must be a fraction in (0, 1) or a row count, got {v!r}")


def run_feasibility(args: argparse.Namespace) -> int:
    from flightlog.query import db
    from flightlog.query.feasibility import estimate, to_table

    features = _names(args.features, "--features")
    transforms = _names(args.transforms, "--transforms")
    test_size = _test_size(args.test_size)
    if args.target_error is not None and not 0 <= args.target_error <= 1:
        raise FeasibilityError(f"--target-error must be an error rate in [0, 1], got {args.target_error}")
    rid = None
    if args.parquet is not None:
        for flag, val in (("--epoch", args.epoch), ("--no-save", args.no_save or None)):
            if val is not None:
                raise FeasibilityError(f"{flag} applies to --run only")
        X, y, notes = load_parquet(args.parquet, args.label, features)
    else:
        con = db.connect(args.store)
        try:
            if con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 0:
                from flightlog import _config

                raise StoreError(f"the store at {_config.store_home(args.store)} holds no runs yet")
            rid, X, y, notes = load_run(con, args.run, args.label, features, args.epoch)
        finally:
            con.close()
    result = estimate(X, y, target_error=args.target_error, transforms=transforms, test_size=test_size,
                      seed=args.seed)
    saved = False
    if rid is not None and not args.no_save:
        from flightlog import _config
        from flightlog.collector.store import LocalSink

        try:
            LocalSink(_config.store_home(args.store)).write(
                "feasibility", to_table(result, rid, source="cli", input=notes["input"]))
            saved = True
        except OSError as e:
            raise StoreError(f"could not store the result with run {rid}: {e}") from e
    if args.format == "json":
        out = {"run": rid, "input": notes["input"], "features": notes["features"], "left_out": notes["left_out"],
               "saved": saved, **result.to_dict()}
        print(json.dumps(_nan_to_none(out), indent=2))
        return 0
    head = [f"{'run ' + rid if rid else args.parquet}: {notes['input']}, {len(notes['features'])} features"]
    if notes["left_out"]:
        head.append(f"left out non-numeric columns: {', '.join(notes['left_out'][:10])}"
                    + (" …" if len(notes["left_out"]) > 10 else ""))
    text = "\n".join(head) + "\n" + result.summary() + "\n"
    if saved:
        text += f"\nstored with run {rid} (flightlog show {rid[:12]})\n"
    sys.stdout.write(text)
    return 0


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    return v
