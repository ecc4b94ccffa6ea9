"""Fingerprints and summaries: stability, sensitivity, every supported type, sampled hashes, hostile values."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flightlog import _fingerprint as F


def fp(v):
    return F.describe(v).fingerprint


def test_equal_content_equal_fingerprint_across_copies():
    """Copies, non-contiguous views and re-chunked Arrow tables hash like the original content."""
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert fp(a) == fp(a.copy()) == fp(np.asfortranarray(a))
    assert fp(a) != fp(a.astype(np.float64)) and fp(a) != fp(a.reshape(6, 4))
    t = pa.table({"x": [1, 2, None, 4], "s": ["a", None, "ccc", "d"]})
    rechunked = pa.concat_tables([t.slice(0, 1), t.slice(1, 3)])
    assert rechunked.column("x").num_chunks == 2 and fp(t) == fp(rechunked)
    assert fp(t) != fp(pa.table({"x": [1, 2, None, 5], "s": ["a", None, "ccc", "d"]}))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False), st.text(max_size=8)), max_size=30))
def test_containers_are_deterministic_and_sensitive(xs):
    """Lists hash the same twice; changing one item or the container type changes the fingerprint."""
    assert fp(list(xs)) == fp(list(xs))
    assert fp(list(xs)) != fp(tuple(xs)) or not xs and fp([]) != fp(())
    if xs:
        assert fp(xs + ["extra"]) != fp(xs)


def test_pandas_dataframe_and_series_summary():
    """DataFrames get per-column numeric stats (with a quantile histogram) and categorical top values."""
    df = pd.DataFrame({"x": [1.0, 2.0, np.nan, 4.0] * 25, "c": ["a", "a", "b", None] * 25, "b": [True, False] * 50})
    info = F.describe(df)
    s = info.summary
    assert info.type == "pandas.DataFrame" and info.shape == "(100, 3)"
    assert s["kind"] == "table" and s["rows"] == 100
    x = s["columns"]["x"]
    assert x["type"] == "numeric" and x["nulls"] == 25 and x["count"] == 75 and x["min"] == 1.0 and x["max"] == 4.0
    assert len(x["hist"]["edges"]) == 11 and sum(x["hist"]["counts"]) == 75
    c = s["columns"]["c"]
    assert c["type"] == "categorical" and c["nulls"] == 25 and c["distinct"] == 2 and c["top"][0] == ["a", 50]
    assert s["columns"]["b"]["mean"] == 0.5
    assert fp(df) != fp(df.iloc[::-1]) and fp(df) == fp(df.copy())
    assert F.describe(df["x"]).type == "pandas.Series"
    json.dumps(s, allow_nan=False)  # valid strict JSON


def test_polars_and_torch():
    """polars frames go through Arrow; torch tensors (incl. bfloat16 and requires_grad) hash their bits."""
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32, requires_grad=True)
    it = F.describe(t)
    assert it.type == "torch.Tensor" and it.fingerprint == fp(t.detach().numpy())
    bf = F.describe(t.detach().to(torch.bfloat16))
    assert bf.fingerprint and bf.dtype == "torch.bfloat16" and bf.summary["columns"]["values"]["max"] == 5.0
    pl = pytest.importorskip("polars")
    df = pl.DataFrame({"a": [1, 2, 3], "s": ["x", "y", None]})
    info = F.describe(df)
    assert info.type == "polars.DataFrame" and info.summary["columns"]["s"]["nulls"] == 1
    assert info.fingerprint != fp(pl.DataFrame({"a": [1, 2, 4], "s": ["x", "y", None]}))


def test_files_and_paths(tmp_path):
    """Paths of existing files hash their content; same content under another name has the same fingerprint."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("x,y\n1,2\n")
    b.write_text("x,y\n1,2\n")
    ia = F.describe(str(a))
    assert ia.type == "file" and ia.path == str(a) and ia.nbytes == 8
    assert ia.fingerprint == fp(pathlib.Path(b)) and fp(str(tmp_path / "missing.csv")) != ia.fingerprint
    a.write_text("x,y\n1,3\n")
    assert fp(str(a)) != ia.fingerprint  # the cache notices the change
    assert F.describe(str(tmp_path)).type == "str"  # a directory is just a string


def test_large_buffers_use_documented_sampled_hash(monkeypatch):
    """Beyond HASH_FULL_LIMIT the hash samples blocks: a change in a sampled block shows, one elsewhere may not."""
    monkeypatch.setattr(F, "HASH_FULL_LIMIT", 1 << 20)
    monkeypatch.setattr(F, "SAMPLE_EDGE", 1 << 16)
    monkeypatch.setattr(F, "SAMPLE_BLOCK", 1 << 12)
    monkeypatch.setattr(F, "SAMPLE_BLOCKS", 4)
    a = np.zeros(1 << 19, dtype=np.float64)  # 4 MiB
    info = F.describe(a, summary=False)
    assert info.summary["hash"] == "sampled"
    b = a.copy()
    b[0] = 1.0  # first edge: sampled
    assert fp(b) != info.fingerprint
    c = a.copy()
    c[(1 << 16) // 8 + 10_000] = 1.0  # between blocks: not sampled
    assert F.describe(c, summary=False).fingerprint == info.fingerprint


def test_hostile_values_never_raise():
    """Unpicklable, recursive, deep, generator and exotic values give a type and no fingerprint, never an error."""
    class NoPickle:
        def __reduce_ex__(self, p):
            raise TypeError("nope")

    rec: dict = {}
    rec["self"] = rec
    deep: list = [1]
    for _ in range(10):
        deep = [deep]
    cases = [NoPickle(), rec, deep, (x for x in range(2)), lambda: 0, np.array([NoPickle()], dtype=object)]
    for v in cases:
        info = F.describe(v)
        assert info.fingerprint is None and info.type and info.summary.get("note")
    assert F.describe(object()).fingerprint  # a plain picklable object is hashed by its pickle
    huge = bytearray(F.OBJECT_HASH_LIMIT + 10)

    class Big:
        def __init__(self):
            self.data = bytes(huge)

    assert F.describe(Big()).fingerprint is None


def test_scalars_strings_and_bytes():
    """Scalars keep their value in the summary; NaN/inf stay valid JSON; 1 and 1.0 and True differ."""
    assert len({fp(1), fp(1.0), fp(True), fp("1"), fp(b"1")}) == 5
    assert F.describe(float("nan")).summary["value"] == "nan"
    assert json.loads(F.summary_json(F.describe(float("inf"))))["value"] == "inf"
    assert F.describe("x" * 300).summary == {"kind": "str", "len": 300}
    assert F.describe(np.float32(2.5)).summary["columns"]["values"]["mean"] == 2.5


def test_pickle_bounded():
    """pickle_bounded returns bytes under the bound and a clear note over it or when pickling fails."""
    data, note = F.pickle_bounded({"a": np.arange(10)}, 10_000)
    assert data and note is None
    data, note = F.pickle_bounded(np.zeros(10_000), 1000)
    assert data is None and "over the 1000 byte bound" in note
    import threading

    data, note = F.pickle_bounded(threading.Lock(), 1000)
    assert data is None and "cannot pickle" in note
