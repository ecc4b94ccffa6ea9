"""Run lifecycle: start, the hot ``log`` path, params, heartbeat, signals, exit.

One run is active per process at a time. It lives in a module global rather
than a context variable on purpose: user threads (data loaders, callbacks)
start with an empty context and must log into the same run as the main thread.
"""
from __future__ import annotations

import atexit
import collections
import datetime as _dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from flightlog import _config, _warn
from flightlog._record import NO_CTX, Recorder, Sink, coerce, missing_sink_members, pid_writer

ACTIVE: "Run | None" = None
_FAST: "Run | None" = None  # ACTIVE when it records (not replays): fl.log's one global lookup
_ENDED_ONCE = False  # a run was finished: later logs warn instead of starting a new run
_HOOKS_INSTALLED = False
_START_LOCK = threading.RLock()
_EXC: tuple[str, str, str] | None = None  # (status, type, message) of an uncaught exception
_time = time.time
_HARD_CAP = _config.FLUSH_ROWS  # rows buffered before the logging thread encodes them itself


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


_JOB_RUNS = 0  # runs this process started under a multi-process launcher (the ranks count alike)


def new_run_id() -> str:
    global _JOB_RUNS
    shared = os.environ.get("FLIGHTLOG_RUN_ID")  # the ranks of one multi-process job share one id (_ddp)
    if shared:
        return shared
    from flightlog import _ddp

    if _ddp.rank_info()[1] > 1:
        # torchrun without an integration (a plain fl.loop script): no collective here (a run started by
        # rank 0 alone would wait forever), but an id every rank derives alike from the launcher's
        # environment; the k-th run of each rank gets the same suffix
        _JOB_RUNS += 1
        base = _ddp.job_run_id()
        return base if _JOB_RUNS == 1 else f"{base}-{_JOB_RUNS}"
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _script_path() -> str | None:
    main = sys.modules.get("__main__")
    f = getattr(main, "__file__", None)
    if f:
        return os.path.abspath(f)
    if sys.argv and sys.argv[0] and os.path.isfile(sys.argv[0]):
        return os.path.abspath(sys.argv[0])
    return None


def default_project(script: str | None) -> str:
    base = os.path.dirname(script) if script else os.getcwd()
    return os.path.basename(base.rstrip(os.sep)) or "default"


def git_info(path: str | None) -> tuple[str | None, bool | None]:
    """Commit and dirty flag of the repository holding ``path``; read-only, never fails."""
    start = Path(path).parent if path else Path.cwd()
    d = start
    while True:
        if (d / ".git").exists():
            break
        if d.parent == d:
            return None, None
        d = d.parent
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        commit = subprocess.run(["git", "-C", str(start), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=3, env=env)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "--no-optional-locks", "-C", str(start), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True, timeout=5, env=env)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return commit.stdout.strip(), dirty
    except Exception:
        return None, None


def _versions() -> tuple[str, str | None, str | None]:
    np_v = sys.modules["numpy"].__version__ if "numpy" in sys.modules else None
    torch = sys.modules.get("torch")  # recorded only when the user imported it: never import torch ourselves
    return platform.python_version(), np_v, getattr(torch, "__version__", None)


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    try:
        return int(torch.get_num_threads()) if torch is not None else None
    except Exception:
        return None


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        if isinstance(v, (tuple, set, frozenset)):
            return [_jsonable(x) for x in v]
        if isinstance(v, dict):
            return {str(k): _jsonable(x) for k, x in v.items()}
        c = coerce(v)
        return c if c is not None else repr(v)


class Run:
    """Everything one run knows; the flush thread and the hot path share it."""

    def __init__(self, project: str | None, name: str | None, store: str | None, params: dict | None,
                 run_id: str | None = None, parent_run_id: str | None = None, kind: str = "train",
                 sink=None, flush_interval: float | None = None, source: str = "record") -> None:
        from flightlog.collector.store import LocalSink, new_writer_id

        self.script = _script_path()
        self.project = _config.resolve(project, _config.ENV_PROJECT, None) or default_project(self.script)
        self.name = name
        self.store = _config.store_home(store)
        self.run_id = run_id or new_run_id()
        self.parent_run_id = parent_run_id
        self.kind = kind
        self.source = source
        self.owner_pid = os.getpid()
        self.writer = pid_writer()
        self.started_at = _now()
        self.status = "running"
        self.params: dict[str, Any] = {}
        self._params_dirty = False
        self.steps: dict[str, int] = {}
        self.ctx = NO_CTX
        self.loops: list = []  # stack of active fl.loop frames (see _loops)
        self.dropped_rows = 0
        self.code_snapshot: str | None = None
        self.git_commit: str | None = None
        self.git_dirty: bool | None = None
        self.fast = True  # False when the mode handles fl.log itself (replay): the slow path
        from flightlog._modes import RecordMode

        self.mode = RecordMode()  # record / resume / replay behaviour, chosen once at start
        self.error: tuple[str, str] | None = None  # (type, message) of the exception that ended the run
        self.ended_at: _dt.datetime | None = None
        self.steps_queue: collections.deque | None = None  # finished @fl.step calls waiting to be rows (_steps)
        self.predictions_seq: tuple = (None, 0)  # fl.log_predictions: last call's loop position, next item id
        self.checkpointer: Any = None  # fl.checkpointing's manager (_checkpoint), while its block runs
        self.boundary_done = False  # this outer iteration's checkpoint boundary was handled (_loops, _modes)
        self.snapshot_refreshed = False  # the code snapshot was re-taken once the loop began (_loops)
        self.finish_hooks: list = []  # callables run at finish, each given the run
        self.uploads: list = []  # threads uploading the code snapshot to an object store (_snapshot); joined at finish
        self.problems = _warn.counters  # this run's problem counts (fl.init starts a fresh counter per run)
        self.finished = False
        self.tags: list[str] = []  # fl.init(tags=...); `flightlog tag` adds later ones
        self.notes: str | None = None
        self.annotated_at: _dt.datetime | None = None  # when tags/notes were set here (None: never)
        if sink is None:
            collector = _config.resolve(None, _config.ENV_COLLECTOR, None)
            if collector:
                sink = _remote_sink(collector, self.store)
            if sink is None:
                sink = LocalSink(self.store, writer=new_writer_id())
        self.sink = sink
        self.rec = Recorder(self, sink, flush_interval)
        self.rec.on_flush.append(self._maybe_write_params)
        for k, v in (params or {}).items():
            self.params[str(k)] = _jsonable(v)

    # -- rows -----------------------------------------------------------------

    def row(self) -> dict:
        py, np_v, torch_v = _versions()
        err = self.error
        return {
            "run_id": self.run_id,
            "project": self.project,
            "name": self.name,
            "parent_run_id": self.parent_run_id,
            "kind": self.kind,
            "status": self.status,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "updated_at": _now(),
            "argv": json.dumps(list(sys.argv)),
            "script": self.script,
            "cwd": os.getcwd(),
            "code_snapshot": self.code_snapshot,
            "git_commit": self.git_commit,
            "git_dirty": self.git_dirty,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "python_version": py,
            "numpy_version": np_v,
            "torch_version": torch_v,
            "torch_threads": _torch_threads(),
            "params": json.dumps(self.params, default=repr),
            "error_type": err[0] if err else None,
            "error_message": err[1] if err else None,
            "dropped_rows": self.dropped_rows,
            "counters": json.dumps(dict(self.problems)),
            "tags": json.dumps(self.tags) if self.annotated_at else None,
            "notes": self.notes,
            "annotated_at": self.annotated_at,
        }

    def write_row_now(self) -> None:
        self.rec.emit("runs", self.row())

    def _maybe_write_params(self) -> None:
        if self._params_dirty:
            self._params_dirty = False
            self.rec.emit("runs", self.row())

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self.git_commit, self.git_dirty = git_info(self.script)
        try:
            from flightlog import _snapshot

            self.code_snapshot = _snapshot.take(self)
        except Exception as e:
            _warn.problem("snapshot_failed", f"code snapshot failed: {e!r}")
        self.write_row_now()
        if getattr(self.sink, "spool", None) is not None:
            # object storage: the first write also creates the S3 client and its connection (~0.05 s); the
            # flush thread, started next, writes the run's row at once while the script goes on
            self.rec.start()
            self.rec.request_flush()
            return
        self.rec.flush()
        self.rec.start()

    def finish(self, status: str = "finished", error: tuple[str, str] | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        for hook in list(self.finish_hooks):
            try:
                hook(self)
            except Exception as e:
                _warn.problem("finish_hook_error", f"finish hook failed: {e!r}")
        self.rec.stop()
        for t in self.uploads:
            t.join(timeout=60.0)  # the code snapshot is on the store before the run says it finished
        if os.getpid() == self.owner_pid and self.kind != "replay":
            self.status = status
            if error:
                self.error = error
            self.ended_at = _now()
            self.rec.flush()  # everything logged so far, then the final row with the counters
            self.rec.flush()  # one retry for what failed
            self.rec.abandon_pending()
            self.rec.emit("runs", self.row())
        self.rec.flush()
        self.rec.abandon_pending()
        try:
            self.sink.compact(self.run_id)
        except Exception as e:
            _warn.problem("compact_failed", f"compaction failed: {e!r}")
        try:
            self.sink.close()
        except Exception:
            pass


def _remote_sink(url: str, store: str):
    try:
        from flightlog.collector.client import CollectorSink
    except Exception as e:  # the collector client is optional
        _warn.problem("collector_unavailable", f"collector mode needs the 'server' extra ({e}); writing locally")
        return None
    try:
        return CollectorSink(url, spool=os.path.join(store, "spool"), token=os.environ.get(_config.ENV_TOKEN))
    except Exception as e:
        _warn.problem("collector_unavailable", f"cannot use collector {url}: {e}; writing locally")
        return None


# -- process hooks ---------------------------------------------------------------

_PREV_EXCEPTHOOK = None
_PREV_TERM = None


def _excepthook(tp, value, tb):
    global _EXC
    status = "killed" if issubclass(tp, KeyboardInterrupt) else "failed"
    _EXC = (status, tp.__name__, str(value)[:2000])
    prev = _PREV_EXCEPTHOOK or sys.__excepthook__
    prev(tp, value, tb)


def _on_sigterm(signum, frame):
    global _EXC
    _EXC = ("killed", "SIGTERM", "terminated by signal")
    prev = _PREV_TERM
    if callable(prev):
        prev(signum, frame)
        return
    r = ACTIVE
    if r is not None:
        try:
            _end(r, "killed", ("SIGTERM", "terminated by signal"))
        except Exception:
            pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _at_exit():
    r = ACTIVE
    if r is None:
        return
    if _EXC is not None:
        _end(r, _EXC[0], (_EXC[1], _EXC[2]))
    elif _INTERRUPTED is not None:
        # Ctrl-C that the script caught and then ended: the run did not finish its work.
        _end(r, "killed", ("KeyboardInterrupt", "interrupted (Ctrl-C); the script caught it and exited"))
    else:
        _end(r, "finished", None)


_INTERRUPTED: float | None = None  # time of the last SIGINT, whether or not the script caught it
_PREV_INT = None


def _on_sigint(signum, frame):
    global _INTERRUPTED
    _INTERRUPTED = time.time()
    prev = _PREV_INT
    if callable(prev):
        return prev(signum, frame)
    raise KeyboardInterrupt


def _after_fork_child():
    r = ACTIVE
    if r is not None:
        from flightlog.collector.store import new_writer_id

        r.writer = pid_writer()
        try:
            r.sink.writer = new_writer_id()
        except Exception:
            pass
        r.rec.reset_after_fork()
        try:
            r.rec.start()
        except Exception:
            pass


def _install_hooks() -> None:
    global _HOOKS_INSTALLED, _PREV_EXCEPTHOOK, _PREV_TERM, _PREV_INT
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_at_exit)
    _PREV_EXCEPTHOOK = sys.excepthook
    sys.excepthook = _excepthook
    if threading.current_thread() is threading.main_thread():
        try:
            prev_int = signal.getsignal(signal.SIGINT)
            if prev_int is signal.default_int_handler:  # only the default: a user handler decides itself
                _PREV_INT = prev_int
                signal.signal(signal.SIGINT, _on_sigint)
        except (ValueError, OSError):
            pass
        try:
            prev = signal.getsignal(signal.SIGTERM)
            if prev is not signal.SIG_IGN:
                _PREV_TERM = prev if callable(prev) else None
                signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):
            pass
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_child)


def _end(r: Run, status: str, error) -> None:
    global ACTIVE, _FAST, _ENDED_ONCE
    with _START_LOCK:
        if ACTIVE is r:
            ACTIVE = None
            _FAST = None
            _ENDED_ONCE = True
    first = not r.finished
    r.finish(status, error)
    if first:
        from flightlog import _summary

        _summary.maybe_print(r)


# -- public functions (re-exported by flightlog/__init__) ----------------------------

def init(project: str | None = None, name: str | None = None, store: str | os.PathLike | None = None,
         params: dict | None = None, *, resume: str | None = None, flush_interval: float | None = None,
         collector: str | None = None, tags: "list[str] | tuple[str, ...] | str | None" = None,
         notes: str | None = None, system_metrics: bool | None = None, sink: "Sink | None" = None) -> "Run | None":
    """Start a run explicitly (optional: the first ``log``/``arg`` starts one).

    A run already active is finished first. ``resume=RUN`` continues a crashed
    or killed run from its last checkpoint as a new run linked to it. ``name``,
    ``tags`` and ``notes`` label the run for ``flightlog runs``/``compare`` and
    run references; ``system_metrics=False`` turns off the ``sys/...`` samples
    (CPU, RSS, GPU) taken every 10 s. ``sink`` replaces where rows go (the
    store or the collector) with any object that has the members of
    ``flightlog.Sink``, e.g. ``flightlog.MemorySink()`` in tests.
    """
    global ACTIVE, _FAST, _ENDED_ONCE
    if _config.disabled():
        return None
    if store is not None:
        store = os.fspath(store)
    if resume is None:
        resume = os.environ.get(_config.ENV_RESUME) or None
    with _START_LOCK:
        if ACTIVE is not None:
            _end(ACTIVE, "finished", None)
        _warn.begin_run()  # problems counted from here on are this run's
        try:
            if sink is not None:
                missing = missing_sink_members(sink)
                if missing:
                    _warn.problem("bad_sink", f"fl.init(sink=...) lacks {', '.join(missing)}; writing to the store")
                    sink = None
                elif collector:
                    _warn.problem("bad_sink", "fl.init got both sink= and collector=; using the sink")
            if sink is None and collector:
                sink = _remote_sink(collector, _config.store_home(store))
            replay_plan = os.environ.get(_config.ENV_REPLAY)
            if replay_plan:
                from flightlog import _replay

                r = _replay.start_replay_run(replay_plan, project=project, store=store)
            elif resume:
                from flightlog import _resume

                r = _resume.start_resumed_run(resume, project=project, name=name, store=store, params=params,
                                              flush_interval=flush_interval, sink=sink)
                if tags is not None or notes is not None:
                    _label(r, tags, notes)
                    r.write_row_now()
            else:
                r = Run(project, name, store, params, sink=sink, flush_interval=flush_interval)
                _label(r, tags, notes)
                r.start()
            if r.kind != "replay":
                _sysmetrics_start(r, system_metrics)
        except Exception as e:
            if resume is None and not os.environ.get(_config.ENV_REPLAY):
                # A normal run must never break the user's program: record nothing, say so.
                _warn.problem("init_failed", f"could not start a run: {e!r}")
                return None
            raise
        _install_hooks()
        ACTIVE = r
        _FAST = r if r.fast else None
        _ENDED_ONCE = False
        return r


def _label(r: "Run", tags: Any, notes: Any) -> None:
    """Put fl.init's tags/notes on the run; bad ones are a warning (never an exception)."""
    if tags is None and notes is None:
        return
    if isinstance(tags, str):
        tags = [tags]
    clean: list[str] = []
    for t in tags or ():
        if isinstance(t, str) and t.strip() and t.strip() not in clean:
            clean.append(t.strip())
        else:
            _warn.problem("bad_tag", f"tags must be non-empty strings; ignored {t!r}")
    if notes is not None and not isinstance(notes, str):
        _warn.problem("bad_notes", f"notes must be a string; got {type(notes).__name__}, stored as its str()")
        notes = str(notes)
    r.tags, r.notes, r.annotated_at = clean, notes, r.started_at


def _sysmetrics_start(r: "Run", enabled: bool | None) -> None:
    try:
        from flightlog import _sysmetrics

        _sysmetrics.attach(r, enabled)
    except Exception as e:
        _warn.problem("sysmetrics_error", f"system metrics are off: {e!r}")


def _auto_start() -> "Run | None":
    with _START_LOCK:
        if ACTIVE is not None:
            return ACTIVE
        if _ENDED_ONCE or _config.disabled():
            return None
        try:
            return init()
        except Exception as e:
            _warn.problem("init_failed", f"could not start a run: {e!r}")
            return None


def finish() -> None:
    """End the active run now (status ``finished``); exit does it otherwise."""
    r = ACTIVE
    if r is not None:
        _end(r, "finished", None)


def current() -> "Run | None":
    """The active run, or None."""
    return ACTIVE


def log(name: "str | dict", value: Any = None, step: int | None = None) -> Any:
    """Record a scalar: the hot path (~0.6 µs), never raises. Returns ``value``.

    ``fl.log({"loss": l, "acc": a})`` logs each entry at one shared step.
    """
    r = _FAST
    if r is not None and type(name) is str and name:
        t = type(value)
        v = value if (t is float or t is int) else coerce(value)
        if v is not None:
            if step is None:
                c = r.steps
                step = c.get(name, 0)
                c[name] = step + 1
            elif type(step) is not int:
                _log_slow(name, value, step)
                return value
            b = r.buf
            b.append((name, v, step, _time(), r.ctx))
            if len(b) > _HARD_CAP:
                r.rec.relieve()
            return value
    _log_slow(name, value, step)
    return value


def _log_slow(name: Any, value: Any, step: Any) -> None:
    try:
        r = ACTIVE
        if r is None:
            if _ENDED_ONCE:
                _warn.problem("log_after_finish", "fl.log called after the run finished; value not recorded")
                return
            r = _auto_start()
            if r is None:
                return
        if isinstance(name, dict):
            from flightlog._logmore import log_dict

            log_dict(r, name, value, step)
            return
        if type(name) is not str or not name:
            _warn.problem("bad_name", f"metric name must be a non-empty string, got {name!r}")
            return
        if step is not None and type(step) is not int:
            s = coerce(step)
            if s is None or float(s) != int(s):
                _warn.problem("bad_step", f"step must be an integer, got {step!r}; using the counter")
                step = None
            else:
                step = int(s)
        v = coerce(value)
        if v is None:
            _warn.problem("bad_value", f"fl.log({name!r}): value {type(value).__name__} is not a number")
            return
        if r.mode.logs_slow:
            r.mode.on_log(r, name, v, step)
            return
        if step is None:
            step = r.steps.get(name, 0)
            r.steps[name] = step + 1
        r.buf.append((name, v, step, _time(), r.ctx))
    except Exception as e:  # never into the training loop
        _warn.problem("log_error", f"fl.log failed: {e!r}")


def arg(name: str, default: Any = None) -> Any:
    """Record a hyperparameter and return it (the recorded value in replay)."""
    try:
        r = ACTIVE or _auto_start()
        if r is None:
            return default
        if type(name) is not str or not name:
            _warn.problem("bad_name", f"arg name must be a non-empty string, got {name!r}")
            return default
        return r.mode.arg(r, name, default)
    except Exception as e:
        _warn.problem("arg_error", f"fl.arg failed: {e!r}")
        return default
