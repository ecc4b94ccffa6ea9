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
# Only the error classes are imported here. Every other public name is resolved on first use
# (module ``__getattr__`` below), so that importing ``flightlog.collector`` or ``flightlog.query``,
# whose parent package this is, loads no recording runtime (tests/test_import_graph.py).
from flightlog._errors import (AssertionFailed, FlightlogError, FlightlogWarning, QueryError, ReplayError,
                               RunNotFound, StoreError)

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

_LAZY = {  # public name -> (module, attribute); attribute None: the module itself
    "init": ("flightlog._run", "init"),
    "log": ("flightlog._run", "log"),
    "arg": ("flightlog._run", "arg"),
    "finish": ("flightlog._run", "finish"),
    "query": ("flightlog.query", None),  # a callable package: fl.query(sql)
    "dataframe": ("flightlog._read", "dataframe"),
    "UnknownMetricWarning": ("flightlog._read", "UnknownMetricWarning"),
    "Sink": ("flightlog._record", "Sink"),
    "MemorySink": ("flightlog._record", "MemorySink"),
    "loop": ("flightlog._loops", "loop"),
    "checkpointing": ("flightlog._checkpoint", "checkpointing"),
    "step": ("flightlog._steps", "step"),
    "artifact": ("flightlog._steps", "artifact"),
    "assertion": ("flightlog._assertions", "assertion"),
    "check": ("flightlog._assertions", "check"),
    "watch": ("flightlog._watch", "watch"),
    "health": ("flightlog.query.health", "health"),
    "log_predictions": ("flightlog._predictions", "log_predictions"),
    "log_histogram": ("flightlog._logmore", "log_histogram"),
    "feasibility": ("flightlog._feasibility", "feasibility"),
    "inspect": ("flightlog._inspect", "inspect"),
    "BlobError": ("flightlog.collector.blobs", "BlobError"),
    "ConditionError": ("flightlog.query.gate", "ConditionError"),
    "AssertionWarning": ("flightlog._assertions", "AssertionWarning"),
    "StoreWarning": ("flightlog.query.db", "StoreWarning"),
}


def __getattr__(name: str):
    spec = _LAZY.get(name)
    if spec is None:
        raise AttributeError(f"module 'flightlog' has no attribute {name!r}")
    import importlib

    mod = importlib.import_module(spec[0])
    value = mod if spec[1] is None else getattr(mod, spec[1])
    globals()[name] = value  # the next access is a plain global lookup (fl.log on the hot path)
    return value


def __dir__():
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")} | {"__version__"})
