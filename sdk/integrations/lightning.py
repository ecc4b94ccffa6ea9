"""PyTorch Lightning: ``Trainer(callbacks=[FlightlogCallback()])``.

A ``Callback`` (not only a ``Logger``) because flightlog needs the loop hooks --
epoch and batch positions, epoch boundaries for checkpoints, the point before
training where a resumed run restores its state. Lightning hands ``self.log``
values only to loggers, so the callback attaches a small logger of its own
(``trainer.loggers``) in ``setup``; the user writes one line either way.

What is recorded:

* every value the module logs with ``self.log(..., logger=True)`` (the default):
  step values at the Trainer's ``log_every_n_steps`` cadence with ``epoch`` and
  ``batch`` set, epoch values (``on_epoch=True``, validation) with ``epoch`` set;
* hyper-parameters (``save_hyperparameters``, datamodule hparams) as run params;
* a checkpoint at the end of training epochs, with flightlog's adaptive period
  (copy + write <= 2% of loop time by default, ``every=N`` fixes it): Lightning's
  own full training state (``dump_checkpoint``: model, optimizers, schedulers,
  loop progress, callback states, precision plugin) plus the RNG states and
  flightlog's step counters.

``flightlog resume RUN -- python train.py`` continues a killed run: the callback
loads the last checkpoint into Lightning's checkpoint connector before
Lightning restores training state, and the RNG states before the first data
iterator is drawn, so the continuation computes what the uninterrupted run would have.
"""
from __future__ import annotations

import time
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers.logger import Logger
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    from pytorch_lightning.loggers.logger import Logger  # type: ignore[no-redef]

from flightlog import _checkpoint, _run, _warn
from flightlog.integrations import _common

__all__ = ["FlightlogCallback"]

LOOP = "epoch"


class _TrainerState:
    """Lightning's full training state as one object a flightlog ``Checkpointer`` can copy.

    ``state_dict`` is Lightning's checkpoint dict; ``load_state_dict`` puts back
    weights, optimizer and scheduler states (what replay needs; resume goes through
    Lightning's checkpoint connector instead, which also restores loop progress).
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict:
        return self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)

    def load_state_dict(self, ckpt: dict) -> None:
        t = self.trainer
        t.strategy.load_model_state_dict(ckpt, strict=t.lightning_module.strict_loading)
        for opt, st in zip(t.optimizers, ckpt.get("optimizer_states", [])):
            opt.load_state_dict(st)
        for cfg, st in zip(t.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
            cfg.scheduler.load_state_dict(st)


class _FlightlogLogger(Logger):
    """Receives what ``self.log`` sends to loggers and records it with ``fl.log`` semantics."""

    def __init__(self, owner: "FlightlogCallback") -> None:
        super().__init__()
        self._owner = owner

    @property
    def name(self) -> str:
        return "flightlog"

    @property
    def version(self) -> str:
        r = self._owner.run
        return r.run_id if r is not None else "none"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        r = self._owner.run
        if r is None:
            return
        try:
            if not isinstance(params, dict):
                params = dict(vars(params)) if hasattr(params, "__dict__") else {}
            _common.record_params(r, params)
        except Exception as e:
            _warn.problem("params_error", f"hyper-parameters not recorded: {e!r}")

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        r = self._owner.run
        if r is None:
            return
        for k, v in metrics.items():
            if k == "epoch":  # Lightning adds the epoch number to every dict; it is a column already
                continue
            _common.log_value(r, k, v)


class FlightlogCallback(Callback):
    """Record a Lightning run into flightlog (metrics, hyper-parameters, positions, checkpoints).

    ``project``/``name``/``store`` are ``fl.init``'s (an active run is used as is).
    ``every``/``overhead`` are ``fl.checkpointing``'s period controls;
    ``checkpoints=False`` records without checkpoints (no resume then).
    """

    def __init__(self, project: str | None = None, name: str | None = None, store: str | None = None, *,
                 every: int | None = None, overhead: float | None = None, checkpoints: bool = True) -> None:
        super().__init__()
        self.project, self.name, self.store = project, name, store
        self.every, self.overhead, self.checkpoints = every, overhead, checkpoints
        self.run = None
        self._owns = False
        self._logger = _FlightlogLogger(self)
        self._ckpt = None
        self._resumed = False
        self._epoch_t0 = 0.0
        self._frame = None
        self._primary = True
        self._replay: "_Replay | None" = None

    # -- lifecycle -------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        try:
            if self.run is None:
                self.run, self._owns = _common.start_run(self.project, self.name, self.store,
                                                         trainer.global_rank, trainer.world_size)
            if self.run is None:
                return
            self._primary = trainer.global_rank == 0
            if not any(lg is self._logger for lg in trainer.loggers):
                trainer.loggers = list(trainer.loggers) + [self._logger]
            if _common.mode_name(self.run) == "replay":
                if stage == "fit":
                    self._replay = _Replay(self.run, trainer)
            elif stage == "fit" and self.checkpoints and self._primary:
                self._register(trainer)
        except Exception as e:
            if self.run is not None and _common.mode_name(self.run) == "replay":
                raise  # a replay worker that cannot follow its plan fails with the reason
            _warn.problem("integration_error", f"FlightlogCallback.setup failed: {e!r}")

    def _register(self, trainer) -> None:
        r = self.run
        mgr = r.extra.get("checkpointer")
        if mgr is None or not isinstance(mgr, _checkpoint.Checkpointer):
            mgr = r.mode.checkpointing(r, {}, self.every, self.overhead)
        if isinstance(mgr, _checkpoint.Checkpointer):
            mgr.objects["lightning"] = _TrainerState(trainer)
            self._ckpt = mgr

    def on_fit_start(self, trainer, pl_module) -> None:
        """Resume: feed the parent's last checkpoint to Lightning's connector (it restores the rest)."""
        r = self.run
        if r is None or _common.mode_name(r) != "resume":
            return
        state = getattr(r.mode, "state", None)
        if state is None:
            return
        r.mode.state = None
        try:
            payload = _checkpoint.load(state.store, state.row["content_hash"])
            obj = payload.get("objects", {}).get("lightning")
            if obj is None or state.row.get("loop") != LOOP:
                _warn.problem("resume_unusable", "the parent's last checkpoint is not a Lightning checkpoint; "
                                                 "training starts from the beginning")
                return
            conn = trainer._checkpoint_connector
            conn._loaded_checkpoint = obj[1]
            conn.restore_model()
            conn.restore_datamodule()
            conn.restore_callbacks()
            # restore_training_state (loops, optimizers, schedulers) runs next, inside Lightning.
            # RNG states now: FitLoop.run creates the first epoch's data iterator (a draw from the
            # global RNG) before on_train_start; the sanity check in between runs under isolate_rng.
            _checkpoint.set_rng_state(payload["rng"])
            steps = dict(payload.get("steps", {}))
            try:
                steps.update(_common.parent_steps(state.store, r.parent_run_id, state.iteration))
            except Exception as e:
                _warn.problem("resume_steps", f"step counters from the checkpoint only: {e!r}")
            r.steps.clear()
            r.steps.update(steps)
            self._resumed = True
        except Exception as e:
            _warn.problem("resume_failed", f"could not restore the Lightning checkpoint: {e!r}")

    def on_train_start(self, trainer, pl_module) -> None:
        r = self.run
        if r is None:
            return
        from flightlog._loops import Frame

        total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        self._frame = Frame(LOOP, 0, total)
        if not r.loops:
            r.loops.append(self._frame)
        if self._replay is not None:
            self._replay.start()
        elif not self._resumed and self._ckpt is not None and trainer.current_epoch == 0:
            try:  # the state before the first epoch (replay of epoch 0 from its start)
                self._ckpt.take(LOOP, -1, 0.0, "loop_start")
            except Exception as e:
                _warn.problem("checkpoint_failed", f"loop-start checkpoint failed: {e!r}")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        r = self.run
        if r is None:
            return
        self._epoch_t0 = time.perf_counter()
        if self._frame is not None:
            self._frame.index = trainer.current_epoch
        _common.set_ctx(r, trainer.current_epoch, None)
        if self._replay is not None:
            self._replay.epoch_start(trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        r = self.run
        if r is not None:
            _common.set_ctx(r, trainer.current_epoch, batch_idx)
            if self._replay is not None and self._replay.skipping:
                raise StopIteration  # Lightning ends this epoch's training loop: not in the replay plan

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        pass  # step values arrive through the logger, in this batch's context

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        if self._replay is not None:
            self._replay.mode.cur_epoch = -2  # not training: its values are not replayed (never emitted)

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        if self._replay is not None:
            self._replay.mode.cur_epoch = None

    def on_validation_start(self, trainer, pl_module) -> None:
        r = self.run
        if r is not None and not trainer.sanity_checking:
            _common.set_ctx(r, trainer.current_epoch, None)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        r = self.run
        if r is None:
            return
        e = trainer.current_epoch
        _common.set_ctx(r, e, None)
        if self._replay is not None:
            self._replay.epoch_end(trainer, e)
        if self._ckpt is not None:
            # flightlog's policy: every epoch when affordable, else an adaptive period
            self._ckpt.on_boundary(r, LOOP, e, time.perf_counter() - self._epoch_t0, "iteration_end")
            r.rec.request_flush()

    def on_train_end(self, trainer, pl_module) -> None:
        r = self.run
        if r is None:
            return
        if self._replay is not None:
            self._replay.end()  # ends the worker (SystemExit) unless the plan runs the script's tail
        if self._frame is not None and r.loops and r.loops[0] is self._frame:
            r.loops.pop()
        _common.set_ctx(r, None, None)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        r = self.run
        if r is None or stage != "fit":
            return
        if self._ckpt is not None:
            try:
                self._ckpt.close()
            except Exception:
                pass
            self._ckpt.objects.pop("lightning", None)  # no reference to the trainer after fit
        if self._owns and _run.ACTIVE is r and _common.mode_name(r) != "replay":
            _run.finish()
            self.run = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        pass  # the run's own exit hooks mark it failed/killed


class _Replay:
    """A ``flightlog replay`` worker running a Lightning script: follows the worker's plan.

    Supported: epochs planned ``full`` (batch-level replay: every training batch
    re-executed, from the checkpoint of the epoch before when the previous epoch
    was not replayed) -- what the planner plans for statements inside a
    LightningModule, whose hooks the script does not call visibly. Epochs not in
    the plan end their training loop at the first batch. ``tail`` epochs
    (epoch-level replay that skips the training batches) are refused: Lightning
    runs validation only after training batches, so skipping them would skip the
    statements to replay too.
    """

    def __init__(self, run, trainer) -> None:
        mode = run.mode
        _common.check_replay_mode(mode, "Lightning")
        self.run, self.mode, self.trainer = run, mode, trainer
        self.mode.checkpointing(run, {"lightning": _TrainerState(trainer)})
        self.last = max(mode.actions) if mode.actions else -1
        self.prev: int | None = None
        self.current: int | None = None
        self.skipping = False
        self.recorded_steps: dict[int, dict[str, int]] = {}

    def start(self) -> None:
        if self.mode.actions.get(0) == "full":
            self.mode._restore(-1)  # the recorded loop-start state, if any
            self.prev = -1
        self._load_recorded_steps()

    def _load_recorded_steps(self) -> None:
        """Per epoch, each recorded name's step counter at its start (the record, not the checkpoint)."""
        from flightlog.query import db

        con = db.connect(self.mode.store)
        try:
            rows = db.sql_arrow(con, "SELECT name, epoch, max(step) + 1 AS n FROM metrics WHERE run_id = ? "
                                     "AND source = 'record' AND epoch IS NOT NULL GROUP BY name, epoch",
                                [self.run.run_id]).to_pylist()
        finally:
            con.close()
        for e in sorted({r["epoch"] for r in rows}):
            upto: dict[str, int] = {}
            for r in rows:
                if r["epoch"] <= e and r["n"] is not None:
                    upto[r["name"]] = max(upto.get(r["name"], 0), int(r["n"]))
            self.recorded_steps[e + 1] = upto

    def epoch_start(self, e: int) -> None:
        self._complete()  # the previous epoch's epoch-level values (logged after its end hook) are in
        action = self.mode.actions.get(e)
        self.mode.cur_epoch = e
        if action != "full":
            self.skipping = True
            self.mode.cur_mode = None
            return
        self.skipping = False
        if self.prev != e - 1:
            self.mode._restore(e - 1)  # model, optimizers, schedulers, RNG of the end of epoch e-1
        if e in self.recorded_steps or e == 0:
            steps = self.recorded_steps.get(e, {})
            for name in self.mode.recorded_names:
                self.run.steps[name] = steps.get(name, 0)
        self.mode.cur_mode = "full"
        self.current = e
        if getattr(self.mode, "first_epoch_at", 0) is None:
            import time as _t

            self.mode.first_epoch_at = _t.time()

    def epoch_end(self, trainer, e: int) -> None:
        if e >= self.last:
            trainer.should_stop = True  # the segment is done

    def _complete(self) -> None:
        if self.current is not None:
            self.mode._epoch_done(self.current)
            self.prev, self.current = self.current, None

    def end(self) -> None:
        self._complete()
        self.mode.cur_epoch = None
        if not getattr(self.mode, "after_loop", False):
            import sys

            _run._end(self.run, "finished", None)
            sys.stdout.flush()
            raise SystemExit(0)
