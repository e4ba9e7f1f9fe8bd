"""The coordinator's trust boundary: every device reply is parsed here, once, before anything uses it.

A reply is a Flower ``Message`` whose content a device wrote: nothing in it is trusted. Each
parser below turns one reply into a typed, bounded value (:class:`TrainReply`,
:class:`EvalReply`, :class:`Refusal`) or raises :class:`ReplyError` naming the first thing that
is wrong. What a reply must hold:

* exactly the records of its kind: ``metrics`` (MetricRecord) and ``client`` (ConfigRecord),
  plus ``arrays`` (ArrayRecord) for a train reply; no other record;
* ``client``: ``name`` (printable text, at most ``MAX_NAME`` characters: display only, rows are
  keyed by the node id the SuperLink authenticated) and, in a refusal, ``refused-release``;
* ``metrics``: only keys of the phase's allow-list (:data:`TRAIN_METRICS`, :data:`EVAL_METRICS`),
  each a finite scalar of its type within its bounds; the example count an integer in
  ``[1, aggregation.max-examples]``;
* ``arrays``: decoded later, by :func:`decode_update`, which bounds the payload before decoding
  and checks keys, dtypes, shapes and finiteness (``shared/wire.py``, ``server/validate.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from server.validate import check_size, check_update
from shared.manifest import MAX_ROUND
from shared.ranks import pad, rank_of, rank_shapes
from shared.text import printable
from shared.wire import unpack, wire_bytes

MAX_NAME = 128
MAX_REASON = 1000  # characters of a device's refusal reason kept in the round log
MAX_LOSS = 1e3  # a cross-entropy in nats; ln(49152) = 10.8 is a uniform guess over SmolLM2's vocabulary
MAX_SECONDS = 1e7
MAX_BYTES = 1 << 40
MAX_RANK = 1 << 16
MAX_BUDGET_MB = 1 << 24
MAX_BATCH = 1 << 16
# key -> (type, low, high, required)
TRAIN_METRICS: dict[str, tuple[type, float, float, bool]] = {
    "num-examples": (int, 1, math.inf, True),  # high: aggregation.max-examples
    "train-loss": (float, 0.0, MAX_LOSS, False),  # withheld under record-level DP: it is not noised
    "train-seconds": (float, 0.0, MAX_SECONDS, True),
    "base-download-bytes": (int, 0, MAX_BYTES, False),
    "dp-clipped": (int, 0, 1, False),  # dp.clipping = client: 1 if the device clipped its delta
    "dp-record-epsilon": (float, 0.0, 1e15, False),  # dp.level = record: the device's own epsilon so far
    "lora-rank": (int, 1, MAX_RANK, False),  # a device training below lora.rank (shared/ranks.py); <= it, checked
    "release-round": (int, 0, MAX_ROUND, False),  # the release the delta is a change of; = the one sent, checked
    # what a device with node config memory-budget-mb chose to fit it (client/capability.py)
    "memory-budget-mb": (int, 1, MAX_BUDGET_MB, False),
    "micro-batch-size": (int, 0, MAX_BATCH, False),
    "gradient-checkpointing": (int, 0, 1, False),
}
BUDGET_METRICS = ("memory-budget-mb", "micro-batch-size", "gradient-checkpointing")
EVAL_METRICS: dict[str, tuple[type, float, float, bool]] = {
    "num-examples": (int, 1, math.inf, True),
    "heldout-loss": (float, 0.0, MAX_LOSS, True),
    "heldout-tokens": (int, 0, MAX_BYTES, False),
}
REFUSAL_METRICS: dict[str, tuple[type, float, float, bool]] = {"refused-release": (int, 1, 1, False)}


class ReplyError(ValueError):
    """A device's reply cannot count; the message says what is wrong with it."""


@dataclass(frozen=True)
class UpdateSpec:
    """What a round's train replies must hold: the global adapter's uploaded tensors and the wire encoding."""

    expected: Mapping[str, torch.Tensor]
    encoding: str
    max_examples: int


@dataclass(frozen=True)
class TrainReply:
    """A parsed train reply; its delta is decoded on demand (:func:`decode_update`), one at a time."""

    node_id: int
    name: str
    num_examples: int
    train_loss: float | None
    """None: the device withheld it (record-level DP: one example's exact loss at batch 1)."""
    train_seconds: float
    base_download_bytes: int
    dp_clipped: bool
    record_epsilon: float | None
    rank: int | None
    """The LoRA rank the device trained at, if it said (below the run's ``lora.rank``); None: the run's."""
    release_round: int | None
    """The round of the release the device says it trained on (None: it did not say)."""
    settings: Mapping[str, int]
    """What a device with a memory budget chose (``memory-budget-mb``, ``micro-batch-size``,
    ``gradient-checkpointing``), as it reported them; empty otherwise."""
    arrays: ArrayRecord
    nbytes: int


@dataclass(frozen=True)
class EvalReply:
    """A parsed evaluate reply."""

    node_id: int
    name: str
    num_examples: int
    heldout_loss: float


@dataclass(frozen=True)
class Refusal:
    """A device refused the signed release it was sent (its reason, as it reported it)."""

    node_id: int
    name: str
    reason: str


def parse_train(msg: Message, node_id: int, spec: UpdateSpec) -> TrainReply | Refusal:
    """Parse a train reply (or a refusal of the release); raise :class:`ReplyError` if it cannot count."""
    records = {"arrays": ArrayRecord, "metrics": MetricRecord, "client": ConfigRecord}
    parsed = _parse(msg, node_id, records, TRAIN_METRICS, spec.max_examples)
    if isinstance(parsed, Refusal):
        return parsed
    return _train_reply(node_id, *parsed, msg.content.array_records["arrays"])


def parse_secure_train(content: RecordDict, node_id: int, max_examples: int) -> TrainReply | Refusal:
    """Parse what a secure round's device said beside its masked vector: its metrics and name, no arrays.

    Its delta reaches the coordinator only inside the round's sum (``server/secagg/``).
    """
    msg = Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)
    parsed = _parse(msg, node_id, {"metrics": MetricRecord, "client": ConfigRecord}, TRAIN_METRICS, max_examples)
    if isinstance(parsed, Refusal):
        return parsed
    return _train_reply(node_id, *parsed, ArrayRecord())


def parse_evaluate(msg: Message, node_id: int, max_examples: int) -> EvalReply | Refusal:
    """Parse an evaluate reply (or a refusal of the release); raise :class:`ReplyError` if it cannot count."""
    parsed = _parse(msg, node_id, {"metrics": MetricRecord, "client": ConfigRecord}, EVAL_METRICS, max_examples)
    if isinstance(parsed, Refusal):
        return parsed
    name, metrics = parsed
    return EvalReply(node_id, name, int(metrics["num-examples"]), float(metrics["heldout-loss"]))


def _parse(
    msg: Message,
    node_id: int,
    records: Mapping[str, type],
    allowed: Mapping[str, tuple[type, float, float, bool]],
    max_examples: int,
) -> Refusal | tuple[str, dict[str, int | float]]:
    """Parse what every reply holds: the client record (a refusal, or the name), exactly ``records``, the metrics."""
    client = _client(msg)
    name = _name(client, node_id)
    if "refused-release" in client:
        return _refusal(msg, client, node_id, name)
    _records(msg, records)
    return name, _metrics(msg.content.metric_records["metrics"], allowed, max_examples)


def decode_update(reply: TrainReply, spec: UpdateSpec) -> dict[str, torch.Tensor]:
    """Return the reply's delta in fp32, or raise naming why it is not a valid delta of ``spec``.

    The payload size is bounded before anything is decoded; then keys, dtypes, shapes, codes,
    scales and finiteness are checked. A delta of a device training at a lower rank is decoded at
    that rank and zero-padded to the run's (``shared/ranks.py``: exactly the device's own change).
    """
    shapes = {k: tuple(v.shape) for k, v in spec.expected.items()}
    full = rank_of(shapes)
    rank = full if reply.rank is None else reply.rank
    if rank > full:
        raise ReplyError(f"the device reports lora-rank {rank}, above the run's lora.rank {full}")
    sent = rank_shapes(shapes, rank)
    check_size(reply.nbytes, sent, spec.encoding)
    delta = pad(unpack(reply.arrays, sent, spec.encoding), shapes)
    check_update(delta, spec.expected, float(reply.num_examples))
    return delta


def check_release_round(reply: TrainReply, sent: int) -> None:
    """Refuse an update that names a release other than the one its device was sent (round ``sent``).

    A delta is a change of one release: counted against another, it would move the global wrongly
    (and under ``aggregation.mode = async`` its staleness would be a lie).
    """
    if reply.release_round is not None and reply.release_round != sent:
        raise ReplyError(f"the update is of release round {reply.release_round}, but the device was sent round {sent}")


def mean_train_loss(replies: Iterable[TrainReply]) -> float | None:
    """Return the mean train loss of the replies that reported one (None: none did; record-level DP withholds it)."""
    losses = [r.train_loss for r in replies if r.train_loss is not None]
    return sum(losses) / len(losses) if losses else None


def _train_reply(node_id: int, name: str, metrics: Mapping[str, int | float], arrays: ArrayRecord) -> TrainReply:
    return TrainReply(
        node_id=node_id,
        name=name,
        num_examples=int(metrics["num-examples"]),
        train_loss=float(metrics["train-loss"]) if "train-loss" in metrics else None,
        train_seconds=float(metrics["train-seconds"]),
        base_download_bytes=int(metrics.get("base-download-bytes", 0)),
        dp_clipped=bool(metrics.get("dp-clipped", 0)),
        record_epsilon=float(metrics["dp-record-epsilon"]) if "dp-record-epsilon" in metrics else None,
        rank=int(metrics["lora-rank"]) if "lora-rank" in metrics else None,
        release_round=int(metrics["release-round"]) if "release-round" in metrics else None,
        settings={k: int(metrics[k]) for k in BUDGET_METRICS if k in metrics},
        arrays=arrays,
        nbytes=wire_bytes(arrays),
    )


def reported_name(msg: Message, node_id: int) -> str | None:
    """Return the name a reply reports, if it is well-formed (to name a rejected reply in the log), else None."""
    try:
        return _name(_client(msg), node_id) if "client" in msg.content else None
    except ReplyError:
        return None


def _client(msg: Message) -> ConfigRecord:
    if "client" not in msg.content:
        raise ReplyError("the reply has no 'client' record")
    client = msg.content["client"]
    if not isinstance(client, ConfigRecord):
        raise ReplyError(f"the reply's 'client' record is a {type(client).__name__}, expected a ConfigRecord")
    extra = sorted(set(client) - {"name", "refused-release"})
    if extra:
        raise ReplyError(f"the reply's 'client' record holds unexpected keys {extra[:3]}")
    return client


def _name(client: ConfigRecord, node_id: int) -> str:
    name = client.get("name", f"node-{node_id}")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise ReplyError(f"the client name {name!r:.60} is not 1 to {MAX_NAME} printable characters")
    return name


def _refusal(msg: Message, client: ConfigRecord, node_id: int, name: str) -> Refusal:
    _records(msg, {"metrics": MetricRecord, "client": ConfigRecord})
    _metrics(msg.content.metric_records["metrics"], REFUSAL_METRICS, 1)
    reason = client["refused-release"]
    if not isinstance(reason, str):
        raise ReplyError(f"the refusal reason is a {type(reason).__name__}, expected text")
    return Refusal(node_id, name, printable(reason, MAX_REASON))  # into logs and the round log: one line


def _records(msg: Message, expected: Mapping[str, type]) -> None:
    """Refuse a reply whose records are not exactly ``expected`` (name -> record type)."""
    names = set(msg.content.keys())
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise ReplyError(f"the reply's records: missing {missing}, unexpected {extra[:3]}")
    for name, kind in expected.items():
        if not isinstance(msg.content[name], kind):
            got = type(msg.content[name]).__name__
            raise ReplyError(f"the reply's '{name}' record is a {got}, expected a {kind.__name__}")


def _metrics(
    record: MetricRecord, allowed: Mapping[str, tuple[type, float, float, bool]], max_examples: int
) -> dict[str, int | float]:
    """Return the record's metrics, each checked against the allow-list: type, finiteness, bounds."""
    extra = sorted(set(record) - set(allowed))
    if extra:
        raise ReplyError(f"the reply's metrics hold unexpected keys {extra[:3]}")
    out: dict[str, int | float] = {}
    for key, (kind, low, high, required) in allowed.items():
        if key not in record:
            if required:
                raise ReplyError(f"the reply's metrics lack '{key}'")
            continue
        high = min(high, max_examples) if key == "num-examples" else high
        out[key] = _scalar(key, record[key], kind, low, high)
    return out


def _scalar(key: str, value: Any, kind: type, low: float, high: float) -> int | float:
    """Return ``value`` as a ``kind`` in ``[low, high]``; refuse lists, bools, non-finite and out-of-range values."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ReplyError(f"metric '{key}' = {value!r:.60} is not {'an integer' if kind is int else 'a number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ReplyError(f"metric '{key}' = {value!r} is not finite")
    if not low <= value <= high:  # compared exactly: an int of any size, a float of any magnitude
        raise ReplyError(f"metric '{key}' = {value!r:.60} is outside [{low:g}, {high:g}]")
    return int(value) if kind is int else float(value)
