"""Device replies as the coordinator receives them: Flower ``Message`` objects, through Flower's own encoding."""

import time

from flwr.app import Message, Metadata, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage


def through_flower(msg: Message) -> Message:
    """What the coordinator receives: the message after Flower's own protobuf encoding and back."""
    wire = message_to_proto(msg).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(wire)
    return message_from_proto(proto)


def metadata(node: int = 7, **fields) -> Metadata:
    """Flower metadata of a train message about ``node``: by default a reply from it to message ``q<node>``."""
    values = dict(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"q{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )
    return Metadata(**{**values, **fields})


def message(records: dict, node: int = 7) -> Message:
    """A reply of ``node`` holding ``records``."""
    return Message(RecordDict(records), metadata=metadata(node))
