"""Model assertions (Kang et al., MLSys 2020): ``@fl.assertion`` and ``fl.check``.

An assertion is a function ``(inputs, outputs) -> severity`` over a batch: a
bool (True passes), a number (0 passes) or an array with one entry per item;
built-ins may return :class:`Result` to add messages and weak-label
corrections. ``fl.check`` runs the registered assertions on a batch and records
into the ``assertions`` table, linked to the run, the current step span and the
``fl.loop`` position:

* one **summary row** per assertion per call: ``item_id`` NULL, ``severity`` =
  items checked, ``message`` = ``{"checked": n, "failed": k, "max_severity": s}``
  (failure *rates* are ``sum(failed) / sum(severity)`` over summary rows);
* one **failure row** per failing item (at most ``MAX_ITEM_ROWS`` per assertion
  per call, the most severe first): ``item_id``, ``severity`` > 0, ``message``,
  ``correction`` (JSON, e.g. the majority value a consistency assertion offers).

Like all recording, ``fl.check`` never raises into the training loop, with one
deliberate exception: ``mode="raise"`` raises :class:`AssertionFailed` when an
item fails. (``fl.watch``, the training-rule metrics from a torch model, is ``_watch.py``.)
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections import Counter, deque
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from flightlog import _run, _warn
from flightlog._errors import AssertionFailed, FlightlogWarning  # AssertionFailed: fl.check(mode="raise")

MAX_ITEM_ROWS = 1000  # failure rows kept per assertion per call (the summary row counts them all)
MODES = ("record", "warn", "raise")


class AssertionWarning(FlightlogWarning):
    """``fl.check(..., mode="warn")`` found failing items."""


class Result(NamedTuple):
    """What an assertion may return instead of bare severities."""

    severity: Any  # bool / number / array, as for plain assertions
    message: Any = None  # one string, or one per item
    correction: Any = None  # None, or one JSON-able value (or None) per item


class Assertion:
    """A named assertion function; calling it evaluates it on a batch."""

    def __init__(self, fn: Callable, name: str, builtin: bool = False) -> None:
        self.fn = fn
        self.name = name
        self.builtin = builtin

    def __call__(self, inputs: Any, outputs: Any) -> Any:
        return self.fn(inputs, outputs)

    def __repr__(self) -> str:
        return f"<assertion {self.name}>"


_REGISTRY: dict[str, Assertion] = {}


class AssertionOutcome(NamedTuple):
    """One assertion's verdict on one batch."""

    name: str
    checked: int
    failed: int
    max_severity: float
    failed_items: list  # (item_id, severity), most severe first


class Outcome(dict):
    """``fl.check``'s return value: assertion name -> :class:`AssertionOutcome`; ``ok`` when nothing failed."""

    @property
    def ok(self) -> bool:
        return all(o.failed == 0 for o in self.values())

    @property
    def failed(self) -> int:
        return sum(o.failed for o in self.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{o.name}: {o.failed}/{o.checked} failed" for o in self.values())
        return f"<Outcome ok={self.ok} {parts}>"


# -- turning results into per-item severities ------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    detach = getattr(x, "detach", None)
    if detach is not None:  # a torch tensor; never import torch ourselves
        return detach().cpu().numpy()
    return np.asarray(x)


def severities(raw: Any) -> tuple[np.ndarray, bool]:
    """Per-item float severities (0 = pass) and whether the result was one verdict for the batch."""
    if isinstance(raw, Result):
        raw = raw.severity
    if isinstance(raw, (bool, np.bool_)):
        return np.array([0.0 if raw else 1.0]), True
    if isinstance(raw, (int, float, np.integer, np.floating)):
        return np.array([_sev(float(raw))]), True
    a = _to_numpy(raw)
    if a.ndim == 0:
        return severities(a.item())
    if a.dtype.kind == "b":
        a = ~a
        if a.ndim > 1:
            a = _rows(a, np.logical_or)
        return a.astype(np.float64), False
    a = a.astype(np.float64, copy=False)
    if a.ndim > 1:
        a = _rows(a, np.maximum)  # NaN anywhere in a row propagates
    nan = np.isnan(a)
    if nan.any():
        a = np.where(nan, 1.0, a)  # an undecidable item counts as a failure of severity 1
    a = np.maximum(a, 0.0)
    return (np.minimum(a, 1e300) if np.isinf(a).any() else a), False


def _rows(a: np.ndarray, op) -> np.ndarray:
    """Reduce every trailing dimension per item; fast for the common few-columns case."""
    m = a.reshape(a.shape[0], -1)
    if m.shape[1] > 32:
        return op.reduce(m, axis=1)
    return op.reduce(np.ascontiguousarray(m.T), axis=0)  # numpy reduces short rows slowly


def _sev(v: float) -> float:
    if math.isnan(v):
        return 1.0
    return 1e300 if math.isinf(v) and v > 0 else max(v, 0.0)


# -- the decorator and the built-ins ----------------------------------------------------------


def _register(a: Assertion) -> Assertion:
    _REGISTRY[a.name] = a
    return a


class _AssertionAPI:
    """``fl.assertion``: a decorator that registers an assertion, plus the built-in assertions.

    ``@fl.assertion`` or ``@fl.assertion(name="...")`` on a function
    ``(inputs, outputs) -> bool | float | array``; ``fl.assertion.finite()``,
    ``.range(low, high)``, ``.consistency(attrs, key=...)``, ``.flicker(key=...)``
    register built-ins. ``fl.check`` runs every registered assertion unless told which.
    """

    def __call__(self, fn: Callable | None = None, *, name: str | None = None):
        def deco(f: Callable) -> Assertion:
            if not callable(f):
                raise TypeError(f"fl.assertion needs a function, got {type(f).__name__}")
            n = name or getattr(f, "__name__", None) or "assertion"
            return _register(Assertion(f, str(n)))

        return deco(fn) if fn is not None else deco

    # built-ins

    def finite(self, name: str = "finite") -> Assertion:
        """Items whose outputs hold NaN or infinity fail (severity 1)."""

        def finite(inputs, outputs):
            a = _to_numpy(_values(outputs)).astype(np.float64, copy=False)
            if a.ndim == 0:
                return bool(np.isfinite(a))
            ok = _rows(np.isfinite(a), np.logical_and)
            return Result(ok, message="non-finite output")

        return _register(Assertion(finite, name, builtin=True))

    def range(self, low: float | None = None, high: float | None = None, name: str = "range") -> Assertion:
        """Items with outputs outside ``[low, high]`` fail; severity is how far outside."""
        lo = -math.inf if low is None else float(low)
        hi = math.inf if high is None else float(high)
        if lo > hi:
            raise ValueError(f"fl.assertion.range: low {low} is above high {high}")

        def value_range(inputs, outputs):
            a = _to_numpy(_values(outputs)).astype(np.float64, copy=False)
            out = np.fmax(np.fmax(lo - a, a - hi), 0.0)
            out = np.where(np.isnan(a), 1.0, out)
            return Result(out, message=f"outside [{lo:g}, {hi:g}]")

        return _register(Assertion(value_range, name, builtin=True))

    def consistency(self, attrs: str | Sequence[str], key: str | None = None,
                    name: str = "consistency") -> Assertion:
        """Items sharing an identifier must agree on ``attrs`` (Kang et al.'s consistency assertion).

        The identifier is the ``key`` column of the outputs (or ``fl.check``'s
        ``ids``). An item that disagrees with the majority of its identifier's
        items fails with severity = number of disagreeing attributes, and the
        majority values are offered as a weak-label ``correction``.
        """
        attr_list = [attrs] if isinstance(attrs, str) else list(attrs)
        if not attr_list:
            raise ValueError("fl.assertion.consistency needs at least one attribute")

        def consistency(inputs, outputs, _ids=None):
            cols = _columns(outputs)
            keys = cols.get(key) if key is not None else _ids
            if keys is None:
                raise ValueError(f"consistency: outputs have no column {key!r} and no ids were given")
            keys = [_hashable(k) for k in keys]
            n = len(keys)
            sev = np.zeros(n)
            corr: list = [None] * n
            msg: list = [None] * n
            groups: dict[Any, list[int]] = {}
            for i, k in enumerate(keys):
                groups.setdefault(k, []).append(i)
            values = {a: [_hashable(v) for v in cols[a]] for a in attr_list}
            for k, idx in groups.items():
                if len(idx) < 2:
                    continue
                for a in attr_list:
                    vals = [values[a][i] for i in idx]
                    major, count = Counter(vals).most_common(1)[0]
                    if count == len(vals):
                        continue
                    for i, v in zip(idx, vals):
                        if v != major:
                            sev[i] += 1
                            c = corr[i] or {}
                            c[a] = major
                            corr[i] = c
                            msg[i] = f"id {k!r}: {a}={v!r}, but {count} of {len(idx)} say {major!r}"
            return Result(sev, message=msg, correction=corr)

        consistency.wants_ids = True  # type: ignore[attr-defined]
        return _register(Assertion(consistency, name, builtin=True))

    def flicker(self, key: str | None = None, window: int = 3, frame: str | None = None,
                name: str = "flicker") -> Assertion:
        """An identifier that appears, disappears and reappears within ``window`` frames fails.

        Frames are the ``frame`` column of the outputs when given (evaluated
        within the batch), else successive ``fl.check`` calls (the assertion
        remembers the last ``window + 1`` calls). The reappearing item fails
        with severity = frames it was missing; the correction lists them.
        """
        if int(window) < 1:
            raise ValueError("fl.assertion.flicker: window must be at least 1")
        history: deque = deque(maxlen=int(window) + 1)
        state = {"frame": 0, "run": None}

        def judge(frames_ids: list[tuple[int, list]], past: Iterable[tuple[int, set]]) -> dict:
            seen = deque(past, maxlen=int(window) + 1)
            verdict = {}
            for f, ids in frames_ids:
                for pos, i in enumerate(ids):
                    last = next((pf for pf, s in reversed(seen) if i in s), None)
                    if last is not None and 1 <= f - last - 1 <= window:
                        verdict[(f, pos)] = list(range(last + 1, f))
                seen.append((f, set(ids)))
            return verdict

        def flicker(inputs, outputs, _ids=None):
            cols = _columns(outputs) if (key is not None or frame is not None) else {}
            keys = cols.get(key) if key is not None else _ids
            if keys is None:
                raise ValueError(f"flicker: outputs have no column {key!r} and no ids were given")
            keys = [_hashable(k) for k in keys]
            n = len(keys)
            sev, corr = np.zeros(n), [None] * n
            if frame is not None:
                fr = list(cols[frame])
                order = sorted(set(fr))
                rank = {v: j for j, v in enumerate(order)}
                per: dict[int, list[int]] = {}
                for i, v in enumerate(fr):
                    per.setdefault(rank[v], []).append(i)
                frames_ids = [(f, [keys[i] for i in per[f]]) for f in sorted(per)]
                verdict = judge(frames_ids, ())
                for (f, pos), missing in verdict.items():
                    i = per[f][pos]
                    sev[i] = len(missing)
                    corr[i] = {"missing_frames": [order[m] for m in missing]}
            else:
                rid = getattr(_run.ACTIVE, "run_id", None)
                if rid != state["run"]:
                    history.clear()
                    state["run"], state["frame"] = rid, 0
                f = state["frame"]
                verdict = judge([(f, keys)], list(history))
                for (_, pos), missing in verdict.items():
                    sev[pos] = len(missing)
                    corr[pos] = {"missing_frames": missing}
                history.append((f, set(keys)))
                state["frame"] = f + 1
            return Result(sev, message="disappeared and reappeared", correction=corr)

        flicker.wants_ids = True  # type: ignore[attr-defined]
        return _register(Assertion(flicker, name, builtin=True))

    # registry

    def registered(self) -> list[str]:
        """Names of the registered assertions, in registration order."""
        return list(_REGISTRY)

    def remove(self, name: str) -> None:
        _REGISTRY.pop(name, None)

    def clear(self) -> None:
        """Forget every registered assertion (tests, notebooks)."""
        _REGISTRY.clear()


assertion = _AssertionAPI()


def _values(outputs: Any) -> Any:
    """Numeric outputs as an array: columns of a table are stacked as one item per row."""
    if isinstance(outputs, dict) or hasattr(outputs, "columns"):
        cols = _columns(outputs)
        return np.column_stack([np.asarray(v, dtype=np.float64) for v in cols.values()]) if cols else np.zeros(0)
    return outputs


def _columns(outputs: Any) -> dict[str, Any]:
    """Column name -> sequence, for a dict of columns, a list of dicts, or a pandas/pyarrow table."""
    if isinstance(outputs, dict):
        return outputs
    if isinstance(outputs, (list, tuple)) and outputs and isinstance(outputs[0], dict):
        names = list(dict.fromkeys(k for row in outputs for k in row))
        return {k: [row.get(k) for row in outputs] for k in names}
    to_pydict = getattr(outputs, "to_pydict", None)  # pyarrow
    if to_pydict is not None:
        return to_pydict()
    if hasattr(outputs, "columns") and hasattr(outputs, "__getitem__"):  # pandas
        return {str(c): list(outputs[c]) for c in outputs.columns}
    raise TypeError(f"expected columns (dict, list of dicts, DataFrame), got {type(outputs).__name__}")


def _hashable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, np.ndarray)):
        return tuple(np.asarray(v).tolist())
    return v


# -- fl.check ----------------------------------------------------------------------------------


def _span_id() -> str | None:
    steps = sys.modules.get("flightlog._steps")
    if steps is not None:
        try:
            sid = steps.current_span_id()
            if sid:
                return sid
        except Exception:
            pass
    tr = sys.modules.get("opentelemetry.trace")
    if tr is not None:
        try:
            ctx = tr.get_current_span().get_span_context()
            if ctx.is_valid:
                return "%016x" % ctx.span_id
        except Exception:
            pass
    return None


def _per_item(v: Any, n: int, i: int) -> Any:
    if isinstance(v, (list, tuple, np.ndarray)) and len(v) == n:
        return v[i]
    return v


def _jsonish(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, default=str)
    except (TypeError, ValueError):
        return str(v)


def _evaluate(a: Assertion, inputs: Any, outputs: Any, ids: Any) -> tuple[np.ndarray, bool, Any]:
    if getattr(a.fn, "wants_ids", False):
        raw = a.fn(inputs, outputs, _ids=None if ids is None else list(ids))
    else:
        raw = a.fn(inputs, outputs)
    sev, whole = severities(raw)
    return sev, whole, raw


def check(outputs: Any, inputs: Any = None, ids: Sequence | None = None, *,
          names: Sequence[str | Assertion] | None = None, mode: str = "record") -> Outcome:
    """Run the registered assertions (or ``names``) on a batch and record per-item failures.

    ``ids`` identifies the items (default: their position in the batch).
    ``mode``: ``record`` (default) records only; ``warn`` also warns
    (:class:`AssertionWarning`); ``raise`` also raises :class:`AssertionFailed`.
    Returns an :class:`Outcome`; never raises otherwise.
    """
    outcome = Outcome()
    try:
        if mode not in MODES:
            _warn.problem("bad_check_mode", f"fl.check: mode must be one of {MODES}, got {mode!r}; recording only")
            mode = "record"
        if names is None:
            chosen = list(_REGISTRY.values())
        else:
            chosen = []
            for n in ([names] if isinstance(names, (str, Assertion)) else names):
                a = n if isinstance(n, Assertion) else _REGISTRY.get(n)
                if a is None:
                    _warn.problem("unknown_assertion", f"fl.check: no assertion named {n!r} is registered")
                else:
                    chosen.append(a)
        if not chosen:
            _warn.problem("no_assertions", "fl.check: no assertions registered (use @fl.assertion)")
            return outcome
        r = _run.ACTIVE or _run._auto_start()
        ctx = r.ctx if r is not None else (None, None, None)
        span = _span_id() if r is not None else None
        now = time.time()
        id_list = None if ids is None else list(ids)
        for a in chosen:
            try:
                sev, whole, raw = _evaluate(a, inputs, outputs, id_list)
            except Exception as e:
                _warn.problem(f"assertion_error:{a.name}", f"assertion {a.name!r} raised {e!r}; skipped")
                continue
            n = len(sev)
            bad = np.flatnonzero(sev > 0)
            if len(bad) > 1:
                bad = bad[np.argsort(-sev[bad], kind="stable")]
            if whole:
                item_ids = ["batch"]
            elif id_list is not None and len(id_list) == n:
                item_ids = id_list
            else:
                item_ids = None
            failed_items = [(str(item_ids[i]) if item_ids else str(i), float(sev[i])) for i in bad[:MAX_ITEM_ROWS]]
            max_sev = float(sev[bad[0]]) if len(bad) else 0.0
            outcome[a.name] = AssertionOutcome(a.name, n, len(bad), max_sev, failed_items)
            if r is not None:
                _record(r, a.name, raw, n, bad, failed_items, max_sev, ctx, span, now)
        if mode != "record" and not outcome.ok:
            text = "; ".join(f"{o.name}: {o.failed} of {o.checked} items failed" +
                             (f" (first: {', '.join(i for i, _ in o.failed_items[:3])})" if o.failed_items else "")
                             for o in outcome.values() if o.failed)
            if mode == "warn":
                try:
                    warnings.warn(f"flightlog: model assertions failed: {text}", AssertionWarning, stacklevel=2)
                except AssertionWarning:
                    raise
                except Exception:
                    pass
            else:
                raise AssertionFailed(f"model assertions failed: {text}", outcome)
    except (AssertionFailed, AssertionWarning):
        raise
    except Exception as e:  # never into the training loop
        _warn.problem("check_error", f"fl.check failed: {e!r}")
    return outcome


def _record(r, name: str, raw: Any, n: int, bad: np.ndarray, failed_items: list, max_sev: float,
            ctx: tuple, span: str | None, now: float) -> None:
    import datetime as _dt

    ts = _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
    epoch, batch, ctx_json = ctx
    base = {"run_id": r.run_id, "span_id": span, "assertion": name, "epoch": epoch, "batch": batch,
            "ctx": ctx_json, "time": ts}
    summary = dict(base, item_id=None, severity=float(n),
                   message=json.dumps({"checked": n, "failed": int(len(bad)), "max_severity": max_sev}),
                   correction=None)
    r.rec.emit("assertions", summary)
    if not failed_items:
        return
    msg = raw.message if isinstance(raw, Result) else None
    corr = raw.correction if isinstance(raw, Result) else None
    for i, (item, s) in zip(bad, failed_items):
        r.rec.emit("assertions", dict(base, item_id=item, severity=s,
                                      message=_jsonish(_per_item(msg, n, int(i))),
                                      correction=_jsonish(_per_item(corr, n, int(i)))))
