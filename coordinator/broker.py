"""Brokers edgeci can start itself.

* :class:`EmbeddedBroker` — amqtt, in-process on its own asyncio thread: the zero-setup
  default of ``edgeci run`` (MQTT 3.1.1 only; fine for a demo fleet, slower than mosquitto
  for large models).
  Trials only: anonymous, no TLS, so it binds to 127.0.0.1 and nothing else.
* :class:`MosquittoProcess` — a real mosquitto bound to 127.0.0.1 with the project's
  configuration (queue limits set on purpose: mosquitto's default of 1000 queued messages
  silently drops QoS 1 traffic to a slow subscriber): the plain ``edgeci.conf``, or with
  ``tls=True`` the production ``edgeci-secure.conf`` (client certificates + ACL) or
  ``edgeci-password.conf`` (TLS + password file + ACL), rewritten by :func:`secure_conf`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edge_sdk.errors import ConfigError, TransportError

log = logging.getLogger("edgeci.broker")

MOSQUITTO_CONF = Path(__file__).with_name("mosquitto") / "edgeci.conf"
SECURE_CONF = Path(__file__).with_name("mosquitto") / "edgeci-secure.conf"
PASSWORD_CONF = Path(__file__).with_name("mosquitto") / "edgeci-password.conf"
PAHO_MAX_PAYLOAD = 268_435_455


def packet_limit(model_bytes: int) -> int:
    """mosquitto's ``max_packet_size`` for a model of ``model_bytes`` (float32 weights): the
    model plus 1/16 and 64 KiB for the message header, names, topic and signature; 0 means
    no model size given (paho's own limit, 256 MiB)."""
    if model_bytes < 0:
        raise ConfigError("model_bytes must be >= 0")
    if model_bytes == 0:
        return PAHO_MAX_PAYLOAD
    return min(PAHO_MAX_PAYLOAD, model_bytes + model_bytes // 16 + 65_536)


def queue_limit(model_bytes: int) -> int:
    """mosquitto's ``max_queued_bytes`` per client: 32 of the largest messages, at least
    256 MiB, at most 4 GiB; 1 GiB without a model size. Bounded, so that one device flooding
    its own update topic while the coordinator is slow or offline cannot exhaust the broker;
    what is dropped was never acknowledged by the coordinator, so devices send it again."""
    if model_bytes <= 0:
        return 1 << 30
    return min(max(32 * packet_limit(model_bytes), 256 << 20), 4 << 30)


def inflight_limit(model_bytes: int) -> int:
    """mosquitto's ``max_inflight_bytes``: two of the largest messages, at least 4 MiB. The
    in-flight window comes on top of ``max_queued_bytes``: with only ``max_inflight_messages``
    (64) a device that subscribes with a persistent session and stops reading held 64 models
    beyond its queue (16 MiB models: mosquitto 2.0.20 at 2.7 GB, 0.7 GB with this bound). Two
    keep the update stream to the coordinator pipelined; below 4 MiB / 64 a message stays bounded
    by the count alone (``benchmarks/inflight_window.py``). mosquitto before 2.0.13 does not
    keep to the byte limit (each message past it takes two of the 64 slots: 2.1 -> 1.2 GB)."""
    return max(2 * packet_limit(model_bytes), 4 << 20)


def secure_conf(
    *,
    cafile: str | Path,
    certfile: str | Path,
    keyfile: str | Path,
    acl_file: str | Path,
    port: int = 8883,
    host: str = "127.0.0.1",
    model_bytes: int = 0,
    password_file: str | Path | None = None,
    crlfile: str | Path | None = None,
) -> str:
    """``edgeci-secure.conf`` (or ``edgeci-password.conf`` when ``password_file`` is given)
    with its paths, listener, ``max_packet_size``, ``max_queued_bytes`` and ``max_inflight_bytes`` set; comments and
    every other setting (``require_certificate``, ``allow_anonymous false``, client id = user)
    as shipped. ``crlfile``: the PKI's ``ca.crl`` (revoked certificates); a client-certificate
    config without one refuses no revoked certificate, which is logged."""
    values = {
        "cafile": str(cafile), "certfile": str(certfile), "keyfile": str(keyfile), "acl_file": str(acl_file),
        "listener": f"{int(port)} {host}", "max_packet_size": str(packet_limit(model_bytes)),
        "max_queued_bytes": str(queue_limit(model_bytes)), "max_inflight_bytes": str(inflight_limit(model_bytes)),
    }
    if password_file is not None:
        values["password_file"] = str(password_file)
    if crlfile is not None:
        values["crlfile"] = str(crlfile)
    elif password_file is None:
        log.warning("mosquitto config without a crlfile: revoked client certificates are refused only by the ACL, "
                    "which is keyed by name (an identity issued again admits its old certificate)")
    for key, value in values.items():
        if any(c in value for c in "\n\r"):
            raise ConfigError(f"{key} must be one line: {value!r}")
    template = PASSWORD_CONF if password_file is not None else SECURE_CONF
    out = []
    for line in template.read_text().splitlines():
        words = line.split()
        if words and not line.startswith("#") and words[0] == "crlfile" and "crlfile" not in values:
            continue
        if words and not line.startswith("#") and words[0] in values:
            line = f"{words[0]} {values[words[0]]}"
        out.append(line)
    return "\n".join(out) + "\n"
BRIDGE_EXAMPLE = Path(__file__).with_name("mosquitto") / "bridge.conf.example"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TransportError(f"nothing is listening on {host}:{port} after {timeout:.0f} s") from exc
            time.sleep(0.05)


def _address_in_use(exc: BaseException) -> bool:
    """Is EADDRINUSE anywhere in ``exc``'s causes and contexts (each visited once)?"""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
            return True
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


class _PortPicked(Protocol):
    host: str
    port: int
    _port_chosen: bool


B = TypeVar("B", bound=_PortPicked)


def _start_on_a_free_port(broker: B, start: Callable[[], B], in_use: Callable[[TransportError], bool]) -> B:
    """``start()``; where it failed because another process bound the port first (``in_use``)
    and that port came from :func:`free_port`, pick another and start again (three tries)."""
    for attempt in range(3):
        try:
            return start()
        except TransportError as exc:
            if not (broker._port_chosen and attempt < 2 and in_use(exc)):
                raise
            broker.port = free_port(broker.host)
    raise AssertionError("unreachable")


def _broker_class() -> type[Any]:
    """amqtt's ``Broker`` less one bug of 0.12: at every CONNECT it sends the client the retained
    messages of *every* filter any client holds (``_handle_client_session`` walks the broker-wide
    ``_subscriptions``), so a device got its region's status and its own presence, and a
    coordinator another region's status. Here a connecting client gets those of its own filters
    only; a SUBSCRIBE's retained messages are unchanged (the filter is the session's by then)."""
    from amqtt.broker import Broker

    class OwnRetained(Broker):  # type: ignore[misc]
        async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
            holders = self._subscriptions.get(subscription[0], ())
            if any(held.client_id == session.client_id for held, _ in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return OwnRetained


class EmbeddedBroker:
    """amqtt running on a private event loop thread. ``with EmbeddedBroker() as b: b.url``.

    For trials, not production: anonymous, no TLS, no ACL — so it only ever binds a
    loopback address (anything else is a :class:`ConfigError`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        if not is_loopback(host):
            raise ConfigError(
                f"the embedded broker is for trials on this machine only (anonymous, no TLS): it binds 127.0.0.1, "
                f"not {host!r}; for a fleet run mosquitto with coordinator/mosquitto/edgeci-secure.conf"
            )
        self.host = host
        self.port = port or free_port(host)
        self._port_chosen = not port
        """The port came from free_port(): another process may bind it first; start() then picks
        another, so ``port`` and ``url`` are final once start() has returned."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 10_000}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        return _start_on_a_free_port(self, lambda: self._start(timeout), _address_in_use)

    def _start(self, timeout: float) -> EmbeddedBroker:
        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                self._broker = _broker_class()(self._config(), loop=loop)
                await self._broker.start()

            try:
                loop.run_until_complete(boot())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        started.wait(timeout)
        if failure:  # the thread has returned: the loop is this thread's to close, and stop() has nothing to do
            self._thread.join()
            loop.close()
            self._loop = self._thread = self._broker = None
            raise TransportError(f"embedded broker failed to start: {failure[0]}") from failure[0]
        if not started.is_set():
            self.stop()  # it may still come up: nothing of it is left running
            raise TransportError(f"embedded broker did not start within {timeout:.0f} s")
        return self

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None:
            return
        if broker is not None:
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                fut.result(timeout=10)
            except Exception as exc:
                log.warning("embedded broker shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(10)
        if not loop.is_running():
            # amqtt leaves client handlers behind: cancel them and let them close their sockets
            # before the loop goes, or their transports are garbage-collected unclosed.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            # amqtt 0.12 does not close the transports of clients that registered a last will:
            # close whatever the selector loop still holds, then let the close callbacks run.
            for transport in list(getattr(loop, "_transports", {}).values()):
                if transport is not None and not transport.is_closing():
                    transport.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        self._loop = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MosquittoProcess:
    """A mosquitto child process on 127.0.0.1 with edgeci's configuration.

    Plain (``edgeci.conf``, anonymous, for tests and trials) by default. ``tls=True`` starts
    the production config instead: ``edgeci-secure.conf`` (client certificates, identity as
    username, ``acl_file``) with ``cafile``/``certfile``/``keyfile``/``acl_file``, or
    ``edgeci-password.conf`` when ``password_file`` is given too. ``model_bytes`` sets
    ``max_packet_size`` (:func:`packet_limit`).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_conf: str = "",
        host: str = "127.0.0.1",
        tls: bool = False,
        cafile: str | Path | None = None,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        acl_file: str | Path | None = None,
        password_file: str | Path | None = None,
        crlfile: str | Path | None = None,
        model_bytes: int = 0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._port_chosen = not port
        """The port came from free_port(): another process may take it first; start() then picks
        another, so ``port`` and ``url`` are final once start() has returned."""
        self.extra_conf = extra_conf
        self.tls = tls
        self.model_bytes = model_bytes
        if tls and None in (cafile, certfile, keyfile, acl_file):
            raise ConfigError("a TLS mosquitto needs cafile, certfile, keyfile and acl_file")
        if not tls and password_file is not None:
            raise ConfigError("password_file needs tls=True (passwords travel inside TLS only)")
        self.cafile, self.certfile, self.keyfile = cafile, certfile, keyfile
        self.acl_file, self.password_file, self.crlfile = acl_file, password_file, crlfile
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.log_path: Path | None = None
        self._failed_log = ""

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def _readable_copies(self, workdir: Path) -> dict[str, Path]:
        """Started as root, mosquitto drops to the ``mosquitto`` user *before* it reads its
        TLS, ACL and password files: hand it copies it can read (public files 0644, the
        broker's key and the password hashes 0600 owned by that user)."""
        if not self.tls:
            return {}
        from coordinator.pki import copy_for_broker, mosquitto_account

        account = mosquitto_account()
        if account is None:
            return {}
        os.chmod(workdir, 0o711)
        files = {"cafile": (self.cafile, False), "certfile": (self.certfile, False), "acl_file": (self.acl_file, False),
                 "crlfile": (self.crlfile, False), "keyfile": (self.keyfile, True), "password_file": (self.password_file, True)}
        return copy_for_broker({k: (Path(f), secret) for k, (f, secret) in files.items() if f is not None}, workdir, account)

    def config_text(self, overrides: dict[str, Path] | None = None) -> str:
        """The config mosquitto is started with (``overrides``: file paths to use instead)."""
        overrides = overrides or {}
        if not self.tls:
            text = MOSQUITTO_CONF.read_text()
            if self.model_bytes:
                text = text.replace(f"max_packet_size {PAHO_MAX_PAYLOAD}", f"max_packet_size {packet_limit(self.model_bytes)}")
            return f"{text}\nlistener {self.port} {self.host}\n{self.extra_conf}\n"
        assert self.cafile and self.certfile and self.keyfile and self.acl_file
        def path(key: str, given: str | Path) -> Path:
            return overrides.get(key, Path(given).resolve())

        text = secure_conf(
            cafile=path("cafile", self.cafile), certfile=path("certfile", self.certfile),
            keyfile=path("keyfile", self.keyfile), acl_file=path("acl_file", self.acl_file),
            port=self.port, host=self.host, model_bytes=self.model_bytes,
            password_file=None if self.password_file is None else path("password_file", self.password_file),
            crlfile=None if self.crlfile is None else path("crlfile", self.crlfile),
        )
        return f"{text}\n{self.extra_conf}\n"

    def reload(self, timeout: float = 5.0) -> None:
        """Re-read the ACL, password and CRL files (after ``edgeci pki issue`` / ``revoke``):
        SIGHUP, as an operator would send it; returns once mosquitto has logged the reload."""
        if self._proc is None or self._dir is None:
            raise ConfigError("mosquitto is not running")
        before = self.log_text().count("Reloading config")
        self._readable_copies(Path(self._dir.name))
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_text().count("Reloading config") <= before:
            if time.monotonic() > deadline:
                raise TransportError(f"mosquitto did not reload within {timeout:.0f} s")
            time.sleep(0.02)

    def log_text(self) -> str:
        """mosquitto's log so far (connection refusals, ACL denials are there with -v)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    @staticmethod
    def binary() -> str:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            raise ConfigError("mosquitto is not installed (Debian: apt-get install mosquitto; `make setup` does it)")
        return exe

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        return _start_on_a_free_port(self, lambda: self._start(timeout), lambda exc: "Address already in use" in self._failed_log)

    def _start(self, timeout: float) -> MosquittoProcess:
        exe = self.binary()
        self._dir = tempfile.TemporaryDirectory(prefix="edgeci-mosquitto-")
        try:  # a config, copy or launch that fails leaves no folder behind
            conf = Path(self._dir.name) / "mosquitto.conf"
            conf.write_text(self.config_text(self._readable_copies(Path(self._dir.name))))
            log_path = self.log_path = Path(self._dir.name) / "mosquitto.log"
            with open(log_path, "wb") as log_file:
                self._proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT)
        except BaseException:
            self.stop()
            raise
        deadline = time.monotonic() + timeout
        try:
            # This mosquitto is up once it logs "running" (after opening its listeners; the notice
            # is in mosquitto's default log_type). Another process on the port would answer a
            # connect while this one exits at once ("Address already in use"): exit is checked first.
            while " running" not in self.log_text():
                if self._proc.poll() is not None:
                    raise TransportError(f"mosquitto exited with status {self._proc.returncode} on {self.host}:{self.port}")
                if time.monotonic() > deadline:
                    raise TransportError(f"mosquitto did not log 'running' within {timeout:.0f} s on {self.host}:{self.port}")
                time.sleep(0.01)
            wait_for_port(self.host, self.port, max(0.5, deadline - time.monotonic()))
        except TransportError as exc:
            text = self._failed_log = self.log_text()
            self.stop()
            raise TransportError(f"{exc}; mosquitto log:\n{text[-2000:]}") from exc
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bridge_conf(name: str, hub_host: str, hub_port: int, *, topics: tuple[str, ...] = ("edgeci/v1/peer/# both 1",)) -> str:
    """A mosquitto bridge section joining this (spoke) broker to a hub broker.

    The settings are those of ``coordinator/mosquitto/bridge.conf.example`` with its
    address, client id and topic lines replaced; pass the result as ``extra_conf`` to
    :class:`MosquittoProcess`.
    """
    from edge_sdk.wire.topics import check_id

    check_id(name, "bridge name")
    keep = []
    for line in BRIDGE_EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.split()[0] in ("connection", "address", "remote_clientid", "topic"):
            continue
        keep.append(stripped)
    return "\n".join(
        [f"connection edgeci-{name}", f"address {hub_host}:{hub_port}", f"remote_clientid edgeci-bridge-{name}", *keep]
        + [f"topic {t}" for t in topics]
    ) + "\n"
