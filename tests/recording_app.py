"""A ClientApp that is the product's device plus a mod recording every reply it sends (for the outgoing-message test).

``app`` registers the very ``train`` and ``evaluate`` functions of ``client.client_app`` behind
:func:`record`, a Flower client mod that writes each reply's content to
``$FLEETLORA_RECORD_DIR/node-<node id>/<message id>.{json,safetensors}``: arrays as safetensors
(never pickle), every other value as JSON with its Python type. What the device received (its
node config, the server round, the message type) is kept beside it under ``received`` so a test
can tell the replies apart; it is not part of what was sent.

Behind the product's own mods (SecAgg+), :func:`record_before_masking` also writes each reply as the
device's train function made it, under ``true/``: in a secure round, its delta before masking.

Only the test's generated Flower project points its ``clientapp`` here; product code is unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from safetensors.numpy import load, save

from client import client_app
from shared.atomic import write_atomic

RECORD_ENV = "FLEETLORA_RECORD_DIR"


def record(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Let the device handle ``msg``, write the reply it sends to this device's recording folder, return it."""
    return _recorded(msg, context, call_next, "")


def record_before_masking(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Inside the SecAgg+ mod: record the train reply as the device made it (its true delta), under ``true/``."""
    return _recorded(msg, context, call_next, "true")


def _recorded(msg: Message, context: Context, call_next: ClientAppCallable, sub: str) -> Message:
    folder = os.environ.get(RECORD_ENV)
    if not folder:  # a silent no-op would let the test pass on nothing recorded
        raise RuntimeError(f"{RECORD_ENV} is not set: the recording ClientApp has nowhere to write")
    reply = call_next(msg, context)
    out = Path(folder) / sub / f"node-{context.node_id}"
    out.mkdir(parents=True, exist_ok=True)
    received = {
        "message_type": msg.metadata.message_type,
        "server_round": msg.content["config"].get("server-round") if "config" in msg.content else None,
        "node_config": dict(context.node_config),
    }
    sent: dict[str, Any] = {"received": received, "error": None, "records": {}}
    tensors: dict[str, np.ndarray] = {}
    if reply.has_error():
        sent["error"] = {"code": reply.error.code, "reason": reply.error.reason}
    else:
        for name, rec in reply.content.items():
            sent["records"][name] = _describe(name, rec, tensors)
    stem = out / msg.metadata.message_id
    write_atomic(stem.with_suffix(".safetensors"), save(tensors))
    write_atomic(stem.with_suffix(".json"), json.dumps(sent, indent=1).encode())
    return reply


def _describe(name: str, rec: Any, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """One record as JSON; an ArrayRecord's arrays go to ``tensors`` (keyed ``<record>/<key>``)."""
    if isinstance(rec, ArrayRecord):
        arrays = {}
        for key, arr in rec.items():
            arrays[key] = {"dtype": arr.dtype, "shape": list(arr.shape), "stype": arr.stype, "nbytes": len(arr.data)}
            tensors[f"{name}/{key}"] = arr.numpy()
        return {"type": "ArrayRecord", "arrays": arrays}
    if isinstance(rec, MetricRecord | ConfigRecord):
        return {"type": type(rec).__name__, "values": {k: _value(v) for k, v in rec.items()}}
    return {"type": type(rec).__name__, "values": {}}  # a record kind the test does not allow: named, then refused


def _value(v: Any) -> dict[str, Any]:
    """A metric or config value with its type; bytes as hex (JSON holds no bytes)."""
    if isinstance(v, list):
        return {"type": "list", "value": [_value(x) for x in v]}
    return {"type": type(v).__name__, "value": v.hex() if isinstance(v, bytes) else v}


@dataclass(frozen=True)
class SentMessage:
    """One recorded reply: what the device sent, and what it had received (to tell replies apart)."""

    node_id: int
    received: dict[str, Any]
    error: dict[str, Any] | None
    records: dict[str, Any]
    tensors: dict[str, np.ndarray]


def read_recordings(folder: Path) -> list[SentMessage]:
    """Every reply recorded under ``folder`` (one subfolder per device)."""
    out = []
    for meta in sorted(folder.glob("node-*/*.json")):
        sent = json.loads(meta.read_text())
        tensors = load(meta.with_suffix(".safetensors").read_bytes())
        node_id = int(meta.parent.name.removeprefix("node-"))
        out.append(SentMessage(node_id, sent["received"], sent["error"], sent["records"], tensors))
    return out


# what leaves the device (outermost), the product's own mods (SecAgg+), what the device computed (innermost)
app = ClientApp(mods=[record, *client_app.app._mods, record_before_masking])
app.train()(client_app.train)
app.evaluate()(client_app.evaluate_global)
