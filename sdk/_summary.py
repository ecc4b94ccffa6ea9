"""The end-of-run summary on stderr: what was recorded, where, and what to run next.

Printed once per run when it ends, only when stderr is a terminal (a log file or a
CI job gets nothing unless ``FLIGHTLOG_SUMMARY=1``); ``FLIGHTLOG_QUIET=1`` turns it
off everywhere. Counting reads Parquet footers only, and any failure is silent:
the summary must never be what breaks a run's exit.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from flightlog import _config


def wanted(stream=None) -> bool:
    """Whether to print: not quiet, and stderr is a terminal or the summary was asked for."""
    if os.environ.get(_config.ENV_QUIET, "").strip() not in ("", "0"):
        return False
    if os.environ.get(_config.ENV_SUMMARY, "").strip() not in ("", "0"):
        return True
    s = stream or sys.stderr
    try:
        return bool(s.isatty())
    except Exception:
        return False


def counts(store: str, run_id: str) -> dict[str, int]:
    """Rows per table of ``run_id`` in a local store, from the Parquet footers."""
    import pyarrow.parquet as pq

    from flightlog.collector import schema, store as _store

    out: dict[str, int] = {}
    for table in schema.TABLES:
        n = 0
        for f in _store.table_files(store, table, [run_id]):
            try:
                from flightlog.collector import fs as _fs

                n += pq.read_metadata(_fs.open_input(f) if _fs.is_remote(f) else f).num_rows
            except Exception:
                continue
        if n:
            out[table] = n
    return out


def text(run) -> str:
    """The summary of a finished ``run``."""
    rid, name = run.run_id, run.name
    dur = ""
    end = run.ended_at
    if end is not None:
        dur = f" in {(end - run.started_at).total_seconds():.1f}s"
    head = f"flightlog: run {rid}" + (f" ({name})" if name else "") + f" {run.status}{dur}"
    url = getattr(run.sink, "url", None)
    if url:
        where = f"  sent to  collector {url}"
        cnt = {}
    else:
        cnt = counts(run.store, rid)
        rows = sum(v for k, v in cnt.items() if k not in ("runs",))
        where = f"  store    {run.store}   {rows:,} rows"
        if cnt.get("checkpoints"):
            where += f", {cnt['checkpoints']} checkpoints"
        if cnt.get("spans"):
            where += f", {cnt['spans']} step calls"
    if run.dropped_rows:
        where += f"   ({run.dropped_rows} rows could not be written)"
    ref = rid  # names may repeat across runs; the id never does
    env = "" if url or run.store == _config.store_home(None) else f"FLIGHTLOG_HOME={run.store} "
    nxt = [f"{env}flightlog show {ref}", f"{env}flightlog runs", f"{env}flightlog health --run {ref}"]
    if importlib.util.find_spec("fastapi") is not None and importlib.util.find_spec("flightlog.ui") is not None:
        nxt.append(f"{env}flightlog ui")
    return "\n".join([head, where, "  next     " + nxt[0]] + ["           " + c for c in nxt[1:]])


def maybe_print(run) -> None:
    """Print the summary of ``run`` to stderr when wanted; never raises."""
    try:
        if run.kind == "replay" or os.getpid() != run.owner_pid or not wanted():
            return
        sys.stderr.write(text(run) + "\n")
        sys.stderr.flush()
    except Exception:
        pass
