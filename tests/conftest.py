"""Shared fixtures: a real mosquitto on 127.0.0.1 (started and stopped by the tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.broker import MosquittoProcess
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


# ---------------------------------------------------------------------- clustered broker


@pytest.fixture
def rabbitmq_cluster() -> Iterator[RabbitMqCluster]:
    """Two RabbitMQ nodes with the MQTT plugin, clustered, on 127.0.0.1 (``tests/rabbitmq.py``)."""
    cluster = RabbitMqCluster(nodes=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()
