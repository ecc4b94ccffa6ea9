"""Read-only SQL in a process of its own, with hard time and memory limits.

``flightlog serve`` answers ``/v1/query`` with it and the UI's SQL page runs through it: a query
gets the sandboxed connection of :func:`flightlog.query.db.connect` inside a process that is
killed at the time limit and whose data segment is capped at the memory limit, so neither a
runaway expression nor a crash inside DuckDB can take the server down. Refusals are
:class:`BadRequest` with the HTTP status that says why (400 bad SQL, 403 refused, 408 too slow,
422 too big, 503 no process).
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

DEFAULT_QUERY_MEMORY = 1 << 30  # bytes one /v1/query may allocate (its process's data segment)
DEFAULT_MAX_RESPONSE = 128 << 20  # bytes one /v1/query may return


class BadRequest(Exception):
    """A client error: becomes a 4xx with ``message``; nothing was written."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _query_result(root: str, sql: str, params: Any, limit: int, timeout: float, fmt: str,
                  max_bytes: int | None) -> tuple[bytes, bool, int]:
    """Run read-only SQL in the CLI's sandbox and render the reply body (``fmt``: json or arrow)."""
    import duckdb

    from flightlog._errors import FlightlogError, QueryError
    from flightlog.query import db

    try:
        con = db.connect(root)
    except FlightlogError as e:
        raise BadRequest(400, str(e)) from None
    timer = threading.Timer(timeout, con.interrupt)  # the polite stop; the caller kills the process at the limit
    timer.daemon = True
    timer.start()
    try:
        table = db.run_sql(sql, params, con=con, limit=limit + 1)  # one row past the limit says "truncated"
    except QueryError as e:  # the status from what DuckDB said (the cause); the message is run_sql's
        cause = e.__cause__
        if isinstance(cause, duckdb.OutOfMemoryException):
            raise MemoryError from None
        if isinstance(cause, duckdb.InterruptException) or "interrupt" in str(cause).lower():
            raise BadRequest(408, f"query exceeded the time limit of {timeout:g} s") from None
        raise BadRequest(403 if isinstance(cause, duckdb.PermissionException) else 400, str(e)) from None
    finally:
        timer.cancel()
        con.close()
    truncated = table.num_rows > limit
    if truncated:
        table = table.slice(0, limit)
    too_big = (f"the result is larger than the limit of {max_bytes} bytes for a reply: select fewer rows "
               "or columns (max_rows), or aggregate")
    if max_bytes is not None and table.nbytes > 4 * max_bytes:
        raise BadRequest(422, too_big)
    if fmt == "arrow":
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        out = sink.getvalue().to_pybytes()
    else:
        from flightlog import _format

        cols = json.dumps([{"name": f.name, "type": str(f.type)} for f in table.schema])
        try:
            rows = _format.to_json(table)
        except (TypeError, ValueError, OverflowError, pa.ArrowException) as e:
            raise BadRequest(422, f"the result cannot be written as JSON ({str(e)[:200]}): ask for format "
                                  "'arrow' or cast the column") from None
        out = (f'{{"columns": {cols}, "row_count": {table.num_rows}, '
               f'"truncated": {"true" if truncated else "false"}, "rows": {rows}}}').encode()
    if max_bytes is not None and len(out) > max_bytes:
        raise BadRequest(422, too_big)
    return out, truncated, table.num_rows


# -- /v1/query in its own process ----------------------------------------------------------
# DuckDB checks its interrupt flag between vectors, not inside one long expression
# (repeat('ab', 10^9) ran 53 s past a 1 s interrupt here), and a thread cannot be killed.
# So each query runs in a process of its own, forked (~5 ms) from a "zygote": a helper
# process started once per server, single-threaded, with DuckDB, pyarrow and the views module
# loaded; one process is always forked ahead and warmed up (DuckDB's first connection, and the
# validation of the files of the store the previous query read). The query process is killed
# at the time limit, its data segment is capped (RLIMIT_DATA) at the memory limit, and a crash
# inside DuckDB takes down only that process.
# (multiprocessing's forkserver would re-import the server's __main__ script in every child.)
# Frames on the per-query socket: child -> its pid; server -> the request (JSON); child -> a
# JSON header, then the reply body.

_PRELOAD = ("duckdb", "pyarrow", "pyarrow.ipc", "pyarrow.parquet", "fsspec", "flightlog.query.db",
            "flightlog.query._snapshot", "flightlog.query.lineage", "flightlog._format")
_zygote_lock = threading.Lock()
_zygote: Any = None  # (Popen, socket) of the running zygote


def _send_frame(sock, data: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(data)) + data if len(data) < 65536 else struct.pack("<Q", len(data)))
    if len(data) >= 65536:
        sock.sendall(data)


def _recv_exact(sock, n: int, deadline: float | None) -> bytes:
    import socket

    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline")
            sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the query process closed its socket")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock, deadline: float | None = None) -> bytes:
    (n,) = struct.unpack("<Q", _recv_exact(sock, 8, deadline))
    return _recv_exact(sock, n, deadline)


def _cap_memory(limit: int) -> None:
    """Let this process allocate ``limit`` more bytes of data segment than it holds now (Linux)."""
    import resource

    held = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmData:"):
                    held = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    cap = held + limit
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    except (ValueError, OSError, AttributeError):
        pass


def _query_child(fd: int) -> None:
    """A query process: one request from the server, one reply."""
    import socket

    conn = socket.socket(fileno=fd)
    _send_frame(conn, str(os.getpid()).encode())
    req = json.loads(_recv_frame(conn))
    memory = req["memory"]
    out = b""
    try:
        if memory:
            _cap_memory(memory)
        out, truncated, rows = _query_result(req["root"], req["sql"], req["params"], req["limit"],
                                             req["timeout"], req["fmt"], req["max_bytes"])
        head = {"ok": True, "truncated": truncated, "rows": rows}
    except BadRequest as e:
        head = {"ok": False, "status": e.status, "message": e.message}
    except MemoryError:
        head = {"ok": False, "status": 422, "message": f"query exceeded the memory limit of {(memory or 0) >> 20} MiB"}
    except BaseException as e:  # a bug: say what it was; the server stays up
        head = {"ok": False, "status": 500, "message": f"query failed: {type(e).__name__}: {str(e)[:300]}"}
    _send_frame(conn, json.dumps(head).encode())
    _send_frame(conn, out)
    conn.close()


def _warm_up(store: str) -> None:
    """What every query process pays once, paid ahead: DuckDB's first connection, and the
    validation of the store's files (cached per process; a big store has thousands)."""
    try:
        from flightlog.query import db

        con = db.connect(store)
        try:
            con.execute("SELECT 1").fetchall()
        finally:
            con.close()
    except Exception:
        pass


def _fork_spare(server_sock, store: str) -> Any:
    """Fork a query process that warms up, then waits for its query; returns the socket to hand it one."""
    import signal
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ours.close()
            server_sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _warm_up(store)
            msg, fds, _, _ = socket.recv_fds(theirs, 1, 1)
            if fds:
                _query_child(fds[0])
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    return ours


def _zygote_main(fd: int) -> None:
    """The zygote's loop: hand each query the server sends to a warm spare process; exit with the server.

    The zygote itself stays single-threaded (it never opens DuckDB), so forking it is safe; one spare
    is always forked ahead and warms up while idle, so a query does not wait for DuckDB's start.
    """
    import importlib
    import signal
    import socket
    import tempfile

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C is for the server
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # query processes are reaped by the kernel
    for m in _PRELOAD:  # what every query imports, once, instead of in every query process
        try:
            importlib.import_module(m)
        except ImportError:
            pass
    sock = socket.socket(fileno=fd)
    empty = tempfile.mkdtemp(prefix="flightlog-warmup-")  # an empty store to warm up on at first
    try:
        spare = _fork_spare(sock, empty)
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, 65536, 4)  # a message: the query's store + its socket
            except OSError:
                return
            if not msg:  # the server is gone (the spare sees its socket close and exits too)
                return
            store = msg.decode("utf-8", "surrogateescape")
            for q in fds:
                try:
                    socket.send_fds(spare, [b"q"], [q])
                except OSError:  # the spare died: a fresh one takes the query
                    spare.close()
                    spare = _fork_spare(sock, empty)
                    socket.send_fds(spare, [b"q"], [q])
                spare.close()
                os.close(q)
                spare = _fork_spare(sock, store if os.path.isdir(store) else empty)
    finally:
        try:
            os.rmdir(empty)
        except OSError:
            pass


def _zygote_socket(restart: bool = False):
    """The socket to the running zygote, starting one when there is none (or ``restart``)."""
    import socket
    import subprocess
    import sys

    global _zygote
    with _zygote_lock:
        if _zygote is not None and not restart and _zygote[0].poll() is None:
            return _zygote[1]
        if _zygote is not None:
            _zygote[1].close()
            if _zygote[0].poll() is None:
                _zygote[0].kill()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message per query
        code = "import sys; from flightlog.query.isolated import _zygote_main; _zygote_main(int(sys.argv[1]))"
        try:
            proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        _zygote = (proc, ours)
        return ours


def query_in_process(root: str, sql: str, params: Any, limit: int, timeout: float, fmt: str = "json", *,
                     memory: int | None = DEFAULT_QUERY_MEMORY, max_bytes: int | None = DEFAULT_MAX_RESPONSE,
                     timeout_label: float | None = None) -> tuple[bytes, bool, int]:
    """Run one query in a fresh process with hard time and memory limits; ``(body, truncated, rows)``.

    BadRequest: 400 bad SQL, 403 refused, 408 past ``timeout`` (the process is
    killed), 422 past ``memory`` or ``max_bytes``, 503 when no process can start.
    """
    import signal
    import socket

    label = timeout_label if timeout_label is not None else timeout
    request = json.dumps({"root": os.fspath(root), "sql": sql, "params": params, "limit": limit,
                          "timeout": timeout, "fmt": fmt, "memory": memory, "max_bytes": max_bytes}).encode()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = None
    done = False
    # the zygote may take a few seconds to load DuckDB the first time; that is not the query's time
    start_deadline = time.monotonic() + max(30.0, timeout)
    try:
        try:
            for attempt in (0, 1):
                try:
                    zsock = _zygote_socket(restart=attempt > 0)
                    with _zygote_lock:
                        socket.send_fds(zsock, [os.fspath(root).encode("utf-8", "surrogateescape")],
                                        [theirs.fileno()])
                    break
                except OSError:
                    if attempt:
                        raise
            theirs.close()
            pid = int(_recv_frame(ours, start_deadline))
        except (OSError, EOFError, ValueError, AttributeError) as e:  # AttributeError: no send_fds (not Unix)
            raise BadRequest(503, f"cannot start a query process: {e}") from None
        deadline = time.monotonic() + timeout + 0.5  # the child's own interrupt fires at `timeout`
        try:
            _send_frame(ours, request)
            head = json.loads(_recv_frame(ours, deadline))
            body = _recv_frame(ours, deadline)
            done = True
        except socket.timeout:
            raise BadRequest(408, f"query exceeded the time limit of {label:g} s") from None
        except (EOFError, OSError, ValueError):
            # the process died without a word: killed by the kernel or a crash in DuckDB
            mem = f" (likely past the memory limit of {memory >> 20} MiB)" if memory else ""
            raise BadRequest(422, f"the query's process died before answering{mem}") from None
        if not head.get("ok"):
            raise BadRequest(int(head.get("status", 500)), str(head.get("message", "query failed")))
        return body, bool(head["truncated"]), int(head["rows"])
    finally:
        if pid is not None and not done:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        ours.close()
        if theirs.fileno() != -1:
            theirs.close()


def run_query(root: str, sql: str, params: Any, limit: int, timeout: float, *,
              memory: int | None = DEFAULT_QUERY_MEMORY,
              max_bytes: int | None = DEFAULT_MAX_RESPONSE) -> tuple[pa.Table, bool]:
    """Run read-only SQL in the CLI's sandbox, in its own process; stop at ``limit`` rows and ``timeout`` s."""
    out, truncated, _ = query_in_process(root, sql, params, limit, timeout, "arrow", memory=memory,
                                         max_bytes=max_bytes)
    with ipc.open_stream(pa.py_buffer(out)) as r:
        return r.read_all(), truncated
