"""Variants of the main job, run side by side: uplink encodings, and seeds for choosing the default method.

* ``uplink``: fedavg with fp16 / q8 / q4 deltas and ffa with q8 deltas; held-out loss against
  fp16 fedavg from the same run, and bytes per client-round.
* ``seeds``: fedavg and ties (the default and the best method of the quality table) at seeds
  0, 1, 2: is the gap between them larger than the spread across seeds?
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.bench import Table, register
from simulations.demo import app_defaults, run_demo

TOPICS = ("noun.animal", "noun.food", "noun.artifact", "verb.motion")


_DONE: dict[tuple[tuple[str, Any], ...], tuple[dict[str, Any], float]] = {}


def _run(overrides: dict[str, Any], name: str) -> tuple[dict[str, Any], float]:
    """Run the demo once per distinct effective config (``seeds`` reuses ``uplink``'s fedavg fp16 run)."""
    key = tuple(sorted({**app_defaults(), **overrides}.items()))
    if key not in _DONE:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            out, home = Path(tmp) / "out", Path(tmp) / "flwr"
            data = run_demo({**overrides, "run-name": name}, output_dir=out, flwr_home=home)
            _DONE[key] = data, time.time() - t0
    return _DONE[key]


def _last(data: dict[str, Any]) -> dict[str, Any]:
    return max(data["rounds"], key=lambda r: r["round"])


@register("uplink")
def uplink(overrides: dict[str, Any] | None = None) -> Table:
    """Run the demo with each uplink encoding; tabulate quality and bytes."""
    variants = [("fedavg", "fp16"), ("fedavg", "q8"), ("fedavg", "q4"), ("ffa", "q8")]
    runs = {
        v: _run({**(overrides or {}), "aggregation.method": v[0], "aggregation.delta-encoding": v[1]}, "-".join(v))
        for v in variants
    }
    table = Table(
        title="Uplink encodings: held-out loss and bytes per client-round (demo, 4 clients, 3 rounds)",
        command="python -m simulations.bench --only uplink",
        header=["method", "delta encoding", *TOPICS, "mean", "x fedavg fp16", "up / client-round (MB)", "run s"],
    )
    ref = _last(runs[("fedavg", "fp16")][0])["mean_heldout_loss"]
    for (method, encoding), (data, wall) in runs.items():
        last = _last(data)
        ups = [c["bytes_up"] for c in last["clients"].values() if "bytes_up" in c]
        table.rows.append(
            [
                method,
                encoding,
                *(f"{last['clients'][t]['heldout_loss']:.4f}" for t in TOPICS),
                f"{last['mean_heldout_loss']:.4f}",
                f"{last['mean_heldout_loss'] / ref:.4f}",
                f"{sum(ups) / len(ups) / 1e6:.3f}",
                f"{wall:.0f}",
            ]
        )
    table.notes = [
        "q8 / q4: block-wise symmetric 8- / 4-bit codes, one fp16 scale per 64 values (shared/wire.py); "
        "bytes include Flower's per-array .npy headers (420 arrays for A+B, 210 for B only)",
        "ffa uploads B only; its A stays at the shared seed's initialization",
    ]
    return table


@register("seeds")
def seeds(overrides: dict[str, Any] | None = None, methods: tuple[str, ...] = ("fedavg", "ties")) -> Table:
    """Run each method at seeds 0, 1, 2; tabulate mean held-out loss per seed and across seeds."""
    seed_list = (0, 1, 2)
    table = Table(
        title="Default method: mean held-out loss after 3 rounds at three seeds (demo, 4 clients)",
        command="python -m simulations.bench --only seeds",
        header=["method", *(f"seed {s}" for s in seed_list), "mean", "sd", "mean run s"],
    )
    for method in methods:
        losses, walls = [], []
        for seed in seed_list:
            data, wall = _run({**(overrides or {}), "aggregation.method": method, "seed": seed}, f"{method}-{seed}")
            losses.append(_last(data)["mean_heldout_loss"])
            walls.append(wall)
        table.rows.append(
            [
                method,
                *(f"{x:.4f}" for x in losses),
                f"{statistics.mean(losses):.4f}",
                f"{statistics.stdev(losses):.4f}",
                f"{statistics.mean(walls):.0f}",
            ]
        )
    table.notes = ["the seed sets the initial adapter (shared by all clients) and every client's data order"]
    return table
