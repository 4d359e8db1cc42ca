"""Behaviours of the coordinator's durable registry that no test checked (helper-185's mutation audit).

Each test here kills a mutant of coordinator/registry.py that survived every test covering the
file; the docstrings name it (file:line at the audit's base commit ac73730, and the mutation)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from coordinator.core import CommitVersion
from coordinator.registry import Registry
from tests.helpers import SPEC
from tests.test_registry import upd


def _commit(reg: Registry, version: int) -> None:
    reg.commit(CommitVersion(version=version, weights=np.full(SPEC.size, version, np.float32), applied_changed={},
                             consumed=(), metadata={}))


def _journal(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (by the path of its descriptor) and rename, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _restarted(reg: Registry) -> tuple[int, list[tuple[str, int]]]:
    """Close ``reg``; what a new process loads from its state dir: the version and the pending updates."""
    reg.close()
    snap = Registry(reg.root, SPEC).load()
    assert snap is not None
    return snap.version, [u.key for u in snap.buffer]


def test_a_durably_written_version_fsyncs_its_files_before_its_directory_is_renamed_into_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.py:293 ``os.fsync(fd)`` deleted (in ``_write_file``): version 0 (``initialise``), a
    version restored from the log and every ``write_version`` were renamed into place with their
    weights and metadata still in the page cache: a power cut then left a directory that names
    the version with torn or empty files, and nothing else holds version 0."""
    reg = Registry(tmp_path, SPEC)
    events = _journal(monkeypatch)
    reg.initialise(np.ones(SPEC.size, np.float32), now=0.0, source="test")
    final = str(reg.versions_dir / f"{0:09d}")
    renamed = events.index(("rename", final))
    synced = {Path(p).name for kind, p in events[:renamed] if kind == "fsync"}
    assert {"weights.npy", "meta.json"} <= synced, events


def test_version_files_are_readable_by_the_coordinator_that_wrote_them(tmp_path: Path) -> None:
    """registry.py:286 mode ``0o644`` -> ``0`` (in ``_write_file``): every version's weights and
    metadata were created with no permissions at all. The suite runs as root, which reads them
    anyway; a coordinator running as its own user (the systemd unit's) could not read back a single
    version at its next start."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.ones(SPEC.size, np.float32), now=0.0, source="test")
    _commit(reg, 1)
    for v in (0, 1):
        for name in ("weights.npy", "meta.json"):
            mode = stat.S_IMODE((reg.versions_dir / f"{v:09d}" / name).stat().st_mode)
            assert mode & 0o600 == 0o600, f"version {v} {name}: mode {mode:o}"


def test_a_storage_probe_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.py:551 ``path.unlink(missing_ok=True)`` deleted (in ``probe``): the driver probes a
    failing disk with at least one model's size until it takes a write again; each probe then left
    that many bytes in the state dir, on the very disk that was full, also when the probe failed."""
    reg = Registry(tmp_path, SPEC)
    reg.probe(1 << 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pending", "spec.json", "versions"]

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        reg.probe(1 << 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pending", "spec.json", "versions"]


def test_a_numbered_directory_without_metadata_is_not_a_version(tmp_path: Path) -> None:
    """registry.py:561 ``p.name.isdigit() and (p / "meta.json").exists()`` -> ``or``: a version
    directory a crash left without its metadata was listed as the newest version (``latest``,
    ``edgeci versions``), though nothing can be read from it; the load goes on from version 1."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.ones(SPEC.size, np.float32), now=0.0, source="test")
    _commit(reg, 1)
    (reg.versions_dir / f"{2:09d}").mkdir()  # torn: nothing in it
    again = Registry(tmp_path, SPEC)
    assert again.versions() == [0, 1] and again.latest() == 1


def test_after_a_restart_pruning_still_deletes_the_versions_an_earlier_process_wrote(tmp_path: Path) -> None:
    """registry.py:742 ``not isinstance(meta, dict) or "parent" not in meta`` -> ``and`` (in
    ``_base_on_disk``): every version directory a restart had not written itself read as a chain
    step, so pruning walked its oldest kept version down to the first and deleted nothing: after a
    restart the state dir kept every older version (model-sized each) beyond ``keep_versions``."""
    reg = Registry(tmp_path, SPEC, keep_versions=3)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for v in (1, 2):
        reg.write_version(v, np.full(SPEC.size, v, np.float32), {"applied_upto": {}})
    reg.close()
    again = Registry(tmp_path, SPEC, keep_versions=3)
    assert again.load() is not None
    _commit(again, 3)
    assert again.versions() == [1, 2, 3]
    again.close()


def test_a_first_update_staged_with_a_version_that_does_not_apply_it_survives_a_restart(tmp_path: Path) -> None:
    """registry.py:887 ``applied.get(u.device, -1)`` -> ``-0`` (in ``stage_version``): a staged update
    of a device without a watermark was taken for applied at seq 0, so a device's first update
    (seq 0), acknowledged with the version committed in the same write, was never written: a
    restart lost it."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.stage([upd("new", 0, 1.0), upd("old", 3, 2.0)])
    reg.commit(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={"old": 3},
                             consumed=(("old", 3),), metadata={}, devices_added=("old",)))
    assert _restarted(reg) == (1, [("new", 0)])


def test_an_update_whose_applying_version_failed_its_fsync_is_kept_through_later_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.py:969 ``self._settle(old)`` deleted (in ``_rollback_state``), and registry.py:977
    ``self._applied.get(d, -1)`` -> ``-0`` (in ``_settle``): when the fsync of a version that applied
    an update failed, its watermark went back but the log segment holding the update still counted
    it as applied; the next checkpointed commit deleted that segment, and a restart had lost an
    update that was acknowledged (durable before the failed version was staged)."""
    reg = Registry(tmp_path, SPEC, keep_versions=1)  # every version a base: each commit checkpoints
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 0, 1.0)])  # durable: acknowledged
    reg.stage_version(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={"a": 0},
                                    consumed=(("a", 0),), metadata={}, devices_added=("a",)))
    real = os.fsync

    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError):
        reg.flush()
    monkeypatch.setattr(os, "fsync", real)
    _commit(reg, 2)  # a version that does not apply it
    assert _restarted(reg) == (2, [("a", 0)])


def test_an_older_layouts_first_update_of_a_device_survives_a_commit_that_does_not_apply_it(tmp_path: Path) -> None:
    """registry.py:1142 ``self._applied.get(device, -1)`` -> ``-0`` (in ``_drop_applied``): a state
    dir of the one-file-per-update layout (an older release's) lost a device's first update (seq 0,
    acknowledged before the upgrade) at the first commit after the upgrade, which took it for
    applied and deleted its file."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.persist_update_file(upd("old-layout", 0, 1.0))
    _commit(reg, 1)
    assert _restarted(reg) == (1, [("old-layout", 0)])


def test_the_end_of_a_batch_without_updates_still_makes_its_staged_version_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.py:1183 ``self.flush()`` deleted (``append_updates`` of nothing): the daemon ends
    every batch with ``append_updates(its log)`` ("also of staged versions"); a batch that staged a
    version and took no update left that version unsynced, its directory and acks to follow."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.stage_version(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={},
                                    consumed=(), metadata={}))
    assert reg.unflushed
    events = _journal(monkeypatch)
    reg.append_updates([])
    assert not reg.unflushed
    assert [p for kind, p in events if kind == "fsync" and p.endswith(".log")], events


def test_a_new_segment_is_started_only_after_the_unsynced_appends_of_the_last_one_are_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.py:1191 ``self.flush()`` deleted (in ``_append``, before a new segment): a version
    staged (appended, not fsynced) at the end of a full segment was never fsynced: the batch's one
    fsync went to the new segment, and the version and the updates it consumed were acknowledged
    from the page cache."""
    import coordinator.registry as registry_module
    monkeypatch.setattr(registry_module, "SEGMENT_BYTES", 1)  # every append starts a segment
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.stage_version(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={},
                                    consumed=(), metadata={}))
    (staged_in,) = {p for p in reg.pending_dir.glob("*.log")}
    events = _journal(monkeypatch)
    reg.append_updates([upd("a", 0, 1.0)])
    assert not reg.unflushed
    synced = [p for kind, p in events if kind == "fsync"]
    assert str(staged_in) in synced, events


def test_a_segment_holding_a_devices_later_update_is_kept_when_an_earlier_one_is_applied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.py:1216 ``if u.seq > keys.get(u.device, -1)`` negated (in ``_append``): a segment no
    longer knew the highest seq of each device it held, so a commit that applied a device's seq 0
    took the segment for applied, though it also held that device's seq 1; the next checkpoint
    deleted it, and a restart had lost seq 1 (acknowledged)."""
    import coordinator.registry as registry_module
    monkeypatch.setattr(registry_module, "SEGMENT_BYTES", 1)  # each append its own segment
    reg = Registry(tmp_path, SPEC, keep_versions=1)  # every version a base: each commit checkpoints
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 0, 1.0), upd("a", 1, 2.0)])
    reg.commit(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={"a": 0},
                             consumed=(("a", 0),), metadata={}, devices_added=("a",)))
    _commit(reg, 2)
    assert _restarted(reg) == (2, [("a", 1)])


def test_a_failed_append_is_cut_back_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.py:1227 ``os.fsync(fd)`` deleted (in ``_cut``): after a failed fsync the segment was
    truncated back to its last durable size but the truncation itself was not made durable, so a
    power cut could bring back the records of the failed batch, which were never acknowledged."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 0, 1.0)])
    (segment,) = reg.pending_dir.glob("*.log")
    durable = segment.stat().st_size
    sizes: list[int] = []
    real = os.fsync
    failed: list[bool] = []

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(segment):
            if not failed:
                failed.append(True)
                raise OSError(5, "Input/output error")
            sizes.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        reg.append_updates([upd("a", 1, 2.0)])
    assert sizes == [durable]  # the cut, fsynced
    monkeypatch.setattr(os, "fsync", real)
    assert _restarted(reg) == (0, [("a", 0)])


def test_a_restart_rewrites_a_torn_version_directory_from_its_log_record(tmp_path: Path) -> None:
    """registry.py:1352 ``self.read_version(version)`` deleted (in ``_repair``): a version directory
    that exists but was torn by a crash (written without fsync: the log held it) was taken as sound
    and left torn; the load itself read the log's copy, but once that segment was deleted the
    version was unreadable (a rollback to it, or the next restart, failed)."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    _commit(reg, 1)
    reg.close()
    weights = reg.versions_dir / f"{1:09d}" / "weights.npy"
    weights.write_bytes(weights.read_bytes()[:40])  # torn by a power cut
    again = Registry(tmp_path, SPEC)
    again.acquire_lock()
    try:
        snap = again.load()
        assert snap is not None and snap.version == 1 and not snap.recovered_from
        np.testing.assert_array_equal(np.load(weights), 1.0)  # put back from the log
    finally:
        again.close()


def test_an_update_in_the_log_twice_is_pending_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.py:1319 ``seen.add(u.key)`` deleted (in ``_scan_log``): an update the log held twice
    (appended again in a later segment) was handed to the restarted core twice, to be applied twice."""
    import coordinator.registry as registry_module
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.append_updates([upd("a", 4, 1.0)])
    saved = registry_module.SEGMENT_BYTES
    monkeypatch.setattr(registry_module, "SEGMENT_BYTES", 1)  # the next append: a new segment
    reg.append_updates([upd("a", 4, 1.0), upd("b", 0, 2.0)])
    monkeypatch.setattr(registry_module, "SEGMENT_BYTES", saved)
    assert len(list(reg.pending_dir.glob("*.log"))) == 2
    assert [u.key for u in reg.pending()] == [("a", 4), ("b", 0)]
    assert _restarted(reg) == (0, [("a", 4), ("b", 0)])


@pytest.mark.parametrize(("metadata", "rejected"), [
    ({"source": "rollback", "rejected": 4}, (4, 0)),  # (the rejected version, the one before the rollback)
    ({"source": "rollback", "of": 0, "recovered": True}, ()),  # the core's recovery rollback without a lineage
    ({"source": "gate", "rejected": 4}, ()),
])
def test_only_a_rollback_that_names_its_rejected_version_restores_a_rejection(
        tmp_path: Path, metadata: dict[str, object], rejected: tuple[int, ...]) -> None:
    """registry.py:1497 ``meta.get("source") == "rollback" and type(meta.get("rejected")) is int``
    -> ``or``: a restart whose newest version was the core's recovery rollback without a rejected
    lineage (core.py ``_leave_abandoned_line``) failed with a KeyError on ``meta["rejected"]``,
    and any other commit whose metadata held an int ``rejected`` was restored as a rejection."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.commit(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={},
                             consumed=(), metadata=metadata))
    reg.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 1 and snap.rejected == rejected


def test_an_unreadable_release_falls_back_past_history_entries_without_a_release(tmp_path: Path) -> None:
    """registry.py:1445 ``isinstance(e, dict) and isinstance(e.get("release"), int) and ...`` -> ``or``:
    when the release's directory was unreadable, the search for the release before it read
    ``e["release"]`` of every history entry; one without it (release.json damaged or edited: its
    entries are only checked to be objects) made the restart fail with a KeyError instead of
    falling back to the release before."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for v in (1, 2):
        reg.write_version(v, np.full(SPEC.size, v, np.float32), {"applied_upto": {}})
        reg.record_release(v, False, {"action": "promote", "version": v, "release": v})
    reg.record_release(2, False, {"action": "note"})  # an entry without a release
    weights = reg.versions_dir / f"{2:09d}" / "weights.npy"
    weights.write_bytes(weights.read_bytes()[:40])
    reg.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 1 and snap.release_version == 1


def test_a_restart_restores_the_release_weights_when_the_release_is_not_the_newest_version(tmp_path: Path) -> None:
    """registry.py:1439 ``self._read_dir(release)[0]`` -> ``[1]``: a restart whose release is older
    than the training line's newest version handed the core the release's metadata as its weights."""
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.full(SPEC.size, 3.0, np.float32), now=0.0, source="test")
    reg.record_release(0, True, {"action": "pin", "version": 0, "release": 0})
    reg.commit(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={}, consumed=(),
                             metadata={"release": 0, "pinned": True}))  # trained on, not released
    reg.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 1 and snap.release_version == 0 and snap.pinned
    np.testing.assert_array_equal(snap.release_weights, np.full(SPEC.size, 3.0, np.float32))
