"""Flower strategy that aggregates LoRA adapters from their *deltas* and signs each result.

Clients receive the global adapter as a signed release (``server/registry.py``), verify it, and
reply with ``delta_i = local_i - global`` (under FFA-LoRA, for B only). Every reply is parsed at
the trust boundary (``server/replies.py``) before anything uses it; a reply that cannot count is
rejected with its reason and the round goes on with the others. The server rebuilds
``local_i = global + delta_i`` one reply at a time (a delta of a lower-rank device zero-padded,
``shared/ranks.py``) and folds it into the configured aggregator: fedavg and ffa stream
(``server/aggregate.py``), exact and ties spool the round's updates and aggregate module by
module (``server/modulewise.py``, ``server/spool.py``); the new global is checked finite and in range
(``server/validate.py``), then signed and stored before it is sent. Who answered and who stayed
silent is ``server/roster.py``; how each reply is taken in, logged and recorded ``server/intake.py``;
the round log is ``server/report.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.intake import Intake, rejection_reason
from server.modulewise import round_aggregator
from server.privacy.rounds import DpRounds
from server.registry import Registry
from server.replies import (
    EvalReply,
    TrainReply,
    UpdateSpec,
    check_release_round,
    decode_update,
    mean_train_loss,
    parse_evaluate,
    parse_train,
)
from server.report import RoundLog
from server.roster import Roster
from server.secure_rounds import SecureRounds, aggregate_secure
from server.validate import check_aggregate, contribution_norms, norm_outliers
from shared.adapter import ADAPTER_WEIGHTS, uploaded_keys
from shared.clipping import update_norm
from shared.config import AggregationConfig, LoraConfig
from shared.manifest import Manifest
from shared.release import Release, load_tensors
from shared.release_records import links_config, release_config, release_to_records
from shared.wire import wire_bytes


class AdapterStrategy(FedAvg):
    """Adapter aggregation by ``aggregation.method``, weighted by each client's example count.

    Flower's FedAvg supplies node sampling and message plumbing; parsing and aggregation are ours.
    With ``dp`` (client-level differential privacy, ``server/privacy/``) the round's devices are
    Poisson-sampled, each delta's contribution is clipped, weights are uniform, the mean is noised
    and the round's epsilon is recorded; the norm-outlier rule is off (clipping bounds every device,
    and a rule that compares devices would let one device's data decide another's fate).
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
        dp: DpRounds | None = None,
        secure: SecureRounds | None = None,
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
        self.roster = Roster()
        self.intake = Intake(self.roster, round_log)
        self.dp, self.secure = dp, secure
        self._global: dict[str, Any] = {}
        self.bytes_down = 0
        self.sent_round = 0  # the round of the release this round's devices were sent

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global adapter this round starts from, attach its signature, sample and send."""
        release = self._release_of(arrays)
        self._global = load_tensors(release.files[ADAPTER_WEIGHTS])
        self.sent_round = self._latest_round()
        signed, signed_bytes = self._signed(config, release)
        self.bytes_down = wire_bytes(arrays) + signed_bytes
        server_round += self.round_offset
        messages = self._sample_train(server_round, arrays, signed, grid)
        self.round_log.round(server_round)  # the round's clock starts as its messages go out, not at the first reply
        if self.secure is None:
            return self.roster.sending(messages)
        self.secure.run(grid, messages, self.uploaded_shapes(), server_round)  # five exchanges of its own
        return []  # aggregate_train takes the sum from self.secure

    def _sample_train(self, server_round: int, arrays: ArrayRecord, signed: ConfigRecord, grid: Grid) -> list[Message]:
        """Return the round's train messages: Flower's sampling, or Poisson sampling under DP."""
        if self.dp is None:
            return list(super().configure_train(server_round, arrays, signed, grid))
        self.dp.check_next()  # BudgetExhaustedError: server_app ends the run with the last signed release
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)
        nodes = self.dp.sample(connected)
        log(logging.INFO, "round %d: dp: Poisson-sampled %d of %d devices", server_round, len(nodes), len(connected))
        signed["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: signed})
        return list(self._construct_messages(record, nodes, MessageType.TRAIN))

    @property
    def global_adapter(self) -> dict[str, Any]:
        """The global adapter this round started from (the latest signed release's tensors)."""
        return self._global

    def uploaded_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return the shapes of the tensors a device uploads this round (under FFA-LoRA only B)."""
        return {k: tuple(self._global[k].shape) for k in uploaded_keys(self.agg.method, self._global)}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the round's release, with its signature, for federated evaluation."""
        signed, _ = self._signed(config, self._release_of(arrays))
        return self.roster.sending(super().configure_evaluate(server_round + self.round_offset, arrays, signed, grid))

    def initial_arrays(self, state: Mapping[str, Any]) -> ArrayRecord:
        """Sign the initial adapter as release 0 and return what the first messages carry."""
        release, manifest = self.registry.publish(0, state)
        self.record_release(0, manifest)
        return release_to_records(release)[0]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Parse every reply, fold the accepted deltas into the aggregator, sign and return the new global.

        Two passes, one decoded update in memory at a time: the first checks each update alone
        and takes its norm, the norm-outlier rule then needs the whole round; the second folds.
        """
        server_round += self.round_offset
        if self.secure is not None:
            return aggregate_secure(self, server_round, self.secure.take())
        replies = list(replies)
        self.intake.log_silent(server_round, replies, "train")
        spec = UpdateSpec(
            {k: self._global[k] for k in uploaded_keys(self.agg.method, self._global)},
            self.agg.delta_encoding,
            self.agg.max_examples,
        )
        parsed, tally = self.intake.parse(server_round, replies, lambda m, n: parse_train(m, n, spec))
        updates: dict[int, TrainReply] = {}
        norms: dict[int, float] = {}
        clipped: dict[int, bool] = {}
        for reply in parsed:
            assert isinstance(reply, TrainReply)
            try:
                norms[reply.node_id], clipped[reply.node_id] = self.measure(reply, spec)
            except Exception as exc:  # noqa: BLE001 (one device's payload: a rejection, never a crash)
                self.intake.reject(server_round, reply.node_id, reply.name, rejection_reason(exc))
                continue
            updates[reply.node_id] = reply
        if self.dp is None:
            weights = {n: float(u.num_examples) for n, u in updates.items()}
            contributions = contribution_norms(norms, weights) if updates else {}
            for node, reason in norm_outliers(contributions, self.agg.max_norm_ratio).items():
                self.intake.reject(server_round, node, updates.pop(node).name, reason)
        tally["rejected-updates"] += len(parsed) - len(updates)
        metrics = self._train_metrics(tally, replies, updates)
        if self.too_few(len(updates)):
            log(
                logging.WARNING,
                "round %d: %d of %d client updates passed validation, fewer than aggregation.min-accepted = %d; "
                "the global adapter stays as it was",
                server_round,
                len(updates),
                len(replies),
                self.agg.min_accepted,
            )
            return None, metrics
        published = self._aggregate(server_round, updates, spec, norms, clipped)
        if published is not None:
            self.spend_privacy(server_round, sum(clipped.values()) / max(1, len(updates)), metrics)
        return published, metrics

    def too_few(self, accepted: int) -> bool:
        """Whether ``accepted`` updates are too few to release (below ``aggregation.min-accepted``; never under DP).

        Under DP every round releases: whether a round released would depend on how many devices took
        part, a count the noise does not cover, and a round that released nothing spent nothing.
        """
        return self.dp is None and accepted < self.agg.min_accepted

    def spend_privacy(self, server_round: int, clipped_fraction: float, metrics: MetricRecord) -> None:
        """Under DP, account for the round just released and record its epsilon (log, round log, metrics)."""
        if self.dp is None:
            return
        privacy = self.dp.spend(clipped_fraction, server_round)
        self.round_log.note(server_round, privacy=privacy)
        metrics["dp-epsilon"] = privacy["epsilon"]

    def measure(self, reply: TrainReply, spec: UpdateSpec, sent: int | None = None) -> tuple[float, bool]:
        """Decode and check one update; return its norm and whether its contribution is (or was) clipped.

        ``sent``: the round of the release its device was sent (default: this round's).
        """
        check_release_round(reply, self.sent_round if sent is None else sent)
        delta = decode_update(reply, spec)
        if self.dp is None:
            return update_norm(delta), False
        _, norm, clipped = self.dp.contribution(delta)
        return norm, clipped or reply.dp_clipped

    def _fold(
        self, updates: Mapping[int, TrainReply], spec: UpdateSpec, weights: Mapping[int, float] | None = None
    ) -> dict[str, Any]:
        """Return the aggregate of the accepted updates, decoding them again one at a time.

        fedavg / ffa fold each ``global + delta`` at once; exact / ties spool the deltas and
        aggregate module by module (``server/modulewise.py``): bounded memory at any model size.
        ``weights`` (asynchronous rounds, fedavg / ffa only): update i counts w_i instead of its
        example count n_i, and the step is scaled by sum(w) / sum(n), so the new global is
        ``global + sum_i w_i delta_i / sum_i n_i`` (``server/async_rounds.py``).
        """
        if self.dp is not None:
            contributions = (self.dp.contribution(decode_update(r, spec))[0] for r in updates.values())
            return self.dp.aggregate(self._global, spec.expected, contributions)
        aggregator = round_aggregator(
            self.agg.method,
            self._global,
            self.lora.rank,
            self.lora.alpha,
            self.agg.ties_density,
            self.agg.ties_lambda,
            dtype=torch.float16 if spec.encoding == "fp16" else torch.float32,  # what the wire carried, losslessly
            workers=self.agg.workers,
            address=self.agg.ray_address,
        )
        weight = {n: float(r.num_examples) if weights is None else weights[n] for n, r in updates.items()}
        try:  # exact / ties spool to TMPDIR; the spool goes when the round ends, folded or not
            for node, reply in updates.items():
                aggregator.add(decode_update(reply, spec), weight[node])
            state = aggregator.result()
        finally:
            aggregator.close()
        step = sum(weight.values()) / sum(float(r.num_examples) for r in updates.values())
        if weights is None or step == 1.0:
            return state
        return {k: self._global[k] + step * (v - self._global[k]) for k, v in state.items()}

    def _aggregate(
        self,
        server_round: int,
        updates: Mapping[int, TrainReply],
        spec: UpdateSpec,
        norms: Mapping[int, float],
        clipped: Mapping[int, bool],
        weights: Mapping[int, float] | None = None,
        notes: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> ArrayRecord | None:
        """Fold the accepted updates, check the aggregate, sign and store it; None if it is refused.

        ``weights`` as :meth:`_fold`; ``notes``: more round-log values per node (an update's staleness).
        """
        for reply in updates.values():
            entry: dict[str, Any] = {"num_examples": reply.num_examples}
            if reply.train_loss is not None:
                entry["train_loss"] = reply.train_loss
            entry |= {k.replace("-", "_"): v for k, v in reply.settings.items()}  # a budget device's choice
            entry |= (notes or {}).get(reply.node_id, {})
            entry |= {"train_seconds": reply.train_seconds, "update_norm": norms[reply.node_id]}
            if reply.base_download_bytes:
                entry["base_download_bytes"] = reply.base_download_bytes  # the 4-bit base, fetched once per device
            if self.dp is not None:
                entry["clipped"] = clipped[reply.node_id]
            if reply.record_epsilon is not None:  # dp.level = record: what the device reports it spent
                entry["record_epsilon"] = reply.record_epsilon
            if reply.rank is not None:  # a device training below lora.rank (shared/ranks.py)
                entry["lora_rank"] = reply.rank
            self.round_log.client(
                server_round, reply.node_id, reply.name, **entry, bytes_up=reply.nbytes, bytes_down=self.bytes_down
            )
        try:
            state = self._fold(updates, spec, weights)
            check_aggregate(state)
        except Exception as exc:  # noqa: BLE001 (whatever went wrong, nothing unchecked is signed)
            log(
                logging.ERROR,
                "round %d: the aggregate of %d updates was refused (%s); nothing is signed this round and the "
                "global adapter stays as it was",
                server_round,
                len(updates),
                rejection_reason(exc),
            )
            return None
        log(
            logging.INFO,
            "round %d: aggregated %d client updates (%s, %s deltas), mean train loss %s",
            server_round,
            len(updates),
            self.agg.method,
            self.agg.delta_encoding,
            "withheld" if (loss := mean_train_loss(updates.values())) is None else f"{loss:.4f}",
        )
        return self.sign(server_round, state)

    def sign(self, server_round: int, state: Mapping[str, Any]) -> ArrayRecord:
        """Sign and store ``state`` as the release of ``server_round``; return what the next messages carry."""
        release, manifest = self.registry.publish(server_round, state)
        self.record_release(server_round, manifest)
        return release_to_records(release)[0]

    def _train_metrics(
        self, tally: dict[str, int], replies: list[Message], updates: Mapping[int, TrainReply]
    ) -> MetricRecord:
        """Return the round's train metrics, computed from parsed values only."""
        metrics: dict[str, int | float | list[int] | list[float]] = {**tally}
        metrics["bytes-down"] = self.bytes_down * len(replies)
        metrics["bytes-up"] = sum(u.nbytes for u in updates.values())
        total = sum(u.num_examples for u in updates.values())
        if updates:
            metrics["num-examples"] = total
        told = [(u.train_loss, u.num_examples) for u in updates.values() if u.train_loss is not None]
        if told:
            metrics["train-loss"] = sum(loss * n for loss, n in told) / sum(n for _, n in told)
        return MetricRecord(metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each client's held-out loss and close the round in the log."""
        server_round += self.round_offset
        replies = list(replies)
        self.intake.log_silent(server_round, replies, "evaluate")
        parsed, _ = self.intake.parse(
            server_round, replies, lambda m, n: parse_evaluate(m, n, self.agg.max_examples), phase="evaluation"
        )
        scored = [r for r in parsed if isinstance(r, EvalReply)]
        for reply in scored:
            self.round_log.client(server_round, reply.node_id, reply.name, heldout_loss=reply.heldout_loss)
        rec = self.round_log.close_round(server_round)
        if "mean_heldout_loss" in rec:
            per_client = ", ".join(f"{r.name} {r.heldout_loss:.4f}" for r in sorted(scored, key=lambda r: r.name))
            mean = rec["mean_heldout_loss"]
            log(logging.INFO, "round %d: mean held-out loss %.4f (%s)", server_round, mean, per_client)
        if not scored:
            return None
        total = sum(r.num_examples for r in scored)
        loss = sum(r.heldout_loss * r.num_examples for r in scored) / total
        return MetricRecord({"num-examples": total, "heldout-loss": loss})

    def _latest_round(self) -> int:
        """Return the round of the newest signed release (the one every message carries)."""
        assert self.registry.latest is not None  # _release_of checked
        return self.registry.latest[1].round

    def _release_of(self, arrays: ArrayRecord) -> Release:
        """Return the signed release whose files ``arrays`` carries (always the registry's latest)."""
        if self.registry.latest is None:
            raise RuntimeError("no release published yet: start with initial_arrays()")
        release = self.registry.latest[0]
        if set(release.files) != set(arrays.keys()):
            raise RuntimeError("the arrays to send are not the latest signed release")
        return release

    def _signed(self, config: ConfigRecord, release: Release) -> tuple[ConfigRecord, int]:
        """Return ``config`` with the release's manifest and signature, and the chain links of the releases before it.

        The links (the signed manifests of the last few published releases) let a device that
        missed rounds check that this release leads back to the one it accepted (``shared/chain.py``).
        Also returns the bytes those entries add to each message.
        """
        links = self.registry.recent_links()
        signed = ConfigRecord(dict(config))
        for key, value in release_config(release).items():
            signed[key] = value
        for key, chain in links_config(links).items():
            signed[key] = chain
        extra = len(release.manifest_bytes) + len(release.signature)
        return signed, extra + sum(len(link.manifest) + len(link.signature) for link in links)

    def record_release(self, server_round: int, manifest: Manifest) -> None:
        """Record in the round log (and its state store) that ``server_round`` ended with this signed release."""
        self.round_log.note(server_round, release=self.release_record(server_round, manifest))

    def release_record(self, server_round: int, manifest: Manifest) -> dict[str, str]:
        """Return the round log's ``release`` of ``server_round``, signed as ``manifest``."""
        folder = str(self.registry.release_folder(server_round))
        return {"key_id": manifest.key_id, "manifest": manifest.digest(), "created": manifest.created, "path": folder}

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Federated evaluation of the initial adapter (round 0: the base model's held-out loss)."""
        replies = grid.send_and_receive(self.configure_evaluate(0, arrays, ConfigRecord(), grid), timeout=timeout)
        self.aggregate_evaluate(0, replies)
