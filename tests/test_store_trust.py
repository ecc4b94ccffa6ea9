"""Issue 11: read-only SQL that cannot write, readers that survive hostile rows, the store as a trust boundary.

Every attack here is performed for real (the CLI's ``flightlog sql``, ``fl.query``, and ``POST /v1/query``
on a uvicorn collector on loopback) and checked by its outcome: refused with a clear error, and not one
byte changed inside the store or in a directory outside it. The module counts the attacks it performs and
how many were refused (printed at the end of the module, ``-s`` shows it).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import socket
import stat
import threading
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flightlog as fl
from flightlog import cli
from flightlog._errors import FlightlogError, ReplayError, StoreError
from flightlog.collector import blobs as _blobs
from flightlog.collector import client as fl_client
from flightlog.collector import schema
from flightlog.collector import store as _store
from flightlog.collector.server import ServerThread
from flightlog.query import db

TOKEN = "trust-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ARROW = {"Content-Type": fl_client.ARROW_STREAM, **AUTH}

ATTACKS = {"performed": 0, "refused": 0}


@pytest.fixture(scope="module", autouse=True)
def _report():
    """Print how many attacks this module performed and how many were refused."""
    yield
    print(f"\n[issue 11] attacks performed: {ATTACKS['performed']}, refused: {ATTACKS['refused']}")


@pytest.fixture(autouse=True)
def _replay_step_env():
    """replay-step (run in-process here) sets FLIGHTLOG_DISABLED for its process: undo it after each test."""
    from flightlog import _config

    was = os.environ.get(_config.ENV_DISABLED)
    yield
    if was is None:
        os.environ.pop(_config.ENV_DISABLED, None)
    else:
        os.environ[_config.ENV_DISABLED] = was


def _count(refused: bool) -> None:
    ATTACKS["performed"] += 1
    ATTACKS["refused"] += bool(refused)


def _tree(*roots: str) -> dict[str, str]:
    """Path -> sha256 (files) or 'dir' of every entry under ``roots``: what must not change."""
    out = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            out[dirpath] = "dir"
            for f in files:
                p = os.path.join(dirpath, f)
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def victim(tmp_path, store):
    """A real run (metrics, a checkpoint and its blob), plus an outside folder holding an import_database dump."""
    fl.init(project="victim", name="v")
    state = {"w": np.arange(8.0)}
    with fl.checkpointing(state=state, every=1):
        for epoch in fl.loop("epoch", range(2)):
            state["w"] += 1
            fl.log("loss", 1.0 / (epoch + 1))
    fl.finish()
    outside = tmp_path / "outside"
    dump = outside / "dump"
    dump.mkdir(parents=True)
    # what PRAGMA import_database / IMPORT DATABASE would execute: it writes a file when run
    (dump / "schema.sql").write_text("CREATE TABLE pwn(a INTEGER);\n")
    (dump / "load.sql").write_text(f"COPY (SELECT 42 AS a) TO '{outside}/pwned.csv';\n")
    part = sorted(str(p) for p in (tmp_path / "store" / "checkpoints").rglob("*.parquet"))[0]
    blob = sorted(str(p) for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file())[0]
    run_dir = os.path.dirname(part)
    return {"store": store, "outside": str(outside), "part": part, "blob": blob, "run_dir": run_dir,
            "cwd": str(tmp_path)}


def _attacks(v: dict) -> list[str]:
    s, o, part, blob, rd = v["store"], v["outside"], v["part"], v["blob"], v["run_dir"]
    return [
        # the reported holes: EXPLAIN ANALYZE of a write, and PRAGMA import_database
        f"EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{rd}/part-99999999-evil.parquet'",
        f"EXPLAIN ANALYZE COPY (SELECT * FROM checkpoints) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",
        f"EXPLAIN ANALYZE COPY (SELECT 'x' AS a) TO '{blob}' (FORMAT csv, HEADER false, USE_TMP_FILE false)",
        f"EXPLAIN ANALYZE COPY (SELECT 1 AS run_id) TO '{s}/runs' (FORMAT parquet, PARTITION_BY (run_id), OVERWRITE)",
        f"EXPLAIN COPY (SELECT 1 AS a) TO '{o}/explain.csv'",
        f"/* hi */ explain /* x */ analyze\n-- y\n COPY (SELECT 1) TO '{o}/commented.csv'",
        f"EXPLAIN (FORMAT json) COPY (SELECT 1) TO '{o}/fmt.csv'",
        f"EXPLAIN ANALYZE EXPORT DATABASE '{o}/exp-explained'",
        f"PRAGMA import_database('{o}/dump')",
        f"IMPORT DATABASE '{o}/dump'",
        f"EXPORT DATABASE '{s}/export'",
        f"EXPORT DATABASE '{o}/export'",
        f"COPY metrics TO '{s}/metrics' (FORMAT parquet, PARTITION_BY (run_id), OVERWRITE)",
        f"COPY (SELECT 1 AS a) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",
        f"COPY (SELECT 1 AS a) TO '{o}/copy.csv'",
        f"COPY checkpoints FROM '{o}/dump/load.sql'",
        f"PRAGMA profiling_output='{o}/profile.json'",
        "PRAGMA enable_profiling",
        "PRAGMA version",
        "CALL checkpoint()",
        "CALL pragma_version()",
        f"ATTACH '{s}/evil.db' AS evil",
        f"ATTACH '{o}/evil.db' AS evil",
        "SET enable_external_access=true",
        "SET allowed_directories=['/']",
        f"SET temp_directory='{o}/spill'",
        "RESET ALL",
        "INSTALL httpfs",
        f"LOAD '{o}/evil.duckdb_extension'",
        "CREATE TABLE t AS SELECT 1 AS a",
        "CREATE OR REPLACE VIEW metrics AS SELECT 1 AS a",
        "CREATE SECRET (TYPE s3, KEY_ID 'a', SECRET 'b')",
        "DROP VIEW metrics",
        "DELETE FROM runs",
        "UPDATE runs SET status = 'forged'",
        "INSERT INTO runs (run_id) VALUES ('forged')",
        "CHECKPOINT",
        "VACUUM",
        f"SELECT 1; COPY (SELECT 1) TO '{o}/multi.csv'",
        f"SELECT count(*) FROM metrics; SELECT * FROM read_text('/etc/passwd')",
        f"SELECT * FROM query('COPY (SELECT 1) TO ''{o}/nested.csv''')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_csv('/etc/passwd', sep=':')",
        f"SELECT * FROM read_blob('{blob}')",
        f"SELECT * FROM glob('{s}/**')",
        f"SELECT * FROM read_parquet('{o}/../store/checkpoints/**/*.parquet')",
        "EXPLAIN ANALYZE SELECT * FROM read_text('/etc/hostname')",
    ]


def _check_unchanged(v: dict, before: dict) -> None:
    assert _tree(v["store"], v["outside"]) == before, "a refused statement changed files"
    assert not os.path.exists(os.path.join(v["outside"], "pwned.csv"))
    assert not any(n.startswith(".tmp") for n in os.listdir(v["cwd"])), "DuckDB spilled into the working folder"


@pytest.mark.slow
def test_sql_attacks_via_cli_are_refused(victim, capsys, monkeypatch):
    """`flightlog sql` refuses every writing/escaping statement with a one-line error (exit 2); no file changes."""
    monkeypatch.chdir(victim["cwd"])
    before = _tree(victim["store"], victim["outside"])
    for sql in _attacks(victim):
        rc = cli.main(["sql", sql, "--store", victim["store"]])
        err = capsys.readouterr().err.strip()
        ok = rc == 2 and err.startswith("flightlog: error:") and len(err.splitlines()) == 1
        _count(ok)
        assert ok, (sql, rc, err)
    _check_unchanged(victim, before)
    assert cli.main(["sql", "SELECT count(*) AS n FROM metrics", "--store", victim["store"], "--format", "json"]) == 0
    assert '"n": 2' in capsys.readouterr().out


@pytest.mark.slow
def test_sql_attacks_via_fl_query_are_refused(victim, monkeypatch):
    """fl.query raises a FlightlogError for every attack and changes nothing; multi-statement input says so."""
    monkeypatch.chdir(victim["cwd"])
    before = _tree(victim["store"], victim["outside"])
    for sql in _attacks(victim):
        with pytest.raises(FlightlogError) as ei:
            fl.query(sql, store=victim["store"])
        _count(True)
        assert "\n" not in str(ei.value)
    _check_unchanged(victim, before)
    with pytest.raises(FlightlogError, match="only one statement"):
        fl.query("SELECT 1; SELECT 2", store=victim["store"])
    assert fl.query("SELECT count(*) AS n FROM metrics", store=victim["store"]).column("n").to_pylist() == [2]


@pytest.mark.slow
def test_sql_attacks_via_server_are_refused(victim):
    """POST /v1/query answers 4xx with a reason for every attack; nothing changes; the server stays healthy."""
    before = _tree(victim["store"], victim["outside"])
    # the time limit only bounds the one real query at the end; CI runs this next to DDP training
    with ServerThread(victim["store"], token=TOKEN, query_timeout=60) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=90) as c:
            for sql in _attacks(victim):
                r = c.post("/v1/query", json={"sql": sql})
                ok = 400 <= r.status_code < 500 and bool(r.json().get("detail"))
                _count(ok)
                assert ok, (sql, r.status_code, r.text)
            assert c.get("/healthz").json()["status"] == "ok"
            r = c.post("/v1/query", json={"sql": "SELECT count(*) AS n FROM metrics"})
            assert r.status_code == 200, (r.status_code, r.text)
            assert r.json()["rows"] == [{"n": 2}]
    _check_unchanged(victim, before)


def test_connection_itself_cannot_write(victim, monkeypatch):
    """Bypassing the statement check, the sandboxed connection still cannot create, overwrite or delete a file."""
    monkeypatch.chdir(victim["cwd"])
    before = _tree(victim["store"], victim["outside"])
    o, part, blob = victim["outside"], victim["part"], victim["blob"]
    raw = [
        f"COPY (SELECT 1 AS a) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",
        f"COPY (SELECT 1 AS a) TO 'flightlog://{part}' (FORMAT parquet, USE_TMP_FILE false)",
        f"COPY (SELECT 'x') TO 'flightlog://{blob}' (FORMAT csv, USE_TMP_FILE false)",
        f"COPY (SELECT 1 AS a) TO '{victim['run_dir']}/new.parquet'",
        f"COPY (SELECT 1 AS a) TO 'flightlog://{victim['run_dir']}/new.parquet'",
        f"COPY (SELECT 1 AS a) TO '{o}/raw.csv'",
        f"PRAGMA import_database('{o}/dump')",
        f"EXPORT DATABASE '{o}/raw-export'",
        f"ATTACH '{o}/raw.db' AS r",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_blob('flightlog:///etc/passwd')",
        "SELECT * FROM glob('flightlog:///etc/*')",
        "SET enable_external_access=true",
        "SET disabled_filesystems=''",
        f"SET temp_directory='{o}/spill'",
        "INSTALL httpfs",
    ]
    con = db.connect(victim["store"])
    try:
        for sql in raw:
            with pytest.raises(Exception):
                con.execute(sql).fetchall()
            _count(True)
        assert con.execute("SELECT count(*) FROM metrics").fetchone()[0] == 2
    finally:
        con.close()
    _check_unchanged(victim, before)


# -- item 3: one bad row cannot take readers down --------------------------------------------

MAXI, MINI = 2**63 - 1, -(2**63)


def _runs_row(**kw) -> dict:
    r = {f.name: None for f in schema.RUNS}
    r.update(project="victim", kind="train", status="running", host=socket.gethostname())
    r.update(kw)
    return r


def _hostile_runs() -> pa.Table:
    rows = [
        _runs_row(run_id="huge-pid", pid=2**62, started_at=1_700_000_000_000_000),
        _runs_row(run_id="neg-pid", pid=-1),
        _runs_row(run_id="min-pid", pid=MINI),
        _runs_row(run_id="max-ts", pid=1, started_at=MAXI, updated_at=MAXI, ended_at=MAXI),
        _runs_row(run_id="min-ts", started_at=MINI + 1, updated_at=MINI + 1),
        _runs_row(run_id="bad-json", status="finished", params="{not json", argv="5", counters="[1,2"),
        _runs_row(run_id="wrong-types", status="failed", params="[1]", argv='{"a": 1}', counters='"x"'),
        _runs_row(run_id="absurd", name="\x00\x1b[31m" + "y" * 100_000, status="\u202e", pid=0),
    ]
    return pa.Table.from_pylist(rows, schema=schema.RUNS)


def _hostile_metrics() -> pa.Table:
    return pa.table({
        "run_id": ["huge-pid"] * 4, "name": ["loss"] * 4,
        "value": [float("nan"), float("inf"), 1e308, -1e308],
        "step": [MAXI, MINI, 0, 1], "epoch": [MAXI, MINI, None, 0],
        "ctx": ["{bad", "[]", None, '{"epoch": "x"}'],
        "wall_time": pa.array([MAXI, MINI, 0, None], schema.TS),
    })


@pytest.mark.slow
def test_hostile_rows_do_not_take_readers_down(store, capsys):
    """Hostile runs/metrics rows (huge/negative pid, out-of-range times, bad JSON, absurd strings), ingested over
    HTTP and written as a Parquet part, leave every reader working; bad values read as unknown."""
    fl.init(project="victim", name="good", params={"lr": 0.1})
    fl.log("loss", 0.5)
    fl.finish()
    with ServerThread(store, token=TOKEN) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            for table, data, batch in (("runs", _hostile_runs(), "hostile-1"), ("metrics", _hostile_metrics(), "hostile-2")):
                r = c.post(f"/v1/ingest/{table}", content=fl_client.encode(data),
                           headers={**ARROW, "X-Flightlog-Batch": batch})
                assert r.status_code == 200, r.text
            # a part written straight into the store: a run id no partition can have, pid past any pid_max
            d = os.path.join(store, "runs", "run_id=direct")
            os.makedirs(d)
            pq.write_table(pa.Table.from_pylist([_runs_row(run_id="../../etc", pid=2**40, updated_at=MAXI),
                                                 _runs_row(run_id=None, started_at=4_000_000_000_000_000)],
                                                schema=schema.RUNS), os.path.join(d, "part-00000001-zz.parquet"))
            for sql in ("SELECT * FROM runs", "SELECT * FROM metrics", "SELECT run_id, status, pid FROM runs"):
                r = c.post("/v1/query", json={"sql": sql})
                assert r.status_code == 200, (sql, r.text)
            r = c.get("/v1/runs")
            assert r.status_code == 200, r.text
            by_id = {x["run_id"]: x for x in r.json()}
            assert by_id["huge-pid"]["status"] == "running"  # pid unknown, no heartbeat: not declared dead
            assert by_id["max-ts"]["started_at"] is None and by_id["max-ts"]["updated_at"] is None
            assert c.get("/healthz").json()["status"] == "ok"
    runs = db.read_runs(store).to_pylist()
    # the planted rows are run "direct": a row's run is its folder, whatever its run_id column says
    assert {"huge-pid", "neg-pid", "min-pid", "max-ts", "min-ts", "bad-json", "wrong-types", "absurd",
            "direct"} <= {x["run_id"] for x in runs}
    t = fl.query("SELECT run_id, started_at FROM runs WHERE run_id IN ('max-ts', 'min-ts')", store=store)
    assert t.column("started_at").to_pylist() == [None, None]
    for args in (["runs"], ["show"], ["show", "huge-pid"], ["show", "bad-json"], ["show", "wrong-types"], ["show", "max-ts"],
                 ["show", "absurd"], ["sql", "SELECT * FROM runs"], ["sql", "SELECT * FROM metrics", "--format", "json"],
                 ["sql", "SELECT * FROM runs", "--format", "csv"], ["runs", "--format", "json"]):
        assert cli.main([*args, "--store", store]) == 0, args
    out = capsys.readouterr().out
    assert "(unreadable: not JSON)" in out and "(unreadable: a JSON list, not a dict)" in out
    for run in ("huge-pid", "latest"):
        assert cli.main(["health", "--run", run, "--store", store]) in (0, 1)
    assert "Traceback" not in capsys.readouterr().err
    good = fl.query("SELECT count(*) AS n FROM metrics m JOIN runs r USING (run_id) WHERE r.name = 'good'",
                    store=store)
    assert good.column("n").to_pylist() == [1]  # earlier data intact and countable


def test_pid_liveness_never_raises():
    """A stored pid that cannot be a process (huge, negative, zero, not an int) is unknown, not an error."""
    for pid in (2**62, 2**31, -1, -(2**63), 0, None, "12", 1.5, True):
        assert db._pid_alive(pid) is None
    assert db._pid_alive(os.getpid()) is True


# -- item 6: the store is a trust boundary ------------------------------------------------------

@fl.step(capture="full", name="double")
def _double(x):
    return x * 2


def _recorded_call(store: str) -> tuple[str, str]:
    """(span id, input blob digest) of one recorded @fl.step call with a captured input."""
    fl.init(project="steps")
    _double(np.arange(4.0))
    fl.finish()
    t = fl.query("SELECT span_id, payload FROM io WHERE direction = 'input' AND payload IS NOT NULL", store=store)
    span, payload = t.to_pylist()[0]["span_id"], t.to_pylist()[0]["payload"]
    return span, payload.partition(":")[2]


def test_replay_step_refuses_a_tampered_input_blob(store, capsys):
    """replay-step verifies the input blob's digest before unpickling; a tampered blob is named in the error."""
    span, digest = _recorded_call(store)
    path = _blobs.blob_path(store, digest)
    with open(path, "wb") as fh:
        fh.write(pickle.dumps(np.arange(4.0) + 1))  # a valid pickle, different content
    rc = cli.main(["replay-step", span, "--store", store])
    err = capsys.readouterr().err
    _count(rc == 2 and digest in err)
    assert rc == 2 and digest in err and "tampered" in err, err
    with pytest.raises(_blobs.BlobError, match=digest):
        _blobs.read_blob(store, digest)


class _Marker:
    """Unpickling this creates a file: proof that a pickle from outside the store was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_blob_references_never_leave_the_store(store, tmp_path, capsys):
    """io.payload 'cloudpickle:../x' and friends are refused before anything is read; so is a planted symlink."""
    span, digest = _recorded_call(store)
    marker = tmp_path / "executed"
    evil = pickle.dumps(_Marker(str(marker)))
    (tmp_path / "x").write_bytes(evil)  # <store>/blobs/../../x resolves here
    (tmp_path / "store" / "x").write_bytes(evil)
    sink = _store.LocalSink(store)
    refs = ["cloudpickle:../x", "cloudpickle:../../x", "cloudpickle:/etc/passwd", f"cloudpickle:{digest[:30]}/../..",
            "cloudpickle:" + "A" * 32, "cloudpickle:", "../x"]
    for i, ref in enumerate(refs):
        fake = f"{i + 1:016x}"
        sink.write("spans", pa.table({"run_id": ["evil"], "span_id": [fake], "name": ["double"], "status": ["error"],
                                      "attributes": ['{"code.namespace": "os", "code.function.name": "getcwd"}']}))
        sink.write("io", pa.table({"run_id": ["evil"], "span_id": [fake], "direction": ["input"], "arg": ["x"],
                                   "payload": [ref]}))
        rc = cli.main(["replay-step", fake, "--store", store])
        err = capsys.readouterr().err
        _count(rc == 2 and not marker.exists())
        assert rc == 2 and err.startswith("flightlog: error:") and not marker.exists(), (ref, err)
    # a blob file that is a symlink to a file outside the store
    planted = "ab" + "0" * 30
    p = _blobs.blob_path(store, planted)
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(tmp_path / "x", p)
    with pytest.raises(_blobs.BlobError, match="outside the store"):
        _blobs.read_blob(store, planted)
    _count(True)
    # the planner's chunked check says no to the same blob, even when its content hashes to the name
    os.unlink(p)
    outside = tmp_path / "outside-blob"
    outside.write_bytes(b"checkpoint bytes")
    named = _blobs.blob_digest(b"checkpoint bytes")
    q = _blobs.blob_path(store, named)
    q.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, q)
    assert not _blobs.verify_blob(store, named)
    _count(True)
    for bad in ("../x", "", None, "0" * 31, "g" * 32, "0" * 32 + "/../../x"):
        with pytest.raises(_blobs.BlobError):
            _blobs.blob_path(store, bad)
        assert not _blobs.verify_blob(store, bad)
        _count(True)
    assert not marker.exists()


def test_tampered_checkpoint_is_refused(store):
    """Loading a checkpoint whose blob was altered raises StoreError naming the blob, before unpickling."""
    from flightlog import _checkpoint

    fl.init(project="ck")
    state = {"w": np.zeros(3)}
    with fl.checkpointing(state=state, every=1):
        for _ in fl.loop("epoch", range(1)):
            state["w"] += 1
    fl.finish()
    h = fl.query("SELECT content_hash FROM checkpoints", store=store).column("content_hash")[0].as_py()
    p = _blobs.blob_path(store, h)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=h):
        _checkpoint.load(store, h)
    _count(True)


def test_snapshot_manifest_cannot_name_files_outside(store):
    """A code-snapshot manifest naming '../' paths is refused (replay would write/read outside its folder)."""
    from flightlog import _snapshot

    for rel in ("../escape.py", "/etc/passwd", "a/../../b.py"):
        body = _snapshot.json.dumps({"root": "/tmp", "script": "main.py", "files": {rel: "0" * 32}}).encode()
        d = _blobs.blob_digest(body)
        _blobs.put_blob(store, d, body)
        with pytest.raises(StoreError, match="outside its root"):
            _snapshot.load(store, d)
        _count(True)


def test_fresh_store_is_owner_only(tmp_path, monkeypatch):
    """A store created under umask 022 has 0o700 folders and 0o600 files (parts, blobs, heartbeats, compacts)."""
    root = tmp_path / "private" / "store"
    old = os.umask(0o022)
    try:
        fl.init(project="perm", store=str(root))
        state = {"w": np.zeros(3)}
        with fl.checkpointing(state=state, every=1):
            for _ in fl.loop("epoch", range(2)):
                fl.log("loss", 1.0)
        fl.finish()
        _store.write_bytes_atomic(root / "spool" / "b.arrows", b"x")
    finally:
        os.umask(old)
    dirs = files = 0
    for dirpath, dnames, fnames in os.walk(tmp_path / "private"):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        dirs += 1
        for f in fnames:
            p = os.path.join(dirpath, f)
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
            files += 1
    assert dirs >= 5 and files >= 4


# -- item 7: readers see the parts or the compacted file, never neither -----------------------

@pytest.mark.slow
def test_queries_racing_compaction_never_fail(store):
    """Queries, read_runs and /v1/query running while a writer keeps compacting its parts all succeed and see
    a whole number of batches (no rows lost or doubled)."""
    rid = "race"
    sink = _store.LocalSink(store)
    n_rows = 50
    batch = pa.table({"run_id": [rid] * n_rows, "name": ["loss"] * n_rows, "value": [1.0] * n_rows,
                      "step": list(range(n_rows))})
    sink.write("metrics", batch)
    sink.write("runs", pa.Table.from_pylist([_runs_row(run_id=rid, status="finished", pid=None)],
                                            schema=schema.RUNS))
    written = [1]
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            while not stop.is_set():
                sink.write("metrics", batch)
                written[0] += 1
                sink.write("runs", pa.Table.from_pylist([_runs_row(run_id=rid, status="finished", pid=None)],
                                                        schema=schema.RUNS))
                sink.compact(rid)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    seen = []
    try:
        # the query processes' memory cap is not what this test is about (a store of thousands of
        # compacted files can pass the default 1 GiB data-segment cap on a fast machine)
        with ServerThread(store, token=TOKEN, query_memory=8 << 30) as srv:
            with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
                deadline = time.monotonic() + 2.5
                i = 0
                while time.monotonic() < deadline or i < 40:
                    lo = written[0]
                    if i % 4 == 3:
                        r = c.post("/v1/query", json={"sql": "SELECT count(*) AS n FROM metrics"})
                        assert r.status_code == 200, r.text
                        n = r.json()["rows"][0]["n"]
                    elif i % 4 == 2:
                        assert [x["run_id"] for x in db.read_runs(store).to_pylist()] == [rid]
                        n = lo * n_rows
                    else:
                        n = fl.query("SELECT count(*) AS n FROM metrics", store=store).column("n")[0].as_py()
                    hi = written[0]
                    assert n % n_rows == 0 and lo * n_rows <= n <= (hi + 1) * n_rows, (lo, n, hi)
                    seen.append(n)
                    i += 1
    finally:
        stop.set()
        th.join(10)
    assert not errors, errors
    assert len(seen) >= 40 and written[0] > 5
