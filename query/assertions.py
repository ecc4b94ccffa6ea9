"""Assertion reports: failure counts per assertion over time, and the items worth a look
(``flightlog assertions``: sdk/_health_cli.py).

Reads the ``assertions`` table that ``fl.check`` writes (see ``sdk/_assertions.py``):
summary rows (``item_id`` NULL, ``severity`` = items checked, ``message`` =
``{"checked", "failed", ...}``) give failure rates per epoch; failure rows give
the items.

Choosing the items (a simple form of Kang et al.'s bandit-based active
learning, BAL): each assertion is an arm. Within an arm, items are ranked by
severity normalised by that assertion's largest severity (so assertions on
different scales compete fairly), boosted by half for every other assertion
that flagged the same item. Each round takes the next item of the arm with the
best ``next item score + sqrt(2 ln t / (n_a + 1))``, where ``n_a`` is how many
items that arm has already given. The bonus of arms not yet picked grows, so
the K items spread across assertions while severe and multiply-flagged items
come first. An item taken once is not offered again by another arm.
"""
from __future__ import annotations

import math
import os

import pyarrow as pa

_TOP_SCHEMA = pa.schema([
    ("rank", pa.int64()), ("assertion", pa.string()), ("item_id", pa.string()), ("severity", pa.float64()),
    ("score", pa.float64()), ("also_flagged_by", pa.string()), ("times_flagged", pa.int64()),
    ("last_epoch", pa.int64()), ("last_batch", pa.int64()), ("message", pa.string()), ("correction", pa.string()),
])


def _per_epoch(con, rid: str) -> pa.Table:
    from flightlog.query import db

    return db.sql_arrow(con, """
        WITH s AS (
            SELECT assertion, epoch, severity AS checked,
                   CASE WHEN json_valid(message) THEN CAST(message::JSON->>'failed' AS DOUBLE) END AS failed
            FROM assertions WHERE run_id = $run AND item_id IS NULL
        )
        SELECT assertion, epoch, CAST(count(*) AS BIGINT) AS calls, CAST(sum(checked) AS BIGINT) AS checked,
               CAST(sum(failed) AS BIGINT) AS failed, round(sum(failed) / nullif(sum(checked), 0), 4) AS rate
        FROM s GROUP BY assertion, epoch ORDER BY assertion, epoch NULLS FIRST""", {"run": rid})


def _items(con, rid: str) -> list[dict]:
    from flightlog.query import db

    return db.sql_arrow(con, """
        SELECT assertion, item_id, max(severity) AS severity, CAST(count(*) AS BIGINT) AS times_flagged,
               max(epoch) AS last_epoch, arg_max(batch, time) AS last_batch,
               arg_max(message, time) AS message, arg_max(correction, time) AS correction
        FROM assertions
        WHERE run_id = $run AND item_id IS NOT NULL AND severity > 0
        GROUP BY assertion, item_id""", {"run": rid}).to_pylist()


def select_items(items: list[dict], k: int) -> list[dict]:
    """Pick ``k`` items across assertions (the BAL-like rule in the module docstring)."""
    if k <= 0 or not items:
        return []
    flagged_by: dict[str, set[str]] = {}
    top: dict[str, float] = {}
    for it in items:
        flagged_by.setdefault(it["item_id"], set()).add(it["assertion"])
        top[it["assertion"]] = max(top.get(it["assertion"], 0.0), it["severity"] or 0.0)
    arms: dict[str, list[dict]] = {}
    for it in items:
        a = it["assertion"]
        norm = (it["severity"] or 0.0) / top[a] if top[a] > 0 else 0.0
        others = flagged_by[it["item_id"]] - {a}
        it = dict(it, score=norm * (1 + 0.5 * len(others)), also_flagged_by=", ".join(sorted(others)) or None)
        arms.setdefault(a, []).append(it)
    for lst in arms.values():
        lst.sort(key=lambda x: (-x["score"], -(x["times_flagged"] or 0), str(x["item_id"])))
    taken: set[str] = set()
    pulls = {a: 0 for a in arms}
    out: list[dict] = []
    t = 0
    while len(out) < k:
        t += 1
        best, best_val = None, -math.inf
        for a in sorted(arms):
            lst = arms[a]
            while lst and lst[0]["item_id"] in taken:
                lst.pop(0)
            if not lst:
                continue
            val = lst[0]["score"] + math.sqrt(2 * math.log(t + 1) / (pulls[a] + 1))
            if val > best_val:
                best, best_val = a, val
        if best is None:
            break
        it = arms[best].pop(0)
        taken.add(it["item_id"])
        pulls[best] += 1
        out.append(dict(it, rank=len(out) + 1))
    return out


def report(run: str = "latest", *, store: str | os.PathLike | None = None, top: int = 10) -> dict[str, pa.Table]:
    """``{"run_id", "per_epoch": table, "top": table}`` for ``run``."""
    from flightlog.query import db

    con = db.connect(store)
    try:
        rid = db.resolve_run(con, run)
        per_epoch = _per_epoch(con, rid)
        chosen = select_items(_items(con, rid), top)
    finally:
        con.close()
    rows = [{f.name: it.get(f.name) for f in _TOP_SCHEMA} for it in chosen]
    for r in rows:
        r["score"] = round(r["score"], 4)
    return {"run_id": rid, "per_epoch": per_epoch, "top": pa.Table.from_pylist(rows, schema=_TOP_SCHEMA)}
