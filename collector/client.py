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

Order: a batch never overtakes an older batch of the same writer. While any
of this sink's batches waits in the spool, newer ones join the spool behind
it, and the spool is resent in batch-number order per writer; so the
collector holds a prefix of each writer's batches, plus the spool, at all
times. Every reply is checked: the collector must account for every row of
the batch (written now, or already stored); a batch it does not fully confirm
moves to ``spool/unconfirmed`` and ``flightlog sync`` exits 1 naming it.

Every request has a wall-clock limit (twice the timeout) besides httpx's
per-phase timeouts, so a collector that accepts and then stalls, or trickles
its reply, costs a bounded time. At finish (``finishing()``) the sink gets
``FINISH_SECONDS`` of network time in all, whatever the collector does (down,
refusing, stalling): every limit shrinks to what is left, and what is not
delivered by then stays in the spool.

Heartbeat: a tiny ``POST /v1/heartbeat`` every few seconds makes the server
touch the run's heartbeat file, exactly what readers look at to tell a live
run from a crashed one.
"""
from __future__ import annotations

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
FINISH_SECONDS = 5.0  # network time fl.finish() may spend in remote mode; the rest is spooled
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
    """Spooled batches waiting to be sent: oldest first, each writer's in batch-number order."""
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
    out.sort()
    # Writers interleave by age; within a writer, batch numbers decide (equal or skewed mtimes
    # must never send a later batch first).
    by_writer: dict[str, list[tuple[int, str]]] = {}
    for _, n in out:
        m = _SPOOL_RE.match(n)
        by_writer.setdefault(m.group(1), []).append((int(m.group(2)), n))
    for v in by_writer.values():
        v.sort(reverse=True)
    return [d / by_writer[_SPOOL_RE.match(n).group(1)].pop()[1] for _, n in out]


def _batch_rows(payload: bytes) -> int | None:
    """Rows in a spooled Arrow IPC stream; None when it cannot be read."""
    try:
        with ipc.open_stream(pa.py_buffer(payload)) as r:
            return sum(b.num_rows for b in r)
    except Exception:
        return None


def local_spool(home: str) -> Path:
    """``<store>/spool`` for a local store; a local cache folder for a store on object storage."""
    from flightlog.collector import fs as _fs

    return _fs.spool_dir(home) / "collector" if _fs.is_remote(home) else Path(home) / "spool"


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
        self.spool = Path(spool) if spool is not None else local_spool(_config.store_home(None))
        self.token = token
        self.timeout = float(timeout)
        self.writer = writer or _new_writer()
        self._seq = 0
        self._retry: list[tuple[pa.Table, str]] = []  # batches that could be neither sent nor spooled
        self._mine: set[str] = set()  # our batch ids in the spool: newer batches queue behind them
        self._deadline: float | None = None  # set by finishing(): no network after it
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
        self.unconfirmed = 0
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
            self._retry = []
            self._mine = set()

    def _http(self):
        if self._client is None:
            import httpx

            headers = {"User-Agent": "flightlog-collector-client"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            self._client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=min(1.0, self.timeout)),
                                        headers=headers)
        return self._client

    def _left(self) -> float | None:
        """Seconds of network time left before the finish deadline (None: no deadline)."""
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _post(self, path: str, timeout: float | None = None, **kw: Any):
        """One POST with a wall-clock limit on the whole exchange.

        httpx's timeouts are per phase (connect, each read, each write), so a collector
        that trickles its reply a byte at a time would hold the caller forever. The
        exchange runs on a short-lived thread instead; past the limit (twice the timeout,
        or what is left before the finish deadline) it is abandoned with its connection
        and counts as a failure (the batch is spooled; a resend is idempotent).
        """
        c = self._http()
        t = timeout if timeout is not None else self.timeout
        limit = 2 * t
        left = self._left()
        if left is not None:
            if left <= 0.01:
                raise TimeoutError("finish deadline reached")
            t, limit = min(t, left), min(limit, left)
        kw["timeout"] = t
        box: dict = {}

        def go() -> None:
            try:
                box["r"] = c.post(self.url + path, **kw)
            except BaseException as e:
                box["e"] = e

        th = threading.Thread(target=go, name="flightlog-post", daemon=True)
        try:
            th.start()
        except RuntimeError:  # no new threads at interpreter shutdown (Python >= 3.12 at exit): per-phase limits only
            go()
            th = None
        if th is not None:
            th.join(limit)
        if th is not None and th.is_alive():
            if self._client is c:
                self._client = None  # the stuck exchange keeps its connection; the next one opens a new one
            raise TimeoutError(f"no complete reply from {self.url} within {limit:.1f} s")
        if "e" in box:
            raise box["e"]
        return box["r"]

    def finishing(self, seconds: float = FINISH_SECONDS) -> None:
        """The run is finishing: allow ``seconds`` of network time from now on, then spool only."""
        self._deadline = time.monotonic() + seconds

    def past_deadline(self) -> bool:
        left = self._left()
        return left is not None and left <= 0.01

    def _ok(self) -> None:
        self._delay = 0.0
        self._backoff_until = 0.0

    def _fail(self) -> None:
        self._delay = min(BACKOFF_MAX, max(BACKOFF_MIN, self._delay * 2))
        self._backoff_until = time.monotonic() + self._delay * (0.75 + 0.5 * random.random())

    def backing_off(self) -> bool:
        """True while the sink waits before talking to the collector again."""
        return time.monotonic() < self._backoff_until

    def _send(self, table: str, payload: bytes, batch_id: str, attempt: int, rows: int | None = None) -> str:
        """One POST of one batch: ``ok`` | ``later`` (spool, back off) | ``rejected`` (never retry)
        | ``unconfirmed`` (the reply does not account for all ``rows``)."""
        if self.past_deadline():
            self.last_error = "finish deadline reached"
            return "later"
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
                reply = r.json()
                got = int(reply["rows"]) + int(reply["duplicate_rows"])
            except Exception:  # a collector that does not count: nothing to check
                return "ok"
            self.duplicates += 1 if reply.get("duplicate_rows") else 0
            if rows is not None and got != rows:
                self.last_error = f"collector confirmed {got} of {rows} rows of batch {batch_id}"
                return "unconfirmed"
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
        _remember_url(self.spool, self.url)
        self._mine.add(batch_id)
        self.spooled += 1

    def _keep(self, folder: str, path: Path | None, table: str, payload: bytes, batch_id: str) -> Path:
        """Move (or write) a batch into spool/<folder>, owner-only; best effort (a warning follows)."""
        d = self.spool / folder
        try:
            _store.make_private_dirs(d)
            target = d / f"{batch_id}.{table}.arrows"
            if path is not None:
                os.replace(path, target)
            else:
                _store.write_bytes_atomic(target, payload, fsync=True)
        except OSError:
            pass
        return d

    def _set_aside(self, path: Path | None, table: str, payload: bytes, batch_id: str) -> None:
        """A batch the collector did not fully confirm: kept in spool/unconfirmed, loudly."""
        self.unconfirmed += 1
        d = self._keep("unconfirmed", path, table, payload, batch_id)
        _warn.problem("collector_unconfirmed", f"collector {self.url} did not confirm every row "
                                               f"({self.last_error}); batch kept in {d}")

    def _reject(self, path: Path | None, table: str, payload: bytes, batch_id: str) -> None:
        self.rejected += 1
        d = self._keep("rejected", path, table, payload, batch_id)
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
                if (deadline is not None and time.monotonic() > deadline) or self.past_deadline():
                    return sent
                m = _SPOOL_RE.match(f.name)
                batch_id, table = f"{m.group(1)}-{m.group(2)}", m.group(3)
                try:
                    payload = f.read_bytes()
                except FileNotFoundError:  # another process sent it
                    self._mine.discard(batch_id)
                    continue
                res = self._send(table, payload, batch_id, attempt=2, rows=_batch_rows(payload))
                if res == "later":
                    return sent
                self._mine.discard(batch_id)
                if res == "rejected":
                    self._reject(f, table, payload, batch_id)
                    continue
                if res == "unconfirmed":
                    self._set_aside(f, table, payload, batch_id)
                    continue
                sent += 1
                self.sent += 1
                try:
                    f.unlink()
                except FileNotFoundError:
                    pass
            self._spooled = bool(spool_files(self.spool))
            if not self._spooled:
                self._mine.clear()
        return sent

    # -- the Sink protocol --------------------------------------------------------------

    def write(self, table: str, data: pa.Table) -> None:
        """Send one batch, or spool it behind our older spooled ones.

        Runs on the flush thread; takes at most a resend slice of the spool (2 × timeout)
        plus one request (2 × timeout), and never past the finish deadline.
        """
        if data.num_rows == 0:
            return
        payload = encode(data)
        self._check_fork()
        with self._lock:
            known = next((i for i, (t, _) in enumerate(self._retry) if t is data), None)
            if known is not None:
                batch_id = self._retry.pop(known)[1]  # the recorder retries a batch we could not spool: same id
                first = False  # it may have reached the collector before its reply was lost
            else:
                self._seq += 1
                batch_id = f"{self.writer}-{self._seq}"
                first = True
            if not self.backing_off():
                self.drain(time.monotonic() + 2 * self.timeout)
            if not self.backing_off() and not self._mine:  # never overtake our own spooled batches
                res = self._send(table, payload, batch_id, attempt=1 if first else 2, rows=data.num_rows)
                if res == "ok":
                    self.sent += 1
                    return
                if res == "rejected":
                    self._reject(None, table, payload, batch_id)
                    return
                if res == "unconfirmed":
                    self._set_aside(None, table, payload, batch_id)
                    return
            try:
                self._spool_write(table, payload, batch_id)
            except BaseException:  # disk full: the recorder hands the same table again later
                self._retry = (self._retry + [(data, batch_id)])[-64:]
                raise

    def heartbeat(self, run_id: str) -> None:
        """Tell the collector the run is alive (and resend spooled batches); silent on failure."""
        self._check_fork()
        if self.backing_off() or self.past_deadline():
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
        """Ask the collector to merge this writer's parts, once every batch of ours is stored.

        A batch delivered after a merge is stored correctly (merges record their batch
        numbers), but it would stay a separate part until the next merge.
        """
        with self._lock:
            if (self.backing_off() or self.past_deadline() or self._mine
                    or any(f.name.startswith(self.writer + "-") for f in spool_files(self.spool))):
                return
            try:
                self._post("/v1/compact", json={"run_id": run_id, "writer": self.writer},
                           timeout=max(5.0, self.timeout))
            except Exception:
                pass  # optional: `flightlog compact` can do it later

    def close(self) -> None:
        """Last try to empty the spool (until the finish deadline, else 5 s), then say what is left."""
        try:
            self.drain(self._deadline if self._deadline is not None else time.monotonic() + FINISH_SECONDS,
                       force=True)
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


# -- flightlog sync (arguments and output: sdk/_store_cli.py) ----------------------------------

URL_FILE = "collector.url"  # in the spool: where its batches were going (`flightlog sync` reads it)


def _remember_url(spool: Path, url: str) -> None:
    """Note the collector URL next to the spooled batches (once per URL); never raises."""
    try:
        p = spool / URL_FILE
        if not p.is_file() or p.read_text().strip() != url:
            _store.write_bytes_atomic(p, url.encode())
    except Exception:
        pass


def spooled_url(spool: Path) -> str | None:
    """The collector URL the spool's batches were meant for, when a sink recorded one."""
    try:
        url = (spool / URL_FILE).read_text().strip()
    except OSError:
        return None
    return url if re.match(r"^https?://[^\s]+$", url) and len(url) < 2048 else None


def sync(spool: Path, url: str, *, token: str | None = None, timeout: float = 10.0,
         retry_rejected: bool = False) -> dict[str, Any]:
    """Push every spooled batch to ``url``, checking the collector accounts for every row.

    Returns ``{"before", "sent", "duplicates", "rejected", "left", "unconfirmed", "last_error"}``
    (``left``: spool files still unsent; ``unconfirmed``: names of batches the collector took but
    did not account for, kept in ``spool/unconfirmed``). Raises StoreError for an unusable URL.
    """
    from flightlog._errors import StoreError

    if retry_rejected:
        rej = spool / "rejected"
        for f in (rej.iterdir() if rej.is_dir() else ()):
            if _SPOOL_RE.match(f.name):
                os.replace(f, spool / f.name)
    try:
        sink = CollectorSink(url, spool=spool, token=token, timeout=timeout, writer="sync")
    except ValueError as e:
        raise StoreError(str(e)) from None
    before = sink.pending()
    sent = sink.drain(force=True)
    left = spool_files(spool)
    c = sink._client
    if c is not None:
        c.close()
    unconfirmed = sorted(f.name for f in (spool / "unconfirmed").glob("*.arrows")) \
        if (spool / "unconfirmed").is_dir() else []
    return {"before": before, "sent": sent, "duplicates": sink.duplicates, "rejected": sink.rejected,
            "left": left, "unconfirmed": unconfirmed, "last_error": sink.last_error}
