"""Flower ClientApp: one edge device. Thin glue over ``client/train.py``.

Each message carries the global adapter as a signed release; the device verifies it
(``client/verify.py``; a refused release is reported and the last good adapter stays) against
its own trust list and history (``client/device.py``: never taken from the run config), loads
it on its cached base, then
either trains and replies with the adapter *delta* (``aggregation.delta-encoding``) and its metrics, or evaluates
it on its held-out file. The base model never travels in a round message.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client import device
from client.capability import DeviceTraining, device_training
from client.fetch import FetchError, fetch_links, fetch_release
from client.partition import Partition, partition_for
from client.privacy import clip_and_pack
from client.record_dp import LEDGER_FILE, Ledger, RecordBudgetError, RecordDp, train_record_dp
from client.secagg import secagg_mod
from client.slowdown import device_slowdown, slow_down
from client.train import TrainResult, evaluate, round_seed, train_adapter
from client.verify import install_release
from shared.adapter import adapter_state, attach_lora, set_trainable_factors, uploaded_keys
from shared.chain import ChainGapError
from shared.config import ConfigError, FleetConfig, LoraConfig
from shared.data import DataError, Encoded, encode, load_jsonl
from shared.errors import ReleaseError
from shared.model import ModelError, compute_dtype, load_model, load_tokenizer, model_digest
from shared.ranks import pad, rank_shapes
from shared.release_records import links_from_config, release_from_records
from shared.replay import AcceptedReleases
from shared.sign import SignatureError
from shared.wire import WireError, pack

app = ClientApp(mods=[secagg_mod])  # SecAgg+ stages (aggregation.secure); every other message passes through


# What a round's message, the run config or this device's own data can make fail: the round is
# refused with the reason (public_reason: no path of this device), never an exception that Flower
# would send back with its raw text. The device's log keeps the whole message.
REFUSALS = (ReleaseError, SignatureError, FetchError, OSError, ValueError, ModelError, RecordBudgetError, MemoryError)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with the delta only (or why not)."""
    return _answer(msg, context, _train)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the received global adapter on the local held-out file (or reply why not)."""
    return _answer(msg, context, _evaluate)


def _answer(msg: Message, context: Context, handler: Any) -> Message:
    """Run ``handler``; a failure of :data:`REFUSALS` is this device's refusal of the round, not an exception."""
    try:
        device.check_app_pinned(context.node_config)
        return handler(msg, context)
    except REFUSALS as exc:
        return _refuse(msg, _name(context), _claimed_round(msg), exc)


def _round_config(msg: Message) -> ConfigRecord:
    """Return the message's ``config`` record, refusing a message without one."""
    config = msg.content["config"] if "config" in msg.content else None
    if not isinstance(config, ConfigRecord):
        raise WireError("the message carries no 'config' record")
    return config


def _server_round(msg: Message) -> int:
    """Return the message's ``server-round``, an integer >= 0."""
    value = _round_config(msg).get("server-round")
    if type(value) is not int or value < 0:
        raise WireError(f"the message carries server-round {value!r:.40}, expected an integer >= 0")
    return value


def _claimed_round(msg: Message) -> int:
    """Return the round a message says it is of, for a refusal's log line (-1: none readable)."""
    try:
        return _server_round(msg)
    except WireError:
        return -1


def _name(context: Context) -> str:
    """Return this device's partition name, or its node config's ``name`` if the run config does not parse."""
    try:
        return partition_for(context.node_config, FleetConfig.from_run_config(context.run_config)).name
    except ValueError:
        return str(context.node_config.get("name", "this device"))[:80]


def _train(msg: Message, context: Context) -> Message:
    cfg = FleetConfig.from_run_config(context.run_config)
    part = partition_for(context.node_config, cfg)
    server_round = _server_round(msg)
    record_dp = cfg.dp.enabled and cfg.dp.level == "record"
    floor = device.privacy_floor(context.node_config)
    masked = RECORD_KEY_CONFIGS in msg.content  # a secure round's collect stage: the delta leaves masked (secagg_mod)
    if cfg.aggregation.secure and not masked:
        raise ConfigError(
            "the run is secure (aggregation.secure) but this train message is not a secure round's: this device "
            "uploads its delta only masked"
        )
    floor.check(record_dp, cfg.dp.noise_multiplier, masked)  # what this message does, not what the run config says
    device.check_train_steps(context.node_config, cfg.train.steps)
    base = _base(cfg, context, part)
    own = device_training(context.node_config, cfg, base.spec)
    rank = own.rank
    model, tok = _runtime(base.spec, cfg.lora, cfg.seed, cfg.train.dtype, rank)
    release_round = _install(msg, context, cfg, part, model, base.digest, rank)
    masked_run = cfg.release_run_id(context.run_id) if masked else None
    if masked_run is not None:
        store = AcceptedReleases(device.state_file(context.node_config, part.name))
        store.mask_once(masked_run, server_round)
    slowdown = device_slowdown(context.node_config, cfg.train)
    _log_plan(own, part, server_round)
    start = adapter_state(model)
    set_trainable_factors(model, cfg.aggregation.method)
    data = _encoded(part.train_file, base.spec, cfg.train.max_seq_len)
    if masked_run is not None and not record_dp and own.train.batch_size >= len(data):
        raise ConfigError(
            f"a secure round at train.batch-size {own.train.batch_size} trains on all {len(data)} of this device's "
            "examples at every step: the same delta from the same start whatever the seed, so two sums of such "
            f"rounds, one without this device, would differ by it; this device masks only batches below {len(data)}"
        )
    seed = round_seed(cfg.seed, server_round, part.name, _dispatch(msg), masked_run)
    record_epsilon = None
    if record_dp:
        result, record_epsilon = _train_record_dp(model, data, cfg, tok.pad_token_id, context, part, floor)
    else:
        result = train_adapter(model, data, own.train, tok.pad_token_id, seed)
    result = slow_down(result, slowdown)
    trained = adapter_state(model)
    delta = {k: trained[k] - start[k] for k in uploaded_keys(cfg.aggregation.method, trained)}
    log(
        logging.INFO,
        "client %s round %d: %d steps, train loss %.4f, %.1f s",
        part.name,
        server_round,
        result.steps,
        result.mean_loss,
        result.seconds,
    )
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "train-seconds": result.seconds,
            "base-download-bytes": base.downloaded,
            "release-round": release_round,  # the release this delta is a change of (async: its staleness)
        }
    )
    if not record_dp:  # under record-level DP the loss is not noised: at batch 1 it is one example's exact loss
        metrics["train-loss"] = result.mean_loss
    metrics.update(own.metrics())  # memory-budget-mb and what this device chose to fit it
    base.downloaded = 0  # reported once
    if rank < cfg.lora.rank:  # the coordinator zero-pads it to the run's rank (shared/ranks.py)
        metrics["lora-rank"] = rank
        if cfg.aggregation.secure:  # masked vectors of one fleet have one shape
            delta = pad(delta, rank_shapes({k: tuple(v.shape) for k, v in delta.items()}, cfg.lora.rank))
    if record_epsilon is not None:
        metrics["dp-record-epsilon"] = record_epsilon
    if cfg.dp.enabled and cfg.dp.clipping == "client":  # the delta leaves this device already clipped
        arrays, norm, clipped = clip_and_pack(delta, cfg.dp.clip_norm, cfg.aggregation.delta_encoding)
        metrics["dp-clipped"] = int(clipped)
        clip_norm = cfg.dp.clip_norm
        log(
            logging.INFO, "client %s round %d: delta norm %.4g, clipped to %g", part.name, server_round, norm, clip_norm
        )
        return _reply(msg, part, metrics, arrays=arrays)
    return _reply(msg, part, metrics, arrays=pack(delta, cfg.aggregation.delta_encoding))


def _evaluate(msg: Message, context: Context) -> Message:
    cfg = FleetConfig.from_run_config(context.run_config)
    part = partition_for(context.node_config, cfg)
    _round_config(msg)
    base = _base(cfg, context, part)
    rank = device_training(context.node_config, cfg, base.spec).rank  # the rank it trains at: one runtime
    model, tok = _runtime(base.spec, cfg.lora, cfg.seed, cfg.train.dtype, rank)
    _install(msg, context, cfg, part, model, base.digest, rank)
    data = _encoded(part.heldout_file, base.spec, cfg.train.max_seq_len)
    result = evaluate(model, data, cfg.eval, tok.pad_token_id)
    metrics = MetricRecord(
        {"num-examples": result.examples, "heldout-loss": result.loss, "heldout-tokens": result.tokens}
    )
    return _reply(msg, part, metrics)


def _log_plan(own: DeviceTraining, part: Partition, server_round: int) -> None:
    """Tell the operator what a memory budget made this device choose."""
    if own.plan is None:
        return
    p = own.plan
    log(
        logging.INFO,
        "client %s round %d: memory budget %d MB: rank %d, micro-batch %d, gradient checkpointing %s "
        "(estimated peak %d MB)",
        part.name,
        server_round,
        p.budget_mb,
        p.rank,
        p.micro_batch_size,
        "on" if p.gradient_checkpointing else "off",
        p.footprint_mb,
    )


def _train_record_dp(
    model: Any,
    data: list[Encoded],
    cfg: FleetConfig,
    pad_id: int,
    context: Context,
    part: Partition,
    floor: device.PrivacyFloor,
) -> tuple[TrainResult, float]:
    """DP-SGD on this device's examples (``dp.level = record``); its ledger lives beside its replay store."""
    cap = floor.epsilon_cap(cfg.dp.max_epsilon or None)  # the device's own cap too
    dp = RecordDp(cfg.dp.noise_multiplier, cfg.dp.clip_norm, floor.accounting_delta(cfg.dp.delta), cap)
    ledger = Ledger(device.state_file(context.node_config, part.name).parent / LEDGER_FILE)
    loss, epsilon, seconds = train_record_dp(model, data, cfg.train, pad_id, dp, ledger)
    log(logging.INFO, "client %s: record-level DP-SGD, epsilon %.4g at delta %g so far", part.name, epsilon, dp.delta)
    return TrainResult(mean_loss=loss, steps=cfg.train.steps, seconds=seconds), epsilon


def _install(
    msg: Message, context: Context, cfg: FleetConfig, part: Partition, model: Any, base_digest: str, rank: int
) -> int:
    """Verify the message's signed release against this device's trust list, base and history; load it.

    Returns the release's round (its signed manifest's).

    A device training at ``rank`` below the run's loads the release's first ``rank`` components.

    A device that missed more published rounds than the message carries chain manifests for
    fetches the missing ones from the artifact service (int4 base), else it refuses the release.
    """
    config, arrays = _round_config(msg), msg.content["arrays"] if "arrays" in msg.content else None
    release = release_from_records(arrays, config)
    links = links_from_config(config)
    accepted = AcceptedReleases(device.state_file(context.node_config, part.name))
    trust = device.load_trust(context.node_config)
    own_rank = rank if rank < cfg.lora.rank else None
    run_id = cfg.release_run_id(context.run_id)  # as the coordinator signs them: another run's release is refused
    try:
        return install_release(model, release, trust, base_digest, accepted, links, own_rank, run_id).round
    except ChainGapError as gap:
        if cfg.base.format != "int4":
            raise
        tls = device.channel_credentials(context.node_config)
        more = fetch_links(cfg.base.address, gap.manifest, gap.accepted_round, trust, credentials=tls)
        return install_release(model, release, trust, base_digest, accepted, [*links, *more], own_rank, run_id).round


@dataclass
class _Base:
    spec: str  # what load_model gets: the fetched 4-bit folder, or the float model spec
    digest: str  # what adapter releases must name
    downloaded: int  # bytes of base this process downloaded (reported once)


_BASES: dict[tuple[str, ...], _Base] = {}


def _base(cfg: FleetConfig, context: Context, part: Partition) -> _Base:
    """Return the base this device trains on: fetched once from the artifact service (int4), or ``model``.

    The fetched base is checked against, and pinned in, the device's replay store: an older base
    (or another of the same age) is refused (``shared/chain.py``).
    """
    device.check_base_format(cfg.base.format, context.node_config)  # a run config cannot switch verification off
    cache = device.release_cache(context.node_config)
    key = (cfg.base.format, cfg.base.address, cfg.model, str(cache))
    if key not in _BASES:
        if cfg.base.format == "float":
            _BASES[key] = _Base(cfg.model, model_digest(cfg.model), 0)
        else:
            trust, tls = device.load_trust(context.node_config), device.channel_credentials(context.node_config)
            accepted = AcceptedReleases(device.state_file(context.node_config, part.name))
            got = fetch_release(cfg.base.address, "base", cache, trust, credentials=tls, accepted=accepted)
            log(logging.INFO, "device base: %s (%d bytes downloaded)", got.folder, got.bytes_downloaded)
            _BASES[key] = _Base(str(got.folder), got.manifest.base_digest, got.bytes_downloaded)
    return _BASES[key]


def _dispatch(msg: Message) -> str:
    """Return the coordinator's task number under ``aggregation.mode = async`` ("" otherwise), for the seed.

    An async device may train twice on the same release: each task then draws other batches.
    """
    value = msg.content["config"].get("dispatch")
    return f"/{value}" if isinstance(value, int) and not isinstance(value, bool) else ""


def _refuse(msg: Message, name: str, server_round: int, exc: Exception) -> Message:
    """Reply that this device refused the round's release (or the round); its last good adapter stays active.

    The device's log names the error; one that is not a check of the round's input (a value or OS error
    from deeper down: a bug, or this device's own data) also gets its traceback there.
    """
    checked = isinstance(exc, (ReleaseError, WireError, SignatureError, FetchError, ConfigError, DataError))
    log(
        logging.WARNING,
        "client %s round %s: refused the release, keeping the last good adapter: %s: %s",
        name,
        server_round,
        type(exc).__name__,
        exc,
        exc_info=None if checked else exc,
    )
    content = RecordDict(
        {
            "metrics": MetricRecord({"refused-release": 1}),
            "client": ConfigRecord({"name": name, "refused-release": public_reason(exc)}),
        }
    )
    return Message(content, reply_to=msg)


_LOCAL_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/:]+/)*[^\s'\"/:]+")


def public_reason(exc: Exception) -> str:
    """Return why a release was refused, as the coordinator may read it: no path of this device in it.

    The device's log keeps the whole message; what leaves the device names the error, never where
    its cache or home folder is (an ``OSError``'s file name, a path inside a message).
    """
    if isinstance(exc, OSError):
        name = f": {Path(str(exc.filename)).name}" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}{name}"
    return _LOCAL_PATH.sub("<path>", str(exc))


def _reply(msg: Message, part: Partition, metrics: MetricRecord, arrays: Any = None) -> Message:
    content = RecordDict({"metrics": metrics, "client": ConfigRecord({"name": part.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=msg)


@functools.lru_cache(maxsize=1)
def _runtime(model_spec: str, lora: LoraConfig, seed: int, dtype: str, rank: int) -> tuple[Any, Any]:
    """Return the base model with a LoRA adapter of ``rank`` attached, kept for the life of the process."""
    model = attach_lora(load_model(model_spec, compute_dtype(dtype)), lora, seed, rank)
    return model, _tokenizer(model_spec)


@functools.lru_cache(maxsize=1)
def _tokenizer(model_spec: str) -> Any:
    return load_tokenizer(model_spec)


@functools.lru_cache(maxsize=8)
def _encoded(path: Any, model_spec: str, max_len: int) -> list[Encoded]:
    tok = _tokenizer(model_spec)
    return [encode(ex, tok, max_len) for ex in load_jsonl(path)]
