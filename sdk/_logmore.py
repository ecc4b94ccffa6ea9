"""What people log besides one scalar: a dict of scalars (one step) and histograms.

``fl.log({"loss": l, "acc": a})`` reaches here from ``fl.log``'s slow path (the
scalar fast path only checks ``type(name) is str``). Histograms go to their own
table (``histograms``: bin edges and counts as JSON lists) because a metrics row
holds one double. Neither ever raises into the caller.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from typing import Any

from flightlog import _warn
from flightlog._record import coerce

DEFAULT_BINS = 64
MAX_BINS = 10_000


def log_dict(r, values: dict, value: Any, step: Any) -> None:
    """Log every numeric entry of ``values`` at one shared step (the run is active)."""
    if value is not None:
        # wandb.log(data, step): a second positional argument is the step
        s = coerce(value) if step is None else None
        if s is None or float(s) != int(s):
            _warn.problem("bad_args", f"fl.log(dict, {value!r}): pass the step as step=N; value ignored")
        else:
            step = int(s)
    if step is not None and type(step) is not int:
        s = coerce(step)
        if s is None or float(s) != int(s):
            _warn.problem("bad_step", f"step must be an integer, got {step!r}; using the counter")
            step = None
        else:
            step = int(s)
    items: list[tuple[str, float]] = []
    for k, v in values.items():
        if type(k) is not str or not k:
            _warn.problem("bad_name", f"metric name must be a non-empty string, got {k!r}")
            continue
        c = coerce(v)
        if c is None:
            _warn.problem("bad_value", f"fl.log({{{k!r}: ...}}): value {type(v).__name__} is not a number")
            continue
        items.append((k, c))
    if not items:
        return
    steps = r.steps
    if step is None:
        # one step for the whole dict: past every name's counter, so the names stay aligned
        step = max(steps.get(k, 0) for k, _ in items)
    for k, _ in items:
        if steps.get(k, 0) <= step:
            steps[k] = step + 1
    if r.mode.logs_slow:
        for k, c in items:
            r.mode.on_log(r, k, c, step)
        return
    now = time.time()
    ctx = r.ctx
    b = r.buf
    for k, c in items:
        b.append((k, c, step, now, ctx))


def _as_array(values: Any):
    import numpy as np

    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch tensors, on any device
        values = values.detach().float().cpu().numpy()
    a = np.asarray(values)
    if a.dtype == object or a.dtype.kind not in "biuf":
        a = np.asarray(a, dtype=np.float64)  # raises for non-numeric: the caller warns
    return a.astype(np.float64, copy=False).ravel()


def histogram_row(name: str, values: Any, bins: Any = DEFAULT_BINS) -> dict:
    """Bin ``values``: edges/counts (finite values only), count, nonfinite, min, max, mean."""
    import numpy as np

    a = _as_array(values)
    finite = np.isfinite(a)
    nonfinite = int(a.size - finite.sum())
    a = a[finite]
    if isinstance(bins, bool):
        raise ValueError("bins must be a number of bins or a sequence of edges")
    if isinstance(bins, (int, np.integer)):
        if not 1 <= int(bins) <= MAX_BINS:
            raise ValueError(f"bins must be between 1 and {MAX_BINS}, got {bins}")
        nb: Any = int(bins)
    else:
        nb = np.asarray(bins, dtype=np.float64).ravel()
        if nb.size < 2 or not np.all(np.isfinite(nb)) or np.any(np.diff(nb) <= 0):
            raise ValueError("bin edges must be at least two finite, strictly increasing numbers")
    if a.size == 0 and not isinstance(nb, np.ndarray):
        edges, counts = [], []
    else:
        cnt, e = np.histogram(a, bins=nb)
        edges, counts = e.tolist(), cnt.astype(np.int64).tolist()
    return {
        "name": name,
        "edges": json.dumps(edges),
        "counts": json.dumps(counts),
        "count": int(a.size),
        "nonfinite": nonfinite,
        "min": float(a.min()) if a.size else None,
        "max": float(a.max()) if a.size else None,
        "mean": float(a.mean()) if a.size else None,
    }


def log_histogram(name: str, values: Any, bins: Any = DEFAULT_BINS, step: int | None = None) -> None:
    """Record the distribution of ``values`` (array, list, tensor) as one row of bin edges and counts.

    ``bins`` is a number of equal-width bins over the finite values' range, or the
    edges themselves (fixed edges make steps comparable). NaN/inf are counted apart.
    Shown by ``flightlog show``; query ``histograms`` with SQL. Never raises.
    """
    try:
        from flightlog import _run

        r = _run.ACTIVE or _run._auto_start()
        if r is None:
            return
        if type(name) is not str or not name:
            _warn.problem("bad_name", f"histogram name must be a non-empty string, got {name!r}")
            return
        if r.mode.logs_slow:
            _warn.problem("histogram_in_replay", "fl.log_histogram is not stored during a replay")
            return
        if step is not None and (type(step) is not int):
            _warn.problem("bad_step", f"step must be an integer, got {step!r}; using the counter")
            step = None
        key = "histogram:" + name
        if step is None:
            step = r.steps.get(key, 0)
        r.steps[key] = max(r.steps.get(key, 0), step + 1)
        try:
            row = histogram_row(name, values, bins)
        except Exception as e:
            _warn.problem("bad_value", f"fl.log_histogram({name!r}): {e}")
            return
        ep, bt, ctx = r.ctx
        row.update(run_id=r.run_id, step=step, epoch=ep, batch=bt, ctx=ctx,
                   wall_time=_dt.datetime.now(_dt.timezone.utc), source=r.source, writer=r.writer)
        r.rec.emit("histograms", row)
    except Exception as e:  # never into the training loop
        _warn.problem("log_error", f"fl.log_histogram failed: {e!r}")
