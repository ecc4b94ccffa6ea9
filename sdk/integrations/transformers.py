"""Hugging Face Transformers: ``Trainer(..., callbacks=[FlightlogCallback()])``.

A ``TrainerCallback``. What is recorded:

* every dict the Trainer logs (``on_log``: ``loss``, ``grad_norm``,
  ``learning_rate``, ``eval_*`` results, the end-of-training summary), with the
  epoch and the optimizer step within the epoch as ``epoch``/``batch``;
* the ``TrainingArguments`` (``args.to_dict()``) as run params;
* a checkpoint at each epoch boundary with flightlog's adaptive period: model,
  optimizer, scheduler, ``TrainerState`` and RNG states. It is taken when the
  next epoch begins (or training ends), i.e. after the epoch-end evaluation and
  save -- the state the Trainer's own checkpoint of that step would hold.

``flightlog resume RUN -- python train.py`` continues a killed run: the callback
writes the parent's last checkpoint as a Trainer checkpoint folder
(``pytorch_model.bin``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``) and hands it to ``Trainer.train(resume_from_checkpoint=...)``,
so the Trainer's own resume logic restores everything and continues at the next epoch.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from typing import Any

from transformers import Trainer, TrainerCallback

from flightlog import _checkpoint, _run, _warn
from flightlog.integrations import _common

__all__ = ["FlightlogCallback"]

LOOP = "epoch"


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


def write_trainer_checkpoint(payload: dict, folder: str) -> str:
    """A flightlog checkpoint payload as a folder ``Trainer.train(resume_from_checkpoint=)`` loads."""
    import torch

    objs = payload["objects"]
    os.makedirs(folder, exist_ok=True)
    torch.save(objs["model"][1], os.path.join(folder, "pytorch_model.bin"))
    if "optimizer" in objs:
        torch.save(objs["optimizer"][1], os.path.join(folder, "optimizer.pt"))
    if "scheduler" in objs:
        torch.save(objs["scheduler"][1], os.path.join(folder, "scheduler.pt"))
    rng = payload["rng"]
    st = {"python": rng["python"], "numpy": rng["numpy"], "cpu": rng["torch"]}
    if "cuda" in rng:
        st["cuda"] = rng["cuda"]
    torch.save(st, os.path.join(folder, "rng_state.pth"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as fh:
        fh.write(objs["trainer_state"][1]["json"])
    return folder


class FlightlogCallback(TrainerCallback):
    """Record a Transformers ``Trainer`` run into flightlog (logs, arguments, positions, checkpoints).

    ``project``/``name``/``store`` are ``fl.init``'s (an active run is used as is);
    ``every``/``overhead`` are ``fl.checkpointing``'s period controls;
    ``checkpoints=False`` records without checkpoints (no resume then).
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
        self._resume_dir: str | None = None

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
                from flightlog import FlightlogError

                raise FlightlogError(
                    "flightlog replay of a Transformers Trainer run is not supported: a re-executed epoch "
                    "does not reproduce the recorded losses after a restore (the Trainer's loss accumulators "
                    "and data iterator live outside its callbacks); record the new values by re-running "
                    "training, or use resume (supported, bit for bit)")
            if _common.mode_name(r) == "resume":
                self._prepare_resume(_find_trainer())
        except Exception as e:
            if self.run is not None and _common.mode_name(self.run) == "replay":
                raise  # a replay worker fails with the reason
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
        payload = _checkpoint.load(st.store, st.row["content_hash"])
        if st.row.get("loop") != LOOP or "model" not in payload.get("objects", {}) \
                or "trainer_state" not in payload["objects"]:
            _warn.problem("resume_unusable", "the parent's last checkpoint is not a Trainer checkpoint; "
                                             "training starts from the beginning")
            return
        folder = write_trainer_checkpoint(payload, tempfile.mkdtemp(prefix="flightlog-resume-"))
        self._resume_dir = folder
        r.steps.clear()
        r.steps.update(payload.get("steps", {}))
        orig = trainer.train

        @functools.wraps(orig)
        def train(resume_from_checkpoint=None, *a, **k):
            if resume_from_checkpoint is None:
                resume_from_checkpoint = folder
            return orig(resume_from_checkpoint, *a, **k)

        trainer.train = train  # this instance only: the user's trainer.train() resumes

    def on_train_begin(self, args, state, control, **kw):
        r = self.run
        if r is None:
            return
        from flightlog._loops import Frame

        total = int(args.num_train_epochs) if args.max_steps is None or args.max_steps <= 0 else None
        self._frame = Frame(LOOP, 0, total)
        if not r.loops:
            r.loops.append(self._frame)
        if self.checkpoints and self._primary and kw.get("model") is not None:
            mgr = r.extra.get("checkpointer")
            if mgr is None or not isinstance(mgr, _checkpoint.Checkpointer):
                mgr = r.mode.checkpointing(r, {}, self.every, self.overhead)
            if isinstance(mgr, _checkpoint.Checkpointer):
                mgr.objects["model"] = kw["model"]
                if kw.get("optimizer") is not None:
                    mgr.objects["optimizer"] = kw["optimizer"]
                if kw.get("lr_scheduler") is not None:
                    mgr.objects["scheduler"] = kw["lr_scheduler"]
                mgr.objects["trainer_state"] = _StateJSON(state)
                self._ckpt = mgr
                if self._resume_dir is None and state.global_step == 0:
                    self._ckpt.take(LOOP, -1, 0.0, "loop_start")

    def on_epoch_begin(self, args, state, control, **kw):
        r = self.run
        if r is None:
            return
        self._boundary(state)  # the previous epoch is complete (evaluated, saved)
        self._epoch = int(round(state.epoch or 0.0)) if state.epoch is not None else 0
        self._step_in_epoch = -1
        self._epoch_t0 = time.perf_counter()
        if self._frame is not None:
            self._frame.index = self._epoch
        _common.set_ctx(r, self._epoch, None)

    def _boundary(self, state) -> None:
        e = self._epoch
        if e is None or self._ckpt is None:
            return
        self._epoch = None
        _common.set_ctx(self.run, e, None)
        self._ckpt.on_boundary(self.run, LOOP, e, time.perf_counter() - self._epoch_t0, "iteration_end")
        self.run.rec.request_flush()

    def on_step_begin(self, args, state, control, **kw):
        r = self.run
        if r is None or self._epoch is None:
            return
        self._step_in_epoch += 1
        _common.set_ctx(r, self._epoch, self._step_in_epoch)

    def on_epoch_end(self, args, state, control, **kw):
        r = self.run
        if r is not None and self._epoch is not None:
            _common.set_ctx(r, self._epoch, None)  # epoch-end evaluation and logs

    def on_log(self, args, state, control, logs=None, **kw):
        r = self.run
        if r is None or not logs:
            return
        for k, v in logs.items():
            if k == "epoch":  # the fractional epoch: a column already
                continue
            _common.log_value(r, k, v)

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
            for k in ("model", "optimizer", "scheduler", "trainer_state"):
                self._ckpt.objects.pop(k, None)
        if self._resume_dir is not None:
            import shutil

            shutil.rmtree(self._resume_dir, ignore_errors=True)
            self._resume_dir = None

