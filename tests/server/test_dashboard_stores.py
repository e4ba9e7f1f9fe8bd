"""The dashboard in a real headless Chromium over stores written without a Flower run.

Round records are written as the coordinator writes them (through a round log) or, for hostile
values, straight into SQLite; the browser is ``tests/server/browser.py``.
"""

import re
import sqlite3
import time
from urllib.parse import urlsplit

import pytest

from server.dashboard.cli import start
from server.report import RoundLog
from server.state import StateStore
from tests.server.browser import shot
from tests.server.state.records import RUN_PRIVACY, SECURE, privacy

pytestmark = pytest.mark.slow
TOKEN = "e2e-token-0123456789abcdef"


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
    shot(page, "hostile-rows")


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
        # a locator wait, not wait_for_function: its string predicate is an eval the page's CSP may refuse (seen: CI)
        page.locator("#status", has_text="503").wait_for()
        assert "no state store at" in page.inner_text("#status")
        assert not (tmp_path / "out").exists()
        StateStore(db).save_run({"run_id": "appeared", "started": time.time(), "config": {}})
        page.get_by_role("link", name="appeared").wait_for(timeout=15_000)  # picked up by the next poll
    finally:
        dashboard.stop()


def test_a_dp_run_shows_epsilon_per_round_and_a_run_without_dp_no_privacy_panel(page, tmp_path):
    """Round records written through a round log into a real store, as the coordinator writes them under DP.

    Its rounds 2 and 3 also ran secure aggregation (DP with client clipping composes with SecAgg+):
    the round table says how many devices were in the sum, recovered and enrolled, the round view its facts.
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
            "4 in sum, 3 enrolled",
            "4 in sum, 1 recovered, 3 enrolled",
        ]
        panel = page.locator("h2:text('Privacy') + dl").inner_text()
        assert re.search(r"spent\s+ε = 1\.520 at δ = 1e-5 after round 3", panel), panel
        for fact in (r"noise multiplier z\s+1\.1", r"clip norm C\s+1\b", r"by the coordinator, on receipt", r"75\.0 %"):
            assert re.search(fact, panel), (fact, panel)
        assert page.errors == []
        shot(page, "privacy-panel")
        page.goto(dashboard.url.replace("/?", "/runs/dp/rounds/2?"))
        page.wait_for_selector("h2:text('Privacy')")
        facts = page.locator("h2:text('Privacy') + dl").inner_text()
        assert re.search(r"ε spent after this round\s+1\.070 at δ = 1e-5\b", facts), facts
        secure = page.locator("h2:text('Secure aggregation (SecAgg+)') + dl").inner_text()
        for fact in (r"devices in the sum\s+4\b", r"masks removed\)\s+0\b", r"in all\s+1\b", r"threshold\s+5 / 3",
                     r"survivor list\)\s+3\b"):  # fmt: skip
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
        shot(page, "round-view-fleet")
    finally:
        dashboard.stop()
