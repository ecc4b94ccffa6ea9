"""``flightlog serve | ui``: arguments, checks and the start-up lines; the apps are
``flightlog.collector.server`` and ``flightlog.ui``. Each command imports only its own app."""
from __future__ import annotations

import argparse
import os
import sys

from flightlog import _config
from flightlog._cli_core import add_store
from flightlog._errors import FlightlogError, StoreError

UI_PORT = 8080


def _warn_open(host: str, what: str) -> None:
    print(f"flightlog: warning: serving on {host} without --token: anyone who can reach it {what}",
          file=sys.stderr)


# -- serve ---------------------------------------------------------------------------------

def configure_serve(p: argparse.ArgumentParser) -> None:
    from flightlog.collector import server as S

    add_store(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; use 0.0.0.0 only with --token)")
    p.add_argument("--port", type=int, default=S.DEFAULT_PORT, help=f"port (default {S.DEFAULT_PORT}, OTLP/HTTP's)")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' (default: ${_config.ENV_TOKEN}, else none)")
    p.add_argument("--max-body-mb", type=float, default=S.DEFAULT_MAX_BODY / 2**20,
                   help="largest request body accepted, MiB (default 64)")
    p.add_argument("--query-timeout", type=float, default=S.DEFAULT_QUERY_TIMEOUT,
                   help="seconds a /v1/query may run (default 30)")
    p.add_argument("--max-rows", type=int, default=S.DEFAULT_MAX_ROWS, help="rows a /v1/query returns at most")
    p.add_argument("--query-memory-mb", type=float, default=S.DEFAULT_QUERY_MEMORY / 2**20,
                   help="memory one /v1/query may use, MiB (default 1024; its process is capped)")
    p.add_argument("--max-response-mb", type=float, default=S.DEFAULT_MAX_RESPONSE / 2**20,
                   help="largest /v1/query reply, MiB (default 128)")
    p.add_argument("--max-queries", type=int, default=S.DEFAULT_MAX_QUERIES,
                   help=f"queries run at once; more wait (default {S.DEFAULT_MAX_QUERIES})")
    p.add_argument("--read-timeout", type=float, default=S.DEFAULT_READ_TIMEOUT,
                   help=f"seconds a client has to send a request body (headers: at most {S.HEADER_TIMEOUT:g}); "
                        f"slower senders get 408 and are disconnected (default {S.DEFAULT_READ_TIMEOUT:g})")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from flightlog.collector import server as S

    if args.token is not None:
        token, where = args.token, "--token"
    else:
        token, where = os.environ.get(_config.ENV_TOKEN), f"${_config.ENV_TOKEN}"
    try:
        token = S.check_token(token)
    except ValueError as e:
        raise FlightlogError(f"{where}: {e}") from None
    for name in ("max_body_mb", "query_timeout", "query_memory_mb", "max_response_mb", "read_timeout"):
        if not getattr(args, name) > 0:
            raise FlightlogError(f"--{name.replace('_', '-')} must be a positive number")
    if args.max_rows < 1 or args.max_queries < 1:
        raise FlightlogError("--max-rows and --max-queries must be at least 1")
    app = S.create_app(args.store, token, max_body=int(args.max_body_mb * 2**20),
                       query_timeout=args.query_timeout, max_rows=args.max_rows,
                       query_memory=int(args.query_memory_mb * 2**20), max_response=int(args.max_response_mb * 2**20),
                       max_queries=args.max_queries)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        _warn_open(args.host, "can write and read the store")
    S.raise_fd_limit()
    print(f"flightlog collector on http://{args.host}:{args.port}  store {app.state.store}"
          f"{'  (token required)' if token else ''}", flush=True)
    uvicorn.Server(S.uvicorn_config(app, args.host, args.port, args.read_timeout, log_level=args.log_level)).run()
    return 0


# -- ui ------------------------------------------------------------------------------------

def configure_ui(p: argparse.ArgumentParser) -> None:
    add_store(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; use 0.0.0.0 only with --token)")
    p.add_argument("--port", type=int, default=UI_PORT, help=f"port (default {UI_PORT})")
    p.add_argument("--token", default=None,
                   help=f"require this token on every page and API call (default: ${_config.ENV_TOKEN}, else none)")


def run_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from flightlog.ui import create_app

    token = args.token if args.token is not None else (os.environ.get(_config.ENV_TOKEN) or None)
    root = _config.store_home(args.store)
    if not os.path.isdir(root):
        raise StoreError(f"no flightlog store at {root} (set FLIGHTLOG_HOME or pass --store)")
    if not 0 < args.port < 65536:
        raise FlightlogError(f"--port must be between 1 and 65535, got {args.port}")
    app = create_app(root, token)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        _warn_open(args.host, "can read the store")
    host = f"[{args.host}]" if ":" in args.host else args.host
    link = f"http://{host}:{args.port}/" + ("login?token=<TOKEN>" if token else "")
    print(f"flightlog ui on {link}  store {root}"
          f"{'  (open /login?token=... once, or send Authorization: Bearer)' if token else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
