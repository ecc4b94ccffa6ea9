"""Put today's new log statements into an older version of the script.

For each new statement, its *anchor* is the nearest preceding line of today's
script that is not itself new. The statement goes after the line with the same
text in the old script (after the whole statement that line starts, or as the
first line of its block when the new statement is indented deeper), re-indented
to match. No match, or several, refuses that run: guessing would log values at
the wrong place.
"""
from __future__ import annotations

import ast

from flightlog._errors import ReplayError
from flightlog.replay.planner import CodeDiff


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _stmt_end(tree: ast.AST, line: int) -> int:
    end = line
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and node.lineno == line:
            end = max(end, node.end_lineno or line)
    return end


def insert_statements(today: str, diff: CodeDiff, old: str) -> str:
    """``old`` with the statements of ``diff`` (found in ``today``) inserted at matching places."""
    cur = today.splitlines()
    lines = old.splitlines()
    new_lines: set[int] = set()
    for s in diff.statements:
        n = len(s.code.splitlines())
        new_lines.update(range(s.line, s.line + n))
    inserts: list[tuple[int, list[str]]] = []
    try:
        old_tree = ast.parse(old)
    except SyntaxError as e:
        raise ReplayError(f"the run's script does not parse: {e}") from None
    for s in diff.statements:
        n = len(s.code.splitlines())
        block = cur[s.line - 1:s.line - 1 + n]
        k = s.line - 1
        while k >= 1 and (k in new_lines or not cur[k - 1].strip() or cur[k - 1].strip().startswith("#")):
            k -= 1
        if k < 1:
            raise ReplayError(f"no anchor line before new statement at line {s.line}")
        anchor = cur[k - 1]
        matches = [i for i, line in enumerate(lines, start=1) if line.strip() == anchor.strip()]
        if len(matches) != 1:
            raise ReplayError(f"no unique place for `{s.code.splitlines()[0].strip()}` in this run's code "
                              f"(anchor `{anchor.strip()}` found {len(matches)} times)")
        at = matches[0]
        deeper = _indent(block[0]) > _indent(anchor)
        delta = _indent(lines[at - 1]) - _indent(anchor)
        after = at if deeper else _stmt_end(old_tree, at)
        shifted = [(" " * (_indent(b) + delta)) + b.lstrip() if b.strip() else b for b in block]
        inserts.append((after, shifted))
    for after, block in sorted(inserts, key=lambda x: -x[0]):
        lines[after:after] = block
    text = "\n".join(lines) + "\n"
    try:
        ast.parse(text)
    except SyntaxError as e:
        raise ReplayError(f"inserting the new statements breaks this run's code ({e.msg})") from None
    return text
