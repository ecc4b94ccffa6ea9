"""The package graph: every module in one component, components in layers, imports only downwards.

Read from the source with ``ast`` (sdk/, collector/, query/, replay/, ui/): every ``import`` and
``from … import`` of a flightlog module is an edge, at module level or inside a function (lazy
imports count). The components and what each may import are listed below and drawn in
docs/architecture.md ("Layers"). A lower layer that has to call up does it lazily and is named in
CALLS_UP with its reason; nothing else may point upwards.

The package facades (``flightlog``, ``flightlog.collector``, ``flightlog.query``) resolve their
public names on first attribute access (module ``__getattr__`` over a ``_LAZY`` table), not by
importing them: that is what lets ``import flightlog.collector.schema`` load no runtime even
though ``flightlog`` is its parent package. The subprocess tests at the end check it.
"""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = {"sdk": "flightlog", "collector": "flightlog.collector", "query": "flightlog.query",
           "replay": "flightlog.replay", "ui": "flightlog.ui"}

# -- the components, lowest first -----------------------------------------------------------------

BASE = {  # leaves: import no other component
    "flightlog",  # the root's eager part is the error classes; the rest of its names are the lazy facade
    "flightlog._errors", "flightlog._warn", "flightlog._config", "flightlog._format", "flightlog._fingerprint",
    "flightlog.collector.schema",
}
STORE = {"flightlog.collector", "flightlog.collector.fs", "flightlog.collector.store", "flightlog.collector.blobs",
         "flightlog.collector.otlp", "flightlog.collector.client"}
READING = {"flightlog._read",  # fl.query / fl.dataframe: reading, from the SDK's namespace
           "flightlog.collector.gc"}  # removal reads which runs are live and which blobs are referenced
RECORDING = {
    "flightlog._run", "flightlog._record", "flightlog._loops", "flightlog._checkpoint", "flightlog._carried",
    "flightlog._steps", "flightlog._snapshot", "flightlog._assertions", "flightlog._watch", "flightlog._predictions",
    "flightlog._logmore", "flightlog._inspect", "flightlog._ddp", "flightlog._modes", "flightlog._resume",
    "flightlog._summary", "flightlog._sysmetrics", "flightlog._feasibility",
}
REPLAY = {"flightlog._replay", "flightlog._scratch"}  # replay mode inside a worker, and its file redirection
SERVER = {"flightlog.collector.server"}
CLI = {"flightlog.cli", "flightlog._cli_core",
       # replay/cli.py is the CLI of `flightlog replay`; it stays next to the replay package it drives
       "flightlog.replay.cli"}

LAYERS = ["base", "store", "reading", "recording", "integrations", "replay", "ui", "server", "cli"]

# What each component may import (besides itself).
ALLOWED = {
    "base": set(),
    "store": {"base"},
    "reading": {"base", "store"},
    "recording": {"base", "store", "reading"},  # resume reads the previous run; fl.health, fl.feasibility
    "integrations": {"base", "store", "reading", "recording"},
    "replay": {"base", "store", "reading", "recording", "integrations"},  # the planner asks which hooks they own
    "ui": {"base", "store", "reading"},
    "server": {"base", "store", "reading", "ui"},  # `flightlog serve` mounts the UI under /ui
    "cli": {"base", "store", "reading", "recording", "integrations", "replay", "ui", "server"},
}

# Lazy calls against the layering, each with its reason. Only function-level imports may be here.
CALLS_UP = {
    ("flightlog._run", "flightlog._replay"):
        "fl.init is the one entry a replayed script calls: started by a replay worker (FLIGHTLOG_REPLAY set), "
        "the run takes the replay mode, which the recording layer can only look up when the run starts",
}


def component(mod: str) -> str | None:
    """The component of a flightlog module; None for a module no list or folder rule places."""
    for name, members in (("base", BASE), ("store", STORE), ("reading", READING), ("recording", RECORDING),
                          ("replay", REPLAY), ("server", SERVER), ("cli", CLI)):
        if mod in members:
            return name
    if mod.startswith("flightlog._") and mod.endswith("_cli"):
        return "cli"
    for prefix, name in (("flightlog.query", "reading"), ("flightlog.replay", "replay"), ("flightlog.ui", "ui"),
                         ("flightlog.integrations", "integrations")):
        if mod == prefix or mod.startswith(prefix + "."):
            return name
    return None


# -- reading the graph ---------------------------------------------------------------------------------


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, lazy, line) for every import of a flightlog module."""
    edges = []
    for mod, path in MODULES.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

        def visit(node, lazy):
            for ch in ast.iter_child_nodes(node):
                inner = lazy or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets = []
                if isinstance(ch, ast.Import):
                    targets = [a.name for a in ch.names]
                elif isinstance(ch, ast.ImportFrom):
                    base = ch.module or ""
                    if ch.level:
                        up = pkg.split(".")[:len(pkg.split(".")) - ch.level + 1]
                        base = ".".join(up + ([ch.module] if ch.module else []))
                    # `from pkg import sub` names the submodule when there is one
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in ch.names]
                for t in targets:
                    if t == "flightlog" or t.startswith("flightlog."):
                        r = _resolve(t)
                        if r is not None and r != mod:
                            edges.append((mod, r, inner, ch.lineno))
                visit(ch, inner)

        visit(ast.parse(path.read_text(), str(path)), False)
    return edges


EDGES = _edges()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


# -- the tests ----------------------------------------------------------------------------------------


def test_every_module_has_a_component():
    """Each module of the five folders is placed in exactly one component (a new sdk module must be placed here)."""
    assert len(MODULES) > 60  # the walk found the source
    unplaced = sorted(m for m in MODULES if component(m) is None)
    assert not unplaced, f"place these modules in a component of tests/test_import_graph.py: {unplaced}"
    assert set(ALLOWED) == set(LAYERS)
    for name, allowed in ALLOWED.items():  # the allowed set only points downwards
        assert all(LAYERS.index(a) < LAYERS.index(name) for a in allowed), name


def test_no_import_against_the_layering():
    """Every import, lazy ones included, goes to an allowed component; the exceptions are lazy, named and still needed."""
    bad, seen = [], set()
    for a, b, lazy, line in sorted(set(EDGES)):
        ca, cb = component(a), component(b)
        if ca == cb or cb in ALLOWED[ca]:
            continue
        if (a, b) in CALLS_UP:
            seen.add((a, b))
            if not lazy:
                bad.append(f"{a}:{line} imports {b} at module level; a call up must be lazy ({ca} -> {cb})")
            continue
        bad.append(f"{a}:{line} -> {b}  ({ca} -> {cb}{', lazy' if lazy else ''})")
    bad = list(dict.fromkeys(bad))  # one line per import statement
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
    assert seen == set(CALLS_UP), f"exceptions no longer needed (remove them): {sorted(set(CALLS_UP) - seen)}"


def test_component_graph_is_acyclic():
    """Without the named calls up, the component graph has no cycle (so the layers have one direction)."""
    graph: dict[str, set[str]] = {}
    for a, b, _lazy, _line in EDGES:
        if (a, b) not in CALLS_UP and component(a) != component(b):
            graph.setdefault(component(a), set()).add(component(b))
    assert not _cycles(graph), _cycles(graph)


def test_no_import_time_cycle_between_modules():
    """Module-level imports form no cycle: no module ever sees another half-initialised at import."""
    graph: dict[str, set[str]] = {}
    for a, b, lazy, _line in EDGES:
        if not lazy:
            graph.setdefault(a, set()).add(b)
    assert not _cycles(graph), _cycles(graph)


def test_modules_take_only_the_roots_eager_names():
    """``from flightlog import X`` inside the package takes only what the root defines at import (errors,
    version): a lazy facade name there would load a higher layer without an import edge to see."""
    tree = ast.parse((ROOT / "sdk" / "__init__.py").read_text())
    eager = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    eager |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert "FlightlogError" in eager and "__version__" in eager and "log" not in eager
    bad = []
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "flightlog" and not node.level:
                for a in node.names:
                    if f"flightlog.{a.name}" not in MODULES and a.name not in eager:
                        bad.append(f"{mod}:{node.lineno} from flightlog import {a.name}")
    assert not bad, bad


def test_one_cli_layer_owns_every_command():
    """Every command's module is in the CLI component, and no other module defines a configure_*/run_* pair."""
    from flightlog.cli import COMMANDS

    assert {component(mod) for mod, _help in COMMANDS.values()} == {"cli"}
    outside = []
    for mod, path in MODULES.items():
        if component(mod) != "cli":
            names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
            outside += [f"{mod}.{n}" for n in sorted(names) if n.startswith("configure_")
                        and "run_" + n[len("configure_"):] in names]
    assert not outside, f"argument parsing outside the CLI layer: {outside}"


_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m == "flightlog" or m.startswith("flightlog."))))
"""


@pytest.mark.parametrize("name", ["flightlog", "flightlog.collector", "flightlog.collector.schema",
                                  "flightlog.collector.store", "flightlog.query", "flightlog.query.db"])
def test_importing_a_lower_package_loads_no_runtime(name):
    """A fresh interpreter importing the store or reading side (or the root) loads no recording, replay or CLI module."""
    out = subprocess.run([sys.executable, "-c", _PROBE, name], capture_output=True, text=True, timeout=60,
                         cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert name in loaded and "flightlog._run" not in loaded and "flightlog._record" not in loaded
    above = [m for m in loaded if component(m) in ("recording", "integrations", "replay", "ui", "server", "cli")]
    assert not above, f"import {name} loaded {above}"
    if name == "flightlog.collector.schema":
        assert set(loaded) == {"flightlog", "flightlog._errors", "flightlog.collector", name}
