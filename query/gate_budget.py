"""A test set's budget for ``flightlog gate``: the ``gates`` rows of earlier evaluations.

Each evaluation is recorded as one row of the ``gates`` table, written with the
store's atomic part writer under the candidate run's partition
(``gates/run_id=<candidate>/``). Rows of one test set and condition make its
budget: ``step`` is the evaluation's 1-based index. Reading the budget,
deciding and recording happen under one lock per store (:func:`budget_lock`),
so concurrent gates never both take the last use. The statistics are in
:mod:`flightlog.query.gate`; the command in sdk/_gate_cli.py.
"""
from __future__ import annotations

import contextlib
import os

import pyarrow as pa

from flightlog._errors import StoreError

__all__ = ["budget_lock", "history", "spent", "record"]


@contextlib.contextmanager
def budget_lock(root: str):
    """Serialise read-budget → evaluate → record across concurrent gates on one store."""
    import fcntl

    d = os.path.join(root, "gates")
    try:
        os.makedirs(d, exist_ok=True)
        fh = open(os.path.join(d, ".lock"), "a")
    except OSError as e:
        raise StoreError(f"cannot record the evaluation in {d} ({e.strerror or e}); the gate needs a writable "
                         "store to keep the test set's budget") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def history(con, testset: str, condition: str) -> list[str]:
    """Results of earlier evaluations on (testset, condition), oldest first."""
    rows = con.execute("SELECT result FROM gates WHERE testset = ? AND condition = ? ORDER BY step, time",
                       [testset, condition]).fetchall()
    return [r[0] for r in rows]


def spent(history: list[str], adaptivity: str, steps: int) -> str | None:
    """Why the test set may not be used again for this condition (None when it may)."""
    if len(history) >= steps:
        return (f"its budget of {steps} evaluation(s) is spent ({len(history)} recorded); "
                "the guarantee only covers --steps uses")
    if adaptivity == "firstChange":
        decided = [h for h in history if h in ("pass", "fail")]
        if decided and any(h != decided[0] for h in decided[1:]):
            return (f"under firstChange a test set retires when its result first changes "
                    f"(it went from {decided[0]} to {'fail' if decided[0] == 'pass' else 'pass'})")
    return None


def record(root: str, row: dict) -> None:
    """Write the row with the store's atomic part writer, under the candidate run's partition."""
    from flightlog.collector import schema, store

    t = pa.Table.from_pylist([row], schema=schema.GATES)
    try:
        store.LocalSink(root).write("gates", t)
    except OSError as e:
        raise StoreError(f"cannot record the evaluation in {root}/gates ({e.strerror or e}); the gate needs a "
                         "writable store to keep the test set's budget (no result is given unrecorded)") from None
