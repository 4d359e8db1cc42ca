"""``edgeci backup``: a copy of a coordinator's state dir that loads as the original does, taken
while a coordinator writes to it, refused where it cannot work."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import coordinator.registry as registry_module
from coordinator.backup import BackupError, backup, restore
from coordinator.core import CommitVersion
from coordinator.registry import Registry
from coordinator.strategies.base import BufferedUpdate
from demos.cli import main
from tests.helpers import SPEC


def upd(device: str, seq: int, value: float = 1.0) -> BufferedUpdate:
    return BufferedUpdate(device=device, seq=seq, base_version=0, staleness=0, n_samples=2,
                          weights=np.full(SPEC.size, value, np.float32), arrived_at=1.0)


def commit(reg: Registry, version: int, applied: dict[str, int], consumed: list[tuple[str, int]]) -> None:
    reg.commit(CommitVersion(version=version, weights=np.full(SPEC.size, float(version), np.float32), applied_changed=applied,
                             consumed=tuple(consumed), metadata={"created_at": float(version)}, devices_added=()))


def state_dir(root: Path) -> Registry:
    """Versions 0-5, two updates pending, a gate decision, a signing key: a coordinator's state dir
    with its lock held (as while it runs)."""
    reg = Registry(root, SPEC, keep_versions=3)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    for v in range(1, 6):
        reg.persist_update(upd("a", v))
        commit(reg, v, {"a": v}, [("a", v)])
    reg.persist_update(upd("a", 6))
    reg.persist_update(upd("b", 1))
    reg.record_release(4, False, {"action": "promote", "version": 4, "at": 5.0})
    key = root / "signing.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a real key\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    return reg


def loaded(root: Path) -> dict[str, object]:
    reg = Registry(root, SPEC)
    snap = reg.load()
    reg.close()
    assert snap is not None
    return {"version": snap.version, "release": snap.release_version, "pending": sorted(u.key for u in snap.buffer),
            "applied": dict(snap.applied_upto), "weights": np.asarray(snap.weights).tolist(), "recovered": list(snap.recovered_from)}


def test_a_backup_loads_as_the_state_dir_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "eu", tmp_path / "backups" / "eu-1"
    out.parent.mkdir()
    reg = state_dir(src)
    try:
        assert main(["backup", "--state-dir", str(src), "--out", str(out)]) == 0  # the coordinator's lock is held: no matter
    finally:
        reg.close()
    said = capsys.readouterr().out
    assert "version 5 (release 5, epoch" in said and "2 acknowledged update(s) pending" in said, said
    assert "edgeci restore --from" in said
    assert loaded(out) == loaded(src) and loaded(out)["pending"] == [("a", 6), ("b", 1)]
    assert not (out / "lock").exists() and not list(tmp_path.glob("backups/.eu-1.partial-*"))
    assert (out / "signing.key").stat().st_mode & 0o777 == 0o600
    assert json.loads((out / "release.json").read_text())["history"][0]["action"] == "promote"
    # --json, for scripts
    assert main(["backup", "--state-dir", str(src), "--out", str(tmp_path / "backups" / "eu-2"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["version"], result["pending_updates"], result["attempts"], result["damaged"]) == (5, 2, 1, [])


def test_refused_where_it_cannot_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "eu"
    state_dir(src).close()
    (tmp_path / "taken").mkdir()
    cases = {  # (exit status, what it says): a path not there exits 1, as versions and new-epoch do; one wrong on its face 2
        ("--state-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "b1")): (1, "is not a coordinator state dir"),
        ("--state-dir", str(src), "--out", str(tmp_path / "no" / "such" / "b")): (1, "does not exist: make it first"),
        ("--state-dir", str(src), "--out", str(tmp_path / "taken")): (2, "exists: a backup goes to a new path"),
        ("--state-dir", str(src), "--out", str(src / "versions" / "b")): (2, "is inside the state dir"),
        ("--out", str(tmp_path / "b2")): (2, "--state-dir is required"),
    }
    for argv, (code, why) in cases.items():
        assert main(["backup", *argv]) == code, argv
        assert why in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eu", "taken"]  # nothing made


def test_a_full_disk_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "eu"
    state_dir(src).close()
    real = os.fsync
    calls = [0]

    def failing(fd: int) -> None:  # the 4th file's fsync: ENOSPC
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(BackupError, match=r"No space left on device.*nothing was kept"):
        backup(src, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eu"]


def test_damage_the_coordinator_also_skips_is_named_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The newest version's directory unreadable in the state dir itself (media damage): every copy
    skips it, so after the last two agree the copy is kept, as the coordinator loads the original."""
    src = tmp_path / "eu"
    reg = state_dir(src)
    reg.close()
    (src / "versions" / "000000005" / "weights.npy").write_bytes(b"garbage")
    for segment in (src / "pending").iterdir():  # (the log's copy of version 5 would repair it)
        segment.unlink()
    assert loaded(src)["version"] == 4 and loaded(src)["recovered"]
    assert main(["backup", "--state-dir", str(src), "--out", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert "version 4" in captured.out and "(3 attempts" in captured.out
    assert "WARNING: the state dir itself cannot load 5:" in captured.err


def test_backups_taken_while_a_coordinator_commits_lose_nothing_acknowledged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer thread does what a busy coordinator does to its state dir — updates appended and
    fsynced (acknowledged), versions committed applying all but the newest, old versions pruned by
    the registry's thread, log segments rotated (small ones here) and deleted once applied — while
    backups are taken. Every backup loads without skipping anything, and every update acknowledged
    before it began is in it: applied by its version, or pending."""
    monkeypatch.setattr(registry_module, "SEGMENT_BYTES", 4096)
    src = tmp_path / "eu"
    reg = Registry(src, SPEC, keep_versions=3, background_prune=True)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    acked: list[tuple[str, int]] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def coordinator() -> None:
        version, seqs = 0, {d: 0 for d in "abcd"}
        try:
            while not stop.is_set():
                for d in "abcd":
                    seqs[d] += 1
                    reg.persist_update(upd(d, seqs[d], float(version)))
                    acked.append((d, seqs[d]))  # durable: the ack would leave now
                version += 1
                applied = {d: seqs[d] - 1 for d in "abcd" if seqs[d] > 1}  # the newest of each stays pending
                commit(reg, version, applied, [(d, s) for d, s in applied.items()])
        except BaseException as exc:  # (seen by the test below)
            failures.append(exc)

    writer = threading.Thread(target=coordinator, daemon=True)
    writer.start()
    try:
        for i in range(6):
            while len(acked) < 40 * (i + 1):  # let it move on between backups
                assert writer.is_alive(), failures
                threading.Event().wait(0.005)
            before = list(acked)
            result = backup(src, tmp_path / f"b{i}")
            snap = Registry(tmp_path / f"b{i}", SPEC).load()
            assert snap is not None and not snap.recovered_from and not result.damaged
            assert result.version == snap.version >= 1
            pending = {u.key for u in snap.buffer}
            lost = [k for k in before if k[1] > snap.applied_upto.get(k[0], -1) and k not in pending]
            assert not lost, (i, lost[:5], snap.version)
    finally:
        stop.set()
        writer.join(10)
        reg.close()
    assert not failures, failures
    assert len({len(list((tmp_path / f"b{i}" / "pending").iterdir())) for i in range(6)}) >= 1


def test_the_coordinator_moving_on_between_any_two_files_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, deterministic: between any two files the backup copies, the coordinator acknowledges
    four more updates and commits a version (checkpoints, pruning, segment rotation and deletion
    included, in this thread). Every update acknowledged before the backup began is in it."""
    monkeypatch.setattr(registry_module, "SEGMENT_BYTES", 2048)
    src = tmp_path / "eu"
    reg = Registry(src, SPEC, keep_versions=3)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    state = {"version": 0, "seqs": dict.fromkeys("abcd", 0)}
    acked: list[tuple[str, int]] = []

    def step(_: int = 0) -> None:
        seqs = state["seqs"]
        assert isinstance(seqs, dict)
        for d in "abcd":
            seqs[d] += 1
            reg.persist_update(upd(d, seqs[d]))
            acked.append((d, seqs[d]))
        state["version"] = int(str(state["version"])) + 1
        applied = {d: s - 1 for d, s in seqs.items() if s > 1}
        commit(reg, int(str(state["version"])), applied, list(applied.items()))

    try:
        for _ in range(30):
            step()
        segments_before = {p.name for p in (src / "pending").iterdir()}
        before = list(acked)
        result = backup(src, tmp_path / "b", progress=step)
        assert {p.name for p in (src / "pending").iterdir()} != segments_before  # segments came and went meanwhile
    finally:
        reg.close()
    snap = Registry(tmp_path / "b", SPEC).load()
    assert snap is not None and not snap.recovered_from and result.version == snap.version >= 30
    pending = {u.key for u in snap.buffer}
    lost = [k for k in before if k[1] > snap.applied_upto.get(k[0], -1) and k not in pending]
    assert not lost, (lost[:8], snap.version, dict(snap.applied_upto))


def test_restore_swaps_the_backup_in_with_a_newer_epoch_and_keeps_the_old_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, bk = tmp_path / "eu", tmp_path / "bk"
    reg = state_dir(src)
    assert main(["backup", "--state-dir", str(src), "--out", str(bk)]) == 0
    for v in range(6, 9):  # the coordinator goes on after the backup: versions the fleet then sees
        reg.persist_update(upd("a", v + 1))
        commit(reg, v, {"a": v + 1}, [("a", v + 1)])
    live_epoch = registry_module.read_epoch(src)
    backup_state = loaded(bk)
    # while it runs: refused, nothing changed
    capsys.readouterr()
    assert main(["restore", "--from", str(bk), "--state-dir", str(src)]) == 1
    assert "is in use by a running coordinator" in capsys.readouterr().err
    assert loaded(src)["version"] == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["bk", "eu"]
    reg.close()
    # stopped: swapped in, numbered above both epochs, the old dir kept aside
    assert main(["restore", "--from", str(bk), "--state-dir", str(src)]) == 0
    said = capsys.readouterr().out
    assert loaded(src) == backup_state and loaded(src)["version"] == 5
    new_epoch = registry_module.read_epoch(src)
    assert new_epoch is not None and live_epoch is not None and new_epoch > live_epoch >= (registry_module.read_epoch(bk) or 0)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("eu.before-restore-")]
    assert len(kept) == 1 and loaded(kept[0])["version"] == 8
    assert f"epoch {live_epoch} -> {new_epoch}" in said and str(kept[0]) in said
    assert not (src / "lock").exists() and not list(tmp_path.glob(".eu.restoring-*"))
    assert loaded(bk) == backup_state and registry_module.read_epoch(bk) != new_epoch  # the backup itself untouched
    # into a new path: nothing to keep
    assert main(["restore", "--from", str(bk), "--state-dir", str(tmp_path / "eu2")]) == 0
    assert loaded(tmp_path / "eu2") == backup_state and "kept as" not in capsys.readouterr().out


def test_restore_refuses_what_is_not_a_backup_or_overlaps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "eu"
    state_dir(src).close()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    cases = {
        ("--from", str(tmp_path / "nothing"), "--state-dir", str(src)): (1, "is not a backup of a state dir"),
        ("--from", str(src), "--state-dir", str(src / "inner")): (2, "overlap"),
        ("--from", str(src), "--state-dir", str(tmp_path / "photos")): (2, "is not a coordinator state dir and not empty"),
    }
    for argv, (code, why) in cases.items():
        assert main(["restore", *argv]) == code, argv
        assert why in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as no_from:  # argparse's own usage error
        main(["restore", "--state-dir", str(src)])
    assert no_from.value.code == 2 and "--from" in capsys.readouterr().err
    assert (tmp_path / "photos" / "a.jpg").exists() and loaded(src)["version"] == 5


def test_two_restores_in_one_second_keep_both_replaced_dirs(tmp_path: Path) -> None:
    """The replaced dir is kept as ``NAME.before-restore-<UTC second>``; a second restore within the
    same second failed (the name was taken: "Directory not empty"). Now the second is kept as ``…-2``."""
    src, bk = tmp_path / "eu", tmp_path / "bk"
    reg = state_dir(src)
    reg.close()
    assert main(["backup", "--state-dir", str(src), "--out", str(bk)]) == 0
    first = restore(bk, src, now=1_800_000_000.0)
    second = restore(bk, src, now=1_800_000_000.4)
    assert first.kept is not None and second.kept is not None
    assert first.kept.name == "eu.before-restore-20270115T080000Z" and second.kept.name == first.kept.name + "-2"
    assert loaded(first.kept)["version"] == 5 and loaded(second.kept) == loaded(bk) == loaded(src)
    assert (second.new_epoch or 0) > (first.new_epoch or 0)
