"""The web UI in a real headless Chromium (Debian's package, driven by playwright-python).

One browser and one server per module. Set FLIGHTLOG_UI_SCREENSHOTS=docs/img to refresh the
screenshots in docs/ui.md from these tests.
"""
from __future__ import annotations

import os
import shutil

import pytest

from _ui_store import UIServer, add_replay, record_pipeline, record_runs

TOKEN = "browser-t0ken"


def _chromium() -> str | None:
    for c in (os.environ.get("FLIGHTLOG_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


CHROMIUM = _chromium()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                 "(apt-get install chromium; scripts/setup.sh does it)")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A real store (two training runs, a replay, a failing pipeline), the UI with a token, one browser."""
    from playwright.sync_api import sync_playwright

    from flightlog.ui import create_app

    tmp = tmp_path_factory.mktemp("uib")
    store = str(tmp / "store")
    ids = record_runs(tmp, store)
    add_replay(store, ids[0])
    pipe = record_pipeline(tmp, store)
    srv = UIServer(create_app(store, TOKEN))
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    yield {"url": srv.url, "ids": ids, "pipe": pipe, "ctx": ctx}
    ctx.close()
    browser.close()
    pw.stop()
    srv.stop()


@pytest.fixture
def page(env):
    """A fresh page logged in with the token; the test fails on any console error or page error."""
    pg = env["ctx"].new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{env['url']}/login?token={TOKEN}")
    yield pg
    pg.close()
    assert errors == [], errors


def _shot(pg, name: str) -> None:
    d = os.environ.get("FLIGHTLOG_UI_SCREENSHOTS")
    if d:
        os.makedirs(d, exist_ok=True)
        pg.screenshot(path=os.path.join(d, name), full_page=False)


def _chart(pg, title: str):
    """The uPlot data and the count of drawn (non-background) pixels of the chart captioned ``title``."""
    box = pg.locator("figure.chart-box", has=pg.locator("figcaption", has_text=title)).first
    box.locator('.chart[data-ready="1"]').wait_for(timeout=15_000)
    return box.evaluate("""b => {
        const el = b.querySelector('.chart'), u = el._uplot, c = el.querySelector('canvas');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let drawn = 0;
        for (let i = 3; i < px.length; i += 4) if (px[i] > 0) drawn++;
        return {n: u.data[0].length, series: u.series.map(s => s.label),
                y: u.data.slice(1).map(col => col.filter(v => v != null).length), drawn: drawn};
    }""")


def test_runs_page_to_run_with_drawn_charts(env, page):
    """The runs page lists the runs; clicking one opens its page with charts drawn from real data."""
    page.wait_for_selector("#runs-table")
    assert page.locator("#runs-body tr").count() == 3
    assert page.title().startswith("Runs")
    _shot(page, "ui-runs.png")
    page.locator("#runs-body a", has_text="one <script>").click()
    page.wait_for_url(f"**/runs/{env['ids'][0]}")
    loss = _chart(page, "train/loss")
    assert loss["n"] == 42 and loss["y"] == [42] and loss["drawn"] > 500
    page.locator("[data-loaded='1']").first.wait_for(timeout=20_000)  # health checks loaded after paint
    assert page.locator("details.check").count() > 0
    _shot(page, "ui-run.png")


def test_replayed_series_is_marked_with_verdict(env, page):
    """A replayed metric is drawn as its own marked series, with the replay's verdict above it."""
    page.goto(f"{env['url']}/runs/{env['ids'][0]}")
    g = _chart(page, "grad_norm")
    assert g["series"][1] == "grad_norm (replayed)" and g["y"] == [42] and g["drawn"] > 200
    box = page.locator("figure.chart-box", has=page.locator("figcaption", has_text="grad_norm")).first
    assert "fidelity exact" in box.locator(".verdict").inner_text()


def test_zoom_requeries_visible_range(env, page):
    """Dragging over a chart re-queries the selected x range and redraws it."""
    page.goto(f"{env['url']}/runs/{env['ids'][0]}")
    _chart(page, "train/loss")
    box = page.locator("figure.chart-box", has=page.locator("figcaption", has_text="train/loss")).first
    over = box.locator(".u-over")
    over.scroll_into_view_if_needed()
    bb = over.bounding_box()
    page.mouse.move(bb["x"] + bb["width"] * 0.25, bb["y"] + bb["height"] / 2)
    page.mouse.down()
    page.mouse.move(bb["x"] + bb["width"] * 0.5, bb["y"] + bb["height"] / 2, steps=5)
    page.mouse.up()
    page.wait_for_function("""() => [...document.querySelectorAll('.chart-info')]
        .some(n => n.textContent.includes('zoomed'))""", timeout=10_000)
    n = box.evaluate("b => b.querySelector('.chart')._uplot.data[0].length")
    assert 3 <= n < 42


def test_compare_two_runs(env, page):
    """Selecting two runs and pressing Compare overlays their curves and highlights differing params."""
    page.wait_for_selector("#runs-table")
    for rid in env["ids"]:
        page.locator(f'#runs-body input[value="{rid}"]').check()
    page.locator("#compare-btn").click()
    page.wait_for_url("**/compare?**")
    c = _chart(page, "train/loss")
    assert len(c["series"]) == 3 and c["y"] == [42, 42] and c["drawn"] > 500
    row = page.locator("table.params tr.diff", has=page.locator("th", has_text="lr"))
    assert row.count() == 1 and "0.5" in row.inner_text() and "1" in row.inner_text()
    _shot(page, "ui-compare.png")


def test_sql_query_and_csv_link(env, page):
    """The SQL page runs a typed query and shows the rows with a CSV download link."""
    page.goto(f"{env['url']}/sql")
    page.fill("textarea[name=q]", "SELECT name, count(*) AS n FROM metrics GROUP BY name ORDER BY name")
    page.locator("#sql-form button").click()
    page.wait_for_selector("table.sql-result")
    text = page.locator("table.sql-result").inner_text()
    assert "train/loss" in text and "42" in text and "grad_norm" in text
    assert page.locator("#csv").get_attribute("href").startswith("/sql.csv?q=")
    _shot(page, "ui-sql.png")


def test_steps_failure_and_lineage(env, page):
    """The steps page shows the failed call with its inputs; its lineage link draws the upstream steps."""
    page.goto(f"{env['url']}/runs/{env['pipe']}/steps")
    fail = page.locator(".failure")
    assert fail.count() == 1 and "ValueError" in fail.inner_text() and "numpy.ndarray" in fail.inner_text()
    fail.locator("a", has_text="lineage").click()
    page.wait_for_selector(".lineage .node.call")
    steps = page.locator(".lineage .node.call > a.step").all_inner_texts()
    assert steps[:3] == ["check", "scale", "load"]
    _shot(page, "ui-lineage.png")


def test_login_required_in_browser(env):
    """A browser without the cookie gets the token form, not the runs."""
    pg = env["ctx"].browser.new_context().new_page()
    try:
        r = pg.goto(f"{env['url']}/")
        assert r.status == 401 and pg.locator("input[name=token]").count() == 1
        pg.fill("input[name=token]", TOKEN)
        pg.locator("button").click()
        pg.wait_for_selector("#runs-table")
    finally:
        pg.context.close()
