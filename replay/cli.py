"""``flightlog replay``: the command-line form of :func:`flightlog.replay.run`."""
from __future__ import annotations

import argparse
import json
import sys


def configure_replay(p: argparse.ArgumentParser) -> None:
    p.usage = ("flightlog replay SCRIPT [script args] --run RUN [--epochs A:B|list] [--workers N] "
               "[--dry-run] [--all-runs | --runs \"SQL predicate\"] [--force] [--no-verify] [--cold] "
               "[--executor ray [--address ADDR]]\n"
               "       flightlog replay --status | --stop [--store DIR]")
    p.add_argument("script", nargs="?", default=None,
                   help="today's version of the training script, with new fl.log statements")
    p.epilog = ("Plain arguments the replay does not know are passed to the script; the script's own "
                "options (anything starting with -) go after -- (flightlog replay train.py --run X -- --epochs 20); "
                "an unknown option before -- is an error. Without script arguments the recorded ones are used.")
    p.add_argument("--run", default=None, help="run id, prefix or 'latest' (default)")
    p.add_argument("--epochs", default=None, help="A:B (B exclusive), A:, N or a comma list (default: all)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate, run nothing")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--all-runs", action="store_true", help="replay every finished run")
    g.add_argument("--runs", default=None, help="replay the runs matching this SQL predicate over `runs`")
    p.add_argument("--force", action="store_true", help="replay even if the code changed in more than log lines")
    p.add_argument("--no-verify", action="store_true",
                   help="skip re-executing one epoch in full to verify the new values of a fast (skipping, "
                        "tail-slicing) plan; a segment that then re-computed no recorded value is 'unchecked'")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: as recorded, which keeps results bit-exact)")
    p.add_argument("--store", default=None, help="store directory (default: $FLIGHTLOG_HOME or ./.flightlog)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where workers run: local processes (default) or tasks on a Ray cluster")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for --executor ray (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--cold", action="store_true",
                   help="start every worker as a new interpreter, bypassing the store's warm replay pool")
    p.add_argument("--status", action="store_true", help="show the store's warm replay pool and exit")
    p.add_argument("--stop", action="store_true", help="stop the store's warm replay pool and exit")


def parse_replay(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Our flags anywhere before ``--``; everything unknown (and all after ``--``) goes to the script."""
    if "--" in argv:
        k = argv.index("--")
        ours, passthrough = argv[:k], argv[k + 1:]
    else:
        ours, passthrough = argv, []
    args, unknown = parser.parse_known_args(ours)
    opts = [a for a in unknown if a.startswith("-") and len(a) > 1 and not a[1:2].isdigit() and a[1:2] != "."]
    if opts:  # a misspelt flag must not reach the script and start a real replay
        import difflib

        from flightlog._errors import FlightlogError

        known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        flag = opts[0].split("=", 1)[0]
        near = difflib.get_close_matches(flag, known, 1, 0.6)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise FlightlogError(f"unknown option {flag} for flightlog replay{hint}; the script's own options go "
                             f"after --: flightlog replay {args.script} ... -- {' '.join(unknown)}")
    args.script_args = unknown + passthrough
    return args


def run_replay(args) -> int:
    from flightlog.replay import pool
    from flightlog.replay.runner import run

    if getattr(args, "status", False) or getattr(args, "stop", False):
        return _pool_command(args)
    if not args.script:
        from flightlog._errors import FlightlogError

        raise FlightlogError("flightlog replay needs a SCRIPT (or --status / --stop)")
    extra = list(args.script_args) if getattr(args, "script_args", None) else None
    from flightlog.replay import ray_executor

    asked, why = args.workers, None
    if isinstance(asked, int) and asked > 1 and getattr(args, "executor", "local") == "local":
        args.workers, why = pool.fit_workers(asked)  # split only over idle cores; the plan says why
    from flightlog import _config

    home = _config.store_home(args.store)
    with pool.options(cold=getattr(args, "cold", False), store=home), \
            ray_executor.options(getattr(args, "executor", "local"), getattr(args, "address", None)):
        res = _run(run, args, extra)
        if not args.dry_run:
            pool.note_startup(home, res.startup_s)  # for the next --dry-run's estimate
    if why:
        res.plan_text = (res.plan_text or "") + f"\n  workers: {why}"
    return _report(args, res)


def _pool_command(args) -> int:
    """``--status`` / ``--stop``: the store's warm replay pool."""
    from flightlog import _config
    from flightlog.replay import pool

    home = _config.store_home(args.store)
    if args.status:
        if args.format == "json":
            print(json.dumps(pool.status(home), default=str, indent=2))
        else:
            print(pool.describe_status(home))
        return 0
    pid = pool.stop(home)
    print(f"stopped the warm replay pool (pid {pid})" if pid else f"no warm replay pool for {home}")
    return 0


def _run(run, args, extra):
    return run(args.script, extra or None, run=args.run, epochs=args.epochs, workers=args.workers,
              dry_run=args.dry_run, all_runs=args.all_runs, runs=args.runs, force=args.force,
              store=args.store, threads=args.threads, verify=not args.no_verify)


def _report(args, res) -> int:
    if args.format == "json":
        print(json.dumps({
            "replay_id": res.replay_id, "runs": res.runs, "fidelity": res.fidelity if not args.dry_run else None,
            "new_names": res.new_names, "rows": res.rows, "compared": res.compared, "seconds": res.seconds,
            "startup_s": res.startup_s, "refused": res.refused, "verified": res.verified,
            "verification": res.verification, "scratch": res.scratch,
            "files": [{"path": a, "written_to": b} for a, b in res.files],
            "segments": [{"run_id": s.run_id, "segment": s.segment, "status": s.status, "fidelity": s.fidelity,
                          "compared": s.data.get("compared", 0), "first_divergence": s.data.get("first_divergence"),
                          "verified": s.verified, "stored": s.stored,
                          "error": s.error} for s in res.segments],
            "plan": res.plan_text}, default=str, indent=2))
        return 0 if args.dry_run or (res.ok and res.fidelity != "diverged") else 1
    print(res.plan_text)
    if args.dry_run:
        return 0
    print()
    for s in res.segments:
        d = s.data
        line = (f"{s.run_id} epochs {s.segment:<8} {s.status:<6} {s.fidelity:<16} "
                f"compared {d.get('compared', 0)}, new rows {d.get('rows', 0)} (stored {d.get('stored_rows', 0)}), {s.seconds:.1f}s")
        print(line)
        if d.get("first_divergence"):
            fd = d["first_divergence"]
            if "reason" in fd:
                print(f"    diverged: {fd['name']}: {fd['reason']}")
            else:
                print(f"    first divergence: {fd['name']} step {fd['step']} (epoch {fd['epoch']}, batch "
                      f"{fd['batch']}): recorded {fd['recorded']!r}, replayed {fd['replayed']!r}")
        if s.error:
            print("    " + s.error.replace("\n", "\n    "), file=sys.stderr)
    for rid, why in res.refused.items():
        print(f"{rid}: refused: {why}", file=sys.stderr)
    for line in res.verification:
        print(line)
    print(f"\nfidelity: {res.fidelity} ({res.compared} re-computed values compared with the record, "
          f"{res.verified} new values verified by a full re-execution)")
    if res.files:
        print(f"files the script wrote went to {res.scratch}:")
        for a, b in res.files[:20]:
            print(f"    {a} -> {b}")
    print(f"stored: {', '.join(res.new_names) or '(nothing)'} — {res.rows} rows with source='replay' "
          f"in {res.seconds:.1f}s (start-up {res.startup_s or 0:.2f}s)")
    return 0 if res.ok and res.fidelity != "diverged" else 1
