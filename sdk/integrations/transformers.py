"""Hugging Face Transformers: ``Trainer(..., callbacks=[FlightlogCallback()])``.

A ``TrainerCallback``. What is recorded:

* every dict the Trainer logs (``on_log``: ``loss``, ``grad_norm``,
  ``learning_rate``, ``eval_*`` results), with the epoch and the optimizer step
  within the epoch as ``epoch``/``batch``; the end-of-training summary
  (``train_runtime``, ``train_loss``, ...) at run level;
* the ``TrainingArguments`` (``args.to_dict()``) as run params;
* a checkpoint at each epoch boundary, taken when the next epoch begins (or
  training ends), i.e. after the epoch-end evaluation and save. When the Trainer
  saved its own checkpoint there (``save_strategy="epoch"``) flightlog records a
  *reference* to that folder (its files' sizes and content digests) instead of a
  second copy of the state; otherwise its own checkpoint with the adaptive period:
  model, optimizer, scheduler, ``TrainerState`` and RNG states.

``flightlog resume RUN -- python train.py`` continues a killed run: the callback
hands the last usable checkpoint to ``Trainer.train(resume_from_checkpoint=...)``
-- the Trainer's own folder when it is referenced and unchanged, else flightlog's
checkpoint written out as such a folder -- so the Trainer's own resume logic
restores everything and continues at the next epoch.

``flightlog replay`` of a Trainer script (batch level, see :class:`_Replay`)
starts each segment the same way and lets the Trainer run the planned epochs.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

from transformers import Trainer, TrainerCallback

from flightlog import _checkpoint, _run, _warn
from flightlog.integrations import _common
from flightlog.integrations._trainer_folders import REF, TrainerFolder, complete_folder, start_from

__all__ = ["FlightlogCallback"]

LOOP = "epoch"

NO_TAILS = ("the Trainer's callbacks cannot skip an epoch's training steps (control.should_epoch_stop is read only "
            "after a step has run, and the epoch-end log and evaluation take the last step's grad_norm and learning "
            "rate from local variables of Trainer._run_epoch that no callback can restore); statements in epoch-level "
            "hooks of a Trainer run are replayed at batch level")


def _volatile(name: str) -> bool:
    """Timings and memory deltas the Trainer logs: never equal between two runs, so never compared in replay."""
    return name.endswith(("_runtime", "_per_second")) or "_mem_" in name


class _StateJSON:
    """The ``TrainerState`` as a checkpointable object (a JSON string)."""

    def __init__(self, state) -> None:
        self.state = state

    def state_dict(self) -> dict:
        import dataclasses

        return {"json": json.dumps(dataclasses.asdict(self.state), default=str)}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in json.loads(sd["json"]).items():
            if hasattr(self.state, k) and k not in ("stateful_callbacks",):
                try:
                    setattr(self.state, k, v)
                except Exception:
                    pass


def _find_trainer() -> "Trainer | None":
    f = sys._getframe(1)
    while f is not None:
        s = f.f_locals.get("self")
        if isinstance(s, Trainer):
            return s
        f = f.f_back
    return None


def _use_folder(trainer, folder: str, override: bool) -> None:
    """Make this Trainer's ``train()`` resume from ``folder`` (``override``: even when the script passes one)."""
    orig = trainer.train

    @functools.wraps(orig)
    def train(resume_from_checkpoint=None, *a, **k):
        if resume_from_checkpoint is None or override:
            resume_from_checkpoint = folder
        return orig(resume_from_checkpoint, *a, **k)

    trainer.train = train  # this instance only: the user's trainer.train() resumes


class FlightlogCallback(TrainerCallback):
    """Record a Transformers ``Trainer`` run into flightlog (logs, arguments, positions, checkpoints).

    ``project``/``name``/``store`` are ``fl.init``'s (an active run is used as is);
    ``every``/``overhead`` are ``fl.checkpointing``'s period controls for
    flightlog's own checkpoints (a checkpoint the Trainer saves at an epoch end is
    always referenced); ``checkpoints=False`` records without checkpoints (no
    resume or replay then).
    """

    def __init__(self, project: str | None = None, name: str | None = None, store: str | None = None, *,
                 every: int | None = None, overhead: float | None = None, checkpoints: bool = True) -> None:
        self.project, self.name, self.store = project, name, store
        self.every, self.overhead, self.checkpoints = every, overhead, checkpoints
        self.run = None
        self._owns = False
        self._ckpt = None
        self._epoch: int | None = None
        self._step_in_epoch = -1
        self._epoch_t0 = 0.0
        self._frame = None
        self._primary = True
        self._resume_tmp: str | None = None
        self._resumed = False
        self._at_epoch_end = False
        self._saved: tuple[int, str] | None = None  # (global step, folder) of the Trainer's last epoch-end save
        self._replay: "_Replay | None" = None
        self._ranks = _common.RankRNG()
        self._gather = False  # recording a multi-process run with checkpoints: every rank joins the gathers

    # -- lifecycle -------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kw):
        try:
            if self.run is None:
                self.run, self._owns = _common.start_run(self.project, self.name, self.store,
                                                         args.process_index, args.world_size)
            r = self.run
            if r is None:
                return
            self._primary = bool(state.is_world_process_zero)
            try:
                _common.record_params(r, args.to_dict())
            except Exception as e:
                _warn.problem("params_error", f"TrainingArguments not recorded: {e!r}")
            if _common.mode_name(r) == "replay":
                trainer = _find_trainer()
                if trainer is None:
                    from flightlog import FlightlogError

                    raise FlightlogError("flightlog replay: cannot find the Trainer this callback belongs to")
                self._replay = _Replay(r, trainer)
            elif _common.mode_name(r) == "resume":
                self._prepare_resume(_find_trainer())
        except Exception as e:
            if self.run is not None and _common.mode_name(self.run) == "replay":
                raise  # a replay worker that cannot follow its plan fails with the reason
            _warn.problem("integration_error", f"FlightlogCallback.on_init_end failed: {e!r}")

    def _prepare_resume(self, trainer) -> None:
        r = self.run
        st = getattr(r.mode, "state", None)
        if st is None:
            return
        r.mode.state = None
        if trainer is None:
            _warn.problem("resume_failed", "cannot find the Trainer to resume; training starts from the beginning")
            return
        cands = [(int(st.row["iteration"]), st.row["content_hash"])] if st.row.get("loop") == LOOP else []
        try:
            cands += [c for c in _common.chain_checkpoints(st.store, r.parent_run_id, LOOP) if c not in cands]
        except Exception as e:
            _warn.problem("resume_checkpoints", f"earlier checkpoints not listed: {e!r}")
        it, folder, payload, tmp = start_from(st.store, cands, None, "resume")
        if folder is None:
            _warn.problem("resume_unusable", "no checkpoint of the parent run is a usable Trainer checkpoint; "
                                             "training starts from the beginning")
            return
        if tmp:
            self._resume_tmp = folder
        r.steps.clear()
        r.steps.update(payload.get("steps", {}))
        self._resumed = True
        _use_folder(trainer, folder, override=False)

    def on_train_begin(self, args, state, control, **kw):
        r = self.run
        if r is None:
            return
        from flightlog._loops import Frame

        total = int(args.num_train_epochs) if args.max_steps is None or args.max_steps <= 0 else None
        self._frame = Frame(LOOP, 0, total)
        if not r.loops:
            r.loops.append(self._frame)
        objects = {}
        if kw.get("model") is not None:
            objects["model"] = kw["model"]
            if kw.get("optimizer") is not None:
                objects["optimizer"] = kw["optimizer"]
            if kw.get("lr_scheduler") is not None:
                objects["scheduler"] = kw["lr_scheduler"]
            objects["trainer_state"] = _StateJSON(state)
        if self._replay is not None:
            self._replay.train_begin(objects, args.world_size)
            return
        if self.checkpoints and objects and args.world_size > 1:
            self._gather = True
            if not self._resumed and state.global_step == 0:
                self._ranks.end = self._gather_rng(args.world_size)  # the loop-start checkpoint's, on rank 0
            objects[_common.RANKS] = self._ranks
        if self.checkpoints and self._primary and objects:
            mgr = r.checkpointer
            if mgr is None or not isinstance(mgr, _checkpoint.Checkpointer):
                mgr = r.mode.checkpointing(r, {}, self.every, self.overhead)
            if isinstance(mgr, _checkpoint.Checkpointer):
                mgr.objects.update(objects)
                self._ckpt = mgr
                if not self._resumed and state.global_step == 0:
                    self._ckpt.take(LOOP, -1, 0.0, "loop_start")

    def on_epoch_begin(self, args, state, control, **kw):
        r = self.run
        if r is None:
            return
        self._boundary(state)  # the previous epoch is complete (evaluated, saved)
        self._epoch = int(round(state.epoch or 0.0)) if state.epoch is not None else 0
        self._step_in_epoch = -1
        self._at_epoch_end = False
        self._epoch_t0 = time.perf_counter()
        if self._frame is not None:
            self._frame.index = self._epoch
        _common.set_ctx(r, self._epoch, None)
        if self._replay is not None:
            self._replay.epoch_begin(self._epoch)

    def _boundary(self, state) -> None:
        e = self._epoch
        if e is None or (self._ckpt is None and not self._gather):
            return
        self._epoch = None
        if self._gather:
            self._ranks.end = self._gather_rng(self._world)  # every rank takes part; rank 0 keeps them
        if self._ckpt is None:
            return
        _common.set_ctx(self.run, e, None)
        loop_s = time.perf_counter() - self._epoch_t0
        saved, self._saved = self._saved, None
        if saved is not None and saved[0] == state.global_step and complete_folder(saved[1], saved[0]):
            if self._take_reference(e, saved[1], saved[0], loop_s):
                return
        self._ckpt.on_boundary(self.run, LOOP, e, loop_s, "iteration_end")
        self.run.rec.request_flush()

    @property
    def _world(self) -> int:
        try:
            return int(os.environ.get("WORLD_SIZE") or 1)
        except ValueError:
            return 1

    def _gather_rng(self, world: int) -> "list | None":
        try:
            return _common.gather_rng(world)
        except Exception as e:
            self._gather = False
            _warn.problem("checkpoint_failed", f"RNG states of the other ranks not gathered: {e!r}")
            return None

    def _take_reference(self, e: int, folder: str, step: int, loop_s: float) -> bool:
        """Checkpoint epoch ``e`` as a reference to the folder the Trainer just saved (no second copy)."""
        mgr = self._ckpt
        objects = mgr.objects
        mgr.objects = {REF: TrainerFolder(folder, step)}
        try:
            mgr.take(LOOP, e, mgr.since_ms + loop_s * 1000.0, "iteration_end")
            mgr.since_ms = 0.0
        except Exception as e2:
            _warn.problem("checkpoint_failed", f"reference to {folder} not recorded: {e2!r}")
            return False
        finally:
            mgr.objects = objects
        self.run.rec.request_flush()
        return True

    def on_step_begin(self, args, state, control, **kw):
        r = self.run
        if r is None or self._epoch is None:
            return
        self._step_in_epoch += 1
        self._at_epoch_end = False
        _common.set_ctx(r, self._epoch, self._step_in_epoch)

    def on_step_end(self, args, state, control, **kw):
        if self._replay is not None:
            control.should_save = False  # a replay never writes checkpoint folders

    def on_epoch_end(self, args, state, control, **kw):
        r = self.run
        if r is not None and self._epoch is not None:
            _common.set_ctx(r, self._epoch, None)  # epoch-end evaluation and logs
            self._at_epoch_end = True
        if self._replay is not None:
            control.should_save = False
            if self._epoch is not None and self._replay.epoch_end(self._epoch):
                control.should_training_stop = True  # the segment is done

    def on_save(self, args, state, control, **kw):
        # A save at the epoch end (after its evaluation) holds the state of the boundary checkpoint;
        # one made at a step (before the epoch-end evaluation, which draws from the RNG) does not.
        if self._ckpt is not None and self._at_epoch_end:
            self._saved = (state.global_step, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_log(self, args, state, control, logs=None, **kw):
        r = self.run
        if r is None or not logs:
            return
        summary = "train_runtime" in logs  # the end-of-training summary: run level
        if self._replay is not None and summary:
            return  # a segment's summary covers its own steps only: not comparable with the record
        saved = r.ctx
        if summary:
            _common.set_ctx(r, None, None)
        try:
            for k, v in logs.items():
                if k == "epoch":  # the fractional epoch: a column already
                    continue
                if self._replay is not None and _volatile(k):
                    continue
                _common.log_value(r, k, v)
        finally:
            r.ctx = saved

    def on_train_end(self, args, state, control, **kw):
        r = self.run
        if r is None:
            return
        self._boundary(state)
        if self._frame is not None and r.loops and r.loops[0] is self._frame:
            r.loops.pop()
        _common.set_ctx(r, None, None)
        if self._ckpt is not None:
            try:
                self._ckpt.close()
            except Exception:
                pass
            for k in ("model", "optimizer", "scheduler", "trainer_state", _common.RANKS):
                self._ckpt.objects.pop(k, None)
        if self._resume_tmp is not None:
            import shutil

            shutil.rmtree(self._resume_tmp, ignore_errors=True)
            self._resume_tmp = None
        if self._replay is not None:
            self._replay.end()  # ends the worker (SystemExit) unless the plan runs the script's tail


class _Replay:
    """A ``flightlog replay`` worker running a Trainer script: follows the worker's plan at batch level.

    The segment starts from the checkpoint before its first planned epoch: the
    Trainer's own folder when it is referenced and every file's digest still
    matches, else flightlog's checkpoint written out as a Trainer folder; a
    checkpoint that fails is refused with a warning and an earlier one is used
    (the epochs in between re-execute, their new values not stored). The folder
    goes to ``Trainer.train(resume_from_checkpoint=...)``, so the Trainer's own
    resume logic restores weights, optimizer, scheduler, ``TrainerState`` (loss
    bookkeeping, global step) and RNG, skips the epochs before, and re-executes
    the planned ones; at the end of the last one training stops. From epoch 0 the
    run's loop-start checkpoint is restored in ``on_train_begin``. Re-executed
    values of recorded names are compared with the record (timings, memory
    deltas and the end-of-training summary excepted); new names are stored. The
    Trainer's saves are switched off in the worker (``control.should_save``).
    Epoch-level plans (skipping an epoch's steps) are refused: see ``NO_TAILS``.
    """

    def __init__(self, run, trainer) -> None:
        mode = run.mode
        _common.check_replay_mode(mode, "Transformers", NO_TAILS)
        self.run, self.mode, self.trainer = run, mode, trainer
        self.first = min(mode.actions) if mode.actions else 0
        self.last = max(mode.actions) if mode.actions else -1
        self.start_counters, _inner = _common.recorded_counters(mode.store, run.run_id)
        self.current: int | None = None
        self.folder: str | None = None
        if self.first > 0:
            cands = sorted(((k, c["content_hash"]) for k, c in mode.ckpts.items() if 0 <= k < self.first),
                           reverse=True)
            it, folder, _payload, _tmp = start_from(mode.store, cands, mode.plan.get("tmp") or None, "replay")
            if folder is not None:
                self.folder = folder
                _use_folder(trainer, folder, override=True)
            elif it < 0 and cands:
                _warn.problem("replay_from_start", f"no usable checkpoint before epoch {self.first}: "
                                                   "re-executing from the start of training")

    def train_begin(self, objects: dict, world: int = 1) -> None:
        ranks = _common.RankRNG()
        self.mode.checkpointing(self.run, dict(objects, **{_common.RANKS: ranks}))
        if self.folder is None and -1 in self.mode.ckpts:
            self.mode._restore(-1)  # the recorded state at the start of training (unseeded RNGs, weights)
            if world > 1:  # it restored rank 0's RNG states: this rank's own
                own = _common.own_rng(ranks.loaded, "end")
                if own is None:
                    from flightlog import FlightlogError

                    raise FlightlogError(f"the loop-start checkpoint holds rank 0's RNG states only, not every "
                                         f"rank's ({world} processes): this rank cannot be replayed exactly")
                _checkpoint.set_rng_state(own)

    def epoch_begin(self, e: int) -> None:
        self._complete()
        m = self.mode
        m.cur_epoch, m.cur_mode = e, "full"  # epochs before the plan are lead-in: compared, not stored
        _common.set_counters(self.run, m.recorded_names, self.start_counters.get(e, {}))
        self.current = e
        if e in m.actions and getattr(m, "first_epoch_at", 0) is None:
            m.first_epoch_at = time.time()

    def epoch_end(self, e: int) -> bool:
        """True when training must stop after this epoch (its evaluation still runs)."""
        return e >= self.last

    def _complete(self) -> None:
        if self.current is not None:
            self.mode._epoch_done(self.current)
            self.current = None

    def end(self) -> None:
        self._complete()
        self.mode.cur_epoch = None
        if not getattr(self.mode, "after_loop", False):
            _run._end(self.run, "finished", None)
            sys.stdout.flush()
            raise SystemExit(0)
