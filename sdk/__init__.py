"""flightlog: a flight recorder for ML training and data pipelines.

Record cheaply (``log``, ``arg``, ``loop``, ``checkpointing``, ``step``), query
with SQL (``query``, ``dataframe``), and replay old runs with new log
statements (``flightlog replay``). Importing this module does no I/O and
starts no threads.
"""
from __future__ import annotations

from flightlog._errors import FlightlogError
import flightlog.query as query  # a callable package: fl.query(sql)
from flightlog._read import dataframe
from flightlog._run import arg, finish, init, log

__version__ = "0.1.0"

__all__ = [
    "init",
    "log",
    "arg",
    "loop",
    "checkpointing",
    "finish",
    "query",
    "dataframe",
    "step",
    "artifact",
    "assertion",
    "check",
    "watch",
    "health",
    "log_predictions",
    "log_histogram",
    "feasibility",
    "inspect",
    "FlightlogError",
]

_LAZY = {
    "loop": ("flightlog._loops", "loop"),
    "checkpointing": ("flightlog._checkpoint", "checkpointing"),
    "step": ("flightlog._steps", "step"),
    "artifact": ("flightlog._steps", "artifact"),
    "assertion": ("flightlog._assertions", "assertion"),
    "check": ("flightlog._assertions", "check"),
    "watch": ("flightlog._assertions", "watch"),
    "health": ("flightlog.query.health", "health"),
    "log_predictions": ("flightlog._predictions", "log_predictions"),
    "log_histogram": ("flightlog._logmore", "log_histogram"),
    "feasibility": ("flightlog._feasibility", "feasibility"),
    "inspect": ("flightlog._inspect", "inspect"),
}


def __getattr__(name: str):
    spec = _LAZY.get(name)
    if spec is None:
        raise AttributeError(f"module 'flightlog' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(spec[0]), spec[1])
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
