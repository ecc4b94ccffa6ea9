"""``flightlog slices``: arguments and output of slice finding over the predictions a run logged
(or any read-only query's result). The rows are read by ``flightlog.query.predictions``, the
slices found by ``flightlog.query.slices.find``. See docs/slices.md, "From the store".
"""
from __future__ import annotations

import argparse
import sys

import pyarrow.compute as pc

from flightlog import _format
from flightlog._cli_core import add_store
from flightlog._errors import QueryError, StoreError

_SHOWN = ["rank", "slice", "size", "error_sum", "error_mean", "score"]


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


# -- the command --------------------------------------------------------------------------------


def run_slices(args: argparse.Namespace) -> int:
    from flightlog.query import db
    from flightlog.query.predictions import ERRORS, epoch_arg, from_sql, load_predictions
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
    epoch = epoch_arg(args.epoch)
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
