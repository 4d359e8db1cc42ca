"""State written by an older edgeci, opened by this one (helper-154's upgrade audit).

The fixtures are built here in the layouts the first tree, e32e12d (2026-11-25), wrote, as
seen in state it made: a state dir of ``versions/N/{meta.json, weights.npy}`` with that
tree's metadata fields, ``pending/<device>.<seq>.upd`` files, no epoch, release or signing key;
a device data dir whose store remembers no task and no device id, has no counters mirror, and
whose ``deployed.npz`` records only the version. The audit ran those trees themselves (and two
later ones) against this one over a real broker; these tests keep what it found holding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.core import (
    BufferedUpdate,
    CommitVersion,
    CoordinatorConfig,
    CoordinatorCore,
    MessageReceived,
    Publish,
)
from coordinator.registry import Registry, RegistryError
from coordinator.strategies import make_strategy
from edge_sdk.client import EdgeClient
from edge_sdk.modelio import save_model
from edge_sdk.store import SampleStore
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Update
from tests.helpers import SIGNER, SPEC

REGION = "up"


def _version_meta(version: int, applied: dict[str, int], consumed: list[tuple[str, int]]) -> dict[str, object]:
    """A commit's meta.json as e32e12d wrote it (no epoch, release, strategy_state, staleness_hist...)."""
    return {"applied_upto": applied, "consumed": [list(c) for c in consumed], "counters": {"accepted": len(consumed), "aggregations": version},
            "created_at": 100.0 + version, "devices": sorted({d for d, _ in consumed}), "devices_seen": sorted(applied),
            "full_sync": True, "last_full_version": version, "max_staleness": 0, "mean_staleness": 0.0, "n_samples": 24,
            "n_updates": len(consumed), "peering": {}, "source": "aggregation", "strategy": "spin", "version": version}


def _old_state_dir(root: Path) -> np.ndarray:
    """Version 1 from d0..d2's seq 1, and d0's seq 3 acked but not yet aggregated (a .upd file)."""
    reg = Registry(root, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="pretrained:toy")
    reg.persist_update_file(BufferedUpdate(device="d0", seq=3, base_version=1, staleness=0, n_samples=8,
                                           weights=np.full(SPEC.size, 2.0, np.float32), arrived_at=150.0))
    reg.close()
    v1 = np.full(SPEC.size, 1.0, np.float32)
    d = root / "versions" / "000000001"
    d.mkdir()
    np.save(d / "weights.npy", v1)
    (d / "meta.json").write_text(json.dumps(_version_meta(1, {"d0": 1, "d1": 1, "d2": 1}, [("d0", 1), ("d1", 1), ("d2", 1)])))
    (root / "versions" / "000000000" / "meta.json").write_text(
        json.dumps({"applied_upto": {}, "created_at": 0.0, "source": "pretrained:toy", "version": 0}))
    for name in ("epoch", "region", "release.json", "signing.key", "lock"):  # none of these existed then
        (root / name).unlink(missing_ok=True)
    assert sorted(p.name for p in (root / "pending").iterdir()) == [f"d0.{3:020d}.upd"]
    return v1


def _update(device: str, seq: int, base: int, value: float, now: float) -> MessageReceived:
    msg = Update(device=device, seq=seq, model_id="toy", base_version=base, n_samples=8, weights=np.full(SPEC.size, value, np.float32))
    return MessageReceived(now=now, topic=topics.device_topic(REGION, device, "update"), payload=encode(msg))


def _core(root: Path) -> tuple[Registry, CoordinatorCore]:
    reg = Registry(root, SPEC)
    snap = reg.load()
    assert snap is not None
    cfg = CoordinatorConfig(region=REGION, coordinator_id="c1", spec=SPEC, signer=SIGNER)
    return reg, CoordinatorCore(cfg, make_strategy("spin", k=2, timeout_s=None), snap, rng=random.Random(0))


def _acks(actions: list[object]) -> list[Ack]:
    return [m for a in actions if isinstance(a, Publish) and a.topic.endswith("/ack") and isinstance(m := decode(a.payload), Ack)]


def test_a_state_dir_of_the_first_tree_resumes_its_version_watermarks_and_pending_update_once(tmp_path: Path) -> None:
    root = tmp_path / "state"
    v1 = _old_state_dir(root)
    reg, core = _core(root)
    snap = reg.load()
    assert snap is not None and snap.version == 1 and snap.release_version in (-1, 1)
    np.testing.assert_array_equal(snap.weights, v1)
    assert dict(snap.applied_upto) == {"d0": 1, "d1": 1, "d2": 1}
    assert [(b.device, b.seq) for b in snap.buffer] == [("d0", 3)]
    core.start(200.0)
    # the acked update sent again, and one the version applied: both duplicates, nothing applied
    assert [(a.seq, a.status) for a in _acks(core.handle(_update("d0", 3, 1, 2.0, 201.0)))] == [(3, "duplicate")]
    assert [(a.seq, a.status) for a in _acks(core.handle(_update("d1", 1, 0, 9.0, 202.0)))] == [(1, "duplicate")]
    assert core.version == 1
    # one new update completes k=2 with the pending one: version 2 from exactly those two
    actions = core.handle(_update("d1", 2, 1, 4.0, 203.0))
    commits = [a for a in actions if isinstance(a, CommitVersion)]
    assert len(commits) == 1 and commits[0].version == 2
    for a in actions:  # made durable as the daemon does
        if isinstance(a, CommitVersion):
            reg.commit(a)
    reg.close()
    reg, core = _core(root)
    snap = reg.load()
    assert snap is not None and snap.version == 2 and not snap.buffer
    assert dict(snap.applied_upto) == {"d0": 3, "d1": 2, "d2": 1}
    np.testing.assert_allclose(snap.weights, 3.0)  # the mean of 2.0 and 4.0 (equal weights): d0's applied once
    assert not list((root / "pending").glob("*.upd"))
    reg.close()


def test_a_data_dir_of_the_first_tree_keeps_its_samples_counters_and_deployed_model(tmp_path: Path) -> None:
    task = get_task("digits")
    pool = task.data().pool
    data_dir = tmp_path / "d0"
    data_dir.mkdir()
    # e32e12d's client: no task, no device id, no counters mirror in the store
    store = SampleStore.open(data_dir / "samples.sqlite3", sample_shape=tuple(pool.x.shape[1:]), n_classes=10)
    for i in range(12):
        store.add(pool.x[i], int(pool.y[i]))
    store.set_meta_many({"next_seq": 9, "trained_upto": 8})
    store.close()
    (data_dir / "samples.sqlite3.counters").unlink(missing_ok=True)
    weights = task.pretrained(seed=0).astype(np.float32)
    save_model(data_dir / "deployed.npz", task.spec, weights, {"version": 4})  # only the version was recorded

    client = EdgeClient(broker="mqtt://127.0.0.1:1", device_id="d0", region=REGION, task=task, data_dir=data_dir)
    try:
        assert client.version == 4
        np.testing.assert_array_equal(client.weights, weights)
        stats = client.store.stats()
        assert (stats.count, stats.added) == (12, 12)
        assert (client.core.state.next_seq, client.core.state.trained_upto) == (9, 8)
        assert client.store.get_meta("device_id") == "d0"  # adopted by the first id that opens it
    finally:
        client.stop()
    # and the mirror now exists, so a garbage file later still keeps the sequence numbers
    mirror = json.loads((data_dir / "samples.sqlite3.counters").read_text())
    assert mirror["meta"]["next_seq"] == 9


def test_a_log_segment_of_a_newer_format_says_a_newer_edgeci_wrote_it(tmp_path: Path) -> None:
    """A downgrade (or a state dir copied back to an older host) must not read as a foreign or corrupt
    file, which an operator may delete with the acked updates it holds."""
    root = tmp_path / "state"
    reg = Registry(root, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.close()
    (root / "pending" / f"{1:012d}.log").write_bytes(b"EDGLOG2\n" + bytes(64))  # as a later format would start
    reg = Registry(root, SPEC)
    try:
        with pytest.raises(RegistryError, match="newer edgeci"):
            reg.load()
    finally:
        reg.close()
