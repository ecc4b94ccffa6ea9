"""Reading from Python: ``fl.query`` and ``fl.dataframe``.

Both flush the active run first so that a script can query what it just logged.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import pyarrow as pa

from flightlog import _run


def active_store(store=None):
    """Flush what the active run holds (metrics, step rows) and return the store to read.

    Readers in the same process then see what the script logged a moment ago;
    without an explicit ``store`` the active run's store is used.
    """
    r = _run.ACTIVE
    if r is None:
        return store
    try:
        steps = sys.modules.get("flightlog._steps")
        if steps is not None:
            steps.flush()  # step rows wait in their own queue before the recorder's
        else:
            r.rec.flush()
    except Exception:
        pass
    return r.store if store is None else store


def _query(sql: str, params: Any = None, *, store: str | os.PathLike | None = None) -> pa.Table:
    """Run read-only SQL over the store; every table is a view. Returns a pyarrow Table.

    Use ``params`` (``?`` placeholders) for values, never string formatting;
    ``.to_pandas()`` on the result gives a DataFrame.
    """
    from flightlog.query import db

    store = active_store(store)
    return db.run_sql(sql, params, store=store)


def dataframe(*names: str, run: str | Sequence[str] | None = None, store: str | os.PathLike | None = None,
              source: str | None = None):
    """One row per (epoch, batch, step), one column per metric name, like ``flor.dataframe``.

    ``run`` is a run id, ``latest`` (default) or a list of ids. A resumed run
    brings its parents along, so a crash-and-resume reads as one history
    (where both logged the same position, the later run wins). Returns pandas
    when it is installed, else a pyarrow Table.
    """
    from flightlog.query import db

    store = active_store(store)
    if not names:
        raise ValueError("dataframe() needs at least one metric name")
    con = db.connect(store)
    try:
        runs = [run] if run is None or isinstance(run, str) else list(run)
        tables = []
        for r in runs:
            rid = db.resolve_run(con, r)
            chain = db.run_chain(con, rid)
            cols = ", ".join(
                f'arg_max(value, _ord) FILTER (WHERE name = ${i + 2}) AS "{n.replace(chr(34), chr(34) * 2)}"'
                for i, n in enumerate(names))
            name_list = ", ".join(f"${i + 2}" for i in range(len(names)))
            chain_vals = ", ".join(f"('{c}', {k})" for k, c in enumerate(chain))
            src = "" if source is None else f" AND source = ${len(names) + 2}"
            params = [rid, *names] + ([source] if source is not None else [])
            sql = (
                f"WITH ch(run_id, k) AS (VALUES {chain_vals}), "
                f"m AS (SELECT m.*, ch.k * 2 + (CASE WHEN source = 'replay' THEN 1 ELSE 0 END) AS _ord "
                f"FROM metrics m JOIN ch USING (run_id) WHERE name IN ({name_list}){src}) "
                f"SELECT $1 AS run_id, epoch, batch, step, {cols} FROM m "
                f"GROUP BY epoch, batch, step ORDER BY epoch NULLS FIRST, batch NULLS FIRST, step"
            )
            tables.append(db.sql_arrow(con, sql, params))
        out = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    finally:
        con.close()
    try:
        import pandas  # noqa: F401
    except ImportError:
        return out
    return out.to_pandas()
