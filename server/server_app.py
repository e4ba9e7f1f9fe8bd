"""Flower ServerApp: the coordinator. Thin glue over ``server/aggregate.py`` and friends.

Quantizes the base to 4 bits once and serves it on the artifact service (``base.format =
"int4"``), builds the initial adapter from a shared seed, signs it as release 0, runs federated
evaluation before round 1, then ``num-server-rounds`` rounds of train + evaluate (each
aggregate signed and stored in ``releases/``), and saves the final adapter as a PEFT folder
next to the round log. With ``aggregation.mode = async`` the rounds are FedBuff's
(``server/async_rounds.py``): releases as devices deliver, evaluation of the last one.

A run with a run-config ``run-id`` whose release folder already holds signed rounds is a
restart: it resumes after the last one (``server/resume.py``) instead of starting over.
"""

from __future__ import annotations

import contextlib
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.async_rounds import AsyncRounds, evaluate_latest
from server.distribute import serve, server_credentials
from server.privacy.accountant import BudgetExhaustedError
from server.privacy.rounds import DpRounds
from server.quantize import publish_base
from server.registry import Registry
from server.report import RoundLog, format_table
from server.resume import carried_rounds, resume_point, unrecorded_rounds
from server.secure_rounds import SecureRounds, secagg_params
from server.state import StateStore
from server.state.heartbeat import Heartbeat
from server.strategy import AdapterStrategy
from shared.adapter import ADAPTER_WEIGHTS, adapter_config_bytes, adapter_state, attach_lora, save_peft_folder
from shared.config import FleetConfig
from shared.model import cache_dir, load_model, model_digest, resolve_model
from shared.release import load_tensors
from shared.release_records import release_to_records
from shared.sign import TrustList, load_private_key

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated rounds (or resume them) and save the final adapter."""
    t0 = time.time()
    cfg = FleetConfig.from_run_config(context.run_config)
    out = Path(cfg.output_dir).expanduser().resolve() / cfg.run_name
    store = Path(cfg.base.store).expanduser() if cfg.base.store else out.parent / "store"
    key_path, run_id = Path(cfg.signing.key).expanduser(), cfg.release_run_id(context.run_id)
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
    logged_rounds = carried_rounds(out / "rounds.json")  # a restarted run keeps the rounds it had signed
    round_log = _round_log(out / "rounds.json", cfg, context, registry, state)
    fractions = (cfg.fraction_train, cfg.fraction_evaluate)
    client_level = cfg.dp.enabled and cfg.dp.level == "client"  # record level: each device's own DP-SGD
    dp = DpRounds(cfg.dp, cfg.fraction_train, cfg.num_server_rounds) if client_level else None
    secure = SecureRounds(secagg_params(cfg)) if cfg.aggregation.secure else None  # bad values fail here
    strategy = AdapterStrategy(round_log, cfg.min_clients, cfg.aggregation, cfg.lora, registry, fractions, dp, secure)
    with contextlib.ExitStack() as on_exit:  # on the way out, however: stop the service, then the heartbeat
        on_exit.callback(Heartbeat(state, run_id).start().stop)  # lets the dashboard tell running from stopped
        if service is not None:
            on_exit.callback(service.stop, grace=1)
        initial, released = _resume(registry, strategy, round_log, state, logged_rounds, key_path)
        if dp is not None:  # before any release: a run whose planned rounds overspend refuses to start
            _start_privacy(dp, grid, cfg, round_log, released)
        if initial is None:
            initial = strategy.initial_arrays(adapter_state(peft_model))  # signed release 0
            strategy.evaluate_initial(grid, initial, timeout=cfg.round_timeout)
        remaining = cfg.num_server_rounds - strategy.round_offset
        if remaining > 0 and cfg.aggregation.mode == "async":
            AsyncRounds(strategy, cfg.round_timeout, 2 * cfg.round_timeout).run(grid, remaining)
            evaluate_latest(strategy, grid, cfg.round_timeout)
        elif remaining > 0:
            try:
                strategy.start(grid=grid, initial_arrays=initial, num_rounds=remaining, timeout=cfg.round_timeout)
            except BudgetExhaustedError as exc:
                log(WARNING, "fleetlora: the run stops, its privacy budget is spent (%s); the last release stands", exc)
        assert registry.latest is not None  # release 0 at least
        final = load_tensors(registry.latest[0].files[ADAPTER_WEIGHTS])  # the last signed release
        folder = save_peft_folder(peft_model, final, out / "adapter", base=resolve_model(cfg.model))
        round_log.finish(adapter=str(folder), wall_seconds=time.time() - t0)
    state.close()
    log(INFO, "fleetlora: final adapter saved as a PEFT folder in %s\n%s", folder, format_table(round_log.data))


def _start_privacy(dp: DpRounds, grid: Grid, cfg: FleetConfig, round_log: RoundLog, released: list[int]) -> None:
    """Fix the DP population (``dp.population``, else the devices connected now) and record the run's DP facts.

    ``released``: the rounds (>= 1) of a resumed run's verified release chain, whose privacy was spent.
    """
    connected = len(sample_nodes(grid, cfg.min_clients, 0)[1]) if not cfg.dp.population else 0
    budget = dp.start(connected, round_log.data["rounds"], released)
    facts: dict[str, Any] = {"population": budget.sampling.population, "sampling_rate": budget.sampling.rate}
    facts |= {"noise_multiplier": budget.noise_multiplier, "clip_norm": cfg.dp.clip_norm, "delta": cfg.dp.delta}
    facts |= {"clipping": cfg.dp.clipping, "max_epsilon": cfg.dp.max_epsilon or None}
    round_log.note_run(privacy=facts)


def _round_log(path: Path, cfg: FleetConfig, context: Context, registry: Registry, state: StateStore) -> RoundLog:
    """Start the run's round log (the JSON file and the state store) and tell the operator what the run will do."""
    round_log = RoundLog(
        path,
        run={
            "run_id": registry.run_id,
            "model": cfg.model,
            "base_digest": registry.base_digest,
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
        "fleetlora: %d rounds of %s over >= %d clients, LoRA r=%d, round timeout %.0f s; round log in %s; "
        "run %s in the state store %s (watch it: fleetlora dashboard --db %s)",
        cfg.num_server_rounds,
        cfg.aggregation.method,
        cfg.min_clients,
        cfg.lora.rank,
        cfg.round_timeout,
        round_log.path,
        registry.run_id,
        state.path,
        state.path,
    )
    return round_log


def _resume(
    registry: Registry,
    strategy: AdapterStrategy,
    round_log: RoundLog,
    state: StateStore,
    logged_rounds: list[dict[str, Any]],
    key_path: Path,
) -> tuple[Any, list[int]]:
    """If the run already signed rounds, continue its chain; return what round N + 1 sends (else None).

    Also returns the rounds >= 1 of the verified chain (the rounds whose release spent privacy).
    The state store says where the run stood (its last signed round), the signed releases what
    devices can verify; ``server.resume.unrecorded_rounds`` checks that both agree. Rounds the
    store holds after the resume point were in flight, never signed: they are dropped, run again.
    Each carried round's ``release`` is the chain's, never the old round log's (it is rewritten
    to the store with the resume round).
    """
    public = load_private_key(key_path).public_key()
    trust = TrustList.of(public)  # the releases this server signed
    run_id = registry.run_id
    signed = state.last_signed_round(run_id)
    resume_from = resume_point(registry.folder, trust, run_id, registry.base_digest, registry.method)
    unrecorded = unrecorded_rounds(resume_from, signed, state.path)  # raises if the store and the releases disagree
    if resume_from is None:
        return None, []
    registry.resume(resume_from.release, resume_from.manifest)
    strategy.round_offset = resume_from.round
    round_log.data["rounds"] = [r for r in logged_rounds if r["round"] <= resume_from.round]
    for rec in round_log.data["rounds"]:  # carried_rounds dropped each release: the chain's, verified
        manifest = resume_from.manifest_of(rec["round"])
        if manifest is not None:
            rec["release"] = strategy.release_record(rec["round"], manifest)
    for number in unrecorded:  # signed and written by a coordinator killed before it recorded them
        manifest = resume_from.manifest_of(number)
        assert manifest is not None  # unrecorded_rounds returns only rounds with a verified release
        strategy.record_release(number, manifest)
    dropped = state.drop_rounds_after(run_id, resume_from.round)
    round_log.note(resume_from.round, resumed=time.time())
    log(
        INFO,
        "fleetlora: resuming run %s after its signed round %d (manifest %s, chain of %d verified releases; "
        "the state store had it %s%s); Flower's [ROUND i/n] banners count this start's rounds from 1",
        run_id,
        resume_from.round,
        resume_from.manifest.digest()[:16],
        len(resume_from.chain),
        f"up to round {signed.round}" if signed is not None else "not at all",
        f", {dropped} unsigned round(s) in flight dropped" if dropped else "",
    )
    return release_to_records(resume_from.release)[0], [m.round for m in resume_from.manifests if m.round >= 1]


def _publish_onnx(store: Path, key: Any) -> None:
    """Export the store's 4-bit base to ONNX Runtime (cached) and sign it as ``<store>/onnx`` for edge devices."""
    from client.export import export_base
    from server.onnx_release import publish_onnx_base

    t0 = time.time()
    _, manifest = publish_onnx_base(export_base(store / "base", cache_dir()), store, key)
    log(INFO, "fleetlora: ONNX base %s for edge devices ready in %.0f s", manifest.digest()[:16], time.time() - t0)


def _distribute_base(cfg: FleetConfig, store: Path, key_path: Path) -> tuple[str, Any]:
    """Return the digest of the base devices train on, and the artifact service serving it (``int4``)."""
    if cfg.base.format == "float":
        return model_digest(cfg.model), None
    t0 = time.time()
    source = resolve_model(cfg.model)
    key = load_private_key(key_path)
    _, manifest = publish_base(source, model_digest(cfg.model), store, key)
    if cfg.base.onnx:
        _publish_onnx(store, key)
    if not cfg.base.serve:
        digest = manifest.digest()[:16]
        log(INFO, "fleetlora: 4-bit base %s published in %s, served by a separate artifact service", digest, store)
        return manifest.base_digest, None
    tls = (cfg.base.tls_cert, cfg.base.tls_key, cfg.base.tls_ca or None)
    credentials = server_credentials(*tls) if cfg.base.tls_cert else None
    service, port = serve(store, cfg.base.address, credentials=credentials)
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
