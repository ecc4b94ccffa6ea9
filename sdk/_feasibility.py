"""``fl.feasibility``: the snoopy feasibility study, recorded with the run.

The estimate itself lives in ``flightlog.query.feasibility`` (pure numpy, no
store). This wrapper runs it and records the result: the convergence curve as
metrics ``feasibility/r1/<transform>`` (step = training rows) and one row per
transformation in the ``feasibility`` table, which ``flightlog show`` lists.
Bad input raises ``FeasibilityError`` (a ``ValueError``): the caller asked
for a number and must not get a wrong one. Recording, like every recording
call, never raises: a failure there is a warning and a counter.
"""
from __future__ import annotations

from typing import Any

from flightlog import _run, _warn

__all__ = ["feasibility"]


def feasibility(X: Any, y: Any, target_error: float | None = None,
                transforms: Any = ("raw", "standardize", "pca"), test_size: float = 0.2, seed: int = 0):
    """Is ``target_error`` reachable with features ``X`` and labels ``y``? (ease.ml/snoopy)

    Estimates a lower bound on the Bayes error: the exact 1-nearest-neighbour
    error R₁ on a held-out split (``test_size``: fraction or row count,
    shuffled with ``seed``) in each transformation (``"raw"``,
    ``"standardize"``, ``"pca"``, or callables ``X -> features`` such as a
    pre-trained embedding), turned into the Cover–Hart bound and minimised over
    transformations. ``verdict`` is ``feasible`` (target ≥ bound),
    ``unlikely`` (target below the bound even extrapolated to 10× the data) or
    ``undecided`` (below the bound, but the convergence curve still falls).
    Returns a ``FeasibilityResult``; ``print(result)`` shows a summary.
    """
    from flightlog.query.feasibility import estimate

    result = estimate(X, y, target_error=target_error, transforms=transforms, test_size=test_size, seed=seed)
    record(result)
    return result


def record(result: Any, input: str = "fl.feasibility") -> None:
    """Log the curve as metrics and the rows into the active run (started if needed); never raises."""
    try:
        r = _run.ACTIVE
        if r is None:
            if _run._ENDED_ONCE:
                _warn.problem("log_after_finish", "fl.feasibility called after the run finished; not recorded")
                return
            r = _run._auto_start()
            if r is None:
                return
        from flightlog.query.feasibility import to_table

        for t in result.transforms:
            for n, r1 in t.curve:
                _run.log(f"feasibility/r1/{t.name}", r1, step=int(n))
        r.rec.emit_table("feasibility", to_table(result, r.run_id, source="sdk", input=input))
        r.rec.request_flush()
    except Exception as e:  # never into the user's program
        _warn.problem("feasibility_record_error", f"fl.feasibility: recording the result failed: {e!r}")
