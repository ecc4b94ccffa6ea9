"""@fl.step: spans, nesting, io rows, capture modes, faults, threads, async (remote mode: test_sink_seam.py)."""
from __future__ import annotations

import asyncio
import json
import threading
import warnings

import numpy as np
import pandas as pd
import pytest

import flightlog as fl
from flightlog import _run, _steps, _warn


def _read(sql, params=None):
    _steps.flush()
    return fl.query(sql, params).to_pylist()


def test_plain_call_records_span_and_io():
    """A decorated call returns the function's value and records one span plus input/output rows."""
    fl.init(project="t")

    @fl.step
    def add(a, b=2):
        return a + b

    assert add(1, b=5) == 6
    spans = _read("select * from spans")
    assert len(spans) == 1
    s = spans[0]
    assert s["name"].endswith("add") and s["status"] == "ok" and s["run_id"] == _run.ACTIVE.run_id
    attrs = json.loads(s["attributes"])
    assert attrs["code.function.name"].endswith("add") and attrs["code.namespace"] == __name__
    assert attrs["code.file.path"].endswith("test_steps.py") and attrs["code.line.number"] > 0
    io = {(r["direction"], r["arg"]): r for r in _read("select * from io")}
    assert set(io) == {("input", "a"), ("input", "b"), ("output", "return")}
    assert json.loads(io[("output", "return")]["summary"]) == {"kind": "scalar", "value": 6}
    assert all(r["span_id"] == s["span_id"] for r in io.values())


def test_nested_steps_and_loop_context():
    """Steps nest (parent span ids) and carry the fl.loop position they ran in."""
    fl.init(project="t")

    @fl.step(name="inner")
    def inner(x):
        return x * 2

    @fl.step(name="outer")
    def outer(xs):
        total = 0
        for epoch in fl.loop("epoch", range(2)):
            total += inner(epoch)
        return total

    assert outer([1, 2]) == 2
    rows = {(r["name"], r["epoch"]): r for r in _read("select * from spans")}
    o = rows[("outer", None)]
    for e in (0, 1):
        i = rows[("inner", e)]
        assert i["parent_span_id"] == o["span_id"] and i["trace_id"] == o["trace_id"]
        assert json.loads(i["ctx"]) == {"epoch": e}
        assert json.loads(i["attributes"])["flightlog.epoch"] == e


def test_exception_recorded_and_reraised_unchanged():
    """A raising step re-raises the same exception object, records error status and keeps its inputs."""
    fl.init(project="t")
    err = KeyError("missing")

    @fl.step
    def bad(df, k):
        raise err

    df = pd.DataFrame({"a": [1, 2]})
    with pytest.raises(KeyError) as info:
        bad(df, k="z")
    assert info.value is err
    s = _read("select * from spans")[0]
    assert s["status"] == "error" and s["error_type"] == "KeyError" and "missing" in s["error_message"]
    assert "Traceback" in json.loads(s["attributes"])["exception.stacktrace"]
    ins = _read("select arg, payload from io where direction = 'input' order by arg")
    assert [r["arg"] for r in ins] == ["df", "k"]
    assert all(r["payload"].startswith("cloudpickle:") for r in ins)


def test_capture_modes():
    """sample keeps rows in the summary, full keeps payload blobs, none records the span only."""
    fl.init(project="t")
    df = pd.DataFrame({"x": np.arange(50), "c": ["a", "b"] * 25})

    @fl.step(capture="sample")
    def s(d):
        return len(d)

    @fl.step(capture="full")
    def f(d):
        return d.head(3)

    @fl.step(capture="none")
    def n(d):
        return 1

    s(df), f(df), n(df)
    rows = _read("select step_name, direction, summary, payload from io")
    samp = [json.loads(r["summary"]) for r in rows if r["step_name"].endswith("s") and r["direction"] == "input"]
    assert len(samp[0]["sample"]) == 20 and samp[0]["sample"][0] == {"x": 0, "c": "a"}
    full = [r for r in rows if r["step_name"].endswith("f")]
    assert len(full) == 2 and all(r["payload"] for r in full)
    assert not [r for r in rows if r["step_name"].endswith(".n") or r["step_name"] == "n"]
    assert len(_read("select * from spans")) == 3
    with pytest.raises(ValueError):
        fl.step(capture="everything")
    with pytest.raises(ValueError):
        fl.step(name="")


class Evil:
    """Raises from __repr__, __hash__, __eq__ and pickling."""

    def __repr__(self):
        raise RuntimeError("no repr")

    def __hash__(self):
        raise RuntimeError("no hash")

    def __eq__(self, other):
        raise RuntimeError("no eq")

    def __reduce_ex__(self, protocol):
        raise RuntimeError("no pickle")


def test_hostile_arguments_never_raise():
    """Objects that raise on repr/hash/pickle, recursive lists, generators and huge lists are recorded as types."""
    fl.init(project="t")
    rec = []
    rec.append(rec)

    @fl.step(capture="sample")
    def take(*args, **kw):
        return Evil()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here should even warn
        out = take(Evil(), rec, (i for i in range(3)), list(range(100_000)), key=Evil())
    assert isinstance(out, Evil)
    rows = {r["arg"]: r for r in _read("select * from io")}
    assert rows["*args"]["fingerprint"] is None  # the tuple holds unfingerprintable items
    assert rows["*args[0]"]["type"].endswith("Evil") and rows["*args[0]"]["fingerprint"] is None
    assert "recursive" in json.loads(rows["*args[1]"]["summary"])["note"]
    assert rows["*args[2]"]["type"] == "generator"
    big = json.loads(rows["*args[3]"]["summary"])
    assert rows["*args[3]"]["fingerprint"] and big["hash"] == "sampled" and big["len"] == 100_000
    assert rows["key"]["fingerprint"] is None and rows["return"]["fingerprint"] is None


def test_failing_call_with_unpicklable_input_notes_why():
    """A failing call whose input cannot be pickled records a capture note instead of a payload."""
    fl.init(project="t")

    @fl.step
    def boom(x, y):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        boom(Evil(), 3)
    rows = {r["arg"]: r for r in _read("select * from io")}
    assert rows["x"]["payload"] is None
    assert "cannot pickle" in json.loads(rows["x"]["summary"])["capture_note"]
    assert rows["y"]["payload"]


def test_failure_capture_bound(monkeypatch):
    """Inputs over the failure-capture bound are not stored and the note says so."""
    monkeypatch.setattr(_steps, "FAILURE_CAPTURE_LIMIT", 10_000)
    fl.init(project="t")

    @fl.step
    def boom(a):
        raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        boom(np.zeros(100_000))
    r = _read("select payload, summary from io")[0]
    assert r["payload"] is None and "over the 10000 byte bound" in json.loads(r["summary"])["capture_note"]


def test_generators_methods_and_async():
    """Generator functions record the call, methods skip the receiver, async steps record awaited results."""
    fl.init(project="t")

    class Model:
        @fl.step
        def predict(self, x):
            return x + 1

    @fl.step
    def gen(n):
        yield from range(n)

    @fl.step
    async def fetch(x):
        await asyncio.sleep(0)
        return x * 3

    assert list(gen(3)) == [0, 1, 2]
    assert Model().predict(np.ones(3)).sum() == 6
    assert asyncio.run(fetch(2)) == 6
    rows = _read("select step_name, arg, type, fingerprint, summary from io")
    by = {(r["step_name"].split(".")[-1], r["arg"]): r for r in rows}
    assert by[("gen", "return")]["type"] == "generator"
    assert by[("predict", "self")]["fingerprint"] is None
    assert by[("predict", "x")]["fingerprint"]
    assert json.loads(by[("fetch", "return")]["summary"])["value"] == 6


def test_threads_nest_per_thread():
    """Steps called from several threads at once form one correctly nested tree per thread."""
    fl.init(project="t")

    @fl.step(name="leaf")
    def leaf(i):
        return np.full(10, i)

    @fl.step(name="root")
    def root(i):
        return sum(int(leaf(i).sum()) for _ in range(20))

    threads = [threading.Thread(target=root, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = _read("select * from spans")
    roots = {s["span_id"]: s for s in spans if s["name"] == "root"}
    leaves = [s for s in spans if s["name"] == "leaf"]
    assert len(roots) == 8 and len(leaves) == 160
    assert all(s["parent_span_id"] is None for s in roots.values())
    assert len({s["trace_id"] for s in roots.values()}) == 8
    for lf in leaves:
        assert lf["parent_span_id"] in roots and roots[lf["parent_span_id"]]["trace_id"] == lf["trace_id"]


def test_artifacts():
    """fl.artifact records files inside and outside steps; outputs are hashed when the step returns."""
    fl.init(project="t")
    import tempfile

    d = tempfile.mkdtemp()
    src = f"{d}/in.txt"
    with open(src, "w") as fh:
        fh.write("hello")

    @fl.step
    def copy(dst):
        fl.artifact(src, role="input")
        fl.artifact(dst, role="output")  # declared before the file exists
        with open(dst, "w") as fh:
            fh.write(open(src).read())
        return dst

    copy(f"{d}/out.txt")
    assert fl.artifact(src) == src  # outside a step
    with pytest.warns(_warn.FlightlogWarning, match="cannot be read"):
        fl.artifact(f"{d}/nope.txt")  # missing: a warning, a row without fingerprint
    with pytest.warns(_warn.FlightlogWarning, match="role"):
        fl.artifact(src, role="sideways")
    rows = _read("select * from io where arg = 'artifact' order by time")
    inside = [r for r in rows if r["span_id"]]
    fps = {r["direction"]: r["fingerprint"] for r in inside}
    assert fps["input"] == fps["output"]  # same content
    ret = _read("select fingerprint, path from io where arg = 'return'")[0]
    assert ret["fingerprint"] == fps["output"] and ret["path"].endswith("out.txt")
    missing = [r for r in rows if r["path"] and r["path"].endswith("nope.txt")]
    assert missing and missing[0]["fingerprint"] is None
    assert _warn.counters["artifact_missing"] == 1 and _warn.counters["bad_artifact"] == 1


def test_disabled_and_no_run(monkeypatch):
    """With FLIGHTLOG_DISABLED the decorated function just runs; nothing is recorded."""
    monkeypatch.setenv("FLIGHTLOG_DISABLED", "1")

    @fl.step
    def f(x):
        return x + 1

    assert f(1) == 2
    assert _run.ACTIVE is None


def test_user_tracer_provider_is_reused(monkeypatch):
    """When the app set a global SDK TracerProvider, step spans are made on it (its exporters see them) and nest under app spans."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    app = TracerProvider()
    mem = InMemorySpanExporter()
    app.add_span_processor(SimpleSpanProcessor(mem))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: app)
    for name in ("_provider", "_owns_provider"):  # restored after the test
        monkeypatch.setattr(_steps, name, getattr(_steps, name))
    monkeypatch.setattr(_steps, "_tracer", None)
    fl.init(project="t")

    @fl.step(name="s")
    def s():
        return 1

    with app.get_tracer("app").start_as_current_span("request") as parent:
        s()
    assert _steps.provider() is app
    names = sorted(sp.name for sp in mem.get_finished_spans())
    assert names == ["request", "s"]  # the app's exporter sees the step span too
    row = _read("select * from spans")
    assert len(row) == 1 and row[0]["parent_span_id"] == "%016x" % parent.get_span_context().span_id


def test_internal_failure_is_a_warning(monkeypatch):
    """A bug inside flightlog's recording becomes a counted warning; the user's function still runs."""
    fl.init(project="t")

    def broken(*a, **k):
        raise RuntimeError("internal")

    monkeypatch.setattr(_steps, "_describe_value", broken)

    @fl.step
    def f(x):
        return [x]

    with pytest.warns(_warn.FlightlogWarning):
        assert f([1]) == [[1]]
    assert _warn.counters["step_record_failed"] >= 1
