"""Devices of ranks {2, 4, 8} in one round: the coordinator pads each delta and aggregates exactly (issue 19).

The hand-computed case: one module small enough (d_out = 8 = r) that the sum of products always
has rank <= r, so ``exact``'s SVD re-factoring loses nothing and the product of the signed
release must equal, entry for entry, the weighted mean of what each device's own factors make:

    s B' A' = sum_i w_i s (B + pad dB_i)(A + pad dA_i) / sum_i w_i
            = s B A + sum_i w_i s [(B[:, :r_i] + dB_i)(A[:r_i] + dA_i) - B[:, :r_i] A[:r_i]] / sum_i w_i.
"""

import json

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord

from server.registry import Registry
from server.report import RoundLog
from server.strategy import AdapterStrategy
from shared.config import AggregationConfig, LoraConfig
from shared.sign import generate_key
from shared.wire import pack, wire_bytes
from tests.server.messages import message
from tests.server.test_strategy import BASE, _tensors

RANK, ALPHA = 8, 16
S = ALPHA / RANK
A, B = "m.lora_A.weight", "m.lora_B.weight"
torch.manual_seed(3)
GLOBAL = {A: (torch.randn(RANK, 12) * 0.3).half().float(), B: (torch.randn(8, RANK) * 0.3).half().float()}


def _strategy(tmp_path, method="exact") -> AdapterStrategy:
    generate_key(tmp_path / "server.key")
    registry = Registry(tmp_path / "releases", tmp_path / "server.key", "run-1", BASE, method, b"{}")
    strategy = AdapterStrategy(
        RoundLog(tmp_path / "rounds.json", {}),
        2,
        AggregationConfig(method=method, max_norm_ratio=100.0),
        LoraConfig(rank=RANK, alpha=ALPHA),
        registry,
    )
    record = strategy.initial_arrays(GLOBAL)
    strategy._global = _tensors(record)
    strategy.bytes_down = wire_bytes(record)
    return strategy


def _delta(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = {A: torch.randn(rank, 12, generator=g) * 0.05, B: torch.randn(8, rank, generator=g) * 0.05}
    return {k: v.half().float() for k, v in d.items()}  # as the fp16 wire carries it


def _reply(node: int, delta, examples: int, rank: int | None):
    metrics = {"num-examples": examples, "train-loss": 1.0, "train-seconds": 2.0}
    if rank is not None:
        metrics["lora-rank"] = rank
    records = {"arrays": pack(delta), "metrics": MetricRecord(metrics), "client": ConfigRecord({"name": f"c{node}"})}
    return message(records, node)


def test_mixed_ranks_aggregate_exactly_to_the_hand_computed_product(tmp_path):
    strategy = _strategy(tmp_path)
    devices = [(1, 2, 100), (2, 4, 200), (3, 8, 300)]  # node, rank, examples
    deltas = {node: _delta(rank, node) for node, rank, _ in devices}
    replies = [_reply(n, deltas[n], w, r if r < RANK else None) for n, r, w in devices]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["rejected-updates"] == 0
    new = _tensors(arrays)
    a, b = GLOBAL[A], GLOBAL[B]
    change = torch.zeros(8, 12)
    for node, rank, weight in devices:
        a0, b0 = a[:rank], b[:, :rank]
        change += weight * S * ((b0 + deltas[node][B]) @ (a0 + deltas[node][A]) - b0 @ a0)
    by_hand = S * b @ a + change / sum(w for *_, w in devices)
    got = S * new[B] @ new[A]
    assert (got - by_hand).abs().max() <= 2e-3 * by_hand.abs().max()  # the release is fp16
    ranks = {
        c["name"]: c.get("lora_rank")
        for c in json.loads((tmp_path / "rounds.json").read_text())["rounds"][-1]["clients"].values()
    }
    assert ranks == {"c1": 2, "c2": 4, "c3": None}  # the round log says who trained below the run's rank


def test_a_low_rank_device_that_leaves_components_untouched_leaves_them_as_they_were(tmp_path):
    """fedavg of factors: a rank-2 device votes 'no change' on the components it did not train."""
    strategy = _strategy(tmp_path, "fedavg")
    low = _delta(2, 1)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, low, 100, 2), _reply(2, _delta(2, 2), 100, 2)])
    new = _tensors(arrays)
    torch.testing.assert_close(new[A][2:], GLOBAL[A][2:], atol=1e-3, rtol=0)  # fp16 release
    torch.testing.assert_close(new[B][:, 2:], GLOBAL[B][:, 2:], atol=1e-3, rtol=0)
    assert not torch.allclose(new[A][:2], GLOBAL[A][:2], atol=1e-3)


@pytest.mark.parametrize(
    ("sent_rank", "said", "reason"),
    [
        (4, 2, "arrived as float16 ("),  # says 2, sends rank-4 factors: the first key that does not fit
        (2, 9, "above the run's lora.rank 8"),
        (2, 0, "outside [1, "),
        (8, 8, None),  # saying the run's own rank is fine
    ],
)
def test_a_rank_that_does_not_match_the_upload_or_the_run_is_rejected(tmp_path, sent_rank, said, reason):
    strategy = _strategy(tmp_path)
    replies = [_reply(1, _delta(sent_rank, 1), 100, said), _reply(2, _delta(8, 2), 100, None)]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["rejected-updates"] == (0 if reason is None else 1)
    if reason is not None:
        clients = json.loads((tmp_path / "rounds.json").read_text())["rounds"][-1]["clients"]
        why = next(c for c in clients.values() if c["name"] == "c1")["rejected"]
        assert reason in why, why
