"""fl.inspect on a census-like credit pipeline: where does the data lose a group, and what does the model see?

A synthetic table of 50,000 applicants (sex, race, age, education, hours, income, zip code, label)
with two planted problems, both written as ordinary pandas / scikit-learn code:

* the zip-code lookup table misses the codes where most applicants of one group live, so the inner
  ``merge`` silently drops most of that group;
* the model is fitted on ``age`` (an illegal feature by default).

Run it, then look with the CLI::

    python examples/inspect_example.py            # prints the three checks' findings
    flightlog health --check no_bias_introduced similar_removal_probabilities no_illegal_features
    flightlog lineage <span id of the fit>        # the pipeline as a DAG, upstream from the model
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

import flightlog as fl


def make_census(n: int = 50_000, seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Applicants and a zip-code -> county lookup; planted: group 'Black' lives mostly in zips 90-99."""
    rng = np.random.default_rng(seed)
    race = rng.choice(["White", "Black", "Asian", "Other"], n, p=[0.62, 0.18, 0.12, 0.08])
    zip_code = np.where((race == "Black") & (rng.random(n) < 0.7), rng.integers(90, 100, n), rng.integers(0, 90, n))
    people = pd.DataFrame({
        "age": rng.integers(18, 80, n),
        "sex": rng.choice(["Female", "Male"], n),
        "race": race,
        "education": rng.choice(["HS", "BSc", "MSc", "PhD"], n, p=[0.45, 0.35, 0.15, 0.05]),
        "hours_per_week": np.where(rng.random(n) < 0.03, np.nan, rng.integers(5, 70, n).astype(float)),
        "income": rng.lognormal(10.8, 0.5, n).round(0),
        "zip": zip_code,
    })
    people["label"] = (people["income"] * (1 + people["hours_per_week"].fillna(0) / 100) > 60_000).astype(int)
    counties = pd.DataFrame({"zip": np.arange(0, 92), "county": [f"c{z // 10}" for z in range(92)]})  # 92-99 missing
    return people, counties


def pipeline(people_csv: str, counties: pd.DataFrame):
    applicants = pd.read_csv(people_csv)
    applicants = applicants.dropna(subset=["hours_per_week"])
    applicants = applicants.merge(counties, on="zip")  # planted: zips 92-99 are not in the lookup
    applicants = applicants[applicants["hours_per_week"] >= 10]
    applicants = applicants.assign(log_income=np.log(applicants["income"]))
    X = applicants[["age", "education", "hours_per_week", "county"]]
    y = applicants["label"]
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    model = Pipeline([
        ("features", ColumnTransformer([("num", StandardScaler(), ["age", "hours_per_week"]),
                                        ("cat", OneHotEncoder(handle_unknown="ignore"), ["education", "county"])])),
        ("clf", LogisticRegression(max_iter=500)),
    ])
    model.fit(X_train, y_train)
    return model.score(X_test, y_test)


def main() -> int:
    work = tempfile.mkdtemp(prefix="fl-inspect-")
    people, counties = make_census()
    csv = os.path.join(work, "applicants.csv")
    people.to_csv(csv, index=False)
    fl.init(project="inspect-example", store=os.environ.get("FLIGHTLOG_HOME") or os.path.join(work, ".flightlog"))
    with fl.inspect(sensitive=["sex", "race"]):
        acc = pipeline(csv, counties)
    print(f"test accuracy {acc:.3f}")
    report = fl.health(checks=["no_bias_introduced", "similar_removal_probabilities", "no_illegal_features"])
    for r in report:
        print(f"\n{r.status.upper():5} {r.name}")
        for row in r.evidence.to_pylist():
            row = {k: v for k, v in row.items() if k not in ("file", "span_id", "code", "estimator")}
            print("      ", row)
    fl.finish()
    return 0 if not report.failed() else 1


if __name__ == "__main__":
    sys.exit(main())
