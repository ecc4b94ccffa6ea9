"""Warn once per kind, count every occurrence: how recording reports trouble.

Recording code calls :func:`problem` instead of raising. The counts belong to
the run: ``fl.init`` starts a fresh counter (:func:`begin_run`), the run's row
stores it (``counters``) so that health checks (``lost_records``) can see dropped
rows and failed writes after the fact, and a later run in the same process
starts from zero (and warns again).
"""
from __future__ import annotations

import logging
import threading
import warnings
from collections import Counter

from flightlog._errors import FlightlogWarning  # the warning tree's root, defined with the errors

log = logging.getLogger("flightlog")

counters: Counter = Counter()  # the current run's counts (since the last begin_run)
_warned: set[str] = set()
_lock = threading.Lock()


def problem(kind: str, message: str, n: int = 1) -> None:
    """Count ``n`` occurrences of ``kind``; warn the first time only."""
    with _lock:
        counters[kind] += n
        first = kind not in _warned
        _warned.add(kind)
    if first:
        try:
            warnings.warn(f"flightlog: {message} (further '{kind}' problems are counted, not shown)",
                          FlightlogWarning, stacklevel=3)
        except Exception:  # warnings configured as errors must not break training
            log.warning("flightlog: %s", message)


def begin_run() -> Counter:
    """A new run starts: a fresh counter (the previous run keeps its own) and warnings shown again."""
    global counters
    with _lock:
        counters = Counter()
        _warned.clear()
        return counters


def reset() -> None:
    """Forget counts and warnings (tests, new runs)."""
    with _lock:
        counters.clear()
        _warned.clear()
