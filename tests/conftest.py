"""Shared fixtures: a real mosquitto on 127.0.0.1 (started and stopped by the tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.broker import MosquittoProcess
from tests.daemon_rig import Net
from tests.rabbitmq import RabbitMqCluster
from tests.secure_broker import SecureBroker

# Tests share 2 cores with each other's subprocesses: keep torch to one thread.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def mosquitto() -> Iterator[MosquittoProcess]:
    broker = MosquittoProcess().start()
    try:
        yield broker
    finally:
        broker.stop()


# ---------------------------------------------------------------------- TLS + ACL broker


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    broker = SecureBroker(tmp_path / "pki")
    try:
        yield broker
    finally:
        broker.stop()


# ---------------------------------------------------------------------- a daemon's broker (tests/daemon_rig.py)


@pytest.fixture
def plain_net(mosquitto: MosquittoProcess) -> Net:
    return Net.plain(mosquitto)


@pytest.fixture(params=["plain", "tls"])
def any_net(request: pytest.FixtureRequest) -> Net:
    """Each test twice: over plain TCP (the transport's fast path) and the production TLS + ACL broker (paho's path)."""
    if request.param == "plain":
        return Net.plain(request.getfixturevalue("mosquitto"))
    return Net.tls(request.getfixturevalue("secure_broker"))


# ---------------------------------------------------------------------- clustered broker


@pytest.fixture
def rabbitmq_cluster() -> Iterator[RabbitMqCluster]:
    """Two RabbitMQ nodes with the MQTT plugin, clustered, on 127.0.0.1 (``tests/rabbitmq.py``)."""
    cluster = RabbitMqCluster(nodes=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()
