"""Lineage over ``io`` fingerprints: the walk behind ``flightlog lineage`` / ``history`` (sdk/_lineage_cli.py).

An output fingerprint of one step call that appears as an input of a later
call is an edge, across runs and processes (a file written by one script and
read by another has the same content hash). The ``lineage_edges`` view holds
every such edge. Values whose equality says nothing about provenance
(``None``, booleans, numbers, strings under 64 bytes) never make an edge.

``flightlog lineage`` loads the fingerprinted ``io`` rows once (one SQL scan)
and walks the edges level by level with vectorised Arrow filters: a
recursive CTE re-scans ``io`` at every level, which costs more than the
whole walk on a store with 100k calls. When several calls
produced the same value, the upstream walk follows one: a producer in the
consumer's own run if there is one, else the run that produced it most
recently before use; within that run the first producer (the innermost of
nested steps that return the same value). The others are counted.
"""
from __future__ import annotations

import os
from typing import Any

from flightlog._errors import QueryError
from flightlog.query import db

TRIVIAL_TYPES = ("NoneType", "bool", "int", "float", "complex")  # values no lineage edge goes through
_TRIVIAL_SQL = ("({t}.type IS NULL OR {t}.type NOT IN (" + ", ".join(f"'{x}'" for x in TRIVIAL_TYPES) + ")) "
                "AND NOT ({t}.type = 'str' AND coalesce({t}.bytes, 0) < 64)")
MAX_FANOUT = 50  # consumers shown per output in a downstream tree


def _meaningful(alias: str) -> str:
    return _TRIVIAL_SQL.format(t=alias)


@db.register_view
def lineage_edges_view(con) -> None:
    """``lineage_edges``: producer call → consumer call through one fingerprint."""
    con.execute(f"""
        CREATE OR REPLACE VIEW lineage_edges AS
        SELECT o.fingerprint, o.type, o.shape, coalesce(i.path, o.path) AS path,
               o.run_id AS src_run_id, o.span_id AS src_span_id, o.step_name AS src_step, o.arg AS src_arg,
               o.time AS produced_at,
               i.run_id AS dst_run_id, i.span_id AS dst_span_id, i.step_name AS dst_step, i.arg AS dst_arg,
               i.time AS consumed_at
        FROM io o JOIN io i ON o.fingerprint = i.fingerprint
        WHERE o.direction = 'output' AND i.direction = 'input'
          AND o.span_id IS NOT NULL AND i.span_id IS NOT NULL AND o.span_id <> i.span_id
          AND o.time <= i.time AND {_meaningful('o')}""")


# -- the walk -------------------------------------------------------------------------------

class _Index:
    """The fingerprinted ``io`` rows of the store as Arrow columns, split into inputs and outputs.

    One SQL scan loads them; each level of the walk is then two vectorised
    ``is_in`` filters over these columns (about a millisecond per 100k rows),
    which is what keeps a deep walk over a large store fast.
    """

    COLS = "span_id, run_id, direction, arg, fingerprint, time"

    def __init__(self, con) -> None:
        import pyarrow.compute as pc

        t = db.sql_arrow(con, f"SELECT {self.COLS}, {_meaningful('io')} AS linkable FROM io "
                              "WHERE fingerprint IS NOT NULL AND span_id IS NOT NULL")
        is_in = pc.equal(t.column("direction"), "input")
        self.inputs = t.filter(is_in)
        self.outputs = t.filter(pc.invert(is_in))
        self.all = t

    @staticmethod
    def _pick(t, column: str, values: list):
        import pyarrow as pa
        import pyarrow.compute as pc

        if not values:
            return []
        return t.filter(pc.is_in(t.column(column), value_set=pa.array(values, pa.string()))).to_pylist()

    def inputs_of(self, spans: list) -> list[dict]:
        return self._pick(self.inputs, "span_id", spans)

    def outputs_of(self, spans: list) -> list[dict]:
        return self._pick(self.outputs, "span_id", spans)

    def producers(self, fps: list) -> list[dict]:
        return self._pick(self.outputs, "fingerprint", fps)

    def consumers(self, fps: list) -> list[dict]:
        return self._pick(self.inputs, "fingerprint", fps)

    def prefix(self, column: str, prefix: str, limit: int = 6) -> list[str]:
        import pyarrow.compute as pc

        col = self.all.column(column)
        hits = pc.unique(col.filter(pc.starts_with(col, prefix)))
        return hits.to_pylist()[:limit]


def _rows(con, sql: str, params: list) -> list[dict]:
    return db.sql_arrow(con, sql, params).to_pylist()


def resolve_target(con, target: str, index: "_Index | None" = None) -> dict:
    """What ``target`` names: ``{"kind": "call", "span_id"}`` or ``{"kind": "data", "fingerprint", "path"}``."""
    if not isinstance(target, str) or not target.strip():
        raise QueryError("lineage needs a span id, a fingerprint or a file path")
    index = index or _Index(con)
    target = target.strip()
    if os.path.isfile(target):
        from flightlog import _fingerprint

        path = os.path.abspath(target)
        fp = _fingerprint.file_info(path).fingerprint
        if not index.prefix("fingerprint", fp, 1):  # the file changed since: its newest recorded version
            rows = _rows(con, "SELECT fingerprint FROM io WHERE path = ? AND fingerprint IS NOT NULL "
                              "ORDER BY time DESC LIMIT 1", [path])
            if not rows:
                raise QueryError(f"no step read or wrote {path} (its content is not in the store either)")
            fp = rows[0]["fingerprint"]
        return {"kind": "data", "fingerprint": fp, "path": path}
    low = target.lower()
    if all(c in "0123456789abcdef" for c in low) and len(low) >= 4:
        spans = index.prefix("span_id", low)
        if not spans:
            spans = [r["span_id"] for r in _rows(con, "SELECT DISTINCT span_id FROM spans "
                                                      "WHERE starts_with(span_id, ?) LIMIT 6", [low])]
        if len(spans) == 1:
            return {"kind": "call", "span_id": spans[0]}
        if len(spans) > 1:
            raise QueryError(f"span id prefix {target!r} is ambiguous: " + ", ".join(spans[:5]))
        fps = index.prefix("fingerprint", low)
        if len(fps) == 1:
            return {"kind": "data", "fingerprint": fps[0], "path": None}
        if len(fps) > 1:
            raise QueryError(f"fingerprint prefix {target!r} is ambiguous: " + ", ".join(f[:16] for f in fps[:5]))
    path = os.path.abspath(target)
    rows = _rows(con, "SELECT fingerprint FROM io WHERE path = ? AND fingerprint IS NOT NULL "
                      "ORDER BY time DESC LIMIT 1", [path])
    if rows:  # a recorded file that no longer exists
        return {"kind": "data", "fingerprint": rows[0]["fingerprint"], "path": path}
    raise QueryError(f"nothing matches {target!r}: not a recorded step call (span id), fingerprint or file")


def _best_producer(inp: dict, cands: list[dict]) -> tuple[dict | None, int]:
    """The producer the upstream walk follows (see the module docstring) and how many there were."""
    ok = [c for c in cands if c["span_id"] != inp["span_id"] and c["time"] <= inp["time"]]
    if not ok:
        return None, 0
    same = [c for c in ok if c["run_id"] == inp["run_id"]]
    if not same:
        last = max(ok, key=lambda c: c["time"])
        same = [c for c in ok if c["run_id"] == last["run_id"]]
    return min(same, key=lambda c: c["time"]), len(ok)


def _calls_info(con, span_ids: list[str]) -> dict[str, dict]:
    if not span_ids:
        return {}
    rows = _rows(con, "SELECT span_id, name, run_id, start_time, duration_ms, status, error_type FROM spans "
                      "WHERE list_contains(?, span_id)", [span_ids])
    return {r["span_id"]: r for r in rows}


def _details(con, span_ids: list[str]) -> dict[tuple, dict]:
    """type, shape and path of the io rows of the calls in the tree, by (span_id, direction, arg)."""
    if not span_ids:
        return {}
    rows = _rows(con, "SELECT span_id, direction, arg, step_name, type, shape, path FROM io "
                      "WHERE list_contains(?, span_id)", [span_ids])
    return {(r["span_id"], r["direction"], r["arg"]): r for r in rows}


def _call_node(span_id: str) -> dict:
    return {"kind": "call", "span_id": span_id, "edges": []}


def lineage(con, target: str, direction: str = "up", depth: int = 20) -> dict:
    """The lineage tree of ``target`` (span id, fingerprint or file path) as nested dicts.

    ``depth`` is the number of step-to-step hops followed.
    """
    if direction not in ("up", "down"):
        raise QueryError("direction must be 'up' or 'down'")
    if depth < 1:
        raise QueryError("--depth must be at least 1")
    index = _Index(con)
    t = resolve_target(con, target, index)
    seen: dict[str, dict] = {}
    edges_of: list[tuple[dict, str, str]] = []  # (edge, span_id, direction) for the details pass
    if t["kind"] == "call":
        root = _call_node(t["span_id"])
        frontier = [root]
        seen[root["span_id"]] = root
    else:
        root = {"kind": "data", "fingerprint": t["fingerprint"], "path": t.get("path"), "calls": []}
        rows = index.producers([t["fingerprint"]]) if direction == "up" else index.consumers([t["fingerprint"]])
        rows.sort(key=lambda r: r["time"], reverse=direction == "up")
        rows = rows[:1] if direction == "up" else rows[:MAX_FANOUT]
        if rows:
            edges_of.append((root, rows[0]["span_id"], "output" if direction == "up" else "input",
                             rows[0]["arg"]))  # type: ignore[arg-type]
        frontier = []
        for r in rows:
            if r["span_id"] not in seen:
                node = seen[r["span_id"]] = _call_node(r["span_id"])
                root["calls"].append(node)
                frontier.append(node)
    level = 0
    while frontier and level < depth:
        ids = [n["span_id"] for n in frontier]
        by_id = {n["span_id"]: n for n in frontier}
        nxt: list[dict] = []
        if direction == "up":
            ins = index.inputs_of(ids)
            cands: dict[str, list] = {}
            for p in index.producers(list({r["fingerprint"] for r in ins if r["linkable"]})):
                cands.setdefault(p["fingerprint"], []).append(p)
            for r in sorted(ins, key=lambda r: (r["time"], r["arg"])):
                best, n = _best_producer(r, cands.get(r["fingerprint"], [])) if r["linkable"] else (None, 0)
                edge = {"arg": r["arg"], "fingerprint": r["fingerprint"], "others": max(0, n - 1), "call": None}
                edges_of.append((edge, r["span_id"], "input", r["arg"]))  # type: ignore[arg-type]
                if best is not None:
                    child = seen.get(best["span_id"])
                    if child is None:
                        child = seen[best["span_id"]] = _call_node(best["span_id"])
                        nxt.append(child)
                        edge["call"] = child
                    else:
                        edge["call"] = {"kind": "ref", "span_id": best["span_id"]}
                by_id[r["span_id"]]["edges"].append(edge)
        else:
            outs = index.outputs_of(ids)
            cons: dict[str, list] = {}
            for c in index.consumers(list({r["fingerprint"] for r in outs if r["linkable"]})):
                cons.setdefault(c["fingerprint"], []).append(c)
            for r in sorted(outs, key=lambda r: (r["time"], r["arg"])):
                users = sorted((c for c in cons.get(r["fingerprint"], []) if r["linkable"]
                                and c["span_id"] != r["span_id"] and c["time"] >= r["time"]),
                               key=lambda c: c["time"])
                edge = {"arg": r["arg"], "fingerprint": r["fingerprint"], "consumers": [],
                        "others": max(0, len(users) - MAX_FANOUT)}
                edges_of.append((edge, r["span_id"], "output", r["arg"]))  # type: ignore[arg-type]
                for c in users[:MAX_FANOUT]:
                    child = seen.get(c["span_id"])
                    if child is None:
                        child = seen[c["span_id"]] = _call_node(c["span_id"])
                        nxt.append(child)
                        edge["consumers"].append(child)
                    else:
                        edge["consumers"].append({"kind": "ref", "span_id": c["span_id"]})
                by_id[r["span_id"]]["edges"].append(edge)
        frontier = nxt
        level += 1
    for n in frontier:
        n["truncated"] = True
    info = _calls_info(con, list(seen))
    det = _details(con, list({sid for _, sid, _, _ in edges_of} | set(seen)))  # type: ignore[misc]
    for edge, sid, d, arg in edges_of:  # type: ignore[misc]
        row = det.get((sid, d, arg), {})
        edge["type"], edge["shape"] = row.get("type"), row.get("shape")
        edge["path"] = edge.get("path") or row.get("path")
    for sid, node in seen.items():
        i = info.get(sid, {})
        name = i.get("name") or next((r.get("step_name") for k, r in det.items() if k[0] == sid), None)
        node.update(step=name, run_id=i.get("run_id"), start_time=i.get("start_time"),
                    duration_ms=i.get("duration_ms"), status=i.get("status"), error_type=i.get("error_type"))
    root["direction"] = direction
    return root


def tree_depth(node: dict) -> int:
    """Levels of calls in a lineage tree (for tests and the benchmark)."""
    kids: list = []
    if node.get("kind") == "data":
        kids = node.get("calls", [])
        return max((tree_depth(k) for k in kids), default=0)
    for e in node.get("edges", []):
        if e.get("call"):
            kids.append(e["call"])
        kids.extend(e.get("consumers", []))
    kids = [k for k in kids if k.get("kind") == "call"]
    return 1 + max((tree_depth(k) for k in kids), default=0)


# -- rendering -------------------------------------------------------------------------------

def _fmt_time(v: Any) -> str:
    return v.strftime("%Y-%m-%d %H:%M:%S") if v is not None and hasattr(v, "strftime") else "-"


def _call_label(n: dict) -> str:
    if n.get("kind") == "ref":
        return f"(call {n['span_id'][:12]}, shown \0{n['span_id'][:12]}\0)"  # above/below: render() decides
    status = n.get("status") or "?"
    if n.get("error_type"):
        status += f" {n['error_type']}"
    dur = f"{n['duration_ms']:.1f} ms" if n.get("duration_ms") is not None else "-"
    return (f"{n.get('step') or '?'}  [span {n['span_id'][:12]}  run {n.get('run_id') or '?'}  "
            f"{_fmt_time(n.get('start_time'))}  {dur}  {status}]" + ("  …" if n.get("truncated") else ""))


def _data_label(e: dict) -> str:
    bits = [e.get("type") or "?"]
    if e.get("shape"):
        bits.append(e["shape"])
    fp = (e.get("fingerprint") or "-")[:12]
    s = f"fp {fp} {' '.join(bits)}"
    if e.get("path"):
        s = f"file {e['path']}  ({s})"
    return s


def render(tree: dict) -> str:
    """The tree as indented text."""
    lines: list[str] = []
    up = tree.get("direction", "up") == "up"

    def walk_call(n: dict, prefix: str) -> None:
        edges = n.get("edges", [])
        for k, e in enumerate(edges):
            last = k == len(edges) - 1
            branch, cont = ("└── ", "    ") if last else ("├── ", "│   ")
            if up:
                src = e.get("call")
                more = f"  (+{e['others']} other producer{'s' if e['others'] != 1 else ''})" if e.get("others") else ""
                if src is None:
                    lines.append(f"{prefix}{branch}{e['arg']}: {_data_label(e)}  ← no recorded producer")
                else:
                    lines.append(f"{prefix}{branch}{e['arg']}: {_data_label(e)}{more}")
                    lines.append(f"{prefix}{cont}└── ← {_call_label(src)}")
                    if src.get("kind") == "call":
                        walk_call(src, prefix + cont + "    ")
            else:
                cons = e.get("consumers", [])
                more = f"  (+{e['others']} more consumers)" if e.get("others") else ""
                lines.append(f"{prefix}{branch}{e['arg']}: {_data_label(e)}{more}"
                             + ("" if cons else "  → not used by a recorded step"))
                for j, c in enumerate(cons):
                    b2 = "└── " if j == len(cons) - 1 else "├── "
                    c2 = "    " if j == len(cons) - 1 else "│   "
                    lines.append(f"{prefix}{cont}{b2}→ {_call_label(c)}")
                    if c.get("kind") == "call":
                        walk_call(c, prefix + cont + c2)

    if tree.get("kind") == "data":
        lines.append(_data_label(tree))
        calls = tree.get("calls", [])
        if not calls:
            lines.append("└── (no recorded step " + ("produced" if up else "used") + " it)")
        for j, c in enumerate(calls):
            last = j == len(calls) - 1
            lines.append(("└── " if last else "├── ") + ("← " if up else "→ ") + _call_label(c))
            walk_call(c, "    " if last else "│   ")
    else:
        lines.append(_call_label(tree))
        walk_call(tree, "")
    # a call met twice is drawn in full once; the other place says where (in --down trees it can be below)
    full = {}
    for i, line in enumerate(lines):
        k = line.find("[span ")
        if k >= 0:
            full.setdefault(line[k + 6:k + 18], i)
    for i, line in enumerate(lines):
        while "\0" in line:
            a = line.index("\0")
            b = line.index("\0", a + 1)
            sid = line[a + 1:b]
            at = full.get(sid)
            line = line[:a] + ("elsewhere" if at is None else "above" if at < i else "below") + line[b + 1:]
        lines[i] = line
    return "\n".join(lines)


def jsonable(tree: dict) -> Any:
    """The tree with times as ISO strings (what ``--format json`` prints)."""
    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        if hasattr(v, "isoformat"):
            return v.isoformat()
        return v
    return conv(tree)


# -- history -----------------------------------------------------------------------------------

_HISTORY_SQL = f"""
WITH calls AS (
    SELECT span_id, run_id, start_time, duration_ms, status, error_type FROM spans WHERE name = ?
    ORDER BY start_time DESC LIMIT ?),
io_c AS (SELECT i.* FROM io i JOIN calls c USING (span_id)),
ins AS (
    SELECT i.span_id, i.arg, i.fingerprint, i.path, i.time AS used, i.step_name,
           try_cast(json_extract_string(i.summary, '$.mtime') AS TIMESTAMPTZ) AS mtime
    FROM io_c i WHERE i.direction = 'input' AND i.fingerprint IS NOT NULL AND {_meaningful('i')}),
prod AS (
    SELECT ins.span_id, ins.arg, ins.fingerprint, max(o.time) AS produced,
           arg_max(o.step_name, o.time) AS pstep, arg_max(o.arg, o.time) AS parg
    FROM ins JOIN io o ON o.fingerprint = ins.fingerprint AND o.direction = 'output' AND o.time <= ins.used
                          AND o.span_id IS NOT NULL AND o.span_id <> ins.span_id
    GROUP BY ALL),
ver AS (
    SELECT ins.*, prod.produced AS produced_by_step, prod.pstep, prod.parg,
           coalesce(prod.produced, ins.mtime) AS produced
    FROM ins LEFT JOIN prod USING (span_id, arg, fingerprint)),
flags AS (
    SELECT v.span_id, v.arg,
           CASE WHEN v.produced IS NOT NULL
                     AND epoch(v.used) - epoch(v.produced) > ? * 86400
                THEN format('{{}} is {{:.1f}} d old', v.arg, (epoch(v.used) - epoch(v.produced)) / 86400) END AS old,
           (SELECT min(n.time) FROM io n
             WHERE n.fingerprint IS DISTINCT FROM v.fingerprint AND n.fingerprint IS NOT NULL
               AND n.time > coalesce(v.produced, v.used)
               AND ((v.path IS NOT NULL AND n.path = v.path)
                    OR (v.pstep IS NOT NULL AND n.direction = 'output' AND n.step_name = v.pstep
                        AND n.arg = v.parg))) AS newer_at
    FROM ver v),
flag_txt AS (
    SELECT span_id,
           string_agg(concat_ws('; ', old,
                      CASE WHEN newer_at IS NOT NULL
                           THEN format('newer {{}} since {{}}', arg, strftime(newer_at, '%Y-%m-%d %H:%M')) END),
                      '; ') FILTER (WHERE old IS NOT NULL OR newer_at IS NOT NULL) AS stale
    FROM flags GROUP BY span_id),
sig AS (
    SELECT span_id,
           string_agg(arg || '=' || coalesce(left(fingerprint, 10), '?'), ', ' ORDER BY time, arg)
             FILTER (WHERE direction = 'input') AS inputs,
           string_agg(CASE WHEN arg = 'return' THEN '' ELSE arg || '=' END || coalesce(left(fingerprint, 10), '?'),
                      ', ' ORDER BY time, arg) FILTER (WHERE direction = 'output') AS outputs
    FROM io_c GROUP BY span_id)
SELECT c.start_time, c.run_id, c.span_id, c.status, round(c.duration_ms, 2) AS duration_ms,
       sig.inputs, sig.outputs, nullif(flag_txt.stale, '') AS stale
FROM calls c LEFT JOIN sig USING (span_id) LEFT JOIN flag_txt USING (span_id)
ORDER BY c.start_time DESC
"""


def history(con, step: str, stale_days: float = 7.0, limit: int = 100):
    """A step's calls, newest first, with input/output fingerprints and staleness flags (Arrow table)."""
    if not isinstance(step, str) or not step:
        raise QueryError("history needs a step name")
    n = db.sql_arrow(con, "SELECT count(*) AS n FROM spans WHERE name = ?", [step]).column(0)[0].as_py()
    if not n:
        names = [r[0] for r in con.execute("SELECT DISTINCT name FROM spans ORDER BY 1 LIMIT 20").fetchall()]
        raise QueryError(f"no calls of step {step!r} in the store"
                         + (f" (steps: {', '.join(names)})" if names else ""))
    return db.sql_arrow(con, _HISTORY_SQL, [step, max(1, int(limit)), float(stale_days)])
