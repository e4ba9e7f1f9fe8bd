"""Devices of mixed LoRA rank: held-out loss after the same rounds, mixed ranks vs all at the full rank vs all low.

The demo (real SmolLM2-135M, 4-bit base, 4 WordNet topics as 4 devices, 3 rounds, the default
``ties``) three times, changing only each device's rank (``lora.device-ranks``, ``shared/ranks.py``):
{2, 4, 8, 8}, all 8 (today's default) and all 2. The global adapter is rank 8 in every run; a
device of rank r_i trains and uploads only its first r_i components. Figures: the mean held-out
loss after the last round (response tokens, every topic's held-out file), each device's own
held-out loss at its own rank, and the mean bytes up per device-round.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from shared.model import resolve_model
from simulations.bench import Table, register, restored_env
from simulations.bench.scale import _load_note

CONFIGS = (("2,4,8,8", "mixed {2, 4, 8, 8}"), ("8,8,8,8", "all 8 (default)"), ("2,2,2,2", "all 2"))


def _run(ranks: str, folder: Path, model: str) -> dict[str, Any]:
    from simulations.demo import run_demo

    os.environ["FLEETLORA_CACHE"] = str(folder / "cache")  # each run's devices pin their own base
    overrides = {"lora.device-ranks": ranks, "model": model, "run-name": "ranks"}
    return run_demo(overrides, folder / "out", folder / "flwr")


def _row(label: str, data: dict[str, Any]) -> list[str]:
    rounds = [r for r in data["rounds"] if r["round"] > 0]
    last = rounds[-1]
    trained = [c for r in rounds for c in r["clients"].values() if "train_loss" in c]
    per_device = sorted(
        (c["name"], c.get("lora_rank") or 8, c["heldout_loss"]) for c in last["clients"].values() if "heldout_loss" in c
    )
    return [
        label,
        str(len(rounds)),
        f"{last['mean_heldout_loss']:.4f}",
        ", ".join(f"{name} (r={rank}) {loss:.3f}" for name, rank, loss in per_device),
        f"{sum(c.get('bytes_up', 0) for c in trained) / len(trained) / 1e6:.2f}",
    ]


@register("ranks")
def ranks() -> Table:
    """Run the demo at mixed ranks, all 8 and all 2, side by side."""
    table = Table(
        title="Mixed LoRA ranks: held-out loss after the demo's rounds (SmolLM2-135M, 4 devices, ties, global r = 8)",
        command="python -m simulations.bench --only ranks",
        header=["device ranks", "rounds", "held-out mean", "each device at its rank", "MB up / device-round"],
    )
    load_before = os.getloadavg()[0]
    model = str(resolve_model("smollm2-135m-instruct"))
    with restored_env("FLEETLORA_CACHE"):  # the devices' caches move per run
        with tempfile.TemporaryDirectory() as tmp:
            for i, (ranks_, label) in enumerate(CONFIGS):
                table.rows.append(_row(label, _run(ranks_, Path(tmp) / str(i), model)))
    table.notes.append(
        "device i trains topic i (noun.animal, noun.food, noun.artifact, verb.motion) at rank ranks[i]; every run "
        "has the demo's defaults otherwise (15 steps x batch 4 per round, 3 rounds, fp16 deltas); a device's "
        "held-out loss is measured with its own rank's components of the global adapter"
    )
    table.notes.append(_load_note(load_before))
    return table
