"""Replay and resume with state outside fl.checkpointing, on real torch (digits): exact or refused, never wrong."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

import flightlog as fl
from flightlog.query import db
from flightlog.replay import runner

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(__file__))
from _state_script import AFTER_LOOP, EPOCH, IN_BATCH, TICKS, state_script  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # several torch processes each

NAMES = ["avg", "lr_plain", "best", "bad", "sched_lr", "ema", "momentum", "running"]


def _run(code: str, store: str, cwd, name: str, env=None):
    cwd.mkdir(parents=True, exist_ok=True)
    path = cwd / name
    path.write_text(code)
    e = dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0", **(env or {}))
    p = subprocess.run([sys.executable, str(path)], env=e, capture_output=True, text=True, timeout=600,
                       cwd=str(cwd))
    return path, p


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    """A recorded run of the state script and a full run of it with every new statement (the truth)."""
    tmp = tmp_path_factory.mktemp("state")
    store = str(tmp / "store")
    _, p = _run(state_script(), store, tmp / "rec", "train.py")
    assert p.returncode == 0, p.stderr
    pristine = str(tmp / "pristine")  # the uninterrupted recorded run before any replay adds to its store
    shutil.copytree(store, pristine)
    full = str(tmp / "full_store")
    _, p = _run(state_script(epoch=EPOCH, after_loop=AFTER_LOOP, in_batch=IN_BATCH), full, tmp / "full", "train.py")
    assert p.returncode == 0, p.stderr
    truth = fl.dataframe(*NAMES, "w_norm", "acc", store=full)
    return {"tmp": tmp, "store": store, "truth": truth, "best": _md5(tmp / "rec" / "best.pt"), "pristine": pristine}


def _same(store, truth, name, epochs=None):
    got = fl.dataframe(name, store=store).dropna(subset=[name])
    want = truth.dropna(subset=[name])
    if epochs is not None:
        got = got[got.epoch.isin(epochs)]
        want = want[want.epoch.isin(epochs)]
    assert len(got) == len(want) > 0, name
    assert got[name].tolist() == want[name].tolist(), name  # bit for bit
    assert got["step"].tolist() == want["step"].tolist(), name
    assert got["batch"].fillna(-1).tolist() == want["batch"].fillna(-1).tolist(), name


@pytest.mark.parametrize("workers", [1, 2])
def test_loop_carried_state_replays_exactly(rec, workers):
    """Plain values, a running max, an early-stopping counter, an unregistered scheduler and optimizer, a
    registered tensor, a function's accumulator and early stopping replay bit for bit; files go to scratch."""
    mod = rec["tmp"] / "rec" / f"new{workers}.py"
    mod.write_text(state_script(epoch=EPOCH, after_loop=AFTER_LOOP))
    res = runner.run(str(mod), run="latest", store=rec["store"], workers=workers)
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]
    assert res.verified == len(NAMES)  # one epoch of every new name re-executed in full and matched
    for name in NAMES:
        _same(rec["store"], rec["truth"], name)
    # the script's torch.save ran in the workers, but the user's file is the recorded run's
    assert _md5(rec["tmp"] / "rec" / "best.pt") == rec["best"]
    assert any(a.endswith("best.pt") and b.startswith(res.scratch) for a, b in res.files)


def test_epoch_range_with_two_workers(rec):
    """--epochs 2:4 replays only epochs 2 and 3, equal to the full run's values there."""
    mod = rec["tmp"] / "rec" / "range.py"
    mod.write_text(state_script(epoch='fl.log("lr_range", lr)\nfl.log("best_range", best)',
                                after_loop='fl.log("running_range", running)'))
    res = runner.run(str(mod), run="latest", store=rec["store"], workers=2, epochs="2:4")
    assert res.ok and res.fidelity == "exact"
    for new, old in (("lr_range", "lr_plain"), ("best_range", "best"), ("running_range", "running")):
        got = fl.dataframe(new, store=rec["store"]).dropna(subset=[new])
        want = rec["truth"].dropna(subset=[old])
        want = want[want.epoch.isin([2, 3])]
        assert got[new].tolist() == want[old].tolist() and got["epoch"].tolist() == [2, 3]


def test_batch_loop_inside_a_function_is_replayed_at_batch_level(rec):
    """A new statement in the batch loop of train() (called from the epoch loop) gets every batch's value."""
    mod = rec["tmp"] / "rec" / "batch.py"
    mod.write_text(state_script(in_batch=IN_BATCH))
    dry = runner.run(str(mod), run="latest", store=rec["store"], dry_run=True)
    assert "[batch, loops: epoch > batch]" in dry.plan_text and "train()" in dry.plan_text
    res = runner.run(str(mod), run="latest", store=rec["store"], workers=2)
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]
    _same(rec["store"], rec["truth"], "w_norm")


def test_state_no_checkpoint_holds_is_caught_by_verification(rec):
    """A value the skipped loop changes but no checkpoint holds (an iterator) is diverged and not stored."""
    mod = rec["tmp"] / "rec" / "ticks.py"
    mod.write_text(state_script(epoch=TICKS + '\nfl.log("lr_ok", lr)'))
    res = runner.run(str(mod), run="latest", store=rec["store"], workers=2)
    assert res.fidelity == "diverged"
    assert any("ticks" in line and "re-executed in full" in line for line in res.verification)
    assert db.run_sql("SELECT count(*) AS n FROM metrics WHERE name = 'ticks'",
                      store=rec["store"]).column("n")[0].as_py() == 0 or \
        fl.dataframe("ticks", store=rec["store"]).dropna(subset=["ticks"]).empty
    assert res.new_names == ["lr_ok"]  # the verified name is stored
    r = subprocess.run([sys.executable, "-m", "flightlog.cli", "replay", str(mod), "--run", "latest",
                        "--store", rec["store"], "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0 and "verify: epoch" in r.stdout


def test_resume_after_a_plain_lr_change_is_bit_for_bit(rec, tmp_path):
    """A run killed after `lr` (a plain variable) changed resumes with the changed lr: losses equal a full run."""
    crash = state_script(extra={"        next(ticks)\n": "        next(ticks)\n"
                                "        if epoch == 3 and n == 2 and os.environ.get('CRASH'):\n"
                                "            import time; time.sleep(1.5)  # the last checkpoint's row reaches the store\n"
                                "            os._exit(9)\n"})
    store = str(tmp_path / "s")
    path, p = _run(crash, store, tmp_path / "a", "train.py", env={"CRASH": "1"})
    assert p.returncode == 9
    rid = db.run_sql("SELECT run_id FROM runs", store=store).column("run_id")[0].as_py()
    r = subprocess.run([sys.executable, "-m", "flightlog.cli", "resume", rid, "--store", store, "--",
                        sys.executable, str(path)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, FLIGHTLOG_HOME=store), cwd=str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    full = rec["pristine"]  # the same script run without the crash: the fixture's uninterrupted recorded run
    child = db.run_sql("SELECT run_id FROM runs WHERE kind = 'resume'", store=store).column("run_id")[0].as_py()
    q = "SELECT name, epoch, batch, step, value FROM metrics WHERE run_id = ? AND name IN ('loss', 'acc') " \
        "ORDER BY name, step"
    got = db.run_sql(q, [child], store=store).to_pylist()
    full_id = db.run_sql("SELECT run_id FROM runs", store=full).column("run_id")[0].as_py()
    want = {(r["name"], r["step"]): r for r in db.run_sql(q, [full_id], store=full).to_pylist()}
    assert {r["epoch"] for r in got} >= {3, 4}  # the epochs after the crash, lr halved three times by then
    assert [r["value"] for r in got] == [want[(r["name"], r["step"])]["value"] for r in got]  # bit for bit
    assert [(r["epoch"], r["batch"]) for r in got] == [(want[(r["name"], r["step"])]["epoch"],
                                                        want[(r["name"], r["step"])]["batch"]) for r in got]


TWO_PHASE = r'''
import threading
import numpy as np
import flightlog as fl

rng = np.random.default_rng(0)
w = np.zeros(4)
with fl.checkpointing(w=w, every=1):
    for epoch in fl.loop("pretrain", range(3)):
        guard = threading.Lock()          # cannot be pickled: named at record time
        for i in fl.loop("batch", range(5)):
            w += rng.normal(size=4) * 0.1
        fl.log("w0", w[0])
        # PRE
    for step in fl.loop("finetune", range(2)):
        w *= 0.5
        fl.log("w1", w[1])
        # FT
'''


def test_two_phase_script_and_uncaptured_state_fall_back_to_the_start(tmp_path):
    """A second top-level loop, or a new statement reading an unpicklable loop variable, replays by exact
    re-execution from the start (said in the plan), equal to a full run; the user is told at record time."""
    store = str(tmp_path / "s")
    _, p = _run(TWO_PHASE, store, tmp_path / "a", "train.py")
    assert p.returncode == 0 and "'guard' is not saved in checkpoints" in p.stderr
    new = TWO_PHASE.replace("        # PRE", '        fl.log("held", float(guard.locked()) + w[2])') \
                   .replace("        # FT", '        fl.log("w3", w[3])')
    mod = tmp_path / "a" / "new.py"
    mod.write_text(new)
    res = runner.run(str(mod), run="latest", store=store, workers=2)
    assert "exact re-execution from the start" in res.plan_text and "top-level loops" in res.plan_text
    assert res.ok and res.fidelity == "exact" and len(res.segments) == 1
    full = str(tmp_path / "full")
    _run(new, full, tmp_path / "b", "train.py")
    for name in ("held", "w3"):
        got = fl.dataframe(name, store=store).dropna(subset=[name])
        want = fl.dataframe(name, store=full).dropna(subset=[name])
        assert got[name].tolist() == want[name].tolist() and got["step"].tolist() == want["step"].tolist()
        assert len(got) == {"held": 3, "w3": 2}[name]
