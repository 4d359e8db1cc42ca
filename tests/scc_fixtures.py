"""Fixtures shared by the SCC tests (tests/test_scc.py, tests/test_scc_client.py), loaded
with ``pytest_plugins``: the digits task, a deployed model and a model whose extractor moved."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.spec import Vector
from edge_sdk.tasks.base import Split, TrainConfig
from edge_sdk.tasks.digits import DigitsTask


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    return DigitsTask(device="cpu")


@pytest.fixture(scope="module")
def w_old(task: DigitsTask) -> Vector:
    return task.pretrained(seed=0)


@pytest.fixture(scope="module")
def w_new(task: DigitsTask, w_old: Vector) -> Vector:
    """w_old after a full local update: a different extractor (and classifier)."""
    pool = task.data().pool
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=1)
    return task.local_update(w_old, pool.x[:120], pool.y[:120], cfg).weights


def of_classes(task: DigitsTask, classes: list[int], per_class: int, offset: int = 0) -> Split:
    """``per_class`` pool samples of each class, from the ``offset``-th of that class on."""
    pool = task.data().pool
    idx = np.concatenate([np.flatnonzero(pool.y == c)[offset : offset + per_class] for c in classes])
    return Split(x=pool.x[idx], y=pool.y[idx])
