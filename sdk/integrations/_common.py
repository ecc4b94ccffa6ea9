"""What both framework callbacks share: the run, loop context, checkpoints, resume state.

The callbacks drive flightlog's own primitives (the run's loop context tuple,
its ``Checkpointer`` with the adaptive period, ``fl.log``/``fl.arg`` semantics
and the resume state chosen by ``_modes``), so records of a framework run read
exactly like records of an ``fl.loop`` run: ``epoch``/``batch`` columns, the
``checkpoints`` table, ``flightlog resume``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from flightlog import _run, _warn
from flightlog._record import NO_CTX


def start_run(project=None, name=None, store=None, rank: int | None = None,
              world_size: int | None = None) -> "tuple[Any, bool]":
    """The active run (or a new one); True when this call started it (then the callback finishes it).

    ``rank``/``world_size``: what the framework knows (its launcher may not export
    ``RANK``/``WORLD_SIZE`` to every process); with more than one process all
    ranks get the job's shared run id and their rows a ``rank``.
    """
    r = _run.ACTIVE
    if r is not None and not r.finished:
        return r, False
    if world_size is None:
        try:
            world_size = int(os.environ.get("WORLD_SIZE") or 1)
        except ValueError:
            world_size = 1
    if world_size > 1:
        try:
            if rank is not None:
                os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world_size))
            from flightlog import _ddp

            _ddp.prepare_env()
        except Exception as e:
            _warn.problem("ddp_setup", f"multi-process setup failed: {e!r}")
    if project is None and name is None and store is None:
        return _run._auto_start(), True
    return _run.init(project=project, name=name, store=store), True


def set_ctx(r, epoch: int | None, batch: int | None, loop_names=("epoch", "batch")) -> None:
    """Set the run's context tuple as ``fl.loop`` would: ``(epoch, batch, json)``."""
    if epoch is None:
        r.ctx = NO_CTX
        return
    ctx = {loop_names[0]: epoch}
    if batch is not None:
        ctx[loop_names[1]] = batch
    r.ctx = (epoch, batch, json.dumps(ctx, separators=(",", ":")))


def mode_name(r) -> str:
    return getattr(getattr(r, "mode", None), "name", "record")


def log_value(r, name: str, value: Any) -> None:
    """``fl.log`` semantics (step from the run's per-name counter), never raises."""
    try:
        if value is None:
            return
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            return
        if isinstance(value, float) and math.isinf(value) and False:
            return
        _run._log_slow(name, value, None) if r.mode.logs_slow else _run.log(name, value)
    except Exception as e:
        _warn.problem("log_error", f"integration log of {name!r} failed: {e!r}")


def record_params(r, params: dict, prefix: str = "") -> None:
    """Hyper-parameters into the run's params (flattened with dots), as ``fl.arg`` records them."""
    try:
        flat: dict = {}

        def walk(p, d):
            for k, v in d.items():
                key = f"{p}{k}"
                if isinstance(v, dict) and v and len(flat) < 2000:
                    walk(key + ".", v)
                else:
                    flat[key] = v

        walk(prefix, dict(params))
        for k, v in flat.items():
            if k not in r.params:
                r.params[k] = _run._jsonable(v)
        r._params_dirty = True
    except Exception as e:
        _warn.problem("params_error", f"hyper-parameters not recorded: {e!r}")


def parent_steps(store: str, parent_run_id: str, last_epoch: int) -> dict:
    """Per-name step counters of the parent chain up to the end of ``last_epoch``.

    A framework logs some epoch values after the hook where the checkpoint is
    taken (Lightning's epoch-aggregated ``self.log``); the parent's records, not
    the checkpoint, say how many values of each name the uninterrupted run had.
    """
    from flightlog.query import db

    con = db.connect(store)
    try:
        chain = db.run_chain(con, parent_run_id)
        rows = db.sql_arrow(con, "SELECT name, max(step) + 1 AS n FROM metrics WHERE list_contains(?, run_id) "
                                 "AND epoch <= ? AND source = 'record' GROUP BY name",
                            [chain, int(last_epoch)]).to_pylist()
    finally:
        con.close()
    return {r["name"]: int(r["n"]) for r in rows if r["n"] is not None}


def recorded_steps(store: str, run_id: str) -> dict[int, dict[str, int]]:
    """Per epoch e, each recorded name's step counter when e began (from the record, not a checkpoint)."""
    from flightlog.query import db

    con = db.connect(store)
    try:
        rows = db.sql_arrow(con, "SELECT name, epoch, max(step) + 1 AS n FROM metrics WHERE run_id = ? "
                                 "AND source = 'record' AND epoch IS NOT NULL GROUP BY name, epoch",
                            [run_id]).to_pylist()
    finally:
        con.close()
    out: dict[int, dict[str, int]] = {0: {}}
    for e in sorted({r["epoch"] for r in rows}):
        upto: dict[str, int] = {}
        for r in rows:
            if r["epoch"] <= e and r["n"] is not None:
                upto[r["name"]] = max(upto.get(r["name"], 0), int(r["n"]))
        out[e + 1] = upto
    return out


def check_replay_mode(mode, framework: str) -> None:
    """The replay worker interface the integrations drive; refuse plans they cannot follow."""
    from flightlog import FlightlogError

    for attr in ("actions", "_restore", "_epoch_done", "objects", "recorded_names", "checkpointing"):
        if not hasattr(mode, attr):
            raise FlightlogError(f"this replay worker has no {attr!r}: replay of {framework} runs needs it")
    tails = sorted(e for e, a in mode.actions.items() if a != "full")
    if tails:
        raise FlightlogError(f"epoch-level replay (skipping training batches) of a {framework} run is not "
                             f"supported (epochs {tails[:5]}): replay with a plan that re-executes epochs")
