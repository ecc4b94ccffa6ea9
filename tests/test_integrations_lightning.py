"""PyTorch Lightning integration: real Lightning training on digits, CPU, deterministic."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

import flightlog as fl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "lightning_example.py")


def _py(args, store, cwd, env=None, timeout=300):
    e = dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0", CKPT_EVERY="1", **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=str(cwd))


def test_import_flightlog_does_not_import_lightning():
    """`import flightlog` (and the integrations package) never imports lightning or transformers."""
    code = ("import sys, flightlog, flightlog.integrations; "
            "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.slow
def test_records_and_resumes_after_sigkill_bit_for_bit(tmp_path):
    """self.log values/hparams/positions/checkpoints are recorded; a run SIGKILLed at epoch 2 resumes bit for bit."""
    store, full = str(tmp_path / "s"), str(tmp_path / "full")
    p = _py([EXAMPLE, "4"], store, tmp_path, env={"KILL_AT_EPOCH": "2"})
    assert p.returncode == -9, p.stderr[-3000:]
    w_res, w_full = str(tmp_path / "res.pt"), str(tmp_path / "full.pt")
    p = _py(["-m", "flightlog.cli", "resume", "latest", "--", sys.executable, EXAMPLE, "4"], store, tmp_path,
            env={"WEIGHTS_OUT": w_res})
    assert p.returncode == 0, p.stderr[-3000:]
    p = _py([EXAMPLE, "4"], full, tmp_path, env={"WEIGHTS_OUT": w_full})
    assert p.returncode == 0, p.stderr[-3000:]
    # what the uninterrupted run recorded
    m = fl.query("SELECT name, epoch, batch FROM metrics", store=full).to_pylist()
    steps = [r for r in m if r["name"] == "train_loss_step"]
    assert len(steps) == 40 and {r["batch"] for r in steps} == set(range(10))
    assert sorted(r["epoch"] for r in m if r["name"] == "val_acc") == [0, 1, 2, 3]
    assert all(r["batch"] is None for r in m if r["name"] in ("val_acc", "train_loss_epoch"))
    run = fl.query("SELECT params, status FROM runs", store=full).to_pylist()[0]
    assert '"lr": 0.01' in run["params"] and '"hidden": 32' in run["params"] and run["status"] == "finished"
    ck = fl.query("SELECT iteration, position FROM checkpoints ORDER BY iteration", store=full).to_pylist()
    assert [c["iteration"] for c in ck] == [-1, 0, 1, 2, 3]

    import torch

    a, b = torch.load(w_res), torch.load(w_full)
    assert all(torch.equal(a[k], b[k]) for k in b)
    q = "SELECT name, epoch, batch, step, value FROM metrics WHERE run_id = ? ORDER BY name, step"
    res_id = fl.query("SELECT run_id FROM runs WHERE kind = 'resume'", store=store).column(0)[0].as_py()
    got = fl.query(q.replace("?", f"'{res_id}'"), store=store).to_pylist()
    want = [r for r in fl.query(q.replace("run_id = ?", "true"), store=full).to_pylist() if r["epoch"] >= 2]
    assert got and got == want  # same names, positions, steps and values, bit for bit


@pytest.mark.slow
def test_batch_level_replay_of_new_statements_equals_a_full_rerun(tmp_path):
    """New fl.log in validation_step and training_step, replayed from checkpoints, equal a run of the new script."""
    src = open(EXAMPLE).read()
    new = src.replace('        self.log("val_acc", (logits.argmax(1) == y).float().mean())\n',
                      '        self.log("val_acc", (logits.argmax(1) == y).float().mean())\n'
                      '        if not self.trainer.sanity_checking:\n'
                      '            fl.log("val_err", 1 - (logits.argmax(1) == y).float().mean())\n')
    new = new.replace('        self.log("train_loss", loss, on_step=True, on_epoch=True)\n',
                      '        self.log("train_loss", loss, on_step=True, on_epoch=True)\n'
                      '        fl.log("w_norm", sum((p ** 2).sum() for p in self.parameters()))\n')
    assert new != src
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old_path, new_path = tmp_path / "a" / "train.py", tmp_path / "b" / "train.py"
    old_path.write_text(src)
    new_path.write_text(new)
    store, full = str(tmp_path / "s"), str(tmp_path / "full")
    assert _py([str(old_path), "3"], store, tmp_path / "a").returncode == 0
    p = _py(["-m", "flightlog.cli", "replay", str(new_path), "3", "--run", "latest", "--epochs", "1:3",
             "--cold"], store, tmp_path / "b")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "exact" in p.stdout, p.stdout[-2000:]
    assert _py([str(new_path), "3"], full, tmp_path / "b").returncode == 0
    q = "SELECT name, epoch, batch, value FROM metrics WHERE name IN ('val_err', 'w_norm') AND epoch >= 1 AND SRC " \
        "ORDER BY name, epoch, step"
    got = fl.query(q.replace("SRC", "source = 'replay'"), store=store).to_pylist()
    want = fl.query(q.replace("SRC", "true"), store=full).to_pylist()
    assert len(want) == 2 * 2 + 2 * 10 and got == want
