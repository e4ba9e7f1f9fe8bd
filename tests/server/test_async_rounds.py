"""FedBuff rounds (``aggregation.mode = async``) through Flower's InMemoryGrid: a slow device's update is counted.

Three devices, a buffer of 2, fedavg. Device C is slow by construction: the harness answers its
first task only once the coordinator has signed release 2 (so C's update is two releases stale),
and device B's third task is held until release 3 is signed, so release 3 is A's fresh update
and C's stale one. Expected globals are computed by hand from the fixed deltas.
"""

import json
import math

import numpy as np
import pytest
import torch

from server.async_rounds import AsyncRounds, staleness_weight
from server.registry import Registry
from server.report import RoundLog
from server.resume import resume_point
from server.strategy import AdapterStrategy
from shared.adapter import ADAPTER_WEIGHTS
from shared.config import AggregationConfig, ConfigError, FleetConfig, LoraConfig
from shared.manifest import parse
from shared.release import load_tensors
from shared.release_records import RELEASE_MANIFEST
from shared.sign import TrustList, generate_key, load_private_key
from tests.server.secagg.fleet import Fleet

torch.manual_seed(0)
GLOBAL = {
    f"l0.{n}.lora_{f}.weight": torch.randn(*s) * 0.1 for n in ("q", "v") for f, s in (("A", (4, 32)), ("B", (32, 4)))
}
A, B, C = 0, 1, 2


def _deltas():
    rng = np.random.default_rng(1)
    return [{k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(3)]


def _strategy(tmp_path, **agg):
    generate_key(tmp_path / "server.key")
    registry = Registry(tmp_path / "releases", tmp_path / "server.key", "run-1", "b" * 64, "fedavg", b"{}")
    config = AggregationConfig(**{"method": "fedavg", "mode": "async", "buffer_size": 2, "min_accepted": 2, **agg})
    strategy = AdapterStrategy(RoundLog(tmp_path / "rounds.json", {}), 2, config, LoraConfig(rank=4), registry)
    strategy.initial_arrays(GLOBAL)
    return strategy


def _released(strategy, number):
    return load_tensors((strategy.registry.release_folder(number) / ADAPTER_WEIGHTS).read_bytes())


def _round_of(msg):
    return parse(bytes(msg.content["config"][RELEASE_MANIFEST])).round


def _slow_fleet(strategy, deltas, b_after_release_3=False):
    """C answers its first task once release 2 is signed; B's task of release 2 waits for C's answer.

    ``b_after_release_3``: B's task of release 2 waits until release 3 is signed instead, so release 3
    is A's and C's whatever order the coordinator pulls replies in.
    """
    fleet = None

    def c_slow(msg):
        return strategy.registry.latest[1].round < 2

    def b_waits(msg):
        if _round_of(msg) != 2:
            return False
        if b_after_release_3:
            return strategy.registry.latest[1].round < 3
        return not any(nid == fleet.nodes[C] for nid, _ in fleet.received)

    fleet = Fleet(deltas, hold={C: c_slow, B: b_waits})
    return fleet


def _expected(start, updates):
    """global + sum_i n_i s(tau_i) delta_i / sum_i n_i, n_i = 10 for every device (fedavg: factors as they are)."""
    n = 10.0
    total = n * len(updates)
    return {k: start[k] + sum(n * staleness_weight(tau) * _fp16(d[k]) for d, tau in updates) / total
            for k in start}  # fmt: skip


def _fp16(x):
    return torch.from_numpy(x).half().float()  # as the device uploads it


def _close(got, want, other):
    """``got`` is ``want`` within the fp16 release's rounding, and far from the alternative ``other``."""
    err = max((got[k] - want[k]).abs().max().item() for k in want)
    gap = max((other[k] - want[k]).abs().max().item() for k in want)
    assert err < 2e-4 < gap / 5, (err, gap)


def test_a_stale_update_counts_with_its_staleness_weight_and_the_chain_is_unbroken(tmp_path):
    strategy = _strategy(tmp_path)
    ds = _deltas()
    with _slow_fleet(strategy, ds, b_after_release_3=True) as fleet:
        rounds = AsyncRounds(strategy, task_timeout=60, stall_timeout=60, poll=0.01)
        assert rounds.run(fleet.grid, num_rounds=3) == 3
    g = [_released(strategy, i) for i in range(4)]
    _close(g[1], _expected(g[0], [(ds[A], 0), (ds[B], 0)]), g[0])
    _close(g[2], _expected(g[1], [(ds[A], 0), (ds[B], 0)]), g[1])
    # release 3: A fresh, C trained on release 0 -> two releases stale, weighted 1/sqrt(3), never dropped
    want = _expected(g[2], [(ds[A], 0), (ds[C], 2)])
    unweighted = _expected(g[2], [(ds[A], 0), (ds[C], 0)])
    _close(g[3], want, unweighted)
    _close(g[3], want, _expected(g[2], [(ds[A], 0), (ds[B], 0)]))  # and not B's in C's place
    log = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    third = next(r for r in log if r["round"] == 3)
    c = third["clients"][str(fleet.nodes[C])]
    assert c["staleness"] == 2 and c["release_round"] == 0 and c["contributions"] == 1
    assert third["clients"][str(fleet.nodes[A])]["contributions"] == 3
    # the chain: every release signed by the coordinator, each leading back to the one before it
    public = load_private_key(tmp_path / "server.key").public_key()
    point = resume_point(strategy.registry.folder, TrustList.of(public), "run-1", "b" * 64, "fedavg")
    assert point is not None and point.round == 3 and len(point.chain) == 4
    # every device was sent the newest release each time it was free: C's first task was release 0
    sent = [(nid, _round_of(m)) for nid, m in fleet.tasks]
    assert (fleet.nodes[C], 0) in sent and sum(1 for nid, _ in sent if nid == fleet.nodes[A]) >= 3


def test_an_update_older_than_max_staleness_is_rejected_with_its_staleness(tmp_path):
    strategy = _strategy(tmp_path, max_staleness=1)
    ds = _deltas()
    with _slow_fleet(strategy, ds) as fleet:
        rounds = AsyncRounds(strategy, task_timeout=60, stall_timeout=60, poll=0.01)
        assert rounds.run(fleet.grid, num_rounds=3) == 3
    log = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    third = next(r for r in log if r["round"] == 3)
    reason = third["clients"][str(fleet.nodes[C])]["rejected"]
    assert "stale" in reason and "2 releases behind" in reason and "max-staleness = 1" in reason
    g = [_released(strategy, i) for i in range(4)]
    # C's stale update is out; release 3 is A's and B's (B was sent again once C had answered)
    _close(g[3], _expected(g[2], [(ds[A], 0), (ds[B], 0)]), _expected(g[2], [(ds[A], 0), (ds[C], 2)]))


def test_an_update_naming_another_release_is_rejected(tmp_path):
    strategy = _strategy(tmp_path)

    def lie(msg, context, call_next):  # device A claims it trained on a release it was not sent
        reply = call_next(msg, context)
        reply.content["metrics"]["release-round"] = 7
        return reply

    fleet = None

    def after_a(msg):  # B and C answer once the coordinator has taken A's lie, so release 1 is collected with it
        first = [r for r in strategy.round_log.data["rounds"] if r["round"] == 1]
        return not (first and str(fleet.nodes[A]) in first[0]["clients"])

    fleet = Fleet(_deltas(), mods={A: [lie]}, hold={B: after_a, C: after_a})
    with fleet:
        rounds = AsyncRounds(strategy, task_timeout=60, stall_timeout=60, poll=0.01)
        assert rounds.run(fleet.grid, num_rounds=1) == 1
    log = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    first = next(r for r in log if r["round"] == 1)
    assert "release round 7" in first["clients"][str(fleet.nodes[A])]["rejected"]
    assert {str(fleet.nodes[B]), str(fleet.nodes[C])} <= {k for k, v in first["clients"].items() if "staleness" in v}


def test_the_staleness_weight_is_fedbuffs():
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.5
    assert math.isclose(staleness_weight(8), 1 / 3)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"aggregation.method": "ties"}, "aggregation.method"),
        ({"aggregation.method": "exact"}, "aggregation.method"),
        ({"aggregation.method": "fedavg", "aggregation.secure": True}, "aggregation.secure"),
        ({"aggregation.method": "fedavg", "aggregation.min-accepted": 4}, "aggregation.min-accepted"),
        ({"aggregation.method": "fedavg", "dp.noise-multiplier": 1.0}, "aggregation.mode"),
        ({"aggregation.method": "fedavg", "aggregation.max-staleness": -1}, "aggregation.max-staleness"),
    ],
)
def test_async_refuses_what_it_cannot_do_by_name(overrides, named):
    with pytest.raises(ConfigError, match=named):
        FleetConfig.from_run_config({"aggregation.mode": "async", **overrides})


def test_a_device_whose_reply_fails_rests_instead_of_being_sent_task_after_task(tmp_path):
    strategy = _strategy(tmp_path)

    def broken(msg, context, call_next):  # device A's ClientApp raises: Flower answers with an error reply
        raise RuntimeError("out of memory")

    fleet = None

    def after_a(msg):  # B and C answer once A's failure is taken, each of their tasks
        return not any(nid == fleet.nodes[A] for nid, _ in fleet.received)

    fleet = Fleet(_deltas(), mods={A: [broken]}, hold={B: after_a, C: after_a})
    with fleet:
        rounds = AsyncRounds(strategy, task_timeout=60, stall_timeout=60, poll=0.01, retry_after=3600)
        assert rounds.run(fleet.grid, num_rounds=3) == 3
    sent_to_a = [m for nid, m in fleet.received if nid == fleet.nodes[A]]
    assert len(sent_to_a) == 1  # one failure, then it rests; B and C made the three releases
