"""Code diff → replay plan.

The planner compares today's script with the run's code snapshot line by line
(blank and comment lines ignored). It accepts only *added* statements that
cannot change what the original run computed:

* ``fl.log(...)`` calls (any alias of flightlog, or ``log`` imported from it),
* assignments to names the old code never used (helpers feeding new logs),
* imports, and new function definitions,
* ``if``/``with``/``try`` blocks, and ``for`` loops over ``range(…)`` or a
  side-effect-free view (``net.parameters()``, ``d.items()``, …), made only of
  the above: they decide whether and how often a new statement runs, nothing
  else (iterating a data loader would draw random numbers: refused).

Anything else (a changed, deleted or other added line) is a code change: the
replay is refused with the lines named, unless ``force``.

Each new log statement gets a **level from the loops that execute it at run
time**: the ``fl.loop`` statements lexically around it in its function, plus,
through the call graph of the script and its local modules, the loops around
every call of that function (``def train(): for … in fl.loop("batch", …)``
called from the epoch loop is inside ``epoch > batch``):

* inside the outer loop only, after its first inner loop → ``epoch`` level: the
  inner loop is skipped and its end state comes from the ``inner_exit``
  checkpoint (registered objects and the loop variables captured with it);
* inside two or more loops, before the first inner loop, or in a function the
  planner cannot see being called → ``batch`` level: planned epochs re-execute
  fully from the checkpoint before them;
* outside every loop → ``run`` level.

It then follows the **data flow** of each epoch-level statement: the names it
reads (directly or through new assignments) that the skipped loop sets are
either served from the state captured at the end of that loop or, when the
run's checkpoints did not capture them, the statement is replayed at batch level
(:func:`resolve_levels`). Names no checkpoint could capture make the plan fall
back to exact re-execution from the start.
"""
from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass, field
from typing import Iterable

from flightlog._carried import _PURE  # the same notion of "a call that changes its object" as capture
from flightlog._errors import ReplayError


@dataclass
class NewStatement:
    file: str
    line: int
    code: str
    names: list[str]  # metric names when literal
    level: str  # epoch | batch | run
    loops: list[str]  # fl.loop names that run it, outermost first (through calls too)
    reads: list[str] = field(default_factory=list)  # names it reads, directly or through new assignments
    why: str = ""  # why this level, in words
    skipped_reads: list[str] = field(default_factory=list)  # reads set inside the skipped loop
    served: list[str] = field(default_factory=list)  # of those, served from captured loop state


@dataclass
class CodeDiff:
    statements: list[NewStatement] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # human-readable refused changes
    skip_loops: list[str] = field(default_factory=list)  # inner loops to skip at epoch level
    head_statements: bool = False  # epoch-level statements before the first inner loop
    outer_loop: str | None = None
    top_loops: list[str] = field(default_factory=list)  # fl.loop names run outside any other loop
    skipped_sets: dict = field(default_factory=dict)  # skipped loop name -> names it assigns/mutates
    registered: list[str] = field(default_factory=list)  # names passed to fl.checkpointing(...)
    from_start: str | None = None  # why the plan re-executes everything from the start, if it must
    _nodes: list = field(default_factory=list, repr=False)  # AST nodes of statements (one file)
    _assigns: dict = field(default_factory=dict, repr=False)  # new helper name -> names its value reads
    _tree: object = field(default=None, repr=False)  # today's parsed file (one file)
    _new_lines: dict = field(default_factory=dict, repr=False)  # file -> significant inserted lines
    _texts: dict = field(default_factory=dict, repr=False)  # file -> today's text
    _trees: dict = field(default_factory=dict, repr=False)  # file -> today's parsed file
    _outer: tuple | None = field(default=None, repr=False)  # (file, outer For, first inner anchor statement)
    _anchors: list = field(default_factory=list, repr=False)  # outer-body statements new statements run through
    slice: object = None  # slicing.TailSlice of an epoch-level plan, if the tail can be sliced
    slice_why: str = ""  # why the tail is not sliced, in words

    @property
    def level(self) -> str:
        levels = {s.level for s in self.statements}
        if "batch" in levels:
            return "batch"
        if "epoch" in levels:
            return "epoch"
        return "run" if levels else "none"


def _aliases(tree: ast.AST) -> tuple[set[str], set[str], set[str]]:
    """(module aliases of flightlog, names bound to flightlog.log, names bound to flightlog.loop)."""
    mods, logs, loops = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "flightlog":
                    mods.add(a.asname or "flightlog")
        elif isinstance(node, ast.ImportFrom) and node.module == "flightlog":
            for a in node.names:
                if a.name == "log":
                    logs.add(a.asname or "log")
                elif a.name == "loop":
                    loops.add(a.asname or "loop")
    return mods, logs, loops


def _is_call_to(node: ast.AST, mods: set[str], names: set[str], attr: str) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr == attr and isinstance(f.value, ast.Name) and f.value.id in mods:
        return True
    return isinstance(f, ast.Name) and f.id in names


def _log_names(call: ast.Call) -> list[str]:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return [call.args[0].value]
    for kw in call.keywords:
        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
            return [str(kw.value.value)]
    return []


def _loop_name(node: ast.For, mods, loops) -> str | None:
    it = node.iter
    # allow enumerate(fl.loop(...)) and zip-free simple wrappers
    if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "enumerate" and it.args:
        it = it.args[0]
    if _is_call_to(it, mods, loops, "loop"):
        a = it.args[0] if it.args else None
        if isinstance(a, ast.Constant) and isinstance(a.value, str):
            return a.value
        return "?"
    return None


def _norm(line: str) -> str:
    return line.strip()


def _significant(lines: list[str]) -> list[tuple[int, str]]:
    out = []
    for i, line in enumerate(lines, start=1):
        s = _norm(line)
        if s and not s.startswith("#"):
            out.append((i, s))
    return out


class _Index:
    """Statement and loop lookup by line for one parsed file."""

    def __init__(self, tree: ast.AST) -> None:
        self.mods, self.logs, self.loops = _aliases(tree)
        self.stmts: list[tuple[int, int, ast.stmt, list]] = []  # (start, end, node, ancestors)
        self._walk(tree, [])

    def _walk(self, node, ancestors):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                self.stmts.append((child.lineno, child.end_lineno or child.lineno, child, list(ancestors)))
                self._walk(child, ancestors + [child])
            else:
                self._walk(child, ancestors)

    def outermost_inserted(self, line: int, inserted: set[int]) -> tuple[ast.stmt, list] | None:
        """The outermost statement containing ``line`` whose lines are all inserted."""
        best = None
        for start, end, node, anc in self.stmts:
            if start <= line <= end and all(l in inserted for l in _stmt_lines(node)):
                if best is None or (start <= best[0].lineno and end >= (best[0].end_lineno or 0)):
                    best = (node, anc)
        return best



def _stmt_lines(node: ast.stmt) -> set[int]:
    """Significant source lines of a statement (body included)."""
    return set(range(node.lineno, (node.end_lineno or node.lineno) + 1))


def _old_names(tree: ast.AST) -> set[str]:
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
    return names


_PURE_ITER = {"parameters", "named_parameters", "buffers", "named_buffers", "children", "named_children",
              "modules", "named_modules", "items", "keys", "values", "state_dict"}


def _allowed(node: ast.stmt, idx: _Index, old_names: set[str]) -> tuple[bool, list[str], bool]:
    """(allowed?, metric names, contains a log call)."""
    if isinstance(node, ast.Expr) and _is_call_to(node.value, idx.mods, idx.logs, "log"):
        return True, _log_names(node.value), True
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.Pass)):
        return True, [], False
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name not in old_names, [], False
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        tnames = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        simple = all(isinstance(t, (ast.Name, ast.Tuple)) for t in targets)
        return simple and bool(tnames) and not (set(tnames) & old_names), [], False
    if isinstance(node, ast.For) and not _loop_name(node, idx.mods, idx.loops):
        # a new loop over an existing collection (parameters, a dict): only decides how often
        # the new statements in it run; its target must be a new name
        tnames = {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
        it = node.iter
        while isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("enumerate", "zip",
                                                                                            "sorted", "list"):
            it = it.args[0] if it.args else None
        simple = (
            isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr in _PURE_ITER
            and not it.args) or (isinstance(it, ast.Call) and isinstance(it.func, ast.Name)
                                 and it.func.id == "range")
        if not simple or not tnames or tnames & old_names:
            return False, [], False
    if isinstance(node, (ast.If, ast.With, ast.For, ast.Try)):
        names, has_log = [], False
        extra = list(getattr(node, "finalbody", []))
        for h in getattr(node, "handlers", []):
            extra += h.body
        for child in node.body + getattr(node, "orelse", []) + extra:
            ok, n, hl = _allowed(child, idx, old_names)
            if not ok:
                return False, [], False
            names += n
            has_log = has_log or hl
        return True, names, has_log
    return False, [], False


def diff_file(old: str, new: str, filename: str, is_main: bool) -> CodeDiff:
    """Compare one file's snapshot with its current text."""
    out = CodeDiff()
    try:
        new_tree = ast.parse(new)
    except SyntaxError as e:
        raise ReplayError(f"{filename}: cannot parse ({e.msg} at line {e.lineno})") from None
    try:
        old_tree = ast.parse(old)
    except SyntaxError:
        old_tree = ast.parse("")
    old_sig = _significant(old.splitlines())
    new_sig = _significant(new.splitlines())
    sm = difflib.SequenceMatcher(a=[s for _, s in old_sig], b=[s for _, s in new_sig], autojunk=False)
    inserted: set[int] = set()
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        if tag in ("replace", "delete"):
            for k in range(i1, i2):
                out.changes.append(f"{filename}:{old_sig[k][0]} (snapshot) - {old_sig[k][1]}")
            for k in range(j1, j2):
                out.changes.append(f"{filename}:{new_sig[k][0]} + {new_sig[k][1]}")
            continue
        inserted.update(new_sig[k][0] for k in range(j1, j2))
    out._tree = new_tree
    out._new_lines[filename] = set(inserted)
    out._texts[filename] = new
    if not inserted and not out.changes:
        return out
    # A blank or comment line inside an inserted statement counts as inserted too.
    all_lines = set(range(1, len(new.splitlines()) + 1))
    sig_lines = {l for l, _ in new_sig}
    inserted |= (all_lines - sig_lines)
    idx = _Index(new_tree)
    old_names = _old_names(old_tree)
    done: set[int] = set()
    for line in sorted(l for l in inserted if l in sig_lines):
        if line in done:
            continue
        hit = idx.outermost_inserted(line, inserted)
        if hit is None:
            out.changes.append(f"{filename}:{line} + {new.splitlines()[line - 1].strip()}")
            continue
        node, anc = hit
        done |= _stmt_lines(node)
        ok, names, has_log = _allowed(node, idx, old_names)
        code = ast.get_source_segment(new, node) or new.splitlines()[node.lineno - 1].strip()
        if not ok:
            out.changes.append(f"{filename}:{node.lineno} + {code.splitlines()[0].strip()}")
            continue
        if not has_log:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            out._assigns.setdefault(n.id, set()).update(_reads(node.value) if node.value else ())
            continue
        out.statements.append(NewStatement(filename, node.lineno, code, names, "?", []))
        out._nodes.append(node)
    return out


def diff_code(snapshot: dict, current: dict[str, str], main: str) -> CodeDiff:
    """Diff every file of a snapshot (``{"files": {rel: text}}``) with today's texts, then plan levels."""
    total = CodeDiff()
    stmts: list[tuple[NewStatement, ast.stmt]] = []
    trees: dict[str, ast.AST] = {}
    for rel, new in current.items():
        old = snapshot["files"].get(rel)
        if old is None:
            old = ""  # a new local module: only allowed additions
        d = diff_file(old, new, rel, rel == main)
        total.changes += d.changes
        stmts += list(zip(d.statements, d._nodes))
        if d._tree is not None:
            trees[rel] = d._tree
        for k, v in d._assigns.items():
            total._assigns.setdefault(k, set()).update(v)
        total._new_lines.update(d._new_lines)
        total._texts.update(d._texts)
    total._trees = trees
    prog = Program(trees, main)
    prog.assign(total, stmts)
    return total


# -- the program: loops at run time, through calls ---------------------------------------------

class Program:
    """Today's script and its local modules: functions, fl.loop statements, call sites.

    ``stacks(file, node)`` gives the fl.loop stacks (outermost first) that may be
    active when ``node`` runs: its lexical loops in its function, prefixed by the
    stacks of every call site of that function. None: a function nobody in these
    files calls (a callback): unknown.
    """

    def __init__(self, trees: dict[str, ast.AST], main: str) -> None:
        self.trees = trees
        self.main = main
        self.idx = {f: _Index(t) for f, t in trees.items()}
        self.parent: dict[tuple[str, int], ast.AST] = {}
        self.fns: dict[str, list[tuple[str, ast.AST]]] = {}
        for f, t in trees.items():
            for node in ast.walk(t):
                for ch in ast.iter_child_nodes(node):
                    self.parent[(f, id(ch))] = node
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.fns.setdefault(node.name, []).append((f, node))
        self.calls: dict[str, list[tuple[str, ast.AST]]] = {}
        self.stored: set[str] = set()  # functions passed by keyword: called later, from wherever the callee runs
        for f, t in trees.items():
            for node in ast.walk(t):
                if isinstance(node, ast.Call):
                    fn = node.func
                    name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                    if name in self.fns:
                        self.calls.setdefault(name, []).append((f, node))
                # a function passed by name (map(fn, …), callbacks) is called from where it is passed
                if isinstance(node, ast.Call):
                    for a in list(node.args) + [k.value for k in node.keywords]:
                        if isinstance(a, ast.Name) and a.id in self.fns:
                            self.calls.setdefault(a.id, []).append((f, node))
                    # ... unless passed by keyword: the callee keeps it and calls it later, from its own loops
                    # (Trainer(compute_metrics=fn), DataLoader(collate_fn=fn)): where it runs is unknown
                    for k in node.keywords:
                        if isinstance(k.value, ast.Name) and k.value.id in self.fns:
                            self.stored.add(k.value.id)
        self._memo: dict = {}
        self.static: set[str] = set()  # imports, functions, classes: not state a loop carries
        self.registered: set[str] = set()
        for f, t in trees.items():
            idx = self.idx[f]
            for node in ast.walk(t):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    self.static.update((a.asname or a.name).split(".")[0] for a in node.names)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    self.static.add(node.name)
                elif _is_call_to(node, idx.mods, set(), "checkpointing"):
                    for k in node.keywords:
                        if k.arg not in ("every", "overhead"):
                            self.registered.update(n.id for n in ast.walk(k.value) if isinstance(n, ast.Name))

    def ancestors(self, file: str, node: ast.AST) -> list[ast.AST]:
        out = []
        p = self.parent.get((file, id(node)))
        while p is not None:
            out.append(p)
            p = self.parent.get((file, id(p)))
        return list(reversed(out))  # outermost first

    def _framework_hook(self, file: str, node: ast.AST):
        """The level a framework integration gives a statement in a hook method the script never calls
        (``flightlog.integrations._common.hook_level``), or None."""
        from flightlog.integrations._common import hook_level

        anc = self.ancestors(file, node)
        fn = self._fn_of(anc)
        if fn is None or isinstance(fn, ast.Lambda) or anc.index(fn) == 0 or \
                not isinstance(anc[anc.index(fn) - 1], ast.ClassDef):
            return None
        bases, todo, seen = [], [anc[anc.index(fn) - 1]], set()
        while todo and len(seen) < 20:  # base classes, through classes of the script and its local modules
            cls = todo.pop()
            seen.add(id(cls))
            for b in cls.bases:
                name = ast.unparse(b)
                bases.append(name)
                todo += [n for t in self.trees.values() for n in ast.walk(t)
                         if isinstance(n, ast.ClassDef) and n.name == name and id(n) not in seen]
        imports = {(a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0]
                   for n in ast.walk(self.trees[file]) if isinstance(n, (ast.Import, ast.ImportFrom))
                   for a in n.names}
        return hook_level(fn.name, bases, imports)

    def _fn_of(self, anc: list) -> ast.AST | None:
        for a in reversed(anc):
            if isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return a
        return None

    def _lexical(self, file: str, anc: list) -> list[tuple[str, ast.For]]:
        """fl.loops around a node inside its own function (outermost first)."""
        fn = self._fn_of(anc)
        inner = anc[anc.index(fn) + 1:] if fn is not None else anc
        idx = self.idx[file]
        return [(n, a) for a in inner if isinstance(a, (ast.For, ast.AsyncFor))
                for n in [_loop_name(a, idx.mods, idx.loops)] if n]

    def stacks(self, file: str, node: ast.AST, _depth: int = 0):
        """[(stack of (loop name, file, For node), call chain)] or None when unknown."""
        anc = self.ancestors(file, node)
        lex = [(n, file, a) for n, a in self._lexical(file, anc)]
        fn = self._fn_of(anc)
        if fn is None:
            return [(lex, [])]  # module level: runs when the module runs (the main script, or import)
        if isinstance(fn, ast.Lambda) or _depth > 12:
            return None
        key = (file, id(fn))
        if key in self._memo:
            got = self._memo[key]
            return None if got == "busy" else [(list(s) + lex, list(c)) for s, c in got]
        self._memo[key] = "busy"
        sites = self.calls.get(fn.name, [])
        if not sites or fn.name in self.stored:
            self._memo[key] = None
            return None
        out = []
        for cf, call in sites:
            sub = self.stacks(cf, call, _depth + 1)
            if sub is None:
                self._memo[key] = None
                return None
            for st, chain in sub:
                out.append((st, chain + [(cf, call, fn.name)]))
        self._memo[key] = out
        return [(list(s) + lex, list(c)) for s, c in out]

    def loop_statements(self) -> list[tuple[str, str, ast.For]]:
        out = []
        for f, t in self.trees.items():
            idx = self.idx[f]
            for n in ast.walk(t):
                if isinstance(n, (ast.For, ast.AsyncFor)):
                    name = _loop_name(n, idx.mods, idx.loops)
                    if name:
                        out.append((name, f, n))
        return out

    def anchor(self, file: str, node: ast.AST, chain: list, outer_for: ast.For, outer_file: str) -> ast.stmt | None:
        """The statement of the outer loop's body through which ``node`` runs."""
        hops = [(file, node)] + [(cf, call) for cf, call, _ in reversed(chain)]
        for f, n in hops:
            if f != outer_file:
                continue
            for a in self.ancestors(f, n) + [n]:
                if a in outer_for.body:
                    return a
        return None

    def assign(self, diff: CodeDiff, stmts: list[tuple[NewStatement, ast.stmt]]) -> None:
        loops = self.loop_statements()
        info = {}
        for name, f, node in loops:
            info[(f, id(node))] = (name, f, node, self.stacks(f, node))
        diff.top_loops = sorted({name for name, f, node, st in info.values()
                                 if st is not None and any(len(s) == 0 for s, _ in st) and f == self.main})
        # depth-1 loops (directly inside an outer loop at run time), in order of the outer body
        inner_by_outer: dict[int, list] = {}
        for name, f, node, st in info.values():
            for s, chain in st or []:
                if len(s) == 1:
                    oname, of, ofor = s[0]
                    a = self.anchor(f, node, chain, ofor, of)
                    if a is not None:
                        inner_by_outer.setdefault(id(ofor), []).append(
                            (a.lineno, f != of, node.lineno, name, f, node, a))
        for st_obj, node in stmts:
            st = self.stacks(st_obj.file, node)
            st_obj.reads = sorted(_reads(node))
            if st is None:
                hook = self._framework_hook(st_obj.file, node)
                if hook is not None:  # a framework hook the integrations know (flightlog.integrations)
                    st_obj.level, st_obj.loops, st_obj.why, skip = hook
                    diff.skip_loops += [s for s in skip if s not in diff.skip_loops]
                    continue
                st_obj.level, st_obj.loops = "batch", []
                st_obj.why = ("in a function that the script's own code does not visibly call: "
                              "re-executed in full")
                continue
            deepest = max(st, key=lambda x: len(x[0]))
            st_obj.loops = [n for n, _f, _a in deepest[0]]
            depth = len(deepest[0])
            via = [c for c in deepest[1]]
            via_txt = (" (through " + " → ".join(f"{n}() at {cf}:{call.lineno}" for cf, call, n in via) + ")"
                       if via else "")
            if depth == 0:
                if any(len(s) for s, _ in st):
                    st_obj.level = "batch"
                    st_obj.why = "runs both inside and outside loops" + via_txt
                else:
                    st_obj.level = "run"
                    st_obj.why = "outside every fl.loop" + via_txt
                continue
            if depth >= 2 or len({tuple(x[0] for x in s) for s, _ in st}) > 1:
                st_obj.level = "batch"
                st_obj.why = f"runs inside {' > '.join(st_obj.loops)}{via_txt}"
                continue
            # epoch level candidate: inside the outer loop only; where relative to its first inner loop?
            oname, of, ofor = deepest[0][0]
            diff.outer_loop = diff.outer_loop or oname
            inners = sorted(inner_by_outer.get(id(ofor), []), key=lambda x: (x[0], x[1], x[2]))
            if not inners:
                st_obj.level = "epoch"
                st_obj.why = f"in the body of `{oname}`, which has no inner loop"
                continue
            first = inners[0]
            _al, _fn, _ln, iname, ifile, ifor, ianchor = first
            mine = self.anchor(st_obj.file, node, deepest[1], ofor, of)
            if mine is None:
                st_obj.level, st_obj.why = "batch", "its place in the epoch body is unclear"
                continue
            after = None
            if mine is ianchor:
                # same statement of the epoch body: after the inner loop in the same function?
                if ifile == st_obj.file and node.lineno > (ifor.end_lineno or ifor.lineno) and \
                        self._fn_of(self.ancestors(ifile, ifor)) is self._fn_of(self.ancestors(st_obj.file, node)):
                    after = True
                else:
                    after = False
            else:
                after = mine.lineno > ianchor.lineno
            if not after:
                st_obj.level = "batch"
                st_obj.why = (f"runs in `{oname}` before its first inner loop `{iname}` ends, so it needs the "
                              "state at the start of the epoch")
                diff.head_statements = True
                continue
            st_obj.level = "epoch"
            st_obj.why = f"in the body of `{oname}`, after its inner loop `{iname}`{via_txt}"
            if diff._outer is None:
                diff._outer = (of, ofor, ianchor)
            elif diff._outer[1] is not ofor:
                diff._outer = (of, None, None)  # statements under different outer loops: no slicing
            diff._anchors.append(mine)
            if iname not in diff.skip_loops:
                diff.skip_loops.append(iname)
            diff.skipped_sets[iname] = sorted(_sets(ifor) - self.static)
        # names read through new assignments (helpers feeding the logs)
        for st_obj, node in stmts:
            reads, todo = set(st_obj.reads), list(st_obj.reads)
            while todo:
                n = todo.pop()
                for m in diff._assigns.get(n, ()):
                    if m not in reads:
                        reads.add(m)
                        todo.append(m)
            st_obj.reads = sorted(reads)
        for st_obj, node in stmts:
            st_obj.skipped_reads = sorted({n for loop in diff.skip_loops for n in diff.skipped_sets.get(loop, [])}
                                          & set(st_obj.reads)) if st_obj.level == "epoch" else []
        diff.statements += [s for s, _ in stmts]
        diff.registered = sorted(self.registered)


def _reads(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _sets(node: ast.AST) -> set[str]:
    """Names a loop statement assigns or mutates (its target, body)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        elif isinstance(n, (ast.Attribute, ast.Subscript)) and isinstance(n.ctx, (ast.Store, ast.Del)):
            b = n.value
            while isinstance(b, (ast.Attribute, ast.Subscript)):
                b = b.value
            if isinstance(b, ast.Name):
                out.add(b.id)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and \
                not (n.func.attr in _PURE and not n.func.attr.endswith("_")):
            b = n.func.value
            while isinstance(b, (ast.Attribute, ast.Subscript)):
                b = b.value
            if isinstance(b, ast.Name):
                out.add(b.id)
    return out


def resolve_levels(diff: CodeDiff, captured: list[dict | None], top_loops_recorded: list[str]) -> None:
    """Decide, with what the run's checkpoints captured, how each statement's reads are served.

    ``captured``: the ``captured`` summaries of the checkpoints the plan may use
    (None for a checkpoint written before loop variables were captured).
    Sets ``from_start`` when the plan must re-execute everything from the start.
    """
    known = all(c is not None for c in captured) and bool(captured)
    got = set()
    unc: dict[str, str] = {}
    for c in captured:
        if c:
            got |= set(c.get("vars", []))
            unc.update(c.get("uncaptured", {}))
    tops = set(top_loops_recorded) | set(diff.top_loops)
    if len(tops) > 1:
        diff.from_start = (f"the script has {len(tops)} top-level loops ({', '.join(sorted(tops))}); "
                           "epochs and checkpoints are indexed by one")
        return
    unknown_frames = [k for k in unc if k.endswith(":*")]
    if unknown_frames:
        diff.from_start = f"loop state of {', '.join(unknown_frames)} could not be analysed: {unc[unknown_frames[0]]}"
        return
    for st in diff.statements:
        bad = sorted(set(st.reads) & set(unc))
        if bad:
            diff.from_start = (f"`{st.code.splitlines()[0].strip()}` reads `{bad[0]}`, which the checkpoints "
                               f"could not capture ({unc[bad[0]]})")
            return
        if st.level != "epoch" or not st.skipped_reads:
            continue
        served = [n for n in st.skipped_reads if (known and n in got) or n in diff.registered]
        missing = [n for n in st.skipped_reads if n not in served]
        st.served = served
        if missing:
            loop = next(l for l in diff.skip_loops if missing[0] in diff.skipped_sets.get(l, []))
            st.level = "batch"
            st.why = (f"reads `{missing[0]}`, set in the skipped loop `{loop}`, which the run's checkpoints "
                      "did not capture: the loop is re-executed")
        else:
            st.why += ("; reads " + ", ".join(f"`{n}`" for n in served)
                       + " set in the skipped loop: served from the state captured when it ended")


def parse_epochs(spec: str | Iterable[int] | None, available: list[int]) -> list[int]:
    """``A:B`` (B exclusive, Python-style), ``A:``, ``7``, ``1,3,5`` → sorted epochs within ``available``."""
    if spec is None:
        return sorted(available)
    if not isinstance(spec, str):
        chosen = {int(x) for x in spec}
    else:
        s = spec.strip()
        chosen = set()
        try:
            for part in s.split(","):
                part = part.strip()
                if ":" in part:
                    a, b = part.split(":", 1)
                    lo = int(a) if a.strip() else min(available, default=0)
                    hi = int(b) if b.strip() else max(available, default=-1) + 1
                    if b.strip() and a.strip() and hi <= lo:
                        raise ReplayError(f"--epochs {part!r} is empty: A:B means epochs A up to B-1 "
                                          f"(e.g. {lo}:{lo + 1} replays epoch {lo})")
                    chosen |= set(range(lo, hi))
                elif part:
                    chosen.add(int(part))
        except ValueError:
            raise ReplayError(f"bad --epochs {spec!r}: use A:B, A:, N or a comma list") from None
        if not chosen:
            raise ReplayError(f"--epochs {spec!r} selects no epoch: use A:B, A:, N or a comma list")
    missing = sorted(chosen - set(available))
    if missing and len(missing) == len(chosen):
        raise ReplayError(f"--epochs {spec!r} selects no recorded epoch (recorded: "
                          f"{min(available, default='-')}..{max(available, default='-')})")
    return sorted(chosen & set(available))


def split_segments(epochs: list[int], workers: int) -> list[list[int]]:
    """Contiguous, balanced segments of the planned epochs, one per worker at most."""
    if not epochs:
        return []
    workers = max(1, min(workers, len(epochs)))
    n = len(epochs)
    out, start = [], 0
    for k in range(workers):
        size = n // workers + (1 if k < n % workers else 0)
        out.append(epochs[start:start + size])
        start += size
    return [s for s in out if s]


def segment_actions(seg: list[int], level: str, ckpts: dict[int, str]) -> tuple[dict[int, str], list[int]]:
    """Per outer index: 'full' or 'tail'; plus the epochs whose new values are stored.

    ``ckpts`` maps iterations to checkpoint positions. An ``inner_exit``
    checkpoint of epoch e gives a ``tail`` of e (its first inner loop skipped),
    which also ends in the exact end-of-epoch state, so it can lead into
    ``full`` epochs; ``iteration_end``/``loop_start`` checkpoints lead in directly.
    """
    actions: dict[int, str] = {}

    def run_from(a: int, b: int) -> None:
        c = max((k for k in ckpts if k < a), default=None)
        if c is None:
            start = 0
        elif ckpts[c] == "inner_exit":
            actions.setdefault(c, "tail")
            start = c + 1
        else:
            start = c + 1
        for k in range(start, b + 1):
            if k < a and actions.get(k) == "tail":
                continue
            actions[k] = "full" if k >= a or actions.get(k) != "tail" else actions[k]

    if level == "epoch":
        for e in seg:
            if ckpts.get(e) == "inner_exit":
                if actions.get(e) != "full":
                    actions[e] = "tail"
            else:
                run_from(e, e)
        return dict(sorted(actions.items())), list(seg)
    runs, cur = [], [seg[0]]
    for e in seg[1:]:
        if e == cur[-1] + 1:
            cur.append(e)
        else:
            runs.append(cur)
            cur = [e]
    runs.append(cur)
    for r in runs:
        run_from(r[0], r[-1])
    return dict(sorted(actions.items())), list(seg)


def plan_tail_slice(diff: CodeDiff, main: str) -> None:
    """Decide the statements of the epoch tail an epoch-level plan skips (``replay/slicing.py``).

    Call after :func:`resolve_levels`; sets ``diff.slice`` or says in ``diff.slice_why`` why not.
    """
    from flightlog.replay import slicing

    diff.slice = None
    if diff.from_start or diff.level != "epoch":
        diff.slice_why = "" if diff.from_start else f"{diff.level}-level plan: every epoch runs in full"
        return
    if any(s.level == "run" for s in diff.statements):
        diff.slice_why = "a new statement runs after the loop, on the state the last epoch leaves"
        return
    if diff._outer is None or diff._outer[1] is None:
        diff.slice_why = "the new statements are not all in one epoch loop's body"
        return
    of, ofor, first = diff._outer
    if of != main:
        diff.slice_why = f"the epoch loop is in {of}, not in the script (only the script's own loop is sliced)"
        return
    idx = _Index(diff._trees[of])
    sl = slicing.plan(diff._trees[of], of, ofor, first, diff._new_lines.get(of, set()), diff._anchors,
                      idx.mods, idx.logs, diff._texts.get(of, ""))
    if sl.lines:
        diff.slice = sl
    else:
        diff.slice_why = sl.why_none
