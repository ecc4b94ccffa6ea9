"""Tail slicing: which statements of an epoch's tail an epoch-level replay may skip.

At epoch level a replay skips the epoch's first inner loop (it restores the checkpoint
taken when that loop ended) and runs the rest of the epoch body, the *tail*: typically a
validation pass whose only use is a recorded ``fl.log``, then the new statements. Most of
the tail is then work whose result nobody reads: its values are already in the record.
This module computes, from today's script, the tail statements the new statements do not
need (a backward slice over names), so the worker can skip them.

Rules (conservative where the analysis is blind, optimistic where verification sees):

* a tail statement is kept when it holds a new statement, changes control flow
  (``break``, ``continue``, ``return``, ``raise``, ``yield``, ``global``), or is a bare
  call that is not a logging call (``scheduler.step()``, ``torch.save(...)``,
  ``evaluate()``): such calls are made for their effects, which names cannot follow;
* the others — logging calls (``fl.log``, ``print``, a logger, a TensorBoard writer),
  assignments, in-place container updates (``history.append(acc)``), and ``if``/``for``/
  ``with``/``try`` blocks made only of these — are skipped unless a kept statement after
  them, the head of the next epoch (the statements before the inner loop), or a function
  either calls reads a name they assign or mutate.

What the names cannot see — a method with hidden effects inside a skipped log argument
(``accuracy()`` leaving the model in eval mode), RNG draws — is what the replay's
verification catches: one planned epoch is re-executed in full and its new values must
equal the sliced fast path's; when they differ the runner re-runs the segments with the
whole tail (``runner._unslice``). The state carried to the next epoch needs no analysis:
a sliced epoch is always followed by a checkpoint restore (``sliceable_epochs``).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

# Methods that change only their own object (containers, in-place tensor ops end with "_").
_MUTATORS = frozenset("""append extend insert update add setdefault pop popitem remove discard clear appendleft
extendleft sort reverse put""".split())
# Attribute calls that only report (logging libraries, TensorBoard/W&B/MLflow writers, progress bars).
_REPORTING = frozenset("""info debug warning warn error exception critical log write writelines set_postfix
set_postfix_str set_description set_description_str add_scalar add_scalars add_histogram add_image add_images
add_text add_figure add_pr_curve add_hparams log_metric log_metrics log_param log_params log_dict log_text
flush""".split())
_REPORTING_FUNCS = frozenset({"print", "pprint"})


@dataclass
class TailSlice:
    """Skipped statements of the outer loop's tail, by first line, in one file (the main script)."""

    file: str
    lines: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # first source line of each skipped statement
    kept: int = 0  # old tail statements kept
    why_none: str = ""  # when nothing is skipped: why


def _base(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _scoped(node: ast.AST):
    """Nodes of ``node`` without entering nested functions, lambdas or classes."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        for ch in ast.iter_child_nodes(n):
            if not isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                todo.append(ch)


def _defs(node: ast.AST) -> set[str]:
    """Names a statement binds or changes in place (its own code only)."""
    out: set[str] = set()
    for n in _scoped(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        elif isinstance(n, (ast.Attribute, ast.Subscript)) and isinstance(n.ctx, (ast.Store, ast.Del)):
            b = _base(n.value)
            if b:
                out.add(b)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            a = n.func.attr
            if a in _MUTATORS or (a.endswith("_") and not a.startswith("_")):
                b = _base(n.func.value)
                if b:
                    out.add(b)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in n.names)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        out.add(node.name)
    return out


def _uses(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _called(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Name):
                out.add(f.id)
            elif isinstance(f, ast.Attribute):
                out.add(f.attr)
        # a function passed by name is called by its receiver
        if isinstance(n, ast.Call):
            out.update(a.id for a in list(n.args) + [k.value for k in n.keywords] if isinstance(a, ast.Name))
    return out


class _Functions:
    """Functions of the file by name: the globals each reads and changes, through its callees."""

    def __init__(self, tree: ast.AST) -> None:
        self.fns: dict[str, list[ast.AST]] = {}
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.fns.setdefault(n.name, []).append(n)
        self._memo: dict[str, tuple[set[str], set[str]]] = {}

    def effects(self, name: str, _stack: tuple = ()) -> tuple[set[str], set[str]]:
        """(names read, names changed) by calling ``name`` — free names only, callees included."""
        if name in self._memo:
            return self._memo[name]
        if name in _stack or name not in self.fns:
            return set(), set()
        reads, changes = set(), set()
        for fn in self.fns[name]:
            local = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
            declared = {g for n in ast.walk(fn) if isinstance(n, (ast.Global, ast.Nonlocal)) for g in n.names}
            body = ast.Module(body=fn.body, type_ignores=[])
            assigned = {n.id for n in _scoped(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            local |= assigned - declared
            reads |= _uses(body) - local
            changes |= (_defs(body) - local) | (declared & assigned)
            for callee in _called(body):
                r, c = self.effects(callee, _stack + (name,))
                reads |= r
                changes |= c
        self._memo[name] = (reads, changes)
        return reads, changes

    def reads(self, node: ast.AST) -> set[str]:
        out = _uses(node)
        for c in _called(node):
            out |= self.effects(c)[0]
        return out

    def changes(self, node: ast.AST) -> set[str]:
        out = _defs(node)
        for c in _called(node):
            out |= self.effects(c)[1]
        return out


def _controls(node: ast.AST) -> bool:
    """Does ``node`` leave or steer the enclosing loop or function?"""
    def walk(n, in_loop: bool) -> bool:
        for ch in ast.iter_child_nodes(n):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if isinstance(ch, (ast.Return, ast.Raise, ast.Yield, ast.YieldFrom, ast.Await, ast.Global,
                               ast.Nonlocal)):
                return True
            if isinstance(ch, (ast.Break, ast.Continue)) and not in_loop:
                return True
            if walk(ch, in_loop or isinstance(ch, (ast.For, ast.AsyncFor, ast.While))):
                return True
        return False

    if isinstance(node, (ast.Return, ast.Raise, ast.Global, ast.Nonlocal, ast.Break, ast.Continue)):
        return True
    return walk(node, isinstance(node, (ast.For, ast.AsyncFor, ast.While)))


def _reporting_call(call: ast.AST, fl_mods: set[str], fl_logs: set[str]) -> bool:
    if not isinstance(call, ast.Call):
        return False
    f = call.func
    if isinstance(f, ast.Name):
        return f.id in _REPORTING_FUNCS or f.id in fl_logs
    if isinstance(f, ast.Attribute):
        if isinstance(f.value, ast.Name) and f.value.id in fl_mods:
            return f.attr == "log"  # fl.log only: other flightlog calls have effects of their own
        return f.attr in _REPORTING
    return False


def _skippable_kind(node: ast.stmt, fl_mods: set[str], fl_logs: set[str]) -> bool:
    """Reporting, assignments, in-place container updates, and blocks made only of these."""
    if isinstance(node, ast.Expr):
        v = node.value
        if isinstance(v, ast.Constant):
            return True
        if _reporting_call(v, fl_mods, fl_logs):
            return True
        return (isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.func.attr in _MUTATORS
                and _base(v.func.value) is not None)
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Pass, ast.Delete)):
        return True
    if isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
        kids = list(node.body) + list(getattr(node, "orelse", [])) + list(getattr(node, "finalbody", []))
        for h in getattr(node, "handlers", []):
            kids += h.body
        return all(_skippable_kind(k, fl_mods, fl_logs) for k in kids)
    return False


def plan(tree: ast.AST, file: str, outer: ast.AST, first_inner: ast.stmt, new_lines: set[int],
         needed_anchors: list[ast.stmt], fl_mods: set[str], fl_logs: set[str], source: str = "") -> TailSlice:
    """The statements of ``outer``'s body after ``first_inner`` that an epoch-level replay may skip.

    ``new_lines``: lines of ``file`` that are new today; ``needed_anchors``: outer-body statements
    through which a new statement runs (a call into a function holding it).
    """
    out = TailSlice(file)
    body = list(outer.body)
    if first_inner not in body:
        out.why_none = "the inner loop's place in the epoch body is unclear"
        return out
    k = body.index(first_inner)
    head, tail = body[:k + 1], body[k + 1:]
    fns = _Functions(tree)
    live: set[str] = set()
    for st in head:  # the next epoch's head runs on what this epoch's tail leaves behind
        live |= fns.reads(st)
    if isinstance(outer, (ast.For, ast.AsyncFor)):
        live |= _uses(outer.iter)
    keep: dict[int, bool] = {}
    for st in reversed(tail):
        lines = set(range(st.lineno, (st.end_lineno or st.lineno) + 1))
        new = bool(lines & new_lines) or any(st is a for a in needed_anchors)
        needed = (new or _controls(st) or not _skippable_kind(st, fl_mods, fl_logs)
                  or bool(fns.changes(st) & live))
        keep[id(st)] = needed
        if needed:
            live |= fns.reads(st)
    src = source.splitlines()
    for st in tail:
        lines = set(range(st.lineno, (st.end_lineno or st.lineno) + 1))
        if lines & new_lines:
            continue
        if keep[id(st)]:
            out.kept += 1
            continue
        out.lines.append(st.lineno)
        out.text.append(src[st.lineno - 1].strip() if 0 < st.lineno <= len(src) else f"line {st.lineno}")
    if not out.lines:
        out.why_none = "every statement of the epoch's tail is needed by the new statements"
    return out


def sliceable_epochs(actions: dict[int, str], run_after_loop: bool) -> list[int]:
    """Tail epochs whose end state nothing reads: the next planned epoch restores a checkpoint.

    A ``tail`` epoch followed by a ``full`` one leads into it with its exact end-of-epoch
    state, and the last epoch of a segment leads into the script's code after the loop
    when a run-level statement lives there: those run their whole tail.
    """
    out = []
    last = max(actions) if actions else None
    for e, a in sorted(actions.items()):
        if a != "tail":
            continue
        if actions.get(e + 1) == "full":
            continue
        if e == last and run_after_loop:
            continue
        out.append(e)
    return out
