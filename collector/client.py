"""Remote mode: a Sink that sends batches to a collector, and ``flightlog sync``.

``CollectorSink`` runs on the recorder's background flush thread, never on the
training thread. Each batch is an Arrow IPC stream with a batch id
``<writer>-<seq>`` (header ``X-Flightlog-Batch``) that the server turns into
the part file's name, so a resend after a lost reply is acknowledged without
writing twice: every row arrives exactly once.

When the collector is down, slow (2 s timeout) or refuses for a reason that
may pass (401/403, 408, 429, 5xx), the batch is written atomically to the
spool directory (``<store>/spool``) and the sink backs off (0.5 s doubling to
30 s); while backing off, batches go straight to the spool with no network
call, so a dead collector costs training nothing. Spooled batches are resent
oldest first when the collector answers again, at the next start of any
process using the same spool, and by ``flightlog sync``. Batches the
collector rejects for good (bad rows: 400, 404, 413, 415, 422) move to
``spool/rejected`` with a warning instead of being retried forever.

Heartbeat: a tiny ``POST /v1/heartbeat`` every few seconds makes the server
touch the run's heartbeat file, exactly what readers look at to tell a live
run from a crashed one.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from flightlog import _config, _warn
from flightlog.collector import store as _store

ARROW_STREAM = "application/vnd.apache.arrow.stream"
DEFAULT_TIMEOUT = 2.0
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
_SPOOL_RE = re.compile(r"^([A-Za-z0-9]{1,64})-(\d{1,15})\.([a-z_]{1,32})\.arrows$")
_RETRY_LATER = {401, 403, 408, 425, 429}


def _new_writer() -> str:
    from flightlog.collector.store import new_writer_id

    return new_writer_id()


def encode(data: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes (what ``/v1/ingest`` takes)."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, data.schema) as w:
        w.write_table(data)
    return sink.getvalue().to_pybytes()


def spool_files(spool: str | os.PathLike) -> list[Path]:
    """Spooled batches waiting to be sent, oldest first."""
    d = Path(spool)
    try:
        names = [n for n in os.listdir(d) if _SPOOL_RE.match(n)]
    except OSError:
        return []
    out = []
    for n in names:
        try:
            out.append((os.stat(d / n).st_mtime_ns, n))
        except OSError:
            continue
    return [d / n for _, n in sorted(out)]


class CollectorSink:
    """Sends batches to a collector's ``/v1/ingest``; spools them while it is unreachable.

    Never blocks the training thread and never loses an acknowledged or
    spooled batch. ``write`` raises only when the batch can neither be sent
    nor spooled (then the recorder keeps it and retries).
    """

    def __init__(self, url: str, spool: str | os.PathLike | None = None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, writer: str | None = None) -> None:
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"collector URL must look like http://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.spool = Path(spool) if spool is not None else Path(_config.store_home(None)) / "spool"
        self.token = token
        self.timeout = float(timeout)
        self.writer = writer or _new_writer()
        self._seq = 0
        self._retry: tuple[pa.Table, str] | None = None  # a batch that could be neither sent nor spooled
        self._lock = threading.RLock()  # one network exchange at a time per sink
        self._client = None
        self._pid = os.getpid()  # the process that owns the lock, the seq and the HTTP connections
        self._backoff_until = 0.0
        self._delay = 0.0
        self._spooled = bool(spool_files(self.spool))  # leftovers of an earlier process go out first
        self.sent = 0
        self.duplicates = 0
        self.spooled = 0
        self.rejected = 0
        self.last_error = ""

    # -- HTTP --------------------------------------------------------------------------

    def _check_fork(self) -> None:
        """In a forked child (DataLoader workers): fresh lock, connections and batch ids."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.RLock()  # the parent's flush thread may have held it at fork
            self._client = None  # never share the parent's sockets
            self.writer = _new_writer()
            self._seq = 0

    def _http(self):
        if self._client is None:
            import httpx

            headers = {"User-Agent": "flightlog-collector-client"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            self._client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=min(1.0, self.timeout)),
                                        headers=headers)
        return self._client

    def _post(self, path: str, timeout: float | None = None, **kw: Any):
        c = self._http()
        if timeout is not None:
            kw["timeout"] = timeout
        return c.post(self.url + path, **kw)

    def _ok(self) -> None:
        self._delay = 0.0
        self._backoff_until = 0.0

    def _fail(self) -> None:
        self._delay = min(BACKOFF_MAX, max(BACKOFF_MIN, self._delay * 2))
        self._backoff_until = time.monotonic() + self._delay * (0.75 + 0.5 * random.random())

    def backing_off(self) -> bool:
        """True while the sink waits before talking to the collector again."""
        return time.monotonic() < self._backoff_until

    def _send(self, table: str, payload: bytes, batch_id: str, attempt: int) -> str:
        """One POST of one batch: ``ok`` | ``later`` (spool, back off) | ``rejected`` (never retry)."""
        try:
            r = self._post(f"/v1/ingest/{table}", content=payload,
                           headers={"Content-Type": ARROW_STREAM, "X-Flightlog-Batch": batch_id,
                                    "X-Flightlog-Attempt": str(attempt)})
        except Exception as e:  # connection refused, timeout, reset, DNS...
            self._fail()
            self.last_error = f"{type(e).__name__}: {e}"
            return "later"
        if r.status_code < 300:
            self._ok()
            try:
                self.duplicates += 1 if r.json().get("duplicate_rows") else 0
            except Exception:
                pass
            return "ok"
        self.last_error = f"HTTP {r.status_code}: {r.text[:200]}"
        if r.status_code in _RETRY_LATER or r.status_code >= 500:
            if r.status_code in (401, 403):
                _warn.problem("collector_auth", f"collector {self.url} refused the token ({r.status_code}); "
                                                f"batches are spooled in {self.spool}")
            self._fail()
            return "later"
        return "rejected"

    # -- spool -------------------------------------------------------------------------

    def _spool_write(self, table: str, payload: bytes, batch_id: str) -> None:
        _store.write_bytes_atomic(self.spool / f"{batch_id}.{table}.arrows", payload, fsync=True)
        self._spooled = True
        self.spooled += 1

    def _reject(self, path: Path | None, table: str, payload: bytes, batch_id: str) -> None:
        self.rejected += 1
        d = self.spool / "rejected"
        try:
            d.mkdir(parents=True, exist_ok=True)
            target = d / f"{batch_id}.{table}.arrows"
            if path is not None:
                os.replace(path, target)
            else:
                target.write_bytes(payload)
        except OSError:
            pass
        _warn.problem("collector_rejected", f"collector {self.url} rejected {table} rows "
                                            f"({self.last_error}); kept in {d}")

    def drain(self, deadline: float | None = None, force: bool = False) -> int:
        """Resend spooled batches, oldest first, until done, a failure or ``deadline``; returns batches sent."""
        if not self._spooled or (self.backing_off() and not force):
            return 0
        sent = 0
        self._check_fork()
        with self._lock:
            files = spool_files(self.spool)
            for f in files:
                if deadline is not None and time.monotonic() > deadline:
                    return sent
                m = _SPOOL_RE.match(f.name)
                try:
                    payload = f.read_bytes()
                except FileNotFoundError:  # another process sent it
                    continue
                res = self._send(m.group(3), payload, f"{m.group(1)}-{m.group(2)}", attempt=2)
                if res == "later":
                    return sent
                if res == "rejected":
                    self._reject(f, m.group(3), payload, f"{m.group(1)}-{m.group(2)}")
                    continue
                sent += 1
                self.sent += 1
                try:
                    f.unlink()
                except FileNotFoundError:
                    pass
            self._spooled = bool(spool_files(self.spool))
        return sent

    # -- the Sink protocol --------------------------------------------------------------

    def write(self, table: str, data: pa.Table) -> None:
        """Send one batch, or spool it; never waits longer than the timeout."""
        if data.num_rows == 0:
            return
        payload = encode(data)
        self._check_fork()
        with self._lock:
            if self._retry is not None and self._retry[0] is data:
                batch_id = self._retry[1]  # the recorder retries a batch we could not spool: same id
            else:
                self._seq += 1
                batch_id = f"{self.writer}-{self._seq}"
            self._retry = (data, batch_id)
            if not self.backing_off():
                self.drain(time.monotonic() + 2 * self.timeout)
            if not self.backing_off():
                res = self._send(table, payload, batch_id, attempt=1)
                if res == "ok":
                    self.sent += 1
                    self._retry = None
                    return
                if res == "rejected":
                    self._reject(None, table, payload, batch_id)
                    self._retry = None
                    return
            self._spool_write(table, payload, batch_id)  # raises when the disk is full: the recorder retries
            self._retry = None

    def heartbeat(self, run_id: str) -> None:
        """Tell the collector the run is alive (and resend spooled batches); silent on failure."""
        self._check_fork()
        if self.backing_off():
            return
        with self._lock:
            if self._spooled:
                self.drain(time.monotonic() + 2 * self.timeout)
                if self.backing_off():
                    return
            try:
                r = self._post("/v1/heartbeat", json={"run_id": run_id, "writer": self.writer})
                if r.status_code >= 500 or r.status_code in (408, 429):
                    self._fail()
            except Exception:
                self._fail()

    def pending(self) -> int:
        """Batches in the spool (of any writer) waiting to be sent."""
        return len(spool_files(self.spool))

    def compact(self, run_id: str) -> None:
        """Ask the collector to merge this writer's parts; only once every batch of ours is stored.

        A spooled batch sent after a merge would look like a resend of a merged one.
        """
        with self._lock:
            if self.backing_off() or any(f.name.startswith(self.writer + "-") for f in spool_files(self.spool)):
                return
            try:
                self._post("/v1/compact", json={"run_id": run_id, "writer": self.writer},
                           timeout=max(5.0, self.timeout))
            except Exception:
                pass  # optional: `flightlog compact` can do it later

    def close(self) -> None:
        """Last try to empty the spool (a few seconds at most), then say what is left."""
        try:
            self.drain(time.monotonic() + 5.0, force=True)
        except Exception:
            pass
        n = self.pending()
        if n:
            _warn.problem("collector_spooled", f"{n} batch(es) wait in {self.spool} for collector {self.url}; "
                                               "they are sent at the next start or by `flightlog sync`")
        self._check_fork()
        c, self._client = self._client, None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass


# -- flightlog sync -------------------------------------------------------------------------

def configure_sync(p: argparse.ArgumentParser) -> None:
    from flightlog._cli_core import add_store

    add_store(p)
    p.add_argument("--spool", default=None, help="spool directory (default: <store>/spool)")
    p.add_argument("--collector", default=None, help=f"collector URL (default: ${_config.ENV_COLLECTOR})")
    p.add_argument("--token", default=None, help=f"bearer token (default: ${_config.ENV_TOKEN})")
    p.add_argument("--retry-rejected", action="store_true",
                   help="also resend batches the collector rejected before (spool/rejected)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")


def run_sync(args: argparse.Namespace) -> int:
    """Push every spooled batch; exit 1 when some are left."""
    from flightlog._errors import StoreError

    url = _config.resolve(args.collector, _config.ENV_COLLECTOR, None)
    if not url:
        raise StoreError(f"no collector given: pass --collector URL or set {_config.ENV_COLLECTOR}")
    spool = Path(args.spool) if args.spool else Path(_config.store_home(args.store)) / "spool"
    if not spool.is_dir():
        print(f"nothing to sync: no spool at {spool}")
        return 0
    if args.retry_rejected:
        rej = spool / "rejected"
        for f in (rej.iterdir() if rej.is_dir() else ()):
            if _SPOOL_RE.match(f.name):
                os.replace(f, spool / f.name)
    token = _config.resolve(args.token, _config.ENV_TOKEN, None)
    try:
        sink = CollectorSink(url, spool=spool, token=token, timeout=args.timeout, writer="sync")
    except ValueError as e:
        raise StoreError(str(e)) from None
    before = sink.pending()
    sent = sink.drain(force=True)
    left = sink.pending()
    c = sink._client
    if c is not None:
        c.close()
    msg = f"sent {sent} of {before} spooled batch(es) to {url}"
    if sink.rejected:
        msg += f"; {sink.rejected} rejected (kept in {spool / 'rejected'})"
    if left:
        msg += f"; {left} left ({sink.last_error or 'collector unreachable'})"
    print(msg)
    return 1 if left else 0
