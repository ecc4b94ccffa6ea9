"""Replay segments as Ray tasks: ``flightlog replay … --executor ray [--address ADDR]``.

The runner plans, verifies and stores exactly as with local workers; only the place a planned
worker runs changes. Each worker becomes one Ray task (one CPU) that starts the same worker
process (``python script.py`` with ``FLIGHTLOG_REPLAY`` pointing at its plan) on whichever node
Ray picks, and returns what a local worker leaves in the runner's temporary folder: the result
JSON, the new rows and the log. :class:`RayWorker` looks like a ``subprocess.Popen`` to the
runner (``poll``/``wait``/``kill``/``returncode``), so the scheduling loop, the verification retry
and the reporting are the local ones.

The store must be reachable from every node under the same name: object storage
(``s3://…``) or a shared file system. The script is read from the same path when the node has
it (shared checkout), else a copy of the driver's file is run. A task whose worker process or
node dies is retried by Ray (``max_retries``); if it is lost every time, its segment fails with
the reason, like a local worker that crashed.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

EXECUTORS = ("local", "ray")
MAX_RETRIES = 2  # attempts after the first when a worker process or node is lost
_state: dict[str, Any] = {"executor": "local", "address": None}
_task = None


@contextlib.contextmanager
def options(executor: str = "local", address: str | None = None) -> Iterator[None]:
    """Run the replays started inside this block on ``executor`` (``local`` or ``ray``)."""
    from flightlog._errors import ReplayError

    if executor not in EXECUTORS:
        raise ReplayError(f"--executor must be one of {', '.join(EXECUTORS)} (got {executor!r})")
    if address and executor != "ray":
        raise ReplayError("--address is the Ray cluster to use: give it with --executor ray")
    if executor == "ray":
        _connect(address)
    old = dict(_state)
    _state.update(executor=executor, address=address)
    try:
        yield
    finally:
        _state.clear()
        _state.update(old)


def active() -> bool:
    """Whether planned workers go to Ray (inside :func:`options` with ``executor='ray'``)."""
    return _state.get("executor") == "ray"


def _connect(address: str | None) -> None:
    from flightlog._errors import ReplayError

    try:
        import ray
    except ImportError:
        raise ReplayError("--executor ray needs Ray: pip install 'flightlog[ray]'") from None
    if ray.is_initialized():
        return
    try:
        # address None: RAY_ADDRESS, else a cluster started on this machine for this replay
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False, logging_level="ERROR")
    except Exception as e:
        raise ReplayError(f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS/local'}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _remote():
    global _task
    if _task is None:
        import ray

        _task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(run_segment)
    return _task


_PASS_ENV = ("FLIGHTLOG_", "AWS_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED", "PYTHONPATH",
             "CUBLAS_WORKSPACE_CONFIG")


def spawn(cmd: list[str], env: dict, cwd: str | None, plan_path: str, store: str, log_path: str) -> "RayWorker":
    """Stand-in for the runner's worker process: submits the segment once its plan file exists."""
    return RayWorker(cmd, env, cwd, plan_path, store, log_path)


class RayWorker:
    """One planned worker running as a Ray task, with the parts of ``Popen`` the runner uses."""

    def __init__(self, cmd: list[str], env: dict, cwd: str | None, plan_path: str, store: str, log_path: str):
        self.cmd, self.cwd, self.plan_path, self.store, self.log_path = cmd, cwd, plan_path, store, log_path
        self.env = {k: v for k, v in env.items() if k.startswith(_PASS_ENV)}
        self.ref = None
        self.returncode: int | None = None
        self.pid = None
        self._submit()

    def _submit(self) -> None:
        if self.ref is not None or not os.path.exists(self.plan_path):
            return
        with open(self.plan_path) as fh:
            plan = json.load(fh)
        rec = plan.get("recorded_path")
        recorded = None
        if rec and os.path.exists(rec):
            with open(rec, "rb") as fh:
                recorded = fh.read()
        script = self.cmd[1]
        with open(script, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        from flightlog.replay import pool as _pool

        payload = {"plan": plan, "recorded": recorded, "script": script, "script_text": text,
                   "args": self.cmd[2:], "cwd": self.cwd, "env": self.env, "store": self.store,
                   "cold": bool(_pool._OPTS.get("cold")) or os.environ.get("FLIGHTLOG_REPLAY_COLD") == "1"}
        world = int(plan.get("world_size") or 1)  # a torchrun/DDP run: the task runs all its ranks on one node
        self.ref = _remote().options(num_cpus=world).remote(payload) if world > 1 else _remote().remote(payload)

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.ref is None:
            if os.path.exists(self.plan_path + ".cancel"):  # a speculative worker that was not needed
                self.returncode = 0
                return 0
            self._submit()
            return None
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        self._finish()
        return self.returncode

    def _finish(self) -> None:
        import ray

        try:
            out = ray.get(self.ref)
        except Exception as e:  # the task's worker/node was lost MAX_RETRIES + 1 times, or it was cancelled
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self._log(f"flightlog: the Ray task running this segment was lost "
                      f"({type(e).__name__}: {why}) after {MAX_RETRIES + 1} attempts\n")
            self.returncode = 1
            return
        with open(self.plan_path) as fh:
            plan = json.load(fh)
        for key, what in (("result_path", "result"), ("rows_path", "rows")):
            if out.get(what) is not None and plan.get(key):
                with open(plan[key], "wb") as fh:
                    fh.write(out[what])
        self._log(out.get("log", ""))
        self.returncode = int(out["rc"])

    def _log(self, text: str) -> None:
        with open(self.log_path, "a", errors="replace") as fh:
            fh.write(text)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.cmd, timeout)
            time.sleep(0.05)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            if self.ref is not None:
                import ray

                try:
                    ray.cancel(self.ref, force=True)
                except Exception:
                    pass
            self.returncode = -9

    terminate = kill

    def send_signal(self, sig) -> None:
        self.kill()


def _run_worker(script: str, args: list[str], env: dict, cwd: str, lf, store: str, cold: bool,
                group: tuple | None = None) -> int:
    """The worker process on this node: forked from this node's warm pool for the store, else cold.

    The same worker as a local replay's (``replay/pool.py``, ``replay/_worker.py``): a
    node that ran a segment before keeps a pool that has imported the script's
    packages, so later tasks skip the interpreter and torch start-up. The Ray
    worker process itself is never forked (it runs threads).
    """
    from flightlog.replay import pool

    cmd = [sys.executable, script, *args]
    kw = dict(env=env, cwd=cwd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    notes = io.StringIO()
    # where this node's pools live and how long they idle: the driver's settings (the Ray worker's own
    # environment is the cluster's, not the replay's)
    saved = {k: os.environ.get(k) for k in (pool.ENV_DIR, pool.ENV_IDLE)}
    try:
        for k in saved:
            if env.get(k):
                os.environ[k] = env[k]
        with pool.options(cold=cold, out=notes, store=store):
            if group is not None:  # (log path, plan path, ranks, tag): the segment's rank processes
                from flightlog.replay import _ranks

                log_path, plan_path, world, tag = group
                w = _ranks.spawn_group(cmd, env, cwd, lf, log_path, plan_path, store, None, world, tag,
                                       fork_session=False)
            else:
                w = pool.spawn(cmd, env, cwd, lf, store, kw, None, fork_session=False)
        if w is None:
            w = subprocess.Popen(pool.cold_cmd(cmd), **kw)
        rc = w.wait()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if notes.getvalue():
        lf.write("".join(f"flightlog (Ray task): {x}\n" for x in notes.getvalue().splitlines()))
    return rc


def run_segment(payload: dict) -> dict:
    """On a Ray worker: run one planned segment as a local worker process; return what it produced."""
    from flightlog.collector import fs as _fs

    tmp = tempfile.mkdtemp(prefix="flightlog-ray-")
    try:
        plan = dict(payload["plan"])
        plan["tmp"] = tmp
        for key, name in (("recorded_path", "recorded.parquet"), ("result_path", "result.json"),
                          ("rows_path", "rows.parquet"), ("progress_path", "progress")):
            if plan.get(key):
                plan[key] = os.path.join(tmp, name)
        if payload.get("recorded") is not None:
            with open(plan["recorded_path"], "wb") as fh:
                fh.write(payload["recorded"])
        elif plan.get("recorded_path"):
            plan["recorded_path"] = None
        store = payload["store"]
        if _fs.is_remote(store) or not os.path.isdir(os.path.dirname(plan.get("scratch") or tmp)):
            plan["scratch"] = os.path.join(tmp, "scratch")
        plan_path = os.path.join(tmp, "plan.json")
        with open(plan_path, "w") as fh:
            json.dump(plan, fh)
        script = payload["script"]
        if not os.path.isfile(script):  # no shared checkout on this node: run the driver's copy
            script = os.path.join(tmp, os.path.basename(script))
            with open(script, "w", encoding="utf-8") as fh:
                fh.write(payload["script_text"])
        cwd = payload.get("cwd") if payload.get("cwd") and os.path.isdir(payload["cwd"]) else tmp
        env = dict(os.environ)
        env.update(payload.get("env") or {})
        env["FLIGHTLOG_REPLAY"] = plan_path
        env["FLIGHTLOG_HOME"] = store
        env.pop("FLIGHTLOG_RESUME", None)
        log = os.path.join(tmp, "worker.log")
        world = int(plan.get("world_size") or 1)
        group = (log, plan_path, world, os.path.basename(tmp)) if world > 1 else None
        with open(log, "w") as lf:
            rc = _run_worker(script, list(payload.get("args", [])), env, cwd, lf, store, bool(payload.get("cold")),
                             group)

        def read(p, mode="rb"):
            try:
                with open(p, mode) as fh:
                    return fh.read()
            except (OSError, TypeError):
                return None

        text = read(log, "r") or ""
        return {"rc": rc, "log": text[-20000:], "result": read(plan.get("result_path")),
                "rows": read(plan.get("rows_path"))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
