"""The ``flightlog`` command.

This is the CLI layer: each subcommand's arguments and output live in a module
next to this one (``_*_cli.py``; ``flightlog replay``'s in replay/cli.py) that
calls plain functions of the component doing the work; this module only
dispatches. A subcommand module ``M`` registered in ``COMMANDS`` defines
``configure_<cmd>(parser)`` and ``run_<cmd>(args) -> int`` (dashes in the
command become underscores). Only the chosen command's module is imported,
so ``flightlog runs`` never pays for FastAPI or torch.

Errors: a FlightlogError prints one line ``flightlog: error: …`` and exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from flightlog._errors import FlightlogError

COMMANDS: dict[str, tuple[str, str]] = {
    "runs": ("flightlog._runs_cli", "list runs, newest first: name, tags, differing params, last metric values"),
    "compare": ("flightlog._runs_cli", "put two or more runs side by side: params, metrics, checkpoints, health"),
    "tag": ("flightlog._runs_cli", "add (or --remove) tags of a run"),
    "note": ("flightlog._runs_cli", "set the note of a run"),
    "rm": ("flightlog._store_cli", "remove runs: their rows in every table and the blobs no other run uses"),
    "gc": ("flightlog._store_cli", "prune old checkpoints, unreferenced blobs and leftover temp files"),
    "show": ("flightlog._cli_core", "show one run: params, status, metric summary, checkpoints"),
    "sql": ("flightlog._cli_core", "run read-only SQL over the store"),
    "resume": ("flightlog._resume_cli", "continue a crashed or killed run from its last checkpoint"),
    "replay": ("flightlog.replay.cli", "hindsight logging: replay runs with new log statements"),
    "replay-step": ("flightlog._steps_cli", "re-run a failed @fl.step call with its recorded inputs"),
    "lineage": ("flightlog._lineage_cli", "show upstream/downstream lineage of a step, fingerprint or file"),
    "history": ("flightlog._lineage_cli", "list a step's calls over time and flag stale inputs"),
    "health": ("flightlog._health_cli", "run the SQL health checks (non-zero exit on failure)"),
    "assertions": ("flightlog._health_cli", "assertion failure counts and items worth a look"),
    "slices": ("flightlog._slices_cli", "find the data slices where the model fails"),
    "feasibility": ("flightlog._feasibility_cli", "is a target error reachable with this data? (Bayes error bound)"),
    "gate": ("flightlog._gate_cli", "pass/fail a candidate model against a baseline with a statistical guarantee (ease.ml/ci)"),
    "serve": ("flightlog._serve_cli", "run the collector server (OTLP/HTTP + Arrow ingest + SQL)"),
    "ui": ("flightlog._serve_cli", "web UI: runs, charts, replays, health, steps, lineage, SQL"),
    "sync": ("flightlog._store_cli", "push a spool of unsent batches to a collector"),
    "compact": ("flightlog._cli_core", "merge small Parquet parts of finished runs"),
}


# what `pip install 'flightlog[server]'` brings (the import names)
_SERVER_DEPS = {"fastapi", "uvicorn", "starlette", "httpx", "opentelemetry", "google"}


def _missing(cmd: str, e: ImportError) -> str:
    """The one-line error for a command whose dependency is not installed, with the fix."""
    missing = (getattr(e, "name", None) or "").split(".")[0]
    if missing in _SERVER_DEPS:
        return (f"flightlog {cmd} needs the server extra ({missing} is not installed): "
                "pip install 'flightlog[server]'")
    return f"command {cmd!r} is not available ({e})"


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flightlog",
        description="flightlog: record, query and replay ML training runs and pipelines.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<12} {v[1]}" for k, v in COMMANDS.items()),
    )
    p.add_argument("command", nargs="?", help="one of the commands below")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    if argv[0] == "--version":
        from flightlog import __version__

        print(__version__)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"flightlog: error: unknown command {cmd!r} (see flightlog --help)", file=sys.stderr)
        return 2
    modname, help_ = COMMANDS[cmd]
    fname = cmd.replace("-", "_")
    try:
        mod = importlib.import_module(modname)
        configure = getattr(mod, f"configure_{fname}")
        run = getattr(mod, f"run_{fname}")
    except ImportError as e:
        print(f"flightlog: error: {_missing(cmd, e)}", file=sys.stderr)
        return 2
    except AttributeError as e:
        print(f"flightlog: error: command {cmd!r} is not available ({e})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"flightlog {cmd}", description=help_)
    configure(parser)
    custom = getattr(mod, f"parse_{fname}", None)  # commands that pass arguments through (replay)
    try:
        args = custom(parser, argv[1:]) if custom else parser.parse_args(argv[1:])
        rc = run(args)
    except FlightlogError as e:
        print(f"flightlog: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional dependency the command imports when it runs
        missing = (getattr(e, "name", None) or "").split(".")[0]
        if missing not in _SERVER_DEPS:
            raise
        print(f"flightlog: error: {_missing(cmd, e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flightlog: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
