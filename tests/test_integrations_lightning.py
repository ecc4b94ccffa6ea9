"""PyTorch Lightning integration: real Lightning training on digits, CPU, deterministic.

One recorded job is shared by the slow tests (module fixture): the example script
SIGKILLed at epoch 2 and resumed (a two-run chain covering epochs 0..3), and an
uninterrupted run of the script with the new statements (the reference both for
the resume and for the replays). The new statements change no computation, so the
uninterrupted run of the new script is also the uninterrupted run of the old one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import flightlog as fl

# lightning is only imported by the subprocesses (its import takes seconds)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="needs lightning (pip install 'flightlog[lightning]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "lightning_example.py")
OLD_NAMES = ("train_loss_step", "train_loss_epoch", "val_loss", "val_acc")

HOOK = ('    def configure_optimizers(self):\n',
        '    def on_train_epoch_end(self):\n        pass  # epoch-end hook\n\n    def configure_optimizers(self):\n')
# New statements, as a user would add them to the script of a recorded run
VAL = ('        self.log("val_acc", (logits.argmax(1) == y).float().mean())\n',
       '        self.log("val_acc", (logits.argmax(1) == y).float().mean())\n'
       '        if not self.trainer.sanity_checking:\n'
       '            fl.log("val_err", 1 - (logits.argmax(1) == y).float().mean())\n')
END = ('        pass  # epoch-end hook\n',
       '        pass  # epoch-end hook\n'
       '        fl.log("w_sum", sum(p.sum() for p in self.parameters()))\n')
TRAIN = ('        self.log("train_loss", loss, on_step=True, on_epoch=True)\n',
         '        self.log("train_loss", loss, on_step=True, on_epoch=True)\n'
         '        fl.log("w_norm", sum((p ** 2).sum() for p in self.parameters()))\n')


def _py(args, store, cwd, env=None, timeout=300):
    e = dict(os.environ, FLIGHTLOG_HOME=str(store), FLIGHTLOG_PROGRESS="0", CKPT_EVERY="1", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=str(cwd))


REPLAY = """
import json, sys
from flightlog.replay import pool, runner
script, store, epochs, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with pool.options(store=store):
    res = runner.run(script, ["4"], run="latest", epochs=epochs, workers=workers, store=store, progress=False)
print(json.dumps({"fidelity": res.fidelity, "plan": res.plan_text, "verified": res.verified,
                  "new_names": res.new_names, "segments": [
                      {"role": s.role, "segment": s.segment, "status": s.status, "compared": s.data.get("compared"),
                       "epochs_done": s.data.get("epochs_done"), "error": s.error} for s in res.segments]}))
"""


def replay(script, store, epochs: str, workers: int) -> dict:
    """Replay the store's latest run with ``script`` split into exactly ``workers`` segments (not fitted to
    the machine's idle cores, as the CLI does), workers from the store's warm pool."""
    p = _py(["-c", REPLAY, script, store, epochs, workers], store, os.path.dirname(str(script)), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    """The example killed at epoch 2 and resumed (store s), and the new script run uninterrupted (store full)."""
    tmp = tmp_path_factory.mktemp("lit")
    src = open(EXAMPLE).read().replace(HOOK[0], HOOK[1])  # the recorded script has an (empty) epoch-end hook
    assert VAL[0] in src and END[0] in src and TRAIN[0] in src
    scripts = {"old": src, "epoch": src.replace(*VAL).replace(*END), "all": src.replace(*VAL).replace(*END).replace(*TRAIN)}
    paths = {}
    for k, text in scripts.items():
        (tmp / k).mkdir()
        paths[k] = tmp / k / "train.py"  # one name: a replay script is the recorded one plus statements
        paths[k].write_text(text)
    s, full = tmp / "s", tmp / "full"
    killed = _py([paths["old"], "4"], s, tmp / "old", env={"KILL_AT_EPOCH": "2"})
    resumed = _py(["-m", "flightlog.cli", "resume", "latest", "--", sys.executable, paths["old"], "4"], s,
                  tmp / "old", env={"WEIGHTS_OUT": str(tmp / "res.pt")})
    uninterrupted = _py([paths["all"], "4"], full, tmp / "all", env={"WEIGHTS_OUT": str(tmp / "full.pt")})
    return SimpleNamespace(tmp=tmp, paths=paths, store=str(s), full=str(full), killed=killed, resumed=resumed,
                           uninterrupted=uninterrupted)


def _same_values(lit, names, epochs_from: int) -> None:
    q = (f"SELECT name, epoch, batch, step, value FROM metrics WHERE name IN ({', '.join(repr(n) for n in names)}) "
         f"AND epoch >= {epochs_from} AND SRC ORDER BY name, step")
    got = fl.query(q.replace("SRC", "source = 'replay'"), store=lit.store).to_pylist()
    want = fl.query(q.replace("SRC", "true"), store=lit.full).to_pylist()
    assert got and got == want


def test_import_flightlog_does_not_import_lightning():
    """`import flightlog` (and the integrations package) never imports lightning or transformers."""
    code = ("import sys, flightlog, flightlog.integrations; "
            "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_planner_levels_of_lightning_hooks():
    """Statements in validation/epoch-end hooks of a LightningModule or Callback are epoch level, in training_step
    batch level; the same method names in a class that is not Lightning's stay batch level."""
    from flightlog.replay import planner

    old = ("import flightlog as fl\nimport lightning.pytorch as pl\n\n\nclass Base(pl.LightningModule):\n    pass\n\n\n"
           "class M(Base):\n    def training_step(self, b, i):\n        return 1\n\n"
           "    def validation_step(self, b, i):\n        return 2\n\n\n"
           "class C(pl.Callback):\n    def on_train_epoch_end(self, t, m):\n        pass\n\n\n"
           "class Other:\n    def validation_step(self, b, i):\n        return 3\n")
    new = (old.replace("        return 1\n", "        fl.log('a', 1)\n        return 1\n")
           .replace("        return 2\n", "        fl.log('b', 2)\n        return 2\n")
           .replace("        pass\n\n\nclass Other", "        pass\n        fl.log('c', 3)\n\n\nclass Other")
           .replace("        return 3\n", "        fl.log('d', 4)\n        return 3\n"))
    d = planner.diff_code({"files": {"t.py": old}, "script": "t.py"}, {"t.py": new}, "t.py")
    assert not d.changes
    assert {s.names[0]: s.level for s in d.statements} == {"a": "batch", "b": "epoch", "c": "epoch", "d": "batch"}
    assert "validation_step" in next(s.why for s in d.statements if s.names == ["b"])


@pytest.mark.slow
def test_records_and_resumes_after_sigkill_bit_for_bit(lit):
    """self.log values/hparams/positions/checkpoints are recorded; a run SIGKILLed at epoch 2 resumes bit for bit."""
    assert lit.killed.returncode == -9, lit.killed.stderr[-3000:]
    assert lit.resumed.returncode == 0, lit.resumed.stderr[-3000:]
    assert lit.uninterrupted.returncode == 0, lit.uninterrupted.stderr[-3000:]
    # what the uninterrupted run recorded
    m = fl.query("SELECT name, epoch, batch FROM metrics", store=lit.full).to_pylist()
    steps = [r for r in m if r["name"] == "train_loss_step"]
    assert len(steps) == 40 and {r["batch"] for r in steps} == set(range(10))
    assert sorted(r["epoch"] for r in m if r["name"] == "val_acc") == [0, 1, 2, 3]
    assert all(r["batch"] is None for r in m if r["name"] in ("val_acc", "train_loss_epoch"))
    run = fl.query("SELECT params, status FROM runs", store=lit.full).to_pylist()[0]
    assert '"lr": 0.01' in run["params"] and '"hidden": 32' in run["params"] and run["status"] == "finished"
    ck = fl.query("SELECT iteration, position FROM checkpoints ORDER BY iteration", store=lit.full).to_pylist()
    # validation runs once per epoch, after the last batch: each checkpoint also holds the end-of-batches state
    assert [(c["iteration"], c["position"]) for c in ck] == [(-1, "loop_start")] + [(e, "inner_exit") for e in range(4)]

    import torch

    a, b = torch.load(lit.tmp / "res.pt"), torch.load(lit.tmp / "full.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)
    names = ", ".join(repr(n) for n in OLD_NAMES)
    q = f"SELECT name, epoch, batch, step, value FROM metrics WHERE name IN ({names}) AND RUN ORDER BY name, step"
    res_id = fl.query("SELECT run_id FROM runs WHERE kind = 'resume'", store=lit.store).column(0)[0].as_py()
    got = fl.query(q.replace("RUN", f"run_id = '{res_id}'"), store=lit.store).to_pylist()
    want = [r for r in fl.query(q.replace("RUN", "true"), store=lit.full).to_pylist() if r["epoch"] >= 2]
    assert got and got == want  # same names, positions, steps and values, bit for bit


@pytest.mark.slow
def test_epoch_level_replay_skips_training_batches_and_equals_a_full_rerun(lit):
    """New statements in validation_step and on_train_epoch_end replay at epoch level over the resumed chain:
    no training batch re-executes, one epoch is verified in full, values equal the uninterrupted new script."""
    res = replay(lit.paths["epoch"], lit.store, "1:4", 1)
    assert res["fidelity"] == "exact", res
    assert "epoch-level replay" in res["plan"] and "restores 3 end-of-epoch checkpoint(s)" in res["plan"]
    seg = next(s for s in res["segments"] if s["role"] == "segment")
    # only validation re-ran in the segment: val_loss and val_acc of 3 epochs were compared, no train_loss_*
    assert seg["epochs_done"] == [1, 2, 3] and seg["compared"] == 6, res
    assert res["verified"] > 0  # the verification epoch re-executed in full gave the same new values
    _same_values(lit, ("val_err", "w_sum"), 1)


@pytest.mark.slow
def test_batch_level_replay_in_parallel_segments_equals_a_full_rerun(lit):
    """A new statement in training_step makes the replay batch level; 2 segments restore their checkpoints,
    re-execute every batch, and store values equal to the uninterrupted new script."""
    res = replay(lit.paths["all"], lit.store, "1:4", 2)
    assert res["fidelity"] == "exact", res
    assert "batch-level replay" in res["plan"]
    assert sorted(s["segment"] for s in res["segments"]) == ["1:3", "3:4"]
    _same_values(lit, ("val_err", "w_sum", "w_norm"), 1)
