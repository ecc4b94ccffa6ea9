"""Transformers integration: a tiny BERT built from a config, synthetic tokens, CPU, nothing downloaded."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import flightlog as fl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "transformers_example.py")
TRAINED = ("loss", "grad_norm", "learning_rate", "eval_loss")  # deterministic logs (not runtimes)


def _py(args, store, cwd, env=None, timeout=300):
    e = dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0", HF_HUB_OFFLINE="1", CKPT_EVERY="1",
             **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=str(cwd))


@pytest.mark.slow
def test_records_logs_args_positions_eval_and_resumes_bit_for_bit(tmp_path):
    """Trainer logs/eval/args are recorded with epoch/step positions; a SIGKILLed run resumes bit for bit."""
    store, full = str(tmp_path / "s"), str(tmp_path / "full")
    p = _py([EXAMPLE, "3"], store, tmp_path, env={"KILL_AT_EPOCH": "2"})
    assert p.returncode == -9, p.stderr[-3000:]
    w_res, w_full = str(tmp_path / "res.pt"), str(tmp_path / "full.pt")
    p = _py(["-m", "flightlog.cli", "resume", "latest", "--", sys.executable, EXAMPLE, "3"], store, tmp_path,
            env={"WEIGHTS_OUT": w_res})
    assert p.returncode == 0, p.stderr[-3000:]
    p = _py([EXAMPLE, "3"], full, tmp_path, env={"WEIGHTS_OUT": w_full})
    assert p.returncode == 0, p.stderr[-3000:]

    # what a full run records
    m = fl.query("SELECT name, epoch, batch FROM metrics", store=full).to_pylist()
    loss = [r for r in m if r["name"] == "loss"]
    assert len(loss) == 6 and {r["epoch"] for r in loss} == {0, 1, 2} and {r["batch"] for r in loss} == {1, 3}
    assert sorted(r["epoch"] for r in m if r["name"] == "eval_loss") == [0, 1, 2]
    assert all(r["batch"] is None for r in m if r["name"] == "eval_loss")
    params = fl.query("SELECT params FROM runs", store=full).column(0)[0].as_py()
    assert '"learning_rate": 0.003' in params and '"num_train_epochs": 3' in params
    ck = fl.query("SELECT iteration FROM checkpoints ORDER BY 1", store=full).column(0).to_pylist()
    assert ck == [-1, 0, 1, 2]

    # the resumed continuation equals the uninterrupted run
    import torch

    a, b = torch.load(w_res), torch.load(w_full)
    assert all(torch.equal(a[k], b[k]) for k in b)
    names = ", ".join(f"'{n}'" for n in TRAINED)
    q = f"SELECT name, epoch, batch, step, value FROM metrics WHERE name IN ({names}) AND RUN ORDER BY name, step"
    rid = fl.query("SELECT run_id FROM runs WHERE kind = 'resume'", store=store).column(0)[0].as_py()
    got = fl.query(q.replace("RUN", f"run_id = '{rid}'"), store=store).to_pylist()
    want = [r for r in fl.query(q.replace("RUN", "true"), store=full).to_pylist() if r["epoch"] >= 2]
    assert got and got == want
