import time

import pytest

from server.report import RoundLog
from server.state import StateStore
from server.state.heartbeat import STALE_S, Heartbeat, run_state
from server.state.queries import list_runs, run_view
from tests.server.state.records import RUN


def test_the_heartbeat_tells_a_running_run_from_a_stopped_one(tmp_path):
    store = StateStore(tmp_path / "state.sqlite")
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    beat = Heartbeat(store, "demo-7", every=0.05).start()
    try:
        with store.read() as conn:
            first = run_view(conn, "demo-7")["run"]
        assert first["state"] == "running" and first["heard"] >= log.data["run"]["started"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # it keeps beating in the background
            with store.read() as conn:
                if run_view(conn, "demo-7")["run"]["heard"] > first["heard"]:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("no second heartbeat within 10 s")
    finally:
        beat.stop()
    with store.read() as conn:
        heard = run_view(conn, "demo-7")["run"]["heard"]
    # a killed coordinator stops beating: some time later the same row reads as stopped
    assert run_state(None, heard, now=heard + STALE_S - 1) == "running"
    assert run_state(None, heard, now=heard + STALE_S + 1) == "stopped"
    log.finish(wall_seconds=1.0)  # a finished run is finished, however long ago it was heard from
    with store.read() as conn:
        assert [r["state"] for r in list_runs(conn)] == ["finished"]
    assert run_state(1.0, None) == "finished"
    store.close()


def test_a_failed_beat_is_logged_and_the_run_goes_on(tmp_path, caplog):
    db = tmp_path / "state.sqlite"
    StateStore(db).save_run({**RUN, "started": 1.0})
    reader = StateStore(db, read_only=True)  # every write on it fails, as a store locked for too long would
    beat = Heartbeat(reader, "demo-7", every=3600).start()  # the first beat is written (tried) at once
    beat.stop()
    assert "heartbeat of run demo-7 not written" in caplog.text
