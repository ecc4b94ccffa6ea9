"""Transformers integration: a tiny BERT built from a config, synthetic tokens, CPU, nothing downloaded.

One recorded job is shared by the slow tests (module fixture): the example script,
with a callback hook and a ``compute_loss`` override (where hindsight statements
go in a Trainer script), saving the Trainer's own checkpoint each epoch, SIGKILLed
at epoch 2 and resumed (a two-run chain), and an uninterrupted run of the script
with the new statements (the reference for the resume and the replay: the new
statements change no computation).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

import flightlog as fl

# transformers is only imported by the subprocesses (its import takes seconds)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                                or importlib.util.find_spec("accelerate") is None,
                                reason="needs transformers and accelerate (pip install 'flightlog[transformers]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "transformers_example.py")
TRAINED = ("loss", "grad_norm", "learning_rate", "eval_loss")  # deterministic logs (not runtimes)

HOOKS = '''
class Probe(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        pass


class ProbeTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return out


def main('''
NEW = (("        pass\n", '        pass\n        fl.log("probe_lr", kw["optimizer"].param_groups[0]["lr"])\n'),
       ("        return out\n", '        fl.log("probe_loss", out[0] if isinstance(out, tuple) else out)\n'
                               "        return out\n"))


def _py(args, store, cwd, env=None, timeout=300):
    e = dict(os.environ, FLIGHTLOG_HOME=str(store), FLIGHTLOG_PROGRESS="0", HF_HUB_OFFLINE="1", CKPT_EVERY="1",
             **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=str(cwd))


REPLAY = """
import json, sys
from flightlog.replay import pool, runner
script, store, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
with pool.options(store=store):
    res = runner.run(script, ["3"], run="latest", workers=workers, store=store, progress=False)
print(json.dumps({"fidelity": res.fidelity, "plan": res.plan_text, "new_names": res.new_names, "segments": [
    {"segment": s.segment, "status": s.status, "compared": s.data.get("compared"), "error": s.error}
    for s in res.segments]}))
"""


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The example (plus hooks) killed at epoch 2 and resumed with Trainer saves (store s), and the new script
    run uninterrupted (store full)."""
    tmp = tmp_path_factory.mktemp("hf")
    src = open(EXAMPLE).read()
    old = (src.replace("\ndef main(", HOOKS, 1).replace("trainer = Trainer(", "trainer = ProbeTrainer(")
           .replace("callbacks = [FlightlogCallback(every=every)]", "callbacks = [FlightlogCallback(every=every), Probe()]"))
    new = old
    for a, b in NEW:
        new = new.replace(a, b, 1)
    assert "trainer = ProbeTrainer(" in old and "Probe()]" in old and new.count('fl.log("probe') == 2
    paths = {}
    for k, text in (("old", old), ("new", new)):
        (tmp / k).mkdir()
        paths[k] = tmp / k / "train.py"
        paths[k].write_text(text)
    s, full, out = tmp / "s", tmp / "full", tmp / "out"
    env = {"SAVE_STRATEGY": "epoch", "OUT_DIR": str(out)}
    killed = _py([paths["old"], "3"], s, tmp / "old", env=dict(env, KILL_AT_EPOCH="2"))
    resumed = _py(["-m", "flightlog.cli", "resume", "latest", "--", sys.executable, paths["old"], "3"], s, tmp / "old",
                  env=dict(env, WEIGHTS_OUT=str(tmp / "res.pt")))
    uninterrupted = _py([paths["new"], "3"], full, tmp / "new",
                        env={"SAVE_STRATEGY": "epoch", "OUT_DIR": str(tmp / "out_full"),
                             "WEIGHTS_OUT": str(tmp / "full.pt")})
    return SimpleNamespace(tmp=tmp, paths=paths, store=str(s), full=str(full), out=out, killed=killed,
                           resumed=resumed, uninterrupted=uninterrupted)


def _checkpoints(store):
    return fl.query("SELECT run_id, iteration, content_hash, bytes FROM checkpoints ORDER BY iteration",
                    store=store).to_pylist()


def test_planner_levels_of_trainer_hooks():
    """New statements in a TrainerCallback hook or a compute_metrics passed by keyword are batch level (the
    Trainer calls them from its loops); one after trainer.train() is run level."""
    from flightlog.replay import planner

    old = ("import flightlog as fl\nfrom transformers import Trainer, TrainerCallback\n\n\n"
           "def compute_metrics(p):\n    return {}\n\n\n"
           "class CB(TrainerCallback):\n    def on_evaluate(self, args, state, control, **kw):\n        pass\n\n\n"
           "def main():\n    t = Trainer(model=None, compute_metrics=compute_metrics, callbacks=[CB()])\n"
           "    t.train()\n    print(1)\n\n\nmain()\n")
    new = (old.replace("    return {}\n", "    fl.log('m', 1)\n    return {}\n")
           .replace("        pass\n", "        pass\n        fl.log('e', 2)\n")
           .replace("    print(1)\n", "    print(1)\n    fl.log('r', 3)\n"))
    d = planner.diff_code({"files": {"t.py": old}, "script": "t.py"}, {"t.py": new}, "t.py")
    assert not d.changes
    assert {s.names[0]: s.level for s in d.statements} == {"m": "batch", "e": "batch", "r": "run"}


@pytest.mark.slow
def test_records_logs_args_positions_eval_and_resumes_bit_for_bit(hf):
    """Trainer logs/eval/args are recorded with epoch/step positions; a SIGKILLed run resumes bit for bit."""
    assert hf.killed.returncode == -9, hf.killed.stderr[-3000:]
    assert hf.resumed.returncode == 0, hf.resumed.stderr[-3000:]
    assert hf.uninterrupted.returncode == 0, hf.uninterrupted.stderr[-3000:]
    # what a full run records
    m = fl.query("SELECT name, epoch, batch FROM metrics", store=hf.full).to_pylist()
    loss = [r for r in m if r["name"] == "loss"]
    assert len(loss) == 6 and {r["epoch"] for r in loss} == {0, 1, 2} and {r["batch"] for r in loss} == {1, 3}
    assert sorted(r["epoch"] for r in m if r["name"] == "eval_loss") == [0, 1, 2]
    assert all(r["batch"] is None for r in m if r["name"] == "eval_loss")
    assert [(r["epoch"], r["batch"]) for r in m if r["name"] == "train_loss"] == [(None, None)]  # run level
    params = fl.query("SELECT params FROM runs", store=hf.full).column(0)[0].as_py()
    assert '"learning_rate": 0.003' in params and '"num_train_epochs": 3' in params
    assert [c["iteration"] for c in _checkpoints(hf.full)] == [-1, 0, 1, 2]

    # the resumed continuation equals the uninterrupted run
    import torch

    a, b = torch.load(hf.tmp / "res.pt"), torch.load(hf.tmp / "full.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)
    names = ", ".join(f"'{n}'" for n in TRAINED)
    q = f"SELECT name, epoch, batch, step, value FROM metrics WHERE name IN ({names}) AND RUN ORDER BY name, step"
    rid = fl.query("SELECT run_id FROM runs WHERE kind = 'resume'", store=hf.store).column(0)[0].as_py()
    got = fl.query(q.replace("RUN", f"run_id = '{rid}'"), store=hf.store).to_pylist()
    want = [r for r in fl.query(q.replace("RUN", "true"), store=hf.full).to_pylist() if r["epoch"] >= 2]
    assert got and got == want


@pytest.mark.slow
def test_epoch_end_checkpoints_reference_the_trainers_folders(hf):
    """Where the Trainer saved at an epoch end the checkpoint is a reference (folder, sizes, digests), not a copy;
    a changed or missing file makes it refused and an earlier checkpoint is used."""
    from flightlog import _checkpoint, _warn
    from flightlog.integrations import _common
    from flightlog.integrations._trainer_folders import REF, start_from

    ck = _checkpoints(hf.store)
    assert [c["iteration"] for c in ck] == [-1, 0, 1, 2]
    refs = {}
    for c in ck:
        objs = _checkpoint.load(hf.store, c["content_hash"])["objects"]
        if c["iteration"] < 0:
            assert "model" in objs and REF not in objs  # before training the Trainer saved nothing: flightlog's own
            continue
        assert set(objs) == {REF} and c["bytes"] < ck[0]["bytes"] / 4  # no second copy of the weights
        refs[c["iteration"]] = (c["content_hash"], objs[REF][1])
    steps = {e: int(os.path.basename(r[1]["folder"]).split("-")[1]) for e, r in refs.items()}
    assert steps == {0: 4, 1: 8, 2: 12} and all(r[1]["folder"].startswith(str(hf.out)) for r in refs.values())
    assert all(_common.check_manifest(r[1]) is None for r in refs.values())

    folder = refs[1][1]["folder"]
    target = os.path.join(folder, "trainer_state.json")
    saved = open(target, "rb").read()
    cands = [(1, refs[1][0]), (0, refs[0][0])]
    try:
        with open(target, "wb") as fh:  # same size, one byte changed
            fh.write(saved.replace(b'"global_step": 8', b'"global_step": 9'))
        why = _common.check_manifest(refs[1][1])
        assert why and "trainer_state.json changed" in why
        _warn.reset()
        with pytest.warns(Warning, match="epoch 1 is not used"):
            it, got, _payload, tmp = start_from(hf.store, cands, str(hf.tmp), "test")
        assert (it, got, tmp) == (0, refs[0][1]["folder"], False) and _warn.counters.get("checkpoint_unusable") == 1
    finally:
        with open(target, "wb") as fh:
            fh.write(saved)
    moved = folder + ".away"
    shutil.move(folder, moved)
    try:
        assert "missing" in _common.check_manifest(refs[1][1])
    finally:
        shutil.move(moved, folder)
    assert start_from(hf.store, cands, str(hf.tmp), "test")[:2] == (1, folder)


@pytest.mark.slow
def test_batch_level_replay_in_parallel_segments_equals_a_full_rerun(hf):
    """New fl.log in a callback's on_step_end and in a compute_loss override, replayed over the resumed chain in
    2 segments (the second from the Trainer's own checkpoint folder), equal the uninterrupted new script."""
    p = _py(["-c", REPLAY, hf.paths["new"], hf.store, 2], hf.store, hf.tmp / "new", timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["fidelity"] == "exact", res
    assert "batch-level replay" in res["plan"] and sorted(res["new_names"]) == ["probe_loss", "probe_lr"]
    assert sorted(s["segment"] for s in res["segments"]) == ["0:2", "2:3"]
    assert all(s["compared"] > 0 for s in res["segments"])  # recorded losses, grad norms, lrs, eval losses re-computed
    q = "SELECT name, epoch, batch, step, value FROM metrics WHERE name LIKE 'probe%' AND SRC ORDER BY name, step"
    got = fl.query(q.replace("SRC", "source = 'replay'"), store=hf.store).to_pylist()
    want = fl.query(q.replace("SRC", "true"), store=hf.full).to_pylist()
    assert len(want) == 3 * 4 + 3 * 5 and got == want  # 4 steps an epoch; 4 training + 1 evaluation loss


@pytest.mark.slow
def test_two_gloo_ranks_record_resume_and_replay_exactly(tmp_path):
    """torchrun with 2 gloo processes: one run with a rank on every row; after SIGKILL the resume (from
    flightlog's own checkpoints, each rank given its own RNG file) equals the uninterrupted run bit for bit;
    replaying new statements runs each segment as 2 ranks and equals a full torchrun re-run of the new script."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    src = open(EXAMPLE).read()
    old = (src.replace("\ndef main(", HOOKS, 1).replace("trainer = Trainer(", "trainer = ProbeTrainer(")
           .replace("torch.manual_seed(0)", 'torch.manual_seed(0)\n    seed = int(os.environ.get("RANK") or 0)')
           .replace("seed=0,", "seed=seed,")  # every rank its own RNG streams (dropout masks differ by rank)
           .replace("callbacks = [FlightlogCallback(every=every)]", "callbacks = [FlightlogCallback(every=every), Probe()]"))
    new = old
    for a, b in NEW:
        new = new.replace(a, b, 1)
    assert "seed=seed," in old and new.count('fl.log("probe') == 2
    for k, text in (("old", old), ("new", new)):
        (tmp_path / k).mkdir()
        (tmp_path / k / "train.py").write_text(text)
    s, full = tmp_path / "s", tmp_path / "full"
    env = {"OMP_NUM_THREADS": "1"}
    p = _py(torchrun + [tmp_path / "old" / "train.py", "3"], s, tmp_path / "old",
            env=dict(env, KILL_AT_EPOCH="2", OUT_DIR=str(tmp_path / "o1")))
    assert p.returncode != 0
    p = _py(["-m", "flightlog.cli", "resume", "latest", "--", sys.executable] + torchrun +
            [tmp_path / "old" / "train.py", "3"], s, tmp_path / "old",
            env=dict(env, OUT_DIR=str(tmp_path / "o2"), WEIGHTS_OUT=str(tmp_path / "res.pt")))
    assert p.returncode == 0, p.stderr[-3000:]
    p = _py(torchrun + [tmp_path / "new" / "train.py", "3"], full, tmp_path / "new",
            env=dict(env, OUT_DIR=str(tmp_path / "o3"), WEIGHTS_OUT=str(tmp_path / "full.pt")))
    assert p.returncode == 0, p.stderr[-3000:]
    import torch

    a, b = torch.load(tmp_path / "res.pt"), torch.load(tmp_path / "full.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert fl.query("SELECT count(DISTINCT run_id) FROM metrics WHERE rank = 1", store=str(s)).column(0)[0].as_py() == 2

    p = _py(["-m", "flightlog.cli", "replay", tmp_path / "new" / "train.py", "--run", "latest", "--store", s],
            s, tmp_path / "new", env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "batch-level replay" in p.stdout and "fidelity: exact" in p.stdout, p.stdout
    q = ("SELECT rank, name, epoch, batch, step, value FROM metrics WHERE name LIKE 'probe%' AND SRC "
         "ORDER BY rank, name, step")
    got = fl.query(q.replace("SRC", "source = 'replay'"), store=str(s)).to_pylist()
    want = fl.query(q.replace("SRC", "true"), store=str(full)).to_pylist()
    assert {r["rank"] for r in want} == {0, 1} and got == want
