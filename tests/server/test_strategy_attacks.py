"""One hostile device against the real strategy, state store and registry: it is rejected, the round goes on.

Every reply goes through Flower's own protobuf encoding first (``through_flower``), as it would
between a device and the coordinator. Each test is one attack the hardening issue reproduced.
"""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from server.registry import Registry
from server.report import RoundLog, clients_by_name
from server.state import StateStore
from server.strategy import AdapterStrategy
from shared.config import AggregationConfig, LoraConfig
from shared.sign import generate_key
from tests.server.messages import message, through_flower
from tests.server.test_strategy import BASE, GLOBAL, _honest, _reply, _tensors


def _strategy(tmp_path, store: StateStore | None = None, **agg) -> AdapterStrategy:
    generate_key(tmp_path / "server.key")
    registry = Registry(
        tmp_path / "releases", tmp_path / "server.key", "run-1", BASE, agg.get("method", "fedavg"), b"{}"
    )
    run = {"run_id": "run-1", "method": agg.get("method", "fedavg")}
    strategy = AdapterStrategy(
        RoundLog(tmp_path / "rounds.json", run, store=store),
        2,
        AggregationConfig(**{"method": "fedavg", **agg}),
        LoraConfig(rank=4, alpha=8),
        registry,
    )
    record = strategy.initial_arrays(GLOBAL)
    strategy._global = _tensors(record)
    return strategy


def _hostile(node, metrics=None, delta=None, name=None):
    msg = _reply(node, delta if delta is not None else _honest(seed=node))
    if metrics is not None:
        msg.content["metrics"] = MetricRecord(metrics)
    if name is not None:
        msg.content["client"] = ConfigRecord({"name": name})
    return through_flower(msg)


def _mean_of(nodes):
    return {k: GLOBAL[k] + sum(_honest(seed=n)[k] for n in nodes) / len(nodes) for k in GLOBAL}


def _close(got, want, atol=2e-3):
    return all(torch.allclose(got[k], want[k], atol=atol) for k in GLOBAL)


def _round(tmp_path, n=1):
    rounds = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    return next(r for r in rounds if r["round"] == n)


HONEST = {"num-examples": 100, "train-loss": 1.0, "train-seconds": 2.0}


@pytest.mark.parametrize("count", [math.inf, 1e30, 2**63, 2**64 - 1, -5, 0.5])
def test_an_impossible_example_count_is_rejected_and_the_store_keeps_working(tmp_path, count):
    store = StateStore(tmp_path / "state.sqlite")
    strategy = _strategy(tmp_path, store)
    replies = [through_flower(_reply(n, _honest(seed=n))) for n in (1, 2, 3)]
    replies.append(_hostile(9, {**HONEST, "num-examples": count}))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["rejected-updates"] == 1
    assert _close(_tensors(arrays), _mean_of((1, 2, 3)))
    assert "num-examples" in _round(tmp_path)["clients"]["9"]["rejected"]
    with store.read() as conn:  # the rejection and the three accepted rows were committed
        assert conn.exec_driver_sql("select count(*) from client_results").scalar() == 4


def test_a_huge_but_allowed_example_count_cannot_make_the_aggregate_its_own(tmp_path):
    strategy = _strategy(tmp_path, max_examples=10**9)
    attacker = {k: v * 3 for k, v in _honest(seed=9).items()}  # an ordinary-sized delta, pointing its own way
    replies = [_hostile(n) for n in (1, 2, 3)] + [_hostile(9, {**HONEST, "num-examples": 10**9}, attacker)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["rejected-updates"] == 1
    assert "more than 5x the median" in _round(tmp_path)["clients"]["9"]["rejected"]
    assert _close(_tensors(arrays), _mean_of((1, 2, 3)))


@pytest.mark.parametrize("method", ["fedavg", "ties"])
def test_with_two_updates_a_runaway_delta_is_not_signed(tmp_path, method):
    strategy = _strategy(tmp_path, method=method)
    runaway = {k: torch.full_like(v, 3e4) for k, v in GLOBAL.items()}
    arrays, metrics = strategy.aggregate_train(1, [_hostile(1), _hostile(9, delta=runaway)])
    assert arrays is None and metrics["rejected-updates"] == 1  # one left, below min-accepted: nothing signed
    assert not (tmp_path / "releases" / "round-0001").exists()
    arrays, _ = strategy.aggregate_train(2, [_hostile(n) for n in (1, 2, 3)])  # honest round: no crash in the SVD
    assert arrays is not None and all(torch.isfinite(t).all() for t in _tensors(arrays).values())


def test_an_aggregate_out_of_range_is_refused_before_signing(tmp_path):
    strategy = _strategy(tmp_path, method="ties", max_norm_ratio=1e12)  # the outlier rule cannot see it
    big = {k: torch.full_like(v, 1e4) for k, v in GLOBAL.items()}  # finite in fp16; re-factored, ~3e4
    arrays, _ = strategy.aggregate_train(1, [_hostile(1, delta=big), _hostile(2, delta=big)])
    assert arrays is None
    assert not (tmp_path / "releases" / "round-0001").exists()
    assert strategy.registry.latest[1].round == 0  # devices keep release 0


def test_a_non_finite_loss_is_rejected_never_stored(tmp_path):
    store = StateStore(tmp_path / "state.sqlite")
    strategy = _strategy(tmp_path, store)
    replies = [_hostile(n) for n in (1, 2)] + [_hostile(9, {**HONEST, "train-loss": math.inf})]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    with store.read() as conn:
        losses = [r[0] for r in conn.exec_driver_sql("select train_loss from client_results")]
    assert all(v is None or math.isfinite(v) for v in losses) and len(losses) == 3


def test_a_device_claiming_another_devices_name_gets_its_own_row(tmp_path):
    store = StateStore(tmp_path / "state.sqlite")
    strategy = _strategy(tmp_path, store)
    replies = [_hostile(1, name="noun.food"), _hostile(2, name="verb.motion"), _hostile(9, name="noun.food")]
    strategy.aggregate_train(1, replies)
    clients = _round(tmp_path)["clients"]
    assert set(clients) == {"1", "2", "9"}  # keyed by the node id the SuperLink authenticated
    assert clients["1"]["name"] == clients["9"]["name"] == "noun.food"
    assert clients["1"]["num_examples"] == 100 and "train_loss" in clients["9"]
    with store.read() as conn:
        assert conn.exec_driver_sql("select count(*) from client_results").scalar() == 3


@pytest.mark.parametrize(
    "content",
    [
        lambda r: r.content.__delitem__("metrics"),  # no metrics at all
        lambda r: r.content.__setitem__("metrics", MetricRecord({**HONEST, "extra": [1.0, 2.0]})),
        lambda r: r.content.__delitem__("client"),
        lambda r: r.content.__setitem__("arrays", ArrayRecord()),
    ],
)
def test_a_malformed_reply_is_a_rejection_not_a_crash(tmp_path, content):
    strategy = _strategy(tmp_path)
    bad = _reply(9, _honest(seed=9))
    content(bad)
    arrays, metrics = strategy.aggregate_train(1, [_hostile(1), _hostile(2), through_flower(bad)])
    assert arrays is not None and metrics["rejected-updates"] == 1
    assert _close(_tensors(arrays), _mean_of((1, 2)))


def test_an_evaluate_reply_without_its_loss_is_a_rejection_not_a_crash(tmp_path):
    strategy = _strategy(tmp_path)

    def evaluated(node, metrics):
        records = {"metrics": MetricRecord(metrics), "client": ConfigRecord({"name": f"c{node}"})}
        return through_flower(message(records, node))

    replies = [evaluated(1, {"num-examples": 64, "heldout-loss": 2.0}), evaluated(2, {"num-examples": 64})]
    metrics = strategy.aggregate_evaluate(0, replies)
    assert metrics["heldout-loss"] == 2.0
    clients = clients_by_name(_round(tmp_path, 0))
    assert "lack 'heldout-loss'" in clients["c2"]["evaluation_rejected"]
    assert _round(tmp_path, 0)["mean_heldout_loss"] == 2.0
