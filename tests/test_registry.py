"""The coordinator's durable state dir: atomic versions, pending updates, restore."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

from coordinator.core import CommitVersion
from coordinator.registry import Registry, RegistryError, StateDirLocked, encode_record
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
    reg.commit(CommitVersion(version=1, weights=np.full(SPEC.size, 7.0, np.float32), applied_changed={"a": 1, "b": 4},
                             consumed=(("a", 1), ("b", 4)), metadata={"created_at": 5.0}, devices_added=("a", "b")))
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
        reg.commit(CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed={}, consumed=(), metadata={}))
    assert reg.versions() == [3, 4, 5]
    with pytest.raises(RegistryError):
        reg.write_version(5, np.zeros(SPEC.size, np.float32), {})
    # a rollback to a pruned version says so (operator trial: it read like a corrupt state dir)
    with pytest.raises(RegistryError, match=r"version 1 was pruned: the state dir keeps the newest 3 versions .*oldest kept: 3"):
        reg.read_version(1)
    (reg.versions_dir / ".v9-crashed").mkdir()  # a crash mid-write leaves a temp dir
    assert Registry(tmp_path, SPEC).latest() == 5


def test_refuses_another_models_state_dir_and_bad_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    Registry(tmp_path, SPEC)
    other = ModelSpec.build("other", [("w", (3,), "classifier")])
    with pytest.raises(RegistryError, match=r"Use another --state-dir"):
        Registry(tmp_path, other)
    with pytest.raises(ShapeMismatch):
        Registry(tmp_path, SPEC).initialise(np.zeros(3, np.float32), now=0.0, source="bad")


# ---------------------------------------------------------------------- group commit log


def test_a_batch_is_one_fsync_and_reads_back_in_order(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("warm", 1, 0.5)])  # creates the segment (its own fsyncs)
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    reg.append_updates([upd(f"d{i}", 1, float(i)) for i in range(50)])
    assert len(calls) == 1
    reg.append_updates([upd(f"d{i}", 2, float(i)) for i in range(50)])
    assert len(calls) == 2
    monkeypatch.setattr(os, "fsync", real)
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None
    assert [u.key for u in snap.buffer] == [("warm", 1)] + [(f"d{i}", 1) for i in range(50)] + [(f"d{i}", 2) for i in range(50)]
    np.testing.assert_array_equal(snap.buffer[7].weights, 6.0)


def test_device_ids_that_spell_kind_survive_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A record's type comes from its decoded map: an id holding "kind" (in the bytes a search
    once looked at) is an update like any other, and what follows it in the log survives too."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for u in (upd("a", 1, 1.0), upd("kindle-7", 1, 2.0), upd("kind", 2, 3.0), upd("b", 4, 4.0)):
        reg.persist_update(u)
    reg.close()
    owner = Registry(tmp_path, SPEC)
    owner.acquire_lock()
    try:
        got = owner.load().buffer
        assert [u.key for u in got] == [("a", 1), ("kindle-7", 1), ("kind", 2), ("b", 4)]
        assert [float(u.weights[0]) for u in got] == [1.0, 2.0, 3.0, 4.0]
    finally:
        owner.close()
    assert [u.key for u in Registry(tmp_path, SPEC).pending()] == [("a", 1), ("kindle-7", 1), ("kind", 2), ("b", 4)]


def test_torn_or_corrupt_tail_record_is_ignored_and_truncated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 1, 1.0), upd("a", 2, 2.0)])
    (segment,) = sorted(reg.pending_dir.glob("*.log"))
    intact = segment.stat().st_size
    with open(segment, "ab") as f:  # a crash in the middle of the next batch's write
        f.write(encode_record(upd("a", 3, 3.0))[:-7])
    assert [u.key for u in Registry(tmp_path, SPEC).pending()] == [("a", 1), ("a", 2)]
    assert segment.stat().st_size > intact  # an unlocked reader leaves the file alone
    owner = Registry(tmp_path, SPEC)
    owner.acquire_lock()
    try:
        assert [u.key for u in owner.pending()] == [("a", 1), ("a", 2)]
        assert segment.stat().st_size == intact  # the lock holder cuts the torn tail
        # a flipped byte inside the last record: its checksum fails, the record is dropped
        data = bytearray(segment.read_bytes())
        data[-100] ^= 0xFF
        segment.write_bytes(bytes(data))
        assert [u.key for u in owner.pending()] == [("a", 1)]
        owner.append_updates([upd("a", 4, 4.0)])  # appends go to a fresh segment
        assert [u.key for u in Registry(tmp_path, SPEC).pending()] == [("a", 1), ("a", 4)]
    finally:
        owner.close()


def test_a_corrupt_record_in_the_middle_loses_only_itself(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Only the last write can tear: a bad record with intact ones after it is media corruption,
    and those after it were acknowledged. It is skipped (said at ERROR, counted), the rest is
    read, and the file is not cut (it used to be truncated there, every later record with it:
    durability audit). Zeros after a bad record are still a torn tail."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for seq in range(1, 5):  # one write each: four records
        reg.append_updates([upd("a", seq, float(seq))])
    (segment,) = sorted(reg.pending_dir.glob("*.log"))
    data = bytearray(segment.read_bytes())
    size = len(encode_record(upd("a", 1, 1.0)))
    data[len(data) - 3 * size + 40] ^= 0xFF  # inside the second record's body
    segment.write_bytes(bytes(data))
    owner = Registry(tmp_path, SPEC)
    owner.acquire_lock()
    try:
        with caplog.at_level("ERROR", logger="edgeci.coordinator"):
            assert [u.key for u in owner.pending()] == [("a", 1), ("a", 3), ("a", 4)]
        assert owner.corrupt_records == 1 and "intact records after it" in caplog.text
        assert segment.stat().st_size == len(data)  # nothing cut
        np.testing.assert_array_equal(next(u for u in owner.pending() if u.key == ("a", 4)).weights, 4.0)
    finally:
        owner.close()
    with open(segment, "ab") as f:  # and a torn last write followed by zeros is still a tail
        f.write(encode_record(upd("a", 5, 5.0))[:60] + bytes(64))
    torn = Registry(tmp_path, SPEC)
    torn.acquire_lock()
    try:
        assert [u.key for u in torn.pending()] == [("a", 1), ("a", 3), ("a", 4)]
        assert segment.stat().st_size == len(data)  # the tail is cut back to the last intact record
    finally:
        torn.close()


def test_failed_append_leaves_no_partial_record(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno
    import os

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 1, 1.0)])
    real = os.pwrite

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        real(fd, bytes(data)[:100], offset)  # part of the batch reaches the file, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError):
        reg.append_updates([upd("b", 1, 2.0), upd("c", 1, 3.0)])
    monkeypatch.setattr(os, "pwrite", real)
    reg.append_updates([upd("d", 1, 4.0)])
    assert [u.key for u in Registry(tmp_path, SPEC).pending()] == [("a", 1), ("d", 1)]


def test_commit_drops_applied_segments_and_restore_drops_applied_records(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import coordinator.registry as registry_module

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 1, 1.0), upd("b", 1, 1.0)])
    reg._close_segment()  # as after a rotation: the next batch starts another segment
    reg.append_updates([upd("a", 2, 2.0)])
    assert len(list(reg.pending_dir.glob("*.log"))) == 2
    reg.commit(CommitVersion(version=1, weights=np.full(SPEC.size, 7.0, np.float32), applied_changed={"a": 1, "b": 1},
                             consumed=(("a", 1), ("b", 1)), metadata={}))
    assert len(list(reg.pending_dir.glob("*.log"))) == 1  # the first segment was all applied
    # a commit can land before the segment holding its updates is deleted (crash in between):
    reg.commit(CommitVersion(version=2, weights=np.full(SPEC.size, 8.0, np.float32), applied_changed={"a": 2, "b": 1},
                             consumed=(("a", 2),), metadata={}))
    assert len(list(reg.pending_dir.glob("*.log"))) == 1  # the open segment stays (it is small)
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 2 and list(snap.buffer) == []
    assert sorted(reg.pending_dir.glob("*.log"))[0].read_bytes()[:8] == registry_module.SEGMENT_MAGIC


def test_old_one_file_per_update_layout_is_still_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.persist_update_file(upd("old", 1, 1.0))
    reg.append_updates([upd("new", 1, 2.0)])
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and sorted(u.key for u in snap.buffer) == [("new", 1), ("old", 1)]
    reg.commit(CommitVersion(version=1, weights=np.zeros(SPEC.size, np.float32), applied_changed={"old": 1, "new": 1},
                             consumed=(("old", 1), ("new", 1)), metadata={}))
    assert not list(reg.pending_dir.glob("*.upd"))


# ---------------------------------------------------------------------- lock, numbering, recovery


def test_second_holder_of_the_state_dir_is_refused_naming_the_first(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    first = Registry(tmp_path, SPEC)
    first.acquire_lock()
    try:
        with pytest.raises(StateDirLocked, match=f"pid {os.getpid()}"):
            Registry(tmp_path, SPEC).acquire_lock()
    finally:
        first.close()
    second = Registry(tmp_path, SPEC)
    second.acquire_lock()  # released: a restart takes it
    second.close()


def test_a_failed_version_write_never_reuses_its_number(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno
    import os

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    real = os.pwrite

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # the log append fails: version 1 is not durable
    with pytest.raises(OSError):
        reg.commit(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={}, consumed=(), metadata={}))
    monkeypatch.setattr(os, "pwrite", real)
    assert reg.versions() == [0] and not list(reg.versions_dir.glob(".v*"))
    snap = reg.load()
    assert snap is not None and snap.version == 0 and snap.version_floor == 1
    with pytest.raises(RegistryError):
        reg.write_version(1, np.ones(SPEC.size, np.float32), {})
    reg.commit(CommitVersion(version=2, weights=np.full(SPEC.size, 2.0, np.float32), applied_changed={}, consumed=(), metadata={}))
    assert reg.versions() == [0, 2]


def test_a_restart_does_not_bring_back_pruned_versions_from_the_log(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Operator trial, finding 3: every restart "restored from the pending log" each pruned
    version the log still held (112 warnings, 112 directories written), for the next commit
    to prune again; a lost directory among the kept versions is still put back."""
    import shutil

    reg = Registry(tmp_path, SPEC, keep_versions=3)
    reg.acquire_lock()
    try:
        reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
        for v in range(1, 9):
            reg.commit(CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed={}, consumed=(), metadata={}))
        kept = reg.versions()
        assert kept[-3:] == [6, 7, 8] and 1 not in kept
        shutil.rmtree(reg.versions_dir / f"{7:09d}")  # one the crash lost among the kept ones
        with caplog.at_level("WARNING", logger="edgeci"):
            snap = reg.load()
        assert snap is not None and snap.version == 8
        assert reg.versions() == kept  # 7 is back, nothing older is
        assert caplog.text.count("restored from the pending log") <= 1
    finally:
        reg.close()


def test_a_version_is_durable_once_in_the_log_and_its_directory_is_repaired(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno
    import os
    import shutil

    reg = Registry(tmp_path, SPEC)
    reg.acquire_lock()
    try:
        reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
        real = os.rename

        def rename_fails(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "rename", rename_fails)  # the log append worked, the directory did not
        with pytest.raises(OSError):
            reg.commit(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={"a": 3}, consumed=(), metadata={}))
        monkeypatch.setattr(os, "rename", real)
        assert reg.versions() == [0]
        snap = reg.load()  # durable in the log: the directory is put back
        assert snap is not None and snap.version == 1 and dict(snap.applied_upto) == {"a": 3} and not snap.recovered_from
        assert reg.versions() == [0, 1]
        np.testing.assert_array_equal(reg.read_version(1)[0], 1.0)
        # a crash that tears a directory written without fsync: the log's copy wins, silently
        reg.commit(CommitVersion(version=2, weights=np.full(SPEC.size, 2.0, np.float32), applied_changed={"a": 3}, consumed=(), metadata={}))
        shutil.rmtree(reg.versions_dir / f"{2:09d}")
        snap = reg.load()
        assert snap is not None and snap.version == 2 and not snap.recovered_from
        np.testing.assert_array_equal(reg.read_version(2)[0], 2.0)
    finally:
        reg.close()


def test_commits_cost_one_fsync_each_between_checkpoints(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    import coordinator.registry as registry_module

    reg = Registry(tmp_path, SPEC, keep_versions=100)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 0, 0.0)])  # the segment exists
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    n = registry_module.CHECKPOINT_EVERY
    for v in range(1, n):
        reg.stage([upd("a", v, float(v))])
        reg.commit(CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed={"a": v}, consumed=(("a", v),), metadata={}))
    assert len(calls) == n - 1  # updates and version in one append, one fsync; directories unsynced
    reg.commit(CommitVersion(version=n, weights=np.full(SPEC.size, n, np.float32), applied_changed={"a": n - 1}, consumed=(), metadata={}))
    assert len(calls) > n  # the checkpoint fsyncs the newest version's directory
    monkeypatch.setattr(os, "fsync", real)
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == n and list(snap.buffer) == []


def test_truncated_newest_version_falls_back_and_numbers_above_it(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import make_coordinator

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for v in (1, 2):  # checkpointed directories (no copy left in the log)
        reg.write_version(v, np.full(SPEC.size, v, np.float32), {"applied_upto": {"a": v}})
    weights = reg.versions_dir / f"{2:09d}" / "weights.npy"
    weights.write_bytes(weights.read_bytes()[:40])
    with caplog.at_level("WARNING", logger="edgeci.registry"):
        snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 1 and dict(snap.applied_upto) == {"a": 1}
    np.testing.assert_array_equal(snap.weights, 1.0)
    assert snap.version_floor == 2 and snap.recovered_from and snap.recovered_from[0].startswith("2:")
    assert any("000000002" in r.getMessage() or "version 2" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    core = make_coordinator("spin", snapshot=snap, k=1)
    assert core.status().extra["recovered_from"] == list(snap.recovered_from)
    commit = core._commit(np.full(SPEC.size, 3.0, np.float32), 1.0, consumed=(), meta={})
    assert commit.version == 3  # above the unreadable version 2, never 2 again
    (reg.versions_dir / f"{1:09d}" / "meta.json").write_text("{not json")
    older = Registry(tmp_path, SPEC).load()  # bad meta too: back to version 0, floor still 2
    assert older is not None and older.version == 0 and older.version_floor == 2 and len(older.recovered_from) == 2
    for v in (0, 1, 2):
        (reg.versions_dir / f"{v:09d}" / "weights.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(RegistryError, match="no readable version"):
        Registry(tmp_path, SPEC).load()


def test_a_batch_with_several_versions_is_still_one_fsync(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno
    import os

    reg = Registry(tmp_path, SPEC, keep_versions=100)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 0, 0.0)])
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    actions = []
    for v in (1, 2, 3):  # what the driver does within one batch: updates, a version, updates...
        reg.stage([upd("a", v, float(v))])
        action = CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed={"a": v}, consumed=(("a", v),), metadata={})
        reg.stage_version(action)
        actions.append(action)
    reg.append_updates([upd("b", 1, 9.0)])  # the end of the batch
    assert len(calls) == 1
    for action in actions:  # after the fsync: directories (no fsync) and bookkeeping
        reg.commit(action)
    assert len(calls) == 1 and reg.versions() == [0, 1, 2, 3]
    monkeypatch.setattr(os, "fsync", real)
    # and when the batch's fsync fails, none of it is there
    reg.stage([upd("a", 4, 4.0)])
    reg.stage_version(CommitVersion(version=4, weights=np.full(SPEC.size, 4.0, np.float32), applied_changed={"a": 4}, consumed=(("a", 4),), metadata={}))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError):
        reg.append_updates([upd("c", 1, 1.0)])
    monkeypatch.setattr(os, "fsync", real)
    snap = Registry(tmp_path, SPEC).load()  # another process: version 4 never existed
    assert snap is not None and snap.version == 3 and sorted(u.key for u in snap.buffer) == [("b", 1)]
    again = reg.load()  # this process attempted version 4: it is never written again
    assert again is not None and again.version == 3 and again.version_floor == 4


# ---------------------------------------------------------------------- O(changed) commits


def _commit(reg: Registry, v: int, changed: dict[str, int], added: tuple[str, ...] = ()) -> None:
    reg.commit(CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed=changed,
                             consumed=tuple(changed.items()), metadata={"created_at": float(v)}, devices_added=added))


def _log_bytes(reg: Registry) -> int:
    return sum(p.stat().st_size for p in reg.pending_dir.glob("*.log"))


def _commit_cost(root, known: int) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    """Log bytes and meta.json of a commit changing 2 devices, with ``known`` devices known."""
    reg = Registry(root, SPEC, keep_versions=100)
    everyone = [f"dev{i:05d}" for i in range(known)]
    reg.write_version(0, np.zeros(SPEC.size, np.float32), {"applied_upto": dict.fromkeys(everyone, 1), "devices_seen": everyone})
    reg.append_updates([upd("dev00001", 2, 1.0)])  # the segment exists
    before = _log_bytes(reg)
    _commit(reg, 1, {"dev00001": 2, "new": 0}, ("new",))
    record = _log_bytes(reg) - before
    meta = (reg.versions_dir / f"{1:09d}" / "meta.json").read_bytes()
    snap = Registry(root, SPEC).load()  # and the cumulative maps are all there after a restart
    assert snap is not None and snap.version == 1
    assert dict(snap.applied_upto) == {**dict.fromkeys(everyone, 1), "dev00001": 2, "new": 0}
    assert list(snap.devices_seen) == [*everyone, "new"]
    return record, meta


def test_a_commit_record_does_not_grow_with_devices_that_did_not_change(tmp_path) -> None:  # type: ignore[no-untyped-def]
    few_record, few_meta = _commit_cost(tmp_path / "few", 10)
    many_record, many_meta = _commit_cost(tmp_path / "many", 10_000)
    # the same two changes cost the same bytes whether 10 or 10,000 devices are known
    assert (many_record, many_meta) == (few_record, few_meta)
    assert few_record < 4 * SPEC.size + 400 and b"dev00002" not in many_meta


def test_a_core_commit_carries_only_the_changed_watermarks_and_new_devices() -> None:
    from coordinator.core import Snapshot
    from edge_sdk.core.events import MessageReceived
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import encode
    from edge_sdk.wire.messages import Pull, Update
    from tests.helpers import make_coordinator

    known = [f"old{i}" for i in range(10_000)]
    snap = Snapshot(version=3, weights=np.zeros(SPEC.size, np.float32), applied_upto=dict.fromkeys(known, 5), devices_seen=known)
    core = make_coordinator("spin", snapshot=snap, k=2, timeout_s=None)
    for device in ("old7", "fresh"):
        core.handle(MessageReceived(now=1.0, topic=topics.device_topic("r1", device, "pull"),
                                    payload=encode(Pull(device=device, seq=6, model_id=SPEC.model_id))))
    actions = [a for device in ("old7", "fresh") for a in core.handle(MessageReceived(
        now=2.0, topic=topics.device_topic("r1", device, "update"),
        payload=encode(Update(device=device, seq=6, model_id=SPEC.model_id, base_version=3, n_samples=2,
                              weights=np.ones(SPEC.size, np.float32)))))]
    (commit,) = [a for a in actions if isinstance(a, CommitVersion)]
    assert dict(commit.applied_changed) == {"old7": 6, "fresh": 6} and commit.devices_added == ("fresh",)
    assert "devices_seen" not in commit.metadata and "applied_upto" not in commit.metadata
    assert core.applied_upto["old9"] == 5 and len(core.devices_seen) == 10_001


def test_watermarks_survive_restarts_across_many_small_commits_checkpoints_and_a_failed_fsync(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno
    import os
    import shutil

    import coordinator.registry as registry_module

    reg = Registry(tmp_path, SPEC, keep_versions=100)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    applied: dict[str, int] = {}
    seen: list[str] = []
    at: dict[int, tuple[dict[str, int], list[str]]] = {}
    v = failed = 0
    n = 3 * registry_module.CHECKPOINT_EVERY + 5
    for step in range(n):
        v += 1
        changed = {f"d{(step * 7 + j) % 50}": step for j in range(2)}
        added = tuple(d for d in changed if d not in seen)
        reg.stage([upd(d, s, 0.5) for d, s in changed.items()])
        _commit(reg, v, changed, added)
        applied.update(changed)
        seen.extend(added)
        at[v] = (dict(applied), list(seen))
        if step == 20:  # a restart in the middle: the next commit is a base again
            reg.close()
            reg = Registry(tmp_path, SPEC, keep_versions=100)
            snap = reg.load()
            assert snap is not None and (snap.version, dict(snap.applied_upto), list(snap.devices_seen)) == (v, applied, seen)
        if step == 30:  # a batch whose fsync fails: its version and watermarks never happened
            reg.stage([upd("gone", 1, 0.5)])
            reg.stage_version(CommitVersion(version=v + 1, weights=np.ones(SPEC.size, np.float32), applied_changed={"gone": 1},
                                            consumed=(("gone", 1),), metadata={}, devices_added=("gone",)))

            def eio(fd: int) -> None:
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(os, "fsync", eio)
            with pytest.raises(OSError):
                reg.flush()
            monkeypatch.undo()
            v += 1  # burnt; the registry goes on without a reload
            failed = v
    metas = [json_meta(reg, version) for version in range(1, v + 1) if version in reg.versions()]
    assert sum("parent" in m for m in metas) > len(metas) // 2  # most versions carry only their changes
    assert any("parent" not in m for m in metas)  # and every so often a base (a checkpoint)
    assert reg._durable_version > failed  # checkpointed since the failure
    reg.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and (snap.version, dict(snap.applied_upto), list(snap.devices_seen)) == (v, applied, seen)
    assert "gone" not in snap.applied_upto and not snap.buffer
    # without the log (all applied, checkpointed, or lost): the directories alone chain back to a base
    shutil.rmtree(reg.pending_dir)
    again = Registry(tmp_path, SPEC)
    snap = again.load()
    assert snap is not None and (snap.version, dict(snap.applied_upto), list(snap.devices_seen)) == (v, applied, seen)
    for version in (5, 21, 22, 40):  # any kept version's cumulative maps, as they were then
        meta = again.read_version(version)[1]
        assert (meta["applied_upto"], meta["devices_seen"]) == at[version], version


def json_meta(reg: Registry, version: int) -> dict[str, object]:
    import json

    meta = json.loads((reg.versions_dir / f"{version:09d}" / "meta.json").read_bytes())
    assert isinstance(meta, dict)
    return meta


def test_pruning_keeps_each_kept_versions_chain_back_to_its_base(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC, keep_versions=4)  # a base every 4 versions
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    expected: dict[int, dict[str, int]] = {}
    applied: dict[str, int] = {}
    for v in range(1, 31):
        applied[f"d{v % 9}"] = v
        _commit(reg, v, {f"d{v % 9}": v})
        expected[v] = dict(applied)
    kept = reg.versions()
    assert 4 <= len(kept) < 4 + 4 + 4 and kept[-1] == 30
    assert "parent" not in json_meta(reg, kept[0])  # the oldest kept is a base
    for v in kept:
        assert reg.read_version(v)[1]["applied_upto"] == expected[v]


# ---------------------------------------------------------------------- group-commit costs


def test_updates_a_version_applies_in_the_same_write_are_not_logged_and_restore_is_unchanged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC, keep_versions=100)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("warm", 1, 0.5)])  # the segment exists
    # one batch: a1, b1, a2 accepted; a version consumes a1 and b1 (a2 arrived after the trigger)
    reg.stage([upd("a", 1, 1.0), upd("b", 1, 2.0), upd("a", 2, 3.0)])
    action = CommitVersion(version=1, weights=np.full(SPEC.size, 5.0, np.float32), applied_changed={"a": 1, "b": 1},
                           consumed=(("a", 1), ("b", 1)), metadata={}, devices_added=("a", "b"))
    reg.stage_version(action)
    reg.append_updates([upd("c", 1, 4.0)])  # the end of the batch: one fsync for all of it
    # a2 and c1 are in the log, a1 and b1 are not (the version record carries their watermarks)
    assert [u.key for u in Registry(tmp_path, SPEC).pending()] == [("warm", 1), ("a", 2), ("c", 1)]
    snap = Registry(tmp_path, SPEC).load()  # a crash before the commit's directory: the log alone
    assert snap is not None and snap.version == 1 and dict(snap.applied_upto) == {"a": 1, "b": 1}
    assert [u.key for u in snap.buffer] == [("warm", 1), ("a", 2), ("c", 1)]
    np.testing.assert_array_equal(snap.weights, 5.0)
    reg.commit(action)
    again = Registry(tmp_path, SPEC).load()
    assert again is not None and (again.version, [u.key for u in again.buffer]) == (1, [("warm", 1), ("a", 2), ("c", 1)])


def test_with_a_pruning_thread_checkpoints_are_fsynced_off_the_committing_thread(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os
    import threading
    import time

    import coordinator.registry as registry_module

    reg = Registry(tmp_path, SPEC, keep_versions=100, background_prune=True)
    reg.acquire_lock()
    n = registry_module.CHECKPOINT_EVERY
    try:
        reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
        for v in range(1, n):  # versions 1 .. n-1 (not bases) in the first segment
            reg.stage([upd("a", v, float(v))])
            _commit(reg, v, {"a": v})
        reg._close_segment()  # rotated: that segment may go once a newer base is checkpointed
        mine: list[int] = []
        theirs: list[str] = []  # what other threads fsynced: the pruning thread's checkpoint
        real = os.fsync
        me = threading.get_ident()

        def fsync(fd: int) -> None:
            if threading.get_ident() == me:
                mine.append(fd)
            else:
                theirs.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        reg.stage([upd("a", n, float(n))])
        _commit(reg, n, {"a": n})  # a base
        assert len(mine) == 3  # the new segment (file, directory) and the log: no checkpoint fsync here
        deadline = time.monotonic() + 10
        while reg._checkpoint_done < n and time.monotonic() < deadline:  # (its completion flag: only to wait on)
            time.sleep(0.01)
        assert str(reg.versions_dir / f"{n:09d}") in theirs, theirs  # the base's directory, on the pruning thread
        assert len(list(reg.pending_dir.glob("*.log"))) == 2
        _commit(reg, n + 1, {"a": n})  # picks the checkpoint up: the first segment goes
        assert reg._durable_version == n and len(list(reg.pending_dir.glob("*.log"))) == 1
        monkeypatch.setattr(os, "fsync", real)
    finally:
        reg.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == n + 1 and dict(snap.applied_upto) == {"a": n} and not snap.buffer


def test_a_locked_registry_claims_without_a_stat_and_still_refuses_numbers_on_disk(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    old = Registry(tmp_path, SPEC)
    old.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    old.write_version(3, np.ones(SPEC.size, np.float32), {"applied_upto": {}})  # left by an earlier process
    reg = Registry(tmp_path, SPEC)
    reg.acquire_lock()
    try:
        for v in (0, 3):
            with pytest.raises(RegistryError, match="already exists"):
                reg.write_version(v, np.ones(SPEC.size, np.float32), {})
        real = os.path.exists
        looked: list[str] = []
        monkeypatch.setattr(os.path, "exists", lambda p: (looked.append(str(p)), real(p))[1])
        _commit(reg, 4, {"a": 1})
        _commit(reg, 5, {"a": 2})
        assert not [p for p in looked if p.startswith(str(reg.versions_dir))]
        monkeypatch.setattr(os.path, "exists", real)
        with pytest.raises(RegistryError, match="already exists"):
            reg.write_version(5, np.ones(SPEC.size, np.float32), {})
    finally:
        reg.close()
    assert Registry(tmp_path, SPEC).versions() == [0, 3, 4, 5]


def test_pruning_lists_the_versions_once_per_step_not_on_every_commit(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC, keep_versions=8)  # prune in steps of 2 above 8
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    listings: list[int] = []
    real = reg.versions
    monkeypatch.setattr(reg, "versions", lambda: (listings.append(1), real())[1])
    for v in range(1, 61):
        _commit(reg, v, {"a": v})
        assert len(real()) < 8 + 2 + 8  # never more than a step (and a chain back to a base) above
    assert len(listings) <= 60 // 2  # was one listing (a stat per version) per commit
    kept = real()
    assert kept[-1] == 60 and 8 <= len(kept) < 8 + 2 + 8
    assert "parent" not in json_meta(reg, kept[0])  # the oldest kept is a base


def test_an_unreadable_release_falls_back_to_the_release_before_it_not_to_a_held_candidate(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """helper-98: the release's weights.npy truncated (media damage): the newest version, a
    candidate the gate *held*, became the release at the next start, bypassing the gate. The
    release before the unreadable one (promoted by the gate) is the release again, loudly."""
    reg = Registry(tmp_path, SPEC)
    reg.acquire_lock()
    try:
        reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
        for v in (1, 2, 3):
            reg.write_version(v, np.full(SPEC.size, v, np.float32), {"applied_upto": {"a": v}, "release": min(v, 2)})
        reg.record_release(1, False, {"action": "promote", "version": 1, "release": 1})
        reg.record_release(2, False, {"action": "promote", "version": 2, "release": 2})
        reg.record_release(2, False, {"action": "hold", "version": 3, "release": 2})
    finally:
        reg.close()
    weights = reg.versions_dir / f"{2:09d}" / "weights.npy"
    weights.write_bytes(weights.read_bytes()[:40])
    with caplog.at_level("WARNING", logger="edgeci.registry"):
        snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 3
    assert snap.release_version == 1  # before: 3, the held candidate
    assert snap.release_weights is not None
    np.testing.assert_array_equal(snap.release_weights, 1.0)
    assert any(r.startswith("release 2:") for r in snap.recovered_from)  # the status flag
    assert any("release before it, version 1" in r.getMessage() for r in caplog.records)


def test_an_unreadable_release_record_is_said_and_kept_aside(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """helper-98: a damaged release.json was read as {} without a word, and the next gate
    decision overwrote it: the history (and a pin) gone silently."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.write_version(1, np.full(SPEC.size, 1, np.float32), {"applied_upto": {"a": 1}, "release": 1})
    (tmp_path / "release.json").write_text("{garbage")
    again = Registry(tmp_path, SPEC)
    again.acquire_lock()
    try:
        with caplog.at_level("WARNING", logger="edgeci.registry"):
            snap = again.load()
    finally:
        again.close()
    assert snap is not None and snap.version == 1 and snap.release_version == 1
    assert "release.json: unreadable" in snap.recovered_from
    assert any("release.json is unreadable" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "release.json.unreadable").read_text() == "{garbage"


@pytest.mark.parametrize("text", ['{"release": "x"}', '{"release": 0, "history": 5}', '{"release": 0, "history": [3]}',
                                  '{"release": -2}', '{"release": true}', '{"release": 0, "pinned": "yes"}'])
def test_a_release_record_with_fields_of_the_wrong_type_is_unreadable_too(tmp_path, caplog, text) -> None:  # type: ignore[no-untyped-def]
    """helper-116: an object whose fields are not what record_release writes stopped every start
    (load: int('x') ValueError, list(5) TypeError; the core: dict(3)). Said and kept aside, as a
    release.json that is not an object; the next gate decision writes it afresh."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.write_version(1, np.full(SPEC.size, 1, np.float32), {"applied_upto": {"a": 1}, "release": 1})
    (tmp_path / "release.json").write_text(text)
    again = Registry(tmp_path, SPEC)
    again.acquire_lock()
    try:
        with caplog.at_level("WARNING", logger="edgeci.registry"):
            snap = again.load()
        assert snap is not None and snap.version == 1 and snap.release_version == 1 and snap.gate_history == []
        assert "release.json: unreadable" in snap.recovered_from
        assert (tmp_path / "release.json.unreadable").read_text() == text
        again.record_release(1, False, {"action": "operator"})
        assert json.loads((tmp_path / "release.json").read_text())["history"] == [{"action": "operator"}]
    finally:
        again.close()


@pytest.mark.parametrize("damage", ["{not json", b"\xff\xfe", "dir"])
def test_an_unreadable_spec_file_is_a_registry_error(tmp_path, damage) -> None:  # type: ignore[no-untyped-def]
    """helper-116: a damaged spec.json raised a bare JSONDecodeError, UnicodeDecodeError or
    IsADirectoryError out of Registry(); now the registry's own error, naming the file."""
    Registry(tmp_path, SPEC)
    spec = tmp_path / "spec.json"
    if damage == "dir":
        spec.unlink()
        spec.mkdir()
    elif isinstance(damage, bytes):
        spec.write_bytes(damage)
    else:
        spec.write_text(damage)
    with pytest.raises(RegistryError, match=r"spec\.json is unreadable"):
        Registry(tmp_path, SPEC)


def test_a_release_recorded_after_its_log_segment_went_survives_a_power_cut(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The gate may promote a candidate long after it was committed (a canary round): by then a
    later base was checkpointed and the log segment holding the candidate deleted, while its own
    directory was written without fsync. ``record_release`` must make it durable. Power cut
    simulated: every file under versions/ that was never fsynced loses its data."""
    import os

    synced: set[str] = set()
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    reg = Registry(tmp_path, SPEC, keep_versions=1000)
    reg.acquire_lock()
    try:
        reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
        n, x = 240, 200  # ~214 commits of digits fill a segment (16 MB); bases every 16 versions
        for v in range(1, n + 1):  # a gated coordinator: the release stays 0 until the gate promotes
            reg.append_updates([upd("a", v, float(v))])  # acknowledged after this fsync
            reg.commit(CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed={"a": v},
                                     consumed=(("a", v),), metadata={"created_at": float(v), "release": 0}))
        weights = str(reg.versions_dir / f"{x:09d}" / "weights.npy")
        assert weights not in synced  # written without fsync: its log record was the durable copy
        reg.record_release(x, False, {"action": "promote", "version": x})
        assert weights in synced
    finally:
        reg.close()
    monkeypatch.setattr(os, "fsync", real)
    for p in reg.versions_dir.rglob("*"):  # the power cut
        if p.is_file() and str(p) not in synced:
            p.write_bytes(b"")
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.release_version == x and snap.version == n
    assert np.array_equal(Registry(tmp_path, SPEC).read_version(x)[0], np.full(SPEC.size, x, np.float32))


# ---------------------------------------------------------------------- Spyker's age ledger: counts as changes

_LEDGER_CHILD = r"""
import sys
from tests.test_registry import _spyker_core, _spyker_update, _schedule
from coordinator.registry import Registry
reg = Registry(sys.argv[1], __import__("tests.helpers", fromlist=["SPEC"]).SPEC)
reg.acquire_lock()
core = _spyker_core(reg.load())
seqs = {}
for device in _schedule(10_000):
    _spyker_update(core, reg, device, seqs.get(device, 0))
    seqs[device] = seqs.get(device, 0) + 1
    print(core.version, flush=True)  # durable: the commit has returned
"""


def _spyker_core(snapshot: Any) -> Any:
    """A coordinator core with Spyker (strategy and peering, as the daemon builds them)."""
    import random

    from coordinator.core import CoordinatorConfig, CoordinatorCore
    from coordinator.methods import make_method

    method = make_method("spyker", coordinator_id="c1")
    return CoordinatorCore(CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC), method.strategy, snapshot,
                           rng=random.Random(0), peering=method.peering)


def _spyker_update(core: Any, reg: Registry, device: str, seq: int) -> None:
    """One update from ``device`` into the core (Spyker commits it at once), its actions done as the daemon does."""
    from coordinator.core import PersistUpdate
    from edge_sdk.core.events import MessageReceived
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import encode
    from edge_sdk.wire.messages import Update

    msg = Update(device=device, seq=seq, model_id="toy", base_version=core.version, n_samples=1,
                 weights=np.full(SPEC.size, 0.5, np.float32))
    actions = core.handle(MessageReceived(now=float(core.version), topic=topics.device_topic("r1", device, "update"), payload=encode(msg)))
    assert any(isinstance(a, CommitVersion) for a in actions)
    for a in actions:
        if isinstance(a, PersistUpdate):
            reg.stage([a.update])
        elif isinstance(a, CommitVersion):
            reg.commit(a)


def _schedule(n: int) -> list[str]:
    """Who sends the update of each version: 40 devices once each, then only three of them."""
    devices = [f"d{i:03d}" for i in range(40)]
    return (devices + [devices[i % 3] for i in range(n)])[:n]


def _ledger_state(core: Any) -> tuple[dict[str, int], float, dict[str, Any], float, float | None]:
    """The counts, what devices get from them, the model's age and the age of its version."""
    ledger = core.strategy.ledger
    return (dict(ledger.updates), ledger.mean_updates(), {d: core.strategy.lr_hint(d) for d in ("d000", "d039", "new")},
            ledger.age, ledger.age_at.get(core.version))


def _metas(reg: Registry) -> dict[int, tuple[int, dict[str, Any]]]:
    """meta.json of each version: (its size in bytes, its content)."""
    import json

    out = {}
    for v in reg.versions():
        raw = (reg.versions_dir / f"{v:09d}" / "meta.json").read_bytes()
        out[v] = (len(raw), json.loads(raw))
    return out


def test_spyker_commits_store_only_the_counts_they_change_and_restarts_restore_them_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """docs/security.md, Known gaps: every version's metadata held Spyker's whole age ledger (O(devices)).
    A commit now stores the counts it changed; a restart (a new registry on the state dir, which
    replays the changes from the last full map) gives the ledger back exactly, again and again."""
    reg = Registry(tmp_path, SPEC, keep_versions=100)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    core = _spyker_core(reg.load())
    schedule, seqs = _schedule(100), dict[str, int]()
    for device in schedule:
        _spyker_update(core, reg, device, seqs.get(device, 0))
        seqs[device] = seqs.get(device, 0) + 1
    want = _ledger_state(core)
    assert core.version == 100 and want[0]["d000"] == 21 and len(want[0]) == 40 and want[3:] == (100.0, 100.0)
    metas = _metas(reg)
    changes = [m["tallies_changed"] for _, m in metas.values() if "tallies_changed" in m]
    assert len(changes) > 80 and all(len(c) == 1 for c in changes)  # the one device each commit counted
    assert all("updates" not in m.get("peering", {}).get("ledger", {}) for _, m in metas.values())
    reg.close()
    for restart in range(3):
        reg = Registry(tmp_path, SPEC, keep_versions=100)
        core = _spyker_core(reg.load())
        assert _ledger_state(core) == want, f"restart {restart}"
        for device in ("d001", "d039", f"late{restart}", "d001")[: restart + 2]:  # a few more commits, then again
            _spyker_update(core, reg, device, seqs.get(device, 0))
            seqs[device] = seqs.get(device, 0) + 1
        want = _ledger_state(core)
        assert want[0] == {d: n for d, n in seqs.items()}
        reg.close()


def test_a_restart_resumes_spykers_model_age_with_its_last_aggregation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The checkpoint was taken before the strategy recorded the aggregation's age: a restart
    resumed the age one aggregation behind (4.0 after 5 updates) and without its version's."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    core = _spyker_core(reg.load())
    for i in range(5):
        _spyker_update(core, reg, f"d{i}", 0)
    reg.close()
    ledger = core.strategy.ledger
    assert (core.version, ledger.age, ledger.age_at[5]) == (5, 5.0, 5.0)
    restored = _spyker_core(Registry(tmp_path, SPEC).load()).strategy.ledger
    assert (restored.age, restored.age_at.get(5)) == (5.0, 5.0)


def test_an_old_state_dir_with_the_whole_ledger_in_its_metadata_still_restores(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Older releases kept the counts inside the peering's checkpoint: restored from there, and
    the first commit after stores them all (a base), later ones only what they change."""
    counts = {f"dev{i:05d}": 1 + i % 7 for i in range(500)}
    old_ledger = {"ledger": {"age": 12.0, "age_at": {"0": 12.0}, "updates": counts}, "age_prev": 12.0, "known": None,
                  "accepted": None, "answered": None, "merged": {}, "regenerations": 0, "syncs_started": 0}
    reg = Registry(tmp_path, SPEC, keep_versions=100)
    reg.write_version(0, np.zeros(SPEC.size, np.float32), {"applied_upto": {}, "devices_seen": [], "peering": old_ledger,
                                                           "peering_name": "spyker"})
    reg.close()
    reg = Registry(tmp_path, SPEC, keep_versions=100)
    core = _spyker_core(reg.load())
    assert core.strategy.ledger.updates == counts and core.strategy.ledger.age == 12.0
    first = {**counts, "dev00000": counts["dev00000"] + 1}  # the first commit counts dev00000
    for i in range(20):
        device = f"dev{(37 * i) % 500:05d}"
        _spyker_update(core, reg, device, i)
        counts[device] += 1
    assert core.strategy.ledger.updates == counts
    metas = _metas(reg)
    assert "parent" not in metas[1][1] and metas[1][1]["tallies"] == first
    assert all(len(m["tallies_changed"]) == 1 for _, m in list(metas.values())[2:] if "parent" in m)
    reg.close()
    reg = Registry(tmp_path, SPEC, keep_versions=100)
    assert _spyker_core(reg.load()).strategy.ledger.updates == counts
    reg.close()


def test_with_8000_devices_in_the_ledger_a_commit_that_counts_one_stores_one_count(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """helper-111 measured 569 KB of metadata a version with 8,000 devices in Spyker's ledger
    (~71 B a device, every commit). Now a commit holds the counts it changed: O(1) here; only
    the registry's bases (every CHECKPOINT_EVERY versions, and the first after a start) hold them all."""
    from coordinator.registry import CHECKPOINT_EVERY

    counts = {f"dev{i:05d}": 1 + i % 7 for i in range(8000)}
    old_ledger = {"ledger": {"age": 12.0, "age_at": {"0": 12.0}, "updates": counts}, "age_prev": 12.0, "known": None,
                  "accepted": None, "answered": None, "merged": {}, "regenerations": 0, "syncs_started": 0}
    reg = Registry(tmp_path, SPEC, keep_versions=100)
    reg.write_version(0, np.zeros(SPEC.size, np.float32), {"applied_upto": {}, "devices_seen": [], "peering": old_ledger,
                                                           "peering_name": "spyker"})
    reg.close()
    reg = Registry(tmp_path, SPEC, keep_versions=100)
    core = _spyker_core(reg.load())
    n = 2 * CHECKPOINT_EVERY + 8
    for i in range(n):
        device = f"dev{(37 * i) % 8000:05d}"
        _spyker_update(core, reg, device, i)
        counts[device] += 1
    metas = _metas(reg)
    small = [size for size, m in metas.values() if "parent" in m]
    bases = [size for v, (size, m) in metas.items() if v > 0 and "parent" not in m]
    assert len(small) >= n - 3 and max(small) < 4096, (len(small), max(small))  # was ~570 KB each
    assert len(bases) == 3 and min(bases) > 8000 * 14  # the full map (`"dev00000": 1, `), every CHECKPOINT_EVERY versions
    assert all(list(m["tallies_changed"]) == [f"dev{(37 * (v - 1)) % 8000:05d}"] for v, (_, m) in metas.items() if "parent" in m)
    reg.close()
    reg = Registry(tmp_path, SPEC, keep_versions=100)
    assert _spyker_core(reg.load()).strategy.ledger.updates == counts
    reg.close()


def test_a_failed_fsync_takes_its_versions_counts_back_out_of_the_registry(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A version whose write was cut away (its fsync failed) changed no count: the next base holds the counts without it."""
    import errno
    import os

    from coordinator.peering.base import Tallies

    def version(v: int, tallies: Tallies) -> CommitVersion:
        return CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed={}, consumed=(), metadata={},
                             tallies=tallies)

    reg = Registry(tmp_path, SPEC, keep_versions=2)  # a base every 2 versions
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.commit(version(1, Tallies(changed={"a": 1, "b": 1}, whole=True)))
    reg.stage_version(version(2, Tallies(changed={"a": 2, "c": 1})))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    real = os.fsync
    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError):
        reg.flush()
    monkeypatch.setattr(os, "fsync", real)
    reg.commit(version(3, Tallies(changed={"b": 2})))
    meta = reg.read_version(3)[1]
    assert "parent" not in meta and meta["tallies"] == {"a": 1, "b": 2}
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 3 and snap.peer_tallies == {"a": 1, "b": 2}


def test_a_spyker_coordinator_killed_mid_commit_restores_the_ledger_of_its_last_durable_version(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of a process committing Spyker versions as fast as it can: the restart resumes the
    newest version in the log, at or above the last one it reported, with exactly the counts
    that version's commit held (version v counted the sender of every update up to v)."""
    import collections
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.close()
    reported = 0
    with subprocess.Popen([sys.executable, "-c", _LEDGER_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}) as child:
        try:
            assert child.stdout is not None
            for line in child.stdout:  # well past the first bases and chains
                reported = int(line)
                if reported >= 70:
                    break
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert reported >= 70
    reg = Registry(tmp_path, SPEC)
    core = _spyker_core(reg.load())
    assert core.version >= reported
    assert core.strategy.ledger.updates == dict(collections.Counter(_schedule(core.version)))
    reg.close()


# ---------------------------------------------------------------------- guards without a test (helper-116)
# Each test below fails with its guard removed from coordinator/registry.py (checked one at a time).


def test_keep_versions_below_one_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edge_sdk.errors import ConfigError

    with pytest.raises(ConfigError, match="keep_versions"):
        Registry(tmp_path, SPEC, keep_versions=0)


@pytest.mark.parametrize("damage", ["nan", "meta_list"])
def test_a_version_directory_with_nan_weights_or_a_non_object_meta_is_unreadable(tmp_path, damage) -> None:  # type: ignore[no-untyped-def]
    """Bit rot that still parses: NaN weights (an .npy that loads) or a meta.json that is JSON but
    not an object. The newest version is skipped, the one before served, its number never reused."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.write_version(1, np.full(SPEC.size, 1, np.float32), {"applied_upto": {"a": 1}})
    d = reg.versions_dir / f"{1:09d}"
    if damage == "nan":
        np.save(d / "weights.npy", np.full(SPEC.size, np.nan, np.float32))
    else:
        (d / "meta.json").write_text("[1]")
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 0 and snap.version_floor == 1
    assert snap.recovered_from and snap.recovered_from[0].startswith("1:")
    assert np.isfinite(snap.weights).all()
    with pytest.raises(RegistryError, match="unreadable"):
        Registry(tmp_path, SPEC).read_version(1)


def test_a_version_whose_directory_fsync_fails_after_the_rename_is_not_left_to_be_served(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import coordinator.registry as registry

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    real = registry._fsync_dir

    def failing(path):  # type: ignore[no-untyped-def]
        if str(path) == str(reg.versions_dir):
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(registry, "_fsync_dir", failing)
    with pytest.raises(OSError):
        reg.write_version(1, np.ones(SPEC.size, np.float32), {"applied_upto": {}})
    monkeypatch.setattr(registry, "_fsync_dir", real)
    assert reg.versions() == [0] and not list(reg.versions_dir.glob(".v*"))
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 0


def test_a_temp_directory_left_by_a_crash_does_not_block_that_version(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    (reg.versions_dir / ".v1.tmp").mkdir()
    (reg.versions_dir / ".v1.tmp" / "weights.npy").write_bytes(b"half")
    reg.write_version(1, np.ones(SPEC.size, np.float32), {"applied_upto": {}})
    assert reg.versions() == [0, 1] and not list(reg.versions_dir.glob(".v*"))
    np.testing.assert_array_equal(reg.read_version(1)[0], 1.0)


def test_initialise_refuses_a_state_dir_that_holds_versions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    with pytest.raises(RegistryError, match="already holds versions"):
        Registry(tmp_path, SPEC).initialise(np.ones(SPEC.size, np.float32), now=1.0, source="again")
    np.testing.assert_array_equal(Registry(tmp_path, SPEC).read_version(0)[0], 0.0)


def test_renew_epoch_needs_the_lock_and_stops_at_the_largest_epoch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from coordinator.registry import MAX_EPOCH, read_epoch

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    before = read_epoch(tmp_path)
    with pytest.raises(RegistryError, match="must be locked"):
        reg.renew_epoch()
    reg.acquire_lock()
    try:
        with pytest.raises(RegistryError, match="no epoch is left"):
            reg.renew_epoch(above=MAX_EPOCH)
        assert read_epoch(tmp_path) == before
        old, new = reg.renew_epoch()
        assert old == before and new > old and read_epoch(tmp_path) == new
    finally:
        reg.close()


@pytest.mark.parametrize("text", ["0", str(2**63), "-5", "12abc", ""])
def test_an_epoch_file_out_of_range_is_no_epoch(tmp_path, text) -> None:  # type: ignore[no-untyped-def]
    from coordinator.registry import read_epoch

    (tmp_path / "epoch").write_text(text + "\n")
    assert read_epoch(tmp_path) is None


def _one_commit(version: int, applied: dict[str, int]) -> CommitVersion:
    return CommitVersion(version=version, weights=np.full(SPEC.size, float(version), np.float32), applied_changed=applied,
                         consumed=tuple(applied.items()), metadata={})


def test_a_segment_without_the_magic_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    (reg.pending_dir / f"{7:012d}.log").write_bytes(b"NOTALOG\n" + encode_record(upd("a", 1, 1.0)))
    with pytest.raises(RegistryError, match="not an edgeci pending-update log"):
        Registry(tmp_path, SPEC).load()


def test_a_record_whose_weights_changed_on_disk_fails_its_checksum(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A flipped bit in a record's tensor bytes still decodes (msgpack does not notice): only the
    crc32 does. The record is dropped, never read back with other weights."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 1, 1.0), upd("a", 2, 2.0)])
    (segment,) = sorted(reg.pending_dir.glob("*.log"))
    data = bytearray(segment.read_bytes())
    data[-2] ^= 0x01  # inside the last float of the last record: 2.0 -> another finite value
    segment.write_bytes(bytes(data))
    pending = Registry(tmp_path, SPEC).pending()
    assert [u.key for u in pending] == [("a", 1)]
    np.testing.assert_array_equal(pending[0].weights, 1.0)


def test_a_record_longer_than_the_cap_ends_the_segment(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import coordinator.registry as registry

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 1, 1.0)])
    assert [u.key for u in Registry(tmp_path, SPEC).pending()] == [("a", 1)]
    monkeypatch.setattr(registry, "_MAX_RECORD", 100)  # (1 GiB: a length beyond it is garbage, not a record)
    assert Registry(tmp_path, SPEC).pending() == []


def test_a_record_of_an_unknown_kind_never_becomes_a_version(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A checksummed record with ``kind`` other than ``version`` (a later release's, or forged into
    the log) is a bad record, skipped; it carried a version's fields, and was served as version 7."""
    import msgpack

    from coordinator.registry import _record
    from edge_sdk.wire.codec import encode_tensor

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 1, 1.0)])
    body = msgpack.packb({"kind": "snapshot", "version": 7, "meta": b'{"version": 7, "applied_upto": {}}',
                          "weights": encode_tensor(np.full(SPEC.size, 7.0, np.float32), "f4")}, use_bin_type=True)
    (segment,) = sorted(reg.pending_dir.glob("*.log"))
    with open(segment, "ab") as f:
        f.write(_record(body) + encode_record(upd("a", 2, 2.0)))
    owner = Registry(tmp_path, SPEC)
    owner.acquire_lock()
    try:
        snap = owner.load()
        assert snap is not None and snap.version == 0 and owner.corrupt_records == 1
        assert [u.key for u in snap.buffer] == [("a", 1), ("a", 2)]
    finally:
        owner.close()


def test_a_failed_append_takes_back_the_unsynced_versions_watermarks(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """stage_version appends without fsync; a later append that fails cuts the file back to its last
    fsync, that version's record with it: its watermarks must go from memory too."""
    import errno
    import os

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.commit(_one_commit(1, {"a": 1}))
    reg.stage_version(_one_commit(2, {"b": 5}))
    assert reg.watermarks()[0] == {"a": 1, "b": 5}

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError):
        reg.append_updates([upd("c", 1, 3.0)])
    monkeypatch.undo()
    assert reg.watermarks()[0] == {"a": 1}
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 1 and dict(snap.applied_upto) == {"a": 1}


def test_a_failed_flush_cuts_the_unsynced_version_out_of_the_log(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The fsync of a staged version fails: the version was never durable nor published; a restart
    must not find its record in the log (the bytes may well have reached the page cache)."""
    import errno
    import os

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.commit(_one_commit(1, {"a": 1}))
    reg.stage_version(_one_commit(2, {"a": 2}))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError):
        reg.flush()
    monkeypatch.undo()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 1 and dict(snap.applied_upto) == {"a": 1}


def test_a_segment_whose_creation_fails_is_not_left_behind(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno
    import os

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    assert not list(reg.pending_dir.glob("*.log"))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError):
        reg.append_updates([upd("a", 1, 1.0)])
    monkeypatch.undo()
    assert not list(reg.pending_dir.glob("*.log"))
    reg.append_updates([upd("a", 1, 1.0)])
    assert [u.key for u in Registry(tmp_path, SPEC).pending()] == [("a", 1)]


def test_a_version_naming_itself_as_parent_is_unreadable_not_a_hang(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.write_version(1, np.ones(SPEC.size, np.float32), {"applied_upto": {"a": 1}})
    meta = reg.versions_dir / f"{1:09d}" / "meta.json"
    meta.write_text(json.dumps({"version": 1, "parent": 1, "applied_changed": {"a": 1}, "devices_added": []}))
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 0 and snap.recovered_from[0].startswith("1:")


def test_a_segment_cut_short_at_its_creation_is_removed_by_the_lock_holder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    stub = reg.pending_dir / f"{3:012d}.log"
    stub.write_bytes(b"EDG")  # a crash while writing the magic
    assert Registry(tmp_path, SPEC).pending() == [] and stub.exists()  # a reader without the lock leaves it
    owner = Registry(tmp_path, SPEC)
    owner.acquire_lock()
    try:
        assert owner.load() is not None and not stub.exists()
    finally:
        owner.close()


def test_a_segment_with_an_update_not_yet_applied_is_kept_after_a_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An accepted (acknowledged) update that no version applied yet lives only in its segment:
    however many checkpoints follow, that segment stays until the update is applied."""
    reg = Registry(tmp_path, SPEC, keep_versions=1)  # every version a base, checkpointed at its commit
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 1, 1.0), upd("b", 1, 1.0)])
    reg._close_segment()  # as after a rotation
    reg.append_updates([upd("a", 2, 2.0)])
    for v in (1, 2):
        reg.commit(_one_commit(v, {"a": v}))
    assert reg._durable_version == 2
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 2 and [u.key for u in snap.buffer] == [("b", 1)]


def test_pruning_never_deletes_the_release(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC, keep_versions=2)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.commit(_one_commit(1, {}))
    reg.record_release(1, True, {"action": "pin"})
    for v in range(2, 12):
        reg.commit(_one_commit(v, {}))
    assert 1 in reg.versions() and 0 not in reg.versions() and reg.versions()[-1] == 11
    np.testing.assert_array_equal(Registry(tmp_path, SPEC).read_version(1)[0], 1.0)  # devices predict with it


def test_the_lock_holder_removes_a_crashs_temp_version_directories(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    (reg.versions_dir / ".v9.tmp").mkdir()
    (reg.versions_dir / ".v9.tmp" / "weights.npy").write_bytes(bytes(1000))
    Registry(tmp_path, SPEC).load()
    assert (reg.versions_dir / ".v9.tmp").exists()  # a reader without the lock leaves it
    owner = Registry(tmp_path, SPEC)
    owner.acquire_lock()
    try:
        owner.load()
        assert not list(reg.versions_dir.glob(".v*"))
    finally:
        owner.close()


def test_an_unreadable_pending_update_file_of_the_older_layout_is_a_registry_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    (reg.pending_dir / f"a.{1:020d}.upd").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(RegistryError, match=r"pending update .* is unreadable"):
        Registry(tmp_path, SPEC).load()


def test_a_version_record_whose_meta_is_not_an_object_is_skipped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import msgpack

    from coordinator.registry import _record
    from edge_sdk.wire.codec import encode_tensor

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 1, 1.0)])
    body = msgpack.packb({"kind": "version", "version": 1, "meta": b"[1, 2]",
                          "weights": encode_tensor(np.ones(SPEC.size, np.float32), "f4")}, use_bin_type=True)
    (segment,) = sorted(reg.pending_dir.glob("*.log"))
    with open(segment, "ab") as f:
        f.write(_record(body))
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 0 and snap.recovered_from[0].startswith("1:")


def test_a_state_dir_that_is_a_file_or_cannot_be_made_is_a_registry_error(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryError, match="not a directory"):
        Registry(tmp_path / "file", SPEC)
    with pytest.raises(RegistryError, match="not a directory"):
        Registry(tmp_path / "file" / "sub", SPEC)

    def denied(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")  # (the tests run as root: chmod would not stop them)

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(RegistryError, match="not writable"):
        Registry(tmp_path / "new", SPEC)


@pytest.mark.parametrize("meta", [{"parent": "x"}, {"parent": 0, "applied_changed": [1, 2]}, {"parent": 0, "devices_added": 5}])
def test_bad_watermarks_in_a_versions_chain_make_it_unreadable(tmp_path, meta) -> None:  # type: ignore[no-untyped-def]
    import json

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.write_version(1, np.ones(SPEC.size, np.float32), {"applied_upto": {"a": 1}})
    (reg.versions_dir / f"{1:09d}" / "meta.json").write_text(json.dumps({"version": 1, **meta}))
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 0 and snap.recovered_from[0].startswith("1:")


def test_an_unreadable_parent_makes_its_children_unreadable_not_a_crash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.write_version(1, np.ones(SPEC.size, np.float32), {"applied_upto": {"a": 1}})
    reg.write_version(2, np.full(SPEC.size, 2.0, np.float32), {"parent": 1, "applied_changed": {"a": 2}, "devices_added": []})
    (reg.versions_dir / f"{1:09d}" / "meta.json").write_text("{not json")
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 0 and snap.version_floor == 2 and len(snap.recovered_from) == 2
    assert json.loads((reg.versions_dir / f"{2:09d}" / "meta.json").read_text())["parent"] == 1


def test_a_lock_file_that_cannot_be_opened_is_a_registry_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path, SPEC)
    (tmp_path / "lock").mkdir()
    with pytest.raises(RegistryError, match="cannot open"):
        reg.acquire_lock()
    assert not reg.locked


def test_the_pruning_thread_never_deletes_a_version_while_it_is_read(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """helper-146: the daemon's pruning thread deleted the oldest kept version while the actor read
    it (an operator's rollback or pin of it): "version 1 is unreadable: ... weights.npy: No such
    file", 31 times in 600 commits of a stress probe. The read now holds the pruning back."""
    import threading

    import coordinator.registry as registry_module

    reg = Registry(tmp_path, SPEC, keep_versions=2, background_prune=True)
    reg.acquire_lock()
    try:
        reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
        monkeypatch.setattr(reg, "_prune", lambda: None)  # no pruning while the versions are made
        for v in (1, 2, 3):
            _commit(reg, v, {})
        monkeypatch.undo()
        assert reg.versions() == [0, 1, 2, 3]  # a prune deletes 1 now (0 is the checkpoint: kept)
        pruned = threading.Event()
        prune_now = reg._prune_now

        def prune_and_say() -> None:
            prune_now()
            pruned.set()

        monkeypatch.setattr(reg, "_prune_now", prune_and_say)
        real_load = registry_module.np.load

        def load_while_pruning(*args: Any, **kwargs: Any) -> Any:  # between meta.json and weights.npy
            reg._janitor_wake.set()
            pruned.wait(1.0)  # the old code: the pruning thread deletes version 1 here
            return real_load(*args, **kwargs)

        monkeypatch.setattr(registry_module.np, "load", load_while_pruning)
        weights, _ = reg.read_version(1)
        assert float(weights[0]) == 1.0
        monkeypatch.setattr(registry_module.np, "load", real_load)
        assert pruned.wait(10)  # and the prune ran once the read was done
        assert reg.versions() == [0, 2, 3]
    finally:
        reg.close()


# ------------------------------------------------------------------ the strategy's arrays (fa1c199)


def _with_arrays(v: int) -> CommitVersion:
    return CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed={}, consumed=(),
                         metadata={"created_at": float(v)}, arrays={"m": np.full(SPEC.size, v, np.float32)})


def test_two_versions_committed_in_one_batch_keep_the_heads_arrays(tmp_path: Any) -> None:
    """The daemon's group commit (daemon._perform / _finish_batch): every version of a batch is staged,
    the batch is fsynced once, then each held version's commit runs in order. The head's arrays must
    outlive the commit of the version before it (helper-174: commit(2) deleted arrays-3, commit(3)
    deleted arrays-2: none kept, the restart's NebulaFL planets / FedAdam moments started afresh)."""
    reg = Registry(tmp_path, SPEC)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.commit(_with_arrays(1))
    reg.stage_version(_with_arrays(2))
    reg.stage_version(_with_arrays(3))
    reg.flush()
    reg.commit(_with_arrays(2))
    reg.commit(_with_arrays(3))
    reg.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 3
    assert snap.strategy_arrays is not None, "the head's arrays were deleted by the commit of the version before it"
    np.testing.assert_array_equal(snap.strategy_arrays["m"], 3.0)


def test_a_full_disk_while_the_arrays_are_written_leaves_no_temp_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC on the arrays' fsync: the commit raises OSError (the daemon's storage failure: nothing
    acknowledged), the version before is what a restart loads, with its arrays; and no partial temp
    file is left to keep the disk full (each failed commit left one, named after its version)."""
    import errno

    import coordinator.registry as registry_module

    reg = Registry(tmp_path, SPEC)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.commit(_with_arrays(1))
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".npz.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(registry_module.os, "fsync", full)
    for v in (2, 3):
        with pytest.raises(OSError, match="No space"):
            reg.commit(_with_arrays(v))
    monkeypatch.undo()
    reg.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 1 and snap.strategy_arrays is not None
    np.testing.assert_array_equal(snap.strategy_arrays["m"], 1.0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "temp files left by the failed writes"


def test_a_release_named_only_by_commit_metadata_is_never_pruned(tmp_path: Any) -> None:
    """An ungated HFedMS: version 1 is the round's model, the release; versions 2.. are its chain
    steps, each naming 1 as the release in its metadata (release.json holds nothing: no gate, no
    operator). helper-174: after 119 steps version 1 was pruned and a restart said "RECOVERY: the
    release (version 1) is unreadable ... version 119, the training line, is the release": a chain
    step, what 9c1b307 took out of the release."""
    reg = Registry(tmp_path, SPEC, keep_versions=20)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for v in range(1, 120):
        reg.commit(CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed={}, consumed=(),
                                 metadata={"created_at": float(v), "release": 1, "pinned": False}))
    kept = reg.versions()
    reg.close()
    assert 1 in kept
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 119
    assert snap.release_version == 1 and snap.recovered_from == ()


def test_a_release_named_only_by_commit_metadata_stays_durable(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release must survive a power cut as a directory (record_release fsyncs it): its log record
    may be deleted once a base after it is checkpointed. Version 3, the release that the commits'
    metadata names, had neither (helper-174: directory never fsynced, record gone after 39 commits)."""
    import coordinator.registry as registry_module

    monkeypatch.setattr(registry_module, "SEGMENT_BYTES", 4096)  # segments roll (and go) within a few versions
    fsynced: set[str] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsynced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(registry_module.os, "fsync", fsync)
    reg = Registry(tmp_path, SPEC, keep_versions=20)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for v in range(1, 40):
        reg.commit(CommitVersion(version=v, weights=np.full(SPEC.size, v, np.float32), applied_changed={}, consumed=(),
                                 metadata={"created_at": float(v), "release": 3, "pinned": False}))
    reg.close()
    _, records = Registry(tmp_path, SPEC)._scan_log()
    synced = str(tmp_path / "versions" / f"{3:09d}" / "weights.npy") in fsynced
    assert synced or 3 in records, f"release 3: directory not fsynced, log record gone (the log holds {sorted(records)})"


def test_a_crash_mid_write_of_the_strategy_arrays_leaves_no_temp_file_after_the_next_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A crash while the arrays were being written leaves a model-sized ``.tmp`` beside the state
    dir's files; the next locked start removes it (an unlocked reader leaves it alone)."""
    Registry(tmp_path, SPEC).initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    left = tmp_path / ".strategy-arrays-000000001.npz.tmp"
    left.write_bytes(b"\0" * 4096)
    assert Registry(tmp_path, SPEC).load() is not None and left.exists()
    reg = Registry(tmp_path, SPEC)
    reg.acquire_lock()
    try:
        assert reg.load() is not None
        assert not left.exists()
    finally:
        reg.close()


def test_a_version_committed_without_arrays_drops_the_older_ones(tmp_path: Any) -> None:
    """A state dir restarted under another strategy (FedAdam, then FedAvg): the FedAdam arrays are of
    no use once a later version is durable, and a model-sized file should not stay for ever."""
    reg = Registry(tmp_path, SPEC)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.commit(_with_arrays(1))
    assert [p.name for p in tmp_path.glob("strategy-arrays-*.npz")] == ["strategy-arrays-000000001.npz"]
    reg.commit(CommitVersion(version=2, weights=np.full(SPEC.size, 2, np.float32), applied_changed={}, consumed=(),
                             metadata={"created_at": 2.0}))
    reg.close()
    assert not list(tmp_path.glob("strategy-arrays-*.npz"))
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 2 and snap.strategy_arrays is None
