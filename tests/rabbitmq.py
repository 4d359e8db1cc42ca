"""A RabbitMQ cluster with the MQTT plugin, started by a test as its own processes.

:class:`RabbitMqCluster` starts ``nodes`` RabbitMQ nodes (Debian's ``rabbitmq-server``; ``make
setup`` installs it) on 127.0.0.1 only: its own ``epmd`` on a free port, per node a distinct
node name (``rabbit1@localhost``, ``rabbit2@localhost``…), AMQP, MQTT and distribution ports,
``RABBITMQ_MNESIA_BASE``/``RABBITMQ_LOG_BASE``/config files under one temporary directory, a
shared Erlang cookie in a temporary ``HOME``, and ``rabbitmq_mqtt`` enabled through
``RABBITMQ_ENABLED_PLUGINS_FILE``. Nodes 2… join node 1 with ``rabbitmqctl stop_app;
join_cluster; start_app``. :meth:`RabbitMqCluster.stop` runs ``rabbitmqctl stop`` per node,
then stops the epmd it started. The system service (``/etc/rabbitmq``, ``/var/lib/rabbitmq``,
port 4369) is never touched.

MQTT is anonymous: ``mqtt.allow_anonymous`` maps clients without credentials to
``mqtt.default_user``, a user of the default vhost that RabbitMQ creates on first boot (the
``guest`` account, allowed from loopback only). RabbitMQ 3.10 (Debian 12) speaks MQTT 3.1 /
3.1.1 only, so there is no MQTT 5 session expiry to raise; the lifetime of a
``clean_session=False`` client's queue is ``mqtt.subscription_ttl`` (raised here to a day). The
3.10 MQTT parser has no packet size limit of its own (MQTT's 256 MiB); a published message is
capped by the broker-wide ``max_message_size`` (128 MiB, set explicitly below).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from coordinator.broker import wait_for_port
from edge_sdk.errors import ConfigError, TransportError

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
MAX_MESSAGE_SIZE = 134_217_728  # RabbitMQ's default; far above the digits model (a few hundred KB)
# Two cores shared with the tests' own processes: one scheduler, no busy-waiting, loopback-only distribution.
ERL_ARGS = "+S 1:1 +A 4 +sbwt none +sbwtdcpu none +sbwtdio none -kernel inet_dist_use_interface {127,0,0,1}"


@dataclass
class RabbitNode:
    name: str
    amqp_port: int
    mqtt_port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


def rabbit_tool(name: str) -> Path:
    """The unwrapped script (``/usr/sbin/*`` would ``su rabbitmq`` and use ``/var/lib/rabbitmq``)."""
    path = RABBIT_BIN / name
    if not path.exists():
        raise ConfigError(f"{path} is missing: install Debian's rabbitmq-server (`make setup` does it)")
    return path


def distinct_free_ports(n: int) -> list[int]:
    """``n`` free loopback ports, all different (each socket stays bound until all are picked;
    separate ``free_port()`` calls may hand out one port twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def available() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists() and shutil.which("epmd") is not None


class RabbitMqCluster:
    """``with RabbitMqCluster(2) as c: c.nodes[0].url, c.nodes[1].url``."""

    def __init__(self, nodes: int = 2) -> None:
        if nodes < 1:
            raise ConfigError("a cluster needs at least one node")
        self._dir = tempfile.TemporaryDirectory(prefix="edgeci-rabbitmq-")
        self.root = Path(self._dir.name)
        ports = distinct_free_ports(1 + 3 * nodes)
        self.epmd_port = ports.pop()
        self.nodes = [
            RabbitNode(f"rabbit{i}@localhost", ports.pop(), ports.pop(), ports.pop(), self.root / f"rabbit{i}")
            for i in range(1, nodes + 1)
        ]
        self._epmd: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ environment

    def env(self, node: RabbitNode) -> dict[str, str]:
        home = self.root / "home"
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **keep,
            "HOME": str(home),  # .erlang.cookie: the cluster's shared cookie
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(node.base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_PID_FILE": str(node.base / "rabbit.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS,
            "RABBITMQ_CTL_ERL_ARGS": "+S 1:1 +sbwt none -kernel inet_dist_use_interface {127,0,0,1}",
        }

    def config_text(self, node: RabbitNode) -> str:
        return "\n".join([
            f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}",
            "mqtt.allow_anonymous = true",
            "mqtt.default_user = guest",
            "mqtt.default_pass = guest",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "mqtt.subscription_ttl = 86400000",
            "mqtt.prefetch = 64",  # paho's in-flight window
            f"max_message_size = {MAX_MESSAGE_SIZE}",
            "loopback_users.guest = true",
            "cluster_partition_handling = ignore",
            "log.console = false",
            "log.file.level = info",
            "",
        ])

    def _write_files(self) -> None:
        home = self.root / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(os.urandom(16).hex().upper())
        os.chmod(cookie, 0o400)
        (self.root / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        for node in self.nodes:
            for sub in ("mnesia", "log"):
                (node.base / sub).mkdir(parents=True)
            (node.base / "rabbitmq-env.conf").write_text("")
            (node.base / "rabbitmq.conf").write_text(self.config_text(node))

    # ------------------------------------------------------------------ control

    def ctl(self, node: RabbitNode, *args: str, timeout: float = 120.0) -> str:
        """``rabbitmqctl -n NODE ARGS`` with the node's environment; TransportError on failure (each call
        boots an Erlang VM: seconds when idle, far more under load, hence the long timeout)."""
        cmd = [str(rabbit_tool("rabbitmqctl")), "-n", node.name, *args]
        try:
            out = subprocess.run(cmd, env=self.env(node), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        except subprocess.TimeoutExpired as exc:
            raise TransportError(f"{' '.join(cmd[1:])} timed out after {timeout:.0f} s") from exc
        if out.returncode != 0:
            raise TransportError(f"rabbitmqctl {' '.join(cmd[1:])} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return out.stdout

    def log_text(self, node: RabbitNode) -> str:
        parts = []
        for path in [*sorted((node.base / "log").glob("*")), node.base / "stdout.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def _start_node(self, node: RabbitNode, timeout: float) -> None:
        with open(node.base / "stdout.log", "wb") as out:
            node.proc = subprocess.Popen(
                [str(rabbit_tool("rabbitmq-server"))], env=self.env(node), stdout=out, stderr=subprocess.STDOUT,
                cwd=node.base, start_new_session=True,
            )
        self._wait_mqtt(node, timeout)

    def _wait_mqtt(self, node: RabbitNode, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if node.proc is not None and node.proc.poll() is not None:
                raise TransportError(f"{node.name} exited with {node.proc.returncode}:\n{self.log_text(node)}")
            try:
                wait_for_port("127.0.0.1", node.mqtt_port, timeout=0.5)
                return
            except TransportError:
                if time.monotonic() > deadline:
                    raise TransportError(f"{node.name}: no MQTT listener after {timeout:.0f} s:\n{self.log_text(node)}") from None

    def start(self, timeout: float = 90.0) -> RabbitMqCluster:
        t0 = time.monotonic()
        try:
            self._write_files()
            epmd = shutil.which("epmd")
            if epmd is None:
                raise ConfigError("epmd is missing (it comes with erlang-base, a dependency of rabbitmq-server)")
            self._epmd = subprocess.Popen([epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            wait_for_port("127.0.0.1", self.epmd_port, timeout=10)
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                for f in [pool.submit(self._start_node, n, timeout) for n in self.nodes]:
                    f.result()
            self.timings["boot_s"] = time.monotonic() - t0
            first = self.nodes[0]
            for node in self.nodes[1:]:
                self.ctl(node, "stop_app")
                self.ctl(node, "join_cluster", first.name)
                self.ctl(node, "start_app")
                self._wait_mqtt(node, timeout)
            self.timings["join_s"] = time.monotonic() - t0 - self.timings["boot_s"]
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes as node 1 reports them (``rabbitmqctl cluster_status``)."""
        import json

        status = json.loads(self.ctl(self.nodes[0], "cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    def _stop_node(self, node: RabbitNode) -> None:
        if node.proc is None:
            return
        if node.proc.poll() is None:
            try:
                self.ctl(node, "stop", timeout=30)
            except TransportError:
                node.proc.terminate()  # the start script turns SIGTERM into a clean stop
        try:
            node.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)  # its own session: the script and the VM it started
            node.proc.wait(10)
        node.proc = None

    def stop(self) -> None:
        """``rabbitmqctl stop`` on every node (in parallel), then the epmd this cluster started."""
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for f in [pool.submit(self._stop_node, n) for n in self.nodes]:
                f.result()
        if self._epmd is not None:
            self._epmd.terminate()
            try:
                self._epmd.wait(5)
            except subprocess.TimeoutExpired:
                self._epmd.kill()
                self._epmd.wait(5)
            self._epmd = None
        self.timings["stop_s"] = time.monotonic() - t0
        self._dir.cleanup()

    def __enter__(self) -> RabbitMqCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
