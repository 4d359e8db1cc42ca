"""``edgeci status`` — read a region's retained status from the broker and print it."""

from __future__ import annotations

import argparse
import json
import threading

from edge_sdk.errors import TransportError
from edge_sdk.mqtt import MqttTransport
from edge_sdk.wire import topics
from edge_sdk.wire.codec import parse_status_json


def read_status(broker: str, region: str, timeout: float = 5.0) -> dict[str, object]:
    """The retained status JSON of ``region`` (raises TransportError if none arrives)."""
    got: list[bytes] = []
    event = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        got.append(payload)
        event.set()

    import uuid

    t = MqttTransport(broker, client_id=f"edgeci-status-{uuid.uuid4().hex[:8]}", subscriptions=[topics.status_topic(region)], on_message=on_message, clean_session=True)
    t.start(timeout)
    try:
        if not event.wait(timeout):
            raise TransportError(f"no status for region {region!r} on {broker} within {timeout:.0f} s")
    finally:
        t.stop()
    return parse_status_json(got[-1])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    p.add_argument("--region", default="default")
    p.add_argument("--timeout", type=float, default=5.0)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(read_status(args.broker, args.region, args.timeout), indent=2, sort_keys=True))
    return 0
