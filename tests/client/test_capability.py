"""A device's own rank: node config ``lora-rank`` (``client/capability.py``)."""

import pytest

from client.capability import device_rank
from client.device import DeviceConfigError
from shared.config import ConfigError, LoraConfig

RUN = LoraConfig(rank=8)


def test_a_device_trains_at_its_own_rank_or_the_runs():
    assert device_rank({}, RUN) == 8
    assert device_rank({"lora-rank": 2}, RUN) == 2 and device_rank({"lora-rank": "4"}, RUN) == 4
    assert device_rank({"lora-rank": 8}, RUN) == 8


def test_in_a_simulation_each_partition_takes_its_rank_from_the_run_and_a_node_config_wins():
    mixed = LoraConfig(rank=8, device_ranks=("2", "4", "8"))
    assert [device_rank({"partition-id": i}, mixed) for i in range(5)] == [2, 4, 8, 2, 4]
    assert device_rank({"partition-id": 0, "lora-rank": 8}, mixed) == 8
    assert device_rank({"train-file": "x.jsonl"}, mixed) == 8  # a real device without the setting: the run's rank
    for bad in (("2", "8"), ("0",), ("٣",), ("9" * 5000,), ("2.5",)):
        with pytest.raises(ConfigError, match="lora.device-ranks"):
            LoraConfig(rank=4, device_ranks=bad)


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, "two", True, None, "1e3"])
def test_a_rank_the_run_cannot_take_is_refused_by_name(bad):
    with pytest.raises(DeviceConfigError, match=r"lora-rank .* must be an integer in \[1, 8\]"):
        device_rank({"lora-rank": bad}, RUN)
