"""Pipeline example, part 2 (a separate process): train a classifier on the features file.

The ``train`` step's input is the file path; flightlog fingerprints the
file's content, which equals the fingerprint ``featurize`` recorded when it
wrote the file, so lineage crosses from this run to the prepare run.

    python train.py [--data DIR]
"""
from __future__ import annotations

import argparse
import os

import pandas as pd

import flightlog as fl


@fl.step
def split(path: str, seed: int = 0):
    """Read the features and split them 75/25, stratified by class."""
    from sklearn.model_selection import train_test_split

    df = pd.read_parquet(path)
    X, y = df.drop(columns="target").to_numpy(), df["target"].to_numpy()
    return train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)


@fl.step
def train(X_train, y_train, C: float = 1.0):
    """Fit a multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000).fit(X_train, y_train)


@fl.step
def evaluate(model, X_test, y_test) -> float:
    """Held-out accuracy."""
    return float(model.score(X_test, y_test))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    args = ap.parse_args()
    fl.init(project="pipeline-example", name="train")
    C = fl.arg("C", 1.0)
    X_train, X_test, y_train, y_test = split(os.path.join(args.data, "features.parquet"))
    model = train(X_train, y_train, C)
    acc = evaluate(model, X_test, y_test)
    fl.log("test_accuracy", acc)
    print(f"test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
