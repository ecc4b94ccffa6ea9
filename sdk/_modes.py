"""Record, resume and replay: three modes of one run, chosen once when the run starts.

A :class:`Mode` decides what ``fl.arg``, ``fl.loop``, ``fl.log`` (its slow path)
and ``fl.checkpointing`` do. The run holds exactly one (``run.mode``); no other
module checks which kind of run it is.

* :class:`RecordMode`: record params, loop positions, checkpoints.
* :class:`ResumeMode`: like record, but ``fl.arg`` returns the parent's values and
  the outermost loop skips what the parent finished, restoring its last checkpoint
  (registered objects, RNG states, step counters and loop-carried variables).
* ``ReplayMode`` (``_replay``): driven by a replay plan.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator


class Mode:
    name = "record"
    logs_slow = False  # True: fl.log goes through on_log (the hot path is off)

    def arg(self, run, name: str, default: Any) -> Any:
        from flightlog._run import _jsonable

        run.params[name] = _jsonable(default)
        run._params_dirty = True
        return default

    def loop(self, run, name: str, iterable: Iterable, caller) -> Iterator:
        from flightlog._loops import record_loop

        return record_loop(run, name, iterable, caller)

    def checkpointing(self, run, objects: dict, every, overhead):
        from flightlog._checkpoint import new_checkpointer

        return new_checkpointer(run, objects, every, overhead)

    def on_log(self, run, name: str, value: float, step: int | None) -> None:  # pragma: no cover
        """Called instead of the buffer append only by modes with ``logs_slow`` (replay); record and
        resume log through the hot path and never get here."""
        from flightlog._errors import ReplayError

        raise ReplayError("fl.log was routed to a mode that does not take values (a flightlog bug)")


class RecordMode(Mode):
    name = "record"


class ResumeMode(Mode):
    """A continuation of a crashed or killed run (see ``_resume``)."""

    name = "resume"

    def __init__(self, parent_params: dict, state) -> None:
        self.parent_params = dict(parent_params)
        self.state = state  # the checkpoint to continue after; consumed by the first outer loop
        self.pending_tail = None  # an inner_exit checkpoint the next inner loop restores

    def arg(self, run, name: str, default: Any) -> Any:
        if name in self.parent_params:
            v = self.parent_params[name]
            if isinstance(default, tuple) and isinstance(v, list):
                return tuple(v)
            return v
        return default

    def loop(self, run, name: str, iterable: Iterable, caller) -> Iterator:
        from flightlog._loops import record_loop

        if not run.loops and self.state is not None:
            state, self.state = self.state, None
            return record_loop(run, name, iterable, caller, resume_from=state)
        if len(run.loops) == 1 and self.pending_tail is not None:
            # The parent's checkpoint was taken when this inner loop ended: skip it, restore.
            state, self.pending_tail = self.pending_tail, None
            run.boundary_done = True
            state.restore({"outer": run.loops[0].pyframe, "inner": caller})
            return iter(())
        return record_loop(run, name, iterable, caller)
