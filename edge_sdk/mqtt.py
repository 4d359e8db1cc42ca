"""The paho-mqtt adapter (callback API v2, MQTT 3.1.1 so any broker works).

paho's network thread never runs domain logic: ``on_message`` only hands ``(topic,
payload)`` to a callback that enqueues it for the owning actor. Subscriptions are made in
the connect handler so they survive reconnects; paho's loop reconnects with capped
exponential backoff (``reconnect_delay_set``). Transport failures surface as
:class:`~edge_sdk.errors.TransportError`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_sdk.errors import ConfigError, TransportError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (default port 1883); ``host:port`` is accepted too."""
    if "://" not in url:
        url = "mqtt://" + url
    parsed = urlparse(url)
    if parsed.scheme != "mqtt" or not parsed.hostname:
        raise ConfigError(f"broker URL must look like mqtt://HOST:PORT, got {url!r}")
    try:
        port = parsed.port or 1883
    except ValueError as exc:
        raise ConfigError(f"bad port in broker URL {url!r}") from exc
    return BrokerAddress(parsed.hostname, port)


class MqttTransport:
    """One paho client: connect, (re)subscribe, publish; messages go to ``on_message``."""

    def __init__(
        self,
        url: str,
        client_id: str,
        subscriptions: Sequence[str],
        on_message: Callable[[str, bytes], None],
        *,
        keepalive: int = 30,
        clean_session: bool = False,
        on_connection: Callable[[bool], None] | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.address = parse_broker_url(url)
        self._subs = list(subscriptions)
        self._on_message = on_message
        self._on_connection = on_connection
        self._connected = threading.Event()
        self._keepalive = keepalive
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=clean_session,
        )
        self._client.max_inflight_messages_set(64)
        self._client.max_queued_messages_set(0)  # never drop outgoing messages locally
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 15.0) -> None:
        """Connect and start the network thread; raise ``TransportError`` if no CONNACK in time."""
        try:
            # A synchronous first connect fails fast (and clearly) when nothing listens;
            # after that paho's loop reconnects with backoff on its own.
            self._client.connect(self.address.host, self.address.port, keepalive=self._keepalive)
            self._client.loop_start()
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot reach broker {self.address.url}: {exc}") from exc
        if not self._connected.wait(timeout):
            self.stop()
            raise TransportError(f"no connection to broker {self.address.url} within {timeout:.0f} s")

    def stop(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            # NO_CONN: paho keeps QoS>0 messages queued and sends them after reconnecting.
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")

    # paho callbacks (network thread): no domain logic here.

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker %s refused the connection: %s", self.address.url, reason)
            return
        if self._subs:
            client.subscribe([(t, 1) for t in self._subs])
        self._connected.set()
        if self._on_connection:
            self._on_connection(True)

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        if self._on_connection:
            self._on_connection(False)

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._on_message(message.topic, bytes(message.payload))
