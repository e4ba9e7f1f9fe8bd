"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) over a real tiny Flower run.

The DP test writes its store through a round log instead (no Flower run needed).

``make test`` installs ``/usr/bin/chromium``. Screenshots go to ``test-output/dashboard/``.
"""

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from server.dashboard.cli import TOKEN_ENV, start
from server.report import RoundLog
from server.state import StateStore
from shared.release import read_release, verify_release
from shared.sign import TrustList
from simulations.demo import run_demo
from tests.server.state.records import RUN_PRIVACY, SECURE, privacy

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "dashboard"
TOKEN = "e2e-token-0123456789abcdef"
TOPICS = ["noun.animal", "noun.artifact", "noun.food", "verb.motion"]
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def _watch(db: Path, seen: list[tuple[int, bool]], heard: set[float], stop: threading.Event) -> None:
    """Record (closed rounds, run finished), and the heartbeats, as another process writes the store."""
    while not stop.is_set():
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    closed = conn.execute("select count(*) from rounds where closed is not null").fetchone()[0]
                    finished = conn.execute("select count(*) from runs where finished is not null").fetchone()[0]
                    if not finished:
                        heard.update(r[0] for r in conn.execute("select heard from runs where heard is not null"))
                seen.append((closed, bool(finished)))
            except sqlite3.Error:
                pass  # the schema is not there yet
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A real 2-round Flower simulation of the tiny model; the store is watched as the run writes it."""
    tmp = tmp_path_factory.mktemp("dashboard-run")
    db, seen, heard, stop = tmp / "out" / "state.sqlite", [], set(), threading.Event()
    watcher = threading.Thread(target=_watch, args=(db, seen, heard, stop), daemon=True)
    watcher.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEETLORA_CACHE", str(tmp / "device-cache"))
        data = run_demo(
            {
                "signing.key": str(tmp / "keys" / "server.key"),
                "signing.trust-file": str(tmp / "keys" / "server.key.pub"),
                "model": str(tiny_model_dir),
                "num-server-rounds": 2,
                "train.steps": 2,
                "train.lr": 5e-3,
                "eval.max-examples": 8,
                "run-name": "e2e",
            },
            output_dir=tmp / "out",
            flwr_home=tmp / "flwr",
        )
    stop.set()
    watcher.join()
    return {"db": db, "data": data, "seen": seen, "heard": heard, "tmp": tmp}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.errors = errors
    yield p
    context.close()


@pytest.fixture(scope="module")
def cli_dashboard(tiny_run):
    """``fleetlora dashboard`` as an operator starts it, token from the environment; stopped by its PID."""
    env = {**os.environ, TOKEN_ENV: TOKEN}
    cmd = [sys.executable, "-m", "shared.cli", "dashboard", "--db", str(tiny_run["db"]), "--address", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens
        match = re.search(r"open (http://127\.0\.0\.1:\d+/)\?token=(\S+)", line)
        assert match, f"unexpected first line: {line!r}"
        assert match.group(2) == TOKEN
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run_id(tiny_run) -> str:
    return tiny_run["data"]["run"]["run_id"]


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_the_store_is_written_as_the_real_run_progresses(tiny_run):
    seen = tiny_run["seen"]
    assert any(closed >= 2 and not finished for closed, finished in seen), seen[-5:]  # round 0 and 1, run going on
    assert seen[-1] == (3, True)
    # the coordinator's heartbeat was written while the run went on (the dashboard's "running")
    assert len(tiny_run["heard"]) >= 1, "no heartbeat seen while the run was unfinished"
    store = StateStore(tiny_run["db"], read_only=True)
    signed = store.last_signed_round(_run_id(tiny_run))
    assert signed is not None and signed.round == 2 and signed.evaluated
    trust = TrustList.load(tiny_run["tmp"] / "keys" / "server.key.pub")
    manifest = verify_release(read_release(signed.release_path), trust, tiny_run["data"]["run"]["base_digest"])
    assert manifest.digest() == signed.manifest_digest and manifest.round == 2
    store.close()


def test_runs_list_and_run_view_show_the_real_rounds_and_charts(page, cli_dashboard, tiny_run):
    run_id = _run_id(tiny_run)
    page.goto(f"{cli_dashboard}?token={TOKEN}")
    assert page.url == cli_dashboard  # the token went into a cookie and left the address
    row = page.locator("tbody tr", has=page.get_by_role("link", name=run_id))
    assert row.locator("td").last.inner_text() == "finished"
    page.get_by_role("link", name=run_id).click()
    page.wait_for_selector("svg.chart.line polyline.series")
    rows = page.locator("h2:text('Rounds') + table tbody tr")
    assert rows.count() == 3
    assert [rows.nth(i).locator("td").first.inner_text() for i in range(3)] == ["0 (before)", "1", "2"]
    # held-out loss: the mean and one line per client, one point per round
    lines = page.locator("svg.chart.line polyline.series")
    assert sorted(lines.nth(i).get_attribute("data-series") for i in range(lines.count())) == sorted(["mean", *TOPICS])
    mean = page.locator('svg.chart.line polyline.series[data-series="mean"]').get_attribute("points")
    assert len(mean.split()) == 3
    assert page.locator("svg.chart.bar").count() == 2 and page.locator("svg.chart.bar rect.bar").count() > 0
    rounds = {r["round"]: r for r in tiny_run["data"]["rounds"]}
    expected = f"{rounds[2]['mean_heldout_loss']:.4f}"
    assert rows.nth(2).locator("td").nth(8).inner_text() == expected
    assert rows.nth(2).locator("td").nth(6).inner_text() == "-"  # a plain round: not secure
    assert page.errors == []
    _shot(page, "run-view")


def test_round_view_shows_clients_and_the_signed_release(page, cli_dashboard, tiny_run):
    run_id = _run_id(tiny_run)
    page.goto(f"{cli_dashboard}runs/{run_id}?token={TOKEN}")
    page.get_by_role("link", name="2", exact=True).click()
    page.wait_for_selector("text=Signed release")
    clients = page.locator("h2:text('Clients') + table tbody tr")
    assert clients.count() == 4
    assert sorted(clients.nth(i).locator("td").first.inner_text() for i in range(4)) == TOPICS
    release = tiny_run["data"]["rounds"][-1]["release"]
    body = page.locator("main").inner_text()
    assert release["manifest"] in body and release["key_id"] in body
    assert re.search(r"manifest digest matches the store\s+yes", body)
    assert re.search(r"signature \(Ed25519\)\s+[0-9a-f]{128}", body)
    _shot(page, "round-view")


def test_a_request_without_the_token_is_refused(page, cli_dashboard, tiny_run):
    response = page.goto(f"{cli_dashboard}runs/{_run_id(tiny_run)}")
    assert response.status == 401
    assert "needs its token" in page.inner_text("body") and "noun.food" not in page.content()
    assert page.request.get(f"{cli_dashboard}api/runs").status == 401
    assert page.goto(f"{cli_dashboard}?token=wrong-{TOKEN}").status == 401
    _shot(page, "refused")


@pytest.fixture
def copy_dashboard(tiny_run, tmp_path):
    """A dashboard over a copy of the real run's store, which a test may write to."""
    db = tmp_path / "state.sqlite"
    with sqlite3.connect(tiny_run["db"]) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    dashboard = start(db, "127.0.0.1:0", token=TOKEN)
    yield dashboard, StateStore(db)
    dashboard.stop()
    shutil.rmtree(tmp_path, ignore_errors=True)


def _key_of(store, name: str) -> str:
    """The store's key (node id) of the client that reported ``name``."""
    with sqlite3.connect(store.path) as conn:
        return conn.execute("select client from client_results where name = ? limit 1", (name,)).fetchone()[0]


def test_a_new_round_shows_up_without_a_reload(page, copy_dashboard, tiny_run):
    dashboard, store = copy_dashboard
    run_id = _run_id(tiny_run)
    page.goto(dashboard.url)
    page.goto(dashboard.url.replace("/?", f"/runs/{run_id}?"))
    page.wait_for_selector("h2:text('Rounds') + table tbody tr >> nth=2")
    page.evaluate("window.__same_page = true")
    food = {"name": "noun.food", "train_loss": 1.5, "heldout_loss": 1.25}
    store.save_round(run_id, {"round": 3, "started": time.time(), "clients": {_key_of(store, "noun.food"): food}})
    row = page.locator("h2:text('Rounds') + table tbody tr >> nth=3")
    row.wait_for(timeout=15_000)
    assert row.locator("td").first.inner_text() == "3"
    assert page.evaluate("window.__same_page") is True  # updated in place: no reload
    food = page.locator('svg.chart.line polyline.series[data-series="noun.food"]').get_attribute("points")
    assert len(food.split()) == 4
    _shot(page, "new-round-live")


def test_a_client_id_with_html_is_shown_as_text(page, copy_dashboard, tiny_run):
    dashboard, store = copy_dashboard
    run_id = _run_id(tiny_run)
    rec = {
        "round": 3,
        "started": time.time(),
        "clients": {"1": {"node_id": 1, "name": XSS, "rejected": f"<b>{XSS}</b>"}},
    }
    store.save_round(run_id, rec)
    page.goto(dashboard.url.replace("/?", f"/runs/{run_id}/rounds/3?"))
    cell = page.locator("h2:text('Clients') + table tbody tr td").first
    cell.wait_for()
    assert cell.inner_text() == XSS
    assert page.locator("main img, main script, main b").count() == 0
    page.goto(dashboard.url.replace("/?", f"/runs/{run_id}?"))
    page.wait_for_selector("svg.chart.line")
    assert XSS in page.locator("ul.legend").first.inner_text()
    assert page.get_by_text(f"<b>{XSS}</b>").count() == 1  # the rejection reason, literally
    assert page.locator("main img, main script, main b").count() == 0
    assert page.evaluate("window.__xss") is None
    _shot(page, "html-as-text")


def test_a_run_whose_coordinator_went_silent_shows_as_stopped(page, copy_dashboard, tiny_run):
    dashboard, store = copy_dashboard
    run_id = _run_id(tiny_run)
    with sqlite3.connect(store.path) as conn:  # as if the coordinator had been killed an hour ago, mid-run
        conn.execute("update runs set finished = null, heard = ? where run_id = ?", (time.time() - 3600, run_id))
    page.goto(dashboard.url)
    row = page.locator("tbody tr", has=page.get_by_role("link", name=run_id))
    assert re.fullmatch(r"stopped \(last heard .+\)", row.locator("td").last.inner_text())
    _shot(page, "stopped")
    store.heard(run_id)  # restarted, it beats again: running, without a reload
    page.wait_for_function(
        "id => [...document.querySelectorAll('tbody tr')].some(r => r.innerText.includes(id) && "
        "r.lastElementChild.innerText === 'running')",
        arg=run_id,
        timeout=15_000,
    )
    _shot(page, "stopped-then-running")


@pytest.fixture
def fresh_dashboard(tmp_path):
    """A dashboard over a store of its own, written as a round log would (no Flower run needed): 3 rounds, 3 clients."""
    store = StateStore(tmp_path / "state.sqlite")
    store.save_run({"run_id": "r", "rounds": 2, "started": time.time(), "config": {"aggregation.method": "fedavg"}})
    for n in range(3):
        clients = {str(k): {"node_id": k, "name": f"c{k}", "heldout_loss": 3.0 - n / k} for k in (1, 2, 3)}
        if n:
            clients = {key: {**c, "train_loss": 2.0, "num_examples": 10} for key, c in clients.items()}
        store.save_round("r", {"round": n, "started": time.time(), "seconds": 1.0, "clients": clients})
    store.close()
    dashboard = start(tmp_path / "state.sqlite", "127.0.0.1:0", token=TOKEN)
    yield dashboard
    dashboard.stop()


def test_hostile_rows_leave_every_page_working(page, fresh_dashboard):
    """Values no coordinator should write, written straight into SQLite: the pages show them as missing."""
    with sqlite3.connect(fresh_dashboard.reader.path) as conn:
        conn.execute("update rounds set mean_heldout_loss = ?, seconds = 'soon' where round = 1", (float("inf"),))
        conn.execute("update runs set config = '{broken', model = cast(x'ff' as text), started = ?", (float("-inf"),))
        conn.execute(
            "update client_results set status = 'pwned', train_loss = 'x', name = ? where round = 1", ("é" * 999,)
        )
        # finite but extreme: the held-out chart's tick labels would need toFixed(201), which throws
        conn.execute("update client_results set heldout_loss = 1e-200 * cast(client as integer)")
        conn.execute("update rounds set mean_heldout_loss = 2e-200 where round != 1")
    for path in ("/", "/runs/r", "/runs/r/rounds/1", "/runs/r/rounds/2"):
        page.goto(fresh_dashboard.url.replace("/?", f"{path}?"))
        page.wait_for_selector("main table tbody tr")
        assert "live: updated" in page.inner_text("#status"), (path, page.inner_text("#status"))
    page.goto(fresh_dashboard.url.replace("/?", "/runs/r?"))
    page.wait_for_selector("svg.chart.line polyline.series", state="attached")  # flat lines: no height
    rows = page.locator("h2:text('Rounds') + table tbody tr")
    assert rows.nth(1).locator("td").nth(8).inner_text() == "-"  # the inf held-out mean: missing
    assert page.errors == []
    _shot(page, "hostile-rows")


@pytest.mark.parametrize("trick", ["//localhost:{port}/x", "/\\localhost:{port}/x", "/%2F%2Flocalhost:{port}/x"])
def test_the_browser_is_never_sent_to_another_origin_by_the_login(page, fresh_dashboard, trick):
    """Chromium decides what a Location means; ``localhost`` is another origin than 127.0.0.1 (and loopback)."""
    here = f"127.0.0.1:{fresh_dashboard.port}"
    page.goto(f"http://{here}{trick.format(port=fresh_dashboard.port)}?token={TOKEN}")
    assert urlsplit(page.url).netloc == here, page.url


def test_a_dashboard_started_before_its_store_says_why_and_creates_nothing(page, tmp_path):
    db = tmp_path / "out" / "state.sqlite"
    dashboard = start(db, "127.0.0.1:0", token=TOKEN)
    try:
        page.goto(dashboard.url)
        page.wait_for_function("document.getElementById('status').innerText.includes('503')")
        assert "no state store at" in page.inner_text("#status")
        assert not (tmp_path / "out").exists()
        StateStore(db).save_run({"run_id": "appeared", "started": time.time(), "config": {}})
        page.get_by_role("link", name="appeared").wait_for(timeout=15_000)  # picked up by the next poll
    finally:
        dashboard.stop()


def test_a_dp_run_shows_epsilon_per_round_and_a_run_without_dp_no_privacy_panel(page, tmp_path):
    """Round records written through a round log into a real store, as the coordinator writes them under DP.

    Its rounds 2 and 3 also ran secure aggregation (DP with client clipping composes with SecAgg+):
    the round table says how many devices were in the sum and recovered, the round view its facts.
    """
    store = StateStore(tmp_path / "state.sqlite")
    dp = RoundLog(tmp_path / "dp.json", run={"run_id": "dp", "rounds": 3, "privacy": RUN_PRIVACY}, store=store)
    RoundLog(tmp_path / "plain.json", run={"run_id": "plain", "rounds": 3}, store=store).close_round(0)
    epsilons = {1: 0.61, 2: 1.07, 3: 1.52}
    for n in range(4):
        dp.client(n, 1, "c1", heldout_loss=3.0 - n / 2, **({"train_loss": 2.0} if n else {}))
        secure = {"secure": {**SECURE, "recovered": n - 2}} if n >= 2 else {}
        dp.close_round(
            n, **({"privacy": privacy(n, epsilon=epsilons[n], clipped_fraction=n / 4)} if n else {}), **secure
        )
    store.close()
    dashboard = start(tmp_path / "state.sqlite", "127.0.0.1:0", token=TOKEN)
    try:
        page.goto(dashboard.url.replace("/?", "/runs/dp?"))
        page.wait_for_selector("h2:text('Privacy')")
        curve = page.locator('svg.chart.line polyline.series[data-series="ε spent"]')
        assert len(curve.get_attribute("points").split()) == 3  # one point per DP round
        points = page.locator("svg.chart.line circle.point title")
        tips = [points.nth(i).text_content() for i in range(points.count())]
        assert [t for t in tips if t.startswith("ε spent")] == [
            f"ε spent, round {n}: {e:.3f}" for n, e in epsilons.items()
        ]
        assert page.locator('polyline.series[data-series="limit (dp.max-epsilon)"]').count() == 1
        per_round = page.locator("h2:text('Privacy') ~ table tbody tr")
        assert [per_round.nth(i).locator("td").nth(1).inner_text() for i in range(3)] == ["0.610", "1.070", "1.520"]
        rounds = page.locator("h2:text('Rounds') + table tbody tr")
        assert [rounds.nth(i).locator("td").nth(6).inner_text() for i in range(4)] == [
            "-",
            "-",
            "4 in sum",
            "4 in sum, 1 recovered",
        ]
        panel = page.locator("h2:text('Privacy') + dl").inner_text()
        assert re.search(r"spent\s+ε = 1\.520 at δ = 1e-5 after round 3", panel), panel
        for fact in (r"noise multiplier z\s+1\.1", r"clip norm C\s+1\b", r"by the coordinator, on receipt", r"75\.0 %"):
            assert re.search(fact, panel), (fact, panel)
        assert page.errors == []
        _shot(page, "privacy-panel")
        page.goto(dashboard.url.replace("/?", "/runs/dp/rounds/2?"))
        page.wait_for_selector("h2:text('Privacy')")
        facts = page.locator("h2:text('Privacy') + dl").inner_text()
        assert re.search(r"ε spent after this round\s+1\.070 at δ = 1e-5\b", facts), facts
        secure = page.locator("h2:text('Secure aggregation (SecAgg+)') + dl").inner_text()
        for fact in (r"devices in the sum\s+4\b", r"masks removed\)\s+0\b", r"in all\s+1\b", r"threshold\s+5 / 3"):
            assert re.search(fact, secure), (fact, secure)
        assert re.search(r"\[-c, c\]\)\s+0\.05\b", secure), secure
        page.goto(dashboard.url.replace("/?", "/runs/dp/rounds/1?"))
        page.wait_for_selector("h2:text('Privacy')")
        assert page.locator("h2:text('Secure aggregation (SecAgg+)')").count() == 0  # round 1 was not secure
        page.goto(dashboard.url)
        row = page.locator("tbody tr", has=page.get_by_role("link", name="dp", exact=True))
        assert row.locator("td").nth(5).inner_text() == "1.520"  # the runs list's "ε spent"
        page.goto(dashboard.url.replace("/?", "/runs/plain?"))
        page.wait_for_selector("h2:text('Rounds')")
        assert page.locator("h2:text('Privacy')").count() == 0 and "ε" not in page.locator("main").inner_text()
        assert page.errors == []
    finally:
        dashboard.stop()


def test_an_async_rounds_view_shows_each_devices_staleness_budget_and_updates_so_far(page, tmp_path):
    """Round records as the async coordinator writes them (a stale update, a device with a memory budget)."""
    store = StateStore(tmp_path / "state.sqlite")
    log = RoundLog(tmp_path / "a.json", run={"run_id": "fleet", "rounds": 2, "config": {"lora.rank": 8}}, store=store)
    log.close_round(0)
    log.client(2, 7, "kiosk", train_loss=2.0, num_examples=500, staleness=0, release_round=1, contributions=2)
    log.client(2, 9, "gateway", train_loss=2.1, num_examples=500, staleness=1, release_round=0, contributions=1,
               lora_rank=2, memory_budget_mb=1200, micro_batch_size=1, gradient_checkpointing=1)  # fmt: skip
    log.close_round(2)
    store.close()
    dashboard = start(tmp_path / "state.sqlite", "127.0.0.1:0", token=TOKEN)
    try:
        page.goto(dashboard.url.replace("/?", "/runs/fleet/rounds/2?"))
        page.wait_for_selector("h2:text('Clients') + table")
        header = page.locator("h2:text('Clients') + table thead th").all_inner_texts()
        rows = page.locator("h2:text('Clients') + table tbody tr")
        shown = {}
        for i in range(rows.count()):
            cells = rows.nth(i).locator("td").all_inner_texts()
            shown[cells[0]] = dict(zip(header, cells, strict=True))
        assert shown["gateway"]["rank"] == "2" and shown["kiosk"]["rank"] == "8"
        assert shown["gateway"]["memory budget"] == "1200 MB: micro-batch 1, checkpointing"
        assert shown["kiosk"]["memory budget"] == "-"
        assert (shown["gateway"]["staleness"], shown["kiosk"]["staleness"]) == ("1", "0")
        assert (shown["gateway"]["updates so far"], shown["kiosk"]["updates so far"]) == ("1", "2")
        page.goto(dashboard.url.replace("/?", "/runs/fleet?"))
        page.wait_for_selector("h2:text('Devices') + table")
        devices = page.locator("h2:text('Devices') + table tbody tr")
        cells = {devices.nth(i).locator("td").first.inner_text(): devices.nth(i).locator("td").all_inner_texts()
                 for i in range(devices.count())}  # fmt: skip
        assert cells["gateway"][2:] == ["2", "1", "1.00"] and cells["kiosk"][2:] == ["8", "1", "0.00"]
        assert page.errors == []
        _shot(page, "round-view-fleet")
    finally:
        dashboard.stop()
