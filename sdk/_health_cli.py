"""``flightlog health | assertions``: arguments and output; the checks are ``flightlog.query.health``,
the assertion report ``flightlog.query.assertions``."""
from __future__ import annotations

import argparse
import json

import pyarrow as pa

from flightlog import _format
from flightlog._cli_core import add_store


# -- health ---------------------------------------------------------------------------------

def _kv(text: str) -> tuple[str, str]:
    k, eq, v = text.partition("=")
    if not eq or not k.strip():
        raise argparse.ArgumentTypeError(f"expected CHECK.PARAM=VALUE, got {text!r}")
    return k.strip(), v.strip()


def configure_health(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="latest", help="run id, unique prefix or 'latest' (default)")
    add_store(p)
    p.add_argument("--check", nargs="+", action="extend", default=None, metavar="NAME",
                   help="only these checks (default: all)")
    p.add_argument("--checks-dir", action="append", default=None, metavar="DIR",
                   help="a folder of your own check files (default: ./flightlog_checks if present)")
    p.add_argument("--set", dest="overrides", action="append", type=_kv, default=[], metavar="CHECK.PARAM=VALUE",
                   help="override a threshold, e.g. --set divergence.factor=5")
    p.add_argument("--reference", default=None, help="reference run for drift/schema "
                   "(default: the previous finished run of the project that called the same step)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--fail-on", choices=("warn", "error"), default="error",
                   help="exit 1 when a check fails (error, default) or also when one warns (warn)")
    p.add_argument("--max-rows", type=int, default=10, help="evidence rows shown per check (0: all)")
    p.add_argument("--list", action="store_true", help="list the checks and their params, run nothing")


def _list_checks(checks_dir) -> int:
    from flightlog.query.health import load_checks

    for c in load_checks(checks_dir).values():
        src = "" if c.builtin else f"   [{c.path}]"
        print(f"{c.name:<20} {c.severity:<5}  {c.description}{src}")
        for k, v in c.params.items():
            print(f"{'':<22}--set {c.name}.{k}={v!r}   {c.param_help.get(k, '')}")
    return 0


def run_health(args: argparse.Namespace) -> int:
    from flightlog.query.health import health

    if args.list:
        return _list_checks(args.checks_dir)
    report = health(args.run, store=args.store, checks=args.check, params=dict(args.overrides),
                    reference=args.reference, checks_dir=args.checks_dir)
    limit = None if args.max_rows <= 0 else args.max_rows
    if args.format == "json":
        out = {"run_id": report.run_id, "reference": report.reference, "ok": not report.failed(args.fail_on),
               "summary": report.summary(),
               "checks": [{"name": r.name, "severity": r.severity, "status": r.status,
                           "description": r.description, "params": r.params, "error": r.error,
                           "reason": r.reason,
                           "evidence_rows": r.evidence.num_rows,
                           "evidence": _format._clean_float(r.evidence.slice(0, limit).to_pylist()
                                                            if limit else r.evidence.to_pylist())}
                          for r in report]}
        print(json.dumps(out, default=_format._json_default, indent=2))
    else:
        print(f"health of run {report.run_id}" + (f" (reference {report.reference})" if report.reference else ""))
        for r in report:
            print(f"{r.status.upper():5}  {r.name:<20} {r.error or r.reason or r.description}")
            if r.evidence.num_rows:
                text = _format.text_table(r.evidence, max_rows=limit)
                print("\n".join("       " + line for line in text.splitlines()))
        s = report.summary()
        print(f"{s['pass']} passed, {s['warn']} warned, {s['fail']} failed, {s['error']} could not run, "
              f"{s['skip']} skipped (nothing to look at)")
    return 1 if report.failed(args.fail_on) else 0


# -- assertions ---------------------------------------------------------------------------------

def configure_assertions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="latest", help="run id, unique prefix or 'latest' (default)")
    add_store(p)
    p.add_argument("--top", type=int, default=10, help="items worth a human look (default 10)")
    p.add_argument("--format", choices=("table", "json"), default="table")


def _pivot(per_epoch: pa.Table) -> pa.Table:
    """One row per epoch, one column per assertion: ``failed/checked (rate%)``."""
    names = sorted(set(per_epoch.column("assertion").to_pylist()))
    cells: dict = {}
    for r in per_epoch.to_pylist():
        rate = f" ({100 * r['rate']:.1f}%)" if r["failed"] and r["rate"] is not None else ""
        cells.setdefault(r["epoch"], {})[r["assertion"]] = f"{r['failed']}/{r['checked']}{rate}"
    epochs = sorted(cells, key=lambda e: (e is not None, e if e is not None else 0))
    cols = {"epoch": pa.array(epochs, pa.int64())}
    for n in names:
        cols[n] = pa.array([cells[e].get(n, "") for e in epochs], pa.string())
    return pa.table(cols)


def run_assertions(args: argparse.Namespace) -> int:
    from flightlog.query.assertions import report

    rep = report(args.run, store=args.store, top=args.top)
    if args.format == "json":
        out = {"run_id": rep["run_id"], "per_epoch": rep["per_epoch"].to_pylist(), "top": rep["top"].to_pylist()}
        print(json.dumps(_format._clean_float(out), default=_format._json_default, indent=2))
        return 0
    print(f"assertions of run {rep['run_id']}\n\nfailed / checked items per epoch")
    print(_format.text_table(_pivot(rep["per_epoch"]), max_rows=None) if rep["per_epoch"].num_rows
          else "  (no fl.check calls recorded)")
    print(f"\nitems worth a look (top {args.top}, spread across assertions)")
    print(_format.text_table(rep["top"]) if rep["top"].num_rows else "  (no failing items)")
    return 0
