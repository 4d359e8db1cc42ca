"""Gaps a mutation audit of the operator's tools found (helper-193, seed 193): ``coordinator/backup.py``
(``edgeci backup`` / ``restore``), ``coordinator/metrics.py`` and ``coordinator/cli_status.py``.
Each test names the line (at commit 24576d7) and the mutation it kills; each fails with that
mutant applied and passes on the real code."""

from __future__ import annotations

import logging
import os
import socketserver
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import coordinator.registry as registry_module
from coordinator.backup import BackupError, backup, restore
from coordinator.cli_status import judge_live, render
from coordinator.metrics import CoordinatorMetrics, MetricsServer
from coordinator.registry import Registry
from edge_sdk.wire.messages import Status
from tests.helpers import SPEC
from tests.test_backup import commit, loaded, state_dir, upd
from tests.test_mutation_gaps_registry import _journal  # every fsync (by path) and rename, in order

# ---------------------------------------------------------------------- backup


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_every_file_and_directory_of_a_backup_is_fsynced_before_the_rename_and_the_rename_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """backup.py:116 ``_fsync_dir(dst / "pending")`` deleted, and :230-231 the rename of the copy to
    ``out`` swapped with the fsync of its parent (the rename not durable): the module docstring
    promises every file and directory of the copy fsynced before it is renamed to ``out``, and the
    rename made durable after."""
    src = tmp_path / "eu"
    state_dir(src).close()
    (tmp_path / "b").mkdir()
    out = tmp_path / "b" / "eu-1"
    events = _journal(monkeypatch)
    backup(src, out)
    renamed = events.index(("rename", str(out)))
    partial = out.parent / f".eu-1.partial-{os.getpid()}"
    synced = {Path(p) for kind, p in events[:renamed] if kind == "fsync"}
    copied = [p.relative_to(out) for p in out.rglob("*") if (src / p.relative_to(out)).exists()]  # (not what the
    copy = {partial} | {partial / p for p in copied}  # verifying load wrote itself, fsynced under a temporary name)
    assert len(copy) > 10 and partial / "pending" in copy
    assert copy - synced == set()
    assert ("fsync", str(out.parent)) in events[renamed + 1:]


def test_a_state_dir_with_no_readable_version_gives_no_backup(tmp_path: Path) -> None:
    """backup.py:187 and :189, which no test ran: a copy that does not load (every version
    unreadable; or no version at all) is never kept, whatever the last two attempts say — a mutant
    answering version 0 for "no readable version" (:187 ``-1`` -> ``0``) kept it as a damaged but
    loadable backup."""
    src = tmp_path / "eu"
    state_dir(src).close()
    for weights in (src / "versions").glob("*/weights.npy"):
        weights.write_bytes(b"garbage")
    for segment in (src / "pending").iterdir():
        segment.unlink()
    with pytest.raises(BackupError, match=r"no copy of .* loaded cleanly in 3 attempts .*no readable version"):
        backup(src, tmp_path / "b")
    empty = tmp_path / "empty"
    (empty / "versions").mkdir(parents=True)
    (empty / "spec.json").write_text((src / "spec.json").read_text())
    with pytest.raises(BackupError, match=r"no version in it"):
        backup(empty, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "eu"]


def test_damage_above_version_0_keeps_a_backup_of_version_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """backup.py:225 ``version >= 0`` -> ``version >= 1``: a state dir whose only readable version
    is 0 (version 1's directory damaged, its log record gone) loads as version 0, as the coordinator
    loads it, so the backup is kept with the damage named — not refused."""
    src = tmp_path / "eu"
    reg = Registry(src, SPEC, keep_versions=3)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.persist_update(upd("a", 1))
    commit(reg, 1, {"a": 1}, [("a", 1)])
    reg.close()
    (src / "versions" / "000000001" / "weights.npy").write_bytes(b"garbage")
    for segment in (src / "pending").iterdir():
        segment.unlink()
    assert loaded(src)["version"] == 0
    result = backup(src, tmp_path / "b")
    assert result.version == 0 and result.attempts == 3 and result.damaged and result.damaged[0].startswith("1:")
    copy, original = loaded(tmp_path / "b"), loaded(src)
    assert {k: v for k, v in copy.items() if k != "recovered"} == {k: v for k, v in original.items() if k != "recovered"}


def test_the_registry_is_heard_again_after_a_backup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """backup.py:164 ``logger.removeFilter(quiet)`` deleted: the filter that keeps the copy's load
    quiet stayed on the ``edgeci.registry`` logger, and every later registry warning from this
    thread (a coordinator's RECOVERY, in a process that took a backup) was dropped."""
    src = tmp_path / "eu"
    state_dir(src).close()
    backup(src, tmp_path / "b")
    (src / "versions" / "000000005" / "weights.npy").write_bytes(b"garbage")
    for segment in (src / "pending").iterdir():
        segment.unlink()
    with caplog.at_level("WARNING", logger="edgeci.registry"):
        assert loaded(src)["version"] == 4
    assert any("RECOVERY" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- restore


def _stopped_state_dir_with_backup(tmp_path: Path) -> tuple[Path, Path]:
    src, bk = tmp_path / "eu", tmp_path / "bk"
    reg = state_dir(src)
    backup(src, bk)
    for v in range(6, 9):  # versions the fleet saw after the backup
        reg.persist_update(upd("a", v + 1))
        commit(reg, v, {"a": v + 1}, [("a", v + 1)])
    reg.close()
    return src, bk


def test_restore_numbers_above_an_epoch_ahead_of_the_clock(tmp_path: Path) -> None:
    """backup.py:296 (the epoch to number above): the replaced state dir's epoch, not only the
    clock, bounds the new one (a state dir renumbered ``new-epoch --above`` an epoch ahead of the
    clock: its devices hold version numbers of that epoch), and the backup's epoch is the one
    reported when it is the newer (``or`` -> ``and`` reported 0 for it)."""
    src, bk = _stopped_state_dir_with_backup(tmp_path)
    ahead = registry_module.new_epoch() + 10**12  # about 12 days ahead of the clock
    (src / registry_module.EPOCH_FILE).write_text(f"{ahead}\n")
    r = restore(bk, src, now=1.0)
    assert r.old_epoch == ahead and r.new_epoch > ahead and registry_module.read_epoch(src) == r.new_epoch
    # the backup's epoch the newer one
    farther = r.new_epoch + 10**12
    (bk / registry_module.EPOCH_FILE).write_text(f"{farther}\n")
    r2 = restore(bk, src, now=2.0)
    assert r2.old_epoch == farther and r2.new_epoch > farther


def test_restore_names_the_kept_dir_after_the_time_it_is_given(tmp_path: Path) -> None:
    """backup.py:293 ``time.time() if now is None else now`` negated (or ``is`` -> ``is not``): the
    replaced state dir is kept as ``NAME.before-restore-<now, UTC>``."""
    src, bk = _stopped_state_dir_with_backup(tmp_path)
    r = restore(bk, src, now=86_400.0 + 61)
    assert r.kept == tmp_path / "eu.before-restore-19700102T000101Z" and loaded(r.kept)["version"] == 8


def test_a_restore_whose_swap_fails_puts_the_state_dir_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """backup.py:315 ``os.rename(kept, state_dir)`` deleted (and the rollback around it, which no
    test ran): when the staged copy cannot be renamed into place after the state dir was moved aside,
    the state dir is put back — ``restore`` says it is "as it was", and it is."""
    src, bk = _stopped_state_dir_with_backup(tmp_path)
    real = os.rename

    def rename(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        if ".restoring-" in os.fspath(a):
            raise OSError(5, "Input/output error")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(BackupError, match=r"Input/output error; .* is as it was"):
        restore(bk, src)
    assert loaded(src)["version"] == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["bk", "eu"]


def test_restore_swaps_in_the_backup_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """backup.py:317 ``_fsync_dir(state_dir.parent)`` deleted: the two renames of the swap are
    fsynced in the parent directory after they are made."""
    src, bk = _stopped_state_dir_with_backup(tmp_path)
    events = _journal(monkeypatch)
    restore(bk, src)
    swapped = events.index(("rename", str(src)))
    assert ("fsync", str(tmp_path)) in events[swapped + 1:]

# ---------------------------------------------------------------------- metrics


def _values(m: CoordinatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(m.exposition().decode()) for s in fam.samples}


def _status(**extra: object) -> Status:
    return Status(region="r1", coordinator="c1", version=4, updates_accepted=9, updates_rejected=2, updates_duplicate=1,
                  devices_seen=3, buffered=2, extra=dict(extra))


def test_traffic_is_exported_both_ways() -> None:
    """metrics.py:210-211 ``traffic.add_metric(["out"], ...)`` swapped with ``yield traffic``: the
    family went out before its ``out`` sample was added, and /metrics had no outgoing traffic."""
    m = CoordinatorMetrics()
    m.count_from(_status(bytes_in=100, bytes_out=1000))
    m.publish(_status(bytes_in=150, bytes_out=4000))
    got = _values(m)
    assert got[("edgeci_bytes_total", (("direction", "in"),))] == 50
    assert got[("edgeci_bytes_total", (("direction", "out"),))] == 3000


def test_a_request_whose_thread_cannot_start_gives_its_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.py:416-417 ``self.slots.release()`` and ``raise`` swapped (no test ran them): a
    connection whose thread could not start (``can't start new thread`` under memory pressure)
    kept its slot, and after ``max_connections`` of them the server refused every scrape."""
    real = socketserver.ThreadingMixIn.process_request
    failing = [1]

    def process_request(self: socketserver.ThreadingMixIn, request: Any, client_address: Any) -> None:
        if failing[0]:
            failing[0] -= 1
            raise RuntimeError("can't start new thread")
        real(self, request, client_address)

    monkeypatch.setattr(socketserver.ThreadingMixIn, "process_request", process_request)
    s = MetricsServer(CoordinatorMetrics(), "127.0.0.1", 0, health=lambda: (True, {}), ready=lambda: (True, {}),
                      timeout_s=2.0, max_connections=1).start()
    try:
        with pytest.raises(OSError):
            urllib.request.urlopen(s.url + "/healthz", timeout=5)
        with urllib.request.urlopen(s.url + "/metrics", timeout=5) as r:
            assert r.status == 200
            got = {(x.name, x.labels.get("kind")): x.value for fam in text_string_to_metric_families(r.read().decode())
                   for x in fam.samples}
        assert got[("edgeci_metrics_http_problems_total", "error")] == 1
        assert got[("edgeci_metrics_http_problems_total", "refused")] == 0
    finally:
        s.stop()


def test_the_registry_of_other_threads_is_heard_while_a_backup_loads_its_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """backup.py:149, an early return in ``_ThisThread.filter`` (``None``: drop every record): the
    filter quietens the copy's load in the backup's own thread only; a coordinator running in the
    same process (another thread) still logs its registry warnings meanwhile."""
    src = tmp_path / "eu"
    state_dir(src).close()
    real = Registry.load
    registry_log = logging.getLogger("edgeci.registry")

    def load(self: Registry) -> object:
        other = threading.Thread(target=lambda: registry_log.warning("from the coordinator's thread"))
        other.start()
        other.join()
        registry_log.warning("from the backup's thread")
        return real(self)

    monkeypatch.setattr(Registry, "load", load)
    with caplog.at_level("WARNING", logger="edgeci.registry"):
        backup(src, tmp_path / "b")
    said = [r.getMessage() for r in caplog.records]
    assert "from the coordinator's thread" in said and "from the backup's thread" not in said


# ---------------------------------------------------------------------- edgeci status


def _shown(**extra: object) -> dict[str, object]:
    return {"type": "status", "coordinator": "c", "region": "eu", "alive": True, "published_at": 1000.0, "version": 7,
            "strategy": "fedbuff", "extra": dict(extra)}


def test_status_shows_nested_strategy_parameters_in_one_pair_of_brackets() -> None:
    """cli_status.py:176 ``inner if not nested else f"({inner})"`` negated: the strategy's
    parameters read ``((k=10, ...))`` and a nested group lost its brackets (``server=lr=0.5``)."""
    text = render(_shown(strategy_params={"k": 10, "server": {"lr": 0.5, "name": "adam"}}), 1000.0)
    assert "· strategy fedbuff (k=10, server=(lr=0.5))" in text.splitlines()[1]


def test_status_history_rows_show_the_other_details_of_an_event() -> None:
    """cli_status.py:362 ``v not in (None, "", {}, [])`` -> ``in`` (the keys of an event the table
    has no column for were shown only when empty), and :360-362 swapped (the extras before "release
    pinned"): what an event carries beyond the known keys follows them, empty ones left out."""
    event = {"at": 940.0, "action": "pin", "version": 5, "release": 5, "pinned": True, "until": "unpin",
             "note": "", "rolled_back_updates": 3}
    (row,) = [ln for ln in render(_shown(recent_versions=[event]), 1000.0).splitlines() if "release pinned" in ln]
    assert row.rstrip().endswith("release pinned · until unpin · rolled_back_updates 3") and " note" not in row


def test_status_says_it_waits_before_it_waits(capsys: pytest.CaptureFixture[str]) -> None:
    """cli_status.py:394-396 the "waiting up to N s for a live one" notice swapped with the wait
    itself: printed after the wait (up to a heartbeat + 5 s of silence first), not before it."""
    said_before: list[str] = []

    def next_status(wait: float) -> None:
        said_before.append(capsys.readouterr().err)
        return None

    stale = {**_shown(), "published_at": time.time() - 600, "heartbeat_s": 5}
    judged, _, alive, skew = judge_live(stale, None, next_status)
    assert alive is False and skew is None and judged is stale
    assert "waiting up to 10 s for a live one" in said_before[0]
