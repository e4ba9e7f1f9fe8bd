"""Which private data a device trains on.

A real device names its files in its node config (``flower-supernode --node-config
"train-file='/data/train.jsonl' heldout-file='/data/heldout.jsonl' name='clinic-7'"``).
In a simulation, virtual node ``partition-id`` i takes topic ``topics[i % len(topics)]``
of the run config's ``data-dir``, and reports as that topic (``<topic>-<i>`` beyond the first
``len(topics)`` devices, so a thousand virtual devices keep a thousand names, state folders and
round-log entries).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import FleetConfig
from shared.data import DataError


@dataclass(frozen=True)
class Partition:
    """A device's private data files and the name its results are reported under."""

    name: str
    train_file: Path
    heldout_file: Path


def partition_for(node_config: Mapping[str, Any], cfg: FleetConfig) -> Partition:
    """Resolve the device's partition from its node config, else from the simulation topics."""
    if "train-file" in node_config:
        train = Path(str(node_config["train-file"])).expanduser()
        heldout = Path(str(node_config.get("heldout-file", train))).expanduser()
        name = str(node_config.get("name", train.parent.name))
        return Partition(name=name, train_file=train, heldout_file=heldout)
    if "partition-id" not in node_config:
        raise DataError("node config names no data: give 'train-file' (and 'heldout-file'), or run in simulation")
    pid = int(node_config["partition-id"])
    topic = cfg.topics[pid % len(cfg.topics)]
    folder = Path(cfg.data_dir).expanduser() / topic
    if not folder.is_dir():
        raise DataError(f"{folder}: no data folder for topic '{topic}' (check run-config 'data-dir' and 'topics')")
    name = topic if pid < len(cfg.topics) else f"{topic}-{pid}"  # more devices than topics: each keeps its own name
    return Partition(name=name, train_file=folder / "train.jsonl", heldout_file=folder / "heldout.jsonl")
