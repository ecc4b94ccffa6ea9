"""``flightlog rm | gc | sync``: arguments, confirmation and output; the work is in
``flightlog.collector.gc`` (removal) and ``flightlog.collector.client`` (the spool)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flightlog import _config
from flightlog._cli_core import add_store
from flightlog._errors import FlightlogError, StoreError


# -- rm ----------------------------------------------------------------------------------

def configure_rm(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="runs to remove (id, unique prefix, name or 'latest'), or a replay id (rp…) to remove "
                        "one replay's rows from its run")
    add_store(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    p.add_argument("--force", action="store_true",
                   help="also remove runs that look live (only when you know their process is gone)")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")


def _confirm(question: str) -> bool:
    try:
        ans = input(question + " [y/N] ")
    except EOFError:
        return False
    return ans.strip().lower() in ("y", "yes")


def run_rm(args: argparse.Namespace) -> int:
    from flightlog.collector import gc

    plan = gc.plan_rm(args.store, args.runs, args.force)  # resolves and refuses before asking anything
    if not args.yes and not args.dry_run:
        what = [f"run {r}" + (f" ({plan['info'][r][2]})" if plan["info"][r][2] else "") for r in plan["runs"]]
        what += [f"replay {rp}" for rp in plan["replays"]]
        if not sys.stdin.isatty():
            raise FlightlogError(f"refusing to remove {', '.join(what)} without --yes (stdin is not a terminal)")
        if not _confirm(f"remove {', '.join(what)} and the blobs only they use?"):
            print("nothing removed")
            return 1
    gc.rm(args.store, args.runs, force=args.force, dry_run=args.dry_run)
    return 0


# -- gc ----------------------------------------------------------------------------------

def configure_gc(p: argparse.ArgumentParser) -> None:
    add_store(p)
    p.add_argument("--keep-last", type=int, default=None, metavar="N",
                   help="keep only each run's N newest checkpoints (plus those a resumed run starts from)")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="prune checkpoints only of runs that started more than DAYS ago "
                        "(alone: all their checkpoints)")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")


def run_gc(args: argparse.Namespace) -> int:
    from flightlog.collector import gc

    gc.gc(args.store, args.keep_last, args.older_than, args.dry_run)
    return 0


# -- sync --------------------------------------------------------------------------------

def configure_sync(p: argparse.ArgumentParser) -> None:
    add_store(p)
    p.add_argument("--spool", default=None, help="spool directory (default: <store>/spool)")
    p.add_argument("--collector", default=None, help=f"collector URL (default: ${_config.ENV_COLLECTOR})")
    p.add_argument("--token", default=None, help=f"bearer token (default: ${_config.ENV_TOKEN})")
    p.add_argument("--retry-rejected", action="store_true",
                   help="also resend batches the collector rejected before (spool/rejected)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")


def run_sync(args: argparse.Namespace) -> int:
    """Push every spooled batch; exit 1 when some are left or were not confirmed."""
    from flightlog.collector import client

    url = _config.resolve(args.collector, _config.ENV_COLLECTOR, None)
    spool = Path(args.spool) if args.spool else client.local_spool(_config.store_home(args.store))
    if not spool.is_dir():
        print(f"nothing to sync: no spool at {spool}")
        return 0
    if not url:
        url = client.spooled_url(spool)  # the collector the spooled batches were going to
        if url:
            print(f"collector {url} (recorded in {spool / client.URL_FILE}; --collector URL sends elsewhere)")
    if not url:
        raise StoreError(f"no collector given and none recorded in {spool}: pass --collector URL "
                         f"or set {_config.ENV_COLLECTOR}")
    token = _config.resolve(args.token, _config.ENV_TOKEN, None)
    res = client.sync(spool, url, token=token, timeout=args.timeout, retry_rejected=args.retry_rejected)
    msg = f"sent {res['sent']} of {res['before']} spooled batch(es) to {url}"
    if res["duplicates"]:
        msg += f" ({res['duplicates']} already stored there)"
    if res["rejected"]:
        msg += f"; {res['rejected']} rejected (kept in {spool / 'rejected'})"
    left, unconfirmed = res["left"], res["unconfirmed"]
    if left:
        msg += f"; {len(left)} left ({res['last_error'] or 'collector unreachable'})"
    if unconfirmed:
        msg += (f"; {len(unconfirmed)} batch(es) NOT confirmed by the collector, kept in "
                f"{spool / 'unconfirmed'}: {', '.join(unconfirmed[:10])}{' ...' if len(unconfirmed) > 10 else ''}")
    print(msg)
    return 1 if left or unconfirmed else 0
