import json

from server.report import RoundLog, format_table


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
