"""The UI's FastAPI app: server-rendered pages plus the JSON API they (and users) call.

Pages: ``/`` runs, ``/runs/{id}`` one run, ``/runs/{id}/code``, ``/runs/{id}/steps``,
``/compare?runs=a,b``, ``/lineage``, ``/sql`` (+ ``/sql.csv``).
API: ``/api/runs``, ``/api/runs/{id}``, ``/api/series``.

Auth: with a token, every route (pages, API, static files) needs
``Authorization: Bearer TOKEN`` or the cookie that ``/login?token=TOKEN``
sets (HttpOnly, SameSite=Strict, holding an HMAC of the token, not the token).
"""

import hashlib
import hmac
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from flightlog import _config
from flightlog._errors import FlightlogError, QueryError, RunNotFound
from flightlog.ui import data as D
from flightlog.ui.html import attr_json, e, error_page, fmt, kv, login_page, page, table, url

STATIC = Path(__file__).parent / "static"
COOKIE = "flightlog_ui"
PAGE_SIZE = 100
SQL_SHOW_ROWS = 1000
SQL_CSV_ROWS = 1_000_000
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def _cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"flightlog-ui-session", hashlib.sha256).hexdigest()


def _base(request) -> str:
    return (request.scope.get("root_path") or "").rstrip("/")


def _rel(request) -> str:
    p, rp = request.scope.get("path", ""), request.scope.get("root_path") or ""
    return p[len(rp):] if rp and p.startswith(rp) else p


def _status_of(exc: Exception) -> int:
    if isinstance(exc, (D.NotFound, RunNotFound)):
        return 404
    return 400


def create_app(store: str | os.PathLike | None = None, token: str | None = None, *,
               query_timeout: float = 30.0, index_ttl: float = 1.0):
    """The UI app over ``store`` (read only). ``token``: require it on every route."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.staticfiles import StaticFiles

    root = _config.store_home(os.fspath(store) if store is not None else None)
    index = D.RunsIndex(root, ttl=index_ttl)
    # build the runs index now, in the background: on a store with thousands of runs the first
    # build reads every runs file once (later refreshes re-read only what changed)
    threading.Thread(target=_warm, args=(index,), name="flightlog-ui-index", daemon=True).start()
    app = FastAPI(title="flightlog ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = root
    app.state.index = index
    want = _cookie_value(token) if token else None

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, cred = got.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), token.encode()):
            return True
        c = request.cookies.get(COOKIE)
        return bool(c) and hmac.compare_digest(c.encode(), want.encode())  # type: ignore[union-attr]

    @app.middleware("http")
    async def guard(request: Request, call_next):
        rel = _rel(request)
        if rel != "/login" and not authorized(request):
            if rel.startswith("/api/") or rel.startswith("/static/"):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return HTMLResponse(login_page(_base(request), "missing or wrong token"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        resp = await call_next(request)
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        return resp

    @app.exception_handler(FlightlogError)
    async def _err(request: Request, exc: FlightlogError):
        status = _status_of(exc)
        if _rel(request).startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=status)
        return HTMLResponse(error_page(_base(request), status, str(exc)), status_code=status)

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    def html(text: str, status: int = 200):
        return HTMLResponse(text, status_code=status)

    # -- login -----------------------------------------------------------------------------

    @app.get("/login")
    def login(request: Request):
        given = request.query_params.get("token")
        base = _base(request)
        if token is None:
            return RedirectResponse(f"{base}/", status_code=303)
        if not given:
            return html(login_page(base))
        if not hmac.compare_digest(given.encode(), token.encode()):
            return html(login_page(base, "wrong token"), 401)
        r = RedirectResponse(f"{base}/", status_code=303)
        r.set_cookie(COOKIE, want, httponly=True, samesite="strict", path=f"{base}/" if base else "/")
        return r

    # -- runs ------------------------------------------------------------------------------

    def _filtered(request: Request):
        q = request.query_params
        return D.filter_runs(root, index.table(), project=q.get("project") or None, tag=q.get("tag") or None,
                             status=q.get("status") or None, where=q.get("where") or None)

    def _int(v: Any, what: str, lo: int, hi: int, default: int) -> int:
        if v is None or v == "":
            return default
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise D.BadInput(f"{what} must be an integer, got {str(v)[:40]!r}") from None
        if not lo <= n <= hi:
            raise D.BadInput(f"{what} must be between {lo} and {hi}, got {n}")
        return n

    def _runs_rows(base: str, rows: list[dict], pnames: list[str], last: dict) -> str:
        out = []
        for r in rows:
            rid = r["run_id"]
            p = D.params_of(r)
            tags = D.user_tags(r.get("tags")) + [r.get("kind") or "", r.get("host") or ""]
            if r.get("git_commit"):
                tags.append(r["git_commit"][:8] + ("+dirty" if r.get("git_dirty") else ""))
            dur = _duration(r)
            lm = last.get(rid, {})
            cells = [
                f'<td><input type="checkbox" name="runs" value="{e(rid)}"></td>',
                f'<td><a href="{e(base)}/runs/{e(rid)}">{e(r.get("name") or rid)}</a>'
                f'<div class="sub">{e(rid)}</div></td>',
                f'<td>{e(r.get("project"))}</td>',
                f'<td><span class="st st-{e(r.get("status"))}">{e(r.get("status"))}</span></td>',
                "<td>" + " ".join(f'<span class="tag">{e(t)}</span>' for t in tags if t) + "</td>",
                f'<td>{e(fmt(r.get("started_at")))}</td>',
                f'<td class="num">{e(dur)}</td>',
            ]
            cells += [f'<td class="num">{e(fmt(p.get(k)))}</td>' for k in pnames]
            cells.append("<td>" + "<br>".join(f"{e(k)} = {e(fmt(v))}" for k, v in lm.items()) + "</td>")
            out.append(f'<tr data-run="{e(rid)}">{"".join(cells)}</tr>')
        return "".join(out)

    def _runs_page_parts(request: Request) -> tuple[str, bool, dict]:
        base = _base(request)
        q = request.query_params
        t = _filtered(request)
        pg = _int(q.get("page"), "page", 1, 10**6, 1)
        total = t.num_rows
        rows = t.slice((pg - 1) * PAGE_SIZE, PAGE_SIZE).to_pylist()
        plist = [D.params_of(r) for r in rows]
        pnames = D.differing_params(plist)[:8]
        last = D.last_metrics(root, index.table(), [r["run_id"] for r in rows])
        live = any(r["status"] == "running" for r in rows)
        meta = {"total": total, "page": pg, "pnames": pnames, "rows": rows}
        return _runs_rows(base, rows, pnames, last), live, meta

    @app.get("/")
    def runs_page(request: Request):
        base = _base(request)
        q = request.query_params
        body_rows, live, meta = _runs_page_parts(request)
        if q.get("partial"):
            return html(body_rows)
        total, pg, pnames = meta["total"], meta["page"], meta["pnames"]
        projects = sorted({p for p in index.table().column("project").to_pylist() if p})
        statuses = ("running", "finished", "failed", "killed", "crashed")
        proj_opts = "".join(f'<option{" selected" if q.get("project") == p else ""}>{e(p)}</option>'
                            for p in projects)
        st_opts = "".join(f'<option{" selected" if q.get("status") == s else ""}>{s}</option>' for s in statuses)
        filters = f"""<form class="filters" method="get" action="{e(base)}/">
<label>project <select name="project"><option value="">any</option>{proj_opts}</select></label>
<label>tag <input name="tag" value="{e(q.get('tag'))}" size="10" placeholder="kind, host, commit"></label>
<label>status <select name="status"><option value="">any</option>{st_opts}</select></label>
<label class="grow">where <input name="where" value="{e(q.get('where'))}" placeholder="SQL predicate over runs, e.g. json_extract(params, '$.lr')::DOUBLE &gt; 0.01"></label>
<button type="submit">Filter</button></form>"""
        keep = {k: q.get(k) for k in ("project", "tag", "status", "where")}
        pages = max(1, -(-total // PAGE_SIZE))
        nav = f'<span>{total} runs · page {pg} of {pages}</span> '
        if pg > 1:
            nav += f'<a href="{e(url(base, "/", **keep, page=pg - 1))}">← newer</a> '
        if pg < pages:
            nav += f'<a href="{e(url(base, "/", **keep, page=pg + 1))}">older →</a>'
        head = "".join(f"<th>{e(h)}</th>" for h in
                       ["", "name", "project", "status", "tags", "started", "duration"]
                       + [f"param {k}" for k in pnames] + ["last metrics"])
        partial = url(base, "/", **keep, page=pg, partial=1)
        body = f"""<h1>Runs</h1>{filters}
<form method="get" action="{e(base)}/compare" class="runs-form">
<div class="bar">{nav} <button type="submit" id="compare-btn">Compare selected</button></div>
<table class="runs" id="runs-table"><thead><tr>{head}</tr></thead>
<tbody id="runs-body"{f' data-live="{e(partial)}"' if live else ""}>{body_rows}</tbody></table></form>"""
        return html(page(base, "Runs", body, "Runs"))

    # -- one run ---------------------------------------------------------------------------

    def _run(run: str) -> dict:
        return index.get(run)

    @app.get("/runs/{run_id}")
    def run_page(request: Request, run_id: str):
        base = _base(request)
        x = request.query_params.get("x") or "step"
        if x not in D.X_AXES:
            raise D.BadInput(f"x must be one of {', '.join(D.X_AXES)}, got {x[:40]!r}")
        r = _run(run_id)
        rid = r["run_id"]
        info = _run_info(rid, x)
        p = D.params_of(r)
        parent = ""
        if r.get("parent_run_id"):
            parent = f' · from <a href="{e(base)}/runs/{e(r["parent_run_id"])}">{e(r["parent_run_id"])}</a>'
        head = f"""<h1>{e(r.get('name') or rid)} <span class="st st-{e(r['status'])}">{e(r['status'])}</span></h1>
<p class="sub">run {e(rid)} · project {e(r.get('project'))} · {e(r.get('kind'))}
{parent}
· started {e(fmt(r.get('started_at')))} · duration {e(_duration(r))}</p>
<p class="links"><a href="{e(base)}/runs/{e(rid)}/steps">Steps and lineage</a>
· <a href="{e(base)}/runs/{e(rid)}/code">Code snapshot</a>
· <a href="{e(url(base, '/compare', runs=rid))}">Compare with…</a>
· x axis: {' '.join(f'<a href="{e(url(base, "/runs/" + rid, x=a))}"{" class=on" if a == x else ""}>{a}</a>' for a in D.X_AXES)}</p>"""
        if r.get("error_type") or r.get("error_message"):
            head += f'<p class="error">{e(r.get("error_type"))}: {e(r.get("error_message"))}</p>'
        env = kv([(k, r.get(k)) for k in ("host", "pid", "python_version", "numpy_version", "torch_version",
                                          "torch_threads", "git_commit", "git_dirty", "script", "cwd", "argv",
                                          "dropped_rows", "counters", "ended_at", "updated_at")])
        params = kv(sorted(p.items())) if p else "<p>No params recorded (fl.arg).</p>"
        charts = _charts_html(base, rid, info, x)
        body = f"""{head}
<div class="cols"><section><h2>Params</h2>{params}</section><section><h2>Environment</h2>{env}</section></div>
<section><h2>Metrics</h2>{charts}</section>
<section><h2>Replays</h2>{_replays_html(info['replays'])}</section>
<section><h2>Checkpoints</h2>{_ckpt_html(info['checkpoints'])}</section>
<section><h2>Health</h2><div data-partial="{e(base)}/runs/{e(rid)}/health">loading health checks…</div></section>
<section><h2>Assertions</h2>{_assert_html(info['assertions'])}</section>
<section><h2>Slices</h2>{_slices_stub(base, rid, info['n_predictions'])}</section>"""
        return html(page(base, r.get("name") or rid, body, charts=True))

    info_cache: dict = {}
    info_lock = threading.Lock()

    def _run_info(rid: str, x: str) -> dict:
        """Summary of one run's tables, cached until one of its files changes (a 10M-row scan otherwise)."""
        from flightlog.collector import schema as S
        from flightlog.collector import store as st

        sig = []
        for t in S.TABLES:
            for f in st.table_files(root, t, [rid]):
                try:
                    s_ = f.stat()
                except OSError:
                    continue
                sig.append((str(f), s_.st_size, s_.st_mtime_ns))
        key = (rid, tuple(sig))
        with info_lock:
            hit = info_cache.get(key)
        if hit is not None:
            return hit
        info = _run_info_uncached(rid)
        with info_lock:
            if len(info_cache) > 256:
                info_cache.clear()
            info_cache[key] = info
        return info

    def _run_info_uncached(rid: str) -> dict:
        con = D.scoped(root, index.table(), [rid])
        try:
            metrics = D.rows(con, """
                SELECT name, count(*) AS n, count(*) FILTER (WHERE source = 'replay') AS replayed,
                       arg_max(value, step) AS last, min(value) AS min, max(value) AS max
                FROM metrics GROUP BY name ORDER BY name""")
            ck = D.rows(con, """
                SELECT c.loop, c.iteration, c.position, c.bytes, c.copy_ms, c.write_ms, c.status, c.time,
                       epoch_us(c.time) / 1e6 AS t, m.step AS step
                FROM checkpoints c ASOF LEFT JOIN (SELECT wall_time, step FROM metrics WHERE step IS NOT NULL) m
                     ON c.time >= m.wall_time
                ORDER BY c.time""")
            replays = D.rows(con, "SELECT * FROM replays ORDER BY started_at")
            asserts = D.rows(con, """
                SELECT assertion, count(*) AS n, max(severity) AS max_severity,
                       arg_max(message, severity) AS worst_message, arg_max(item_id, severity) AS worst_item
                FROM assertions GROUP BY assertion ORDER BY n DESC LIMIT 100""")
            npred = con.execute("SELECT count(*) FROM predictions").fetchone()[0]
        finally:
            con.close()
        return {"metrics": metrics, "checkpoints": ck, "replays": replays, "assertions": asserts,
                "n_predictions": npred}

    def _marks(ck: list[dict], x: str) -> list[dict]:
        out = []
        for c in ck:
            v = {"step": c["step"], "epoch": c["iteration"], "time": c["t"]}[x]
            if v is not None and c.get("status") != "failed":
                out.append({"x": v, "label": f"ckpt {c['loop']}={c['iteration']}"})
        return out

    def _verdict(replays: list[dict], name: str) -> str:
        hits = []
        for rp in replays:
            try:
                names = json.loads(rp.get("new_names") or "[]")
            except ValueError:
                names = []
            if name in (names if isinstance(names, list) else []) or not hits:
                hits.append(rp)
        if not replays:
            return ""
        rp = hits[-1]
        return (f"replay {rp.get('replay_id')}: {rp.get('status')}, fidelity {rp.get('fidelity')}"
                f" ({rp.get('compared')} values compared, max |diff| {fmt(rp.get('max_abs_diff'))})")

    def _charts_html(base: str, rid: str, info: dict, x: str) -> str:
        ms = info["metrics"]
        if not ms:
            return "<p>No metrics recorded.</p>"
        groups: dict[str, list[dict]] = {}
        for m in ms:
            name = m["name"]
            g = name.split("/", 1)[0] if "/" in name else (name.split(".", 1)[0] if "." in name else "")
            groups.setdefault(g, []).append(m)
        marks = _marks(info["checkpoints"], x)
        out = []
        for g, items in sorted(groups.items(), key=lambda kv_: (kv_[0] != "", kv_[0])):
            out.append(f"<h3>{e(g or 'metrics')}</h3><div class='charts'>")
            for m in items:
                verdict = _verdict(info["replays"], m["name"]) if m["replayed"] else ""
                cfg = {"x": x, "title": m["name"], "marks": marks,
                       "series": [{"run": rid, "name": m["name"], "label": m["name"]}]}
                out.append(f"""<figure class="chart-box"><figcaption>{e(m['name'])}
<span class="sub">{m['n']} points{f" · {m['replayed']} replayed" if m['replayed'] else ""}
· last {e(fmt(m['last']))} · min {e(fmt(m['min']))} · max {e(fmt(m['max']))}</span>
{f'<div class="verdict">{e(verdict)}</div>' if verdict else ""}</figcaption>
<div class="chart" data-cfg="{attr_json(cfg)}"></div></figure>""")
            out.append("</div>")
        return "".join(out)

    def _replays_html(reps: list[dict]) -> str:
        if not reps:
            return "<p>Not replayed.</p>"
        cols = ["replay_id", "segment", "status", "fidelity", "compared", "max_abs_diff", "first_divergence",
                "new_names", "started_at", "error"]
        return table(cols, ([r.get(c) for c in cols] for r in reps))

    def _ckpt_html(ck: list[dict]) -> str:
        if not ck:
            return "<p>No checkpoints.</p>"
        cols = ["loop", "iteration", "position", "bytes", "copy_ms", "write_ms", "status", "time", "step"]
        return table(cols, ([c.get(k) for k in cols] for c in ck))

    def _assert_html(rows: list[dict]) -> str:
        if not rows:
            return "<p>No assertion failures recorded.</p>"
        cols = ["assertion", "n", "max_severity", "worst_item", "worst_message"]
        return table(cols, ([r.get(c) for c in cols] for r in rows))

    def _slices_stub(base: str, rid: str, n: int) -> str:
        if not n:
            return "<p>No predictions logged (fl.log_predictions).</p>"
        return (f'<p>{n} prediction rows.</p><div data-partial="{e(base)}/runs/{e(rid)}/slices">'
                "finding slices…</div>")

    @app.get("/runs/{run_id}/health")
    def run_health(request: Request, run_id: str):
        from flightlog.query import health as H

        rid = _run(run_id)["run_id"]
        try:
            rep = H.health(rid, store=root)
        except FlightlogError as ex:
            return html(f'<p class="error">{e(ex)}</p>')
        out = []
        for res in rep:
            ev = res.evidence
            evh = ""
            if ev.num_rows:
                evh = table(ev.column_names, (list(r.values()) for r in ev.slice(0, 20).to_pylist()), "evidence")
                if ev.num_rows > 20:
                    evh += f'<p class="sub">{ev.num_rows - 20} more rows</p>'
            out.append(f"""<details class="check st-{e(res.status)}"{' open' if res.status in ('fail', 'error') else ''}>
<summary><span class="st st-{e(res.status)}">{e(res.status)}</span> {e(res.name)}
<span class="sub">{e(res.severity)} · {e(res.error or res.reason or res.description)}</span></summary>{evh}</details>""")
        return html("".join(out) or "<p>No checks.</p>")

    @app.get("/runs/{run_id}/slices")
    def run_slices(request: Request, run_id: str):
        from flightlog.query import predictions, slices

        r = _run(run_id)
        chain = _chain(r)
        con = D.scoped(root, index.table(), chain, tables=["predictions"])
        try:
            X, err, notes = predictions.load_predictions(con, r["run_id"])
            res = slices.find(X, err, k=5)
        except (FlightlogError, ValueError) as ex:
            return html(f'<p class="error">{e(ex)}</p>')
        finally:
            con.close()
        cols = [c for c in ("rank", "slice", "size", "error_sum", "error_mean", "score") if c in res.column_names]
        note = e(", ".join(f"{k}: {fmt(v)}" for k, v in notes.items())) if isinstance(notes, dict) else ""
        return html(f'<p class="sub">{note}</p>' + table(cols, ([row[c] for c in cols] for row in res.to_pylist())))

    def _chain(r: dict) -> list[str]:
        chain, seen = [r["run_id"]], {r["run_id"]}
        cur = r
        while cur.get("kind") == "resume" and cur.get("parent_run_id") and cur["parent_run_id"] not in seen:
            try:
                cur = index.get(cur["parent_run_id"])
            except D.NotFound:
                break
            chain.insert(0, cur["run_id"])
            seen.add(cur["run_id"])
        return chain

    @app.get("/runs/{run_id}/code")
    def code_page(request: Request, run_id: str):
        base = _base(request)
        r = _run(run_id)
        rid = r["run_id"]
        against = request.query_params.get("against")
        snap = D.snapshot(root, r.get("code_snapshot"))
        others = [o for o in index.table().select(["run_id", "name", "code_snapshot"]).to_pylist()
                  if o["code_snapshot"] and o["run_id"] != rid][-200:]
        opts = "".join(f'<option value="{e(o["run_id"])}"{" selected" if o["run_id"] == against else ""}>'
                       f'{e(o["name"] or "")} {e(o["run_id"])}</option>' for o in reversed(others))
        form = f"""<form method="get" action="{e(base)}/runs/{e(rid)}/code" class="filters">
<label>diff against <select name="against"><option value="">(none)</option>{opts}</select></label>
<button type="submit">Diff</button></form>"""
        parts = [f'<h1>Code of <a href="{e(base)}/runs/{e(rid)}">{e(r.get("name") or rid)}</a></h1>'
                 f'<p class="sub">snapshot {e(r.get("code_snapshot"))} · script {e(snap["script"])}</p>', form]
        if against:
            o = _run(against)
            other = D.snapshot(root, o.get("code_snapshot"))
            diffs = D.code_diff(snap, other, rid[:12], o["run_id"][:12])
            parts.append(f"<h2>Diff: {e(o['run_id'])} → {e(rid)}</h2>")
            if not diffs:
                parts.append("<p>The snapshots are identical.</p>")
            for d in diffs:
                lines = "".join(
                    f'<span class="{"add" if ln.startswith("+") else "del" if ln.startswith("-") else "hunk" if ln.startswith("@@") else ""}">{e(ln)}</span>\n'
                    for ln in d["lines"])
                parts.append(f'<h3>{e(d["file"])} <span class="sub">{e(d["status"])}</span></h3>'
                             f'<pre class="diff">{lines}</pre>')
        for rel, text in snap["files"].items():
            err = snap["errors"].get(rel)
            parts.append(f'<details{" open" if rel == snap["script"] and not against else ""}><summary>{e(rel)}</summary>'
                         + (f'<p class="error">{e(err)}</p>' if err else f'<pre class="code">{e(text)}</pre>')
                         + "</details>")
        return html(page(base, f"code {rid}", "".join(parts)))

    @app.get("/runs/{run_id}/steps")
    def steps_page(request: Request, run_id: str):
        base = _base(request)
        r = _run(run_id)
        rid = r["run_id"]
        con = D.scoped(root, index.table(), [rid], tables=["spans", "io"])
        try:
            per = D.rows(con, """
                SELECT name, count(*) AS calls, count(*) FILTER (WHERE status = 'error') AS failures,
                       round(median(duration_ms), 3) AS median_ms, round(max(duration_ms), 3) AS max_ms,
                       round(sum(duration_ms), 1) AS total_ms
                FROM spans GROUP BY name ORDER BY total_ms DESC NULLS LAST LIMIT 200""")
            calls = D.rows(con, """
                SELECT span_id, name, start_time, round(duration_ms, 3) AS duration_ms, status, error_type,
                       error_message, epoch, batch
                FROM spans ORDER BY start_time LIMIT 500""")
            fails = D.rows(con, """
                SELECT s.span_id, s.name, s.start_time, s.error_type, s.error_message,
                       list({'arg': i.arg, 'type': i.type, 'shape': i.shape, 'fingerprint': i.fingerprint,
                             'payload': i.payload} ORDER BY i.arg) FILTER (WHERE i.arg IS NOT NULL) AS inputs
                FROM spans s LEFT JOIN io i ON i.span_id = s.span_id AND i.direction = 'input'
                WHERE s.status = 'error' GROUP BY ALL ORDER BY s.start_time LIMIT 100""")
            nspans = con.execute("SELECT count(*) FROM spans").fetchone()[0]
        finally:
            con.close()
        parts = [f'<h1>Steps of <a href="{e(base)}/runs/{e(rid)}">{e(r.get("name") or rid)}</a></h1>']
        if not nspans:
            parts.append("<p>No step calls recorded (@fl.step).</p>")
        else:
            parts.append("<h2>By step</h2>" + table(list(per[0].keys()), (list(p.values()) for p in per)))
            parts.append("<h2>Failures</h2>")
            if not fails:
                parts.append("<p>No failed calls.</p>")
            for f in fails:
                ins = table(["arg", "type", "shape", "fingerprint", "kept"],
                            ([i["arg"], i["type"], i["shape"], i["fingerprint"], "yes" if i["payload"] else "no"]
                             for i in (f["inputs"] or [])))
                parts.append(f"""<div class="failure"><h3>{e(f['name'])} <span class="st st-error">{e(f['error_type'])}</span></h3>
<p>{e(f['error_message'])}</p><p class="sub">{e(fmt(f['start_time']))} · span {e(f['span_id'])} ·
<a href="{e(url(base, '/lineage', target=f['span_id']))}">lineage</a> · re-run it: <code>flightlog replay-step {e(f['span_id'])}</code></p>{ins}</div>""")
            rows = []
            for c in calls:
                link = f'<a href="{e(url(base, "/lineage", target=c["span_id"]))}">{e(c["name"])}</a>'
                rows.append([link, fmt(c["start_time"]), c["duration_ms"],
                             f'<span class="st st-{e(c["status"])}">{e(c["status"])}</span>',
                             c["error_type"], c["epoch"], c["batch"]])
            parts.append(f"<h2>Calls</h2><p class='sub'>{nspans} calls{' (first 500 shown)' if nspans > 500 else ''}</p>"
                         + table(["step", "start", "duration_ms", "status", "error", "epoch", "batch"], rows,
                                 raw_cols=(0, 3)))
        return html(page(base, f"steps {rid}", "".join(parts)))

    # -- lineage ---------------------------------------------------------------------------

    @app.get("/lineage")
    def lineage_page(request: Request):
        from flightlog.query import db, lineage as L

        base = _base(request)
        q = request.query_params
        target = (q.get("target") or "").strip()
        direction = q.get("direction") or "up"
        if direction not in ("up", "down"):
            raise D.BadInput("direction must be 'up' or 'down'")
        form = f"""<form method="get" action="{e(base)}/lineage" class="filters">
<label class="grow">step call, fingerprint or file <input name="target" value="{e(target)}"></label>
<label>direction <select name="direction"><option{' selected' if direction == 'up' else ''}>up</option>
<option{' selected' if direction == 'down' else ''}>down</option></select></label><button type="submit">Show</button></form>"""
        body = f"<h1>Lineage</h1>{form}"
        if target:
            con = db.connect(root)
            try:
                tree = L.lineage(con, target, direction=direction)
            finally:
                con.close()
            body += f'<div class="lineage">{_tree_html(base, tree)}</div>'
        return html(page(base, "Lineage", body, "Lineage"))

    def _tree_html(base: str, n: dict) -> str:
        if n.get("kind") == "data":
            kids = "".join(f"<li>{_tree_html(base, c)}</li>" for c in n.get("calls", []))
            return (f'<div class="node data">data {e((n.get("fingerprint") or "")[:16])} {e(n.get("path") or "")}'
                    f' <span class="sub">{e(n.get("direction"))}stream</span></div><ul>{kids}</ul>')
        if n.get("kind") == "ref":
            return f'<div class="node ref">(call {e(n["span_id"][:12])}, shown above)</div>'
        st = n.get("status") or "?"
        label = (f'<div class="node call"><a class="step" href="{e(url(base, "/lineage", target=n["span_id"]))}">'
                 f'{e(n.get("step") or "?")}</a> <span class="st st-{e(st)}">{e(st)}</span>'
                 f' <span class="sub">{e(fmt(n.get("duration_ms")))} ms · '
                 f'run <a href="{e(base)}/runs/{e(n.get("run_id"))}">{e((n.get("run_id") or "")[:12])}</a>'
                 f' · {e(fmt(n.get("start_time")))}{" · truncated" if n.get("truncated") else ""}</span></div>')
        items = []
        for ed in n.get("edges", []):
            desc = (f'<span class="edge">{e(ed.get("arg"))} = {e((ed.get("fingerprint") or "")[:12])}'
                    f' {e(ed.get("type") or "")} {e(ed.get("shape") or "")} {e(ed.get("path") or "")}'
                    + (f" (+{ed['others']} other)" if ed.get("others") else "") + '</span>')
            subs = [ed["call"]] if ed.get("call") else []
            subs += ed.get("consumers", [])
            inner = "".join(f"<li>{_tree_html(base, s)}</li>" for s in subs)
            items.append(f"<li>{desc}{f'<ul>{inner}</ul>' if inner else ''}</li>")
        return label + (f"<ul>{''.join(items)}</ul>" if items else "")

    # -- compare ---------------------------------------------------------------------------

    def _run_list(request: Request) -> list[str]:
        vals = request.query_params.getlist("runs")
        ids: list[str] = []
        for v in vals:
            ids += [s.strip() for s in v.split(",") if s.strip()]
        if not ids:
            raise D.BadInput("runs must name at least one run: /compare?runs=a,b")
        if len(ids) > 20:
            raise D.BadInput(f"compare at most 20 runs at once (got {len(ids)})")
        return list(dict.fromkeys(index.get(i)["run_id"] for i in ids))

    @app.get("/compare")
    def compare_page(request: Request):
        base = _base(request)
        x = request.query_params.get("x") or "step"
        if x not in D.X_AXES:
            raise D.BadInput(f"x must be one of {', '.join(D.X_AXES)}, got {x[:40]!r}")
        ids = _run_list(request)
        rs = [index.get(i) for i in ids]
        ps = [D.params_of(r) for r in rs]
        diff = set(D.differing_params(ps))
        keys = sorted({k for p in ps for k in p}, key=lambda k: (k not in diff, k))
        ptab = "<p>No params.</p>" if not keys else (
            '<table class="params"><thead><tr><th>param</th>'
            + "".join(f"<th>{e(r.get('name') or r['run_id'])}</th>" for r in rs) + "</tr></thead><tbody>"
            + "".join(f'<tr class="{"diff" if k in diff else "same"}"><th>{e(k)}</th>'
                      + "".join(f"<td>{e(fmt(p.get(k)) if k in p else '—')}</td>" for p in ps) + "</tr>"
                      for k in keys) + "</tbody></table>")
        con = D.scoped(root, index.table(), ids, tables=["metrics"])
        try:
            names = con.execute("SELECT name, list(DISTINCT run_id) FROM metrics GROUP BY name ORDER BY name").fetchall()
        finally:
            con.close()
        label = {r["run_id"]: (r.get("name") or r["run_id"]) + f" ({r['run_id'][-6:]})" for r in rs}
        charts = []
        for name, have in names:
            cfg = {"x": x, "title": name, "marks": [],
                   "series": [{"run": rid, "name": name, "label": label[rid]} for rid in ids if rid in have]}
            charts.append(f'<figure class="chart-box"><figcaption>{e(name)}</figcaption>'
                          f'<div class="chart" data-cfg="{attr_json(cfg)}"></div></figure>')
        runs_q = ",".join(ids)
        add = f"""<form method="get" action="{e(base)}/compare" class="filters"><input type="hidden" name="x" value="{e(x)}">
<label class="grow">runs <input name="runs" value="{e(runs_q)}"></label><button type="submit">Compare</button></form>"""
        axes = " ".join(f'<a href="{e(url(base, "/compare", runs=runs_q, x=a))}"{" class=on" if a == x else ""}>{a}</a>'
                        for a in D.X_AXES)
        runs_links = " · ".join(f'<a href="{e(base)}/runs/{e(r["run_id"])}">{e(label[r["run_id"]])}</a>' for r in rs)
        body = (f"<h1>Compare</h1><p>{runs_links}</p>{add}<p class='links'>x axis: {axes}</p>"
                f"<section><h2>Params</h2>{ptab}</section><section><h2>Metrics</h2>"
                f"<div class='charts'>{''.join(charts) or '<p>No metrics.</p>'}</div></section>")
        return html(page(base, "Compare", body, charts=True))

    # -- SQL -------------------------------------------------------------------------------

    def _sql(q: str, limit: int):
        from flightlog.query.isolated import BadRequest, run_query

        if len(q) > 100_000:
            raise D.BadInput("SQL is longer than 100000 characters")
        try:
            return run_query(root, q, None, limit, query_timeout)
        except BadRequest as ex:
            raise QueryError(ex.message) from None

    @app.get("/sql")
    def sql_page(request: Request):
        base = _base(request)
        q = request.query_params.get("q") or ""
        res = ""
        if q.strip():
            t0 = time.perf_counter()
            try:
                t, trunc = _sql(q, SQL_SHOW_ROWS)
            except QueryError as ex:
                res = f'<p class="error">{e(ex)}</p>'
            else:
                ms = (time.perf_counter() - t0) * 1000
                res = (f'<p class="sub">{t.num_rows} rows{" (first " + str(SQL_SHOW_ROWS) + " shown)" if trunc else ""}'
                       f' · {ms:.0f} ms · <a href="{e(url(base, "/sql.csv", q=q))}" id="csv">download CSV</a></p>'
                       + table(t.column_names, (list(r.values()) for r in t.to_pylist()), "sql-result"))
        tables = ", ".join(__import__("flightlog.collector.schema", fromlist=["TABLES"]).TABLES)
        body = f"""<h1>SQL</h1><p class="sub">Read-only DuckDB over the store. Tables: {e(tables)}.</p>
<form method="get" action="{e(base)}/sql" id="sql-form"><textarea name="q" rows="6" cols="100">{e(q)}</textarea>
<br><button type="submit">Run</button></form>{res}"""
        return html(page(base, "SQL", body, "SQL"))

    @app.get("/sql.csv")
    def sql_csv(request: Request):
        import pyarrow.csv as pcsv

        q = request.query_params.get("q") or ""
        if not q.strip():
            raise D.BadInput("q (the SQL) is empty")
        t, _ = _sql(q, SQL_CSV_ROWS)
        buf = io.BytesIO()
        t = t.select([i for i, f in enumerate(t.schema)])
        cols = []
        for f in t.schema:  # CSV cannot hold nested values: write them as JSON text
            c = t.column(f.name)
            if pa.types.is_nested(f.type):
                c = pa.array([None if v is None else json.dumps(v, default=str) for v in c.to_pylist()], pa.string())
            cols.append(c)
        pcsv.write_csv(pa.table(cols, names=t.column_names), buf)
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="flightlog-query.csv"'})

    # -- JSON API ---------------------------------------------------------------------------

    @app.get("/api/runs")
    def api_runs(request: Request):
        q = request.query_params
        limit = _int(q.get("limit"), "limit", 1, 10_000, 100)
        offset = _int(q.get("offset"), "offset", 0, 10**9, 0)
        t = _filtered(request)
        rows = t.slice(offset, limit).to_pylist()
        for r in rows:
            r["params"] = D.params_of(r)
        return JSONResponse(_jsonable({"total": t.num_rows, "offset": offset, "runs": rows}))

    @app.get("/api/runs/{run_id}")
    def api_run(request: Request, run_id: str):
        r = _run(run_id)
        info = _run_info(r["run_id"], "step")
        r["params"] = D.params_of(r)
        return JSONResponse(_jsonable({"run": r, **info}))

    @app.get("/api/series")
    def api_series(request: Request):
        q = request.query_params
        run, name = q.get("run"), q.get("name")
        if not run:
            raise D.BadInput("run is required: /api/series?run=RUN&name=NAME&points=N")
        if not name:
            raise D.BadInput("name is required: /api/series?run=RUN&name=NAME&points=N")
        n, x, lo, hi = D.parse_series_args(q.get("points") or 1000, q.get("x") or "step", q.get("lo"), q.get("hi"))
        rid = _run(run)["run_id"]
        return JSONResponse(_jsonable(D.series(root, rid, name, n, x, lo, hi)))

    return app


def _warm(index) -> None:
    try:
        index.table()
    except Exception:  # a broken store shows its error on the first page instead
        pass


def _duration(r: dict) -> str:
    a = r.get("started_at")
    b = r.get("ended_at") or r.get("updated_at")
    if not a or not b:
        return ""
    s = max(0.0, (b - a).total_seconds())
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.hex()
    return v
