"""What replay reads of a recorded run: its row, checkpoints, per-epoch timings and recorded values.

Reading only (the store through one DuckDB connection and the blob store); planning and running
are ``runner``'s. Values converted to Python are plain ones (no timestamps), which keeps pandas out
of the replay command's start-up.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from flightlog._errors import ReplayError


@dataclass
class RunInfo:
    run_id: str
    project: str | None
    script: str | None
    cwd: str | None
    argv: list[str]
    params: dict
    snapshot_id: str | None
    torch_threads: int | None
    chain: list[str]
    checkpoints: dict[int, dict]
    epochs: list[int]
    names: list[str]
    owner: dict[int, str]
    epoch_secs: dict[int, float]
    inner_secs: dict[int, float]
    bad_checkpoints: list[int] = field(default_factory=list)
    top_loops: list[str] = field(default_factory=list)  # outermost fl.loop names the record shows
    ranks: int = 1  # processes that recorded the run (torchrun/DDP ranks on its rows)
    rank_checkpoints: dict[int, dict[int, dict]] = field(default_factory=dict)  # rank > 0 -> its own checkpoints


def _chain_checkpoints(con, store: str, chain: list[str], rank: int) -> dict[int, dict]:
    """iteration -> checkpoint of the first outer loop over the resume chain (later runs win), of ``rank``
    (0 also takes one-process rows, whose rank is null)."""
    from flightlog.collector import blobs as _blobs
    from flightlog.query import db

    ck: dict[int, dict] = {}
    for rid in chain:  # later runs of the chain win
        rows = db.sql_arrow(con, "SELECT iteration, position, content_hash, bytes, run_id, captured, loop "
                                 "FROM checkpoints WHERE run_id = ? AND status IN ('ok') AND coalesce(rank, 0) = ? "
                                 "ORDER BY time, iteration",
                            [rid, rank]).to_pylist()
        # Iterations are indexed per outer loop: a script with a second top-level loop has checkpoints
        # -1, 0, 1, ... of each. Only the first loop's are the epochs a plan restores (a two-phase
        # script replays from the start, which needs the FIRST loop's start state, not the second's).
        first_loop = rows[0]["loop"] if rows else None
        rows.sort(key=lambda c: c["iteration"])
        for c in rows:
            if c["loop"] != first_loop:
                continue
            if _blobs.has_blob(store, c["content_hash"]):
                try:
                    cap = json.loads(c["captured"]) if c["captured"] else None
                except ValueError:
                    cap = None
                ck[int(c["iteration"])] = {"content_hash": c["content_hash"], "bytes": c["bytes"], "run_id": rid,
                                           "position": c["position"] or "iteration_end", "captured": cap,
                                           "loop": c["loop"]}
    return ck


def load_run(con, store: str, run_id: str) -> RunInfo:
    from flightlog.query import db

    # only the columns planning needs: converting the others (timestamps) to Python imports pandas
    row = db.sql_arrow(con, "SELECT kind, project, script, cwd, argv, params, code_snapshot, torch_threads "
                            "FROM runs WHERE run_id = ?", [run_id]).to_pylist()[0]
    if row["kind"] == "replay":
        raise ReplayError(f"{run_id} is a replay, not a recorded run")
    chain = db.run_chain(con, run_id)
    ck = _chain_checkpoints(con, store, chain, 0)
    rank_ck: dict[int, dict[int, dict]] = {}
    placeholders = ", ".join("?" for _ in chain)
    others = [int(r[0]) for r in con.execute(
        f"SELECT DISTINCT rank FROM checkpoints WHERE run_id IN ({placeholders}) AND rank > 0 ORDER BY 1",
        chain).fetchall()]
    if others:
        # a plain fl.loop script under torchrun: every rank checkpointed its own state (their adaptive periods
        # may differ); a plan restores only iterations every rank has
        rank_ck = {r: _chain_checkpoints(con, store, chain, r) for r in others}
        ck = {i: c for i, c in ck.items() if all(i in rc for rc in rank_ck.values())}
        rank_ck = {r: {i: c for i, c in rc.items() if i in ck} for r, rc in rank_ck.items()}
    per_epoch = db.sql_arrow(con, f"""
        SELECT epoch, arg_max(run_id, k) AS owner,
               epoch(max(wall_time)) AS t_end,
               epoch(min(wall_time) FILTER (WHERE batch IS NOT NULL)) AS in_start,
               epoch(max(wall_time) FILTER (WHERE batch IS NOT NULL)) AS in_end
        FROM (SELECT m.*, list_position([{placeholders}], run_id) AS k FROM metrics m
              WHERE run_id IN ({placeholders}) AND source = 'record' AND epoch IS NOT NULL)
        GROUP BY epoch ORDER BY epoch""", chain + chain).to_pylist()
    names = [r[0] for r in con.execute(
        f"SELECT DISTINCT name FROM metrics WHERE run_id IN ({placeholders}) AND source = 'record'",
        chain).fetchall()]
    epochs = [int(r["epoch"]) for r in per_epoch]
    top = [r[0] for r in con.execute(
        f"SELECT DISTINCT regexp_extract(ctx, '^\\{{\"([^\"]+)\"', 1) FROM metrics "
        f"WHERE run_id IN ({placeholders}) AND source = 'record' AND ctx IS NOT NULL", chain).fetchall() if r[0]]
    top = sorted(set(top) | {c["loop"] for c in ck.values() if c.get("loop")})
    owner = {int(r["epoch"]): r["owner"] for r in per_epoch}
    ranks = con.execute(f"SELECT count(DISTINCT rank) FROM metrics WHERE run_id IN ({placeholders}) "
                        "AND rank IS NOT NULL", chain).fetchall()[0][0] or 1
    epoch_secs, inner_secs = {}, {}
    prev_end = None
    for r in per_epoch:
        if prev_end is not None and r["t_end"] is not None:
            epoch_secs[int(r["epoch"])] = max(0.0, r["t_end"] - prev_end)
        if r["in_start"] is not None:
            inner_secs[int(r["epoch"])] = max(0.0, r["in_end"] - r["in_start"])
        prev_end = r["t_end"]
    if epochs and epochs[0] not in epoch_secs and inner_secs.get(epochs[0]) is not None:
        epoch_secs[epochs[0]] = inner_secs[epochs[0]] * 1.05
    return RunInfo(
        run_id=run_id, project=row["project"], script=row["script"], cwd=row["cwd"],
        argv=json.loads(row["argv"] or "[]"), params=json.loads(row["params"] or "{}"),
        snapshot_id=row["code_snapshot"], torch_threads=row.get("torch_threads"), chain=chain,
        checkpoints=ck, epochs=epochs, names=names, owner=owner, epoch_secs=epoch_secs, inner_secs=inner_secs,
        top_loops=top, ranks=int(ranks), rank_checkpoints=rank_ck)


def _current_code(script_path: str, snapshot: dict) -> dict[str, str]:
    base = os.path.dirname(os.path.abspath(script_path))
    out = {}
    with open(script_path, encoding="utf-8") as fh:
        out[snapshot["script"]] = fh.read()
    for rel in snapshot["files"]:
        if rel == snapshot["script"]:
            continue
        p = os.path.join(base, rel)
        if os.path.exists(p):
            with open(p, encoding="utf-8", errors="replace") as fh:
                out[rel] = fh.read()
    return out


def _drop_corrupt(store: str, info: RunInfo, chosen: list[int], level: str = "epoch", workers: int = 1) -> None:
    """Verify the checkpoints a plan may restore; corrupt ones are treated as missing (and said so).

    A batch-level plan restores one checkpoint per segment (and per gap in ``chosen``), so only those
    are read, not every epoch's (on object storage that is the difference between a GET of a few
    blobs and of all of them before the first worker starts). Where one is corrupt, the one a plan
    would fall back to is verified in its turn. Blobs are checked a few at a time, in chunks.
    """
    from concurrent.futures import ThreadPoolExecutor

    from flightlog.collector import blobs as _blobs
    from flightlog.replay import planner

    def before(e: int, ck: set[int]) -> int | None:
        return max((i for i in ck if i < e), default=None)

    def wanted() -> set[int]:
        ck = set(info.checkpoints)
        if level == "batch":
            starts = [e for seg in planner.split_segments(chosen, workers) for k, e in enumerate(seg)
                      if k == 0 or e != seg[k - 1] + 1]
            return {c for c in (before(a, ck) for a in starts) if c is not None}
        out = (set(chosen) | {e - 1 for e in chosen}) & ck
        return out | {c for c in (before(e, ck) for e in chosen) if c is not None}

    verified: set[int] = set()
    while True:
        need = sorted(wanted() - verified)
        if not need:
            return
        hashes = [info.checkpoints[it]["content_hash"] for it in need]
        with ThreadPoolExecutor(max_workers=min(4, len(need))) as ex:
            ok = list(ex.map(lambda h: _blobs.verify_blob(store, h), hashes))
        verified.update(need)
        for it, good in zip(need, ok):
            if not good:  # missing, tampered or not a blob id: unusable
                info.checkpoints.pop(it)
                info.bad_checkpoints.append(it)
        info.bad_checkpoints.sort()


def _extract_recorded(con, info: RunInfo, executed: list[int], path: str) -> None:
    from flightlog.query import db

    chain = info.chain
    ph = ", ".join("?" for _ in chain)
    eph = ", ".join("?" for _ in executed) or "NULL"
    t = db.sql_arrow(con, f"""
        SELECT name, step, value, epoch, batch, wall_time, rank FROM (
          SELECT *, row_number() OVER (PARTITION BY name, step, rank
                                       ORDER BY list_position([{ph}], run_id) DESC) AS rn
          FROM metrics WHERE run_id IN ({ph}) AND source = 'record' AND (epoch IN ({eph})))
        WHERE rn = 1""", chain + chain + executed)
    pq.write_table(t, path)
