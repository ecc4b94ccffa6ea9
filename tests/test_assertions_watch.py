"""fl.watch: training-rule metrics from a real torch CNN on sklearn's digits, and the rules that read them."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import flightlog as fl
from flightlog._warn import FlightlogWarning
from flightlog.query.health import health

torch = pytest.importorskip("torch")
RULES = ["vanishing_gradients", "exploding_gradients", "update_ratio", "dead_relu", "divergence", "nonfinite"]


def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X[:768], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, torch.tensor(y[:768])


def cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(128, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10))


def train(net, lr=0.05, epochs=4, every=4, loss_scale=1.0, evaluate=False):
    X, y = digits()
    w = fl.watch(net, every=every)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for epoch in fl.loop("epoch", range(epochs)):
        for i in fl.loop("batch", range(0, len(X), 64)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(X[i:i + 64]), y[i:i + 64])
            (loss * loss_scale).backward()
            opt.step()
            fl.log("loss", loss)
        if evaluate:
            net.eval()
            with torch.no_grad():
                net(X[:64])
            net.train()
    return w


@pytest.mark.slow
def test_watch_records_norms_ratios_and_dead_relu_at_its_interval(store):
    """fl.watch logs per-parameter grad/weight norms and update ratios and per-ReLU dead fractions every N steps."""
    fl.init()
    net = cnn()
    w = train(net, epochs=2, every=4, evaluate=True)
    fl.finish()
    assert w.step == 2 * 12 - 1  # eval forwards are not training steps
    t = fl.query("SELECT name, list(step ORDER BY step) AS steps, min(value) AS lo FROM metrics "
                 "WHERE name <> 'loss' GROUP BY name", store=store).to_pylist()
    by = {r["name"]: r for r in t}
    params = [n for n, _ in net.named_parameters()]
    for p in params:
        assert by[f"grad_norm/{p}"]["steps"] == list(range(0, 24, 4))
        assert by[f"weight_norm/{p}"]["lo"] > 0
        assert by[f"update_ratio/{p}"]["lo"] > 0
    assert len(by[f"update_ratio/{params[0]}"]["steps"]) == 6
    assert set(n for n in by if n.startswith("dead_relu/")) == {"dead_relu/1", "dead_relu/5"}
    ep = fl.query("SELECT DISTINCT epoch FROM metrics WHERE name LIKE 'grad_norm/%' ORDER BY 1", store=store)
    assert ep.column(0).to_pylist() == [0, 1]


@pytest.mark.slow
def test_healthy_training_passes_the_training_rules(store):
    """A sane learning rate passes the gradient, update-ratio and dead-ReLU rules."""
    fl.init()
    train(cnn(), lr=0.05, epochs=3)
    fl.finish()
    rep = health(store=store, checks=RULES)
    assert rep.ok and all(r.status == "pass" for r in rep), rep


@pytest.mark.slow
def test_huge_learning_rate_is_caught(store):
    """A learning rate far too high kills the ReLUs, so the parameters stop learning: both rules warn."""
    fl.init()
    train(cnn(), lr=10.0, epochs=3)
    fl.finish()
    rep = health(store=store, checks=RULES)
    assert rep["update_ratio"].status == "warn" and rep["dead_relu"].status == "warn"
    assert rep["update_ratio"].evidence.num_rows >= 2


@pytest.mark.slow
def test_vanishing_gradients_and_dead_relus_are_caught(store):
    """A loss scaled to nothing gives vanishing gradients; a huge negative bias kills a ReLU layer."""
    fl.init()
    net = cnn()
    with torch.no_grad():
        net[4].bias.fill_(-100.0)
    train(net, lr=0.05, epochs=3, loss_scale=1e-12)
    fl.finish()
    rep = health(store=store, checks=RULES)
    assert rep["vanishing_gradients"].status == "warn"
    assert "dead_relu/5".split("/")[1] in rep["dead_relu"].evidence.column("module").to_pylist()


def test_remove_and_rewatch(store):
    """remove() stops recording; watching a model again replaces the earlier hooks."""
    fl.init()
    net = cnn()
    w1 = fl.watch(net, every=1)
    w2 = fl.watch(net, every=1)
    assert w1.removed and not w2.removed
    X, _ = digits()
    net(X[:8]).sum().backward()
    net(X[:8]).sum().backward()
    w2.remove()
    net(X[:8]).sum().backward()
    fl.finish()
    steps = fl.query("SELECT DISTINCT step FROM metrics WHERE name LIKE 'grad_norm/%' ORDER BY 1", store=store)
    assert steps.column(0).to_pylist() == [0, 1]
    assert not net._forward_pre_hooks


def test_watch_rejects_non_torch_without_importing_torch(tmp_path):
    """fl.watch on something that is not a torch module warns, returns None and never imports torch."""
    code = ("import sys, warnings\nimport flightlog as fl\n"
            "with warnings.catch_warnings(record=True) as got:\n    warnings.simplefilter('always')\n"
            "    print(fl.watch(object()), [type(w.message).__name__ for w in got])\n"
            "print('torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"FLIGHTLOG_HOME": str(tmp_path / "s"), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["None", "['FlightlogWarning']", "False"]


def test_watch_bad_interval_warns_and_uses_default(store):
    """A bad `every` warns and falls back to the default interval."""
    fl.init()
    with pytest.warns(FlightlogWarning):
        w = fl.watch(cnn(), every=0)
    assert w is not None and w.every == 50
