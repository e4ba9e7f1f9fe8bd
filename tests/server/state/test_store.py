import os
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy.exc import OperationalError

from server.report import RoundLog
from server.state import StateStore, StateStoreError
from server.state.queries import list_runs, round_view
from tests.server.state.records import RUN, RUN_PRIVACY, execute, privacy, release, report, rows


def test_the_round_log_commits_every_change_to_the_store_as_the_run_goes(tmp_path):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    assert rows(db, "select run_id, name, finished from runs") == [("demo-7", "demo", None)]
    log.note(0, release=release(0))
    report(log, 0, "3", node_id=3, name="food", heldout_loss=3.0)
    assert rows(db, "select client, name, status, heldout_loss from client_results") == [
        ("3", "food", "evaluated", 3.0)
    ]
    log.close_round(0)
    report(log, 1, "3", node_id=3, name="food", train_loss=2.0, num_examples=500, bytes_up=10, bytes_down=20)
    report(log, 1, str(2**64 - 1), node_id=2**64 - 1, name="<b>x</b>", rejected="update norm 9 is more than 5x")
    report(log, 1, "9", node_id=9, name="motion", refused_release="signature by a key not in the trust list")
    # round 1 is in the store before it closes, with each client's status
    got = rows(db, "select client, name, node_id, status, reason from client_results where round = 1 order by name")
    assert got == [
        (str(2**64 - 1), "<b>x</b>", str(2**64 - 1), "rejected", "update norm 9 is more than 5x"),
        ("3", "food", "3", "accepted", None),
        ("9", "motion", "9", "refused", "signature by a key not in the trust list"),
    ]
    assert rows(db, "select round, closed from rounds where round = 1") == [(1, None)]
    log.finish(adapter="/out/adapter", wall_seconds=12.0)
    assert rows(db, "select adapter, wall_seconds from runs") == [("/out/adapter", 12.0)]
    store.close()


def test_two_clients_reporting_the_same_name_keep_a_row_each(tmp_path):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    report(log, 1, "11", node_id=11, name="food", train_loss=2.0, num_examples=500)
    report(log, 1, "12", node_id=12, name="food", rejected="update norm is more than 5x the median")  # the impostor
    assert rows(db, "select client, name, status from client_results order by client") == [
        ("11", "food", "accepted"),
        ("12", "food", "rejected"),
    ]
    with store.read() as conn:
        view = round_view(conn, "demo-7", 1)
    assert [(c["node_id"], c["name"], c["status"], c["num_examples"]) for c in view["clients"]] == [
        ("11", "food", "accepted", 500),
        ("12", "food", "rejected", None),
    ]
    assert (view["round"]["accepted"], view["round"]["rejected"]) == (1, 1)


def test_an_accepted_update_whose_loss_was_withheld_is_accepted(tmp_path):
    db = tmp_path / "state.sqlite"
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=StateStore(db))
    report(log, 1, "11", node_id=11, name="food", num_examples=500, update_norm=0.3)  # record-level DP: no loss
    assert rows(db, "select client, status, train_loss from client_results") == [("11", "accepted", None)]


def test_an_entry_without_a_name_shows_its_key(tmp_path):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    store.save_run({**RUN, "started": 1.0})
    store.save_round("demo-7", {"round": 1, "started": 2.0, "clients": {"node-5": {"node_id": 5, "train_loss": 1.0}}})
    assert rows(db, "select client, name, node_id from client_results") == [("node-5", "node-5", "5")]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), "2.5", None, [1.0], True])
def test_the_writer_stores_a_non_finite_or_mistyped_number_as_null(tmp_path, bad):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    store.save_run({**RUN, "started": 1.0, "wall_seconds": bad, "config": {"lr": bad, "nested": {"x": bad}}})
    entry = {"node_id": 4, "name": "food", **{k: bad for k in ("train_loss", "heldout_loss", "update_norm")}}
    rec = {"round": 1, "started": 2.0, "seconds": bad, "mean_heldout_loss": bad, "clients": {"4": entry}}
    store.save_round("demo-7", rec)  # no exception: a bad value never stops the coordinator
    assert rows(db, "select wall_seconds from runs") == [(None,)]
    assert rows(db, "select closed, seconds, mean_heldout_loss from rounds") == [(None, None, None)]
    assert rows(db, "select train_loss, heldout_loss, update_norm from client_results") == [(None, None, None)]
    assert (
        "Infinity" not in rows(db, "select config from runs")[0][0]
        and "NaN" not in rows(db, "select config from runs")[0][0]
    )


DP_ROUND = (
    "select round, dp_epsilon, dp_delta, dp_noise_multiplier, dp_clip_norm, dp_clipped_fraction, dp_sampling_rate, "
    "dp_expected_clients, dp_clipping from rounds order by round"
)


def test_the_privacy_facts_of_a_dp_run_and_its_rounds_are_committed_as_the_run_goes(tmp_path):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    log = RoundLog(tmp_path / "rounds.json", run={**RUN, "privacy": RUN_PRIVACY}, store=store)
    assert rows(db, "select dp_delta, dp_max_epsilon, dp_clipping, dp_population from runs") == [
        (1e-5, 8.0, "server", 400)
    ]
    report(log, 0, "3", node_id=3, name="food", heldout_loss=3.0)
    log.close_round(0)  # round 0 released the initial adapter: nothing under DP
    report(log, 1, "3", node_id=3, name="food", train_loss=2.0)
    log.note(1, release=release(1), privacy=privacy(1, clipped_fraction=1.0, clipping="client"))
    assert rows(db, DP_ROUND) == [
        (0, None, None, None, None, None, None, None, None),
        (1, 0.5, 1e-5, 1.1, 1.0, 1.0, 0.05, 20.0, "client"),  # in the store before the round closes
    ]
    log.close_round(1)
    assert rows(db, DP_ROUND)[1] == (1, 0.5, 1e-5, 1.1, 1.0, 1.0, 0.05, 20.0, "client")
    store.close()


def test_the_run_privacy_the_coordinator_notes_once_devices_connect_is_stored(tmp_path):
    db = tmp_path / "state.sqlite"
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=StateStore(db))  # no DP facts yet: NULL
    assert rows(db, "select dp_delta, dp_noise_multiplier, dp_population from runs") == [(None, None, None)]
    log.note_run(privacy={**RUN_PRIVACY, "max_epsilon": None})  # as server_app notes it: None = no limit
    assert rows(
        db,
        "select dp_delta, dp_max_epsilon, dp_noise_multiplier, dp_clip_norm, dp_sampling_rate, dp_clipping, "
        "dp_population from runs",
    ) == [(1e-5, None, 1.1, 1.0, 0.05, "server", 400)]


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("epsilon", -0.1),
        ("epsilon", float("inf")),
        ("delta", 0.0),
        ("delta", 1.0),
        ("noise_multiplier", float("nan")),
        ("clip_norm", 0.0),
        ("clipped_fraction", 1.5),
        ("sampling_rate", 0.0),
        ("sampling_rate", 2.0),
        ("expected_clients", -3.0),
        ("clipping", "both"),
        ("epsilon", "0.5"),
        ("epsilon", True),
    ],
)
def test_a_privacy_fact_outside_its_bound_is_stored_as_null_and_the_others_kept(tmp_path, key, bad):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    store.save_run({**RUN, "started": 1.0, "privacy": {**RUN_PRIVACY, "delta": bad, "population": -1}})
    store.save_round("demo-7", {"round": 1, "started": 2.0, "clients": {}, "privacy": privacy(1, **{key: bad})})
    (stored,) = [dict(zip(("round", *privacy(1)), r, strict=True)) for r in rows(db, DP_ROUND)]
    assert stored[key] is None
    assert {k: v for k, v in stored.items() if k not in (key, "round")} == {
        k: v for k, v in privacy(1).items() if k != key
    }
    assert rows(db, "select dp_delta, dp_population, dp_clipping from runs") == [(None, None, "server")]


@pytest.mark.parametrize("bad", [None, "epsilon=1", [0.5], 7])
def test_a_privacy_record_that_is_not_a_mapping_stores_no_privacy(tmp_path, bad):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    store.save_run({**RUN, "started": 1.0, "privacy": bad})
    store.save_round("demo-7", {"round": 1, "started": 2.0, "clients": {}, "privacy": bad})  # no exception
    assert rows(db, DP_ROUND) == [(1, None, None, None, None, None, None, None, None)]
    assert rows(db, "select dp_delta, dp_max_epsilon, dp_clipping, dp_population from runs") == [(None,) * 4]


@pytest.mark.parametrize("count", [2**63, 2**64 - 1, 1e30, -1, float("inf"), 2.5])
def test_an_example_count_sqlite_cannot_hold_is_stored_as_null(tmp_path, count):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    store.save_run({**RUN, "started": 1.0})
    entry = {"node_id": 2**64 + 5, "name": "x", "train_loss": 1.0, "num_examples": count, "bytes_up": count}
    store.save_round("demo-7", {"round": 1, "started": 2.0, "bytes_up": count, "clients": {"1": entry}})
    assert rows(db, "select num_examples, bytes_up, node_id, status from client_results") == [
        (None, None, None, "accepted")
    ]
    assert rows(db, "select bytes_up from rounds") == [(None,)]


def test_a_self_reported_name_is_bounded(tmp_path):
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    store.save_run({**RUN, "started": 1.0})
    store.save_round("demo-7", {"round": 1, "started": 2.0, "clients": {"1": {"node_id": 1, "name": "n" * 10**6}}})
    ((name,),) = rows(db, "select name from client_results")
    assert len(name) == 200 and name.endswith("…")


def test_last_signed_round_is_the_newest_release_even_before_its_evaluation(tmp_path):
    store = StateStore(tmp_path / "s.sqlite")
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    assert store.last_signed_round("demo-7") is None
    assert store.last_signed_round("no-such-run") is None
    log.note(0, release=release(0))
    log.close_round(0)
    log.note(1, release=release(1))  # signed; its evaluation has not come back yet
    signed = store.last_signed_round("demo-7")
    assert signed is not None
    assert (signed.round, signed.manifest_digest, signed.release_path, signed.evaluated) == (
        1,
        f"{1:064x}",
        "/r/1",
        False,
    )
    log.close_round(1)
    report(log, 2, "3", node_id=3, name="food", rejected="not finite")  # round 2 kept round 1's adapter: nothing signed
    log.close_round(2)
    signed = store.last_signed_round("demo-7")
    assert signed is not None and signed.round == 1 and signed.evaluated and signed.key_id == "0123456789abcdef"


@pytest.mark.parametrize(
    "damage",
    ["round = 'two'", "manifest_digest = x'00ff'", "manifest_digest = cast(x'ff' as text)", "manifest_digest = 'abc'"],
)
def test_a_damaged_signed_round_fails_resume_closed(tmp_path, damage):
    db = tmp_path / "s.sqlite"
    store = StateStore(db)
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    log.note(0, release=release(0))
    log.note(1, release=release(1))
    execute(db, f"update rounds set {damage} where round = 1")
    with pytest.raises(StateStoreError, match="newest signed round of run demo-7 is unreadable"):
        store.last_signed_round("demo-7")  # never a guess at an older round to resume from


def test_a_resumed_run_drops_the_unsigned_rounds_that_were_in_flight(tmp_path):
    db = tmp_path / "s.sqlite"
    store = StateStore(db)
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=store)
    other = RoundLog(tmp_path / "other.json", run={**RUN, "run_id": "other"}, store=store)
    for n in (0, 1):
        log.note(n, release=release(n))
        report(log, n, "3", node_id=3, name="food", heldout_loss=3.0 - n)
        report(other, n, "3", node_id=3, name="food", heldout_loss=1.0)
    report(log, 2, "3", node_id=3, name="food", train_loss=2.0)  # round 2 in flight when the coordinator died
    assert store.drop_rounds_after("demo-7", 1) == 1
    assert rows(db, "select run_id, round from rounds order by run_id, round") == [
        ("demo-7", 0),
        ("demo-7", 1),
        ("other", 0),
        ("other", 1),
    ]
    assert rows(db, "select count(*) from client_results where run_id = 'demo-7' and round = 2") == [(0,)]
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
        log.client(1, 3, train_loss=2.0)
        log.note(1, release={release(1)!r})
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: committed pages are still in the WAL
        """
    )
    proc = subprocess.run([sys.executable, "-c", writer], cwd=os.getcwd(), capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (tmp_path / "state.sqlite-wal").stat().st_size > 0  # the writes live in the write-ahead log
    assert rows(db, "pragma journal_mode") == [("wal",)]
    signed = StateStore(db, read_only=True).last_signed_round("demo-7")  # the dashboard reads the WAL too
    assert signed is not None and signed.round == 1
    assert rows(db, "select client, status from client_results") == [("3", "accepted")]


def test_reopening_a_store_keeps_its_runs(tmp_path):
    db = tmp_path / "state.sqlite"
    StateStore(db).save_run({**RUN, "started": 1.0})
    with StateStore(db).read() as conn:
        assert [r["run_id"] for r in list_runs(conn)] == ["demo-7"]


def test_a_read_only_handle_refuses_writes(tmp_path):
    db = tmp_path / "state.sqlite"
    StateStore(db).save_run({**RUN, "started": 1.0})
    reader = StateStore(db, read_only=True)
    with pytest.raises(OperationalError, match="readonly|read-only|query_only"):
        reader.save_run({**RUN, "run_id": "other", "started": 2.0})
    with pytest.raises(OperationalError, match="readonly|read-only|query_only"):
        reader.heard("demo-7")
    with reader.read() as conn:
        assert [r["run_id"] for r in list_runs(conn)] == ["demo-7"]


def test_a_read_only_open_of_a_missing_file_creates_nothing(tmp_path):
    db = tmp_path / "no" / "such" / "state.sqlite"
    with pytest.raises(StateStoreError, match="no state store at .*the coordinator creates it"):
        StateStore(db, read_only=True)
    assert not (tmp_path / "no").exists()  # neither the file nor its folder


def test_a_read_only_open_of_an_empty_file_leaves_it_empty(tmp_path):
    db = tmp_path / "state.sqlite"
    db.touch()  # e.g. a coordinator killed between creating the file and migrating it
    with pytest.raises(StateStoreError, match="holds no fleetlora state yet"):
        StateStore(db, read_only=True)
    assert db.stat().st_size == 0


def test_a_read_only_open_works_through_a_path_with_uri_characters(tmp_path):
    folder = tmp_path / "odd ?#% name"
    folder.mkdir()
    StateStore(folder / "state.sqlite").save_run({**RUN, "started": 1.0})
    reader = StateStore(folder / "state.sqlite", read_only=True)  # '?' and '#' must not end the file name
    with reader.read() as conn:
        assert [r["run_id"] for r in list_runs(conn)] == ["demo-7"]
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm"))) == ["state.sqlite"]


def test_a_read_only_handle_never_creates_its_file_even_if_it_vanishes_after_the_open(tmp_path):
    db = tmp_path / "state.sqlite"
    StateStore(db).close()
    reader = StateStore(db, read_only=True)
    reader.close()  # its pool is empty: the next read opens a new connection
    for name in ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises((StateStoreError, OperationalError)):
        with reader.read():
            pass
    assert list(tmp_path.iterdir()) == []  # SQLite's mode=ro: no new empty database in its place
