"""A real ``edgeci coordinator`` after a churn of 200 devices holds what it held before it: the
quick form of ``tests/soak_measure.py`` (helper-178's audit). Each device connects, pulls, pushes
one update and leaves; the bounds are counts, not timings. And the broker forgets sessions unused
for long."""

from __future__ import annotations

import os
import re
import urllib.request
from functools import partial
from pathlib import Path

import pytest

from coordinator.broker import (
    MOSQUITTO_CONF,
    PASSWORD_CONF,
    SECURE_CONF,
    MosquittoProcess,
    free_port,
)
from edge_sdk.tasks import get_task
from edge_sdk.wire.messages import Ack, ModelMsg, Pull
from tests.daemon_rig import Device, Net, update
from tests.helpers import CoordinatorProcess, wait_until

DEVICES = 200
WAVE = 20
"""Devices connected at once (each wave leaves before the next comes)."""
SLACK = 2
"""fds and threads the process may hold beyond its baseline: a metrics scrape in flight (its socket
and its thread) — never one per device."""
KEEP_VERSIONS = 20
"""The daemon's default ``keep_versions``: pruned in steps of a quarter more (``Registry._prune_now``)."""


def held(pid: int) -> tuple[int, int]:
    """The process's open fds and threads."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def all_have(devices: list[Device], kind: type) -> bool:
    return all(dev.of(kind) for dev in devices)


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_fds_threads_and_versions_stay_bounded_after_200_devices_come_and_go(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    task = get_task("digits")
    net = Net.plain(mosquitto, region="churn")
    port = free_port()
    state = tmp_path / "state"
    with CoordinatorProcess("--broker", mosquitto.url, "--region", net.region, "--state-dir", str(state), "--model", "digits",
                            "--k", "2", "--timeout", "600", "--metrics-port", str(port), "--status-interval", "1") as coord:
        metric(port, "edgeci_version")  # (the metrics server's first request: what it loads once is in the baseline)
        base = held(coord.pid)
        for wave in range(0, DEVICES, WAVE):
            devices = [Device(net, f"churn-{i:03d}") for i in range(wave, wave + WAVE)]
            try:
                for dev in devices:
                    dev.send("pull", Pull(device=dev.device, seq=0, model_id=task.spec.model_id, n_samples=20))
                wait_until(partial(all_have, devices, ModelMsg), 30, f"wave {wave}'s models")
                for i, dev in enumerate(devices, start=wave):
                    dev.send("update", update(task, dev.device, 1, seed=i, nonce=i + 1, base_version=dev.of(ModelMsg)[-1].version))
                wait_until(partial(all_have, devices, Ack), 30, f"wave {wave}'s acks")
                assert [dev.of(Ack)[-1].status for dev in devices] == ["accepted"] * WAVE
            finally:
                for dev in devices:
                    dev.transport.stop()
        # The churn happened: every device seen, every update taken, a version per K = 2 of them.
        wait_until(lambda: metric(port, "edgeci_devices_seen") == DEVICES and metric(port, "edgeci_version") == DEVICES // 2,
                   30, "the status to count the 200 devices and their 100 versions")
        wait_until(lambda: all(n <= b + SLACK for n, b in zip(held(coord.pid), base, strict=True)), 30,
                   f"fds and threads back within {SLACK} of {base}")
        versions = state / "versions"
        wait_until(lambda: len(list(versions.iterdir())) <= 2 * KEEP_VERSIONS, 30, "old versions pruned")
        assert coord.close() == 0


@pytest.mark.parametrize("conf", [MOSQUITTO_CONF, SECURE_CONF, PASSWORD_CONF], ids=lambda p: p.name)
def test_every_shipped_mosquitto_conf_expires_unused_sessions(conf: Path) -> None:
    """Devices connect with persistent sessions: without an expiry each id that ever connected kept
    its session on the broker until a restart (``tests/soak_measure.py --broker-sessions``)."""
    values = [line.split()[1:] for line in conf.read_text().splitlines() if line.split()[:1] == ["persistent_client_expiration"]]
    assert len(values) == 1 and re.fullmatch(r"[1-9][0-9]*[hdwmy]", " ".join(values[0])), values
