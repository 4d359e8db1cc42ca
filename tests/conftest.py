"""Shared fixtures: a real mosquitto on 127.0.0.1 (started and stopped by the tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from coordinator.broker import MosquittoProcess

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
