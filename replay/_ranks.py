"""Multi-process segments: a replay worker of a torchrun/DDP run is a group of rank processes.

A run recorded by N ranks replays each planned segment as N processes on this
machine, started the way ``torchrun --standalone --nproc_per_node=N`` starts them
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` on a free
loopback port, ...), so the script's own ``init_process_group`` (or Lightning's
DDP strategy) forms the same group as in the record: the same data shards per
rank, the same all-reduced gradients. Every rank restores the segment's
checkpoint (rank 0's weights and optimizer state, which DDP keeps equal on all
ranks, and the rank's own RNG states) and compares its values with its own
recorded rows. The group ends when every rank has; a rank that fails ends the
others (a peer waiting in a collective would otherwise wait for gloo's 30-minute
timeout). Rank r > 0 writes its result and rows next to rank 0's
(``.rank<r>``, see ``flightlog._replay.rank_plan``); the group merges them into
the files the runner reads, so the rest of the runner sees one worker.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

from flightlog._errors import ReplayError

RANK_RNG = "rank_rng"  # the checkpoint object holding every rank's RNG states (integrations/_common.py)
_GRACE_S = 5.0  # how long the other ranks may take to notice a failed peer before they are killed


def check_replayable(store: str, info, used: list[int]) -> None:
    """Refuse a multi-process run whose checkpoints cannot give every rank its own state.

    Every rank needs its own state: its own checkpoints (a plain ``fl.loop`` script, where each
    rank writes them) or every rank's RNG states in rank 0's (the integrations); rank 0's alone
    would be wrong for a rank whose RNG differs (a seed offset by rank).
    """
    n = info.ranks
    ck = [i for i in used if i in info.checkpoints]
    if not ck:
        return  # from the script's start: nothing to restore
    if all(all(i in info.rank_checkpoints.get(r, {}) for i in ck) for r in range(1, n)):
        return  # every rank checkpointed its own state (a plain fl.loop under torchrun): each restores its own
    from flightlog import _checkpoint

    try:
        payload = _checkpoint.load(store, info.checkpoints[ck[0]]["content_hash"], f"checkpoint of iteration {ck[0]}")
    except Exception as e:
        raise ReplayError(f"run {info.run_id}: checkpoint of iteration {ck[0]} cannot be read ({e})") from None
    objs = payload.get("objects", {})
    got = objs.get(RANK_RNG)
    states = got[1] if isinstance(got, (tuple, list)) and len(got) == 2 else None
    end = states.get("end") if isinstance(states, dict) else None
    ok = isinstance(end, list) and len(end) == n and all(s is not None for s in end)
    ref = objs.get("trainer_checkpoint")  # a folder the Transformers Trainer saved: it has a file per rank
    if not ok and isinstance(ref, (tuple, list)) and len(ref) == 2 and isinstance(ref[1], dict):
        files = ref[1].get("files") or {}
        ok = all(f"rng_state_{r}.pth" in files for r in range(n))
    if not ok:
        raise ReplayError(f"run {info.run_id} was recorded by {n} processes, but its checkpoints hold one process's "
                          "RNG states, not every rank's (recorded before flightlog kept them): a replayed rank could differ "
                          "from the record; resume it instead (flightlog resume)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(env: dict, rank: int, world: int, port: int, tag: str) -> dict:
    """What ``torchrun --standalone --nproc_per_node=world`` puts in rank ``rank``'s environment."""
    e = dict(env)
    e.pop("FLIGHTLOG_RUN_ID", None)  # the replay's run id is the plan's
    e.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
        "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world),
        "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": f"flightlog-{tag}", "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    })
    return e


class RankGroup:
    """The rank processes of one segment, as one ``Popen``-like worker (``poll``, ``wait``, ``returncode``)."""

    def __init__(self, procs: list, logs: list, log_path: str, plan_path: str) -> None:
        self.procs, self.logs, self.log_path, self.plan_path = procs, logs, log_path, plan_path
        self.returncode: int | None = None
        self._failed_at: float | None = None
        self._failed_rank: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        codes = [p.poll() for p in self.procs]
        bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if bad and self._failed_at is None:
            self._failed_at, self._failed_rank = time.monotonic(), bad[0]
        if any(c is None for c in codes):
            if self._failed_at is not None and time.monotonic() - self._failed_at > _GRACE_S:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            return None
        self.returncode = next((c for c in codes if c != 0), 0)
        self._merge()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("rank group", timeout)
            time.sleep(0.05)
        return self.returncode

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    terminate = kill

    def _merge(self) -> None:
        """One result, one rows file and one log for the runner, from every rank's."""
        from flightlog import _replay

        try:
            with open(self.plan_path) as fh:
                plan = json.load(fh)
        except (OSError, ValueError):
            return
        world = len(self.procs)
        plans = [_replay.rank_plan(plan, r) for r in range(world)]
        self._merge_logs()
        results = []
        for r, pl in enumerate(plans):
            try:
                with open(pl["result_path"]) as fh:
                    results.append(json.load(fh))
            except (OSError, ValueError):
                results.append(None)
        if self.returncode == 0 and any(x is None for x in results):
            missing = [r for r, x in enumerate(results) if x is None]
            self._note(f"flightlog: rank(s) {missing} of this segment wrote no result")
            self.returncode = 1
        if self.returncode != 0 or results[0] is None:
            return
        merged = merge_results(results)
        tmp = plan["result_path"] + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(merged, fh, default=str)
        os.replace(tmp, plan["result_path"])
        self._merge_rows([pl.get("rows_path") for pl in plans], plan.get("rows_path"))

    def _merge_rows(self, paths: list, out: str | None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not out:
            return
        tables = [pq.read_table(p) for p in paths if p and os.path.exists(p)]
        if not tables:
            return
        pq.write_table(pa.concat_tables(tables), out + ".tmp")
        os.replace(out + ".tmp", out)

    def _merge_logs(self) -> None:
        """Rank r's log after rank 0's, the failed rank's last (the runner shows the log's tail)."""
        order = list(range(1, len(self.procs)))
        if self._failed_rank:
            order.remove(self._failed_rank)
            order.append(self._failed_rank)
        try:
            with open(self.log_path, "a") as out:
                for r in order:
                    try:
                        with open(self.logs[r], errors="replace") as fh:
                            text = fh.read()
                    except OSError:
                        continue
                    out.write(f"\n--- rank {r} ---\n{text}")
        except OSError:
            pass

    def _note(self, line: str) -> None:
        try:
            with open(self.log_path, "a") as fh:
                fh.write(line + "\n")
        except OSError:
            pass


def merge_results(results: list[dict]) -> dict:
    """The segment's result from its ranks': counts add up, the worst divergence wins, epochs done by all."""
    out = dict(results[0])
    for key in ("compared", "exact", "within", "diverged", "unmatched", "rows", "dropped_rows", "skipped_statements"):
        out[key] = sum(int(r.get(key) or 0) for r in results)
    out["max_abs_diff"] = max(float(r.get("max_abs_diff") or 0.0) for r in results)
    out["first_divergence"] = None
    for rank, r in enumerate(results):
        if r.get("first_divergence"):
            out["first_divergence"] = dict(r["first_divergence"], rank=rank)
            break
    for key in ("new_names", "missed_vars", "files"):
        out[key] = sorted({x for r in results for x in (r.get(key) or [])})
    done = [set(r.get("epochs_done") or []) for r in results]
    out["epochs_done"] = [e for e in results[0].get("epochs_done") or [] if all(e in d for d in done)]
    counters: dict = {}
    for r in results:
        for k, v in (r.get("counters") or {}).items():
            counters[k] = counters.get(k, 0) + (v if isinstance(v, (int, float)) else 0)
    out["counters"] = counters
    out["ranks"] = len(results)
    return out


def spawn_group(cmd: list[str], env: dict, cwd: str, logf, log_path: str, plan_path: str, store: str,
                threads: int | None, world: int, tag: str, fork_session: bool = True) -> RankGroup:
    """Start ``world`` rank processes of one segment on this machine (warm from the pool where it can,
    else cold); ``fork_session=False`` never forks this process (a Ray task's)."""
    from flightlog.replay import pool as _pool

    port = _free_port()
    procs, logs = [], []
    for r in range(world):
        e = rank_env(env, r, world, port, tag)
        if r == 0:
            lf, lp = logf, log_path
        else:
            lp = f"{log_path}.rank{r}"
            lf = open(lp, "w")
        kw = dict(env=e, cwd=cwd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        p = (_pool.spawn(cmd, e, cwd, lf, store, kw, threads, fork_session=fork_session)
             or subprocess.Popen(_pool.cold_cmd(cmd), **kw))
        if r:
            lf.close()  # the child has its own descriptor
        procs.append(p)
        logs.append(lp)
    return RankGroup(procs, logs, log_path, plan_path)
