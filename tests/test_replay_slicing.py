"""Tail slicing: what an epoch-level replay skips of the epoch's tail, and the fallback when it was wrong."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import flightlog as fl
import flightlog.replay
from flightlog.replay import planner, slicing

TEMPLATE = '''
import flightlog as fl

net, opt, sched = Net(), Opt(), Sched()
best, bad, lr = 0.0, 0, 1.0
history = []


def evaluate():
    return net.score()


def train():
    for b in fl.loop("batch", range(3)):
        opt.step()


with fl.checkpointing(net=net):
    for epoch in fl.loop("epoch", range(5)):
        LR_HEAD
        train()
TAIL
'''


def _plan(tail: str, new: str, head: str = "pass") -> planner.CodeDiff:
    """Plan the tail slice of TEMPLATE whose epoch tail is ``tail`` plus ``new`` (new lines, at the end)."""
    ind = textwrap.indent(textwrap.dedent(tail).strip("\n"), " " * 8)
    old = TEMPLATE.replace("LR_HEAD", head).replace("TAIL", ind)
    cur = TEMPLATE.replace("LR_HEAD", head).replace("TAIL", ind + "\n" + textwrap.indent(
        textwrap.dedent(new).strip("\n"), " " * 8))
    diff = planner.diff_code({"files": {"train.py": old}}, {"train.py": cur}, "train.py")
    assert not diff.changes
    planner.resolve_levels(diff, [{"vars": [], "uncaptured": {}}], ["epoch"])
    planner.plan_tail_slice(diff, "train.py")
    return diff


def _skipped(diff) -> list[str]:
    return [t for t in diff.slice.text] if diff.slice is not None else []


def test_a_log_only_validation_is_skipped():
    """A recorded log whose value nothing new reads is skipped; the new statement is kept."""
    d = _plan('fl.log("val_acc", evaluate())\nprint("epoch", epoch)', 'fl.log("w", net.norm())')
    assert _skipped(d) == ['fl.log("val_acc", evaluate())', 'print("epoch", epoch)']


def test_a_chain_of_names_the_new_statement_reads_is_kept():
    """best-so-far from a history list: the assignment and the append feeding it stay, the old log goes."""
    d = _plan('acc = evaluate()\nhistory.append(acc)\nfl.log("val_acc", acc)', 'fl.log("best", max(history))')
    assert _skipped(d) == ['fl.log("val_acc", acc)']
    assert d.slice.kept == 2


def test_early_stopping_and_effects_are_kept():
    """A break and what decides it, and a bare call made for its effect (scheduler.step), always run."""
    tail = '''
        acc = evaluate()
        fl.log("val_acc", acc)
        if acc > best:
            best, bad = acc, 0
        else:
            bad += 1
        sched.step()
        if bad > 3:
            break
    '''
    d = _plan(tail, 'fl.log("w", net.norm())')
    assert _skipped(d) == ['fl.log("val_acc", acc)']
    assert d.slice.kept == 4


def test_a_name_the_next_epoch_head_reads_is_kept():
    """`lr` set in the tail and read before the inner loop of the next epoch is not skipped."""
    d = _plan('lr = lr * 0.5\nfl.log("lr_old", lr)', 'fl.log("w", net.norm())', head="opt.lr = lr")
    assert _skipped(d) == ['fl.log("lr_old", lr)']


def test_names_changed_inside_a_called_function_are_followed():
    """A function that appends to a global list: calling it is kept when the new statement reads the list."""
    tail = '''
        def note():
            history.append(evaluate())
        acc = note()
        fl.log("val_acc", evaluate())
    '''
    d = _plan(tail, 'fl.log("n", len(history))')
    assert _skipped(d) == ['fl.log("val_acc", evaluate())']


def test_nothing_to_skip_and_batch_level_say_why():
    """A tail the new statement needs entirely, and a batch-level plan, are not sliced, with a reason."""
    d = _plan('sched.step()', 'fl.log("w", net.norm())')
    assert d.slice is None and "needed" in d.slice_why
    old = TEMPLATE.replace("LR_HEAD", "pass").replace("TAIL", "        pass")
    cur = old.replace("        opt.step()", "        opt.step()\n        fl.log('g', 1.0)")
    diff = planner.diff_code({"files": {"train.py": old}}, {"train.py": cur}, "train.py")
    planner.resolve_levels(diff, [{"vars": [], "uncaptured": {}}], ["epoch"])
    planner.plan_tail_slice(diff, "train.py")
    assert diff.slice is None and "batch-level" in diff.slice_why


def test_sliceable_epochs_need_a_restore_after_them():
    """A tail epoch leading into a full one, or into run-level code after the loop, keeps its whole tail."""
    assert slicing.sliceable_epochs({0: "tail", 1: "tail", 2: "tail"}, False) == [0, 1, 2]
    assert slicing.sliceable_epochs({0: "tail", 1: "full", 2: "tail"}, False) == [2]  # 0 leads into 1
    assert slicing.sliceable_epochs({0: "tail", 1: "tail"}, True) == [0]


def test_the_worker_guard_keeps_the_script_s_own_locations(tmp_path):
    """The worker's guarded compile runs every statement by default, and tracebacks keep the script's lines."""
    from flightlog.replay import _worker

    src = b"import flightlog as fl\nout = []\nfor i in fl.loop('e', range(3)):\n    out.append(i)\n    x = 1 / (2 - i)\n"
    code = _worker._guarded_code(src, str(tmp_path / "s.py"))
    assert code is not None
    g: dict = {}
    with pytest.raises(ZeroDivisionError) as ei:
        exec(code, g)
    assert g["out"] == [0, 1, 2]
    assert ei.traceback[-1].lineno + 1 == 5  # 0-based in pytest's traceback entry


# -- end to end: real workers on a quick pure-Python loop ---------------------------------------------

SCRIPT = r'''
import flightlog as fl


class Model:
    """A model whose evaluation leaves it in eval mode: an effect the names cannot see."""

    def __init__(self):
        self.w = [0.0, 0.0]
        self.mode = "train"

    def state_dict(self):
        return {"w": list(self.w), "mode": self.mode}

    def load_state_dict(self, d):
        self.w[:] = d["w"]
        self.mode = d["mode"]

    def score(self):
        self.mode = "eval"
        return -abs(self.w[0] - 3.0)


net = Model()
with fl.checkpointing(net=net, every=1):
    for epoch in fl.loop("epoch", range(6)):
        net.mode = "train"
        for b in fl.loop("batch", range(5)):
            net.w[0] += 0.1 * (b + 1)
            net.w[1] -= 0.01
        fl.log("val", net.score())
        fl.log("half", net.w[0] / 2)
        # NEW
'''


def _record(tmp_path, code):
    (tmp_path / "train.py").write_text(code)
    store = str(tmp_path / "store")
    p = subprocess.run([sys.executable, "train.py"], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0"))
    assert p.returncode == 0, p.stderr
    return store


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sliced_replay_equals_a_full_rerun_and_a_wrong_slice_falls_back(tmp_path):
    """Skipping the tail's recorded logs gives the full re-run's values; a new statement that reads what a
    skipped call changed unseen (the model's mode) is caught by the verification epoch, and the replay
    re-runs with the whole tail, storing the right values and saying so."""
    (tmp_path / "rec").mkdir()
    store = _record(tmp_path / "rec", SCRIPT)
    new = SCRIPT.replace("        # NEW", '        fl.log("w1", net.w[1])\n        fl.log("evalmode", float(net.mode == "eval"))')
    (tmp_path / "full").mkdir()
    truth = _record(tmp_path / "full", new)
    want = fl.dataframe("w1", "evalmode", store=truth)

    # 1. only the weight: val and half are skipped, values exact
    only_w = SCRIPT.replace("        # NEW", '        fl.log("w1", net.w[1])')
    path = tmp_path / "rec" / "only_w.py"
    path.write_text(only_w)
    plan = flightlog.replay.run(str(path), run="latest", store=store, dry_run=True, cold=True)
    assert "tail slicing: skips 2 statement(s)" in plan.plan_text and 'fl.log("val", net.score())' in plan.plan_text
    res = flightlog.replay.run(str(path), run="latest", store=store, cold=True)
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]
    assert sum(int(s.data.get("skipped_statements", 0)) for s in res.segments) == 2 * 6
    assert res.compared > 0  # the verification epoch re-computed the recorded logs
    got = fl.dataframe("w1", store=store)
    assert got["w1"].dropna().tolist() == want["w1"].dropna().tolist()
    assert not any("fell back" in v for v in res.verification)
    # without verification nothing checks the slice: the verdict says so (never `exact`)
    res = flightlog.replay.run(str(path), run="latest", store=store, cold=True, verify=False)
    assert res.ok and res.fidelity == "unchecked" and res.compared == 0
    assert fl.dataframe("w1", store=store)["w1"].dropna().tolist() == want["w1"].dropna().tolist()

    # 2. the mode: the sliced path says 0.0, the full epoch 1.0 -> fallback to the whole tail, right values
    path2 = tmp_path / "rec" / "mode.py"
    path2.write_text(new)
    res = flightlog.replay.run(str(path2), run="latest", store=store, cold=True)
    assert res.ok and res.fidelity == "exact", [s.error for s in res.segments]
    assert any("tail slicing fell back" in v and "evalmode" in v for v in res.verification), res.verification
    assert all(int(s.data.get("skipped_statements", 0)) == 0 for s in res.segments)
    got = fl.dataframe("evalmode", store=store)
    assert got["evalmode"].dropna().tolist() == want["evalmode"].dropna().tolist() == [1.0] * 6
