"""``flightlog ui``: a web UI over a store — runs, charts, replays, health, steps, lineage, SQL.

Server-rendered pages (FastAPI, no build step) with vendored uPlot for charts;
series are downsampled in DuckDB so that 10M-point metrics stay interactive.
The same app is mounted by ``flightlog serve`` under ``/ui``. See docs/ui.md.
"""
from __future__ import annotations

import argparse
import os
import sys

from flightlog import _config

DEFAULT_PORT = 8080

__all__ = ["create_app", "configure_ui", "run_ui"]


def create_app(store=None, token: str | None = None, **kw):
    """The UI's ASGI app over ``store`` (read only); ``token`` guards every route."""
    from flightlog.ui.app import create_app as _create

    return _create(store, token, **kw)


def configure_ui(p: argparse.ArgumentParser) -> None:
    from flightlog._cli_core import add_store

    add_store(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; use 0.0.0.0 only with --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--token", default=None,
                   help=f"require this token on every page and API call (default: ${_config.ENV_TOKEN}, else none)")


def run_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from flightlog._errors import StoreError

    token = args.token if args.token is not None else (os.environ.get(_config.ENV_TOKEN) or None)
    root = _config.store_home(args.store)
    if not os.path.isdir(root):
        raise StoreError(f"no flightlog store at {root} (set FLIGHTLOG_HOME or pass --store)")
    if not 0 < args.port < 65536:
        from flightlog._errors import FlightlogError

        raise FlightlogError(f"--port must be between 1 and 65535, got {args.port}")
    app = create_app(root, token)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"flightlog: warning: serving on {args.host} without --token: anyone who can reach it "
              "can read the store", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    link = f"http://{host}:{args.port}/" + ("login?token=<TOKEN>" if token else "")
    print(f"flightlog ui on {link}  store {root}"
          f"{'  (open /login?token=... once, or send Authorization: Bearer)' if token else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
