"""aggregation.workers: exact / ties by Ray workers, a shard of the modules each, give the module-wise result."""

import pytest
import torch

from server.aggregate import modules
from server.modulewise import round_aggregator
from server.shards import shard_modules
from shared.config import ConfigError, FleetConfig
from tests.server.test_modulewise import ALPHA, DELTAS, GLOBAL, RANK, SHAPES, WEIGHTS, _max_rel


def test_shards_split_every_module_once_and_balance_the_entries():
    shards = shard_modules(GLOBAL, 2)
    assert sorted(m for s in shards for m in s) == modules(GLOBAL)  # each module in exactly one shard
    entries = [sum(SHAPES[m][0] * SHAPES[m][1] for m in s) for s in shards]
    assert max(entries) / sum(entries) < 0.6  # gate and down (884,736 entries each) go to different shards
    assert shard_modules(GLOBAL, 10) == [[m] for m in ("down", "gate", "q", "k")]  # no empty shard


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"aggregation.method": "fedavg", "aggregation.workers": 2}, "aggregation.workers"),
        ({"aggregation.method": "ties", "aggregation.workers": 0}, "aggregation.workers"),
        ({"aggregation.method": "ties", "aggregation.ray-address": "ray://a b"}, "aggregation.ray-address"),
    ],
)
def test_worker_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError, match=key):
        FleetConfig.from_run_config(overrides)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    for attempt in (1, 2):  # Ray gives its raylet 30 s to register (hard-coded): a loaded 2-core CI missed it once
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            break
        except Exception as exc:  # noqa: BLE001 (Ray raises a bare Exception for it)
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact", "ties"])
def test_two_ray_workers_give_the_single_process_result(local_ray, method):
    def run(workers):
        agg = round_aggregator(method, GLOBAL, RANK, ALPHA, dtype=torch.float16, workers=workers)
        for d, w in zip(DELTAS, WEIGHTS, strict=True):
            agg.add(d, w)
        actors = list(getattr(agg, "_actors", []))
        return agg.result(), actors

    (sharded, actors), (single, _) = run(2), run(1)
    assert len(actors) == 2 and set(sharded) == set(single)
    # each module is the same computation in another process; only thread counts (rounding) differ
    assert _max_rel(sharded, single) < 1e-4
    for actor in actors:  # the workers (and their spools) are gone once the round is aggregated
        with pytest.raises(local_ray.exceptions.RayActorError):
            local_ray.get(actor.peak_rss.remote(), timeout=60)
