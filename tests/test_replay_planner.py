"""The replay planner without torch: levels from the loops that run a statement, data flow, fallbacks."""
from __future__ import annotations

import textwrap

from flightlog.replay import planner

BASE = textwrap.dedent('''
    import flightlog as fl

    def train(loader):
        running = 0.0
        for x in fl.loop("batch", loader):
            running += x
            # IN_BATCH
        # AFTER_BATCH_IN_TRAIN
        return running

    lr = 0.1
    best = 0.0
    with fl.checkpointing(model=net, optimizer=opt):
        for epoch in fl.loop("epoch", range(4)):
            # HEAD
            total = train(data)
            lr /= 4
            best = max(best, total)
            fl.log("total", total)
            # EPOCH
    # RUN
''')


def _diff(insert: dict[str, str], base: str = BASE, extra_files: dict | None = None):
    new = base
    for marker, code in insert.items():
        line = next(l for l in base.splitlines() if l.strip() == f"# {marker}")
        indent = line[: len(line) - len(line.lstrip())]
        new = new.replace(line, "\n".join(indent + c for c in code.splitlines()))
    files = {"train.py": base, **(extra_files or {})}
    current = {"train.py": new, **(extra_files or {})}
    return planner.diff_code({"files": files}, current, "train.py")


def _one(d):
    assert not d.changes, d.changes
    assert len(d.statements) == 1
    return d.statements[0]


def test_batch_loop_inside_a_called_function_is_batch_level():
    """A new statement in `def train(): for … in fl.loop("batch")`, called from the epoch loop, is batch level."""
    s = _one(_diff({"IN_BATCH": 'fl.log("x2", x * 2)'}))
    assert s.level == "batch" and s.loops == ["epoch", "batch"]
    assert "train()" in s.why


def test_epoch_statement_after_the_call_skips_the_inner_loop():
    """A statement after the call that runs the batch loop is epoch level and skips `batch`."""
    d = _diff({"EPOCH": 'fl.log("lr", lr)'})
    s = _one(d)
    assert s.level == "epoch" and d.skip_loops == ["batch"] and d.outer_loop == "epoch"


def test_statement_after_the_loop_inside_the_function_is_epoch_level():
    """A statement in train() after its batch loop runs once per epoch, after the skipped loop."""
    d = _diff({"AFTER_BATCH_IN_TRAIN": 'fl.log("running", running)'})
    s = _one(d)
    assert s.level == "epoch" and s.skipped_reads == ["running"]


def test_statement_before_the_inner_loop_is_batch_level():
    """A statement in the epoch body before the inner loop needs the epoch's start state: batch level."""
    d = _diff({"HEAD": 'fl.log("lr_head", lr)'})
    s = _one(d)
    assert s.level == "batch" and d.head_statements and "before its first inner loop" in s.why


def test_reads_of_the_skipped_loop_are_served_from_captured_state_or_replayed():
    """Reading `running` (set in the skipped loop): served when checkpoints captured it, else batch level."""
    d = _diff({"AFTER_BATCH_IN_TRAIN": 'avg = running / 2\nfl.log("avg", avg)'})
    s = _one(d)
    assert "running" in s.reads and s.skipped_reads == ["running"]
    planner.resolve_levels(d, [{"vars": ["running", "x"], "uncaptured": {}}], ["epoch"])
    assert s.level == "epoch" and s.served == ["running"] and "served from the state captured" in s.why
    old = _diff({"AFTER_BATCH_IN_TRAIN": 'fl.log("avg", running / 2)'})
    planner.resolve_levels(old, [None], ["epoch"])  # checkpoints from before loop-variable capture
    s = _one(old)
    assert s.level == "batch" and "reads `running`, set in the skipped loop `batch`" in s.why
    assert old.level == "batch" and old.from_start is None


def test_uncaptured_state_read_by_a_new_statement_falls_back_to_the_start():
    """A new statement reading a variable no checkpoint could capture makes the plan re-execute from the start."""
    d = _diff({"EPOCH": 'fl.log("best", best)'})
    planner.resolve_levels(d, [{"vars": [], "uncaptured": {"best": "cannot be pickled"}}], ["epoch"])
    assert d.from_start and "`best`" in d.from_start and "cannot be pickled" in d.from_start
    ok = _diff({"EPOCH": 'fl.log("lr2", lr)'})
    planner.resolve_levels(ok, [{"vars": ["lr"], "uncaptured": {"writer": "cannot be pickled"}}], ["epoch"])
    assert ok.from_start is None and ok.level == "epoch"


def test_two_top_level_loops_fall_back_to_the_start():
    """A run with two top-level loops (two-phase script) is re-executed from the start, said in the plan."""
    two = BASE + textwrap.dedent('''
        for step in fl.loop("finetune", range(2)):
            fl.log("ft", step)
            # FT
    ''')
    d = _diff({"FT": 'fl.log("ft2", step * 2)'}, base=two)
    assert d.top_loops == ["epoch", "finetune"]
    planner.resolve_levels(d, [{"vars": [], "uncaptured": {}}], ["epoch"])
    assert d.from_start and "2 top-level loops" in d.from_start


def test_run_level_and_uncalled_functions():
    """After the loops → run level; a new log in a function nobody visibly calls → batch (re-executed)."""
    s = _one(_diff({"RUN": 'fl.log("final_best", best)'}))
    assert s.level == "run"
    helper = "import flightlog as fl\n\ndef hook(v):\n    return v\n"
    d = planner.diff_code({"files": {"train.py": BASE, "helpers.py": helper}},
                          {"train.py": BASE, "helpers.py": helper.replace("    return v", "    fl.log('h', v)\n    return v")},
                          "train.py")
    s = _one(d)
    assert s.level == "batch" and "not visibly call" in s.why


def test_guards_and_view_loops_are_allowed_but_code_changes_are_refused():
    """if/for-over-parameters around new statements are allowed; iterating a loader or changing a line is not."""
    d = _diff({"EPOCH": 'if epoch % 2 == 0:\n    for name, p in net.named_parameters():\n        fl.log(name, p)'})
    assert not d.changes and d.statements[0].level == "epoch"
    d = _diff({"EPOCH": 'for xb in data:\n    fl.log("peek", xb)'})
    assert d.changes and "for xb in data" in d.changes[0]
    changed = BASE.replace("lr /= 4", "lr /= 3")
    d = planner.diff_code({"files": {"train.py": BASE}}, {"train.py": changed.replace("# EPOCH", 'fl.log("a", 1)')},
                          "train.py")
    assert any("lr /= 3" in c for c in d.changes)


def test_segments_and_epochs():
    """--epochs parsing and contiguous, balanced worker segments."""
    assert planner.parse_epochs("1:3", list(range(5))) == [1, 2]
    assert planner.parse_epochs("3:", list(range(5))) == [3, 4]
    assert planner.split_segments([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    acts, emit = planner.segment_actions([3, 4], "epoch", {i: "inner_exit" for i in range(5)})
    assert acts == {3: "tail", 4: "tail"} and emit == [3, 4]
    acts, emit = planner.segment_actions([3, 4], "batch", {i: "inner_exit" for i in range(5)})
    assert acts == {2: "tail", 3: "full", 4: "full"}
