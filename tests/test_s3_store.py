"""Stores on object storage: record, kill, compact, query, sandbox, spool and many writers against a real
S3-compatible server (moto's server mode on loopback)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _moto  # noqa: E402

import flightlog as fl  # noqa: E402
from flightlog._errors import QueryError  # noqa: E402
from flightlog.collector import fs as _fs  # noqa: E402
from flightlog.collector import blobs as _blobs  # noqa: E402
from flightlog.collector import store as _store  # noqa: E402
from flightlog.query import db  # noqa: E402

BUCKET = "fl-test"
# a moto server per module (~6 s) and a subprocess per test: the slow lane
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def s3server():
    """One moto server for the module (start-up is the slow part)."""
    p, endpoint = _moto.start(BUCKET)
    yield endpoint
    _moto.stop(p)


@pytest.fixture
def s3(s3server, monkeypatch, tmp_path):
    """A fresh ``s3://`` store for this test; the AWS variables point at the loopback server."""
    for k, v in _moto.env(s3server).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the local spool
    root = f"s3://{BUCKET}/t{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("FLIGHTLOG_HOME", root)
    return root


def _keys(root: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = _fs.split(root)
    return sorted(i.path[len(path) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True,
                                                                                      allow_not_found=True))
                  if i.type == pafs.FileType.File)


def _script(tmp_path, code: str, *args, env=None, timeout=60):
    p = tmp_path / f"s{uuid.uuid4().hex[:6]}.py"
    p.write_text(code)
    return subprocess.run([sys.executable, str(p), *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})), cwd=str(tmp_path))


RECORD = """
import flightlog as fl
fl.init(project="s3t", params={"lr": 0.1})
for e in fl.loop("epoch", range(3)):
    for i in fl.loop("batch", range(20)):
        fl.log("loss", e * 100 + i)
    fl.log("acc", e / 10)
fl.finish()
"""


def test_record_query_and_layout_on_s3(s3, tmp_path):
    """A run recorded into s3:// is read back exactly by fl.query and `flightlog sql`, Hive-partitioned, no temps."""
    p = _script(tmp_path, RECORD)
    assert p.returncode == 0, p.stderr
    t = fl.query("SELECT count(*) AS n, sum(value) AS s FROM metrics WHERE name = 'loss'")
    assert t.column("n")[0].as_py() == 60
    assert t.column("s")[0].as_py() == sum(e * 100 + i for e in range(3) for i in range(20))
    runs = db.read_runs(s3).to_pylist()
    assert [r["status"] for r in runs] == ["finished"]
    keys = _keys(s3)
    rid = runs[0]["run_id"]
    assert any(k.startswith(f"metrics/run_id={rid}/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("blobs/") for k in keys)  # the code snapshot went to the same store
    from flightlog import _snapshot

    snap = _snapshot.load(s3, runs[0]["code_snapshot"])  # uploaded off the main thread, complete at the end
    assert snap["script"].endswith(".py") and snap["files"][snap["script"]]
    assert not [k for k in keys if ".tmp" in k or k.rsplit("/", 1)[-1].startswith(".") and ".heartbeat-" not in k]
    cli = subprocess.run([sys.executable, "-m", "flightlog.cli", "sql", "--store", s3,
                          "SELECT count(*) AS n FROM metrics WHERE name = 'acc'"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert " 3 " in f" {cli.stdout} " or "\n3" in cli.stdout


def test_run_id_filter_skips_other_runs_data(s3, monkeypatch):
    """A run_id filter fetches only the footers of other runs' objects, never their data."""
    import numpy as np
    import pyarrow as pa

    sink = _store.LocalSink(s3)
    n = 200_000
    for rid in ("runa", "runb"):
        sink.write("metrics", pa.table({"run_id": [rid] * n, "name": ["x"] * n,
                                        "value": np.random.default_rng(1).standard_normal(n),
                                        "step": np.arange(n, dtype=np.int64)}))
    con = db.connect(s3)
    got: dict[str, int] = {}
    real = _fs.open_input

    class Counting:
        def __init__(self, p):
            self._f, self._k = real(p), str(p).split("run_id=")[1][:4]

        def _count(self, k):
            got[self._k] = got.get(self._k, 0) + k

        def read(self, size=-1):
            b = self._f.read(size)
            self._count(len(b))
            return b

        def readinto(self, buf):
            k = self._f.readinto(buf)
            self._count(k)
            return k

        def read_at(self, size, offset):
            b = self._f.read_at(size, offset)
            self._count(len(b))
            return b

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(_fs, "open_input", Counting)
    try:
        rows = con.execute("SELECT count(*), max(step), sum(value) > -1e9 FROM metrics WHERE run_id = 'runa'").fetchall()
    finally:
        con.close()
    assert rows == [(n, n - 1, True)]
    size_b = sum(_fs.stat(f)[0] for f in _store.table_files(s3, "metrics", ["runb"]))
    assert got.get("runa", 0) > 100_000  # runa's columns were read
    assert got.get("runb", 0) < size_b / 20, (got, size_b)  # runb: its footer at most


def test_killed_upload_leaves_no_object(s3, tmp_path):
    """A writer killed in the middle of an upload (before close) leaves no object, not a torn one."""
    code = f"""
import os, signal
from flightlog.collector import fs
fs_, path = fs.split({s3 + '/metrics/run_id=k/part-00000001-pk.parquet'!r})
out = fs_.open_output_stream(path)
out.write(b"x" * (12 << 20))  # past one multipart chunk: parts are already uploaded
os.kill(os.getpid(), signal.SIGKILL)
"""
    p = _script(tmp_path, code)
    assert p.returncode == -9
    assert _keys(s3) == []


def test_killed_run_keeps_flushed_rows_and_reads_crashed(s3, tmp_path):
    """A run killed with SIGKILL keeps every row it flushed, and its status reads 'crashed'."""
    code = """
import os, signal, time
import flightlog as fl
fl.init(project="k")
for i in range(50):
    fl.log("x", i)
fl.flush() if hasattr(fl, "flush") else None
time.sleep(1.5)
os.kill(os.getpid(), signal.SIGKILL)
"""
    p = _script(tmp_path, code, env={"FLIGHTLOG_FLUSH_INTERVAL": "0.2"})
    assert p.returncode == -9
    t = fl.query("SELECT count(*) AS n, sum(value) AS s FROM metrics WHERE name = 'x'")
    assert (t.column("n")[0].as_py(), t.column("s")[0].as_py()) == (50, sum(range(50)))
    assert [r["status"] for r in db.read_runs(s3).to_pylist()] == ["crashed"]


def test_compaction_on_s3_keeps_rows_once(s3, monkeypatch):
    """Compaction on an object store writes one merged object, deletes the parts, and rows stay exactly once."""
    import pyarrow as pa

    monkeypatch.setattr(_store, "_SMALL_BYTES", 0)  # parts, not a small partition rewritten at each write
    sink = _store.LocalSink(s3)
    for k in range(3):
        sink.write("metrics", pa.table({"run_id": ["c"] * 5, "name": ["x"] * 5, "value": [float(k)] * 5,
                                        "step": list(range(k * 5, k * 5 + 5))}))
    d = _store.part_dir(s3, "metrics", "c")
    assert len(_store.visible_files(d)) == 3
    sink.compact("c", ["metrics"])
    files = _store.visible_files(d)
    assert len(files) == 1 and files[0].name.startswith("compact-")
    assert [k for k in _keys(s3) if "run_id=c/" in k] == [f"metrics/run_id=c/{files[0].name}"]
    got = db.run_sql("SELECT count(*) AS n, sum(value) AS s FROM metrics", store=s3)
    assert (got.column("n")[0].as_py(), got.column("s")[0].as_py()) == (15, 15.0)


def test_blobs_on_s3_are_verified(s3):
    """Blobs go to the same store, are stored once, and tampered content is refused before use."""
    data = b"checkpoint bytes" * 100
    d = _blobs.blob_digest(data)
    assert _blobs.put_blob(s3, d, data)[1] is True
    assert _blobs.put_blob(s3, d, data)[1] is False
    assert _blobs.has_blob(s3, d) and _blobs.read_blob(s3, d) == data
    _fs.put(_blobs.blob_path(s3, d), b"evil")
    with pytest.raises(_blobs.BlobError):
        _blobs.read_blob(s3, d)


def test_sandbox_confines_queries_on_s3(s3):
    """Over an s3:// store, queries still cannot read local files, other URLs, or write anything."""
    import pyarrow as pa

    _store.LocalSink(s3).write("metrics", pa.table({"run_id": ["r"], "name": ["x"], "value": [1.0], "step": [0]}))
    for sql in ("SELECT * FROM read_csv('/etc/passwd')",
                f"SELECT * FROM read_parquet('{s3}/metrics/run_id=r/*.parquet')",
                "COPY (SELECT 1) TO '/tmp/flightlog-escape.csv'",
                "ATTACH '/tmp/x.db' AS x"):
        with pytest.raises(QueryError):
            fl.query(sql)
    assert not os.path.exists("/tmp/flightlog-escape.csv")
    assert fl.query("SELECT count(*) AS n FROM metrics").column("n")[0].as_py() == 1


def test_health_checks_run_over_s3(s3, tmp_path):
    """`flightlog health` reads an s3:// store like a local one."""
    p = _script(tmp_path, RECORD)
    assert p.returncode == 0, p.stderr
    h = subprocess.run([sys.executable, "-m", "flightlog.cli", "health", "--store", s3, "--run", "latest"],
                       capture_output=True, text=True, timeout=90)
    assert h.returncode in (0, 1), h.stderr  # 1: a check failed -- but it ran over the store
    assert "error" not in h.stderr.lower(), h.stderr


def test_unreachable_store_spools_locally_then_uploads(s3, tmp_path):
    """With the object store unreachable, parts and blobs wait in the local spool; the next writer uploads them."""
    dead = f"http://127.0.0.1:{_moto.free_port()}"
    p = _script(tmp_path, RECORD, env={"AWS_ENDPOINT_URL": dead}, timeout=120)
    assert p.returncode == 0, p.stderr
    spooled = list((_fs.spool_dir(s3)).rglob("*.parquet"))
    assert spooled, "nothing was spooled"
    assert not _store.is_dir(_store.table_dir(s3, "metrics"))  # nothing reached the store
    sink = _store.LocalSink(s3)
    sink.close()  # uploads the leftovers
    assert not [p for p in _fs.spool_dir(s3).rglob("*") if p.is_file()]
    assert any(k.startswith("blobs/") for k in _keys(s3))  # the code snapshot was spooled and uploaded too
    t = fl.query("SELECT count(*) AS n FROM metrics WHERE name = 'loss'")
    assert t.column("n")[0].as_py() == 60


WRITER = """
import sys
import flightlog as fl
k = int(sys.argv[1])
fl.init(project="many", name=f"w{k}", store=sys.argv[2])  # fl.init(store="s3://...")
for i in range(3000):
    fl.log("x", k * 100000 + i)
    if i % 1000 == 999:
        fl.flush() if hasattr(fl, "flush") else None
fl.finish()
"""


def test_four_concurrent_writers_lose_nothing(s3, tmp_path):
    """4 processes recording into one s3:// prefix at once: exact counts and sums per run, unique writers."""
    path = tmp_path / "w.py"
    path.write_text(WRITER)
    env = dict(os.environ, FLIGHTLOG_FLUSH_INTERVAL="0.1")
    env.pop("FLIGHTLOG_HOME")
    ps = [subprocess.Popen([sys.executable, str(path), str(k), s3], env=env, cwd=str(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    for p in ps:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    got = fl.query("SELECT r.name, count(*) AS n, sum(m.value) AS s, count(DISTINCT m.writer) AS w "
                   "FROM metrics m JOIN runs r USING (run_id) WHERE m.name = 'x' GROUP BY r.name ORDER BY 1")
    assert got.column("name").to_pylist() == ["w0", "w1", "w2", "w3"]
    assert got.column("n").to_pylist() == [3000] * 4
    assert got.column("s").to_pylist() == [float(sum(k * 100000 + i for i in range(3000))) for k in range(4)]
    # part-<seq>-<writer>.parquet, or compact-<writer>-<lo>-<hi>.parquet where a finish merged a writer's parts
    names = [k.rsplit("/", 1)[-1] for k in _keys(s3) if k.startswith("metrics/")]
    found = [re.match(r"^(?:part-\d+-([A-Za-z0-9]+)|compact-([A-Za-z0-9]+)-\d+-\d+)\.parquet$", n) for n in names]
    assert all(found), names
    assert len({m.group(1) or m.group(2) for m in found}) == 4  # one writer id per process, never shared


def test_collector_writes_to_object_storage(s3, tmp_path):
    """`flightlog serve --store s3://...` stores what remote clients send, exactly."""
    httpx = pytest.importorskip("httpx")
    port = _moto.free_port()
    srv = subprocess.Popen([sys.executable, "-m", "flightlog.cli", "serve", "--store", s3, "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert srv.poll() is None and time.monotonic() < deadline, "collector did not start"
            time.sleep(0.1)
        code = "import flightlog as fl\nfl.init(project='c')\nfor i in range(500):\n    fl.log('x', i)\nfl.finish()\n"
        p = _script(tmp_path, code, env={"FLIGHTLOG_COLLECTOR": f"http://127.0.0.1:{port}",
                                         "FLIGHTLOG_HOME": str(tmp_path / "local")})
        assert p.returncode == 0, p.stderr
        r = httpx.post(f"http://127.0.0.1:{port}/v1/query", timeout=60,
                       json={"sql": "SELECT count(*) AS n FROM metrics WHERE name = 'x'"})
        assert r.status_code == 200, r.text
        assert "500" in r.text  # the collector's query processes read the bucket too
    finally:
        srv.terminate()
        srv.wait(10)
        srv.stderr.close()
    t = fl.query("SELECT count(*) AS n, sum(value) AS s FROM metrics WHERE name = 'x'")
    assert (t.column("n")[0].as_py(), t.column("s")[0].as_py()) == (500, float(sum(range(500))))
    assert [r["status"] for r in db.read_runs(s3).to_pylist()] == ["finished"]


def test_object_store_round_trips_run_on_plain_threads_even_at_exit(tmp_path):
    """`_each` keeps order, raises the first error after all finished, and works in an atexit handler
    (where runs usually end and concurrent.futures refuses work)."""
    import threading

    seen = []
    assert _store._each(lambda x: seen.append(threading.current_thread().name) or x * 2, list(range(20))) == \
        [x * 2 for x in range(20)]
    assert len(seen) == 20

    def boom(x):
        if x == 3:
            raise ValueError("planted")
        return x

    with pytest.raises(ValueError, match="planted"):
        _store._each(boom, list(range(10)))
    script = tmp_path / "atexit_each.py"
    script.write_text("import atexit\nfrom flightlog.collector import store\n"
                      "atexit.register(lambda: print('each', store._each(lambda x: x + 1, [1, 2, 3])))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "each [2, 3, 4]" in out.stdout, out.stderr


def _metrics_batch(run: str, start: int, n: int):
    import pyarrow as pa

    return pa.table({"run_id": [run] * n, "name": ["x"] * n, "value": [float(v) for v in range(start, start + n)],
                     "step": list(range(start, start + n))})


def _exact(s3: str, run: str, n: int) -> None:
    got = db.run_sql(f"SELECT count(*) AS n, count(DISTINCT step) AS d, sum(value) AS s FROM metrics "
                     f"WHERE run_id = '{run}'", store=s3)
    assert (got.column("n")[0].as_py(), got.column("d")[0].as_py(), got.column("s")[0].as_py()) == \
        (n, n, float(sum(range(n))))


def test_object_store_writer_merges_as_it_goes_and_ends_without_gets(s3, monkeypatch):
    """On S3 a writer merges every MERGE_PARTS parts from memory while rows stay exactly once at every
    step, replaced files wait out the grace, and the end merges from memory (no GET) into one object."""
    monkeypatch.setattr(_store, "DELETE_GRACE_SECONDS", 0.3)
    monkeypatch.setattr(_store, "_SMALL_BYTES", 0)  # parts, not a small partition rewritten at each write
    sink = _store.LocalSink(s3)
    d = _store.part_dir(s3, "metrics", "g")
    for k in range(20):
        sink.write("metrics", _metrics_batch("g", k * 10, 10))
        _exact(s3, "g", (k + 1) * 10)  # never a row twice nor a row missing, between merges too
        if k == _store.MERGE_PARTS - 1:
            names = [f.name for f in _store.visible_files(d)]
            assert len(names) == 1 and names[0].startswith("compact-"), names
            assert len([n for n in _keys(s3) if "run_id=g/" in n]) > 1  # the parts wait out the grace
    assert _store.kept_bytes() > 0
    time.sleep(0.4)
    sink.write("metrics", _metrics_batch("g", 200, 10))  # a later write deletes what the grace let go

    def no_get(*a, **k):
        raise AssertionError("the run's end fetched a part")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fs, "read_bytes", no_get)
        mp.setattr(_fs, "open_input", no_get)
        sink.compact("g")
    files = _store.visible_files(d)
    assert len(files) == 1 and files[0].name.startswith("compact-")
    assert [k for k in _keys(s3) if "run_id=g/" in k] == [f"metrics/run_id=g/{files[0].name}"]
    _exact(s3, "g", 210)
    sink.close()


def test_small_partition_is_one_object_after_every_write(s3, monkeypatch):
    """A small partition on S3 is rewritten whole at each write: one visible object at every step, rows exact,
    and the replaced objects are deleted once the grace has passed."""
    monkeypatch.setattr(_store, "DELETE_GRACE_SECONDS", 0.2)
    sink = _store.LocalSink(s3)
    d = _store.part_dir(s3, "metrics", "s")
    for k in range(6):
        sink.write("metrics", _metrics_batch("s", k * 10, 10))
        assert len(_store.visible_files(d)) == 1
        _exact(s3, "s", (k + 1) * 10)
    time.sleep(0.3)
    sink.write("metrics", _metrics_batch("s", 60, 10))
    assert len([k for k in _keys(s3) if "run_id=s/" in k]) <= 2  # the newest, and the one it just replaced
    sink.compact("s")
    assert len([k for k in _keys(s3) if "run_id=s/" in k]) == 1
    _exact(s3, "s", 70)
    sink.close()


def test_memory_bound_falls_back_to_merging_through_the_store(s3, monkeypatch):
    """Past KEEP_BYTES a writer holds nothing more in memory and the end merges through the store, exactly."""
    monkeypatch.setattr(_store, "KEEP_BYTES", _store.kept_bytes() + 3000)
    sink = _store.LocalSink(s3)
    for k in range(12):
        sink.write("metrics", _metrics_batch("b", k * 50, 50))
        assert _store.kept_bytes() <= _store.KEEP_BYTES
    assert not sink._kept[("metrics", "b")].complete
    sink.compact("b")
    d = _store.part_dir(s3, "metrics", "b")
    assert len(_store.visible_files(d)) == 1
    assert len([k for k in _keys(s3) if "run_id=b/" in k]) == 1
    _exact(s3, "b", 600)


def test_leftovers_of_a_merge_stay_hidden_and_flightlog_compact_deletes_them(s3):
    """Files a merge replaced but never deleted (a writer killed in between) are skipped by readers and
    deleted by `flightlog compact`."""
    sink = _store.LocalSink(s3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fs, "delete", lambda p: False)  # every DELETE lost, as if killed after each merge
        for k in range(2 * _store.MERGE_PARTS + 3):
            sink.write("metrics", _metrics_batch("l", k * 10, 10))
        sink.compact("l")
    n = (2 * _store.MERGE_PARTS + 3) * 10
    assert len([k for k in _keys(s3) if "run_id=l/" in k]) > 1
    _exact(s3, "l", n)
    d = _store.part_dir(s3, "metrics", "l")
    assert _store.compact_dir(d, "metrics", sink.writer) is None  # nothing to merge; the leftovers go
    assert [k for k in _keys(s3) if "run_id=l/" in k] == [f"metrics/run_id=l/{_store.visible_files(d)[0].name}"]
    _exact(s3, "l", n)


KILLED = """
import os, signal, sys, threading, time
import flightlog as fl
fl.init(project="kill")
print(fl.run_id() if hasattr(fl, "run_id") else "", flush=True)
threading.Timer(float(sys.argv[1]), lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
i = 0
while True:
    fl.log("x", i)
    i += 1
    if i % 50 == 0:
        time.sleep(0.01)
"""


@pytest.mark.parametrize("when", [1.3, 2.1])
def test_sigkill_while_merging_leaves_exactly_a_prefix(s3, tmp_path, when):
    """A run killed with SIGKILL while it merges parts as it goes reads back a prefix of what it logged:
    no row twice, none missing in between; `flightlog compact` then leaves one file with the same rows."""
    p = _script(tmp_path, KILLED, str(when), env={"FLIGHTLOG_FLUSH_INTERVAL": "0.05"})
    assert p.returncode == -9, p.stderr
    t = fl.query("SELECT count(*) AS n, count(DISTINCT value) AS d, min(value) AS lo, max(value) AS hi "
                 "FROM metrics WHERE name = 'x'")
    n, dist, lo, hi = (t.column(c)[0].as_py() for c in ("n", "d", "lo", "hi"))
    assert n > 0 and n == dist and lo == 0 and hi == n - 1
    assert any(k.rsplit("/", 1)[-1].startswith("compact-") for k in _keys(s3) if k.startswith("metrics/"))
    rid = db.read_runs(s3).column("run_id")[0].as_py()
    out = subprocess.run([sys.executable, "-m", "flightlog.cli", "compact", "--run", rid], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    t2 = fl.query("SELECT count(*) AS n, count(DISTINCT value) AS d FROM metrics WHERE name = 'x'")
    assert (t2.column("n")[0].as_py(), t2.column("d")[0].as_py()) == (n, n)
    assert len([k for k in _keys(s3) if k.startswith(f"metrics/run_id={rid}/")]) == 1


def test_last_batches_go_straight_into_the_merged_file_or_the_spool(s3):
    """Once the run finishes, a batch is written inside the partition's merged file (no part object);
    with the store unreachable it waits in the local spool as a part and is uploaded later, rows exact."""
    sink = _store.LocalSink(s3)
    for k in range(3):
        sink.write("metrics", _metrics_batch("f", k * 10, 10))
    sink.finishing()
    sink.write("metrics", _metrics_batch("f", 30, 10))
    names = [k.rsplit("/", 1)[-1] for k in _keys(s3) if "run_id=f/" in k]
    assert not any(n.startswith(f"part-00000004-") for n in names), names
    _exact(s3, "f", 40)
    with pytest.MonkeyPatch.context() as mp:
        def down(*a, **k):
            raise OSError("store unreachable (planted)")

        mp.setattr(_fs, "put", down)
        sink.write("metrics", _metrics_batch("f", 40, 10))  # neither merged nor uploaded: spooled
        sink.compact("f")  # the spool holds a part: merging waits for a later writer
    assert list(_fs.spool_dir(s3).rglob("part-*.parquet"))
    _exact(s3, "f", 40)
    _store.LocalSink(s3).close()  # the next writer of this store uploads it
    _exact(s3, "f", 50)
    sink.close()


def test_checkpoints_every_tenth_of_a_second_write_at_most_once_a_second_on_s3(s3, monkeypatch):
    """A checkpoint asks for its index row at once; on an object store such early writes come at most once per
    FORCE_GAP_REMOTE s (each is a PUT and a replaced object per table), and every row still arrives."""
    import numpy as np

    puts: list[str] = []
    real_put = _fs.put
    monkeypatch.setattr(_fs, "put", lambda p, data: (puts.append(str(p)), real_put(p, data))[1])
    run_id = fl.init(project="gap").run_id
    state = {"w": np.zeros(4)}
    t0 = time.monotonic()
    with fl.checkpointing(state=state, every=1):
        for e in fl.loop("epoch", range(25)):
            state["w"] += 1
            fl.log("loss", float(e))
            time.sleep(0.1)
    loop_s = time.monotonic() - t0
    fl.finish()
    ckpt_puts = [p for p in puts if "/checkpoints/" in p]
    # 25 checkpoints over ~2.5 s: one early write per second, the interval's own, and the end's
    assert len(ckpt_puts) <= loop_s + 4, (loop_s, ckpt_puts)
    rows = fl.query(f"SELECT count(*) AS n FROM checkpoints WHERE run_id = '{run_id}'")
    assert rows.column("n")[0].as_py() == 26  # one per epoch, and the loop's end
    assert fl.query(f"SELECT count(*) AS n FROM metrics WHERE run_id = '{run_id}' AND name = 'loss'"
                    ).column("n")[0].as_py() == 25


def test_local_store_still_writes_a_checkpoints_row_at_once(tmp_path):
    """On a local disk the early write is not held back: the index row is stored within the flush thread's poll."""
    import numpy as np

    store = str(tmp_path / "store")
    fl.init(project="gap-local", store=store, flush_interval=30)
    state = {"w": np.zeros(4)}
    with fl.checkpointing(state=state, every=1):
        for _ in fl.loop("epoch", range(1)):
            state["w"] += 1
        deadline = time.monotonic() + 10
        while not list((tmp_path / "store" / "checkpoints").rglob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((tmp_path / "store" / "checkpoints").rglob("*.parquet")), "the index row waited for the interval"
    fl.finish()
