"""Replay mode: how ``fl.arg``, ``fl.loop``, ``fl.log`` and ``fl.checkpointing`` behave in a replay worker.

The runner (``flightlog.replay.runner``) writes a plan (JSON) and starts the
user's script with ``FLIGHTLOG_REPLAY`` pointing at it. The first flightlog call
then creates a Run whose mode is :class:`ReplayMode`:

* ``fl.arg`` returns the recorded value;
* ``fl.checkpointing`` only registers the objects to restore into;
* the outermost ``fl.loop`` yields only the planned iterations, restoring the
  checkpoint before a run of ``full`` iterations (registered objects, RNG states,
  step counters, loop-carried variables), and ends the process once the segment
  is done (code after the loop runs only for run-level statements);
* in a ``tail`` iteration the first inner loop is skipped: it yields nothing and
  restores the checkpoint taken when it ended in the recorded run;
* plan ``from_start``: nothing is skipped or restored but the loop-start state;
  the whole script runs (exact re-execution, the fallback);
* ``fl.log`` of an already-recorded name compares the value with the record
  (fidelity); a new name's values are collected and written to the plan's
  ``rows_path`` — the runner decides, after verification, what is stored;
* file writes go to the replay's scratch folder (``_scratch``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable, Iterator

import pyarrow as pa

from flightlog import _checkpoint, _run, _warn
from flightlog._loops import Frame, context_tuple
from flightlog._modes import Mode
from flightlog._record import NO_CTX
from flightlog.collector import schema as _schema

RTOL = 1e-5
ATOL = 1e-8


def _wait_for_plan(plan_path: str) -> None:
    # The runner may start this process before it has finished planning, so that
    # the script's imports overlap with the planning; wait for the plan (or a cancel).
    deadline = time.time() + 3600
    while not os.path.exists(plan_path):
        if os.path.exists(plan_path + ".cancel") or time.time() > deadline:
            os._exit(0)
        time.sleep(0.005)


def worker_rank() -> int | None:
    """This worker's rank in a multi-process segment (env ``RANK``); None for a one-process worker."""
    from flightlog import _ddp

    return _ddp.rank_info()[0]


def rank_plan(plan: dict, rank: int | None) -> dict:
    """The plan as rank ``rank`` of a multi-process segment follows it.

    The ranks of one segment share one plan file; rank 0 writes the result, rows and
    progress files it names, rank r > 0 writes them with a ``.rank<r>`` suffix (the runner
    merges them) and uses a writer id of its own (part names must not collide).
    """
    if not rank or int(plan.get("world_size") or 1) <= 1:
        return plan
    plan = dict(plan)
    for key in ("result_path", "rows_path"):
        if isinstance(plan.get(key), str):
            plan[key] = f"{plan[key]}.rank{rank}"
    plan["progress_path"] = None
    plan["writer"] = f"{plan['writer']}r{rank}"
    return plan


def start_replay_run(plan_path: str, project=None, store=None) -> "_run.Run":
    _wait_for_plan(plan_path)
    with open(plan_path) as fh:
        plan = rank_plan(json.load(fh), worker_rank())
    from flightlog.collector.store import LocalSink

    home = plan["store"]
    sink = LocalSink(home, writer=plan["writer"])
    r = _run.Run(plan.get("project"), None, home, None, run_id=plan["run_id"], kind="replay",
                 sink=sink, source="replay")
    r.fast = False
    r.mode = ReplayMode(r, plan)
    r.replay_id = plan.get("replay_id")
    _tag_rows(r, r.replay_id)
    r.rec.start()
    r.finish_hooks.append(lambda run: run.mode.write_result())
    if plan.get("scratch"):
        from flightlog import _scratch

        _scratch.install(plan["scratch"], [home, plan.get("tmp", "")])
    return r


_TAGGED = ("spans", "io", "predictions")


def _tag_rows(r, replay_id: str | None) -> None:
    """Rows of spans, io and predictions a replay worker writes say which replay wrote them."""
    emit, emit_table = r.rec.emit, r.rec.emit_table

    def tagged(table: str, row: dict) -> None:
        if table in _TAGGED and isinstance(row, dict):
            row = dict(row, replay_id=replay_id)
        emit(table, row)

    def tagged_table(table: str, data: pa.Table) -> None:
        if table in _TAGGED and "replay_id" not in data.column_names:
            data = data.append_column("replay_id", pa.array([replay_id] * data.num_rows, pa.string()))
        emit_table(table, data)

    r.rec.emit = tagged
    r.rec.emit_table = tagged_table


class ReplayMode(Mode):
    """The replay plan of one worker segment, and what the replay observed."""

    name = "replay"
    logs_slow = True

    def __init__(self, run, plan: dict) -> None:
        self.run = run
        self.plan = plan
        self.store = plan["store"]
        self.params = plan.get("params", {})
        self.kind = plan.get("plan", "fast")  # fast | from_start
        self.actions = {int(k): v for k, v in plan["actions"].items()}
        self.emit = set(plan["emit"])
        self.skip_loops = set(plan.get("skip_loops", []))
        self.after_loop = bool(plan.get("run_after_loop")) or self.kind == "from_start"
        self.ckpts = {int(k): v for k, v in plan["checkpoints"].items()}
        self.owner = {int(k): v for k, v in plan.get("owner", {}).items()}
        self.recorded_names = set(plan.get("recorded_names", []))
        self.rank = worker_rank() if int(plan.get("world_size") or 1) > 1 else None
        own = (plan.get("rank_checkpoints") or {}).get(str(self.rank)) if self.rank else None
        if own is not None:  # a plain fl.loop script under torchrun: this rank restores its own checkpoints
            self.ckpts = {int(k): v for k, v in own.items()}
        self.recorded: dict[tuple[str, int], float] = {}
        self.times: dict[tuple, Any] = {}
        self._load_recorded(plan.get("recorded_path"))
        self.objects: dict[str, Any] = {}
        self.outer: Frame | None = None
        self.outer_loops = 0
        self.cur_epoch: int | None = None
        self.cur_mode: str | None = None
        self.inner_skipped = False
        self.compared = 0
        self.exact = 0
        self.within = 0
        self.diverged = 0
        self.unmatched = 0
        self.max_abs = 0.0
        self.first_div: dict | None = None
        self.new_rows: list[tuple] = []  # (name, value, step or None, ctx, epoch)
        self.out_rows: dict[str, list] = {k: [] for k in _schema.METRICS.names}
        self.new_names: set[str] = set()
        self.pre_steps: dict[str, int] = {}  # new names' calls before training (not replayed; they shift steps)
        self.rows_written = 0
        self.epochs_done: list[int] = []
        self.stopped_early: int | None = None
        self.missed_vars: set[str] = set()
        self.first_epoch_at: float | None = None
        self.last_epoch_at: float | None = None
        self.result_written = False
        self.created_at = time.time()
        threads = plan.get("torch_threads")
        self.threads = int(threads) if threads else None
        # tail slicing (replay/slicing.py): statements of the epoch tail skipped in these epochs
        self.slice_lines = frozenset(int(x) for x in plan.get("slice_lines") or ())
        self.slice_epochs = frozenset(int(x) for x in plan.get("slice_epochs") or ())
        self.slicing_now = False
        self.sliced_epochs: list[int] = []
        self.skipped = 0
        if self.slice_lines:
            import builtins

            builtins.__flightlog_keep__ = self.keep  # the guard the worker compiled into the script

    def keep(self, line: int) -> bool:
        """Run this statement of a loop body? False only for a sliced tail statement in a sliced epoch."""
        if self.slicing_now and line in self.slice_lines:
            self.skipped += 1
            return False
        return True

    # -- inputs -------------------------------------------------------------------

    def _load_recorded(self, path: str | None) -> None:
        if not path or not os.path.exists(path):
            return
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        if "rank" in t.column_names and self.rank is not None:
            import pyarrow.compute as pc

            t = t.filter(pc.equal(t.column("rank"), self.rank))  # each rank compares with its own record
        names = t.column("name").to_pylist()
        steps = t.column("step").to_pylist()
        vals = t.column("value").to_pylist()
        for n, s, v in zip(names, steps, vals):
            self.recorded[(n, s)] = v
        if "wall_time" in t.column_names:
            for e, b, w in zip(t.column("epoch").to_pylist(), t.column("batch").to_pylist(),
                               t.column("wall_time").to_pylist()):
                self.times.setdefault((e, b), w)

    # -- SDK hooks --------------------------------------------------------------------

    def arg(self, run, name: str, default: Any) -> Any:
        if name in self.params:
            v = self.params[name]
            if isinstance(default, tuple) and isinstance(v, list):
                return tuple(v)
            return v
        return default

    def checkpointing(self, run, objects: dict, every=None, overhead=None) -> "ReplayMode":
        self.objects.update(objects)
        return self

    def close(self) -> None:  # the object fl.checkpointing yields in replay
        pass

    def loop(self, run, name: str, iterable: Iterable, caller=None) -> Iterator:
        from flightlog import _scratch

        _scratch.patch_torch()
        depth = len(run.loops)
        if depth == 0:
            self.outer_loops += 1
            if self.kind == "from_start":
                return self._through(run, name, iterable, caller, outer=True)
            return self._outer(run, name, iterable, caller)
        if (depth == 1 and self.cur_mode == "tail" and not self.inner_skipped
                and (name in self.skip_loops or not self.skip_loops)):
            self.inner_skipped = True
            self._restore(self.cur_epoch, inner_frame=caller)
            if self.slice_lines and self.cur_epoch in self.slice_epochs:
                self.slicing_now = True
                self.sliced_epochs.append(self.cur_epoch)
            return iter(())
        return self._through(run, name, iterable, caller)

    def _through(self, run, name: str, iterable: Iterable, caller, outer: bool = False) -> Iterator:
        """A loop that runs as recorded (inner loops; every loop when replaying from the start)."""
        frames = run.loops
        frame = Frame(name, len(frames), None, caller)
        frames.append(frame)
        parent = run.ctx
        if outer:
            self.outer = frame
            self._set_threads()
            if self.outer_loops == 1:
                self._restore(-1)  # the loop-start state (unseeded RNGs), if recorded
        try:
            for i, item in enumerate(iterable):
                frame.index = i
                run.ctx = context_tuple(frames)
                if outer:
                    self.cur_epoch = i
                try:
                    yield item
                except GeneratorExit:
                    if outer:
                        self._epoch_done(i)
                    raise
                if outer:
                    self._epoch_done(i)
        finally:
            if frames and frames[-1] is frame:
                frames.pop()
            run.ctx = parent if frames else NO_CTX
            if outer:
                self.cur_epoch = None

    def _outer(self, run, name: str, iterable: Iterable, caller) -> Iterator:
        frames = run.loops
        frame = Frame(name, 0, None, caller)
        self.outer = frame
        frames.append(frame)
        last = max(self.actions) if self.actions else -1
        prev: tuple[int, str] | None = None
        self._set_threads()
        try:
            it = iter(iterable)
            i = -1
            while i < last:
                try:
                    item = next(it)
                except StopIteration:
                    break
                i += 1
                mode = self.actions.get(i)
                if mode is None:
                    continue
                if mode == "full" and (prev is None or prev[0] != i - 1):
                    # a tail or full epoch just before leaves the exact end-of-epoch state
                    self._restore(i - 1)
                if self.first_epoch_at is None:
                    self.first_epoch_at = time.time()
                self.cur_epoch, self.cur_mode, self.inner_skipped = i, mode, False
                self.slicing_now = False
                frame.index = i
                run.ctx = context_tuple(frames)
                try:
                    yield item
                except GeneratorExit:
                    # The script left the loop during iteration i (break, return or an exception).
                    self._left_loop(run, i, frame.pyframe)
                    raise
                self._epoch_done(i)
                prev = (i, mode)
        finally:
            if frames and frames[-1] is frame:
                frames.pop()
            run.ctx = NO_CTX
            self.cur_epoch = None
        if not self.after_loop:
            # The segment is done: do not run the script's tail (it may save files).
            _run._end(run, "finished", None)
            sys.stdout.flush()
            raise SystemExit(0)

    def _left_loop(self, run, i: int, pyframe) -> None:
        """``break`` out of the outer loop (early stopping): iteration i is complete as recorded.

        The generator cannot tell a ``break`` from an exception leaving the loop, so it
        watches the loop's frame: the first line executed after the ``for`` statement
        (or in a caller, after the function returned) means a break, and ends the worker
        there, before the script's code after the loop (unless a new statement lives
        there); an exception event means the exception fails the worker as it would
        fail the script.
        """
        self._epoch_done(i)
        self.stopped_early = i
        if self.after_loop or pyframe is None:
            return
        from flightlog import _carried

        end = _carried.loop_end_line(pyframe.f_code.co_filename, self.outer.lineno) if self.outer else None

        def stop():
            sys.settrace(None)
            _run._end(run, "finished", None)
            sys.stdout.flush()
            raise SystemExit(0)

        def off(frame):
            sys.settrace(None)
            frame.f_trace = None
            self.stopped_early = None

        def caller(frame, event, arg):
            if event == "exception":
                off(frame)
                return None
            if event == "line":
                stop()
            return caller

        def local(frame, event, arg):
            if event == "exception":
                off(frame)
                return None
            if event == "line" and (end is None or frame.f_lineno > end):
                stop()
            if event == "return" and frame.f_back is not None:
                frame.f_back.f_trace = caller
                frame.f_back.f_trace_lines = True
            return local

        def glob(frame, event, arg):
            return None

        pyframe.f_trace = local
        pyframe.f_trace_lines = True
        sys.settrace(glob)

    def _set_threads(self) -> None:
        if self.threads:
            torch = sys.modules.get("torch")
            if torch is not None:
                try:
                    torch.set_num_threads(self.threads)
                except Exception:
                    pass

    def _restore(self, iteration: int | None, inner_frame=None) -> None:
        if iteration is None:
            return
        ck = self.ckpts.get(iteration)
        if ck is None:
            if iteration < 0:
                return  # no start-of-loop checkpoint: the script's own start state is used
            from flightlog._errors import ReplayError

            raise ReplayError(f"plan needs checkpoint {iteration} which is missing")
        payload = _checkpoint.load(self.store, ck["content_hash"], f"checkpoint of iteration {iteration}")
        scopes = {"outer": self.outer.pyframe if self.outer is not None else None}
        if inner_frame is not None:
            scopes["inner"] = inner_frame
        missed = _checkpoint.restore(self.run, payload, self.objects, scopes)
        self.missed_vars.update(missed)
        self._set_threads()

    def on_log(self, run, name: str, value: float, step: int | None) -> None:
        if name in self.recorded_names:
            if step is None:
                step = run.steps.get(name, 0)
                run.steps[name] = step + 1
            self._compare(run, name, float(value), step)
            return
        if self.kind == "from_start" and step is None:
            # everything runs from the start: the live counter is the step the statement would have had
            step = run.steps.get(name, 0)
            run.steps[name] = step + 1
        e = self.cur_epoch
        if e is not None and e < -1:
            # before training (Lightning's sanity validation): not replayed, but counted, because in a full
            # re-run these calls come first and every later value's step follows them
            if step is None:
                self.pre_steps[name] = self.pre_steps.get(name, 0) + 1
            return
        if e is not None and e not in self.emit and not (self.kind == "from_start" and self.outer_loops > 1):
            return  # fast-forward epoch: its new values belong to another worker or are not wanted
        if e is None and not self.plan.get("store_run_level", True):
            return
        self.new_names.add(name)
        self.new_rows.append((name, float(value), step, run.ctx, e))

    def _compare(self, run, name: str, v: float, step: int) -> None:
        rec = self.recorded.get((name, step))
        if rec is None:
            self.unmatched += 1
            return
        self.compared += 1
        if v == rec or (math.isnan(v) and math.isnan(rec)):
            self.exact += 1
            return
        diff = abs(v - rec)
        if not math.isnan(diff):
            self.max_abs = max(self.max_abs, diff)
        if diff <= ATOL + RTOL * abs(rec):
            self.within += 1
            return
        self.diverged += 1
        if self.first_div is None:
            ctx = run.ctx
            self.first_div = {"name": name, "step": step, "epoch": ctx[0], "batch": ctx[1],
                              "recorded": rec, "replayed": v}

    # -- output -------------------------------------------------------------------------

    def _epoch_done(self, e: int) -> None:
        self.slicing_now = False
        if e not in self.epochs_done:
            self.epochs_done.append(e)
        self.last_epoch_at = time.time()
        self._flush_new(e)
        prog = self.plan.get("progress_path")
        if prog:
            try:
                with open(prog, "a") as fh:
                    fh.write(f"{e}\n")
            except OSError:
                pass

    def _flush_new(self, epoch: int | None) -> None:
        rows = [r for r in self.new_rows if r[4] == epoch]
        if not rows:
            return
        self.new_rows = [r for r in self.new_rows if r[4] != epoch]
        # Steps of new names: as if the statement had run since the start, assuming it
        # runs the same number of times in every epoch (true for per-batch/per-epoch logs).
        per_name: dict[str, int] = {}
        for name, _v, step, _c, _e in rows:
            if step is None:
                per_name[name] = per_name.get(name, 0) + 1
        seen: dict[str, int] = {}
        cols = self.out_rows
        now = _run._now()
        for name, v, step, ctx, e in rows:
            if step is None:
                k = seen.get(name, 0)
                seen[name] = k + 1
                step = (self.pre_steps.get(name, 0) + e * per_name[name] if e is not None else 0) + k
            cols["run_id"].append(self.owner.get(e, self.run.run_id) if e is not None else self.run.run_id)
            cols["name"].append(name)
            cols["value"].append(v)
            cols["step"].append(step)
            cols["epoch"].append(ctx[0])
            cols["batch"].append(ctx[1])
            cols["ctx"].append(ctx[2])
            cols["wall_time"].append(self.times.get((ctx[0], ctx[1])) or self.times.get((ctx[0], None)) or now)
            cols["source"].append("replay")
            cols["writer"].append(self.run.writer)
            cols["replay_id"].append(self.plan.get("replay_id"))
            if "rank" in cols:
                cols["rank"].append(self.rank)  # None: a one-process worker
        self.rows_written += len(rows)

    def write_result(self) -> None:
        if self.result_written:
            return
        self.result_written = True
        sys.settrace(None)
        for e in sorted({r[4] for r in self.new_rows}, key=lambda x: (x is None, x)):
            self._flush_new(e)
        rows_path = self.plan.get("rows_path")
        if rows_path and self.rows_written:
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pydict(self.out_rows, schema=_schema.METRICS), rows_path)
        path = self.plan.get("result_path")
        if not path:
            return
        from flightlog import _scratch

        res = {
            "segment": self.plan.get("segment"),
            "epochs_done": self.epochs_done,
            "stopped_early": self.stopped_early,
            "compared": self.compared,
            "exact": self.exact,
            "within": self.within,
            "diverged": self.diverged,
            "unmatched": self.unmatched,
            "max_abs_diff": self.max_abs,
            "first_divergence": self.first_div,
            "new_names": sorted(self.new_names),
            "rows": self.rows_written,
            "missed_vars": sorted(self.missed_vars),
            "files": _scratch.written(),
            "first_epoch_at": self.first_epoch_at,
            "worker_created_at": self.created_at,
            "last_epoch_at": self.last_epoch_at,
            "result_at": time.time(),
            "dropped_rows": self.run.dropped_rows,
            "sliced_epochs": self.sliced_epochs,
            "skipped_statements": self.skipped,
            "counters": dict(_warn.counters),
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, default=str)
        os.replace(tmp, path)
