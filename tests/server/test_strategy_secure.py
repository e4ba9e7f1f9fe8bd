"""AdapterStrategy with aggregation.secure: the round's global from the SecAgg+ sum, through Flower's InMemoryGrid."""

import json
import time

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.secaggplus_constants import Stage

from server.privacy.rounds import DpRounds
from server.registry import Registry
from server.report import RoundLog
from server.secagg.params import SecAggParams
from server.secure_rounds import SecureRounds
from server.strategy import AdapterStrategy
from shared.adapter import ADAPTER_WEIGHTS
from shared.config import AggregationConfig, DpConfig, LoraConfig
from shared.release import load_tensors
from shared.sign import generate_key
from tests.server.secagg.fleet import Fleet

torch.manual_seed(0)
GLOBAL = {
    f"l0.{n}.lora_{f}.weight": torch.randn(*s) * 0.1 for n in ("q", "v") for f, s in (("A", (4, 64)), ("B", (64, 4)))
}
B_KEYS = sorted(k for k in GLOBAL if "lora_B" in k)
PARAMS = SecAggParams(num_shares=5, threshold=3, clip_range=0.05, max_devices=100, timeout=60.0)


def _strategy(tmp_path, dp=None):
    generate_key(tmp_path / "server.key")
    registry = Registry(tmp_path / "releases", tmp_path / "server.key", "run-1", "b" * 64, "ffa", b"{}")
    agg = AggregationConfig(method="ffa", secure=True, secure_clip_range=0.05)
    strategy = AdapterStrategy(
        RoundLog(tmp_path / "rounds.json", {}), 2, agg, LoraConfig(rank=4), registry, dp=dp, secure=SecureRounds(PARAMS)
    )
    return strategy, strategy.initial_arrays(GLOBAL)


def _deltas(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 0.005, GLOBAL[k].shape).astype(np.float32) for k in B_KEYS} for _ in range(n)]


def _round(tmp_path, strategy, arrays, fleet):
    assert list(strategy.configure_train(1, arrays, ConfigRecord(), fleet.grid)) == []  # the protocol sent its own
    published, metrics = strategy.aggregate_train(1, [])
    rounds = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    return published, metrics, next((r for r in rounds if r["round"] == 1), {})


def _step(strategy, published):
    got = load_tensors(published[ADAPTER_WEIGHTS].numpy().tobytes())
    return {k: got[k] - strategy.global_adapter[k] for k in GLOBAL}


def _assert_mean(step, ds):
    """The step is the uniform mean of ``ds``, within the fp16 release's rounding (~1.5% of it here)."""
    mean = {k: torch.from_numpy(np.mean([d[k] for d in ds], axis=0)) for k in B_KEYS}
    err = torch.cat([(step[k] - mean[k]).flatten() for k in B_KEYS]).norm()
    size = torch.cat([mean[k].flatten() for k in B_KEYS]).norm()
    assert err < 0.05 * size
    other = {k: torch.from_numpy(np.mean([d[k] for d in ds[1:]], axis=0)) for k in B_KEYS}  # one device fewer
    assert torch.cat([(step[k] - other[k]).flatten() for k in B_KEYS]).norm() > 0.1 * size


def test_the_secure_global_is_the_uniform_mean_of_the_five_deltas(tmp_path):
    strategy, arrays = _strategy(tmp_path)
    ds = _deltas(5)
    with Fleet(ds) as fleet:
        published, metrics, rec = _round(tmp_path, strategy, arrays, fleet)
    step = _step(strategy, published)
    _assert_mean(step, ds)
    assert all(torch.equal(step[k], torch.zeros_like(step[k])) for k in GLOBAL if "lora_A" in k)  # FFA: A frozen
    assert metrics["secure-survivors"] == 5 and rec["secure"] == {
        "survivors": 5, "recovered": 0, "dropped": 0, "enrolled": 0, "shares": 5, "threshold": 3, "clip_range": 0.05
    }  # fmt: skip
    assert all(c["secure"] and "update_norm" not in c for c in rec["clients"].values())  # no delta to measure


def test_a_device_dropping_mid_protocol_leaves_the_mean_of_the_four_survivors(tmp_path):
    strategy, arrays = _strategy(tmp_path)
    ds = _deltas(5, seed=1)
    with Fleet(ds, drop={3: Stage.COLLECT_MASKED_VECTORS}) as fleet:
        published, metrics, rec = _round(tmp_path, strategy, arrays, fleet)
    step = _step(strategy, published)
    _assert_mean(step, [d for i, d in enumerate(ds) if i != 3])
    assert rec["secure"]["survivors"] == 4 and rec["secure"]["recovered"] == 1
    assert metrics["failed-replies"] == 1


def test_below_the_threshold_the_round_fails_cleanly_and_the_global_stays(tmp_path):
    strategy, arrays = _strategy(tmp_path)
    with Fleet(_deltas(5), drop={i: Stage.COLLECT_MASKED_VECTORS for i in (0, 1, 2)}) as fleet:
        published, metrics, rec = _round(tmp_path, strategy, arrays, fleet)
    assert published is None and metrics["failed-replies"] == 5
    assert strategy.registry.latest[1].round == 0 and "release" not in rec  # nothing signed this round


def test_with_dp_the_coordinator_noises_the_unmasked_sum_and_spends_epsilon(tmp_path):
    rounds = DpRounds(DpConfig(noise_multiplier=1.0, clip_norm=0.05, clipping="client"), 1.0, 3)
    rounds.start(5, [])
    strategy, arrays = _strategy(tmp_path, dp=rounds)
    with Fleet(_deltas(5)) as fleet:
        published, metrics, rec = _round(tmp_path, strategy, arrays, fleet)
    noise = torch.cat([_step(strategy, published)[k].flatten() for k in B_KEYS])
    assert 0.008 < float(noise.std()) < 0.013  # z C / m = 0.01 of noise on a mean whose entries are ~0.002
    assert rec["privacy"]["epsilon"] > 0 and metrics["dp-epsilon"] == rec["privacy"]["epsilon"]


def test_a_rounds_clock_starts_when_its_messages_go_out_not_at_the_first_reply(tmp_path):
    """The round's seconds include the protocol and the devices' training (the dashboard's and the bench's)."""
    strategy, arrays = _strategy(tmp_path)
    with Fleet(_deltas(5)) as fleet:
        before = time.time()
        list(strategy.configure_train(1, arrays, ConfigRecord(), fleet.grid))  # the five exchanges, training included
        sent = time.time()
        strategy.aggregate_train(1, [])
    rec = next(r for r in json.loads((tmp_path / "rounds.json").read_text())["rounds"] if r["round"] == 1)
    assert before <= rec["started"] <= sent
