"""The replay runner: plan, start workers, collect fidelity, store the verdict.

One call replays one or more recorded runs with today's script. For each run
it diffs the script with the run's code snapshot (``planner``), splits the
planned epochs into contiguous segments, and starts one worker process per
segment running the user's script in replay mode (``_mode``). Workers write
their own Parquet parts under the original run (no merge step); the runner
only collects their small JSON results, writes one ``replays`` row per
segment and removes rows a previous replay of the same statement wrote.
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

PROGRESS_EVERY = 0.25


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


@dataclass
class SegmentResult:
    run_id: str
    segment: str
    status: str
    fidelity: str
    data: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


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

    @property
    def ok(self) -> bool:
        return bool(self.segments) and all(s.status == "ok" for s in self.segments)

    @property
    def fidelity(self) -> str:
        f = {s.fidelity for s in self.segments if s.status == "ok"}
        if not f:
            return "failed"
        for level in ("diverged", "within tolerance", "unchecked", "exact"):
            if level in f:
                return level
        return "exact"

    @property
    def compared(self) -> int:
        return sum(int(s.data.get("compared", 0)) for s in self.segments)

    @property
    def rows(self) -> int:
        return sum(int(s.data.get("rows", 0)) for s in self.segments)


# -- reading the record ---------------------------------------------------------------------

def load_run(con, store: str, run_id: str) -> RunInfo:
    from flightlog.collector import store as _store
    from flightlog.query import db

    row = db.sql_arrow(con, "SELECT * FROM runs WHERE run_id = ?", [run_id]).to_pylist()[0]
    if row["kind"] == "replay":
        raise ReplayError(f"{run_id} is a replay, not a recorded run")
    chain = db.run_chain(con, run_id)
    ck: dict[int, dict] = {}
    for rid in chain:  # later runs of the chain win
        for c in db.sql_arrow(con, "SELECT iteration, position, content_hash, bytes, run_id FROM checkpoints "
                                   "WHERE run_id = ? AND status IN ('ok') ORDER BY iteration", [rid]).to_pylist():
            if _store.has_blob(store, c["content_hash"]):
                ck[int(c["iteration"])] = {"content_hash": c["content_hash"], "bytes": c["bytes"], "run_id": rid,
                                           "position": c["position"] or "iteration_end"}
    placeholders = ", ".join("?" for _ in chain)
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
    owner = {int(r["epoch"]): r["owner"] for r in per_epoch}
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
        checkpoints=ck, epochs=epochs, names=names, owner=owner, epoch_secs=epoch_secs, inner_secs=inner_secs)


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


# -- planning ------------------------------------------------------------------------------------

def plan_run(store: str, info: RunInfo, script_path: str, script_args: list[str] | None, epochs_spec,
             workers: int, force: bool, propagate_from: planner.CodeDiff | None = None,
             reference_text: str | None = None) -> list[Job]:
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
    if diff.changes and not force:
        shown = "\n  ".join(diff.changes[:20])
        more = f"\n  … and {len(diff.changes) - 20} more" if len(diff.changes) > 20 else ""
        raise ReplayError(f"the code changed in more than added log statements (run {info.run_id}):\n  "
                          f"{shown}{more}\nreplay would not reproduce the run; use --force to replay anyway")
    if not diff.statements:
        raise ReplayError("no new fl.log statements found in the script compared with the run's snapshot")
    if not info.epochs:
        raise ReplayError(f"run {info.run_id} recorded no fl.loop iterations to replay")
    level = diff.level
    if level == "run":
        chosen = [info.epochs[-1]]
    else:
        chosen = planner.parse_epochs(epochs_spec, info.epochs)
    _drop_corrupt(store, info, chosen)
    segs = planner.split_segments(chosen, workers)
    jobs = []
    ck = {i: c["position"] for i, c in info.checkpoints.items()}
    for k, seg in enumerate(segs):
        actions, emit = planner.segment_actions(seg, "epoch" if level in ("epoch", "run") else "batch", ck)
        jobs.append(Job(info, run_script, list(script_args if script_args is not None else info.argv[1:]), diff,
                        seg, actions, emit, index=k, cwd=info.cwd if info.cwd and os.path.isdir(info.cwd) else None,
                        tmp_script_dir=tmp_dir))
    return jobs


def _drop_corrupt(store: str, info: RunInfo, chosen: list[int]) -> None:
    """Verify the checkpoints a plan may use; corrupt ones are treated as missing (and said so)."""
    from flightlog import _checkpoint
    from flightlog.collector import store as _store

    wanted = set(chosen) | {e - 1 for e in chosen}
    for it in sorted(wanted & set(info.checkpoints)):
        c = info.checkpoints[it]
        try:
            ok = _checkpoint.digest(_store.read_blob(store, c["content_hash"])) == c["content_hash"]
        except (OSError, _store.BlobError):  # missing, tampered or not a blob id: unusable
            ok = False
        if not ok:
            info.checkpoints.pop(it)
            info.bad_checkpoints.append(it)


def describe(jobs: list[Job], workers: int) -> str:
    """The plan in words, with a time estimate from the recorded loop timings."""
    if not jobs:
        return "nothing to replay"
    info, diff = jobs[0].info, jobs[0].diff
    lines = [f"run {info.run_id}: {diff.level}-level replay"]
    for s in diff.statements:
        lines.append(f"  new: {s.file}:{s.line}  {s.code.splitlines()[0].strip()}  "
                     f"[{s.level}, loops: {' > '.join(s.loops) or '-'}]")
    if diff.changes:
        lines.append(f"  forced despite {len(diff.changes)} changed line(s)")
    if diff.level in ("epoch", "run"):
        lines.append(f"  inner loop(s) skipped: {', '.join(diff.skip_loops) or '(none found)'}; "
                     "state from end-of-epoch checkpoints")
    est_total = 0.0
    for j in jobs:
        full = [e for e, a in j.actions.items() if a == "full"]
        tail = [e for e, a in j.actions.items() if a == "tail"]
        t = sum(info.epoch_secs.get(e, 0.0) for e in full)
        t += sum(max(0.0, info.epoch_secs.get(e, 0.0) - info.inner_secs.get(e, 0.0)) for e in tail)
        restore = [c for c in (min(j.actions) - 1,) if c in info.checkpoints] + tail
        t += sum(info.checkpoints[c]["bytes"] for c in restore if c in info.checkpoints) / 300e6
        est_total = max(est_total, t)
        lines.append(f"  worker {j.index}: epochs {_span(j.emit)}"
                     + (f" (re-executes {_span(full)})" if full else "")
                     + (f" restores {len(tail)} end-of-epoch checkpoint(s)" if tail else "")
                     + f"  ~{t:.1f}s")
    full_run = sum(info.epoch_secs.values())
    if info.bad_checkpoints:
        lines.append(f"  corrupt or unreadable checkpoint(s) of iteration {_span(info.bad_checkpoints)}: "
                     "not used (replay runs forward from an earlier one)")
    if not info.checkpoints:
        lines.append("  no usable checkpoints: the planned epochs re-run from the start of the loop")
    lines.append(f"  checkpoints available: {len(info.checkpoints)}; recorded epochs {_span(info.epochs)}; "
                 f"estimate ~{est_total + 1.5:.1f}s with {len(jobs)} worker(s) (full re-run ~{full_run:.1f}s)")
    return "\n".join(lines)


def _span(xs) -> str:
    xs = sorted(xs)
    if not xs:
        return "-"
    if xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}..{xs[-1]}" if len(xs) > 1 else str(xs[0])
    return ",".join(map(str, xs))


# -- running -----------------------------------------------------------------------------------

def _extract_recorded(con, info: RunInfo, executed: list[int], path: str) -> None:
    from flightlog.query import db

    chain = info.chain
    ph = ", ".join("?" for _ in chain)
    eph = ", ".join("?" for _ in executed) or "NULL"
    t = db.sql_arrow(con, f"""
        SELECT name, step, value, epoch, batch, wall_time FROM (
          SELECT *, row_number() OVER (PARTITION BY name, step ORDER BY list_position([{ph}], run_id) DESC) AS rn
          FROM metrics WHERE run_id IN ({ph}) AND source = 'record' AND (epoch IN ({eph})))
        WHERE rn = 1""", chain + chain + executed)
    pq.write_table(t, path)


def _worker_plan(job: Job, store: str, replay_id: str, tmp: str, con, threads: int | None) -> dict:
    k = f"{job.info.run_id}-{job.index}"
    rec_path = os.path.join(tmp, f"recorded-{k}.parquet")
    _extract_recorded(con, job.info, sorted(job.actions), rec_path)
    return {
        "store": store,
        "run_id": job.info.run_id,
        "project": job.info.project,
        "writer": f"{replay_id}w{job.index}",
        "params": job.info.params,
        "actions": {str(e): a for e, a in job.actions.items()},
        "emit": job.emit,
        "segment": f"{job.emit[0]}:{job.emit[-1] + 1}" if job.emit else "",
        "skip_loops": job.diff.skip_loops,
        "run_after_loop": job.diff.level == "run",
        "checkpoints": {str(i): c for i, c in job.info.checkpoints.items()},
        "owner": {str(e): r for e, r in job.info.owner.items()},
        "recorded_names": job.info.names,
        "recorded_path": rec_path,
        "result_path": os.path.join(tmp, f"result-{k}.json"),
        "progress_path": os.path.join(tmp, f"progress-{k}"),
        "torch_threads": threads,
    }


def _verdict(d: dict) -> str:
    if d.get("diverged"):
        return "diverged"
    if d.get("within"):
        return "within tolerance"
    if not d.get("compared"):
        return "unchecked"
    return "exact"


def _spawn(script_path: str, script_args: list[str], cwd: str | None, plan_path: str, store: str,
           threads: int | None, tmp: str, tag: str) -> tuple:
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
    p = subprocess.Popen(cmd, env=env, cwd=cwd or os.getcwd(), stdout=logf, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    return p, logf, log_path, time.time()


def _plan_path(tmp: str, run_id: str, k: int) -> str:
    return os.path.join(tmp, f"plan-{run_id}-{k}.json")


def execute(jobs: list[Job], store: str, workers: int, threads: int | None = None, progress: bool | None = None,
            out=sys.stderr, replay_id: str | None = None, tmp: str | None = None,
            prespawned: dict | None = None, t0: float | None = None) -> ReplayResult:
    """Run the planned jobs, ``workers`` processes at a time.

    ``prespawned`` maps plan paths to worker processes started before planning
    finished (they wait for their plan file); unused ones are cancelled.
    """
    from flightlog.collector.store import LocalSink
    from flightlog.query import db

    t0 = t0 or time.time()
    replay_id = replay_id or "rp" + uuid.uuid4().hex[:8]
    tmp = tmp or tempfile.mkdtemp(prefix="flightlog-replay-")
    prespawned = dict(prespawned or {})
    con = db.connect(store)
    try:
        plans = []
        for j in jobs:
            th = threads if threads is not None else j.info.torch_threads
            plan = _worker_plan(j, store, replay_id, tmp, con, th)
            path = _plan_path(tmp, j.info.run_id, j.index)
            with open(path + ".tmp", "w") as fh:
                json.dump(plan, fh)
            os.replace(path + ".tmp", path)
            plans.append((j, plan, path))
    finally:
        con.close()
    used = {path for _j, _p, path in plans}
    for path in list(prespawned):
        if path not in used:
            cancel(path)
            prespawned.pop(path)[0].wait()
    total_epochs = sum(len(j.actions) for j in jobs)
    show = progress if progress is not None else _isatty(out)
    pending = list(plans)
    running: list[tuple] = []
    results: list[SegmentResult] = []
    started_at = _now()
    while pending or running:
        while pending and len(running) < max(1, workers):
            j, plan, path = pending.pop(0)
            if path in prespawned:
                p, logf, log_path, ts = prespawned.pop(path)
            else:
                p, logf, log_path, ts = _spawn(j.script_path, j.script_args, j.cwd, path, store,
                                               plan.get("torch_threads"), tmp, f"{j.info.run_id}-{j.index}")
            running.append((j, plan, p, logf, log_path, ts))
        time.sleep(0.05)
        still = []
        for item in running:
            j, plan, p, logf, log_path, ts = item
            if p.poll() is None:
                still.append(item)
                continue
            logf.close()
            results.append(_collect(j, plan, p.returncode, log_path, time.time() - ts))
        running = still
        if show:
            _draw(out, plans, total_epochs, t0)
    if show:
        out.write("\n")
    ended_at = _now()
    # the verdict, stored with the replay
    rows = []
    for r in results:
        d = r.data
        rows.append({"run_id": r.run_id, "replay_id": replay_id, "segment": r.segment, "status": r.status,
                     "fidelity": r.fidelity, "compared": int(d.get("compared", 0)),
                     "max_abs_diff": float(d.get("max_abs_diff", 0.0)),
                     "first_divergence": json.dumps(d.get("first_divergence")) if d.get("first_divergence") else None,
                     "new_names": json.dumps(d.get("new_names", [])), "started_at": started_at,
                     "ended_at": ended_at, "error": r.error})
    if rows:
        from flightlog.collector.schema import REPLAYS

        LocalSink(store, writer=replay_id).write("replays", pa.Table.from_pylist(rows, schema=REPLAYS))
    new_names = sorted({n for r in results for n in r.data.get("new_names", [])})
    ok_runs = {r.run_id for r in results if r.status == "ok"}
    for rid in ok_runs:
        epochs = sorted({e for j in jobs if j.info.run_id == rid for e in j.emit})
        owners = {j.info.owner.get(e, rid) for j in jobs if j.info.run_id == rid for e in j.emit} | {rid}
        names = sorted({n for r in results if r.run_id == rid for n in r.data.get("new_names", [])})
        for owner in owners:
            _supersede(store, owner, replay_id, names, epochs)
    firsts = [r.data.get("first_epoch_at") for r in results if r.data.get("first_epoch_at")]
    startup = (min(firsts) - t0) if firsts else None
    for j in jobs:
        if j.tmp_script_dir:
            shutil.rmtree(j.tmp_script_dir, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return ReplayResult(replay_id, sorted({j.info.run_id for j in jobs}), results, {}, new_names,
                        time.time() - t0, startup)


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
            t = pq.read_table(f)
        except Exception:
            continue
        drop = pc.and_(pc.is_in(t.column("name"), pa.array(names)),
                       pc.is_in(t.column("epoch"), pa.array(epochs, pa.int64())))
        drop = pc.fill_null(drop, False)
        if not pc.any(drop).as_py():
            continue
        keep = t.filter(pc.invert(drop))
        if keep.num_rows == 0:
            os.unlink(f)
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
        progress: bool | None = None, out=sys.stderr) -> ReplayResult:
    """Replay recorded run(s) with today's ``script`` and store the values of its new log statements.

    ``run`` is an id, prefix or ``latest``; ``all_runs``/``runs`` (an SQL
    predicate over the ``runs`` table) select many. ``epochs`` is ``A:B``, a list
    or ``N``. Returns a :class:`ReplayResult` (``.fidelity``, ``.segments``).
    """
    t0 = time.time()
    if not os.path.isfile(script):
        raise ReplayError(f"no such script: {script}")
    if not isinstance(workers, int) or workers < 1:
        raise ReplayError("--workers must be a positive integer")
    home = _config.store_home(store)
    spec = None
    if not (all_runs or runs) and not dry_run:
        spec = _speculate(home, run, script, script_args, workers, threads)
    try:
        from flightlog.query import db
    except BaseException:
        _cancel_spec(spec)
        raise
    try:
        con = db.connect(home)
    except BaseException:
        _cancel_spec(spec)
        raise
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
    finally:
        con.close()
    if spec is not None and spec["run_id"] != infos[0].run_id:
        _cancel_spec(spec)
        spec = None
    with open(script, encoding="utf-8") as fh:
        today = fh.read()
    if len(infos) == 1 and not dry_run:
        return _run_single(infos[0], home, script, script_args, epochs, workers, force, threads, progress, out,
                           t0, spec)
    jobs: list[Job] = []
    refused: dict[str, str] = {}
    multi = len(infos) > 1
    ref_diff = None
    if multi:
        ref_diff = _reference_diff(home, infos, script)
    for info in infos:
        try:
            jobs += plan_run(home, info, script, script_args, epochs, 1 if multi else workers, force,
                             propagate_from=ref_diff, reference_text=today)
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
    res = execute(jobs, home, workers, threads=threads, progress=progress, out=out)
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


def _speculate(home: str, run: str | None, script: str, script_args, workers: int, threads) -> dict | None:
    """Start the worker processes before planning: they import the user's script (torch…) meanwhile.

    Uses the runs table read with pyarrow only (no DuckDB) to know the recorded
    argv, cwd and thread count. Returns None when the run cannot be resolved
    cheaply; planning then starts workers itself.
    """
    try:
        from flightlog.query.db import read_runs

        rows = [r for r in read_runs(home).to_pylist() if r["kind"] != "replay"]
        if not rows:
            return None
        if run in (None, "latest"):
            row = max(rows, key=lambda r: r["started_at"])
        else:
            hits = [r for r in rows if r["run_id"] == run] or [r for r in rows if r["run_id"].startswith(run)]
            if len(hits) != 1:
                return None
            row = hits[0]
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
                threads, progress, out, t0: float, spec: dict | None) -> ReplayResult:
    try:
        args = spec["args"] if spec else script_args
        jobs = plan_run(home, info, script, args, epochs, workers, force)
    except BaseException:
        _cancel_spec(spec)
        raise
    text = describe(jobs, workers)
    replay_id = "rp" + uuid.uuid4().hex[:8]
    res = execute(jobs, home, workers, threads=threads, progress=progress, out=out, replay_id=replay_id,
                  tmp=spec["tmp"] if spec else None, prespawned=spec["procs"] if spec else None, t0=t0)
    res.plan_text = text
    return res
