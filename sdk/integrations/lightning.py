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
  flightlog's step counters -- and the RNG states at the end of the epoch's last
  training batch, before validation. With those the checkpoint also holds the
  state where the training batches ended (validation changes no weights,
  optimizer or scheduler state), so it is recorded as ``inner_exit``: epoch-level
  replay restores it and runs only validation and the epoch-end hooks.

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
INNER = "inner_rng"  # the checkpoint object holding the RNG states where the training batches ended
RANKS = _common.RANKS  # under DDP: every rank's RNG states at the checkpoint and where the batches ended


def _validates_only_at_epoch_end(trainer) -> bool:
    """Validation (if any) runs once, after the last training batch: what an epoch-level tail reproduces."""
    if getattr(trainer, "_val_check_time_interval", None) is not None or trainer.check_val_every_n_epoch is None:
        return False
    vcb, n = trainer.val_check_batch, trainer.num_training_batches
    return vcb is None or vcb == float("inf") or vcb == n


class _InnerRNG:
    """The RNG states captured at the end of an epoch's last training batch (a checkpoint object)."""

    def __init__(self) -> None:
        self.state: dict | None = None
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return {"rng": self.state} if self.state is not None else {}

    def load_state_dict(self, sd: dict) -> None:
        self.loaded = sd.get("rng")


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
        try:  # callback states (early stopping counters, ...)
            from lightning.pytorch.trainer import call
        except ImportError:  # the standalone package
            from pytorch_lightning.trainer import call  # type: ignore[no-redef]
        call._call_callbacks_on_load_checkpoint(t, ckpt)
        call._call_callbacks_load_state_dict(t, ckpt)
        # the step counters behind self.global_step and the log_every_n_steps cadence
        fit = ckpt.get("loops", {}).get("fit_loop", {})
        el = t.fit_loop.epoch_loop
        auto = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
        prog = el.automatic_optimization.optim_progress.optimizer
        if "step" in auto:
            prog.step.total.load_state_dict(auto["step"]["total"])
        if "zero_grad" in auto:
            prog.zero_grad.total.load_state_dict(auto["zero_grad"]["total"])
        manual = fit.get("epoch_loop.manual_optimization.optim_step_progress")
        if manual:
            el.manual_optimization.optim_step_progress.total.load_state_dict(manual["total"])
        stepped = fit.get("epoch_loop.state_dict", {}).get("_batches_that_stepped")
        if stepped is not None:
            el._batches_that_stepped = stepped


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
        self._inner = _InnerRNG()
        self._ranks = _common.RankRNG()
        self._gather = False  # recording a multi-process run with checkpoints: every rank joins the gathers

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
            elif stage == "fit" and self.checkpoints:
                self._gather = trainer.world_size > 1
                if self._primary:
                    self._register(trainer)
        except Exception as e:
            if self.run is not None and _common.mode_name(self.run) == "replay":
                raise  # a replay worker that cannot follow its plan fails with the reason
            _warn.problem("integration_error", f"FlightlogCallback.setup failed: {e!r}")

    def _register(self, trainer) -> None:
        r = self.run
        mgr = r.checkpointer
        if mgr is None or not isinstance(mgr, _checkpoint.Checkpointer):
            mgr = r.mode.checkpointing(r, {}, self.every, self.overhead)
        if isinstance(mgr, _checkpoint.Checkpointer):
            mgr.objects["lightning"] = _TrainerState(trainer)
            mgr.objects[INNER] = self._inner
            if trainer.world_size > 1:
                mgr.objects[RANKS] = self._ranks
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
            _checkpoint.set_rng_state(self._resume_rng(trainer, payload))
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

    def _resume_rng(self, trainer, payload: dict) -> dict:
        """This rank's RNG states of the checkpoint resumed from (rank 0's with one process)."""
        if trainer.world_size <= 1:
            return payload["rng"]
        got = payload.get("objects", {}).get(RANKS)
        own = _common.own_rng(got[1] if got else None, "end")
        if own is None:
            _warn.problem("resume_rng", "the checkpoint holds rank 0's RNG states only: every rank continues "
                                        "with them (exact only if the ranks' RNG states were equal)")
            return payload["rng"]
        return own

    def on_train_start(self, trainer, pl_module) -> None:
        r = self.run
        if r is None:
            return
        if self._gather and trainer.current_epoch == 0:
            self._ranks.end = self._gather_rng(trainer)  # the loop-start checkpoint's, on rank 0
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
        self._inner.state = None
        if self._frame is not None:
            self._frame.index = trainer.current_epoch
        _common.set_ctx(r, trainer.current_epoch, None)
        if self._replay is not None:
            self._replay.epoch_start(trainer, trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        r = self.run
        if r is not None:
            _common.set_ctx(r, trainer.current_epoch, batch_idx)
            rp = self._replay
            if rp is not None and (rp.skipping or rp.tail):
                if rp.tail:
                    rp.run_tail(trainer, trainer.current_epoch)  # validation on the restored end-of-batches state
                    _common.set_ctx(r, trainer.current_epoch, None)
                raise StopIteration  # Lightning ends this epoch's training loop (skipped or replayed as a tail)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # step values arrive through the logger, in this batch's context. After the last batch, before
        # validation draws from the RNG (its data loader iterator does): the RNG states an epoch-level tail
        # restores. Only when validation runs once, at the epoch's end.
        if self._ckpt is None and not self._gather:
            return
        try:
            loop = trainer.fit_loop.epoch_loop
            last = bool(getattr(loop.batch_progress, "is_last_batch", False)) or \
                batch_idx + 1 == trainer.num_training_batches
            if last and _validates_only_at_epoch_end(trainer):
                if self._gather:
                    self._ranks.inner = self._gather_rng(trainer)
                if self._ckpt is not None:
                    self._inner.state = _checkpoint.rng_state()
        except Exception as e:
            _warn.problem("checkpoint_failed", f"RNG state at the end of the training batches not kept: {e!r}")

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
        if self._gather:
            self._ranks.end = self._gather_rng(trainer)
        if self._ckpt is not None:
            # flightlog's policy: every epoch when affordable, else an adaptive period. With the RNG states
            # of the end of the training batches it is also the state where they ended: inner_exit.
            pos = "inner_exit" if self._inner.state is not None else "iteration_end"
            self._ckpt.on_boundary(r, LOOP, e, time.perf_counter() - self._epoch_t0, pos)
            self._inner.state = None
            self._ranks.end = self._ranks.inner = None
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
            self._ckpt.objects.pop(INNER, None)
        if self._owns and _run.ACTIVE is r and _common.mode_name(r) != "replay":
            _run.finish()
            self.run = None

    def _gather_rng(self, trainer) -> list | None:
        try:
            return _common.gather_rng(trainer.world_size)
        except Exception as e:
            self._gather = False
            _warn.problem("checkpoint_failed", f"RNG states of the other ranks not gathered: {e!r}")
            return None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        pass  # the run's own exit hooks mark it failed/killed


class _Replay:
    """A ``flightlog replay`` worker running a Lightning script: follows the worker's plan.

    * ``full`` epochs (batch-level replay): every training batch re-executes, from
      the checkpoint of the epoch before (weights, optimizers, schedulers, callback
      states, step counters, RNG) unless the previous epoch was just re-executed.
    * ``tail`` epochs (epoch-level replay, for new statements in validation and
      epoch-end hooks): at the first batch the epoch's own checkpoint is restored
      with the RNG states of the end of its training batches, validation runs as
      Lightning runs it after the last batch, and the training loop ends there; the
      epoch-end hooks follow. Each epoch costs a checkpoint load and a validation
      pass instead of its training. A tail that is not stored (lead-in) is skipped;
      an epoch whose validation ran inside the epoch (``val_check_interval < 1``)
      re-executes in full.
    * epochs not in the plan end their training loop at the first batch; after the
      last planned epoch the worker stops.

    The step counters of recorded names come from the record (of the whole resume
    chain), at the epoch's start or, for a tail, where its training batches ended.
    """

    def __init__(self, run, trainer) -> None:
        mode = run.mode
        _common.check_replay_mode(mode, "Lightning")
        self.run, self.mode, self.trainer = run, mode, trainer
        self.inner = _InnerRNG()
        self.ranks = _common.RankRNG()
        self.world = trainer.world_size
        self.mode.checkpointing(run, {"lightning": _TrainerState(trainer), INNER: self.inner, RANKS: self.ranks})
        self.last = max(mode.actions) if mode.actions else -1
        self.emit = set(mode.emit)
        self.prev: int | None = None  # the epoch whose exact end state this process holds
        self.current: tuple[int, str] | None = None
        self.skipping = False
        self.tail = False
        self.start_counters, self.inner_counters = _common.recorded_counters(mode.store, run.run_id)

    def start(self) -> None:
        # The plan, not a callback, decides where the worker stops: early stopping re-evaluated on a
        # restored state (a tail validates again what the checkpoint's callback state already counted)
        # must not end the segment before its last epoch, where epoch_end sets should_stop.
        self.trainer.fit_loop.min_epochs = self.last + 1
        if self.mode.actions.get(0) == "full":
            self.mode._restore(-1)  # the recorded loop-start state, if any
            self._own_rng(-1, "end")
            self.prev = -1

    def epoch_start(self, trainer, e: int) -> None:
        self._complete()  # the previous epoch's epoch-level values (logged after its end hook) are in
        action = self.mode.actions.get(e)
        if action == "tail" and e not in self.emit:
            action = None  # a lead-in: the next full epoch restores this epoch's end state instead
        if action == "tail" and not _validates_only_at_epoch_end(trainer):
            action = "full"  # validation inside the epoch: a tail cannot reproduce it
        self.mode.cur_epoch = e
        self.tail = False
        trainer.should_stop = False  # as in the record: a set flag ends training there
        if action is None:
            self.skipping = True
            self.mode.cur_mode = None
            return
        self.skipping = False
        self.mode.cur_mode = "full"  # what runs of the epoch runs as recorded (no fl.loop is skipped)
        self.current = (e, action)
        if getattr(self.mode, "first_epoch_at", 0) is None:
            self.mode.first_epoch_at = time.time()
        if action == "tail":
            self.tail = True  # restored at the first batch, once Lightning has set up the epoch
            return
        if self.prev != e - 1:
            self.mode._restore(e - 1)  # model, optimizers, schedulers, RNG of the end of epoch e-1
            self._own_rng(e - 1, "end")
        _common.set_counters(self.run, self.mode.recorded_names, self.start_counters.get(e, {}))

    def run_tail(self, trainer, e: int) -> None:
        """Epoch e from where its training batches ended: restore, then validate as Lightning does."""
        from flightlog import FlightlogError

        self.tail = False
        self.mode._restore(e)
        if not self.inner.loaded:
            raise FlightlogError(f"the checkpoint of epoch {e} holds no RNG state of the end of its training "
                                 "batches: it cannot be replayed at epoch level")
        _checkpoint.set_rng_state(self.inner.loaded)
        self.inner.loaded = None
        self._own_rng(e, "inner")
        loop = trainer.fit_loop.epoch_loop
        loop._batches_that_stepped -= 1  # validation ran before Lightning counted the last batch
        _common.set_counters(self.run, self.mode.recorded_names, self.inner_counters.get(e, {}))
        if loop._should_check_val_epoch():
            try:
                from lightning.pytorch.trainer import call
            except ImportError:  # the standalone package
                from pytorch_lightning.trainer import call  # type: ignore[no-redef]
            # what _TrainingEpochLoop.on_advance_end does after the last batch
            trainer.validating = True
            first = trainer._logger_connector._first_loop_iter
            call._call_lightning_module_hook(trainer, "on_validation_model_zero_grad")
            loop.val_loop.run()
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first
        loop._batches_that_stepped += 1

    def _own_rng(self, iteration: int, which: str) -> None:
        """Under DDP: this rank's RNG states of the checkpoint just restored (it restored rank 0's)."""
        loaded, self.ranks.loaded = self.ranks.loaded, None
        if self.world <= 1 or iteration not in self.mode.ckpts:
            return
        own = _common.own_rng(loaded, which)
        if own is None:
            from flightlog import FlightlogError

            raise FlightlogError(f"the checkpoint of epoch {iteration} holds rank 0's RNG states only, not every "
                                 f"rank's ({self.world} processes): this rank cannot be replayed exactly")
        _checkpoint.set_rng_state(own)

    def epoch_end(self, trainer, e: int) -> None:
        if e >= self.last:
            trainer.should_stop = True  # the segment is done

    def _complete(self) -> None:
        if self.current is not None:
            e, action = self.current
            self.mode._epoch_done(e)
            self.prev = e if action == "full" else None  # after a tail the next epoch restores e's end state
            self.current = None

    def end(self) -> None:
        self._complete()
        self.mode.cur_epoch = None
        if not getattr(self.mode, "after_loop", False):
            import sys

            _run._end(self.run, "finished", None)
            sys.stdout.flush()
            raise SystemExit(0)
