"""An in-process fleet for SecAgg+ tests: Flower's own InMemoryGrid + LinkState, devices running ``secagg_mod``.

The coordinator's side talks to a real Flower ``Grid`` (``flwr.superlink.grid.InMemoryGrid`` over
an ``InMemoryLinkState``, as ``flwr run`` in simulation uses); one thread plays the devices: it
pulls each node's messages from the LinkState, runs a real ``ClientApp(mods=[secagg_mod])``
whose train handler replies with that device's delta, and stores the reply. Every message goes
through Flower's protobuf encoding both ways (``tests/server/messages.through_flower``), and
every reply the coordinator will receive is recorded for inspection. A device "drops" at a stage
by going offline in the LinkState when that stage's message arrives (as a SuperNode whose
heartbeat lapses): the LinkState then answers its messages with an error, at once. A device
"is slow" by construction: ``hold[i](msg)`` keeps device i's message unanswered while it is true
(e.g. until the coordinator has signed a later release), whatever the machine's speed.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from client.secagg import secagg_mod
from shared.manifest import parse
from shared.release_records import RELEASE_MANIFEST
from shared.wire import pack
from tests.server.messages import through_flower

RUN_ID, TASK_ID = 4242, 77
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


class Fleet:
    """``deltas[i]`` is device i's delta; ``drop[i]`` the stage at which it goes offline; ``mods[i]`` its client
    mods; ``node_configs[i]`` its node config."""

    def __init__(
        self,
        deltas: list[dict[str, np.ndarray]],
        drop: Mapping[int, str] | None = None,
        mods: Mapping[int, list[Mod]] | None = None,
        hold: Mapping[int, Callable[[Message], bool]] | None = None,
        node_configs: Mapping[int, Mapping[str, str]] | None = None,
    ) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, TASK_ID, SUPERLINK_NODE_ID
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        self.state = cast(InMemoryLinkState, factory.state())
        run = Run.create_empty(run_id=RUN_ID)
        run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
        self.state.run_ids[RUN_ID] = RunRecord(run=run)
        self.state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
        self.nodes: list[int] = []
        for _ in deltas:
            nid = self.state.create_node(
                NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), HEARTBEAT_INTERVAL_INF
            )
            self.state.acknowledge_node_heartbeat(nid, HEARTBEAT_INTERVAL_INF)
            self.nodes.append(nid)
        self.grid = InMemoryGrid(factory, pull_interval=0.01)
        self.grid.set_run(run)
        self.delta = {nid: d for nid, d in zip(self.nodes, deltas, strict=True)}
        self.drop = {self.nodes[i]: stage for i, stage in (drop or {}).items()}
        self.hold = {self.nodes[i]: rule for i, rule in (hold or {}).items()}
        self.apps = {nid: _app(self, nid, (mods or {}).get(i, [])) for i, nid in enumerate(self.nodes)}
        configs = {self.nodes[i]: dict(c) for i, c in (node_configs or {}).items()}
        self.contexts = {nid: Context(RUN_ID, nid, configs.get(nid, {}), RecordDict(), {}) for nid in self.nodes}
        self.received: list[tuple[int, Message]] = []  # (sender, reply) as the coordinator gets it
        self.trained: set[int] = set()
        self.tasks: list[tuple[int, Message]] = []  # (device, train message) in the order devices trained
        self.examples = 10  # every device's example count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Fleet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def train_contents(self) -> dict[int, RecordDict]:
        """What the strategy would send each device this round (stand-in for the signed release and config)."""
        return {nid: RecordDict({"config": ConfigRecord({"server-round": 1})}) for nid in self.nodes}

    def _serve(self) -> None:
        offline: set[int] = set()
        waiting: dict[int, list[Message]] = {nid: [] for nid in self.nodes}  # pulled, not yet answered, in order
        while not self._stop.is_set():
            for nid in self.nodes:
                waiting[nid].extend(self.state.get_message_ins(node_id=nid, limit=1))
                while waiting[nid] and nid not in offline:
                    msg = waiting[nid][0]
                    if nid in self.hold and self.hold[nid](msg):
                        break  # slow by construction: answered once its rule lets it
                    waiting[nid].pop(0)
                    records = msg.content.config_records
                    stage = records[RECORD_KEY_CONFIGS][Key.STAGE] if RECORD_KEY_CONFIGS in records else None
                    if stage is not None and self.drop.get(nid) == stage:
                        offline.add(nid)
                        self.state.deactivate_node(nid)
                        continue
                    self._answer(nid, through_flower(msg))
            self._stop.wait(0.005)

    def _answer(self, nid: int, msg: Message) -> None:
        try:
            reply = self.apps[nid](msg, self.contexts[nid])
        except Exception as exc:  # as Flower's runtime: an exception in the ClientApp is an error reply
            reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        reply = through_flower(reply)
        self.received.append((nid, reply))
        self.state.store_message_res(reply)


def _app(fleet: Fleet, nid: int, extra: list[Mod]) -> ClientApp:
    app = ClientApp(mods=[*extra, secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fleet.trained.add(nid)
        fleet.tasks.append((nid, msg))
        arrays = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in fleet.delta[nid].items()})
        metrics = MetricRecord({"num-examples": fleet.examples, "train-loss": 1.0, "train-seconds": 0.1})
        if RELEASE_MANIFEST in msg.content.config_records.get("config", {}):  # a plain round: a signed release, fp16
            metrics["release-round"] = parse(cast(bytes, msg.content["config"][RELEASE_MANIFEST])).round
            arrays = pack({k: torch.from_numpy(v) for k, v in fleet.delta[nid].items()}, "fp16")
        content = RecordDict({"arrays": arrays, "metrics": metrics, "client": ConfigRecord({"name": f"dev-{nid}"})})
        return Message(content, reply_to=msg)

    return app
