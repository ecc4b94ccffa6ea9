"""The web UI's JSON API and pages over a real store, served by real uvicorn on loopback."""
from __future__ import annotations

import datetime as dt
import math
import os
import re

import httpx
import numpy as np
import pyarrow as pa
import pytest

from _ui_store import HOSTILE, UIServer, add_replay, record_runs

TOKEN = "t0ken-for-tests"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A store with a planted 100k-point series and a replayed one; the UI on loopback with a token."""
    tmp = tmp_path_factory.mktemp("ui")
    store = str(tmp / "store")
    _plant(store)
    add_replay(store, "planted")
    from flightlog.ui import create_app

    server = UIServer(create_app(store, TOKEN, index_ttl=0.0))
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield {"srv": server, "c": client, "store": store, "tmp": tmp}
    client.close()
    server.stop()


@pytest.fixture(scope="module")
def ui(srv):
    """The same store plus two recorded training runs (subprocesses) and a replay of the first."""
    ids = record_runs(srv["tmp"], srv["store"])
    add_replay(srv["store"], ids[0])
    return dict(srv, ids=ids)


PLANT_N = 100_000


def _planted_values() -> np.ndarray:
    rng = np.random.default_rng(7)
    y = np.sin(np.arange(PLANT_N) / 900.0) + rng.normal(0, 0.05, PLANT_N)
    y[12_345] = 9.0  # a single-point spike: must survive any downsampling
    y[77_777] = -7.5
    return y


def _plant(store: str) -> None:
    from flightlog.collector import schema as S
    from flightlog.collector import store as st

    y = _planted_values()
    sink = st.LocalSink(store)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    now = dt.datetime.now(dt.timezone.utc)
    sink.write("runs", pa.table({"run_id": ["planted"], "project": ["ui-test"], "name": ["planted"],
                                 "kind": ["train"], "status": ["finished"], "started_at": pa.array([t0], S.TS),
                                 "ended_at": pa.array([now], S.TS), "updated_at": pa.array([now], S.TS)}))
    for lo in range(0, PLANT_N, 25_000):  # several parts, as a flushing recorder writes them
        hi = lo + 25_000
        vals = y[lo:hi].tolist()
        if lo == 50_000:
            vals[3] = float("nan")  # one non-finite value at step 50003
        sink.write("metrics", pa.table({
            "run_id": ["planted"] * (hi - lo), "name": ["wave"] * (hi - lo), "value": vals,
            "step": np.arange(lo, hi), "epoch": np.arange(lo, hi) // 10_000,
            "wall_time": pa.array(np.datetime64("2026-01-01T00:00:00", "us")
                                  + np.arange(lo, hi) * np.timedelta64(1, "s")).cast(S.TS),
            "source": ["record"] * (hi - lo)}))


def test_series_keeps_every_bucket_extreme(srv):
    """/api/series at points=400 over 100k points returns <= 400 points holding each bucket's min and max."""
    r = srv["c"].get("/api/series", params={"run": "planted", "name": "wave", "points": 400})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["n_total"] == PLANT_N and d["n_nonfinite"] == 1 and d["first_nonfinite_x"] == 50_003
    assert d["downsampled"] and 4 <= len(d["x"]) <= 400
    assert d["x"] == sorted(d["x"]) and set(d["source"]) == {"record"}
    y = _planted_values()
    y[50_003] = np.nan
    got = dict(zip(d["x"], d["y"]))
    assert got[12_345] == 9.0 and got[77_777] == -7.5  # the spikes, at their exact steps
    nb = 400 // 4
    edges = np.minimum(nb - 1, np.floor(np.arange(PLANT_N) * (nb / (PLANT_N - 1))).astype(int))
    for b in range(nb):
        idx = np.nonzero(edges == b)[0]
        vals = y[idx]
        ok = ~np.isnan(vals)
        imin, imax = idx[ok][np.argmin(vals[ok])], idx[ok][np.argmax(vals[ok])]
        assert got.get(int(imin)) == y[imin] and got.get(int(imax)) == y[imax], b


def test_series_range_is_full_resolution_and_bounded(srv):
    """lo/hi restrict x to the range; a range holding fewer than `points` values comes back whole."""
    c = srv["c"]
    d = c.get("/api/series", params={"run": "planted", "name": "wave", "points": 2000,
                                     "lo": 12_000, "hi": 12_999}).json()
    assert d["n_total"] == 1000 and not d["downsampled"]
    assert d["x"] == list(range(12_000, 13_000))
    assert d["y"][345] == 9.0
    d = c.get("/api/series", params={"run": "planted", "name": "wave", "points": 100,
                                     "lo": 10_000.5, "hi": 60_000}).json()
    assert len(d["x"]) <= 100 and min(d["x"]) >= 10_001 and max(d["x"]) <= 60_000
    assert d["n_total"] == 50_000
    d = c.get("/api/series", params={"run": "planted", "name": "wave", "points": 100, "x": "epoch"}).json()
    assert set(d["x"]) <= set(range(10)) and len(d["x"]) <= 100 and 9.0 in d["y"] and -7.5 in d["y"]
    d = c.get("/api/series", params={"run": "planted", "name": "wave", "points": 100, "x": "time"}).json()
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    assert min(d["x"]) == t0 and math.isclose(max(d["x"]), t0 + PLANT_N - 1)


def test_series_marks_replayed_points(srv):
    """Replayed rows come back with source 'replay'; recorded ones with 'record'."""
    d = srv["c"].get("/api/series", params={"run": "planted", "name": "grad_norm", "points": 1000}).json()
    assert d["n_total"] == 42 and set(d["source"]) == {"replay"} and d["y"][0] == 1.0
    d = srv["c"].get("/api/series", params={"run": "planted", "name": "wave", "points": 1000,
                                            "lo": 0, "hi": 99}).json()
    assert d["n_total"] == 100 and set(d["source"]) == {"record"}


@pytest.mark.parametrize("params,status,msg", [
    ({"run": "no-such-run", "name": "wave"}, 404, "no run"),
    ({"run": "planted", "name": "nope"}, 404, "no metric"),
    ({"name": "wave"}, 400, "run is required"),
    ({"run": "planted"}, 400, "name is required"),
    ({"run": "planted", "name": "wave", "points": "abc"}, 400, "points must be an integer"),
    ({"run": "planted", "name": "wave", "points": "1"}, 400, "points must be between"),
    ({"run": "planted", "name": "wave", "points": "10000000"}, 400, "points must be between"),
    ({"run": "planted", "name": "wave", "x": "batch"}, 400, "x must be one of"),
    ({"run": "planted", "name": "wave", "lo": "5", "hi": "1"}, 400, "greater than hi"),
    ({"run": "planted", "name": "wave", "lo": "nan"}, 400, "finite"),
    ({"run": "planted", "name": "wave", "hi": "x"}, 400, "hi must be a number"),
    ({"run": "../../etc", "name": "wave"}, 404, "no run"),
])
def test_series_bad_input_is_4xx_with_message(srv, params, status, msg):
    """Unknown runs/metrics and malformed parameters are refused with a 4xx and a message."""
    r = srv["c"].get("/api/series", params=params)
    assert r.status_code == status and msg in r.json()["detail"], r.text


@pytest.mark.slow
def test_api_runs_and_run(ui):
    """/api/runs lists recorded runs with parsed params and filters; /api/runs/{id} has metrics and checkpoints."""
    c, ids = ui["c"], ui["ids"]
    d = c.get("/api/runs", params={"project": "ui-test"}).json()
    got = {r["run_id"]: r for r in d["runs"]}
    assert set(ids) <= set(got) and got[ids[0]]["params"]["lr"] == 0.5
    d = c.get("/api/runs", params={"where": "json_extract(params, '$.lr')::DOUBLE > 0.7"}).json()
    assert [r["run_id"] for r in d["runs"]] == [ids[1]]
    r = c.get("/api/runs", params={"where": "1=1; DROP TABLE runs"})
    assert r.status_code == 400 and "detail" in r.json()
    r = c.get("/api/runs", params={"where": "read_text('/etc/passwd') IS NOT NULL"})
    assert r.status_code == 400
    r = c.get("/api/runs", params={"limit": "0"})
    assert r.status_code == 400 and "limit" in r.json()["detail"]
    d = c.get(f"/api/runs/{ids[0]}").json()
    names = {m["name"]: m for m in d["metrics"]}
    assert names["train/loss"]["n"] == 42 and names["grad_norm"]["replayed"] == 42
    assert len(d["checkpoints"]) >= 3 and d["replays"][0]["fidelity"] == "exact"
    assert c.get("/api/runs/nope").status_code == 404


@pytest.mark.slow
def test_user_tags_show_and_filter(ui):
    """A tag set with `flightlog tag` after the run ended is shown on the runs page and filters /api/runs."""
    from flightlog.cli import main

    c, ids, store = ui["c"], ui["ids"], ui["store"]
    assert main(["tag", ids[1], "baseline-v2", "--store", store]) == 0
    r = c.get("/api/runs", params={"tag": "baseline-v2"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert [r["run_id"] for r in d["runs"]] == [ids[1]]
    d = c.get("/api/runs", params={"tag": "baseline-v2", "where": "1=1"}).json()
    assert [r["run_id"] for r in d["runs"]] == [ids[1]]
    assert "baseline-v2" in c.get("/").text


@pytest.mark.slow
def test_token_protects_every_page_and_api(ui):
    """Without the token every page, API and static file is 401; the bearer header or the login cookie opens them."""
    rid = ui["ids"][0]
    paths = ["/", f"/runs/{rid}", f"/runs/{rid}/code", f"/runs/{rid}/steps", f"/runs/{rid}/health",
             f"/runs/{rid}/slices", f"/compare?runs={rid}", "/lineage", "/sql?q=select+1", "/sql.csv?q=select+1",
             "/api/runs", f"/api/runs/{rid}", f"/api/series?run={rid}&name=val/acc", "/static/app.js"]
    with httpx.Client(base_url=ui["srv"].url, timeout=30) as anon:
        for p in paths:
            assert anon.get(p).status_code == 401, p
            assert anon.get(p, headers={"Authorization": "Bearer wrong"}).status_code == 401, p
            assert httpx.get(ui["srv"].url + p, cookies={"flightlog_ui": "forged"}).status_code == 401, p
        assert anon.get("/login", params={"token": "wrong"}).status_code == 401
        r = anon.get("/login", params={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303 and TOKEN not in r.headers["set-cookie"]
        assert "HttpOnly" in r.headers["set-cookie"] and "samesite=strict" in r.headers["set-cookie"].lower()
        for p in paths:
            assert anon.get(p).status_code in (200, 400, 404), p  # the cookie now opens every route
    for p in paths:
        assert ui["c"].get(p).status_code == 200, p


@pytest.mark.slow
def test_pages_escape_hostile_store_content(ui):
    """Run names, params and metric names holding <script> are escaped on every page."""
    c, ids = ui["c"], ui["ids"]
    for p in ["/", f"/runs/{ids[0]}", f"/runs/{ids[0]}/code?against={ids[1]}", f"/compare?runs={ids[0]},{ids[1]}",
              f"/runs/{ids[0]}/steps", "/sql?q=select+*+from+metrics+limit+100", f"/?where=name+like+'%25one%25'"]:
        r = c.get(p)
        assert r.status_code == 200, (p, r.text[:300])
        assert "<script>alert" not in r.text, p
        assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "&lt;script&gt;alert(&#x27;param&#x27;)" in c.get(f"/runs/{ids[0]}").text
    assert HOSTILE.replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;") in c.get("/").text


@pytest.mark.slow
def test_code_snapshot_diff_and_verified_blobs(ui, tmp_path):
    """The code page diffs two runs' snapshots; a manifest pointing outside the blob store is refused."""
    c, ids = ui["c"], ui["ids"]
    r = c.get(f"/runs/{ids[1]}/code", params={"against": ids[0]})
    assert r.status_code == 200 and "+# tuned learning rate" in r.text
    from flightlog.collector import schema as S
    from flightlog.collector import store as st

    now = dt.datetime.now(dt.timezone.utc)
    st.LocalSink(ui["store"]).write("runs", pa.table({
        "run_id": ["evil-snap"], "name": ["evil"], "kind": ["train"], "status": ["finished"],
        "code_snapshot": ["../../../../etc/passwd"], "started_at": pa.array([now], S.TS)}))
    r = c.get("/runs/evil-snap/code")
    assert r.status_code == 404 and "root:" not in r.text and "not a blob digest" in r.text
    good = c.get(f"/api/runs/{ids[0]}").json()["run"]["code_snapshot"]
    blob = os.path.join(ui["store"], "blobs", good[:2], good)
    data = open(blob, "rb").read()
    try:
        os.chmod(blob, 0o644)
        open(blob, "wb").write(data + b" ")
        r = c.get(f"/runs/{ids[0]}/code")
        assert r.status_code == 404 and "corrupt" in r.text, r.text[-300:]
    finally:
        open(blob, "wb").write(data)


@pytest.mark.slow
def test_sql_page_and_csv(ui):
    """The SQL box runs read-only SQL, refuses writes and file reads, and downloads CSV."""
    c = ui["c"]
    r = c.get("/sql", params={"q": "SELECT name, count(*) AS n FROM metrics GROUP BY name ORDER BY name"})
    assert r.status_code == 200 and "train/loss" in r.text and "download CSV" in r.text
    r = c.get("/sql.csv", params={"q": "SELECT name, count(*) AS n FROM metrics WHERE name = 'val/acc' GROUP BY name"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.text.splitlines() == ['"name","n"', '"val/acc",6']
    r = c.get("/sql", params={"q": "COPY runs TO '/tmp/x.csv'"})
    assert "only read-only queries" in r.text
    r = c.get("/sql.csv", params={"q": "SELECT * FROM read_text('/etc/passwd')"})
    assert r.status_code in (400, 403) and "root:" not in r.text


@pytest.mark.slow
def test_run_page_sections(ui):
    """The run page shows params, charts grouped by prefix, the replay verdict and checkpoints."""
    rid = ui["ids"][0]
    t = ui["c"].get(f"/runs/{rid}").text
    for s in ("<h3>train</h3>", "<h3>val</h3>", "fidelity exact", "ckpt epoch=", "data-partial", "lr"):
        assert s in t, s
    assert "grad_norm" in t and "42 replayed" in t
    h = ui["c"].get(f"/runs/{rid}/health").text
    assert "<details" in h and "st-" in h


def test_collector_mounts_ui_under_ui(tmp_path):
    """`flightlog serve`'s app serves the same UI under /ui behind the collector's token."""
    from flightlog.collector.server import create_app

    store = str(tmp_path / "s")
    srv = UIServer(create_app(store, "tok"))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/ui/").status_code == 401
            r = c.get("/ui/", headers={"Authorization": "Bearer tok"})
            assert r.status_code == 200 and 'href="/ui/static/app.js"' not in r.text
            assert 'src="/ui/static/app.js"' in r.text and 'href="/ui/sql"' in r.text
            assert c.get("/ui/api/runs", headers={"Authorization": "Bearer tok"}).json()["total"] == 0
            assert c.get("/healthz").status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("lo,hi", [(None, None), (20_000.5, 81_234),
                                   pytest.param(0, 99_999, marks=pytest.mark.slow),
                                   pytest.param(-50, 1e9, marks=pytest.mark.slow),
                                   pytest.param(40_000, 45_000, marks=pytest.mark.slow)])
def test_pyramid_cache_keeps_extremes_and_counts(srv, monkeypatch, lo, hi):
    """The cached M4 pyramid (big series) returns real points only, exact counts, and every bucket's extremes."""
    from flightlog.ui import data as D

    monkeypatch.setattr(D, "PYRAMID_MIN_ROWS", 0)
    monkeypatch.setattr(D, "PYRAMID_BUCKETS", 2048)
    D._PYRAMIDS.clear()
    y = _planted_values()
    y[50_003] = np.nan
    points = 400
    for attempt in range(2):  # the first call builds the pyramid, the second is served from it
        d = D.series(srv["store"], "planted", "wave", points, "step", lo, hi)
        assert len(D._PYRAMIDS) == 1
    a = 0 if lo is None else max(0, math.ceil(lo))
    b = PLANT_N - 1 if hi is None else min(PLANT_N - 1, math.floor(hi))
    assert d["n_total"] == b - a + 1 and d["n_nonfinite"] == (1 if a <= 50_003 <= b else 0)
    assert len(d["x"]) <= points and all(a <= x <= b for x in d["x"])
    assert all(y[x] == v for x, v in zip(d["x"], d["y"]))  # real points only
    xs, ys = np.array(d["x"]), np.array(d["y"])
    seg = y[a:b + 1]
    assert ys.max() == np.nanmax(seg) and ys.min() == np.nanmin(seg)
    nb = points // 4
    w = (b - a) / nb
    for j in range(1, nb - 1):  # each bucket's extremes are drawn within one bucket of where they are
        lo_j, hi_j = a + j * w, a + (j + 1) * w
        inb = seg[int(math.ceil(lo_j - a)):int(math.floor(hi_j - a)) + 1]
        inb = inb[~np.isnan(inb)]
        if not inb.size:
            continue
        near = (xs >= lo_j - w) & (xs <= hi_j + w)
        assert ys[near].max() >= inb.max() and ys[near].min() <= inb.min(), j


def test_live_run_row_updates_without_rescan(srv):
    """A running run is marked live on the runs page and its new status shows on the next refresh."""
    from flightlog.collector import schema as S
    from flightlog.collector import store as st

    now = dt.datetime.now(dt.timezone.utc)
    sink = st.LocalSink(srv["store"])

    def row(status):
        return pa.table({"run_id": ["live-run"], "project": ["live"], "name": ["live one"], "kind": ["train"],
                         "status": [status], "started_at": pa.array([now], S.TS), "host": ["elsewhere"],
                         "updated_at": pa.array([dt.datetime.now(dt.timezone.utc)], S.TS)})

    sink.write("runs", row("running"))
    st.touch_heartbeat(srv["store"], "live-run", sink.writer)
    r = srv["c"].get("/", params={"project": "live"})
    assert "data-live=" in r.text and "st-running" in r.text
    sink.write("runs", row("finished"))
    part = srv["c"].get("/", params={"project": "live", "partial": 1}).text
    assert "st-finished" in part and "st-running" not in part and "<html" not in part


def test_cli_bad_input_exits_2(tmp_path, capsys):
    """`flightlog ui` on a missing store or a bad port prints one error line and exits 2."""
    from flightlog import cli

    assert cli.main(["ui", "--store", str(tmp_path / "nope")]) == 2
    assert "no flightlog store" in capsys.readouterr().err
    (tmp_path / "s").mkdir()
    assert cli.main(["ui", "--store", str(tmp_path / "s"), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_slices_section_finds_planted_slice(srv):
    """With predictions logged, the run's slices section names the slice where the errors are."""
    import json as _json

    from flightlog.collector import store as st

    rng = np.random.default_rng(3)
    n = 600
    color = rng.choice(["red", "blue", "green"], n)
    size = rng.integers(0, 10, n)
    wrong = (color == "red") & (size >= 5)
    st.LocalSink(srv["store"]).write("predictions", pa.table({
        "run_id": ["planted"] * n, "item_id": [str(i) for i in range(n)],
        "y_true": ["1"] * n, "y_pred": np.where(wrong, "0", "1").tolist(),
        "features": [_json.dumps({"color": str(c), "size": int(s)}) for c, s in zip(color, size)]}))
    r = srv["c"].get("/runs/planted/slices")
    assert r.status_code == 200 and "<table" in r.text, r.text[:500]
    first = r.text.split("<tbody>", 1)[1].split("</tr>", 1)[0]
    assert "color" in first and "red" in first, first
    assert "600 prediction rows" in srv["c"].get("/runs/planted").text
