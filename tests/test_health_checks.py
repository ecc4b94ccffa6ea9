"""Every built-in health check on a planted fault and on a clean run (rows planted with LocalSink)."""
from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from flightlog.collector import schema as sch
from flightlog.collector.store import LocalSink
from flightlog.query.health import health

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)


def plant(store, table, rows):
    LocalSink(store).write(table, pa.Table.from_pylist(rows, schema=sch.schema(table)))


def add_run(store, rid, project="p", started=T0, status="finished", **kw):
    plant(store, "runs", [dict(run_id=rid, project=project, kind="train", status=status, started_at=started,
                               updated_at=started, ended_at=started + dt.timedelta(hours=1), **kw)])


def add_series(store, rid, name, per_epoch, batches=4, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for e, v in enumerate(per_epoch):
        for b in range(batches):
            val = v + noise * rng.standard_normal() if isinstance(v, float) and math.isfinite(v) else v
            rows.append(dict(run_id=rid, name=name, value=val, step=e * batches + b, epoch=e, batch=b))
    plant(store, "metrics", rows)


def one(store, check, run="latest", **kw):
    rep = health(run, store=store, checks=[check], **kw)
    assert len(rep) == 1 and rep[0].name == check
    assert rep[0].error is None, rep[0].error
    return rep[0]


DECREASING = [2.0 / (e + 1) for e in range(10)]


# -- metrics -------------------------------------------------------------------------


def test_nonfinite_flags_nan_and_inf_with_first_step(store):
    """nonfinite fails naming the metric, the count and the first bad step and epoch."""
    add_run(store, "r1")
    vals = DECREASING[:6] + [float("nan"), float("inf"), 0.1, 0.1]
    add_series(store, "r1", "loss", vals, batches=2)
    res = one(store, "nonfinite")
    assert res.status == "fail"
    row = res.evidence.to_pylist()[0]
    assert row["metric"] == "loss" and row["nonfinite_values"] == 4
    assert row["first_step"] == 12 and row["first_epoch"] == 6


def test_nonfinite_passes_clean_run(store):
    """nonfinite passes when every value is finite."""
    add_run(store, "r1")
    add_series(store, "r1", "loss", DECREASING)
    assert one(store, "nonfinite").status == "pass"


def test_divergence_finds_first_spike_and_respects_override(store):
    """divergence fails at the first epoch far above the running minimum; a larger factor passes."""
    add_run(store, "r1")
    add_series(store, "r1", "train_loss", DECREASING[:5] + [3.0, 9.0, 20.0, 40.0, 80.0], noise=0.01)
    res = one(store, "divergence")
    assert res.status == "fail"
    row = res.evidence.to_pylist()[0]
    assert row["metric"] == "train_loss" and row["epoch"] == 5 and row["running_min"] == pytest.approx(0.4, abs=0.02)
    assert one(store, "divergence", params={"divergence.factor": 1000}).status == "pass"


def test_divergence_passes_noisy_decreasing_loss(store):
    """divergence passes a noisy but decreasing loss, and ignores metrics outside its name pattern."""
    add_run(store, "r1")
    add_series(store, "r1", "loss", DECREASING, noise=0.05)
    add_series(store, "r1", "lr", [0.001] * 5 + [1.0] * 5)
    assert one(store, "divergence").status == "pass"


def test_divergence_on_step_buckets_without_epochs(store):
    """Metrics logged outside fl.loop are bucketed by step, so a spike is still found."""
    add_run(store, "r1")
    rows = [dict(run_id="r1", name="loss", value=(1.0 / (1 + s / 100) if s < 3000 else 50.0), step=s)
            for s in range(4000)]
    plant(store, "metrics", rows)
    res = one(store, "divergence")
    assert res.status == "fail" and res.evidence.column("step").to_pylist()[0] >= 3000


def test_plateau_warns_after_patience_epochs(store):
    """plateau warns when the loss stops improving for `patience` epochs."""
    add_run(store, "r1")
    add_series(store, "r1", "loss", [2.0, 1.0, 0.5] + [0.5] * 7)
    res = one(store, "plateau")
    assert res.status == "warn"
    row = res.evidence.to_pylist()[0]
    assert row["best_epoch"] == 2 and row["points_without_improvement"] == 7
    assert one(store, "plateau", params={"plateau.patience": "8"}).status == "pass"


def test_plateau_passes_improving_loss(store):
    """plateau passes a loss that keeps improving."""
    add_run(store, "r1")
    add_series(store, "r1", "loss", DECREASING)
    assert one(store, "plateau").status == "pass"


def test_overfitting_warns_on_widening_gap(store):
    """overfitting warns when val loss rises from its best while train loss keeps falling."""
    add_run(store, "r1")
    add_series(store, "r1", "train_loss", DECREASING)
    add_series(store, "r1", "val_loss", [2.0, 1.2, 0.9, 0.8, 0.85, 0.95, 1.1, 1.3, 1.5, 1.7])
    res = one(store, "overfitting")
    assert res.status == "warn"
    row = res.evidence.to_pylist()[0]
    assert row["val_metric"] == "val_loss" and row["train_metric"] == "train_loss" and row["best_epoch"] == 3


def test_overfitting_understands_accuracy_direction(store):
    """For accuracy, higher is better: falling val_acc with rising acc is overfitting."""
    add_run(store, "r1")
    add_series(store, "r1", "acc", [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 1.0])
    add_series(store, "r1", "val_acc", [0.5, 0.7, 0.8, 0.82, 0.78, 0.74, 0.70, 0.66])
    res = one(store, "overfitting")
    assert res.status == "warn" and res.evidence.column("train_metric").to_pylist() == ["acc"]


def test_overfitting_passes_when_both_improve(store):
    """overfitting passes when train and validation improve together."""
    add_run(store, "r1")
    add_series(store, "r1", "train_loss", DECREASING)
    add_series(store, "r1", "val_loss", [v + 0.1 for v in DECREASING])
    add_series(store, "r1", "val_acc", [0.5 + e / 30 for e in range(10)])
    assert one(store, "overfitting").status == "pass"


# -- steps ------------------------------------------------------------------------------


def span(rid, name, i, status="ok", ms=10.0, start=T0, **kw):
    st = start + dt.timedelta(seconds=i)
    return dict(run_id=rid, trace_id="t", span_id=f"{rid}-{name}-{i:05d}", name=name, start_time=st,
                end_time=st + dt.timedelta(milliseconds=ms), duration_ms=ms, status=status, **kw)


def test_failed_steps_lists_each_failing_call(store):
    """failed_steps fails with one evidence row per failing call: step, span id, error."""
    add_run(store, "r1")
    rows = [span("r1", "clean", i) for i in range(20)]
    rows += [span("r1", "clean", 100 + i, status="error", error_type="KeyError", error_message="'age'", epoch=2)
             for i in range(3)]
    plant(store, "spans", rows)
    res = one(store, "failed_steps")
    assert res.status == "fail" and res.evidence.num_rows == 3
    r0 = res.evidence.to_pylist()[0]
    assert r0["step"] == "clean" and r0["failures"] == 3 and r0["error_type"] == "KeyError"
    assert r0["span_id"] == "r1-clean-00100" and r0["epoch"] == 2
    assert one(store, "failed_steps", params={"failed_steps.max_failures": 3}).status == "pass"


def test_failed_steps_passes_without_errors(store):
    """failed_steps passes when every call succeeded."""
    add_run(store, "r1")
    plant(store, "spans", [span("r1", "clean", i) for i in range(5)])
    assert one(store, "failed_steps").status == "pass"


def _duration_history(store, current_ms):
    rng = np.random.default_rng(1)
    for k in range(3):
        rid = f"h{k}"
        add_run(store, rid, started=T0 + k * DAY)
        plant(store, "spans", [span(rid, "featurize", i, ms=float(10 + rng.random())) for i in range(50)])
        plant(store, "spans", [span(rid, "other", i, ms=5.0) for i in range(50)])
    add_run(store, "cur", started=T0 + 5 * DAY)
    plant(store, "spans", [span("cur", "featurize", i, ms=float(current_ms + rng.random())) for i in range(50)])
    plant(store, "spans", [span("cur", "other", i, ms=5.0) for i in range(50)])
    add_run(store, "other_project", project="q", started=T0 + 4 * DAY)
    plant(store, "spans", [span("other_project", "featurize", i, ms=500.0) for i in range(50)])


def test_step_duration_flags_p95_regression(store):
    """step_duration warns when a step's p95 is far above its history in earlier runs of the project."""
    _duration_history(store, 40.0)
    res = one(store, "step_duration", run="cur")
    assert res.status == "warn"
    row = res.evidence.to_pylist()[0]
    assert row["step"] == "featurize" and row["history_runs"] == 3 and row["ratio"] > 3


def test_step_duration_passes_steady_durations(store):
    """step_duration passes when durations match history (other projects' runs are ignored)."""
    _duration_history(store, 10.0)
    assert one(store, "step_duration", run="cur").status == "pass"


# -- lineage ----------------------------------------------------------------------------------


def io_row(rid, step, direction, fp, t, arg="df", span_id=None, summary=None):
    return dict(run_id=rid, span_id=span_id or f"{rid}-{step}", step_name=step, direction=direction, arg=arg,
                fingerprint=fp, type="pandas.DataFrame", time=t, summary=summary)


def test_stale_inputs_flags_superseded_input(store):
    """An input whose producing step had already written a newer version when it was used is superseded."""
    add_run(store, "etl1", started=T0)
    plant(store, "io", [io_row("etl1", "build_features", "output", "fpA", T0, arg="return")])
    add_run(store, "etl2", started=T0 + DAY)
    plant(store, "io", [io_row("etl2", "build_features", "output", "fpB", T0 + DAY, arg="return")])
    add_run(store, "train", started=T0 + 2 * DAY)
    plant(store, "io", [io_row("train", "fit", "input", "fpA", T0 + 2 * DAY)])
    res = one(store, "stale_inputs")
    assert res.status == "warn"
    row = res.evidence.to_pylist()[0]
    assert row["problem"] == "superseded" and row["producer"] == "build_features" and row["newer_fingerprint"] == "fpB"


def test_stale_inputs_flags_old_input(store):
    """An input produced longer than max_age_days before it was used is stale."""
    add_run(store, "etl", started=T0)
    plant(store, "io", [io_row("etl", "load", "output", "fpA", T0, arg="return")])
    add_run(store, "train", started=T0 + 40 * DAY)
    plant(store, "io", [io_row("train", "fit", "input", "fpA", T0 + 40 * DAY)])
    res = one(store, "stale_inputs")
    assert res.status == "warn" and res.evidence.to_pylist()[0]["problem"] == "stale"
    assert res.evidence.to_pylist()[0]["age_days"] == pytest.approx(40.0)
    assert one(store, "stale_inputs", params={"stale_inputs.max_age_days": 60}).status == "pass"


def test_stale_inputs_passes_fresh_lineage_and_per_batch_pipelines(store):
    """Latest-version inputs pass, and a producer writing a new batch after each use is not superseded."""
    add_run(store, "etl1", started=T0)
    plant(store, "io", [io_row("etl1", "build_features", "output", "fpA", T0, arg="return")])
    add_run(store, "etl2", started=T0 + DAY)
    plant(store, "io", [io_row("etl2", "build_features", "output", "fpB", T0 + DAY, arg="return")])
    add_run(store, "train", started=T0 + 2 * DAY)
    rows = [io_row("train", "fit", "input", "fpB", T0 + 2 * DAY)]
    for i in range(5):  # load batch i, then consume it
        t = T0 + 2 * DAY + dt.timedelta(seconds=10 * i)
        rows.append(io_row("train", "load_batch", "output", f"b{i}", t, arg="return"))
        rows.append(io_row("train", "step", "input", f"b{i}", t + dt.timedelta(seconds=1), arg="batch"))
    plant(store, "io", rows)
    assert one(store, "stale_inputs").status == "pass"


# -- assertions, replays, record loss ----------------------------------------------------------


def test_assertion_rate_fails_above_threshold(store):
    """assertion_rate fails for an assertion whose failed/checked share is above max_rate."""
    add_run(store, "r1")
    rows = []
    for e in range(3):
        for name, failed in (("finite", 0), ("range", 20)):
            rows.append(dict(run_id="r1", assertion=name, item_id=None, severity=100.0, epoch=e,
                             message=json.dumps({"checked": 100, "failed": failed if e else 0})))
    rows.append(dict(run_id="r1", assertion="range", item_id="7", severity=2.0, message="outside", epoch=1))
    rows.append(dict(run_id="r1", assertion="odd", item_id=None, severity=10.0, message="not json"))
    plant(store, "assertions", rows)
    res = one(store, "assertion_rate")
    assert res.status == "fail"
    assert res.evidence.to_pylist() == [dict(assertion="range", checked=300, failed=40, rate=0.1333, first_epoch=1)]
    assert one(store, "assertion_rate", params={"assertion_rate.max_rate": 0.2}).status == "pass"


def test_replay_divergence_fails_on_diverged_or_failed_replays(store):
    """replay_divergence fails for diverged or failed replays of the run and passes exact ones."""
    add_run(store, "r1")
    fd = json.dumps({"name": "loss", "step": 12, "recorded": 0.5, "replayed": 0.7})
    plant(store, "replays", [
        dict(run_id="r1", replay_id="x1", segment="0:3", status="ok", fidelity="exact", started_at=T0),
        dict(run_id="r1", replay_id="x2", segment="3:6", status="ok", fidelity="diverged", first_divergence=fd,
             started_at=T0 + DAY),
        dict(run_id="r1", replay_id="x3", segment="6:9", status="failed", fidelity="unchecked", error="boom",
             started_at=T0 + 2 * DAY)])
    res = one(store, "replay_divergence")
    assert res.status == "fail" and res.evidence.column("replay_id").to_pylist() == ["x2", "x3"]
    assert json.loads(res.evidence.column("first_divergence")[0].as_py())["step"] == 12


def test_replay_divergence_passes_faithful_replays(store):
    """replay_divergence passes when every replay matched within tolerance."""
    add_run(store, "r1")
    plant(store, "replays", [dict(run_id="r1", replay_id="x1", status="ok", fidelity="within tolerance")])
    assert one(store, "replay_divergence").status == "pass"


def test_lost_records_reports_failed_checkpoints_and_dropped_rows(store):
    """lost_records fails on failed checkpoint writes, dropped rows and matching problem counters."""
    add_run(store, "r1", dropped_rows=1234, counters=json.dumps({"checkpoint_write_failed": 2, "bad_value": 5}))
    plant(store, "checkpoints", [
        dict(run_id="r1", loop="epoch", iteration=0, status="ok"),
        dict(run_id="r1", loop="epoch", iteration=1, status="failed", error="OSError: disk full")])
    res = one(store, "lost_records")
    assert res.status == "fail"
    problems = {r["problem"]: r for r in res.evidence.to_pylist()}
    assert problems["checkpoint write failed"]["location"] == "epoch[1]"
    assert problems["dropped rows"]["count"] == 1234
    assert problems["problem counter"]["location"] == "checkpoint_write_failed"


def test_lost_records_passes_complete_record(store):
    """lost_records passes when checkpoints were written and nothing was dropped."""
    add_run(store, "r1", dropped_rows=0, counters=json.dumps({"bad_value": 1}))
    plant(store, "checkpoints", [dict(run_id="r1", loop="epoch", iteration=0, status="ok")])
    assert one(store, "lost_records").status == "pass"


# -- training rules over fl.watch metrics ---------------------------------------------------------


def test_training_rules_flag_planted_gradient_and_activation_faults(store):
    """vanishing/exploding gradients, update ratio, dead ReLU and loss-not-decreasing fire on planted metrics."""
    add_run(store, "r1")
    add_series(store, "r1", "grad_norm/fc1.weight", [1e-3, 1e-6, 1e-9, 1e-10, 1e-10, 1e-10])
    add_series(store, "r1", "grad_norm/fc2.weight", [1.0, 5.0, 1e4, 1e5, float("inf"), float("nan")])
    add_series(store, "r1", "update_ratio/fc2.weight", [0.5] * 6)
    add_series(store, "r1", "update_ratio/fc2.bias", [0.5] * 6)
    add_series(store, "r1", "dead_relu/act1", [0.1, 0.5, 0.9, 0.95, 0.97, 0.99])
    add_series(store, "r1", "loss", [2.3, 2.31, 2.29, 2.3, 2.32, 2.3])
    rep = health("r1", store=store, checks=["vanishing_gradients", "exploding_gradients", "update_ratio",
                                            "dead_relu", "loss_not_decreasing"])
    st = {r.name: r for r in rep}
    assert st["vanishing_gradients"].evidence.column("parameter").to_pylist() == ["fc1.weight"]
    assert st["exploding_gradients"].status == "fail"
    assert st["exploding_gradients"].evidence.to_pylist()[0]["first_epoch"] == 2
    assert st["update_ratio"].evidence.column("parameter").to_pylist() == ["fc2.weight"]
    assert st["dead_relu"].evidence.column("module").to_pylist() == ["act1"]
    assert st["loss_not_decreasing"].status == "warn"


def test_training_rules_pass_healthy_training(store):
    """The training rules pass for healthy gradient norms, ratios, activations and a falling loss."""
    add_run(store, "r1")
    add_series(store, "r1", "grad_norm/fc1.weight", [0.5, 0.4, 0.3, 0.3, 0.2, 0.2])
    add_series(store, "r1", "update_ratio/fc1.weight", [1e-3] * 6)
    add_series(store, "r1", "dead_relu/act1", [0.05] * 6)
    add_series(store, "r1", "loss", DECREASING)
    add_series(store, "r1", "val_loss", [3.0] * 10)  # validation metrics are not training losses
    rep = health("r1", store=store, checks=["vanishing_gradients", "exploding_gradients", "update_ratio",
                                            "dead_relu", "loss_not_decreasing"])
    assert rep.ok and all(r.status == "pass" for r in rep), rep


# -- drift and schema over io summaries ------------------------------------------------------------


def frame(rng, n=2000, shift=0.0, cats=("a", "b", "c"), nulls=0.0, extra=False):
    import pandas as pd

    x = rng.normal(shift, 1.0, n)
    if nulls:
        x[rng.random(n) < nulls] = np.nan
    d = {"x": x, "city": rng.choice(list(cats), n), "n": rng.integers(0, 10, n)}
    if extra:
        d["new_col"] = np.ones(n)
    return pd.DataFrame(d)


def plant_step_inputs(store, rid, df, t, step="featurize", calls=3):
    from flightlog._fingerprint import describe, summary_json

    rows = []
    for k in range(calls):
        part = df.iloc[k::calls]
        info = describe(part)
        rows.append(io_row(rid, step, "input", info.fingerprint, t + dt.timedelta(seconds=k), span_id=f"{rid}-{k}",
                           summary=summary_json(info)))
    plant(store, "io", rows)


def test_drift_flags_shifted_numeric_and_categorical_inputs(store):
    """drift warns with PSI/KS for a shifted numeric column and a changed category mix vs the previous run."""
    rng = np.random.default_rng(0)
    add_run(store, "ref", started=T0)
    plant_step_inputs(store, "ref", frame(rng), T0)
    add_run(store, "cur", started=T0 + DAY)
    plant_step_inputs(store, "cur", frame(rng, shift=1.5, cats=("a", "a", "a", "b", "c")), T0 + DAY)
    res = one(store, "drift")
    assert res.status == "warn"
    rows = {r["column"]: r for r in res.evidence.to_pylist()}
    assert set(rows) == {"x", "city"}
    assert rows["x"]["ks"] > 0.4 and rows["x"]["psi"] > 1.0 and rows["x"]["reference_run"] == "ref"
    assert rows["city"]["kind"] == "categorical"


def test_drift_passes_same_distribution(store):
    """drift passes for a new sample of the same distribution."""
    rng = np.random.default_rng(0)
    add_run(store, "ref", started=T0)
    plant_step_inputs(store, "ref", frame(rng), T0)
    add_run(store, "cur", started=T0 + DAY)
    plant_step_inputs(store, "cur", frame(rng), T0 + DAY)
    assert one(store, "drift").status == "pass"


def test_schema_flags_dropped_category_new_column_nulls_and_range(store):
    """schema fails listing a dropped category, an unexpected column, a null-rate rise and an out-of-range value."""
    rng = np.random.default_rng(0)
    add_run(store, "ref", started=T0)
    plant_step_inputs(store, "ref", frame(rng), T0)
    add_run(store, "cur", started=T0 + DAY)
    bad = frame(rng, cats=("a", "b"), nulls=0.2, extra=True)
    bad.loc[5, "n"] = 1000
    plant_step_inputs(store, "cur", bad, T0 + DAY)
    res = one(store, "schema")
    assert res.status == "fail"
    got = {(r["column"], r["problem"]): r for r in res.evidence.to_pylist()}
    assert ("city", "missing categories") in got and got[("city", "missing categories")]["reference"] == "c"
    assert ("new_col", "unexpected column") in got
    assert ("x", "null rate") in got
    assert ("n", "out of range") in got


def test_schema_passes_conforming_inputs_and_new_category_is_flagged(store):
    """schema passes conforming inputs; a category never seen in the reference is a violation."""
    rng = np.random.default_rng(0)
    add_run(store, "ref", started=T0)
    plant_step_inputs(store, "ref", frame(rng), T0)
    add_run(store, "ok", started=T0 + DAY)
    plant_step_inputs(store, "ok", frame(rng), T0 + DAY)
    assert one(store, "schema", run="ok").status == "pass"
    add_run(store, "new", started=T0 + 2 * DAY)
    plant_step_inputs(store, "new", frame(rng, cats=("a", "b", "c", "zz")), T0 + 2 * DAY)
    res = one(store, "schema", run="new")
    assert [(r["column"], r["problem"], r["current"]) for r in res.evidence.to_pylist()] == \
        [("city", "new categories", "zz")]
    assert res.evidence.column("reference_run").to_pylist() == ["ok"]


def test_reference_defaults_to_previous_finished_run_of_project_that_ran_the_step(store):
    """The default reference skips failed runs, other projects and runs without the step; --reference overrides."""
    rng = np.random.default_rng(0)
    add_run(store, "good", started=T0)
    plant_step_inputs(store, "good", frame(rng), T0)
    add_run(store, "crashed", started=T0 + DAY, status="failed")
    plant_step_inputs(store, "crashed", frame(rng, cats=("a",)), T0 + DAY)
    add_run(store, "elsewhere", project="q", started=T0 + 2 * DAY)
    plant_step_inputs(store, "elsewhere", frame(rng, cats=("a",)), T0 + 2 * DAY)
    add_run(store, "nostep", started=T0 + 3 * DAY)
    add_run(store, "cur", started=T0 + 4 * DAY)
    plant_step_inputs(store, "cur", frame(rng), T0 + 4 * DAY)
    assert one(store, "schema").status == "pass"
    res = one(store, "schema", reference="crashed")
    assert res.status == "fail" and set(res.evidence.column("reference_run").to_pylist()) == {"crashed"}


def test_drift_and_schema_skip_without_a_reference(store):
    """A first run (nothing to compare with) skips drift and schema, saying there is no reference run."""
    rng = np.random.default_rng(0)
    add_run(store, "only")
    plant_step_inputs(store, "only", frame(rng), T0)
    rep = health(store=store, checks=["drift", "schema"])
    assert [r.status for r in rep] == ["skip", "skip"] and rep.ok
    assert all("no reference run" in r.reason for r in rep)


def test_unreadable_summaries_are_skipped(store):
    """Summaries that are not JSON or have an unknown shape are ignored, not an error."""
    add_run(store, "ref", started=T0)
    plant(store, "io", [io_row("ref", "s", "input", "f1", T0, summary="{not json"),
                        io_row("ref", "s", "input", "f2", T0, summary=json.dumps({"kind": "object"}))])
    add_run(store, "cur", started=T0 + DAY)
    plant(store, "io", [io_row("cur", "s", "input", "f3", T0 + DAY, summary=json.dumps([1, 2]))])
    rep = health(store=store, checks=["drift", "schema"])
    assert [r.status for r in rep] == ["pass", "pass"]
