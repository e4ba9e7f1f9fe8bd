import json
import os
import re
import socket
import tracemalloc
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from server.dashboard.app import STATIC, SafeJSON, create_app, release_details
from server.dashboard.auth import COOKIE, COOKIE_MAX_AGE_S, same_origin_path
from server.dashboard.cli import start
from server.dashboard.reader import StoreReader
from server.report import RoundLog
from server.state import StateStore
from shared.release import make_release, write_release
from shared.sign import generate_key
from tests.fifo import outcome_without_blocking
from tests.server.state.records import execute, report, rows, store_at_revision

TOKEN = "s3cret-token-for-tests-0123"
RUN = {"run_id": "demo-1", "model": "m", "method": "ties", "rounds": 2, "config": {"aggregation.method": "ties"}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = ["/", "/runs/demo-1", "/runs/demo-1/rounds/1", "/api/runs", "/api/runs/demo-1", "/api/runs/demo-1/rounds/1"]


@pytest.fixture
def round_log(tmp_path):
    store = StateStore(tmp_path / "state.sqlite")
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    report(log, 0, "5", node_id=5, name="food", heldout_loss=3.0)
    log.close_round(0)
    yield log
    store.close()


@pytest.fixture
def client(tmp_path, round_log):
    reader = StoreReader(tmp_path / "state.sqlite")
    with TestClient(create_app(reader, TOKEN), follow_redirects=False) as c:
        yield c
    reader.close()


@pytest.fixture
def served(tmp_path, round_log):
    """The dashboard on a real loopback port (uvicorn, as ``fleetlora dashboard`` serves it)."""
    dashboard = start(tmp_path / "state.sqlite", "127.0.0.1:0", token=TOKEN)
    yield dashboard
    dashboard.stop()


def _raw_get(port, target):
    """Send ``GET target`` byte for byte (no client library normalises it); return (status, headers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head_lines[1:])
    return int(head_lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}


def _stays_here(location):
    """Whether a browser reads ``location`` as a path of this server, whatever its parser's quirks."""
    base = "http://127.0.0.1:8050/"
    return (
        location.startswith("/")
        and location[1:2] not in ("/", "\\")
        and not re.search(r"[\x00-\x20\x7f\\]", location)
        and urlsplit(urljoin(base, location)).netloc == "127.0.0.1:8050"
    )


@pytest.mark.parametrize("path", ["/", "/runs/demo-1", "/api/runs", "/api/runs/demo-1", "/static/dashboard.js"])
@pytest.mark.parametrize(
    "credentials",
    [{}, {"headers": {"Authorization": "Bearer wrong"}}, {"cookies": {COOKIE: "wrong"}}, {"params": {"token": "x"}}],
)
def test_requests_without_the_right_token_are_refused(client, path, credentials):
    client.cookies.clear()
    cookies = credentials.get("cookies")
    if cookies:
        client.cookies.update(cookies)
    r = client.get(path, headers=credentials.get("headers"), params=credentials.get("params"))
    assert r.status_code == 401
    assert "needs its token" in r.text and "food" not in r.text
    assert r.headers["www-authenticate"] == "Bearer"


def test_the_token_in_the_address_becomes_an_expiring_cookie_and_leaves_the_address(client):
    r = client.get("/runs/demo-1", params={"token": TOKEN, "x": "1"})
    assert r.status_code == 303 and r.headers["location"] == "/runs/demo-1?x=1"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert f"Max-Age={COOKIE_MAX_AGE_S}" in cookie and re.search(r"expires=\w{3}, \d\d \w{3} \d{4}", cookie)
    assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
    page = client.get("/runs/demo-1")  # the client keeps the cookie, as a browser does
    assert page.status_code == 200 and '<script src="/static/dashboard.js"' in page.text
    assert client.get("/api/runs").status_code == 200


OFF_SITE = [
    "//evil.example/x",
    "///evil.example/x",
    "////evil.example",
    "/\\evil.example/x",
    "/\\/evil.example",
    "/%2F%2Fevil.example/x",
    "/%2f/evil.example",
    "/%5Cevil.example",
    "/%5C%5Cevil.example",
    "/%09/evil.example",
    "/%0d%0a/evil.example",
    "/%0d%0aSet-Cookie:%20x=1",
    "/%20//evil.example",
    "/%E3%80%82/evil.example",
    "/http://evil.example",
    "/https:evil.example",
    "/javascript:alert(1)",
    "/%2e%2e//evil.example",
    "http://evil.example/x",
    "//127.0.0.1@evil.example/",
]


@pytest.mark.parametrize("target", OFF_SITE)
def test_the_login_redirect_never_leaves_this_server(served, target):
    status, headers = _raw_get(served.port, f"{target}?token={TOKEN}&next=%2F%2Fevil.example")
    assert status == 303, status
    assert _stays_here(headers["location"]), headers["location"]
    assert "set-cookie" in headers and "\r" not in headers["location"]


@given(st.text())
def test_a_redirect_target_is_a_path_of_this_server_whatever_the_path(path):
    assert _stays_here(same_origin_path(path))


def test_the_redirect_keeps_an_ordinary_path_as_it_is():
    for path in ("/", "/runs/demo-1", "/runs/demo-1/rounds/2", "/runs/a b"):
        assert urlsplit(same_origin_path(path)).path.replace("%20", " ") == path


def test_every_reply_forbids_inline_script(client):
    for r in (client.get("/", headers=AUTH), client.get("/api/runs")):
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"


def test_the_api_shows_rounds_as_the_round_log_writes_them(client, round_log):
    runs = client.get("/api/runs", headers=AUTH).json()["runs"]
    assert [(r["run_id"], r["rounds_done"], r["last_heldout_loss"], r["finished"]) for r in runs] == [
        ("demo-1", 0, 3.0, None)
    ]
    report(round_log, 1, "5", node_id=5, name="food", train_loss=2.0, num_examples=500, bytes_up=100, bytes_down=200)
    report(round_log, 1, "8", node_id=8, name="<script>alert(1)</script>", rejected="values are not finite")
    view = client.get("/api/runs/demo-1", headers=AUTH).json()  # round 1 is there before it closes
    assert set(view) == {"run", "rounds", "clients", "rejections"}
    assert [(r["round"], r["closed"] is None) for r in view["rounds"]] == [(0, False), (1, True)]
    assert [c["name"] for c in view["clients"]] == ["<script>alert(1)</script>", "food"]
    assert view["rejections"] == [
        {
            "round": 1,
            "client": "8",
            "name": "<script>alert(1)</script>",
            "node_id": "8",
            "status": "rejected",
            "reason": "values are not finite",
        }
    ]
    report(round_log, 1, "5", heldout_loss=float("nan"))  # a diverged loss: stored as NULL
    round_log.close_round(1)
    r1 = client.get("/api/runs/demo-1", headers=AUTH).json()["rounds"][1]
    expected = {"round": 1, "participants": 2, "accepted": 1, "rejected": 1, "refused": 0, "evaluated": 0}
    assert {k: r1[k] for k in expected} == expected
    assert r1["bytes_up"] == 100 and r1["heldout"] == {} and r1["mean_heldout_loss"] is None
    assert r1["closed"] is not None and r1["method"] == "ties"


def test_an_impostor_reporting_another_clients_name_gets_its_own_row(client, round_log):
    report(round_log, 1, "5", node_id=5, name="food", train_loss=2.0, num_examples=500)
    report(round_log, 1, "6", node_id=6, name="food", train_loss=0.1, num_examples=10**6)
    clients = client.get("/api/runs/demo-1/rounds/1", headers=AUTH).json()["clients"]
    assert [(c["name"], c["node_id"], c["num_examples"]) for c in clients] == [("food", "5", 500), ("food", "6", 10**6)]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), "not a number", b"\xff", 2**63 - 1, "x" * 10_000])
def test_a_hostile_row_never_breaks_a_route(client, round_log, bad):
    """Values written straight into SQLite, where a coordinator bug or anyone with the file could put them."""
    report(round_log, 1, "5", node_id=5, name="food", train_loss=2.0)
    round_log.close_round(1)
    db = round_log.store.path
    for table, columns in {
        "runs": ["started", "finished", "wall_seconds", "heard", "num_rounds", "model", "config", "name"],
        "rounds": ["started", "closed", "seconds", "mean_train_loss", "mean_heldout_loss", "bytes_up", "key_id"],
        "client_results": ["train_loss", "heldout_loss", "num_examples", "node_id", "name", "status", "reason"],
    }.items():
        for column in columns:
            execute(db, f"update {table} set {column} = ?", (bad,))
    execute(db, "update client_results set reason = cast(x'ff' as text)")  # TEXT that is not UTF-8
    for route in ROUTES:
        r = client.get(route, headers=AUTH)
        assert r.status_code == 200, (route, r.text)
    body = client.get("/api/runs/demo-1", headers=AUTH).json()
    if isinstance(bad, float):  # inf shows as missing
        assert body["rounds"][1]["mean_heldout_loss"] is None and body["run"]["started"] is None


def test_a_round_number_out_of_range_is_a_clean_refusal(client):
    for n in ("99999999999999999999999", "-1", "x"):
        assert client.get(f"/api/runs/demo-1/rounds/{n}", headers=AUTH).status_code == 422
    assert client.get("/api/runs/" + "r" * 300, headers=AUTH).status_code == 422


def test_a_missing_store_is_reported_not_created_and_read_once_it_appears(tmp_path):
    db = tmp_path / "out" / "state.sqlite"
    with TestClient(create_app(StoreReader(db), TOKEN)) as c:
        assert c.get("/", headers=AUTH).status_code == 200  # the page itself, which then says why
        r = c.get("/api/runs", headers=AUTH)
        assert r.status_code == 503 and "no state store at" in r.json()["detail"]
        assert not (tmp_path / "out").exists()
        StateStore(db).save_run({**RUN, "started": 1.0})  # the coordinator starts a run
        assert [run["run_id"] for run in c.get("/api/runs", headers=AUTH).json()["runs"]] == ["demo-1"]


def test_an_older_store_is_reported_and_left_alone_until_migrated(tmp_path):
    db = store_at_revision(tmp_path, "0002")
    reader = StoreReader(db)
    with TestClient(create_app(reader, TOKEN)) as c:
        r = c.get("/api/runs", headers=AUTH)
        assert r.status_code == 503 and "older than this fleetlora's" in r.json()["detail"] and "--migrate" in r.text
        assert rows(db, "select version_num from alembic_version") == [("0002",)]
        StateStore(db).close()  # the next coordinator (or --migrate) upgrades it
        assert c.get("/api/runs", headers=AUTH).status_code == 200


def test_the_round_api_reads_the_signed_release(client, round_log, tmp_path):
    key = generate_key(tmp_path / "server.key")
    release, manifest = make_release(
        {"adapter_model.safetensors": b"weights"},
        kind="adapter",
        run_id="demo-1",
        round=1,
        base_digest="b" * 64,
        method="ties",
        key=key,
    )
    folder = write_release(release, tmp_path / "releases" / "round-0001")
    note = {"key_id": manifest.key_id, "manifest": manifest.digest(), "created": manifest.created, "path": str(folder)}
    round_log.note(1, release=note)
    report(round_log, 1, "5", node_id=5, name="food", train_loss=2.0)
    body = client.get("/api/runs/demo-1/rounds/1", headers=AUTH).json()
    assert set(body) == {"run", "aggregation", "lora_rank", "round", "clients", "release"}
    assert body["aggregation"] == {"aggregation.method": "ties"}
    assert body["round"]["manifest_digest"] == manifest.digest() and body["round"]["key_id"] == manifest.key_id
    assert [c["name"] for c in body["clients"]] == ["food"] and body["clients"][0]["status"] == "accepted"
    rel = body["release"]
    assert rel["digest_matches"] is True and re.fullmatch("[0-9a-f]{128}", rel["signature"])
    assert rel["manifest"]["files"] == dict(manifest.files) and rel["manifest"]["round"] == 1
    (folder / "manifest.json").unlink()
    assert "cannot read the release" in client.get("/api/runs/demo-1/rounds/1", headers=AUTH).json()["release"]["error"]
    assert client.get("/api/runs/demo-1/rounds/0", headers=AUTH).json()["release"] is None


@pytest.mark.parametrize(("kind", "why"), [("fifo", "not a regular file"), ("huge", "larger than"), ("garbage", "")])
def test_a_release_folder_named_by_a_row_is_read_within_bounds(tmp_path, kind, why):
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "manifest.sig").write_bytes(b"\x00" * 64)
    if kind == "fifo":
        os.mkfifo(folder / "manifest.json")  # opening it for reading would wait for a writer forever
    elif kind == "huge":
        with open(folder / "manifest.json", "wb") as f:
            f.truncate(256 << 20)  # 256 MiB (sparse)
    else:
        (folder / "manifest.json").write_bytes(b'{"round": ' + b"9" * 5000 + b"}")
    tracemalloc.start()
    try:
        result = outcome_without_blocking(lambda: release_details(str(folder), "0" * 64), folder / "manifest.json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, dict), result
    assert "cannot read the release" in result["error"] and why in result["error"]
    assert peak < 16 << 20, f"{peak:,} bytes allocated to read a release"  # never the whole file


def test_json_replies_survive_text_that_utf8_cannot_encode():
    with pytest.raises(UnicodeEncodeError):
        JSONResponse({"method": "\ud800"})  # a lone surrogate: what json.loads makes of "\\ud800"
    assert json.loads(SafeJSON({"method": "\ud800"}).body) == {"method": "\ud800"}


def test_unknown_runs_and_rounds_are_404_and_nothing_can_be_written(client):
    assert client.get("/api/runs/nope", headers=AUTH).status_code == 404
    assert "no round 9" in client.get("/api/runs/demo-1/rounds/9", headers=AUTH).json()["detail"]
    for method in ("post", "put", "delete"):
        assert getattr(client, method)("/api/runs/demo-1", headers=AUTH).status_code == 405


def test_the_pages_never_parse_data_as_markup():
    sources = {p.name: p.read_text() for p in STATIC.glob("*.js")}
    assert set(sources) == {"dashboard.js", "charts.js"}
    for name, text in sources.items():
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, f"{name} uses {sink}"
    assert "<script>" not in (STATIC / "index.html").read_text()  # scripts only from files (the CSP forbids inline)


def test_a_store_whose_tables_were_altered_is_a_503_that_says_why(client, round_log):
    execute(round_log.store.path, "alter table rounds drop column seconds")  # same revision, another schema
    r = client.get("/api/runs/demo-1", headers=AUTH)
    assert r.status_code == 503 and "no such column" in r.json()["detail"]
    assert client.get("/", headers=AUTH).status_code == 200  # the page still loads and shows the reason


def test_a_huge_value_in_one_row_is_left_unread_and_every_other_value_served(client, round_log):
    report(round_log, 1, "6", node_id=6, name="motion", train_loss=2.5, num_examples=10)
    round_log.close_round(1)
    huge = "A" * (64 << 20)  # 64 MiB of text written straight into SQLite: read whole, 128 MB per request
    execute(round_log.store.path, "update client_results set name = ? where client = '6'", (huge,))
    tracemalloc.start()
    try:
        r = client.get("/api/runs/demo-1", headers=AUTH)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 200
    names = {c["client"]: c["name"] for c in r.json()["clients"]}
    assert names["5"] == "food" and not names["6"].startswith("AAAA")  # the huge name unread, the others served
    assert peak < 16 << 20, f"{peak:,} bytes allocated for one request"
