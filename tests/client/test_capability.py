"""A device's own rank: node config ``lora-rank`` (``client/capability.py``)."""

import pytest

from client.capability import device_rank, device_training
from client.device import DeviceConfigError
from shared.config import ConfigError, FleetConfig, LoraConfig

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


def test_a_memory_budget_chooses_settings_within_the_devices_own_rank(tiny_model_dir):
    cfg = FleetConfig.from_run_config({"train.max-seq-len": 2048, "lora.rank": 8, "train.dtype": "float32"})
    roomy = device_training({"memory-budget-mb": "100000"}, cfg, str(tiny_model_dir))
    assert (roomy.rank, roomy.train.micro_batch_size, roomy.train.gradient_checkpointing) == (8, 4, 0)
    assert roomy.metrics() == {"memory-budget-mb": 100000, "micro-batch-size": 4, "gradient-checkpointing": 0}
    both = device_training({"memory-budget-mb": 640, "lora-rank": 4}, cfg, str(tiny_model_dir))
    assert both.rank == 4 and both.train.micro_batch_size == 1  # the smaller rank; the budget's micro-batch
    assert both.train.steps == cfg.train.steps and cfg.train.micro_batch_size == 0  # the run's copy is untouched
    plain = device_training({"lora-rank": 4}, cfg, str(tiny_model_dir))
    assert (plain.rank, plain.train, plain.metrics()) == (4, cfg.train, {})


@pytest.mark.parametrize(
    ("node_config", "run", "why"),
    [
        ({"memory-budget-mb": 10}, {}, r"memory-budget-mb = 10 MB is too small .* about \d+ MB"),
        ({"memory-budget-mb": "lots"}, {}, r"memory-budget-mb = 'lots' must be a whole number"),
        ({"memory-budget-mb": 800, "lora-rank": 9}, {}, r"lora-rank = 9 must be an integer in \[1, 8\]"),
        ({"memory-budget-mb": 8000}, {"dp.level": "record", "dp.noise-multiplier": 1.0}, "record"),
    ],
)
def test_a_budget_the_device_cannot_honour_is_refused_by_name(tiny_model_dir, node_config, run, why):
    with pytest.raises(DeviceConfigError, match=why):
        device_training(node_config, FleetConfig.from_run_config(run), str(tiny_model_dir))
