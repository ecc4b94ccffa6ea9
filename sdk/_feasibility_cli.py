"""``flightlog feasibility``: arguments and output of the snoopy feasibility study over stored data.

Two inputs: ``--run RUN`` takes the features and labels a run logged with
``fl.log_predictions`` (the last epoch that logged predictions unless
``--epoch`` says otherwise; the newest row per ``(epoch, batch, item_id)``),
``--parquet FILE --label COLUMN`` any Parquet file with numeric feature
columns (both read by ``flightlog.query.predictions``). The estimate is
``flightlog.query.feasibility.estimate``; with ``--run`` the result is stored
with that run (``feasibility`` table, shown by ``flightlog show``) unless
``--no-save``. See docs/feasibility.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flightlog._cli_core import add_store
from flightlog._errors import StoreError
from flightlog.query.feasibility import BUILTIN, FeasibilityError


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
    from flightlog.query.predictions import load_parquet, load_run

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
