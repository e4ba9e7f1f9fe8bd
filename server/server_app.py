"""Flower ServerApp: the coordinator. Thin glue over ``server/aggregate.py`` and friends.

Builds the initial adapter from a shared seed, runs federated evaluation before round 1,
then ``num-server-rounds`` rounds of train + evaluate, and saves the final adapter as a
PEFT folder next to the round log.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.report import RoundLog, format_table
from server.strategy import AdapterStrategy
from shared.adapter import adapter_state, attach_lora, save_peft_folder
from shared.config import FleetConfig
from shared.model import load_model, model_digest, resolve_model
from shared.wire import from_wire, to_wire

app = ServerApp()
INFO = 20
ROUND_TIMEOUT_S = 3600.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated rounds and save the final adapter."""
    t0 = time.time()
    cfg = FleetConfig.from_run_config(context.run_config)
    out = Path(cfg.output_dir).expanduser().resolve() / cfg.run_name
    peft_model = attach_lora(load_model(cfg.model), cfg.lora, cfg.seed)
    initial = to_wire(adapter_state(peft_model))
    round_log = RoundLog(
        out / "rounds.json",
        run={
            "model": cfg.model,
            "base_digest": model_digest(cfg.model),
            "method": cfg.aggregation.method,
            "rounds": cfg.num_server_rounds,
            "min_clients": cfg.min_clients,
            "config": dict(context.run_config),
        },
    )
    log(
        INFO,
        "fleetlora: %d rounds of %s over >= %d clients, LoRA r=%d; round log in %s",
        cfg.num_server_rounds,
        cfg.aggregation.method,
        cfg.min_clients,
        cfg.lora.rank,
        round_log.path,
    )
    strategy = AdapterStrategy(round_log, cfg.min_clients, cfg.aggregation, cfg.lora)
    strategy.evaluate_initial(grid, initial, timeout=ROUND_TIMEOUT_S)
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=cfg.num_server_rounds, timeout=ROUND_TIMEOUT_S
    )
    folder = save_peft_folder(peft_model, from_wire(result.arrays), out / "adapter", base=resolve_model(cfg.model))
    round_log.finish(adapter=str(folder), wall_seconds=time.time() - t0)
    log(INFO, "fleetlora: final adapter saved as a PEFT folder in %s\n%s", folder, format_table(round_log.data))
