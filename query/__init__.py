"""Reading side: DuckDB views over the store, health checks, lineage, slices.

``flightlog.query`` is both this package and the ``fl.query(sql)`` function
users call: the package module is made callable so that ``fl.query("SELECT …")``
and ``flightlog.query.slices.find(...)`` both work as the docs say.
"""
from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, sql: str, params=None, *, store=None):
        """Run read-only SQL over the store; returns a pyarrow Table (see ``flightlog._read.query``)."""
        from flightlog._read import _query

        return _query(sql, params, store=store)


sys.modules[__name__].__class__ = _CallableModule
