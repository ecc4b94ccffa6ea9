"""``@fl.step`` and ``fl.artifact``: pipeline steps as OpenTelemetry spans with input/output fingerprints.

Each call of a decorated function is one span of the OpenTelemetry SDK.
Tracer provider: if the application already set a global SDK
``TracerProvider``, flightlog adds its span processor to it (so step spans
also reach the application's exporters and nest under its spans); otherwise
flightlog uses a private ``TracerProvider`` that it never installs globally.

Each finished call becomes a row of the ``spans`` table and its ``io`` rows
(``run.rec.emit``: Arrow, no protobuf), written by the run's sink like every
other row: a local store, or in remote mode the collector client, which sends
them with the run's token and spools them while the collector is unreachable
or refuses them (counted as problems, never silently lost).

Recording never raises into the user's code: every internal failure becomes
``_warn.problem`` and the user's function runs (and raises) exactly as it
would undecorated.
"""
from __future__ import annotations

import collections
import contextvars
import functools
import inspect
import json
import os
import sys
import threading
import time
from typing import Any, Callable, TypeVar, overload

from flightlog import _fingerprint as _fpm, _run, _warn

F = TypeVar("F", bound=Callable[..., Any])

CAPTURE_MODES = ("fingerprint", "sample", "full", "none")
FAILURE_CAPTURE_LIMIT = 64 << 20  # bytes of cloudpickle kept per input of a failing call
FULL_CAPTURE_LIMIT = 64 << 20  # bytes of cloudpickle kept per value under capture="full"
SCOPE = "flightlog"

_lock = threading.Lock()
_tracer = None
_provider = None
_owns_provider = False
_current: contextvars.ContextVar["_Call | None"] = contextvars.ContextVar("flightlog_step", default=None)
_time_ns = time.time_ns
_getsizeof = sys.getsizeof
_hexd = _fpm.xxhash.xxh3_128_hexdigest
_attach = _set_in_ctx = _detach_ctx = None  # opentelemetry functions, bound on first use
_SCALAR_TYPES = (int, float, bool, type(None))


# -- tracer set-up ------------------------------------------------------------------------

def _get_tracer():
    """The tracer step spans come from (created on the first step call)."""
    global _tracer, _provider, _owns_provider
    with _lock:
        if _tracer is not None:
            return _tracer
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        from flightlog import __version__

        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            _provider, _owns_provider = current, False
        else:
            _provider, _owns_provider = TracerProvider(resource=Resource.create({})), True
        global _attach, _set_in_ctx, _detach_ctx
        from opentelemetry import context as otel_context
        from opentelemetry.trace import set_span_in_context

        _attach, _set_in_ctx, _detach_ctx = otel_context.attach, set_span_in_context, otel_context.detach
        _tracer = _provider.get_tracer(SCOPE, __version__)
        return _tracer


def provider():
    """The ``TracerProvider`` step spans use (the application's global SDK one, or flightlog's own)."""
    _get_tracer()
    return _provider


_KINDS: dict = {}
_SERVICE: dict = {}

_ctx_json_cache: list = [None, None]


def attrs_json_open(attrs: dict) -> str:
    """The JSON of a span's static attributes, left open at the end: :func:`attributes_json` closes it."""
    return json.dumps(attrs, separators=(",", ":"), default=str)[:-1]


def attributes_json(static_open: str, epoch: int | None, batch: int | None, ctx_json: str | None) -> str:
    """A ``spans`` row's ``attributes``: the static attributes plus the call's loop position (``ctx_json``:
    the JSON string of its ``fl.loop`` context, or None outside any loop). Kept as string work: it runs
    once per step call."""
    if ctx_json is None:
        return static_open + "}"
    out = static_open + (',"flightlog.ctx":' if len(static_open) > 1 else '"flightlog.ctx":') + ctx_json
    if epoch is not None:
        out += ',"flightlog.epoch":%d' % epoch
    if batch is not None:
        out += ',"flightlog.batch":%d' % batch
    return out + "}"


def span_row(span, writer: str | None, call: "_Call | None" = None) -> dict:
    """One ``spans`` row from a finished SDK span.

    With the ``call`` that made the span, the run id, loop context and the
    function's precomputed attribute JSON come from it, which keeps mapping
    look-ups and JSON encoding of whole dicts off the hot path.
    """
    ctx = span.context
    parent = span.parent
    code = span.status.status_code.name
    start, end = span.start_time, span.end_time
    err_type = err_msg = None
    if code == "ERROR" or call is None:
        a = dict(span.attributes)
        run_id = a.pop("flightlog.run_id", None)
        epoch, batch, lctx = a.get("flightlog.epoch"), a.get("flightlog.batch"), a.get("flightlog.ctx")
        err_type = a.get("error.type")
        for ev in span.events:
            if ev.name == "exception":
                ea = ev.attributes
                err_type = err_type or ea.get("exception.type")
                err_msg = ea.get("exception.message")
                a["exception.stacktrace"] = ea.get("exception.stacktrace")
                break
        attributes = json.dumps(a, separators=(",", ":"), default=str)
    else:
        run_id = call.run.run_id
        epoch, batch, lctx = call.ctx
        ctx_json = None
        if lctx is not None:
            cache = _ctx_json_cache  # successive calls in one loop iteration share the context
            if cache[0] is not lctx:
                cache[0], cache[1] = lctx, json.dumps(lctx)
            ctx_json = cache[1]
        attributes = attributes_json(call.meta.attrs_json, epoch, batch, ctx_json)
    kind = _KINDS.get(span.kind)
    if kind is None:
        kind = _KINDS[span.kind] = span.kind.name.lower()
    svc = _SERVICE.get(id(span.resource))
    if svc is None:
        res = span.resource
        svc = _SERVICE[id(res)] = (res.attributes.get("service.name") if res is not None else None) or ""
    return {
        "run_id": run_id,
        "trace_id": "%032x" % ctx.trace_id,
        "span_id": "%016x" % ctx.span_id,
        "parent_span_id": ("%016x" % parent.span_id) if parent is not None else None,
        "name": span.name,
        "kind": kind,
        "start_time": start // 1000,
        "end_time": end // 1000 if end else None,
        "duration_ms": (end - start) / 1e6 if end else None,
        "status": "error" if code == "ERROR" else "ok",
        "error_type": err_type,
        "error_message": err_msg,
        "epoch": epoch,
        "batch": batch,
        "ctx": lctx,
        "attributes": attributes,
        "service_name": svc or None,
        "writer": writer,
    }


# -- per-function metadata ------------------------------------------------------------------

class _Meta:
    """What a decorated function's calls share: computed once at decoration."""

    __slots__ = ("name", "capture", "attrs", "attrs_json", "pos", "skip_first", "varpos", "sig_ok")

    def __init__(self, fn: Callable, name: str | None, capture: str) -> None:
        code = getattr(fn, "__code__", None)
        qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        module = getattr(fn, "__module__", None) or "__main__"
        self.name = name or qual
        self.capture = capture
        self.attrs: dict[str, Any] = {"code.function.name": qual, "code.namespace": module}
        if code is not None:
            self.attrs["code.file.path"] = os.path.abspath(code.co_filename)
            self.attrs["code.line.number"] = code.co_firstlineno
        if capture != "fingerprint":
            self.attrs["flightlog.capture"] = capture
        self.attrs_json = attrs_json_open(self.attrs)  # span rows append the per-call attributes
        self.pos: tuple = ()
        self.varpos = False
        self.skip_first = False
        self.sig_ok = False
        try:
            params = list(inspect.signature(fn).parameters.values())
            P = inspect.Parameter
            self.pos = tuple(p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD))
            self.varpos = any(p.kind == P.VAR_POSITIONAL for p in params)
            self.skip_first = bool(self.pos) and self.pos[0] in ("self", "cls") and "." in qual
            self.sig_ok = True
        except (TypeError, ValueError):
            pass

    def bind(self, args: tuple, kwargs: dict) -> list:
        """``[(name, value), ...]`` of a call: positional names, ``*args`` as one value, keywords."""
        pos = self.pos
        n = len(pos)
        if len(args) <= n:
            out = list(zip(pos, args))
        else:
            out = list(zip(pos, args[:n]))
            out.append(("*args", tuple(args[n:])))
        if kwargs:
            out.extend(kwargs.items())
        return out


# -- one call -----------------------------------------------------------------------------

def _scalar_row(v) -> tuple:
    """(fingerprint, type, bytes, summary) of int/float/bool/None; same fingerprint as ``describe``."""
    t = type(v)
    tname = t.__name__
    fp = _hexd(("%s|%r" % (tname, v)).encode())
    if t is int:
        summary = '{"kind":"scalar","value":%d}' % v
    elif t is float:
        summary = ('{"kind":"scalar","value":%r}' % v) if v - v == 0 else '{"kind":"scalar","value":"%r"}' % v
    elif t is bool:
        summary = '{"kind":"scalar","value":true}' if v else '{"kind":"scalar","value":false}'
    else:
        summary = '{"kind":"scalar"}'
    return fp, tname, _getsizeof(v), summary


class _Call:
    """State of one step call between its start and its end."""

    __slots__ = ("meta", "run", "span", "token", "ctoken", "inputs", "t0", "artifacts", "span_id", "ctx",
                 "out", "payloads", "parts")

    def __init__(self, meta: _Meta, r, args: tuple, kwargs: dict) -> None:
        self.meta = meta
        self.run = r
        self.artifacts: list = []
        self.inputs: list = []
        self.out = None
        self.parts: list = []
        self.payloads: list | None = None
        self.t0 = _time_ns() // 1000
        if meta.capture != "none":
            skip = meta.skip_first
            inputs = self.inputs
            for k, v in (meta.bind(args, kwargs) if kwargs or len(args) > len(meta.pos) else zip(meta.pos, args)):
                if type(v) in _SCALAR_TYPES and not skip:
                    inputs.append((k, v, _scalar_row(v)))
                else:
                    inputs.append((k, v, _describe_value(v, meta.capture, skip)))
                    if type(v) in _EXPAND_TYPES:
                        self.parts.extend(_parts("input", k, v, meta.capture, self.t0))
                skip = False
        attrs = meta.attrs.copy()
        attrs["flightlog.run_id"] = r.run_id
        epoch, batch, ctx = self.ctx = r.ctx
        if ctx is not None:
            attrs["flightlog.ctx"] = ctx
            if epoch is not None:
                attrs["flightlog.epoch"] = epoch
            if batch is not None:
                attrs["flightlog.batch"] = batch
        tracer = _tracer or _get_tracer()
        span = self.span = tracer.start_span(meta.name, attributes=attrs)
        sid = span.get_span_context().span_id
        self.span_id = "%016x" % sid
        self.token = _attach(_set_in_ctx(span))  # type: ignore[misc]
        self.ctoken = _current.set(self)

    def _detach(self) -> None:
        try:
            _current.reset(self.ctoken)
        except ValueError:  # reset from another context (generator finalised elsewhere)
            _current.set(None)
        _detach_ctx(self.token)  # type: ignore[misc]

    def done(self, out: Any) -> None:
        try:
            self.span.end()
            self._detach()
            meta = self.meta
            if meta.capture != "none":
                t_end = _time_ns() // 1000
                self.out = (_describe_value(out, meta.capture), t_end,
                            _payload(self.run, out, FULL_CAPTURE_LIMIT) if meta.capture == "full" else None)
                if type(out) in _EXPAND_TYPES:
                    self.parts.extend(_parts("output", "return", out, meta.capture, t_end))
                if meta.capture == "full":
                    self.payloads = [_payload(self.run, v, FULL_CAPTURE_LIMIT) for _, v, _ in self.inputs]
            self._resolve_artifacts()
            _enqueue(self.run, self.pack())
        except Exception as e:
            _warn.problem("step_record_failed", f"could not record step {self.meta.name!r}: {e!r}")

    def fail(self, exc: BaseException) -> None:
        try:
            from opentelemetry.trace import Status, StatusCode

            tp = type(exc)
            self.span.set_attribute("error.type", f"{tp.__module__}.{tp.__qualname__}"
                                    if tp.__module__ != "builtins" else tp.__qualname__)
            self.span.record_exception(exc, escaped=True)
            try:
                msg = str(exc)
            except Exception:
                msg = f"<{tp.__name__} with unprintable message>"
            self.span.set_status(Status(StatusCode.ERROR, f"{tp.__name__}: {msg}"[:4000]))
            self.span.end()
            self._detach()
            if self.meta.capture != "none" and isinstance(exc, Exception):
                limit = FULL_CAPTURE_LIMIT if self.meta.capture == "full" else FAILURE_CAPTURE_LIMIT
                self.payloads = [_payload(self.run, v, limit) for _, v, _ in self.inputs]
            self._resolve_artifacts()
            _enqueue(self.run, self.pack())
        except Exception as e:
            _warn.problem("step_record_failed", f"could not record failing step {self.meta.name!r}: {e!r}")

    def pack(self) -> tuple:
        """The finished call as a tuple of plain values (strings, ints, untracked dicts).

        Queued records must not keep GC-tracked objects (spans, the call) alive
        until the next flush: that would make the garbage collector's full
        passes run more often in the user's program.
        """
        sp = self.span
        parent = sp.parent
        meta = self.meta
        err = span_row(sp, self.run.writer, None) if sp.status.status_code.name == "ERROR" else None
        io: list = []
        if meta.capture != "none":
            payloads = self.payloads or ()
            t0 = self.t0
            for i, (k, _, info) in enumerate(self.inputs):
                io.append(_io_tuple("input", k, info, t0, payloads[i] if i < len(payloads) else None))
            if self.out is not None:
                info, t_end, payload = self.out
                io.append(_io_tuple("output", "return", info, t_end, payload))
            for direction, arg, info, t in self.parts:
                io.append(_io_tuple(direction, arg, info, t, None))
        epoch, batch, lctx = self.ctx
        return (self.run.run_id, self.run.writer, meta.name, meta.attrs_json, sp.context.trace_id,
                sp.context.span_id, parent.span_id if parent is not None else None, sp.start_time, sp.end_time,
                epoch, batch, lctx, err, tuple(io), tuple(self.artifacts))

    def _resolve_artifacts(self) -> None:
        arts = self.artifacts
        if arts:
            self.artifacts = [a if type(a) is dict else _artifact_row(self.run, a, "output", self) for a in arts]


def _enqueue(r, record: tuple) -> None:
    q = r.steps_queue
    if q is None:
        q = _setup_run(r)
    if r.finished:
        _warn.problem("span_without_run", "a step ended after its run finished; not recorded")
        return
    q.append(record)


def _setup_run(r):
    """First step call of a run: the queue of finished calls and the hooks that drain it."""
    with _lock:
        q = r.steps_queue
        if q is None:
            q = collections.deque()
            r.steps_queue = q
            r.rec.on_flush.append(lambda: _drain(r))
            r.finish_hooks.append(_drain)
    return q


def _drain(r) -> int:
    """Turn queued finished calls into rows (flush thread, and at finish); returns how many calls."""
    q = r.steps_queue
    if not q:
        return 0
    n = 0
    emit = r.rec.emit
    while True:
        try:
            call = q.popleft()
        except IndexError:
            break
        n += 1
        try:
            span, io = _rows(call)
            emit("spans", span)
            for row in io:
                emit("io", row)
        except Exception as e:
            _warn.problem("step_record_failed", f"could not record a step call: {e!r}")
    return n


def _rows(record: tuple) -> tuple[dict, list]:
    """``spans`` row and ``io`` rows of one packed call."""
    (run_id, writer, name, attrs_json, trace_id, sid, parent, start, end, epoch, batch, lctx, err, io,
     artifacts) = record
    span_id = "%016x" % sid
    if err is not None:
        span = err
    else:
        attributes = attributes_json(attrs_json, epoch, batch, None if lctx is None else json.dumps(lctx))
        span = {
            "run_id": run_id, "trace_id": "%032x" % trace_id, "span_id": span_id,
            "parent_span_id": ("%016x" % parent) if parent is not None else None, "name": name,
            "kind": "internal", "start_time": start // 1000, "end_time": end // 1000,
            "duration_ms": (end - start) / 1e6, "status": "ok", "epoch": epoch, "batch": batch, "ctx": lctx,
            "attributes": attributes, "service_name": _service_name(), "writer": writer,
        }
    rows = []
    for direction, arg, fp, tname, nbytes, summary, shape, dtype, path, ref, t in io:
        rows.append({"run_id": run_id, "span_id": span_id, "step_name": name, "direction": direction, "arg": arg,
                     "fingerprint": fp, "type": tname, "shape": shape, "dtype": dtype, "bytes": nbytes,
                     "summary": summary, "path": path, "payload": ref, "time": t})
    rows.extend(artifacts)
    return span, rows


def _service_name() -> str | None:
    svc = _SERVICE.get("name")
    if svc is None:
        res = getattr(_provider, "resource", None)
        svc = _SERVICE["name"] = (res.attributes.get("service.name") if res is not None else None) or ""
    return svc or None


def _after_fork_child() -> None:
    # The parent writes its own queued calls; a forked child (DataLoader worker) must not repeat them.
    r = _run.ACTIVE
    q = r.steps_queue if r is not None else None
    if q is not None:
        q.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_child)


def flush() -> None:
    """Write every finished step call of the active run now (tests, before reading the store mid-run)."""
    r = _run.ACTIVE
    if r is not None:
        _drain(r)
        r.rec.flush()


_EXPAND_TYPES = (list, tuple, dict)
MAX_PARTS = 16  # items of a returned/passed list, tuple or dict that also get their own io row


def _parts(direction: str, name: str, v, capture: str, t: int) -> list:
    """Rows for the items of a small list/tuple/dict, so that unpacking a returned tuple keeps lineage."""
    try:
        if len(v) > MAX_PARTS:
            return []
        if type(v) is dict:
            items = [(f"{name}.{k}", x) for k, x in v.items() if type(k) is str]
        else:
            items = [(f"{name}[{i}]", x) for i, x in enumerate(v)]
        return [(direction, k, _describe_value(x, capture), t) for k, x in items if type(x) not in _SCALAR_TYPES]
    except Exception:
        return []


def _describe_value(v: Any, capture: str, skip: bool = False):
    t = type(v)
    if t in _SCALAR_TYPES:
        return _scalar_row(v)
    if skip:
        info = _fpm.Info(_fpm.type_name(v), None, summary={"kind": "object", "note": "receiver not fingerprinted"})
    else:
        info = _fpm.describe(v)
        if capture == "sample":
            s = _fpm.sample(v)
            if s is not None:
                info.summary["sample"] = s
    return info


def _payload(r, value: Any, limit: int) -> tuple[str | None, str | None]:
    """Store ``value`` as a cloudpickle blob: (reference, note)."""
    data, note = _fpm.pickle_bounded(value, limit)
    if data is None:
        return None, note
    try:
        from flightlog.collector import blobs as _blobs

        digest = _blobs.blob_digest(data)
        _blobs.put_blob(r.store, digest, data)
        return "cloudpickle:" + digest, None
    except Exception as e:
        return None, f"not stored: blob write failed ({type(e).__name__}: {str(e)[:200]})"


def _io_tuple(direction: str, arg: str, info, t_us: int, payload) -> tuple:
    ref, note = payload if payload else (None, None)
    if type(info) is tuple:
        fp, tname, nbytes, summary = info
        shape = dtype = path = None
        if note:
            summary = json.dumps(dict(json.loads(summary), capture_note=note))
    else:
        if note:
            info.summary["capture_note"] = note
        fp, tname, nbytes, shape, dtype, path = (info.fingerprint, info.type, info.nbytes, info.shape,
                                                 info.dtype, info.path)
        summary = _fpm.summary_json(info)
    return (direction, str(arg), fp, tname, nbytes, summary, shape, dtype, path, ref, t_us)


# -- the decorator ------------------------------------------------------------------------------

def _start(meta: _Meta, args: tuple, kwargs: dict) -> _Call | None:
    r = _run.ACTIVE
    if r is None:
        r = _run._auto_start()
        if r is None:
            return None
    try:
        return _Call(meta, r, args, kwargs)
    except Exception as e:
        _warn.problem("step_record_failed", f"could not start recording step {meta.name!r}: {e!r}")
        return None


def _wrap(fn: Callable, name: str | None, capture: str) -> Callable:
    meta = _Meta(fn, name, capture)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def astep(*args, **kwargs):
            call = _start(meta, args, kwargs)
            if call is None:
                return await fn(*args, **kwargs)
            try:
                out = await fn(*args, **kwargs)
            except BaseException as e:
                call.fail(e)
                raise
            call.done(out)
            return out

        wrapper = astep
    else:
        @functools.wraps(fn)
        def step_(*args, **kwargs):
            call = _start(meta, args, kwargs)
            if call is None:
                return fn(*args, **kwargs)
            try:
                out = fn(*args, **kwargs)
            except BaseException as e:
                call.fail(e)
                raise
            call.done(out)
            return out

        wrapper = step_
    wrapper.__flightlog_step__ = meta.name  # type: ignore[attr-defined]
    return wrapper


@overload
def step(fn: F) -> F: ...
@overload
def step(fn: None = None, *, name: str | None = None, capture: str = "fingerprint") -> Callable[[F], F]: ...


def step(fn: Callable | None = None, *, name: str | None = None, capture: str = "fingerprint"):
    """Record each call of ``fn`` as a span with fingerprints of its inputs and output.

    ``capture``: ``"fingerprint"`` (default: hashes + summaries), ``"sample"``
    (also the first rows of each value), ``"full"`` (also the values, as
    cloudpickle blobs, for replay), ``"none"`` (the span only). A failing call
    keeps its inputs under every mode but ``"none"``, so that
    ``flightlog replay-step`` can re-run it. A bad ``capture`` or ``name`` is a
    set-up error and raises ``ValueError`` at decoration time.
    """
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {', '.join(CAPTURE_MODES)}; got {capture!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"step name must be a non-empty string, got {name!r}")
    if fn is None:
        return lambda f: _wrap(f, name, capture)
    if not callable(fn):
        raise TypeError(f"@fl.step decorates a function, got {type(fn).__name__}")
    return _wrap(fn, name, capture)


# -- artifacts ----------------------------------------------------------------------------------

def artifact(path: str | os.PathLike, role: str = "input") -> str | os.PathLike:
    """Declare a file the code reads (``role="input"``) or writes (``"output"``) itself; returns ``path``.

    Inside a step, the file joins that call's inputs/outputs; an output is
    fingerprinted when the step returns (so declare it before or after
    writing). Outside a step it is recorded at once with no span.
    """
    try:
        if role not in ("input", "output"):
            _warn.problem("bad_artifact", f"artifact role must be 'input' or 'output', got {role!r}")
            return path
        call = _current.get()
        if call is not None:
            # outputs are fingerprinted when the step ends (the file may not be written yet)
            call.artifacts.append(path if role == "output" else _artifact_row(call.run, path, role, call))
            return path
        r = _run.ACTIVE or _run._auto_start()
        if r is not None:
            r.rec.emit("io", _artifact_row(r, path, role, None))
    except Exception as e:
        _warn.problem("artifact_failed", f"could not record artifact {path!r}: {e!r}")
    return path


def _artifact_row(r, path, role: str, call: "_Call | None") -> dict:
    try:
        info = _fpm.file_info(os.fspath(path))
    except (OSError, TypeError, ValueError) as e:
        _warn.problem("artifact_missing", f"artifact {path!r} cannot be read: {e}")
        try:
            ap = os.path.abspath(os.fspath(path))
        except Exception:
            ap = str(path)
        info = _fpm.Info("file", None, summary={"kind": "file", "note": f"unreadable: {type(e).__name__}"}, path=ap)
    return {
        "run_id": r.run_id, "span_id": call.span_id if call is not None else None,
        "step_name": call.meta.name if call is not None else None,
        "direction": role, "arg": "artifact", "fingerprint": info.fingerprint, "type": info.type,
        "shape": None, "dtype": None, "bytes": info.nbytes, "summary": _fpm.summary_json(info),
        "path": info.path, "payload": None, "time": _time_ns() // 1000,
    }


def current_span_id() -> str | None:
    """The span id of the innermost step call running in this context, or None."""
    c = _current.get()
    return c.span_id if c is not None else None
