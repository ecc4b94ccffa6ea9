"""Warn once per kind, count every occurrence: how recording reports trouble.

Recording code calls :func:`problem` instead of raising. The counts are kept
per process and written into the run's row (``counters``) so that health
checks can see dropped rows and failed writes after the fact.
"""
from __future__ import annotations

import logging
import threading
import warnings
from collections import Counter

log = logging.getLogger("flightlog")

counters: Counter = Counter()
_warned: set[str] = set()
_lock = threading.Lock()


class FlightlogWarning(UserWarning):
    """Something was not recorded; training goes on."""


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


def reset() -> None:
    """Forget counts and warnings (tests, new runs)."""
    with _lock:
        counters.clear()
        _warned.clear()
