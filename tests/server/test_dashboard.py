import re

import pytest
from fastapi.testclient import TestClient

from server.dashboard.app import STATIC, create_app
from server.dashboard.auth import COOKIE
from server.dashboard.cli import TOKEN_ENV, read_token, start
from server.report import RoundLog
from server.state import StateStore
from shared.release import make_release, write_release
from shared.sign import generate_key

TOKEN = "s3cret-token-for-tests-0123"
RUN = {"run_id": "demo-1", "model": "m", "method": "ties", "rounds": 2, "config": {"aggregation.method": "ties"}}


@pytest.fixture
def round_log(tmp_path):
    store = StateStore(tmp_path / "state.sqlite")
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    log.client(0, "food", heldout_loss=3.0)
    log.close_round(0)
    yield log
    store.close()


@pytest.fixture
def client(tmp_path, round_log):
    reader = StateStore(tmp_path / "state.sqlite", read_only=True)
    with TestClient(create_app(reader, TOKEN), follow_redirects=False) as c:
        yield c
    reader.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


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


def test_the_token_in_the_address_becomes_a_cookie_and_leaves_the_address(client):
    r = client.get("/runs/demo-1", params={"token": TOKEN, "x": "1"})
    assert r.status_code == 303 and r.headers["location"] == "/runs/demo-1?x=1"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    page = client.get("/runs/demo-1")  # the client keeps the cookie, as a browser does
    assert page.status_code == 200 and '<script src="/static/dashboard.js"' in page.text
    assert client.get("/api/runs").status_code == 200


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
    round_log.client(1, "food", node_id=7, train_loss=2.0, num_examples=500, bytes_up=100, bytes_down=200)
    round_log.client(1, "<script>alert(1)</script>", node_id=8, rejected="values are not finite")
    view = client.get("/api/runs/demo-1", headers=AUTH).json()  # round 1 is there before it closes
    assert set(view) == {"run", "rounds", "clients", "rejections"}
    assert [(r["round"], r["closed"] is None) for r in view["rounds"]] == [(0, False), (1, True)]
    assert view["clients"] == ["<script>alert(1)</script>", "food"]
    assert view["rejections"] == [
        {
            "round": 1,
            "client": "<script>alert(1)</script>",
            "node_id": "8",
            "status": "rejected",
            "reason": "values are not finite",
        }
    ]
    round_log.client(1, "food", heldout_loss=float("nan"))  # a diverged loss: SQLite keeps NaN as NULL
    round_log.close_round(1)
    r1 = client.get("/api/runs/demo-1", headers=AUTH).json()["rounds"][1]
    expected = {"round": 1, "participants": 2, "accepted": 1, "rejected": 1, "refused": 0, "evaluated": 0}
    assert {k: r1[k] for k in expected} == expected
    assert r1["bytes_up"] == 100 and r1["heldout"] == {} and r1["mean_heldout_loss"] is None
    assert r1["closed"] is not None and r1["method"] == "ties"


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
    round_log.note(
        1,
        release={
            "key_id": manifest.key_id,
            "manifest": manifest.digest(),
            "created": manifest.created,
            "path": str(folder),
        },
    )
    round_log.client(1, "food", train_loss=2.0)
    body = client.get("/api/runs/demo-1/rounds/1", headers=AUTH).json()
    assert set(body) == {"run", "aggregation", "round", "clients", "release"}
    assert body["aggregation"] == {"aggregation.method": "ties"}
    assert body["round"]["manifest_digest"] == manifest.digest() and body["round"]["key_id"] == manifest.key_id
    assert [c["client"] for c in body["clients"]] == ["food"] and body["clients"][0]["status"] == "accepted"
    rel = body["release"]
    assert rel["digest_matches"] is True and re.fullmatch("[0-9a-f]{128}", rel["signature"])
    assert rel["manifest"]["files"] == dict(manifest.files) and rel["manifest"]["round"] == 1
    (folder / "manifest.json").unlink()
    assert "cannot read the release" in client.get("/api/runs/demo-1/rounds/1", headers=AUTH).json()["release"]["error"]
    assert client.get("/api/runs/demo-1/rounds/0", headers=AUTH).json()["release"] is None


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


def test_the_token_comes_from_a_file_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment-123")
    assert read_token(None) == "from-the-environment-123"
    (tmp_path / "token").write_text("from-a-file-0123456789\n")
    assert read_token(tmp_path / "token") == "from-a-file-0123456789"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(tmp_path / "empty")
    monkeypatch.delenv(TOKEN_ENV)
    assert read_token(None) is None


def test_a_taken_port_is_reported_and_a_short_token_refused(tmp_path, round_log):
    first = start(tmp_path / "state.sqlite", "127.0.0.1:0", token=TOKEN)
    try:
        assert first.url.startswith("http://127.0.0.1:") and first.url.endswith(f"/?token={TOKEN}")
        with pytest.raises(OSError):
            start(tmp_path / "state.sqlite", f"127.0.0.1:{first.port}", token=TOKEN)
    finally:
        first.stop()
    with pytest.raises(ValueError, match="at least 16"):
        start(tmp_path / "state.sqlite", "127.0.0.1:0", token="short")
