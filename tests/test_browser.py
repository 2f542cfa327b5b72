"""The real app in a real headless browser: every page renders, without an exception box.

The app uses Streamlit's classic multipage layout (``app.py`` = Home, one file per page in
``pages/``); every page draws the shared sidebar itself, and the open run is in the URL. The
tests below also open every page directly by URL with ``?run=`` and after a reload, click a
heatmap cell (and a batch's bar), check the evaluation chart on a 400 px screen, open the exported
report offline, and walk the whole story as a new user would (``test_the_whole_story_in_a_real_browser``:
new run, compose, select a batch, hand-pick, analyse, click through the heatmaps, pick experts,
train, evaluate, present, export; reloads in the middle; ``screenshots/20_walk_*.png``).

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

from moe_core.store.jobs import LAUNCH_NAME

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
    ("09_atlas", "atlas", "Expert atlas"),
    ("08_runs", "runs", "Runs"),  # last: the by-URL test goes back to it
]
RUNS: dict = {}  # "older" / "newest" fixture runs (filled by the server fixture)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


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
    pw = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)"
    )
    return pw


@pytest.fixture(scope="module")
def server(tmp_path_factory, playwright_sync):
    """A streamlit server on localhost over a runs root with one finished (analysed + trained) run."""
    from tests.app_fixtures import build_finished_run, save_tiny_model

    tmp = tmp_path_factory.mktemp("browser")
    model_dir = save_tiny_model(tmp / "tiny-olmoe")
    older = build_finished_run(tmp / "runs", model_dir, n_batches=2, train=False, name="older run", seed=1)
    time.sleep(1.1)  # run ids carry the creation second: keep "browser fixture" the newest (default) run
    newest = build_finished_run(
        tmp / "runs", model_dir, n_batches=3, train=True, evaluate=True, name="browser fixture"
    )
    from moe_core import pipeline as P

    P.atlas(P.AtlasSpec(), newest)  # the expert atlas, for the walk from a heatmap cell to an expert's card
    RUNS.update(older=older, newest=newest)
    port = _free_port()
    env = {**os.environ, "MOE_LAB_RUNS": str(tmp / "runs"), "PYTHONPATH": str(REPO)}
    log = open(tmp / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(REPO / "app.py"),
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "localhost",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
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
    from moe_core.batching.plan import save_plan
    from moe_core.store.run import Run
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
        for _shot, url_path, title in PAGES:
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


def _wait_plotted(page, nth: int = 0) -> None:
    """Until Plotly has drawn the ``nth`` chart: its div exists before Plotly lays it out (slow under load)."""
    page.wait_for_function(
        """i => { const gd = document.querySelectorAll('.js-plotly-plot')[i];
                                     return !!(gd && gd._fullLayout && gd._fullLayout.xaxis); }""",
        arg=nth,
        timeout=60_000,
    )


def _cell_center(page, layer: int, expert: int) -> tuple[float, float]:
    """Screen position of a heatmap cell (plotly's own axis mapping of the first chart)."""
    _wait_plotted(page)
    return page.evaluate(
        """([l, e]) => { const gd = document.querySelector('.js-plotly-plot');
             const r = gd.getBoundingClientRect(); const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
             return [r.left + xa._offset + xa.l2p(e), r.top + ya._offset + ya.l2p(l)]; }""",
        [layer, expert],
    )


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
        # the expert atlas: the clicked expert's card -> one of its contexts -> that sample's tokens
        page.get_by_text("This expert in the atlas (whole run)").first.click()
        page.get_by_role("heading", name="Expert atlas", exact=True).first.wait_for(timeout=60_000)
        page.get_by_text("On unsafe tokens").first.wait_for(timeout=30_000)
        _wait_idle(page)
        page.screenshot(path=str(SHOTS / "13_atlas_card.png"))
        assert page.locator("mark").count() >= 1  # a context with its routed token highlighted
        context = page.locator("a", has_text="sample").first
        batch = int(context.inner_text().split()[1])
        context.click()
        page.get_by_role("heading", name="Heatmaps", exact=True).first.wait_for(timeout=60_000)
        page.get_by_text(f"Tokens of batch {batch} routed to layer 1, expert 5").first.wait_for(
            timeout=30_000
        )
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
        # issue 20 row 12: on a 400 px phone the report fits (tables scroll in their box) and no legend
        # sits over its figure's title
        phone = browser.new_context(offline=True, viewport={"width": 400, "height": 900}).new_page()
        phone.goto(report.as_uri(), wait_until="load")
        phone.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
        time.sleep(1.0)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 402
        overlaps = phone.evaluate(
            """() => [...document.querySelectorAll('.js-plotly-plot')].filter(gd => {
                 const t = gd.querySelector('.gtitle'), l = gd.querySelector('.legend');
                 if (!t || !l) return false;
                 const a = t.getBoundingClientRect(), b = l.getBoundingClientRect();
                 return !(a.right < b.left || b.right < a.left || a.bottom < b.top || b.bottom < a.top); }).length"""
        )
        assert overlaps == 0
        phone.screenshot(path=str(SHOTS / "13_report_400px.png"), full_page=True)


def test_home_ticks_off_demo_stages_live(server, playwright_sync):
    """Issue 12, problem 5: while the demo works, Home ticks off each finished stage and links to its
    results as soon as it ends, without a reload (a stand-in demo process; the stage's files appear)."""
    import json
    import shutil

    from moe_core.store.run import Run

    url, runs_root, _ = server
    run = Run.create(runs_root, name="demo live", model="organism")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(180)", "moe_core", "demo"])
    try:
        (run.path / "jobs" / "demo").mkdir(parents=True, exist_ok=True)
        (run.path / "jobs" / "demo" / LAUNCH_NAME).write_text(
            json.dumps({"pid": proc.pid, "launched": time.time()})
        )
        run.job("demo").events.emit("progress", 1, 3, "batch 1/3")
        run.job("demo").write_status("running")
        with browser_page(playwright_sync) as (browser, page):
            page.goto(f"{url}/?run={run.id}", wait_until="domcontentloaded")
            page.get_by_text("0 of 5 stages done").first.wait_for(timeout=60_000)
            main = page.locator('[data-testid="stMain"]')
            analysis = main.get_by_role("link", name=re.compile(r"Analysis$"))
            assert (
                "check_circle" not in analysis.first.inner_text()
                and main.get_by_text("See the heatmaps").count() == 0
            )
            newest = RUNS["newest"]  # the analysis stage ends: its files land in the run, its job says done
            for kind in ("plan", "risk_aggregated", "risk_per_batch"):
                run.path_for(kind).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(newest.path_for(kind), run.path_for(kind))
            run.job("demo").write_status("done")
            page.get_by_text("1 of 5 stages done").first.wait_for(timeout=30_000)  # no reload: Home polls
            main.get_by_role("link", name="See the heatmaps").wait_for(timeout=30_000)
            # a rerun streams its elements one by one: the stage's tick may land after the links above
            analysis.filter(has_text="check_circle").first.wait_for(timeout=30_000)
            assert page.locator('[data-testid="stException"]').count() == 0
            page.screenshot(path=str(SHOTS / "16_home_demo_live.png"))
    finally:
        proc.kill()
        proc.wait()


def _overlap(a: list[float], b: list[float]) -> bool:
    """Whether two [left, top, right, bottom] boxes share more than a pixel."""
    return min(a[2], b[2]) - max(a[0], b[0]) > 1 and min(a[3], b[3]) - max(a[1], b[1]) > 1


def test_the_evaluation_chart_is_readable_on_a_400px_screen(server, playwright_sync):
    """Issue 12, problem 10: on a 400 px wide screen the before/after chart's category labels neither
    overlap each other nor the legend, and stay inside the chart."""
    url, _, _ = server
    newest = RUNS["newest"]
    with browser_page(playwright_sync) as (browser, page):
        page.set_viewport_size({"width": 400, "height": 900})
        page.goto(f"{url}/evaluation?run={newest.id}", wait_until="domcontentloaded")
        page.get_by_role("heading", name="Answers side by side").wait_for(timeout=60_000)
        _wait_idle(page)
        chart_js = """() => [...document.querySelectorAll('.js-plotly-plot')]
                   .find(g => g._fullLayout && ((g._fullLayout.title || {}).text || '').includes('Held-out behaviour')
                              && g.querySelectorAll('.xtick text').length > 0)"""
        page.wait_for_function(
            f"() => !!({chart_js})()", timeout=60_000
        )  # Plotly draws after the script run ends
        boxes = page.evaluate(
            """() => { const gd = [...document.querySelectorAll('.js-plotly-plot')]
                   .find(g => ((g._fullLayout.title || {}).text || '').includes('Held-out behaviour'));
                 if (gd) gd.scrollIntoView();
                 const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
                 return gd && {chart: box(gd), ticks: [...gd.querySelectorAll('.xtick text')].map(box),
                                legend: [...gd.querySelectorAll('.legend .traces')].map(box)}; }"""
        )
        time.sleep(0.5)
        page.screenshot(path=str(SHOTS / "15_evaluation_400px.png"))
    assert boxes, "no before/after chart on the Evaluation page"
    ticks, legend, chart = boxes["ticks"], boxes["legend"], boxes["chart"]
    assert len(ticks) == 4 and legend, boxes
    assert chart[2] - chart[0] <= 400
    clashes = [(a, b) for i, a in enumerate(ticks) for b in ticks[i + 1 :] + legend if _overlap(a, b)]
    assert not clashes, f"labels overlap at 400 px: {clashes}"
    assert all(t[0] >= chart[0] - 1 and t[2] <= chart[2] + 1 for t in ticks), (ticks, chart)


def test_a_reviewer_audits_the_judge_in_the_browser(server, playwright_sync):
    """Issue 11: label an answer on the Evaluation page; the label lands in the run and the agreement shows."""
    from moe_core.eval.audit import load_labels

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


# -- the whole story, as a new user walks it (issue 12's Done-when) ---------------------------------
class Walk:
    """One browser tab walking the app; after every step: no exception box, no error banner, and the
    URL's ``?run=`` and the run the sidebar shows are the walk's run (never a stale one)."""

    def __init__(self, page, url: str) -> None:
        self.page, self.url, self.run_id, self.n = page, url, "", 0
        self.t0, self.times = time.monotonic(), []  # (step, seconds since the walk began): printed at the end

    def check(self, where: str) -> None:
        page = self.page
        _wait_idle(page, 30)
        self.times.append((where, round(time.monotonic() - self.t0, 1)))
        bad = [
            f"{n} {what}"
            for what, sel in (
                ("exception box(es)", '[data-testid="stException"]'),
                ("error banner(s)", '[data-testid="stAlertContentError"]'),
            )
            if (n := page.locator(sel).count())
        ]
        body = page.inner_text("body")
        bad += [
            f"{word!r} on the page"
            for word in ("Traceback", "Page not found", "Internal error")
            if word in body
        ]
        if self.run_id:
            if f"run={self.run_id}" not in page.url:
                bad.append(f"stale run: the URL {page.url} does not name run {self.run_id}")
            if self.run_id not in page.locator('[data-testid="stSidebar"]').inner_text():
                bad.append(f"stale run: the sidebar does not show run {self.run_id}")
        if bad:
            self.shot(f"FAILED_{re.sub(r'[^a-z0-9]+', '_', where.lower())}")
            errors = [e.inner_text() for e in page.locator('[data-testid="stAlertContentError"]').all()]
            pytest.fail(f"{where}: " + "; ".join(bad) + f"\nerror banners: {errors}\npage: {body[:1500]!r}")

    def shot(self, name: str) -> None:
        self.n += 1
        _fit_viewport_to_content(self.page)
        self.page.screenshot(path=str(SHOTS / f"20_walk_{self.n:02d}_{name}.png"), full_page=True)
        self.page.set_viewport_size({"width": 1440, "height": 1000})

    def open(self, label: str, title: str) -> None:
        """Go to a page by its sidebar link, as a user would (the link carries the run)."""
        self.page.locator('[data-testid="stSidebar"]').get_by_role("link", name=label, exact=True).click()
        self.page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=60_000)
        self.check(f"/{label}")

    def reload(self, title: str) -> None:
        self.page.reload(wait_until="domcontentloaded")
        self.page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=60_000)
        self.check(f"{title} after a reload")

    def fill(self, label: str, value: str) -> None:
        box = self.page.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Enter")
        _wait_idle(self.page, 30)

    def click(self, name: str) -> None:
        self.page.get_by_role("button", name=name, exact=True).click()

    def wait_text(self, text, timeout_s: float = 60) -> None:
        self.page.get_by_text(text).first.wait_for(timeout=timeout_s * 1000)

    def click_row(self, row: int) -> None:
        """Select row ``row`` of the visible table (st.dataframe draws on a canvas: click its row-selection box)."""
        grid = self.page.locator('[data-testid="stDataFrame"] >> visible=true').first
        grid.scroll_into_view_if_needed()
        time.sleep(0.5)
        box = grid.bounding_box()
        self.page.mouse.click(box["x"] + 15, box["y"] + 35 * (row + 1) + 17)  # header and rows are 35 px high

    def click_at(self, chart: int, x_value: float, y_value: float | None) -> None:
        """Click the point (x, y) of the ``chart``-th plotly chart, at its pixel position (plotly's axis mapping);
        ``y_value`` None: halfway up the bar at ``x_value`` (a bar is clicked inside, never on its edge)."""
        gd = self.page.locator(".js-plotly-plot").nth(chart)
        gd.wait_for(timeout=30_000)
        gd.scroll_into_view_if_needed()
        time.sleep(0.8)
        _wait_plotted(self.page, chart)
        x, y = self.page.evaluate(
            """([i, xv, yv]) => { const gd = document.querySelectorAll('.js-plotly-plot')[i];
                 const r = gd.getBoundingClientRect(); const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
                 if (yv === null) { const t = gd.data[0]; yv = (t.y[t.x.indexOf(xv)] || 0) / 2; }
                 return [r.left + xa._offset + xa.l2p(xv), r.top + ya._offset + ya.l2p(yv)]; }""",
            [chart, x_value, y_value],
        )
        self.page.mouse.move(x, y)
        time.sleep(0.3)
        self.page.mouse.click(x, y)


def _create_run(w: Walk, name: str, runs_root: Path) -> None:
    """'New run' in the sidebar, as a user would: the name committed (Enter) before the click, on an idle page
    (a loaded CI machine once lost the first try: the URL never named the run within 30 s)."""
    page = w.page
    _wait_idle(page)
    page.locator('[data-testid="stSidebar"]').get_by_text("New run", exact=True).click()
    box = page.get_by_role("textbox", name="Name", exact=True)
    box.fill(name)
    box.press("Enter")
    _wait_idle(page)
    w.click("Create run")
    slug = name.replace(" ", "-")
    try:
        page.wait_for_url(re.compile(rf"run=\d{{8}}-\d{{6}}-{slug}"), timeout=90_000)
    except Exception as e:
        w.shot(f"create_{slug}_failed")
        made = sorted(p.name for p in runs_root.iterdir() if p.name.endswith(slug))
        raise AssertionError(f"no run {name!r} in the URL {page.url}; run folders made: {made}") from e
    _wait_idle(page)  # the URL changes before the rerun redraws the sidebar links with the new run
    w.run_id = re.search(r"run=([^&]+)", page.url).group(1)
    assert (runs_root / w.run_id).is_dir()


def _walk_data(w: Walk, runs_root: Path) -> tuple[str, str]:
    """A new run from the sidebar; compose the demo set in batches of 32, swap two prompts by hand, save."""
    page = w.page
    _create_run(w, "story walk", runs_root)
    w.check("new run")
    w.open("Data & batches", "Data & batches")
    w.fill("Batch size", "32")
    w.click("Compose batches")
    w.wait_text("Composed 7 batches of 32.")
    w.check("compose")
    page.get_by_role("tab", name="Overview of all batches", exact=True).click()
    w.click_row(2)  # select batch 2 in the overview: its prompts appear
    w.wait_text("Prompts of batch 2")
    w.check("batch selected")
    page.get_by_role("tab", name="Swap", exact=True).click()
    w.click("Swap")
    w.wait_text(re.compile(r"Swapped \S+ and \S+\."))
    a, b = re.search(r"Swapped (\S+) and (\S+)\.", page.inner_text("body")).groups()
    w.check("hand-pick (swap)")
    w.reload("Data & batches")  # the edited draft survives a reload: still unsaved, still 7 batches
    w.click("Save plan")
    w.wait_text("Saved the plan (7 batches")
    w.shot("data")
    return a, b


def _walk_analysis(w: Walk, model_dir: Path) -> None:
    """Analyse the saved plan with the tiny model (2 new tokens); reload while the job runs."""
    page = w.page
    w.open("Analysis", "Analysis")
    page.get_by_text("Local model folder").click()
    w.fill("Model folder", str(model_dir))
    w.fill("Max new tokens", "2")
    w.click("Start analysis")
    w.wait_text("Analysis started")
    w.reload("Analysis")  # mid-job: the job goes on, the page finds it again
    page.get_by_role("heading", name="Results").wait_for(timeout=240_000)
    w.check("analysis results")
    w.shot("analysis")


def _walk_heatmaps_and_experts(w: Walk) -> None:
    """Click a heatmap cell (drill-down), a batch's bar (its prompts and tokens), then pick experts:
    click a cell on the Experts page, toggle it by hand, save the mask."""
    w.open("Heatmaps", "Heatmaps")
    w.click_at(0, 5, 1)  # expert 5 of layer 1
    w.wait_text("Layer 1, expert 5: risk difference per batch")
    w.check("heatmap click")
    w.click_at(1, 3, None)  # the bar of batch 3
    w.wait_text("Tokens of batch 3 routed to layer 1, expert 5")
    w.check("batch bar click")
    w.shot("heatmaps")
    w.page.set_viewport_size({"width": 400, "height": 900})  # a phone: columns stack, nothing runs off
    w.reload("Heatmaps")
    w.page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    wide = w.page.evaluate("() => document.documentElement.scrollWidth")
    assert wide <= 420, f"the Heatmaps page is {wide} px wide on a 400 px screen"
    w.shot("heatmaps_400px")  # (back to 1440 px after the shot)
    w.open("Experts", "Experts")
    w.click_at(0, 6, 0)  # expert 6 of layer 0
    w.wait_text("See the tokens of layer 0, expert 6")
    w.click("Toggle")
    w.wait_text("Toggled by hand: L0E6")
    w.check("experts, hand toggle")
    w.click("Save mask")
    w.wait_text(re.compile(r"Saved \d+ experts as unsafe_experts\.json"))
    w.check("mask saved")
    w.shot("experts")
    w.page.get_by_role(
        "link", name="See the tokens of layer 0, expert 6"
    ).click()  # the clicked expert's tokens
    w.wait_text("Tokens of batch 0 routed to layer 0, expert 6", 60)
    w.check("an expert's tokens from the Experts page")
    w.open("Experts", "Experts")
    w.reload("Experts")  # the saved mask, hand toggle included, comes back
    w.wait_text("L0E6")


def _walk_train_evaluate(w: Walk) -> None:
    """Train the chosen experts for one epoch (reload mid-job), then evaluate base vs trained briefly."""
    w.open("Training", "Training")
    w.fill("Epochs", "1")
    w.click("Start training")
    w.wait_text("Training started")
    w.reload("Training")
    w.page.get_by_role("heading", name="Results").wait_for(timeout=240_000)
    w.wait_text("Final loss")
    w.check("training results")
    # a second training with other settings: a name of its own, picked when it ends, compared with the first
    w.fill("Learning rate", "3e-3")
    name = w.page.get_by_label("Training name", exact=True).input_value()
    assert name and name != "experts-unsafe_experts", name
    w.click("Start training")
    w.wait_text("Training started")
    w.wait_text("Compare trainings (2)", 240)
    w.check("a second training")
    w.shot("training")
    w.open("Evaluation", "Evaluation")
    w.fill("Prompts per set (0 = all)", "2")
    w.fill("Max new tokens", "2")
    w.click("Evaluate")
    w.wait_text("Evaluation started")
    w.page.get_by_role("heading", name="Answers side by side").wait_for(timeout=240_000)
    w.check("evaluation results")
    w.reload("Evaluation")
    w.page.get_by_role("heading", name="Answers side by side").wait_for(timeout=60_000)
    w.shot("evaluation")


def _walk_upload(w: Walk, runs_root: Path) -> None:
    """Another new run from a labelled CSV (``text,label``, our own prompts) uploaded on both sides: each side
    keeps its rows, batches are composed, and a reload keeps the run's prompt sets (issue 20, row 4)."""
    from moe_core.batching.demo_prompts import demo_sets

    page = w.page
    safe, unsafe = demo_sets("train", mode="unpaired")
    rows = [(it.text, "safe") for it in safe[:32]] + [(it.text, "unsafe") for it in unsafe[:32]]
    csv = runs_root.parent / "labelled.csv"
    csv.write_text(
        "text,label\n" + "".join(f'"{t.replace(chr(34), chr(34) * 2)}",{lab}\n' for t, lab in rows)
    )
    page.goto(f"{w.url}/runs?run={w.run_id}", wait_until="domcontentloaded")
    page.get_by_role("heading", name="Runs", exact=True).first.wait_for(timeout=60_000)
    _wait_idle(page)
    if not page.locator('[data-testid="stSidebar"]').get_by_text("New run", exact=True).is_visible():
        page.locator('[data-testid="stExpandSidebarButton"]').click()  # Present folds the sidebar away
    _create_run(w, "upload walk", runs_root)
    w.open("Data & batches", "Data & batches")
    page.get_by_text("Upload files", exact=True).first.click()
    uploads = page.locator('[data-testid="stFileUploader"] input[type="file"]')
    uploads.first.wait_for(state="attached", timeout=30_000)
    uploads.nth(0).set_input_files(str(csv))
    w.wait_text("32 safe prompts")
    uploads.nth(1).set_input_files(str(csv))
    w.wait_text("32 unsafe prompts")
    w.check("a labelled CSV on both sides")
    w.click("Compose batches")
    w.wait_text("Composed 4 batches of 16.")
    w.check("compose the upload")
    w.reload("Data & batches")
    w.wait_text("32 safe and 32 unsafe prompts, kept with the run")
    w.check("the uploaded sets after a reload")
    w.shot("upload")


def test_the_whole_story_in_a_real_browser(server, playwright_sync):
    """Issue 12's walk: from a prepared run's Home to a new run composed, hand-edited, analysed, clicked
    through, selected, trained, evaluated, presented and exported; reloads in the middle; screenshots
    ``screenshots/20_walk_*.png``. Fails on any exception box, error banner or stale run."""
    from moe_core.batching.batches import compose_batches
    from moe_core.batching.demo_prompts import demo_sets
    from moe_core.batching.plan import load_plan

    url, runs_root, model_dir = server
    newest = RUNS["newest"]
    SHOTS.mkdir(exist_ok=True)
    for old in SHOTS.glob("20_walk_*.png"):
        old.unlink()
    with browser_page(playwright_sync) as (browser, page):
        w = Walk(page, url)
        page.goto(f"{url}/?run={newest.id}", wait_until="domcontentloaded")  # a prepared, finished run
        page.get_by_role("heading", name="Run: browser fixture").wait_for(timeout=60_000)
        w.run_id = newest.id
        w.check("Home of a prepared run")
        w.shot("home_prepared_run")
        a, b = _walk_data(w, runs_root)
        _walk_analysis(w, model_dir)
        _walk_heatmaps_and_experts(w)
        _walk_train_evaluate(w)
        w.open("Present", "Present")
        w.page.get_by_text(f"Run story walk · {w.run_id}").first.wait_for(timeout=30_000)
        w.click("Export report")
        w.page.get_by_role("button", name="Download report.html").wait_for(timeout=60_000)
        w.check("present + export")
        w.reload("Present")
        w.shot("present")
        report = runs_root / w.run_id / "report.html"
        offline = browser.new_context(offline=True, viewport={"width": 1200, "height": 900}).new_page()
        offline.goto(report.as_uri(), wait_until="load")
        offline.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
        assert offline.locator(".js-plotly-plot").count() >= 3  # heatmap, loss, before/after at least
        assert offline.evaluate(
            "() => [...document.querySelectorAll('.js-plotly-plot')]"
            ".every(g => g.querySelectorAll('.main-svg .trace').length > 0)"
        ), "a report figure drew no data"
        assert w.run_id in offline.inner_text("body")
        offline.screenshot(path=str(SHOTS / "20_walk_99_report.png"), full_page=True)
        story = w.run_id
        _walk_upload(w, runs_root)
        print("walk steps (s since start):", w.times)
    # what the walk did is in the run: the hand swap in the saved plan, a trained model, an evaluation
    safe, unsafe = demo_sets("train", mode="paired", seed=0)
    composed = compose_batches(safe, unsafe, batch_size=32, safe_ratio=0.5, seed=0, shuffle=True)
    where = {it.id: (bt.batch_idx, i) for bt in composed.batches for i, it in enumerate(bt.items)}
    saved = {
        it.id: (bt.batch_idx, i)
        for bt in load_plan(runs_root / story / "plan.json").batches
        for i, it in enumerate(bt.items)
    }
    assert (saved[a], saved[b]) == (where[b], where[a]) and {
        k: v for k, v in saved.items() if k not in (a, b)
    } == {k: v for k, v in where.items() if k not in (a, b)}
