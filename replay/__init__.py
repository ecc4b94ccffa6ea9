"""Hindsight logging: replay recorded runs with new log statements.

``flightlog.replay.run(script, run=..., epochs=..., workers=...)`` is the
Python form of ``flightlog replay``; see docs/hindsight.md.
"""
__all__ = ["run"]


def run(script, script_args=None, *, cold: bool = False, **kwargs):
    """Replay recorded run(s) with ``script``; see :func:`flightlog.replay.runner.run`.

    Workers fork from this session when it imported torch and runs no other
    thread, else from the store's warm pool (``flightlog.replay.pool``);
    ``cold=True`` starts each as a new interpreter.
    """
    from flightlog.replay import pool
    from flightlog.replay.runner import run as _run

    asked, why = kwargs.get("workers", 1), None
    if isinstance(asked, int) and asked > 1:  # split only over idle cores; the plan says why
        kwargs["workers"], why = pool.fit_workers(asked)
    from flightlog import _config

    home = _config.store_home(kwargs.get("store"))
    with pool.options(cold=cold, out=kwargs.get("out"), store=home):
        res = _run(script, script_args, **kwargs)
        if not kwargs.get("dry_run"):
            pool.note_startup(home, res.startup_s)  # for the next dry run's estimate
    if why:
        res.plan_text = (res.plan_text or "") + f"\n  workers: {why}"
    return res
