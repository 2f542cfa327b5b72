"""The real app in a real headless browser: every page renders, without an exception box.

The app uses Streamlit's classic multipage layout (``app.py`` = Home, one file per page in
``pages/``); every page draws the shared sidebar itself, and the open run is in the URL. The
tests below also open every page directly by URL with ``?run=`` and after a reload, click a
heatmap cell, and open the exported report.

Starts ``streamlit run app.py`` on a free localhost port against a runs root holding one finished
run (tests/app_fixtures.py), visits every page with Debian's chromium through Python playwright
(no browser download), waits for its title and for the script to finish, takes a full-page
screenshot into ``screenshots/NN_<page>.png`` (gitignored) and fails on a Streamlit exception box
or a traceback. Skipped when chromium or playwright is missing (``make browser-deps``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "screenshots"
PAGES = [  # (screenshot name, url path, title the page shows)
    ("00_home", "", "MoE Safety Lab"),
    ("01_data", "data", "Data & batches"),
    ("02_analysis", "analysis", "Analysis"),
    ("03_heatmaps", "heatmaps", "Heatmaps"),
    ("04_experts", "experts", "Experts"),
    ("05_training", "training", "Training"),
    ("06_evaluation", "evaluation", "Evaluation"),
    ("07_present", "present", "Present"),
    ("08_runs", "runs", "Runs"),
]
RUNS: dict = {}  # "older" / "newest" fixture runs (filled by the server fixture)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as r:
            return r.read().decode().strip() == "ok"
    except OSError:
        return False


@pytest.fixture(scope="module")
def playwright_sync():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (install it with `make browser-deps`)")
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    return pw


@pytest.fixture(scope="module")
def server(tmp_path_factory, playwright_sync):
    """A streamlit server on localhost over a runs root with one finished (analysed + trained) run."""
    from tests.app_fixtures import build_finished_run, save_tiny_model

    tmp = tmp_path_factory.mktemp("browser")
    model_dir = save_tiny_model(tmp / "tiny-olmoe")
    older = build_finished_run(tmp / "runs", model_dir, n_batches=2, train=False, name="older run", seed=1)
    time.sleep(1.1)  # run ids carry the creation second: keep "browser fixture" the newest (default) run
    newest = build_finished_run(tmp / "runs", model_dir, n_batches=3, train=True, evaluate=True, name="browser fixture")
    RUNS.update(older=older, newest=newest)
    port = _free_port()
    env = {**os.environ, "MOE_LAB_RUNS": str(tmp / "runs"), "PYTHONPATH": str(REPO)}
    log = open(tmp / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "localhost", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while not _healthy(port):
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"streamlit did not come up:\n{(tmp / 'streamlit.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://localhost:{port}", tmp / "runs", model_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def browser_page(playwright_sync):
    """(browser, a 1440x1000 page) of Debian's chromium; the browser always closes."""
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser, browser.new_page(viewport={"width": 1440, "height": 1000})
        finally:
            browser.close()


def _wait_idle(page, timeout_s: float = 60) -> None:
    """Until the script run is over (no 'running' status widget) and the page stopped changing."""
    deadline = time.time() + timeout_s
    quiet = 0
    while time.time() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        quiet = 0 if running else quiet + 1
        if quiet >= 4:  # ~2 s without a script run in progress
            return
        time.sleep(0.5)


def _fit_viewport_to_content(page) -> None:
    """Streamlit scrolls inside its main container, so a 'full page' shot needs a viewport that tall."""
    height = page.evaluate(
        """() => Math.max(800, ...['[data-testid="stMain"]', '[data-testid="stAppViewContainer"]', 'section.main']
            .map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))"""
    )
    page.set_viewport_size({"width": 1440, "height": min(int(height) + 40, 8000)})
    time.sleep(0.8)  # let charts re-layout to the new size


def test_every_page_renders_without_errors(server, playwright_sync):
    url, _, _ = server
    if SHOTS.exists():
        for old in SHOTS.glob("*.png"):
            old.unlink()
    SHOTS.mkdir(exist_ok=True)
    problems = []
    with browser_page(playwright_sync) as (browser, page):
        for shot, url_path, title in PAGES:
            page.set_viewport_size({"width": 1440, "height": 1000})
            page.goto(f"{url}/{url_path}", wait_until="domcontentloaded")
            page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=60_000)
            _wait_idle(page)
            _fit_viewport_to_content(page)
            page.screenshot(path=str(SHOTS / f"{shot}.png"), full_page=True)
            n_exc = page.locator('[data-testid="stException"]').count()
            body = page.inner_text("body")
            if n_exc or "Traceback" in body:
                problems.append(f"{url_path}: {n_exc} exception box(es); {body[:800]!r}")
            # the sidebar (run picker, model) is on every page: the app script ran, not just the page file
            sidebar = page.locator('[data-testid="stSidebar"]')
            if sidebar.get_by_text("Model:").count() == 0 or sidebar.get_by_text("tiny-olmoe").count() == 0:
                problems.append(f"{url_path}: the sidebar does not show the open run's model")
            if page.get_by_text("Page not found").count():
                problems.append(f"{url_path}: 'Page not found'")
    assert not problems, "\n".join(problems)
    assert {f"{s}.png" for s, _, _ in PAGES} <= {p.name for p in SHOTS.glob("*.png")}


def test_a_background_job_shows_live_progress_then_its_results(server, playwright_sync):
    """Start an analysis from the page; the job panel updates by itself and the results appear."""
    from moe_core.batches import save_plan
    from moe_core.runs import Run
    from tests.app_fixtures import compose_plan

    url, runs_root, model_dir = server
    run = Run.create(runs_root, name="live job")
    # Enough work (every demo batch, 96 new tokens) that a quiet machine still needs several of the
    # panel's 2-second polls: with 10 short batches the job could finish between two polls.
    plan = compose_plan(100, seed=2)
    n = len(plan.batches)
    save_plan(run.path_for("plan"), plan)
    with browser_page(playwright_sync) as (browser, page):
        page.goto(f"{url}/analysis?run={run.id}", wait_until="domcontentloaded")
        page.get_by_role("heading", name="Analysis", exact=True).first.wait_for(timeout=60_000)
        _wait_idle(page)
        page.get_by_text("Local model folder").click()
        box = page.get_by_role("textbox", name="Model folder", exact=True)
        box.wait_for(timeout=30_000)
        box.fill(str(model_dir))
        box.press("Enter")
        _wait_idle(page)
        max_new = page.get_by_label("Max new tokens")
        max_new.fill("96")
        max_new.press("Enter")
        _wait_idle(page)
        page.get_by_role("button", name="Start analysis").click()
        # the panel refreshes itself: the bar advances to "k / n batches" (0 < k < n) without any click or reload
        running = "|".join(str(k) for k in range(1, n))
        page.get_by_text(re.compile(rf"\b({running}) / {n} batches")).first.wait_for(timeout=300_000)
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SHOTS / "02b_analysis_running.png"))
        page.get_by_role("heading", name="Results").wait_for(timeout=300_000)  # no reload: the panel polls
        _wait_idle(page)
        _fit_viewport_to_content(page)
        page.screenshot(path=str(SHOTS / "02c_analysis_done.png"), full_page=True)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert "Traceback" not in page.inner_text("body")
    assert Run.open(run.path).completed_batches() == set(range(n))
    assert (Run.open(run.path).step("analysis") or {}).get("config", {}).get("max_new_tokens") == 96


def _check_page(page, title: str, run_id: str, problems: list[str], where: str) -> None:
    """The page's title, no exception, and the shared sidebar showing the run ``run_id``."""
    page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=60_000)
    _wait_idle(page)
    sidebar = page.locator('[data-testid="stSidebar"]')
    if page.locator('[data-testid="stException"]').count() or "Traceback" in page.inner_text("body"):
        problems.append(f"{where}: an exception")
    if sidebar.get_by_text("Model:").count() == 0:
        problems.append(f"{where}: no shared sidebar")
    text = sidebar.inner_text()
    if "Open run: " not in text or run_id not in text:
        problems.append(f"{where}: the sidebar does not show run {run_id}: {text[:300]!r}")


def test_every_page_by_url_and_after_a_reload_keeps_the_run(server, playwright_sync):
    """A shared link to a page of the *older* run (not the default one): right page, shared sidebar,
    right run; the same after a reload, after a sidebar click, and after back/forward."""
    url, _, _ = server
    older = RUNS["older"]
    problems: list[str] = []
    SHOTS.mkdir(exist_ok=True)
    with browser_page(playwright_sync) as (browser, page):
        for shot, url_path, title in PAGES:
            page.goto(f"{url}/{url_path}?run={older.id}", wait_until="domcontentloaded")
            _check_page(page, title, older.id, problems, f"/{url_path} by URL")
            page.reload(wait_until="domcontentloaded")
            _check_page(page, title, older.id, problems, f"/{url_path} after a reload")
            if f"run={older.id}" not in page.url:
                problems.append(f"/{url_path}: the URL lost the run: {page.url}")
        page.screenshot(path=str(SHOTS / "10_by_url_older_run.png"))
        # navigate with the sidebar, then reload and go back: still the older run
        page.locator('[data-testid="stSidebar"]').get_by_role("link", name="Heatmaps").click()
        page.wait_for_url(re.compile(r"/heatmaps\?run="), timeout=30_000)
        _check_page(page, "Heatmaps", older.id, problems, "sidebar click")
        page.reload(wait_until="domcontentloaded")
        _check_page(page, "Heatmaps", older.id, problems, "reload after a sidebar click")
        page.go_back(wait_until="domcontentloaded")
        _check_page(page, "Runs", older.id, problems, "back")
    assert not problems, "\n".join(problems)


def _cell_center(page, layer: int, expert: int) -> tuple[float, float]:
    """Screen position of a heatmap cell (plotly's own axis mapping of the first chart)."""
    return page.evaluate(
        """([l, e]) => { const gd = document.querySelector('.js-plotly-plot');
             const r = gd.getBoundingClientRect(); const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
             return [r.left + xa._offset + xa.l2p(e), r.top + ya._offset + ya.l2p(l)]; }""", [layer, expert])


@pytest.mark.xfail(strict=False, reason="issue 12 problem 4, open: the click layer hovers on the right cell in "
                   "Chromium but st.plotly_chart reports no selection for the click yet (AppTest guards the layer "
                   "and the ?layer=&expert= links); see screenshots/11a_heatmap_clicked.png")
def test_clicking_a_heatmap_cell_drills_down(server, playwright_sync):
    url, _, _ = server
    newest = RUNS["newest"]
    with browser_page(playwright_sync) as (browser, page):
        page.goto(f"{url}/heatmaps?run={newest.id}", wait_until="domcontentloaded")
        page.get_by_role("heading", name="Heatmaps", exact=True).first.wait_for(timeout=60_000)
        _wait_idle(page)
        chart = page.locator(".js-plotly-plot").first
        chart.wait_for(timeout=30_000)
        chart.scroll_into_view_if_needed()
        time.sleep(1.0)
        x, y = _cell_center(page, 1, 5)
        page.mouse.move(x, y)
        time.sleep(0.5)
        page.mouse.click(x, y)
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SHOTS / "11a_heatmap_clicked.png"))
        page.get_by_text("Layer 1, expert 5: risk difference per batch").first.wait_for(timeout=30_000)
        _wait_idle(page)
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SHOTS / "11_heatmap_click.png"))
        assert page.get_by_text("Tokens of batch 0 routed to layer 1, expert 5").count() == 1
        assert page.locator('[data-testid="stException"]').count() == 0


def test_present_and_the_exported_report_opens_offline(server, playwright_sync):
    url, _, _ = server
    newest = RUNS["newest"]
    with browser_page(playwright_sync) as (browser, page):
        page.goto(f"{url}/present?run={newest.id}", wait_until="domcontentloaded")
        page.get_by_role("heading", name="Present", exact=True).first.wait_for(timeout=60_000)
        _wait_idle(page)
        page.get_by_role("button", name="Export report").click()
        page.get_by_role("button", name="Download report.html").wait_for(timeout=60_000)
        _wait_idle(page)
        _fit_viewport_to_content(page)
        page.screenshot(path=str(SHOTS / "12_present.png"), full_page=True)
        assert page.locator('[data-testid="stException"]').count() == 0
        report = newest.path / "report.html"
        assert report.is_file()
        # the file on its own, offline (no server, no network): its figures draw
        offline = browser.new_context(offline=True, viewport={"width": 1200, "height": 900}).new_page()
        offline.goto(report.as_uri(), wait_until="load")
        offline.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
        assert offline.locator(".js-plotly-plot").count() >= 2
        offline.screenshot(path=str(SHOTS / "13_report.png"), full_page=True)


def test_a_reviewer_audits_the_judge_in_the_browser(server, playwright_sync):
    """Issue 11: label an answer on the Evaluation page; the label lands in the run and the agreement shows."""
    from moe_core.audit import load_labels

    url, _, _ = server
    newest = RUNS["newest"]
    before = len(load_labels(newest, "comparison"))
    with browser_page(playwright_sync) as (browser, page):
        page.goto(f"{url}/evaluation?run={newest.id}", wait_until="domcontentloaded")
        page.get_by_role("heading", name="Audit the judge").first.wait_for(timeout=60_000)
        _wait_idle(page)
        page.get_by_role("button", name="partial", exact=True).click()
        page.get_by_text("kappa").first.wait_for(timeout=60_000)
        _wait_idle(page)
        _fit_viewport_to_content(page)
        page.screenshot(path=str(SHOTS / "14_audit.png"), full_page=True)
        assert page.locator('[data-testid="stException"]').count() == 0
    labels = load_labels(newest, "comparison")
    assert len(labels) == before + 1 and "partial" in set(labels["label"])
