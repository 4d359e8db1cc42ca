"""The wire protocol shared by devices and coordinators: messages, codec, topics."""

from edge_sdk.wire.codec import DEFAULT_MAX_BYTES, PROTOCOL_VERSION, decode, encode
from edge_sdk.wire.messages import (
    Ack,
    AckStatus,
    Invite,
    Message,
    ModelMsg,
    PeerMsg,
    Pull,
    Status,
    Update,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "AckStatus",
    "Invite",
    "Message",
    "ModelMsg",
    "PeerMsg",
    "Pull",
    "Status",
    "Update",
    "decode",
    "encode",
]
