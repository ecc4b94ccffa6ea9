"""The public surface: one curated __all__ per package, frozen; the exception and warning trees; no RuntimeError."""
from __future__ import annotations

import importlib
import pathlib
import re
import types

import pytest

import flightlog as fl

ROOT = pathlib.Path(fl.__file__).resolve().parent.parent  # the repository: sdk/ is the flightlog package

SURFACES = {
    "flightlog": [
        "init", "log", "arg", "loop", "checkpointing", "finish", "query", "dataframe", "step", "artifact",
        "assertion", "check", "watch", "health", "log_predictions", "log_histogram", "feasibility", "inspect",
        "Sink", "MemorySink",
        "FlightlogError", "StoreError", "RunNotFound", "BlobError", "QueryError", "ReplayError", "ConditionError",
        "AssertionFailed",
        "FlightlogWarning", "AssertionWarning", "UnknownMetricWarning", "StoreWarning",
    ],
    "flightlog.collector": ["LocalSink", "CollectorSink", "ServerThread", "BlobError"],
    "flightlog.query": ["connect", "run_sql", "HealthReport", "CheckResult", "StoreWarning", "ConditionError"],
    "flightlog.replay": ["run"],
    "flightlog.ui": ["create_app"],
}


def _public(mod: types.ModuleType) -> set[str]:
    """Public names in the module's namespace, not counting its imported submodules."""
    return {n for n, v in vars(mod).items()
            if not n.startswith("_")
            and not (isinstance(v, types.ModuleType) and v.__name__.startswith(mod.__name__ + "."))}


@pytest.mark.parametrize("name", sorted(SURFACES))
def test_package_surface_is_frozen(name):
    """Each package's __all__ is exactly the curated list, every name resolves, and vars() holds nothing else public."""
    mod = importlib.import_module(name)
    assert mod.__all__ == SURFACES[name]
    for n in mod.__all__:
        assert getattr(mod, n) is not None
    leaked = _public(mod) - set(mod.__all__)
    assert not leaked, f"{name} exposes names outside __all__: {sorted(leaked)}"
    assert {n for n in dir(mod) if not n.startswith("_")} <= set(mod.__all__) | {
        n for n in dir(mod) if isinstance(getattr(mod, n), types.ModuleType)}


def test_exception_tree():
    """Every error class is a FlightlogError in the documented tree, and exported from flightlog."""
    assert issubclass(fl.StoreError, fl.FlightlogError)
    assert issubclass(fl.RunNotFound, fl.StoreError) and issubclass(fl.BlobError, fl.StoreError)
    for cls in (fl.QueryError, fl.ReplayError, fl.ConditionError, fl.AssertionFailed):
        assert issubclass(cls, fl.FlightlogError) and not issubclass(cls, fl.StoreError)
    from flightlog.ui.data import BadInput, NotFound

    assert issubclass(BadInput, fl.FlightlogError) and issubclass(NotFound, fl.FlightlogError)
    for n in ("FlightlogError", "StoreError", "RunNotFound", "BlobError", "QueryError", "ReplayError",
              "ConditionError", "AssertionFailed"):
        assert n in fl.__doc__  # drawn in the root docstring


def test_warning_tree():
    """The warning classes share the FlightlogWarning root; recording problems are FlightlogWarnings."""
    for cls in (fl.AssertionWarning, fl.UnknownMetricWarning, fl.StoreWarning):
        assert issubclass(cls, fl.FlightlogWarning) and cls.__name__ in fl.__doc__
    assert issubclass(fl.FlightlogWarning, UserWarning)
    from flightlog import _warn

    assert _warn.FlightlogWarning is fl.FlightlogWarning
    with pytest.warns(fl.FlightlogWarning):
        _warn.problem("surface_test", "a recording problem")


def test_no_runtime_error_raised_by_our_code():
    """No module of sdk/, collector/, query/, replay/ or ui/ raises a bare RuntimeError (it raises a FlightlogError)."""
    found = []
    for folder in ("sdk", "collector", "query", "replay", "ui"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\braise\s+RuntimeError\b", line):
                    found.append(f"{path.relative_to(ROOT)}:{i}")
    assert not found, found


def test_error_classes_defined_in_the_package_are_in_the_tree():
    """Every *Error/*Warning class defined in the package's modules derives from the two roots (private and internal ones aside)."""
    internal = {"BadRequest", "OTLPDecodeError", "Unhashable", "Unavailable"}  # never leave their module
    pattern = re.compile(r"^class ((?!_)\w+(?:Error|Warning|Failed|NotFound|Input))\((\w+)\)", re.M)
    strays = []
    for folder in ("sdk", "collector", "query", "replay", "ui"):
        for path in (ROOT / folder).rglob("*.py"):
            for cls, base in pattern.findall(path.read_text()):
                if cls not in internal and base in ("Exception", "UserWarning", "RuntimeError", "ValueError"):
                    if not (cls == "FlightlogError" or (cls == "FlightlogWarning" and base == "UserWarning")):
                        strays.append(f"{path.relative_to(ROOT)}: {cls}({base})")
    assert not strays, strays
