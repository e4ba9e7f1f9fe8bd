"""A device slower than the rest by construction: node config ``slowdown`` = k.

In a simulation (no node config of its own) ``train.device-slowdown`` gives it by partition.

A device of slowdown k spends (k - 1) times its own measured training time waiting after it
trains, so each of its rounds takes k times as long as it would, whatever the machine's speed:
a straggler for tests and benchmarks of asynchronous aggregation (``aggregation.mode = async``)
that neither throttles the CPU nor takes it from the other devices. Its update is the one it
trained; only its arrival is late.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from client.device import DeviceConfigError
from client.train import TrainResult
from shared.config import MAX_SLOWDOWN, TrainConfig

SLOWDOWN_KEY = "slowdown"


def device_slowdown(node_config: Mapping[str, Any], train: TrainConfig) -> float:
    """Return this device's slowdown factor k >= 1 (1: as fast as it is).

    Its node config ``slowdown``; else, for simulation partition i, ``train.device_slowdown[i % n]``; else 1.

    Raises
    ------
    DeviceConfigError
        The setting is not a number in [1, ``MAX_SLOWDOWN``].
    """
    if SLOWDOWN_KEY not in node_config:
        pid = node_config.get("partition-id")
        if train.device_slowdown and isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
            return float(train.device_slowdown[pid % len(train.device_slowdown)])
        return 1.0
    value = node_config[SLOWDOWN_KEY]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= MAX_SLOWDOWN:
        rule = f"must be a number in [1, {MAX_SLOWDOWN}]"
        raise DeviceConfigError(f"device setting {SLOWDOWN_KEY} = {value!r:.40} {rule}")
    return float(value)


def slow_down(result: TrainResult, factor: float) -> TrainResult:
    """Wait (factor - 1) x the round's training time; return the result with the seconds it took in all."""
    if factor <= 1:
        return result
    time.sleep((factor - 1) * result.seconds)
    return dataclasses.replace(result, seconds=result.seconds * factor)
