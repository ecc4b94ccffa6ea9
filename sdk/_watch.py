"""``fl.watch(model)``: the training-rule metrics the health checks read, from hooks on a torch module.

Every ``every`` training steps it records per parameter ``grad_norm/<p>``, ``weight_norm/<p>`` and
``update_ratio/<p>``, and per ReLU module ``dead_relu/<m>``; the checks vanishing_gradients,
exploding_gradients, update_ratio and dead_relu read them. Like all recording it never raises into
the training loop (a problem is a warning and a counter), and it never imports torch itself: a
torch module implies torch is imported.
"""
from __future__ import annotations

import sys
import time
import weakref
from typing import Any

from flightlog import _run, _warn

DEFAULT_WATCH_EVERY = 50
_WATCHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its Watch


class Watch:
    """Hooks on one torch module that record, every ``every`` training steps, per parameter
    ``grad_norm/<p>``, ``weight_norm/<p>``, ``update_ratio/<p>`` (|w_after - w_before| / |w_before|
    around the optimizer step) and per ReLU module ``dead_relu/<m>`` (fraction of units that
    output zero for every item of the batch).

    A training step is a forward call of the module in training mode with
    gradients enabled. Between sampled steps only one forward pre-hook runs;
    the gradient and activation hooks exist only during a sampled step.
    """

    def __init__(self, model: Any, every: int, torch: Any) -> None:
        self._model = weakref.ref(model)
        self.every = max(1, int(every))
        self.torch = torch
        self.step = -1
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.relus = [(n or "relu", m) for n, m in model.named_modules()
                      if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))]
        self._temp: list = []  # hooks that live for one sampled step
        self._pending: dict | None = None  # what a sampled step collected, logged at the next step
        self._handle = model.register_forward_pre_hook(self._pre)
        self.removed = False

    # hooks

    def _pre(self, module, args) -> None:
        try:
            t = self.torch
            if not (module.training and t.is_grad_enabled()):
                return
            self.step += 1
            if self._temp:
                for h in self._temp:
                    h.remove()
                self._temp = []
            if self._pending is not None:
                self._norms(self._pending)  # parameters that got no gradient leave it unfinished
                self._emit(self._pending, update=True)
                self._pending = None
            if self.step % self.every == 0:
                self._start_sample()
        except Exception as e:
            _warn.problem("watch_error", f"fl.watch hook failed: {e!r}")

    def _start_sample(self) -> None:
        r = _run.ACTIVE
        rec = {"step": self.step, "ctx": r.ctx if r is not None else (None, None, None),
               "grad": {}, "weight": {}, "before": {}, "dead": {}}
        self._pending = rec
        for name, p in self.params:
            hook = self._grad_hook(name, rec)
            reg = getattr(p, "register_post_accumulate_grad_hook", None)
            self._temp.append(reg(hook) if reg is not None else p.register_hook(lambda g, _h=hook, _p=p: _h(_p, g)))
        for name, m in self.relus:
            self._temp.append(m.register_forward_hook(self._relu_hook(name, rec)))

    def _grad_hook(self, name: str, rec: dict):
        n_params = len(self.params)

        def hook(p, grad=None):
            try:
                g = p.grad if grad is None else grad
                if g is None:
                    return
                seen = rec.setdefault("seen", [])
                seen.append((name, g.detach(), p))
                if len(seen) == n_params:  # the backward pass is complete: one batched computation
                    self._norms(rec)
            except Exception as e:
                _warn.problem("watch_error", f"fl.watch gradient hook failed: {e!r}")

        return hook

    def _norms(self, rec: dict) -> None:
        """Gradient and weight norms of every parameter seen, and the weights before the update."""
        seen = rec.pop("seen", None)
        if not seen:
            return
        t = self.torch
        with t.no_grad():
            grads = [g.float() for _, g, _ in seen]
            ws = [p.detach() for _, _, p in seen]
            foreach = getattr(t, "_foreach_norm", None)
            if foreach is not None:
                gn, wn = foreach(grads), foreach([w.float() for w in ws])
            else:
                gn = [t.linalg.vector_norm(g) for g in grads]
                wn = [t.linalg.vector_norm(w.float()) for w in ws]
            for (name, _, _), g, w, wt in zip(seen, gn, wn, ws):
                rec["grad"][name] = g
                rec["weight"][name] = w
                rec["before"][name] = wt.clone()

    def _relu_hook(self, name: str, rec: dict):
        t = self.torch

        def hook(module, args, out):
            try:
                if not (t.is_grad_enabled() and module.training) or not isinstance(out, t.Tensor) or out.dim() < 2:
                    return
                with t.no_grad():
                    o = out.detach()
                    alive = (o > 0).transpose(0, 1).reshape(o.shape[1], -1).any(dim=1)
                    dead = 1.0 - alive.float().mean()
                    prev = rec["dead"].get(name)  # a module used twice in forward: average its calls
                    rec["dead"][name] = dead if prev is None else (prev * 0.5 + dead * 0.5)
            except Exception as e:
                _warn.problem("watch_error", f"fl.watch ReLU hook failed: {e!r}")

        return hook

    # output

    def _emit(self, rec: dict, update: bool) -> None:
        t = self.torch
        names, vals = [], []
        with t.no_grad():
            for kind in ("grad", "weight", "dead"):
                for n, v in rec[kind].items():
                    names.append(f"{'dead_relu' if kind == 'dead' else kind + '_norm'}/{n}")
                    vals.append(v.float().reshape(()).cpu() if v.device.type != "cpu" else v.float().reshape(()))
            if update:
                current = dict(self.params)
                for n, before in rec["before"].items():
                    p = current.get(n)
                    if p is None or p.shape != before.shape:
                        continue
                    denom = t.linalg.vector_norm(before.float())
                    ratio = t.linalg.vector_norm((p.detach() - before).float()) / t.clamp(denom, min=1e-12)
                    names.append(f"update_ratio/{n}")
                    vals.append(ratio.cpu())
        if not vals:
            return
        values = t.stack(vals).tolist()  # one device sync per sampled step
        r = _run.ACTIVE
        if r is None:
            return
        step, ctx = rec["step"], rec["ctx"]
        if r.fast:
            now = time.time()
            buf = r.buf
            for n, v in zip(names, values):
                buf.append((n, v, step, now, ctx))
        else:
            for n, v in zip(names, values):
                _run.log(n, v, step=step)

    def flush(self) -> None:
        """Log what the last sampled step collected (without its update ratio)."""
        if self._pending is not None:
            try:
                self._norms(self._pending)
                self._emit(self._pending, update=False)
            except Exception as e:
                _warn.problem("watch_error", f"fl.watch flush failed: {e!r}")
            self._pending = None

    def remove(self) -> None:
        """Stop watching: remove every hook from the model."""
        self.flush()
        for h in self._temp:
            h.remove()
        self._temp = []
        self._handle.remove()
        self.removed = True
        model = self._model()
        if model is not None and _WATCHES.get(model) is self:
            del _WATCHES[model]

    def __repr__(self) -> str:
        return f"<Watch every={self.every} params={len(self.params)} relus={len(self.relus)} step={self.step}>"


def watch(model: Any, every: int = DEFAULT_WATCH_EVERY) -> Watch | None:
    """Record training-rule metrics of a torch module every ``every`` training steps.

    Call once after building the model; no change to the training loop. The
    metrics (``grad_norm/*``, ``weight_norm/*``, ``update_ratio/*``,
    ``dead_relu/*``) feed the health checks vanishing_gradients,
    exploding_gradients, update_ratio and dead_relu. Returns a handle with
    ``remove()``; None (with a warning) when ``model`` is not a torch module.
    """
    try:
        torch = sys.modules.get("torch")  # a torch module implies torch is imported: never import it here
        if torch is None or not isinstance(model, torch.nn.Module):
            _warn.problem("watch_not_torch", f"fl.watch needs a torch.nn.Module, got {type(model).__name__}")
            return None
        if type(every) is not int or every < 1:
            _warn.problem("watch_bad_every", f"fl.watch: every must be a positive int, got {every!r}; using "
                                             f"{DEFAULT_WATCH_EVERY}")
            every = DEFAULT_WATCH_EVERY
        old = _WATCHES.get(model)
        if old is not None:
            old.remove()
        w = Watch(model, every, torch)
        _WATCHES[model] = w
        r = _run.ACTIVE or _run._auto_start()
        if r is not None:
            r.finish_hooks.append(lambda run, _w=w: _w.flush())
        return w
    except Exception as e:
        _warn.problem("watch_error", f"fl.watch failed: {e!r}")
        return None
