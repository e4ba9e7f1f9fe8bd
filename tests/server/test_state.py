import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from server.report import RoundLog
from server.state import StateStore, StateStoreError
from server.state.heartbeat import STALE_S, Heartbeat, run_state
from server.state.queries import list_runs, round_view, run_view
from server.state.schema import metadata
from server.state.store import MIGRATIONS

RUN = {"run_id": "demo-7", "model": "m", "method": "ties", "rounds": 2, "config": {"run-name": "demo"}}


def _release(n):
    return {"key_id": "0123456789abcdef", "manifest": f"{n:064x}", "created": "2026-11-24T10:00:00Z", "path": f"/r/{n}"}


def _rows(path, sql):
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def test_the_round_log_commits_every_change_to_the_store_as_the_run_goes(tmp_path):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    assert _rows(db, "select run_id, name, finished from runs") == [("demo-7", "demo", None)]
    log.note(0, release=_release(0))
    log.client(0, "food", heldout_loss=3.0)
    assert _rows(db, "select client, status, heldout_loss from client_results") == [("food", "evaluated", 3.0)]
    log.close_round(0)
    log.client(1, "food", node_id=2**64 - 1, train_loss=2.0, num_examples=500, bytes_up=10, bytes_down=20)
    log.client(1, "<b>x</b>", node_id=5, rejected="update norm 9 is more than 5x the round's median 1")
    log.client(1, "motion", refused_release="signature by a key not in the trust list")
    # round 1 is in the store before it closes, with each client's status
    rows = _rows(db, "select client, node_id, status, reason from client_results where round = 1 order by client")
    assert rows == [
        ("<b>x</b>", "5", "rejected", "update norm 9 is more than 5x the round's median 1"),
        ("food", str(2**64 - 1), "accepted", None),
        ("motion", None, "refused", "signature by a key not in the trust list"),
    ]
    assert _rows(db, "select round, closed from rounds where round = 1") == [(1, None)]
    log.note(1, release=_release(1))
    log.client(1, "food", heldout_loss=2.5)
    log.close_round(1)
    log.finish(adapter="/out/adapter", wall_seconds=12.0)
    with store.read() as conn:
        view = run_view(conn, "demo-7")
        runs = list_runs(conn)
        one = round_view(conn, "demo-7", 1)
    assert view is not None and one is not None
    assert [r["round"] for r in view["rounds"]] == [0, 1]
    r1 = view["rounds"][1]
    assert (r1["participants"], r1["accepted"], r1["rejected"], r1["refused"]) == (3, 1, 1, 1)
    assert r1["mean_heldout_loss"] == 2.5 and r1["bytes_up"] == 10 and r1["method"] == "ties"
    assert r1["heldout"] == {"food": 2.5} and r1["manifest_digest"] == f"{1:064x}"
    assert [(e["round"], e["client"], e["status"]) for e in view["rejections"]] == [
        (1, "<b>x</b>", "rejected"),
        (1, "motion", "refused"),
    ]
    assert runs[0]["rounds_done"] == 1 and runs[0]["last_heldout_loss"] == 2.5 and runs[0]["finished"]
    assert [c["client"] for c in one["clients"]] == ["<b>x</b>", "food", "motion"]
    store.close()


def test_last_signed_round_is_the_newest_release_even_before_its_evaluation(tmp_path):
    store = StateStore(tmp_path / "s.sqlite")
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    assert store.last_signed_round("demo-7") is None
    assert store.last_signed_round("no-such-run") is None
    log.note(0, release=_release(0))
    log.close_round(0)
    log.note(1, release=_release(1))  # signed; its evaluation has not come back yet
    signed = store.last_signed_round("demo-7")
    assert signed is not None
    assert (signed.round, signed.manifest_digest, signed.release_path, signed.evaluated) == (
        1,
        f"{1:064x}",
        "/r/1",
        False,
    )
    log.close_round(1)
    log.client(2, "food", rejected="not finite")  # round 2 kept the adapter of round 1: nothing signed
    log.close_round(2)
    signed = store.last_signed_round("demo-7")
    assert signed is not None and signed.round == 1 and signed.evaluated and signed.key_id == "0123456789abcdef"


def test_a_resumed_run_drops_the_unsigned_rounds_that_were_in_flight(tmp_path):
    db = tmp_path / "s.sqlite"
    store = StateStore(db)
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    other = RoundLog(tmp_path / "other.json", run={**RUN, "run_id": "other"}, store=store)
    for n in (0, 1):
        log.note(n, release=_release(n))
        log.client(n, "food", heldout_loss=3.0 - n)
        other.client(n, "food", heldout_loss=1.0)
    log.client(2, "food", train_loss=2.0)  # round 2 in flight when the coordinator died
    assert store.drop_rounds_after("demo-7", 1) == 1
    assert _rows(db, "select run_id, round from rounds order by run_id, round") == [
        ("demo-7", 0),
        ("demo-7", 1),
        ("other", 0),
        ("other", 1),
    ]
    assert _rows(db, "select count(*) from client_results where run_id = 'demo-7' and round = 2") == [(0,)]
    assert store.last_signed_round("demo-7").round == 1
    assert store.drop_rounds_after("demo-7", 1) == 0


def test_a_store_needs_the_run_id():
    with pytest.raises(ValueError, match="run_id"):
        RoundLog("unused.json", run={"model": "m"}, store=object())  # type: ignore[arg-type]


def test_the_store_is_in_wal_mode_and_a_killed_writer_loses_nothing_committed(tmp_path):
    db = tmp_path / "state.sqlite"
    writer = textwrap.dedent(
        f"""
        import os, signal
        from server.report import RoundLog
        from server.state import StateStore
        log = RoundLog({str(tmp_path / "rounds.json")!r}, run={RUN!r}, store=StateStore({str(db)!r}))
        log.client(1, "food", train_loss=2.0)
        log.note(1, release={_release(1)!r})
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: committed pages are still in the WAL
        """
    )
    proc = subprocess.run([sys.executable, "-c", writer], cwd=os.getcwd(), capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (tmp_path / "state.sqlite-wal").stat().st_size > 0  # the writes live in the write-ahead log
    assert _rows(db, "pragma journal_mode") == [("wal",)]
    signed = StateStore(db).last_signed_round("demo-7")
    assert signed is not None and signed.round == 1
    assert _rows(db, "select client, status from client_results") == [("food", "accepted")]


def test_an_empty_file_is_migrated_to_the_schema_of_schema_py(tmp_path):
    db = tmp_path / "state.sqlite"
    db.touch()  # e.g. created by hand, or by a process killed before its first write
    StateStore(db).close()
    assert _rows(db, "select version_num from alembic_version") == [("0002",)]
    with create_engine(f"sqlite:///{db}").connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def _store_at_revision(tmp_path, revision):
    """A store holding one run, then migrated down to ``revision`` (as an older fleetlora left it)."""
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    store.save_run({**RUN, "started": 1.0})
    store.close()
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    engine.dispose()
    return db


def test_a_store_at_an_older_revision_is_upgraded_on_open(tmp_path):
    db = _store_at_revision(tmp_path, "base")  # no tables, as an older schema would be
    assert _rows(db, "select count(*) from alembic_version") == [(0,)]
    assert "runs" not in {r[0] for r in _rows(db, "select name from sqlite_master")}
    store = StateStore(db)
    assert _rows(db, "select version_num from alembic_version") == [("0002",)]
    store.save_run({**RUN, "started": 2.0})  # the upgraded tables take rows again
    assert _rows(db, "select run_id from runs") == [("demo-7",)]


def test_a_store_written_before_heartbeats_keeps_its_runs_and_calls_the_unfinished_stopped(tmp_path):
    db = _store_at_revision(tmp_path, "0001")  # its run row kept
    assert "heard" not in {r[1] for r in _rows(db, "pragma table_info(runs)")}
    store = StateStore(db, read_only=True)
    assert _rows(db, "select version_num from alembic_version") == [("0002",)]
    with store.read() as conn:  # never heard from: an unfinished run of an older fleetlora is not "running"
        assert [(r["run_id"], r["heard"], r["state"]) for r in list_runs(conn)] == [("demo-7", None, "stopped")]


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


def test_reopening_a_store_keeps_its_runs(tmp_path):
    db = tmp_path / "state.sqlite"
    StateStore(db).save_run({**RUN, "started": 1.0})
    with StateStore(db).read() as conn:
        assert [r["run_id"] for r in list_runs(conn)] == ["demo-7"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            "create table alembic_version (version_num varchar(32) primary key);"
            "insert into alembic_version values ('9z')",
            "schema revision 9z, which this fleetlora does not know",
        ),
        ("create table notes (text varchar)", "holds tables but no fleetlora state"),
    ],
)
def test_a_store_of_a_newer_fleetlora_or_another_app_is_refused(tmp_path, setup, message):
    db = tmp_path / "state.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(setup)
    with pytest.raises(StateStoreError, match=message):
        StateStore(db)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    db = tmp_path / "state.sqlite"
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(StateStoreError, match="is not a SQLite state store"):
        StateStore(db)


def test_a_read_only_handle_refuses_writes(tmp_path):
    db = tmp_path / "state.sqlite"
    StateStore(db).save_run({**RUN, "started": 1.0})
    reader = StateStore(db, read_only=True)
    with pytest.raises(OperationalError, match="readonly|read-only|query_only"):
        reader.save_run({**RUN, "run_id": "other", "started": 2.0})
    with reader.read() as conn:
        assert [r["run_id"] for r in list_runs(conn)] == ["demo-7"]
