"""Remote mode: runs write through a collector, survive its death, spool, sync, and never duplicate a row."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flightlog as fl
from flightlog import _warn, cli
from flightlog.collector import client as fl_client
from flightlog.collector.server import ServerThread
from flightlog.query import db


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_server(root: str, port: int, *extra: str) -> subprocess.Popen:
    """`flightlog serve` in a subprocess; returns once /healthz answers."""
    p = subprocess.Popen([sys.executable, "-m", "flightlog.cli", "serve", "--store", root, "--port", str(port), *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise RuntimeError(f"collector exited: {p.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    p.kill()
    raise RuntimeError("collector did not start")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    if p.stderr:
        p.stderr.close()


def _totals(root: str, name: str = "x") -> tuple[int, float]:
    out = db.run_sql("SELECT count(*) AS n, coalesce(sum(value), 0) AS s FROM metrics WHERE name = ?", [name],
                     store=root).to_pylist()[0]
    return out["n"], out["s"]


def _complete_files(root: str) -> int:
    """Every Parquet file under ``root`` reads whole and no temporary is left; returns the file count."""
    n = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            assert not f.endswith(".tmp"), f"left-over temporary {f}"
            if f.endswith(".parquet"):
                pq.read_table(os.path.join(dirpath, f))
                n += 1
    return n


class _Blackhole:
    """A TCP port that accepts connections and never answers: a collector that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


class _DropReply:
    """A proxy that forwards each request to the collector and then hangs up without the reply."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.forwarded = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:])}
                while len(body) < int(headers.get("content-length", 0)):
                    body += conn.recv(65536)
                keep = ("content-type", "x-flightlog-batch", "x-flightlog-attempt")
                httpx.post(self.target + path, content=body, headers={k: headers[k] for k in keep if k in headers})
                self.forwarded += 1

    def close(self) -> None:
        self.sock.close()


def test_remote_run_end_to_end(store, tmp_path):
    """fl.init(collector=...) sends metrics and the runs row to the collector; checkpoints/blobs stay local."""
    server_root = str(tmp_path / "server")
    with ServerThread(server_root) as srv:
        r = fl.init(project="remote", collector=srv.url, flush_interval=0.05)
        assert isinstance(r.sink, fl_client.CollectorSink)
        for i in range(500):
            fl.log("x", float(i))
        fl.log("acc", 0.9)
        time.sleep(0.3)  # a flush-thread tick or two: the first heartbeat
        fl.finish()
        assert _totals(server_root) == (500, sum(range(500)))
        runs = db.read_runs(server_root).to_pylist()
        assert [(x["run_id"], x["status"], x["project"]) for x in runs] == [(r.run_id, "finished", "remote")]
        rdir = os.path.join(server_root, "runs", f"run_id={r.run_id}")
        assert any(n.startswith(".heartbeat-") for n in os.listdir(rdir))
        parquet = [n for n in os.listdir(rdir) if n.endswith(".parquet")]
        assert len(parquet) == 1 and parquet[0].startswith("compact-")  # the run's parts merged at finish
    assert not os.path.exists(os.path.join(store, "metrics"))  # nothing went to the local store
    assert fl_client.spool_files(os.path.join(store, "spool")) == []


TRAIN = """
import os, time, flightlog as fl
fl.init(project="remote", flush_interval=0.05)
for i in range({n}):
    fl.log("x", float(i))
    if i % 50 == 0:
        time.sleep(0.05)
    if i == {n} // 2:  # the second half runs with the collector back (its restart time varies with load)
        t = time.monotonic()
        while not os.path.exists("collector-up") and time.monotonic() - t < 60:
            time.sleep(0.05)
print("done", flush=True)
"""


@pytest.mark.slow
def test_collector_killed_mid_run_loses_and_duplicates_nothing(store, tmp_path):
    """SIGKILL the collector mid-run and restart it: every logged row arrives exactly once (count and sum)."""
    server_root = str(tmp_path / "server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    srv = _spawn_server(server_root, port)
    script = tmp_path / "train.py"
    n = 4000
    script.write_text(TRAIN.format(n=n))
    env = dict(os.environ, FLIGHTLOG_COLLECTOR=url, FLIGHTLOG_HOME=store)
    train = subprocess.Popen([sys.executable, str(script)], env=env, cwd=str(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while _count_files(server_root, "metrics") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert train.poll() is None, "the run ended before the collector was killed"
        srv.send_signal(signal.SIGKILL)
        srv.wait(5)
        time.sleep(0.5)
        srv = _spawn_server(server_root, port)
        (tmp_path / "collector-up").touch()
        out, err = train.communicate(timeout=60)
        assert train.returncode == 0, err
        assert "done" in out
    finally:
        if train.poll() is None:
            train.kill()
        _stop(srv)
    assert _totals(server_root) == (n, float(sum(range(n))))
    assert fl_client.spool_files(os.path.join(store, "spool")) == []
    assert [x["status"] for x in db.read_runs(server_root).to_pylist()] == ["finished"]
    _complete_files(server_root)


def _count_files(root: str, table: str) -> int:
    n = 0
    for _, _, files in os.walk(os.path.join(root, table)):
        n += sum(f.endswith(".parquet") for f in files)
    return n


def _rows(run_id: str, values) -> pa.Table:
    values = list(values)
    return pa.table({"run_id": [run_id] * len(values), "name": ["x"] * len(values), "value": values,
                     "step": list(range(len(values)))})


def test_lost_reply_resend_is_not_duplicated(tmp_path):
    """A batch stored but whose reply was lost is spooled, resent, and acknowledged without a second copy."""
    server_root = str(tmp_path / "server")
    with ServerThread(server_root) as srv:
        proxy = _DropReply(srv.url)
        try:
            sink = fl_client.CollectorSink(proxy.url, spool=tmp_path / "spool")
            sink.write("metrics", _rows("r1", [1.0, 2.0, 3.0]))
            assert proxy.forwarded == 1 and sink.pending() == 1  # stored on the server, unknown to the client
            assert _totals(server_root) == (3, 6.0)
            sink.url = srv.url
            sink._ok()
            assert sink.drain(force=True) == 1 and sink.pending() == 0
            sink.write("metrics", _rows("r1", [4.0]))
            sink.close()
        finally:
            proxy.close()
        assert _totals(server_root) == (4, 10.0)
        assert httpx.get(srv.url + "/healthz").json()["duplicate_rows"] == 3


@pytest.mark.slow
def test_hung_collector_never_blocks_training_then_sync_pushes(store, tmp_path, capsys):
    """With a collector that hangs, fl.log stays fast, batches spool; `flightlog sync` later delivers them once."""
    hole = _Blackhole()
    try:
        r = fl.init(project="remote", collector=hole.url, flush_interval=0.05)
        t0 = time.perf_counter()
        slowest = 0.0
        for i in range(20_000):
            t = time.perf_counter()
            fl.log("x", float(i))
            slowest = max(slowest, time.perf_counter() - t)
            if i % 2000 == 0:
                time.sleep(0.05)  # let the flush thread run into the hung collector
        loop_s = time.perf_counter() - t0
        with pytest.warns(_warn.FlightlogWarning, match="sync"):
            fl.finish()
    finally:
        hole.close()
    assert slowest < 0.05 and loop_s < 2.0, (slowest, loop_s)  # the 2 s network timeout never reached fl.log
    spool = os.path.join(store, "spool")
    assert fl_client.spool_files(spool), "nothing was spooled"
    assert r.dropped_rows == 0
    # the collector is still down: sync says so and keeps everything
    assert cli.main(["sync", "--store", store, "--collector", hole.url, "--timeout", "0.5"]) == 1
    server_root = str(tmp_path / "server")
    with ServerThread(server_root) as srv:
        capsys.readouterr()
        assert cli.main(["sync", "--store", store, "--collector", srv.url]) == 0
        assert "sent" in capsys.readouterr().out
        assert fl_client.spool_files(spool) == []
        assert cli.main(["sync", "--store", store, "--collector", srv.url]) == 0  # idempotent: nothing left
    assert _totals(server_root) == (20_000, float(sum(range(20_000))))
    assert [x["status"] for x in db.read_runs(server_root).to_pylist()] == ["finished"]


def test_next_start_resends_leftover_spool(tmp_path):
    """Batches spooled by an earlier process go out with the first write of the next sink on that spool."""
    spool = tmp_path / "spool"
    dead = fl_client.CollectorSink(f"http://127.0.0.1:{_free_port()}", spool=spool)
    dead.write("metrics", _rows("r1", [1.0, 2.0]))
    dead.write("metrics", _rows("r1", [3.0]))  # backing off: straight to the spool
    assert dead.pending() == 2
    server_root = str(tmp_path / "server")
    with ServerThread(server_root) as srv:
        fresh = fl_client.CollectorSink(srv.url, spool=spool)
        fresh.write("metrics", _rows("r1", [4.0]))
        fresh.close()
        assert fresh.pending() == 0 and _totals(server_root) == (4, 10.0)


def test_rejected_batches_set_aside_with_a_warning(tmp_path, capsys):
    """Rows the collector refuses for good (schema mismatch) move to spool/rejected instead of retrying forever."""
    server_root = str(tmp_path / "server")
    spool = tmp_path / "spool"
    with ServerThread(server_root) as srv:
        sink = fl_client.CollectorSink(srv.url, spool=spool)
        with pytest.warns(_warn.FlightlogWarning, match="rejected"):
            sink.write("metrics", pa.table({"run_id": ["r"], "not_a_column": [1]}))
        sink.write("metrics", _rows("r", [5.0]))
        assert sink.pending() == 0 and len(os.listdir(spool / "rejected")) == 1
        assert _totals(server_root) == (1, 5.0)
        assert cli.main(["sync", "--spool", str(spool), "--collector", srv.url, "--retry-rejected"]) == 0
        assert "1 rejected" in capsys.readouterr().out


def test_wrong_token_spools_then_sync_with_token(store, tmp_path, monkeypatch):
    """A collector refusing the token gets nothing written and loses nothing; sync with the right token delivers."""
    server_root = str(tmp_path / "server")
    with ServerThread(server_root, token="right") as srv:
        monkeypatch.setenv("FLIGHTLOG_TOKEN", "wrong")
        with pytest.warns(_warn.FlightlogWarning) as caught:
            fl.init(project="remote", collector=srv.url, flush_interval=0.05)
            for i in range(100):
                fl.log("x", float(i))
            fl.finish()
        said = " ".join(str(w.message) for w in caught)
        assert "refused the token" in said and "flightlog sync" in said
        assert not os.path.exists(os.path.join(server_root, "metrics"))
        monkeypatch.setenv("FLIGHTLOG_TOKEN", "right")
        assert cli.main(["sync", "--store", store, "--collector", srv.url]) == 0
    assert _totals(server_root) == (100, float(sum(range(100))))


def test_bad_collector_url_falls_back_to_local(store):
    """An unusable collector URL warns and records locally instead of failing the run."""
    with pytest.warns(_warn.FlightlogWarning, match="collector"):
        r = fl.init(project="p", collector="ftp://nowhere", flush_interval=0.05)
    fl.log("x", 1.0)
    fl.finish()
    assert not isinstance(r.sink, fl_client.CollectorSink)
    assert _totals(store) == (1, 1.0)


def test_forked_child_gets_its_own_batch_ids(tmp_path):
    """After a fork the sink uses a new writer id, fresh seq numbers and new connections."""
    sink = fl_client.CollectorSink("http://127.0.0.1:9", spool=tmp_path / "spool")
    sink._seq = 41
    parent_writer = sink.writer
    sink._pid = -1  # what a forked child sees
    sink._check_fork()
    assert sink.writer != parent_writer and sink._seq == 0 and sink._client is None


CONCURRENT = 8
BATCHES = 500


@pytest.mark.slow
def test_eight_clients_500_batches_exact_counts(tmp_path):
    """8 concurrent clients x 500 batches through one collector: exact row counts, no torn files."""
    server_root = str(tmp_path / "server")
    port = _free_port()
    srv = _spawn_server(server_root, port)
    url = f"http://127.0.0.1:{port}"
    errors: list = []

    def client(k: int) -> None:
        try:
            sink = fl_client.CollectorSink(url, spool=tmp_path / f"spool{k}", timeout=10)
            for i in range(BATCHES):
                run = f"run{(k + i) % 3}"
                t = _rows(run, [float(k * BATCHES + i)] * 10)
                t = t.append_column("writer", pa.array([f"host:{k}"] * 10))
                sink.write("metrics", t)
            sink.close()
            assert sink.pending() == 0 and sink.sent == BATCHES
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert _complete_files(server_root) == CONCURRENT * BATCHES
        total = CONCURRENT * BATCHES
        assert _totals(server_root) == (total * 10, 10.0 * sum(range(total)))
        per_writer = db.run_sql("SELECT writer, count(*) AS n FROM metrics GROUP BY 1 ORDER BY 1",
                                store=server_root).to_pylist()
        assert per_writer == [{"writer": f"host:{k}", "n": BATCHES * 10} for k in range(CONCURRENT)]
        assert httpx.get(url + "/healthz").json()["status"] == "ok"
    finally:
        _stop(srv)


RANK = """
import flightlog as fl
r = fl.init(project="ddp", flush_interval=0.05)
for i in range(300):
    fl.log("x", float(i))
"""


def test_ranks_write_through_one_collector(store, tmp_path):
    """Processes of one job (RANK=0/1) write at once through the collector; rows carry host:pid:rank."""
    server_root = str(tmp_path / "server")
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    with ServerThread(server_root) as srv:
        procs = [subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), stderr=subprocess.PIPE,
                                  env=dict(os.environ, FLIGHTLOG_COLLECTOR=srv.url, FLIGHTLOG_HOME=store,
                                           RANK=str(rank)))
                 for rank in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
    rows = db.run_sql("SELECT split_part(writer, ':', 3) AS rank, count(*) AS n, count(DISTINCT run_id) AS runs "
                      "FROM metrics GROUP BY 1 ORDER BY 1", store=server_root).to_pylist()
    assert rows == [{"rank": "0", "n": 300, "runs": 1}, {"rank": "1", "n": 300, "runs": 1}]
    host = socket.gethostname()
    writers = db.run_sql("SELECT DISTINCT writer FROM metrics", store=server_root).column("writer").to_pylist()
    assert all(w.startswith(host + ":") for w in writers)


def test_heartbeat_touches_the_run_on_the_collector(tmp_path):
    """The remote heartbeat refreshes the run's heartbeat file in the collector's store."""
    from flightlog.collector import store as st

    server_root = str(tmp_path / "server")
    with ServerThread(server_root) as srv:
        sink = fl_client.CollectorSink(srv.url, spool=tmp_path / "spool")
        sink.heartbeat("run-hb")
        age = st.heartbeat_age(server_root, "run-hb", time.time())
        assert age is not None and age < 5
        r = httpx.post(srv.url + "/v1/heartbeat", json={"run_id": "../x", "writer": "w"})
        assert r.status_code == 400


def test_unspoolable_batch_keeps_its_id_when_retried(tmp_path):
    """A batch that could be neither sent nor spooled (full disk) is retried under the same batch id."""
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the spool directory should be")
    sink = fl_client.CollectorSink(f"http://127.0.0.1:{_free_port()}", spool=blocker)
    data = _rows("r1", [1.0])
    with pytest.raises(OSError):
        sink.write("metrics", data)
    first = sink._retry[0][1]
    blocker.unlink()
    sink._ok()
    sink.write("metrics", data)  # the recorder hands the same table again
    assert [f.name for f in fl_client.spool_files(blocker)] == [f"{first}.metrics.arrows"]
