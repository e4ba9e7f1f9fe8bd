"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) over a real tiny Flower run.

Stores written without a Flower run are in ``test_dashboard_stores.py``; the browser is ``tests/server/browser.py``.
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

import pytest

from server.dashboard.cli import TOKEN_ENV, start
from server.state import StateStore
from shared.release import read_release, verify_release
from shared.sign import TrustList
from simulations.demo import run_demo
from tests.server.browser import shot

pytestmark = pytest.mark.slow
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
    shot(page, "run-view")


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
    shot(page, "round-view")


def test_a_request_without_the_token_is_refused(page, cli_dashboard, tiny_run):
    response = page.goto(f"{cli_dashboard}runs/{_run_id(tiny_run)}")
    assert response.status == 401
    assert "needs its token" in page.inner_text("body") and "noun.food" not in page.content()
    assert page.request.get(f"{cli_dashboard}api/runs").status == 401
    assert page.goto(f"{cli_dashboard}?token=wrong-{TOKEN}").status == 401
    shot(page, "refused")


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
    shot(page, "new-round-live")


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
    shot(page, "html-as-text")


def test_a_run_whose_coordinator_went_silent_shows_as_stopped(page, copy_dashboard, tiny_run):
    dashboard, store = copy_dashboard
    run_id = _run_id(tiny_run)
    with sqlite3.connect(store.path) as conn:  # as if the coordinator had been killed an hour ago, mid-run
        conn.execute("update runs set finished = null, heard = ? where run_id = ?", (time.time() - 3600, run_id))
    page.goto(dashboard.url)
    row = page.locator("tbody tr", has=page.get_by_role("link", name=run_id))
    assert re.fullmatch(r"stopped \(last heard .+\)", row.locator("td").last.inner_text())
    shot(page, "stopped")
    store.heard(run_id)  # restarted, it beats again: running, without a reload
    # a locator wait, not wait_for_function: its string predicate is an eval the page's CSP may refuse (seen: CI)
    row.locator("td").last.filter(has_text=re.compile(r"^running$")).wait_for(timeout=15_000)
    shot(page, "stopped-then-running")
