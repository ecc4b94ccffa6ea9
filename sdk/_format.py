"""Rendering Arrow tables for the terminal and for files (the CLI's output)."""
from __future__ import annotations

import datetime as _dt
import io
import json
import math
import sys
from typing import Any

import pyarrow as pa

FORMATS = ("table", "csv", "json", "parquet")

# What datetime can hold, a day inside each end (time zones): years 1..9999
_TS_LO_US = -62135596800_000000 + 86_400_000000
_TS_HI_US = 253402300799_000000 - 86_400_000000
_PER_US = {"s": 1e-6, "ms": 1e-3, "us": 1, "ns": 1000}


def bounded_times(t: pa.Table) -> pa.Table:
    """``t`` with timestamps and dates that Python cannot represent (outside years 1-9999) set to null.

    A stored time is untrusted: one absurd value must read as unknown, not make every
    reader raise (``to_pylist`` raises on it) or print a wrapped-around year.
    """
    import pyarrow.compute as pc

    for i, f in enumerate(t.schema):
        ty = f.type
        if pa.types.is_timestamp(ty):
            per = _PER_US[ty.unit]
            lo, hi = int(_TS_LO_US * per), int(_TS_HI_US * per)
        elif pa.types.is_date32(ty):
            lo, hi = _TS_LO_US // 86_400_000000, _TS_HI_US // 86_400_000000
        elif pa.types.is_date64(ty):
            lo, hi = _TS_LO_US // 1000, _TS_HI_US // 1000
        else:
            continue
        col = t.column(i)
        it = pa.int32() if pa.types.is_date32(ty) else pa.int64()
        raw = pc.cast(col, it)
        lo, hi = max(lo, -(2**63)), min(hi, 2**63 - 1)
        bad = pc.or_(pc.less(raw, pa.scalar(lo, it)), pc.greater(raw, pa.scalar(hi, it)))
        if pc.any(bad).as_py():
            t = t.set_column(i, f, pc.if_else(bad, pa.nulls(1, ty)[0], col))  # pa.scalar(None, ty) imports pandas
    return t


def _cell(v: Any, width: int = 60) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        s = f"{v:.6g}"
    elif isinstance(v, _dt.datetime):
        s = v.strftime("%Y-%m-%d %H:%M:%S")
    else:
        s = str(v)
    s = s.replace("\n", " ")
    return s if len(s) <= width else s[: width - 1] + "…"


def text_table(t: pa.Table, max_rows: int | None = 200, width: int = 60) -> str:
    """An aligned plain-text table; numbers right-aligned."""
    cols = t.column_names
    if not cols:
        return "(no columns)"
    rows = bounded_times(t.slice(0, max_rows) if max_rows else t).to_pylist()
    cells = [[_cell(r[c], width) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in t.schema]
    def fmt(row):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)).rstrip()
    out = [fmt(cols), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in cells]
    if max_rows and t.num_rows > max_rows:
        out.append(f"… {t.num_rows - max_rows} more rows (use --format csv/json/parquet --output FILE for all)")
    out.append(f"({t.num_rows} row{'s' if t.num_rows != 1 else ''})")
    return "\n".join(out)


def _json_default(v: Any):
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return str(v)


def _clean_float(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _clean_float(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean_float(x) for x in v]
    return v


def to_json(t: pa.Table) -> str:
    return json.dumps([_clean_float(r) for r in bounded_times(t).to_pylist()], default=_json_default, indent=None)


def check_output(output: str) -> None:
    """Refuse (one line, with the fix) an --output path whose folder does not exist or is not writable."""
    import os

    from flightlog._errors import FlightlogError

    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise FlightlogError(f"--output {output} is a folder; give a file name, e.g. {os.path.join(output, 'out.csv')}")
    if not os.path.isdir(folder):
        raise FlightlogError(f"--output {output}: folder {folder} does not exist (create it first: mkdir -p {folder})")
    if not os.access(folder, os.W_OK):
        raise FlightlogError(f"--output {output}: folder {folder} is not writable")


def write(t: pa.Table, fmt: str = "table", output: str | None = None) -> None:
    """Write ``t`` as ``fmt`` to ``output`` (a path) or stdout."""
    if output:
        check_output(output)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if output:
            pq.write_table(t, output)
        else:
            buf = io.BytesIO()
            pq.write_table(t, buf)
            sys.stdout.buffer.write(buf.getvalue())
        return
    if fmt == "csv":
        import pyarrow.csv as pcsv

        t = bounded_times(t)
        safe = pa.table({n: (c.cast(pa.string()) if not (pa.types.is_primitive(c.type) or pa.types.is_string(c.type)
                                                        or pa.types.is_timestamp(c.type)) else c)
                         for n, c in zip(t.column_names, t.columns)})
        buf = io.BytesIO()
        pcsv.write_csv(safe, buf)
        text = buf.getvalue().decode()
    elif fmt == "json":
        text = to_json(t) + "\n"
    else:
        text = text_table(t) + "\n"
    if output:
        with open(output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
