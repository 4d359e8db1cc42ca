"""MQTT topic layout. Topics are built and parsed *only* here.

Per-device subtrees let a broker ACL confine a device to its own topics::

    edgeci/v1/{region}/dev/{device}/pull     device → coordinator
    edgeci/v1/{region}/dev/{device}/update   device → coordinator
    edgeci/v1/{region}/dev/{device}/presence device → coordinator, retained online|offline (last will)
    edgeci/v1/{region}/dev/{device}/model    coordinator → device
    edgeci/v1/{region}/dev/{device}/ack      coordinator → device
    edgeci/v1/{region}/dev/{device}/invite   coordinator → device
    edgeci/v1/{region}/status                coordinator, retained JSON
    edgeci/v1/{region}/control               operator → coordinator (signed commands)
    edgeci/v1/{region}/recall                coordinator → devices, retained (signed: versions abandoned)
    edgeci/v1/peer/{coordinator}/{kind}      coordinator → coordinator

A signed message binds its topic's :func:`signing_scope` (the topic less the root and the
device id), so it verifies only where it was meant to be published.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edge_sdk.errors import ConfigError, MalformedMessage
from edge_sdk.fastinit import fast_init

ROOT = "edgeci/v1"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")  # \Z: "$" would also take a final newline

DeviceLeaf = Literal["pull", "update", "presence", "model", "ack", "invite"]
UPSTREAM: tuple[DeviceLeaf, ...] = ("pull", "update", "presence")
DOWNSTREAM: tuple[DeviceLeaf, ...] = ("model", "ack", "invite")


def is_id(value: object) -> bool:
    """Whether ``value`` is an id :func:`check_id` takes (for a caller that refuses otherwise)."""
    return isinstance(value, str) and _ID.match(value) is not None


def check_id(value: str, what: str = "id") -> str:
    """Region, device and coordinator ids: 1–64 of ``[A-Za-z0-9_.-]``, no MQTT wildcards."""
    if not is_id(value):
        raise ConfigError(f"invalid {what} {value!r}: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def device_topic(region: str, device: str, leaf: DeviceLeaf) -> str:
    return f"{ROOT}/{check_id(region, 'region')}/dev/{check_id(device, 'device id')}/{leaf}"


def device_filter(region: str, leaf: DeviceLeaf) -> str:
    """Subscription filter for one leaf of every device in a region (coordinator side)."""
    return f"{ROOT}/{check_id(region, 'region')}/dev/+/{leaf}"


def status_topic(region: str) -> str:
    return f"{ROOT}/{check_id(region, 'region')}/status"


def control_topic(region: str) -> str:
    """Operator → coordinator commands (rollback, pin); only operator identities may write."""
    return f"{ROOT}/{check_id(region, 'region')}/control"


def recall_topic(region: str) -> str:
    """Coordinator → every device of the region: the versions it abandoned (see ``Recall``)."""
    return f"{ROOT}/{check_id(region, 'region')}/recall"


def peer_topic(recipient: str, kind: str) -> str:
    """Coordinator → coordinator: ``recipient`` is a coordinator id, or ``all`` for everyone."""
    return f"{ROOT}/peer/{check_id(recipient, 'coordinator id')}/{check_id(kind, 'peer kind')}"


def peer_filter(recipient: str | None = None) -> str:
    """Every peer message addressed to ``recipient`` (any recipient when None)."""
    return f"{ROOT}/peer/{'+' if recipient is None else check_id(recipient, 'coordinator id')}/+"


@fast_init
@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: Literal["device", "status", "control", "recall", "peer"]
    region: str = ""
    device: str = ""
    leaf: str = ""
    coordinator: str = ""


_ID_BODY = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
"""What ``_ID.match`` accepts, as part of a larger pattern."""
_DEVICE_TOPIC = re.compile(
    rf"{re.escape(ROOT)}/({_ID_BODY})/dev/({_ID_BODY})/({'|'.join(UPSTREAM + DOWNSTREAM)})"
)
"""A device topic in one match (the hot path of every message); it accepts exactly the
topics the general rules below classify as ``device`` (``tests/test_wire.py`` compares)."""


def parse(topic: str) -> ParsedTopic:
    """Inverse of the builders; raises :class:`MalformedMessage` for anything else."""
    m = _DEVICE_TOPIC.fullmatch(topic) if type(topic) is str else None
    if m is not None:
        region, device, leaf = m.groups()
        return ParsedTopic("device", region=region, device=device, leaf=leaf)
    parts = topic.split("/")
    if len(parts) >= 3 and "/".join(parts[:2]) == ROOT:
        rest = parts[2:]
        if (
            len(rest) == 4
            and rest[1] == "dev"
            and rest[3] in UPSTREAM + DOWNSTREAM
            and _ID.match(rest[0])
            and _ID.match(rest[2])
        ):
            return ParsedTopic("device", region=rest[0], device=rest[2], leaf=rest[3])
        if len(rest) == 2 and rest[1] == "status" and _ID.match(rest[0]):
            return ParsedTopic("status", region=rest[0])
        if len(rest) == 2 and rest[1] == "control" and _ID.match(rest[0]):
            return ParsedTopic("control", region=rest[0])
        if len(rest) == 2 and rest[1] == "recall" and _ID.match(rest[0]):
            return ParsedTopic("recall", region=rest[0])
        if len(rest) == 3 and rest[0] == "peer" and _ID.match(rest[1]) and _ID.match(rest[2]):
            return ParsedTopic("peer", coordinator=rest[1], leaf=rest[2])
    raise MalformedMessage(f"not an edgeci topic: {topic[:120]!r}")


def signing_scope(topic: str) -> str:
    """What a signature on a message published to ``topic`` binds (see the codec): the
    topic without its root and without the device id — ``{region}/dev/{leaf}``,
    ``{region}/status``, ``{region}/control``, ``{region}/recall``, ``peer/{recipient}/{kind}``. The device id is
    left out because a coordinator signs a model reply once for every device of its region
    that asks; the region, the leaf and a peer message's recipient are in. Raises
    :class:`MalformedMessage` for a topic that is not an edgeci topic."""
    p = parse(topic)
    if p.kind == "device":
        return device_scope(p.region, p.leaf)
    if p.kind == "peer":
        return f"peer/{p.coordinator}/{p.leaf}"
    return f"{p.region}/{p.kind}"


def device_scope(region: str, leaf: str) -> str:
    """:func:`signing_scope` of every device's ``leaf`` topic in ``region``."""
    return f"{region}/dev/{leaf}"
