"""A coordinator restarted on a run takes each round's release and the privacy it spent from the verified chain.

Never from the old round log alone: ``rounds.json`` is a file a crash can empty and a hand can
edit (``server_app._resume``, ``server.resume.carried_rounds``, ``DpRounds.start``).
"""

import json

import pytest
import torch
from flwr.app import MetricRecord

from server.privacy.rounds import DpRounds
from server.registry import Registry
from server.report import RoundLog
from server.resume import carried_rounds
from server.server_app import _resume
from server.state import StateStore
from server.strategy import AdapterStrategy
from shared.config import AggregationConfig, ConfigError, DpConfig, LoraConfig
from shared.sign import generate_key

BASE, RUN, ROUNDS = "b" * 64, "run-dp", 10
STATE = {"l.lora_A.weight": torch.zeros(2, 4), "l.lora_B.weight": torch.zeros(4, 2)}


class Coordinator:
    """The pieces ``server_app.main`` builds for a run, on the folders of ``tmp_path``."""

    def __init__(self, tmp_path):
        self.key, self.log_path = tmp_path / "server.key", tmp_path / "out" / "rounds.json"
        if not self.key.exists():
            generate_key(self.key)
        self.registry = Registry(tmp_path / "store" / "adapter" / RUN, self.key, RUN, BASE, "fedavg", b"{}")
        self.state = StateStore(tmp_path / "state.sqlite")
        self.logged = carried_rounds(self.log_path)
        self.log = RoundLog(self.log_path, {"run_id": RUN, "method": "fedavg", "rounds": ROUNDS}, store=self.state)
        self.dp = DpRounds(DpConfig(noise_multiplier=1.0, clip_norm=1.0, population=100), 0.1, ROUNDS)
        agg, lora = AggregationConfig(), LoraConfig(rank=2)
        self.strategy = AdapterStrategy(self.log, 2, agg, lora, self.registry, dp=self.dp)

    def close(self):
        self.registry.close()
        self.state.close()


def _three_dp_rounds(tmp_path):
    """Sign release 0 and rounds 1-3 under DP, as the coordinator records them; return the manifests and epsilon."""
    first = Coordinator(tmp_path)
    first.dp.start(100, [])
    manifests = {}
    for n in range(4):
        _, manifests[n] = first.registry.publish(n, STATE)
        first.strategy.record_release(n, manifests[n])
        if n:
            first.strategy.spend_privacy(n, 0.0, MetricRecord({}))
    epsilon = first.dp.budget.epsilon
    first.close()
    return manifests, epsilon


def test_a_dp_run_resumes_with_the_epsilon_it_spent_and_refuses_if_its_round_log_lost_the_record(tmp_path):
    _, epsilon = _three_dp_rounds(tmp_path)
    again = Coordinator(tmp_path)
    _, released = _resume(again.registry, again.strategy, again.log, again.state, again.logged, again.key)
    assert released == [1, 2, 3]
    budget = again.dp.start(100, again.log.data["rounds"], released)
    assert budget.rounds == 3 and budget.epsilon == pytest.approx(epsilon)
    again.close()
    again.log_path.write_bytes(b"")  # what a crash or a hand can leave; it counted no round spent before
    lost = Coordinator(tmp_path)
    _, released = _resume(lost.registry, lost.strategy, lost.log, lost.state, lost.logged, lost.key)
    with pytest.raises(ConfigError, match=r"rounds \[1, 2, 3\] were released .* privacy loss is unknown"):
        lost.dp.start(100, lost.log.data["rounds"], released)
    lost.close()


def test_a_release_written_into_the_old_round_log_never_reaches_the_state_store(tmp_path):
    manifests, _ = _three_dp_rounds(tmp_path)
    data = json.loads((tmp_path / "out" / "rounds.json").read_text())
    for rec in data["rounds"]:
        if rec["round"] == 2:
            rec["release"] = "x"  # crashed the resume (str has no .get) until the file was edited by hand
        if rec["round"] == 3:
            rec["release"] = {"manifest": "f" * 64, "key_id": "forged", "path": "/etc"}
            rec["clients"] = {"1": "not an entry", "2": {"node_id": 2, "name": "kept"}}
    (tmp_path / "out" / "rounds.json").write_text(json.dumps(data))
    again = Coordinator(tmp_path)
    _resume(again.registry, again.strategy, again.log, again.state, again.logged, again.key)  # writes round 3's row
    signed = again.state.last_signed_round(RUN)
    assert signed is not None and (signed.round, signed.manifest_digest) == (3, manifests[3].digest())
    releases = {r["round"]: r["release"]["manifest"] for r in again.log.data["rounds"]}
    assert releases == {n: m.digest() for n, m in manifests.items()}
    assert list(again.log.round(3)["clients"]) == ["2"]
    again.close()
