"""Receiving records and persisting them: table schemas, the Parquet store, the collector.

Curated surface (the rest is reached through the modules, e.g. ``collector.schema``):
``LocalSink`` (writes a run's batches into a store), ``CollectorSink`` (sends them to
``flightlog serve``, spooling while it is away), ``ServerThread`` (a collector in a
thread: tests, notebooks) and ``BlobError``. Importing this package loads none of them.
"""

__all__ = ["LocalSink", "CollectorSink", "ServerThread", "BlobError"]

_LAZY = {
    "LocalSink": "flightlog.collector.store",
    "BlobError": "flightlog.collector.blobs",
    "CollectorSink": "flightlog.collector.client",
    "ServerThread": "flightlog.collector.server",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'flightlog.collector' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})
