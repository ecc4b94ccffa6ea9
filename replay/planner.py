"""Code diff → replay plan.

The planner compares today's script with the run's code snapshot line by line
(blank and comment lines ignored). It accepts only *added* statements that
cannot change what the original run computed:

* ``fl.log(...)`` calls (any alias of flightlog, or ``log`` imported from it),
* assignments to names the old code never used (helpers feeding new logs),
* imports, and new function definitions,
* ``if``/``with`` blocks made only of the above.

Anything else (a changed, deleted or other added line) is a code change: the
replay is refused with the lines named, unless ``force``.

Each new log statement is placed by the ``fl.loop`` calls that lexically
enclose it in the script:

* depth 1 (in the outer loop body, outside inner loops) → ``epoch`` level:
  inner loops are skipped and state comes from end-of-epoch checkpoints;
* deeper, or not lexically inside the script's loops (e.g. in a function of a
  local module) → ``batch`` level: planned epochs re-execute fully from the
  checkpoint before them;
* depth 0 → ``run`` level: before or after the loops.
"""
from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass, field
from typing import Iterable

from flightlog._errors import ReplayError


@dataclass
class NewStatement:
    file: str
    line: int
    code: str
    names: list[str]  # metric names when literal
    level: str  # epoch | batch | run
    loops: list[str]  # enclosing fl.loop names, outermost first


@dataclass
class CodeDiff:
    statements: list[NewStatement] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # human-readable refused changes
    skip_loops: list[str] = field(default_factory=list)  # inner loops to skip at epoch level
    head_statements: bool = False  # epoch-level statements before the first inner loop
    outer_loop: str | None = None

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

    def fl_loops(self, ancestors: list) -> list[tuple[str, ast.For]]:
        return [(n, a) for a in ancestors if isinstance(a, ast.For)
                for n in [_loop_name(a, self.mods, self.loops)] if n]


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
    if isinstance(node, (ast.If, ast.With)):
        names, has_log = [], False
        for child in node.body + getattr(node, "orelse", []):
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
    if not inserted and not out.changes:
        return out
    # A blank or comment line inside an inserted statement counts as inserted too.
    all_lines = set(range(1, len(new.splitlines()) + 1))
    sig_lines = {l for l, _ in new_sig}
    inserted |= (all_lines - sig_lines)
    idx = _Index(new_tree)
    old_names = _old_names(old_tree)
    done: set[int] = set()
    outer_candidates = []
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
            continue
        loops = idx.fl_loops(anc)
        if not is_main or any(isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef)) for a in anc) and not loops:
            level = "batch"  # not lexically placed in the script's loops: re-execute to be safe
        elif len(loops) == 0:
            level = "run"
        elif len(loops) == 1:
            level = "epoch"
            outer_candidates.append((node, loops[0][1]))
        else:
            level = "batch"
        out.statements.append(NewStatement(filename, node.lineno, code, names, level, [n for n, _ in loops]))
    # Inner loops to skip at epoch level: the first fl.loop directly in the outer loop body.
    for node, outer in outer_candidates:
        out.outer_loop = _loop_name(outer, idx.mods, idx.loops)
        inner = [n for n in ast.walk(outer) if isinstance(n, ast.For) and n is not outer
                 and _loop_name(n, idx.mods, idx.loops)]
        if inner:
            first = min(inner, key=lambda n: n.lineno)
            name = _loop_name(first, idx.mods, idx.loops)
            if name not in out.skip_loops:
                out.skip_loops.append(name)
            if node.lineno < first.lineno:
                # before the first inner loop: needs the state at the epoch's start
                out.head_statements = True
                for st in out.statements:
                    if st.line == node.lineno and st.file == filename:
                        st.level = "batch"
    return out


def diff_code(snapshot: dict, current: dict[str, str], main: str) -> CodeDiff:
    """Diff every file of a snapshot (``{"files": {rel: text}}``) with today's texts."""
    total = CodeDiff()
    for rel, new in current.items():
        old = snapshot["files"].get(rel)
        if old is None:
            old = ""  # a new local module: only allowed additions
        d = diff_file(old, new, rel, rel == main)
        total.statements += d.statements
        total.changes += d.changes
        total.skip_loops += [s for s in d.skip_loops if s not in total.skip_loops]
        total.head_statements |= d.head_statements
        total.outer_loop = total.outer_loop or d.outer_loop
    return total


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
                    chosen |= set(range(lo, hi))
                elif part:
                    chosen.add(int(part))
        except ValueError:
            raise ReplayError(f"bad --epochs {spec!r}: use A:B, A:, N or a comma list") from None
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
