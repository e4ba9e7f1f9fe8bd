"""The dashboard's API under differential privacy: what the Privacy panel is drawn from (``server/dashboard/``).

Kept apart from ``test_dashboard.py`` (at its size limit); the real-browser check of the panel is
in ``test_dashboard_e2e.py``.
"""

import pytest
from fastapi.testclient import TestClient

from server.dashboard.app import create_app
from server.dashboard.reader import StoreReader
from server.report import RoundLog
from server.state import StateStore
from tests.server.state.records import RUN_PRIVACY, execute, privacy, report

TOKEN = "s3cret-token-for-tests-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DP_RUN = {"run_id": "dp-1", "model": "m", "method": "ffa", "rounds": 3, "config": {"aggregation.method": "ffa"}}


@pytest.fixture
def client(tmp_path):
    """A store with a DP run (rounds 0-2, rounds 1 and 2 released under DP) and a run without DP."""
    store = StateStore(tmp_path / "state.sqlite")
    dp = RoundLog(tmp_path / "dp.json", run={**DP_RUN, "privacy": RUN_PRIVACY}, store=store)
    plain = RoundLog(tmp_path / "plain.json", run={**DP_RUN, "run_id": "plain-1", "method": "fedavg"}, store=store)
    for n in range(3):
        for log in (dp, plain):
            report(log, n, "5", node_id=5, name="food", heldout_loss=3.0 - n, **({"train_loss": 2.0} if n else {}))
        plain.close_round(n)
        dp.close_round(n, **({"privacy": privacy(n)} if n else {}))
    reader = StoreReader(tmp_path / "state.sqlite")
    with TestClient(create_app(reader, TOKEN), follow_redirects=False) as c:
        c.db = store.path
        yield c
    reader.close()
    store.close()


def test_the_api_serves_the_privacy_of_a_dp_run_and_none_for_another(client):
    view = client.get("/api/runs/dp-1", headers=AUTH).json()
    assert view["run"]["privacy"] == RUN_PRIVACY
    assert [r["privacy"] for r in view["rounds"]] == [None, privacy(1), privacy(2)]
    one = client.get("/api/runs/dp-1/rounds/2", headers=AUTH).json()
    assert one["round"]["privacy"] == privacy(2) and one["run"]["privacy"] == RUN_PRIVACY
    runs = {r["run_id"]: r["epsilon"] for r in client.get("/api/runs", headers=AUTH).json()["runs"]}
    assert runs == {"dp-1": 1.0, "plain-1": None}
    plain = client.get("/api/runs/plain-1", headers=AUTH).json()
    assert plain["run"]["privacy"] is None and all(r["privacy"] is None for r in plain["rounds"])


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0, "lots", b"\xff", 2**63 - 1])
def test_a_hostile_privacy_value_is_served_as_missing_never_a_500(client, bad):
    """Written straight into SQLite: the JSON encoder refuses NaN and inf, so an unparsed one would be a 500."""
    columns = ("dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_clipped_fraction", "dp_sampling_rate")
    for column in columns:
        execute(client.db, f"update rounds set {column} = ?, dp_clipping = ? where round = 2", (bad, bad))
    execute(client.db, "update runs set dp_max_epsilon = ?, dp_population = ?", (bad, bad))
    for route in ("/api/runs", "/api/runs/dp-1", "/api/runs/dp-1/rounds/2", "/runs/dp-1"):
        assert client.get(route, headers=AUTH).status_code == 200, route
    two = client.get("/api/runs/dp-1", headers=AUTH).json()["rounds"][2]["privacy"]
    assert two["clipping"] is None and two["clip_norm"] == 1.0  # the untouched facts stay
    assert two["clipped_fraction"] is None and two["sampling_rate"] is None and two["delta"] is None
    if bad != 2**63 - 1:  # a huge ε is finite and >= 0, so it is shown as it is; everything else is missing
        assert two["epsilon"] is None and two["noise_multiplier"] is None
