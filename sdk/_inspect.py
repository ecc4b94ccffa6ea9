"""``fl.inspect()``: record an unchanged pandas / scikit-learn pipeline as a DAG of step calls.

MLINSPECT-style (Grafberger, Stoyanovich, Schelter; CIDR 2021): while the
``with`` block is open, the DataFrame operations that change rows or columns
(``read_csv``/``read_parquet``, ``df[mask]``, ``query``, ``dropna``,
``merge``/``join``, groupby aggregations, ``assign``, column projections,
``concat``, ``train_test_split``) and scikit-learn ``fit`` / ``transform`` /
``fit_transform`` / ``predict`` are patched. Each call the user's own code
makes becomes one step call: a span (name ``<op> (<file>:<line>)``, the call
site as ``code.file.path`` / ``code.line.number``) and ``io`` rows whose
fingerprints connect the operations into a DAG. The span attributes
``flightlog.inspect.*`` carry the operation kind, row counts, columns and the
value counts of the sensitive columns before and after; the health checks
``no_bias_introduced``, ``similar_removal_probabilities`` and
``no_illegal_features`` read them.

What the patches promise: the original function runs with the original
arguments and its result is returned untouched (bit-for-bit); calls that
pandas or scikit-learn make internally, and calls nested inside a recorded
one, pass straight through; anything the recorder cannot analyse becomes an
``opaque`` step or a warning, never an exception; every patch is undone when
the block exits, also on an exception. See docs/inspect.md.
"""
from __future__ import annotations

import contextlib
import functools
import json
import linecache
import os
import sys
import threading
import time
import weakref
from typing import Any, Iterator, Sequence

from flightlog import _run, _warn

DEFAULT_ILLEGAL: tuple[str, ...] = ("race", "gender", "age")
MAX_GROUPS = 1000  # distinct values of one sensitive column kept per frame (most frequent first)
MAX_COLUMN_NAMES = 1000  # column names kept per input/output
FAST_FP_ROWS = 100_000  # frames with at least this many rows are fingerprinted from their buffers
MAX_CALLS_PER_SITE = 100  # calls recorded per line of user code (a pandas call in a loop stays cheap)
PREFIX = "flightlog.inspect."

_lock = threading.RLock()
_tl = threading.local()
_configs: list["_Config"] = []  # open blocks, innermost last
_patches: list[tuple] = []  # (kind, owner, name, original, wrapper)
_cache: dict[int, tuple] = {}  # id(frame) -> (weakref, key, described)
_names: dict[int, tuple] = {}  # id(array) -> (weakref, feature names) of transformer outputs
_codes_cache: dict[int, tuple] = {}  # id(Arrow ChunkedArray; immutable) -> (weakref, codes, labels)
_counts_cache: dict[int, tuple] = {}  # id(Arrow ChunkedArray) -> (weakref, [(value, count), ...])
_digest_cache: dict[int, tuple] = {}  # id(Arrow ChunkedArray) -> (weakref, xxh3 digest of its buffers)
_internal_code: dict[Any, bool] = {}
_site_calls: dict[tuple, int] = {}  # (code, line) -> calls seen in the open block(s)
_skip_dirs: tuple[str, ...] = ()
_stdlib_dir = "\0"  # the standard library's folder (its site-packages is not internal by itself)
_time_ns = time.time_ns


class _Config:
    __slots__ = ("sensitive", "illegal")

    def __init__(self, sensitive: tuple[str, ...], illegal: tuple[str, ...]) -> None:
        self.sensitive = sensitive
        self.illegal = illegal


def _active() -> "_Config | None":
    return _configs[-1] if _configs else None


# -- the public context manager --------------------------------------------------------------

def _names_arg(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"fl.inspect: {what} must be a list of column names, got {type(value).__name__}") from None
    bad = [v for v in out if not isinstance(v, str) or not v]
    if bad:
        raise TypeError(f"fl.inspect: {what} must be non-empty strings, got {bad[0]!r}")
    return tuple(dict.fromkeys(out))


@contextlib.contextmanager
def inspect(sensitive: Sequence[str] | None = None, illegal: Sequence[str] | None = None) -> Iterator[None]:
    """Record the pandas / scikit-learn operations run inside the block as a DAG of step calls.

    ``sensitive``: columns whose value counts are recorded before and after
    every operation (the bias checks compare them). ``illegal``: feature names
    a model must not be fitted on (default ``race``, ``gender``, ``age``;
    ``[]`` for none); one-hot names like ``race_White`` and transformer
    prefixes like ``cat__race`` match too. Bad arguments raise ``TypeError``
    before anything is patched; nothing inside the block ever raises because
    of flightlog. Nested blocks share the patches; the innermost settings win.
    """
    cfg = _Config(_names_arg(sensitive, "sensitive"),
                  DEFAULT_ILLEGAL if illegal is None else _names_arg(illegal, "illegal"))
    caller = sys._getframe(2)  # contextmanager's __enter__ -> the user's with statement
    with _lock:
        first = not _configs
        _configs.append(cfg)
        if first:
            try:
                _install(caller.f_globals)
            except Exception as e:  # the block runs unpatched
                _warn.problem("inspect_patch_failed", f"fl.inspect could not patch pandas/scikit-learn: {e!r}")
                _uninstall()
    block = _Block(cfg, caller)
    exc: BaseException | None = None
    try:
        yield None
    except BaseException as e:
        exc = e
        raise
    finally:
        block.end(exc)
        with _lock:
            try:
                _configs.remove(cfg)
            except ValueError:
                pass
            if not _configs:
                _uninstall()


class _Block:
    """The enclosing ``fl.inspect`` span: op spans in the same thread are its children."""

    def __init__(self, cfg: _Config, frame) -> None:
        self.span = self.token = None
        try:
            r = _run.ACTIVE or _run._auto_start()
            if r is None:
                return
            self.run = r
            path, line, func, mod = _where(frame)
            self.attrs = {"code.function.name": func, "code.namespace": mod, "code.file.path": path,
                          "code.line.number": line, PREFIX + "kind": "block",
                          PREFIX + "sensitive": json.dumps(list(cfg.sensitive)),
                          PREFIX + "illegal": json.dumps(list(cfg.illegal))}
            self.name = f"fl.inspect ({os.path.basename(path)}:{line})"
            from flightlog import _steps

            tracer = _steps._tracer or _steps._get_tracer()
            self.span = tracer.start_span(self.name, attributes={**self.attrs, "flightlog.run_id": r.run_id})
            self.token = _steps._attach(_steps._set_in_ctx(self.span))
        except Exception as e:
            _warn.problem("inspect_record_failed", f"fl.inspect could not start its span: {e!r}")
            self.span = None

    def end(self, exc: BaseException | None) -> None:
        if self.span is None:
            return
        try:
            from flightlog import _steps

            try:
                _steps._detach_ctx(self.token)
            except Exception:
                pass
            _finish_span(self.run, self.span, self.attrs, exc, [])
        except Exception as e:
            _warn.problem("inspect_record_failed", f"fl.inspect could not record its span: {e!r}")


# -- patching --------------------------------------------------------------------------------

def _pkg_dir(mod: str) -> str | None:
    m = sys.modules.get(mod)
    f = getattr(m, "__file__", None)
    return os.path.dirname(os.path.abspath(f)) + os.sep if f else None


def _install(user_globals: dict) -> None:
    global _skip_dirs
    import pandas as pd  # inspect is in use: pandas may load now

    _internal_code.clear()
    global _stdlib_dir
    _stdlib_dir = os.path.dirname(os.path.abspath(contextlib.__file__)) + os.sep
    dirs = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    for mod in ("pandas", "numpy", "sklearn", "scipy", "pyarrow", "joblib", "threadpoolctl"):
        d = _pkg_dir(mod)
        if d:
            dirs.append(d)
    _skip_dirs = tuple(dirs)
    originals: dict[int, Any] = {}

    def patch(owner, name: str, spec: "_Spec") -> None:
        for k in getattr(owner, "__mro__", (owner,)):
            if name in getattr(k, "__dict__", {}):
                owner = k
                break
        else:
            return
        if any(p[1] is owner and p[2] == name for p in _patches):
            return
        orig = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        if type(orig).__name__ == "_AvailableIfDescriptor":  # scikit-learn's conditional methods
            fn = orig.fn
            w = _wrapper(fn, spec)
            orig.fn = w
            _patches.append(("fn", orig, "fn", fn, w))
            return
        if isinstance(orig, (staticmethod, classmethod)) or not callable(orig):
            return
        w = _wrapper(orig, spec)
        setattr(owner, name, w)
        _patches.append(("attr", owner, name, orig, w))
        originals[id(orig)] = w

    # pandas: sources and module functions
    for fn in ("read_csv", "read_table", "read_parquet", "read_json", "read_feather", "read_orc", "read_pickle"):
        if hasattr(pd, fn):
            patch(pd, fn, _Spec("pandas." + fn, "source", _in_path))
    patch(pd, "merge", _Spec("pandas.merge", "join", _in_left_right))
    patch(pd, "concat", _Spec("pandas.concat", "concat", _in_objs))
    patch(pd, "get_dummies", _Spec("pandas.get_dummies", "encode", _in_data))
    DF = pd.DataFrame
    patch(DF, "__getitem__", _Spec("DataFrame[]", None, _in_self, classify=_classify_getitem))
    patch(DF, "query", _Spec("DataFrame.query", "filter", _in_self))
    patch(DF, "dropna", _Spec("DataFrame.dropna", "filter", _in_self))
    patch(DF, "drop_duplicates", _Spec("DataFrame.drop_duplicates", "filter", _in_self))
    patch(DF, "merge", _Spec("DataFrame.merge", "join", _in_self_other))
    patch(DF, "join", _Spec("DataFrame.join", "join", _in_self_other))
    patch(DF, "assign", _Spec("DataFrame.assign", "assign", _in_self))
    patch(DF, "filter", _Spec("DataFrame.filter", "projection", _in_self))
    patch(DF, "select_dtypes", _Spec("DataFrame.select_dtypes", "projection", _in_self))
    patch(DF, "to_numpy", _Spec("DataFrame.to_numpy", "convert", _in_self))
    for name, kind in (("sample", "filter"), ("head", "filter"), ("tail", "filter"), ("drop", None),
                       ("fillna", "opaque"), ("replace", "opaque"), ("rename", "opaque"),
                       ("sort_values", "opaque"), ("apply", "opaque"), ("pipe", "opaque"), ("astype", "opaque"),
                       ("reset_index", "opaque"), ("set_index", "opaque"), ("explode", "opaque"),
                       ("melt", "opaque"), ("pivot_table", "opaque"), ("where", "opaque"), ("mask", "opaque"),
                       ("transform", "opaque"), ("map", "opaque")):
        if hasattr(DF, name):
            patch(DF, name, _Spec("DataFrame." + name, kind, _in_self, classify=_classify_drop if name == "drop"
                                  else None, frames_only=True))
    from pandas.core import indexing as _ix

    patch(_ix._LocationIndexer, "__getitem__", _Spec("DataFrame.loc[]", None, _in_indexer,
                                                     classify=_classify_loc, frames_only=True))
    from pandas.core.groupby import DataFrameGroupBy

    for name in ("agg", "aggregate", "sum", "mean", "median", "count", "size", "min", "max", "std", "var",
                 "first", "last", "nunique", "prod"):
        if hasattr(DataFrameGroupBy, name):
            patch(DataFrameGroupBy, name, _Spec("groupby." + name, "aggregate", _in_groupby))
    # in-place mutations: forget the cached description of the frame they change
    for owner, name in ((DF, "__setitem__"), (DF, "__delitem__"), (DF, "insert"), (DF, "update"),
                        (DF, "pop"), (_ix._LocationIndexer, "__setitem__"), (_ix._ScalarAccessIndexer, "__setitem__")):
        if hasattr(owner, name):
            patch(owner, name, _Spec("mutate", "mutate", None))

    if "sklearn" in sys.modules:
        try:
            _install_sklearn(patch)
        except Exception as e:
            _warn.problem("inspect_patch_failed", f"fl.inspect could not patch scikit-learn: {e!r}")
    # names the user's module bound with `from pandas import read_csv` / `from sklearn... import train_test_split`
    for k, v in list(user_globals.items()):
        w = originals.get(id(v))
        if w is not None and callable(v):
            user_globals[k] = w
            _patches.append(("global", user_globals, k, v, w))


def _install_sklearn(patch) -> None:
    from sklearn import base, model_selection
    from sklearn.model_selection import _split

    spec = _Spec("sklearn.train_test_split", "split", _in_arrays)
    patch(model_selection, "train_test_split", spec)
    if _split.train_test_split is not model_selection.train_test_split:
        patch(_split, "train_test_split", spec)
    seen: set = set()
    stack = [base.BaseEstimator]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
    specs = {meth: _Spec(meth, kind, _in_estimator, sklearn=True)
             for meth, kind in (("fit", "fit"), ("fit_transform", "fit_transform"), ("transform", "transform"),
                                ("predict", "predict"), ("predict_proba", "predict"), ("fit_predict", "fit_predict"))}
    for cls in seen:
        for meth, spec in specs.items():
            # patched where it is defined, mixins included (LinearClassifierMixin.predict, TransformerMixin...)
            if any(meth in k.__dict__ for k in cls.__mro__):
                patch(cls, meth, spec)


def _uninstall() -> None:
    while _patches:
        how, owner, name, orig, w = _patches.pop()
        try:
            if how == "fn":
                if owner.fn is w:
                    owner.fn = orig
            elif how == "global":
                if owner.get(name) is w:
                    owner[name] = orig
            elif owner.__dict__.get(name) is w:
                setattr(owner, name, orig)
        except Exception as e:
            _warn.problem("inspect_unpatch_failed", f"fl.inspect could not restore {name}: {e!r}")
    _cache.clear()
    _names.clear()
    _codes_cache.clear()
    _counts_cache.clear()
    _digest_cache.clear()
    _site_calls.clear()


# -- the wrapper -----------------------------------------------------------------------------

class _Spec:
    __slots__ = ("op", "kind", "inputs", "classify", "frames_only", "sklearn")

    def __init__(self, op: str, kind: str | None, inputs, classify=None, frames_only: bool = False,
                 sklearn: bool = False) -> None:
        self.op = op
        self.kind = kind
        self.inputs = inputs
        self.classify = classify
        self.frames_only = frames_only
        self.sklearn = sklearn


def _is_internal(code) -> bool:
    v = _internal_code.get(code)
    if v is None:
        f = code.co_filename
        v = _internal_code[code] = (f.startswith(_skip_dirs) or f.startswith("<frozen")
                                    or (f.startswith(_stdlib_dir) and "-packages" + os.sep not in f))
    return v


def _wrapper(orig, spec: _Spec):
    if spec.kind == "mutate":
        @functools.wraps(orig)
        def mutate(self, *args, **kwargs):
            if _configs and _cache:
                # a DataFrame itself, or an indexer (.loc/.iloc/.at/.iat) whose .obj is the frame
                target = self if isinstance(self, _pd().DataFrame) else getattr(self, "obj", None)
                _cache.pop(id(target), None)
            return orig(self, *args, **kwargs)

        return mutate

    @functools.wraps(orig)
    def inspected(*args, **kwargs):
        if not _configs or getattr(_tl, "busy", False):
            return orig(*args, **kwargs)
        f = sys._getframe(1)
        if _is_internal(f.f_code):
            return orig(*args, **kwargs)
        site = (f.f_code, f.f_lineno)
        n = _site_calls[site] = _site_calls.get(site, 0) + 1
        if n > MAX_CALLS_PER_SITE:
            _warn.problem("inspect_calls_skipped", f"fl.inspect records at most {MAX_CALLS_PER_SITE} calls per "
                          f"line of code; later calls from {f.f_code.co_filename}:{f.f_lineno} are not recorded")
            return orig(*args, **kwargs)
        return _record(orig, spec, f, args, kwargs)

    return inspected


def _record(orig, spec: _Spec, frame, args: tuple, kwargs: dict):
    cfg = _active()
    _tl.busy = True
    try:
        pre = None
        try:
            pre = _Pre(spec, cfg, frame, args, kwargs)
        except Exception as e:
            _warn.problem("inspect_record_failed", f"fl.inspect could not describe the inputs of {spec.op}: {e!r}")
        t0 = _time_ns()
        try:
            out = orig(*args, **kwargs)
        except BaseException as exc:
            if pre is not None and pre.record:
                pre.timed(t0, _time_ns())
                pre.finish(None, exc, args, kwargs)
            raise
        if pre is not None and pre.record:
            pre.timed(t0, _time_ns())
            pre.finish(out, None, args, kwargs)
        return out
    finally:
        _tl.busy = False


# -- describing inputs and outputs -------------------------------------------------------------

def _pd():
    return sys.modules.get("pandas")


def _key(obj) -> tuple | None:
    """What must be unchanged for a cached description of ``obj`` to still hold."""
    try:
        mgr = obj._mgr
        blocks = tuple(id(b.values) for b in getattr(mgr, "blocks", ()))
        return (type(obj), id(mgr), obj.shape, id(obj.index), id(getattr(obj, "columns", None)), blocks)
    except Exception:
        return None


class _Described:
    """One input or output: its io info (fingerprint, summary) and what the checks need."""

    __slots__ = ("info", "rows", "columns", "hist", "totals", "__weakref__")

    def __init__(self, info, rows, columns, hist, totals) -> None:
        self.info = info
        self.rows = rows
        self.columns = columns
        self.hist = hist
        self.totals = totals


def _fast_info(obj):
    """Fingerprint of a large DataFrame/Series straight from its buffers (xxh3 at memory speed).

    ``fingerprint.describe`` converts every column to Arrow first, which costs more than the
    pandas operation being recorded; here numpy columns and Arrow-backed columns are hashed as
    they are, with the column names, dtypes and the index. Object columns of Python values fall
    back to None (``describe`` then). The digest is tagged ``inspect`` so it never equals one
    ``describe`` made of the same frame.
    """
    import numpy as np
    import xxhash

    from flightlog import _fingerprint as fpm

    pd = _pd()
    frame = obj.to_frame() if isinstance(obj, pd.Series) else obj
    h = xxhash.xxh3_128()
    h.update(b"inspect|%s|%d|" % (type(obj).__name__.encode(), frame.shape[0]))
    for i in range(frame.shape[1]):
        col = frame.iloc[:, i]
        h.update(b"|col|%s|%s|" % (str(frame.columns[i]).encode("utf-8", "surrogatepass"), str(col.dtype).encode()))
        arr = col.array
        pa_arr = getattr(arr, "_pa_array", None)
        if pa_arr is not None:  # immutable: its digest is cached while the array lives
            hit = _digest_cache.get(id(pa_arr))
            if hit is not None and hit[0]() is pa_arr:
                h.update(hit[1])
                continue
            hc = xxhash.xxh3_128()
            for ch in pa_arr.chunks:
                hc.update(b"|chunk|%d|%d|" % (ch.offset, len(ch)))
                for b in ch.buffers():
                    if b is not None:
                        hc.update(memoryview(b))
            digest = hc.digest()
            h.update(digest)
            try:
                oid = id(pa_arr)
                _digest_cache[oid] = (weakref.ref(pa_arr, lambda _r, oid=oid: _digest_cache.pop(oid, None)), digest)
            except TypeError:
                pass
            continue
        if isinstance(col.dtype, pd.CategoricalDtype):
            h.update(np.ascontiguousarray(col.cat.codes.to_numpy()).view(np.uint8))
            h.update(repr(list(col.cat.categories)).encode("utf-8", "surrogatepass"))
            continue
        vals = col.to_numpy() if isinstance(col.dtype, np.dtype) else None
        if vals is None or vals.dtype.hasobject:
            return None
        h.update(np.ascontiguousarray(vals).view(np.uint8))
    idx = frame.index
    if isinstance(idx, pd.RangeIndex):
        h.update(b"|range|%d|%d|%d|" % (idx.start, idx.stop, idx.step))
    else:
        iv = idx.to_numpy()
        if iv.dtype.hasobject:
            return None
        h.update(b"|index|")
        h.update(np.ascontiguousarray(iv).view(np.uint8))
    nbytes = None
    try:
        nbytes = int(obj.memory_usage(index=True, deep=False).sum()) if isinstance(obj, pd.DataFrame) \
            else int(obj.memory_usage(index=True, deep=False))
    except Exception:
        pass
    return fpm.Info(fpm.type_name(obj), h.hexdigest(), repr(tuple(obj.shape)),
                    str(obj.dtype) if isinstance(obj, pd.Series) else None, nbytes,
                    {"kind": "table", "hash": "inspect", "rows": int(frame.shape[0])})


def _describe(obj, sensitive: tuple[str, ...], parent=None) -> _Described:
    """Fingerprint + row count + columns + exact value counts of the sensitive columns (cached per frame)."""
    pd = _pd()
    is_frame = pd is not None and isinstance(obj, (pd.DataFrame, pd.Series))
    key = None
    if is_frame:
        key = _key(obj)
        hit = _cache.get(id(obj))
        if hit is not None and key is not None and hit[1] == key and hit[0]() is obj and hit[3] == sensitive:
            return hit[2]
    from flightlog import _fingerprint as fpm

    info = _fast_info(obj) if is_frame and obj.shape[0] >= FAST_FP_ROWS else None
    if info is None:
        info = fpm.describe(obj, summary=False)
    rows = columns = None
    hist: dict[str, list] = {}
    totals: dict[str, int] = {}
    if is_frame:
        rows = int(obj.shape[0])
        if isinstance(obj, pd.DataFrame):
            columns = [str(c) for c in obj.columns[:MAX_COLUMN_NAMES]]
            present = [c for c in sensitive if c in obj.columns]
            for c in present:
                col = obj[c]
                if isinstance(col, pd.DataFrame):  # duplicate column names
                    col = col.iloc[:, 0]
                _value_counts(col, c, hist, totals, _parent_col(parent, c))
        else:
            name = obj.name if obj.name is not None else "value"
            columns = [str(name)]
            if isinstance(obj.name, str) and obj.name in sensitive:
                _value_counts(obj, obj.name, hist, totals, _parent_col(parent, obj.name))
    else:
        shape = getattr(obj, "shape", None)
        if isinstance(shape, tuple) and shape:
            try:
                rows = int(shape[0])
            except Exception:
                rows = None
            names = _names_of(obj)
            if names is not None:
                columns = list(names)[:MAX_COLUMN_NAMES]
        elif isinstance(obj, (list, tuple)):
            rows = len(obj)
    s = info.summary
    if rows is not None:
        s.setdefault("rows", rows)
    if columns is not None:
        s["column_names"] = columns
    if hist:
        s["columns"] = {c: {"type": "categorical", "count": totals[c] - _nulls(v), "nulls": _nulls(v),
                            "distinct": sum(1 for g, _ in v if g is not None),
                            "top": [[g, n] for g, n in v if g is not None], "exact": True}
                        for c, v in hist.items()}
    d = _Described(info, rows, columns, hist, totals)
    if is_frame and key is not None:
        try:
            oid = id(obj)
            ref = weakref.ref(obj, lambda _r, oid=oid: _cache.pop(oid, None))
            _cache[oid] = (ref, key, d, sensitive)
        except TypeError:
            pass
    return d


def _nulls(v: list) -> int:
    return sum(n for g, n in v if g is None)


def _parent_col(parent, name: str):
    """(input column, row positions) when the output's rows are known positions of the input's."""
    if parent is None:
        return None
    frame, positions = parent
    try:
        if isinstance(frame, _pd().DataFrame) and name in frame.columns:
            col = frame[name]
            return None if isinstance(col, _pd().DataFrame) else (col, positions)
    except Exception:
        pass
    return None


def _codes(col, derive=None):
    """(codes, labels) of an Arrow-backed column, cached per Arrow array (immutable: never stale).

    ``derive``: (input column, positions) when this column holds the input's rows at those
    positions; its codes are then a take of the input's, not a new hash of every string.
    """
    import numpy as np

    ea = col.array
    pa_arr = getattr(ea, "_pa_array", None)
    if pa_arr is None:
        return None
    hit = _codes_cache.get(id(pa_arr))
    if hit is not None and hit[0]() is pa_arr:
        return hit[1], hit[2]
    got = None
    if derive is not None:
        src = _codes(derive[0])
        if src is not None and len(derive[1]) == len(pa_arr):
            got = (src[0][derive[1]], src[1])
    if got is None:
        import pyarrow.compute as pc

        chunks = None
        if pa_arr.num_chunks > 1:  # one shared dictionary across chunks: no copy of the strings
            enc = pc.dictionary_encode(pa_arr)
            d0 = enc.chunk(0).dictionary
            if all(c.dictionary.equals(d0) for c in enc.chunks):
                chunks = [c.indices for c in enc.chunks]
                dictionary = d0
        if chunks is None:
            enc = pc.dictionary_encode(pa_arr.combine_chunks() if pa_arr.num_chunks != 1 else pa_arr.chunk(0))
            chunks, dictionary = [enc.indices], enc.dictionary
        labels = dictionary.to_pylist()
        parts = []
        for ind in chunks:
            if ind.null_count:
                ind = pc.fill_null(ind, len(labels))
            parts.append(np.asarray(ind.to_numpy(zero_copy_only=False), dtype=np.int32))
        got = (parts[0] if len(parts) == 1 else np.concatenate(parts), labels + [None])
    try:
        oid = id(pa_arr)
        _codes_cache[oid] = (weakref.ref(pa_arr, lambda _r, oid=oid: _codes_cache.pop(oid, None)),) + got
    except TypeError:
        pass
    return got


def _value_counts(col, name: str, hist: dict, totals: dict, derive=None) -> None:
    """Exact counts per value (nulls as None) of one column, most frequent first, at most MAX_GROUPS."""
    try:
        pairs = None
        cl = _codes(col, derive)
        if cl is not None:
            import numpy as np

            pa_arr = col.array._pa_array
            hit = _counts_cache.get(id(pa_arr))
            if hit is not None and hit[0]() is pa_arr:
                pairs = hit[1]
            else:
                cnt = np.bincount(cl[0], minlength=len(cl[1]))
                pairs = [(None if v is None else _label(v), int(c)) for v, c in zip(cl[1], cnt) if c]
                try:
                    oid = id(pa_arr)
                    _counts_cache[oid] = (weakref.ref(pa_arr, lambda _r, oid=oid: _counts_cache.pop(oid, None)),
                                          pairs)
                except TypeError:
                    pass
        if pairs is None:
            pairs = _pairs(col)
    except Exception:
        try:  # any hashable values
            vc = col.value_counts(dropna=False, sort=False)
            pairs = [(None if _isnull(v) else _label(v), int(c)) for v, c in vc.items()]
        except Exception as e:
            _warn.problem("inspect_hist_failed", f"fl.inspect could not count the values of column {name!r}: {e!r}")
            return
    merged: dict = {}
    for g, c in pairs:
        merged[g] = merged.get(g, 0) + c
    out = sorted(merged.items(), key=lambda kv: (-kv[1], "" if kv[0] is None else kv[0]))
    if len(out) > MAX_GROUPS:
        out = out[:MAX_GROUPS]
    hist[name] = out
    totals[name] = int(col.shape[0])


def _isnull(v) -> bool:
    try:
        return v is None or bool(_pd().isna(v))
    except (TypeError, ValueError):
        return False


def _pairs(col) -> list:
    import numpy as np

    pd = _pd()
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes = np.asarray(col.cat.codes)
        cnt = np.bincount(codes + 1, minlength=len(col.cat.categories) + 1)
        pairs = [(None, int(cnt[0]))] if cnt[0] else []
        pairs += [(_label(v), int(c)) for v, c in zip(col.cat.categories, cnt[1:]) if c]
    else:
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = getattr(col.array, "_pa_array", None)
        if arr is None:
            vals = col.to_numpy()
            arr = pa.array(vals, from_pandas=True) if vals.dtype.kind != "O" else pa.array(vals.tolist(),
                                                                                           from_pandas=True)
        vc = pc.value_counts(arr)
        vals = vc.field("values").to_pylist()
        cnts = vc.field("counts").to_pylist()
        pairs = [(None if v is None or (isinstance(v, float) and v != v) else _label(v), int(c))
                 for v, c in zip(vals, cnts)]
    return pairs


def _label(v) -> str:
    s = str(v)
    return s if len(s) <= 200 else s[:200]


def _names_of(obj) -> list[str] | None:
    hit = _names.get(id(obj))
    if hit is not None and hit[0]() is obj:
        return hit[1]
    return None


def _remember_names(obj, names) -> None:
    try:
        oid = id(obj)
        ref = weakref.ref(obj, lambda _r, oid=oid: _names.pop(oid, None))
        _names[oid] = (ref, [str(n) for n in names])
    except TypeError:
        pass


# -- inputs of each kind of call --------------------------------------------------------------

def _in_path(args, kwargs):
    src = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(src, (str, os.PathLike)):
        return [("path", os.fspath(src))]
    return []


def _in_data(args, kwargs):
    data = args[0] if args else kwargs.get("data")
    return [("df", data)]


def _in_self(args, kwargs):
    return [("df", args[0])]


def _in_self_other(args, kwargs):
    other = args[1] if len(args) > 1 else kwargs.get("right", kwargs.get("other"))
    out = [("left", args[0])]
    if isinstance(other, (list, tuple)):
        out += [(f"right[{i}]", o) for i, o in enumerate(other)]
    elif other is not None:
        out.append(("right", other))
    return out


def _in_left_right(args, kwargs):
    left = args[0] if args else kwargs.get("left")
    right = args[1] if len(args) > 1 else kwargs.get("right")
    return [("left", left), ("right", right)]


def _in_objs(args, kwargs):
    objs = args[0] if args else kwargs.get("objs")
    if isinstance(objs, dict):
        return [(f"objs.{k}", v) for k, v in objs.items()]
    try:
        objs = list(objs)
    except TypeError:
        return []
    return [(f"objs[{i}]", o) for i, o in enumerate(objs)]


def _in_indexer(args, kwargs):
    return [("df", args[0].obj)]


def _in_groupby(args, kwargs):
    return [("df", args[0].obj)]


def _in_arrays(args, kwargs):
    return [(f"arrays[{i}]", a) for i, a in enumerate(args)]


def _in_estimator(args, kwargs):
    out = []
    names = ("X", "y")
    for i, a in enumerate(args[1:3]):
        out.append((names[i], a))
    for k in ("X", "y"):
        if k in kwargs:
            out.append((k, kwargs[k]))
    return [(k, v) for k, v in out if v is not None]


# -- classifying keys ------------------------------------------------------------------------

def _is_bool_key(key) -> bool:
    dt = getattr(key, "dtype", None)
    if dt is not None:
        return getattr(dt, "kind", None) == "b" or str(dt) in ("bool", "boolean", "bool[pyarrow]")
    if isinstance(key, list) and key and all(isinstance(k, bool) for k in key):
        return True
    return False


def _classify_getitem(args, kwargs) -> tuple[str, str | None]:
    key = args[1] if len(args) > 1 else None
    pd = _pd()
    if pd is not None and isinstance(key, pd.DataFrame):
        return "opaque", "boolean frame key (element-wise mask)"
    if _is_bool_key(key):
        return "filter", None
    if isinstance(key, slice):
        return "filter", None
    if isinstance(key, (str, int, float, tuple)) or key is None:
        return "projection", None
    if isinstance(key, (list,)) or hasattr(key, "__array__"):
        return "projection", None
    if callable(key):
        return "opaque", "callable key"
    return "opaque", f"key of type {type(key).__name__}"


def _classify_loc(args, kwargs) -> tuple[str, str | None]:
    key = args[1] if len(args) > 1 else None
    rows = key[0] if isinstance(key, tuple) and key else key
    if isinstance(rows, slice) and rows == slice(None):
        return "projection", None
    if _is_bool_key(rows) or isinstance(rows, slice):
        return "filter", None
    if isinstance(rows, list) or hasattr(rows, "__array__"):
        return "filter", None  # rows chosen by label / position
    return "opaque", f"row key of type {type(rows).__name__}"


def _classify_drop(args, kwargs) -> tuple[str, str | None]:
    if kwargs.get("columns") is not None or kwargs.get("axis") in (1, "columns"):
        return "projection", None
    if kwargs.get("index") is not None or len(args) > 1:
        return "filter", None
    return "opaque", None


# -- one recorded call -------------------------------------------------------------------------

def _where(frame) -> tuple[str, int, str, str]:
    code = frame.f_code
    return (os.path.abspath(code.co_filename), frame.f_lineno, code.co_qualname if hasattr(code, "co_qualname")
            else code.co_name, frame.f_globals.get("__name__", "__main__"))


_LINEAGE = {"source": "source", "filter": "index-subset", "projection": "row-aligned", "assign": "row-aligned",
            "convert": "row-aligned", "encode": "row-aligned", "transform": "row-aligned", "fit_transform": "row-aligned",
            "predict": "row-aligned", "fit_predict": "row-aligned", "join": "join", "concat": "append",
            "aggregate": "group", "split": "index-subset", "fit": "none", "opaque": "unknown"}


class _Pre:
    """What is known before the original runs: the call site, the kind and the inputs."""

    def __init__(self, spec: _Spec, cfg: _Config, frame, args: tuple, kwargs: dict) -> None:
        self.record = False
        self.spec = spec
        self.cfg = cfg
        pd = _pd()
        if spec.frames_only:
            target = args[0].obj if spec.inputs is _in_indexer else args[0]
            if pd is None or not isinstance(target, pd.DataFrame):
                return
        r = _run.ACTIVE or _run._auto_start()
        if r is None:
            return
        self.run = r
        self.t0 = _time_ns()
        self.where = _where(frame)
        note = None
        kind = spec.kind
        if spec.classify is not None:
            try:
                kind, note = spec.classify(args, kwargs)
            except Exception:
                kind, note = "opaque", "could not classify the call"
        self.kind = kind or "opaque"
        self.note = note
        if kwargs.get("inplace") is True and args:
            _cache.pop(id(args[0]), None)
        self.inputs: list[tuple[str, _Described]] = []
        self.objs: list = []
        try:
            raw = spec.inputs(args, kwargs)
        except Exception:
            raw = []
            self.kind, self.note = "opaque", "inputs not understood"
        for k, v in raw:
            if v is None:
                continue
            if isinstance(v, str):
                from flightlog import _fingerprint as fpm

                info = fpm.describe(v, summary=False)
                self.inputs.append((k, _Described(info, None, None, {}, {})))
            else:
                self.inputs.append((k, _describe(v, cfg.sensitive)))
                self.objs.append(v)
        self.record = True

    def timed(self, t0: int, t1: int) -> None:
        """The span covers the original call only; describing inputs/outputs is ``record_ms``."""
        self.before_ns = t0 - self.t0
        self.t0, self.t1 = t0, t1

    def finish(self, out, exc: BaseException | None, args: tuple, kwargs: dict) -> None:
        try:
            self._finish(out, exc, args, kwargs)
        except Exception as e:
            _warn.problem("inspect_record_failed", f"fl.inspect could not record {self.spec.op}: {e!r}")

    def _finish(self, out, exc, args, kwargs) -> None:
        spec, cfg = self.spec, self.cfg
        kind = self.kind
        outputs: list[tuple[str, _Described]] = []
        est = args[0] if spec.sklearn and args else None
        if exc is None:
            if kind == "fit" or (out is est and est is not None):
                pass  # the fitted estimator itself: no data output
            elif isinstance(out, (list, tuple)) and kind == "split":
                outputs = []
                for i, o in enumerate(out):
                    src = self.objs[i // 2] if i // 2 < len(self.objs) else None
                    parent = None
                    try:
                        pos = _positions(src, o) if src is not None else None
                        parent = (src, pos) if pos is not None else None
                    except Exception:
                        parent = None
                    outputs.append((f"return[{i}]", _describe(o, cfg.sensitive, parent)))
            elif kwargs.get("inplace") is True and out is None and args:
                _cache.pop(id(args[0]), None)
                outputs = [("return", _describe(args[0], cfg.sensitive))]
            elif out is not None and kind == "filter" and len(self.objs) == 1:
                parent = None
                try:
                    pos = _positions(self.objs[0], out, _mask_key(spec, args))
                    if pos is not None:
                        parent = (self.objs[0], pos)
                except Exception:
                    parent = None
                outputs = [("return", _describe(out, cfg.sensitive, parent))]
            elif out is not None:
                if spec.sklearn and kind in ("transform", "fit_transform"):
                    names = _feature_names_out(est, self.inputs)
                    if names is not None:
                        _remember_names(out, names)
                elif kind == "convert" and self.inputs and self.inputs[0][1].columns is not None:
                    _remember_names(out, self.inputs[0][1].columns)
                outputs = [("return", _describe(out, cfg.sensitive))]
        t1 = self.t1
        path, line, func, mod = self.where
        attrs: dict[str, Any] = {"code.function.name": func, "code.namespace": mod, "code.file.path": path,
                                 "code.line.number": line}
        self.op = spec.op
        if spec.inputs is _in_indexer and args and type(args[0]).__name__ == "_iLocIndexer":
            self.op = "DataFrame.iloc[]"
        if spec.sklearn and est is not None:
            self.op = f"{type(est).__name__}.{spec.op}"
            attrs[PREFIX + "estimator"] = f"{type(est).__module__}.{type(est).__qualname__}"
        attrs[PREFIX + "op"] = self.op
        attrs[PREFIX + "kind"] = kind
        attrs[PREFIX + "lineage"] = _LINEAGE.get(kind, "unknown")
        src = linecache.getline(path, line).strip()
        if src:
            attrs[PREFIX + "code"] = src[:500]
        rows_in = [d.rows for _, d in self.inputs if d.rows is not None]
        if rows_in:
            attrs[PREFIX + "rows_in"] = int(sum(rows_in))
        rows_out = [d.rows for _, d in outputs if d.rows is not None]
        if rows_out:
            attrs[PREFIX + "rows_out"] = int(sum(rows_out))
        cols_in: list = []
        for _, d in self.inputs:
            for c in d.columns or ():
                if c not in cols_in:
                    cols_in.append(c)
        if cols_in:
            attrs[PREFIX + "columns_in"] = json.dumps(cols_in[:MAX_COLUMN_NAMES])
        if outputs and outputs[0][1].columns is not None and kind != "split":
            attrs[PREFIX + "columns_out"] = json.dumps(outputs[0][1].columns)
        groups = _groups(cfg.sensitive, self.inputs, outputs, kind)
        if groups:
            attrs[PREFIX + "groups"] = json.dumps(groups, separators=(",", ":"))
        if spec.sklearn and kind in ("fit", "fit_transform", "fit_predict") and exc is None:
            feats = _features(est, self.inputs)
            attrs[PREFIX + "model"] = _is_model(est)
            if feats is not None:
                attrs[PREFIX + "features"] = json.dumps(feats)
            attrs[PREFIX + "illegal"] = json.dumps(list(cfg.illegal))
        if self.note:
            attrs[PREFIX + "note"] = self.note
        attrs[PREFIX + "record_ms"] = round((self.before_ns + _time_ns() - t1) / 1e6, 3)
        io = [("input", k, d.info) for k, d in self.inputs] + [("output", k, d.info) for k, d in outputs]
        _emit(self.run, self._name(), attrs, self.t0, t1, exc, io)

    def _name(self) -> str:
        path, line = self.where[0], self.where[1]
        return f"{self.op} ({os.path.basename(path)}:{line})"


def _positions(src, out, key=None):
    """Row positions in ``src`` of the rows of ``out`` (an index-subset result), or None when not cheap."""
    import numpy as np

    pd = _pd()
    if not isinstance(src, pd.DataFrame) or not isinstance(out, (pd.DataFrame, pd.Series)):
        return None
    n_out = out.shape[0]
    if key is not None and _is_bool_key(key) and not isinstance(key, pd.DataFrame):
        if isinstance(key, pd.Series) and not (key.index is src.index or key.index.equals(src.index)):
            key = None
        else:
            m = np.asarray(key, dtype=bool)
            if m.shape == (src.shape[0],):
                pos = np.flatnonzero(m)
                return pos if pos.shape[0] == n_out else None
    si, oi = src.index, out.index
    if oi.dtype.kind not in "iu":
        return None
    ov = oi.to_numpy()
    if isinstance(si, pd.RangeIndex):
        if si.step <= 0:
            return None
        pos = (ov - si.start) // si.step
    else:
        return _label_positions(si, ov)
    if pos.shape[0] and (pos.min() < 0 or pos.max() >= src.shape[0]):
        return None
    if not np.array_equal(pos * si.step + si.start, ov):
        return None
    return pos


def _mask_key(spec: _Spec, args: tuple):
    """The row key of ``df[key]`` / ``df.loc[key]`` / ``df.iloc[key]`` (a boolean mask is used as such)."""
    if len(args) < 2 or not (spec.op == "DataFrame[]" or spec.inputs is _in_indexer):
        return None
    key = args[1]
    if spec.inputs is _in_indexer and isinstance(key, tuple):
        key = key[0] if key else None
    return key


def _label_positions(si, ov):
    """Positions of integer labels ``ov`` in the unique integer index ``si`` by a scatter table, or None.

    Filters keep index labels, so after ``read_csv`` (a RangeIndex) every later subset of the
    rows has small non-negative integer labels: one O(n) scatter finds their positions, much
    cheaper than hashing each string of the sensitive columns again.
    """
    import numpy as np

    if si.dtype.kind not in "iu":
        return None
    sv = si.to_numpy()
    if sv.shape[0] == 0:
        return None
    lo, hi = int(sv.min()), int(sv.max())
    if lo < 0 or hi > 4 * sv.shape[0] + 1024:
        return None
    inv = np.full(hi + 1, -1, dtype=np.int64)
    inv[sv] = np.arange(sv.shape[0], dtype=np.int64)
    if int(np.count_nonzero(inv >= 0)) != sv.shape[0]:  # duplicate labels: positions are ambiguous
        return None
    if ov.shape[0] == 0:
        return ov.astype(np.int64)
    if int(ov.min()) < 0 or int(ov.max()) > hi:
        return None
    pos = inv[ov]
    return None if (pos < 0).any() else pos


def _groups(sensitive: tuple, inputs: list, outputs: list, kind: str) -> list[dict]:
    """Per sensitive column and value: count before (summed over the inputs that have it) and after."""
    out = []
    for c in sensitive:
        before: dict | None = None
        btotal = None
        for _, d in inputs:
            if c in d.hist:
                before = before or {}
                btotal = (btotal or 0) + d.totals[c]
                for g, n in d.hist[c]:
                    before[g] = before.get(g, 0) + n
        after: dict | None = None
        atotal = None
        if kind != "split":
            for _, d in outputs:
                if c in d.hist:
                    after = after or {}
                    atotal = (atotal or 0) + d.totals[c]
                    for g, n in d.hist[c]:
                        after[g] = after.get(g, 0) + n
        if before is None and after is None:
            continue
        values = list(dict.fromkeys(list(before or {}) + list(after or {})))
        for g in values:
            out.append({"column": c, "value": g,
                        "before": None if before is None else before.get(g, 0), "before_total": btotal,
                        "after": None if after is None else after.get(g, 0), "after_total": atotal})
    return out


def _is_model(est) -> bool:
    try:
        return any(hasattr(est, m) for m in ("predict", "predict_proba", "decision_function"))
    except Exception:
        return False


def _feature_names_out(est, inputs) -> list[str] | None:
    try:
        names = est.get_feature_names_out()
        return [str(n) for n in names]
    except Exception:
        return None


def _features(est, inputs) -> list[str] | None:
    """The feature names the model part of ``est`` was fitted on, when they can be known."""
    try:
        steps = getattr(est, "steps", None)
        if steps and len(steps) > 1:
            try:
                return [str(n) for n in est[:-1].get_feature_names_out()]
            except Exception:
                pass
    except Exception:
        pass
    for k, d in inputs:
        if k == "X":
            return d.columns
    return None


# -- writing -----------------------------------------------------------------------------------

def _emit(r, name: str, attrs: dict, t0: int, t1: int, exc: BaseException | None, io: list) -> None:
    from flightlog import _steps

    tracer = _steps._tracer or _steps._get_tracer()
    span = tracer.start_span(name, attributes={**attrs, "flightlog.run_id": r.run_id}, start_time=t0)
    if exc is not None:
        _set_error(span, exc)
    span.end(end_time=t1)
    _finish_span(r, span, attrs, exc, io, ended=True, t_end=t1)


def _set_error(span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    tp = type(exc)
    span.set_attribute("error.type", f"{tp.__module__}.{tp.__qualname__}" if tp.__module__ != "builtins"
                       else tp.__qualname__)
    span.record_exception(exc, escaped=True)
    try:
        msg = str(exc)
    except Exception:
        msg = f"<{tp.__name__} with unprintable message>"
    span.set_status(Status(StatusCode.ERROR, f"{tp.__name__}: {msg}"[:4000]))


def _finish_span(r, span, attrs: dict, exc: BaseException | None, io: list, ended: bool = False,
                 t_end: int | None = None) -> None:
    """Queue the finished span and its io rows through @fl.step's queue (same rows, same sinks)."""
    from flightlog import _steps

    if not ended:
        if exc is not None:
            _set_error(span, exc)
        span.end()
    t_us = (t_end or span.end_time or _time_ns()) // 1000
    ctx = span.context
    parent = span.parent
    epoch, batch, lctx = r.ctx
    err = _steps.span_row(span, r.writer, None) if exc is not None else None
    attrs_json = _steps.attrs_json_open(attrs)
    rows = tuple(_steps._io_tuple(direction, arg, info, t_us if direction == "output" else span.start_time // 1000,
                                  None) for direction, arg, info in io)
    record = (r.run_id, r.writer, span.name, attrs_json, ctx.trace_id, ctx.span_id,
              parent.span_id if parent is not None else None, span.start_time, span.end_time, epoch, batch, lctx,
              err, rows, ())
    _steps._enqueue(r, record)
