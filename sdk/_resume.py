"""Crash resume: continue a crashed or killed run from its last complete checkpoint.

The continuation is a new run (``kind='resume'``, ``parent_run_id`` = the old
one). Its ``fl.arg`` calls return the parent's recorded values, its outermost
``fl.loop`` skips the iterations already done, and just before the next one it
restores the registered objects, RNG states and step counters, so what follows
is what the uninterrupted run would have computed. ``flightlog resume`` (sdk/_resume_cli.py)
starts the training command with ``FLIGHTLOG_RESUME`` set; ``fl.init`` then calls
:func:`start_resumed_run`.
"""
from __future__ import annotations

import json

from flightlog import _config, _run, _warn
from flightlog._errors import FlightlogError


def last_checkpoint(store: str, run_id: str, rank: int | None = None) -> tuple[str, dict] | None:
    """(run id, checkpoints row) of the newest complete checkpoint of ``run_id`` or its resume parents.

    Where several ranks each checkpointed their own state (a plain ``fl.loop`` script under
    torchrun; their adaptive periods can differ), it is ``rank``'s checkpoint at the newest
    iteration that every rank has: each rank then resumes from the same point of the loop.
    """
    from flightlog.collector import blobs as _blobs
    from flightlog.query import db

    con = db.connect(store)
    try:
        chain = db.run_chain(con, run_id)
        for rid in reversed(chain):
            rows = db.sql_arrow(con, "SELECT * FROM checkpoints WHERE run_id = ? AND status = 'ok' "
                                     "ORDER BY iteration DESC", [rid]).to_pylist()
            rows = [r for r in rows if _blobs.has_blob(store, r["content_hash"])]
            by_rank: dict = {}
            for r in rows:
                by_rank.setdefault(r.get("rank"), {}).setdefault((r["iteration"], r.get("loop")), r)
            if len(by_rank) > 1:
                own = by_rank.get(rank if rank is not None else 0)
                if own is None:
                    continue
                common = set.intersection(*(set(d) for d in by_rank.values()))
                for key in sorted(common, key=lambda k: k[0], reverse=True):
                    return rid, own[key]
                continue
            for row in rows:
                return rid, row
    finally:
        con.close()
    return None


class ResumeState:
    """The checkpoint a resumed run starts from; restored by the outermost loop."""

    def __init__(self, run, store: str, row: dict) -> None:
        self.run = run
        self.store = store
        self.row = row
        self.iteration = int(row["iteration"])
        self.position = row.get("position") or "iteration_end"

    def restore(self, scopes: dict | None = None) -> None:
        """Registered objects, RNG states, step counters and the loop variables of ``scopes``."""
        from flightlog import _checkpoint

        payload = _checkpoint.load(self.store, self.row["content_hash"])
        ck = self.run.checkpointer
        objects = ck.objects if ck is not None else {}
        if not objects and not payload.get("carried"):
            _warn.problem("resume_nothing_registered",
                          "resuming without fl.checkpointing(...) objects: only RNG state is restored")
        missed = _checkpoint.restore(self.run, payload, objects, scopes)
        from flightlog import _ddp

        rank, world, _local = _ddp.rank_info()
        written_by = self.row.get("rank")
        if world > 1 and written_by is not None and written_by != rank:
            # each rank of a plain script checkpoints its own state; this one found none of its own
            _warn.problem("resume_rng", f"rank {rank} resumes from rank {written_by}'s checkpoint (none of its "
                                        f"own): its RNG states are rank {written_by}'s, exact only if they were equal")
        if missed:
            _warn.problem("resume_vars_missed", f"loop variables not restored: {', '.join(sorted(missed))}")
        if ck is not None:
            ck.cost_ms = None  # re-measure in this process


def start_resumed_run(resume: str, project=None, name=None, store=None, params=None, flush_interval=None,
                      sink=None) -> "_run.Run":
    from flightlog import _modes
    from flightlog.query import db

    home = _config.store_home(store)
    con = db.connect(home)
    try:
        parent = db.resolve_run(con, resume)
        prow = db.sql_arrow(con, "SELECT * FROM runs WHERE run_id = ?", [parent]).to_pylist()[0]
    finally:
        con.close()
    from flightlog import _ddp

    found = last_checkpoint(home, parent, _ddp.rank_info()[0])
    if found is None:
        raise FlightlogError(f"run {parent} has no complete checkpoint to resume from")
    _src, row = found
    r = _run.Run(project or prow["project"], name or prow["name"], home, None, parent_run_id=parent,
                 kind="resume", sink=sink, flush_interval=flush_interval)
    parent_params = json.loads(prow["params"] or "{}")
    r.params.update(parent_params)
    r.mode = _modes.ResumeMode(parent_params, ResumeState(r, home, row))
    r.start()
    return r
