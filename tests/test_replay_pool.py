"""The warm replay pool: life cycle (start, reuse, idle exit, stale, killed), worker semantics, permissions."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from flightlog.replay import pool

pytestmark = pytest.mark.timeout(300)

PLAIN = r'''
import json, os, sys
print("argv", json.dumps(sys.argv[1:]), "cwd", os.getcwd(), "x", os.environ.get("POOL_TEST_X"),
      "path0", sys.path[0] == os.path.dirname(os.path.abspath(__file__)), "main", __name__)
if len(sys.argv) > 1 and sys.argv[1] == "boom":
    raise ValueError("planted")
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
'''


@pytest.fixture
def pools(tmp_path, monkeypatch):
    """A private pool directory for the test; every pool started in it is stopped afterwards."""
    d = tmp_path / "pools"
    monkeypatch.setenv(pool.ENV_DIR, str(d))
    monkeypatch.delenv(pool.ENV_IDLE, raising=False)
    started: list[str] = []
    yield started
    for store in started:
        pool.stop(store)


def _spawn(store, script, args, tmp_path, env_extra=None, name="w"):
    env = dict(os.environ, **(env_extra or {}))
    logf = open(tmp_path / f"{name}.log", "w")
    kw = dict(env=env, cwd=str(tmp_path), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    cmd = [sys.executable, str(script), *args]
    w = pool.spawn(cmd, env, str(tmp_path), logf, store, kw) or subprocess.Popen(pool.cold_cmd(cmd), **kw)
    rc = w.wait(timeout=120)
    logf.close()
    return w, rc, (tmp_path / f"{name}.log").read_text()



def _store_and_script(tmp_path, pools, folder: str, text: str):
    """A store whose pool the fixture stops, and ``text`` as ``<folder>/s.py``."""
    store = str(tmp_path / "store")
    pools.append(store)
    script = tmp_path / folder / "s.py"
    script.parent.mkdir()
    script.write_text(text)
    return store, script

@pytest.mark.slow
def test_worker_runs_the_script_like_python_would(tmp_path, pools):
    """A forked worker sees argv, cwd, env, sys.path[0] and __main__ as `python script` would; exit status kept."""
    store, script = _store_and_script(tmp_path, pools, "plain", PLAIN)
    out = io.StringIO()
    with pool.options(out=out):
        w, rc, log = _spawn(store, script, ["a b", "3"], tmp_path, {"POOL_TEST_X": "42"})
    assert isinstance(w, pool.Worker) and w.how == "pool", out.getvalue()
    assert rc == 3
    assert f'argv ["a b", "3"] cwd {tmp_path} x 42 path0 True main __main__' in log
    assert "started a warm replay pool" in out.getvalue()
    with pool.options(out=out):
        w, rc, log = _spawn(store, script, ["boom"], tmp_path, name="boom")
    assert rc == 1 and "ValueError: planted" in log
    # the same as a cold worker
    cold = subprocess.run(pool.cold_cmd([sys.executable, str(script), "a b", "3"]), cwd=str(tmp_path),
                          env=dict(os.environ, POOL_TEST_X="42"), capture_output=True, text=True, timeout=120)
    first = _spawn(store, script, ["a b", "3"], tmp_path, {"POOL_TEST_X": "42"}, name="again")[2]
    assert cold.returncode == 3 and cold.stdout.splitlines()[0] == first.splitlines()[0]


@pytest.mark.slow
def test_reuse_idle_exit_and_status(tmp_path, pools, monkeypatch, capsys):
    """A second request reuses the pool (same pid); --status shows it; it exits after FLIGHTLOG_REPLAY_IDLE s."""
    from flightlog import cli

    monkeypatch.setenv(pool.ENV_IDLE, "2")
    store = str(tmp_path / "store")
    pools.append(store)
    script = tmp_path / "s.py"
    script.write_text(PLAIN)
    d = pool.ensure(store, str(script))
    pid = pool.read_info(d)["pid"]
    w, rc, _ = _spawn(store, script, [], tmp_path)
    assert rc == 0 and w.how == "pool"
    assert pool.read_info(d)["pid"] == pid
    assert cli.main(["replay", "--status", "--store", store]) == 0
    line = capsys.readouterr().out
    assert f"pool pid {pid}" in line and "1 workers forked" in line
    end = time.time() + 30
    while time.time() < end and pool._alive(pid):
        time.sleep(0.1)
    assert not pool._alive(pid)
    assert not os.path.exists(os.path.join(d, "sock")) and pool.read_info(d) is None
    assert cli.main(["replay", "--status", "--store", store]) == 0
    assert "no warm replay pool" in capsys.readouterr().out


@pytest.mark.slow
def test_stale_environment_and_killed_pool_are_replaced(tmp_path, pools):
    """A changed import-time environment restarts the pool; a SIGKILLed pool is detected and replaced."""
    store = str(tmp_path / "store")
    pools.append(store)
    script = tmp_path / "s.py"
    script.write_text(PLAIN)
    out = io.StringIO()
    with pool.options(out=out):
        d = pool.ensure(store, str(script), dict(os.environ))
        p1 = pool.read_info(d)["pid"]
        d = pool.ensure(store, str(script), dict(os.environ, OMP_NUM_THREADS="1"))
        p2 = pool.read_info(d)["pid"]
        assert p2 != p1 and not pool._alive(p1)
        assert "restarting the warm replay pool: the Python environment changed" in out.getvalue()
        os.kill(p2, signal.SIGKILL)
        time.sleep(0.2)
        w, rc, log = _spawn(store, script, [], tmp_path, {"OMP_NUM_THREADS": "1"})
    p3 = pool.read_info(d)["pid"]
    assert p3 not in (p1, p2) and rc == 0 and w.how == "pool" and "argv []" in log
    assert f"the pool (pid {p2}) is gone" in out.getvalue()


def test_stop_cold_and_shadowing(tmp_path, pools, capsys):
    """--stop ends the pool; --cold bypasses it; a script folder shadowing a pool module starts cold."""
    from flightlog import cli

    store = str(tmp_path / "store")
    pools.append(store)
    script = tmp_path / "s.py"
    script.write_text(PLAIN)
    with pool.options(cold=True):
        assert pool.spawn([sys.executable, str(script)], dict(os.environ), str(tmp_path),
                          open(tmp_path / "c.log", "w"), store, {}) is None
    assert pool.status(store) is None  # --cold started nothing
    d = pool.ensure(store, str(script))
    pid = pool.read_info(d)["pid"]
    (tmp_path / "json.py").write_text("raise SystemExit('the local json was imported')\n")
    out = io.StringIO()
    with pool.options(out=out):
        w, rc, log = _spawn(store, script, [], tmp_path)
    assert w.how == "cold" and "its own json" in out.getvalue()
    assert rc == 1 and "the local json was imported" in log  # what `python s.py` does too
    assert cli.main(["replay", "--stop", "--store", store]) == 0
    assert f"stopped the warm replay pool (pid {pid})" in capsys.readouterr().out
    assert not pool._alive(pid)


def test_only_the_owner_can_use_the_pool(tmp_path, monkeypatch):
    """Directories are 0o700 and checked, the socket 0o600; a peer with another uid is refused."""
    base = tmp_path / "open"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    monkeypatch.setenv(pool.ENV_DIR, str(base))
    with pytest.raises(pool.Unavailable, match="open to other users"):
        pool.pool_dir(str(tmp_path / "store"))
    out = io.StringIO()
    with pool.options(out=out):
        logf = open(tmp_path / "x.log", "w")
        assert pool.spawn([sys.executable, str(tmp_path / "s.py")], dict(os.environ), str(tmp_path), logf,
                          str(tmp_path / "store"), {}) is None
    assert "warm replay pool unavailable" in out.getvalue() and "workers start cold" in out.getvalue()
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert pool.peer_allowed(a) and not pool.peer_allowed(a, os.getuid() + 1)
    finally:
        a.close()
        b.close()
    monkeypatch.setenv(pool.ENV_DIR, str(tmp_path / "private"))
    store = str(tmp_path / "store")
    script = tmp_path / "s.py"
    script.write_text(PLAIN)
    try:
        d = pool.ensure(store, str(script))
        assert os.stat(d).st_mode & 0o777 == 0o700
        assert os.stat(os.path.dirname(d)).st_mode & 0o777 == 0o700
        assert os.stat(os.path.join(d, "sock")).st_mode & 0o777 == 0o600
    finally:
        pool.stop(store)


def test_script_imports_reads_top_level_imports(tmp_path):
    """The pool imports what the script imports at top level, not what functions import or relative imports."""
    s = tmp_path / "s.py"
    s.write_text("from __future__ import annotations\nimport numpy as np, torch.nn\nfrom sklearn.datasets import "
                 "load_digits\nfrom . import x\ntry:\n    import scipy\nexcept ImportError:\n    pass\n"
                 "def f():\n    import pandas\n")
    assert pool.script_imports(str(s)) == ["numpy", "torch.nn", "sklearn.datasets",
                                           "sklearn.datasets.load_digits", "scipy"]


@pytest.mark.slow
def test_warm_replay_is_bit_equal_to_cold_and_to_a_full_run(tmp_path, pools, monkeypatch):
    """Two replays reuse one pool (same pid); their values equal a --cold replay's and a full re-run's bit for bit."""
    pytest.importorskip("torch")
    import flightlog as fl
    import flightlog.replay as replay

    sys.path.insert(0, os.path.dirname(__file__))
    from _train_script import WNORM, script

    def run(code, store, name):
        path = tmp_path / name
        path.write_text(code)
        p = subprocess.run([sys.executable, str(path)], env=dict(os.environ, FLIGHTLOG_HOME=store),
                           capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr
        return str(path)

    store, full = str(tmp_path / "rec"), str(tmp_path / "full")
    pools.append(store)
    run(script(), store, "train.py")
    run(script(epoch=WNORM), full, "full.py")
    new = str(tmp_path / "new.py")
    (tmp_path / "new.py").write_text(script(epoch=WNORM))
    truth = fl.dataframe("weight_norm", store=full).dropna(subset=["weight_norm"])["weight_norm"].tolist()
    got, pids = [], []
    for cold in (False, False, True):
        out = io.StringIO()
        res = replay.run(new, store=store, cold=cold, out=out, progress=False)
        assert res.ok and res.fidelity == "exact", (res.plan_text, [s.error for s in res.segments])
        st = pool.status(store)
        pids.append(st and st["pid"])
        vals = fl.dataframe("weight_norm", store=store).dropna(subset=["weight_norm"])["weight_norm"].tolist()
        got.append(vals)
        if cold:
            assert "warm replay pool" not in out.getvalue()
    assert pids[0] and pids[0] == pids[1] == pids[2]
    assert got[0] == got[1] == got[2] == truth and len(truth) == 5


def test_workers_split_only_over_idle_cores(monkeypatch):
    """--workers N is used only where N cores are idle; otherwise fewer, and the reason names the load."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    stat = iter([(100, 1000), (130, 1400)])  # 30 of 400 jiffies busy over the sample: 0.3 cores
    monkeypatch.setattr(pool, "_cpu_times", lambda: next(stat))
    monkeypatch.setattr(time, "sleep", lambda s: None)
    n, why = pool.fit_workers(2)
    assert n == 2 and why.startswith("2 workers as asked: 4 of 4 cores idle (0.3 busy")
    stat = iter([(0, 1000), (320, 1400)])  # 3.2 cores busy
    n, why = pool.fit_workers(3)
    assert n == 1 and "instead of 3" in why and "only 1 of 4 cores idle (3.2 busy" in why
    # no /proc/stat: the load average
    monkeypatch.setattr(pool, "_cpu_times", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert pool.fit_workers(2)[0] == 1 and pool.fit_workers(1)[0] == 1
    assert "load average" in pool.fit_workers(2)[1]


def test_busy_cores_sees_a_busy_core_at_once():
    """A process spinning right now counts as a busy core (the load average would lag behind)."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy, how = pool.busy_cores(0.3)
        assert busy >= 0.7 and "/proc/stat" in how
    finally:
        p.kill()
        p.wait()


SESSION = r'''
import io, os, subprocess, sys, threading, time
import torch
from flightlog.replay import pool
script, tmp = sys.argv[1], sys.argv[2]

def start(name):
    logf = open(os.path.join(tmp, name + ".log"), "w")
    kw = dict(env=dict(os.environ), cwd=tmp, stdout=logf, stderr=subprocess.STDOUT)
    out = io.StringIO()
    with pool.options(out=out):
        w = pool.spawn([sys.executable, script, "x", "5"], dict(os.environ), tmp, logf, os.path.join(tmp, "store"), kw)
    rc = w.wait(60)
    print(name, w.how, rc, open(os.path.join(tmp, name + ".log")).read().split()[:2], repr(out.getvalue()))

start("single")
stop = threading.Event()
t = threading.Thread(target=stop.wait)
t.start()
start("threaded")
stop.set()
t.join()
pool.stop(os.path.join(tmp, "store"))
'''


@pytest.mark.slow
def test_a_torch_session_forks_its_workers_only_when_single_threaded(tmp_path, pools):
    """In a session that imported torch a worker forks from the session; with another thread running it says why
    and uses the pool."""
    pytest.importorskip("torch")
    script = tmp_path / "s.py"
    script.write_text(PLAIN)
    drv = tmp_path / "drv.py"
    drv.write_text(SESSION)
    p = subprocess.run([sys.executable, str(drv), str(script), str(tmp_path)], capture_output=True, text=True,
                       timeout=240, env=dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    single, threaded = p.stdout.splitlines()[-2:]
    assert single.startswith("single session 5 ['argv', '[\"x\",'] ") and "fork from this Python session" in single
    assert threaded.startswith("threaded pool 5 ") and "not forking this Python session: 1 other threads" in threaded, \
        (threaded, p.stderr)


def test_dry_run_start_up_estimate_is_measured_per_store(tmp_path, pools):
    """The estimate's start-up is the median of the store's measured warm or cold start-ups, else 1.5 s."""
    store = str(tmp_path / "store")
    assert pool.startup_estimate(store) == (pool.DEFAULT_STARTUP, "start-up not measured yet")
    with pool.options(store=store):
        pool._OPTS["how"] = {"cold"}
        for s in (4.0, 6.0, 5.0):
            pool.note_startup(store, s)
        pool._OPTS["how"] = {"cold", "warm"}  # a mixed replay measures neither
        pool.note_startup(store, 100.0)
        assert pool.startup_estimate()[0] == 5.0  # no pool running: cold
        assert "cold start-up ~5.0s (median of this store's last 3 cold replays)" in pool.startup_estimate()[1]


def test_a_stale_pid_of_another_process_is_never_signalled(tmp_path, pools):
    """A leftover info.json whose pid now belongs to an unrelated process: stop/status leave that process alone."""
    store = str(tmp_path / "store")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d = pool.pool_dir(store)
        with open(os.path.join(d, "info.json"), "w") as fh:
            json.dump({"pid": other.pid, "state": "ready", "fingerprint": "x"}, fh)
        assert pool.status(store) is None and pool.stop(store) is None
        time.sleep(0.2)
        assert other.poll() is None  # still running: not ours, not signalled
    finally:
        other.kill()
        other.wait()


LAZY = r'''
import sys
print("had colorsys", "colorsys" in sys.modules)


def main():
    import colorsys  # imported lazily, as torch imports torch._dynamo on the first optimizer
    return colorsys


main()
'''


def _wait_for(cond, secs=30.0):
    end = time.time() + secs
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_the_pool_learns_what_workers_import_lazily(tmp_path, pools):
    """A module the script imports inside a function is imported by the pool afterwards: the next fork has it."""
    store, script = _store_and_script(tmp_path, pools, "lazy", LAZY)
    d = pool.ensure(store, str(script))
    pid = pool.read_info(d)["pid"]
    w, rc, log = _spawn(store, script, [], tmp_path, name="w1")
    assert rc == 0 and w.how == "pool" and "had colorsys False" in log

    def learned():
        try:
            with open(os.path.join(d, "learned.json")) as fh:
                return "colorsys" in json.load(fh)["modules"]
        except (OSError, ValueError, KeyError):
            return False

    assert _wait_for(learned)
    assert _wait_for(lambda: (pool.read_info(d) or {}).get("learned", 0) >= 1)
    assert "(learned)" in pool.describe_status(store)
    w, rc, log = _spawn(store, script, [], tmp_path, name="w2")
    assert rc == 0 and w.how == "pool" and "had colorsys True" in log
    assert pool.read_info(d)["pid"] == pid
    # a new pool (here: after --stop) starts with what its predecessor learned
    pool.stop(store)
    d = pool.ensure(store, str(script))
    assert pool.read_info(d)["pid"] != pid
    w, rc, log = _spawn(store, script, [], tmp_path, name="w3")
    assert rc == 0 and w.how == "pool" and "had colorsys True" in log


THREADED = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
from flightlog.replay import pool
d, fp = sys.argv[2], "fp-test"
srv = pool._Server(d, fp, 60.0, [], d)
srv.pending = ["starts_a_thread"]
srv.learn()
print(json.dumps({"stop": srv.stop, "learned": pool._read_learned(d, fp), "state": pool.read_info(d)["state"]}))
srv2 = pool._Server(d, fp, 60.0, [], d)
srv2.pending = ["starts_a_thread"]
before = "starts_a_thread" in sys.modules
sys.modules.pop("starts_a_thread", None)
srv2.learn()
print(json.dumps({"again": "starts_a_thread" in sys.modules, "before": before}))
'''


def test_a_learned_import_that_starts_a_thread_is_never_learned(tmp_path):
    """Forking after a thread started is unsafe: the pool exits and marks the module unsafe for its successors."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "starts_a_thread.py").write_text("import threading, time\n"
                                             "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n")
    d = tmp_path / "pooldir"
    d.mkdir(mode=0o700)
    script = tmp_path / "t.py"
    script.write_text(THREADED)
    p = subprocess.run([sys.executable, str(script), str(mods), str(d)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    first, second = (json.loads(x) for x in p.stdout.strip().splitlines()[-2:])
    assert first["stop"] is True and first["state"] == "stale"
    assert first["learned"]["unsafe"] == ["starts_a_thread"] and first["learned"]["modules"] == []
    assert second == {"again": False, "before": True}


def test_workers_report_only_installed_modules(tmp_path, monkeypatch):
    """A module of the script's folder is never reported: the pool could not import it the same way."""
    (tmp_path / "mylocal_mod_x.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    import colorsys  # noqa: F401  (may be imported already by another test: then it is not new)
    import mylocal_mod_x  # noqa: F401

    got = pool.learnable(before)
    assert "mylocal_mod_x" not in got
    assert ("colorsys" in got) == ("colorsys" not in before)
    sys.modules.pop("mylocal_mod_x", None)


def test_workers_at_once_never_hold_more_torch_threads_than_cores(monkeypatch):
    """2 workers of a run recorded with 2 torch threads on 2 cores run one at a time (their OpenMP threads fought)."""
    from flightlog.replay import runner

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert runner._slots(2, [2, 2]) == 1
    assert runner._slots(2, [1, 1]) == 2
    assert runner._slots(3, [None]) == 2  # no thread count recorded: one each
    assert runner._slots(1, [4]) == 1  # never zero
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert runner._slots(3, [2, 2, 2]) == 3
