import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.report import RoundLog
from server.state import StateStore
from server.state.queries import list_runs, round_view, run_view
from server.state.schema import client_results, rounds, runs
from tests.server.state.records import HOSTILE, RUN, RUN_PRIVACY, execute, privacy, report


def _views(store, run_id="demo-7", server_round=1):
    """Every view the dashboard serves, through a read-only handle as it opens one, as JSON (no NaN, no inf)."""
    reader = StateStore(store.path, read_only=True)
    try:
        with reader.read() as conn:
            views = {
                "runs": list_runs(conn),
                "run": run_view(conn, run_id),
                "round": round_view(conn, run_id, server_round),
            }
    finally:
        reader.close()
    json.dumps(views, allow_nan=False)
    return views


@pytest.fixture
def store(tmp_path):
    """A store with one run: round 0 evaluated, round 1 with two clients, one of them rejected."""
    writer = StateStore(tmp_path / "state.sqlite")
    log = RoundLog(tmp_path / "rounds.json", run=RUN, store=writer)
    report(log, 0, "3", node_id=3, name="food", heldout_loss=3.0)
    log.close_round(0)
    report(log, 1, "3", node_id=3, name="food", train_loss=2.0, num_examples=500, heldout_loss=2.5)
    report(log, 1, "8", node_id=8, name="<b>x</b>", rejected="update norm 9 is more than 5x the median 1")
    log.close_round(1)
    yield writer
    writer.close()


def test_the_views_show_what_the_round_log_wrote(store):
    views = _views(store)
    (summary,) = views["runs"]
    assert (summary["run_id"], summary["rounds_done"], summary["last_heldout_loss"], summary["state"]) == (
        "demo-7",
        1,
        2.5,
        "stopped",  # never heard from (no heartbeat in this test) and unfinished
    )
    view = views["run"]
    assert [r["round"] for r in view["rounds"]] == [0, 1]
    r1 = view["rounds"][1]
    assert (r1["participants"], r1["accepted"], r1["rejected"], r1["refused"]) == (2, 1, 1, 0)
    assert r1["heldout"] == {"3": 2.5} and r1["mean_heldout_loss"] == 2.5 and r1["method"] == "ties"
    none = {"mean_staleness": None, "lora_rank": None}
    assert view["clients"] == [  # each device with its accepted updates of the run (8's was rejected)
        {"client": "8", "name": "<b>x</b>", "node_id": "8", "accepted": 0, **none},
        {"client": "3", "name": "food", "node_id": "3", "accepted": 1, **none},
    ]
    assert view["rejections"] == [
        {
            "round": 1,
            "client": "8",
            "name": "<b>x</b>",
            "node_id": "8",
            "status": "rejected",
            "reason": "update norm 9 is more than 5x the median 1",
        }
    ]
    one = views["round"]
    assert [(c["name"], c["status"]) for c in one["clients"]] == [("<b>x</b>", "rejected"), ("food", "accepted")]
    assert one["run"]["name"] == "demo" and one["aggregation"] == {}


@pytest.fixture
def dp_store(tmp_path):
    """A DP run: round 0 (no release under DP), rounds 1 and 2 released under DP, round 3 released nothing."""
    writer = StateStore(tmp_path / "dp.sqlite")
    log = RoundLog(tmp_path / "dp.json", run={**RUN, "privacy": RUN_PRIVACY}, store=writer)
    report(log, 0, "3", node_id=3, name="food", heldout_loss=3.0)
    log.close_round(0)
    for n in (1, 2):
        report(log, n, "3", node_id=3, name="food", train_loss=2.0, heldout_loss=2.5)
        log.close_round(n, privacy=privacy(n))
    report(log, 3, "3", node_id=3, name="food", rejected="update norm is not finite")
    log.close_round(3)
    yield writer
    writer.close()


def test_the_views_show_a_dp_runs_privacy_per_round(dp_store):
    views = _views(dp_store, server_round=2)
    assert views["run"]["run"]["privacy"] == RUN_PRIVACY
    assert [r["privacy"] for r in views["run"]["rounds"]] == [None, privacy(1), privacy(2), None]
    assert views["runs"][0]["epsilon"] == 1.0  # round 2's: round 3 released nothing, so spent nothing more
    assert views["round"]["round"]["privacy"] == privacy(2)
    assert views["round"]["run"]["privacy"] == RUN_PRIVACY


def test_a_run_without_dp_has_no_privacy_anywhere(store):
    views = _views(store)
    assert views["run"]["run"]["privacy"] is None and views["runs"][0]["epsilon"] is None
    assert [r["privacy"] for r in views["run"]["rounds"]] == [None, None]
    assert views["round"]["round"]["privacy"] is None and views["round"]["run"]["privacy"] is None


@pytest.mark.parametrize(
    ("column", "bad"),
    [
        ("epsilon", float("inf")),
        ("epsilon", -1.0),
        ("epsilon", "x" * 10_000),
        ("epsilon", b"\xff\x00"),
        ("delta", 1.0),
        ("noise_multiplier", float("-inf")),
        ("clip_norm", 0.0),
        ("clipped_fraction", 1.5),
        ("sampling_rate", 0.0),
        ("expected_clients", -(2**63)),
        ("clipping", "both"),
        ("clipping", 1),
    ],
)
def test_a_hostile_privacy_column_reads_as_missing_and_the_others_stay(dp_store, column, bad):
    """Written straight into SQLite: the value shows as missing, the round's other facts as they were."""
    execute(dp_store.path, f"update rounds set dp_{column} = ? where round = 2", (bad,))
    views = _views(dp_store, server_round=2)
    assert views["run"]["rounds"][2]["privacy"] == {**privacy(2), column: None}
    assert views["round"]["round"]["privacy"] == {**privacy(2), column: None}
    assert views["run"]["rounds"][1]["privacy"] == privacy(1)
    assert views["runs"][0]["epsilon"] == (0.5 if column == "epsilon" else 1.0)  # the latest ε that reads


@pytest.mark.parametrize(
    ("column", "bad"), [("population", 2**40), ("population", -1), ("population", 2.5), ("delta", 0.0)]
)
def test_a_hostile_run_privacy_column_reads_as_missing(dp_store, column, bad):
    execute(dp_store.path, f"update runs set dp_{column} = ?", (bad,))
    assert _views(dp_store)["run"]["run"]["privacy"] == {**RUN_PRIVACY, column: None}


def test_a_client_keeps_its_latest_name_across_rounds(store, tmp_path):
    execute(store.path, "update client_results set name = 'renamed' where client = '3' and round = 1")
    assert [c["name"] for c in _views(store)["run"]["clients"]] == ["<b>x</b>", "renamed"]


@pytest.mark.parametrize("bad", HOSTILE)
def test_a_hostile_value_in_any_column_never_breaks_a_view(store, bad):
    """Written straight into SQLite: every number column of every table, one value at a time."""
    for table, keys in ((runs, ("run_id",)), (rounds, ("run_id", "round")), (client_results, ("run_id", "round"))):
        for column in table.c:
            if column.name not in keys and column.name not in ("client",):
                execute(store.path, f"update {table.name} set {column.name} = ?", (bad,))
    views = _views(store)
    r1 = views["run"]["rounds"][1]
    numbers = [r1[k] for k in ("mean_heldout_loss", "mean_train_loss", "seconds", "bytes_up")]
    assert all(v is None or isinstance(v, int | float) for v in numbers)
    if isinstance(bad, float) and bad in (float("inf"), float("-inf")):
        assert numbers == [None, None, None, None] and r1["heldout"] == {}
    if bad == "x" * 10_000:  # text in a number column: missing (SQLite itself turns "2.5" into 2.5)
        assert r1["mean_heldout_loss"] is None and views["round"]["clients"][0]["train_loss"] is None
        assert len(views["round"]["clients"][0]["name"]) == 200  # and a name is cut to its bound


def test_invalid_utf8_json_garbage_and_unknown_statuses_read_as_missing(store):
    execute(store.path, "update runs set config = '{not json', model = cast(x'ff61' as text)")
    execute(store.path, "update client_results set status = 'pwned', name = cast(x'c3' as text) where client = '3'")
    views = _views(store)
    assert views["run"]["run"]["config"] == {} and views["run"]["run"]["model"] == "\ufffda"
    r1 = views["run"]["rounds"][1]
    assert (r1["participants"], r1["accepted"], r1["rejected"]) == (2, 0, 1)  # an unknown status counts nowhere
    assert {c["client"]: c["status"] for c in views["round"]["clients"]} == {"3": None, "8": "rejected"}


def test_rows_whose_keys_cannot_be_parsed_are_left_out(store):
    execute(store.path, "insert into rounds (run_id, round, started) values ('demo-7', 'two', 1.0)")
    execute(store.path, "insert into rounds (run_id, round, started) values ('demo-7', -3, 1.0)")
    execute(
        store.path,
        "insert into client_results (run_id, round, client, name, status) values ('demo-7', 1, x'00', 'n', 'accepted')",
    )
    execute(store.path, "insert into runs (run_id, name, config, started) values (?, 'n', '{}', 1.0)", ("r" * 300,))
    views = _views(store)
    assert [r["round"] for r in views["run"]["rounds"]] == [0, 1]
    assert views["run"]["rounds"][1]["participants"] == 2
    assert [r["run_id"] for r in views["runs"]] == ["demo-7"]


def test_a_finished_run_with_inf_times_is_listed_and_ordered(store):
    store.save_run({**RUN, "run_id": "later", "started": 50.0})
    execute(store.path, "update runs set started = ?, finished = ? where run_id = 'demo-7'", (float("inf"), 9e999))
    assert [(r["run_id"], r["started"], r["finished"]) for r in _views(store)["runs"]] == [
        ("later", 50.0, None),
        ("demo-7", None, None),
    ]


COLUMNS = {
    "runs": [c.name for c in runs.c if c.name != "run_id"],
    "rounds": [c.name for c in rounds.c if c.name not in ("run_id", "round")],
    "client_results": [c.name for c in client_results.c if c.name not in ("run_id", "round")],
}
VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from(["accepted", "rejected", "{}", '{"aggregation.x": 1e999}', "[1]", "Infinity"]),
)
ROW = st.fixed_dictionaries({}, optional={name: VALUES for names in COLUMNS.values() for name in names})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.sampled_from(sorted(COLUMNS)), values=ROW)
def test_any_values_written_into_a_row_leave_every_view_serving(store, table, values):
    columns = [c for c in values if c in COLUMNS[table]]
    if columns:
        sets = ", ".join(f"{c} = ?" for c in columns)
        try:
            execute(store.path, f"update {table} set {sets}", [values[c] for c in columns])
        except sqlite3.IntegrityError:  # NULL in a NOT NULL column: SQLite refuses it, nothing to read
            return
    views = _views(store)  # no exception, and JSON without NaN or inf
    assert views["run"] is not None and [r["run_id"] for r in views["runs"]] == ["demo-7"]


@pytest.mark.parametrize(
    ("column", "bad"),
    [("staleness", -1), ("staleness", "x"), ("contributions", 0), ("memory_budget_mb", 2**40),
     ("gradient_checkpointing", 2), ("micro_batch_size", 1.5), ("release_round", float("inf"))],
)  # fmt: skip
def test_a_hostile_staleness_or_budget_reads_as_missing_and_the_others_stay(store, column, bad):
    execute(store.path, "update client_results set staleness = 1, contributions = 2, memory_budget_mb = 1200, "
            "micro_batch_size = 1, gradient_checkpointing = 1, release_round = 0 where client = '3'")  # fmt: skip
    execute(store.path, f"update client_results set {column} = ? where client = '3'", (bad,))
    food = next(c for c in _views(store)["round"]["clients"] if c["client"] == "3")
    good = {"staleness": 1, "contributions": 2, "memory_budget_mb": 1200, "micro_batch_size": 1,
            "gradient_checkpointing": 1, "release_round": 0}  # fmt: skip
    assert food[column] is None
    assert all(food[k] == v for k, v in good.items() if k != column)
