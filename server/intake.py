"""How the coordinator takes in a phase's replies: each parsed at the trust boundary, every outcome logged and recorded.

A reply that failed (Flower's error reply), that cannot be parsed, that repeats a node, or that
refuses the release does not count; each is logged for the operator with its round, client and
reason, and recorded in the round log (and through it the state store). The parsers themselves
are ``server/replies.py``; who was sent what, ``server/roster.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Message
from flwr.common.logger import log

from server.replies import EvalReply, Refusal, TrainReply, reported_name
from server.report import RoundLog
from server.roster import Roster
from shared.text import printable


class Intake:
    """The replies of every phase of a run: parse, log, record (one per strategy)."""

    def __init__(self, roster: Roster, round_log: RoundLog) -> None:
        self.roster, self.round_log = roster, round_log

    def parse(
        self, server_round: int, replies: list[Message], parse: Any, phase: str = "update"
    ) -> tuple[list[TrainReply | EvalReply], dict[str, int]]:
        """Parse each reply at the trust boundary; log and record every failure, refusal and rejection.

        Returns the parsed replies that count and the tally (``failed-replies``,
        ``refused-releases``, ``rejected-updates``). Any exception from one reply is its rejection.
        """
        tally = {"failed-replies": 0, "refused-releases": 0, "rejected-updates": 0}
        kept: list[TrainReply | EvalReply] = []
        seen: set[int] = set()
        for msg in replies:
            node = self.roster.node_of(msg)
            if msg.has_error():
                tally["failed-replies"] += 1
                log(
                    logging.WARNING,
                    "round %d: %s sent no %s (%s); the round goes on with the others",
                    server_round,
                    self.roster.label(node),
                    phase,
                    printable(msg.error.reason, 300),
                )
                continue
            try:
                if node in seen:
                    raise ValueError(f"a second reply from node {node} in this round")
                seen.add(node)
                reply = parse(msg, node)
            except Exception as exc:  # noqa: BLE001 (a device's reply: a rejection, never a crash)
                tally["rejected-updates"] += 1
                name = reported_name(msg, node) or self.roster.names.get(node)
                self.reject(server_round, node, name, rejection_reason(exc), phase)
                continue
            self.roster.names[node] = reply.name
            if isinstance(reply, Refusal):
                tally["refused-releases"] += 1
                label = self.roster.label(node)
                log(logging.WARNING, "round %d: %s refused the signed release: %s", server_round, label, reply.reason)
                self.round_log.client(server_round, node, reply.name, refused_release=reply.reason)
                continue
            kept.append(reply)
        return kept, tally

    def reject(self, server_round: int, node: int, name: str | None, reason: str, phase: str = "update") -> None:
        """Log and record a reply that does not count, with its client, node, round and reason."""
        label = self.roster.label(node, name)
        log(logging.WARNING, "round %d: rejected the %s of %s: %s", server_round, phase, label, reason)
        key = "rejected" if phase == "update" else "evaluation_rejected"
        self.round_log.client(server_round, node, name, **{key: reason})

    def log_silent(self, server_round: int, replies: list[Message], phase: str) -> None:
        """Log and record every node sent a message this phase that did not reply within the round timeout."""
        for node in self.roster.silent(replies):
            log(
                logging.WARNING,
                "round %d: %s sent no %s reply before the round timeout; the round goes on without it "
                "(a slow or disconnected device; raise run-config round-timeout if it is merely slow)",
                server_round,
                self.roster.label(node),
                phase,
            )
            self.round_log.client(server_round, node, self.roster.names.get(node), timed_out=phase)


def rejection_reason(exc: BaseException) -> str:
    """Return an exception as a rejection reason: its message, with its type where the type says more."""
    text = str(exc)  # it may quote what the device sent: escaped, one line
    if isinstance(exc, ValueError) and text:
        return printable(text, 500)
    return f"malformed reply ({type(exc).__name__}: {printable(text, 300)})"
