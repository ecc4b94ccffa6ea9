"""``flightlog assertions``: failure counts per assertion over time, and the items worth a look.

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

import argparse
import json
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


def _pivot(per_epoch: pa.Table) -> pa.Table:
    """One row per epoch, one column per assertion: ``failed/checked (rate%)``."""
    names = sorted(set(per_epoch.column("assertion").to_pylist()))
    cells: dict = {}
    for r in per_epoch.to_pylist():
        rate = f" ({100 * r['rate']:.1f}%)" if r["failed"] and r["rate"] is not None else ""
        cells.setdefault(r["epoch"], {})[r["assertion"]] = f"{r['failed']}/{r['checked']}{rate}"
    epochs = sorted(cells, key=lambda e: (e is not None, e if e is not None else 0))
    cols = {"epoch": pa.array(epochs, pa.int64())}
    for n in names:
        cols[n] = pa.array([cells[e].get(n, "") for e in epochs], pa.string())
    return pa.table(cols)


def configure_assertions(p: argparse.ArgumentParser) -> None:
    from flightlog._cli_core import add_store

    p.add_argument("--run", default="latest", help="run id, unique prefix or 'latest' (default)")
    add_store(p)
    p.add_argument("--top", type=int, default=10, help="items worth a human look (default 10)")
    p.add_argument("--format", choices=("table", "json"), default="table")


def run_assertions(args: argparse.Namespace) -> int:
    from flightlog import _format

    rep = report(args.run, store=args.store, top=args.top)
    if args.format == "json":
        out = {"run_id": rep["run_id"], "per_epoch": rep["per_epoch"].to_pylist(), "top": rep["top"].to_pylist()}
        print(json.dumps(_format._clean_float(out), default=_format._json_default, indent=2))
        return 0
    print(f"assertions of run {rep['run_id']}\n\nfailed / checked items per epoch")
    print(_format.text_table(_pivot(rep["per_epoch"]), max_rows=None) if rep["per_epoch"].num_rows
          else "  (no fl.check calls recorded)")
    print(f"\nitems worth a look (top {args.top}, spread across assertions)")
    print(_format.text_table(rep["top"]) if rep["top"].num_rows else "  (no failing items)")
    return 0
