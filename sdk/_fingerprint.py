"""Content fingerprints and cheap summaries of step inputs, outputs and files.

A fingerprint is the xxh3-128 hex digest of a value's content, prefixed by a
domain tag (dtype and shape for arrays, column names and types for tables) so
that equal bytes of different kinds never collide. Buffers up to
``HASH_FULL_LIMIT`` bytes are hashed in full (xxh3 runs at several GB/s);
larger ones get a *sampled* hash: the total size, the first and last
``SAMPLE_EDGE`` bytes and ``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BLOCK`` bytes at
evenly spaced offsets. The summary says which (``"hash": "full" | "sampled"``).

:func:`describe` never raises: what cannot be fingerprinted (unpicklable
objects, generators, recursive or too deep containers) gets its type and no
fingerprint. The summary JSON format is documented in ``docs/steps.md``.
"""
from __future__ import annotations

import io as _io
import json
import math
import os
import pickle
import sys
import types
from typing import Any

import numpy as np
import xxhash

HASH_FULL_LIMIT = 1 << 30  # bytes hashed in full; beyond, a sampled hash
SAMPLE_EDGE = 32 << 20  # sampled hash: this many bytes at each end ...
SAMPLE_BLOCKS = 64  # ... plus this many evenly spaced blocks ...
SAMPLE_BLOCK = 1 << 20  # ... of this size
OBJECT_HASH_LIMIT = 4 << 20  # other objects: hash of their pickle when it is at most this big
STATS_SAMPLE = 1_000_000  # count/min/max/mean from at most this many values (evenly spaced)
HIST_SAMPLE = 20_000  # histogram and category counts from at most this many values
HIST_BINS = 10
TOP_K = 20
MAX_COLUMNS = 200  # columns summarised per table / 2-D array
MAX_ITEMS = 1_000  # container items hashed in full; beyond, the first and last halves + the length
MAX_DEPTH = 4  # container nesting hashed; deeper values leave the container without fingerprint
SAMPLE_ROWS = 20  # rows kept by capture="sample"
MAX_PATH_LEN = 4096

_new = xxhash.xxh3_128
_hexd = xxhash.xxh3_128_hexdigest
_SCALARS = (int, float, bool, type(None), complex)
_SKIP_TYPES = (types.GeneratorType, types.AsyncGeneratorType, types.CoroutineType, types.FunctionType,
               types.BuiltinFunctionType, types.MethodType, types.ModuleType, type, _io.IOBase)
_type_names: dict[type, str] = {}
_file_cache: dict[str, tuple[tuple, str, int, bool]] = {}


class Unhashable(Exception):
    """Internal: a value has no fingerprint (the reason is the message)."""


def type_name(v: Any) -> str:
    """``int``, ``numpy.ndarray``, ``pandas.DataFrame``: top-level package + class name."""
    t = type(v)
    n = _type_names.get(t)
    if n is None:
        mod = getattr(t, "__module__", "") or ""
        top = mod.split(".", 1)[0]
        n = t.__qualname__ if top in ("builtins", "") else f"{top}.{t.__qualname__}"
        _type_names[t] = n
    return n


# -- hashing buffers -------------------------------------------------------------

def _update_buffer(h, buf) -> bool:
    """Feed a contiguous byte buffer; returns True when it was sampled."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, (bytes, bytearray)) else buf
    n = len(mv)
    if n <= HASH_FULL_LIMIT:
        h.update(mv)
        return False
    h.update(b"sampled:%d:" % n)
    h.update(mv[:SAMPLE_EDGE])
    h.update(mv[n - SAMPLE_EDGE:])
    step = (n - 2 * SAMPLE_EDGE - SAMPLE_BLOCK) // max(1, SAMPLE_BLOCKS - 1)
    for k in range(SAMPLE_BLOCKS):
        off = SAMPLE_EDGE + k * step
        h.update(mv[off:off + SAMPLE_BLOCK])
    return True


def _u8(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


class _Capped:
    """A write-only file that hashes what is written and stops past a limit."""

    def __init__(self, limit: int, keep: bool = False) -> None:
        self.h = _new()
        self.n = 0
        self.limit = limit
        self.parts: list[bytes] | None = [] if keep else None

    def write(self, b) -> int:
        if not isinstance(b, bytes):  # protocol 5 hands over PickleBuffers of big arrays
            b = memoryview(b).cast("B")
        n = len(b)
        self.n += n
        if self.n > self.limit:
            raise Unhashable(f"pickled size exceeds {self.limit} bytes")
        self.h.update(b)
        if self.parts is not None:
            self.parts.append(bytes(b))
        return n


# -- summaries -------------------------------------------------------------------

def _num(x: Any) -> Any:
    """A JSON-safe number: NaN/inf become strings."""
    x = float(x) if not isinstance(x, (int, np.integer)) else int(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _stride(n: int, k: int) -> int:
    return max(1, -(-n // k))


def numeric_stats(x: np.ndarray) -> dict:
    """count, nulls (NaN), min, max, mean and a quantile histogram of a 1-D numeric array."""
    n_total = int(x.shape[0])
    sampled = n_total > STATS_SAMPLE
    if sampled:
        x = x[:: _stride(n_total, STATS_SAMPLE)]
    if x.dtype.kind == "b":
        x = x.astype(np.int8)
    if x.dtype.kind == "f":
        nan = np.isnan(x)
        nulls = int(nan.sum())
        v = x[~nan] if nulls else x
    else:
        nulls, v = 0, x
    out: dict[str, Any] = {"type": "numeric", "dtype": str(x.dtype), "count": int(v.shape[0]), "nulls": nulls}
    if sampled:
        out["sampled"] = int(x.shape[0])
    if v.shape[0]:
        fin = v if v.dtype.kind != "f" else v[np.isfinite(v)]
        out["min"] = _num(v.min())
        out["max"] = _num(v.max())
        with np.errstate(over="ignore", invalid="ignore"):  # huge values: an inf mean, not a warning in user code
            out["mean"] = _num(fin.mean(dtype=np.float64)) if fin.shape[0] else None
            if fin.shape[0]:
                out["hist"] = _hist(fin)
    return out


def _hist(v: np.ndarray) -> dict:
    n = v.shape[0]
    if n > HIST_SAMPLE:
        v = v[:: _stride(n, HIST_SAMPLE)]
    s = np.sort(v.astype(np.float64, copy=False))
    m = s.shape[0]
    pos = np.linspace(0, m - 1, HIST_BINS + 1).round().astype(np.int64)
    edges = s[pos]
    lo = np.searchsorted(s, edges, side="left")
    counts = np.diff(lo)
    counts[-1] += m - lo[-1]  # last bin is closed on the right
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "n": int(m)}


def categorical_stats(arr) -> dict:
    """count, nulls, distinct and the top values (with counts) of a pyarrow array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n_total = len(arr)
    sampled = n_total > HIST_SAMPLE
    if sampled:
        arr = arr.take(pa.array(np.arange(0, n_total, _stride(n_total, HIST_SAMPLE))))
    nulls = arr.null_count
    out: dict[str, Any] = {"type": "categorical", "dtype": str(arr.type), "count": len(arr) - nulls, "nulls": nulls}
    if sampled:
        out["sampled"] = len(arr)
    vc = pc.value_counts(arr.drop_null() if nulls else arr)
    vals = vc.field("values").to_pylist()
    cnts = vc.field("counts").to_numpy()
    out["distinct"] = len(vals)
    order = np.argsort(-cnts, kind="stable")[:TOP_K]
    out["top"] = [[_jsonable_cell(vals[i]), int(cnts[i])] for i in order]
    return out


def _jsonable_cell(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v if not isinstance(v, str) or len(v) <= 200 else v[:200]
    if isinstance(v, float):
        return _num(v)
    try:
        s = str(v)
    except Exception:
        s = "<unprintable>"
    return s[:200]


# -- per kind ----------------------------------------------------------------------

class Info:
    """What :func:`describe` found out about one value."""

    __slots__ = ("fingerprint", "type", "shape", "dtype", "nbytes", "summary", "path")

    def __init__(self, type_: str, fingerprint: str | None = None, shape: str | None = None,
                 dtype: str | None = None, nbytes: int | None = None, summary: dict | None = None,
                 path: str | None = None) -> None:
        self.fingerprint = fingerprint
        self.type = type_
        self.shape = shape
        self.dtype = dtype
        self.nbytes = nbytes
        self.summary = summary if summary is not None else {}
        self.path = path


def _ndarray(a: np.ndarray, tname: str, want_summary: bool) -> Info:
    h = _new()
    h.update(b"nd|%s|%s|" % (a.dtype.str.encode(), repr(tuple(a.shape)).encode()))
    if a.dtype.hasobject:
        sampled = _hash_objects(h, a.reshape(-1).tolist() if a.size <= MAX_ITEMS * 2 else None, a.size)
    else:
        sampled = _update_buffer(h, _u8(a))
    summary: dict[str, Any] = {"kind": "array", "hash": "sampled" if sampled else "full"}
    if want_summary:
        summary["columns"] = _array_columns(a)
    return Info(tname, h.hexdigest(), repr(tuple(a.shape)), str(a.dtype), int(a.nbytes), summary)


def _hash_objects(h, items: list | None, n: int) -> bool:
    if items is None:
        raise Unhashable(f"object array of {n} items is too large to fingerprint")
    for x in items:
        h.update(_fp_child(x, 1, set()).encode())
    return False


def _array_columns(a: np.ndarray) -> dict:
    k = a.dtype.kind
    if k not in "biufUS" or a.size == 0:
        return {}
    if a.ndim == 2 and a.shape[1] <= MAX_COLUMNS:
        cols = {str(j): a[:, j] for j in range(a.shape[1])}
    else:
        cols = {"values": a.reshape(-1)}
    out = {}
    for name, col in cols.items():
        if k in "biuf":
            out[name] = numeric_stats(col)
        else:
            import pyarrow as pa

            out[name] = categorical_stats(pa.array(col[: HIST_SAMPLE * 4].astype(str)))
    return out


def _torch(t, tname: str, want_summary: bool) -> Info:
    import torch

    x = t.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous()
    try:
        a = x.numpy()
    except (TypeError, RuntimeError):  # bfloat16 and friends: hash the raw bits, summarise as float32
        a = None
    if a is not None:
        info = _ndarray(a, tname, want_summary)
    else:
        bits = x.reshape(-1).view(torch.uint8).numpy()
        h = _new()
        h.update(b"nd|%s|%s|" % (str(x.dtype).encode(), repr(tuple(x.shape)).encode()))
        sampled = _update_buffer(h, bits)
        summary: dict[str, Any] = {"kind": "array", "hash": "sampled" if sampled else "full"}
        if want_summary and x.is_floating_point():
            summary["columns"] = _array_columns(x.float().numpy())
        info = Info(tname, h.hexdigest(), repr(tuple(x.shape)), str(x.dtype), int(bits.nbytes), summary)
    info.dtype = str(t.dtype)
    info.summary["device"] = str(t.device)
    return info


def _hash_arrow_chunk(h, chunk, start: int, nulls: list, lengths: list) -> None:
    """Feed one chunk's values; null positions (global) go to ``nulls`` so chunking never matters."""
    import pyarrow as pa

    if chunk.null_count:
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        nulls.append(np.flatnonzero(~valid).astype(np.int64) + start)
        chunk = chunk.filter(pa.array(valid))
    t = chunk.type
    if pa.types.is_dictionary(t):
        chunk = chunk.dictionary_decode()
        t = chunk.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t) or pa.types.is_boolean(t):
        vals = chunk.to_numpy(zero_copy_only=False)
        _update_buffer(h, _u8(vals))
    elif pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        bufs = chunk.buffers()
        off_t = np.int64 if (pa.types.is_large_string(t) or pa.types.is_large_binary(t)) else np.int32
        offs = np.frombuffer(bufs[1], dtype=off_t)[chunk.offset: chunk.offset + len(chunk) + 1]
        lengths.append(np.diff(offs).astype(np.int64))
        if bufs[2] is not None and len(offs):
            _update_buffer(h, memoryview(bufs[2])[int(offs[0]): int(offs[-1])])
    else:
        batch = pa.RecordBatch.from_arrays([chunk], ["c"])
        _update_buffer(h, batch.serialize())


def _arrow_table(tbl, tname: str, want_summary: bool, tag: bytes = b"arrow") -> Info:
    import pyarrow as pa

    if isinstance(tbl, pa.RecordBatch):
        tbl = pa.Table.from_batches([tbl])
    h = _new()
    h.update(b"%s|%d|" % (tag, tbl.num_rows))
    sampled = tbl.nbytes > HASH_FULL_LIMIT
    src = tbl
    if sampled:  # evenly spaced rows, bounded bytes
        step = _stride(tbl.num_rows, max(1, int(tbl.num_rows * HASH_FULL_LIMIT / max(1, tbl.nbytes))))
        src = tbl.take(pa.array(np.arange(0, tbl.num_rows, step)))
    for name, col in zip(src.column_names, src.columns):
        h.update(b"|col|%s|%s|" % (name.encode("utf-8", "surrogatepass"), str(col.type).encode()))
        start = 0
        nulls: list = []
        lengths: list = []
        for chunk in col.chunks:
            _hash_arrow_chunk(h, chunk, start, nulls, lengths)
            start += len(chunk)
        if lengths:
            h.update(b"|lengths|")
            h.update(np.concatenate(lengths).tobytes())
        if nulls:
            h.update(b"|nulls|")
            h.update(np.concatenate(nulls).tobytes())
    summary: dict[str, Any] = {"kind": "table", "hash": "sampled" if sampled else "full", "rows": tbl.num_rows}
    if want_summary:
        summary["columns"] = _arrow_columns(tbl)
    return Info(tname, h.hexdigest(), repr((tbl.num_rows, tbl.num_columns)), None, int(tbl.nbytes), summary)


def _arrow_columns(tbl) -> dict:
    import pyarrow as pa

    out = {}
    for name, col in list(zip(tbl.column_names, tbl.columns))[:MAX_COLUMNS]:
        t = col.type
        try:
            if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
                arr = col.to_numpy() if not pa.types.is_decimal(t) else col.cast(pa.float64()).to_numpy()
                if col.null_count and arr.dtype.kind != "f":
                    arr = col.cast(pa.float64()).to_numpy()
                st = numeric_stats(np.asarray(arr))
                st["dtype"] = str(t)
                st["nulls"] = col.null_count
                st["count"] = len(col) - col.null_count if "sampled" not in st else st["count"]
                out[name] = st
            elif (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)
                  or pa.types.is_binary(t)):
                out[name] = categorical_stats(col.combine_chunks() if col.num_chunks != 1 else col.chunk(0))
            else:
                out[name] = {"type": "other", "dtype": str(t), "count": len(col) - col.null_count,
                             "nulls": col.null_count}
        except Exception as e:  # a summary is best effort
            out[name] = {"type": "other", "dtype": str(t), "error": type(e).__name__}
    return out


def _pandas(v, tname: str, want_summary: bool) -> Info:
    import pandas as pd
    import pyarrow as pa

    is_series = isinstance(v, pd.Series)
    df = v.to_frame(name=v.name if v.name is not None else "value") if is_series else v
    cols = {}
    for name in df.columns:
        s = df[name]
        if isinstance(s, pd.DataFrame):  # duplicate column names
            s = s.iloc[:, 0]
        k = s.dtype.kind if isinstance(s.dtype, np.dtype) else None
        if k is not None and k in "biufmM":
            cols[str(name)] = pa.array(s.to_numpy(), from_pandas=k == "f")  # zero-copy for numpy columns
        else:
            cols[str(name)] = pa.array(s, from_pandas=True)
    idx = df.index
    if not (isinstance(idx, pd.RangeIndex) and idx.start == 0 and idx.step == 1):
        cols["__index__"] = pa.array(idx.to_numpy() if idx.dtype.kind in "biufmM" else idx.astype(str).to_numpy())
    tbl = pa.table(cols) if cols else pa.table({"__empty__": pa.nulls(len(df))})
    info = _arrow_table(tbl, tname, want_summary, b"pandas")
    if "columns" in info.summary:
        info.summary["columns"].pop("__index__", None)
    info.shape = repr(tuple(v.shape))
    info.dtype = str(v.dtype) if is_series else None
    try:
        info.nbytes = int(v.memory_usage(index=True, deep=False).sum()) if not is_series \
            else int(v.memory_usage(index=True, deep=False))
    except Exception:
        pass
    return info


def _polars(v, tname: str, want_summary: bool) -> Info:
    tbl = v.to_arrow()
    import pyarrow as pa

    if isinstance(tbl, (pa.Array, pa.ChunkedArray)):
        tbl = pa.table({v.name or "value": tbl})
    info = _arrow_table(tbl, tname, want_summary, b"polars")
    info.shape = repr(tuple(v.shape))
    return info


def _bytes(v, tname: str) -> Info:
    h = _new()
    h.update(b"bytes|")
    sampled = _update_buffer(h, v)
    n = len(memoryview(v).cast("B")) if not isinstance(v, (bytes, bytearray)) else len(v)
    return Info(tname, h.hexdigest(), None, None, n, {"kind": "bytes", "len": n,
                                                       "hash": "sampled" if sampled else "full"})


def _str(v: str, tname: str) -> Info:
    if 0 < len(v) <= MAX_PATH_LEN and "\n" not in v and "\0" not in v:
        try:
            if os.path.isfile(v):
                return file_info(v)
        except (OSError, ValueError):
            pass
    b = v.encode("utf-8", "surrogatepass")
    h = _new()
    h.update(b"str|")
    sampled = _update_buffer(h, b)
    s: dict[str, Any] = {"kind": "str", "len": len(v)}
    if sampled:
        s["hash"] = "sampled"
    if len(v) <= 200:
        s["value"] = v
    return Info(tname, h.hexdigest(), None, None, len(b), s)


def _scalar(v, tname: str) -> Info:
    r = repr(v)
    fp = _hexd(b"%s|%s" % (tname.encode(), r.encode()))
    if type(v) is complex or v is None:
        s: dict[str, Any] = {"kind": "scalar"}
    else:
        s = {"kind": "scalar", "value": _num(v) if type(v) is not bool else v}
    return Info(tname, fp, None, None, sys.getsizeof(v), s)


def file_info(path: str | os.PathLike) -> Info:
    """Fingerprint of a file's content (cached by size, mtime and inode)."""
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    hit = _file_cache.get(p)
    if hit is not None and hit[0] == key:
        fp, size, sampled = hit[1], hit[2], hit[3]
    else:
        h = _new()
        h.update(b"file|")
        size = st.st_size
        with open(p, "rb") as fh:
            if size <= HASH_FULL_LIMIT:
                while True:
                    b = fh.read(8 << 20)
                    if not b:
                        break
                    h.update(b)
                sampled = False
            else:
                h.update(b"sampled:%d:" % size)
                step = (size - 2 * SAMPLE_EDGE - SAMPLE_BLOCK) // max(1, SAMPLE_BLOCKS - 1)
                offs = [(0, SAMPLE_EDGE), (size - SAMPLE_EDGE, SAMPLE_EDGE)]
                offs += [(SAMPLE_EDGE + k * step, SAMPLE_BLOCK) for k in range(SAMPLE_BLOCKS)]
                for off, n in offs:
                    fh.seek(off)
                    h.update(fh.read(n))
                sampled = True
        fp = h.hexdigest()
        if len(_file_cache) > 10_000:
            _file_cache.clear()
        _file_cache[p] = (key, fp, size, sampled)
    import datetime as _dt

    mtime = _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat()
    return Info("file", fp, None, None, size, {"kind": "file", "hash": "sampled" if sampled else "full",
                                                "size": size, "mtime": mtime}, path=p)


# -- containers and other objects --------------------------------------------------------

def _fp_child(x: Any, depth: int, seen: set) -> str:
    """The fingerprint of a container item (raises Unhashable)."""
    t = type(x)
    if t in _SCALARS:
        return _scalar(x, type_name(x)).fingerprint  # type: ignore[return-value]
    if depth > MAX_DEPTH:
        raise Unhashable(f"nested deeper than {MAX_DEPTH}")
    if t in (list, tuple, dict, set, frozenset):
        return _container(x, type_name(x), depth, seen, False).fingerprint  # type: ignore[return-value]
    info = _describe(x, False, depth, seen)
    if info.fingerprint is None:
        raise Unhashable(info.summary.get("note", f"{info.type} has no fingerprint"))
    return info.fingerprint


def _container(v, tname: str, depth: int, seen: set, want_summary: bool) -> Info:
    if id(v) in seen:
        raise Unhashable("recursive container")
    seen.add(id(v))
    try:
        n = len(v)
        h = _new()
        h.update(b"%s|%d|" % (tname.encode(), n))
        if isinstance(v, dict):
            items = list(v.items()) if n <= MAX_ITEMS else _ends(list(v.items()), n)
            for k, x in items:
                h.update(_fp_child(k, depth + 1, seen).encode())
                h.update(_fp_child(x, depth + 1, seen).encode())
        else:
            seq = v
            if isinstance(v, (set, frozenset)):
                fps = sorted(_fp_child(x, depth + 1, seen) for x in (v if n <= MAX_ITEMS else list(v)[:MAX_ITEMS]))
                for f in fps:
                    h.update(f.encode())
            else:
                seq = v if n <= MAX_ITEMS else _ends(v, n)
                for x in seq:
                    h.update(_fp_child(x, depth + 1, seen).encode())
        s: dict[str, Any] = {"kind": "dict" if isinstance(v, dict) else "list", "len": n,
                             "hash": "sampled" if n > MAX_ITEMS else "full"}
        if want_summary:
            types_: dict[str, int] = {}
            vals = list(v.values()) if isinstance(v, dict) else list(v)
            for x in vals[:MAX_ITEMS]:
                tn = type_name(x)
                types_[tn] = types_.get(tn, 0) + 1
            s["item_types"] = types_
            if isinstance(v, dict):
                s["keys"] = [_jsonable_cell(k) for k in list(v)[:TOP_K]]
            elif vals and all(type(x) in (int, float) for x in vals[:MAX_ITEMS]):
                s["columns"] = {"values": numeric_stats(np.asarray(vals[:STATS_SAMPLE], dtype=np.float64))}
        return Info(tname, h.hexdigest(), None, None, None, s)
    finally:
        seen.discard(id(v))


def _ends(seq, n: int) -> list:
    half = MAX_ITEMS // 2
    return list(seq[:half]) + list(seq[n - half:])


def _object(v, tname: str) -> Info:
    if isinstance(v, _SKIP_TYPES):
        return Info(tname, None, summary={"kind": "object", "note": f"{tname} is not fingerprinted"})
    w = _Capped(OBJECT_HASH_LIMIT)
    w.h.update(b"pickle|%s|" % tname.encode())
    pickle.Pickler(w, protocol=5).dump(v)
    return Info(tname, w.h.hexdigest(), None, None, w.n, {"kind": "object", "hash": "pickle"})


def _describe(v: Any, want_summary: bool, depth: int, seen: set) -> Info:
    t = type(v)
    tname = type_name(v)
    if t in _SCALARS:
        return _scalar(v, tname)
    if t is str:
        return _str(v, tname)
    if t in (bytes, bytearray, memoryview):
        return _bytes(v, tname)
    if t in (list, tuple, dict, set, frozenset):
        return _container(v, tname, depth, seen, want_summary)
    mod = tname.split(".", 1)[0]
    if t is np.ndarray or (mod == "numpy" and isinstance(v, np.ndarray)):
        return _ndarray(v, tname, want_summary)
    if isinstance(v, np.generic):
        return _ndarray(np.asarray(v), tname, want_summary)
    if mod == "torch":
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(v, torch.Tensor):
            return _torch(v, tname, want_summary)
    if mod == "pandas":
        import pandas as pd

        if isinstance(v, (pd.DataFrame, pd.Series)):
            return _pandas(v, tname, want_summary)
    if mod == "polars" and t.__name__ in ("DataFrame", "Series"):
        return _polars(v, tname, want_summary)
    if mod == "pyarrow":
        import pyarrow as pa

        if isinstance(v, (pa.Table, pa.RecordBatch)):
            return _arrow_table(v, tname, want_summary)
        if isinstance(v, (pa.Array, pa.ChunkedArray)):
            return _arrow_table(pa.table({"value": v}), tname, want_summary)
    if isinstance(v, os.PathLike):
        p = os.fspath(v)
        if isinstance(p, str) and os.path.isfile(p):
            return file_info(p)
        info = _str(p, tname) if isinstance(p, str) else _bytes(p, tname)
        info.type = tname
        return info
    return _object(v, tname)


def describe(value: Any, summary: bool = True) -> Info:
    """Fingerprint, type, shape, dtype, bytes and summary of ``value``; never raises."""
    try:
        return _describe(value, summary, 0, set())
    except RecursionError:
        return Info(_safe_type(value), None, summary={"kind": "object", "note": "too deeply nested"})
    except Exception as e:
        note = str(e) if isinstance(e, Unhashable) else f"cannot fingerprint: {type(e).__name__}"
        return Info(_safe_type(value), None, summary={"kind": "object", "note": note[:300]})


def _safe_type(v: Any) -> str:
    try:
        return type_name(v)
    except Exception:
        return "object"


# -- samples and payloads ---------------------------------------------------------------

def sample(value: Any, n: int = SAMPLE_ROWS) -> Any:
    """A small JSON-safe sample of ``value`` (first ``n`` rows/items); None when there is none."""
    try:
        tname = type_name(value)
        mod = tname.split(".", 1)[0]
        if mod == "pandas":
            head = value.head(n)
            if hasattr(head, "to_dict") and hasattr(head, "columns"):
                return _clean(head.reset_index(drop=True).to_dict("records"))
            return _clean(head.tolist())
        if mod == "polars":
            return _clean(value.head(n).to_arrow().to_pylist() if hasattr(value, "columns")
                          else value.head(n).to_list())
        if mod == "pyarrow":
            return _clean(value.slice(0, n).to_pylist())
        if isinstance(value, np.ndarray):
            return _clean(value[:n].tolist())
        if mod == "torch":
            return _clean(value.detach().cpu()[:n].tolist())
        if type(value) in (list, tuple):
            return _clean(list(value[:n]))
        if type(value) is dict:
            return _clean(dict(list(value.items())[:n]))
        if type(value) is str:
            return value[:1000]
        if type(value) in _SCALARS:
            return _clean(value)
    except Exception:
        return None
    return None


def _clean(v: Any, depth: int = 0) -> Any:
    if depth > 3:
        return "…"
    if isinstance(v, dict):
        return {str(k)[:100]: _clean(x, depth + 1) for k, x in list(v.items())[:50]}
    if isinstance(v, (list, tuple)):
        return [_clean(x, depth + 1) for x in v[:50]]
    return _jsonable_cell(v)


def pickle_bounded(value: Any, limit: int) -> tuple[bytes | None, str | None]:
    """``cloudpickle`` bytes of ``value`` if at most ``limit`` bytes, else (None, why)."""
    import cloudpickle

    w = _Capped(limit, keep=True)
    try:
        cloudpickle.CloudPickler(w, protocol=5).dump(value)
    except Unhashable:
        return None, f"not stored: pickled size is over the {limit} byte bound"
    except RecursionError:
        return None, "not stored: too deeply nested to pickle"
    except Exception as e:
        return None, f"not stored: cannot pickle {_safe_type(value)} ({type(e).__name__}: {str(e)[:200]})"
    return b"".join(w.parts or ()), None


def summary_json(info: Info) -> str | None:
    """The summary as compact JSON (never raises)."""
    try:
        return json.dumps(info.summary, separators=(",", ":"), default=_jsonable_cell, allow_nan=False)
    except Exception:
        return json.dumps({"kind": info.summary.get("kind", "object"), "note": "summary not serialisable"})
