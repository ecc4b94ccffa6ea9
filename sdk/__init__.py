"""flightlog: a flight recorder for ML training and data pipelines.

Record cheaply (``log``, ``arg``, ``loop``, ``checkpointing``, ``step``), query
with SQL (``query``, ``dataframe``), and replay old runs with new log
statements (``flightlog replay``). Importing this module does no I/O and
starts no threads.

Errors (every one flightlog raises on purpose; recording itself never raises)::

    FlightlogError
     ├── StoreError            the store is missing, empty or unreadable
     │    ├── RunNotFound      no run matches the id given
     │    └── BlobError        a blob reference or content the store must not trust
     ├── QueryError            bad or forbidden SQL
     ├── ReplayError           replay cannot proceed (code changed, checkpoints missing…)
     ├── ConditionError        a gate condition, reliability or budget that cannot be used
     └── AssertionFailed       fl.check(..., mode="raise") found failing items

Warnings::

    FlightlogWarning           something was not recorded; training goes on
     ├── AssertionWarning      fl.check(..., mode="warn") found failing items
     ├── UnknownMetricWarning  fl.dataframe was asked for a metric the run never logged
     └── StoreWarning          a file in the store was skipped by readers

Sinks: ``fl.init(sink=...)`` takes any object with the members of ``Sink``;
``MemorySink`` keeps every batch in memory (tests).
"""
from flightlog._errors import (AssertionFailed, FlightlogError, FlightlogWarning, QueryError, ReplayError,
                               RunNotFound, StoreError)
import flightlog.query as query  # a callable package: fl.query(sql)
from flightlog._read import UnknownMetricWarning, dataframe
from flightlog._record import MemorySink, Sink
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
    "Sink",
    "MemorySink",
    # errors
    "FlightlogError",
    "StoreError",
    "RunNotFound",
    "BlobError",
    "QueryError",
    "ReplayError",
    "ConditionError",
    "AssertionFailed",
    # warnings
    "FlightlogWarning",
    "AssertionWarning",
    "UnknownMetricWarning",
    "StoreWarning",
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
    "BlobError": ("flightlog.collector.store", "BlobError"),
    "ConditionError": ("flightlog.query.gate", "ConditionError"),
    "AssertionWarning": ("flightlog._assertions", "AssertionWarning"),
    "StoreWarning": ("flightlog.query.db", "StoreWarning"),
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
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")} | {"__version__"})
