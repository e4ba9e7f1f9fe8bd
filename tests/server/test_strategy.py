"""AdapterStrategy.aggregate_train on real Flower reply messages: validation rules and metrics."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from server.registry import Registry
from server.report import RoundLog, clients_by_name
from server.strategy import AdapterStrategy
from shared.adapter import ADAPTER_WEIGHTS
from shared.config import AggregationConfig, LoraConfig
from shared.release import load_tensors, read_release, verify_release
from shared.sign import TrustList, generate_key
from shared.wire import pack, wire_bytes
from tests.server.messages import message

BASE = "b" * 64
torch.manual_seed(0)
GLOBAL = {
    f"l{i}.{n}.lora_{f}.weight": torch.randn(*shape) * 0.1
    for i in range(2)
    for n in ("q", "v")
    for f, shape in (("A", (4, 64)), ("B", (64, 4)))
}


def _reply(node: int, delta, encoding="fp16", examples=100, record=None) -> Message:
    records = {
        "arrays": record if record is not None else pack(delta, encoding),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "train-seconds": 2.0}),
        "client": ConfigRecord({"name": f"client-{node}"}),
    }
    return message(records, node)


def _honest(scale=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in GLOBAL.items()}


def _strategy(tmp_path, **agg) -> AdapterStrategy:
    generate_key(tmp_path / "server.key")
    registry = Registry(tmp_path / "releases", tmp_path / "server.key", "run-1", BASE, "fedavg", b"{}")
    strategy = AdapterStrategy(
        RoundLog(tmp_path / "rounds.json", {}),
        2,
        AggregationConfig(**{"method": "fedavg", **agg}),
        LoraConfig(rank=4),
        registry,
    )
    record = strategy.initial_arrays(GLOBAL)  # signed release 0
    strategy._global = _tensors(record)  # what configure_train sets from the release it sends
    strategy.bytes_down = wire_bytes(record)
    return strategy


def _tensors(arrays):
    return load_tensors(arrays[ADAPTER_WEIGHTS].numpy().tobytes())


def _clients(tmp_path):
    rounds = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    return clients_by_name(next(r for r in rounds if r["round"] == 1))


def test_a_norm_outlier_is_rejected_and_the_round_goes_on(tmp_path):
    strategy = _strategy(tmp_path)
    replies = [_reply(n, _honest(seed=n)) for n in range(1, 5)] + [_reply(9, _honest(scale=1.0, seed=9))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert metrics["rejected-updates"] == 1 and metrics["failed-replies"] == 0
    assert metrics["bytes-up"] == sum(wire_bytes(r.content["arrays"]) for r in replies[:4])
    assert metrics["bytes-down"] == 5 * strategy.bytes_down
    clients = _clients(tmp_path)
    assert "more than 5x the median" in clients["client-9"]["rejected"]
    assert all("rejected" not in clients[f"client-{n}"] for n in range(1, 5))
    # the outlier had no say: the result is the mean of the four honest updates
    mean = {k: GLOBAL[k] + sum(_honest(seed=n)[k] for n in range(1, 5)) / 4 for k in GLOBAL}
    got = _tensors(arrays)
    assert all(torch.allclose(got[k], mean[k], atol=2e-3) for k in GLOBAL)


def test_an_oversized_update_is_rejected_before_decoding(tmp_path):
    strategy = _strategy(tmp_path)
    padded = {k: arr for k, arr in pack(_honest()).items()}
    key = next(iter(padded))
    padded[key] = Array(np.zeros(1_000_000, np.float16))
    replies = [_reply(n, _honest(seed=n)) for n in range(1, 3)] + [_reply(7, None, record=ArrayRecord(padded))]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["rejected-updates"] == 1
    assert "more than the" in _clients(tmp_path)["client-7"]["rejected"]


def test_a_wrong_dtype_or_non_finite_update_is_rejected_with_its_reason(tmp_path):
    strategy = _strategy(tmp_path)
    bad = _honest()
    bad[next(iter(bad))][0, 0] = float("nan")
    as_int16 = ArrayRecord({k: Array(v.half().numpy().view(np.int16)) for k, v in _honest().items()})  # same size
    replies = [_reply(1, _honest(seed=1)), _reply(2, _honest(seed=2)), _reply(3, bad), _reply(4, None, record=as_int16)]
    _, metrics = strategy.aggregate_train(1, replies)
    clients = _clients(tmp_path)
    assert metrics["rejected-updates"] == 2
    assert "non-finite" in clients["client-3"]["rejected"]
    assert "arrived as int16" in clients["client-4"]["rejected"]


def test_too_few_accepted_updates_keep_the_global_adapter(tmp_path):
    strategy = _strategy(tmp_path, min_accepted=2)
    bad = _honest()
    bad[next(iter(bad))][0, 0] = float("inf")
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, _honest()), _reply(2, bad)])
    assert arrays is None  # Flower keeps the previous global adapter
    assert metrics["rejected-updates"] == 1


@pytest.mark.parametrize("encoding", ["q8", "q4"])
def test_quantized_deltas_aggregate_close_to_fp16(tmp_path, encoding):
    deltas = [_honest(seed=n) for n in range(1, 4)]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    fp16, fp16_metrics = _strategy(tmp_path / "a").aggregate_train(1, [_reply(n, d) for n, d in enumerate(deltas, 1)])
    replies = [_reply(n, d, encoding) for n, d in enumerate(deltas, 1)]
    quant, metrics = _strategy(tmp_path / "b", delta_encoding=encoding).aggregate_train(1, replies)
    err = max((_tensors(quant)[k] - _tensors(fp16)[k]).abs().max().item() for k in GLOBAL)
    assert metrics["rejected-updates"] == 0
    assert err < (0.01 * 4 / 127 if encoding == "q8" else 0.01 * 4 / 7)  # half a step of a 4-sigma block max
    assert metrics["bytes-up"] == sum(wire_bytes(r.content["arrays"]) for r in replies) < fp16_metrics["bytes-up"]


def test_an_update_in_another_encoding_than_configured_is_rejected(tmp_path):
    strategy = _strategy(tmp_path, delta_encoding="q8")
    _, metrics = strategy.aggregate_train(1, [_reply(n, _honest(seed=n), "q4") for n in range(1, 4)])
    assert metrics["rejected-updates"] == 3
    assert "expected int8" in _clients(tmp_path)["client-1"]["rejected"]


def test_each_aggregate_is_signed_chained_and_kept_in_the_registry(tmp_path):
    strategy = _strategy(tmp_path)
    arrays, _ = strategy.aggregate_train(1, [_reply(n, _honest(seed=n)) for n in range(1, 4)])
    trust = TrustList.load(tmp_path / "server.key.pub")
    r0 = verify_release(read_release(tmp_path / "releases" / "round-0000"), trust, BASE)
    r1 = verify_release(read_release(tmp_path / "releases" / "round-0001"), trust, BASE)
    assert (tmp_path / "releases" / "LATEST").read_text().strip() == "round-0001"
    assert r1.round == 1 and r1.previous == r0.digest() and r0.previous == ""
    sent = read_release(tmp_path / "releases" / "round-0001").files[ADAPTER_WEIGHTS]
    assert arrays[ADAPTER_WEIGHTS].numpy().tobytes() == sent  # what goes out is what was signed
    logged = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    assert [r["release"]["manifest"] for r in logged] == [r0.digest(), r1.digest()]
