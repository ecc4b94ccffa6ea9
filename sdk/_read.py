"""Reading from Python: ``fl.query`` and ``fl.dataframe``.

Both flush the active run first so that a script can query what it just logged.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import pyarrow as pa

from flightlog._errors import FlightlogWarning


def active_store(store=None):
    """Flush what the active run holds (metrics, step rows) and return the store to read.

    Readers in the same process then see what the script logged a moment ago;
    without an explicit ``store`` the active run's store is used. The runtime is
    looked up, not imported: a process that never loaded it has no active run
    (and reading stays below recording, tests/test_import_graph.py).
    """
    run_mod = sys.modules.get("flightlog._run")
    r = run_mod.ACTIVE if run_mod is not None else None
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


# Rows a replay wrote count only when that replay stored them by its own verdict (its `replays`
# row lists the name): a diverged or failed replay never replaces good values.
GOOD_REPLAY_ROWS = ("(m.source IS DISTINCT FROM 'replay' OR m.replay_id IS NULL OR EXISTS ("
                    "SELECT 1 FROM replays p WHERE p.replay_id = m.replay_id AND p.status = 'ok' "
                    "AND p.fidelity NOT IN ('failed') AND contains(p.new_names, '\"' || m.name || '\"')))")


class UnknownMetricWarning(FlightlogWarning):
    """fl.dataframe was asked for a metric the run never logged (its column is empty)."""


def _warn_unknown(con, rid: str, chain: list[str], names: Sequence[str]) -> None:
    import difflib
    import warnings

    known = sorted(r[0] for r in con.execute("SELECT DISTINCT name FROM metrics WHERE list_contains(?, run_id)",
                                             [chain]).fetchall())
    for n in names:
        if n not in known:
            near = difflib.get_close_matches(str(n), known, 3)
            hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else (
                f" (it logged: {', '.join(known[:10])}{', …' if len(known) > 10 else ''})" if known else
                " (it logged no metrics)")
            warnings.warn(f"fl.dataframe: run {rid} has no metric named {n!r}{hint}; its column is empty",
                          UnknownMetricWarning, stacklevel=3)


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
            _warn_unknown(con, rid, chain, names)
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
                f"FROM metrics m JOIN ch USING (run_id) WHERE name IN ({name_list}){src} AND {GOOD_REPLAY_ROWS}) "
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
