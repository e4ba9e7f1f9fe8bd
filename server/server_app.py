"""Flower ServerApp: the coordinator. Thin glue over ``server/aggregate.py`` and friends.

Quantizes the base to 4 bits once and serves it on the artifact service (``base.format =
"int4"``), builds the initial adapter from a shared seed, signs it as release 0, runs federated
evaluation before round 1, then ``num-server-rounds`` rounds of train + evaluate (each
aggregate signed and stored in ``releases/``), and saves the final adapter as a PEFT folder
next to the round log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.distribute import serve
from server.quantize import publish_base
from server.registry import Registry
from server.report import RoundLog, format_table
from server.state import StateStore
from server.strategy import AdapterStrategy
from shared.adapter import ADAPTER_WEIGHTS, adapter_config_bytes, adapter_state, attach_lora, save_peft_folder
from shared.config import FleetConfig
from shared.model import load_model, model_digest, resolve_model
from shared.release import load_tensors
from shared.sign import load_private_key

app = ServerApp()
INFO = 20
ROUND_TIMEOUT_S = 3600.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated rounds and save the final adapter."""
    t0 = time.time()
    cfg = FleetConfig.from_run_config(context.run_config)
    out = Path(cfg.output_dir).expanduser().resolve() / cfg.run_name
    store = Path(cfg.base.store).expanduser() if cfg.base.store else out.parent / "store"
    key_path, run_id = Path(cfg.signing.key).expanduser(), f"{cfg.run_name}-{context.run_id}"
    base_digest, service = _distribute_base(cfg, store, key_path)
    peft_model = attach_lora(load_model(cfg.model), cfg.lora, cfg.seed)  # the float reference: same adapter shapes
    registry = Registry(
        store / "adapter" / run_id,
        key_path=key_path,
        run_id=run_id,
        base_digest=base_digest,
        method=cfg.aggregation.method,
        config=adapter_config_bytes(peft_model, base=resolve_model(cfg.model)),
    )
    state = StateStore(Path(cfg.state.db).expanduser() if cfg.state.db else out.parent / "state.sqlite")
    round_log = RoundLog(
        out / "rounds.json",
        run={
            "run_id": run_id,
            "model": cfg.model,
            "base_digest": base_digest,
            "base_format": cfg.base.format,
            "releases": str(registry.folder),
            "method": cfg.aggregation.method,
            "rounds": cfg.num_server_rounds,
            "min_clients": cfg.min_clients,
            "config": dict(context.run_config),
        },
        store=state,
    )
    log(
        INFO,
        "fleetlora: %d rounds of %s over >= %d clients, LoRA r=%d; round log in %s; run %s in the state store %s "
        "(watch it: fleetlora dashboard --db %s)",
        cfg.num_server_rounds,
        cfg.aggregation.method,
        cfg.min_clients,
        cfg.lora.rank,
        round_log.path,
        run_id,
        state.path,
        state.path,
    )
    strategy = AdapterStrategy(round_log, cfg.min_clients, cfg.aggregation, cfg.lora, registry)
    try:
        initial = strategy.initial_arrays(adapter_state(peft_model))  # signed release 0
        strategy.evaluate_initial(grid, initial, timeout=ROUND_TIMEOUT_S)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_server_rounds, timeout=ROUND_TIMEOUT_S)
    finally:
        if service is not None:
            service.stop(grace=1)
    assert registry.latest is not None  # release 0 at least
    final = load_tensors(registry.latest[0].files[ADAPTER_WEIGHTS])  # the last signed release
    folder = save_peft_folder(peft_model, final, out / "adapter", base=resolve_model(cfg.model))
    round_log.finish(adapter=str(folder), wall_seconds=time.time() - t0)
    state.close()
    log(INFO, "fleetlora: final adapter saved as a PEFT folder in %s\n%s", folder, format_table(round_log.data))


def _distribute_base(cfg: FleetConfig, store: Path, key_path: Path) -> tuple[str, Any]:
    """Return the digest of the base devices train on, and the artifact service serving it (``int4``)."""
    if cfg.base.format == "float":
        return model_digest(cfg.model), None
    t0 = time.time()
    source = resolve_model(cfg.model)
    _, manifest = publish_base(source, model_digest(cfg.model), store, load_private_key(key_path))
    service, port = serve(store, cfg.base.address)
    log(
        INFO,
        "fleetlora: 4-bit base %s (%.0f MB, signed by %s) ready in %.0f s; artifact service on port %d",
        manifest.digest()[:16],
        sum((store / "base" / f).stat().st_size for f in manifest.files) / 1e6,
        manifest.key_id,
        time.time() - t0,
        port,
    )
    return manifest.base_digest, service
