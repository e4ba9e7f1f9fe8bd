"""The main job as a benchmark: wall time of ``make demo``'s run and bytes per client-round."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from simulations.bench import Table, register
from simulations.demo import run_demo


@register("demo")
def demo() -> Table:
    """Run the default demo once (real SmolLM2, 4 clients, 3 rounds) and tabulate it."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        data = run_demo({"run-name": "bench"}, output_dir=Path(tmp) / "out", flwr_home=Path(tmp) / "flwr")
        wall = time.time() - t0
    rounds = sorted(data["rounds"], key=lambda r: r["round"])
    table = Table(
        title="Main job (make demo): wall time and bytes per client-round",
        command="python -m simulations.bench --only demo",
        header=[
            "round",
            "clients",
            "mean train loss",
            "mean held-out loss",
            "up / client (MB)",
            "down / client (MB)",
            "round s",
        ],
    )
    for r in rounds:
        trained = [c for c in r["clients"].values() if "bytes_up" in c]
        per_up = sum(c["bytes_up"] for c in trained) / len(trained) / 1e6 if trained else 0.0
        per_down = sum(c["bytes_down"] for c in trained) / len(trained) / 1e6 if trained else 0.0
        table.rows.append(
            [
                "before" if r["round"] == 0 else str(r["round"]),
                str(len(r["clients"])),
                f"{r['mean_train_loss']:.4f}" if "mean_train_loss" in r else "-",
                f"{r['mean_heldout_loss']:.4f}",
                f"{per_up:.2f}" if trained else "-",
                f"{per_down:.2f}" if trained else "-",
                f"{r['seconds']:.0f}",
            ]
        )
    table.notes.append(f"wall time of the whole run (SuperLink start to stop, setup excluded): {wall:.0f} s")
    cfg = data["run"]["config"]
    table.notes.append(
        f"config: {cfg.get('train.steps')} steps x batch {cfg.get('train.batch-size')} per client-round, "
        f"LoRA r={cfg.get('lora.rank')}, fp16 deltas up, fp16 global adapter down"
    )
    return table
