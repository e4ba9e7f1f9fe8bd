"""What a device can train: its LoRA rank, from its own node config (``flower-supernode --node-config``).

A device with less memory or compute than the run assumes trains a lower-rank adapter: node
config ``lora-rank`` = r_i, at most the run's ``lora.rank`` r. It verifies each full-rank signed
release, keeps its first r_i components (``shared/ranks.py``), trains them and uploads a rank-r_i
delta that the coordinator zero-pads, so the fleet's one global adapter stays rank r and every
signature covers what the device loads. Without the setting a device trains at the run's rank,
or in a simulation (no node config of its own) at the rank ``lora.device-ranks`` gives its
partition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from client.device import DeviceConfigError
from shared.config import LoraConfig

RANK_KEY = "lora-rank"


def device_rank(node_config: Mapping[str, Any], lora: LoraConfig) -> int:
    """Return the rank this device trains at, in [1, ``lora.rank``].

    Its node config ``lora-rank``; else, for simulation partition i, ``lora.device_ranks[i % n]``;
    else the run's ``lora.rank``.

    Raises
    ------
    DeviceConfigError
        The setting is not an integer in [1, ``lora.rank``] (the device then refuses the round, saying so).
    """
    run_rank = lora.rank
    if RANK_KEY not in node_config:
        pid = node_config.get("partition-id")
        if lora.device_ranks and isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
            return int(lora.device_ranks[pid % len(lora.device_ranks)])
        return run_rank
    value = node_config[RANK_KEY]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= run_rank:
        raise DeviceConfigError(
            f"device setting {RANK_KEY} = {value!r:.40} must be an integer in [1, {run_rank}] (the run's lora.rank)"
        )
    return value
