"""Where does a breast-cancer classifier fail? Log its predictions, then ask `flightlog slices`.

A scaled logistic regression is scored on sklearn's shipped ``load_breast_cancer``
(569 tumours, 30 numeric features; nothing is downloaded). Five-fold
``cross_val_predict`` gives an out-of-fold prediction for every tumour, so all
569 rows can be sliced (the default minimum slice size is max(32, 1% of rows)).
``fl.log_predictions`` records features, labels and the per-example log loss;
then the example runs:

* ``flightlog slices --run RUN --k 5``: slices by the logged loss, every feature
  binned into 10 quantile bins;
* ``flightlog slices --run RUN --error misclassified --features ... --k 5``:
  slices by 0/1 errors on four features;
* ``flightlog slices --sql ...``: the same rows through SQL, as 0/1 errors.

    .venv/bin/python examples/slices_example.py [--store DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import flightlog as fl

FEATURES = "mean radius,mean texture,worst concave points,worst area"


def train_and_log(store: str) -> str:
    """Out-of-fold predictions of the whole dataset, logged into a new run; returns its id."""
    fl.init(project="slices-example", name="breast-cancer-logreg", store=store)
    data = load_breast_cancer(as_frame=True)
    X, y = data.data, data.target.to_numpy()
    C = fl.arg("C", 0.05)  # strong regularisation: a simple model with errors worth finding
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    proba = cross_val_predict(model, X, y, cv=folds, method="predict_proba")
    pred = proba.argmax(1)
    p_true = np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0)
    names = np.asarray(data.target_names)  # labels as text: 'malignant' / 'benign'
    fl.log_predictions(X, names[y], names[pred], loss=-np.log(p_true))
    fl.log("accuracy", float((pred == y).mean()))
    run_id = fl._run.ACTIVE.run_id
    fl.finish()
    print(f"logged {len(y)} out-of-fold predictions, accuracy {(pred == y).mean():.3f}, "
          f"{int((pred != y).sum())} errors, mean log loss {float(-np.log(p_true).mean()):.3f}")
    return run_id


def main() -> int:
    ap = argparse.ArgumentParser(description="log a classifier's predictions and find where it fails")
    ap.add_argument("--store", default=None, help="store directory (default: a new temporary one)")
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="flightlog-slices-")
    os.environ["FLIGHTLOG_PROGRESS"] = "0"
    run = train_and_log(store)

    from flightlog.cli import main as cli

    commands = [
        ["slices", "--run", run, "--k", "5"],
        ["slices", "--run", run, "--error", "misclassified", "--features", FEATURES, "--k", "5"],
        ["slices", "--sql", "SELECT features, CAST(y_true <> y_pred AS INT) AS error FROM predictions "
                            f"WHERE run_id = '{run}'", "--features", "worst concave points,worst area",
         "--max-level", "2", "--k", "3"],
    ]
    rc = 0
    for argv in commands:
        shown = " ".join(a if " " not in a and "'" not in a else repr(a) for a in argv)
        print(f"\n$ flightlog {shown}")
        sys.stdout.flush()
        rc |= cli(argv + ["--store", store])
    print(f"\nstore: {store}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
