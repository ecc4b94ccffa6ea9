"""Several processes without a framework: a plain fl.loop script under torchrun (2 gloo ranks on CPU).

The shape of hand-written DDP code: ``init_process_group``, a ``DistributedDataParallel`` model, a shard of
the data per rank, a seed per rank (so the ranks' dropout masks differ), the batch loop inside the epoch loop.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import flightlog as fl

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

SCRIPT = '''\
import os
import torch, torch.nn as nn, torch.distributed as dist
from sklearn.datasets import load_digits
import flightlog as fl

dist.init_process_group("gloo")
rank = dist.get_rank()
d = load_digits()
x = torch.tensor(d.data / 16.0, dtype=torch.float32)[rank::2]
y = torch.tensor(d.target)[rank::2]
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
torch.manual_seed(100 + rank)
model = nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
kill = int(os.environ.get("KILL_AT", "-1"))


def train():
    with fl.checkpointing(model=net, optimizer=opt, every=1):
        for epoch in fl.loop("epoch", range(4)):
            if epoch == kill:
                fl._run.ACTIVE.checkpointer._q.join()
                fl._run.ACTIVE.rec.flush()
                dist.barrier()
                os.kill(os.getpid(), 9)
            perm = torch.randperm(len(y))
            for i in fl.loop("batch", range(0, len(y), 100)):
                idx = perm[i:i + 100]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                fl.log("loss", loss.item())
#BATCH
#EPOCH


train()
if rank == 0 and os.environ.get("OUT"):
    torch.save(net.state_dict(), os.environ["OUT"])
dist.destroy_process_group()
'''
BATCH = '                fl.log("gnorm", net[0].weight.grad.norm().item())'
EPOCH = '            fl.log("wnorm", net[0].weight.norm().item())'


def _script(folder, batch: bool = False, epoch: bool = False) -> str:
    text = SCRIPT.replace("#BATCH", BATCH if batch else "").replace("#EPOCH", EPOCH if epoch else "")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), "train.py")
    with open(path, "w") as fh:
        fh.write(text)
    return path


def _run(args, store, cwd, env=None):
    e = dict(os.environ, FLIGHTLOG_HOME=str(store), FLIGHTLOG_PROGRESS="0", OMP_NUM_THREADS="1", **(env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "FLIGHTLOG_RUN_ID"):
        e.pop(k, None)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, env=e, cwd=str(cwd))


def _rows(store, name: str, where: str = "true") -> list[tuple]:
    q = (f"SELECT rank, epoch, batch, step, value FROM metrics WHERE name = '{name}' AND {where} "
         "ORDER BY rank, step")
    return [tuple(r.values()) for r in fl.query(q, store=str(store)).to_pylist()]


@pytest.mark.slow
def test_plain_torchrun_script_resumes_and_replays_exactly_per_rank(tmp_path):
    """2 ranks of a plain fl.loop script share one run; each checkpoints its own state (rank column); resume
    after SIGKILL is bit for bit with each rank from its own checkpoint; an epoch-level and a batch-level new
    statement replay (each segment as 2 rank processes) exactly what a full torchrun re-run of the new script
    logs, rank by rank."""
    store, full = tmp_path / "s", tmp_path / "full"
    old = _script(tmp_path / "old")
    p = _run(TORCHRUN + [old], store, tmp_path, env={"KILL_AT": "2"})
    assert p.returncode != 0
    runs = fl.query("SELECT DISTINCT run_id FROM runs", store=str(store)).column(0).to_pylist()
    assert len(runs) == 1  # both ranks, one run
    ck = fl.query("SELECT rank, count(*) AS n FROM checkpoints GROUP BY rank ORDER BY rank", store=str(store))
    assert ck.column("rank").to_pylist() == [0, 1] and ck.column("n").to_pylist() == [3, 3]  # -1, 0, 1 each

    p = _run([sys.executable, "-m", "flightlog.cli", "resume", runs[0], "--"] + TORCHRUN + [old], store, tmp_path,
             env={"OUT": str(tmp_path / "res.pt")})
    assert p.returncode == 0, p.stderr[-3000:]
    p = _run(TORCHRUN + [_script(tmp_path / "both", batch=True, epoch=True)], full, tmp_path,
             env={"OUT": str(tmp_path / "full.pt")})
    assert p.returncode == 0, p.stderr[-3000:]
    import torch

    a, b = torch.load(tmp_path / "res.pt"), torch.load(tmp_path / "full.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)
    res = fl.query("SELECT DISTINCT run_id FROM runs WHERE kind = 'resume'", store=str(store)).column(0).to_pylist()
    assert len(res) == 1
    got = _rows(store, "loss", f"run_id = '{res[0]}'")
    assert got and {r[0] for r in got} == {0, 1} and got == _rows(full, "loss", "epoch >= 2")

    for level, script, name in (("epoch", _script(tmp_path / "ep", epoch=True), "wnorm"),
                                ("batch", _script(tmp_path / "bt", batch=True), "gnorm")):
        p = _run([sys.executable, "-m", "flightlog.cli", "replay", script, "--run", res[0], "--store", store],
                 store, tmp_path)
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        assert f"{level}-level replay" in p.stdout and "diverged" not in p.stdout, p.stdout
        got = _rows(store, name, "source = 'replay'")
        assert {r[0] for r in got} == {0, 1} and got == _rows(full, name)


def test_ranks_of_a_plain_script_derive_one_run_id(monkeypatch):
    """Without a framework (no collective is safe there) every rank derives the same id from the launcher's
    environment, the k-th run of a process the same suffix; another rendezvous id gives another run."""
    from flightlog import _run

    for k in ("FLIGHTLOG_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    ids = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(_run, "_JOB_RUNS", 0)
        ids[rank] = (_run.new_run_id(), _run.new_run_id())
    assert ids["0"] == ids["1"] and ids["0"][1] == ids["0"][0] + "-2"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    monkeypatch.setattr(_run, "_JOB_RUNS", 0)
    assert _run.new_run_id() != ids["0"][0]


def test_a_rank_without_checkpoints_of_its_own_is_warned_not_silently_given_another_ranks_rng(tmp_path, monkeypatch):
    """Resume of rank 1 when only rank 0's checkpoints reached the store restores rank 0's state with a
    resume_rng warning (its RNG may differ), and a negative RANK counts as no rank."""
    from flightlog import _ddp, _resume, _warn

    for k in ("FLIGHTLOG_RUN_ID", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    store = str(tmp_path / "s")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-x")
    fl.init(store=store)
    state = {"w": 1.0}
    with fl.checkpointing(state=state, every=1):
        for _e in fl.loop("epoch", range(2)):
            state["w"] *= 0.5
    fl.finish()
    rid = fl.query("SELECT run_id FROM runs", store=store).column(0)[0].as_py()
    assert fl.query("SELECT DISTINCT rank FROM checkpoints", store=store).column(0).to_pylist() == [0]
    monkeypatch.setenv("RANK", "1")
    _src, row = _resume.last_checkpoint(store, rid, 1)
    assert row["rank"] == 0
    _warn.counters.clear()
    fl.init(store=store)  # a run to restore into
    try:
        _resume.ResumeState(fl._run.ACTIVE, store, row).restore()
    finally:
        fl.finish()
    assert _warn.counters.get("resume_rng") == 1
    monkeypatch.setenv("RANK", "-1")
    assert _ddp.rank_info()[0] is None
