"""Pipeline example, part 1: load → clean → featurize, writing a features file.

Each step is an ``@fl.step``: every call becomes a span, and the content hash
of every input and output lands in the ``io`` table, which is what
``flightlog lineage`` follows. The raw data is scikit-learn's wine dataset
(shipped with the package, no download), written once to ``data/wine.csv``.

    python prepare.py [--data DIR]
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

import flightlog as fl


@fl.step
def load(path: str) -> pd.DataFrame:
    """Read the raw CSV (the path is fingerprinted by the file's content)."""
    return pd.read_csv(path)


@fl.step
def clean(df: pd.DataFrame) -> pd.DataFrame:
    """Drop duplicate rows, fill missing values with the column median, clip extreme values."""
    df = df.drop_duplicates().reset_index(drop=True)
    features = df.columns.drop("target")
    df[features] = df[features].fillna(df[features].median())
    lo, hi = df[features].quantile(0.005), df[features].quantile(0.995)
    df[features] = df[features].clip(lo, hi, axis=1)
    return df


@fl.step(capture="sample")
def featurize(df: pd.DataFrame, out_path: str) -> pd.DataFrame:
    """Standardise the features, add two ratios, and write the result as Parquet."""
    features = df.columns.drop("target")
    out = (df[features] - df[features].mean()) / df[features].std(ddof=0)
    out["alcohol_per_ash"] = df["alcohol"] / df["ash"]
    out["phenols_ratio"] = df["flavanoids"] / df["total_phenols"]
    out["target"] = df["target"].to_numpy()
    out.to_parquet(out_path, index=False)
    fl.artifact(out_path, role="output")  # the file this step wrote: links it to whoever reads it
    return out


def write_raw(path: str) -> None:
    from sklearn.datasets import load_wine

    wine = load_wine(as_frame=True)
    df = wine.frame.copy()
    rng = np.random.default_rng(0)  # a few holes and duplicates so that clean() has work to do
    df.iloc[rng.integers(0, len(df), 8), rng.integers(0, 13, 8)] = np.nan
    df = pd.concat([df, df.iloc[:5]], ignore_index=True)
    df.to_csv(path, index=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    args = ap.parse_args()
    os.makedirs(args.data, exist_ok=True)
    raw = os.path.join(args.data, "wine.csv")
    if not os.path.exists(raw):
        write_raw(raw)
    fl.init(project="pipeline-example", name="prepare")
    features = featurize(clean(load(raw)), os.path.join(args.data, "features.parquet"))
    print(f"wrote {len(features)} rows x {features.shape[1]} columns to {args.data}/features.parquet")


if __name__ == "__main__":
    main()
