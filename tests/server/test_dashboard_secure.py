"""The dashboard's API for secure rounds: what the round table's "secure" column and the SecAgg+ section show.

The real-browser check of both is in ``test_dashboard_e2e.py`` (with the DP run).
"""

import pytest
from fastapi.testclient import TestClient

from server.dashboard.app import create_app
from server.dashboard.reader import StoreReader
from server.report import RoundLog
from server.state import StateStore
from tests.server.state.records import SECURE, execute, report

TOKEN = "s3cret-token-for-tests-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUN = {"run_id": "sec-1", "model": "m", "method": "fedavg", "rounds": 2, "config": {"aggregation.secure": True}}


@pytest.fixture
def client(tmp_path):
    """A run whose round 1 ran SecAgg+ (one device recovered) and whose round 2 failed to (not secure)."""
    store = StateStore(tmp_path / "state.sqlite")
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    for n in range(3):
        trained = {"train_loss": 2.0, "secure": True, "lora_rank": 2} if n else {}
        report(log, n, "5", name="food", heldout_loss=3.0 - n, **trained)
        log.close_round(n, **({"secure": SECURE} if n == 1 else {}))
    reader = StoreReader(tmp_path / "state.sqlite")
    with TestClient(create_app(reader, TOKEN), follow_redirects=False) as c:
        c.db = store.path
        yield c
    reader.close()
    store.close()


def test_the_api_serves_a_secure_rounds_facts_and_none_for_the_others(client):
    view = client.get("/api/runs/sec-1", headers=AUTH).json()
    assert [r["secure"] for r in view["rounds"]] == [None, SECURE, None]
    one = client.get("/api/runs/sec-1/rounds/1", headers=AUTH).json()
    assert one["round"]["secure"] == SECURE
    assert [c["lora_rank"] for c in one["clients"]] == [2]  # a device that trained below the run's rank says so


@pytest.mark.parametrize("bad", [0, 2**17, -3, "eight", 2.5])
def test_a_hostile_client_rank_is_served_as_missing(client, bad):
    execute(client.db, "update client_results set lora_rank = ? where round = 1", (bad,))
    one = client.get("/api/runs/sec-1/rounds/1", headers=AUTH)
    assert one.status_code == 200 and [c["lora_rank"] for c in one.json()["clients"]] == [None]


@pytest.mark.parametrize("bad", [float("inf"), -1, 2**40, "lots", b"\xff", 0.5])
def test_a_hostile_secure_value_is_served_as_missing_never_a_500(client, bad):
    """Written straight into SQLite, as a damaged or edited file would hold it."""
    execute(client.db, "update rounds set secure_survivors = ?, secure_clip_range = ? where round = 1", (bad, bad))
    for route in ("/api/runs", "/api/runs/sec-1", "/api/runs/sec-1/rounds/1", "/runs/sec-1/rounds/1"):
        assert client.get(route, headers=AUTH).status_code == 200, route
    secure = client.get("/api/runs/sec-1/rounds/1", headers=AUTH).json()["round"]["secure"]
    assert secure["survivors"] is None and secure["shares"] == 5  # the untouched facts stay
    valid_range = not isinstance(bad, str | bytes) and 0 < bad < float("inf")  # 0.5 and 2**40 are ranges
    assert secure["clip_range"] == (float(bad) if valid_range else None)
