"""``flightlog replay-step SPAN [--pdb]``: re-run one recorded step call with its recorded inputs.

The function is re-imported by the module and qualified name recorded on the
span (``code.namespace``, ``code.function.name``); a function of a script run
as ``__main__`` is loaded from the recorded file (``code.file.path``) under
another module name, so the script's ``if __name__ == "__main__":`` block does
not run. Inputs come from the cloudpickle blobs referenced in ``io.payload``
(kept for every failing call, and for every call under ``capture="full"``).
Nothing is recorded while replaying (``FLIGHTLOG_DISABLED=1``).

Exit status: 0 when the call behaves as recorded (same exception type and
message, or, for a call that succeeded, the same output fingerprint); 1 when
it behaves differently (for example, it no longer fails); 2 on errors.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import json
import os
import sys
import traceback
from typing import Any

from flightlog._errors import ReplayError


def configure_replay_step(p: argparse.ArgumentParser) -> None:
    from flightlog._cli_core import add_store

    p.add_argument("span", help="span id (or unique prefix) of the step call")
    p.add_argument("--pdb", action="store_true", help="enter the debugger at the exception")
    add_store(p)


def load_call(con, span: str) -> dict:
    """The recorded call: span row, attributes, and input rows (in call order)."""
    from flightlog.query import db

    if not isinstance(span, str) or len(span.strip()) < 4:
        raise ReplayError("give a span id (at least 4 hex digits)")
    span = span.strip().lower()
    rows = db.sql_arrow(con, "SELECT * FROM spans WHERE span_id = ? OR starts_with(span_id, ?) LIMIT 5",
                        [span, span]).to_pylist()
    exact = [r for r in rows if r["span_id"] == span]
    rows = exact or rows
    if not rows:
        raise ReplayError(f"no step call with span id {span!r} in the store")
    if len(rows) > 1:
        raise ReplayError(f"span id {span!r} is ambiguous: {', '.join(r['span_id'] for r in rows)}")
    row = rows[0]
    attrs = _json_object(row["attributes"])
    inputs = db.sql_arrow(con, "SELECT arg, fingerprint, type, payload, summary FROM io WHERE span_id = ? "
                               "AND direction = 'input' AND arg <> 'artifact' AND NOT contains(arg, '[') "
                               "ORDER BY time", [row["span_id"]]).to_pylist()
    output = db.sql_arrow(con, "SELECT fingerprint FROM io WHERE span_id = ? AND direction = 'output' "
                               "AND arg = 'return'", [row["span_id"]]).to_pylist()
    script = db.sql_arrow(con, "SELECT script, cwd FROM runs WHERE run_id = ?", [row["run_id"]]).to_pylist()
    return {"span": row, "attrs": attrs, "inputs": inputs, "output_fp": output[0]["fingerprint"] if output else None,
            "script": script[0] if script else {}}


def _json_object(text: Any) -> dict:
    """A stored JSON object column; {} when it is empty, malformed or not an object (stored rows are untrusted)."""
    try:
        v = json.loads(text) if isinstance(text, str) and text else {}
    except (ValueError, RecursionError):
        return {}
    return v if isinstance(v, dict) else {}


def import_function(attrs: dict, run: dict) -> Any:
    """The recorded function, re-imported from today's code."""
    module = attrs.get("code.namespace")
    qual = attrs.get("code.function.name")
    path = attrs.get("code.file.path")
    if not module or not qual:
        raise ReplayError("the span has no code.namespace / code.function.name attributes (not a @fl.step call?)")
    if "<locals>" in qual or "<lambda>" in qual:
        raise ReplayError(f"{qual} is defined inside another function and cannot be re-imported")
    if module == "__main__":
        if not path or not os.path.isfile(path):
            raise ReplayError(f"the script {path!r} that defined {qual} no longer exists")
        sys.path.insert(0, os.path.dirname(path))
        spec = importlib.util.spec_from_file_location("__flightlog_replay__", path)
        if spec is None or spec.loader is None:
            raise ReplayError(f"cannot load {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["__flightlog_replay__"] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            raise ReplayError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        roots = []
        if path:  # the folder the module's package hangs off, e.g. /src for /src/pkg/mod.py and pkg.mod
            root = os.path.dirname(path)
            for _ in range(module.count(".")):
                root = os.path.dirname(root)
            roots.append(root)
        for d in (run.get("cwd"), os.path.dirname(run["script"]) if run.get("script") else None):
            if d:
                roots.append(d)
        for d in reversed(roots):
            if d not in sys.path:
                sys.path.insert(0, d)
        try:
            mod = importlib.import_module(module)
        except Exception as e:
            raise ReplayError(f"cannot import module {module!r}: {type(e).__name__}: {e}") from e
    obj: Any = mod
    for part in qual.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ReplayError(f"{module} has no {qual} any more") from None
    return inspect.unwrap(obj)


def load_inputs(store: str, inputs: list[dict]) -> list[tuple[str, Any]]:
    """``[(arg, value)]`` from the recorded payload blobs; ReplayError names any that was not kept."""
    import cloudpickle

    from flightlog.collector import blobs as _blobs

    out = []
    missing = []
    for r in inputs:
        ref = r["payload"]
        if not ref:
            note = _json_object(r["summary"]).get("capture_note")
            missing.append(f"{r['arg']} ({note or 'not captured'})")
            continue
        codec, _, digest = ref.partition(":")
        if codec != "cloudpickle" or not digest:
            raise ReplayError(f"input {r['arg']}: unknown payload reference {ref!r}")
        try:
            data = _blobs.read_blob(store, digest, what=f"input {r['arg']!r}: blob")
        except _blobs.BlobError as e:  # a reference outside the store, or tampered content: never unpickled
            raise ReplayError(str(e)) from None
        except OSError as e:
            raise ReplayError(f"input {r['arg']}: blob {digest} is missing from the store ({e})") from e
        try:
            out.append((r["arg"], cloudpickle.loads(data)))
        except Exception as e:
            raise ReplayError(f"input {r['arg']}: cannot unpickle ({type(e).__name__}: {e})") from e
    if missing:
        raise ReplayError("the call's inputs were not all kept: " + "; ".join(missing)
                          + " (successful calls keep inputs only under capture='full')")
    return out


def build_call(fn: Any, named: list[tuple[str, Any]]) -> tuple[list, dict]:
    """Positional and keyword arguments for ``fn`` from recorded (name, value) pairs."""
    values = dict(named)
    args: list = []
    kwargs: dict = {}
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    P = inspect.Parameter
    positional = True
    used = set()
    for p in params:
        if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            if p.name in values and positional:
                args.append(values[p.name])
                used.add(p.name)
            elif p.name in values:
                kwargs[p.name] = values[p.name]
                used.add(p.name)
            else:
                positional = False
        elif p.kind == P.VAR_POSITIONAL and "*args" in values:
            if positional:
                args.extend(values["*args"])
            used.add("*args")
    for k, v in values.items():
        if k not in used and k != "*args":
            kwargs[k] = v
    return args, kwargs


def run_replay_step(args) -> int:
    from flightlog import _config, _fingerprint
    from flightlog._cli_core import _con

    con = _con(args)
    try:
        rec = load_call(con, args.span)
    finally:
        con.close()
    span = rec["span"]
    store = _config.store_home(args.store)
    os.environ[_config.ENV_DISABLED] = "1"  # replaying records nothing
    inputs = load_inputs(store, rec["inputs"])
    fn = import_function(rec["attrs"], rec["script"])
    call_args, call_kwargs = build_call(fn, inputs)
    recorded = (f"{span['error_type']}: {span['error_message']}" if span["status"] == "error"
                else "returned normally")
    print(f"replaying {span['name']} (span {span['span_id']}, run {span['run_id']})")
    print(f"  recorded: {recorded}")
    try:
        out = fn(*call_args, **call_kwargs)
        if inspect.isawaitable(out):
            out = asyncio.run(out)
    except Exception as e:
        tp = type(e)
        name = tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"
        msg = str(e)
        print(f"  now:      {name}: {msg}")
        same = span["status"] == "error" and name == span["error_type"] and msg == (span["error_message"] or "")
        print("same failure" if same else "different behaviour")
        if args.pdb:
            traceback.print_exc()
            import pdb

            pdb.post_mortem(e.__traceback__)
        return 0 if same else 1
    if span["status"] == "error":
        print("  now:      returned normally")
        print("different behaviour: the call no longer fails")
        return 1
    fp = _fingerprint.describe(out, summary=False).fingerprint
    same = fp is not None and fp == rec["output_fp"]
    print(f"  now:      returned normally ({'same output fingerprint' if same else 'different output'})")
    print("same result" if same else "different behaviour")
    return 0 if same else 1
