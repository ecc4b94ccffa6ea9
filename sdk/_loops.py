"""``fl.loop``: loop position for every record, checkpoint boundaries, progress.

Each iteration sets the run's context tuple ``(epoch, batch, ctx_json)`` once,
so ``fl.log`` only appends a reference to it. The end of an iteration of the
outermost loop is where checkpoints are taken; what a loop does is decided by
the run's mode (``_modes``): record, resume (skip what the parent did, restore
its state) or replay (driven by the replay plan).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

from flightlog import _config, _run, _warn
from flightlog._record import NO_CTX

T = TypeVar("T")


class Frame:
    """One active ``fl.loop``: its name, depth, current index and timing.

    ``pyframe``/``lineno``: the Python frame that called ``fl.loop`` and the line of
    the call, where checkpoints read (and restores write) the loop-carried variables.
    """

    __slots__ = ("name", "depth", "index", "total", "t_start", "iter_start", "bar", "pyframe", "lineno")

    def __init__(self, name: str, depth: int, total: int | None, pyframe=None) -> None:
        self.name = name
        self.depth = depth
        self.index = -1
        self.total = total
        self.t_start = time.perf_counter()
        self.iter_start = self.t_start
        self.bar = None
        self.pyframe = pyframe
        self.lineno = pyframe.f_lineno if pyframe is not None else 0

    def scope(self, role: str) -> tuple:
        return (role, self.pyframe, self.lineno)


def context_tuple(frames: list[Frame]) -> tuple:
    """``(epoch, batch, json)`` for the current loop stack."""
    if not frames:
        return NO_CTX
    ctx = {f.name: f.index for f in frames}
    epoch = frames[0].index
    batch = frames[-1].index if len(frames) > 1 else None
    return (epoch, batch, json.dumps(ctx, separators=(",", ":")))


def _length(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except Exception:
        return None


def loop(name: str, iterable: Iterable[T]) -> Iterator[T]:
    """Iterate ``iterable`` while recording the loop position (and checkpointing, replaying)."""
    r = _run.ACTIVE or _run._auto_start()
    if r is None or type(name) is not str or not name:
        if r is not None:
            _warn.problem("bad_loop_name", f"loop name must be a non-empty string, got {name!r}")
        return iter(iterable)
    return r.mode.loop(r, name, iterable, sys._getframe(1))


def record_loop(r, name: str, iterable: Iterable[T], caller=None, resume_from=None) -> Iterator[T]:
    """Record mode (and a resumed run's loops): positions, checkpoints, progress.

    ``resume_from``: the checkpoint a resumed run's outermost loop continues after.
    """
    frames = r.loops
    depth = len(frames)
    frame = Frame(name, depth, _length(iterable), caller)
    outer = depth == 0
    ckpt = r.checkpointer if outer else None
    frame.bar = _Progress.maybe(frame)
    frames.append(frame)
    parent_ctx = r.ctx
    exhausted = False
    try:
        if outer and resume_from is None and ckpt is not None:
            # State before the first iteration: lets replay start at epoch 0 exactly
            # even when the script does not seed its RNGs.
            ckpt.take(name, -1, 0.0, "loop_start", [frame.scope("outer")])
        it = iter(iterable)
        i = -1
        if resume_from is not None:
            # Resumed run: skip what the parent run finished, then restore its state.
            k = resume_from.iteration
            inner_exit = resume_from.position == "inner_exit"
            skip = k if inner_exit else k + 1
            for _ in range(skip):
                try:
                    next(it)
                except StopIteration:
                    return
            i = skip - 1
            if inner_exit:
                r.mode.pending_tail = resume_from  # the first inner loop of epoch k restores it
            else:
                resume_from.restore({"outer": caller})
        while True:
            try:
                item = next(it)
            except StopIteration:
                break
            i += 1
            frame.index = i
            frame.iter_start = time.perf_counter()
            r.ctx = context_tuple(frames)
            if outer:
                r.boundary_done = False
            yield item
            # iteration end (the body ran to completion)
            r.ctx = context_tuple(frames)
            if frame.bar is not None:
                frame.bar.update(i + 1)
            if outer:
                ckpt = r.checkpointer
                if ckpt is not None and not r.boundary_done:
                    ckpt.on_boundary(r, name, i, time.perf_counter() - frame.iter_start, "iteration_end",
                                     [frame.scope("outer")])
                _maybe_snapshot_again(r)
        exhausted = True
    finally:
        if frame.bar is not None:
            frame.bar.close()
        if frames and frames[-1] is frame:
            frames.pop()
        r.ctx = parent_ctx if frames else NO_CTX
    if depth == 1 and exhausted and not r.boundary_done:
        # The first inner loop of an epoch ran to its end: checkpoint here, so that
        # epoch-level replay and resume re-run the rest of the epoch body exactly.
        r.boundary_done = True
        ckpt = r.checkpointer
        of = frames[0] if frames else None
        if ckpt is not None and of is not None:
            scopes = [of.scope("outer")]
            if caller is not None and caller is not of.pyframe:
                scopes.append(frame.scope("inner"))  # a batch loop inside a function the epoch calls
            ckpt.on_boundary(r, of.name, of.index, time.perf_counter() - of.iter_start, "inner_exit", scopes)
    frame.pyframe = None


def _maybe_snapshot_again(r) -> None:
    # Local modules imported after fl.init are in the snapshot from the first
    # iteration end on: replay needs every file the loop body ran.
    if r.snapshot_refreshed:
        return
    r.snapshot_refreshed = True
    try:
        from flightlog import _snapshot

        snap = _snapshot.take(r)
        if snap and snap != r.code_snapshot:
            r.code_snapshot = snap
            r._params_dirty = True  # rewrite the run row with the new id
    except Exception as e:
        _warn.problem("snapshot_failed", f"code snapshot failed: {e!r}")


class _Progress:
    """A one-line progress bar with rate and ETA on a terminal; nothing otherwise."""

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.last = 0.0
        self.stream = sys.stderr

    @classmethod
    def maybe(cls, frame: Frame) -> "_Progress | None":
        forced = os.environ.get(_config.ENV_PROGRESS)
        if forced == "0" or frame.total is None or frame.depth > 1:
            return None
        if forced != "1":
            try:
                if not sys.stderr.isatty():
                    return None
            except Exception:
                return None
        return cls(frame)

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < 0.1 and done < (self.frame.total or 0):
            return
        self.last = now
        f = self.frame
        el = now - f.t_start
        rate = done / el if el > 0 else 0.0
        total = f.total or 0
        eta = (total - done) / rate if rate > 0 else 0.0
        width = 24
        fill = int(width * done / total) if total else 0
        indent = "  " * f.depth
        try:
            self.stream.write(f"\r{indent}{f.name} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
                              f"{rate:.2f} it/s ETA {eta:.0f}s ")
            self.stream.flush()
        except Exception:
            pass

    def close(self) -> None:
        try:
            if self.frame.depth == 0:
                self.stream.write("\n")
            else:
                self.stream.write("\r")
            self.stream.flush()
        except Exception:
            pass
