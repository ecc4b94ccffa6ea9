"""fl.log(dict), fl.log_histogram, sys/... metrics and the end-of-run summary, on a real store."""
from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest

import flightlog as fl
from flightlog import _warn, cli
from conftest import run_script


def metrics(store, where: str = "true") -> list[tuple]:
    """(name, step, value) of every metric row, sorted."""
    t = fl.query(f"SELECT name, step, value FROM metrics WHERE {where} ORDER BY name, step", store=store)
    return [tuple(r.values()) for r in t.to_pylist()]


def test_log_dict_is_one_step_for_all_names(store):
    """fl.log({...}) logs every entry at one shared step, past each name's own counter; step= and a positional step work."""
    fl.init(project="p", system_metrics=False)
    fl.log("loss", 9.0)  # loss counter is ahead of acc's
    fl.log({"loss": 1.0, "acc": 0.5})
    fl.log({"loss": 0.5, "acc": np.float32(0.75)})
    fl.log({"acc": 1.0}, step=10)
    fl.log({"loss": 0.25}, 20)  # wandb.log(data, step)
    fl.finish()
    assert metrics(store) == [("acc", 1, 0.5), ("acc", 2, 0.75), ("acc", 10, 1.0),
                              ("loss", 0, 9.0), ("loss", 1, 1.0), ("loss", 2, 0.5), ("loss", 20, 0.25)]


def test_log_dict_bad_entries_warn_and_the_rest_is_kept(store):
    """Non-numeric values and bad names in a dict warn once each and are counted; good entries are stored."""
    fl.init(project="p", system_metrics=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert fl.log({"loss": 1.0, "img": "not a number", 3: 1.0, "": 2.0}) is None
        fl.log({"loss": 2.0}, "step?")
    fl.finish()
    assert metrics(store) == [("loss", 0, 1.0), ("loss", 1, 2.0)]
    assert _warn.counters["bad_value"] == 1 and _warn.counters["bad_name"] == 2 and _warn.counters["bad_args"] == 1
    assert any("img" in str(x.message) for x in w)


def test_log_histogram_rows_and_show(store, capsys):
    """log_histogram stores edges/counts (NaN counted apart), fixed edges are kept, flightlog show draws the last one."""
    fl.init(project="p", system_metrics=False)
    x = np.random.default_rng(0).normal(size=1000)
    fl.log_histogram("w", x, bins=10)
    fl.log_histogram("w", [0.5, 1.5, 2.5, float("nan")], bins=[0, 1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl.log_histogram("w", x, bins=[3, 1])  # edges not increasing: warned, not stored
        fl.log_histogram("w", ["a"], bins=3)
    fl.finish()
    rows = fl.query("SELECT * FROM histograms ORDER BY step", store=store).to_pylist()
    assert [r["step"] for r in rows] == [0, 1] and _warn.counters["bad_value"] == 2
    c0 = json.loads(rows[0]["counts"])
    e0 = json.loads(rows[0]["edges"])
    assert sum(c0) == 1000 and len(e0) == 11 and e0[0] == pytest.approx(x.min()) and rows[0]["count"] == 1000
    assert np.array_equal(c0, np.histogram(x, bins=10)[0])
    assert json.loads(rows[1]["counts"]) == [1, 1, 1] and rows[1]["nonfinite"] == 1 and rows[1]["mean"] == 1.5
    assert cli.main(["show", "latest"]) == 0
    out = capsys.readouterr().out
    assert "histograms" in out and "w " in out and "1 non-finite" in out and "(2 logged)" in out


@pytest.mark.slow
def test_log_histogram_of_a_torch_tensor(store):
    """A torch tensor (with grad) is binned like the same numbers in numpy."""
    torch = pytest.importorskip("torch")
    fl.init(project="p", system_metrics=False)
    t = torch.linspace(-1, 1, 101, requires_grad=True)
    fl.log_histogram("t", t * 2, bins=4)
    fl.finish()
    row = fl.query("SELECT * FROM histograms", store=store).to_pylist()[0]
    assert json.loads(row["counts"]) == np.histogram(np.linspace(-2, 2, 101), bins=4)[0].tolist()


def test_system_metrics_sampled_on_the_flush_thread(store, monkeypatch):
    """sys/cpu_pct, sys/rss_mb (and host CPU on Linux) are sampled at the set interval; system_metrics=False stops them."""
    monkeypatch.setenv("FLIGHTLOG_SYSTEM_METRICS_INTERVAL", "0.05")
    monkeypatch.setenv("FLIGHTLOG_SYSTEM_METRICS", "1")  # on by default; conftest turns it off for other tests
    r = fl.init(project="p", flush_interval=0.05)
    t0 = time.time()
    while time.time() - t0 < 0.6:
        sum(i * i for i in range(20000))  # some CPU to measure
    fl.finish()
    names = {n for n, _, _ in metrics(store, "starts_with(name, 'sys/')")}
    assert {"sys/cpu_pct", "sys/rss_mb"} <= names
    rss = [v for n, _, v in metrics(store, "name = 'sys/rss_mb'")]
    assert len(rss) >= 2 and all(10 < v < 100_000 for v in rss)
    fl.init(project="p", flush_interval=0.05, system_metrics=False)  # the argument wins over the variable
    r2 = fl._run.current()
    time.sleep(0.3)
    fl.finish()
    assert metrics(store, f"run_id = '{r2.run_id}' AND starts_with(name, 'sys/')") == []
    assert r.run_id != r2.run_id


def test_system_metrics_failure_never_reaches_the_run(store, monkeypatch):
    """A sampler that fails is a warning and a counter; the run's own metrics are all stored."""
    from flightlog import _sysmetrics

    monkeypatch.setenv("FLIGHTLOG_SYSTEM_METRICS_INTERVAL", "0.05")
    monkeypatch.delenv("FLIGHTLOG_SYSTEM_METRICS")
    monkeypatch.setattr(_sysmetrics, "_rss_mb", lambda: 1 / 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl.init(project="p", flush_interval=0.05)
        for i in range(5):
            fl.log("loss", float(i))
            time.sleep(0.05)
        fl.finish()
    assert [v for n, _, v in metrics(store, "name = 'loss'")] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert _warn.counters["sysmetrics_error"] >= 1


SCRIPT = """
import flightlog as fl
fl.init(project="p", name="tiny", system_metrics=False)
for i in range(3):
    fl.log("loss", 1.0 / (i + 1))
"""


@pytest.mark.slow
def test_end_of_run_summary_on_stderr(tmp_path, store):
    """The summary names the run, status, store, rows and next commands; FLIGHTLOG_QUIET and a non-terminal silence it."""
    p = run_script(SCRIPT, tmp_path, env={"FLIGHTLOG_SUMMARY": "1"})
    assert p.returncode == 0, p.stderr
    err = p.stderr
    assert "flightlog: run " in err and "(tiny) finished" in err and store in err and "3 rows" in err
    assert "flightlog show " in err and "flightlog runs" in err
    p = run_script(SCRIPT, tmp_path, env={"FLIGHTLOG_SUMMARY": "1", "FLIGHTLOG_QUIET": "1"})
    assert "flightlog: run" not in p.stderr
    p = run_script(SCRIPT, tmp_path)  # stderr is a pipe here: no summary unless asked
    assert "flightlog: run" not in p.stderr


def test_gpu_metrics_from_torch_allocator_without_creating_a_context(monkeypatch):
    """With CUDA initialised, the used device's allocator counters are sampled; an unused device and an
    uninitialised CUDA are left alone (no context is created by the sampler)."""
    import sys
    import types

    from flightlog import _sysmetrics

    calls = []

    class Cuda:
        initialised = True

        def is_available(self):
            return True

        def is_initialized(self):
            return self.initialised

        def current_device(self):
            return 0

        def device_count(self):
            return 2

        def memory_reserved(self, i):
            calls.append(("reserved", i))
            return 2**30 if i == 0 else 0

        def memory_allocated(self, i):
            calls.append(("allocated", i))
            return 2**29

    cuda = Cuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    s = _sysmetrics.Sampler(types.SimpleNamespace(finished=False), 10.0)
    s._nvml = False  # no NVML here
    vals = s.values()
    assert vals["gpu0/mem_reserved_mb"] == 1024 and vals["gpu0/mem_allocated_mb"] == 512
    assert not any(k.startswith("gpu1/") for k in vals) and ("allocated", 1) not in calls
    cuda.initialised = False
    calls.clear()
    assert not any(k.startswith("gpu") for k in s.values()) and calls == []


def test_system_metrics_switch(monkeypatch):
    """fl.init(system_metrics=) wins; otherwise FLIGHTLOG_SYSTEM_METRICS=0/false/off turns sampling off (default on)."""
    from flightlog import _sysmetrics

    monkeypatch.delenv("FLIGHTLOG_SYSTEM_METRICS")
    assert _sysmetrics.enabled(None) and not _sysmetrics.enabled(False)
    for off in ("0", "false", "off"):
        monkeypatch.setenv("FLIGHTLOG_SYSTEM_METRICS", off)
        assert not _sysmetrics.enabled(None) and _sysmetrics.enabled(True)
