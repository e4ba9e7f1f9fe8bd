"""Which nodes a phase of a round waits for, which answered, and what each calls itself.

Every reply is attributed to the node the coordinator sent the message to (the SuperLink's
own error replies, e.g. "node unavailable", name the SuperLink as their sender): the node id
is what the SuperLink authenticated, the name is what the device says, kept for display.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message


class Roster:
    """The current phase's sent messages, and the names nodes reported (for the life of the run)."""

    def __init__(self) -> None:
        self._sent: list[Message] = []  # their message ids are set by the Grid once it pushed them
        self.names: dict[int, str] = {}

    def sending(self, messages: Iterable[Message]) -> list[Message]:
        """Remember the messages of a new phase (configure_train / configure_evaluate); return them."""
        self._sent = list(messages)
        return self._sent

    def add(self, messages: Iterable[Message]) -> None:
        """Remember more messages of the running phase (asynchronous rounds send as devices free up)."""
        self._sent.extend(messages)

    def forget(self, message_id: str) -> None:
        """Forget a sent message once its reply was taken (or it was given up)."""
        self._sent = [m for m in self._sent if m.metadata.message_id != message_id]

    def node_of(self, reply: Message) -> int:
        """Return the node a reply is about: the destination of the message it answers, else its sender."""
        for sent in self._sent:
            if sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return int(sent.metadata.dst_node_id)
        return int(reply.metadata.src_node_id)

    def silent(self, replies: Iterable[Message]) -> list[int]:
        """Return the nodes sent a message this phase that are not among ``replies``, in order."""
        answered = {self.node_of(m) for m in replies}
        return sorted({int(m.metadata.dst_node_id) for m in self._sent} - answered)

    def label(self, node: int, name: str | None = None) -> str:
        """Return how an operator knows the node: ``name (node id)`` once it reported a name (or ``name`` is given)."""
        name = name or self.names.get(node)
        return f"{name} (node {node})" if name else f"node {node}"
