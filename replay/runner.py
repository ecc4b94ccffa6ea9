"""The replay runner: plan, start workers, verify, store the verdict and the values.

One call replays one or more recorded runs with today's script. For each run
it diffs the script with the run's code snapshot (``planner``), splits the
planned epochs into contiguous segments, and starts one worker process per
segment running the user's script in replay mode (``flightlog._replay``).

When the plan takes the fast path (skipped inner loops), one more worker
re-executes one planned epoch in full from the checkpoint before it; the new
statements' values of that epoch must equal the fast path's, or those names are
``diverged`` and not stored. Workers hand their new values back as Parquet files;
the runner stores (with the ``replay_id``) only the values of segments that ran
and were not found diverged, so a bad replay never replaces good values, and
removes the rows an earlier replay of the same names and epochs wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flightlog import _config
from flightlog._errors import ReplayError, StoreError
from flightlog.replay import planner
from flightlog.replay.recorded import (RunInfo, _current_code, _drop_corrupt, _extract_recorded,  # noqa: F401
                                       load_run)
from flightlog.replay import _ranks
from flightlog.replay import slicing as _slicing



@dataclass
class Job:
    info: RunInfo
    script_path: str
    script_args: list[str]
    diff: planner.CodeDiff
    segment: list[int]
    actions: dict[int, str]
    emit: list[int]
    index: int = 0
    cwd: str | None = None
    tmp_script_dir: str | None = None
    plan: str = "fast"  # fast | from_start
    role: str = "segment"  # segment | verify (a full re-execution checking the fast path; stores nothing)
    slice: bool = True  # skip the tail statements diff.slice names (False: the whole tail, the fallback)


@dataclass
class SegmentResult:
    run_id: str
    segment: str
    status: str
    fidelity: str
    data: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    role: str = "segment"
    verified: int = 0
    stored: list = field(default_factory=list)  # new names whose values this segment stored


@dataclass
class ReplayResult:
    """What a replay did: per-segment results and the overall verdict."""

    replay_id: str
    runs: list[str]
    segments: list[SegmentResult]
    refused: dict[str, str]
    new_names: list[str]
    seconds: float
    startup_s: float | None
    plan_text: str = ""
    verified: int = 0  # new values checked against a full re-execution
    verification: list[str] = field(default_factory=list)  # findings of that check, in words
    scratch: str | None = None  # folder with the files the script wrote during the replay
    files: list[tuple[str, str]] = field(default_factory=list)  # (path the script used, where it went)
    verify_compared: int = 0  # recorded values the verification epochs re-computed and compared

    @property
    def ok(self) -> bool:
        return bool(self.segments) and all(s.status == "ok" for s in self.segments)

    @property
    def fidelity(self) -> str:
        """exact | within tolerance | diverged | failed (the worst segment; failed if any failed)."""
        f = {s.fidelity for s in self.segments}
        if not f or "failed" in f:
            return "failed"
        for level in ("diverged", "within tolerance", "unchecked", "exact"):
            if level in f:
                return level
        return "exact"

    @property
    def compared(self) -> int:
        """Recorded values re-computed and compared: by the segments and by the verification epochs."""
        return sum(int(s.data.get("compared", 0)) for s in self.segments) + self.verify_compared

    @property
    def rows(self) -> int:
        """Rows stored (verified names of good segments)."""
        return sum(int(s.data.get("stored_rows", 0)) for s in self.segments)


# -- planning ------------------------------------------------------------------------------------

def plan_run(store: str, info: RunInfo, script_path: str, script_args: list[str] | None, epochs_spec,
             workers: int, force: bool, propagate_from: planner.CodeDiff | None = None,
             reference_text: str | None = None, verify: bool = True) -> list[Job]:
    from flightlog import _snapshot

    if not info.snapshot_id:
        raise ReplayError(f"run {info.run_id} has no code snapshot; it cannot be replayed")
    try:
        snap = _snapshot.load(store, info.snapshot_id)
    except OSError as e:
        raise ReplayError(f"code snapshot of run {info.run_id} is missing from the store ({e})") from None
    except StoreError as e:  # tampered, or a manifest naming files outside its root
        raise ReplayError(f"code snapshot of run {info.run_id}: {e}") from None
    tmp_dir = None
    run_script = script_path
    current = _current_code(script_path, snap)
    diff = planner.diff_code(snap, current, snap["script"])
    if propagate_from is not None and diff.changes and reference_text is not None:
        # Multiversion replay: put today's new statements into this run's own code.
        from flightlog.replay import propagate

        old_main = snap["files"][snap["script"]]
        patched = propagate.insert_statements(reference_text, propagate_from, old_main)
        tmp_dir = tempfile.mkdtemp(prefix="flightlog-mv-")
        for rel, text in snap["files"].items():
            p = os.path.join(tmp_dir, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w", encoding="utf-8") as fh:
                fh.write(patched if rel == snap["script"] else (text or ""))
        run_script = os.path.join(tmp_dir, snap["script"])
        diff = planner.diff_code(snap, {snap["script"]: patched}, snap["script"])
    recorded = os.path.basename(str(snap.get("script") or ""))
    given = os.path.basename(script_path)
    if diff.changes and not force and recorded and given != recorded:
        # A copy under another name (train_v2.py) with only new statements is fine; a different script
        # is not, and then the first thing to say is that, not a long diff of two unrelated files.
        raise ReplayError(f"run {info.run_id} recorded {recorded}, not {given}: give the run's script "
                          f"(flightlog replay {recorded} --run {info.run_id}), or --force to replay it with {given}; "
                          f"it differs from the run's code in more than added log statements:\n  "
                          + "\n  ".join(diff.changes[:5]))
    if diff.changes and not force:
        shown = "\n  ".join(diff.changes[:20])
        more = f"\n  … and {len(diff.changes) - 20} more" if len(diff.changes) > 20 else ""
        raise ReplayError(f"the code changed in more than added log statements (run {info.run_id}):\n  "
                          f"{shown}{more}\nreplay would not reproduce the run; use --force to replay anyway")
    if not diff.statements:
        raise ReplayError("no new fl.log statements found in the script compared with the run's snapshot")
    if not info.epochs:
        raise ReplayError(f"run {info.run_id} recorded no fl.loop iterations to replay")
    chosen = planner.parse_epochs(epochs_spec, info.epochs)
    _drop_corrupt(store, info, chosen, diff.level, workers)
    level = diff.level
    if level == "run":
        chosen = [info.epochs[-1]]
    args = list(script_args if script_args is not None else info.argv[1:])
    cwd = info.cwd if info.cwd and os.path.isdir(info.cwd) else None
    ck = {i: c["position"] for i, c in info.checkpoints.items()}
    used = _checkpoints_used(chosen, level, ck)
    if info.ranks > 1:
        _ranks.check_replayable(store, info, used)
    planner.resolve_levels(diff, [info.checkpoints[i].get("captured") for i in used],
                           sorted(set(info.top_loops) | set(diff.top_loops)))
    level = diff.level
    planner.plan_tail_slice(diff, snap["script"])
    if diff.from_start:
        # Exact re-execution of the whole script from the start: one worker, nothing skipped.
        last = max(info.epochs)
        actions = {e: "full" for e in info.epochs}
        emit = chosen if level != "run" else info.epochs
        return [Job(info, run_script, args, diff, sorted(emit), actions, sorted(emit), index=0, cwd=cwd,
                    tmp_script_dir=tmp_dir, plan="from_start")] if last >= 0 else []
    segs = planner.split_segments(chosen, workers)
    jobs = []
    for k, seg in enumerate(segs):
        actions, emit = planner.segment_actions(seg, "epoch" if level in ("epoch", "run") else "batch", ck)
        jobs.append(Job(info, run_script, args, diff, seg, actions, emit, index=k, cwd=cwd, tmp_script_dir=tmp_dir))
    if verify and level in ("epoch", "run") and chosen:
        sliced = {e for j in jobs for e in _slicing.sliceable_epochs(j.actions, level == "run")}
        v = _verify_epoch(chosen, ck, sliced if diff.slice is not None else set())
        actions, emit = planner.segment_actions([v], "batch", ck)
        jobs.append(Job(info, run_script, args, diff, [v], actions, [v], index=len(segs), cwd=cwd,
                        tmp_script_dir=tmp_dir, role="verify"))
    return jobs


def _checkpoints_used(chosen: list[int], level: str, ck: dict[int, str]) -> list[int]:
    """Checkpoints a fast plan over ``chosen`` may restore (the loop-start one included)."""
    out = {i for i in ck if i < 0}
    for e in chosen:
        if e in ck:
            out.add(e)
        prev = max((i for i in ck if i < e), default=None)
        if prev is not None:
            out.add(prev)
    return sorted(out)


def _verify_epoch(chosen: list[int], ck: dict[int, str], sliced: set[int] = frozenset()) -> int:
    """The planned epoch re-executed in full to verify the fast path: the last one with a checkpoint just
    before it (cheap to reach, most state accumulated), else the first planned one; one whose tail the
    fast path slices when there is one, so that the check covers the slicing too."""
    good = [e for e in chosen if e - 1 in ck or e == 0]
    if good and sliced & set(good):
        return max(sliced & set(good))
    return max(good) if good else min(chosen)


def describe(jobs: list[Job], workers: int) -> str:
    """The plan in words, with a time estimate from the recorded loop timings."""
    if not jobs:
        return "nothing to replay"
    info, diff = jobs[0].info, jobs[0].diff
    kind = "exact re-execution from the start" if diff.from_start else f"{diff.level}-level replay"
    lines = [f"run {info.run_id}: {kind}"]
    for s in diff.statements:
        lines.append(f"  new: {s.file}:{s.line}  {s.code.splitlines()[0].strip()}  "
                     f"[{s.level}, loops: {' > '.join(s.loops) or '-'}]")
        if s.why:
            lines.append(f"       why: {s.why}")
    if diff.changes:
        lines.append(f"  forced despite {len(diff.changes)} changed line(s)")
    if diff.from_start:
        lines.append(f"  falls back to re-executing the whole script from the start (one worker): {diff.from_start}")
    elif diff.level in ("epoch", "run"):
        lines.append(f"  inner loop(s) skipped: {', '.join(diff.skip_loops) or '(none found)'}; "
                     "state from the checkpoints taken when they ended (registered objects and loop variables)")
        if diff.slice is not None:
            sl = diff.slice
            lines.append(f"  tail slicing: skips {len(sl.lines)} statement(s) of the epoch tail the new statements "
                         f"do not need ({sl.kept} kept), in epochs followed by a checkpoint restore; the "
                         "verification epoch runs them all and a difference re-runs with the whole tail:")
            for ln, txt in zip(sl.lines, sl.text):
                lines.append(f"    skipped: {sl.file}:{ln}  {txt}")
        elif diff.slice_why:
            lines.append(f"  tail slicing: none ({diff.slice_why})")
    times = []
    for j in jobs:
        full = [e for e, a in j.actions.items() if a == "full"]
        tail = [e for e, a in j.actions.items() if a == "tail"]
        sliced = set(_slicing.sliceable_epochs(j.actions, diff.level == "run")) if j.slice else set()
        t = sum(info.epoch_secs.get(e, 0.0) for e in full)
        t += sum(max(0.0, info.epoch_secs.get(e, 0.0) - info.inner_secs.get(e, 0.0))
                 * (_sliced_cost(diff) if e in sliced else 1.0) for e in tail)
        restore = [c for c in (min(j.actions) - 1,) if c in info.checkpoints] + tail
        t += sum(info.checkpoints[c]["bytes"] for c in restore if c in info.checkpoints) / 300e6
        times.append(t)
        if j.role == "verify":
            lines.append(f"  verify: epoch {_span(j.emit)} re-executed in full from the checkpoint before it; "
                         f"the new values of the fast path must equal it  ~{t:.1f}s")
            continue
        lines.append(f"  worker {j.index}: epochs {_span(j.emit)}"
                     + (f" (re-executes {_span(full)})" if full else "")
                     + (f" restores {len(tail)} end-of-epoch checkpoint(s)" if tail else "")
                     + f"  ~{t:.1f}s")
    if info.ranks > 1:
        lines.append(f"  {info.ranks} processes recorded this run (torchrun/DDP ranks): each worker runs as {info.ranks} "
                     "rank processes on this machine, each restoring its own RNG states and comparing with its own "
                     "recorded rows")
    slots = _slots(len(jobs), [(info.torch_threads or 1) * max(1, info.ranks)])
    loads = [0.0] * slots
    for t in times:  # the runner starts each worker in the first free slot
        loads[loads.index(min(loads))] += t
    est_total = max(loads)
    if slots < len(jobs):
        ranks = f" in each of {info.ranks} ranks" if info.ranks > 1 else ""
        lines.append(f"  {slots} worker(s) at a time: the recorded run used {info.torch_threads} torch threads{ranks} and "
                     "a worker replays with as many (other counts can change float results); more at once "
                     "than the cores hold would make their threads fight")
    full_run = sum(info.epoch_secs.values())
    if info.bad_checkpoints:
        lines.append(f"  corrupt or unreadable checkpoint(s) of iteration {_span(info.bad_checkpoints)}: "
                     "not used (replay runs forward from an earlier one)")
    if not info.checkpoints:
        lines.append("  no usable checkpoints: the planned epochs re-run from the start of the loop")
    lines.append(f"  checkpoints available: {len(info.checkpoints)}; recorded epochs {_span(info.epochs)}; "
                 f"estimate ~{est_total + _startup_s():.1f}s with {len(jobs)} worker(s) (full re-run ~{full_run:.1f}s)")
    lines.append("  files the script writes go to a scratch folder of the replay, never to their own paths")
    return "\n".join(lines)


def _startup_s() -> float:
    """Expected start-up of this replay: measured on earlier replays of the store, warm or cold (replay/pool.py)."""
    from flightlog.replay import pool as _pool

    return _pool.startup_estimate()[0]


def _span(xs) -> str:
    xs = sorted(xs)
    if not xs:
        return "-"
    if xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}..{xs[-1]}" if len(xs) > 1 else str(xs[0])
    return ",".join(map(str, xs))


# -- running -----------------------------------------------------------------------------------

def _worker_plan(job: Job, store: str, replay_id: str, tmp: str, con, threads: int | None) -> dict:
    k = f"{job.info.run_id}-{job.index}"
    rec_path = os.path.join(tmp, f"recorded-{k}.parquet")
    _extract_recorded(con, job.info, sorted(job.actions), rec_path)
    return {
        "store": store,
        "run_id": job.info.run_id,
        "project": job.info.project,
        "replay_id": replay_id,
        "plan": job.plan,
        "role": job.role,
        "writer": f"{replay_id}w{job.index}",
        "params": job.info.params,
        "actions": {str(e): a for e, a in job.actions.items()},
        "emit": job.emit,
        "segment": f"{job.emit[0]}:{job.emit[-1] + 1}" if job.emit else "",
        "skip_loops": job.diff.skip_loops,
        "slice_lines": list(job.diff.slice.lines) if job.slice and job.diff.slice is not None else [],
        "slice_epochs": _slicing.sliceable_epochs(job.actions, job.diff.level == "run") if job.slice else [],
        "run_after_loop": job.diff.level == "run",
        "checkpoints": {str(i): c for i, c in job.info.checkpoints.items()},
        "rank_checkpoints": {str(r): {str(i): c for i, c in ck.items()} for r, ck in job.info.rank_checkpoints.items()},
        "owner": {str(e): r for e, r in job.info.owner.items()},
        "recorded_names": job.info.names,
        "recorded_path": rec_path,
        "result_path": os.path.join(tmp, f"result-{k}.json"),
        "rows_path": os.path.join(tmp, f"rows-{k}.parquet"),
        "progress_path": os.path.join(tmp, f"progress-{k}"),
        "scratch": os.path.join(scratch_root(store, replay_id), f"{job.info.run_id}-{job.role}{job.index}"),
        "tmp": tmp,
        "torch_threads": threads,
        "world_size": job.info.ranks,  # > 1: the segment runs as that many rank processes (replay/_ranks.py)
    }


def _sliced_cost(diff: planner.CodeDiff) -> float:
    """Share of an epoch tail's time a sliced epoch still spends (kept old statements, by count)."""
    sl = diff.slice
    if sl is None:
        return 1.0
    return sl.kept / max(1, sl.kept + len(sl.lines))


def scratch_root(store: str, replay_id: str) -> str:
    """Where a replay's workers put the files the script writes."""
    from flightlog.collector import fs as _fs

    if _fs.is_remote(store):  # workers write files locally: a local folder for a store on object storage
        return os.path.join(_fs.spool_dir(store), "scratch", replay_id)
    return os.path.join(store, "scratch", replay_id)


def _verdict(d: dict) -> str:
    if d.get("diverged"):
        return "diverged"
    if d.get("within"):
        return "within tolerance"
    if not d.get("compared"):
        return "unchecked"
    return "exact"


def _spawn(script_path: str, script_args: list[str], cwd: str | None, plan_path: str, store: str,
           threads: int | None, tmp: str, tag: str, world: int = 1) -> tuple:
    env = dict(os.environ)
    env[_config.ENV_REPLAY] = plan_path
    env[_config.ENV_HOME] = store
    env.pop("FLIGHTLOG_RESUME", None)
    env.setdefault(_config.ENV_PROGRESS, "0")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path = os.path.join(tmp, f"worker-{tag}.log")
    logf = open(log_path, "w")
    cmd = [sys.executable, script_path, *script_args]
    from flightlog.replay import ray_executor as _ray

    if _ray.active():  # --executor ray: the same worker, as a Ray task (replay/ray_executor.py)
        return _ray.spawn(cmd, env, cwd or os.getcwd(), plan_path, store, log_path), logf, log_path, time.time()
    # warm (forked from the store's pool or this session) when it can be, else the lean cold entry
    from flightlog.replay import pool as _pool

    if world > 1:  # the ranks of a torchrun/DDP run: one process each, on this machine
        p = _ranks.spawn_group(cmd, env, cwd or os.getcwd(), logf, log_path, plan_path, store, threads, world, tag)
        return p, logf, log_path, time.time()
    kw = dict(env=env, cwd=cwd or os.getcwd(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    p = _pool.spawn(cmd, env, kw["cwd"], logf, store, kw, threads) or subprocess.Popen(_pool.cold_cmd(cmd), **kw)
    return p, logf, log_path, time.time()


def _plan_path(tmp: str, run_id: str, k: int) -> str:
    return os.path.join(tmp, f"plan-{run_id}-{k}.json")


def execute(jobs: list[Job], store: str, workers: int, threads: int | None = None, progress: bool | None = None,
            out=sys.stderr, replay_id: str | None = None, tmp: str | None = None,
            prespawned: dict | None = None, t0: float | None = None, con=None) -> ReplayResult:
    """Run the planned jobs, ``workers`` processes at a time.

    ``prespawned`` maps plan paths to worker processes started before planning
    finished (they wait for their plan file); unused ones are cancelled.
    """
    from flightlog.query import db

    if con is None:
        con = db.connect(store)
        try:
            return execute(jobs, store, workers, threads, progress, out, replay_id, tmp, prespawned, t0, con)
        finally:
            con.close()
    t0 = t0 or time.time()
    replay_id = replay_id or "rp" + uuid.uuid4().hex[:8]
    tmp = tmp or tempfile.mkdtemp(prefix="flightlog-replay-")
    prespawned = dict(prespawned or {})
    plans = []
    for j in jobs:
        th = threads if threads is not None else j.info.torch_threads
        plan = _worker_plan(j, store, replay_id, tmp, con, th)
        plans.append((j, plan, _plan_path(tmp, j.info.run_id, j.index)))
    used = {path for _j, _p, path in plans}
    for path in list(prespawned):
        if path not in used:
            cancel(path)
            prespawned.pop(path)[0].wait()
    total_epochs = sum(len(j.actions) for j in jobs)
    n_verify = sum(1 for j in jobs if j.role == "verify")
    slots = _slots(max(1, workers) + n_verify,
                   [(p.get("torch_threads") or 1) * int(p.get("world_size") or 1) for _j, p, _path in plans])
    show = progress if progress is not None else _isatty(out)
    pending = list(plans)
    running: list[tuple] = []
    results: list[SegmentResult] = []
    started_at = _now()
    while pending or running:
        while pending and len(running) < slots:
            j, plan, path = pending.pop(0)
            # a worker starts when its plan exists (a prespawned one has been waiting for it)
            with open(path + ".tmp", "w") as fh:
                json.dump(plan, fh)
            os.replace(path + ".tmp", path)
            if path in prespawned:
                p, logf, log_path, ts = prespawned.pop(path)
            else:
                p, logf, log_path, ts = _spawn(j.script_path, j.script_args, j.cwd, path, store,
                                               plan.get("torch_threads"), tmp, f"{j.info.run_id}-{j.index}",
                                               plan.get("world_size", 1))
            running.append((j, plan, p, logf, log_path, ts))
        time.sleep(0.05)
        still = []
        for item in running:
            j, plan, p, logf, log_path, ts = item
            if p.poll() is None:
                still.append(item)
                continue
            logf.close()
            results.append((j, _collect(j, plan, p.returncode, log_path, time.time() - ts)))
        running = still
        if show:
            _draw(out, plans, total_epochs, t0)
    if show:
        out.write("\n")
    # A verification run that failed (e.g. a new statement raised in its lead-in epoch) is retried once
    # on the first epoch of a segment that succeeded, so good segments are not left unverified.
    for old, newj in _retry_verifications(results):
        th = threads if threads is not None else newj.info.torch_threads
        plan = _worker_plan(newj, store, replay_id, tmp, con, th)
        path = _plan_path(tmp, newj.info.run_id, newj.index)
        with open(path, "w") as fh:
            json.dump(plan, fh)
        p, logf, log_path, ts = _spawn(newj.script_path, newj.script_args, newj.cwd, path, store,
                                       plan.get("torch_threads"), tmp, f"{newj.info.run_id}-{newj.index}",
                                       plan.get("world_size", 1))
        p.wait()
        logf.close()
        results = [(j, r) for j, r in results if j is not old]
        results.append((newj, _collect(newj, plan, p.returncode, log_path, time.time() - ts)))
        jobs = [newj if j is old else j for j in jobs]
        plans = [(j, pl, pa_) for j, pl, pa_ in plans if j is not old] + [(newj, plan, path)]
    unsliced = _unslice(jobs, plans, results, store, workers, threads, replay_id, tmp, con)
    if unsliced is not None:
        jobs, plans, results, notes = unsliced
    ended_at = _now()
    try:
        res = _finish(jobs, plans, results, store, replay_id, started_at, ended_at, t0)
        if unsliced is not None:
            res.verification[:0] = notes
    finally:
        for j in jobs:
            if j.tmp_script_dir:
                shutil.rmtree(j.tmp_script_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _slots(wanted: int, threads: list) -> int:
    """How many workers run at once: ``wanted``, but never more torch threads than cores.

    A recorded run that used 2 intra-op threads replays with 2 (other thread counts can change
    float results); two such workers on 2 cores made OpenMP's spinning threads fight for them, and
    a 0.1 s epoch took seconds. Workers beyond the cores wait for a free slot instead.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    from flightlog.replay import ray_executor as _ray

    if _ray.active():
        return wanted  # the cluster's scheduler places the tasks
    per = max([int(t) for t in threads if isinstance(t, (int, float)) and t and t > 0] or [1])
    return max(1, min(wanted, cores // per))


def _unslice(jobs, plans, results, store, workers, threads, replay_id, tmp, con):
    """Tail slicing's fallback: a run whose sliced fast path disagrees with its verification epoch
    re-runs its segments with the whole tail (the verification itself is reused).

    Returns (jobs, plans, results, notes) with those segments replaced, or None when nothing re-ran.
    """
    by_job = {id(j): r for j, r in results}
    rows = {id(j): _read_rows(pl["rows_path"]) for j, pl, _p in plans}
    redo: list[Job] = []
    notes: list[str] = []
    for rid in sorted({j.info.run_id for j in jobs}):
        mine = [j for j in jobs if j.info.run_id == rid]
        vjob = next((j for j in mine if j.role == "verify"), None)
        if vjob is None or vjob.diff.slice is None:
            continue
        vr = by_job.get(id(vjob))
        if vr is None or vr.status != "ok" or vr.fidelity == "diverged":
            continue
        v = vjob.emit[0]
        vseg = next((j for j in mine if j.role == "segment" and v in j.emit), None)
        sr = by_job.get(id(vseg)) if vseg is not None else None
        if sr is None or sr.status != "ok" or not sr.data.get("skipped_statements"):
            continue
        run_level = vjob.diff.level == "run"
        _n, _loose, bad = verify(_series(rows.get(id(vseg)), v, run_level), _series(rows.get(id(vjob)), v, run_level),
                                 vjob.diff, v)
        if not bad:
            continue
        name = sorted(bad)[0]
        notes.append(f"run {rid}: tail slicing fell back: with {len(vjob.diff.slice.lines)} tail statement(s) "
                     f"skipped, {bad[name]}; the segments were re-run with the whole tail")
        redo += [j for j in mine if j.role == "segment" and j.slice]
    if not redo:
        return None
    import dataclasses

    fresh = []
    for j in redo:
        nj = dataclasses.replace(j, slice=False, index=j.index + 200)
        th = threads if threads is not None else nj.info.torch_threads
        plan = _worker_plan(nj, store, replay_id, tmp, con, th)
        path = _plan_path(tmp, nj.info.run_id, nj.index)
        with open(path, "w") as fh:
            json.dump(plan, fh)
        fresh.append((j, nj, plan, path))
    done: dict[int, tuple] = {}
    pending = list(fresh)
    running: list[tuple] = []
    slots = _slots(max(1, workers), [(pl.get("torch_threads") or 1) * int(pl.get("world_size") or 1)
                                     for _o, _n, pl, _p in fresh])
    while pending or running:
        while pending and len(running) < slots:
            old, nj, plan, path = pending.pop(0)
            p, logf, log_path, ts = _spawn(nj.script_path, nj.script_args, nj.cwd, path, store,
                                           plan.get("torch_threads"), tmp, f"{nj.info.run_id}-{nj.index}",
                                           plan.get("world_size", 1))
            running.append((old, nj, plan, path, p, logf, log_path, ts))
        time.sleep(0.05)
        still = []
        for item in running:
            old, nj, plan, path, p, logf, log_path, ts = item
            if p.poll() is None:
                still.append(item)
                continue
            logf.close()
            done[id(old)] = (nj, plan, path, _collect(nj, plan, p.returncode, log_path, time.time() - ts))
        running = still
    new_jobs = [done[id(j)][0] if id(j) in done else j for j in jobs]
    new_plans = [(done[id(j)][0], done[id(j)][1], done[id(j)][2]) if id(j) in done else (j, pl, pa_)
                 for j, pl, pa_ in plans]
    new_results = [(done[id(j)][0], done[id(j)][3]) if id(j) in done else (j, r) for j, r in results]
    return new_jobs, new_plans, new_results, notes


def _retry_verifications(results: list) -> list[tuple[Job, Job]]:
    out = []
    for j, r in results:
        if j.role != "verify" or r.status == "ok":
            continue
        good = [jj for jj, rr in results if jj.info.run_id == j.info.run_id and jj.role == "segment"
                and rr.status == "ok" and jj.emit]
        if not good or good[0].emit[0] == j.emit[0]:
            continue
        e = good[0].emit[0]
        ck = {i: c["position"] for i, c in j.info.checkpoints.items()}
        actions, emit = planner.segment_actions([e], "batch", ck)
        out.append((j, Job(j.info, j.script_path, j.script_args, j.diff, [e], actions, emit, index=j.index + 100,
                           cwd=j.cwd, tmp_script_dir=j.tmp_script_dir, plan=j.plan, role="verify")))
    return out


def _read_rows(path: str) -> pa.Table | None:
    try:
        return pq.read_table(path) if os.path.exists(path) else None
    except Exception:
        return None


def _series(t: pa.Table | None, epoch: int | None, run_level: bool) -> dict[str, list]:
    """name -> [(step, epoch, batch, value)] of the rows of one epoch (and run-level rows)."""
    out: dict[str, list] = {}
    if t is None:
        return out
    for r in t.select(["name", "step", "epoch", "batch", "value"]).to_pylist():
        if r["epoch"] == epoch or (run_level and r["epoch"] is None):
            out.setdefault(r["name"], []).append((r["step"], r["epoch"], r["batch"], r["value"]))
    return out


def _close(a: float, b: float) -> bool:
    from flightlog._replay import ATOL, RTOL

    import math
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    return abs(a - b) <= ATOL + RTOL * abs(b)


def verify(fast: dict[str, list], full: dict[str, list], diff: planner.CodeDiff, epoch: int
           ) -> tuple[int, bool, dict[str, str]]:
    """Compare the fast path's new values of ``epoch`` with a full re-execution of it.

    Returns (values verified, any only within tolerance, {diverged name: reason}).
    """
    n, loose, bad = 0, False, {}
    for name in sorted(set(fast) | set(full)):
        a, b = fast.get(name, []), full.get(name, [])
        st = next((s for s in diff.statements if name in s.names), None)
        where = f"`{st.code.splitlines()[0].strip()}` ({st.file}:{st.line})" if st else f"`{name}`"
        cause = ""
        if st is not None and st.skipped_reads:
            loop = next((l for l in diff.skip_loops if st.skipped_reads[0] in diff.skipped_sets.get(l, [])),
                        diff.skip_loops[0] if diff.skip_loops else "?")
            cause = f"; it reads `{st.skipped_reads[0]}`, set in the skipped loop `{loop}`"
        if len(a) != len(b):
            bad[name] = (f"{where} ran {len(a)} time(s) in epoch {epoch} on the fast path but {len(b)} time(s) when "
                         f"the epoch was re-executed in full{cause}")
            continue
        for (sa, ea, ba, va), (sb, eb, bb, vb) in zip(a, b):
            if (sa, ea, ba) != (sb, eb, bb):
                bad[name] = f"{where} logged at step {sa} on the fast path but at step {sb} in full{cause}"
                break
            if va != vb and not (va != va and vb != vb):
                if _close(va, vb):
                    loose = True
                else:
                    bad[name] = (f"{where} gave {va!r} on the fast path but {vb!r} when epoch {epoch} was "
                                 f"re-executed in full (step {sa}){cause}")
                    break
        if name not in bad:
            n += len(a)
    return n, loose, bad


def _finish(jobs, plans, results, store, replay_id, started_at, ended_at, t0) -> ReplayResult:
    import pyarrow.compute as pc

    from flightlog.collector import schema as _schema
    from flightlog.collector.store import LocalSink

    by_job = {id(r_job): r for r_job, r in results}
    seg_results: list[SegmentResult] = []
    verification: list[str] = []
    rows_of: dict[int, pa.Table | None] = {}
    for j, plan, _path in plans:
        rows_of[id(j)] = _read_rows(plan["rows_path"])
    verified_total = 0
    verify_compared = 0
    for rid in sorted({j.info.run_id for j in jobs}):
        mine = [j for j in jobs if j.info.run_id == rid]
        segs = [j for j in mine if j.role == "segment"]
        vjob = next((j for j in mine if j.role == "verify"), None)
        bad: dict[str, str] = {}
        vfail = None
        vcount, vloose, vseg, vr = 0, False, None, None
        if vjob is not None:
            v = vjob.emit[0]
            vr = by_job.get(id(vjob))
            vseg = next((j for j in segs if v in j.emit), None)
            if vr is None or vr.status != "ok":
                vfail = ("the verification re-execution of epoch "
                         f"{v} failed, so the fast path's new values cannot be trusted"
                         + (f": {vr.error}" if vr is not None and vr.error else ""))
            elif vr.fidelity == "diverged":
                vfail = None
                bad["*"] = (f"re-executing epoch {v} in full diverged from the record: "
                            f"{json.dumps(vr.data.get('first_divergence'))}")
            elif vseg is not None and by_job.get(id(vseg)) is not None and by_job[id(vseg)].status == "ok":
                run_level = vjob.diff.level == "run"
                vcount, vloose, bad = verify(_series(rows_of.get(id(vseg)), v, run_level),
                                             _series(rows_of.get(id(vjob)), v, run_level), vjob.diff, v)
                verified_total += vcount
                verify_compared += int(vr.data.get("compared", 0))
                verification.append(f"run {rid}: epoch {v} re-executed in full: {vcount} new value(s) verified, "
                                    f"{int(vr.data.get('compared', 0))} recorded value(s) re-computed ({vr.fidelity})"
                                    + (f", {len(bad)} name(s) diverged" if bad else ""))
            for name, why in bad.items():
                verification.append(f"run {rid}: {name}: {why}")
        for j in segs:
            r = by_job.get(id(j))
            if r is None:
                continue
            if vfail and r.status == "ok":
                r.status, r.fidelity, r.error = "failed", "failed", vfail
            if "*" in bad and r.status == "ok":
                r.fidelity = "diverged"
                r.data["first_divergence"] = {"name": "*", "reason": bad["*"]}
            elif bad and r.status == "ok":
                r.fidelity = "diverged"
                name = sorted(bad)[0]
                r.data["first_divergence"] = {"name": name, "reason": bad[name], "verified_epoch": vjob.emit[0]}
            elif j is vseg and vloose and r.fidelity == "exact":
                r.fidelity = "within tolerance"
            if (r.status == "ok" and r.fidelity == "unchecked" and r.data.get("skipped_statements") and not bad
                    and not vfail and vr is not None and vr.fidelity in ("exact", "within tolerance")):
                # the sliced tail skipped every recorded log; the verification epoch recomputed them
                r.fidelity = vr.fidelity
            if j is vseg:
                r.verified = vcount
            # what this segment stores: nothing if it failed or its recomputed recorded values diverged
            names = r.data.get("new_names", [])
            if r.status != "ok" or "*" in bad or _verdict(r.data) == "diverged":
                r.stored = []
            else:
                r.stored = [n for n in names if n not in bad]
            seg_results.append(r)
    rows = []
    for r in seg_results:
        d = r.data
        rows.append({"run_id": r.run_id, "replay_id": replay_id, "segment": r.segment, "status": r.status,
                     "fidelity": r.fidelity, "compared": int(d.get("compared", 0)),
                     "max_abs_diff": float(d.get("max_abs_diff", 0.0)),
                     "first_divergence": json.dumps(d.get("first_divergence")) if d.get("first_divergence") else None,
                     "new_names": json.dumps(r.stored, ensure_ascii=False), "started_at": started_at,
                     "ended_at": ended_at, "error": r.error, "verified": r.verified,
                     "plan": "from_start" if any(j.plan == "from_start" for j in jobs) else
                     ("fast" if any(j.role == "verify" for j in jobs) else "full"),
                     "scratch": scratch_root(store, replay_id)})
    if rows:
        LocalSink(store, writer=replay_id).write("replays", pa.Table.from_pylist(rows, schema=_schema.REPLAYS))
    # the values: only what each good segment stores, tagged with the replay
    for j, plan, _path in plans:
        r = by_job.get(id(j))
        t = rows_of.get(id(j))
        if j.role != "segment" or r is None or not r.stored or t is None or t.num_rows == 0:
            continue
        t = t.filter(pc.is_in(t.column("name"), pa.array(r.stored)))
        t = t.select([c for c in t.column_names if c in _schema.METRICS.names])  # a worker of another version
        r.data["stored_rows"] = t.num_rows
        for owner in sorted(set(t.column("run_id").to_pylist())):
            part = t.filter(pc.equal(t.column("run_id"), owner))
            LocalSink(store, writer=f"{replay_id}w{j.index}").write("metrics", _schema.conform("metrics", part))
    for rid in sorted({r.run_id for r in seg_results if r.stored}):
        epochs = sorted({e for j in jobs if j.info.run_id == rid and j.role == "segment" for e in j.emit})
        owners = {j.info.owner.get(e, rid) for j in jobs if j.info.run_id == rid for e in j.emit} | {rid}
        names = sorted({n for r in seg_results if r.run_id == rid for n in r.stored})
        for owner in owners:
            _supersede(store, owner, replay_id, names, epochs)
    new_names = sorted({n for r in seg_results for n in r.stored})
    firsts = [r.data.get("first_epoch_at") for _j, r in results if r.data.get("first_epoch_at")]
    startup = (min(firsts) - t0) if firsts else None
    files = sorted({tuple(f) for _j, r in results for f in r.data.get("files", [])})
    scratch = scratch_root(store, replay_id)
    return ReplayResult(replay_id, sorted({j.info.run_id for j in jobs}), seg_results, {}, new_names,
                        time.time() - t0, startup, verified=verified_total, verification=verification,
                        scratch=scratch if os.path.isdir(scratch) else None, files=files,
                        verify_compared=verify_compared)


def cancel(plan_path: str) -> None:
    """Tell a speculatively started worker that it is not needed."""
    with open(plan_path + ".cancel", "w"):
        pass


def _collect(job: Job, plan: dict, rc: int, log_path: str, secs: float) -> SegmentResult:
    data = {}
    try:
        with open(plan["result_path"]) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        pass
    tail = ""
    try:
        with open(log_path, errors="replace") as fh:
            tail = fh.read()[-4000:]
    except OSError:
        pass
    seg = plan["segment"]
    if rc != 0 or not data:
        err = f"worker for epochs {seg} exited with code {rc}"
        if tail:
            err += "\n" + tail
        return SegmentResult(job.info.run_id, seg, "failed", "failed", data, err, secs)
    done = set(data.get("epochs_done", []))
    missing = [e for e in job.emit if e not in done]
    if missing:
        return SegmentResult(job.info.run_id, seg, "failed", "failed", data,
                             f"worker for epochs {seg} ended before epochs {_span(missing)} ran "
                             "(did the script's loop end early?)\n" + tail, secs)
    return SegmentResult(job.info.run_id, seg, "ok", _verdict(data), data, None, secs)


def _supersede(store: str, run_id: str, replay_id: str, names: list[str], epochs: list[int]) -> None:
    """Remove rows of earlier replays for the (name, epoch) pairs this replay rewrote."""
    from flightlog.collector import schema as _schema
    from flightlog.collector import store as _store
    import pyarrow.compute as pc

    if not names:
        return
    d = _store.part_dir(store, "metrics", run_id)
    for f in _store.visible_files(d):
        w = _store._file_writer(f.name)
        if not w or not w.startswith("rp") or w.startswith(replay_id):
            continue
        try:
            t = _store.read_file(f)
        except Exception:
            continue
        drop = pc.and_(pc.is_in(t.column("name"), pa.array(names)),
                       pc.is_in(t.column("epoch"), pa.array(epochs, pa.int64())))
        drop = pc.fill_null(drop, False)
        if not pc.any(drop).as_py():
            continue
        keep = t.filter(pc.invert(drop))
        if keep.num_rows == 0:
            _store.remove(f)
        else:
            _store.write_parquet_atomic(f, _schema.conform("metrics", keep), "metrics")


def _draw(out, plans, total: int, t0: float) -> None:
    done = 0
    for _j, plan, _p in plans:
        try:
            with open(plan["progress_path"]) as fh:
                done += sum(1 for _ in fh)
        except OSError:
            pass
    el = time.time() - t0
    width = 30
    fill = int(width * done / total) if total else width
    rate = done / el if el > 0 else 0
    eta = (total - done) / rate if rate > 0 else 0
    try:
        out.write(f"\rreplay [{'#' * fill}{'.' * (width - fill)}] {done}/{total} epochs "
                  f"{el:.1f}s ETA {eta:.0f}s ")
        out.flush()
    except Exception:
        pass


def _isatty(s) -> bool:
    try:
        return s.isatty()
    except Exception:
        return False


def _now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


# -- the one entry point ---------------------------------------------------------------------

def run(script: str, script_args: list[str] | None = None, *, run: str | None = None, epochs: Any = None,
        workers: int = 1, dry_run: bool = False, all_runs: bool = False, runs: str | None = None,
        force: bool = False, store: str | None = None, threads: int | None = None,
        progress: bool | None = None, out=sys.stderr, verify: bool = True) -> ReplayResult:
    """Replay recorded run(s) with today's ``script`` and store the values of its new log statements.

    ``run`` is an id, prefix or ``latest``; ``all_runs``/``runs`` (an SQL
    predicate over the ``runs`` table) select many. ``epochs`` is ``A:B``, a list
    or ``N``. ``verify`` (default on): when the plan skips inner loops, one planned
    epoch is also re-executed in full and the new values must match. Returns a
    :class:`ReplayResult` (``.fidelity``, ``.segments``, ``.verified``, ``.files``).
    """
    t0 = time.time()
    if not os.path.isfile(script):
        raise ReplayError(f"no such script: {script}")
    if not isinstance(workers, int) or workers < 1:
        raise ReplayError("--workers must be a positive integer")
    home = _config.store_home(store)
    spec = None
    from flightlog.query import db

    con = db.connect(home)  # the one connection of this replay: planning, recorded values, results
    try:
        return _run(con, script, script_args, run, epochs, workers, dry_run, all_runs, runs, force, home,
                    threads, progress, out, verify, t0)
    finally:
        con.close()


def _run(con, script, script_args, run, epochs, workers, dry_run, all_runs, runs, force, home, threads,
         progress, out, verify, t0) -> ReplayResult:
    from flightlog.query import db

    spec = None
    if not (all_runs or runs) and not dry_run:
        spec = _speculate(con, home, run, script, script_args, workers, threads, verify)
    try:
        if all_runs or runs:
            pred = runs or "true"
            try:
                ids = [r["run_id"] for r in db.run_sql(
                    "SELECT run_id FROM runs WHERE kind IN ('train', 'resume') AND status <> 'running' "
                    f"AND ({pred}) ORDER BY started_at", con=con).to_pylist()]
            except Exception as e:
                raise ReplayError(f"bad --runs predicate: {e}") from None
            # a resumed chain is replayed once, through its newest member
            parents = {r[0] for r in con.execute("SELECT parent_run_id FROM runs WHERE kind = 'resume'").fetchall()}
            ids = [i for i in ids if i not in parents]
            if not ids:
                raise ReplayError("no finished runs match")
        else:
            ids = [db.resolve_run(con, run)]
        infos = [load_run(con, home, i) for i in ids]
    except BaseException:
        _cancel_spec(spec)
        raise
    if spec is not None and spec["run_id"] != infos[0].run_id:
        _cancel_spec(spec)
        spec = None
    with open(script, encoding="utf-8") as fh:
        today = fh.read()
    if len(infos) == 1 and not dry_run:
        return _run_single(infos[0], home, script, script_args, epochs, workers, force, threads, progress, out,
                           t0, spec, verify, con)
    jobs: list[Job] = []
    refused: dict[str, str] = {}
    multi = len(infos) > 1
    ref_diff = None
    if multi:
        ref_diff = _reference_diff(home, infos, script)
    for info in infos:
        try:
            jobs += plan_run(home, info, script, script_args, epochs, 1 if multi else workers, force,
                             propagate_from=ref_diff, reference_text=today, verify=verify)
        except ReplayError as e:
            if not multi:
                raise
            refused[info.run_id] = str(e)
    text = "\n".join(describe([j for j in jobs if j.info.run_id == i.run_id], workers)
                     for i in infos if any(j.info.run_id == i.run_id for j in jobs))
    for rid, why in refused.items():
        text += f"\nrun {rid}: refused: {why.splitlines()[0]}"
    if dry_run or not jobs:
        if not jobs and not dry_run:
            raise ReplayError("no run can be replayed:\n" + text)
        return ReplayResult("dry-run", [i.run_id for i in infos], [], refused, [], 0.0, None, text)
    res = execute(jobs, home, workers, threads=threads, progress=progress, out=out, con=con)
    res.refused = refused
    res.plan_text = text
    return res


def _reference_diff(home: str, infos: list[RunInfo], script: str) -> planner.CodeDiff | None:
    """The new statements relative to the newest run whose code matches the script but for them."""
    from flightlog import _snapshot

    for info in reversed(infos):
        if not info.snapshot_id:
            continue
        try:
            snap = _snapshot.load(home, info.snapshot_id)
        except (OSError, StoreError):
            continue
        d = planner.diff_code(snap, _current_code(script, snap), snap["script"])
        if not d.changes and d.statements:
            return d
    return None


def _speculate(con, home: str, run: str | None, script: str, script_args, workers: int, threads,
               verify: bool = True) -> dict | None:
    """Start the worker processes before planning: they import the user's script (torch…) meanwhile.

    Reads the recorded argv, cwd and thread count from the replay's connection (plain values: no
    Arrow conversion, which would import pandas). When today's script adds epoch-level statements the
    verification worker starts too. Returns None when the run cannot be resolved cheaply; planning
    then starts workers itself.
    """
    try:
        from flightlog.query import db

        rid = db.resolve_run(con, run)
        got = con.execute("SELECT run_id, kind, argv, cwd, torch_threads, code_snapshot FROM runs WHERE run_id = ?",
                          [rid]).fetchall()
        if not got or got[0][1] == "replay":
            return None
        row = dict(zip(("run_id", "kind", "argv", "cwd", "torch_threads", "code_snapshot"), got[0]))
        if con.execute("SELECT count(DISTINCT rank) FROM metrics WHERE run_id = ? AND rank IS NOT NULL",
                       [rid]).fetchall()[0][0] > 1:
            return None  # a multi-process run: planning refuses it
        if verify and _epoch_level_today(home, row["code_snapshot"], script):
            workers += 1  # the verification epoch's worker (its index is the number of segments)
        argv = json.loads(row["argv"] or "[]")
        args = list(script_args) if script_args is not None else argv[1:]
        cwd = row["cwd"] if row["cwd"] and os.path.isdir(row["cwd"]) else None
        th = threads if threads is not None else row.get("torch_threads")
        tmp = tempfile.mkdtemp(prefix="flightlog-replay-")
        procs = {}
        for k in range(workers):
            path = _plan_path(tmp, row["run_id"], k)
            procs[path] = _spawn(script, args, cwd, path, home, th, tmp, f"{row['run_id']}-{k}")
        return {"run_id": row["run_id"], "tmp": tmp, "procs": procs, "args": args, "cwd": cwd}
    except Exception:
        return None


def _epoch_level_today(home: str, snapshot_id: str | None, script: str) -> bool:
    """Does today's script add only statements an epoch-level (verified) plan replays? A cheap first look."""
    from flightlog import _snapshot

    if not snapshot_id:
        return False
    try:
        snap = _snapshot.load(home, snapshot_id)
        d = planner.diff_code(snap, _current_code(script, snap), snap["script"])
    except Exception:
        return False
    return not d.changes and d.level in ("epoch", "run")


def _cancel_spec(spec: dict | None) -> None:
    if not spec:
        return
    for path, (p, logf, _lp, _ts) in spec["procs"].items():
        try:
            cancel(path)
        except OSError:
            p.kill()
    for path, (p, logf, _lp, _ts) in spec["procs"].items():
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        logf.close()
    shutil.rmtree(spec["tmp"], ignore_errors=True)


def _run_single(info: RunInfo, home: str, script: str, script_args, epochs, workers: int, force: bool,
                threads, progress, out, t0: float, spec: dict | None, verify: bool = True, con=None) -> ReplayResult:
    try:
        args = spec["args"] if spec else script_args
        jobs = plan_run(home, info, script, args, epochs, workers, force, verify=verify)
    except BaseException:
        _cancel_spec(spec)
        raise
    text = describe(jobs, workers)
    replay_id = "rp" + uuid.uuid4().hex[:8]
    res = execute(jobs, home, workers, threads=threads, progress=progress, out=out, replay_id=replay_id,
                  tmp=spec["tmp"] if spec else None, prespawned=spec["procs"] if spec else None, t0=t0, con=con)
    res.plan_text = text
    return res
