"""The paho-mqtt adapter (callback API v2, MQTT 3.1.1 so any broker works).

paho's network thread never runs domain logic: ``on_message`` only hands ``(topic,
payload)`` to a callback that enqueues it for the owning actor. Subscriptions are made in
the connect handler so they survive reconnects; paho's loop reconnects with capped
exponential backoff (``reconnect_delay_set``), each wait drawn from its upper half (jitter: a fleet
that lost one broker does not come back in step). Transport failures surface as
:class:`~edge_sdk.errors.TransportError`.

Security: ``mqtts://host[:8883]`` connects over TLS with the broker's certificate always
verified (chain *and* host name; there is no switch to turn that off) against
``BrokerAuth.ca_file`` or the system's CAs, presenting a client certificate and/or a
username and password when :class:`BrokerAuth` carries them. A connection the broker
refuses (unknown certificate, not authorised, bad password) makes :meth:`MqttTransport.start`
raise a ``TransportError`` that says why, at once, instead of waiting for a CONNACK that
never comes. Plain ``mqtt://`` stays for tests and the embedded trial broker; to a
non-loopback host it logs a warning.

``own_loop=True`` (the coordinator daemon): no paho network thread. The transport is the
:class:`~edge_sdk.runtime.ActorIO` of the actor that owns the core, which waits on its socket
and calls paho's ``loop_read`` / ``loop_write`` / ``loop_misc`` itself, so a message is
read, handled and answered on one thread, and a publish from that thread is written to the
socket at once (no socketpair wake-up). Reconnects keep a capped exponential backoff (1 s
doubling to ``reconnect_max_s``, jittered as paho's), attempted from the actor's loop; it resets
only after a connection that lasted ``STABLE_S`` (see :data:`COORDINATOR_RECONNECT_MAX_S`). A lock serialises every paho call,
so ``publish`` and ``stop`` from other threads stay safe. Over plain TCP the socket paho
sees reads ahead and holds the packets paho sends until the loop is about to wait (or a
publish from another thread returns): one ``recv`` and one ``sendmsg`` per batch instead of
three ``recv`` per packet read and one ``send`` per packet written.

``manual_ack=True`` (the coordinator daemon): a QoS 1 message's PUBACK tells the broker it may
forget the message, so it leaves only when the owner says the message is safe. ``on_message``
takes the PUBACK of the message it is given with :meth:`MqttTransport.hold_ack`; the daemon
hands the result to :meth:`MqttTransport.ack` once the actor has handled the message and its
batch is durable. A PUBACK still held when the connection ends is never sent (nor on the next
connection, whose packet ids are new): with a persistent session the broker delivers the
message again; :meth:`MqttTransport.redeliver` ends the connection on purpose for that (a batch
whose storage failed). Messages ``on_message`` does not take (and all of them without
``manual_ack``) are acknowledged as soon as it returns, as paho does. The same on the fast
path and on paho's (TLS; ``Client(manual_ack=True)`` and ``Client.ack``).

The fast path (own_loop, plain TCP, paho 2.2.x: ``PAHO_FAST_PATHS``): the data traffic, MQTT
3.1.1 PUBLISH (QoS 0 and 1) and PUBACK, bypasses paho's per-packet machinery. Incoming
packets are parsed straight from the read-ahead buffer and handed to ``on_message`` in
stream order, each QoS 1 one followed by its PUBACK (held with the batch's other writes, as
paho's was; with ``manual_ack`` when the owner acknowledges it); outgoing PUBLISH packets are a small header plus the caller's payload bytes in
the batch's one ``sendmsg`` (no copy). QoS 1 messages we send stay in our own in-flight
table until their PUBACK (packet ids from paho's own counter, so never one paho uses), at most
``FAST_MAX_INFLIGHT`` unacknowledged (later ones wait, in order), and are all resent, DUP set,
after a reconnect, before anything newer. paho still does CONNECT, SUBSCRIBE, keepalive,
reconnect and every other packet (CONNACK, SUBACK, PINGRESP, QoS 2), read by its own
``loop_read`` in stream order; TLS connections and other paho releases keep paho's path for
everything. A malformed packet (a remaining length over 4 bytes, QoS 3, a PUBLISH shorter
than its topic, a topic that is not UTF-8, packet id 0, a PUBACK that is not 2 bytes, a
reserved packet type) is counted in ``malformed_packets`` (:class:`MalformedPacketError`) and
drops the connection, which is re-established with the usual backoff. Once subscribed, the
socket's receive low-water mark (``RECV_LOW_WATER``) keeps a lone PUBACK from waking the loop
(it is 1 while part of a packet is held, so the rest wakes it however short). QoS 1 messages
the broker has not acknowledged are kept for resending, up to ``FAST_MAX_QUEUED`` (MQTT has
65,535 packet ids): beyond that, after a long outage or with a broker that stopped
acknowledging, the oldest one not yet sent is dropped, logged and counted in
``dropped_messages`` (a device whose Ack or model is lost asks again). A lost connection
closes without waiting for held writes to drain, unless what is held ends with our DISCONNECT;
``stop()`` first lets messages queued behind the unacknowledged ones go out (for up to
``STOP_DRAIN_S``), so a stop under backlog still delivers the daemon's last status.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import json
import logging
import os
import random
import re
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt import __version__ as PAHO_VERSION
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion, _ConnectionState
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_sdk.errors import BadOption, BrokerRefused, ConfigError, TransportError
from edge_sdk.runtime import wait_io

_PAHO_INTERNALS = (
    "_sock", "_in_packet", "_out_packet", "_mid_generate", "_loop_rc_handle", "_last_msg_out",
    "_last_bytes_received", "_out_message_mutex", "_out_messages", "_do_on_publish", "_easy_log",
    "_handle_pubackcomp", "_protocol", "_reset_sockets", "_ping_t", "_keepalive", "_msgtime_mutex",
    "_send_pingreq", "_check_keepalive", "_sock_recv", "_sock_send",
)
"""What of paho's the shortcuts touch (a 2.2.x patch release that renamed one turns them off), the
slow-link keepalive of :class:`_Client` and :meth:`MqttTransport.receiving` included."""


def _paho_has_internals() -> bool:
    probe = paho.Client(CallbackAPIVersion.VERSION2)  # no socket until it connects
    return all(hasattr(probe, name) for name in _PAHO_INTERNALS)


PAHO_FAST_PATHS = PAHO_VERSION.split(".")[:2] == ["2", "2"] and _paho_has_internals()
"""The coordinator's two shortcuts through paho's internals (:class:`_Corked` replaces paho's
socket attribute; :class:`_Client` its PUBACK handler) are taken only with the paho release they
were written and tested against (2.2.x) and only if it has every internal they use; otherwise
paho's own code runs (slower, same behaviour), so an upgrade of paho cannot break a coordinator
through them."""

log = logging.getLogger("edgeci.mqtt")

PASSWORD_ENV = "EDGECI_PASSWORD"
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30
COORDINATOR_RECONNECT_MAX_S = 5
"""The coordinator daemon's cap on the reconnect backoff (``reconnect_max_s``): every device waits on
it. With paho's 30 s, a coordinator on a link cut every 3 s was connected 18 % of the time and waited up
to 30 s to reconnect, 15 s after the last cut (tests/flap_measure.py, 60 s of flapping; with 5 s: 41 %,
at most 4.6 s). At most STABLE_S / 2, so the takeover guard holds: two clients with one id take the
session from each other, each connection lasting only the other's wait (at most this), never STABLE_S."""
STABLE_S = 10.0
"""A connection that lasted this long resets the reconnect backoff; a shorter one keeps it growing
(own_loop; paho's own loop resets it at every CONNACK)."""
SHORT_DROPS = 3
"""Connections closed before STABLE_S this many times in a row: a flapping link, or another client with our id."""
DUPLICATE_RECONNECT_S = 60.0
"""After :meth:`MqttTransport.yield_session` (its owner found another client using its id): the wait
before taking the session back from a client that took it within STABLE_S of our connecting. Two
devices on one id swapped the session every 1.4 s with paho's 1 s back-off (tests/duplicate_measure.py:
42 swaps each in 60 s, each connection 0.5-1.0 s); with this wait each keeps it for a stretch (the
other's wait: 30-60 s, jittered), long enough for its rounds, while the other holds its labels."""
JITTER = 0.5
"""Each reconnect wait is drawn from [delay × (1 - JITTER), delay]: clients that lost the same broker at
the same moment (a restart) spread their reconnects instead of arriving together at every doubling."""
IOV_MAX = 1024
READS_PER_WAKEUP = 64
"""own_loop: most ``loop_read`` calls per wake-up while read-ahead bytes remain."""
MISC_EVERY_S = 0.5
"""own_loop: paho's keepalive bookkeeping (``loop_misc``) at least this often."""
FAST_MAX_INFLIGHT = 256
"""Fast path: QoS 1 messages sent and not yet acknowledged by the broker; later ones wait (in
order) in memory, as paho's own queue did beyond its in-flight limit (64, which a pull burst of
39 KB models reaches while the broker waits for CPU)."""
FAST_MAX_QUEUED = 65_000
"""Fast path: QoS 1 messages kept until acknowledged (sent or waiting); beyond it the oldest waiting one is
dropped and counted in ``dropped_messages`` (MQTT has 65,535 packet ids)."""
STOP_DRAIN_S = 2.0
"""The longest :meth:`MqttTransport.stop` waits for its QoS 1 messages to be sent and
acknowledged before it disconnects (a broker that stopped acknowledging costs a stop this
long). Acknowledged, not only sent: mosquitto before 2.0.22 answers a QoS 1 PUBLISH whose
client closed before its PUBACK went out with "disconnected due to out of memory" — and
publishes the client's last will over the message just sent (mosquitto #3253: a coordinator's
retained "stopped" status read "connection lost" about once in 40 stops)."""
DISCONNECT_PACKET = b"\xe0\x00"
"""MQTT 3.1.1 DISCONNECT: :meth:`MqttTransport.redeliver` ends with it, so the broker drops our last
will (a will says ``alive: false``: devices fail over on it, ``edgeci pin`` took it for a stop)
and keeps the session, whose unacknowledged messages it sends again at the reconnect [MQTT-4.4.0-1]."""
REDELIVER_FLUSH_S = 2.0
"""The longest :meth:`MqttTransport.redeliver` waits for the socket to take what is queued
(the PUBACKs already released among it) before it closes the connection."""
MAX_RECV = 1 << 20
"""Fast path: the most one ``recv`` asks for while a large packet is being read."""
HELD_COPY_SCAN = 64
"""``skip_held_copies``: how many of the newest messages paho holds unacknowledged are looked at for a copy
(a device holds a few; a burst of 3,000 held made a full scan cost 0.23 ms per publish, measured)."""
RECEIVING_QUIET_S = 2.0
""":meth:`MqttTransport.receiving` / ``sending``: bytes that moved this long ago no longer count."""
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
KEEPALIVE_S = 30
"""The MQTT keepalive of the coordinator and of devices unless ``--keepalive`` / ``keepalive_s`` say otherwise."""
KEEPALIVE_MIN_S, KEEPALIVE_MAX_S = 5, 3600
KEEPALIVE_RULE = f"must be a whole number of seconds from {KEEPALIVE_MIN_S} to {KEEPALIVE_MAX_S}"
KEEPALIVE_HELP = (
    f"MQTT keepalive in seconds ({KEEPALIVE_MIN_S}-{KEEPALIVE_MAX_S}, default {KEEPALIVE_S}): a broker or link that "
    "dies without closing the connection (a NAT that forgot it, a radio gone) is noticed after about 1.5 keepalives by "
    "the broker (it publishes our last will) and after about 2 by us (we reconnect); shorter notices sooner, but "
    "an idle connection then sends a ping and its answer (2 bytes each, about 110 bytes with TCP/IP headers, "
    "more over TLS) every keepalive, which a metered link pays for. A slow transfer is never cut by it: while bytes move the link counts as alive"
)
"""``--keepalive``'s help (``edgeci coordinator``, ``edgeci device``): what the setting trades."""


HeldAck = tuple[int, int, int]
"""A PUBACK :meth:`MqttTransport.hold_ack` holds: (connection, packet id, QoS)."""


class MalformedPacketError(TransportError):
    """The broker sent bytes that are not MQTT 3.1.1 (fast path): the connection is dropped
    (and re-established with backoff) and the error counted in ``malformed_packets``."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def check_keepalive(value: object, name: str = "keepalive_s") -> int:
    """``value`` as an MQTT keepalive in whole seconds, :data:`KEEPALIVE_MIN_S`..:data:`KEEPALIVE_MAX_S`;
    else a :class:`ConfigError` naming ``name`` (the flag or argument)."""
    if isinstance(value, bool) or not isinstance(value, int) or not KEEPALIVE_MIN_S <= value <= KEEPALIVE_MAX_S:
        raise ConfigError(f"{name} {KEEPALIVE_RULE}, got {value!r} (below {KEEPALIVE_MIN_S} s pings flood a metered link; above {KEEPALIVE_MAX_S} s a "
                          "dead broker goes unnoticed for hours)")
    return value


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (default 1883) or ``mqtts://host[:port]`` (TLS, default 8883);
    ``host:port`` is accepted too and means plain MQTT."""
    given = url
    if "://" not in url:
        url = "mqtt://" + url
    parsed = urlparse(url)
    if parsed.scheme not in DEFAULT_PORTS or not parsed.hostname or parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        # a path: e.g. "mqtt//host:1883" (a missing colon) read as host "mqtt", path "//host:1883"
        raise ConfigError(f"broker URL must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {given!r}")
    if parsed.username or parsed.password:
        raise ConfigError("put no credentials in the broker URL: use --username with --password-file (or EDGECI_PASSWORD)")
    try:
        port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    except ValueError as exc:
        raise ConfigError(f"bad port in broker URL {url!r}") from exc
    return BrokerAddress(parsed.hostname, port, tls=parsed.scheme == "mqtts")


@dataclass(frozen=True, slots=True)
class BrokerAuth:
    """How to prove who we are to the broker and check who the broker is.

    ``ca_file``: the CA that signed the broker's certificate (default: the system's CAs).
    ``cert_file`` / ``key_file``: our client certificate (its CN is our MQTT username on a
    broker with ``use_identity_as_username``). ``username`` / ``password``: the password-file
    alternative. Certificates need an ``mqtts://`` URL; so does a password to a remote host.
    ``hint``: what a connection refused for want of a trusted CA or a client certificate tells
    the user to do, in place of naming :func:`add_broker_arguments`' flags (``--bundle``, ``--ca``,
    ``--cert``/``--key``): for a command that has none of them (``edgeci run``).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    hint: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a client certificate needs both cert_file and key_file")
        if self.password is not None and not self.username:
            raise ConfigError("a password needs a username")
        for f in (self.ca_file, self.cert_file, self.key_file):
            if f is not None and not Path(f).is_file():
                raise ConfigError(f"{f} does not exist")

    @classmethod
    def from_bundle(cls, directory: str | Path) -> BrokerAuth:
        """The credentials of a bundle written by ``edgeci pki issue`` (``bundle.json``):
        CA, certificate and key, plus username/password when ``edgeci pki passwd`` gave one."""
        d = Path(directory).expanduser()
        manifest = read_bundle(d)
        password = None
        if manifest.get("password_file"):
            try:
                password = (d / str(manifest["password_file"])).read_text().strip()
            except OSError as exc:  # (a traceback at start, and a SIGHUP then stopped the coordinator)
                raise ConfigError(f"bundle {d}: cannot read its password file {manifest['password_file']}: "
                                  f"{exc.strerror or exc}") from exc
        return cls(
            ca_file=d / str(manifest.get("ca", "ca.crt")),
            cert_file=d / str(manifest["cert"]) if manifest.get("cert") else None,
            key_file=d / str(manifest["key"]) if manifest.get("key") else None,
            username=str(manifest["username"]) if password is not None else None,
            password=password,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """TLS ≥ 1.2, the broker's chain and host name verified; our certificate if any."""
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file is not None and self.key_file is not None:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS files ({self}): {exc}") from exc
        return ctx


ANY_REGION = "+"
"""A bundle's ``regions`` entry for every region (operators: ``edgeci pki issue --role operator``)."""


def read_bundle(directory: str | Path) -> dict[str, Any]:
    """A provisioning bundle's ``bundle.json`` (see :mod:`coordinator.pki`)."""
    path = Path(directory).expanduser() / "bundle.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path.parent} is not an edgeci bundle (bundle.json: {exc})") from exc
    if not isinstance(manifest, dict) or "identity" not in manifest:
        raise ConfigError(f"{path} is not an edgeci bundle manifest")
    return manifest


def regions_outside(manifest: Mapping[str, Any], regions: Sequence[str]) -> list[str]:
    """The ``regions`` a bundle's manifest does not cover (the broker's ACL gives a bundle its
    regions' topics only; ``+`` or no list: every region)."""
    allowed = manifest.get("regions")
    if not isinstance(allowed, list) or ANY_REGION in allowed:
        return []
    return [r for r in regions if r not in allowed]


TOFU_DEVICES = (
    "Without a bundle a device trusts the first key that signs a model (trust on first use), and keeps it: insecure, "
    "since whoever publishes a signed model on the broker before the coordinator does becomes the key the device "
    "trusts. For anything but a trial on your own machine, issue bundles with `edgeci pki issue` and pass --bundle: "
    "its trusted/ folder holds the coordinators' keys."
)
"""What ``--help`` says about trust on first use for commands that run devices (H4's F12)."""
TOFU_PEERS = (
    "Without a bundle whose trusted/ holds keys, a coordinator with --peers trusts the first key "
    "each peer signs with (trust on first use, pinned until the process restarts): insecure, since whoever publishes on "
    "peer/... before that peer (after each restart too) becomes it. Issue every coordinator with `edgeci pki issue --role coordinator` and pass --bundle: its trusted/ "
    "folder holds the other coordinators' keys."
)


def add_broker_arguments(p: argparse.ArgumentParser, *, trust: str = "", bundle_help: str = "") -> None:
    """``--bundle``, ``--ca``, ``--cert``, ``--key``, ``--username``, ``--password-file``
    (``--broker`` stays with each command). Never a password on the command line.
    ``trust``: what the command does without a bundle's trusted keys (``TOFU_DEVICES``);
    ``bundle_help``: ``--bundle``'s help where it means something else (a fleet's folder)."""
    g = p.add_argument_group(
        "broker authentication",
        "Use an mqtts://HOST[:8883] --broker URL: the broker's certificate is always verified. "
        "An mqtt:// URL (the default where --broker has one) is plain MQTT: unencrypted, and the trial brokers "
        "(the embedded one, coordinator/mosquitto/edgeci.conf) let anyone who reaches them connect, read and "
        "publish: for trials on this machine only. "
        "A password is read from --password-file or the EDGECI_PASSWORD environment variable, never from the command line."
        + (" " + trust if trust else ""),
    )
    g.add_argument("--bundle", type=Path, metavar="DIR",
                   help=bundle_help or "provisioning bundle from `edgeci pki issue` (CA, certificate, key, trusted coordinator keys)")
    g.add_argument("--ca", type=Path, metavar="FILE", help="CA certificate that signed the broker's certificate (default: the bundle's, else the system's)")
    g.add_argument("--cert", type=Path, metavar="FILE", help="client certificate (PEM); its CN is the MQTT username")
    g.add_argument("--key", type=Path, metavar="FILE", help="client private key (PEM)")
    g.add_argument("--username", help="MQTT username (password-file brokers)")
    g.add_argument("--password-file", type=Path, metavar="FILE", help=f"file holding the MQTT password (or set {PASSWORD_ENV})")


def auth_from_args(args: argparse.Namespace) -> BrokerAuth | None:
    """A :class:`BrokerAuth` from :func:`add_broker_arguments`' flags (explicit flags
    override the bundle's); None when none was given."""
    bundle = getattr(args, "bundle", None)
    auth = BrokerAuth.from_bundle(bundle) if bundle else None
    given: dict[str, Any] = {}
    for attr, name in (("ca", "ca_file"), ("cert", "cert_file"), ("key", "key_file"), ("username", "username")):
        if getattr(args, attr, None):
            given[name] = getattr(args, attr)
            if attr != "username" and not Path(given[name]).is_file():  # (BrokerAuth's words name its fields, not the flags)
                path = Path(given[name])
                bundle = " (a bundle: pass it as --bundle)" if (path / "bundle.json").is_file() else ""
                why = (f"is a directory, not a file{bundle}" if path.is_dir()
                       else "not a regular file" if path.exists() else "no such file")
                raise BadOption(f"--{attr} {path}: {why}")
    if auth is None and ("cert_file" in given) != ("key_file" in given):
        raise BadOption("--cert and --key go together: the client certificate and its private key (or a --bundle holding both)")
    password_file = getattr(args, "password_file", None)
    if password_file:
        try:
            given["password"] = Path(password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the password file: {exc}") from exc
    elif given.get("username") and os.environ.get(PASSWORD_ENV):
        given["password"] = os.environ[PASSWORD_ENV]
    if auth is None and not given:
        return None
    return replace(auth, **given) if auth is not None else BrokerAuth(**given)


class MqttTransport:
    """One paho client: connect, (re)subscribe, publish; messages go to ``on_message``."""

    def __init__(
        self,
        url: str,
        client_id: str,
        subscriptions: Sequence[str],
        on_message: Callable[[str, bytes], None],
        *,
        keepalive: int = KEEPALIVE_S,
        clean_session: bool = False,
        on_connection: Callable[[bool], None] | None = None,
        will: tuple[str, bytes] | None = None,
        auth: BrokerAuth | None = None,
        own_loop: bool = False,
        manual_ack: bool = False,
        skip_held_copies: bool = False,
        reconnect_max_s: float = RECONNECT_MAX_S,
        rng: random.Random | None = None,
    ) -> None:
        self.address = parse_broker_url(url)
        if not reconnect_max_s >= RECONNECT_MIN_S:
            raise ConfigError(f"reconnect_max_s must be at least {RECONNECT_MIN_S} s, got {reconnect_max_s}")
        if not 1 <= keepalive <= 65535:  # (MQTT's two bytes; 0 would turn the keepalive off)
            raise ConfigError(f"keepalive must be 1..65535 s, got {keepalive}")
        self._reconnect_max_s = reconnect_max_s
        self._rng = rng or random.Random()
        """The reconnect jitter's draws (injected by tests)."""
        self.skip_held_copies = skip_held_copies
        """A QoS 1 publish identical to one paho still holds unacknowledged is not queued again (see
        :meth:`_unacknowledged_copy`; the device's retries). Off by default: a caller that publishes the
        same bytes twice on purpose (a test of the coordinator's deduplication) still sends both."""
        self.own_loop = own_loop
        self.manual_ack = manual_ack
        """The PUBACK of a QoS 1 message that ``on_message`` takes with :meth:`hold_ack` waits for
        :meth:`ack` (see :meth:`hold_ack`); every other message is acknowledged once ``on_message`` returns."""
        self._ack_session = 0  # a held PUBACK is sent only on the connection it came from (see hold_ack)
        self._delivering: HeldAck | None = None  # the message on_message is being called for, while unclaimed
        self._take_held = self._deliver_held if manual_ack else None
        self.redeliveries = 0
        """Connections closed by :meth:`redeliver` (held PUBACKs withheld, so that the broker sends again)."""
        self._redelivering = False  # the connection's end is redeliver()'s: not a broker problem (see _handle_disconnect)
        self._lock = threading.RLock()  # own_loop: every paho call (paho's own thread is not there)
        self._wake: Callable[[], None] = _nothing
        self._started = False
        self._stopping = False
        self._reconnect_at: float | None = None
        self._reconnect_delay: float = RECONNECT_MIN_S
        self._client_id = client_id
        self._connected_at: float | None = None
        self._short_drops = 0
        self._yield_s = 0.0  # yield_session: the wait after a takeover
        self.yielded = 0
        """Waits of :meth:`yield_session`'s length after a connection taken over within STABLE_S."""
        self.short_drop_runs = 0
        """Runs of :data:`SHORT_DROPS` connections in a row closed before STABLE_S (a flapping link, or
        another client with our id): the first said at WARNING, later ones at INFO."""
        self._misc_at = 0.0
        self._loop_ident: int | None = None
        self.auth = auth
        self._subs = list(subscriptions)
        self._on_message = on_message
        self._ours = subscription_matcher(self._subs)
        self._on_connection = on_connection
        self._connected = threading.Event()
        self._lost_at: float | None = None  # when an established connection dropped (for the reconnect's log line)
        self._settled = threading.Event()  # first CONNACK, or the broker turned us away
        self._subscribed = threading.Event()  # the broker answered our subscriptions (SUBACK)
        self._refusal: str | None = None
        self._refused_by_connack = False  # the refusal came in a CONNACK (BrokerRefused), not a closed socket
        self._pending_subs: dict[int, list[str]] = {}
        self.refused_subscriptions: set[str] = set()
        """Filters the broker refused (SUBACK failure: its ACL does not let us read them)."""
        self._last_error: str | None = None
        self._keepalive = keepalive
        self._fast = own_loop and PAHO_FAST_PATHS and not self.address.tls
        """MQTT 3.1.1 data traffic on plain TCP without paho's per-packet code (see :class:`_Corked`)."""
        self._flight: dict[int, list[Any]] = {}  # fast path, QoS 1 out: mid -> [header, payload, sent before]
        self._unsent: deque[int] = deque()  # fast path: mids of _flight not sent on this connection, in order
        self.resends_skipped = 0
        """paho's path: QoS 1 publishes not queued because paho held the same message unacknowledged."""
        self.malformed_packets = 0
        """Fast path: packets from the broker that were not valid MQTT 3.1.1 (each dropped the connection)."""
        self.dropped_messages = 0
        """Fast path: QoS 1 messages dropped unsent because FAST_MAX_QUEUED were unacknowledged."""
        self.last_malformed: MalformedPacketError | None = None
        self.unsubscribed_messages = 0
        """Messages the broker delivered on a topic that matches none of our subscriptions,
        dropped unread (amqtt 0.12 sends a connecting client the retained messages of every
        client's filters). A broker's fault, not a peer's: never counted as a rejection."""
        self._sock_list: list[Any] = [None]
        self._client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=clean_session,
            manual_ack=manual_ack,
        )
        self._configure_security(auth)
        self._client.max_inflight_messages_set(64)
        self._client.max_queued_messages_set(0)  # never drop outgoing messages locally
        self._client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=int(reconnect_max_s))
        self._client.jitter = self._jittered
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_socket_open = self._socket_opened

    def _configure_security(self, auth: BrokerAuth | None) -> None:
        a = self.address
        if a.tls:
            self._client.tls_set_context((auth or BrokerAuth()).ssl_context())
        elif auth is not None and auth.cert_file is not None:
            port = 8883 if a.port == 1883 else a.port  # MQTT's TLS port, or the one the user named
            raise ConfigError(f"a client certificate needs TLS: use mqtts://{a.host}:{port}, not {a.url}")
        elif auth is not None and auth.password is not None and not a.loopback:
            raise ConfigError(f"refusing to send a password in clear text to {a.url}: use mqtts://")
        elif not a.loopback:
            log.warning("broker %s is not on this machine and the connection is not encrypted (mqtt://): "
                        "anyone on the network can read and forge models; use mqtts:// in production", a.url)
        if auth is not None and auth.username:
            self._client.username_pw_set(auth.username, auth.password)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 15.0) -> None:
        """Connect and start the network thread; raise ``TransportError`` if no CONNACK in time."""
        self._refusal = self._last_error = None
        self._refused_by_connack = False
        self._settled.clear()
        self._subscribed.clear()
        deadline = time.monotonic() + timeout
        self._stopping = False
        self._client.stopping.clear()
        self._client.on_log = self._handle_log
        try:
            # A synchronous first connect fails fast (and clearly) when nothing listens or
            # the TLS handshake fails; after that paho's loop reconnects with backoff.
            with self._lock:
                self._client.connect(self.address.host, self.address.port, keepalive=self._keepalive)
                self._started = True
                self._flush()  # the CONNECT
            if self.own_loop:
                self._wake()  # the actor waits on the new socket from now on (CONNACK)
            else:
                self._client.loop_start()
        except (OSError, ValueError) as exc:
            _close_sockets_of(exc)
            self._raise_connect_error(exc)
        self._settled.wait(timeout)
        if self._refusal is not None or not self._connected.is_set():
            refusal = self._refusal
            self.stop()
            if refusal is not None:
                kind = BrokerRefused if self._refused_by_connack else TransportError
                raise kind(f"broker {self.address.url} refused the connection: {refusal}")
            raise TransportError(f"no connection to broker {self.address.url} within {timeout:.0f} s")
        # Messages published to us before the broker has our subscriptions are not ours: a
        # started transport receives from the moment start() returns.
        if not self._subscribed.wait(max(0.0, deadline - time.monotonic())):
            log.warning("broker %s has not answered our subscriptions within %.0f s", self.address.url, timeout)
        # paho formats a log line for every packet while on_log is set (4 per served pull);
        # its error text only explains a first connection that fails (_handle_disconnect).
        with self._lock:
            self._client.on_log = None

    def yield_session(self, wait_s: float = DUPLICATE_RECONNECT_S) -> None:
        """Another client uses our id (the owner's verdict: the broker hands the session to whichever
        connected last): from now on a connection closed within STABLE_S of being accepted is followed by
        a wait of ``wait_s`` (jittered) before we connect again, instead of the back-off's 1 s, so one of
        the two keeps the session for a stretch instead of both swapping it every second. A connection
        that lasted STABLE_S, and every failed attempt, keep the usual back-off."""
        if not wait_s > 0:
            raise ConfigError(f"wait_s must be > 0 s, got {wait_s!r}")
        self._yield_s = float(wait_s)

    def _how(self) -> str:
        """The command's own words for passing credentials (:attr:`BrokerAuth.hint`), if any."""
        return self.auth.hint if self.auth is not None else ""

    def _raise_connect_error(self, exc: BaseException) -> NoReturn:
        url = self.address.url
        if isinstance(exc, ssl.SSLCertVerificationError):
            how = self._how() or "trust the CA that signed it: --bundle DIR or --ca FILE"
            raise TransportError(f"broker {url} presented a certificate we do not trust: {exc.verify_message or exc} ({how})") from exc
        # TLS to a plain listener: mosquitto drops the ClientHello it cannot read (a reset, or EOF)
        plain = (f" (the broker closed the connection during the TLS handshake: is port {self.address.port} a plain "
                 f"MQTT listener? then mqtt://{self.address.host}:{self.address.port})"
                 if self.address.tls and isinstance(exc, ConnectionResetError | ssl.SSLEOFError) else "")
        if isinstance(exc, ssl.SSLError):
            raise TransportError(f"TLS handshake with broker {url} failed: {exc}{plain}") from exc
        raise TransportError(f"cannot reach broker {url}: {exc}{plain}") from exc

    def stop(self) -> None:
        self._stopping = True
        try:
            if self._fast:
                self._drain_unsent()
            else:
                self._wait_acknowledged()
            with self._lock:
                self._ack_session += 1  # PUBACKs still held are never sent: the broker sends those messages again
                self._client.disconnect()
            if self.own_loop:
                self._finish_disconnect()
        finally:
            self._client.stopping.set()  # after disconnect(): a reconnect wait in paho's thread ends now, not in 1 s,
            self._client.abort_connect()  # and so does a connection attempt (up to paho's 5 s connect timeout)
            if not self.own_loop:
                self._client.loop_stop()
                reset = getattr(self._client, "_reset_sockets", None)
                if reset is not None:  # paho's wake-up socket pair (loop_start): closed now, not by the
                    reset()  # garbage collector, which may finalise the sockets first (ResourceWarning)
            self._connected.clear()
            self._started = False

    def _drain_unsent(self, timeout: float = STOP_DRAIN_S) -> None:
        """Fast path, at :meth:`stop`: QoS 1 messages still waiting behind the
        ``FAST_MAX_INFLIGHT`` unacknowledged ones (the daemon's final ``alive: false`` status
        is published last) go out as PUBACKs make room, and are acknowledged (see
        :data:`STOP_DRAIN_S`), for up to ``timeout`` while connected and the loop runs on
        another thread; the DISCONNECT follows. What is left unsent is logged."""
        with self._lock:
            if not self._flight or not self._connected.is_set() or threading.get_ident() == self._loop_ident:
                return
            sock = self._client._sock
            if isinstance(sock, _Corked):
                sock.set_low_water(1)  # every PUBACK wakes the loop from now on, not just its tick
        self._wake()  # the loop may be waiting with the old mark
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._flight or not self._connected.is_set():
                    break
            time.sleep(0.005)
        with self._lock:
            left = sum(1 for mid in self._unsent if mid in self._flight)
        if left:
            log.warning("broker %s: %d QoS 1 messages not sent before disconnecting (%d unacknowledged ahead of them)",
                        self.address.url, left, len(self._flight) - left)

    def _wait_acknowledged(self, timeout: float = STOP_DRAIN_S) -> None:
        """paho's path, at :meth:`stop`: wait up to ``timeout`` for paho's QoS 1 messages to be
        acknowledged (see :data:`STOP_DRAIN_S`), while connected and another thread reads."""
        if not self._connected.is_set() or threading.get_ident() == self._loop_ident:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._connected.is_set():
            with self._lock:
                waiting = getattr(self._client, "_out_messages", None)
                if not waiting:
                    return
            time.sleep(0.005)

    def _finish_disconnect(self, timeout: float = 2.0) -> None:
        """own_loop: write what is queued (the DISCONNECT last; paho then closes the socket)
        whether or not the actor still runs; close the socket after ``timeout`` regardless."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                sock = self._client.socket()
                if sock is None:
                    return
                if time.monotonic() >= deadline:
                    with contextlib.suppress(OSError):
                        sock.close()
                    self._client.loop_read()  # sees the closed socket: paho's disconnect bookkeeping
                    return
                self._client.loop_write()
            time.sleep(0.005)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if self._fast and qos < 2:
            with self._lock:
                self._publish_fast(topic, payload, qos, retain)
                if threading.get_ident() != self._loop_ident:
                    self._flush_from_outside()  # the loop thread flushes before it waits
            return
        if qos == 1 and self.skip_held_copies and self._unacknowledged_copy(topic, payload, retain):
            return
        with self._lock:  # own_loop: paho writes it to the socket now when nothing is queued before it
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            if self.own_loop and threading.get_ident() != self._loop_ident:
                self._flush_from_outside()  # the loop thread flushes before it waits
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            # NO_CONN: paho keeps QoS>0 messages queued and sends them after reconnecting.
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")

    def receiving(self) -> bool:
        """paho's path: a packet from the broker is in paho's hands, part-way read or being handed over
        (``on_message`` not yet returned), and its bytes came in within :data:`RECEIVING_QUIET_S`. A device
        holds its request timeout while this is true: the packet may be the answer (an 8 MB model at
        1 Mbit/s takes 64 s; retried every 10-20 s, the pull made the coordinator send the whole model again
        each time, three copies in all). The hand-over counts: a retry fired between a 47 MB model's last
        byte and its delivery, and the coordinator sent it again (94 MB down). Small packets, read and
        delivered in one go, hold nothing (a stream of them cannot keep a timeout from running out)."""
        if self._fast or not PAHO_FAST_PATHS:
            return False
        client = self._client
        return client._in_packet["command"] != 0 and time.monotonic() - client.received_at < RECEIVING_QUIET_S

    def sending(self) -> bool:
        """paho's path: bytes we wrote are still on their way (paho part-way through a packet, or the
        kernel holding bytes the broker has not acknowledged) and they moved within
        :data:`RECEIVING_QUIET_S`. A device holds its request timeout while this is true too: its
        request, or the update it waits on, is still going up (a retry would only be skipped, see
        ``resends_skipped``, but each timeout counted towards ``failover_after``)."""
        if self._fast or not PAHO_FAST_PATHS:
            return False
        client = self._client
        now = time.monotonic()
        with self._lock:
            unsent = client.kernel_unsent(now)
            return (bool(client._out_packet) or unsent > 0) and now - client.moved_at < RECEIVING_QUIET_S

    def _unacknowledged_copy(self, topic: str, payload: bytes, retain: bool) -> bool:
        """paho's path: paho still holds the same QoS 1 message (topic, payload, retain) unacknowledged,
        so this publish is not queued again (counted in ``resends_skipped``). MQTT delivers the held one
        (paho sends it again, DUP set, after a reconnect); a copy behind it only doubles the bytes on the
        link. A device's request retried after ``request_timeout_s`` while its 2 MB update was still being
        written at 256 kbit/s (62 s) queued a whole copy per retry, every one sent after the ack, each a
        ``duplicate`` to the coordinator: the uplink stayed busy with them for minutes."""
        if not PAHO_FAST_PATHS:
            return False
        client = self._client
        wanted = topic.encode()
        size = len(payload)
        with client._out_message_mutex:  # the newest HELD_COPY_SCAN only: a burst of thousands stays O(1) per publish
            held = any(len(m.payload) == size and m.qos == 1 and m._topic == wanted and m.retain == retain
                       and (m.payload is payload or m.payload == payload)
                       for m in itertools.islice(reversed(client._out_messages.values()), HELD_COPY_SCAN))
        if held:
            self.resends_skipped += 1
        return held

    # own_loop: the ActorIO side (edge_sdk.runtime.Actor calls these on its thread).

    def bind(self, wake: Callable[[], None]) -> None:
        if not self.own_loop:
            raise ValueError("MqttTransport(own_loop=False) runs paho's own network thread")
        self._wake = wake

    def wait_sockets(self) -> tuple[list[Any], list[Any], float | None]:
        self._loop_ident = threading.get_ident()
        if self._fast:
            with self._lock:
                sock = self._client._sock
                if type(sock) is _Corked:
                    out = sock._out
                    if out:  # everything the batch sent, in one sendmsg, before the loop waits
                        with contextlib.suppress(BlockingIOError):  # the rest when writable
                            sock.flush()
                    if sock.pending() > 0:
                        return [], [], 0.0
                    if self._sock_list[0] is not sock:
                        self._sock_list = [sock]
                    socks = self._sock_list
                    return socks, socks if out or self._client._out_packet else [], max(0.0, self._misc_at - time.monotonic())
        with self._lock:
            self._flush()  # everything the batch sent, in one sendmsg, before the loop waits
        sock = self._client.socket()
        now = time.monotonic()
        if sock is None:
            if self._reconnect_at is None or not self._started or self._stopping:
                return [], [], None
            return [], [], max(0.0, self._reconnect_at - now)
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select cannot see
        if pending is not None and pending() > 0:
            return [], [], 0.0
        want_write = self._client.want_write() or (isinstance(sock, _Corked) and sock.unflushed)
        return [sock], [sock] if want_write else [], max(0.0, self._misc_at - now)

    def service(self, readable: list[Any], writable: list[Any]) -> None:
        client = self._client
        if self._fast:
            with self._lock:
                sock = client._sock
                if type(sock) is _Corked:
                    if sock._out and sock in writable:
                        self._flush()
                    now = time.monotonic()
                    tick = now >= self._misc_at
                    # the tick also reads: below the low-water mark (see _low_water) select stays quiet
                    if tick or sock in readable or sock.pending() > 0:
                        self._read_fast(client, sock)
                    if client._out_packet and client._sock is not None:
                        client.loop_write()  # paho's own packets (SUBSCRIBE, PINGREQ, ...)
                    if tick and client._sock is not None:
                        self._misc_at = now + MISC_EVERY_S
                        client.loop_misc()  # keepalive: PINGREQ when due, drop a silent broker
                    if client._sock is None and not self._stopping and self._reconnect_at is None:
                        self._reconnect_at = time.monotonic() + self._jittered(self._reconnect_delay)
                    return
        with self._lock:
            sock = client.socket()
            if sock is None:
                self._maybe_reconnect()
                return
            pending = getattr(sock, "pending", None)
            if sock in writable:
                self._flush()
            if sock in readable or (pending is not None and pending() > 0):  # (the fast path's socket returned above)
                # loop_read reads as many packets as paho has messages in flight (at least one):
                # go on while bytes already read remain, so one wake-up takes what has arrived
                for _ in range(READS_PER_WAKEUP):
                    client.loop_read()
                    sock = client.socket()
                    pending = getattr(sock, "pending", None)
                    if pending is None or pending() <= 0:
                        break
            if client.socket() is not None and client.want_write():
                client.loop_write()
            now = time.monotonic()
            if client.socket() is not None and now >= self._misc_at:
                self._misc_at = now + MISC_EVERY_S
                client.loop_misc()  # keepalive: PINGREQ when due, drop a silent broker
            if client.socket() is None and not self._stopping and self._reconnect_at is None:
                self._reconnect_at = time.monotonic() + self._jittered(self._reconnect_delay)

    # own_loop + plain TCP + paho 2.2 (``_fast``): MQTT 3.1.1 PUBLISH / PUBACK without paho.

    def _read_fast(self, client: paho.Client, sock: _Corked) -> None:
        """Under the lock: the PUBLISH and PUBACK packets that have arrived, parsed from the
        read-ahead buffer; any other packet (CONNACK, SUBACK, PINGRESP, QoS 2) and a lost
        connection are left to paho's ``loop_read``, one packet at a time, in stream order."""
        received = sock.received
        try:
            for _ in range(READS_PER_WAKEUP):
                if client._in_packet["command"] == 0 and not sock.take(self._deliver, self._acked, self._take_held):
                    break  # nothing complete left: wait for the socket
                client.loop_read()  # the packet take() stopped at (nothing of ours is in paho's flight set: one)
                if client.socket() is not sock:
                    return  # lost; paho told _handle_disconnect
                if client._in_packet["command"] != 0 and sock.pending() <= 0:
                    break  # paho waits for the rest of its packet
        except MalformedPacketError as exc:
            self.malformed_packets += 1
            self.last_malformed = exc
            log.error("broker %s: %s; dropping the connection (reconnecting with backoff)", self.address.url, exc)
            client._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)  # as paho does with a malformed packet
            return
        if sock.received != received:
            client._last_bytes_received = time.monotonic()  # paho's keepalive bookkeeping

    def _publish_fast(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Under the lock. QoS 1 messages stay in ``_flight`` until their PUBACK, are sent
        in publish order (at most ``FAST_MAX_INFLIGHT`` unacknowledged) and all resent, DUP
        set, after a reconnect; a QoS 0 message is sent only while connected (as paho)."""
        if not isinstance(payload, bytes):
            payload = bytes(payload)  # kept until acknowledged: never a buffer the caller reuses
        if qos:
            client = self._client
            flight = self._flight
            if len(flight) >= FAST_MAX_QUEUED:  # packet ids nearly all taken (a long outage): or the
                self._drop_oldest_unsent()  # loop below spins for ever once all 65,535 are
            mid = client._mid_generate()  # paho's counter: never a mid paho uses (SUBSCRIBE, ...)
            while mid in flight:
                mid = client._mid_generate()
            flight[mid] = [_publish_header(topic, len(payload), 1, retain, mid), payload, False]
            self._unsent.append(mid)
            self._send_unsent()
        elif self._connected.is_set() and isinstance(self._client._sock, _Corked):
            self._client._sock.send_parts(_publish_header(topic, len(payload), 0, retain, 0), payload)

    def _drop_oldest_unsent(self) -> None:
        """Under the lock: forget the oldest QoS 1 message not yet sent (counted, logged)."""
        flight, unsent = self._flight, self._unsent
        while unsent:
            if flight.pop(unsent.popleft(), None) is not None:  # (a mid acknowledged already is skipped)
                self.dropped_messages += 1
                if self.dropped_messages % 1000 == 1:
                    log.error("broker %s: %d QoS 1 messages unacknowledged; dropping the oldest unsent ones (%d so far)",
                              self.address.url, len(flight) + 1, self.dropped_messages)
                return

    def _send_unsent(self) -> None:
        """Under the lock: write waiting QoS 1 messages while connected and under the cap."""
        sock = self._client._sock
        if not isinstance(sock, _Corked) or not self._connected.is_set():
            return
        flight, unsent = self._flight, self._unsent
        while unsent and len(flight) - len(unsent) < FAST_MAX_INFLIGHT:
            entry = flight.get(unsent.popleft())
            if entry is None:
                continue  # acknowledged before it was resent (see _acked)
            header = entry[0]
            if entry[2]:  # sent on an earlier connection: DUP
                header = bytes((header[0] | 0x08,)) + header[1:]
            entry[2] = True
            sock.send_parts(header, entry[1])
        self._client._last_msg_out = time.monotonic()  # paho's keepalive bookkeeping

    def _acked(self, mid: int) -> bool:
        """A PUBACK: True when it was for one of ours (False: paho's, it handles it)."""
        if self._flight.pop(mid, None) is None:
            return False
        if self._unsent:  # (a mid still in _unsent, acknowledged before we resent it, is skipped there:
            self._send_unsent()  # no O(backlog) search per PUBACK under overload)
        return True

    def _maybe_reconnect(self) -> None:
        """own_loop, under the lock, not connected: try again once the backoff has passed."""
        if not self._started or self._stopping:
            return
        now = time.monotonic()
        if self._reconnect_at is None:
            self._reconnect_at = now + self._jittered(self._reconnect_delay)
        if now < self._reconnect_at:
            return
        self._reconnect_delay = min(self._reconnect_max_s, 2 * self._reconnect_delay)
        self._reconnect_at = now + self._jittered(self._reconnect_delay)
        try:
            self._client.reconnect()  # the CONNACK comes through loop_read; _handle_connect resubscribes
            self._flush()  # the CONNECT
        except (OSError, ValueError) as exc:
            _close_sockets_of(exc)
            log.info("reconnecting to broker %s failed (%s); next try in %.1f s", self.address.url, exc, self._reconnect_at - now)
            return
        self._misc_at = 0.0

    def _jittered(self, delay: float) -> float:
        """A reconnect wait: ``delay`` less up to :data:`JITTER` of it, at random."""
        return delay * (1.0 - JITTER * self._rng.random())

    def _flush_from_outside(self) -> None:
        """Under the lock, on a thread other than the loop's: write now. What the kernel does
        not take yet wakes the loop, which then waits for the socket to be writable (it may be
        waiting for reads only, until its next tick)."""
        self._flush()
        sock = self._client.socket()
        if isinstance(sock, _Corked) and sock.unflushed:
            self._wake()

    def _flush(self) -> None:
        """own_loop, under the lock: write what the socket holds back (see :class:`_Corked`)."""
        sock = self._client.socket()
        if isinstance(sock, _Corked) and sock.unflushed:
            with contextlib.suppress(BlockingIOError):  # the rest when the socket is writable
                sock.flush()

    # paho callbacks (network thread; the actor's with own_loop): no domain logic here.

    def _socket_opened(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        _no_delay(client, userdata, sock)
        if self.own_loop and PAHO_FAST_PATHS and type(sock) is socket.socket:  # plain TCP (not TLS, not a websocket)
            client._sock = _Corked(sock)  # paho sends the CONNECT through it next

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker %s refused the connection: %s", self.address.url, reason)
            if not self._settled.is_set():
                self._refusal = f"{reason}{_refusal_hint(str(reason), self._how())}"
                self._refused_by_connack = True
                self._settled.set()
            return
        # The backoff resets only once this connection proves stable (see _handle_disconnect):
        # two clients with one id take the session from each other at every connect.
        self._reconnect_at, self._connected_at = None, time.monotonic()
        if self._lost_at is not None:
            log.log(self._drop_level(), "reconnected to broker %s after %.1f s", self.address.url, time.monotonic() - self._lost_at)
            self._lost_at = None
        self._pending_subs.clear()  # SUBACKs of an earlier connection never come
        if self._subs:
            _, mid = client.subscribe([(t, 1) for t in self._subs])
            if mid is not None:
                self._pending_subs[mid] = list(self._subs)
        else:
            self._subscribed.set()
        self._connected.set()
        self._ack_session += 1  # (PUBACKs held on an earlier connection are never sent: see hold_ack)
        if self._fast:  # every unacknowledged QoS 1 message again, in order (paho does its own next)
            self._unsent = deque(self._flight)
            self._send_unsent()
        self._settled.set()
        if self._on_connection:
            self._on_connection(True)

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        on_purpose, self._redelivering = self._redelivering, False
        if on_purpose and self._connected.is_set() and not self._stopping:
            # Our own close (redeliver): no sign of an outage or of another client with our id, so
            # neither a short drop nor a longer backoff; the owner paces its redeliveries.
            self._lost_at = time.monotonic()
            self._reconnect_delay = RECONNECT_MIN_S
        elif self._connected.is_set() and not self._stopping:  # an outage, or another client took our id
            self._lost_at = now = time.monotonic()
            lasted = now - (self._connected_at if self._connected_at is not None else now)
            if lasted >= STABLE_S:
                self._reconnect_delay, self._short_drops = RECONNECT_MIN_S, 0
            else:
                self._short_drops += 1
                if self._yield_s:  # another client with our id took the session: leave it to it a while
                    self.yielded += 1
                    wait = self._jittered(self._yield_s)
                    if self.own_loop:
                        self._reconnect_at = now + wait
                    else:
                        self._client.hold_s = wait  # (paho's loop waits it once: _Client._reconnect_wait)
                    log.info("broker %s: another client with the id %r took the session %.1f s after we connected; "
                             "leaving it to that client for %.0f s", self.address.url, self._client_id, lasted, wait)
            why = "the broker closed it" if str(reason) == "Unspecified error" else str(reason)  # (MQTT 3.1.1 gives no reason)
            if self._short_drops == SHORT_DROPS:
                # MQTT 3.1.1 gives no reason: a link cut every few seconds and a second client with our id
                # (the broker closes the older connection at each CONNECT) look the same from here. Said
                # at WARNING once; the coordinator daemon tells a second coordinator by its status (ERROR,
                # duplicate_coordinator). Our own earlier connection, still open at the broker after a
                # silent drop, is the older one the broker closes when we reconnect: not a drop of ours.
                self.short_drop_runs += 1
                log.log(logging.WARNING if self.short_drop_runs == 1 else logging.INFO,
                        "broker %s: our connection was closed %d times in a row within %.0f s of being accepted: a link that "
                        "keeps dropping, or another client with the id %r taking over this session (a second coordinator "
                        "or device started with the same id); reconnecting with backoff, these drops now logged at INFO "
                        "(%d such run%s so far)", self.address.url, SHORT_DROPS, STABLE_S, self._client_id,
                        self.short_drop_runs, "" if self.short_drop_runs == 1 else "s")
            log.log(self._drop_level(), "lost the connection to broker %s (%s, after %.1f s); reconnecting",
                    self.address.url, why, lasted)
        self._connected.clear()
        if not self._settled.is_set():
            # Closed before any CONNACK: with TLS 1.3 a rejected client certificate shows
            # up here (the alert arrives after the handshake), the reason only in paho's log.
            detail = self._last_error or str(reason)
            how = self._how()
            hint = _refusal_hint(detail, how)
            if not hint and self.address.tls:
                has_cert = self.auth is not None and self.auth.cert_file is not None
                hint = (" (the broker closed the TLS session before accepting us: it did not accept our client certificate)"
                        if has_cert else
                        " (the broker closed the TLS session before accepting us: it requires a client certificate? "
                        f"{how or 'pass --bundle DIR or --cert/--key'})")
            elif not hint:  # plain MQTT to a TLS listener: the broker drops the CONNECT it cannot read
                hint = (f" (the broker closed the connection before accepting us: is port {self.address.port} a TLS listener? "
                        f"then mqtts://{self.address.host}:{self.address.port})")
            self._refusal = f"{detail}{hint}"
            self._settled.set()
        if self._on_connection:
            self._on_connection(False)

    def _drop_level(self) -> int:
        """A drop's and a reconnect's log level: INFO once :data:`SHORT_DROPS` short connections in a
        row have been said (a flapping link: two WARNINGs a flap told nothing new), WARNING otherwise."""
        return logging.INFO if self._short_drops >= SHORT_DROPS else logging.WARNING

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if not self.manual_ack or not message.qos:
            self._deliver(message.topic, bytes(message.payload))
            return
        self._delivering = (self._ack_session, message.mid, message.qos)
        try:
            self._deliver(message.topic, bytes(message.payload))
        finally:
            unclaimed, self._delivering = self._delivering, None
            if unclaimed is not None:  # on_message kept nothing to make durable: acknowledged now, as paho does
                client.ack(message.mid, message.qos)

    def _deliver_held(self, topic: str, payload: bytes, mid: int) -> bool:
        """Fast path, ``manual_ack``: a QoS 1 message; False when its PUBACK is due now (on_message
        did not take it with :meth:`hold_ack`)."""
        self._delivering = (self._ack_session, mid, 1)
        try:
            self._deliver(topic, payload)
        finally:
            unclaimed, self._delivering = self._delivering, None
        return unclaimed is None

    def hold_ack(self) -> HeldAck | None:
        """From ``on_message`` (``manual_ack``): the broker gets this message's PUBACK only when
        :meth:`ack` is given what this returns, not when ``on_message`` returns; None for a QoS 0
        message or without ``manual_ack``. A PUBACK still held when the connection ends is never
        sent: with a persistent session the broker delivers the message again on the next
        connection (so does :meth:`redeliver`)."""
        held, self._delivering = self._delivering, None
        return held

    def ack(self, held: Sequence[HeldAck]) -> None:
        """Send the PUBACKs held by :meth:`hold_ack` (the actor's thread, after the messages'
        batch is durable), in order; those of an earlier connection are skipped (the broker
        sends their messages again, with new packet ids)."""
        if not held:
            return
        with self._lock:
            session = self._ack_session
            client = self._client
            sock = client._sock if self._fast else None
            for s, mid, qos in held:
                if s != session:
                    continue
                if type(sock) is _Corked:
                    sock.send(bytes((0x40, 2, mid >> 8, mid & 0xFF)))
                elif client.socket() is not None:
                    client.ack(mid, qos)
            if threading.get_ident() != self._loop_ident:
                self._flush_from_outside()

    def is_current(self, held: HeldAck) -> bool:
        """``held`` (from :meth:`hold_ack`) is of the current connection: :meth:`ack` would send it."""
        return held[0] == self._ack_session

    def redeliver(self) -> None:
        """Close the connection without the PUBACKs :meth:`hold_ack` holds (messages whose
        handling was dropped: the broker sends them again once we reconnect, after
        ``RECONNECT_MIN_S``; the owner paces its redeliveries, the backoff does not grow). What
        is queued before the close, the PUBACKs :meth:`ack` released included, is written
        first (waiting up to ``REDELIVER_FLUSH_S`` for the socket): cut off, their messages
        came back as duplicates. Then an MQTT DISCONNECT (:data:`DISCONNECT_PACKET`): the broker
        keeps the session and drops our last will."""
        with self._lock:
            self._ack_session += 1
            sock = self._client.socket()
            if sock is None:
                return
            self.redeliveries += 1
            log.warning("broker %s: closing the connection so that the broker delivers the messages whose handling was "
                        "dropped again (reconnecting in %g s)", self.address.url, RECONNECT_MIN_S)
            deadline = time.monotonic() + REDELIVER_FLUSH_S
            self._write_queued(sock, deadline)
            if self._client.socket() is None:
                return  # the write found the connection lost: paho's bookkeeping ran, it reconnects
            self._redelivering = True
            if isinstance(sock, _Corked):
                sock = sock.sock
            with contextlib.suppress(OSError):  # (ssl.SSLError is one) unsent: the broker publishes our will
                sock.send(DISCONNECT_PACKET)
            _wait_sent(sock, deadline)
            shutdown = getattr(sock, "shutdown", None)
            if shutdown is not None:
                with contextlib.suppress(OSError):  # paho's next read sees the loss and reconnects
                    shutdown(socket.SHUT_RDWR)
        self._wake()

    def _write_queued(self, sock: Any, deadline: float) -> None:
        """Under the lock: write what is queued for the socket, ours (:class:`_Corked`) and
        paho's (its ``_out_packet``: TLS, or paho's own packets), waiting for the socket to be
        writable until ``deadline``. A broker that stopped reading costs this long; what is
        left then is dropped with the connection (PUBACKs: their messages come back)."""
        client = self._client
        raw: Any
        while client.socket() is sock:
            if isinstance(sock, _Corked):
                if client.want_write():
                    client.loop_write()  # paho's packets go into the cork
                if not sock.unflushed:
                    return
                try:
                    sock.flush()
                    continue
                except BlockingIOError:
                    raw = sock.sock
            else:
                if not client.want_write():
                    return
                client.loop_write()  # as much as the socket takes (paho keeps the rest queued)
                if not client.want_write() or client.socket() is not sock:
                    continue
                raw = sock
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("broker %s: what was queued for it was not all written within %.0f s before the connection "
                            "is closed (PUBACKs among it: their messages come back as duplicates)", self.address.url,
                            REDELIVER_FLUSH_S)
                return
            wait_io([], [raw], min(left, 0.05))  # (TLS: a write may wait for a read; the short wait bounds the spin)

    def _deliver(self, topic: str, payload: bytes) -> None:
        """``on_message`` for a topic we subscribed to; anything else is dropped and counted
        (``unsubscribed_messages``) before any domain code sees it."""
        if self._ours(topic):
            self._on_message(topic, payload)
            return
        self.unsubscribed_messages += 1
        if self.unsubscribed_messages % 1000 == 1:
            log.warning("broker %s delivered a message on %.100r, which none of our subscriptions matches: dropped "
                        "(%d so far; amqtt sends retained messages of other clients' subscriptions at connect)",
                        self.address.url, topic, self.unsubscribed_messages)

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        for topic, reason in zip(self._pending_subs.pop(mid, []), reasons):
            if getattr(reason, "is_failure", False):
                self.refused_subscriptions.add(topic)
                log.warning("broker %s refused our subscription to %s (not allowed by its ACL?)", self.address.url, topic)
        if not self._pending_subs:
            self._subscribed.set()
            if self._fast:
                _low_water(client.socket())

    def _handle_log(self, client: paho.Client, userdata: Any, level: int, message: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._last_error = message


_DISCONNECT_STATES = (_ConnectionState.MQTT_CS_DISCONNECTING, _ConnectionState.MQTT_CS_DISCONNECTED)
"""paho's states in which its network thread stops reconnecting (``disconnect()`` was called)."""


class _Client(paho.Client):
    """paho's client, one decoding shortcut: an MQTT 3.1.1 PUBACK (two bytes, the mid)
    skips paho's per-packet construction of MQTT 5 ``ReasonCode`` and ``Properties`` objects
    (measured ~24 us of dict building per PUBACK, one PUBACK per model sent). The bookkeeping
    after it is paho's own (``_do_on_publish``); anything else goes to paho unchanged."""

    _PUBACK_REASON = ReasonCode(PacketTypes.PUBACK)  # Success: all a 3.1.1 PUBACK can say
    _PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]  # 3.1.1 has none

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopping = threading.Event()
        """Set by :meth:`MqttTransport.stop`: a wait between reconnects ends at once, and so does a
        connection attempt in progress (:meth:`abort_connect`)."""
        self._connecting: socket.socket | None = None
        self._connecting_lock = threading.Lock()
        self.moved_at = time.monotonic()
        """When bytes last went through the socket, either way (see :meth:`loop_misc`)."""
        self._unsent_seen = 0
        self.received_at = 0.0
        """When bytes last came in (see :meth:`MqttTransport.receiving`)."""
        self.keepalive_extended = 0
        """Times a PINGRESP was waited for a keepalive more because bytes still moved (see :meth:`loop_misc`)."""
        self.jitter: Callable[[float], float] = lambda delay: delay
        """The wait before a reconnect, from paho's back-off delay (:meth:`MqttTransport._jittered`)."""
        self.hold_s = 0.0
        """The next reconnect waits at least this long, once (:meth:`MqttTransport.yield_session`)."""

    def _sock_recv(self, bufsize: int) -> bytes:
        data = super()._sock_recv(bufsize)
        if data:
            self.moved_at = self.received_at = time.monotonic()
        return data

    def _sock_send(self, buf: bytes | bytearray) -> int:
        n = super()._sock_send(buf)
        if n > 0:
            self.moved_at = time.monotonic()
        return n

    def _link_moving(self, now: float) -> bool:
        """Bytes went through the link within the keepalive: paho read some, wrote some, or the
        peer acknowledged some of those the kernel held (a 120 KB message fits in the kernel's send
        queue whole: paho has finished writing it while the link has hardly begun)."""
        self.kernel_unsent(now)
        return now - self.moved_at < self._keepalive

    def kernel_unsent(self, now: float) -> int:
        """Bytes written to the socket that the peer has not acknowledged yet; a change since the
        last look means the link moved (``moved_at``)."""
        unsent = _unsent(self._sock) if self._sock is not None else 0
        if unsent != self._unsent_seen:
            self._unsent_seen = unsent
            self.moved_at = now
        return unsent

    def _ping_out_on_a_moving_link(self, now: float) -> bool:
        """A PINGREQ is unanswered and bytes still moved within the keepalive (see :meth:`_check_keepalive`)."""
        return bool(PAHO_FAST_PATHS and self._keepalive and self._ping_t > 0 and self._link_moving(now))

    def _check_keepalive(self) -> None:
        # paho's PINGREQ waits behind the packet being written, and the broker's PINGRESP behind the
        # one being read: on a slow link (a 2 MB model at 256 kbit/s takes 62 s) paho took the late
        # answer for a dead broker after 1-2 keepalives (30-60 s), dropped the connection and sent or
        # got the same packet again from its first byte, for ever. With a PINGREQ out, bytes that still
        # move say the link is alive; the PINGRESP's own deadline is kept in loop_misc below. A PINGREQ
        # still goes out every keepalive: the broker must hear from us within 1.5 of them (mosquitto
        # closed a device that was only reading a model after 3 s of a 2 s keepalive).
        now = time.monotonic()
        if self._ping_out_on_a_moving_link(now):
            if now - self._last_msg_out >= self._keepalive:
                self._send_pingreq()
                with self._msgtime_mutex:
                    self._last_msg_out = now
            return
        super()._check_keepalive()

    def loop_misc(self) -> MQTTErrorCode:
        now = time.monotonic()
        if (PAHO_FAST_PATHS and self._ping_t > 0 and now - self._ping_t >= self._keepalive  # (paho's names: only with them)
                and self._ping_out_on_a_moving_link(now)):
            self._ping_t = now  # the PINGRESP waits behind bytes that move: wait a keepalive more for it
            self.keepalive_extended += 1
        return super().loop_misc()

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        """paho's TLS wrap and handshake, with the TLS socket closed when the handshake fails: paho
        left it to the garbage collector on every refused (re)connection — a revoked certificate, a
        broker the fleet CA did not sign — holding its descriptor until a collection, which then
        warned (``ResourceWarning``: 2 of 12 runs of a revocation test failed on it). Our contexts
        check the host name in the handshake (``create_default_context``); any other is paho's."""
        ctx = self._ssl_context
        if ctx is None or not ctx.check_hostname:
            return super()._ssl_wrap_socket(tcp_sock)
        tls = ctx.wrap_socket(tcp_sock, server_hostname=self._host, do_handshake_on_connect=False)
        try:
            tls.settimeout(self._connect_timeout)
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        return tls

    def _create_socket_connection(self) -> socket.socket:
        """paho's TCP connection (``socket.create_connection``), with the socket held while it connects
        for :meth:`abort_connect`: a broker whose packets are dropped (a network gone) kept paho's thread
        in ``connect`` for its 5 s connect timeout, and ``stop()`` waited for it (3.5 s measured)."""
        if self._get_proxy():  # (PySocks makes its own socket: not abortable)
            return super()._create_socket_connection()
        last: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(self._host, self._port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            with self._connecting_lock:
                if self.stopping.is_set():
                    sock.close()
                    raise OSError(f"not connecting to {self._host}:{self._port}: the transport is stopping")
                self._connecting = sock
            try:
                sock.settimeout(self._connect_timeout)
                if self._bind_address or self._bind_port:
                    sock.bind((self._bind_address, self._bind_port))
                sock.connect(address)
            except OSError as exc:
                last = exc
            else:
                with self._connecting_lock:
                    self._connecting = None
                return sock
            with self._connecting_lock:  # before the close: its descriptor may be reused at once
                self._connecting = None
            sock.close()
        raise last or OSError(f"getaddrinfo returned nothing for {self._host}:{self._port}")

    def abort_connect(self) -> None:
        """End a TCP connection attempt in progress on another thread (its ``connect`` raises OSError
        now; a later one is refused while :attr:`stopping` is set). A TLS handshake is not aborted."""
        with self._connecting_lock:
            sock = self._connecting
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _reconnect_wait(self) -> None:
        """paho's wait between two reconnects (its back-off, doubling from the min delay to the max),
        ended at once by :attr:`stopping`: paho's sleeps in slices of a second, so ``stop()`` on a
        client whose broker was down waited up to a second for its network thread (measured 1.0 s)."""
        with self._reconnect_delay_mutex:
            delay = self._reconnect_min_delay if self._reconnect_delay is None else min(
                self._reconnect_delay * 2, self._reconnect_max_delay)
            self._reconnect_delay = delay
        wait, self.hold_s = max(self.jitter(delay), self.hold_s), 0.0
        deadline = time.monotonic() + wait
        while not self._thread_terminate and self._state not in _DISCONNECT_STATES:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stopping.wait(min(remaining, 1.0)):
                return

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        if not PAHO_FAST_PATHS or cmd != "PUBACK" or self._protocol == MQTTProtocolVersion.MQTTv5:
            return super()._handle_pubackcomp(cmd)
        packet = self._in_packet["packet"]
        if len(packet) != 2:
            raise MalformedPacket("wrong size of packet")  # as paho's decode_puback
        mid = (packet[0] << 8) | packet[1]
        self._easy_log(paho.MQTT_LOG_DEBUG, "Received %s (Mid: %d)", cmd, mid)
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, self._PUBACK_REASON, self._PUBACK_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class _Corked:
    """own_loop, plain TCP: the socket as paho sees it. Reads ahead (one ``recv`` serves
    many small packets: paho reads a packet's type, length and body in three calls) and
    holds what paho sends until :meth:`flush` (one ``sendmsg`` for the packets of a batch,
    no copy). A user-space extension of the kernel's buffers: paho's own bookkeeping (QoS 1
    messages stay in flight until their PUBACK, resent after a reconnect) is unchanged.
    The owner flushes before every wait, after a publish from another thread, and on close."""

    READ_AHEAD = 1 << 16

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._rbuf = b""
        self._rpos = 0
        self._out: deque[Any] = deque()
        self._starved = False  # take(): what is read ahead is at most part of a packet
        self._parts: list[bytes] = []  # take(): the pieces of a large packet read so far
        self._have = 0
        self.low_water = 1  # SO_RCVLOWAT between packets (set_low_water); 1 while a packet is half read
        self._lowat = 1  # what the socket has now (the kernel's default)
        self.received = 0
        """recv calls that returned data (the owner's keepalive bookkeeping)."""

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, n: int) -> bytes:
        rbuf, rpos = self._rbuf, self._rpos
        if rpos >= len(rbuf):
            if self._parts:  # take() holds the start of a packet: paho reads it first
                self._join()
                return self.recv(n)
            data = self.sock.recv(max(n, self.READ_AHEAD))  # BlockingIOError etc. go to paho as before
            self.received += 1
            self._starved = False
            if len(data) <= n:
                return data
            rbuf, rpos = self._rbuf, self._rpos = data, 0
        end = rpos + n
        self._rpos = end
        return rbuf[rpos:end]

    def pending(self) -> int:
        """Bytes read ahead that select cannot see (0 when they are only part of a packet
        and take() waits for the rest)."""
        if self._starved:
            return 0
        return max(0, len(self._rbuf) - self._rpos) + self._have

    def send(self, data: Any) -> int:
        self._out.append(data)  # paho hands over a fresh slice or bytes: never changed later
        return len(data)

    def send_parts(self, header: bytes, payload: bytes) -> None:
        """The fast path's PUBLISH: header and payload as two buffers of one sendmsg (no copy)."""
        self._out.append(header)
        if payload:
            self._out.append(payload)

    def _join(self) -> None:
        self._rbuf, self._rpos = b"".join(self._parts), 0
        self._parts, self._have = [], 0

    def take(self, deliver: Callable[[str, bytes], None], acked: Callable[[int], bool],
             deliver_held: Callable[[str, bytes, int], bool] | None = None) -> bool:
        """The fast path's reader (MQTT 3.1.1). Every complete PUBLISH (QoS 0 or 1) read
        ahead goes to ``deliver(topic, payload)`` in order, a QoS 1 one followed by its
        PUBACK (held with the other writes, like paho's) — or, given ``deliver_held``, to
        ``deliver_held(topic, payload, mid)``, followed by its PUBACK unless that returns True
        (its owner sends it later); every PUBACK goes to ``acked(mid)``.
        Reads the socket while it has data (a short read: drained). Returns True when paho
        must read next: a complete packet of another kind (or a PUBACK ``acked`` refuses)
        is at the head, or the connection is lost (paho reads the loss, as before); False
        when nothing complete is left. Raises :class:`MalformedPacketError`."""
        may_read = True
        while True:
            if self._parse(deliver, acked, deliver_held):
                return True  # a complete packet for paho is at the head
            # what is left is at most part of a packet: read more while the socket has some
            if not may_read:
                return self._starve()
            try:
                size = self.READ_AHEAD
                if self._holds_part:  # ask for the rest of the packet at once
                    size = max(size, min(MAX_RECV, self._need() - self._have))
                data = self.sock.recv(size)
            except BlockingIOError:
                return self._starve()
            except OSError:
                if self._parts:
                    self._join()
                return True  # paho's read sees the error too and reconnects
            if not data:
                if self._parts:
                    self._join()
                return True  # the broker closed: paho reads what is left, then the loss
            self.received += 1
            self._starved = False
            may_read = len(data) >= self.READ_AHEAD  # a short read: the socket is drained
            rest = self._rbuf[self._rpos:]
            if self._parts or (rest and self._need() - len(rest) > 4 * self.READ_AHEAD):
                if not self._parts:  # a large packet: pieces, one join when it is complete
                    self._parts, self._have = [rest], len(rest)
                    self._rbuf, self._rpos = b"", 0
                self._parts.append(data)
                self._have += len(data)
                if self._have < self._need():
                    continue
                self._join()
            else:
                self._rbuf, self._rpos = (rest + data if rest else data), 0

    def _starve(self) -> bool:
        """take() found nothing complete left: wait in select (see :meth:`set_low_water`)."""
        self._starved = True
        self._apply_low_water()
        return False

    def set_low_water(self, n: int) -> None:
        """The socket's receive low-water mark between packets (the owner sets it once
        subscribed, so a lone PUBACK does not wake the loop). While take() holds part of a
        packet it is 1: select must wake for the rest however few bytes it is, or a message
        whose last bytes arrive on their own would wait for the next tick."""
        self.low_water = n
        self._apply_low_water()

    @property
    def _holds_part(self) -> bool:
        """take() holds part of a packet (read ahead, or the pieces of a large one)."""
        return bool(self._parts) or self._rpos < len(self._rbuf)

    def _apply_low_water(self) -> None:
        want = 1 if self._holds_part else self.low_water
        if want != self._lowat:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            self._lowat = want

    def _parse(self, deliver: Callable[[str, bytes], None], acked: Callable[[int], bool],
               deliver_held: Callable[[str, bytes, int], bool] | None) -> bool:
        """take()'s packets from the read-ahead buffer: True when it stopped at a complete
        packet that is paho's, False when what is left is at most part of a packet."""
        buf, pos = self._rbuf, self._rpos
        n = len(buf)
        out = self._out
        while pos + 1 < n:
            first = buf[pos]
            length = buf[pos + 1]
            body = pos + 2
            if length & 0x80:
                length, body = _remaining_length(buf, pos + 1)
                if body < 0:
                    return False  # the length itself is not complete yet
            end = body + length
            if end > n:
                return False
            kind = first >> 4
            if kind == 3:  # PUBLISH
                qos = (first >> 1) & 3
                if qos == 2:
                    return True  # paho's (exactly-once needs its state machine)
                if length < 2 or qos == 3:
                    raise MalformedPacketError(f"PUBLISH with {'QoS 3' if qos == 3 else 'no topic length'}")
                topic_end = body + 2 + ((buf[body] << 8) | buf[body + 1])
                start = topic_end + 2 if qos else topic_end
                if start > end:
                    raise MalformedPacketError("PUBLISH shorter than its topic and packet id")
                try:
                    topic = buf[body + 2:topic_end].decode()
                except UnicodeDecodeError:
                    raise MalformedPacketError("PUBLISH topic is not UTF-8") from None
                if qos:
                    mid = (buf[topic_end] << 8) | buf[topic_end + 1]
                    if mid == 0:
                        raise MalformedPacketError("QoS 1 PUBLISH with packet id 0")
                    self._rpos = end
                    if deliver_held is None:
                        deliver(topic, buf[start:end])
                    elif deliver_held(topic, buf[start:end], mid):
                        pos = end
                        continue  # its owner sends the PUBACK
                    out.append(bytes((0x40, 2, mid >> 8, mid & 0xFF)))  # its PUBACK, as paho's: after the callback
                else:
                    self._rpos = end
                    deliver(topic, buf[start:end])
            elif kind == 4:  # PUBACK
                if first != 0x40 or length != 2:
                    raise MalformedPacketError(f"PUBACK of {length} bytes (flags {first & 0x0F})")
                if not acked((buf[body] << 8) | buf[body + 1]):
                    return True  # not one of ours: paho's
                self._rpos = end
            elif kind == 0 or kind == 15:
                raise MalformedPacketError(f"reserved packet type {kind}")
            else:
                return True  # CONNACK, SUBACK, PINGRESP, ...: paho's
            pos = end
        return False

    def _need(self) -> int:
        """Bytes of the packet at the head (its pieces included), or 0 while unknown."""
        head = self._parts[0] if self._parts else self._rbuf[self._rpos:self._rpos + 5]
        if len(head) < 2:
            return 0
        if not head[1] & 0x80:
            return 2 + head[1]
        length, body = _remaining_length(head, 1)
        return body + length if body >= 0 else 0

    @property
    def unflushed(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        """Write what is held until done or the kernel's buffer is full (BlockingIOError
        propagates: wait for the socket to be writable). Other errors close the connection
        for reading too, so paho notices the loss at its next read and reconnects."""
        out = self._out
        while out:
            try:
                sent = self.sock.sendmsg(list(itertools.islice(out, IOV_MAX)))
            except BlockingIOError:
                raise
            except OSError:
                out.clear()
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                return
            while sent:
                head = out[0]
                if sent >= len(head):
                    sent -= len(head)
                    out.popleft()
                else:
                    out[0] = memoryview(head)[sent:]
                    sent = 0

    def close(self) -> None:
        """Write what is held: up to 2 s when it ends with our DISCONNECT (paho closes right
        after sending it), else one try without waiting (a lost connection: the actor must
        not stall on a broker that stopped reading)."""
        disconnecting = bool(self._out) and bytes(self._out[-1][:1]) == b"\xe0"
        deadline = time.monotonic() + (2.0 if disconnecting else 0.0)
        while self._out:
            try:
                self.flush()
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait_io([], [self.sock], left)
        self._out.clear()
        self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def _remaining_length(buf: bytes, at: int) -> tuple[int, int]:
    """MQTT's variable-length "remaining length" starting at ``buf[at]``: (value, offset of
    the byte after it), or (0, -1) while incomplete; more than 4 bytes is malformed."""
    value, shift = 0, 0
    for i in range(at, min(at + 4, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    if len(buf) >= at + 4:
        raise MalformedPacketError("remaining length longer than 4 bytes")
    return 0, -1


def _publish_header(topic: str, payload_len: int, qos: int, retain: bool, mid: int) -> bytes:
    """A PUBLISH packet's bytes before its payload (MQTT 3.1.1, DUP clear)."""
    tb = topic.encode()
    n = len(tb)
    if not n or n > 65535 or b"+" in tb or b"#" in tb:
        raise ValueError(f"invalid topic to publish to: {topic!r}")  # as paho's publish
    length = 4 + n + payload_len if qos else 2 + n + payload_len
    if length < 0x80:
        size = bytes((length,))
    elif length < 0x4000:
        size = bytes((length & 0x7F | 0x80, length >> 7))
    elif length < 0x200000:
        size = bytes((length & 0x7F | 0x80, (length >> 7) & 0x7F | 0x80, length >> 14))
    elif length <= 268_435_455:
        size = bytes((length & 0x7F | 0x80, (length >> 7) & 0x7F | 0x80, (length >> 14) & 0x7F | 0x80, length >> 21))
    else:
        raise ValueError("Payload too large.")
    first = bytes((0x32 | retain if qos else 0x30 | retain,))
    if qos:
        return b"".join((first, size, n.to_bytes(2, "big"), tb, mid.to_bytes(2, "big")))
    return b"".join((first, size, n.to_bytes(2, "big"), tb))


def _nothing() -> None:
    pass


def _unsent(sock: Any) -> int:
    """Bytes the kernel holds for ``sock`` that the peer has not acknowledged (Linux's
    TIOCOUTQ; 0 where there is none)."""
    try:
        import fcntl  # (not on Windows)
        import termios

        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (ImportError, OSError, ValueError, AttributeError):
        return 0


def _wait_sent(sock: Any, deadline: float) -> None:
    """Until ``deadline``: wait for the peer to have every byte written to ``sock`` before
    :meth:`MqttTransport.redeliver` closes it. Closed with megabytes still unsent, the
    connection lost them, the PUBACKs at their tail too, in 4 of 6 runs of
    tests/test_mqtt_redeliver.py's burst (fast path); the kernel's TcpExtTCPAbortOnData grew by
    6: reset, not closed, as data came in after the close. With this wait: 0 of 6."""
    while _unsent(sock) > 0 and time.monotonic() < deadline:
        time.sleep(0.005)


def subscription_matcher(filters: Sequence[str]) -> Callable[[str], bool]:
    """Whether a topic matches any of ``filters`` (MQTT 3.1.1 filters, ``+`` and a final ``#``;
    a filter starting with a wildcard matches no ``$`` topic), as paho's ``topic_matches_sub``
    says for each filter, in one compiled regular expression (a call per received message)."""
    alternatives = []
    for f in filters:
        levels = f.split("/")
        tail = ""
        if levels[-1] == "#":
            levels.pop()
            tail = "(?:/.*)?" if levels else ".*"
        body = "/".join("[^/]*" if level == "+" else re.escape(level) for level in levels)
        guard = r"(?!\$)" if f[:1] in ("+", "#") else ""
        alternatives.append(guard + body + tail)
    if not alternatives:
        return lambda topic: False
    pattern = re.compile("|".join(f"(?:{a})" for a in alternatives), re.DOTALL)
    return lambda topic: pattern.fullmatch(topic) is not None


RECV_LOW_WATER = 5
"""Fast path, once subscribed: select reports the socket readable from this many bytes on (or
at EOF). Every PUBLISH is at least 5 bytes, so none waits; a lone PUBACK (4 bytes, the broker's
answer to a message we sent) or PINGRESP (2) waits for the next packet or the loop's 0.5 s
tick, which reads too: answering a pull costs one wake-up instead of two (its reply's PUBACK
is read with the next message). Only our in-flight table notices (entries leave up to 0.5 s
later; resends happen only after a reconnect)."""


def _low_water(sock: Any) -> None:
    if isinstance(sock, _Corked):
        sock.set_low_water(RECV_LOW_WATER)


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """TCP_NODELAY: paho leaves Nagle on, and Nagle + delayed ACKs hold every small message
    (a pull, an ack) ~40 ms on loopback (measured: echo round trip 44 ms → 0.4 ms)."""
    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (unix, websocket wrapper)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close_sockets_of(exc: BaseException) -> None:
    """paho leaves the TLS socket of a failed handshake open in its frames: close it now
    rather than whenever the exception's traceback is collected."""
    tb = exc.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next


def _refusal_hint(reason: str, how: str = "") -> str:
    """Why the broker refused us, in words, and what to pass (``how``: a command's own words,
    :attr:`BrokerAuth.hint`, in place of the broker flags)."""
    low = reason.lower()
    if "certificate required" in low or "certificate_required" in low:
        return f" (the broker requires a client certificate: {how or 'pass --bundle DIR or --cert/--key'})"
    if "unknown ca" in low or "bad certificate" in low or "certificate unknown" in low:
        return " (the broker does not accept our client certificate: issued by another CA?)"
    if "not authori" in low:
        return " (the broker's ACL or password file does not know this identity, or its password is wrong)"
    if "bad user name or password" in low:
        return " (wrong username or password)"
    return ""
