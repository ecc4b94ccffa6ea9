"""``flightlog resume``: check the run can be continued, then start the training command with
``FLIGHTLOG_RESUME`` set (its ``fl.init`` continues the run: ``flightlog._resume``)."""
from __future__ import annotations

import os
import subprocess
import sys

from flightlog import _config
from flightlog._errors import FlightlogError, RunNotFound


def configure_resume(p):
    p.add_argument("run", help="the crashed or killed run (id, prefix or 'latest')")
    p.add_argument("--store", default=None, help="store directory (default: $FLIGHTLOG_HOME or ./.flightlog)")
    p.add_argument("command", nargs="+", help="the training command after --, e.g. -- python train.py")


def run_resume(args) -> int:
    from flightlog._resume import last_checkpoint
    from flightlog.query import db

    cmd = [c for c in args.command]
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise FlightlogError("give the training command after --, e.g. flightlog resume RUN -- python train.py")
    home = _config.store_home(args.store)
    con = db.connect(home)
    try:
        parent = db.resolve_run(con, args.run)
        status = con.execute("SELECT status FROM runs WHERE run_id = ?", [parent]).fetchall()[0][0]
    finally:
        con.close()
    if status == "running":
        raise FlightlogError(f"run {parent} is still running")
    if status == "finished":
        print(f"flightlog: note: run {parent} finished normally; resuming continues after its last checkpoint",
              file=sys.stderr)
    if last_checkpoint(home, parent) is None:
        raise RunNotFound(f"run {parent} has no complete checkpoint to resume from")
    env = dict(os.environ, **{_config.ENV_RESUME: parent, _config.ENV_HOME: home})
    print(f"flightlog: resuming {parent}: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd, env=env)
