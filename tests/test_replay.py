"""Hindsight replay: exactness against a full re-run, parallel workers, refusals, faults."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

import flightlog as fl
from flightlog._errors import ReplayError
from flightlog.query import db
from flightlog.replay import runner

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # several torch processes per test
sys.path.insert(0, os.path.dirname(__file__))
from _train_script import GRAD, WNORM, script  # noqa: E402


def _run(code: str, store: str, tmp_path, name: str, *args, env=None):
    path = tmp_path / name
    path.write_text(code)
    e = dict(os.environ, FLIGHTLOG_HOME=store, **(env or {}))
    p = subprocess.run([sys.executable, str(path), *args], env=e, capture_output=True, text=True, timeout=180,
                       cwd=str(tmp_path))
    return path, p


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One recorded run plus full re-runs of the modified scripts, shared by the exactness tests."""
    tmp = tmp_path_factory.mktemp("rec")
    store = str(tmp / "store")
    base, p = _run(script(), store, tmp, "train.py")
    assert p.returncode == 0, p.stderr
    pristine = str(tmp / "pristine")  # the store before any replay, for tests that need a copy to damage
    shutil.copytree(store, pristine)
    both = script(batch=GRAD, epoch=WNORM)  # the new statements only read: same training, same values
    full_store = str(tmp / "full")
    _, p = _run(both, full_store, tmp, "full.py")
    assert p.returncode == 0, p.stderr
    truth = fl.dataframe("loss", "lr", "grad_norm", "weight_norm", store=full_store)
    return {"tmp": tmp, "store": store, "truth": truth, "base": base, "pristine": pristine}


def _frame(store, names):
    df = fl.dataframe(*names, store=store)
    return df


def _check_equal(store, truth, name):
    got = fl.dataframe(name, store=store).dropna(subset=[name])
    want = truth.dropna(subset=[name])
    assert len(got) == len(want) > 0
    assert got[name].tolist() == want[name].tolist()  # bit for bit
    assert got["step"].tolist() == want["step"].tolist()
    assert got["epoch"].tolist() == want["epoch"].tolist()
    assert got["batch"].fillna(-1).tolist() == want["batch"].fillna(-1).tolist()


@pytest.mark.parametrize("workers", [1, 2])
def test_epoch_level_replay_is_exact(recorded, workers):
    """A new epoch-level statement replayed from checkpoints equals a full re-run, with 1 and 2 workers."""
    tmp = recorded["tmp"]
    mod = tmp / f"epoch{workers}.py"
    mod.write_text(script(epoch=WNORM))
    res = runner.run(str(mod), run="latest", store=recorded["store"], workers=workers)
    assert res.ok and res.fidelity == "exact" and res.compared > 0
    assert len(res.segments) == workers
    _check_equal(recorded["store"], recorded["truth"], "weight_norm")
    # epoch level skips the batch loop: the segments re-computed nothing per batch (tail slicing may skip the
    # per-epoch logs too); the verification epoch re-computed that epoch's batches and logs
    seg = sum(int(s.data.get("compared", 0)) for s in res.segments)
    assert seg <= 5 and res.compared == seg + res.verify_compared and res.verify_compared >= 10


@pytest.mark.parametrize("workers", [1, 2])
def test_batch_level_replay_is_exact(recorded, workers):
    """A new statement inside the batch loop replays bit-for-bit for every batch, with 1 and 2 workers."""
    tmp = recorded["tmp"]
    mod = tmp / f"batch{workers}.py"
    mod.write_text(script(batch=GRAD))
    res = runner.run(str(mod), run="latest", store=recorded["store"], workers=workers)
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]
    assert res.compared >= 50 + 5  # every recorded loss and lr re-computed and matched (plus lead-in tails)
    _check_equal(recorded["store"], recorded["truth"], "grad_norm")


def test_replaying_twice_does_not_duplicate_rows(recorded):
    """Replaying the same statement again replaces the earlier replay's rows."""
    tmp = recorded["tmp"]
    mod = tmp / "again.py"
    mod.write_text(script(epoch=WNORM))
    for _ in range(2):
        assert runner.run(str(mod), run="latest", store=recorded["store"]).ok
    n = db.run_sql("SELECT count(*) AS n FROM metrics WHERE name = 'weight_norm'", store=recorded["store"])
    assert n.column("n")[0].as_py() == 5
    reps = db.run_sql("SELECT count(DISTINCT replay_id) AS n FROM replays", store=recorded["store"])
    assert reps.column("n")[0].as_py() >= 2


def test_single_epoch_and_dry_run(recorded):
    """--epochs selects epochs; --dry-run prints a plan with an estimate and stores nothing."""
    tmp = recorded["tmp"]
    mod = tmp / "one.py"
    mod.write_text(script(batch=GRAD.replace("grad_norm", "grad_norm_one")))
    dry = runner.run(str(mod), run="latest", store=recorded["store"], epochs="3", dry_run=True)
    assert "batch-level" in dry.plan_text and "epochs 3" in dry.plan_text and "estimate" in dry.plan_text
    assert db.run_sql("SELECT count(*) AS n FROM metrics WHERE name='grad_norm_one'",
                      store=recorded["store"]).column("n")[0].as_py() == 0
    res = runner.run(str(mod), run="latest", store=recorded["store"], epochs="3")
    assert res.ok and res.fidelity == "exact"
    got = fl.dataframe("grad_norm_one", store=recorded["store"]).dropna(subset=["grad_norm_one"])
    want = recorded["truth"].dropna(subset=["grad_norm"])
    want = want[want.epoch == 3]
    assert got["grad_norm_one"].tolist() == want["grad_norm"].tolist()
    assert got["step"].tolist() == want["step"].tolist()


def test_recorded_args_are_used(tmp_path):
    """fl.arg returns the recorded value in replay, not the default or a new command-line value."""
    store = str(tmp_path / "s")
    _, p = _run(script(), store, tmp_path, "train.py", "0.02")
    assert p.returncode == 0, p.stderr
    mod = tmp_path / "lr.py"
    mod.write_text(script(epoch='fl.log("lr_arg", lr)'))
    res = runner.run(str(mod), ["0.5"], run="latest", store=store)
    assert res.ok and res.fidelity == "exact"
    vals = db.run_sql("SELECT DISTINCT value FROM metrics WHERE name = 'lr_arg'", store=store)
    assert vals.column("value").to_pylist() == [0.02]


def test_model_change_is_refused_without_force(recorded):
    """A replay whose code changes the model is refused, naming the changed lines; --force runs it."""
    tmp = recorded["tmp"]
    mod = tmp / "changed.py"
    mod.write_text(script(epoch=WNORM, extra={"nn.Dropout(0.3)": "nn.Dropout(0.5)"}))
    with pytest.raises(ReplayError, match=r"changed\.py|train\.py|Dropout\(0\.5\)"):
        runner.run(str(mod), run="latest", store=recorded["store"])
    res = runner.run(str(mod), run="latest", store=recorded["store"], force=True, epochs="4")
    assert res.ok  # forced: runs, and the verdict says what happened
    r = subprocess.run([sys.executable, "-m", "flightlog.cli", "replay", str(mod), "--run", "latest",
                        "--store", recorded["store"]], capture_output=True, text=True)
    assert r.returncode == 2 and "Dropout(0.5)" in r.stderr and "--force" in r.stderr


def test_corrupt_checkpoint_is_named_and_avoided(recorded, tmp_path):
    """A corrupt checkpoint is reported and replay runs forward from an earlier one, still exactly."""
    store = str(tmp_path / "s")
    shutil.copytree(recorded["pristine"], store)  # a private copy of the recorded run: its blob is damaged
    ck = db.run_sql("SELECT content_hash FROM checkpoints WHERE iteration = 2", store=store).to_pylist()[0]
    blob = glob.glob(f"{store}/blobs/*/{ck['content_hash']}")[0]
    with open(blob, "r+b") as fh:
        fh.seek(100)
        fh.write(b"garbage!")
    mod = tmp_path / "e.py"
    mod.write_text(script(epoch=WNORM))
    res = runner.run(str(mod), run="latest", store=store)
    assert "corrupt or unreadable checkpoint(s) of iteration 2" in res.plan_text
    assert res.ok and res.fidelity == "exact"
    want = recorded["truth"].dropna(subset=["weight_norm"])["weight_norm"].tolist()  # the full re-run's
    got = fl.dataframe("weight_norm", store=store).dropna(subset=["weight_norm"])["weight_norm"].tolist()
    assert got == want and len(want) == 5


def test_batch_level_plan_reads_only_the_checkpoints_it_restores(recorded, tmp_path, monkeypatch):
    """A batch-level plan verifies the checkpoint each segment starts from, not every epoch's; where that one
    is corrupt, the earlier one it falls back to is verified in its turn, and the replay stays exact."""
    from flightlog.collector import blobs as _blobs

    store = str(tmp_path / "s")
    shutil.copytree(recorded["pristine"], store)
    hashes = {r["iteration"]: r["content_hash"] for r in
              db.run_sql("SELECT iteration, content_hash FROM checkpoints", store=store).to_pylist()}
    blob = glob.glob(f"{store}/blobs/*/{hashes[2]}")[0]  # segment 2 of 2 (epochs 3, 4) starts from epoch 2's
    with open(blob, "r+b") as fh:
        fh.seek(100)
        fh.write(b"garbage!")
    seen: list[str] = []
    real = _blobs.verify_blob
    monkeypatch.setattr(_blobs, "verify_blob", lambda root, h, *a: (seen.append(h), real(root, h, *a))[1])
    mod = tmp_path / "g.py"
    mod.write_text(script(batch=GRAD))
    res = runner.run(str(mod), run="latest", store=store, workers=2)
    assert "corrupt or unreadable checkpoint(s) of iteration 2" in res.plan_text
    by_hash = {h: it for it, h in hashes.items()}
    assert sorted(by_hash[h] for h in seen) == sorted({-1, 1, 2} & set(hashes)), seen
    assert res.ok and res.fidelity == "exact"
    want = recorded["truth"].dropna(subset=["grad_norm"])["grad_norm"].tolist()
    got = fl.dataframe("grad_norm", store=store).dropna(subset=["grad_norm"])["grad_norm"].tolist()
    assert got == want and len(want) > 0


def test_missing_checkpoints_without_snapshot_fail_clearly(tmp_path):
    """A run with no checkpoints or no code snapshot gets a clear ReplayError, and nothing is stored."""
    store = str(tmp_path / "s")
    _run("import flightlog as fl\nfor e in fl.loop('epoch', range(3)):\n    fl.log('x', e)\n", store, tmp_path,
         "plain.py")
    mod = tmp_path / "plain2.py"
    mod.write_text("import flightlog as fl\nfor e in fl.loop('epoch', range(3)):\n    fl.log('x', e)\n"
                   "    fl.log('y', e * 2)\n")
    res = runner.run(str(mod), run="latest", store=store)  # no checkpoints: runs forward from the start
    assert res.ok and res.fidelity == "exact"
    assert db.run_sql("SELECT list(value ORDER BY step) AS v FROM metrics WHERE name='y'",
                      store=store).column("v")[0].as_py() == [0.0, 2.0, 4.0]
    with pytest.raises(ReplayError, match="no such script"):
        runner.run(str(tmp_path / "nope.py"), run="latest", store=store)
    with pytest.raises(ReplayError, match="no new fl.log"):
        runner.run(str(tmp_path / "plain.py"), run="latest", store=store)


def test_replay_across_a_resumed_run(recorded, tmp_path):
    """A crashed-and-resumed run replays across the resume and matches an uninterrupted full re-run."""
    store = str(tmp_path / "s")
    crash = script(extra={"            opt.zero_grad()": "            if epoch == 2 and os.environ.get('CRASH'):\n"
                                                      "                os._exit(9)\n            opt.zero_grad()"})
    path, p = _run(crash, store, tmp_path, "train.py", env={"CRASH": "1"})
    assert p.returncode == 9
    rid = db.run_sql("SELECT run_id FROM runs", store=store).column("run_id")[0].as_py()
    r = subprocess.run([sys.executable, "-m", "flightlog.cli", "resume", rid, "--store", store, "--",
                        sys.executable, str(path)], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, FLIGHTLOG_HOME=store))
    assert r.returncode == 0, r.stderr
    mod = tmp_path / "mod.py"
    mod.write_text(crash.replace("            # BATCH", "            " + GRAD))
    res = runner.run(str(mod), run="latest", store=store, workers=2)
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]
    want = recorded["truth"].dropna(subset=["grad_norm"])  # the uninterrupted full re-run's values
    got = fl.dataframe("grad_norm", run="latest", store=store).dropna(subset=["grad_norm"])
    assert got["grad_norm"].tolist() == want["grad_norm"].tolist()
    assert got["step"].tolist() == want["step"].tolist()


def test_all_runs_propagates_into_older_code(tmp_path):
    """--all-runs inserts the new statement into each run's own code version; a run without a match is refused."""
    store = str(tmp_path / "s")
    v1 = script()
    v2 = script(extra={"step_size=1, gamma=0.7": "step_size=2, gamma=0.5"})
    v3 = script(extra={"        sched.step()\n": "        pass\n"}).replace("        fl.log(\"lr\", sched.get_last_lr()[0])\n",
                                                                         "")
    for name, code in (("train.py", v1), ("train.py", v2), ("train.py", v3)):
        _, p = _run(code, store, tmp_path, name)
        assert p.returncode == 0, p.stderr
    mod = tmp_path / "train_new.py"
    mod.write_text(v2.replace("        # EPOCH", "        " + WNORM))
    res = runner.run(str(mod), all_runs=True, store=store, workers=2)
    assert len(res.segments) == 2 and all(s.status == "ok" and s.fidelity == "exact" for s in res.segments)
    assert len(res.refused) == 1 and "no unique place" in list(res.refused.values())[0]
    n = db.run_sql("SELECT count(DISTINCT run_id) AS r, count(*) AS n FROM metrics WHERE name='weight_norm'",
                   store=store).to_pylist()[0]
    assert n == {"r": 2, "n": 10}


def test_failed_worker_is_reported_and_others_kept(recorded):
    """A worker that fails is reported with its segment and traceback; the other segment's values are kept."""
    tmp = recorded["tmp"]
    mod = tmp / "fails.py"
    mod.write_text(script(epoch='fl.log("risky", 1.0 / (3 - epoch))'))  # ZeroDivisionError in epoch 3
    res = runner.run(str(mod), run="latest", store=recorded["store"], workers=2)
    assert not res.ok
    bad = [s for s in res.segments if s.status == "failed"]
    good = [s for s in res.segments if s.status == "ok"]
    assert len(bad) == 1 and bad[0].segment == "3:5" and "ZeroDivisionError" in bad[0].error
    assert len(good) == 1 and good[0].segment == "0:3" and good[0].fidelity == "exact"
    vals = db.run_sql("SELECT epoch, value FROM metrics WHERE name = 'risky' ORDER BY epoch",
                      store=recorded["store"]).to_pylist()
    assert [v["epoch"] for v in vals] == [0, 1, 2]
    st = db.run_sql("SELECT status, error FROM replays WHERE segment = '3:5' ORDER BY started_at DESC LIMIT 1",
                    store=recorded["store"]).to_pylist()[0]
    assert st["status"] == "failed" and "ZeroDivisionError" in st["error"]
