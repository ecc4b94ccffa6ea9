"""``flightlog replay``: the command-line form of :func:`flightlog.replay.run`."""
from __future__ import annotations

import argparse
import json
import sys


def configure_replay(p: argparse.ArgumentParser) -> None:
    p.usage = ("flightlog replay SCRIPT [script args] --run RUN [--epochs A:B|list] [--workers N] "
               "[--dry-run] [--all-runs | --runs \"SQL predicate\"] [--force]")
    p.add_argument("script", help="today's version of the training script, with new fl.log statements")
    p.epilog = ("Arguments the replay does not know are passed to the script; put the script's own "
                "arguments after -- when they clash (flightlog replay train.py --run X -- --epochs 20). "
                "Without script arguments the recorded ones are used.")
    p.add_argument("--run", default=None, help="run id, prefix or 'latest' (default)")
    p.add_argument("--epochs", default=None, help="A:B (B exclusive), A:, N or a comma list (default: all)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate, run nothing")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--all-runs", action="store_true", help="replay every finished run")
    g.add_argument("--runs", default=None, help="replay the runs matching this SQL predicate over `runs`")
    p.add_argument("--force", action="store_true", help="replay even if the code changed in more than log lines")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: as recorded, which keeps results bit-exact)")
    p.add_argument("--store", default=None, help="store directory (default: $FLIGHTLOG_HOME or ./.flightlog)")
    p.add_argument("--format", choices=("text", "json"), default="text")


def parse_replay(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Our flags anywhere before ``--``; everything unknown (and all after ``--``) goes to the script."""
    if "--" in argv:
        k = argv.index("--")
        ours, passthrough = argv[:k], argv[k + 1:]
    else:
        ours, passthrough = argv, []
    args, unknown = parser.parse_known_args(ours)
    args.script_args = unknown + passthrough
    return args


def run_replay(args) -> int:
    from flightlog.replay.runner import run

    extra = list(args.script_args) if getattr(args, "script_args", None) else None
    res = run(args.script, extra or None, run=args.run, epochs=args.epochs, workers=args.workers,
              dry_run=args.dry_run, all_runs=args.all_runs, runs=args.runs, force=args.force,
              store=args.store, threads=args.threads)
    if args.format == "json":
        print(json.dumps({
            "replay_id": res.replay_id, "runs": res.runs, "fidelity": res.fidelity if not args.dry_run else None,
            "new_names": res.new_names, "rows": res.rows, "compared": res.compared, "seconds": res.seconds,
            "startup_s": res.startup_s, "refused": res.refused,
            "segments": [{"run_id": s.run_id, "segment": s.segment, "status": s.status, "fidelity": s.fidelity,
                          "compared": s.data.get("compared", 0), "first_divergence": s.data.get("first_divergence"),
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
                f"compared {d.get('compared', 0)}, new rows {d.get('rows', 0)}, {s.seconds:.1f}s")
        print(line)
        if d.get("first_divergence"):
            fd = d["first_divergence"]
            print(f"    first divergence: {fd['name']} step {fd['step']} (epoch {fd['epoch']}, batch {fd['batch']}): "
                  f"recorded {fd['recorded']!r}, replayed {fd['replayed']!r}")
        if s.error:
            print("    " + s.error.replace("\n", "\n    "), file=sys.stderr)
    for rid, why in res.refused.items():
        print(f"{rid}: refused: {why}", file=sys.stderr)
    print(f"\nfidelity: {res.fidelity} ({res.compared} re-computed values compared with the record)")
    print(f"stored: {', '.join(res.new_names) or '(nothing)'} — {res.rows} rows with source='replay' "
          f"in {res.seconds:.1f}s (start-up {res.startup_s or 0:.2f}s)")
    return 0 if res.ok and res.fidelity != "diverged" else 1
