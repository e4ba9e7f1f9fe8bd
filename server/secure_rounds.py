"""Secure rounds of the strategy: the train exchange replaced by SecAgg+, the global from the sum alone.

With ``aggregation.secure = 1`` a round's train messages are not sent as they are: their content
goes into the protocol (``server/secagg/protocol.py``: five Message exchanges), and what comes back
is the float32 sum of the survivors' deltas, their metrics and names, and who fell out. The new
global is ``global + sum / n`` over the n survivors (uniform weights: a weight would have to be
applied before masking, by the device, on its own claim), or under client-level DP the noised
fixed-denominator mean of ``server/privacy/`` with the sum as the round's only contribution. What
secure aggregation rules out: the per-update checks (norm rule, per-update finiteness) cannot see a
masked update; devices clip (``dp.clipping = client``), every entry is quantized from a bounded
range [-c, c], and the sum is checked finite and in range before signing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.replies import Refusal, TrainReply, mean_train_loss, parse_secure_train
from server.secagg.params import SecAggConfigError, SecAggParams, sensitivity
from server.secagg.protocol import SecAggAbortedError, SecAggResult, run_secagg
from server.validate import check_aggregate
from shared.config import FleetConfig

if TYPE_CHECKING:
    from server.strategy import AdapterStrategy


def secagg_params(cfg: FleetConfig) -> SecAggParams:
    """Return the run's SecAgg+ parameters, checked (``SecAggConfigError`` names the key)."""
    agg = cfg.aggregation
    return SecAggParams(
        num_shares=agg.secure_shares,
        threshold=agg.secure_threshold,
        clip_range=cfg.secure_clip_range,
        max_devices=agg.secure_max_devices,
        timeout=cfg.round_timeout,
    )


@dataclass(frozen=True)
class SecureOutcome:
    """What a secure round left for ``aggregate_train``: its result, or why it failed."""

    sent: tuple[int, ...]
    result: SecAggResult | None
    failure: str | None


class SecureRounds:
    """Runs one SecAgg+ round per train phase and keeps its outcome for the aggregation."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.pending: SecureOutcome | None = None

    def run(
        self, grid: Grid, messages: Iterable[Message], shapes: Mapping[str, tuple[int, ...]], server_round: int
    ) -> None:
        """Run the protocol on the round's train messages; its outcome waits in :attr:`pending`."""
        contents = {m.metadata.dst_node_id: m.content for m in messages}
        sent = tuple(sorted(contents))
        try:
            result = run_secagg(grid, contents, shapes, self.params, server_round)
        except (SecAggAbortedError, SecAggConfigError) as exc:
            log(logging.ERROR, "round %d: secure aggregation failed (%s); the global adapter stays", server_round, exc)
            self.pending = SecureOutcome(sent, None, str(exc)[:500])
            return
        self.pending = SecureOutcome(sent, result, None)

    def take(self) -> SecureOutcome:
        """Return the outcome of the round just run, once."""
        if self.pending is None:
            raise RuntimeError("no secure round was run before its aggregation")
        outcome, self.pending = self.pending, None
        return outcome


def mean_of_sum(global_: Mapping[str, torch.Tensor], total: Mapping[str, torch.Tensor], count: int) -> dict[str, Any]:
    """Return ``global_`` plus the uniform mean ``total / count`` on the summed tensors."""
    out = {k: v.float().clone() for k, v in global_.items()}
    for key, value in total.items():
        out[key] += value.float() / count
    return out


def aggregate_secure(strategy: AdapterStrategy, server_round: int, outcome: SecureOutcome) -> tuple[Any, MetricRecord]:
    """Record a secure round and sign the global built from its sum; None (the global stays) if it failed.

    A device whose masked vector is in the sum counts in it whatever its metrics say: the sum
    cannot be taken apart. Metrics that do not parse are rejected (logged), the vector stays.
    """
    tally = {"failed-replies": 0, "refused-releases": 0, "rejected-updates": 0, "secure-survivors": 0}
    if outcome.result is None:
        return None, MetricRecord({**tally, "failed-replies": len(outcome.sent)})
    result = outcome.result
    for node, reason in result.rejected.items():
        tally["failed-replies"] += 1
        strategy.intake.reject(
            server_round, node, strategy.roster.names.get(node), f"fell out of secure aggregation: {reason}"
        )
    replies = _parse_metrics(strategy, server_round, result, tally)
    survivors = len(result.survivors)
    tally["secure-survivors"] = survivors
    up, down = sum(result.bytes_up.values()), sum(result.bytes_down.values())
    metrics = MetricRecord({**tally, "bytes-up": up, "bytes-down": down})
    if (loss := mean_train_loss(replies)) is not None:
        metrics["train-loss"] = loss
    if strategy.too_few(survivors):
        log(logging.WARNING, "round %d: %d devices in the secure sum, fewer than aggregation.min-accepted = %d; "
            "the global adapter stays as it was", server_round, survivors, strategy.agg.min_accepted)  # fmt: skip
        return None, metrics
    try:
        if strategy.dp is not None:  # the sum is the round's only contribution; m, z, C as without SecAgg
            entries = sum(v.numel() for v in result.total.values())  # the rounding adds to C: noise for both
            bound = sensitivity(strategy.secure.params, entries) if strategy.secure is not None else None
            state = strategy.dp.aggregate(strategy.global_adapter, result.total, [result.total], bound)
        else:
            state = mean_of_sum(strategy.global_adapter, result.total, survivors)
        check_aggregate(state)
    except Exception as exc:  # noqa: BLE001 (whatever went wrong, nothing unchecked is signed)
        log(logging.ERROR, "round %d: the secure aggregate was refused (%s); nothing is signed this round",
            server_round, str(exc)[:300])  # fmt: skip
        return None, metrics
    strategy.round_log.note(server_round, secure=_secure_record(strategy, result))
    published = strategy.sign(server_round, state)
    clipped = sum(r.dp_clipped for r in replies) / len(replies) if replies else 0.0
    strategy.spend_privacy(server_round, clipped, metrics)
    log(logging.INFO, "round %d: securely aggregated %d devices (%d recovered after dropping out), %s",
        server_round, survivors, len(result.recovered), strategy.agg.method)  # fmt: skip
    return published, metrics


def _parse_metrics(
    strategy: AdapterStrategy, server_round: int, result: SecAggResult, tally: dict[str, int]
) -> list[TrainReply]:
    """Parse each survivor's metrics and name (``server/replies.py``); record them in the round log."""
    replies = []
    for node, content in result.replies.items():
        try:
            reply = parse_secure_train(content, node, strategy.agg.max_examples)
        except Exception as exc:  # noqa: BLE001 (one device's reply: a rejection, never a crash)
            tally["rejected-updates"] += 1
            strategy.intake.reject(server_round, node, strategy.roster.names.get(node), f"its metrics: {exc}"[:500])
            continue
        strategy.roster.names[node] = reply.name
        if isinstance(reply, Refusal):
            tally["refused-releases"] += 1
            strategy.round_log.client(server_round, node, reply.name, refused_release=reply.reason)
            continue
        entry: dict[str, Any] = {"num_examples": reply.num_examples, "secure": True}
        if reply.train_loss is not None:
            entry["train_loss"] = reply.train_loss
        entry |= {"train_seconds": reply.train_seconds, "bytes_up": result.bytes_up.get(node, 0)}
        entry["bytes_down"] = result.bytes_down.get(node, 0)  # the release, its neighbours' keys and shares
        if strategy.dp is not None:
            entry["clipped"] = reply.dp_clipped
        if reply.rank is not None:  # trained below lora.rank, its delta padded before masking (shared/ranks.py)
            entry["lora_rank"] = reply.rank
        strategy.round_log.client(server_round, node, reply.name, **entry)
        replies.append(reply)
    return replies


def _secure_record(strategy: AdapterStrategy, result: SecAggResult) -> dict[str, Any]:
    """Return what the round log (and the dashboard) says of a secure round."""
    params = strategy.secure.params if strategy.secure is not None else None
    return {
        "survivors": len(result.survivors),
        "recovered": len(result.recovered),
        "dropped": len(result.rejected),
        "enrolled": len(result.enrolled),
        "shares": params.num_shares if params else None,
        "threshold": params.threshold if params else None,
        "clip_range": params.clip_range if params else None,
    }
