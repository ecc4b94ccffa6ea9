"""Replay of a numpy-only training loop (no torch: quick workers): loop state, a global RNG, files, early stop."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

import flightlog as fl
from flightlog.replay import runner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TRAIN = r'''
import numpy as np
import flightlog as fl

rng = np.random.default_rng(0)       # a global RNG nobody registered, drawn from inside train()
w = np.zeros(3)
best, bad, lr = 0.0, 0, 1.0
hist = []


def train():
    running = 0.0
    for i in fl.loop("batch", range(4)):
        g = rng.normal(size=3)
        w[:] = w - lr * 0.1 * g
        running += float(g.sum())
    # AFTER
    return running


with fl.checkpointing(w=w, every=1):
    for epoch in fl.loop("epoch", range(8)):
        r = train()
        lr /= 2
        acc = float(-abs(w).sum())
        hist.append(acc)
        if acc > best or epoch == 0:
            best, bad = acc, 0
            np.save("best.npy", w)
        else:
            bad += 1
        with open("log.txt", "a") as f:
            f.write(f"{epoch} {acc}\n")
        fl.log("acc", acc)
        # EPOCH
        if epoch >= 5:
            break
'''
NEW = TRAIN.replace("        # EPOCH", '        fl.log("r", r)\n        fl.log("lr", lr)\n        fl.log("bad", bad)\n'
                                      '        fl.log("h", sum(hist))') \
           .replace("    # AFTER", '    fl.log("running", running)')
NAMES = ["r", "lr", "bad", "h", "running"]


def _run(code, store, cwd):
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "train.py").write_text(code)
    p = subprocess.run([sys.executable, "train.py"], cwd=str(cwd), capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, FLIGHTLOG_HOME=store))
    assert p.returncode == 0, p.stderr
    return p


def _md5(p):
    return hashlib.md5(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("workers,epochs", [(2, None), (1, "2:5")])
def test_numpy_loop_state_files_and_early_stop(tmp_path, workers, epochs):
    """Loop-carried values, a function's accumulator, an unregistered global RNG and a `break` replay bit for
    bit with 2 workers and an --epochs range; np.save/open(…, "a") in the loop never touch the user's files."""
    store = str(tmp_path / "s")
    p = _run(TRAIN, store, tmp_path / "a")
    assert "not saved in checkpoints" not in p.stderr  # the with-block's file handle is not loop state
    before = {n: _md5(tmp_path / "a" / n) for n in ("best.npy", "log.txt")}
    (tmp_path / "a" / "new.py").write_text(NEW)
    res = runner.run(str(tmp_path / "a" / "new.py"), run="latest", store=store, workers=workers, epochs=epochs)
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]
    assert res.verified == len(NAMES)
    assert {n: _md5(tmp_path / "a" / n) for n in before} == before
    assert {os.path.basename(a) for a, _b in res.files} == {"best.npy", "log.txt"}
    assert all(b.startswith(res.scratch) and os.path.isfile(b) for _a, b in res.files)
    full = str(tmp_path / "full")
    _run(NEW, full, tmp_path / "b")
    want = fl.dataframe(*NAMES, store=full)
    got = fl.dataframe(*NAMES, store=store)
    if epochs:
        want = want[want.epoch.isin([2, 3, 4])]
    for n in NAMES:
        g, w = got.dropna(subset=[n]), want.dropna(subset=[n])
        assert g[n].tolist() == w[n].tolist() and g["step"].tolist() == w["step"].tolist(), n
