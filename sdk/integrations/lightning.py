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
            _common.refuse_replay(self.run, "Lightning")
            if stage == "fit" and self.checkpoints and self._primary:
                self._register(trainer)
        except Exception as e:
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
        if not self._resumed and self._ckpt is not None and trainer.current_epoch == 0:
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

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        r = self.run
        if r is not None:
            _common.set_ctx(r, trainer.current_epoch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        pass  # step values arrive through the logger, in this batch's context

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
        if self._ckpt is not None:
            # flightlog's policy: every epoch when affordable, else an adaptive period
            self._ckpt.on_boundary(r, LOOP, e, time.perf_counter() - self._epoch_t0, "iteration_end")
            r.rec.request_flush()

    def on_train_end(self, trainer, pl_module) -> None:
        r = self.run
        if r is None:
            return
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
