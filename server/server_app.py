"""Flower ServerApp: the coordinator. Thin glue over ``server/aggregate.py`` and friends.

Builds the initial adapter from a shared seed, signs it as release 0, runs federated
evaluation before round 1, then ``num-server-rounds`` rounds of train + evaluate (each
aggregate signed and stored in ``releases/``), and saves the final adapter as a PEFT folder
next to the round log.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.registry import Registry
from server.report import RoundLog, format_table
from server.strategy import AdapterStrategy
from shared.adapter import ADAPTER_WEIGHTS, adapter_config_bytes, adapter_state, attach_lora, save_peft_folder
from shared.config import FleetConfig
from shared.model import load_model, model_digest, resolve_model
from shared.release import load_tensors

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
    base_digest, run_id = model_digest(cfg.model), f"{cfg.run_name}-{context.run_id}"
    registry = Registry(
        out / "releases",
        key_path=Path(cfg.signing.key).expanduser(),
        run_id=run_id,
        base_digest=base_digest,
        method=cfg.aggregation.method,
        config=adapter_config_bytes(peft_model, base=resolve_model(cfg.model)),
    )
    round_log = RoundLog(
        out / "rounds.json",
        run={
            "run_id": run_id,
            "model": cfg.model,
            "base_digest": base_digest,
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
    strategy = AdapterStrategy(round_log, cfg.min_clients, cfg.aggregation, cfg.lora, registry)
    initial = strategy.initial_arrays(adapter_state(peft_model))  # signed release 0
    strategy.evaluate_initial(grid, initial, timeout=ROUND_TIMEOUT_S)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_server_rounds, timeout=ROUND_TIMEOUT_S)
    assert registry.latest is not None  # release 0 at least
    final = load_tensors(registry.latest[0].files[ADAPTER_WEIGHTS])  # the last signed release
    folder = save_peft_folder(peft_model, final, out / "adapter", base=resolve_model(cfg.model))
    round_log.finish(adapter=str(folder), wall_seconds=time.time() - t0)
    log(INFO, "fleetlora: final adapter saved as a PEFT folder in %s\n%s", folder, format_table(round_log.data))
