"""AdapterStrategy under client-level DP, on real Flower reply messages: clipping, uniform weights, noise, epsilon."""

import json

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord

from server.privacy.rounds import DpRounds
from server.registry import Registry
from server.report import RoundLog, clients_by_name
from server.strategy import AdapterStrategy
from shared.adapter import ADAPTER_WEIGHTS
from shared.clipping import clip, update_norm
from shared.config import AggregationConfig, DpConfig, LoraConfig
from shared.release import load_tensors
from shared.sign import generate_key
from shared.wire import pack, wire_bytes
from tests.server.messages import message
from tests.server.test_strategy import BASE, GLOBAL  # the same small adapter

TINY_Z = 1e-6  # noise std z C / m far below fp16's rounding: the aggregate's arithmetic is visible (its epsilon: inf)


def _strategy(tmp_path, method="fedavg", population=5, fraction=1.0, **dp) -> AdapterStrategy:
    generate_key(tmp_path / "server.key")
    registry = Registry(tmp_path / "releases", tmp_path / "server.key", "run-1", BASE, method, b"{}")
    config = DpConfig(**{"noise_multiplier": 1.0, "clip_norm": 1.0, **dp})
    if "noise_multiplier" not in dp:  # below what a run config may ask (MIN_NOISE_MULTIPLIER): set past the check
        object.__setattr__(config, "noise_multiplier", TINY_Z)
    rounds = DpRounds(config, fraction, 3)
    rounds.start(population, [])
    strategy = AdapterStrategy(
        RoundLog(tmp_path / "rounds.json", {}),
        2,
        AggregationConfig(method=method),
        LoraConfig(rank=4),
        registry,
        dp=rounds,
    )
    record = strategy.initial_arrays(GLOBAL)
    strategy._global = _tensors(record)
    strategy.bytes_down = wire_bytes(record)
    return strategy


def _tensors(arrays):
    return load_tensors(arrays[ADAPTER_WEIGHTS].numpy().tobytes())


def _delta(scale, seed, keys=None):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(GLOBAL[k].shape, generator=g) * scale for k in keys or GLOBAL}


def _reply(node, delta, examples=100, metrics=None):
    values = {"num-examples": examples, "train-loss": 1.0, "train-seconds": 2.0, **(metrics or {})}
    records = {"arrays": pack(delta), "metrics": MetricRecord(values), "client": ConfigRecord({"name": f"c{node}"})}
    return message(records, node)


def _fp16(delta):
    return {k: v.half().float() for k, v in delta.items()}


def _distance(step, total, m):
    return update_norm({k: step[k] - total[k] / m for k in step})


def _round(tmp_path, n=1):
    return next(r for r in json.loads((tmp_path / "rounds.json").read_text())["rounds"] if r["round"] == n)


def test_every_contribution_is_clipped_weights_are_uniform_and_the_mean_has_a_fixed_denominator(tmp_path):
    strategy = _strategy(tmp_path, population=5)
    deltas = {n: _delta(scale, n) for n, scale in ((1, 0.001), (2, 0.5), (3, 0.5), (4, 50.0))}  # norms ~0.05 .. 2000
    replies = [_reply(n, d, examples=10 if n == 4 else 1000) for n, d in deltas.items()]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["rejected-updates"] == 0  # no norm-outlier rule: clipping bounds each
    got, start = _tensors(arrays), strategy._global
    clipped = [clip(_fp16(d), 1.0)[0] for d in deltas.values()]
    assert all(update_norm(c) <= 1.0 for c in clipped)
    step = {k: got[k] - start[k] for k in GLOBAL}  # the release is fp16: compare whole steps, not entries
    total = {k: sum(c[k] for c in clipped) for k in GLOBAL}
    # global + sum / m, with m = 5 expected devices though 4 replied, and no example weights
    assert _distance(step, total, 5) < 0.01 * update_norm(step)
    assert _distance(step, total, 4) > 0.1 * update_norm(step)  # not the mean over those who replied
    rec = _round(tmp_path)
    assert rec["privacy"]["clipped_fraction"] == 0.75 and rec["privacy"]["epsilon"] > 0
    assert metrics["dp-epsilon"] == rec["privacy"]["epsilon"]
    clients = clients_by_name(rec)
    assert [clients[f"c{n}"]["clipped"] for n in (1, 2, 3, 4)] == [False, True, True, True]
    assert clients["c4"]["update_norm"] == pytest.approx(update_norm(_fp16(deltas[4])), rel=1e-4)


def test_under_ffa_only_the_b_factors_are_noised_and_a_stays_frozen(tmp_path):
    strategy = _strategy(tmp_path, method="ffa", noise_multiplier=2.0)
    b_keys = [k for k in GLOBAL if "lora_B" in k]
    arrays, _ = strategy.aggregate_train(1, [_reply(n, _delta(0.01, n, b_keys)) for n in range(1, 4)])
    got = _tensors(arrays)
    assert all(torch.equal(got[k], strategy._global[k]) for k in GLOBAL if "lora_A" in k)
    noise = torch.cat([(got[k] - strategy._global[k]).flatten() for k in b_keys])
    assert float(noise.std()) == pytest.approx(2.0 * 1.0 / 5, rel=0.15)  # z C / m = 0.4 over 1024 entries


def test_under_client_clipping_a_delta_above_the_bound_is_rejected_and_the_clipped_flag_is_reported(tmp_path):
    strategy = _strategy(tmp_path, clipping="client")
    fits = [clip(_delta(1.0, n), 0.99)[0] for n in (1, 2, 3)]
    replies = [_reply(n, d, metrics={"dp-clipped": int(n != 3)}) for n, d in zip((1, 2, 3), fits, strict=True)]
    replies.append(_reply(9, _delta(1.0, 9)))  # a device that did not clip: norm ~32
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["rejected-updates"] == 1
    rec = _round(tmp_path)
    assert "is above dp.clip-norm 1" in clients_by_name(rec)["c9"]["rejected"]
    assert rec["privacy"]["clipped_fraction"] == pytest.approx(2 / 3)
    assert rec["privacy"]["clipping"] == "client"


def test_every_round_releases_and_spends_epsilon_whatever_the_number_of_updates(tmp_path):
    """A DP round below min-accepted used to release nothing and spend nothing: whether a round released said
    whether a device took part (a count the noise does not cover), and that was never charged."""
    strategy = _strategy(tmp_path)
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, _delta(0.1, 1))])  # min-accepted is 2
    assert arrays is not None and metrics["dp-epsilon"] > 0 and strategy.dp.budget.rounds == 1
    arrays, metrics = strategy.aggregate_train(2, [])  # nobody answered: the noise alone, and the round counted
    assert arrays is not None and strategy.dp.budget.rounds == 2
    rounds = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds if "privacy" in r] == [1, 2]
