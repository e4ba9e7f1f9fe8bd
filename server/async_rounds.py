"""Buffered asynchronous aggregation (FedBuff: Nguyen et al., 2022, arXiv 2106.06639), ``aggregation.mode = async``.

The synchronous loop (Flower's ``Strategy.start``) sends a round's release to a sample and waits
for them all, up to ``round-timeout``: the fleet moves at its slowest device's pace, and a
device that misses the timeout loses its work. Here every connected device is kept busy through
Flower's Grid push / pull: a free device is sent the newest signed release at once; each reply is
pulled when it arrives and parsed at the trust boundary (``server/replies.py``) on arrival; when
``buffer-size`` = K updates are accepted, they make the next release:

    global' = global + sum_i n_i s(tau_i) delta_i / sum_i n_i,    s(tau) = 1 / sqrt(1 + tau),

with n_i the device's example count and tau_i its staleness, the number of releases signed since
the one it trained on (FedBuff's polynomial staleness weight; its server learning rate 1). A stale
update counts less but is never lost, up to ``max-staleness``; an older one is rejected with its
staleness as the reason. Every release is signed as the next round of the one chain (devices'
replay checks are unchanged: a device that missed releases follows the chain links). A device
with an update in the buffer gets its next task with the next release, so a release is K
different devices. The methods are those whose update is linear in the device's change (fedavg,
ffa: ``shared/config.py`` refuses the others): a delta of an older release applies to the newest.

Federated evaluation runs on the last release, when the rounds are done.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.intake import rejection_reason
from server.replies import TrainReply, UpdateSpec, parse_train
from server.strategy import AdapterStrategy
from server.validate import contribution_norms, norm_outliers
from shared.adapter import ADAPTER_WEIGHTS, uploaded_keys
from shared.release import load_tensors
from shared.release_records import release_to_records
from shared.wire import wire_bytes


def staleness_weight(staleness: int) -> float:
    """FedBuff's s(tau) = 1 / sqrt(1 + tau): a fresh update counts 1, one of 3 releases ago 1/2."""
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass(frozen=True)
class Task:
    """One train message in flight: to which node, of which release, sent when (monotonic seconds)."""

    node: int
    release_round: int
    sent: float


@dataclass
class Buffer:
    """The accepted updates waiting for the next release, by node (one per device)."""

    updates: dict[int, TrainReply] = field(default_factory=dict)
    staleness: dict[int, int] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)


class AsyncRounds:
    """Run ``num_rounds`` FedBuff releases through ``strategy``'s parsing, aggregation and signing.

    ``task_timeout``: a device silent this long after its task was sent is given up (logged; its
    late reply, if it comes, is ignored) and sent the newest release; a device whose reply did not
    count (failed, refused, rejected) is sent its next task ``retry_after`` seconds later, not at
    once; ``stall_timeout``: the run ends, keeping its last release, when no release was signed
    for this long (updates accepted into buffers that are then refused do not count: a device
    whose updates make every buffer fail must not keep the run going). ``clock`` and ``poll`` let
    tests drive it.
    """

    def __init__(
        self,
        strategy: AdapterStrategy,
        task_timeout: float,
        stall_timeout: float,
        poll: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        retry_after: float = 5.0,
    ) -> None:
        self.strategy = strategy
        self.buffer_size, self.max_staleness = strategy.agg.buffer_size, strategy.agg.max_staleness
        self.task_timeout, self.stall_timeout = task_timeout, stall_timeout
        self.poll, self.clock, self.retry_after = poll, clock, retry_after
        self.inflight: dict[str, Task] = {}
        self.contributions = carried_contributions(strategy.round_log.data.get("rounds", []))
        """Updates per node in the run's signed releases (a resumed run's counted on from its round log)."""
        self._dispatched = self._signed_now = self._rounds = self._refused = 0
        self.resting: dict[int, float] = {}  # node -> when it may have a task again (its last reply did not count)
        self._buffer = Buffer()

    @property
    def version(self) -> int:
        """The round of the newest signed release."""
        return self.strategy._latest_round()

    def run(self, grid: Grid, num_rounds: int) -> int:
        """Sign up to ``num_rounds`` more releases; return how many were signed.

        Replies are taken one at a time in the order they are pulled; the moment the buffer is
        full it becomes a release, and the replies after it count towards the next one.
        """
        self.strategy.roster.sending([])
        self._rounds, self._signed_now = num_rounds, 0
        self._buffer = self._adopt_latest(True)
        last_release, signed = self.clock(), 0
        while self._signed_now < num_rounds:
            self._dispatch(grid, set(self._buffer.updates))
            for msg in grid.pull_messages(list(self.inflight)):
                if self._signed_now >= num_rounds:
                    self._late(msg)
                elif self._take(msg, self._buffer):
                    self._release_if_full()
            if self._signed_now > signed:
                last_release, signed = self.clock(), self._signed_now
            self._expire()
            if self._signed_now < num_rounds and self.clock() - last_release > self.stall_timeout:
                log(
                    logging.WARNING,
                    "async: no release signed for %.0f s (%d buffers refused meanwhile; %d in the buffer of %d, %d "
                    "devices busy); the run stops with release %d",
                    self.stall_timeout,
                    self._refused,
                    len(self._buffer.updates),
                    self.buffer_size,
                    len(self.inflight),
                    self.version,
                )
                break
            time.sleep(self.poll)
        self._finish(grid)
        return self._signed_now

    def _release_if_full(self) -> None:
        """Make the next release of a full buffer (or drop it, if it is refused) and start a new buffer."""
        if len(self._buffer.updates) < self.buffer_size:
            return
        if self._release(self._buffer):
            self._signed_now += 1
            self._refused = 0
        else:
            self._refused += 1
        self._buffer = self._adopt_latest(self._signed_now < self._rounds)

    def _adopt_latest(self, more: bool) -> Buffer:
        """Start collecting the next release on top of the newest one (``more``: one is to come); an empty buffer."""
        strategy = self.strategy
        assert strategy.registry.latest is not None  # release 0 at least
        release = strategy.registry.latest[0]
        strategy._global = load_tensors(release.files[ADAPTER_WEIGHTS])
        strategy.sent_round = self.version
        if more:
            strategy.round_log.round(self.version + 1)  # the release's clock starts as the last one is out
        return Buffer()

    def _dispatch(self, grid: Grid, waiting: set[int]) -> None:
        """Send the newest release to every connected device with no task and no update in the buffer."""
        now = self.clock()
        resting = {n for n, until in self.resting.items() if until > now}
        busy = {t.node for t in self.inflight.values()} | waiting | resting
        free = sorted(set(grid.get_node_ids()) - busy)
        if not free:
            return
        strategy = self.strategy
        assert strategy.registry.latest is not None
        release = strategy.registry.latest[0]
        arrays: ArrayRecord = release_to_records(release)[0]
        messages = []
        for node in free:
            self._dispatched += 1
            config = ConfigRecord({"server-round": self.version + 1, "dispatch": self._dispatched})
            signed, extra = strategy._signed(config, release)
            content = RecordDict({strategy.arrayrecord_key: arrays, strategy.configrecord_key: signed})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        strategy.bytes_down = wire_bytes(arrays) + extra
        # the ids of the messages the SuperLink took: each grid sets a message's id on it as it pushes; the
        # deployment grid returns None in place of one not taken, the in-memory grid leaves it out (no gap: by
        # position, a later device's task was credited to the one before it)
        taken = {i for i in grid.push_messages(messages) if i}
        now = self.clock()
        pushed = [(m.metadata.message_id, m) for m in messages if m.metadata.message_id in taken]
        for msg_id, msg in pushed:
            self.inflight[msg_id] = Task(int(msg.metadata.dst_node_id), self.version, now)
        strategy.roster.add(m for _, m in pushed)
        if len(pushed) < len(messages):  # the SuperLink took not all: those devices are tried again after a rest
            for node in {int(m.metadata.dst_node_id) for m in messages} - {t.node for t in self.inflight.values()}:
                self.resting[node] = now + self.retry_after
            log(
                logging.WARNING,
                "async: the SuperLink took %d of %d train messages; the others are sent again in %.0f s",
                len(pushed),
                len(messages),
                self.retry_after,
            )

    def _take(self, msg: Message, buffer: Buffer) -> bool:
        """Parse one reply at the trust boundary; put an accepted update in the buffer. Return whether it was."""
        task = self.inflight.pop(msg.metadata.reply_to_message_id, None)
        if task is None:
            return False  # a reply to a task given up, or not ours
        strategy, server_round = self.strategy, self.version + 1
        spec = self._spec()
        kept, _ = strategy.intake.parse(server_round, [msg], lambda m, n: parse_train(m, task.node, spec))
        strategy.roster.forget(msg.metadata.reply_to_message_id)
        if not kept:  # failed, refused or malformed: logged and recorded; the device gets a new task after a rest
            self.resting[task.node] = self.clock() + self.retry_after
            return False
        reply = kept[0]
        assert isinstance(reply, TrainReply)
        staleness = self.version - task.release_round
        try:
            if staleness > self.max_staleness:
                raise ValueError(
                    f"stale: trained on release {task.release_round}, {staleness} releases behind the newest "
                    f"({self.version}), more than aggregation.max-staleness = {self.max_staleness}"
                )
            norm, _ = strategy.measure(reply, spec, sent=task.release_round)
        except Exception as exc:  # noqa: BLE001 (one device's payload: a rejection, never a crash)
            strategy.intake.reject(server_round, task.node, reply.name, rejection_reason(exc))
            self.resting[task.node] = self.clock() + self.retry_after
            return False
        buffer.updates[task.node], buffer.staleness[task.node], buffer.norms[task.node] = reply, staleness, norm
        log(
            logging.INFO,
            "async: release %d: update %d of %d from %s (trained on release %d, staleness %d, weight %.3f)",
            server_round,
            len(buffer.updates),
            self.buffer_size,
            strategy.roster.label(task.node),
            task.release_round,
            staleness,
            staleness_weight(staleness),
        )
        return True

    def _spec(self) -> UpdateSpec:
        strategy = self.strategy
        expected = {k: strategy._global[k] for k in uploaded_keys(strategy.agg.method, strategy._global)}
        return UpdateSpec(expected, strategy.agg.delta_encoding, strategy.agg.max_examples)

    def _release(self, buffer: Buffer) -> bool:
        """Aggregate the full buffer, staleness-weighted; sign it as the next round. Return whether it was signed."""
        strategy, server_round = self.strategy, self.version + 1
        updates = dict(buffer.updates)
        weights = {n: u.num_examples * staleness_weight(buffer.staleness[n]) for n, u in updates.items()}
        for node, reason in norm_outliers(
            contribution_norms(buffer.norms, weights), strategy.agg.max_norm_ratio
        ).items():
            strategy.intake.reject(server_round, node, updates.pop(node).name, reason)
        if strategy.too_few(len(updates)):
            log(
                logging.WARNING,
                "async: release %d: %d updates left after the norm rule, fewer than "
                "aggregation.min-accepted; the buffer is emptied, the global stays",
                server_round,
                len(updates),
            )
            self._refuse(server_round, updates, "too few updates left after the norm rule")
            return False
        for node in updates:  # an earlier attempt of this release rejected it, or gave it up: this one counts
            strategy.round_log.forget(server_round, node, "rejected", "timed_out", "refused_release")
        notes = {
            n: {
                "staleness": buffer.staleness[n],
                "release_round": self.version - buffer.staleness[n],
                "contributions": self.contributions.get(n, 0) + 1,
            }
            for n in updates
        }
        clipped = dict.fromkeys(updates, False)
        spec = self._spec()
        published = strategy._aggregate(server_round, updates, spec, buffer.norms, clipped, weights, notes)
        if published is None:
            self._refuse(server_round, updates, "its aggregate was refused")
            return False
        for node in updates:
            self.contributions[node] = self.contributions.get(node, 0) + 1
        strategy.round_log.close_round(server_round, buffer={"size": self.buffer_size, "updates": len(updates)})
        return True

    def _refuse(self, server_round: int, updates: Mapping[int, TrainReply], why: str) -> None:
        """Record that the updates of a refused buffer are in no release (the round's next attempt may take them)."""
        for node in updates:
            self.strategy.round_log.client(server_round, node, None, rejected=f"in a buffer that was refused: {why}")

    def _expire(self) -> None:
        """Give up tasks older than ``task_timeout``: the device is logged and gets the newest release."""
        now = self.clock()
        for msg_id, task in list(self.inflight.items()):
            if now - task.sent > self.task_timeout:
                del self.inflight[msg_id]
                self.strategy.roster.forget(msg_id)
                log(
                    logging.WARNING,
                    "async: %s sent no update %.0f s after its task (release %d); given up, it "
                    "will be sent the newest release",
                    self.strategy.roster.label(task.node),
                    self.task_timeout,
                    task.release_round,
                )
                self.strategy.round_log.client(self.version + 1, task.node, None, timed_out="train")

    def _finish(self, grid: Grid) -> None:
        """At the end, wait (up to ``task_timeout``) for the devices still training, so none is cut off mid-task.

        Their updates arrive after the run's last release: logged, not counted.
        """
        if not self.inflight:
            return
        nodes = ", ".join(self.strategy.roster.label(t.node) for t in self.inflight.values())
        log(
            logging.INFO,
            "async: the run's releases are signed; waiting for %d devices still training (%s); "
            "their updates come after the last release and are not counted",
            len(self.inflight),
            nodes,
        )
        end = self.clock() + self.task_timeout
        while self.inflight and self.clock() < end:
            for msg in grid.pull_messages(list(self.inflight)):
                self._late(msg)
            time.sleep(self.poll)
        self.inflight.clear()

    def _late(self, msg: Message) -> None:
        """Take a reply that arrived after the run's last release: logged, not counted."""
        task = self.inflight.pop(msg.metadata.reply_to_message_id, None)
        self.strategy.roster.forget(msg.metadata.reply_to_message_id)
        if task is not None:
            log(
                logging.INFO,
                "async: %s's update of release %d came after the run's last release; not counted",
                self.strategy.roster.label(task.node),
                task.release_round,
            )


def carried_contributions(rounds: Any) -> dict[int, int]:
    """Per node, the highest ``contributions`` its entries in the round log's ``rounds`` hold (0 if none).

    The log a resumed run carries (``server/resume.py``) is read defensively: entries that are not a
    node's non-negative counts are skipped, never trusted to raise.
    """
    counts: dict[int, int] = {}
    for rec in rounds if isinstance(rounds, list) else []:
        clients = rec.get("clients") if isinstance(rec, dict) else None
        for key, entry in clients.items() if isinstance(clients, dict) else []:
            value = entry.get("contributions") if isinstance(entry, dict) and "rejected" not in entry else None
            if type(value) is int and value >= 0 and isinstance(key, str) and key.isdigit() and len(key) <= 20:
                counts[int(key)] = max(counts.get(int(key), 0), value)
    return counts


def evaluate_latest(strategy: AdapterStrategy, grid: Grid, timeout: float) -> MetricRecord | None:
    """Federated evaluation of the newest release on every connected device (a device still training answers after).

    The devices connected now, not Flower's sampler: it waits, without end, for ``min-clients``
    to be connected, and a run that stopped because its fleet was gone would never end.
    """
    assert strategy.registry.latest is not None
    release = strategy.registry.latest[0]
    number = strategy._latest_round() - strategy.round_offset  # the strategy adds the offset back
    nodes = sorted(grid.get_node_ids())
    if strategy.fraction_evaluate == 0 or not nodes:
        if not nodes:
            log(logging.WARNING, "async: no device is connected to evaluate release %d; not evaluated", number)
        return None
    arrays: ArrayRecord = release_to_records(release)[0]
    signed, _ = strategy._signed(ConfigRecord({"server-round": number + strategy.round_offset}), release)
    content = RecordDict({strategy.arrayrecord_key: arrays, strategy.configrecord_key: signed})
    messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]
    replies = grid.send_and_receive(strategy.roster.sending(messages), timeout=timeout)
    return strategy.aggregate_evaluate(number, replies)
