"""Every table's Arrow schema: the single source of truth for the store.

The embedded writer, the collector server and the DuckDB views all read these
definitions, so a column added here appears everywhere at once. Columns may be
added over time (readers use ``union_by_name``); they are never renamed.

Conventions: times are UTC microsecond timestamps; free-form structures
(loop context, params, attributes, summaries) are JSON strings so that any
Parquet reader can use them and DuckDB's JSON functions apply.
"""
from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

RUNS = pa.schema(
    [
        ("run_id", pa.string()),
        ("project", pa.string()),
        ("name", pa.string()),
        ("parent_run_id", pa.string()),  # resumed-from or replayed-from run
        ("kind", pa.string()),  # train | resume | replay
        ("status", pa.string()),  # running | finished | failed | killed (readers add crashed)
        ("started_at", TS),
        ("ended_at", TS),
        ("updated_at", TS),  # heartbeat: newest row per run wins
        ("argv", pa.string()),  # JSON list
        ("script", pa.string()),
        ("cwd", pa.string()),
        ("code_snapshot", pa.string()),  # content hash of the snapshot manifest blob
        ("git_commit", pa.string()),
        ("git_dirty", pa.bool_()),
        ("host", pa.string()),
        ("pid", pa.int64()),
        ("python_version", pa.string()),
        ("numpy_version", pa.string()),
        ("torch_version", pa.string()),
        ("torch_threads", pa.int64()),  # replay uses the same count: float results depend on it
        ("params", pa.string()),  # JSON object of fl.arg values
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("dropped_rows", pa.int64()),
        ("counters", pa.string()),  # JSON object: warnings / drops by kind
        ("tags", pa.string()),  # JSON list of strings (fl.init(tags=), flightlog tag)
        ("notes", pa.string()),  # free text (fl.init(notes=), flightlog note)
        # when tags/notes were last set: readers take tags and notes from the row with the newest
        # annotated_at, so `flightlog tag` on a live run is not undone by the run's next heartbeat row
        ("annotated_at", TS),
    ]
)

METRICS = pa.schema(
    [
        ("run_id", pa.string()),
        ("name", pa.string()),
        ("value", pa.float64()),
        ("step", pa.int64()),
        ("epoch", pa.int64()),  # index of the outermost fl.loop, null outside loops
        ("batch", pa.int64()),  # index of the innermost nested fl.loop, null at depth < 2
        ("ctx", pa.string()),  # JSON object: every enclosing loop name -> index
        ("wall_time", TS),
        ("source", pa.string()),  # record | replay
        ("writer", pa.string()),  # host:pid[:rank] of the process that logged it
        ("replay_id", pa.string()),  # the replay that wrote it (source='replay'), else null
        ("rank", pa.int64()),  # torch.distributed rank (env RANK) of the process; null in a one-process run
    ]
)

SPANS = pa.schema(
    [
        ("run_id", pa.string()),
        ("trace_id", pa.string()),
        ("span_id", pa.string()),
        ("parent_span_id", pa.string()),
        ("name", pa.string()),
        ("kind", pa.string()),
        ("start_time", TS),
        ("end_time", TS),
        ("duration_ms", pa.float64()),
        ("status", pa.string()),  # ok | error | unset
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("epoch", pa.int64()),
        ("batch", pa.int64()),
        ("ctx", pa.string()),
        ("attributes", pa.string()),  # JSON
        ("service_name", pa.string()),
        ("writer", pa.string()),
        ("replay_id", pa.string()),  # set on rows a replay worker wrote
    ]
)

IO = pa.schema(
    [
        ("run_id", pa.string()),
        ("span_id", pa.string()),
        ("step_name", pa.string()),
        ("direction", pa.string()),  # input | output
        ("arg", pa.string()),  # argument name, "return", or a file role
        ("fingerprint", pa.string()),
        ("type", pa.string()),
        ("shape", pa.string()),
        ("dtype", pa.string()),
        ("bytes", pa.int64()),
        ("summary", pa.string()),  # JSON summary statistics
        ("path", pa.string()),  # file artifacts
        ("payload", pa.string()),  # blob reference of a captured value
        ("time", TS),
        ("replay_id", pa.string()),  # set on rows a replay worker wrote
    ]
)

CHECKPOINTS = pa.schema(
    [
        ("run_id", pa.string()),
        ("loop", pa.string()),
        ("iteration", pa.int64()),  # index of the outer-loop iteration (-1: before the first)
        # where in that iteration: inner_exit (its first inner fl.loop just ended),
        # iteration_end (no inner loop), loop_start (before iteration 0)
        ("position", pa.string()),
        ("path", pa.string()),  # relative to the store
        ("bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("copy_ms", pa.float64()),  # time the training thread was stalled
        ("write_ms", pa.float64()),  # background serialise + hash + write
        ("loop_ms", pa.float64()),  # duration of the iteration that produced it
        ("time", TS),
        ("status", pa.string()),  # ok | failed
        ("error", pa.string()),
        # JSON {"vars": [loop variables saved besides the registered objects],
        #       "uncaptured": {name: why}}; null for checkpoints written before this column
        ("captured", pa.string()),
        # the process that wrote it (env RANK; null with one process): under torchrun a plain fl.loop
        # script's ranks each checkpoint their own state; the integrations' rank 0 writes every rank's RNG
        ("rank", pa.int64()),
    ]
)

ASSERTIONS = pa.schema(
    [
        ("run_id", pa.string()),
        ("span_id", pa.string()),
        ("assertion", pa.string()),
        ("item_id", pa.string()),
        ("severity", pa.float64()),
        ("message", pa.string()),
        ("correction", pa.string()),
        ("epoch", pa.int64()),
        ("batch", pa.int64()),
        ("ctx", pa.string()),
        ("time", TS),
    ]
)

PREDICTIONS = pa.schema(
    [
        ("run_id", pa.string()),
        ("item_id", pa.string()),
        ("y_true", pa.string()),
        ("y_pred", pa.string()),
        ("loss", pa.float64()),
        ("features", pa.string()),  # JSON object column -> value
        ("epoch", pa.int64()),
        ("batch", pa.int64()),
        ("time", TS),
        ("replay_id", pa.string()),  # set on rows a replay worker wrote
    ]
)

REPLAYS = pa.schema(
    [
        ("run_id", pa.string()),  # the run that was replayed
        ("replay_id", pa.string()),
        ("segment", pa.string()),  # e.g. "3:7"
        ("status", pa.string()),  # ok | failed
        ("fidelity", pa.string()),  # exact | within tolerance | diverged | failed | unchecked
        ("compared", pa.int64()),
        ("max_abs_diff", pa.float64()),
        ("first_divergence", pa.string()),  # JSON
        ("new_names", pa.string()),  # JSON list
        ("started_at", TS),
        ("ended_at", TS),
        ("error", pa.string()),
        ("verified", pa.int64()),  # new values checked against a full re-execution of one epoch
        ("plan", pa.string()),  # fast | full | from_start (exact re-execution from the start)
        ("scratch", pa.string()),  # folder holding the files the script wrote during the replay
    ]
)

GATES = pa.schema(
    [
        # One row per `flightlog gate` evaluation, written under the candidate run's partition.
        ("run_id", pa.string()),  # the candidate run
        ("baseline_run_id", pa.string()),
        ("condition", pa.string()),  # canonical text, e.g. "n - o > 0.02 +/- 0.01"
        ("result", pa.string()),  # pass | fail | insufficient
        ("mode", pa.string()),  # fp-free | fn-free
        ("adaptivity", pa.string()),  # none | full | firstChange
        ("reliability", pa.float64()),
        ("steps", pa.int64()),  # the test set's budget of evaluations
        ("testset", pa.string()),  # --testset, or "ids-<hash of the joined item ids>"
        ("step", pa.int64()),  # 1-based index of this evaluation on (testset, condition)
        ("examples", pa.int64()),  # items both runs predicted
        ("labelled", pa.int64()),  # of those, items with a label
        ("needed", pa.int64()),  # examples the bound asks for (max over clauses)
        ("n", pa.float64()),  # accuracy of the candidate on the labelled items
        ("o", pa.float64()),  # accuracy of the baseline
        ("d", pa.float64()),  # fraction of items where the predictions differ
        ("details", pa.string()),  # JSON: per-clause estimates, bounds, epochs, dropped items
        ("time", TS),
    ]
)

HISTOGRAMS = pa.schema(
    [
        # fl.log_histogram: one row per call; bins as JSON lists (edges has one more entry than counts)
        ("run_id", pa.string()),
        ("name", pa.string()),
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("batch", pa.int64()),
        ("ctx", pa.string()),
        ("edges", pa.string()),  # JSON list of bin edges, ascending
        ("counts", pa.string()),  # JSON list of counts per bin
        ("count", pa.int64()),  # finite values binned
        ("nonfinite", pa.int64()),  # NaN/inf values left out of the bins
        ("min", pa.float64()),
        ("max", pa.float64()),
        ("mean", pa.float64()),
        ("wall_time", TS),
        ("source", pa.string()),  # record | replay
        ("writer", pa.string()),
        ("replay_id", pa.string()),
    ]
)

# one row per transformation per feasibility study (fl.feasibility / flightlog feasibility);
# the call-level fields (target, verdict, minimal bound) repeat on each row of the same analysis_id
FEASIBILITY = pa.schema(
    [
        ("run_id", pa.string()),
        ("analysis_id", pa.string()),  # one id per study
        ("source", pa.string()),  # sdk (fl.feasibility) | cli (flightlog feasibility)
        ("input", pa.string()),  # what was analysed, e.g. "fl.feasibility", "predictions epoch 3"
        ("transform", pa.string()),
        ("dims", pa.int64()),  # feature count after the transformation
        ("n_train", pa.int64()),
        ("n_test", pa.int64()),
        ("classes", pa.int64()),
        ("rows_skipped", pa.int64()),  # rows left out for missing labels / non-finite features
        ("r1", pa.float64()),  # exact 1-NN error on the held-out rows
        ("r1_se", pa.float64()),
        ("bound", pa.float64()),  # Cover-Hart lower bound on the Bayes error in this transformation
        ("slope", pa.float64()),  # change of the bound per doubling of the training rows
        ("curve", pa.string()),  # JSON [[training rows, R1], ...]
        ("best", pa.bool_()),  # the transformation with the minimal bound
        ("bound_min", pa.float64()),
        ("projected", pa.float64()),
        ("target_error", pa.float64()),
        ("verdict", pa.string()),  # feasible | unlikely | undecided | null (no target)
        ("test_size", pa.float64()),
        ("seed", pa.int64()),
        ("seconds", pa.float64()),
        ("time", TS),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "runs": RUNS,
    "metrics": METRICS,
    "spans": SPANS,
    "io": IO,
    "checkpoints": CHECKPOINTS,
    "assertions": ASSERTIONS,
    "predictions": PREDICTIONS,
    "replays": REPLAYS,
    "gates": GATES,
    "histograms": HISTOGRAMS,
    "feasibility": FEASIBILITY,
}


def schema(table: str) -> pa.Schema:
    """The schema of ``table``; KeyError names the known tables."""
    try:
        return TABLES[table]
    except KeyError:
        raise KeyError(f"unknown table {table!r}; known: {', '.join(TABLES)}") from None


def conform(table: str, data: pa.Table, keep_dictionary: bool = False) -> pa.Table:
    """Cast ``data`` to the table's schema: missing columns become nulls, extras are an error.

    Used by every writer so that parts written by different processes always
    union cleanly. ``keep_dictionary`` lets dictionary-encoded string columns
    through as they are (Parquet stores them as dictionaries either way).
    """
    target = schema(table)
    fields: list[pa.Field] = []
    extra = [n for n in data.column_names if target.get_field_index(n) < 0]
    if extra:
        raise ValueError(f"table {table!r} has no column(s) {', '.join(extra)}")
    cols = []
    for field in target:
        if field.name in data.column_names:
            col = data.column(field.name)
            if keep_dictionary and pa.types.is_dictionary(col.type) and col.type.value_type.equals(field.type):
                cols.append(col)
                fields.append(pa.field(field.name, col.type))
                continue
            if not col.type.equals(field.type):
                col = col.cast(field.type)
            cols.append(col)
        else:
            cols.append(pa.nulls(data.num_rows, field.type))
        fields.append(field)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))
