"""fl.inspect overhead: one pandas + scikit-learn pipeline over 1M rows, with and without inspection.

The same pipeline function runs plain and inside ``fl.inspect(sensitive=["sex", "race"])``,
alternating, ``--repeats`` times each; the medians are compared (target: inspected <= 1.2 x plain).
Two variants: ``full`` (read_csv -> merge -> filters -> dropna -> assign -> groupby -> split ->
ColumnTransformer + SGDClassifier fit -> predict) and ``pandas`` (the same without the model, so the
recorder's cost is not hidden behind model fitting). The CSV (a synthetic census-like table) is
written once to a temporary directory. Both modes' outputs are checked equal.

    .venv/bin/python bench/inspect_overhead.py [--rows 1000000] [--repeats 5] [--variant full pandas]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flightlog as fl  # noqa: E402


def make_data(d: str, n: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    people = pd.DataFrame({
        "age_years": rng.integers(18, 90, n),
        "hours": rng.integers(1, 80, n).astype(float),
        "income": np.where(rng.random(n) < 0.02, np.nan, rng.normal(50_000, 15_000, n).round(2)),
        "sex": rng.choice(["Female", "Male"], n),
        "race": rng.choice(["White", "Black", "Asian", "Other"], n, p=[0.6, 0.2, 0.15, 0.05]),
        "education": rng.choice(["HS", "BSc", "MSc", "PhD"], n),
        "zip": rng.integers(0, 500, n),
        "label": rng.integers(0, 2, n),
    })
    regions = pd.DataFrame({"zip": np.arange(0, 480), "region": [f"r{i % 12}" for i in range(480)]})
    a, b = os.path.join(d, "people.csv"), os.path.join(d, "regions.csv")
    people.to_csv(a, index=False)
    regions.to_csv(b, index=False)
    return a, b


def pipeline(people_csv: str, regions_csv: str, model: bool):
    people = pd.read_csv(people_csv)
    regions = pd.read_csv(regions_csv)
    df = people.merge(regions, on="zip", how="inner")
    df = df[df["hours"] >= 5]
    df = df.dropna(subset=["income"])
    df = df.assign(income_k=df["income"] / 1000.0)
    by_region = df.groupby("region").agg(mean_income=("income_k", "mean"), n=("label", "size"))
    df = df.merge(by_region, left_on="region", right_index=True)
    X = df[["age_years", "hours", "income_k", "mean_income", "education", "region"]]
    y = df["label"]
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, random_state=0)
    if not model:
        return X_tr, X_te, y_tr, y_te
    ct = ColumnTransformer([("num", StandardScaler(), ["age_years", "hours", "income_k", "mean_income"]),
                            ("cat", OneHotEncoder(handle_unknown="ignore"), ["education", "region"])])
    pipe = Pipeline([("features", ct), ("clf", SGDClassifier(max_iter=5, tol=None, random_state=0))])
    pipe.fit(X_tr, y_tr)
    return pipe.predict(X_te)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variant", nargs="+", default=["pandas", "full"], choices=["pandas", "full"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        a, b = make_data(d, args.rows)
        print(f"data: {args.rows:,} rows written in {time.perf_counter() - t0:.1f} s "
              f"({os.path.getsize(a) / 1e6:.0f} MB CSV)")
        fl.init(project="bench-inspect", store=os.path.join(d, "store"))
        import warnings

        warnings.simplefilter("ignore")
        print(f"{'variant':<8} {'plain s (median)':>17} {'inspected s (median)':>21} {'overhead':>9}  runs   (wall)")
        for variant in args.variant:
            model = variant == "full"
            pipeline(a, b, model)  # warm-up: imports, page cache
            plain, inspected, cpu_plain, cpu_inspected = [], [], [], []
            ref = out = None
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                ref = pipeline(a, b, model)
                plain.append(time.perf_counter() - t)
                cpu_plain.append(time.process_time() - c)
                t, c = time.perf_counter(), time.process_time()
                with fl.inspect(sensitive=["sex", "race"]):
                    out = pipeline(a, b, model)
                inspected.append(time.perf_counter() - t)
                cpu_inspected.append(time.process_time() - c)
            same = (all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(ref, out)) if not model
                    else np.array_equal(ref, out))
            mp, mi = statistics.median(plain), statistics.median(inspected)
            cp, ci = statistics.median(cpu_plain), statistics.median(cpu_inspected)
            print(f"{variant:<8} {mp:>17.3f} {mi:>21.3f} {100 * (mi / mp - 1):>8.1f}%  {args.repeats}"
                  f"   (plain {min(plain):.3f}-{max(plain):.3f}, inspected {min(inspected):.3f}-{max(inspected):.3f};"
                  f" outputs equal: {same})")
            print(f"{'  cpu':<8} {cp:>17.3f} {ci:>21.3f} {100 * (ci / cp - 1):>8.1f}%        "
                  f"(process CPU seconds: steadier than wall time on a shared machine)")
        fl.finish()
        con_rows = fl.query("select count(*) AS n from spans", store=os.path.join(d, "store")).to_pylist()
        print(f"spans recorded: {con_rows[0]['n']}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
