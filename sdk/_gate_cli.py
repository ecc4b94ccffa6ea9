"""``flightlog gate``: pass or fail a candidate model against a baseline, with a guarantee (ease.ml/ci).

Arguments, the budget check and output; the counts come from
:func:`flightlog.query.predictions.load_stats`, the budget from :mod:`flightlog.query.gate_budget`.

The two runs' ``predictions`` rows are joined by item in DuckDB (inside the
store's sandboxed connection), which returns a handful of counts; the
statistics are in :mod:`flightlog.query.gate`. Which rows count:

* epoch: each run's last epoch that logged predictions (``--epoch`` picks one
  for both, or ``none``/``all``); a resumed run includes the runs it resumed from;
* duplicates: when an item was logged twice (a replay, a second call) the newest
  row wins;
* the join key is ``item_id``, or ``(batch, item_id)`` when a run's ids repeat
  across batches (the default positional ids of ``fl.log_predictions``);
* items only one run predicted, and rows without a prediction, are left out and
  counted in the output; the label is either run's ``y_true`` (runs that
  disagree on an item's label are refused).

Each evaluation is recorded as one row of the ``gates`` table, written with the
store's atomic part writer under the candidate run's partition
(``gates/run_id=<candidate>/``) — the only write this command makes. Rows of
one test set and condition make its budget: ``step`` is the evaluation's
1-based index. Exit codes: 0 pass, 1 fail, 3 not enough examples or the test
set's budget is spent ("new test set needed"), 2 bad input.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys

import numpy as np

from flightlog._cli_core import add_store
from flightlog._errors import QueryError, StoreError
from flightlog.query import gate as _g
from flightlog.query.predictions import epoch_arg

PASS, FAIL, BAD_INPUT, INSUFFICIENT = 0, 1, 2, 3


def configure_gate(p: argparse.ArgumentParser) -> None:
    add_store(p)
    p.add_argument("--candidate", default=None, help="the new model's run (id, unique prefix or 'latest')")
    p.add_argument("--baseline", default=None, help="the old model's run")
    p.add_argument("--condition", default=None,
                   help="clauses joined by /\\, each 'LINEAR > NUMBER +/- EPS' (or <) in n (new accuracy), "
                        "o (old accuracy), d (fraction of differing predictions); e.g. 'n - o > 0.02 +/- 0.01'")
    p.add_argument("--reliability", type=float, default=0.999,
                   help="probability that the result's guarantee holds (default 0.999)")
    p.add_argument("--mode", choices=_g.MODES, default="fp-free",
                   help="fp-free: a pass is never wrong; fn-free: a fail is never wrong (default fp-free)")
    p.add_argument("--adaptivity", choices=_g.ADAPTIVITY, default="none",
                   help="how results feed back into the next model: none (they do not), full (each result may), "
                        "firstChange (only until the result first changes); default none")
    p.add_argument("--steps", type=int, default=32,
                   help="evaluations one test set is budgeted for (default 32)")
    p.add_argument("--testset", default=None,
                   help="name of the test set, for its budget (default: ids-<hash of the joined item ids>)")
    p.add_argument("--epoch", default=None,
                   help="epoch whose predictions to use for both runs: N, 'none' (rows logged outside fl.loop) or "
                        "'all' (default: each run's last epoch that logged predictions)")
    p.add_argument("--max-disagreement", type=float, default=None, metavar="D",
                   help="a bound on d known in advance: n - o clauses then use the variance (Bennett) bound and "
                        "need labels only where the predictions differ; checked on the data")
    p.add_argument("--plan", action="store_true",
                   help="print the labelled examples the condition needs (Hoeffding, and Bennett with "
                        "--max-disagreement) and exit; reads no runs")
    p.add_argument("--format", choices=("text", "json"), default="text")


# -- output --------------------------------------------------------------------------------------


def _f(x, digits=4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _plan_text(pl: _g.Plan) -> str:
    lines = [f"plan: {pl.condition.text}",
             f"  reliability {pl.reliability}, adaptivity {pl.adaptivity}, steps {pl.steps}, "
             f"{len(pl.clauses)} clause(s)"]
    for i, cp in enumerate(pl.clauses, 1):
        cl = cp.clause
        H = f"2^{pl.steps}" if pl.adaptivity == "full" else f"{pl.steps}"
        lines.append(f"clause {i}: {cl.text}")
        lines.append(f"  Hoeffding: r = {cp.r} variable(s) ({', '.join(cl.variables)}), c = {cp.c:g}, "
                     f"δ = (1 - {pl.reliability})/({cp.r}·{len(pl.clauses)}·{H}) = {math.exp(cp.log_delta):.4g}")
        lines.append(f"    N = c²·r²·ln(1/δ)/(2·eps²) = {cp.examples:,} examples, "
                     f"{cp.labels:,} of them labelled" + ("" if cl.needs_labels else " (d needs no labels)"))
        if pl.max_disagreement is not None:
            v = cp.variance
            if v is None:
                lines.append(f"  variance bound: does not apply (the clause is not on n - o); Hoeffding's N stands")
            else:
                lines.append(f"  variance bound (Bennett, d <= {pl.max_disagreement:g}): n - o as one variable, "
                             f"Var <= {v['variance']:g}, range {v['range']:g}, δ = {v['delta']:.4g} "
                             f"(one more share checks d <= {pl.max_disagreement:g} on the data)")
                lines.append(f"    N = b²·ln(1/δ)/(v·h(b·eps/v)) = {v['examples']:,} examples "
                             f"(Bernstein: {v['bernstein_examples']:,}); only items where the predictions differ "
                             f"need a label: about {v['labels']:,} at d = {pl.max_disagreement:g}")
    lines.append(f"total: {pl.examples:,} examples by Hoeffding, {pl.labels:,} of them labelled")
    if pl.max_disagreement is not None:
        ve, vl = pl.variance_examples, pl.variance_labels
        saved = pl.labels - vl
        lines.append(f"       {ve:,} examples with the variance bound, about {vl:,} of them labelled "
                     f"(labels saved: {saved:,}, {pl.labels / max(vl, 1):.0f}x fewer)")
    return "\n".join(lines) + "\n"


def _plain(x):
    if isinstance(x, np.ndarray):
        x = x.item() if x.ndim == 0 else x.tolist()
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if math.isnan(x) else (None if math.isinf(x) else x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.str_):
        return str(x)
    return x


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# -- the command --------------------------------------------------------------------------------


def run_gate(args: argparse.Namespace) -> int:
    cond = _g.parse_condition(args.condition) if args.condition is not None else None
    if cond is None:
        raise QueryError("--condition is required, e.g. --condition 'n - o > 0.02 +/- 0.01'")
    pl = _g.plan(cond, args.reliability, args.adaptivity, args.steps, args.max_disagreement)  # validates
    if args.plan:
        if args.candidate or args.baseline or args.testset or args.epoch:
            raise QueryError("--plan reads no runs; drop --candidate/--baseline/--testset/--epoch")
        if args.format == "json":
            _write(json.dumps(pl.as_dict(), indent=2) + "\n")
        else:
            _write(_plan_text(pl))
        return 0
    if not args.candidate or not args.baseline:
        raise QueryError("--candidate and --baseline are required (or --plan for the sample size alone)")
    if args.testset is not None and (not args.testset.strip() or len(args.testset) > 200):
        raise QueryError("--testset must be a non-empty name of at most 200 characters")
    epoch = epoch_arg(args.epoch)
    from flightlog import _config
    from flightlog.query import db
    from flightlog.query import gate_budget as _b
    from flightlog.query.predictions import load_stats

    root = _config.store_home(args.store)
    con = db.connect(args.store)
    try:
        if con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 0:
            raise StoreError(f"the store at {root} holds no runs yet")
        stats, notes = load_stats(con, args.candidate, args.baseline, epoch)
    finally:
        con.close()
    testset = args.testset or f"ids-{notes['fingerprint'][:16]}"
    with _b.budget_lock(root):
        con = db.connect(args.store)
        try:
            history = _b.history(con, testset, cond.text)
        finally:
            con.close()
        spent = _b.spent(history, args.adaptivity, args.steps)
        if spent:
            msg = f"new test set needed: test set {testset!r} for {cond.text!r}: {spent}"
            if args.format == "json":
                _write(json.dumps({"result": "exhausted", "exit": INSUFFICIENT, "testset": testset,
                                   "condition": cond.text, "uses": len(history), "message": msg}, indent=2) + "\n")
            else:
                _write(f"gate: NEW TEST SET NEEDED  {msg}\n")
            return INSUFFICIENT
        if history and args.adaptivity == "none":
            print(f"flightlog: warning: test set {testset!r} was already used {len(history)} time(s) for "
                  f"{cond.text!r}; --adaptivity none assumes the candidate was not chosen using those results "
                  "(use --adaptivity full or firstChange if it was)", file=sys.stderr)
        res = _g.decide(cond, stats, args.reliability, args.mode, args.adaptivity, args.steps,
                        args.max_disagreement)
        step = len(history) + 1
        result = str(res["result"])
        clauses = [{k: _plain(v) for k, v in c.items()} for c in res["clauses"]]
        out = {"result": result, "exit": {"pass": PASS, "fail": FAIL}.get(result, INSUFFICIENT),
               "condition": cond.text, "mode": args.mode, "reliability": args.reliability,
               "adaptivity": args.adaptivity, "steps": args.steps, "step": step, "testset": testset,
               "candidate": notes["candidate"], "baseline": notes["baseline"],
               "candidate_rows": notes["candidate_rows"], "baseline_rows": notes["baseline_rows"],
               "n": _plain(res["n"]), "o": _plain(res["o"]), "d": _plain(res["d"]),
               "examples": stats["examples"], "labelled": stats["labelled"],
               "needed": int(_plain(res["needed"])), "more": int(_plain(res["more"])),
               "left_out": {"only_candidate": notes["only_candidate"], "only_baseline": notes["only_baseline"],
                            "without_prediction": notes["without_prediction"]},
               "key": notes["key"], "clauses": clauses}
        _b.record(root, {
            "run_id": notes["candidate"], "baseline_run_id": notes["baseline"], "condition": cond.text,
            "result": result, "mode": args.mode, "adaptivity": args.adaptivity,
            "reliability": float(args.reliability), "steps": args.steps, "testset": testset, "step": step,
            "examples": stats["examples"], "labelled": stats["labelled"], "needed": out["needed"],
            "n": out["n"], "o": out["o"], "d": out["d"],
            "details": json.dumps({k: out[k] for k in ("candidate_rows", "baseline_rows", "left_out", "key",
                                                       "clauses", "more")}, default=str),
            "time": _dt.datetime.now(_dt.timezone.utc)})
    if args.format == "json":
        _write(json.dumps(out, indent=2) + "\n")
    else:
        _write(_text(out, args.max_disagreement))
    return out["exit"]


def _text(o: dict, p: float | None) -> str:
    word = {"pass": "PASS", "fail": "FAIL", "insufficient": "NOT ENOUGH EXAMPLES"}[o["result"]]
    lines = [f"gate: {word}  {o['condition']}",
             f"  {o['mode']}, reliability {o['reliability']}, adaptivity {o['adaptivity']}, "
             f"test set {o['testset']!r} use {o['step']} of {o['steps']}",
             f"  candidate {o['candidate']} ({o['candidate_rows']}): n = {_f(o['n'])}",
             f"  baseline  {o['baseline']} ({o['baseline_rows']}): o = {_f(o['o'])}",
             f"  d = {_f(o['d'])} (predictions differ); {o['examples']:,} items predicted by both, "
             f"{o['labelled']:,} labelled (joined on {o['key']})"]
    lo = o["left_out"]
    if lo["only_candidate"] or lo["only_baseline"] or lo["without_prediction"]:
        lines.append(f"  left out: {lo['only_candidate']:,} item(s) only in the candidate, {lo['only_baseline']:,} "
                     f"only in the baseline, {lo['without_prediction']:,} without a prediction")
    for i, c in enumerate(o["clauses"], 1):
        hw = c["halfwidth"]
        lines.append(f"  clause {i}: {c['clause']}: estimate {_f(c['estimate'])} ± "
                     f"{_f(hw) if hw is not None else 'inf'} ({c['bound']}, needs {int(c['needed']):,} examples)"
                     f" → {c['result']}")
    if o["result"] == "insufficient":
        lines.append(f"  not enough examples to decide at reliability {o['reliability']}: "
                     f"{o['more']:,} more needed ({o['needed']:,} in all; labelled ones for n and o"
                     + (", or unlabelled items plus labels where the predictions differ under "
                        "--max-disagreement" if p is not None else "") + ")")
    return "\n".join(lines) + "\n"
