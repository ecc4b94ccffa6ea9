"""Record mode: loop context, checkpoints, restore and crash resume."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import flightlog as fl
from flightlog import _checkpoint, _run, _warn
from flightlog.query import db

torch = pytest.importorskip("torch")

TRAIN = r'''
import os, random, signal, sys, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
import flightlog as fl

KILL_AT = int(os.environ.get("KILL_AT", "-1"))
random.seed(0); np.random.seed(0); torch.manual_seed(0)
d = load_digits()
X = torch.tensor(d.images[:600] / 16.0, dtype=torch.float32).unsqueeze(1)
y = torch.tensor(d.target[:600])
loader = DataLoader(TensorDataset(X, y), batch_size=50, shuffle=True)
net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(144, 10))
opt = torch.optim.Adam(net.parameters(), lr=fl.arg("lr", 0.01))
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
extra = np.random.default_rng(5)
with fl.checkpointing(model=net, optimizer=opt, scheduler=sched, gen=extra, every=1):
    for epoch in fl.loop("epoch", range(5)):
        for i, (xb, yb) in enumerate(fl.loop("batch", loader)):
            if epoch == KILL_AT and i == 5:
                time.sleep(1.0)  # let the previous epoch's checkpoint index reach the store
                os.kill(os.getpid(), signal.SIGKILL)
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb) + 0.0 * float(extra.random())
            loss.backward()
            opt.step()
            fl.log("loss", loss)
        sched.step()
        fl.log("lr", sched.get_last_lr()[0])
'''


def _env(store, **kw):
    return dict(os.environ, FLIGHTLOG_HOME=store, **{k: str(v) for k, v in kw.items()})


def test_loop_context_columns(store):
    """Records carry the outer index as epoch, the inner index as batch and the full context as JSON."""
    for e in fl.loop("epoch", range(2)):
        for b in fl.loop("batch", ["a", "b", "c"]):
            fl.log("x", 1.0)
        fl.log("y", 2.0)
    fl.log("z", 3.0)
    fl.finish()
    rows = fl.query("SELECT name, epoch, batch, ctx FROM metrics ORDER BY wall_time, name").to_pylist()
    xs = [(r["epoch"], r["batch"]) for r in rows if r["name"] == "x"]
    assert xs == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    ys = [r for r in rows if r["name"] == "y"]
    assert [(r["epoch"], r["batch"], r["ctx"]) for r in ys] == [(0, None, '{"epoch":0}'), (1, None, '{"epoch":1}')]
    z = [r for r in rows if r["name"] == "z"][0]
    assert z["epoch"] is None and z["ctx"] is None
    assert [r["ctx"] for r in rows if r["name"] == "x"][4] == '{"epoch":1,"batch":1}'


def test_loop_accepts_generators_and_unknown_length(store):
    """fl.loop wraps any iterable, including generators with no len, and breaks cleanly."""
    def gen():
        yield from range(10)

    seen = []
    for i in fl.loop("g", gen()):
        seen.append(i)
        if i == 6:
            break
    assert seen == list(range(7))
    assert _run.ACTIVE.loops == [] and _run.ACTIVE.ctx == (None, None, None)


def test_restore_equals_original_state(store):
    """Restored parameters, optimizer, scheduler and RNG states equal the originals bit for bit."""
    import random

    net = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    arr = np.arange(5.0)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 4)).sum().backward()
        opt.step()
        sched.step()
    r = fl.init(project="restore")
    ck = _checkpoint.Checkpointer(r, {"model": net, "opt": opt, "sched": sched, "arr": arr}, None, None)
    payload, skipped = ck.snapshot("epoch", 0)
    payload = _checkpoint.deserialize(_checkpoint.serialize(payload))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt_before = opt.state_dict()["state"][0]["exp_avg"].clone()
    lr_before = sched.get_last_lr()
    a, b, c = random.random(), np.random.rand(), torch.rand(1)
    # mutate everything
    opt.zero_grad()
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    sched.step()
    arr += 1
    _checkpoint.apply_payload(r, payload, ck.objects)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt_before)
    assert sched.get_last_lr() == lr_before
    assert arr.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == (a, b, c.item())
    assert skipped == []


def test_checkpoints_are_recorded_and_deduplicated(store):
    """Each outer iteration writes a checkpoint row; identical blobs are stored once."""
    net = torch.nn.Linear(2, 2)
    with fl.checkpointing(model=net, every=1):
        for _ in fl.loop("epoch", range(3)):
            fl.log("x", 1.0)  # the model never changes
    fl.finish()
    rows = fl.query("SELECT iteration, bytes, content_hash, copy_ms, write_ms, status FROM checkpoints "
                    "ORDER BY iteration").to_pylist()
    assert [r["iteration"] for r in rows] == [-1, 0, 1, 2]  # -1: the state before the first iteration
    assert all(r["status"] == "ok" and r["bytes"] > 0 and r["copy_ms"] >= 0 for r in rows)
    blobs = {r["content_hash"] for r in rows}
    files = [f for f in glob.glob(f"{store}/blobs/*/*") if os.path.basename(f) in blobs]
    assert len(files) == len(blobs)


def test_adaptive_period_bounds_overhead(store, monkeypatch):
    """With expensive checkpoints and short iterations the period grows to respect the bound."""
    r = fl.init(project="adaptive")
    ck = _checkpoint.Checkpointer(r, {}, None, 0.02)
    ck.cost_ms = 10.0  # a checkpoint costs 10 ms
    taken = [i for i in range(100) if ck.due(i, 50.0, False) and not setattr(ck, "since_ms", 0.0)]
    # 2% of 50 ms = 1 ms per iteration of budget: one checkpoint every 10 iterations
    assert taken[:3] == [9, 19, 29]
    ck2 = _checkpoint.Checkpointer(r, {}, None, 0.02)
    ck2.cost_ms = 1.0  # cheap: every iteration
    assert all(ck2.due(i, 100.0, False) for i in range(5))


def test_unpicklable_object_is_left_out_with_a_warning(store):
    """An object that cannot be pickled is skipped with a warning; training and other state go on."""
    import threading

    net = torch.nn.Linear(2, 2)
    with pytest.warns(_warn.FlightlogWarning, match="cannot checkpoint 'lock'"):
        with fl.checkpointing(model=net, lock=threading.Lock(), every=1):
            for _ in fl.loop("epoch", range(2)):
                fl.log("x", 1.0)
    fl.finish()
    rows = fl.query("SELECT status, error FROM checkpoints").to_pylist()
    assert len(rows) == 3 and rows[0]["status"] == "partial" and "lock" in rows[0]["error"]


@pytest.mark.filterwarnings("ignore:.*code snapshot failed")  # the same broken disk, also expected
def test_failed_checkpoint_write_keeps_training(store, monkeypatch):
    """A checkpoint write that fails warns and is never listed; training continues."""
    from flightlog.collector import blobs as _blobs

    def boom(*a, **k):
        raise PermissionError("read-only file system")

    fl.init(project="ckfail")  # the run (and its code snapshot) starts before the disk breaks
    monkeypatch.setattr(_blobs, "put_blob", boom)
    net = torch.nn.Linear(2, 2)
    with pytest.warns(_warn.FlightlogWarning, match="checkpoint write failed"):
        with fl.checkpointing(model=net, every=1):
            for e in fl.loop("epoch", range(3)):
                fl.log("x", float(e))
        fl.finish()
    assert fl.query("SELECT count(*) AS n FROM checkpoints").column("n")[0].as_py() == 0
    assert fl.query("SELECT count(*) AS n FROM metrics").column("n")[0].as_py() == 3
    assert _warn.counters["checkpoint_failed"] == 4


SLOW_CKPT = r'''
import os, time, flightlog as fl, numpy as np
from flightlog import _checkpoint
real = _checkpoint.serialize
def slow(p):
    data = real(p)
    time.sleep(0.4)
    return data
_checkpoint.serialize = slow
big = np.random.default_rng(0).random(2_000_000)
with fl.checkpointing(big=big, every=1):
    for e in fl.loop("epoch", range(100)):
        big += 1
        time.sleep(0.05)
'''


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_no_torn_checkpoint(tmp_path, store):
    """SIGKILL while checkpoints are being written: every listed checkpoint is complete and verifies."""
    from flightlog.collector import blobs as _blobs

    script = tmp_path / "slow.py"
    script.write_text(SLOW_CKPT)
    p = subprocess.Popen([sys.executable, str(script)], env=_env(store))
    deadline = time.time() + 120  # start-up (imports) is slow on a loaded machine: wait for checkpoints
    while time.time() < deadline and len(glob.glob(f"{store}/checkpoints/*/*.parquet")) < 1:
        time.sleep(0.2)
    time.sleep(1.0)  # more writes in flight
    p.send_signal(signal.SIGKILL)
    p.wait()
    rows = db.run_sql("SELECT content_hash, bytes FROM checkpoints", store=store).to_pylist()
    assert rows, "some checkpoints completed before the kill"
    for r in rows:
        data = _blobs.read_blob(store, r["content_hash"])
        assert len(data) == r["bytes"] and _checkpoint.digest(data) == r["content_hash"]
    for f in glob.glob(f"{store}/blobs/*/*"):
        name = os.path.basename(f)
        assert name.startswith(".") or _checkpoint.digest(open(f, "rb").read()) == name


def _losses(store, run):
    df = fl.dataframe("loss", run=run, store=store)
    return df


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_for_bit(tmp_path):
    """A run killed mid-epoch and resumed logs exactly the losses of an uninterrupted run."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    clean = str(tmp_path / "clean")
    crash = str(tmp_path / "crash")
    assert subprocess.run([sys.executable, str(script)], env=_env(clean), timeout=120).returncode == 0
    p = subprocess.run([sys.executable, str(script)], env=_env(crash, KILL_AT=3), timeout=120)
    assert p.returncode == -signal.SIGKILL
    st = db.run_sql("SELECT run_id, status FROM runs", store=crash).to_pylist()[0]
    assert st["status"] == "crashed"
    r = subprocess.run([sys.executable, "-m", "flightlog.cli", "resume", st["run_id"], "--store", crash, "--",
                        sys.executable, str(script)], env=_env(crash), timeout=120, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    runs = db.run_sql("SELECT run_id, kind, parent_run_id, status FROM runs ORDER BY started_at",
                      store=crash).to_pylist()
    assert [x["kind"] for x in runs] == ["train", "resume"] and runs[1]["parent_run_id"] == st["run_id"]
    a = fl.dataframe("loss", "lr", run="latest", store=clean)
    b = fl.dataframe("loss", "lr", run=runs[1]["run_id"], store=crash)
    assert len(a) == len(b) == 5 * 12 + 5
    la, lb = a["loss"].dropna().tolist(), b["loss"].dropna().tolist()
    assert la == lb and len(la) == 60  # every batch loss, epochs 0-2 from the parent, 3-4 resumed: bit-equal
    assert a.fillna(-1).drop(columns="run_id").equals(b.fillna(-1).drop(columns="run_id"))
    assert a["step"].tolist() == b["step"].tolist()


def test_registered_tensor_is_restored_in_place(store):
    """A tensor registered with fl.checkpointing gets its checkpointed data back, in place (same object)."""
    t = torch.arange(4.0)
    r = fl.init(project="tensor")
    ck = _checkpoint.Checkpointer(r, {"t": t}, None, None)
    payload, _ = ck.snapshot("epoch", 0)
    payload = _checkpoint.deserialize(_checkpoint.serialize(payload))
    t.mul_(10)
    _checkpoint.apply_payload(r, payload, ck.objects)
    assert ck.objects["t"] is t and t.tolist() == [0.0, 1.0, 2.0, 3.0]


def _loop_with_state(r, ck, restore_into=None):
    """A function whose loop carries plain values, a list, an unregistered optimizer and a scheduler-like object."""
    import cloudpickle  # noqa: F401  (capture pickles with it)

    net = ck.objects["net"]
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    lr, best, history = 1.0, 0.0, []
    frame = sys._getframe()
    for epoch in range(3):
        params = list(net.parameters())
        lr /= 2
        best = max(best, epoch * 1.5)
        history.append(epoch)
        opt.zero_grad()
        net(torch.ones(1, 2)).sum().backward()
        opt.step()
        if epoch == 1:
            from flightlog import _carried

            carried, summary = _carried.capture([("outer", frame, _FOR_LINE[0])], ck.objects)
            snap = (lr, best, list(history), opt.state_dict()["state"][0]["momentum_buffer"].clone())
    lr, best, history = 99.0, 99.0, ["x"]
    opt.zero_grad()
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    params = None
    missed = _carried.restore(carried, {"outer": frame}, ck.objects)
    assert missed == []
    assert (lr, best, history) == snap[:3]
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], snap[3])
    assert params is not None and params[0] is net[0].weight  # a reference to the model stays one
    return summary


_FOR_LINE = [0]


def test_loop_variables_are_captured_and_written_back_into_a_function_frame(store):
    """Checkpoint capture finds a loop's plain values, containers and unregistered optimizer; restore writes them
    back into the running function's locals, keeping references to registered objects."""
    import inspect

    src, start = inspect.getsourcelines(_loop_with_state)
    _FOR_LINE[0] = start + next(i for i, l in enumerate(src) if l.strip().startswith("for epoch in range(3)"))
    net = torch.nn.Sequential(torch.nn.Linear(2, 1))
    r = fl.init(project="carried")
    ck = _checkpoint.Checkpointer(r, {"net": net}, None, None)
    summary = _loop_with_state(r, ck)
    assert {"lr", "best", "history", "opt", "params", "epoch"} <= set(summary["vars"])
    assert summary["uncaptured"] == {}


def test_uncapturable_loop_variable_is_named_once(store):
    """A loop variable that cannot be pickled is named in one warning and in the checkpoint row."""
    import threading

    with pytest.warns(_warn.FlightlogWarning, match="'guard' is not saved in checkpoints"):
        with fl.checkpointing(every=1):
            for e in fl.loop("epoch", range(3)):
                guard = threading.Lock()
                fl.log("x", e)
    fl.finish()
    rows = fl.query("SELECT captured FROM checkpoints WHERE iteration >= 0").to_pylist()
    assert rows and all('"guard"' in r["captured"] and "cannot be pickled" in r["captured"] for r in rows)
    assert _warn.counters["state_not_captured:guard"] == 1


@pytest.mark.slow
def test_ctrl_c_caught_by_the_script_is_killed(tmp_path):
    """A script that catches Ctrl-C (KeyboardInterrupt) and exits is recorded as killed, not finished."""
    code = ("import os, signal, flightlog as fl\ntry:\n    for e in fl.loop('epoch', range(100)):\n"
            "        fl.log('x', e)\n        if e == 3:\n            os.kill(os.getpid(), signal.SIGINT)\n"
            "except KeyboardInterrupt:\n    print('stopped by user')\n")
    store = str(tmp_path / "s")
    (tmp_path / "ctrlc.py").write_text(code)
    # a pytest-xdist worker ignores SIGINT and children inherit that: give the script a default SIGINT
    p = subprocess.run([sys.executable, str(tmp_path / "ctrlc.py")], env=_env(store), capture_output=True,
                       text=True, timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.returncode == 0 and "stopped by user" in p.stdout
    row = db.run_sql("SELECT status, error_type FROM runs", store=store).to_pylist()[0]
    assert row == {"status": "killed", "error_type": "KeyboardInterrupt"}


def test_urgent_flush_is_not_held_back_by_the_force_gap(store, monkeypatch):
    """Early writes asked for within the force gap wait for it; an urgent one (a logging thread over the
    buffer's hard cap, memory to free) is written at once."""
    from flightlog import _config

    monkeypatch.setattr(_config, "FORCE_GAP_LOCAL", 60.0)
    r = fl.init(project="urgent", flush_interval=60)

    def parts() -> int:
        return len(glob.glob(os.path.join(store, "metrics", "*", "*.parquet")))

    def wait_for(n: int) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and parts() < n:
            time.sleep(0.02)
        return parts() >= n

    fl.log("x", 1.0)
    r.rec.request_flush()  # the first early write: nothing before it, so at once
    assert wait_for(1)
    fl.log("x", 2.0)
    r.rec.request_flush()  # within the gap: held back
    time.sleep(1.0)
    assert parts() == 1
    r.rec.request_flush(urgent=True)
    assert wait_for(2), "an urgent write waited for the force gap"
    fl.finish()
    assert fl.query("SELECT count(*) AS n FROM metrics WHERE name = 'x'").column("n")[0].as_py() == 2
