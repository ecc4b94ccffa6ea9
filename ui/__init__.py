"""The web UI over a store: runs, charts, replays, health, steps, lineage, SQL (``flightlog ui``,
whose arguments live in sdk/_serve_cli.py).

Server-rendered pages (FastAPI, no build step) with vendored uPlot for charts;
series are downsampled in DuckDB so that 10M-point metrics stay interactive.
The same app is mounted by ``flightlog serve`` under ``/ui``. See docs/ui.md.
"""
__all__ = ["create_app"]


def create_app(store=None, token: str | None = None, **kw):
    """The UI's ASGI app over ``store`` (read only); ``token`` guards every route."""
    from flightlog.ui.app import create_app as _create

    return _create(store, token, **kw)
