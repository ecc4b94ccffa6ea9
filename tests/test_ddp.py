"""Several processes: a Lightning DDP job (torchrun, 2 gloo processes on CPU) records into one run."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("lightning") is None:  # find_spec: importing lightning costs ~8 s per collection
    pytest.skip("lightning is not installed (pip install flightlog[lightning])", allow_module_level=True)

import flightlog as fl  # noqa: E402
from flightlog import _ddp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "lightning_example.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_job_run_id_is_shared_by_ranks_and_differs_between_jobs(monkeypatch):
    """Ranks of one job (same launcher env) derive one run id; another job (other rendezvous id) another."""
    for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("RANK", "0")
    a0 = _ddp.job_run_id()
    monkeypatch.setenv("RANK", "1")
    assert _ddp.job_run_id() == a0
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    assert _ddp.job_run_id() != a0
    assert _ddp.rank_info() == (1, 2, None)


def test_rank_column_is_null_in_a_one_process_run(tmp_path, monkeypatch):
    """Without RANK every metrics row has rank NULL; with RANK=3 the rows say 3."""
    monkeypatch.delenv("RANK", raising=False)
    store = str(tmp_path / "s")
    fl.init(store=store)
    fl.log("a", 1.0)
    fl.finish()
    assert fl.query("SELECT rank FROM metrics", store=store).column(0).to_pylist() == [None]
    monkeypatch.setenv("RANK", "3")
    fl.init(store=store)
    fl.log("a", 2.0)
    fl.finish()
    assert fl.query("SELECT rank FROM metrics WHERE value = 2", store=store).column(0).to_pylist() == [3]


def _run(args, store, cwd, env=None):
    e = dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0", DDP_DEVICES="2", CKPT_EVERY="1",
             OMP_NUM_THREADS="1", **(env or {}))
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=e, cwd=str(cwd))


@pytest.mark.slow
def test_ddp_two_gloo_ranks_one_run_and_exact_resume(tmp_path):
    """2 gloo ranks: one run id, a rank on every row, checkpoints by rank 0, show per rank; resume is exact."""
    store, full = str(tmp_path / "s"), str(tmp_path / "full")
    p = _run(TORCHRUN + [EXAMPLE, "3"], store, tmp_path, env={"KILL_AT_EPOCH": "2"})
    assert p.returncode != 0
    runs = fl.query("SELECT DISTINCT run_id FROM runs", store=store).column(0).to_pylist()
    assert len(runs) == 1
    ranks = fl.query("SELECT rank, count(*) AS n FROM metrics GROUP BY rank ORDER BY rank", store=store).to_pylist()
    assert [r["rank"] for r in ranks] == [0, 1]
    show = subprocess.run([sys.executable, "-m", "flightlog.cli", "show", runs[0], "--store", store],
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0 and "ranks (2 processes" in show.stdout, show.stderr

    w_res, w_full = str(tmp_path / "res.pt"), str(tmp_path / "full.pt")
    p = _run([sys.executable, "-m", "flightlog.cli", "resume", runs[0], "--"] + TORCHRUN + [EXAMPLE, "3"],
             store, tmp_path, env={"WEIGHTS_OUT": w_res})
    assert p.returncode == 0, p.stderr[-3000:]
    p = _run(TORCHRUN + [EXAMPLE, "3"], full, tmp_path, env={"WEIGHTS_OUT": w_full})
    assert p.returncode == 0, p.stderr[-3000:]
    import torch

    a, b = torch.load(w_res), torch.load(w_full)
    assert all(torch.equal(a[k], b[k]) for k in b)
    res = fl.query("SELECT run_id FROM runs WHERE kind = 'resume'", store=store).column(0).to_pylist()
    assert len(set(res)) == 1  # both resumed ranks share one run too
    q = "SELECT rank, name, epoch, batch, step, value FROM metrics WHERE RUN ORDER BY rank, name, step"
    got = fl.query(q.replace("RUN", f"run_id = '{res[0]}'"), store=store).to_pylist()
    want = [r for r in fl.query(q.replace("RUN", "true"), store=full).to_pylist() if r["epoch"] >= 2]
    assert got and got == want
    assert fl.query("SELECT count(*) FROM checkpoints", store=full).column(0)[0].as_py() == 4  # rank 0's only
    # replay runs a segment in one process: a 2-process run is refused, with the reason and what works
    from flightlog.replay import run as replay

    with pytest.raises(fl.ReplayError, match="recorded by 2 processes.*flightlog resume"):
        replay(EXAMPLE, run=res[0], store=store, cold=True)
