"""Plant two bugs and watch `flightlog health` and model assertions catch them.

The same wine pipeline and classifier run twice into one store (sklearn's
shipped ``load_wine``, nothing downloaded):

* run ``good``: ``clean`` keeps every cultivar; learning rate 0.05;
* run ``bad``:  ``clean`` has a planted filter bug that silently drops the
  ``class_2`` cultivar, and the learning rate is 5.0, which makes the loss
  diverge.

Each epoch the model's validation predictions go through ``fl.check``: finite
and in-range probabilities, and a consistency assertion (Kang et al.) over
test-time augmentation: the three noisy copies of one wine must get the same
label. ``fl.watch`` records gradient norms and update ratios.

Then it runs ``flightlog health`` (exit 0 for good, 1 for bad: divergence and
a schema violation of ``featurize``'s input; drift and usually
vanishing_gradients warn) and ``flightlog assertions`` on the bad run, which
lists the items the assertions flagged (their failure rate stays under
``assertion_rate``'s limit, so that check passes).

    .venv/bin/python examples/planted_bug.py [--store DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import pandas as pd
from sklearn.datasets import load_wine

import flightlog as fl


PLANTED = {"bug": False}  # set for the bad run


@fl.step
def load() -> pd.DataFrame:
    data = load_wine(as_frame=True)
    df = data.frame.rename(columns={"target": "cultivar"})
    df["cultivar"] = df["cultivar"].map(dict(enumerate(data.target_names)))
    return df


@fl.step
def clean(df: pd.DataFrame) -> pd.DataFrame:
    df = df.dropna()
    if PLANTED["bug"]:  # the planted bug: a filter meant for outliers drops a whole cultivar
        df = df[df["cultivar"] != "class_2"]
    return df.reset_index(drop=True)


@fl.step
def featurize(df: pd.DataFrame):
    X = df.drop(columns=["cultivar"]).to_numpy(dtype=np.float32)
    X = (X - X.mean(0)) / X.std(0)
    y = df["cultivar"].map({"class_0": 0, "class_1": 1, "class_2": 2}).to_numpy()
    return X, y


def pipeline_and_training(mode: str, store: str) -> str:
    import torch

    PLANTED["bug"] = mode == "bad"
    run = fl.init(project="planted_bug", name=mode, store=store)
    lr = fl.arg("lr", 0.05 if mode == "good" else 5.0)
    X, y = featurize(clean(load()))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    tr, va = order[: int(0.75 * len(X))], order[int(0.75 * len(X)):]
    Xt, yt = torch.tensor(X[tr]), torch.tensor(y[tr])
    Xv, yv = torch.tensor(X[va]), torch.tensor(y[va])

    fl.assertion.clear()
    fl.assertion.finite()
    fl.assertion.range(0.0, 1.0, name="probability")
    fl.assertion.consistency("label", key="wine", name="tta_consistency")

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    fl.watch(net, every=5)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for epoch in fl.loop("epoch", range(15)):
        for i in fl.loop("batch", range(0, len(Xt), 16)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(Xt[i:i + 16]), yt[i:i + 16])
            loss.backward()
            opt.step()
            fl.log("train_loss", loss)
        with torch.no_grad():
            fl.log("val_loss", torch.nn.functional.cross_entropy(net(Xv), yv))
            noisy = torch.cat([Xv + 0.3 * torch.randn_like(Xv) for _ in range(3)])
            probs = torch.softmax(net(noisy), dim=1)
        ids = [f"wine{int(k)}" for k in np.tile(va, 3)]
        fl.check(probs, ids=ids, names=["finite", "probability"])
        labels = [{"wine": w, "label": int(p)} for w, p in zip(ids, probs.argmax(1))]
        fl.check(labels, ids=ids, names=["tta_consistency"])
    run_id = run.run_id
    fl.finish()
    return run_id


def main() -> int:
    ap = argparse.ArgumentParser(description="plant bugs, catch them with flightlog health")
    ap.add_argument("--store", default=None, help="store directory (default: a new temporary one)")
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="flightlog-planted-")
    os.environ["FLIGHTLOG_PROGRESS"] = "0"
    good = pipeline_and_training("good", store)
    bad = pipeline_and_training("bad", store)

    from flightlog.cli import main as cli

    print(f"store: {store}\n\n$ flightlog health --run {good}")
    rc_good = cli(["health", "--store", store, "--run", good, "--max-rows", "3"])
    print(f"exit code {rc_good}\n\n$ flightlog health --run {bad}")
    rc_bad = cli(["health", "--store", store, "--run", bad, "--max-rows", "3"])
    print(f"exit code {rc_bad}\n\n$ flightlog assertions --run {bad} --top 5")
    cli(["assertions", "--store", store, "--run", bad, "--top", "5"])
    print(f"\ngood run: health exit {rc_good}; bad run: health exit {rc_bad}")
    return 0 if (rc_good == 0 and rc_bad != 0) else 1


if __name__ == "__main__":
    sys.exit(main())
