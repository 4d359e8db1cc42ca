"""Behaviours of the device's sample store that no test checked (helper-185's mutation audit).

Each test here kills a mutant of edge_sdk/store.py that survived every test covering the file; the
docstrings name it (file:line at the audit's base commit ac73730, and the mutation)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.store import DEFAULT_FILENAME, CorruptStore
from tests.test_store import SHAPE, digit, open_store

DIGIT_BYTES = 4 * int(np.prod(SHAPE))


def test_a_sample_exactly_the_size_of_quota_bytes_is_taken(tmp_path: Path) -> None:
    """store.py:846 ``row.nbytes > self._quota_bytes`` -> ``>=``: a sample that fills the byte quota
    exactly was refused as too big for it; it fits, and evicts everything else."""
    with open_store(tmp_path / DEFAULT_FILENAME, quota_bytes=DIGIT_BYTES) as s:
        first = s.add(digit(0), 1)
        second = s.add(digit(1), 2)
        assert s.ids() == [second] and second > first
        assert s.stats().nbytes == DIGIT_BYTES


def test_one_byte_over_quota_bytes_evicts(tmp_path: Path) -> None:
    """store.py:879 ``over_bytes <= 0`` -> ``<= 1`` (the early return of ``_evict``): a store over its
    byte quota by exactly one byte evicted nothing and held more than the quota."""
    with open_store(tmp_path / DEFAULT_FILENAME, quota_bytes=2 * DIGIT_BYTES - 1) as s:
        s.add(digit(0), 1)
        newest = s.add(digit(1), 2)
        assert s.ids() == [newest]
        assert s.stats().nbytes <= 2 * DIGIT_BYTES - 1 and s.stats().evicted == 1


def test_a_mirrored_counter_of_one_survives_a_store_that_is_all_garbage(tmp_path: Path) -> None:
    """store.py:408 ``value > meta.get(key, 0)`` -> ``meta.get(key, 1)``: a recovery whose database
    yields nothing took a mirrored counter only when it was above one, so ``next_seq == 1`` (one
    update sent, acknowledged as seq 0) came back as no counter at all: the next update was seq 0
    again, which the coordinator acknowledges as a duplicate and never applies."""
    path = tmp_path / DEFAULT_FILENAME
    with open_store(path, counters=("next_seq",)) as s:
        s.set_meta("next_seq", 1)
    path.write_bytes(np.random.default_rng(2).bytes(path.stat().st_size))
    with open_store(path, counters=("next_seq",), recover=True) as s:
        assert s.recovered_from is not None
        assert s.get_meta("next_seq") == 1


def test_a_garbage_store_without_a_mirror_starts_from_zero(tmp_path: Path) -> None:
    """store.py:411 ``salvaged.get(key, 0)`` -> ``salvaged.get(key, 1)``: a recovery that could read
    neither the database nor a mirror counted one sample ever added (and evicted) that never was,
    and handed out ids from 2."""
    path = tmp_path / DEFAULT_FILENAME
    path.write_bytes(np.random.default_rng(3).bytes(64 * 1024))
    with open_store(path, recover=True) as s:
        assert s.recovered_from is not None
        stats = s.stats()
        assert (stats.added, stats.evicted, stats.count) == (0, 0, 0)
        assert s.add(digit(0), 1) == 1


@pytest.mark.parametrize("samples", [0, 3])
def test_reopening_a_sound_store_says_nothing_about_lost_counters(tmp_path: Path, samples: int,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """store.py:494 ``mirrored_id <= last_id`` -> ``<`` and store.py:815 ``else 0`` -> ``else 1``
    (the mirror's ``last_id`` of a store without samples): every open of a sound store warned that
    its counters were below their mirror, "the database lost them" (with no sample yet: and then
    numbered its samples from 2)."""
    path = tmp_path / DEFAULT_FILENAME
    with open_store(path, counters=("next_seq",)) as s:
        ids = [s.add(digit(i), 1) for i in range(samples)]
        s.set_meta("next_seq", 4)
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="edgeci.store"), open_store(path, counters=("next_seq",)) as s:
            assert s.get_meta("next_seq") == 4
        assert not [r for r in caplog.records if "below their mirror" in r.getMessage()]
    with open_store(path, counters=("next_seq",)) as s:
        assert s.add(digit(9), 2) == len(ids) + 1


def test_a_store_exactly_at_quota_bytes_evicts_no_more(tmp_path: Path) -> None:
    """store.py:906 ``over_bytes <= 0`` -> ``< 0`` (the eviction loop's stop): eviction went on
    past the quota, one sample more than needed whenever the bytes left were exactly the quota; a
    label that fit was lost to training."""
    with open_store(tmp_path / DEFAULT_FILENAME, quota_bytes=2 * DIGIT_BYTES) as s:
        ids = [s.add(digit(i), 1, timestamp=float(i)) for i in range(3)]
        assert s.ids() == ids[1:]
        assert s.stats().nbytes == 2 * DIGIT_BYTES and s.stats().evicted == 1


def test_a_damaged_task_setting_is_a_corrupt_store(tmp_path: Path) -> None:
    """store.py:1191 ``key == "task"`` -> ``!=`` (in ``_stored_settings``): a ``task`` setting this
    module never wrote (not a non-empty string) was taken as it was; the store then refused every
    task's client with a ConfigError naming a task nobody runs, instead of a corrupt store that a
    recovery moves aside (counters kept)."""
    from tests.test_store import _edit

    path = tmp_path / DEFAULT_FILENAME
    with open_store(path, counters=("next_seq",), task="classification") as s:
        s.add(digit(0), 1)
        s.set_meta("next_seq", 3)
    _edit(path, ("UPDATE settings SET value = ? WHERE key = 'task'", ("7",)))
    with pytest.raises(CorruptStore, match="task"):
        open_store(path, counters=("next_seq",), task="classification")
    with open_store(path, counters=("next_seq",), task="classification", recover=True) as s:
        assert s.recovered_from is not None and s.get_meta("next_seq") == 3


def test_the_counters_mirror_is_fsynced_with_its_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """store.py:1306 ``f.flush()`` deleted (in ``_write_counters``): the mirror's tmp file was
    fsynced while its JSON was still in Python's buffer, then renamed over the last mirror: after a
    power cut the mirror, the one copy of ``next_seq`` that survives a store whose every page is
    garbage, could be empty."""
    import edge_sdk.store as store_mod

    sizes: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".counters.tmp"):
            sizes.append(os.fstat(fd).st_size)
        real(fd)

    with open_store(tmp_path / DEFAULT_FILENAME, counters=("next_seq",)) as s:
        monkeypatch.setattr(store_mod.os, "fsync", fsync)
        s.set_meta("next_seq", 12)
    assert sizes and all(n > 0 for n in sizes), sizes


def test_catching_up_with_the_mirror_numbers_above_an_older_copy_of_the_store(tmp_path: Path) -> None:
    """store.py:1148 ``DELETE FROM sqlite_sequence ...`` deleted (in ``_set_counters``): a store file
    put back from an older copy (its id sequence behind the mirror's) got a second sequence row
    beside its own, and SQLite went on from the older one: ids the device had already handed out
    (to samples that reached updates and the SCC feature cache) were given again."""
    import shutil

    path = tmp_path / DEFAULT_FILENAME
    backup = tmp_path / "backup.sqlite3"
    with open_store(path, counters=("next_seq",)) as s:
        for i in range(3):
            s.add(digit(i), 1)
        s.set_meta("next_seq", 1)
    shutil.copyfile(path, backup)
    with open_store(path, counters=("next_seq",)) as s:
        ids = [s.add(digit(i), 1) for i in range(3, 6)]
        s.set_meta("next_seq", 2)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(backup, path)
    with open_store(path, counters=("next_seq",)) as s:
        assert s.get_meta("next_seq") == 2
        assert s.add(digit(9), 1) > max(ids)


def test_an_integer_below_64_bits_is_refused_as_meta_with_a_typed_error(tmp_path: Path) -> None:
    """store.py:1427 ``-(2**63) <= value`` -> ``-(2**64)`` (in ``_check_meta_value``): an int below
    the 64-bit range passed the check and reached SQLite, which raised a bare OverflowError instead
    of the typed LocalProtocolError every rejected call raises (and which changes nothing)."""
    from edge_sdk.errors import LocalProtocolError

    with open_store(tmp_path / DEFAULT_FILENAME) as s:
        s.set_meta("offset", -(2**63))
        with pytest.raises(LocalProtocolError, match="64 bits"):
            s.set_meta_many({"offset": -(2**63) - 1, "next_seq": 9})
        assert s.get_meta("offset") == -(2**63) and s.get_meta("next_seq") is None
