"""The exception tree. Recording never raises; reading, the CLI and replay may.

FlightlogError
 ├── StoreError          the store is missing, empty or unreadable
 │    └── RunNotFound    no run matches the id given
 ├── QueryError          bad or forbidden SQL (wraps duckdb errors)
 ├── ReplayError         replay cannot proceed (code changed, checkpoints missing…)
 └── AssertionFailed     fl.check(..., mode="raise") found failing items (the one error
                         recording raises on purpose, because the user asked for it)
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


class AssertionFailed(FlightlogError):
    """``fl.check(..., mode="raise")`` found failing items; ``.outcome`` holds the details."""

    def __init__(self, message: str, outcome=None) -> None:
        super().__init__(message)
        self.outcome = outcome
