"""Reading side: DuckDB views over the store, health checks, lineage, slices.

``flightlog.query`` is both this package and the ``fl.query(sql)`` function
users call: the package module is made callable so that ``fl.query("SELECT …")``
and ``flightlog.query.slices.find(...)`` both work as the docs say.

Curated surface: ``connect`` (a read-only DuckDB over a store), ``run_sql``,
``HealthReport`` / ``CheckResult`` (what ``fl.health`` returns), ``StoreWarning``
and ``ConditionError``; the modules (``db``, ``health``, ``lineage``, ``slices``,
``gate``, ``feasibility``) hold the rest. Importing this package loads none of them.
"""
import sys as _sys
import types as _types

__all__ = ["connect", "run_sql", "HealthReport", "CheckResult", "StoreWarning", "ConditionError"]

_LAZY = {
    "connect": "flightlog.query.db",
    "run_sql": "flightlog.query.db",
    "StoreWarning": "flightlog.query.db",
    "HealthReport": "flightlog.query.health",
    "CheckResult": "flightlog.query.health",
    "ConditionError": "flightlog.query.gate",
}


class _CallableModule(_types.ModuleType):
    def __call__(self, sql: str, params=None, *, store=None):
        """Run read-only SQL over the store; returns a pyarrow Table (see ``flightlog._read.query``)."""
        from flightlog._read import _query

        return _query(sql, params, store=store)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'flightlog.query' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})


_sys.modules[__name__].__class__ = _CallableModule
