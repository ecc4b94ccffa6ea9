"""``fl.log_predictions``: per-example predictions, the input of slice finding.

One call records one row per example in the ``predictions`` table: labels as
strings (so classes, regression targets and text labels share one column),
an optional loss, and the example's features as one JSON object per row.
Everything is built as Arrow columns and handed to the recorder as one
batch; the JSON text is assembled column-wise with Arrow compute (no Python
loop over rows for numeric, boolean or low-cardinality string features), so a
100k-row call costs tens of milliseconds (docs/slices.md, "From the store").

Rows are keyed by ``(epoch, batch, item_id)``. Without ``ids`` the item id is
the row's position among the rows logged in the same loop position, which is
deterministic, so a replay that re-runs the epoch writes the same keys and
readers keep one row per key (the newest). This is recording code: bad input
warns once (``flightlog._warn.problem``) and records nothing; it never raises.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flightlog import _run, _warn
from flightlog.collector import schema as _schema

__all__ = ["log_predictions"]

_seq_lock = threading.Lock()


class _BadInput(ValueError):
    """Input we refuse to record; the message goes into the warning."""


# -- turning user values into Arrow ------------------------------------------------------------


def _module(x: Any) -> str:
    return type(x).__module__.split(".")[0]


def _to_numpy_if_tensor(x: Any) -> Any:
    if _module(x) == "torch":
        return x.detach().cpu().numpy()
    return x


def _as_array(values: Any, what: str) -> pa.Array:
    """A 1-D Arrow array from a list, numpy array, tensor, pandas/polars Series or Arrow array."""
    values = _to_numpy_if_tensor(values)
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    mod = _module(values)
    if mod == "polars":
        return _as_array(values.to_arrow(), what)
    if mod == "pandas":
        import pandas as pd

        if isinstance(values, pd.DataFrame):
            if values.shape[1] != 1:
                raise _BadInput(f"{what} must be one column, got a DataFrame with {values.shape[1]} columns")
            values = values.iloc[:, 0]
        try:
            arr = pa.Array.from_pandas(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            arr = _objects(values.to_numpy(dtype=object))
        return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if isinstance(values, (str, bytes, dict)):
        raise _BadInput(f"{what} must be an array or list, got {type(values).__name__}")
    if not isinstance(values, np.ndarray) and not hasattr(values, "__len__"):
        if not hasattr(values, "__iter__"):
            raise _BadInput(f"{what} must be an array or list, got {type(values).__name__}")
        values = list(values)  # a generator or range-like iterable
    a = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise _BadInput(f"{what} must be 1-D (one value per example), got shape {a.shape}"
                        + ("; pass e.g. probs.argmax(1) for class predictions" if a.ndim == 2 else ""))
    if a.dtype.kind in "biuf":
        return pa.array(a, from_pandas=True)
    try:
        return pa.array(a if a.dtype.kind in "USM" else a.tolist(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return _objects(a)


def _objects(values: Any) -> pa.Array:
    """Strings from arbitrary Python objects (None and NaN stay null)."""
    return pa.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values],
                    type=pa.string())


def _float_text(arr: pa.Array, json_number: bool) -> pa.Array:
    """Shortest round-trip text of floats; NaN/inf become null.

    ``json_number`` keeps floats floats in JSON (``1`` → ``1.0``), so a float
    feature reads back as a float column.
    """
    arr = pc.cast(arr, pa.float64())
    x = arr.to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(x)
        integral = finite & (x == np.trunc(x))
    if not finite.all():
        arr = pc.if_else(pa.array(finite), arr, pa.scalar(None, pa.float64()))
    text = pc.cast(arr, pa.string())
    if json_number and integral.any():  # Arrow prints 3.0 as "3" (large ones as "1e+20")
        plain = pc.match_substring_regex(text, r"^-?[0-9]+$")
        text = pc.if_else(plain, pc.binary_join_element_wise(text, ".0", ""), text)
    return text


def _label_text(arr: pa.Array) -> pa.Array:
    """Labels as strings: ints and integral floats print alike (1 and 1.0 → "1"); bools as 0/1."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_boolean(t):
        return pc.cast(pc.cast(arr, pa.int8()), pa.string())
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return _float_text(arr, json_number=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.cast(arr, pa.string())
    try:
        return pc.cast(arr, pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return _objects(arr.to_pylist())


# -- features → one JSON object per row ---------------------------------------------------------


def _json_strings(arr: pa.Array) -> pa.Array:
    """JSON string literals for a string array, escaping each distinct value once."""
    enc = pc.dictionary_encode(pc.cast(arr, pa.string()))
    quoted = pa.array([json.dumps(v, ensure_ascii=False) for v in enc.dictionary.to_pylist()], pa.string())
    return pc.take(quoted, enc.indices)


def _json_values(arr: pa.Array) -> pa.Array:
    """One JSON value per element (null → ``null``), vectorised by Arrow type."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_null(t):
        out = pa.nulls(len(arr), pa.string())
    elif pa.types.is_boolean(t):
        out = pc.cast(arr, pa.string())
    elif pa.types.is_integer(t):
        out = pc.cast(arr, pa.string())
    elif pa.types.is_floating(t) or pa.types.is_decimal(t):
        out = _float_text(arr, json_number=True)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        out = _json_strings(arr)
    elif pa.types.is_nested(t):
        vals = arr.to_pylist()
        out = pa.array([None if v is None else json.dumps(v, default=str, allow_nan=False)
                        if _finite_tree(v) else json.dumps(str(v)) for v in vals], pa.string())
    else:  # dates, timestamps, binary, …: their text, as JSON strings
        try:
            text = pc.cast(arr, pa.string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
            text = _objects(arr.to_pylist())
        out = _json_strings(text)
    return pc.fill_null(out, "null")


def _finite_tree(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite_tree(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite_tree(x) for x in v)
    return True


def _feature_columns(features: Any) -> list[tuple[str, pa.Array]]:
    """(name, array) pairs for a DataFrame, Arrow table, dict of columns, list of row dicts or 2-D array."""
    from flightlog.query.slices import _columns_of

    features = _to_numpy_if_tensor(features)
    if isinstance(features, dict):
        return [(str(k), _as_array(v, f"feature {k!r}")) for k, v in features.items()]
    if isinstance(features, (list, tuple)) and features and all(isinstance(r, dict) for r in features):
        features = pa.Table.from_pylist([{str(k): v for k, v in r.items()} for r in features])  # records
    if isinstance(features, np.ndarray) and features.ndim == 1:
        features = features.reshape(-1, 1)
    elif not isinstance(features, np.ndarray) and _module(features) not in ("pandas", "polars", "pyarrow"):
        if isinstance(features, (list, tuple)):
            features = np.asarray(features)
            if features.ndim == 1:
                features = features.reshape(-1, 1)
    try:
        return _columns_of(features)
    except (TypeError, ValueError) as e:
        raise _BadInput(f"features: {e}; a dict of columns also works") from None


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            m = f"{n}_{seen[n]}"
            while m in seen:
                seen[n] += 1
                m = f"{n}_{seen[n]}"
            seen[m] = 1
            out.append(m)
        else:
            seen[n] = 1
            out.append(n)
    return out


def features_json(features: Any) -> tuple[pa.Array | None, int | None]:
    """The features as one JSON object string per row, and the row count (None when no features)."""
    if features is None:
        return None, None
    cols = _feature_columns(features)
    if not cols:
        return None, None
    lengths = {len(a) for _, a in cols}
    if len(lengths) != 1:
        raise _BadInput(f"feature columns have different lengths: {sorted(lengths)}")
    n = lengths.pop()
    names = _unique_names([name for name, _ in cols])
    parts: list[Any] = []
    for i, (name, (_, arr)) in enumerate(zip(names, cols)):
        parts.append(("{" if i == 0 else ",") + json.dumps(name, ensure_ascii=False) + ":")
        parts.append(_json_values(arr))
    parts.append("}")
    if n == 0:
        return pa.array([], pa.string()), 0
    return pc.binary_join_element_wise(*parts, ""), n


# -- the public call ----------------------------------------------------------------------------


def _item_ids(run: Any, ids: Any, n: int, ctx: tuple) -> pa.Array:
    if ids is not None:
        arr = _label_text(_as_array(ids, "ids"))
        if len(arr) != n:
            raise _BadInput(f"ids has {len(arr)} entries but there are {n} predictions")
        return arr
    key = (ctx[0], ctx[1], ctx[2])
    with _seq_lock:
        last_key, start = run.predictions_seq
        if last_key != key:
            start = 0
        run.predictions_seq = (key, start + n)
    return pc.cast(pa.array(np.arange(start, start + n, dtype=np.int64)), pa.string())


def build_batch(run: Any, features: Any, y_true: Any, y_pred: Any, loss: Any = None,
                ids: Any = None, now: float | None = None) -> pa.Table | None:
    """The predictions rows of one call as an Arrow table (None when there is nothing to record).

    Raises ``_BadInput`` for input that cannot be recorded; ``log_predictions`` turns it into a warning.
    """
    pred = None if y_pred is None else _label_text(_as_array(y_pred, "y_pred"))
    true = None if y_true is None else _label_text(_as_array(y_true, "y_true"))
    lossa = None
    if loss is not None:
        la = _as_array(loss, "loss")
        if not (pa.types.is_floating(la.type) or pa.types.is_integer(la.type) or pa.types.is_boolean(la.type)
                or pa.types.is_null(la.type)):
            raise _BadInput(f"loss must be numeric, got {la.type}")
        la = pc.cast(la, pa.float64())
        lossa = pc.if_else(pc.is_nan(la), pa.scalar(None, pa.float64()), la)  # NaN: unknown
    feats, nf = features_json(features)
    sizes = {name: len(a) for name, a in (("y_pred", pred), ("y_true", true), ("loss", lossa)) if a is not None}
    if nf is not None:
        sizes["features"] = nf
    if not sizes:
        raise _BadInput("nothing to record: features, y_true, y_pred and loss are all None")
    if len(set(sizes.values())) != 1:
        raise _BadInput("lengths differ: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    n = next(iter(sizes.values()))
    if n == 0:
        return None
    epoch, batch, _ = run.ctx
    ts = _dt.datetime.now(_dt.timezone.utc) if now is None else _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
    cols = {
        "run_id": pa.array([run.run_id], pa.string()).take(pa.array(np.zeros(n, np.int64))),
        "item_id": _item_ids(run, ids, n, run.ctx),
        "y_true": true if true is not None else pa.nulls(n, pa.string()),
        "y_pred": pred if pred is not None else pa.nulls(n, pa.string()),
        "loss": lossa if lossa is not None else pa.nulls(n, pa.float64()),
        "features": feats if feats is not None else pa.nulls(n, pa.string()),
        "epoch": pa.array(np.full(n, epoch, np.int64)) if epoch is not None else pa.nulls(n, pa.int64()),
        "batch": pa.array(np.full(n, batch, np.int64)) if batch is not None else pa.nulls(n, pa.int64()),
        "time": pa.array(np.full(n, int(ts.timestamp() * 1e6), np.int64)).cast(_schema.TS),
    }
    # columns this call does not set (replay_id: added by replay mode) are left to the writer's conform
    return pa.Table.from_pydict(cols, schema=pa.schema([f for f in _schema.PREDICTIONS if f.name in cols]))


def log_predictions(features: Any, y_true: Any, y_pred: Any, loss: Any = None, ids: Any = None) -> None:
    """Record one row per example (labels, loss, features) for slice finding; never raises.

    ``features``: pandas/polars DataFrame, pyarrow Table, dict of columns, list
    of row dicts, or a 2-D numpy array / tensor (columns ``f0``, ``f1``, …). ``y_true``/``y_pred``:
    arrays, lists, Series or tensors, one label per example (ints and integral
    floats are stored alike, ``1``). ``loss``: optional per-example loss (NaN
    means unknown). ``ids``: optional example ids; by default the row's
    position among the rows logged at the same loop position. The rows carry
    the current ``fl.loop`` epoch and batch; ``flightlog slices`` reads them.
    """
    try:
        r = _run.ACTIVE
        if r is None:
            if _run._ENDED_ONCE:
                _warn.problem("log_after_finish", "fl.log_predictions called after the run finished; not recorded")
                return
            r = _run._auto_start()
            if r is None:
                return
        data = build_batch(r, features, y_true, y_pred, loss, ids)
        if data is not None:
            r.rec.emit_table("predictions", data)
    except _BadInput as e:
        _warn.problem("bad_predictions", f"fl.log_predictions: {e}; nothing recorded")
    except Exception as e:  # never into the training loop
        _warn.problem("predictions_error", f"fl.log_predictions failed: {e!r}; nothing recorded")
