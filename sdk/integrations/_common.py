"""What both framework callbacks share: the run, loop context, checkpoints, resume state.

The callbacks drive flightlog's own primitives (the run's loop context tuple,
its ``Checkpointer`` with the adaptive period, ``fl.log``/``fl.arg`` semantics
and the resume state chosen by ``_modes``), so records of a framework run read
exactly like records of an ``fl.loop`` run: ``epoch``/``batch`` columns, the
``checkpoints`` table, ``flightlog resume``.
"""
from __future__ import annotations

import json
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


def recorded_counters(store: str, run_id: str) -> "tuple[dict[int, dict[str, int]], dict[int, dict[str, int]]]":
    """Each recorded name's step counter per epoch e, from the record of ``run_id`` and the runs it resumed.

    ``start[e]``: when epoch e began; ``inner[e]``: when its training batches
    ended (the rows of epoch e with a batch position counted, the epoch-level ones
    -- validation, epoch-end hooks -- not). A replay worker sets the counters of
    recorded names from these, so re-executed values are compared with the
    record at the right steps whatever the checkpoint it started from.
    """
    from flightlog.query import db

    con = db.connect(store)
    try:
        chain = db.run_chain(con, run_id)
        rows = db.sql_arrow(con, "SELECT name, epoch, batch IS NULL AS epoch_level, max(step) + 1 AS n FROM metrics "
                                 "WHERE list_contains(?, run_id) AND source = 'record' AND epoch IS NOT NULL "
                                 "AND step IS NOT NULL GROUP BY ALL", [chain]).to_pylist()
    finally:
        con.close()
    epochs = sorted({r["epoch"] for r in rows})
    start: dict[int, dict[str, int]] = {}
    inner: dict[int, dict[str, int]] = {}
    for e in range(0, (epochs[-1] + 2) if epochs else 1):
        s: dict[str, int] = {}
        i: dict[str, int] = {}
        for r in rows:
            n = int(r["n"])
            if r["epoch"] < e:
                s[r["name"]] = max(s.get(r["name"], 0), n)
            if r["epoch"] < e or (r["epoch"] == e and not r["epoch_level"]):
                i[r["name"]] = max(i.get(r["name"], 0), n)
        start[e], inner[e] = s, i
    return start, inner


def set_counters(run, names, counters: dict[str, int]) -> None:
    """The step counters of the recorded ``names`` as the record says (0 for a name not logged yet)."""
    for name in names:
        run.steps[name] = counters.get(name, 0)


# -- references to checkpoints a framework saved itself -------------------------------------------

def _file_digest(path: str) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 23)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def folder_manifest(folder: str) -> dict:
    """What a reference to a checkpoint folder records: its path and each file's size and content digest."""
    folder = os.path.abspath(folder)
    files: dict[str, list] = {}
    for base, _dirs, names in os.walk(folder):
        for n in sorted(names):
            p = os.path.join(base, n)
            if os.path.isfile(p) and not os.path.islink(p):
                files[os.path.relpath(p, folder)] = [os.path.getsize(p), _file_digest(p)]
    return {"folder": folder, "files": files}


def check_manifest(ref: dict) -> "str | None":
    """Why the referenced folder can no longer be used (None: every file is as it was when referenced)."""
    folder = ref.get("folder") if isinstance(ref, dict) else None
    files = ref.get("files") if isinstance(ref, dict) else None
    if not isinstance(folder, str) or not isinstance(files, dict) or not files:
        return "the reference names no folder or files"
    if not os.path.isdir(folder):
        return f"{folder} is missing (deleted or rotated away, e.g. by save_total_limit)"
    for rel, (size, dig) in sorted(files.items()):
        p = os.path.join(folder, rel)
        if not os.path.normpath(p).startswith(os.path.normpath(folder) + os.sep):
            return f"the reference names a file outside {folder}: {rel!r}"
        if not os.path.isfile(p):
            return f"{p} is missing"
        if os.path.getsize(p) != size:
            return f"{p} changed since it was referenced (size {os.path.getsize(p)}, was {size})"
        try:
            if _file_digest(p) != dig:
                return f"{p} changed since it was referenced (content digest differs)"
        except OSError as e:
            return f"{p} cannot be read: {e}"
    return None


def check_replay_mode(mode, framework: str, no_tails: "str | None" = None) -> None:
    """The replay worker interface the integrations drive; refuse plans they cannot follow.

    ``no_tails``: why this framework cannot replay an epoch without its training
    batches (None: it can).
    """
    from flightlog import FlightlogError

    for attr in ("actions", "_restore", "_epoch_done", "objects", "recorded_names", "checkpointing", "ckpts",
                 "store", "emit"):
        if not hasattr(mode, attr):
            raise FlightlogError(f"this replay worker has no {attr!r}: replay of {framework} runs needs it")
    tails = sorted(e for e, a in mode.actions.items() if a not in ("full", "tail"))
    if tails:
        raise FlightlogError(f"unknown replay actions for epochs {tails[:5]} of a {framework} run")
    tails = sorted(e for e, a in mode.actions.items() if a == "tail")
    if tails and no_tails:
        raise FlightlogError(f"epoch-level replay (skipping the training batches) of a {framework} run is not "
                             f"supported (epochs {tails[:5]}): {no_tails}")


def chain_checkpoints(store: str, run_id: str, loop: str) -> list[tuple[int, str]]:
    """``(iteration, content_hash)`` of the complete checkpoints of ``run_id`` and the runs it resumed, newest
    first (a later run of the chain first for the same iteration)."""
    from flightlog.collector import blobs as _blobs
    from flightlog.query import db

    con = db.connect(store)
    try:
        chain = db.run_chain(con, run_id)
        rows = db.sql_arrow(con, "SELECT run_id, iteration, content_hash FROM checkpoints WHERE list_contains(?, run_id) "
                                 "AND status = 'ok' AND loop = ?", [chain, loop]).to_pylist()
    finally:
        con.close()
    rows.sort(key=lambda c: (int(c["iteration"]), chain.index(c["run_id"])), reverse=True)
    return [(int(c["iteration"]), c["content_hash"]) for c in rows if _blobs.has_blob(store, c["content_hash"])]


# -- what the replay planner may ask: the level of a statement in a framework hook -----------------

# Lightning hooks that run after an epoch's training batches, when validation runs at the epoch's
# end: a tail of the epoch (restore its checkpoint, run validation and the epoch-end hooks) replays them.
LIGHTNING_EPOCH_HOOKS = frozenset({
    "validation_step", "on_validation_start", "on_validation_end", "on_validation_epoch_start",
    "on_validation_epoch_end", "on_validation_batch_start", "on_validation_batch_end", "on_train_epoch_end",
})


def hook_level(method: str, bases: "list[str]", imports: "set[str]") -> "tuple[str, list[str], str, list[str]] | None":
    """``(level, loops, why, skipped loops)`` for a new statement in ``method`` of a class with ``bases``.

    Asked by the replay planner about methods the script never calls itself (the
    framework does). None: no framework rule applies (the planner re-executes in
    full). ``imports``: the top-level modules the method's file imports.
    """
    if not imports & {"lightning", "pytorch_lightning"} or method not in LIGHTNING_EPOCH_HOOKS:
        return None
    short = {b.rsplit(".", 1)[-1] for b in bases}
    kind = "LightningModule" if "LightningModule" in short else "Lightning Callback" if "Callback" in short else None
    if kind is None:
        return None
    return ("epoch", ["epoch"],
            f"in `{method}` of a {kind}, which runs after the training batches of each epoch: the "
            "batches are skipped and each epoch's checkpoint (taken when they ended) restored", ["batch"])


RANKS = "rank_rng"  # the checkpoint object holding every rank's RNG states (multi-process runs)


class RankRNG:
    """Every rank's RNG states, as a checkpoint object of rank 0's (torchrun/DDP runs).

    Rank 0 alone writes checkpoints: weights, optimizer and scheduler states are the
    same on every rank, but RNG states need not be (a seed offset by rank, or RNG use
    that depends on the rank's data). At each checkpoint position every rank's states
    are gathered to rank 0 (a small collective, a few KB per rank), so a replay or
    resume gives each rank its own: ``end`` where the checkpoint was taken, ``inner``
    where the epoch's training batches ended (Lightning's epoch-level tails).
    """

    def __init__(self) -> None:
        self.end: list | None = None
        self.inner: list | None = None
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return {"end": self.end, "inner": self.inner}

    def load_state_dict(self, sd: dict) -> None:
        self.loaded = sd


def gather_rng(world_size: int) -> "list | None":
    """Every rank's RNG states on rank 0 (None on the others and with one process). Every rank must call it."""
    if world_size <= 1:
        return None
    import torch.distributed as dist

    from flightlog import _checkpoint

    if not (dist.is_available() and dist.is_initialized()):
        return None
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(_checkpoint.rng_state(), out, dst=0)
    return out


def own_rng(states: "dict | None", which: str) -> "dict | None":
    """This rank's (env ``RANK``) RNG states from a ``RankRNG`` state (None: not recorded for this rank)."""
    if not isinstance(states, dict):
        return None
    from flightlog import _ddp

    got = states.get(which)
    rank = _ddp.rank_info()[0]
    if not isinstance(got, list) or rank is None or rank >= len(got):
        return None
    return got[rank]
