"""Brokers edgeci can start itself.

* :class:`EmbeddedBroker` — amqtt, in-process on its own asyncio thread: the zero-setup
  default of ``edgeci run`` (MQTT 3.1.1 only; fine for a demo fleet, slower than mosquitto
  for large models).
* :class:`MosquittoProcess` — a real mosquitto bound to 127.0.0.1 with the project's
  configuration (queue limits set on purpose: mosquitto's default of 1000 queued messages
  silently drops QoS 1 traffic to a slow subscriber).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

MOSQUITTO_CONF = Path(__file__).with_name("mosquitto") / "edgeci.conf"
BRIDGE_EXAMPLE = Path(__file__).with_name("mosquitto") / "bridge.conf.example"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


class EmbeddedBroker:
    """amqtt running on a private event loop thread. ``with EmbeddedBroker() as b: b.url``."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
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
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                self._broker = Broker(self._config(), loop=loop)
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
        if failure:
            raise TransportError(f"embedded broker failed to start: {failure[0]}") from failure[0]
        if not started.is_set():
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
            loop.close()
        self._loop = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MosquittoProcess:
    """A mosquitto child process on 127.0.0.1 with edgeci's configuration."""

    def __init__(self, port: int | None = None, *, extra_conf: str = "", host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.extra_conf = extra_conf
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @staticmethod
    def binary() -> str:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            raise ConfigError("mosquitto is not installed (Debian: apt-get install mosquitto; `make setup` does it)")
        return exe

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        self._dir = tempfile.TemporaryDirectory(prefix="edgeci-mosquitto-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(
            f"{MOSQUITTO_CONF.read_text()}\nlistener {self.port} {self.host}\n{self.extra_conf}\n"
        )
        log_path = Path(self._dir.name) / "mosquitto.log"
        with open(log_path, "wb") as log_file:
            self._proc = subprocess.Popen([self.binary(), "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.host, self.port, timeout)
        except TransportError:
            self.stop()
            raise
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
