"""Configuration: explicit argument > ``FLIGHTLOG_*`` environment variable > default.

Every environment variable the package reads is a constant here.
"""
from __future__ import annotations

import os
import re
from typing import Any

ENV_HOME = "FLIGHTLOG_HOME"  # store directory (default ./.flightlog)
ENV_PROJECT = "FLIGHTLOG_PROJECT"  # project name (default: the script's folder name)
ENV_FLUSH_INTERVAL = "FLIGHTLOG_FLUSH_INTERVAL"  # seconds between Parquet parts (default 1.0)
ENV_COLLECTOR = "FLIGHTLOG_COLLECTOR"  # http://host:port of a collector (remote mode)
ENV_TOKEN = "FLIGHTLOG_TOKEN"  # bearer token for the collector
ENV_DISABLED = "FLIGHTLOG_DISABLED"  # "1": every call is a no-op
ENV_PROGRESS = "FLIGHTLOG_PROGRESS"  # "0"/"1": force the loop progress bar off/on
ENV_REPLAY = "FLIGHTLOG_REPLAY"  # set by `flightlog replay` in its workers: path of the plan
ENV_RESUME = "FLIGHTLOG_RESUME"  # set by `flightlog resume` for the training command: the run it continues
ENV_SYSTEM_METRICS = "FLIGHTLOG_SYSTEM_METRICS"  # "0": no sys/... metrics (fl.init(system_metrics=) wins)
ENV_SYSTEM_METRICS_INTERVAL = "FLIGHTLOG_SYSTEM_METRICS_INTERVAL"  # seconds between samples (default 10)
ENV_QUIET = "FLIGHTLOG_QUIET"  # "1": no end-of-run summary on stderr
ENV_SUMMARY = "FLIGHTLOG_SUMMARY"  # "1": print the end-of-run summary even when stderr is not a terminal

DEFAULT_HOME = ".flightlog"
DEFAULT_FLUSH_INTERVAL = 1.0
HEARTBEAT_SECONDS = 2.0
# The least time between two flushes asked for early (a checkpoint's index row). On object stores each
# is a PUT per table (and a replaced object), so they are spaced out; a process killed within that
# second loses its newest index rows and resumes from an older checkpoint. On a local disk a write
# is cheap and the row is written at once: a 0.25 s gap there lost every checkpoint of a fast loop
# killed 0.1 s after them (tests/test_replay.py::test_replay_across_a_resumed_run).
FORCE_GAP_REMOTE = 1.0
FORCE_GAP_LOCAL = 0.0
# A running run whose heartbeat is older than this reads as crashed.
STALE_SECONDS = 30.0
# Metric rows buffered before the flush thread writes early (bounds memory).
FLUSH_ROWS = 100_000
# Rows waiting for the sink (e.g. while the disk is full) before the oldest are dropped.
MAX_PENDING_ROWS = 2_000_000


def resolve(value, env: str, default, cast=str):
    """Argument, else environment variable, else default."""
    if value is not None:
        return value
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except (TypeError, ValueError):
        return default


# "s3://b/p" as given, and "s3:/b/p" as pathlib spells it; two letters at least (not "C:/").
STORE_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/{1,2}(?!/)(.*)$")
LOCAL_SCHEMES = {"file", "local"}


def is_remote(p: Any) -> bool:
    """Whether ``p`` (str or Path) names something on an object store rather than the local disk."""
    if p is None:
        return False
    m = STORE_URI.match(os.fspath(p))
    return bool(m) and m.group(1).lower() not in LOCAL_SCHEMES


def canonical(uri: str) -> str:
    """``scheme://bucket/prefix`` without a trailing slash (the spelling runs record and print)."""
    m = STORE_URI.match(os.fspath(uri))
    if not m:
        raise ValueError(f"not a store URI: {uri!r}")
    rest, _, query = m.group(2).partition("?")
    rest = rest.strip("/")
    if not rest:
        raise ValueError(f"store URI {uri!r} names no bucket")
    return f"{m.group(1).lower()}://{rest}" + (f"?{query}" if query else "")


def store_home(store=None) -> str:
    """The store: an absolute local directory, or an object-store URI such as ``s3://bucket/prefix``."""
    home = os.fspath(resolve(store, ENV_HOME, DEFAULT_HOME))
    if is_remote(home):
        return canonical(home)
    return os.path.abspath(home)


def disabled() -> bool:
    return os.environ.get(ENV_DISABLED, "") not in ("", "0", "false", "False")
