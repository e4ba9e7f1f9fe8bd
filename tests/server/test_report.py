import json
import re

from server.report import RoundLog, format_table
from tests.server.state.records import RUN_PRIVACY, privacy


def test_round_log_persists_each_round_and_derives_means(tmp_path):
    log = RoundLog(tmp_path / "rounds.json", run={"model": "m"})
    log.client(0, 1, "food", heldout_loss=3.0)
    log.client(0, 2, "motion", heldout_loss=5.0)
    log.close_round(0)
    log.client(1, 1, "food", train_loss=2.0, heldout_loss=2.0, bytes_up=10, bytes_down=20)
    log.client(1, 2, "motion", train_loss=4.0, heldout_loss=3.0, bytes_up=10, bytes_down=20)
    rec = log.close_round(1)
    assert rec["mean_heldout_loss"] == 2.5 and rec["mean_train_loss"] == 3.0
    assert rec["bytes_up"] == 20 and rec["bytes_down"] == 40
    on_disk = json.loads((tmp_path / "rounds.json").read_text())  # written as the run goes, not at the end
    assert [r["round"] for r in on_disk["rounds"]] == [0, 1]
    assert "finished" not in on_disk["run"]


def test_each_change_reaches_the_disk_before_the_log_is_replaced(tmp_path, synced):
    """A restart resumes from the round log (server/resume.py): a power loss must leave the old log or the new."""
    (tmp_path / "rounds.tmp").symlink_to(tmp_path / "elsewhere")  # a fixed temp name would write through it
    log = RoundLog(tmp_path / "rounds.json", run={"model": "m"})
    log.note(1, release={"manifest": "f" * 64})
    assert len(synced) == 4 and synced[1] == synced[3] == str(tmp_path)  # the new bytes, then the rename
    assert json.loads((tmp_path / "rounds.json").read_text())["rounds"][0]["release"] == {"manifest": "f" * 64}
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "rounds.json").is_symlink()


def test_table_has_a_before_row_and_one_column_per_client(tmp_path):
    log = RoundLog(tmp_path / "r.json", run={})
    log.client(0, 1, "food", heldout_loss=3.0)
    log.close_round(0)
    log.client(1, 1, "food", train_loss=2.0, heldout_loss=1.5, bytes_up=2_000_000, bytes_down=4_000_000)
    log.note(1, release={"key_id": "0123456789abcdef", "manifest": "f" * 64})
    log.close_round(1)
    lines = format_table(log.data).splitlines()
    assert "held-out food" in lines[0] and "MB up" in lines[0]
    assert lines[2].split()[:3] == ["before", "1", "0"] and lines[2].split()[4] == "3.0000"
    assert lines[3].split() == [
        "1",
        "1",
        "0",
        "2.0000",
        "1.5000",
        "1.5000",
        "2.00",
        "4.00",
        "0123456789abcdef",
        "f" * 16,
    ]


def test_table_counts_and_explains_rejections(tmp_path):
    log = RoundLog(tmp_path / "r.json", run={})
    log.client(1, 1, "food", train_loss=2.0, bytes_up=10, bytes_down=10)
    log.client(1, 3, "<b>x</b>", rejected="update norm 9 is more than 5x the round's median 1")
    log.close_round(1)
    text = format_table(log.data)
    assert text.splitlines()[2].split()[:3] == ["1", "1", "1"]
    assert "round 1: the update of <b>x</b> was rejected: update norm 9 is more than 5x" in text


def _dp_log(tmp_path):
    """A DP run's round log: round 0 before training, rounds 1 and 2 released under DP (the lead's ``privacy``)."""
    log = RoundLog(tmp_path / "r.json", run={"privacy": RUN_PRIVACY})
    log.client(0, 1, "food", heldout_loss=3.0)
    log.close_round(0)
    for n, clipped in ((1, 0.25), (2, 1.0)):
        log.client(n, 1, "food", train_loss=2.0, heldout_loss=1.5, bytes_up=10, bytes_down=10)
        log.close_round(n, privacy=privacy(n, epsilon=0.4 * n, clipped_fraction=clipped, clipping="client"))
    return log


def _cells(line):
    return re.split(r"\s{2,}", line.strip())


def test_a_dp_run_shows_epsilon_and_the_clipped_share_per_round(tmp_path):
    lines = format_table(_dp_log(tmp_path).data).splitlines()
    head = _cells(lines[0])
    column = head.index("ε")
    assert head[column - 1 : column + 2] == ["held-out mean", "ε", "clipped"]
    assert [_cells(line)[column : column + 2] for line in lines[2:5]] == [
        ["-", "-"],  # round 0 released the initial adapter: no privacy spent
        ["0.400", "25%"],
        ["0.800", "100%"],
    ]
    note = lines[-1]
    assert "at δ = 1e-05" in note and "z = 1.1" in note and "C = 1" in note and "on each device before upload" in note


def test_an_epsilon_of_a_tiny_noise_multiplier_is_shown_in_three_digits(tmp_path):
    log = _dp_log(tmp_path)
    log.note(2, privacy=privacy(2, epsilon=550000000111.7782))
    lines = format_table(log.data).splitlines()
    assert _cells(lines[4])[_cells(lines[0]).index("ε")] == "5.5e+11"


def test_a_run_without_dp_has_no_privacy_columns(tmp_path):
    log = RoundLog(tmp_path / "r.json", run={})
    log.client(1, 1, "food", train_loss=2.0, heldout_loss=1.5, bytes_up=10, bytes_down=10)
    log.close_round(1)
    text = format_table(log.data)
    assert "ε" not in text and "clipped" not in text


def test_privacy_values_out_of_bound_show_as_missing_in_the_table(tmp_path):
    log = _dp_log(tmp_path)
    log.note(2, privacy={**privacy(2), "epsilon": float("nan"), "clipped_fraction": 7.0, "delta": "x"})
    log.note(1, privacy="not a record")  # e.g. a hand-edited rounds.json
    lines = format_table(log.data).splitlines()
    column = _cells(lines[0]).index("ε")
    assert [_cells(line)[column : column + 2] for line in lines[3:5]] == [["-", "-"], ["-", "-"]]
    assert "at δ = ?" in lines[-1]


def test_a_secure_round_shows_its_survivors_the_devices_recovered_and_the_enrolled():
    rounds = [
        {"round": 0, "clients": {}},
        {"round": 1, "clients": {}, "secure": {"survivors": 5, "recovered": 1}},
        {"round": 2, "clients": {}, "secure": {"survivors": "5; DROP TABLE", "recovered": 0}},
        {"round": 3, "clients": {}, "secure": {"survivors": 4, "recovered": 0, "enrolled": 4}},
        {"round": 4, "clients": {}, "secure": {"survivors": 4, "recovered": 2, "enrolled": True}},
        {"round": 5, "clients": {}, "secure": {"survivors": 4, "enrolled": 9}},  # more than the sum: a damaged log
    ]
    table = format_table({"run": {}, "rounds": rounds})
    header, _, before, one, two, three, four, five = table.splitlines()[:8]
    assert "secure sum" in header
    assert "5 (1 recovered)" in one and "recovered" not in two and "DROP" not in table
    assert "4 (4 enrolled)" in three and "4 (2 recovered)" in four  # a count, not a flag
    assert "enrolled" not in five and " 4 " in five
    assert "secure sum" not in format_table({"run": {}, "rounds": rounds[:1]})
