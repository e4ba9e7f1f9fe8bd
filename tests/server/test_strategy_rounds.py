"""AdapterStrategy across restarts and slow devices: round numbers after a resume, silent nodes named."""

import json

from flwr.app import Error, Message, RecordDict

from server.strategy import AdapterStrategy
from tests.server.messages import metadata
from tests.server.test_strategy import _honest, _reply, _strategy


def _sent(node: int) -> Message:
    """A message the coordinator sent to ``node`` (its id is what the Grid sets when it pushes it)."""
    meta = metadata(node, message_id=f"q{node}", src_node_id=1, dst_node_id=node, reply_to_message_id="")
    return Message(metadata=meta, content=RecordDict())


def _unavailable(node: int) -> Message:
    """The SuperLink's own error reply for a node that stopped heartbeating: it names the SuperLink as sender."""
    meta = metadata(node, message_id="", src_node_id=1, dst_node_id=1)
    return Message(metadata=meta, error=Error(code=3, reason="Node Unavailable"))


def _round(tmp_path, n):
    rounds = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    return next(r for r in rounds if r["round"] == n)


def test_a_node_that_never_replies_is_recorded_as_timed_out(tmp_path):
    strategy: AdapterStrategy = _strategy(tmp_path)
    strategy.roster.sending([_sent(n) for n in (2, 3, 4)])
    arrays, _ = strategy.aggregate_train(1, [_reply(2, _honest(seed=2)), _reply(3, _honest(seed=3))])
    assert arrays is not None
    clients = _round(tmp_path, 1)["clients"]
    assert clients["4"] == {"node_id": 4, "name": "node-4", "timed_out": "train"}  # keyed by node id
    assert "timed_out" not in clients["2"] and "timed_out" not in clients["3"]
    assert (clients["2"]["name"], clients["3"]["name"]) == ("client-2", "client-3")


def test_an_unavailable_error_reply_counts_for_its_node_not_as_silence(tmp_path):
    strategy: AdapterStrategy = _strategy(tmp_path)
    strategy.roster.sending([_sent(n) for n in (2, 3, 4)])
    _, metrics = strategy.aggregate_train(1, [_reply(2, _honest(seed=2)), _reply(3, _honest(seed=3)), _unavailable(4)])
    assert metrics["failed-replies"] == 1
    assert "4" not in _round(tmp_path, 1)["clients"]


def test_a_resumed_strategy_numbers_rounds_after_the_last_signed_one(tmp_path):
    strategy: AdapterStrategy = _strategy(tmp_path)
    strategy.round_offset = 2  # rounds 1 and 2 were signed before the restart
    strategy.aggregate_train(1, [_reply(n, _honest(seed=n)) for n in (2, 3)])  # Flower's first round of this start
    assert (tmp_path / "releases" / "round-0003").is_dir()
    assert strategy.registry.latest[1].round == 3
    assert "clients" in _round(tmp_path, 3)
