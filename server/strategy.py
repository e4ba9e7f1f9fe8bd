"""Flower strategy that aggregates LoRA adapters from their *deltas* and keeps the round log.

Clients receive the global adapter and reply with ``delta_i = local_i - global`` (under FFA-LoRA,
for B only). The server rebuilds ``local_i = global + delta_i`` one reply at a time and folds it
into the configured streaming aggregator (``server/aggregate.py``), which yields the new global.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.aggregate import NoUpdatesError, apply_update, make_aggregator
from server.report import RoundLog
from server.validate import check_update
from shared.adapter import from_wire, to_wire, uploaded_keys, wire_bytes
from shared.config import AggregationConfig, LoraConfig

INFO, WARNING = 20, 30


class AdapterStrategy(FedAvg):
    """Adapter aggregation by ``aggregation.method``, weighted by each client's example count.

    Flower's FedAvg supplies node sampling and message plumbing; aggregation is ours.
    """

    def __init__(self, round_log: RoundLog, min_clients: int, agg: AggregationConfig, lora: LoraConfig) -> None:
        super().__init__(min_train_nodes=min_clients, min_evaluate_nodes=min_clients, min_available_nodes=min_clients)
        self.round_log = round_log
        self.agg, self.lora = agg, lora
        self._global: dict[str, Any] = {}
        self._bytes_down = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global adapter this round starts from, then sample and send."""
        self._global = from_wire(arrays)
        self._bytes_down = wire_bytes(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold every valid delta into the weighted mean and apply it to the global adapter."""
        replies = list(replies)
        valid = self._valid_replies(server_round, replies, "sent no update", is_train=True)
        if not valid:
            log(WARNING, "round %d: no client update arrived; the global adapter stays as it was", server_round)
            return None, None

        accepted: list[Message] = []
        losses: list[float] = []
        aggregator = make_aggregator(
            self.agg.method, self._global, self.lora.rank, self.lora.alpha, self.agg.ties_density, self.agg.ties_lambda
        )
        for msg in valid:  # one client adapter in memory at a time
            name, node = _name(msg), msg.metadata.src_node_id
            try:
                update, weight, entry = self._parse_update(msg)
                aggregator.add(apply_update(self._global, update), weight)
            except (KeyError, TypeError, ValueError) as exc:
                log(WARNING, "round %d: rejected the update of %s (node %d): %s", server_round, name, node, exc)
                self.round_log.client(server_round, name, node_id=node, rejected=str(exc))
                continue
            accepted.append(msg)
            losses.append(entry["train_loss"])
            self.round_log.client(
                server_round,
                name,
                node_id=node,
                **entry,
                bytes_up=wire_bytes(msg.content["arrays"]),
                bytes_down=self._bytes_down,
            )
        try:
            new_global = aggregator.result()
        except NoUpdatesError:
            log(WARNING, "round %d: every update was rejected; the global adapter stays as it was", server_round)
            return None, None
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        metrics["rejected-updates"] = len(valid) - len(accepted)
        metrics["failed-replies"] = len(replies) - len(valid)
        log(
            INFO,
            "round %d: aggregated %d of %d client updates (%s), mean train loss %.4f",
            server_round,
            len(accepted),
            len(replies),
            self.agg.method,
            sum(losses) / len(losses),
        )
        return to_wire(new_global), metrics

    def _parse_update(self, msg: Message) -> tuple[dict[str, Any], float, dict[str, Any]]:
        """Return a reply's delta, weight and round-log entry, or raise with the reason it cannot count."""
        weight = _metric(msg, "num-examples")
        entry = {
            "num_examples": int(weight),
            "train_loss": _metric(msg, "train-loss"),
            "train_seconds": _metric(msg, "train-seconds"),
        }
        delta = from_wire(msg.content["arrays"])
        expected = {k: self._global[k] for k in uploaded_keys(self.agg.method, self._global)}
        check_update(delta, expected, weight)
        return delta, weight, entry

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each client's held-out loss and close the round in the log."""
        valid = self._valid_replies(server_round, list(replies), "could not evaluate", is_train=False)
        for msg in valid:
            self.round_log.client(server_round, _name(msg), heldout_loss=_metric(msg, "heldout-loss"))
        rec = self.round_log.close_round(server_round)
        if "mean_heldout_loss" in rec:
            per_client = ", ".join(
                f"{n} {c['heldout_loss']:.4f}" for n, c in sorted(rec["clients"].items()) if "heldout_loss" in c
            )
            log(INFO, "round %d: mean held-out loss %.4f (%s)", server_round, rec["mean_heldout_loss"], per_client)
        if not valid:
            return None
        return self.evaluate_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Federated evaluation of the initial adapter (round 0: the base model's held-out loss)."""
        replies = grid.send_and_receive(self.configure_evaluate(0, arrays, ConfigRecord(), grid), timeout=timeout)
        self.aggregate_evaluate(0, replies)

    def _valid_replies(self, server_round: int, replies: list[Message], failure: str, is_train: bool) -> list[Message]:
        """Return the replies that carry content; log each failed one with its node and reason."""
        valid, failed = self._check_and_log_replies(replies, is_train=is_train, validate=False)
        for msg in failed:
            log(
                WARNING,
                "round %d: node %d %s (%s); the round goes on with the others",
                server_round,
                msg.metadata.src_node_id,
                failure,
                msg.error.reason,
            )
        return valid


def _metric(msg: Message, key: str) -> float:
    """Return a numeric metric from a client reply, refusing a missing or non-numeric one."""
    value = msg.content["metrics"].get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"node {msg.metadata.src_node_id} sent metric '{key}' = {value!r}, expected a number")
    return float(value)


def _name(msg: Message) -> str:
    """Return the client's reported name (its topic or node-config name), else its node id."""
    try:
        return str(msg.content["client"]["name"])
    except KeyError:
        return f"node-{msg.metadata.src_node_id}"
