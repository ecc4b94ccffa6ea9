"""Replay on a Ray cluster (a local 2-CPU `ray start --head`) with the store on S3 (moto): equal to local replay."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _moto  # noqa: E402
from _train_script import WNORM, script  # noqa: E402

pytest.importorskip("ray", reason="Ray is not installed (pip install 'flightlog[ray]'); scripts/setup.sh installs it")
pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a Ray cluster and torch workers

import flightlog as fl  # noqa: E402
from flightlog.replay import ray_executor, runner  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local Ray head (2 CPUs) for the module, stopped by its own process id afterwards."""
    port = _moto.free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    p = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                          "--include-dashboard=false", "--disable-usage-stats"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert p.poll() is None and time.time() < deadline, "ray head did not start"
            time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    import ray

    if ray.is_initialized():
        ray.shutdown()
    p.terminate()  # --block: the head stops the processes it started
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.wait()


@pytest.fixture(scope="module")
def s3_recorded(tmp_path_factory):
    """A digits training run recorded with checkpoints into an s3:// store on a loopback moto server."""
    proc, endpoint = _moto.start("fl-ray")
    tmp = tmp_path_factory.mktemp("rayrec")
    env = dict(os.environ, **_moto.env(endpoint), XDG_CACHE_HOME=str(tmp / "cache"),
               FLIGHTLOG_HOME=f"s3://fl-ray/s{uuid.uuid4().hex[:6]}", FLIGHTLOG_SYSTEM_METRICS="0")
    (tmp / "train.py").write_text(script())
    (tmp / "mod.py").write_text(script(epoch=WNORM))
    r = subprocess.run([sys.executable, str(tmp / "train.py")], env=env, cwd=str(tmp), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    yield {"tmp": tmp, "env": env}
    _moto.stop(proc)


def _replay(rec, monkeypatch, **kw):
    for k, v in rec["env"].items():
        if k.startswith(("AWS_", "FLIGHTLOG_", "XDG_")):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("FLIGHTLOG_REPLAY_POOL_DIR", str(rec["tmp"] / "pools"))
    return runner.run(str(rec["tmp"] / "mod.py"), run="latest", workers=2, **kw)


@pytest.fixture
def pools_stopped(s3_recorded, monkeypatch):
    """The warm pools the Ray tasks started (one per node: this machine) are stopped afterwards."""
    yield
    from flightlog.replay import pool

    monkeypatch.setenv("FLIGHTLOG_REPLAY_POOL_DIR", str(s3_recorded["tmp"] / "pools"))
    pool.stop(s3_recorded["env"]["FLIGHTLOG_HOME"])


def _values(name):
    t = fl.query(f"SELECT epoch, value FROM metrics WHERE name = '{name}' ORDER BY epoch")
    return list(zip(t.column("epoch").to_pylist(), t.column("value").to_pylist()))


def test_ray_replay_equals_local_replay(cluster, s3_recorded, monkeypatch, pools_stopped):
    """Replaying from checkpoints on S3 as Ray tasks gives the same values and fidelity as local workers.

    The tasks fork their workers from the node's warm pool (started by the first task); a second Ray
    replay reuses it, and its values are the same again.
    """
    from flightlog.replay import pool

    local = _replay(s3_recorded, monkeypatch)
    assert local.ok and local.fidelity == "exact", [s.error for s in local.segments]
    want = _values("weight_norm")
    assert len(want) == 5
    pool.stop(s3_recorded["env"]["FLIGHTLOG_HOME"])  # the local replay's pool: the tasks must start their own
    with ray_executor.options("ray", cluster):
        res = _replay(s3_recorded, monkeypatch)
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]
    assert len(res.segments) == 2 and res.compared == local.compared
    assert _values("weight_norm") == want  # bit for bit, and the earlier replay's rows were replaced
    st = pool.status(s3_recorded["env"]["FLIGHTLOG_HOME"])
    assert st is not None and st.get("forks", 0) >= 2, st  # the tasks' workers were forked by the node's pool
    with ray_executor.options("ray", cluster):
        again = _replay(s3_recorded, monkeypatch, force=True)
    assert again.ok and again.fidelity == "exact" and _values("weight_norm") == want
    assert pool.status(s3_recorded["env"]["FLIGHTLOG_HOME"])["pid"] == st["pid"]


def test_lost_ray_worker_is_retried(cluster, s3_recorded, monkeypatch, tmp_path, pools_stopped):
    """A Ray worker process killed mid-segment is retried by Ray and the replay still ends exact."""
    monkeypatch.setenv("FLIGHTLOG_REPLAY_COLD", "1")  # the worker's parent is then the Ray worker: kill that
    marker = tmp_path / "killed-once"
    kill = (f"import os\nif os.environ.get('FLIGHTLOG_REPLAY') and not os.path.exists({str(marker)!r}):\n"
            f"    open({str(marker)!r}, 'w').close(); os.kill(os.getppid(), 9); os._exit(1)\n")
    mod = s3_recorded["tmp"] / "mod.py"
    original = mod.read_text()
    mod.write_text(kill + original)
    try:
        with ray_executor.options("ray", cluster):
            res = _replay(s3_recorded, monkeypatch, force=True)
    finally:
        mod.write_text(original)
    assert marker.exists()
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]


def test_executor_errors_are_clear():
    """Unknown executors and --address without Ray are refused with a reason."""
    from flightlog._errors import ReplayError

    with pytest.raises(ReplayError, match="--executor"):
        with ray_executor.options("dask"):
            pass
    with pytest.raises(ReplayError, match="--address"):
        with ray_executor.options("local", "127.0.0.1:1"):
            pass


def test_ray_replays_a_torchrun_run_as_one_task_of_its_ranks(cluster, tmp_path, monkeypatch):
    """A 2-rank torchrun run replays on Ray as one task (2 CPUs) running both rank processes: the same rows
    and verdict as local rank groups."""
    import test_ddp_plain as plain

    store = tmp_path / "s"
    p = plain._run(plain.TORCHRUN + [plain._script(tmp_path / "old")], store, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    script = plain._script(tmp_path / "bt", batch=True)
    monkeypatch.setenv("FLIGHTLOG_REPLAY_POOL_DIR", str(tmp_path / "pools"))
    monkeypatch.setenv("FLIGHTLOG_REPLAY_COLD", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    local = runner.run(script, run="latest", store=str(store), epochs="2:4")
    assert local.ok and local.fidelity == "exact", [s.error for s in local.segments]
    want = plain._rows(store, "gnorm", "source = 'replay'")
    assert {r[0] for r in want} == {0, 1}
    with ray_executor.options("ray", cluster):
        res = runner.run(script, run="latest", store=str(store), epochs="2:4", force=True)
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]
    assert res.compared == local.compared and plain._rows(store, "gnorm", "source = 'replay'") == want
