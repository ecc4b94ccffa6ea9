"""OTLP/HTTP trace payloads → rows of the ``spans`` table.

Any OpenTelemetry SDK can export to the collector, so this module maps the
OTLP data model onto flightlog's columns:

* ``run_id``: the first of the span attribute ``flightlog.run_id``, the
  resource attribute ``flightlog.run_id``, then ``ml.run_id`` (span, then
  resource), then the resource's ``service.name``, else ``"otel"``. A run id
  names a directory of the store, so an explicit one (``flightlog.run_id`` /
  ``ml.run_id``) must already be valid (letters, digits and ``_.:@+=-``, at
  most 128): a span naming an invalid one is rejected, never filed under a
  look-alike. A service name that is not a valid run id is made one, with a
  hash of the exact name appended (``"etl job/1"`` → ``etl_job_1-<8 hex>``),
  so two names that differ only in such characters stay two runs.
* ``epoch`` / ``batch``: integer attributes ``ml.epoch`` / ``ml.batch`` (or
  ``flightlog.epoch`` / ``flightlog.batch``); ``ctx``: ``ml.ctx``/``flightlog.ctx``.
* ``writer``: resource ``flightlog.writer``, else ``host.name:process.pid``
  (``:rank`` added from a ``flightlog.rank``/``rank`` resource attribute),
  else ``peer:<client address>``.
* ``attributes``: every span attribute as a JSON object (the keys above included).
* ``error_type`` / ``error_message``: from the first ``exception`` event
  (``exception.type`` / ``exception.message``), else ``error.type`` and the
  status message.

Spans whose ids are malformed (a trace id that is not 16 bytes, a span id that
is not 8, all zeros) are rejected one by one and counted, as OTLP's partial
success allows; the rest of the request is kept.

Columns are built as Python lists, one per column, and turned into Arrow once
per request: that is what keeps the decode at tens of thousands of spans/s.
"""
from __future__ import annotations

import base64
import json
import re
from typing import Any

import pyarrow as pa

from flightlog.collector import schema as _schema

PROTOBUF = "application/x-protobuf"
JSON = "application/json"

_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
_STATUS = ("unset", "ok", "error")
_BAD_RUN_CHARS = re.compile(r"[^A-Za-z0-9_.:@+=-]")
_ZERO_TRACE = b"\0" * 16
_ZERO_SPAN = b"\0" * 8
_RUN_KEYS = ("flightlog.run_id", "ml.run_id")
_EPOCH_KEYS = ("ml.epoch", "flightlog.epoch")
_BATCH_KEYS = ("ml.batch", "flightlog.batch")
_CTX_KEYS = ("ml.ctx", "flightlog.ctx")


class OTLPDecodeError(ValueError):
    """The payload is not a valid OTLP ExportTraceServiceRequest."""


def _pb():
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    return trace_service_pb2


def parse_request(body: bytes, content_type: str):
    """Decode a protobuf or OTLP/JSON body into an ``ExportTraceServiceRequest``."""
    pb = _pb()
    if content_type == PROTOBUF:
        try:
            return pb.ExportTraceServiceRequest.FromString(body)
        except Exception as e:  # google.protobuf.message.DecodeError and friends
            raise OTLPDecodeError(f"malformed OTLP protobuf: {e}") from None
    if content_type == JSON:
        from google.protobuf import json_format

        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise OTLPDecodeError(f"malformed JSON: {e}") from None
        if not isinstance(doc, dict):
            raise OTLPDecodeError("OTLP/JSON body must be an object with 'resourceSpans'")
        _hex_ids_to_base64(doc)
        try:
            return json_format.ParseDict(doc, pb.ExportTraceServiceRequest(), ignore_unknown_fields=True)
        except Exception as e:  # json_format.ParseError, TypeError on odd shapes
            raise OTLPDecodeError(f"malformed OTLP/JSON: {str(e).splitlines()[0][:300]}") from None
    raise OTLPDecodeError(f"unsupported content type {content_type!r}")


_ID_KEYS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}


def _hex_ids_to_base64(node: Any) -> None:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping expects base64 bytes."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _ID_KEYS and isinstance(v, str):
                try:
                    node[k] = base64.b64encode(bytes.fromhex(v)).decode() if v else ""
                except ValueError:
                    raise OTLPDecodeError(f"{k} {v[:40]!r} is not hex") from None
            elif isinstance(v, (dict, list)):
                _hex_ids_to_base64(v)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, (dict, list)):
                _hex_ids_to_base64(v)


def any_value(v: Any) -> Any:
    """An OTLP ``AnyValue`` as a JSON-able Python value."""
    k = v.WhichOneof("value")
    if k is None:
        return None
    if k == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if k == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if k == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, k)


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        k = v.WhichOneof("value")
        if k == "string_value":
            out[kv.key] = v.string_value
        elif k == "int_value":
            out[kv.key] = v.int_value
        elif k == "double_value":
            out[kv.key] = v.double_value
        elif k == "bool_value":
            out[kv.key] = v.bool_value
        else:
            out[kv.key] = any_value(v)
    return out


_VALID_RUN = re.compile(r"[A-Za-z0-9_.:@+=-]{1,128}")


def valid_run_id(raw: Any) -> str | None:
    """``raw`` as a run id when it is one exactly (no trailing newline, no ``.``/``..``), else None."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        return None
    s = str(raw)
    return s if _VALID_RUN.fullmatch(s) and s not in (".", "..") else None


def safe_run_id(raw: Any) -> str:
    """``raw`` (a service name) as a store-safe run id that no other name maps to.

    A valid id is kept as it is; otherwise disallowed characters become ``_``
    and ``-`` plus 8 hex digits of the name's SHA-256 are appended, so that
    ``a/b`` and ``a_b`` (or two long names sharing 128 characters) stay apart.
    """
    s = str(raw)
    ok = valid_run_id(s)
    if ok is not None:
        return ok
    import hashlib

    digest = hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{_BAD_RUN_CHARS.sub('_', s)[:119]}-{digest}"


def _int_or_none(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return None
    return None


def _first(d: dict, keys: tuple) -> Any:
    for k in keys:
        v = d.get(k)
        if v is not None:
            return v
    return None


def _writer(res: dict) -> str | None:
    w = res.get("flightlog.writer")
    if w:
        return str(w)
    host, pid = res.get("host.name"), res.get("process.pid")
    if host is None and pid is None:
        return None
    rank = _first(res, ("flightlog.rank", "rank"))
    base = f"{host or '?'}:{pid if pid is not None else '?'}"
    return f"{base}:{rank}" if rank is not None else base


def spans_table(req, default_writer: str | None = None) -> tuple[pa.Table, int, str]:
    """Rows of the spans table from a decoded request.

    ``default_writer`` fills ``writer`` when the resource names no host/process
    (the server passes the peer address).

    Returns the table, the number of spans rejected and a message saying why.
    """
    cols: dict[str, list] = {f.name: [] for f in _schema.SPANS}
    c_run, c_tid, c_sid, c_par = cols["run_id"], cols["trace_id"], cols["span_id"], cols["parent_span_id"]
    c_name, c_kind, c_st, c_et = cols["name"], cols["kind"], cols["start_time"], cols["end_time"]
    c_dur, c_status, c_etype, c_emsg = cols["duration_ms"], cols["status"], cols["error_type"], cols["error_message"]
    c_ep, c_ba, c_ctx, c_attr = cols["epoch"], cols["batch"], cols["ctx"], cols["attributes"]
    c_svc, c_wr = cols["service_name"], cols["writer"]
    rejected = 0
    why = ""
    dumps = json.dumps
    for rs in req.resource_spans:
        res = _attrs(rs.resource.attributes)
        svc = res.get("service.name")
        svc = str(svc) if svc is not None else None
        res_run = _first(res, _RUN_KEYS)
        default_run = valid_run_id(res_run) if res_run is not None else safe_run_id(svc or "otel")
        writer = _writer(res) or default_writer
        for ss in rs.scope_spans:
            for sp in ss.spans:
                tid, sid, par = sp.trace_id, sp.span_id, sp.parent_span_id
                if len(tid) != 16 or len(sid) != 8 or tid == _ZERO_TRACE or sid == _ZERO_SPAN or \
                        (par and len(par) != 8):
                    rejected += 1
                    why = why or (f"span {sp.name[:60]!r}: trace_id must be 16 bytes and span_id 8 bytes, "
                                  f"non-zero (got {len(tid)} and {len(sid)})")
                    continue
                a = _attrs(sp.attributes) if sp.attributes else {}
                run = a.get("flightlog.run_id")
                if run is None:
                    run = a.get("ml.run_id")
                run_id = default_run if run is None else valid_run_id(run)
                if run_id is None:
                    bad = run if run is not None else res_run
                    rejected += 1
                    why = why or (f"span {sp.name[:60]!r}: run id {str(bad)[:80]!r} is not a valid run id "
                                  "(letters, digits and _.:@+=- only, at most 128 characters)")
                    continue
                c_run.append(run_id)
                c_tid.append(tid.hex())
                c_sid.append(sid.hex())
                c_par.append(par.hex() if par and par != _ZERO_SPAN else None)
                c_name.append(sp.name)
                k = sp.kind
                c_kind.append(_KINDS[k] if 0 <= k < 6 else str(k))
                st, et = sp.start_time_unix_nano, sp.end_time_unix_nano
                c_st.append(st // 1000)
                c_et.append(et // 1000 if et else None)
                c_dur.append((et - st) / 1e6 if et and et >= st else None)
                code = sp.status.code
                c_status.append(_STATUS[code] if 0 <= code < 3 else str(code))
                etype = emsg = None
                if sp.events:
                    for ev in sp.events:
                        if ev.name == "exception":
                            ea = _attrs(ev.attributes)
                            etype, emsg = ea.get("exception.type"), ea.get("exception.message")
                            break
                if etype is None and a:
                    etype = a.get("error.type")
                if emsg is None and sp.status.message:
                    emsg = sp.status.message
                c_etype.append(None if etype is None else str(etype))
                c_emsg.append(None if emsg is None else str(emsg))
                if a:
                    c_ep.append(_int_or_none(_first(a, _EPOCH_KEYS)))
                    c_ba.append(_int_or_none(_first(a, _BATCH_KEYS)))
                    ctx = _first(a, _CTX_KEYS)
                    c_ctx.append(ctx if ctx is None or isinstance(ctx, str) else dumps(ctx, default=str))
                    c_attr.append(dumps(a, default=str))
                else:
                    c_ep.append(None)
                    c_ba.append(None)
                    c_ctx.append(None)
                    c_attr.append(None)
                c_svc.append(svc)
                c_wr.append(writer)
    n = len(c_run)  # columns added to the schema later that OTLP does not fill stay null
    arrays = [pa.array(cols[f.name], f.type) if len(cols[f.name]) == n else pa.nulls(n, f.type)
              for f in _schema.SPANS]
    return pa.Table.from_arrays(arrays, schema=_schema.SPANS), rejected, why


def response_body(rejected: int, message: str, content_type: str) -> bytes:
    """An ``ExportTraceServiceResponse`` in the request's encoding (partial success when rejected > 0)."""
    resp = _pb().ExportTraceServiceResponse()
    if rejected:
        resp.partial_success.rejected_spans = rejected
        resp.partial_success.error_message = message
    if content_type == PROTOBUF:
        return resp.SerializeToString()
    from google.protobuf import json_format

    return json_format.MessageToJson(resp, indent=None).encode()


def error_body(message: str, content_type: str, code: int = 3) -> bytes:
    """A ``google.rpc.Status`` (OTLP's error reply) in the request's encoding; JSON when it cannot."""
    if content_type == PROTOBUF:
        try:
            from google.rpc import status_pb2

            return status_pb2.Status(code=code, message=message).SerializeToString()
        except Exception:
            pass
    return json.dumps({"code": code, "message": message}).encode()
