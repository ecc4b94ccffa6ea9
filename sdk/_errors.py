"""The exception and warning trees. Recording never raises; reading, the CLI and replay may.

FlightlogError
 ├── StoreError          the store is missing, empty or unreadable
 │    ├── RunNotFound    no run matches the id given
 │    └── BlobError      a blob reference or content the store must not trust (collector.blobs)
 ├── QueryError          bad or forbidden SQL (wraps duckdb errors)
 ├── ReplayError         replay cannot proceed (code changed, checkpoints missing…)
 ├── ConditionError      a gate condition, reliability or budget that cannot be used (query.gate)
 └── AssertionFailed     fl.check(..., mode="raise") found failing items (the one error
                         recording raises on purpose, because the user asked for it)

FlightlogWarning         something was not recorded (dropped rows, failed writes…); training goes on
 ├── AssertionWarning    fl.check(..., mode="warn") found failing items
 ├── UnknownMetricWarning  fl.dataframe was asked for a metric the run never logged
 └── StoreWarning        a file in the store was skipped by readers (query.db)

Subclasses live next to the code that raises them; ``flightlog`` exports them all.
"""


class FlightlogError(Exception):
    """Root of every error flightlog raises on purpose."""


class StoreError(FlightlogError):
    pass


class RunNotFound(StoreError):
    pass


class QueryError(FlightlogError):
    pass


class ReplayError(FlightlogError):
    pass


class FlightlogWarning(UserWarning):
    """Root of flightlog's warnings; issued itself when something was not recorded (training goes on)."""


class AssertionFailed(FlightlogError):
    """``fl.check(..., mode="raise")`` found failing items; ``.outcome`` holds the details."""

    def __init__(self, message: str, outcome=None) -> None:
        super().__init__(message)
        self.outcome = outcome
