"""Shared fixtures: every test gets its own store and leaves no active run behind."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The files that take longest (measured, most first). Under pytest-xdist with --dist loadfile each file runs
# whole on one worker in the order collected, so they go first: a long file started last would leave the
# other worker idle at the end. Files not named follow, most slow tests first. Only the order changes.
LONGEST_FILES = ("test_replay.py", "test_replay_state.py", "test_ray_replay.py", "test_replay_pool.py",
                 "test_remote_mode.py", "test_integrations_lightning.py", "test_integrations_transformers.py",
                 "test_ddp.py", "test_ddp_plain.py", "test_record.py", "test_store_trust.py", "test_no_loss.py", "test_s3_store.py",
                 "test_collector_attacks.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    """In an xdist worker, order the files longest first (see LONGEST_FILES); a plain run keeps file order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    files: dict[str, list] = {}
    for it in items:
        files.setdefault(it.path.name, []).append(it)

    def cost(name: str) -> tuple:
        if name in LONGEST_FILES:
            return (0, LONGEST_FILES.index(name))
        return (1, -sum(1 for it in files[name] if it.get_closest_marker("slow")))

    items[:] = [it for name in sorted(files, key=cost) for it in files[name]]


@pytest.fixture(scope="session", autouse=True)
def _replay_pools(tmp_path_factory):
    """Warm replay pools started by tests live in a session folder and are stopped when the session ends."""
    d = str(tmp_path_factory.mktemp("replay-pools"))
    old = {k: os.environ.get(k) for k in ("FLIGHTLOG_REPLAY_POOL_DIR", "FLIGHTLOG_REPLAY_IDLE")}
    os.environ["FLIGHTLOG_REPLAY_POOL_DIR"] = d
    os.environ["FLIGHTLOG_REPLAY_IDLE"] = "120"
    yield
    import json
    import signal

    for sub in os.listdir(d):
        try:
            with open(os.path.join(d, sub, "info.json")) as fh:
                pid = int(json.load(fh)["pid"])
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")
            # a pool that exited left its pid behind for any new process (another test run's, pytest itself):
            # signal it only while it is still the pool serving this folder
            if os.fsencode(os.path.join(d, sub)) in cmd:
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Point FLIGHTLOG_HOME at a fresh directory and reset process state around each test."""
    from flightlog import _run, _warn

    store = tmp_path / "store"
    monkeypatch.setenv("FLIGHTLOG_HOME", str(store))
    monkeypatch.delenv("FLIGHTLOG_COLLECTOR", raising=False)
    monkeypatch.delenv("FLIGHTLOG_REPLAY", raising=False)
    monkeypatch.setenv("FLIGHTLOG_PROGRESS", "0")
    # CLI tables fit the terminal: one fixed width, not the one pytest (or xdist, which sets COLUMNS) runs in
    monkeypatch.setenv("COLUMNS", "100")
    # sys/... samples every 10 s would make row counts of longer tests depend on timing;
    # the tests of system metrics turn them on themselves
    monkeypatch.setenv("FLIGHTLOG_SYSTEM_METRICS", "0")
    _warn.reset()
    yield
    if _run.ACTIVE is not None:
        _run.finish()
    _run._ENDED_ONCE = False
    _warn.reset()


@pytest.fixture
def store(tmp_path):
    """The store directory this test writes to."""
    return str(tmp_path / "store")


def run_script(code: str, tmp_path, *args, env=None, timeout=120):
    """Run ``code`` as a script file in a subprocess with the test's store; returns CompletedProcess."""
    import subprocess

    script = tmp_path / "script.py"
    script.write_text(code)
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=str(tmp_path))
