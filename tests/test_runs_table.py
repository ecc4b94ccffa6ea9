"""The runs table's one rule for a run's row, the same in every reader.

A run writes several rows to ``runs`` (running heartbeats, a final row, annotations); readers keep
one: a final row first, then the newest ``updated_at``, then the row written last. ``query.db``
builds it once in SQL (``connect`` and ``read_runs`` both use it) and the UI's incremental index
follows the same rule; before, the Python and SQL copies broke ties differently.
"""
from __future__ import annotations

import datetime as dt
import os

import pyarrow as pa
import pyarrow.parquet as pq

from flightlog.collector import schema
from flightlog.query import db
from flightlog.ui.data import RunsIndex

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _row(run_id, status, updated_at, name, **kw) -> dict:
    r = {f.name: None for f in schema.RUNS}
    r.update(run_id=run_id, project="p", kind="train", status=status, started_at=T0, updated_at=updated_at,
             name=name, host="another-host", pid=1)
    r.update(kw)
    return r


def _plant(store, run_id: str, seq: int, rows: list[dict]) -> None:
    d = os.path.join(store, "runs", f"run_id={run_id}")
    os.makedirs(d, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.RUNS), os.path.join(d, f"part-{seq:08d}-w1.parquet"))


def _views(store) -> dict[str, list[tuple]]:
    cols = ("run_id", "status", "name", "tags")
    con = db.connect(store)
    try:
        sql = db.sql_arrow(con, "SELECT * FROM runs ORDER BY started_at NULLS LAST, run_id").to_pylist()
    finally:
        con.close()
    return {
        "connect": [tuple(r[c] for c in cols) for r in sql],
        "read_runs": [tuple(r[c] for c in cols) for r in db.read_runs(store).to_pylist()],
        "ui": [tuple(r[c] for c in cols) for r in RunsIndex(store).table().to_pylist()],
    }


def test_every_reader_keeps_the_same_row_per_run(store):
    """Equal updated_at: the row written last wins; a final row beats newer running rows; a stale running
    run reads crashed; a NULL status is not final; a row's run is its folder -- in connect(), read_runs and
    the UI alike."""
    now = dt.datetime.now(dt.timezone.utc)  # running rows this fresh are live (STALE_SECONDS)
    # two running rows with the same updated_at in two files: the later file's row
    _plant(store, "tie", 1, [_row("tie", "running", now, "first")])
    _plant(store, "tie", 2, [_row("tie", "running", now, "second")])
    # the same inside one file: the later row
    _plant(store, "tie1", 1, [_row("tie1", "running", now, "first"), _row("tie1", "running", now, "second")])
    # one final row among running rows with the same (and a newer) updated_at: the final row
    _plant(store, "fin", 1, [_row("fin", "running", now, "running-a"), _row("fin", "finished", now, "final")])
    _plant(store, "fin", 2, [_row("fin", "running", now, "running-b")])
    # a running run whose newest row is an hour old (other host, no heartbeat): crashed
    _plant(store, "stale", 1, [_row("stale", "running", now - dt.timedelta(hours=1), "stale")])
    # a newer row with no status is not final: it wins on updated_at
    _plant(store, "nul", 1, [_row("nul", "running", now - dt.timedelta(seconds=1), "running"),
                             _row("nul", None, now, "no-status")])
    # tags: the newest annotated_at; on a tie the row written last
    _plant(store, "ann", 1, [_row("ann", "finished", now, "ann", tags='["a"]', annotated_at=now)])
    _plant(store, "ann", 2, [_row("ann", "finished", T0, "ann", tags='["b"]', annotated_at=now)])
    # a row's run is the folder it is in, whatever its run_id column says (as in every SQL view)
    _plant(store, "folder", 1, [_row(None, "finished", now, "no-id"), _row("../../etc", "killed", T0, "other-id")])

    views = _views(store)
    assert views["connect"] == views["read_runs"] == views["ui"], views
    assert views["connect"] == [
        ("ann", "finished", "ann", '["b"]'),
        ("fin", "finished", "final", None),
        ("folder", "finished", "no-id", None),
        ("nul", None, "no-status", None),
        ("stale", "crashed", "stale", None),
        ("tie", "running", "second", None),
        ("tie1", "running", "second", None),
    ]
