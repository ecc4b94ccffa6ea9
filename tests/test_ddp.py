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


def _per_rank_script(folder, extra: dict[str, str] | None = None) -> str:
    """The example with a seed per rank (ranks' RNG states differ), plus ``extra`` lines after anchors."""
    with open(EXAMPLE) as fh:
        text = fh.read().replace("pl.seed_everything(0, workers=True)",
                                 'pl.seed_everything(int(os.environ.get("RANK") or 0), workers=True)')
    for anchor, line in (extra or {}).items():
        assert anchor in text
        indent = anchor[:len(anchor) - len(anchor.lstrip())]
        text = text.replace(anchor, anchor + "\n" + indent + line)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), "train.py")
    with open(path, "w") as fh:
        fh.write(text)
    return path


VAL_ANCHOR = '        self.log("val_acc", (logits.argmax(1) == y).float().mean())'
TRAIN_ANCHOR = '        self.log("train_loss", loss, on_step=True, on_epoch=True)'
VAL_LINE = 'fl.log("val_top2", (logits.topk(2, 1).indices == y[:, None]).any(1).float().mean().item())'
TRAIN_LINE = 'fl.log("w_probe", self.net[1].weight.abs().mean().item())'


def _replay(script, run_id, store, cwd, *extra):
    return _run([sys.executable, "-m", "flightlog.cli", "replay", script, "--run", run_id, "--store", store, *extra],
                store, cwd)


def _values(store: str, name: str, epochs=None) -> list[tuple]:
    q = f"SELECT rank, epoch, batch, step, value FROM metrics WHERE name = '{name}' ORDER BY rank, step"
    return [tuple(r.values()) for r in fl.query(q, store=store).to_pylist() if epochs is None or r["epoch"] in epochs]


@pytest.mark.slow
def test_ddp_two_gloo_ranks_one_run_exact_resume_and_replay(tmp_path):
    """2 gloo ranks (a seed per rank): one run id, a rank on every row, rank 0's checkpoints, show per rank;
    resume after SIGKILL is bit for bit, each rank continuing with its own RNG states. Over the resumed chain,
    a new statement in validation_step (epoch level: training batches skipped) and one in training_step
    (batch level, from the checkpoint of epoch 1 with each rank's own RNG) replay as 2 rank processes per
    segment and give exactly what a full torchrun run of the new script logs, rank by rank."""
    script = _per_rank_script(tmp_path / "code")
    store, full = str(tmp_path / "s"), str(tmp_path / "full")
    p = _run(TORCHRUN + [script, "3"], store, tmp_path, env={"KILL_AT_EPOCH": "2"})
    assert p.returncode != 0
    runs = fl.query("SELECT DISTINCT run_id FROM runs", store=store).column(0).to_pylist()
    assert len(runs) == 1
    ranks = fl.query("SELECT rank, count(*) AS n FROM metrics GROUP BY rank ORDER BY rank", store=store).to_pylist()
    assert [r["rank"] for r in ranks] == [0, 1]
    show = subprocess.run([sys.executable, "-m", "flightlog.cli", "show", runs[0], "--store", store],
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0 and "ranks (2 processes" in show.stdout, show.stderr

    w_res, w_full = str(tmp_path / "res.pt"), str(tmp_path / "full.pt")
    p = _run([sys.executable, "-m", "flightlog.cli", "resume", runs[0], "--"] + TORCHRUN + [script, "3"],
             store, tmp_path, env={"WEIGHTS_OUT": w_res})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resume_rng" not in p.stderr  # every rank found its own RNG states in the checkpoint
    # the full run is of the new script: its statements read values only, so training is the old script's
    both = _per_rank_script(tmp_path / "full", {VAL_ANCHOR: VAL_LINE, TRAIN_ANCHOR: TRAIN_LINE})
    p = _run(TORCHRUN + [both, "3"], full, tmp_path, env={"WEIGHTS_OUT": w_full})
    assert p.returncode == 0, p.stderr[-3000:]
    import torch

    a, b = torch.load(w_res), torch.load(w_full)
    assert all(torch.equal(a[k], b[k]) for k in b)
    res = fl.query("SELECT run_id FROM runs WHERE kind = 'resume'", store=store).column(0).to_pylist()
    assert len(set(res)) == 1  # both resumed ranks share one run too
    q = ("SELECT rank, name, epoch, batch, step, value FROM metrics WHERE RUN AND name NOT IN ('val_top2', 'w_probe') "
         "ORDER BY rank, name, step")
    got = fl.query(q.replace("RUN", f"run_id = '{res[0]}'"), store=store).to_pylist()
    want = [r for r in fl.query(q.replace("RUN", "true"), store=full).to_pylist() if r["epoch"] >= 2]
    assert got and got == want
    assert fl.query("SELECT count(*) FROM checkpoints", store=full).column(0)[0].as_py() == 4  # rank 0's only

    ep = _per_rank_script(tmp_path / "ep", {VAL_ANCHOR: VAL_LINE})
    p = _replay(ep, res[0], store, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "epoch-level replay" in p.stdout and "fidelity: exact" in p.stdout, p.stdout
    got = _values(store, "val_top2")
    assert {r[0] for r in got} == {0, 1} and len(got) == 6
    # the same values at the same steps; the full run also logged it in Lightning's sanity validation
    # (epoch NULL), which replay counts for the steps but does not re-create
    assert got == _values(full, "val_top2", epochs={0, 1, 2})

    bt = _per_rank_script(tmp_path / "bt", {TRAIN_ANCHOR: TRAIN_LINE})
    p = _replay(bt, res[0], store, tmp_path, "--epochs", "2")
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "batch-level replay" in p.stdout and "fidelity: exact" in p.stdout, p.stdout
    assert "compared 16" in p.stdout  # both ranks' recorded values of epoch 2, each against its own record
    got = _values(store, "w_probe")
    assert {r[0] for r in got} == {0, 1} and len(got) == 10
    assert got == _values(full, "w_probe", epochs={2})


def test_multi_process_run_without_every_ranks_rng_is_refused(tmp_path, monkeypatch):
    """A multi-process run whose checkpoints hold one process's RNG states (plain fl.loop under torchrun)
    is refused with the reason, not replayed into values that could differ from the record."""
    import dataclasses

    from flightlog.replay import _ranks
    from flightlog.replay.recorded import load_run

    monkeypatch.delenv("RANK", raising=False)
    store = str(tmp_path / "s")
    fl.init(store=store)
    state = {"w": 1.0}
    with fl.checkpointing(state=state, every=1):
        for e in fl.loop("epoch", range(2)):
            state["w"] *= 0.5
            fl.log("w", state["w"])
    fl.finish()
    from flightlog.query import db

    con = db.connect(store)
    try:
        info = dataclasses.replace(load_run(con, store, db.resolve_run(con, "latest")), ranks=2)
    finally:
        con.close()
    with pytest.raises(fl.ReplayError, match="recorded by 2 processes.*not every rank's"):
        _ranks.check_replayable(store, info, sorted(info.checkpoints))
    _ranks.check_replayable(store, info, [])  # nothing to restore (replay from the start): fine


def test_rank_results_merge():
    """A segment's result adds its ranks' counts, keeps the first divergence (with its rank) and only the
    epochs every rank completed."""
    from flightlog.replay._ranks import merge_results

    a = {"compared": 3, "exact": 3, "diverged": 0, "max_abs_diff": 0.0, "epochs_done": [1, 2], "new_names": ["x"],
         "counters": {"k": 1}, "first_divergence": None, "rows": 2}
    b = {"compared": 3, "exact": 2, "diverged": 1, "max_abs_diff": 0.5, "epochs_done": [1], "new_names": ["x", "y"],
         "counters": {"k": 2}, "first_divergence": {"name": "loss", "step": 4}, "rows": 2}
    m = merge_results([a, b])
    assert (m["compared"], m["exact"], m["diverged"], m["rows"]) == (6, 5, 1, 4)
    assert m["max_abs_diff"] == 0.5 and m["epochs_done"] == [1] and m["new_names"] == ["x", "y"]
    assert m["first_divergence"] == {"name": "loss", "step": 4, "rank": 1} and m["counters"] == {"k": 3}
