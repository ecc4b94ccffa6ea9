"""Server-side HTML: every value that came from the store goes through ``e`` (escape) on its way out.

Plain string building, no template engine: the pages are small, and one
escaping function that every interpolation passes through is easy to audit.
Data for scripts travels in ``data-*`` attributes (escaped like any attribute)
so the Content-Security-Policy can forbid inline scripts.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
from typing import Any, Iterable
from urllib.parse import urlencode

from flightlog import __version__


def e(v: Any) -> str:
    """Escape for HTML text and (quoted) attribute values."""
    return html.escape("" if v is None else str(v), quote=True)


def fmt(v: Any) -> str:
    """A cell value as text (not yet escaped)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.6g}"
    if isinstance(v, _dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return str(v)


def attr_json(v: Any) -> str:
    """JSON for a data-* attribute (escaped)."""
    return e(json.dumps(v, default=str, allow_nan=False))


def url(base: str, path: str, **q: Any) -> str:
    qs = urlencode([(k, v) for k, v in q.items() if v is not None and v != ""], doseq=True)
    return f"{base}{path}" + (f"?{qs}" if qs else "")


def table(cols: list[str], rows: Iterable[Iterable[Any]], cls: str = "", raw_cols: Iterable[int] = ()) -> str:
    """A table; cells of ``raw_cols`` are pre-rendered HTML, every other cell is escaped."""
    raw = set(raw_cols)
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = "".join(f"<td>{c if i in raw else e(fmt(c))}</td>" for i, c in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def kv(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


NAV = (("Runs", "/"), ("Lineage", "/lineage"), ("SQL", "/sql"))


def page(base: str, title: str, body: str, active: str = "", charts: bool = False) -> str:
    """A whole page; ``charts`` adds uPlot (50 KB of script and its CSS), which other pages skip."""
    nav = "".join(f'<a href="{e(base)}{p}"{" class=on" if t == active else ""}>{t}</a>' for t, p in NAV)
    uplot_css = f'<link rel="stylesheet" href="{e(base)}/static/uPlot.min.css">\n' if charts else ""
    uplot_js = f'<script src="{e(base)}/static/uPlot.iife.min.js" defer></script>\n' if charts else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="fl-base" content="{e(base)}">
<title>{e(title)} · flightlog</title>
<link rel="icon" href="data:,">
{uplot_css}<link rel="stylesheet" href="{e(base)}/static/style.css">
{uplot_js}<script src="{e(base)}/static/app.js" defer></script>
</head><body>
<header><a class="brand" href="{e(base)}/">flightlog</a><nav>{nav}</nav><span class="ver">v{e(__version__)}</span></header>
<main>
{body}
</main></body></html>"""


def error_page(base: str, status: int, message: str) -> str:
    return page(base, f"Error {status}", f'<h1>Error {status}</h1><p class="error">{e(message)}</p>'
                                          f'<p><a href="{e(base)}/">Back to the runs</a></p>')


def login_page(base: str, message: str = "") -> str:
    # No stylesheet: the static files are behind the token too.
    msg = f'<p style="color:#b00">{e(message)}</p>' if message else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>flightlog · token</title>
<link rel="icon" href="data:,"></head>
<body style="font:15px system-ui,sans-serif;margin:3em">
<h1>flightlog</h1>{msg}<p>This UI needs the collector's token.</p>
<form method="get" action="{e(base)}/login"><input type="password" name="token" autofocus size="40">
<button type="submit">Open</button></form></body></html>"""
