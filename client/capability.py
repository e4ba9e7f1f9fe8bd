"""What a device can train: its LoRA rank, from its own node config (``flower-supernode --node-config``).

A device with less memory or compute than the run assumes trains a lower-rank adapter: node
config ``lora-rank`` = r_i, at most the run's ``lora.rank`` r. It verifies each full-rank signed
release, keeps its first r_i components (``shared/ranks.py``), trains them and uploads a rank-r_i
delta that the coordinator zero-pads, so the fleet's one global adapter stays rank r and every
signature covers what the device loads. Without the setting a device trains at the run's rank,
or in a simulation (no node config of its own) at the rank ``lora.device-ranks`` gives its
partition.

A device may instead (or as well) set ``memory-budget-mb``: it then chooses its rank (at most the
one above), micro-batch size and gradient checkpointing so that its training process fits the
budget (``client/budget.py``), and reports what it chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from client.budget import ModelShape, Plan, parse_budget, plan
from client.device import DeviceConfigError
from shared.config import FleetConfig, LoraConfig, TrainConfig
from shared.model import compute_dtype_name

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


@dataclass(frozen=True)
class DeviceTraining:
    """How this device trains: its rank, its copy of the run's training settings, and its budget's plan."""

    rank: int
    train: TrainConfig
    plan: Plan | None  # None: no memory-budget-mb, the run's settings as they are

    def metrics(self) -> dict[str, int]:
        """Return the train-reply metrics that report a budget's choice (the coordinator's ``TrainReply.settings``)."""
        if self.plan is None:
            return {}
        return {
            "memory-budget-mb": self.plan.budget_mb,
            "micro-batch-size": self.plan.micro_batch_size,
            "gradient-checkpointing": self.plan.gradient_checkpointing,
        }


def device_training(node_config: Mapping[str, Any], cfg: FleetConfig, model_spec: str) -> DeviceTraining:
    """Return the rank and training settings of this device for the base ``model_spec``.

    Without ``memory-budget-mb``: :func:`device_rank` and the run's ``train`` settings. With it: the
    fastest rank (at most :func:`device_rank`'s), micro-batch size and checkpointing that fit it
    (:func:`client.budget.plan`).

    Raises
    ------
    DeviceConfigError
        A setting is malformed, or nothing fits the budget (the message names it and the smallest footprint).
    """
    rank = device_rank(node_config, cfg.lora)
    budget = parse_budget(node_config)
    if budget is None:
        return DeviceTraining(rank, cfg.train, None)
    if cfg.dp.enabled and cfg.dp.level == "record":
        raise DeviceConfigError(
            "device setting memory-budget-mb cannot be honoured with dp.level = record: per-example gradients "
            "are not in the footprint model (client/budget.py); remove the setting or use client-level DP"
        )
    shape = ModelShape.of(model_spec)
    t = cfg.train
    dtype = compute_dtype_name(t.dtype)  # what this device computes in
    chosen = plan(
        budget, shape, cfg.lora.target_modules, rank, t.batch_size, t.max_seq_len, t.micro_batch_size,
        t.gradient_checkpointing, dtype,
    )  # fmt: skip
    train = replace(t, micro_batch_size=chosen.micro_batch_size, gradient_checkpointing=chosen.gradient_checkpointing)
    return DeviceTraining(chosen.rank, train, chosen)
