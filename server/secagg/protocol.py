"""Run one round of SecAgg+ through a Flower ``Grid``: five Message exchanges (six enrolled), then the unmasked sum.

The stages (Bell et al., CCS 2020; Flower's ``SecAggPlusWorkflow``, ported in
``server/secagg/stages.py``), each one ``grid.send_and_receive`` of ``train`` messages whose
``secaggplus_configs`` record carries the stage (the devices' side is ``client/secagg.py``):

1. setup: the parameters out; two public keys back from each device;
2. share keys: each device gets its neighbours' keys; it returns its two secrets' Shamir shares,
   encrypted for each neighbour;
3. confirm shares (ours, not in Flower's workflow): each device gets the shares meant for it and
   says whose it kept (they decrypted and named the pair); a pair stays linked only if each kept
   the other's, so a device whose ciphertexts do not decrypt loses its own links, and is named;
4. collect masked vectors: each device gets its final links *and the round's own train content*
   (the signed release, the config); it trains, quantizes and masks its delta, and returns only
   the masked vector (plus its scalar metrics and name);
5. consistency (ours, only when devices are enrolled, ``shared/enrolment.py``): each survivor gets the
   lists unmask will use and signs its survivor list with its identity;
6. unmask: each survivor returns, per neighbour, the share that removes that neighbour's masks
   (the seed share of a survivor, the key share of a device that dropped after sharing keys); an
   enrolled round also forwards, per neighbour a survivor's list holds, that neighbour's signed list.

Every reply is parsed at the boundary (``server/secagg/replies.py``); one that does not parse, an
error reply, or a device that does not answer within the timeout make that device a dropout of the
stage, with its reason. Fewer than the threshold left raises :class:`SecAggAbortedError`: the strategy
keeps the global adapter. The coordinator never holds any single device's delta, only the sum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid

from server.secagg import stages
from server.secagg.params import SecAggParams
from server.secagg.replies import (
    parse_accepted,
    parse_ciphertexts,
    parse_masked,
    parse_public_keys,
    parse_shares,
    parse_story_signature,
)
from server.secagg.stages import RoundState, SecAggAbortedError
from shared.enrolment import story_message
from shared.secagg_stages import CONFIRM_SHARES, CONSISTENCY
from shared.text import printable

__all__ = ["SecAggAbortedError", "SecAggResult", "run_secagg"]
T = TypeVar("T")


@dataclass(frozen=True)
class SecAggResult:
    """What one secure round gives the strategy: the sum, who is in it, and what the devices said."""

    total: dict[str, torch.Tensor]
    """float32 sum over the survivors of their (clipped, quantized) deltas; within ``n * params.step`` per entry."""
    survivors: tuple[int, ...]
    """Node ids whose masked vectors are in the sum."""
    recovered: tuple[int, ...]
    """Node ids that dropped after sharing their keys, their masks removed through the survivors' shares."""
    enrolled: tuple[int, ...]
    """Survivors that announced an enrolled identity (``shared/enrolment.py``): the coordinator checked that the
    authority each names signed it and that it signed the device's keys; whether that authority counts is each
    neighbour's trust list, which the coordinator does not see (a device can enrol itself in its own eyes)."""
    replies: dict[int, RecordDict]
    """Each collect reply's own records (``metrics``, ``client``; a refusal too) for ``server/replies.py``."""
    rejected: dict[int, str]
    """Node id -> why it fell out of the protocol (no answer, an error, a reply that did not parse, too few links)."""
    refused_shares: dict[int, tuple[int, ...]]
    """Node id -> the devices that refused the shares it encrypted for them (confirm stage): those pairs unlinked."""
    bytes_up: dict[int, int]
    """Node id -> payload bytes of its replies over the five stages (see :func:`payload_bytes`)."""
    bytes_down: dict[int, int]
    """Node id -> payload bytes of the messages it was sent (the release, keys, shares, the unmask lists)."""


def run_secagg(
    grid: Grid,
    contents: Mapping[int, RecordDict],
    shapes: Mapping[str, tuple[int, ...]],
    params: SecAggParams,
    server_round: int,
) -> SecAggResult:
    """Securely sum the deltas the devices in ``contents`` (node id -> its train content) train this round.

    ``shapes`` are the uploaded tensors' shapes (the global adapter's, under FFA-LoRA only B).

    Raises
    ------
    SecAggAbortedError
        If fewer devices than the threshold stay in, or a secret cannot be rebuilt.
    SecAggConfigError
        If the sample is smaller than the threshold or larger than ``params.max_devices``.
    """
    state = stages.start(params, list(contents), shapes)
    rejected: dict[int, str] = {}
    ex = _Exchange(grid, server_round, params.timeout, rejected, {}, {})

    setup = stages.setup_config(state, len(contents))
    round_id = str(server_round)  # the group id of every message of the round (_Exchange)
    got = ex.run(
        Stage.SETUP, {n: _content(Stage.SETUP, setup) for n in contents}, lambda m, n: parse_public_keys(m, n, round_id)
    )
    state.public_keys = {n: keys for n, (keys, _) in got.items()}
    state.proofs = {n: proof for n, (_, proof) in got.items() if proof is not None}
    for nid, reason in stages.drop_shared_keys(state).items():
        ex.reject(Stage.SETUP, nid, reason)
    stages.check(state, set(state.public_keys), "setup")

    def keys_for(nid: int) -> RecordDict:
        return _content(Stage.SHARE_KEYS, stages.forwarded_keys(state, nid))

    sent = ex.run(
        Stage.SHARE_KEYS,
        {n: keys_for(n) for n in state.public_keys},
        lambda m, n: parse_ciphertexts(m, set(stages.keyed_neighbours(state, n)) - {n}),
    )
    stages.link(state, sent)

    def forward(nid: int) -> RecordDict:
        links = state.links[nid]
        return _content(CONFIRM_SHARES, {Key.SOURCE_LIST: list(links), Key.CIPHERTEXT_LIST: list(links.values())})

    kept = ex.run(CONFIRM_SHARES, {n: forward(n) for n in state.links}, lambda m, n: parse_accepted(m, state.links[n]))
    refused, short = stages.confirm(state, kept)
    for nid, reason in short.items():
        ex.reject(CONFIRM_SHARES, nid, reason)
    for src, by in refused.items():  # either side may be the one at fault: the coordinator cannot tell which
        log(
            logging.WARNING,
            "round %d: secure aggregation: %d devices (%s) did not keep the shares device %d encrypted for them "
            "(they did not decrypt, named another pair or were malformed, or those devices say so): the pairs are "
            "unlinked",
            server_round,
            len(by),
            ", ".join(map(str, by[:8])) + (", ..." if len(by) > 8 else ""),
            src,
        )

    replies = _collect(ex, state, contents)
    stages.check(state, state.survivors, "collect masked vectors")
    state.dropped = set(state.links) - state.survivors

    asked = {n: stages.unmask_request(state, n) for n in sorted(state.survivors)}
    lists = {n: {Key.ACTIVE_NODE_ID_LIST: alive, Key.DEAD_NODE_ID_LIST: dead} for n, (alive, dead) in asked.items()}
    stories: dict[int, bytes] = {}
    if state.proofs:  # enrolled devices: each signs the survivors it is told of before any reveals (client/secagg.py)
        told = {n: _content(CONSISTENCY, lists[n]) for n in asked}

        def signed(msg: Message, nid: int) -> bytes:
            proof = state.proofs.get(nid)
            story = story_message(msg.metadata.run_id, round_id, nid, state.public_keys[nid][0], asked[nid][0])
            return parse_story_signature(msg, None if proof is None else proof.identity, story)

        stories = ex.run(CONSISTENCY, told, signed, in_sum=True)
    unmask = {n: _content(Stage.UNMASK, {**lists[n], **stages.stories_for(asked, stories, n)}) for n in asked}

    def parse_unmask(msg: Message, nid: int) -> dict[int, bytes]:
        return parse_shares(msg, {o: stages.share_index(state, o, nid) for o in [*asked[nid][0], *asked[nid][1]]})

    got_shares = ex.run(Stage.UNMASK, unmask, parse_unmask, in_sum=True)
    collected: dict[int, list[bytes]] = {}
    for row in got_shares.values():
        for owner, share in row.items():
            collected.setdefault(owner, []).append(share)
    total = stages.unmask(state, collected)
    log(
        logging.INFO,
        "round %d: secure aggregation summed %d devices; %d dropped after sharing keys (masks removed); "
        "%d out of the round in all",
        server_round,
        len(state.survivors),
        len(state.dropped),
        len(rejected),
    )
    return SecAggResult(
        total={k: torch.from_numpy(v).to(torch.float32) for k, v in total.items()},
        survivors=tuple(sorted(state.survivors)),
        recovered=tuple(sorted(state.dropped)),
        enrolled=tuple(sorted(state.survivors & set(state.proofs))),
        replies=replies,
        rejected=rejected,
        refused_shares={src: tuple(by) for src, by in refused.items()},
        bytes_up=ex.bytes_up,
        bytes_down=ex.bytes_down,
    )


def payload_bytes(content: RecordDict) -> int:
    """Return the payload bytes of a message's records: array data, byte and text values, 8 per number.

    What a round moves, comparable with a plain round's ``wire_bytes`` (array data only); the
    protobuf framing and the record keys are not counted.
    """
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(arr.data) for arr in record.values())
            continue
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


def _collect(ex: _Exchange, state: RoundState, contents: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
    """Stage 4: send each device its links with its train content; sum the masked vectors as they parse."""
    out: dict[int, RecordDict] = {}

    def content(nid: int) -> RecordDict:
        cfg = {Key.SOURCE_LIST: list(state.links[nid])}
        record = RecordDict(dict(contents[nid].items()))
        record[RECORD_KEY_CONFIGS] = _content(Stage.COLLECT_MASKED_VECTORS, cfg)[RECORD_KEY_CONFIGS]
        return record

    def parse(msg: Message, nid: int) -> None:
        vector, rest = parse_masked(msg, state.shapes, state.params.modulus)
        out[nid] = rest
        if vector is not None:
            stages.add_masked(state, nid, vector)

    ex.run(Stage.COLLECT_MASKED_VECTORS, {n: content(n) for n in state.links}, parse)
    for nid in set(out) - state.survivors:
        ex.rejected[nid] = "sent no masked vector (it refused the round's release)"
    return out


def _content(stage: str, values: Mapping[str, Any]) -> RecordDict:
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **values})})


@dataclass
class _Exchange:
    """One ``send_and_receive`` per stage; replies matched to the message they answer, parsed, or rejected."""

    grid: Grid
    server_round: int
    timeout: float
    rejected: dict[int, str]
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]

    def run(
        self, stage: str, contents: Mapping[int, RecordDict], parse: Callable[[Message, int], T], in_sum: bool = False
    ) -> dict[int, T]:
        """Send each device its content; return the parsed replies.

        A failed reply puts its device out of the round, or, with ``in_sum`` (unmask: its masked
        vector is already in the sum), is only logged.
        """
        sent = {
            nid: Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(self.server_round))
            for nid, content in contents.items()
        }
        for node, content in contents.items():
            self.bytes_down[node] = self.bytes_down.get(node, 0) + payload_bytes(content)
        replies = self.grid.send_and_receive(list(sent.values()), timeout=self.timeout)
        by_id = {msg.metadata.message_id: nid for nid, msg in sent.items()}
        out: dict[int, T] = {}
        for reply in replies:
            nid = by_id.pop(reply.metadata.reply_to_message_id, None)
            if nid is None:
                continue  # not an answer to this stage's messages, or a second answer
            if reply.has_error():
                self.reject(stage, nid, f"error reply: {printable(reply.error.reason, 200)}", in_sum)
                continue
            self.bytes_up[nid] = self.bytes_up.get(nid, 0) + payload_bytes(reply.content)
            try:
                out[nid] = parse(reply, nid)
            except Exception as exc:  # noqa: BLE001 (one device's reply: a rejection, never a crash)
                self.reject(stage, nid, f"{type(exc).__name__}: {printable(exc, 200)}", in_sum)
        for nid in by_id.values():
            self.reject(stage, nid, f"no answer within {self.timeout:g} s", in_sum)
        return out

    def reject(self, stage: str, nid: int, reason: str, in_sum: bool = False) -> None:
        """Put ``nid`` out of the round at ``stage`` (logged), or, ``in_sum``, only log it."""
        if in_sum:  # its vector is summed; the other survivors' shares remove its masks
            log(
                logging.WARNING,
                "round %d: secure aggregation: device %d gave no shares at stage '%s' (%s); its update stays in "
                "the sum",
                self.server_round,
                nid,
                stage,
                reason,
            )
            return
        self.rejected[nid] = f"{stage}: {reason}"
        log(
            logging.WARNING,
            "round %d: secure aggregation: device %d is out of the round at stage '%s': %s",
            self.server_round,
            nid,
            stage,
            reason,
        )
