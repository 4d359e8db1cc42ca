"""Network models: how long a publish takes to reach its subscribers, and what it costs.

:class:`LinkNetwork` (one region, one broker): each endpoint has its own
:class:`~devices.profiles.LinkProfile`; a message takes
``sender uplink (FIFO) + sender latency + receiver downlink (FIFO) + receiver latency``,
each leg ``bytes × 8 / bandwidth``, one message per link at a time (slots reserved in
publish order). Every byte is counted, as running totals (devices' uploads and downloads,
the coordinator's, in flight each way: nothing per device); nothing is dropped (QoS 1 with
a persistent session).

:class:`RegionNetwork` (several regions): every link has the same bandwidth; a message
takes ``size / bandwidth`` on the sender's uplink (FIFO), the one-way latency between the
endpoints' regions (a matrix), then ``size / bandwidth`` on the receiver's downlink, which
serves messages in the order they *arrive* — so the driver calls :meth:`RegionNetwork.send`
at publish time and :meth:`RegionNetwork.arrive` when the message reaches the receiver's
side (a :attr:`~devices.engine.events.Kind.HOP` event). Topics may have several
subscribers (peer broadcasts).

Both route by topic only (the layout of :mod:`edge_sdk.wire.topics`); neither does work
per device per event.
"""

from __future__ import annotations

from collections.abc import Sequence

from devices.profiles import COORDINATOR_LINK, LinkProfile
from edge_sdk.errors import LocalProtocolError
from edge_sdk.wire import topics

__all__ = ["LinkNetwork", "RegionNetwork"]


class LinkNetwork:
    """Topic routing, link delays and byte accounting between ``n`` devices (endpoints
    ``0..n-1``) and the coordinator (endpoint ``n``)."""

    def __init__(self, device_ids: Sequence[str], links: Sequence[LinkProfile], *, region: str,
                 coordinator_link: LinkProfile = COORDINATOR_LINK) -> None:
        if len(device_ids) != len(links):
            raise LocalProtocolError("one link per device")
        n = len(device_ids)
        self.coordinator = n
        self.links: list[LinkProfile] = [*links, coordinator_link]
        self._routes: dict[str, int] = {}
        for i, dev in enumerate(device_ids):
            for leaf in topics.UPSTREAM:
                self._routes[topics.device_topic(region, dev, leaf)] = n
            for leaf in topics.DOWNSTREAM:
                self._routes[topics.device_topic(region, dev, leaf)] = i
        self._up_free = [0.0] * (n + 1)
        self._down_free = [0.0] * (n + 1)
        self.messages = 0
        self._device_up = 0
        self._device_down = 0
        self.coordinator_sent = 0
        """Bytes the coordinator has published to devices."""
        self.in_flight_up = 0
        """Bytes sent to the coordinator, not yet delivered."""
        self.in_flight_down = 0
        """Bytes sent to devices, not yet delivered."""

    def route(self, sender: int, topic: str, payload: bytes, now: float) -> tuple[int, float] | None:
        """Account for one publish; return ``(receiver, arrival time)``, or None for a
        message nobody here subscribes to (the retained status and recall, a stray topic)."""
        receiver = self._routes.get(topic)
        if receiver is None or receiver == sender:
            return None
        size = len(payload)
        up, down = self.links[sender], self.links[receiver]
        up_free, down_free = self._up_free, self._down_free
        bits = size * 8.0
        free = up_free[sender]
        start = now if now >= free else free  # max(now, free), the same float
        up_free[sender] = sent = start + bits / up.up_bps
        at_broker = sent + up.latency_s
        free = down_free[receiver]
        start = at_broker if at_broker >= free else free
        down_free[receiver] = done = start + bits / down.down_bps
        coordinator = self.coordinator
        if sender == coordinator:
            self.coordinator_sent += size
        else:
            self._device_up += size
        if receiver == coordinator:
            self.in_flight_up += size
        else:
            self.in_flight_down += size
        self.messages += 1
        return receiver, done + down.latency_s

    def delivered(self, receiver: int, size: int) -> None:
        if receiver == self.coordinator:
            self.in_flight_up -= size
        else:
            self.in_flight_down -= size
            self._device_down += size

    @property
    def device_bytes_up(self) -> int:
        """Bytes all devices have sent (a running total: no scan over the fleet)."""
        return self._device_up

    @property
    def device_bytes_down(self) -> int:
        """Bytes delivered to all devices (a running total)."""
        return self._device_down


class RegionNetwork:
    """Endpoints in regions, a one-way latency matrix (ms) and one bandwidth for every link."""

    def __init__(self, endpoint_region: Sequence[int], latency_ms: Sequence[Sequence[float]], bandwidth_bps: float) -> None:
        if not bandwidth_bps > 0:
            raise LocalProtocolError("bandwidth must be > 0")
        self.endpoint_region = list(endpoint_region)
        self.latency_ms = [list(row) for row in latency_ms]
        self.bandwidth = bandwidth_bps
        self.routes: dict[str, list[int]] = {}
        self.up_free = [0.0] * len(self.endpoint_region)
        self.down_free = [0.0] * len(self.endpoint_region)
        self.messages = 0

    def subscribe(self, topic: str, receivers: Sequence[int]) -> None:
        self.routes[topic] = list(receivers)

    def latency_s(self, a: int, b: int) -> float:
        return self.latency_ms[self.endpoint_region[a]][self.endpoint_region[b]] / 1000.0

    def send(self, sender: int, topic: str, size: int, now: float) -> list[tuple[int, float]]:
        """Reserve the sender's uplink for each subscriber (not the sender); return
        ``(receiver, time it reaches the receiver's side)``. No subscriber: nothing."""
        receivers = self.routes.get(topic)
        if receivers is None:
            return []
        seconds = size * 8.0 / self.bandwidth
        out: list[tuple[int, float]] = []
        for receiver in receivers:
            if receiver == sender:
                continue
            start = max(now, self.up_free[sender])
            self.up_free[sender] = start + seconds
            out.append((receiver, self.up_free[sender] + self.latency_s(sender, receiver)))
            self.messages += 1
        return out

    def arrive(self, receiver: int, size: int, now: float) -> float:
        """A message reached the receiver's side at ``now``: queue it on the downlink in
        arrival order; return when it is delivered."""
        start = max(now, self.down_free[receiver])
        self.down_free[receiver] = start + size * 8.0 / self.bandwidth
        return self.down_free[receiver]
