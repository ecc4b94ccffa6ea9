"""``flightlog lineage | history``: arguments and output; the walk is ``flightlog.query.lineage``."""
from __future__ import annotations

import argparse
import json

from flightlog import _format
from flightlog._cli_core import _con, add_store
from flightlog._errors import QueryError


def configure_lineage(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a step call (span id or unique prefix), a fingerprint (or prefix) or a file path")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--up", dest="direction", action="store_const", const="up",
                   help="where it came from (default)")
    g.add_argument("--down", dest="direction", action="store_const", const="down", help="what was made from it")
    p.set_defaults(direction="up")
    p.add_argument("--depth", type=int, default=20, help="levels of steps to follow (default 20)")
    p.add_argument("--format", choices=("tree", "json"), default="tree")
    add_store(p)


def run_lineage(args) -> int:
    from flightlog.query import lineage

    con = _con(args)
    try:
        tree = lineage.lineage(con, args.target, direction=args.direction, depth=args.depth)
    finally:
        con.close()
    if args.format == "json":
        print(json.dumps(lineage.jsonable(tree), indent=2))
    else:
        print(lineage.render(tree))
    return 0


def configure_history(p: argparse.ArgumentParser) -> None:
    p.add_argument("step", help="step name (the @fl.step name, by default the function's qualified name)")
    p.add_argument("--stale", type=float, default=7.0,
                   help="flag inputs produced more than this many days before use (default 7)")
    p.add_argument("--limit", type=int, default=100, help="newest calls shown (default 100)")
    p.add_argument("--format", choices=_format.FORMATS, default="table")
    p.add_argument("--output", default=None, help="write to this file instead of stdout")
    add_store(p)


def run_history(args) -> int:
    from flightlog.query import lineage

    if args.stale < 0:
        raise QueryError("--stale must be >= 0 days")
    con = _con(args)
    try:
        t = lineage.history(con, args.step, args.stale, args.limit)
    finally:
        con.close()
    _format.write(t, args.format, args.output)
    return 0
