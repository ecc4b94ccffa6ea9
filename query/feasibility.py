"""Feasibility study (ease.ml/snoopy): is a target error reachable with this data?

The Bayes error rate (BER) is the error of the best possible classifier on a
data distribution. It is estimated here as snoopy does: the 1-nearest-neighbour
error R₁ on a held-out split, turned into a lower bound with Cover and Hart's
inequality ``BER ≥ ((C−1)/C)·(1 − √(1 − C/(C−1)·R₁))``, computed in one or
more feature transformations and minimised over them. A target error below
that bound is unlikely to be reachable with these features and labels: more
informative features or cleaner labels are needed, not a bigger model. The
convergence curve (R₁ on nested, growing subsets of the training split) says
whether more data would still move the estimate.

R₁ is exact. Distances are computed block by block as ‖b‖² − 2a·b with one
float32 matrix product per block (memory bounded by the block size, not by
n²); every training point whose float32 distance lies within a proven
rounding-error margin of the row's minimum is then re-measured exactly in
float64 (``_sq_dist``, a fixed summation order), and ties at the exact minimum
count fractionally: a test point whose k nearest training points are equally
near and j of them carry another label contributes j/k (the expected error of
1-NN with random tie-breaking). The result therefore does not depend on the
block sizes, and equals a brute-force float64 computation (``nn_error_exact``).

Nothing here writes to the store; ``flightlog.feasibility`` (sdk/_feasibility.py)
records results with the run, ``flightlog.query.predictions`` reads its inputs from the store, and
``flightlog feasibility`` (sdk/_feasibility_cli.py) is the command.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from flightlog._errors import QueryError

__all__ = [
    "FeasibilityError",
    "FeasibilityResult",
    "TransformResult",
    "cover_hart_bound",
    "estimate",
    "nn_error",
    "nn_error_exact",
]

BUILTIN = ("raw", "standardize", "pca")
PCA_VARIANCE = 0.95  # "pca" keeps the leading components that explain this share of the variance
CURVE_POINTS = 8  # subset sizes n_train, n_train/2, …, n_train/2^7
CURVE_MIN = 20  # smallest subset on the curve (or n_train when smaller)
SLOPE_POINTS = 4  # the slope is fitted on the largest subsets
PROJECT_FACTOR = 10.0  # "unlikely" must hold even with this many times the training data
_U32 = 2.0 ** -24  # unit roundoff of float32


class FeasibilityError(QueryError, ValueError):
    """Input the estimator refuses, with the reason (one line)."""


# -- the bound ------------------------------------------------------------------------------------


def cover_hart_bound(r1: float, n_classes: int) -> float:
    """Cover–Hart lower bound on the BER from the asymptotic 1-NN error ``r1`` with ``n_classes`` classes.

    ``((C−1)/C)·(1 − √(1 − C/(C−1)·r1))``; an ``r1`` at or above chance,
    (C−1)/C, gives chance itself.
    """
    c = int(n_classes)
    if c < 2:
        raise FeasibilityError(f"the bound needs at least 2 classes, got {c}")
    k = (c - 1) / c
    inner = 1.0 - float(r1) / k
    return k * (1.0 - math.sqrt(max(0.0, inner)))


def _bound_se(r1: float, se: float, n_classes: int) -> float:
    """Standard error of the bound from that of R₁ (delta method; NaN where R₁ is at chance and it is infinite)."""
    k = (n_classes - 1) / n_classes
    inner = 1.0 - r1 / k
    if inner <= 1e-12:
        return float("nan")
    return se / (2.0 * math.sqrt(inner))


# -- exact 1-NN error -----------------------------------------------------------------------------


def _sq_dist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Row-wise squared distances of paired rows, float64, summed column by column.

    The fixed order makes each value a function of its two rows only, so any
    blocking of the work gives bit-identical distances.
    """
    out = np.zeros(A.shape[0], dtype=np.float64)
    for c in range(A.shape[1]):
        d = A[:, c] - B[:, c]
        d *= d
        out += d
    return out


@dataclass
class _State:
    """Per test row: exact min distance so far, tied training points, those among them with another label."""

    emin: np.ndarray
    ties: np.ndarray
    diff: np.ndarray

    @classmethod
    def new(cls, q: int) -> "_State":
        return cls(np.full(q, np.inf), np.zeros(q, np.int64), np.zeros(q, np.int64))

    def update(self, rows: np.ndarray, e: np.ndarray, other: np.ndarray) -> None:
        """Merge exact distances ``e`` of pairs (row, training point); ``other``: label differs."""
        q = self.emin.shape[0]
        bmin = np.full(q, np.inf)
        np.minimum.at(bmin, rows, e)
        at = e == bmin[rows]
        r = rows[at]
        cnt = np.bincount(r, minlength=q)
        dcnt = np.bincount(r[other[at]], minlength=q)
        lt = bmin < self.emin
        eq = (bmin == self.emin) & np.isfinite(bmin)
        self.emin[lt] = bmin[lt]
        self.ties[lt] = cnt[lt]
        self.diff[lt] = dcnt[lt]
        self.ties[eq] += cnt[eq]
        self.diff[eq] += dcnt[eq]

    def errors(self) -> np.ndarray:
        return self.diff / np.maximum(self.ties, 1)


def _check_xy(X: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X.reshape(-1, 1)
    y = np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise FeasibilityError(f"{what}: features must be 2-D and labels 1-D with one label per row, "
                               f"got {X.shape} and {y.shape}")
    return X, y


def _checkpoints(n_train: int, checkpoints: Sequence[int] | None) -> list[int]:
    if checkpoints is None:
        return [n_train]
    cps = sorted({int(c) for c in checkpoints})
    if not cps or cps[0] < 1 or cps[-1] > n_train:
        raise FeasibilityError(f"checkpoints must lie in [1, {n_train}], got {list(checkpoints)}")
    return cps


def nn_error(X_train: Any, y_train: Any, X_test: Any, y_test: Any, *,
             checkpoints: Sequence[int] | None = None, block: tuple[int, int] = (1024, 4096),
             per_row: bool = False) -> Any:
    """Exact 1-NN error of ``X_test`` against the prefixes ``X_train[:c]`` for each checkpoint ``c``.

    Returns a dict ``{c: R₁}`` (``{c: per-row errors}`` with ``per_row``); all
    prefixes come from one pass over the training rows. ``block`` = (test rows,
    training rows) per float32 product; memory is O(block + n·d).
    """
    Xtr, ytr = _check_xy(X_train, y_train, "training split")
    Xte, yte = _check_xy(X_test, y_test, "test split")
    if Xtr.shape[1] != Xte.shape[1]:
        raise FeasibilityError(f"training and test rows differ in width: {Xtr.shape[1]} vs {Xte.shape[1]}")
    if Xtr.shape[0] == 0 or Xte.shape[0] == 0:
        raise FeasibilityError("the training and the test split must both hold rows")
    if not (np.isfinite(Xtr).all() and np.isfinite(Xte).all()):
        raise FeasibilityError("features must be finite (drop or impute rows with NaN/inf first)")
    _check_magnitude(Xtr, Xte)
    cps = _checkpoints(Xtr.shape[0], checkpoints)
    _, codes = np.unique(np.concatenate([ytr, yte]), return_inverse=True)
    ctr, cte = codes[: len(ytr)], codes[len(ytr):]
    errs = _nn_errors(Xtr, ctr, Xte, cte, cps, block)
    if per_row:
        return errs
    return {c: float(np.sum(e) / e.shape[0]) for c, e in errs.items()}


def _nn_errors(Xtr: np.ndarray, ctr: np.ndarray, Xte: np.ndarray, cte: np.ndarray,
               cps: list[int], block: tuple[int, int]) -> dict[int, np.ndarray]:
    """Per-test-row fractional 1-NN errors for every checkpoint (float64 arrays)."""
    q_blk, p_blk = max(1, int(block[0])), max(1, int(block[1]))
    n_tr, d = Xtr.shape
    n_te = Xte.shape[0]
    cps_end = cps[-1]
    # float32 copies, centred on the training mean (smaller norms, smaller rounding margins) and
    # scaled by a power of two (exact) so that float32 neither overflows nor goes subnormal
    mean = Xtr[:cps_end].mean(axis=0)
    cmax = 0.0
    for X_, end in ((Xtr, cps_end), (Xte, Xte.shape[0])):
        for s in range(0, end, 65536):
            cmax = max(cmax, float(np.max(np.abs(X_[s:min(s + 65536, end)] - mean))))
    scale = 2.0 ** -math.ceil(math.log2(cmax)) if cmax > 0 else 1.0
    B32 = np.empty((cps_end, d + 1), dtype=np.float32)  # rows [-2b, ‖b‖²]
    bnorm_max = 0.0
    for s in range(0, cps_end, 65536):
        chunk_ = Xtr[s:min(s + 65536, cps_end)]
        b = ((chunk_ - mean) * scale).astype(np.float32)
        b64 = b.astype(np.float64)
        nb = np.einsum("ij,ij->i", b64, b64)
        bnorm_max = max(bnorm_max, float(np.sqrt(nb.max())))
        B32[s:s + len(chunk_), :d] = b * np.float32(-2.0)
        B32[s:s + len(chunk_), d] = nb.astype(np.float32)
    # |float32 estimate + ‖a‖² − true squared distance| ≤ γ·(‖a‖ + ‖b‖)², from: rounding each centred
    # coordinate (float64 subtraction, then float32: relative error ≤ 1.01u) moves the squared distance by
    # ≤ 2.02u·(‖a‖+‖b‖)²; the product's K = d+1 terms in any summation order err by ≤ γ_K·Σ|terms|
    # ≤ 1.01·(d+1)·u·(‖a‖+‖b‖)²; rounding ‖b‖² to float32 adds ≤ 1.01u·‖b‖². Sum ≤ 1.01·(d+4)·u·(…)²;
    # we use twice that plus slack. Candidates lie within 2γ(…)² of the row's minimum.
    gamma = 2.0 * ((d + 8) * _U32 * 1.01)
    out = {c: np.empty(n_te, dtype=np.float64) for c in cps}

    def chunk(t0: int, q_end: int) -> None:
        te = Xte[t0:q_end]
        q = te.shape[0]
        a = ((te - mean) * scale).astype(np.float32)
        a64 = a.astype(np.float64)
        anorm = np.sqrt(np.einsum("ij,ij->i", a64, a64))
        A = np.empty((q, d + 1), dtype=np.float32)
        A[:, :d] = a
        A[:, d] = 1.0
        margin2 = 2.0 * gamma * (anorm + bnorm_max) ** 2  # twice the margin, float64
        rmin = np.full(q, np.inf)
        st = _State.new(q)
        cte_blk = cte[t0:q_end]
        j = 0
        for cp in cps:
            while j < cp:
                j1 = min(j + p_blk, cp)
                D = A @ B32[j:j1].T  # q × p: ‖b‖² − 2a·b
                bm = D.min(axis=1).astype(np.float64)
                np.minimum(rmin, bm, out=rmin)
                thr = rmin + margin2
                hot = np.nonzero(bm <= thr)[0]
                if hot.size:
                    Dh = D if hot.size == q else D[hot]
                    thr32 = np.nextafter(thr[hot].astype(np.float32), np.float32(np.inf))
                    rr, cc = np.nonzero(Dh <= thr32[:, None])
                    rows = hot[rr]
                    cols = cc + j
                    for s in range(0, rows.size, 65536):  # bounded memory even when everything ties
                        r_s, c_s = rows[s:s + 65536], cols[s:s + 65536]
                        e = _sq_dist(Xte[t0 + r_s], Xtr[c_s])
                        st.update(r_s, e, ctr[c_s] != cte_blk[r_s])
                j = j1
            out[cp][t0:q_end] = st.errors()

    workers = _workers()
    q_blk = max(1, min(q_blk, -(-n_te // workers)))  # enough chunks to keep every core busy
    starts = list(range(0, n_te, q_blk))
    if workers == 1 or len(starts) == 1:
        for t0 in starts:
            chunk(t0, min(t0 + q_blk, n_te))
        return out
    from concurrent.futures import ThreadPoolExecutor

    with _one_blas_thread(), ThreadPoolExecutor(max_workers=min(workers, len(starts)),
                                                thread_name_prefix="flightlog-nn") as pool:
        for f in [pool.submit(chunk, t0, min(t0 + q_blk, n_te)) for t0 in starts]:
            f.result()
    return out


def _workers() -> int:
    """Cores this process may use (the test chunks run in that many threads, BLAS single-threaded)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    env = os.environ.get("FLIGHTLOG_THREADS")
    if env and env.strip().isdigit() and int(env) > 0:
        n = min(n, int(env))
    return max(1, n)


def _one_blas_thread():
    """BLAS limited to one thread while our own threads split the work (threadpoolctl when installed).

    Without threadpoolctl the threads still split the work, and BLAS keeps its own threads.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _check_magnitude(*arrays: np.ndarray) -> None:
    """Refuse values whose squared differences would overflow float64 (the exact distances use it)."""
    big = max((float(np.max(np.abs(A))) for A in arrays if A.size), default=0.0)
    if big > 1e150 or 0 < big < 1e-140:
        raise FeasibilityError(f"feature values up to {big:.3g} are too {'large' if big > 1 else 'small'} "
                               "for exact squared distances in float64; rescale the features")


def nn_error_exact(X_train: Any, y_train: Any, X_test: Any, y_test: Any, per_row: bool = False) -> Any:
    """Brute-force reference: every float64 distance, fractional ties. O(n_test·n_train) time."""
    Xtr, ytr = _check_xy(X_train, y_train, "training split")
    Xte, yte = _check_xy(X_test, y_test, "test split")
    errs = np.empty(Xte.shape[0])
    for i in range(Xte.shape[0]):
        e = _sq_dist(np.broadcast_to(Xte[i], Xtr.shape), Xtr)
        at = e == e.min()
        errs[i] = np.count_nonzero(ytr[at] != yte[i]) / np.count_nonzero(at)
    return errs if per_row else float(np.sum(errs) / errs.shape[0])


# -- transformations ------------------------------------------------------------------------------


def _standardize(Xtr: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mu = Xtr.mean(axis=0)
    sd = Xtr.std(axis=0)
    keep = sd > 0  # constant columns carry no information and would divide by zero
    mu, sd = mu[keep], sd[keep]
    return lambda X: (X[:, keep] - mu) / sd


def _pca(Xtr: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mu = Xtr.mean(axis=0)
    d = Xtr.shape[1]
    if d <= 4096:
        cov = np.zeros((d, d))
        for s in range(0, Xtr.shape[0], 65536):
            c = Xtr[s:s + 65536] - mu
            cov += c.T @ c
        w, V = np.linalg.eigh(cov)
        w, V = w[::-1], V[:, ::-1]
    else:  # randomised range finder: the leading 256 directions without a d×d matrix
        rng = np.random.default_rng(0)
        k = 256
        Y = (Xtr - mu) @ rng.standard_normal((d, k + 16))
        for _ in range(2):
            Y, _r = np.linalg.qr(Y)
            Y = (Xtr - mu) @ ((Xtr - mu).T @ Y)
        Q, _r = np.linalg.qr(Y)
        _u, s, Vt = np.linalg.svd(Q.T @ (Xtr - mu), full_matrices=False)
        w, V = s ** 2, Vt.T
    w = np.clip(w, 0, None)
    total = w.sum()
    if total <= 0:
        k = 1
    else:
        k = int(np.searchsorted(np.cumsum(w) / total, PCA_VARIANCE - 1e-12) + 1)
    W = np.ascontiguousarray(V[:, : max(1, min(k, V.shape[1]))])
    return lambda X: (X - mu) @ W


_FITTERS = {"raw": lambda Xtr: (lambda X: X), "standardize": _standardize, "pca": _pca}


def _safe_name(name: str) -> str:
    out = "".join(ch if (ch.isalnum() or ch in "_-.") else "_" for ch in str(name)).strip("_")
    return out[:64] or "custom"


def _resolve_transforms(transforms: Any) -> list[tuple[str, Any]]:
    """[(name, builtin name or callable)] from names, callables, (name, callable) pairs or a dict."""
    if transforms is None:
        transforms = BUILTIN
    if isinstance(transforms, (str, bytes)) or callable(transforms):
        transforms = [transforms]
    items = list(transforms.items()) if isinstance(transforms, dict) else list(transforms)
    out: list[tuple[str, Any]] = []
    for t in items:
        if isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str):
            name, fn = t
            if not (callable(fn) or fn in _FITTERS):
                raise FeasibilityError(f"transform {name!r}: expected a callable or one of {', '.join(BUILTIN)}")
            out.append((_safe_name(name), fn))
        elif isinstance(t, str):
            if t not in _FITTERS:
                raise FeasibilityError(f"unknown transform {t!r}; built in: {', '.join(BUILTIN)} "
                                       "(or pass a callable X -> features)")
            out.append((t, t))
        elif callable(t):
            out.append((_safe_name(getattr(t, "__name__", "") or type(t).__name__), t))
        else:
            raise FeasibilityError(f"a transform must be a name ({', '.join(BUILTIN)}) or a callable, got {t!r}")
    if not out:
        raise FeasibilityError("no transforms given")
    seen: dict[str, int] = {}
    named = []
    for name, fn in out:
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        seen.setdefault(name, 0)
        named.append((name, fn))
    return named


def _is_torch_module(fn: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(fn, torch.nn.Module)


def _torch_module_apply(module: Any, X: np.ndarray) -> np.ndarray:
    """A torch module (a pre-trained embedding) on float32 batches of 4096 rows, without gradients."""
    import torch

    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    parts = []
    with torch.no_grad():
        for s in range(0, X.shape[0], 4096):
            out = module(torch.as_tensor(X[s:s + 4096], dtype=dtype, device=device))
            parts.append(out.detach().reshape(out.shape[0], -1).to("cpu", torch.float64).numpy())
    return np.concatenate(parts) if parts else np.empty((0, 0))


def _apply(name: str, fn: Any, X: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    """The transformed feature matrix (float64, finite, 2-D, one row per input row)."""
    if fn == "raw":
        Z = X
    elif isinstance(fn, str):
        f = _FITTERS[fn](X[train_idx])
        parts = []
        for s in range(0, X.shape[0], 65536):  # fixed blocks: values never depend on the caller
            parts.append(np.asarray(f(X[s:s + 65536]), dtype=np.float64))
        Z = np.concatenate(parts)
    else:
        try:
            Z = _torch_module_apply(fn, X) if _is_torch_module(fn) else fn(X)
        except Exception as e:
            raise FeasibilityError(f"transform {name!r} failed: {type(e).__name__}: {e}") from e
        if type(Z).__module__.split(".")[0] == "torch":
            Z = Z.detach().cpu().numpy()
        try:
            Z = np.asarray(Z, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise FeasibilityError(f"transform {name!r} must return a numeric array: {e}") from e
        if Z.ndim == 1:
            Z = Z.reshape(-1, 1)
        elif Z.ndim > 2:
            Z = Z.reshape(Z.shape[0], -1)
        if Z.ndim != 2 or Z.shape[0] != X.shape[0]:
            raise FeasibilityError(f"transform {name!r} returned shape {Z.shape}; expected one row per "
                                   f"input row ({X.shape[0]})")
        if not np.isfinite(Z).all():
            raise FeasibilityError(f"transform {name!r} returned NaN or inf values")
    if Z.shape[1] == 0:
        raise FeasibilityError(f"transform {name!r} left no features (all columns constant?)")
    return np.ascontiguousarray(Z)


# -- results --------------------------------------------------------------------------------------


@dataclass
class TransformResult:
    """R₁ and the bound in one transformation, with its convergence curve."""

    name: str
    dims: int
    r1: float
    r1_se: float
    bound: float
    bound_se: float
    curve: list[tuple[int, float]]  # (training subset size, R₁)
    slope: float | None  # change of the bound per doubling of the training set (None: < 3 points)
    slope_se: float | None  # its standard error (the larger of the fit residuals' and the R₁ noise's)
    seconds: float

    def to_dict(self) -> dict:
        return {"name": self.name, "dims": self.dims, "r1": self.r1, "r1_se": self.r1_se, "bound": self.bound,
                "bound_se": self.bound_se, "curve": [list(p) for p in self.curve], "slope": self.slope,
                "slope_se": self.slope_se, "seconds": self.seconds}


@dataclass
class FeasibilityResult:
    """What ``estimate`` found: the minimal bound over transformations and the verdict for the target."""

    n: int
    n_train: int
    n_test: int
    classes: int
    rows_skipped: int
    target_error: float | None
    transforms: list[TransformResult]
    best: str
    bound: float
    slope: float | None
    projected: float | None
    verdict: str | None  # feasible | unlikely | undecided | None (no target)
    test_size: float
    seed: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> TransformResult:
        for t in self.transforms:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"n": self.n, "n_train": self.n_train, "n_test": self.n_test, "classes": self.classes,
                "rows_skipped": self.rows_skipped, "target_error": self.target_error, "best": self.best,
                "bound": self.bound, "slope": self.slope, "projected": self.projected, "verdict": self.verdict,
                "test_size": self.test_size, "seed": self.seed, "seconds": self.seconds, "notes": self.notes,
                "transforms": [t.to_dict() for t in self.transforms]}

    def summary(self) -> str:
        """A few lines for people: the bound, the verdict and one line per transformation."""
        lines = [f"{self.n} rows ({self.n_train} train / {self.n_test} held out), {self.classes} classes"
                 + (f", {self.rows_skipped} rows skipped (missing values)" if self.rows_skipped else "")]
        lines.append(f"BER lower bound {self.bound:.4f} (min over transforms: {self.best})"
                     + (f", slope {self.slope:+.4f} per doubling of the data" if self.slope is not None else ""))
        if self.target_error is not None:
            why = {"feasible": "the target error is not below the lower bound",
                   "unlikely": (f"the target is below the bound, even extrapolated pessimistically to "
                                f"{PROJECT_FACTOR:g}x the data ({self.projected:.4f})"
                                if self.projected is not None else ""),
                   "undecided": ("the target is below the bound, but not below its pessimistic extrapolation "
                                 f"to {PROJECT_FACTOR:g}x the data ({self.projected:.4f}): the curve may still "
                                 "fall, more data or a better transform could get there"
                                 if self.projected is not None else
                                 "the target is below the bound, but the curve has too few points to tell")}
            lines.append(f"target error {self.target_error:g}: {self.verdict} ({why.get(self.verdict, '')})")
        lines.append("")
        w = max(9, max(len(t.name) for t in self.transforms))
        lines.append(f"{'transform':<{w}}  {'dims':>5}  {'R1':>7}  {'± se':>7}  {'bound':>7}  {'slope':>8}  curve (n: R1)")
        for t in self.transforms:
            curve = "  ".join(f"{n}:{r:.4f}" for n, r in t.curve)
            slope = f"{t.slope:+.4f}" if t.slope is not None else "-"
            lines.append(f"{t.name:<{w}}  {t.dims:>5}  {t.r1:>7.4f}  {t.r1_se:>7.4f}  {t.bound:>7.4f}  "
                         f"{slope:>8}  {curve}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# -- the estimator ----------------------------------------------------------------------------------


def _labels(y: Any) -> np.ndarray:
    """Labels as a 1-D numpy array (lists, Series, tensors, Arrow arrays)."""
    if type(y).__module__.split(".")[0] == "torch":
        y = y.detach().cpu().numpy()
    if hasattr(y, "to_numpy") and not isinstance(y, np.ndarray):
        try:
            y = y.to_numpy(zero_copy_only=False)
        except TypeError:
            y = y.to_numpy()
    y = np.asarray(y)
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise FeasibilityError(f"labels must be 1-D (one class per row), got shape {y.shape}"
                               + ("; pass class indices, e.g. onehot.argmax(1)" if y.ndim == 2 else ""))
    return y


def _features(X: Any) -> np.ndarray:
    if type(X).__module__.split(".")[0] == "torch":
        X = X.detach().cpu().numpy()
    if hasattr(X, "to_numpy") and not isinstance(X, np.ndarray):
        X = X.to_numpy()
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise FeasibilityError(f"features must be numeric: {e}") from e
    if X.ndim == 1:
        X = X.reshape(-1, 1)
    if X.ndim > 2:
        X = X.reshape(X.shape[0], -1)
    return X


def _missing_label(y: np.ndarray) -> np.ndarray:
    if y.dtype.kind == "f":
        return np.isnan(y)
    if y.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, float) and math.isnan(v)) for v in y], dtype=bool)
    return np.zeros(y.shape[0], dtype=bool)


def _split_sizes(n: int, test_size: Any) -> int:
    """Held-out rows: ``test_size`` is a fraction in (0, 1) or a row count."""
    if isinstance(test_size, (bool, np.bool_)):
        raise FeasibilityError(f"test_size must be a fraction in (0, 1) or a row count, got {test_size!r}")
    if isinstance(test_size, (int, np.integer)):
        n_test = int(test_size)
    elif isinstance(test_size, (float, np.floating)) and 0.0 < float(test_size) < 1.0:
        n_test = int(math.ceil(float(test_size) * n))
    else:
        raise FeasibilityError(f"test_size must be a fraction in (0, 1) or a row count, got {test_size!r}")
    if n_test < 1 or n - n_test < 1:
        raise FeasibilityError(f"test_size {test_size!r} leaves {n_test} held-out and {n - n_test} training rows "
                               f"of {n}; both need at least one")
    return n_test


def _curve_sizes(n_train: int) -> list[int]:
    lo = min(n_train, CURVE_MIN)
    sizes = {n_train}
    for k in range(1, CURVE_POINTS):
        s = int(math.ceil(n_train / 2 ** k))
        if s >= lo:
            sizes.add(s)
    return sorted(sizes)


def _slope(curve: list[tuple[int, float]], classes: int, bound_se: float) -> tuple[float | None, float | None]:
    """(slope, its standard error) of the bound per doubling of n over the largest subsets (None below 3 points).

    The error is the larger of the fit's residual error and the one the bound's
    own noise (``bound_se`` per point) would give.
    """
    pts = curve[-SLOPE_POINTS:]
    if len(pts) < 3:
        return None, None
    x = np.log2([p[0] for p in pts])
    b = np.array([cover_hart_bound(p[1], classes) for p in pts])
    x = x - x.mean()
    sxx = float(np.dot(x, x))
    slope = float(np.dot(x, b - b.mean()) / sxx)
    resid = b - b.mean() - slope * x
    se_fit = math.sqrt(float(np.dot(resid, resid)) / (len(pts) - 2) / sxx)
    se_noise = (bound_se / math.sqrt(sxx)) if math.isfinite(bound_se) else 0.0
    return slope, max(se_fit, se_noise)


def verdict(bound: float, bound_se: float, slope: float | None, slope_se: float | None,
            target_error: float | None) -> tuple[str | None, float | None]:
    """(verdict, projected bound) for ``target_error``.

    ``projected`` is a pessimistic extrapolation of the bound to
    PROJECT_FACTOR times the training rows: the bound minus two standard
    errors, plus the slope minus two of its standard errors (never rising)
    times log2(PROJECT_FACTOR) doublings. ``feasible``: the target is not below
    the bound. ``unlikely``: it is below ``projected`` too. ``undecided``:
    below the bound but not below ``projected`` (the curve still falls, or the
    estimate is too noisy to tell), or fewer than 3 curve points.
    """
    projected = None
    if slope is not None:
        drop = min(slope - 2.0 * (slope_se or 0.0), 0.0) * math.log2(PROJECT_FACTOR)
        noise = 2.0 * bound_se if math.isfinite(bound_se) else 0.0
        projected = max(0.0, bound - noise + drop)
    if target_error is None:
        return None, projected
    if target_error >= bound:
        return "feasible", projected
    if projected is not None and target_error < projected:
        return "unlikely", projected
    return "undecided", projected


def estimate(X: Any, y: Any, target_error: float | None = None,
             transforms: Any = BUILTIN, test_size: float = 0.2, seed: int = 0,
             block: tuple[int, int] = (1024, 4096)) -> FeasibilityResult:
    """Estimate a lower bound on the BER of (X, y) and judge ``target_error`` against it.

    The rows are shuffled with ``seed`` and split into a held-out part
    (``test_size``: a fraction, or a row count) and a training part whose
    prefixes give the convergence curve. Built-in transforms (``raw``,
    ``standardize``, ``pca``) are fitted on the training part only; callables
    (``X -> features``, e.g. a pre-trained embedding) are applied as they are.
    Rows with a missing label or non-finite features are left out and counted.
    """
    t_start = time.perf_counter()
    if target_error is not None:
        try:
            target_error = float(target_error)
        except (TypeError, ValueError):
            raise FeasibilityError(f"target_error must be a number in [0, 1], got {target_error!r}") from None
        if not 0.0 <= target_error <= 1.0:
            raise FeasibilityError(f"target_error must be an error rate in [0, 1], got {target_error!r}")
    seed = int(seed)
    X = _features(X)
    y = _labels(y)
    if X.shape[0] != y.shape[0]:
        raise FeasibilityError(f"features have {X.shape[0]} rows but there are {y.shape[0]} labels")
    if X.shape[1] == 0:
        raise FeasibilityError("features have no columns")
    ok = np.isfinite(X).all(axis=1) & ~_missing_label(y)
    skipped = int(X.shape[0] - np.count_nonzero(ok))
    if skipped:
        X, y = X[ok], y[ok]
    n = X.shape[0]
    if n < 2:
        raise FeasibilityError(f"need at least 2 usable rows, got {n}"
                               + (f" ({skipped} rows had missing labels or non-finite features)" if skipped else ""))
    try:
        classes, codes = np.unique(y, return_inverse=True)
    except TypeError:  # mixed types: compare as text
        classes, codes = np.unique(y.astype(str), return_inverse=True)
    C = len(classes)
    if C < 2:
        raise FeasibilityError(f"the labels hold a single class ({classes[0]!r}); the BER needs at least two")
    if C > max(2, n // 2):
        raise FeasibilityError(f"{C} distinct labels in {n} rows: the label looks continuous or like an id "
                               "(the BER is for classification labels)")
    named = _resolve_transforms(transforms)
    n_test = _split_sizes(n, test_size)
    perm = np.random.default_rng(seed).permutation(n)
    te_idx, tr_idx = perm[:n_test], perm[n_test:]
    n_train = tr_idx.shape[0]
    sizes = _curve_sizes(n_train)
    ytr, yte = codes[tr_idx], codes[te_idx]
    results: list[TransformResult] = []
    for name, fn in named:
        t0 = time.perf_counter()
        Z = _apply(name, fn, X, np.sort(tr_idx))
        dims = Z.shape[1]
        _check_magnitude(Z)
        Ztr, Zte = Z[tr_idx], Z[te_idx]
        del Z  # a transformed copy is freed before the distance pass (the raw one is the caller's X)
        errs = _nn_errors(Ztr, ytr, Zte, yte, sizes, block)
        del Ztr, Zte
        curve = [(s, float(np.sum(errs[s]) / n_test)) for s in sizes]
        r1 = curve[-1][1]
        e_full = errs[sizes[-1]]
        se = float(np.std(e_full, ddof=1) / math.sqrt(n_test)) if n_test > 1 else float("nan")
        bound = cover_hart_bound(r1, C)
        bse = _bound_se(r1, se, C)
        slope, slope_se = _slope(curve, C, bse)
        results.append(TransformResult(name=name, dims=int(dims), r1=r1, r1_se=se, bound=bound, bound_se=bse,
                                       curve=curve, slope=slope, slope_se=slope_se,
                                       seconds=time.perf_counter() - t0))
    best = min(results, key=lambda t: (t.bound, t.name))
    v, projected = verdict(best.bound, best.bound_se, best.slope, best.slope_se, target_error)
    notes = []
    if n_test < 100:
        notes.append(f"note: only {n_test} held-out rows; R1 has a standard error of "
                     f"{best.r1_se:.3f} (use more data or a larger test_size)")
    return FeasibilityResult(n=n, n_train=n_train, n_test=n_test, classes=C, rows_skipped=skipped,
                             target_error=target_error, transforms=results, best=best.name, bound=best.bound,
                             slope=best.slope, projected=projected, verdict=v,
                             test_size=float(test_size), seed=seed, seconds=time.perf_counter() - t_start,
                             notes=notes)



# -- storage ----------------------------------------------------------------------------------------


def to_table(result: FeasibilityResult, run_id: str, source: str, input: str, analysis_id: str | None = None):
    """The ``feasibility`` table rows of one study: one per transformation."""
    import datetime as _dt
    import uuid

    import pyarrow as pa

    from flightlog.collector import schema as _schema

    aid = analysis_id or uuid.uuid4().hex[:16]
    now = _dt.datetime.now(_dt.timezone.utc)

    def num(v):
        return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)

    rows = []
    for t in result.transforms:
        rows.append({
            "run_id": run_id, "analysis_id": aid, "source": source, "input": input, "transform": t.name,
            "dims": t.dims, "n_train": result.n_train, "n_test": result.n_test, "classes": result.classes,
            "rows_skipped": result.rows_skipped, "r1": t.r1, "r1_se": num(t.r1_se), "bound": t.bound,
            "slope": num(t.slope), "curve": json.dumps([[int(n), float(r)] for n, r in t.curve]),
            "best": t.name == result.best, "bound_min": result.bound, "projected": num(result.projected),
            "target_error": num(result.target_error), "verdict": result.verdict,
            "test_size": float(result.test_size), "seed": int(result.seed), "seconds": float(t.seconds),
            "time": now,
        })
    return pa.Table.from_pylist(rows, schema=_schema.FEASIBILITY)
