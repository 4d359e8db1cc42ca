"""The coordinator's durable state dir: atomic versions, pending updates, restore."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.core import CommitVersion
from coordinator.registry import Registry, RegistryError
from coordinator.strategies.base import BufferedUpdate
from edge_sdk.errors import ShapeMismatch
from edge_sdk.spec import ModelSpec
from tests.helpers import SPEC


def upd(device: str, seq: int, value: float) -> BufferedUpdate:
    return BufferedUpdate(device=device, seq=seq, base_version=0, staleness=0, n_samples=2, weights=np.full(SPEC.size, value, np.float32), arrived_at=1.5)


def test_empty_dir_loads_none_then_version_zero(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    assert reg.load() is None
    reg.initialise(np.ones(SPEC.size, np.float32), now=10.0, source="test")
    snap = reg.load()
    assert snap is not None and snap.version == 0 and not snap.buffer
    np.testing.assert_array_equal(snap.weights, 1.0)
    with pytest.raises(RegistryError):
        reg.initialise(np.ones(SPEC.size, np.float32), now=11.0, source="again")


def test_pending_updates_survive_and_commit_consumes_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for u in (upd("a", 1, 1.0), upd("b", 4, 2.0), upd("a", 2, 3.0)):
        reg.persist_update(u)
    again = Registry(tmp_path, SPEC).load()  # a fresh process
    assert again is not None
    assert sorted(u.key for u in again.buffer) == [("a", 1), ("a", 2), ("b", 4)]
    b = next(u for u in again.buffer if u.key == ("b", 4))
    np.testing.assert_array_equal(b.weights, 2.0)
    assert b.arrived_at == 1.5 and b.n_samples == 2
    reg.commit(CommitVersion(version=1, weights=np.full(SPEC.size, 7.0, np.float32), applied_upto={"a": 1, "b": 4},
                             consumed=(("a", 1), ("b", 4)), metadata={"created_at": 5.0, "devices_seen": ["a", "b"]}))
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 1
    assert [u.key for u in snap.buffer] == [("a", 2)]
    assert dict(snap.applied_upto) == {"a": 1, "b": 4}
    assert snap.last_aggregation_at == 5.0 and list(snap.devices_seen) == ["a", "b"]
    _, meta = reg.read_version(1)
    assert meta["consumed"] == [["a", 1], ["b", 4]]


def test_versions_are_pruned_and_never_overwritten(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC, keep_versions=3)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for v in range(1, 6):
        reg.commit(CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_upto={}, consumed=(), metadata={}))
    assert reg.versions() == [3, 4, 5]
    with pytest.raises(RegistryError):
        reg.write_version(5, np.zeros(SPEC.size, np.float32), {})
    (reg.versions_dir / ".v9-crashed").mkdir()  # a crash mid-write leaves a temp dir
    assert Registry(tmp_path, SPEC).latest() == 5


def test_refuses_another_models_state_dir_and_bad_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    Registry(tmp_path, SPEC)
    other = ModelSpec.build("other", [("w", (3,), "classifier")])
    with pytest.raises(RegistryError, match=r"Use another --state-dir"):
        Registry(tmp_path, other)
    with pytest.raises(ShapeMismatch):
        Registry(tmp_path, SPEC).initialise(np.zeros(3, np.float32), now=0.0, source="bad")
