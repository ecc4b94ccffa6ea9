"""Hindsight logging: replay recorded runs with new log statements.

``flightlog.replay.run(script, run=..., epochs=..., workers=...)`` is the
Python form of ``flightlog replay``; see docs/hindsight.md.
"""
from __future__ import annotations


def run(script, script_args=None, **kwargs):
    """Replay recorded run(s) with ``script``; see :func:`flightlog.replay.runner.run`."""
    from flightlog.replay.runner import run as _run

    return _run(script, script_args, **kwargs)
