"""Hindsight logging: replay recorded runs with new log statements.

``flightlog.replay.run(script, run=..., epochs=..., workers=...)`` is the
Python form of ``flightlog replay``; see docs/hindsight.md.
"""
from __future__ import annotations


def run(script, script_args=None, *, cold: bool = False, **kwargs):
    """Replay recorded run(s) with ``script``; see :func:`flightlog.replay.runner.run`.

    Workers fork from this session when it imported torch and runs no other
    thread, else from the store's warm pool (``flightlog.replay.pool``);
    ``cold=True`` starts each as a new interpreter.
    """
    from flightlog.replay import pool
    from flightlog.replay.runner import run as _run

    with pool.options(cold=cold, out=kwargs.get("out")):
        return _run(script, script_args, **kwargs)
