"""Exact SliceLine slice finding: which conjunctions of feature predicates
concentrate a model's errors.

Implements the scoring, pruning and top-K enumeration of SliceLine
(Sagadeeva & Boehm, SIGMOD 2021) with three deliberate differences from the
public implementations:

* the size penalty uses the true number of rows ``n`` (the public code uses
  the number of one-hot columns);
* candidates are identified by exact integer keys (ids of one-hot columns),
  never by float products of domain sizes, which collide past 2**53 and
  silently drop candidates;
* pruning keeps every candidate whose bound can still *reach* the current
  K-th score (ties included), so the result equals brute force exactly,
  including the documented tie rule.

Slices are evaluated with ``np.bincount`` over feature pairs (level 2) and by
filtering the rows of a parent slice (levels >= 3), so cost follows slice
sizes rather than ``n x candidates``. See docs/slices.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["find"]

MISSING = "<missing>"

_PRED_TYPE = pa.struct(
    [
        pa.field("column", pa.string()),
        pa.field("op", pa.string()),
        pa.field("value", pa.string()),
        pa.field("low", pa.float64()),
        pa.field("high", pa.float64()),
    ]
)
_SCHEMA = pa.schema(
    [
        pa.field("rank", pa.int32()),
        pa.field("slice", pa.string()),
        pa.field("predicates", pa.list_(_PRED_TYPE)),
        pa.field("level", pa.int32()),
        pa.field("size", pa.int64()),
        pa.field("error_sum", pa.float64()),
        pa.field("error_mean", pa.float64()),
        pa.field("error_max", pa.float64()),
        pa.field("score", pa.float64()),
    ]
)


# --------------------------------------------------------------------------
# input handling and encoding
# --------------------------------------------------------------------------


class _Column:
    """One encoded feature: int32 codes in [0, card) plus a label per code."""

    __slots__ = ("name", "codes", "card", "labels", "ops", "lows", "highs")

    def __init__(self, name, codes, labels, ops, lows, highs):
        self.name = name
        self.codes = codes
        self.card = len(labels)
        self.labels = labels
        self.ops = ops
        self.lows = lows
        self.highs = highs


def _fmt_num(x: float) -> str:
    s = f"{x:.6g}"
    if s.lstrip("-").isdigit():
        s += ".0"
    return s


def _fmt_value(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, float):
        return _fmt_num(v)
    return str(v)


def _sort_dictionary(values: list) -> np.ndarray:
    """Permutation putting category values in sorted order (first-seen if unsortable)."""
    idx = list(range(len(values)))
    try:
        idx.sort(key=lambda i: values[i])
    except TypeError:
        try:
            idx.sort(key=lambda i: (type(values[i]).__name__, str(values[i])))
        except Exception:
            pass
    return np.asarray(idx, dtype=np.int64)


def _categorical(name: str, arr: pa.Array) -> _Column:
    darr = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr)
    dvals = darr.dictionary.to_pylist()
    idx = pc.fill_null(darr.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    # None / NaN dictionary entries (float categories) count as missing
    keep = [i for i, v in enumerate(dvals) if not (v is None or (isinstance(v, float) and math.isnan(v)))]
    order = _sort_dictionary([dvals[i] for i in keep])
    remap = np.full(len(dvals) + 1, -1, dtype=np.int64)  # remap[-1] serves idx == -1
    remap[np.asarray(keep, dtype=np.int64)[order]] = np.arange(len(keep))
    codes = remap[idx]
    labels = [_fmt_value(dvals[keep[i]]) for i in order]
    absent = codes < 0
    if absent.any():
        codes[absent] = len(labels)
        labels.append(MISSING)
    n_lab = len(labels)
    return _Column(name, codes.astype(np.int32), labels, ["="] * n_lab, [None] * n_lab, [None] * n_lab)


def _numeric(name: str, x: np.ndarray, bins: int, binning: str) -> _Column:
    miss = np.isnan(x)
    valid = x[~miss]
    if valid.size == 0:
        return _Column(name, np.zeros(len(x), np.int32), [MISSING], ["="], [None], [None])
    lo, hi = float(valid.min()), float(valid.max())
    if binning == "quantile":
        edges = np.unique(np.quantile(valid, np.linspace(0.0, 1.0, bins + 1)))
    else:
        edges = np.unique(np.linspace(lo, hi, bins + 1))
    if edges.size == 1:
        edges = np.array([lo, hi])
    edges[0], edges[-1] = lo, hi
    nb = edges.size - 1
    # bin i is [edges[i], edges[i+1]); the last bin is closed [edges[-2], edges[-1]]
    codes = np.searchsorted(edges[1:-1], x, side="right").astype(np.int32)
    labels, lows, highs = [], [], []
    for i in range(nb):
        a, b = float(edges[i]), float(edges[i + 1])
        close = "]" if i == nb - 1 else ")"
        labels.append(f"[{_fmt_num(a)}, {_fmt_num(b)}{close}")
        lows.append(a)
        highs.append(b)
    ops = ["in"] * nb
    if miss.any():
        codes[miss] = nb
        labels.append(MISSING)
        ops.append("=")
        lows.append(None)
        highs.append(None)
    return _Column(name, codes, labels, ops, lows, highs)


def _encode_arrow(name: str, arr: pa.Array, bins: int, binning: str) -> _Column:
    t = arr.type
    if pa.types.is_null(t):
        return _Column(name, np.zeros(len(arr), np.int32), [MISSING], ["="], [None], [None])
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        x = pc.fill_null(pc.cast(arr, pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
        return _numeric(name, np.asarray(x, dtype=np.float64), bins, binning)
    if pa.types.is_integer(t):
        distinct = pc.count_distinct(arr, mode="only_valid").as_py()
        if distinct <= bins:
            return _categorical(name, arr)
        x = pc.fill_null(pc.cast(arr, pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
        return _numeric(name, np.asarray(x, dtype=np.float64), bins, binning)
    if pa.types.is_dictionary(t):
        return _categorical(name, arr)
    return _categorical(name, arr)


def _to_arrow_array(values: Any) -> pa.Array:
    try:
        arr = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        obj = np.asarray(values, dtype=object)
        arr = pa.array(
            [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in obj],
            type=pa.string(),
        )
    return arr


def _columns_of(X: Any) -> list[tuple[str, pa.Array]]:
    """Normalise the supported inputs to (name, arrow array) pairs without importing pandas/polars."""
    mod = type(X).__module__.split(".")[0]
    if mod == "polars":
        X = X.to_arrow()
    if isinstance(X, pa.RecordBatch):
        X = pa.Table.from_batches([X])
    if isinstance(X, pa.Table):
        return [(str(n), c.combine_chunks()) for n, c in zip(X.column_names, X.columns)]
    if mod == "pandas":
        import pandas as pd

        if isinstance(X, pd.Series):
            X = X.to_frame()
        if not isinstance(X, pd.DataFrame):
            raise TypeError(f"unsupported pandas input {type(X).__name__}")
        out = []
        for j, name in enumerate(X.columns):
            s = X.iloc[:, j]
            try:
                arr = pa.Array.from_pandas(s)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
                arr = _to_arrow_array(s.to_numpy(dtype=object))
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            out.append((str(name), arr))
        return out
    if isinstance(X, np.ndarray):
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got an array of shape {X.shape}")
        out = []
        for j in range(X.shape[1]):
            col = X[:, j]
            if col.dtype.kind in "biuf":
                arr = pa.array(col, from_pandas=True)
            else:
                arr = _to_arrow_array(col)
            out.append((f"f{j}", arr))
        return out
    raise TypeError(
        "X must be a pandas or polars DataFrame, a pyarrow Table or a 2-D numpy array, "
        f"got {type(X).__name__}"
    )


def _errors_of(errors: Any, n: int) -> np.ndarray:
    if isinstance(errors, (pa.Array, pa.ChunkedArray)):
        errors = pc.fill_null(pc.cast(errors, pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
    elif type(errors).__module__.split(".")[0] in ("pandas", "polars"):
        errors = errors.to_numpy()
    try:
        e = np.asarray(errors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"errors must be numeric: {exc}") from None
    if e.ndim != 1:
        e = e.reshape(-1) if e.ndim == 2 and 1 in e.shape else e
    if e.ndim != 1:
        raise ValueError(f"errors must be a 1-D per-row vector, got shape {e.shape}")
    if e.shape[0] != n:
        raise ValueError(f"errors has {e.shape[0]} entries but X has {n} rows")
    if np.isnan(e).any():
        raise ValueError(f"errors contains NaN ({int(np.isnan(e).sum())} rows); errors must be >= 0")
    if (e < 0).any():
        raise ValueError(f"errors contains negative values (min {e.min()}); errors must be >= 0")
    if np.isinf(e).any():
        raise ValueError("errors contains infinite values")
    return e


# --------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------


def _score(ss, se, n, ebar, alpha):
    with np.errstate(divide="ignore", invalid="ignore"):
        return alpha * ((se / ss) / ebar - 1.0) - (1.0 - alpha) * (n / ss - 1.0)


def _bound(ss, se, sm, sigma, n, ebar, alpha):
    """Upper bound of the score of any slice with size in [sigma, ss], error sum <= se and max <= sm.

    The score as a function of size is monotone between the three points
    (sigma, se/sm, ss), so its maximum over the interval is attained at one of them.
    """
    ss = np.asarray(ss, dtype=np.float64)
    se = np.asarray(se, dtype=np.float64)
    sm = np.asarray(sm, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mid = np.where(sm > 0, se / np.where(sm > 0, sm, 1.0), ss)
        mid = np.minimum(np.maximum(mid, sigma), ss)
        best = np.full(ss.shape, -np.inf)
        for s in (np.full(ss.shape, float(sigma)), mid, ss):
            s = np.where(s > 0, s, np.nan)
            v = alpha * ((np.minimum(s * sm, se) / s) / ebar - 1.0) - (1.0 - alpha) * (n / s - 1.0)
            best = np.fmax(best, v)
    return best


def _reachable(bound: np.ndarray, kth: float | None) -> np.ndarray:
    """True where a bound can still reach a positive score >= the K-th best (ties kept)."""
    tol = 1e-9 * (1.0 + np.abs(bound))
    ok = bound > -tol
    if kth is not None:
        ok &= bound >= kth - tol
    return ok


# --------------------------------------------------------------------------
# top-K bookkeeping
# --------------------------------------------------------------------------


def _merge_topk(top: list, k: int, ids: np.ndarray, ss, se, sm, sc) -> list:
    """Merge qualifying slices into the top-K list, ordered by (-score, -size, predicate ids)."""
    if len(sc) == 0:
        return top
    if len(top) + len(sc) > k:
        pool = np.concatenate([np.array([t[0] for t in top], dtype=np.float64), sc])
        thr = np.partition(pool, len(pool) - k)[len(pool) - k]
        sel = np.flatnonzero(sc >= thr)
    else:
        sel = np.arange(len(sc))
    cand = list(top)
    for i in sel:
        cand.append((float(sc[i]), int(ss[i]), tuple(int(v) for v in ids[i]), float(se[i]), float(sm[i])))
    cand.sort(key=lambda t: (-t[0], -t[1], t[2]))
    return cand[:k]


def _kth(top: list, k: int) -> float | None:
    return top[-1][0] if len(top) >= k else None


# --------------------------------------------------------------------------
# exact keys for rows of predicate ids
# --------------------------------------------------------------------------


def _row_keys(ids: np.ndarray, D: int) -> np.ndarray:
    """Collision-free, order-preserving keys for rows of one-hot ids (ids < D)."""
    width = ids.shape[1]
    if D ** width < 2**62:
        key = np.zeros(ids.shape[0], dtype=np.int64)
        for t in range(width):
            key = key * D + ids[:, t].astype(np.int64)
        return key
    # Too wide for int64: compare raw big-endian bytes (exact and lexicographic).
    be = np.ascontiguousarray(ids.astype(">i4"))
    return be.view(np.dtype((np.void, 4 * width))).ravel()


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each key in sorted_keys, -1 where absent."""
    if sorted_keys.size == 0:
        return np.full(keys.shape[0], -1, dtype=np.int64)
    pos = np.searchsorted(sorted_keys, keys)
    pos = np.minimum(pos, sorted_keys.size - 1)
    return np.where(sorted_keys[pos] == keys, pos, -1)


# --------------------------------------------------------------------------
# main algorithm
# --------------------------------------------------------------------------


class _Rows:
    """Lazily built per-feature row lists: rows of (feature f, code c), ascending."""

    def __init__(self, cols: list[_Column]):
        self.cols = cols
        self.perm: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, f: int, c: int) -> np.ndarray:
        if f not in self.perm:
            codes = self.cols[f].codes
            key = codes.astype(np.uint16) if self.cols[f].card <= 65535 else codes
            perm = np.argsort(key, kind="stable").astype(np.int32)
            off = np.zeros(self.cols[f].card + 1, dtype=np.int64)
            np.cumsum(np.bincount(codes, minlength=self.cols[f].card), out=off[1:])
            self.perm[f] = (perm, off)
        perm, off = self.perm[f]
        return perm[off[c] : off[c + 1]]


def _group_stats(sub: np.ndarray, w: np.ndarray, card: int, binary: bool):
    ss = np.bincount(sub, minlength=card).astype(np.float64)
    se = np.bincount(sub, weights=w, minlength=card)
    if binary:
        sm = (se > 0).astype(np.float64)
    else:
        sm = np.zeros(card)
        np.maximum.at(sm, sub, w)
    return ss, se, sm


def _stats_at(sub: np.ndarray, w: np.ndarray, card: int, binary: bool, wanted: np.ndarray):
    """(size, error sum, error max) of the codes in ``wanted`` among ``sub``.

    Dense bincount when the code domain is small; otherwise compact the domain
    to the wanted codes so huge cardinalities never allocate card-sized arrays.
    """
    if card <= max(4 * sub.shape[0], 1 << 16):
        a, b, c = _group_stats(sub, w, card, binary)
        return a[wanted], b[wanted], c[wanted]
    uniq, inv = np.unique(wanted, return_inverse=True)
    pos = np.minimum(np.searchsorted(uniq, sub), uniq.size - 1)
    hit = uniq[pos] == sub
    a, b, c = _group_stats(pos[hit], w[hit], uniq.size, binary)
    return a[inv], b[inv], c[inv]


def find(
    X: Any,
    errors: Any,
    k: int = 4,
    alpha: float = 0.95,
    min_support: int | float | None = None,
    max_level: int = 3,
    bins: int = 10,
    binning: str = "quantile",
) -> pa.Table:
    """Top-``k`` slices (conjunctions of <= ``max_level`` predicates) where errors concentrate.

    ``X``: pandas/polars DataFrame, pyarrow Table or 2-D numpy array; ``errors``:
    one non-negative value per row (0/1 misclassification or a loss). Numeric
    columns (other than integers with <= ``bins`` distinct values) are cut into
    ``bins`` quantile (or ``binning="equal"`` equi-width) bins; missing values
    form their own ``"<missing>"`` category. ``min_support`` is a row count, or
    a fraction of rows if < 1; it defaults to max(32, ceil(1% of rows)).

    Returns a pyarrow Table (rank, slice, predicates, level, size, error_sum,
    error_mean, error_max, score) of the slices with size >= min_support and
    score > 0, best first; ties on score go to the larger slice, then to the
    lexicographically smaller predicate list (column position, category/bin order).
    The result equals exhaustive enumeration; see docs/slices.md.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not (0.0 < float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if not isinstance(max_level, (int, np.integer)) or max_level < 1:
        raise ValueError(f"max_level must be a positive integer, got {max_level!r}")
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if binning not in ("quantile", "equal"):
        raise ValueError(f"binning must be 'quantile' or 'equal', got {binning!r}")
    k, max_level, bins, alpha = int(k), int(max_level), int(bins), float(alpha)

    raw = _columns_of(X)
    if not raw:
        raise ValueError("X has no columns")
    n = len(raw[0][1])
    if n == 0:
        raise ValueError("X has no rows")
    e = _errors_of(errors, n)

    if min_support is None:
        sigma = max(32, math.ceil(0.01 * n))
    elif isinstance(min_support, (float, np.floating)) and 0 < min_support < 1:
        sigma = math.ceil(float(min_support) * n)
    elif min_support >= 1:
        sigma = math.ceil(min_support)
    else:
        raise ValueError(f"min_support must be a row count >= 1 or a fraction in (0, 1), got {min_support!r}")

    ebar = float(e.mean())
    if ebar == 0.0 or sigma > n:
        return _SCHEMA.empty_table()

    cols = [_encode_arrow(name, arr, bins, binning) for name, arr in raw]
    F = len(cols)
    binary = bool(np.all((e == 0.0) | (e == 1.0)))
    offs = np.zeros(F + 1, dtype=np.int64)
    np.cumsum([c.card for c in cols], out=offs[1:])
    D = int(offs[-1])
    feat_of = np.repeat(np.arange(F), [c.card for c in cols])

    top: list = []

    # ---- level 1 ---------------------------------------------------------
    ss1 = np.zeros(D)
    se1 = np.zeros(D)
    sm1 = np.zeros(D)
    for f, col in enumerate(cols):
        a, b, c = _group_stats(col.codes, e, col.card, binary)
        ss1[offs[f] : offs[f + 1]] = a
        se1[offs[f] : offs[f + 1]] = b
        sm1[offs[f] : offs[f + 1]] = c
    ok = (ss1 >= sigma) & (se1 > 0)
    ids1 = np.flatnonzero(ok)
    sc1 = _score(ss1[ids1], se1[ids1], n, ebar, alpha)
    good = sc1 > 0
    top = _merge_topk(top, k, ids1[good, None], ss1[ids1][good], se1[ids1][good], sm1[ids1][good], sc1[good])
    alive = _reachable(_bound(ss1[ids1], se1[ids1], sm1[ids1], sigma, n, ebar, alpha), _kth(top, k))
    ids1 = ids1[alive]
    prev_ids = ids1[:, None].astype(np.int32)
    prev_ss, prev_se, prev_sm = ss1[ids1], se1[ids1], sm1[ids1]

    # ---- level 2: one bincount per feature pair ---------------------------
    if max_level >= 2 and prev_ids.shape[0] > 1:
        kept1 = np.zeros(D, dtype=bool)
        kept1[ids1] = True
        feats = sorted(set(feat_of[ids1].tolist()))
        out_ids, out_ss, out_se, out_sm = [], [], [], []
        kth = _kth(top, k)
        for ai, fa in enumerate(feats):
            ca = cols[fa]
            ka = kept1[offs[fa] : offs[fa + 1]]
            for fb in feats[ai + 1 :]:
                cb = cols[fb]
                kb = kept1[offs[fb] : offs[fb + 1]]
                # candidate grid: both parents kept, bound from min of parent stats
                pa_i, pb_i = (g.ravel() for g in np.meshgrid(np.flatnonzero(ka), np.flatnonzero(kb), indexing="ij"))
                ga, gb = pa_i + offs[fa], pb_i + offs[fb]
                ub_ss = np.minimum(ss1[ga], ss1[gb])
                ub_se = np.minimum(se1[ga], se1[gb])
                ub_sm = np.minimum(sm1[ga], sm1[gb])
                m = (ub_ss >= sigma) & _reachable(_bound(ub_ss, ub_se, ub_sm, sigma, n, ebar, alpha), kth)
                if not m.any():
                    continue
                pa_i, pb_i, ga, gb = pa_i[m], pb_i[m], ga[m], gb[m]
                code = ca.codes.astype(np.int64) * cb.card + cb.codes
                cell = pa_i * cb.card + pb_i
                s_ss, s_se, s_sm = _stats_at(code, e, ca.card * cb.card, binary, cell)
                keep = (s_ss >= sigma) & (s_se > 0)
                if keep.any():
                    out_ids.append(np.stack([ga[keep], gb[keep]], axis=1))
                    out_ss.append(s_ss[keep])
                    out_se.append(s_se[keep])
                    out_sm.append(s_sm[keep])
        if out_ids:
            prev_ids = np.concatenate(out_ids).astype(np.int32)
            prev_ss = np.concatenate(out_ss)
            prev_se = np.concatenate(out_se)
            prev_sm = np.concatenate(out_sm)
        else:
            prev_ids = np.zeros((0, 2), np.int32)
            prev_ss = prev_se = prev_sm = np.zeros(0)
        top, (prev_ids, prev_ss, prev_se, prev_sm) = _finish_level(
            top, k, prev_ids, prev_ss, prev_se, prev_sm, sigma, n, ebar, alpha, D
        )
    elif max_level >= 2:
        prev_ids = np.zeros((0, 2), np.int32)

    # ---- levels 3..max_level: join, bound, evaluate on parent rows --------
    rows = _Rows(cols)
    level = 3
    while level <= min(max_level, F) and prev_ids.shape[0] > 1:
        cand, par = _join(prev_ids, feat_of)
        if cand.shape[0] == 0:
            break
        L = level
        pkeys = _row_keys(prev_ids, D)  # prev_ids is sorted lexicographically
        ub_ss = np.minimum(prev_ss[par[:, 0]], prev_ss[par[:, 1]])
        ub_se = np.minimum(prev_se[par[:, 0]], prev_se[par[:, 1]])
        ub_sm = np.minimum(prev_sm[par[:, 0]], prev_sm[par[:, 1]])
        exists = np.ones(cand.shape[0], dtype=bool)
        for d in range(L - 2):
            sub = np.delete(cand, d, axis=1)
            pos = _lookup(pkeys, _row_keys(sub, D))
            exists &= pos >= 0
            pos = np.where(pos >= 0, pos, 0)
            ub_ss = np.minimum(ub_ss, prev_ss[pos])
            ub_se = np.minimum(ub_se, prev_se[pos])
            ub_sm = np.minimum(ub_sm, prev_sm[pos])
        m = exists & (ub_ss >= sigma)
        m &= _reachable(_bound(ub_ss, ub_se, ub_sm, sigma, n, ebar, alpha), _kth(top, k))
        cand, par = cand[m], par[m]
        if cand.shape[0] == 0:
            break
        c_ss, c_se, c_sm = _evaluate(cand, par[:, 0], prev_ids, cols, offs, feat_of, rows, e, binary)
        keep = (c_ss >= sigma) & (c_se > 0)
        top, (prev_ids, prev_ss, prev_se, prev_sm) = _finish_level(
            top, k, cand[keep], c_ss[keep], c_se[keep], c_sm[keep], sigma, n, ebar, alpha, D
        )
        level += 1

    return _render(top, cols, offs, feat_of)


def _finish_level(top, k, ids, ss, se, sm, sigma, n, ebar, alpha, D):
    """Add a level's slices to the top-K, then keep those whose own bound can still matter."""
    sc = _score(ss, se, n, ebar, alpha)
    good = sc > 0
    top = _merge_topk(top, k, ids[good], ss[good], se[good], sm[good], sc[good])
    alive = _reachable(_bound(ss, se, sm, sigma, n, ebar, alpha), _kth(top, k))
    ids, ss, se, sm = ids[alive], ss[alive], se[alive], sm[alive]
    if ids.shape[0]:
        order = np.argsort(_row_keys(ids, D), kind="stable")
        ids, ss, se, sm = ids[order], ss[order], se[order], sm[order]
    return top, (ids, ss, se, sm)


def _join(prev: np.ndarray, feat_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apriori join of lexicographically sorted level-(L-1) slices sharing their first L-2 ids.

    Returns candidates (sorted ids, shape (c, L)) and the indices of the two
    joined parents (the candidate minus its last id, minus its second-to-last id).
    """
    m, w = prev.shape
    if w == 1:
        prefix_change = np.ones(m, dtype=bool)
    else:
        prefix_change = np.ones(m, dtype=bool)
        prefix_change[1:] = np.any(prev[1:, : w - 1] != prev[:-1, : w - 1], axis=1)
    starts = np.flatnonzero(prefix_change)
    ends = np.append(starts[1:], m)
    lastf = feat_of[prev[:, -1]]
    ci, cj = [], []
    for s, t in zip(starts.tolist(), ends.tolist()):
        g = t - s
        if g < 2:
            continue
        i, j = np.triu_indices(g, 1)
        ok = lastf[s + i] != lastf[s + j]
        ci.append(s + i[ok])
        cj.append(s + j[ok])
    if not ci:
        return np.zeros((0, w + 1), np.int32), np.zeros((0, 2), np.int64)
    ci = np.concatenate(ci)
    cj = np.concatenate(cj)
    cand = np.concatenate([prev[ci], prev[cj, -1:]], axis=1)
    return cand, np.stack([ci, cj], axis=1)


def _rows_of(p: np.ndarray, cols, offs, feat_of, rows: _Rows) -> np.ndarray:
    """Ascending row indices of the slice with one-hot ids p: filter the smallest predicate's rows."""
    pf = feat_of[p]
    pv = p - offs[pf]
    sizes = [rows.get(int(f), int(v)).shape[0] for f, v in zip(pf, pv)]
    o = int(np.argmin(sizes))
    r = rows.get(int(pf[o]), int(pv[o]))
    for q in range(len(p)):
        if q != o:
            r = r[cols[pf[q]].codes[r] == pv[q]]
    return r


def _split(r: np.ndarray, col: _Column) -> tuple[np.ndarray, np.ndarray]:
    """Partition rows r by col's code in one O(|r|) pass: (rows grouped by code, offsets)."""
    sub = col.codes[r]
    key = sub.astype(np.uint16) if col.card <= 65535 else sub
    order = np.argsort(key, kind="stable")  # radix sort; keeps rows ascending per code
    off = np.zeros(col.card + 1, dtype=np.int64)
    np.cumsum(np.bincount(sub, minlength=col.card), out=off[1:])
    return r[order], off


def _evaluate(cand, parent, prev_ids, cols, offs, feat_of, rows: _Rows, e, binary):
    """Exact stats of candidates, computed on the rows of their prefix parent only.

    Parents sharing all but their last predicate reuse one pass over the shared
    rows (split by the last feature), so cost follows slice sizes.
    """
    c = cand.shape[0]
    ss, se, sm = np.zeros(c), np.zeros(c), np.zeros(c)
    last = cand[:, -1]
    lf = feat_of[last]
    # candidate ranges per parent (candidates are ordered by parent)
    starts = np.flatnonzero(np.r_[True, parent[1:] != parent[:-1]])
    ends = np.append(starts[1:], c)
    upar = parent[starts]
    pids = prev_ids[upar]
    # parents ordered lexicographically: those sharing a prefix are consecutive
    if pids.shape[1] > 1:
        qchange = np.r_[True, np.any(pids[1:, :-1] != pids[:-1, :-1], axis=1)]
    else:
        qchange = np.ones(len(upar), dtype=bool)
    qstarts = np.flatnonzero(qchange)
    qends = np.append(qstarts[1:], len(upar))
    for qs, qe in zip(qstarts.tolist(), qends.tolist()):
        group = pids[qs:qe]
        w_ = group.shape[1]
        rows_q = None if w_ == 1 else _rows_of(group[0, :-1], cols, offs, feat_of, rows)
        lastf = feat_of[group[:, -1]]
        split_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for gi in range(qe - qs):
            fb = int(lastf[gi])
            vb = int(group[gi, -1] - offs[fb])
            if rows_q is None:
                r = rows.get(fb, vb)
            elif np.count_nonzero(lastf == fb) == 1:
                r = rows_q[cols[fb].codes[rows_q] == vb]
            else:
                if fb not in split_cache:
                    split_cache[fb] = _split(rows_q, cols[fb])
                grouped, off = split_cache[fb]
                r = grouped[off[vb] : off[vb + 1]]
            s, t = int(starts[qs + gi]), int(ends[qs + gi])
            w = e[r]
            seg_f = lf[s:t]
            for f in np.unique(seg_f).tolist():
                idx = s + np.flatnonzero(seg_f == f)
                col = cols[f]
                ss[idx], se[idx], sm[idx] = _stats_at(col.codes[r], w, col.card, binary, last[idx] - offs[f])
    return ss, se, sm


def _render(top: list, cols: list[_Column], offs: np.ndarray, feat_of: np.ndarray) -> pa.Table:
    if not top:
        return _SCHEMA.empty_table()
    ranks, texts, preds, levels, sizes, sums, means, maxes, scores = ([] for _ in range(9))
    for r, (sc, size, ids, se, sm) in enumerate(top, start=1):
        parts, plist = [], []
        for g in ids:
            f = int(feat_of[g])
            col = cols[f]
            c = g - int(offs[f])
            label, op = col.labels[c], col.ops[c]
            parts.append(f"{col.name} {op} {label}")
            plist.append({"column": col.name, "op": op, "value": label, "low": col.lows[c], "high": col.highs[c]})
        ranks.append(r)
        texts.append(" AND ".join(parts))
        preds.append(plist)
        levels.append(len(ids))
        sizes.append(size)
        sums.append(se)
        means.append(se / size)
        maxes.append(sm)
        scores.append(sc)
    return pa.Table.from_arrays(
        [
            pa.array(ranks, pa.int32()),
            pa.array(texts, pa.string()),
            pa.array(preds, pa.list_(_PRED_TYPE)),
            pa.array(levels, pa.int32()),
            pa.array(sizes, pa.int64()),
            pa.array(sums, pa.float64()),
            pa.array(means, pa.float64()),
            pa.array(maxes, pa.float64()),
            pa.array(scores, pa.float64()),
        ],
        schema=_SCHEMA,
    )
