import sqlite3

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from server.state import StateStore, StateStoreError
from server.state.queries import list_runs, run_view
from server.state.revision import head
from server.state.schema import metadata
from tests.server.state.records import RUN, alembic, execute, rows, store_at_revision


def _unchanged(db, before):
    """The file holds the same bytes, and nothing was written to its write-ahead log.

    (SQLite's read-only open of a WAL file may create an empty ``-wal`` and the ``-shm`` index
    beside it: that is how a reader takes its place next to a live writer.)
    """
    wal = db.with_name(db.name + "-wal")
    return db.read_bytes() == before and (not wal.exists() or wal.stat().st_size == 0)


def test_an_empty_file_is_migrated_to_the_schema_of_schema_py(tmp_path):
    db = tmp_path / "state.sqlite"
    db.touch()  # e.g. created by hand, or by a process killed before its first write
    StateStore(db).close()
    assert rows(db, "select version_num from alembic_version") == [(head(),)] == [("0007",)]
    with create_engine(f"sqlite:///{db}").connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_a_store_at_an_older_revision_is_upgraded_by_the_writer(tmp_path):
    db = store_at_revision(tmp_path, "base")  # no tables, as an older schema would be
    assert rows(db, "select count(*) from alembic_version") == [(0,)]
    assert "runs" not in {r[0] for r in rows(db, "select name from sqlite_master")}
    store = StateStore(db)
    assert rows(db, "select version_num from alembic_version") == [("0007",)]
    store.save_run({**RUN, "started": 2.0})  # the upgraded tables take rows again
    assert rows(db, "select run_id from runs") == [("demo-7",)]


def test_0003_keeps_the_client_rows_and_names_them_by_their_old_key(tmp_path):
    db = store_at_revision(tmp_path, "0002")
    execute(db, "insert into rounds (run_id, round, started) values ('demo-7', 1, 1.0)")
    for client, node in (("food", "5"), ("motion", None)):
        execute(
            db,
            "insert into client_results (run_id, round, client, node_id, status, train_loss) "
            "values ('demo-7', 1, ?, ?, 'accepted', 2.0)",
            (client, node),
        )
    StateStore(db).close()  # the coordinator's open migrates
    assert rows(db, "select client, name, node_id, status, train_loss from client_results order by client") == [
        ("food", "food", "5", "accepted", 2.0),
        ("motion", "motion", None, "accepted", 2.0),
    ]
    with StateStore(db, read_only=True).read() as conn:
        assert [c["name"] for c in run_view(conn, "demo-7")["clients"]] == ["food", "motion"]
    alembic(db, command.downgrade, "0002")  # and back: the rows stay, without their name
    assert rows(db, "select client, node_id from client_results order by client") == [("food", "5"), ("motion", None)]


def test_0004_keeps_the_rows_of_a_run_without_dp_and_reads_them_as_no_privacy(tmp_path):
    db = store_at_revision(tmp_path, "0003")  # a store of the fleetlora before DP, with a round and a client
    execute(db, "insert into rounds (run_id, round, started, mean_heldout_loss) values ('demo-7', 1, 1.0, 2.5)")
    client = "insert into client_results (run_id, round, client, name, status) values ('demo-7', 1, ?, ?, 'accepted')"
    execute(db, client, ("5", "food"))
    StateStore(db).close()  # the coordinator's open migrates
    assert rows(db, "select round, mean_heldout_loss, dp_epsilon, dp_clipping from rounds") == [(1, 2.5, None, None)]
    assert rows(db, "select run_id, dp_delta, dp_population from runs") == [("demo-7", None, None)]
    with StateStore(db, read_only=True).read() as conn:
        view = run_view(conn, "demo-7")
        assert view["run"]["privacy"] is None and [r["privacy"] for r in view["rounds"]] == [None]
        assert [r["epsilon"] for r in list_runs(conn)] == [None]
    alembic(db, command.downgrade, "0003")  # and back: the rows stay, without the dp_* columns
    assert rows(db, "select round, mean_heldout_loss from rounds") == [(1, 2.5)]
    assert rows(db, "select client, name from client_results") == [("5", "food")]
    assert not any(r[1].startswith("dp_") for t in ("runs", "rounds") for r in rows(db, f"pragma table_info({t})"))


def test_a_store_written_before_heartbeats_keeps_its_runs_and_calls_the_unfinished_stopped(tmp_path):
    db = store_at_revision(tmp_path, "0001")  # its run row kept
    assert "heard" not in {r[1] for r in rows(db, "pragma table_info(runs)")}
    StateStore(db).close()  # the coordinator migrates it
    with StateStore(db, read_only=True).read() as conn:  # never heard from: not "running"
        assert [(r["run_id"], r["heard"], r["state"]) for r in list_runs(conn)] == [("demo-7", None, "stopped")]


def test_0005_keeps_the_rounds_of_a_store_before_secagg_and_reads_them_as_not_secure(tmp_path):
    db = store_at_revision(tmp_path, "0004")  # a store of the fleetlora before secure aggregation
    execute(db, "insert into rounds (run_id, round, started, dp_epsilon) values ('demo-7', 1, 1.0, 0.5)")
    StateStore(db).close()  # the coordinator's open migrates
    assert rows(db, "select round, dp_epsilon, secure_survivors, secure_clip_range from rounds") == [
        (1, 0.5, None, None)
    ]
    with StateStore(db, read_only=True).read() as conn:
        assert [(r["privacy"]["epsilon"], r["secure"]) for r in run_view(conn, "demo-7")["rounds"]] == [(0.5, None)]
    alembic(db, command.downgrade, "0004")  # and back: the round stays, without the secure_* columns
    assert rows(db, "select round, dp_epsilon from rounds") == [(1, 0.5)]
    assert not any(r[1].startswith("secure_") for r in rows(db, "pragma table_info(rounds)"))


def test_0006_keeps_the_client_rows_before_async_and_reads_them_with_no_staleness(tmp_path):
    db = store_at_revision(tmp_path, "0005")  # a store of the fleetlora before async rounds
    execute(db, "insert into rounds (run_id, round, started) values ('demo-8', 1, 1.0)")
    execute(db, "insert into client_results (run_id, round, client, name, status, lora_rank) "
                "values ('demo-8', 1, '5', 'food', 'accepted', 2)")  # fmt: skip
    StateStore(db).close()  # the coordinator's open migrates
    assert rows(db, "select client, lora_rank, staleness, memory_budget_mb from client_results") == [
        ("5", 2, None, None)
    ]
    alembic(db, command.downgrade, "0005")  # and back: the row stays, without the 0006 columns
    assert rows(db, "select client, lora_rank from client_results") == [("5", 2)]
    assert not any(r[1] == "staleness" for r in rows(db, "pragma table_info(client_results)"))


def test_0007_keeps_the_secure_rounds_before_enrolment_and_reads_them_as_not_enrolled(tmp_path):
    db = store_at_revision(tmp_path, "0006")  # a store of the fleetlora before enrolled devices
    execute(db, "insert into rounds (run_id, round, started, secure_survivors) values ('demo-7', 1, 1.0, 4)")
    execute(db, "insert into client_results (run_id, round, client, name, status) values ('demo-7', 1, '5', 'a', 'ok')")
    StateStore(db).close()  # the coordinator's open migrates
    assert rows(db, "select round, secure_survivors, secure_enrolled from rounds") == [(1, 4, None)]
    with StateStore(db, read_only=True).read() as conn:
        secure = run_view(conn, "demo-7")["rounds"][0]["secure"]
        assert (secure["survivors"], secure["enrolled"]) == (4, None)
    alembic(db, command.downgrade, "0006", foreign_keys=True)  # and back: the round stays, with its other facts
    assert rows(db, "select round, secure_survivors from rounds") == [(1, 4)]
    assert rows(db, "select client from client_results") == [("5",)]  # not dropped with a recreated rounds table
    assert not any(r[1] == "secure_enrolled" for r in rows(db, "pragma table_info(rounds)"))


def test_a_downgrade_with_foreign_keys_on_keeps_every_run_round_and_client_row(tmp_path):
    """The store's engine turns SQLite's foreign keys on: a migration that recreated ``runs`` or ``rounds`` to drop a
    column dropped the old table, and every child row with it (0002, 0004, 0005, 0007 did)."""
    db = store_at_revision(tmp_path, head())
    execute(db, "insert into rounds (run_id, round, started) values ('demo-7', 1, 1.0)")
    execute(db, "insert into client_results (run_id, round, client, name, status) values ('demo-7', 1, '5', 'a', 'ok')")
    alembic(db, command.downgrade, "0001", foreign_keys=True)
    counts = [rows(db, f"select count(*) from {t}")[0][0] for t in ("runs", "rounds", "client_results")]
    assert counts == [1, 1, 1]


@pytest.mark.parametrize("revision", ["0001", "0002", "0003", "0004", "0005", "0006"])
def test_the_read_only_open_never_migrates_an_older_store(tmp_path, revision):
    db = store_at_revision(tmp_path, revision)
    before = db.read_bytes()
    with pytest.raises(StateStoreError, match=f"at schema revision {revision}, older than this fleetlora's 0007"):
        StateStore(db, read_only=True)
    assert _unchanged(db, before)  # no migration
    assert rows(db, "select version_num from alembic_version") == [(revision,)]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            "create table alembic_version (version_num varchar(32) primary key);"
            "insert into alembic_version values ('9z')",
            "schema revision 9z, which this fleetlora does not know",
        ),
        ("create table notes (text varchar)", "holds tables but no fleetlora state"),
        (
            "create table alembic_version (version_num varchar(32) primary key);"
            "insert into alembic_version values ('0001'); insert into alembic_version values ('0002')",
            "its alembic_version table is not one revision",  # alembic's own CommandError, uncaught before
        ),
    ],
)
@pytest.mark.parametrize("read_only", [False, True])
def test_a_store_of_a_newer_fleetlora_or_another_app_is_refused(tmp_path, setup, message, read_only):
    db = tmp_path / "state.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(setup)
    before = db.read_bytes()
    with pytest.raises(StateStoreError, match=message):
        StateStore(db, read_only=read_only)
    assert _unchanged(db, before)  # not even switched to WAL


@pytest.mark.parametrize("read_only", [False, True])
def test_a_file_that_is_not_sqlite_is_refused(tmp_path, read_only):
    db = tmp_path / "state.sqlite"
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(StateStoreError, match="is not a SQLite state store"):
        StateStore(db, read_only=read_only)
    assert db.read_bytes() == b"not a database" * 100


def test_a_reader_notices_when_a_newer_coordinator_migrates_the_store_under_it(tmp_path):
    db = tmp_path / "state.sqlite"
    StateStore(db).save_run({**RUN, "started": 1.0})
    reader = StateStore(db, read_only=True)
    execute(db, "update alembic_version set version_num = '0099'")  # as a newer fleetlora would
    with pytest.raises(StateStoreError, match="revision 0099, which this fleetlora does not know"):
        with reader.read():
            pass
