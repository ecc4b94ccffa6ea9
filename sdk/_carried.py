"""Loop-carried state: the script's own variables that a checkpoint must hold besides the registered objects.

A training loop keeps state in plain variables (``lr /= 4``, ``best = max(best, acc)``,
an early-stopping counter, ``running += loss.item()`` inside the batch loop), in
objects nobody registered (a scheduler, a grad scaler, an EMA model) and in
containers it appends to. Resume and replay are exact only if that state is
restored too, so every checkpoint captures it automatically:

* **Which variables**: a static analysis of the ``for`` statement that iterates
  the ``fl.loop`` (its target, body and ``else``): every name it assigns, and every
  name it mutates (``x.append(…)``, ``x[i] = …``, ``x.attr = …``), plus the names
  that functions of the same file declare ``global``. At an ``inner_exit``
  checkpoint the frame running the inner loop is analysed the same way (a batch
  loop inside ``def train()``). Loop-invariant variables are not needed: the
  script recomputes them.
* **Objects with ``state_dict()``** anywhere in those frames that were not
  registered are captured by state dict and loaded back in place.
* **Values**: tensors and arrays are copied; anything else is pickled (cloudpickle)
  with *references to live objects kept as references* (a registered model, its
  parameters, an unregistered optimizer), so ``params = list(net.parameters())``
  still points at the model after a restore.
* **What cannot be captured** (unpicklable, or over :data:`LIMIT` bytes) is named
  in one warning at record time and listed in the checkpoint row (``captured``
  column), so the replay planner can fall back to exact re-execution when a new
  statement depends on it.

Restoring rebinds the variables in the frame that iterates the loop: module
globals for a module-level loop, the function's locals otherwise (CPython:
``PyFrame_LocalsToFast``; write-through ``f_locals`` from 3.13 on).
"""
from __future__ import annotations

import ast
import copy
import ctypes
import functools
import io
import linecache
import os
import pickle
import sys
import types
from typing import Any

import numpy as np

from flightlog import _warn

LIMIT = int(os.environ.get("FLIGHTLOG_CAPTURE_LIMIT", str(256 * 2 ** 20)))  # bytes per captured value

_SKIP_TYPES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
               types.CodeType, types.FrameType, types.GeneratorType)
_INPLACE_CONTAINERS = (list, dict, set, bytearray)


# -- static analysis ----------------------------------------------------------------------

# Methods that only read their object (tensors, arrays, containers, strings): calling them does not
# make a variable loop state. Any other method call (``append``, ``step``, ``add_``, an unknown one)
# counts as a mutation: capturing too much costs time, capturing too little would be wrong.
_PURE = frozenset("""
to float double half int long bool cpu cuda numpy item tolist detach clone size dim numel view view_as
reshape flatten squeeze unsqueeze permute transpose t contiguous sum mean std var max min argmax argmin
norm abs exp log sqrt pow softmax log_softmax sigmoid tanh relu astype copy any all eq ne gt lt ge le
matmul mm bmm type keys values items get count index format join split strip startswith endswith lower
upper replace encode decode state_dict parameters named_parameters buffers named_buffers children
named_children modules named_modules expand expand_as repeat gather index_select masked_fill chunk unbind
new_zeros new_ones new_tensor new_full new_empty round floor ceil clamp clip sort_values topk cumsum prod
dot isnan isinf isfinite nonzero where ravel squeeze_dims
""".split())


class _Names(ast.NodeVisitor):
    """Names a statement assigns and names it mutates, without entering nested scopes."""

    def __init__(self) -> None:
        self.assigned: set[str] = set()
        self.mutated: set[str] = set()

    def _store(self, t: ast.AST) -> None:
        if isinstance(t, ast.Name):
            self.assigned.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self._store(e)
        elif isinstance(t, ast.Starred):
            self._store(t.value)
        elif isinstance(t, (ast.Attribute, ast.Subscript)):
            base = t.value
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(base, ast.Name):
                self.mutated.add(base.id)

    def visit_Assign(self, n):
        for t in n.targets:
            self._store(t)
        self.generic_visit(n)

    def visit_AugAssign(self, n):
        self._store(n.target)
        self.generic_visit(n)

    def visit_AnnAssign(self, n):
        if n.value is not None:
            self._store(n.target)
        self.generic_visit(n)

    def visit_NamedExpr(self, n):
        self._store(n.target)
        self.generic_visit(n)

    def visit_For(self, n):
        self._store(n.target)
        self.generic_visit(n)

    visit_AsyncFor = visit_For

    def visit_withitem(self, n):
        if n.optional_vars is not None:
            self._store(n.optional_vars)
        self.generic_visit(n)

    def visit_ExceptHandler(self, n):
        if n.name:
            self.assigned.add(n.name)
        self.generic_visit(n)

    def visit_Delete(self, n):
        for t in n.targets:
            self._store(t)

    def visit_Import(self, n):
        for a in n.names:
            self.assigned.add((a.asname or a.name).split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_Call(self, n):
        f = n.func
        if isinstance(f, ast.Attribute) and not (f.attr in _PURE and not f.attr.endswith("_")):
            base = f.value
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(base, ast.Name):
                self.mutated.add(base.id)
        self.generic_visit(n)

    def visit_FunctionDef(self, n):
        self.assigned.add(n.name)  # the def binds a name; its body is another scope

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef

    def visit_Lambda(self, n):
        pass

    def _comp(self, n):
        for g in n.generators:  # comprehension targets are local to it; only walrus leaks
            self.visit(g.iter)
            for c in g.ifs:
                self.visit(c)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comp


@functools.lru_cache(maxsize=256)
def _parse(filename: str) -> ast.AST | None:
    lines = linecache.getlines(filename)
    if not lines:
        return None
    try:
        return ast.parse("".join(lines))
    except SyntaxError:
        return None


@functools.lru_cache(maxsize=1024)
def loop_scope(filename: str, lineno: int) -> tuple[frozenset, frozenset, frozenset] | None:
    """(assigned, mutated, declared-global) names of the ``for`` statement iterating at ``lineno``.

    None when no ``for`` statement's iterable is on that line (the loop object was
    built elsewhere): the frame's state cannot be analysed.
    """
    tree = _parse(filename)
    if tree is None:
        return None
    best = None
    for n in ast.walk(tree):
        if isinstance(n, (ast.For, ast.AsyncFor)):
            it = n.iter
            if it.lineno <= lineno <= (it.end_lineno or it.lineno):
                if best is None or (n.end_lineno - n.lineno) < (best.end_lineno - best.lineno):
                    best = n
    if best is None:
        return None
    v = _Names()
    v.visit(best)
    # Targets of nested for statements (a batch loop's `xb, yb`) that nothing outside that nested
    # loop reads are dead at every checkpoint: not worth copying (a new statement that reads them
    # is planned at batch level, since they are then not captured).
    assigned, mutated = set(v.assigned), set(v.mutated)
    # The same for `with … as f` targets (a file handle used only inside the block).
    blocks = [(n, n.target) for n in ast.walk(best) if isinstance(n, (ast.For, ast.AsyncFor)) and n is not best]
    blocks += [(n, it.optional_vars) for n in ast.walk(best) if isinstance(n, (ast.With, ast.AsyncWith))
               for it in n.items if it.optional_vars is not None]
    for n, target in blocks:
        inside = {id(x) for x in ast.walk(n)}
        outside_reads = {x.id for x in ast.walk(best) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load)
                         and id(x) not in inside}
        for t in ast.walk(target):
            if isinstance(t, ast.Name) and t.id not in outside_reads:
                assigned.discard(t.id)
                mutated.discard(t.id)
    glob = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Global):
            glob.update(n.names)
    return frozenset(assigned), frozenset(mutated), frozenset(glob)


def loop_end_line(filename: str, lineno: int) -> int | None:
    """Last line of the ``for`` statement whose iterable is on ``lineno``."""
    tree = _parse(filename)
    if tree is None:
        return None
    best = None
    for n in ast.walk(tree):
        if isinstance(n, (ast.For, ast.AsyncFor)) and n.iter.lineno <= lineno <= (n.iter.end_lineno or n.iter.lineno):
            if best is None or (n.end_lineno - n.lineno) < (best.end_lineno - best.lineno):
                best = n
    return best.end_lineno if best is not None else None


def _is_module_frame(frame) -> bool:
    return frame.f_code.co_name == "<module>" or frame.f_locals is frame.f_globals


# -- live objects kept by reference ------------------------------------------------------------

class _Live:
    """Objects restored in place (registered ones, unregistered state-dict holders, their tensors).

    A pickled variable that refers to one of them stores a reference instead of a
    copy, resolved against the objects of the restoring process.
    """

    def __init__(self) -> None:
        self.by_id: dict[int, tuple] = {}
        self.objs: dict[tuple, Any] = {}

    def add(self, key: tuple, obj: Any) -> None:
        if id(obj) in self.by_id:
            return
        self.by_id[id(obj)] = key
        self.objs[key] = obj
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.nn.Module):
            for pn, p in obj.named_parameters():
                self.by_id.setdefault(id(p), key + ("param", pn))
                self.objs.setdefault(key + ("param", pn), p)
            for bn, b in obj.named_buffers():
                self.by_id.setdefault(id(b), key + ("buffer", bn))
                self.objs.setdefault(key + ("buffer", bn), b)
            for mn, m in obj.named_modules():
                if mn:
                    self.by_id.setdefault(id(m), key + ("module", mn))
                    self.objs.setdefault(key + ("module", mn), m)


def _pickler_cls():
    import cloudpickle

    class P(cloudpickle.CloudPickler):
        live: _Live

        def persistent_id(self, obj):  # noqa: D401 - pickle protocol
            k = self.live.by_id.get(id(obj))
            return k

    return P


def _dumps(value: Any, live: _Live) -> bytes:
    buf = io.BytesIO()
    P = _pickler_cls()
    p = P(buf, protocol=pickle.HIGHEST_PROTOCOL)
    p.live = live
    p.dump(value)
    return buf.getvalue()


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, live: _Live) -> None:
        super().__init__(f)
        self.live = live

    def persistent_load(self, pid):
        obj = self.live.objs.get(tuple(pid))
        if obj is None:
            raise pickle.UnpicklingError(f"live object {pid!r} is not present now")
        return obj


def _loads(data: bytes, live: _Live) -> Any:
    return _Unpickler(io.BytesIO(data), live).load()


def _nbytes(v: Any) -> int:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(v, torch.Tensor):
        return v.element_size() * v.nelement()
    if isinstance(v, np.ndarray):
        return int(v.nbytes)
    return 0


# -- capture --------------------------------------------------------------------------------------

def _scope_names(frame, lineno: int):
    info = loop_scope(frame.f_code.co_filename, lineno)
    return info


def capture(scopes: list[tuple[str, Any, int]], registered: dict[str, Any]) -> tuple[dict, dict]:
    """Capture the loop-carried state of ``scopes`` = [(role, frame, lineno)].

    Returns (payload part, summary) where summary is ``{"vars": [...], "uncaptured": {name: reason}}``.
    Never raises.
    """
    from flightlog._checkpoint import _clone_tree

    torch = sys.modules.get("torch")
    live = _Live()
    for k, obj in registered.items():
        live.add(("reg", k), obj)
    out: dict[str, dict] = {}
    summary_vars: list[str] = []
    uncaptured: dict[str, str] = {}
    for role, frame, lineno in scopes:
        if frame is None:
            continue
        try:
            info = _scope_names(frame, lineno)
        except Exception:
            info = None
        module = _is_module_frame(frame)
        where = "module" if module else frame.f_code.co_name
        if info is None:
            uncaptured[f"{where}:*"] = ("the loop's for statement was not found in the source "
                                        "(fl.loop built outside a for statement)")
            continue
        assigned, mutated, glob = info
        if module:
            # globals that functions of the file rebind (``global n; n += 1`` in a step function)
            assigned = assigned | (glob & frame.f_globals.keys())
        ns = frame.f_globals if module else frame.f_locals
        gns = frame.f_globals
        entry: dict[str, Any] = {"state_dicts": {}, "arrays": {}, "pickled": None, "pickled_names": [],
                                 "inplace": [], "globals": []}
        # 1. unregistered objects with state_dict() anywhere in the frame
        for name, v in list(ns.items()):
            if isinstance(v, _SKIP_TYPES) or id(v) in live.by_id:
                continue
            try:
                has = callable(getattr(v, "state_dict", None)) and callable(getattr(v, "load_state_dict", None))
            except Exception:
                has = False
            if not has:
                continue
            try:
                entry["state_dicts"][name] = _clone_tree(v.state_dict())
                live.add(("var", role, name), v)
                summary_vars.append(name)
            except Exception as e:
                uncaptured[name] = f"state_dict() failed: {e!r}"[:200]
        # 2. names the loop assigns or mutates
        plain: dict[str, Any] = {}
        for name in sorted((assigned | mutated)):
            # a function's name that is not one of its locals is a global of its module
            src = gns if (not module and (name in glob or name not in ns)) else ns
            if name not in src:
                continue
            v = src[name]
            if isinstance(v, _SKIP_TYPES) or id(v) in live.by_id or name in entry["state_dicts"]:
                continue
            if src is gns and not module:
                entry["globals"].append(name)
            only_mutated = name not in assigned
            try:
                if torch is not None and isinstance(v, torch.Tensor) or isinstance(v, np.ndarray):
                    n = _nbytes(v)
                    if n > LIMIT:
                        uncaptured[name] = f"{type(v).__name__} of {n / 2**20:.0f} MiB is over the {LIMIT / 2**20:.0f} MiB bound"
                        continue
                    entry["arrays"][name] = v.detach().clone() if not isinstance(v, np.ndarray) else v.copy()
                    if only_mutated:
                        entry["inplace"].append(name)
                    summary_vars.append(name)
                    continue
                if isinstance(v, (np.random.Generator, np.random.RandomState)) or type(v).__name__ == "Random":
                    plain[name] = v
                    entry["inplace"].append(name)
                    continue
                plain[name] = v
                if only_mutated:
                    entry["inplace"].append(name)
            except Exception as e:
                uncaptured[name] = f"copy failed: {e!r}"[:200]
        # one pickle for all plain values: aliasing between them is kept
        if plain:
            try:
                data = _dumps(plain, live)
                if len(data) > LIMIT:
                    raise OverflowError("too large")
                entry["pickled"] = data
                entry["pickled_names"] = sorted(plain)
                summary_vars += sorted(plain)
            except Exception:
                good = {}
                for name, v in plain.items():
                    try:
                        d = _dumps(v, live)
                        if len(d) > LIMIT:
                            uncaptured[name] = (f"{type(v).__name__} pickles to {len(d) / 2**20:.0f} MiB, over "
                                                f"the {LIMIT / 2**20:.0f} MiB bound")
                            continue
                        good[name] = v
                    except Exception as e:
                        uncaptured[name] = f"{type(v).__name__} cannot be pickled ({type(e).__name__}: {e})"[:240]
                if good:
                    try:
                        entry["pickled"] = _dumps(good, live)
                        entry["pickled_names"] = sorted(good)
                        summary_vars += sorted(good)
                    except Exception as e:
                        for name in good:
                            uncaptured[name] = f"cannot be pickled: {e!r}"[:200]
        out[role] = entry
    summary = {"vars": sorted(set(summary_vars)), "uncaptured": uncaptured}
    return out, summary


def warn_uncaptured(summary: dict, seen: set) -> None:
    """One warning per variable that cannot be captured, at record time."""
    for name, why in summary.get("uncaptured", {}).items():
        if name in seen:
            continue
        seen.add(name)
        _warn.problem(f"state_not_captured:{name}",
                      f"loop variable {name!r} is not saved in checkpoints: {why}; resume continues without "
                      "it and replays whose new statements read it re-execute from the start")


# -- restore ----------------------------------------------------------------------------------------

def _locals_to_fast(frame) -> None:
    if sys.version_info >= (3, 13):
        return  # f_locals is a write-through proxy
    try:
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
    except Exception as e:
        _warn.problem("restore_locals", f"could not write loop variables back into the frame: {e!r}")


def restore(carried: dict, scopes: dict[str, Any], registered: dict[str, Any]) -> list[str]:
    """Write captured state back into the frames ``scopes`` = {role: frame}. Returns names not restored."""
    torch = sys.modules.get("torch")
    live = _Live()
    for k, obj in registered.items():
        live.add(("reg", k), obj)
    missed: list[str] = []
    for role, entry in carried.items():
        frame = scopes.get(role)
        if frame is None:
            missed += list(entry.get("state_dicts", {})) + list(entry.get("arrays", {})) + \
                list(entry.get("pickled_names", []))
            continue
        module = _is_module_frame(frame)
        ns = frame.f_globals if module else frame.f_locals
        gns = frame.f_globals
        glob = set(entry.get("globals", []))
        inplace = set(entry.get("inplace", []))
        rebind: dict[str, Any] = {}
        grebind: dict[str, Any] = {}
        for name, sd in entry.get("state_dicts", {}).items():
            obj = ns.get(name)
            if obj is None or not callable(getattr(obj, "load_state_dict", None)):
                missed.append(name)
                continue
            try:
                obj.load_state_dict(sd)
                live.add(("var", role, name), obj)
            except Exception as e:
                _warn.problem("restore_failed", f"could not restore {name!r}: {e!r}")
                missed.append(name)
        for name, val in entry.get("arrays", {}).items():
            cur = (gns if name in glob else ns).get(name)
            target = grebind if name in glob else rebind
            if name in inplace and cur is not None:
                try:
                    if isinstance(val, np.ndarray) and isinstance(cur, np.ndarray) and cur.shape == val.shape:
                        cur[...] = val
                        continue
                    if torch is not None and isinstance(cur, torch.Tensor) and cur.shape == val.shape \
                            and cur.dtype == val.dtype:
                        with torch.no_grad():
                            cur.copy_(val)
                        continue
                except Exception:
                    pass
            target[name] = val.clone() if (torch is not None and isinstance(val, torch.Tensor)) else val.copy()
        data = entry.get("pickled")
        if data:
            try:
                vals = _loads(data, live)
            except Exception as e:
                _warn.problem("restore_failed", f"could not restore loop variables: {e!r}")
                missed += list(entry.get("pickled_names", []))
                vals = {}
            for name, val in vals.items():
                cur = (gns if name in glob else ns).get(name)
                target = grebind if name in glob else rebind
                if name in inplace and cur is not None:
                    if _restore_inplace(cur, val):
                        continue
                target[name] = val
        if grebind:
            gns.update(grebind)
        if rebind:
            if module:
                gns.update(rebind)
            else:
                loc = frame.f_locals
                loc.update(rebind)
                _locals_to_fast(frame)
    return missed


def _restore_inplace(cur: Any, val: Any) -> bool:
    try:
        if isinstance(cur, list) and isinstance(val, list):
            cur[:] = val
        elif isinstance(cur, dict) and isinstance(val, dict):
            cur.clear()
            cur.update(val)
        elif isinstance(cur, set) and isinstance(val, set):
            cur.clear()
            cur.update(val)
        elif isinstance(cur, bytearray) and isinstance(val, bytearray):
            cur[:] = val
        elif isinstance(cur, np.random.Generator) and isinstance(val, np.random.Generator):
            cur.bit_generator.state = val.bit_generator.state
        elif isinstance(cur, np.random.RandomState) and isinstance(val, np.random.RandomState):
            cur.set_state(val.get_state())
        elif hasattr(cur, "setstate") and type(cur) is type(val) and type(cur).__name__ == "Random":
            cur.setstate(val.getstate())
        elif hasattr(cur, "__dict__") and type(cur) is type(val) and not isinstance(cur, type):
            cur.__dict__.clear()
            cur.__dict__.update(copy.copy(val.__dict__))
        else:
            return False
        return True
    except Exception:
        return False
