"""Flower strategy that aggregates LoRA adapters from their *deltas*, signs each result, keeps the round log.

Clients receive the global adapter as a signed release (``server/registry.py``), verify it, and
reply with ``delta_i = local_i - global`` (under FFA-LoRA, for B only). The server validates each
delta, rebuilds ``local_i = global + delta_i`` one reply at a time and folds it into the
configured streaming aggregator (``server/aggregate.py``); the new global is signed and stored
before it is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.aggregate import apply_update, make_aggregator
from server.registry import Registry
from server.report import RoundLog
from server.validate import check_size, check_update, norm_outliers, update_norm
from shared.adapter import ADAPTER_WEIGHTS, uploaded_keys
from shared.config import AggregationConfig, LoraConfig
from shared.manifest import Manifest
from shared.release import Release, load_tensors
from shared.release_records import release_config, release_to_records
from shared.wire import unpack, wire_bytes

INFO, WARNING = 20, 30


class AdapterStrategy(FedAvg):
    """Adapter aggregation by ``aggregation.method``, weighted by each client's example count.

    Flower's FedAvg supplies node sampling and message plumbing; aggregation is ours.
    ``round_offset`` is the number of rounds a resumed run had already signed (``server/resume.py``):
    Flower counts the rounds of this start from 1, the releases and the round log go on from there.
    """

    def __init__(
        self,
        round_log: RoundLog,
        min_clients: int,
        agg: AggregationConfig,
        lora: LoraConfig,
        registry: Registry,
        fractions: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        super().__init__(
            fraction_train=fractions[0],
            fraction_evaluate=fractions[1],
            min_train_nodes=min_clients,
            min_evaluate_nodes=min_clients,
            min_available_nodes=min_clients,
        )
        self.round_log = round_log
        self.agg, self.lora = agg, lora
        self.registry = registry
        self.round_offset = 0
        self._global: dict[str, Any] = {}
        self._bytes_down = 0
        self._refusals = 0
        self._sent: list[Message] = []  # the current phase's messages (their ids are set once sent)
        self._names: dict[int, str] = {}  # node id -> the name it reported

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global adapter this round starts from, attach its signature, sample and send."""
        release = self._release_of(arrays)
        self._global = load_tensors(release.files[ADAPTER_WEIGHTS])
        self._bytes_down = wire_bytes(arrays) + len(release.manifest_bytes) + len(release.signature)
        server_round += self.round_offset
        return self._sending(super().configure_train(server_round, arrays, self._signed(config, release), grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the round's release, with its signature, for federated evaluation."""
        signed = self._signed(config, self._release_of(arrays))
        return self._sending(super().configure_evaluate(server_round + self.round_offset, arrays, signed, grid))

    def _sending(self, messages: Iterable[Message]) -> list[Message]:
        """Remember which nodes this phase waits for (to name the ones that do not reply in time)."""
        self._sent = list(messages)
        return self._sent

    def _node_of(self, reply: Message) -> int:
        """Return the node a reply is about (the SuperLink's own error replies, e.g. node unavailable, name itself)."""
        for sent in self._sent:
            if sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _log_silent(self, server_round: int, replies: list[Message], phase: str) -> None:
        """Log and record every node sent a message this phase that did not reply within the round timeout."""
        for node in sorted({m.metadata.dst_node_id for m in self._sent} - {self._node_of(m) for m in replies}):
            name = self._names.get(node, f"node-{node}")
            log(
                WARNING,
                "round %d: %s sent no %s reply before the round timeout; the round goes on without it "
                "(a slow or disconnected device; raise run-config round-timeout if it is merely slow)",
                server_round,
                f"{name} (node {node})" if node in self._names else f"node {node}",
                phase,
            )
            self.round_log.client(server_round, name, node_id=node, timed_out=phase)

    def initial_arrays(self, state: Mapping[str, Any]) -> ArrayRecord:
        """Sign the initial adapter as release 0 and return what the first messages carry."""
        release, manifest = self.registry.publish(0, state)
        self.record_release(0, manifest)
        return release_to_records(release)[0]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every delta, fold the accepted ones into the aggregator, return the new global.

        Two passes, one decoded update in memory at a time: the first checks each update alone
        and takes its norm, the norm-outlier rule then needs the whole round; the second folds.
        """
        server_round += self.round_offset
        replies = list(replies)
        self._log_silent(server_round, replies, "train")
        valid = self._refused_release(server_round, self._valid_replies(server_round, replies, "sent no update", True))
        parsed: dict[int, tuple[Message, float, dict[str, Any]]] = {}
        norms: dict[int, float] = {}
        for i, msg in enumerate(valid):
            try:
                delta, weight, entry = self._parse_update(msg)
            except (KeyError, TypeError, ValueError) as exc:
                self._reject(server_round, msg, str(exc))
                continue
            parsed[i], norms[i] = (msg, weight, entry), update_norm(delta)
        for i, reason in norm_outliers(norms, self.agg.max_norm_ratio).items():
            self._reject(server_round, parsed.pop(i)[0], reason)

        metrics = MetricRecord(
            {
                "rejected-updates": len(valid) - len(parsed),
                "refused-releases": self._refusals,
                "failed-replies": len(replies) - len(valid) - self._refusals,
                "bytes-down": self._bytes_down * len(replies),
            }
        )
        if len(parsed) < self.agg.min_accepted:
            log(
                WARNING,
                "round %d: %d of %d client updates passed validation, fewer than aggregation.min-accepted = %d; "
                "the global adapter stays as it was",
                server_round,
                len(parsed),
                len(replies),
                self.agg.min_accepted,
            )
            return None, metrics

        aggregator = make_aggregator(
            self.agg.method, self._global, self.lora.rank, self.lora.alpha, self.agg.ties_density, self.agg.ties_lambda
        )
        bytes_up = 0
        for i, (msg, weight, entry) in parsed.items():
            delta, _, _ = self._parse_update(msg)  # decoded again: one update in memory at a time
            aggregator.add(apply_update(self._global, delta), weight)
            nbytes = wire_bytes(msg.content["arrays"])
            bytes_up += nbytes
            self.round_log.client(
                server_round,
                self.name_of(msg),
                node_id=msg.metadata.src_node_id,
                **entry,
                update_norm=norms[i],
                bytes_up=nbytes,
                bytes_down=self._bytes_down,
            )
        accepted = [msg for msg, _, _ in parsed.values()]
        for key, value in self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key).items():
            metrics[key] = value
        metrics["bytes-up"] = bytes_up
        log(
            INFO,
            "round %d: aggregated %d of %d client updates (%s, %s deltas), mean train loss %.4f",
            server_round,
            len(accepted),
            len(replies),
            self.agg.method,
            self.agg.delta_encoding,
            sum(e["train_loss"] for _, _, e in parsed.values()) / len(parsed),
        )
        release, manifest = self.registry.publish(server_round, aggregator.result())
        self.record_release(server_round, manifest)
        return release_to_records(release)[0], metrics

    def _parse_update(self, msg: Message) -> tuple[dict[str, Any], float, dict[str, Any]]:
        """Return a reply's delta, weight and round-log entry, or raise with the reason it cannot count."""
        weight = _metric(msg, "num-examples")
        entry = {
            "num_examples": int(weight),
            "train_loss": _metric(msg, "train-loss"),
            "train_seconds": _metric(msg, "train-seconds"),
        }
        downloaded = msg.content["metrics"].get("base-download-bytes")
        if isinstance(downloaded, int | float) and not isinstance(downloaded, bool):
            entry["base_download_bytes"] = int(downloaded)  # the 4-bit base, fetched once per device
        expected = {k: self._global[k] for k in uploaded_keys(self.agg.method, self._global)}
        shapes = {k: tuple(v.shape) for k, v in expected.items()}
        record = msg.content["arrays"]
        check_size(wire_bytes(record), shapes, self.agg.delta_encoding)
        delta = unpack(record, shapes, self.agg.delta_encoding)
        check_update(delta, expected, weight)
        return delta, weight, entry

    def _reject(self, server_round: int, msg: Message, reason: str) -> None:
        """Log and record an update that does not count, with its client, node, round and reason."""
        name, node = self.name_of(msg), msg.metadata.src_node_id
        log(WARNING, "round %d: rejected the update of %s (node %d): %s", server_round, name, node, reason)
        self.round_log.client(server_round, name, node_id=node, rejected=reason)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each client's held-out loss and close the round in the log."""
        server_round += self.round_offset
        replies = list(replies)
        self._log_silent(server_round, replies, "evaluate")
        valid = self._valid_replies(server_round, replies, "could not evaluate", is_train=False)
        valid = self._refused_release(server_round, valid)
        for msg in valid:
            self.round_log.client(server_round, self.name_of(msg), heldout_loss=_metric(msg, "heldout-loss"))
        rec = self.round_log.close_round(server_round)
        if "mean_heldout_loss" in rec:
            per_client = ", ".join(
                f"{n} {c['heldout_loss']:.4f}" for n, c in sorted(rec["clients"].items()) if "heldout_loss" in c
            )
            log(INFO, "round %d: mean held-out loss %.4f (%s)", server_round, rec["mean_heldout_loss"], per_client)
        if not valid:
            return None
        return self.evaluate_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)

    def _refused_release(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Log and record the replies of devices that refused the release; return the others."""
        kept = []
        self._refusals = 0
        for msg in replies:
            reason = msg.content["client"].get("refused-release") if "client" in msg.content else None
            if reason is None:
                kept.append(msg)
                continue
            self._refusals += 1
            name, node = self.name_of(msg), msg.metadata.src_node_id
            log(WARNING, "round %d: %s (node %d) refused the signed release: %s", server_round, name, node, reason)
            self.round_log.client(server_round, name, node_id=node, refused_release=str(reason))
        return kept

    def _release_of(self, arrays: ArrayRecord) -> Release:
        """Return the signed release whose files ``arrays`` carries (always the registry's latest)."""
        if self.registry.latest is None:
            raise RuntimeError("no release published yet: start with initial_arrays()")
        release = self.registry.latest[0]
        if set(release.files) != set(arrays.keys()):
            raise RuntimeError("the arrays to send are not the latest signed release")
        return release

    @staticmethod
    def _signed(config: ConfigRecord, release: Release) -> ConfigRecord:
        signed = ConfigRecord(dict(config))
        for key, value in release_config(release).items():
            signed[key] = value
        return signed

    def record_release(self, server_round: int, manifest: Manifest) -> None:
        """Record in the round log (and its state store) that ``server_round`` ended with this signed release."""
        release = {
            "key_id": manifest.key_id,
            "manifest": manifest.digest(),
            "created": manifest.created,
            "path": str(self.registry.release_folder(server_round)),
        }
        self.round_log.note(server_round, release=release)

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Federated evaluation of the initial adapter (round 0: the base model's held-out loss)."""
        replies = grid.send_and_receive(self.configure_evaluate(0, arrays, ConfigRecord(), grid), timeout=timeout)
        self.aggregate_evaluate(0, replies)

    def name_of(self, msg: Message) -> str:
        """Return the reply's client name, remembered for the node (to name it if it later goes silent)."""
        name = _name(msg)
        self._names[msg.metadata.src_node_id] = name
        return name

    def _valid_replies(self, server_round: int, replies: list[Message], failure: str, is_train: bool) -> list[Message]:
        """Return the replies that carry content; log each failed one with its node and reason."""
        valid, failed = self._check_and_log_replies(replies, is_train=is_train, validate=False)
        for msg in failed:
            log(
                WARNING,
                "round %d: node %d %s (%s); the round goes on with the others",
                server_round,
                self._node_of(msg),
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
