"""The coordinator's intake of a phase's replies: what counts, and how every reply that does not is told and kept."""

import json

from flwr.app import ConfigRecord, Error, Message, MetricRecord

from server.intake import Intake, rejection_reason
from server.replies import parse_evaluate
from server.report import RoundLog
from server.roster import Roster
from tests.server.messages import message, metadata


def _eval(node, name, loss=2.0):
    return message({"metrics": MetricRecord({"num-examples": 8, "heldout-loss": loss}),
                    "client": ConfigRecord({"name": name})}, node)  # fmt: skip


def _refusal(node):
    records = {"metrics": MetricRecord({"refused-release": 1}),
               "client": ConfigRecord({"name": "gw", "refused-release": "signature by an unknown key"})}  # fmt: skip
    return message(records, node)


def _failed(node):
    return Message(Error(code=2, reason="ClientApp raised"), metadata=metadata(node))


def test_each_reply_is_kept_or_told_and_recorded_with_its_reason(tmp_path):
    log = RoundLog(tmp_path / "rounds.json", {})
    intake = Intake(Roster(), log)
    replies = [_eval(1, "food"), _eval(1, "food-again"), _failed(2), _refusal(3), _eval(4, "x", loss=float("nan"))]
    kept, tally = intake.parse(1, replies, lambda m, n: parse_evaluate(m, n, 1000), phase="evaluation")
    assert [(r.node_id, r.name) for r in kept] == [(1, "food")]
    assert tally == {"failed-replies": 1, "refused-releases": 1, "rejected-updates": 2}
    log.close_round(1)
    clients = json.loads((tmp_path / "rounds.json").read_text())["rounds"][0]["clients"]
    assert "a second reply from node 1" in clients["1"]["evaluation_rejected"]  # the duplicate, never counted twice
    assert clients["3"]["refused_release"] == "signature by an unknown key"
    assert "not finite" in clients["4"]["evaluation_rejected"]
    assert "2" not in clients  # a failed reply is logged and tallied; there is nothing of the device to record


def test_a_rejection_reason_is_the_message_or_names_the_exception():
    assert rejection_reason(ValueError("update is 9 bytes")) == "update is 9 bytes"
    assert rejection_reason(KeyError("arrays")) == "malformed reply (KeyError: 'arrays')"
    assert len(rejection_reason(ValueError("x" * 10_000))) == 500
