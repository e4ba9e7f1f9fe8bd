"""``fleetlora dashboard`` as an operator starts it: TLS, the token, the port, the store's migration, its files."""

import http.client
import os
import ssl
import subprocess
import sys

import pytest

from server.dashboard.auth import COOKIE_MAX_AGE_S
from server.dashboard.cli import TOKEN_ENV, read_token, start
from server.state.revision import head
from shared.certs import make_fleet_certs
from tests.fifo import outcome_without_blocking
from tests.server import test_dashboard
from tests.server.state.records import rows, store_at_revision
from tests.server.test_dashboard import TOKEN

round_log = test_dashboard.round_log  # the fixture: a state store holding one run


def test_over_tls_the_cookie_is_secure(tmp_path, round_log):
    certs = make_fleet_certs(tmp_path / "certs", nodes=[])
    dashboard = start(tmp_path / "state.sqlite", "127.0.0.1:0", token=TOKEN, tls=(certs.server_cert, certs.server_key))
    try:
        assert dashboard.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=certs.ca)  # verifies the certificate and 127.0.0.1
        conn = http.client.HTTPSConnection("127.0.0.1", dashboard.port, context=context, timeout=30)
        conn.request("GET", f"/runs/demo-1?token={TOKEN}")
        r = conn.getresponse()
        assert r.status == 303 and r.getheader("location") == "/runs/demo-1"
        cookie = r.getheader("set-cookie")
        assert "Secure" in cookie and "HttpOnly" in cookie and f"Max-Age={COOKIE_MAX_AGE_S}" in cookie
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=30)  # no plain HTTP beside it
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/")
            plain.getresponse()
    finally:
        dashboard.stop()


def test_a_tls_pair_that_does_not_load_is_refused_before_serving(tmp_path, round_log):
    certs = make_fleet_certs(tmp_path / "certs", nodes=[])
    with pytest.raises(ValueError, match="cannot serve TLS with certificate"):
        start(tmp_path / "state.sqlite", "127.0.0.1:0", token=TOKEN, tls=(certs.server_cert, certs.ca_key))


def _cli(*args, env=None):
    cmd = [sys.executable, "-m", "shared.cli", "dashboard", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_the_cli_wants_both_halves_of_a_tls_pair(tmp_path):
    proc = _cli("--db", tmp_path / "s.sqlite", "--tls-cert", tmp_path / "c.pem", "--address", "127.0.0.1:0")
    assert proc.returncode == 2 and "--tls-cert and --tls-key go together" in proc.stderr


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


def test_the_cli_migrates_only_when_asked(tmp_path):
    db = store_at_revision(tmp_path, "0002")
    cmd = [sys.executable, "-m", "shared.cli", "dashboard", "--db", str(db), "--address", "127.0.0.1:0", "--migrate"]
    proc = subprocess.Popen(cmd, env={**os.environ, TOKEN_ENV: TOKEN}, stdout=subprocess.PIPE, text=True)
    try:
        assert "(read-only): open http://127.0.0.1:" in proc.stdout.readline()
        assert rows(db, "select version_num from alembic_version") == [(head(),)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    missing = _cli("--db", tmp_path / "none.sqlite", "--migrate", "--address", "127.0.0.1:0")
    assert missing.returncode == 2 and "--migrate: no state store at" in missing.stderr
    assert not (tmp_path / "none.sqlite").exists()


def test_a_fifo_as_token_file_or_tls_key_is_refused_not_waited_on(tmp_path, round_log):
    fifo = tmp_path / "planted"
    os.mkfifo(fifo, 0o600)
    refused = outcome_without_blocking(lambda: read_token(fifo), fifo)
    assert isinstance(refused, ValueError) and "not a regular file" in str(refused)
    certs = make_fleet_certs(tmp_path / "certs", nodes=[])
    tls = (certs.server_cert, fifo)
    refused = outcome_without_blocking(lambda: start(tmp_path / "state.sqlite", "127.0.0.1:0", TOKEN, tls=tls), fifo)
    assert isinstance(refused, ValueError) and "cannot serve TLS" in str(refused)
    assert "not a regular file" in str(refused)
