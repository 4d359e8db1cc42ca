"""SampleStore: round trips, ordering, eviction policy, typed errors, durability, threads.

The crash test runs ``tests/store_crash_writer.py`` in a subprocess, SIGKILLs it
mid-stream and checks every sample it had acknowledged; it writes to the real disk. The
other tests check bookkeeping, not the disk, so they put their databases on tmpfs
(``/dev/shm``) where there is one: with ``synchronous=FULL`` every commit is an fsync, and
on a slow VM disk those alone would take the suite from ~3 s to ~10 s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError, InvalidSample, LocalProtocolError
from edge_sdk.store import (
    DEFAULT_FILENAME,
    MAX_FUTURE_S,
    SCHEMA_VERSION,
    CorruptStore,
    SampleStore,
    SchemaVersionError,
    StorageError,
    StoreClosed,
    png_available,
)

SHAPE = (1, 8, 8)
GESTURE = (5, 3)
N_CLASSES = 10
HERE = Path(__file__).resolve().parent


def open_store(path: Path, **kwargs: Any) -> SampleStore:
    options: dict[str, Any] = {
        "sample_shape": SHAPE,
        "gesture_shape": GESTURE,
        "n_classes": N_CLASSES,
    }
    options.update(kwargs)
    return SampleStore.open(path, **options)


TMPFS = Path("/dev/shm")


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A fresh directory, on tmpfs when the machine has one (see the module docstring)."""
    base = TMPFS if TMPFS.is_dir() and os.access(TMPFS, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="edgeci-store-", dir=base) as tmp:
        yield Path(tmp)


@pytest.fixture
def workdir() -> Iterator[Path]:
    with scratch_dir() as path:
        yield path


@pytest.fixture
def db(workdir: Path) -> Path:
    return workdir / "samples.sqlite3"


@pytest.fixture
def store(db: Path) -> Iterator[SampleStore]:
    with open_store(db) as s:
        yield s


def digit(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(SHAPE, dtype=np.float32)


def gesture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(GESTURE).astype(np.float32)


def frame(seed: int, height: int = 12, width: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, through a second connection (sees only committed data)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        out = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
        out["user_version"] = [conn.execute("PRAGMA user_version").fetchone()]
    return out


# ---------------------------------------------------------------------- round trips


def test_arrays_round_trip_in_insertion_order(store: SampleStore) -> None:
    timestamps = [50.0, 10.0, 30.0, 20.0]  # not monotonic: order is by id, not time
    ids = [store.add(digit(i), i % N_CLASSES, timestamp=ts) for i, ts in enumerate(timestamps)]
    assert ids == sorted(ids) and len(set(ids)) == 4
    x, y = store.arrays()
    assert x.dtype == np.float32 and x.shape == (4, *SHAPE)
    np.testing.assert_array_equal(x, np.stack([digit(i) for i in range(4)]))
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 2, 3]
    snap = store.snapshot("array")
    assert snap.ids.tolist() == ids and snap.timestamps.tolist() == timestamps
    got = store.get(ids[2])
    assert got is not None
    assert (got.kind, got.label, got.timestamp, got.used_seq, got.acked) == (
        "array",
        2,
        30.0,
        None,
        False,
    )
    np.testing.assert_array_equal(got.data, digit(2))
    assert got.boxes.shape == (0, 5) and got.nbytes == 4 * 64
    assert store.get(10_000) is None
    assert store.count() == store.count("array") == len(store) == 4
    assert store.count("gesture") == store.count("frame") == 0


def test_gestures_round_trip(store: SampleStore) -> None:
    ids = [store.add_gesture(gesture(i), 9 - i, timestamp=float(i)) for i in range(3)]
    x, y = store.gestures()
    assert x.shape == (3, *GESTURE)
    np.testing.assert_array_equal(x, np.stack([gesture(i) for i in range(3)]))
    assert y.tolist() == [9, 8, 7]
    assert store.snapshot("gesture").ids.tolist() == ids
    assert store.arrays()[0].shape == (0, *SHAPE)  # arrays and gestures are kept apart


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_frames_round_trip_losslessly_with_boxes(db: Path, encoding: str) -> None:
    if encoding == "png" and not png_available():
        pytest.skip("OpenCV does not import here")
    boxes: list[Any] = [
        np.zeros((0, 5)),
        [[3, 0, 0, 16, 12]],  # a box may cover the whole frame
        np.array([[1, 1.5, 2.25, 7, 9], [0, 4, 4, 5, 5]], dtype=np.float64),
    ]
    with open_store(db, frame_encoding=encoding) as s:
        ids = [s.add_frame(frame(i, 12 + i, 16), b, timestamp=1.0) for i, b in enumerate(boxes)]
        got = list(s.frames())
        assert len(got) == 3 and s.count("frame") == 3
        for i, (image, bx) in enumerate(got):
            np.testing.assert_array_equal(image, frame(i, 12 + i, 16))
            assert image.dtype == np.uint8
            assert bx.dtype == np.float32
            np.testing.assert_array_equal(bx, np.asarray(boxes[i], dtype=np.float32).reshape(-1, 5))
        sample = s.get(ids[2])
        assert sample is not None and sample.kind == "frame" and sample.label is None
        assert sample.boxes.tolist() == [[1, 1.5, 2.25, 7, 9], [0, 4, 4, 5, 5]]
        # frames(ids) skips absent and non-frame ids
        array_id = s.add(digit(0), 0)
        assert len(list(s.frames([ids[1], array_id, 99_999]))) == 1


def test_frames_decode_by_their_stored_encoding(db: Path) -> None:
    with open_store(db, frame_encoding="npy") as s:
        s.add_frame(frame(7), [[2, 1, 1, 3, 3]])
    with open_store(db, frame_encoding="auto") as s:
        s.add_frame(frame(8), [])
        images = [image for image, _ in s.frames()]
    np.testing.assert_array_equal(images[0], frame(7))
    np.testing.assert_array_equal(images[1], frame(8))


def test_default_timestamp_comes_from_the_clock(db: Path) -> None:
    with open_store(db, clock=lambda: 1234.5) as s:
        sid = s.add(digit(0), 1)
        later = s.add(digit(1), 1, timestamp=7)
        assert s.snapshot().timestamps.tolist() == [1234.5, 7.0]
        assert s.get(sid) is not None and s.get(later) is not None


def test_open_in_data_dir_and_settings_persist(workdir: Path) -> None:
    with open_store(workdir) as s:
        s.add(digit(0), 3)
    assert (workdir / DEFAULT_FILENAME).is_file()
    with SampleStore.open(workdir) as s:  # shapes and n_classes come from the file
        s.add_gesture(gesture(0), 9)
        with pytest.raises(InvalidSample, match="n_classes=10"):
            s.add(digit(1), 10)
    with pytest.raises(ConfigError, match="shape"):
        SampleStore.open(workdir, sample_shape=(8, 8))
    with pytest.raises(ConfigError, match="shrink"):
        SampleStore.open(workdir, n_classes=5)
    with SampleStore.open(workdir, n_classes=12) as s:  # n_classes may grow
        s.add(digit(2), 11)
        assert s.count() == 3


def test_adding_needs_a_declared_shape(db: Path) -> None:
    with SampleStore.open(db) as s:
        with pytest.raises(ConfigError, match="sample_shape"):
            s.add(digit(0), 0)
        with pytest.raises(ConfigError, match="gesture_shape"):
            s.add_gesture(gesture(0), 0)
        assert s.add_frame(frame(0), []) == 1  # frames need no declaration


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_shape": (0, 3)},
        {"gesture_shape": (4,)},
        {"n_classes": 0},
        {"quota_samples": 0},
        {"quota_bytes": True},
        {"frame_encoding": "jpeg"},
    ],
)
def test_bad_open_arguments_are_config_errors(db: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SampleStore.open(db, **kwargs)
    assert not db.exists()


# ---------------------------------------------------------------------- quota and eviction


def test_eviction_prefers_acknowledged_then_oldest(db: Path) -> None:
    with open_store(db, quota_samples=4) as s:
        a, b, c, d = (s.add(digit(i), i, timestamp=ts) for i, ts in enumerate([10, 20, 30, 40]))
        assert s.mark_used([c, d], 7) == 2
        assert s.mark_acked(7) == 2
        assert s.mark_used([a], 8) == 1  # used, but update 8 is not acknowledged
        e = s.add(digit(4), 4, timestamp=5)  # the oldest timestamp of all, yet never evicted now
        assert s.ids() == [a, b, d, e]  # c: the oldest acknowledged sample
        f = s.add(digit(5), 5, timestamp=50)
        assert s.ids() == [a, b, e, f]  # d: the last acknowledged one
        g = s.add(digit(6), 6, timestamp=60)
        assert s.ids() == [a, b, f, g]  # none acknowledged left: oldest overall (e, ts=5)
        h = s.add(digit(7), 7, timestamp=70)
        assert s.ids() == [b, f, g, h]  # a (ts=10), although an update used it
        stats = s.stats()
        assert (stats.count, stats.added, stats.evicted) == (4, 8, 4)
        assert s.arrays()[1].tolist() == [1, 5, 6, 7]
        # ids are never reused after eviction
        assert s.add(digit(8), 8) > h


def test_a_timestamp_from_the_future_is_refused_so_fresh_labels_are_not_evicted(db: Path) -> None:
    """Timestamps in milliseconds (or from a clock years ahead) were stored: with a quota full of
    them, eviction (oldest first) kept those and evicted each fresh label at the next add — 9 of
    10 labels made after 4 such samples were gone, never trained (device durability audit, h103).
    A day ahead of the store's clock is refused; up to a day (skew, time zones) and the past are not."""
    now = 1_800_000_000.0
    with open_store(db, quota_samples=5, clock=lambda: now) as s:
        with pytest.raises(InvalidSample, match="days ahead of the clock"):
            s.add(digit(0), 1, timestamp=now * 1000)
        with pytest.raises(InvalidSample, match="days ahead"):
            s.check_timestamp(now + MAX_FUTURE_S + 1)
        skewed = s.add(digit(1), 1, timestamp=now + MAX_FUTURE_S)
        old = s.add(digit(2), 1, timestamp=0.0)
        fresh = [s.add(digit(3 + i), 2) for i in range(4)]
        assert s.ids() == [skewed, *fresh] and old not in s.ids() and s.stats().added == 6


def test_labels_stamped_by_a_clock_that_was_ahead_are_evicted_before_fresh_ones(db: Path) -> None:
    """A device that booted with its clock a year ahead stamps its labels a year ahead (the clock's
    own now is not refused); NTP corrects the clock. Eviction went oldest first, so those labels
    outlived every fresh one: quota 4, four such labels, then 4 fresh ones kept [2, 3, 4, 8] (fresh
    labels 5-7 lost, helper-153). Within each class, one stamped more than MAX_FUTURE_S ahead of the
    clock now goes first; acknowledged ones still go before the rest, and a reopen evicts alike."""
    year = 365 * 86_400.0
    now = [1_800_000_000.0 + year]
    with open_store(db, quota_samples=4, clock=lambda: now[0]) as s:
        for i in range(4):
            s.add(digit(i), 1)
        now[0] -= year  # NTP
        fresh = [s.add(digit(4 + i), 2) for i in range(4)]
        assert s.ids() == fresh
        s.mark_used(fresh[:2], 0)
        s.mark_acked(0)
        now[0] += year
        ahead = s.add(digit(8), 1)  # evicts fresh[0], the oldest acknowledged
        s.mark_used([ahead], 1)
        s.mark_acked(1)
        now[0] -= year
        new = s.add(digit(9), 3)
        assert s.ids() == [*fresh[1:], new]  # the acknowledged one stamped ahead, before fresh[1]
        newer = s.add(digit(10), 3)
        assert s.ids() == [*fresh[2:], new, newer]  # then the acknowledged fresh[1]
        now[0] += year
        ahead = s.add(digit(11), 1)  # evicts fresh[2]: none acknowledged left, the oldest
        now[0] -= year
        newest = s.add(digit(12), 3)
        assert s.ids() == [fresh[3], new, newer, newest]  # unacknowledged: the one stamped ahead first
        now[0] += year
    with open_store(db, quota_samples=4, clock=lambda: now[0]) as s:
        ahead = s.add(digit(13), 1)
        assert s.ids() == [new, newer, newest, ahead]
    now[0] -= year
    with open_store(db, quota_samples=3, clock=lambda: now[0]) as s:
        assert s.ids() == [new, newer, newest]  # a lower quota at open: the one stamped ahead goes


def test_evicting_labels_no_update_trained_on_is_said_once(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A label evicted before any update trained on it is lost to training: the quota's policy,
    but it went unsaid (a device offline with a full quota; device durability audit, h103)."""
    with open_store(db, quota_samples=2) as s, caplog.at_level("WARNING", logger="edgeci.store"):
        first = s.add(digit(0), 1, timestamp=1.0)
        s.mark_used([first], 0)
        s.mark_acked(0)
        s.add(digit(1), 1, timestamp=2.0)
        s.add(digit(2), 1, timestamp=3.0)  # evicts the acknowledged one: nothing to say
        assert first not in s.ids() and "no update has trained on" not in caplog.text
        for i in range(3):
            s.add(digit(3 + i), 1, timestamp=4.0 + i)
        assert caplog.text.count("evicting 1 label(s) no update has trained on yet") == 1


def test_equal_timestamps_evict_lowest_id_first(db: Path) -> None:
    with open_store(db, quota_samples=2) as s:
        ids = [s.add(digit(i), i, timestamp=1.0) for i in range(4)]
        assert s.ids() == ids[2:]


def test_quota_bytes_and_a_sample_too_big_for_it(db: Path) -> None:
    per_sample = 4 * int(np.prod(SHAPE))  # 256 stored bytes per digit
    with open_store(db, quota_bytes=3 * per_sample + 10) as s:
        ids = [s.add(digit(i), i) for i in range(5)]
        assert s.ids() == ids[2:]
        assert s.stats().nbytes == 3 * per_sample
    with open_store(db, quota_bytes=100) as s:  # reopening with a lower quota evicts at once
        assert s.count() == 0
        before = dump(db)
        with pytest.raises(InvalidSample, match="quota_bytes"):
            s.add(digit(9), 1)
        assert dump(db) == before
        assert s.add_gesture(gesture(0), 1) > ids[-1]  # 60 bytes fit


def test_lower_sample_quota_on_reopen_evicts_by_policy(db: Path) -> None:
    with open_store(db) as s:
        ids = [s.add(digit(i), i, timestamp=float(10 - i)) for i in range(5)]
        s.mark_used(ids[:2], 1)
        s.mark_acked(1)
    with open_store(db, quota_samples=2) as s:
        # acknowledged first (ids 1 then 0, by timestamp), then the oldest: ids[4] (ts 6)
        assert s.ids() == [ids[2], ids[3]]
        assert s.stats().evicted == 3


# ---------------------------------------------------------------------- used / acked


def test_mark_used_unused_count_and_acks(store: SampleStore) -> None:
    ids = [store.add(digit(i), i) for i in range(4)]
    assert store.unused_count() == 4
    assert store.mark_used([*ids[:3], ids[0], 99_999], 2) == 3  # duplicates and absent ids ignored
    assert store.unused_count() == 1 and store.ids(unused_only=True) == [ids[3]]
    store.mark_used([ids[0]], 1)  # an older update does not lower the record
    first = store.get(ids[0])
    assert first is not None and first.used_seq == 2
    assert store.mark_acked(5) == 0
    assert store.mark_used([ids[1]], 5) == 1  # used by an update acked before marking
    second = store.get(ids[1])
    assert second is not None and second.used_seq == 5 and second.acked
    assert store.mark_acked(2) == 2  # ids[0] and ids[2]
    assert store.mark_acked(2) == 0  # idempotent
    assert store.mark_used([], 3) == 0
    with pytest.raises(LocalProtocolError):
        store.mark_used(ids, -1)
    with pytest.raises(LocalProtocolError):
        store.mark_used(["1"], 3)  # type: ignore[list-item]


# ---------------------------------------------------------------------- typed errors


def _frame_adder(image: Any, boxes: Any = ()) -> Callable[[SampleStore], object]:
    return lambda s: s.add_frame(image, boxes)


BAD_ADDS: dict[str, Callable[[SampleStore], object]] = {
    "array wrong shape": lambda s: s.add(np.zeros((1, 8, 7), np.float32), 1),
    "array wrong ndim": lambda s: s.add(np.zeros((8, 8), np.float32), 1),
    "array float64": lambda s: s.add(np.zeros(SHAPE), 1),
    "array int": lambda s: s.add(np.zeros(SHAPE, np.int32), 1),
    "array as list": lambda s: s.add(np.zeros(SHAPE, np.float32).tolist(), 1),  # type: ignore[arg-type]
    "array NaN": lambda s: s.add(np.full(SHAPE, np.nan, np.float32), 1),
    "array Inf": lambda s: s.add(np.full(SHAPE, -np.inf, np.float32), 1),
    "label too big": lambda s: s.add(digit(0), N_CLASSES),
    "label negative": lambda s: s.add(digit(0), -1),
    "label float": lambda s: s.add(digit(0), 3.0),  # type: ignore[arg-type]
    "label numpy float": lambda s: s.add(digit(0), np.float32(3)),  # type: ignore[arg-type]
    "label bool": lambda s: s.add(digit(0), True),
    "label str": lambda s: s.add(digit(0), "3"),  # type: ignore[arg-type]
    "gesture wrong shape": lambda s: s.add_gesture(np.zeros((6, 3), np.float32), 1),
    "gesture NaN": lambda s: s.add_gesture(np.full(GESTURE, np.nan, np.float32), 1),
    "gesture label": lambda s: s.add_gesture(gesture(0), 11),
    "timestamp NaN": lambda s: s.add(digit(0), 1, timestamp=float("nan")),
    "timestamp str": lambda s: s.add(digit(0), 1, timestamp="now"),  # type: ignore[arg-type]
    "timestamp in ms": lambda s: s.add(digit(0), 1, timestamp=time.time() * 1000),
    "frame timestamp a week ahead": lambda s: s.add_frame(frame(0), timestamp=time.time() + 7 * 86_400),
    "frame float": _frame_adder(np.zeros((4, 4, 3), np.float32)),
    "frame grey": _frame_adder(np.zeros((4, 4), np.uint8)),
    "frame rgba": _frame_adder(np.zeros((4, 4, 4), np.uint8)),
    "frame empty": _frame_adder(np.zeros((0, 4, 3), np.uint8)),
    "frame oversized": _frame_adder(np.zeros((128, 128, 3), np.uint8)),
    "box right of frame": _frame_adder(frame(0), [[1, 0, 0, 16.5, 12]]),
    "box below frame": _frame_adder(frame(0), [[1, 0, 0, 16, 13]]),
    "box negative": _frame_adder(frame(0), [[1, -1, 0, 5, 5]]),
    "box degenerate": _frame_adder(frame(0), [[1, 3, 3, 3, 8]]),
    "box inverted": _frame_adder(frame(0), [[1, 8, 3, 2, 8]]),
    "box class fraction": _frame_adder(frame(0), [[1.5, 0, 0, 4, 4]]),
    "box class range": _frame_adder(frame(0), [[N_CLASSES, 0, 0, 4, 4]]),
    "box NaN": _frame_adder(frame(0), [[1, 0, np.nan, 4, 4]]),
    "box four columns": _frame_adder(frame(0), [[1, 0, 0, 4]]),
    "box empty rows": _frame_adder(frame(0), [[], []]),
    "box ragged": _frame_adder(frame(0), [[1, 0, 0, 4, 4], [1, 0]]),
    "box strings": _frame_adder(frame(0), [["1", "0", "0", "4", "4"]]),
    "unknown kind": lambda s: s.add_sample("audio", np.zeros(3, np.float32), 1),
}


def test_a_frame_has_at_most_max_boxes(db: Path) -> None:
    """A label with 10^6 boxes was stored (0.9 s) and then trained on; now MAX_BOXES per frame."""
    from edge_sdk.tasks.base import MAX_BOXES

    box = [1, 1, 1, 5, 5]
    with open_store(db) as s:
        assert s.add_frame(frame(0), [box] * MAX_BOXES) == 1
        with pytest.raises(InvalidSample, match=f"at most {MAX_BOXES} boxes"):
            s.add_frame(frame(1), [box] * (MAX_BOXES + 1))
        assert s.count("frame") == 1


@pytest.mark.parametrize("case", sorted(BAD_ADDS))
def test_rejected_add_is_typed_and_changes_nothing(db: Path, case: str) -> None:
    with open_store(db, max_frame_bytes=64 * 64 * 3, quota_bytes=10_000) as s:
        last = s.add(digit(0), 0)
        s.add_frame(frame(1), [[2, 1, 1, 5, 5]])
        s.set_meta("next_seq", 4)
        before = dump(db)
        with pytest.raises(InvalidSample):
            BAD_ADDS[case](s)
        assert dump(db) == before
        assert s.add(digit(2), 2) == last + 2  # not even an id was consumed


def test_unknown_kinds_in_queries(store: SampleStore) -> None:
    for call in (
        lambda: store.count("audio"),
        lambda: store.ids("audio"),
        lambda: store.arrays("x"),
    ):
        with pytest.raises(InvalidSample, match="unknown sample kind"):
            call()
    with pytest.raises(InvalidSample, match="frames"):
        store.arrays("frame")


def test_invalid_sample_is_a_local_error() -> None:
    assert issubclass(InvalidSample, LocalProtocolError)
    assert issubclass(SchemaVersionError, ConfigError)


# ---------------------------------------------------------------------- durability, schema


def test_metadata_survives_reopen(db: Path) -> None:
    with open_store(db) as s:
        assert s.get_meta("next_seq") is None and s.get_meta("next_seq", 0) == 0
        s.set_meta_many({"next_seq": 17, "trained_upto": 42})
        s.set_meta("loss", 0.25)
        s.set_meta("device", "hmd-7")
        s.set_meta("blob", b"\x00\x01")
        s.set_meta("next_seq", 18)
        for bad in (True, float("nan"), [1], None, 2**64):
            with pytest.raises(LocalProtocolError):
                s.set_meta("bad", bad)  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError):
            s.set_meta("", 1)
        with pytest.raises(LocalProtocolError):  # the batch is checked before anything is written
            s.set_meta_many({"trained_upto": 43, "bad": True})
    with open_store(db) as s:
        values = {k: s.get_meta(k) for k in ("next_seq", "trained_upto", "loss", "device", "blob")}
        assert values == {
            "next_seq": 18,
            "trained_upto": 42,
            "loss": 0.25,
            "device": "hmd-7",
            "blob": b"\x00\x01",
        }
        assert [type(v) for v in values.values()] == [int, int, float, str, bytes]
        assert s.get_meta("bad") is None


@pytest.mark.parametrize("how", ["read-only open", "file mode 0444"])
def test_a_store_that_cannot_be_written_is_refused_at_open(db: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite opens a file it may not write read-only without a word; the store then opened
    fine and every add failed (device durability audit, h103). Now the open says so, as a
    StorageError (not CorruptStore: recover=True must not move a sound store aside), and the
    file is unchanged."""
    with open_store(db) as s:
        s.add(digit(0), 1)
    before = dump(db)
    if how == "file mode 0444":
        if os.geteuid() == 0:
            pytest.skip("root writes a file whatever its mode")
        db.chmod(0o444)
    else:  # what SQLite does when the file's mode or a read-only mount denies writing
        connect = sqlite3.connect
        monkeypatch.setattr(sqlite3, "connect", lambda path, **kw: connect(f"file:{path}?mode=ro", uri=True, **kw))
    try:
        with pytest.raises(StorageError, match="cannot be written") as info:
            open_store(db, recover=True)
        assert not isinstance(info.value, CorruptStore)
    finally:
        db.chmod(0o644)
        monkeypatch.undo()
    assert dump(db) == before and not list(db.parent.glob("*.corrupt-*"))


def test_wal_and_synchronous_full(store: SampleStore, db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # synchronous is per connection: look at the store's own (private) one
    assert store._conn is not None
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_newer_schema_is_refused_clearly(db: Path) -> None:
    with open_store(db) as s:
        s.add(digit(0), 0)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
    before = dump(db)
    with pytest.raises(SchemaVersionError, match=f"version {SCHEMA_VERSION + 1}.*upgrade edgeci"):
        open_store(db)
    assert dump(db) == before


def test_foreign_files_are_refused(workdir: Path) -> None:
    other = workdir / "other.sqlite3"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
    with pytest.raises(ConfigError, match="not an edgeci sample store"):
        open_store(other)
    garbage = workdir / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StorageError):
        open_store(garbage)


def test_closed_store_refuses_calls(db: Path) -> None:
    with open_store(db) as s:
        s.add(digit(0), 0)
    assert s.closed
    s.close()  # idempotent
    for call in (
        lambda: s.add(digit(1), 1),
        s.count,
        lambda: s.get_meta("x"),
        lambda: list(s.frames()),
    ):
        with pytest.raises(StoreClosed):
            call()


# ---------------------------------------------------------------------- threads


def test_threads_share_one_store(store: SampleStore) -> None:
    n_writers, per_writer = 3, 40
    added: dict[int, tuple[int, int]] = {}  # id -> (writer, i)
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(n_writers + 1)

    def writer(w: int) -> None:
        try:
            start.wait()
            for i in range(per_writer):
                if i % 4 == 3:
                    sid = store.add_frame(frame(w * 1000 + i), [[w, 0, 0, 2, 2]])
                else:
                    sid = store.add(digit(w * 1000 + i), w, timestamp=float(i))
                with lock:
                    added[sid] = (w, i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def reader() -> None:
        try:
            start.wait()
            for seq in range(20):
                x, y = store.arrays()
                assert x.shape[0] == y.shape[0]
                store.mark_used(store.ids(), seq)
                store.set_meta("trained_upto", store.count())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(n_writers)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(added) == n_writers * per_writer == store.count()
    for sid, (w, i) in added.items():
        sample = store.get(sid)
        assert sample is not None
        if sample.kind == "frame":
            np.testing.assert_array_equal(sample.data, frame(w * 1000 + i))
        else:
            assert sample.label == w
            np.testing.assert_array_equal(sample.data, digit(w * 1000 + i))


# ---------------------------------------------------------------------- property


@dataclass
class Model:
    kind: str
    timestamp: float
    label: int | None
    data: np.ndarray
    boxes: np.ndarray
    nbytes: int
    used_seq: int | None = None
    acked: bool = False


TIMESTAMPS = st.sampled_from([0.0, 1.0, 2.0, 5.0, -3.0, None])  # None: the clock's now
CLOCKS = st.sampled_from([0.0, 3 * MAX_FUTURE_S])  # a clock a few days ahead, then set right (and back)
OPS = st.one_of(
    st.tuples(
        st.just("add"),
        st.sampled_from(["array", "gesture", "frame"]),
        st.integers(0, N_CLASSES - 1),
        TIMESTAMPS,
    ),
    st.tuples(st.just("mark_used"), st.lists(st.integers(0, 40), max_size=6), st.integers(0, 3)),
    st.tuples(st.just("mark_acked"), st.integers(0, 3)),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("clock"), CLOCKS),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(OPS, max_size=25),
    quota_samples=st.one_of(st.none(), st.integers(1, 6)),
    quota_bytes=st.one_of(st.none(), st.integers(400, 1500)),
)
@example(  # a label stamped by a clock days ahead, the clock set right: it goes before the older one
    ops=[("add", "array", 0, 0.0), ("clock", 3 * MAX_FUTURE_S), ("add", "array", 0, None), ("clock", 0.0),
         ("add", "array", 0, 0.0)],
    quota_samples=2, quota_bytes=None,
)
def test_any_op_sequence_matches_a_reference_model(
    ops: list[tuple[Any, ...]], quota_samples: int | None, quota_bytes: int | None
) -> None:
    model: dict[int, Model] = {}
    acked_updates: set[int] = set()
    issued: list[int] = []
    small_frame = (4, 5)
    clock = [0.0]

    def over() -> bool:
        too_many = quota_samples is not None and len(model) > quota_samples
        too_big = quota_bytes is not None and sum(m.nbytes for m in model.values()) > quota_bytes
        return too_many or too_big

    def evict_over_quota(protect: int | None) -> None:
        """Acknowledged first; within each class, stamped more than MAX_FUTURE_S ahead of the clock
        first; then the oldest timestamp, the lowest id."""
        while over():
            victim = min(
                (k for k in model if k != protect),
                key=lambda k: (not model[k].acked, model[k].timestamp <= clock[0] + MAX_FUTURE_S, model[k].timestamp, k),
            )
            del model[victim]

    with scratch_dir() as tmp:
        path = tmp / "p.sqlite3"

        def reopen() -> SampleStore:
            return open_store(path, quota_samples=quota_samples, quota_bytes=quota_bytes, clock=lambda: clock[0])

        s = reopen()
        try:
            for n_op, op in enumerate(ops):
                if op[0] == "add":
                    _, kind, label, ts = op
                    ts = clock[0] if ts is None else ts
                    if kind == "array":
                        data, boxes = digit(n_op), np.zeros((0, 5), np.float32)
                        sid = s.add(data, label, timestamp=ts)
                    elif kind == "gesture":
                        data, boxes = gesture(n_op), np.zeros((0, 5), np.float32)
                        sid = s.add_gesture(data, label, timestamp=ts)
                    else:
                        data = frame(n_op, *small_frame)
                        boxes = np.array([[label, 0, 1, 2, 3]], np.float32)
                        sid = s.add_frame(data, boxes, timestamp=ts)
                        label = None
                    assert not issued or sid > max(issued)
                    issued.append(sid)
                    stored = s.get(sid)
                    assert stored is not None  # the sample just added is never evicted
                    model[sid] = Model(kind, ts, label, data, boxes, stored.nbytes)
                    evict_over_quota(protect=sid)
                elif op[0] == "mark_used":
                    _, picks, seq = op
                    ids = [issued[p % len(issued)] for p in picks] if issued else []
                    assert s.mark_used(ids, seq) == len(set(ids) & model.keys())
                    for sid in set(ids) & model.keys():
                        m = model[sid]
                        m.used_seq = seq if m.used_seq is None else max(m.used_seq, seq)
                        m.acked = m.acked or seq in acked_updates
                elif op[0] == "mark_acked":
                    seq = op[1]
                    acked_updates.add(seq)
                    newly = [m for m in model.values() if m.used_seq == seq and not m.acked]
                    assert s.mark_acked(seq) == len(newly)
                    for m in newly:
                        m.acked = True
                elif op[0] == "clock":
                    clock[0] = op[1]
                else:
                    s.close()
                    s = reopen()
                    evict_over_quota(protect=None)

                # invariants after every step
                assert s.ids() == sorted(model)
                stats = s.stats()
                assert stats.count == len(model) == s.count()
                assert stats.added == len(issued) and stats.evicted == len(issued) - len(model)
                assert stats.nbytes == sum(m.nbytes for m in model.values())
                assert s.unused_count() == sum(m.used_seq is None for m in model.values())
                for kind in ("array", "gesture"):
                    want = [k for k in sorted(model) if model[k].kind == kind]
                    snap = s.snapshot(kind)
                    assert snap.ids.tolist() == want
                    assert snap.y.tolist() == [model[k].label for k in want]
                    assert snap.timestamps.tolist() == [model[k].timestamp for k in want]
                    if want:
                        np.testing.assert_array_equal(
                            snap.x, np.stack([model[k].data for k in want])
                        )
                frames = list(s.frames())
                want_frames = [model[k] for k in sorted(model) if model[k].kind == "frame"]
                assert len(frames) == len(want_frames)
                for (image, boxes), m in zip(frames, want_frames):
                    np.testing.assert_array_equal(image, m.data)
                    np.testing.assert_array_equal(boxes, m.boxes)
            for sid, m in model.items():
                stored = s.get(sid)
                assert stored is not None
                assert (stored.used_seq, stored.acked) == (m.used_seq, m.acked)
        finally:
            s.close()


# ---------------------------------------------------------------------- crash


def _load_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "store_crash_writer", HERE / "store_crash_writer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_ack(line: bytes) -> tuple[int, int]:
    """``b"<id> <i>"`` from the writer → ``(sample id, i)``."""
    sid, i = line.split()
    return int(sid), int(i)


def test_sigkill_loses_no_acknowledged_sample(tmp_path: Path) -> None:
    writer = _load_writer()
    db = tmp_path / "crash.sqlite3"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])])
    acknowledged: list[tuple[int, int]] = []  # (sample id, i)
    with (
        (tmp_path / "writer.stderr").open("wb") as stderr,
        subprocess.Popen(
            [sys.executable, str(HERE / "store_crash_writer.py"), str(db)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        ) as proc,
    ):
        watchdog = threading.Timer(60, proc.kill)  # never hang the suite on a stuck writer
        watchdog.start()
        try:
            assert proc.stdout is not None
            while len(acknowledged) < 60:
                line = proc.stdout.readline()
                if not line:
                    break
                acknowledged.append(parse_ack(line))
            proc.send_signal(signal.SIGKILL)  # mid-stream: it is busy adding the next ones
            rest = proc.stdout.read()  # lines acknowledged before the kill landed
            proc.wait()
        finally:
            watchdog.cancel()
    stderr_text = (tmp_path / "writer.stderr").read_text()
    assert proc.returncode == -signal.SIGKILL, stderr_text
    assert len(acknowledged) == 60, stderr_text
    acknowledged += [parse_ack(line) for line in rest.split(b"\n")[:-1]]  # drop a torn tail

    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    def check(sample: Any, i: int) -> None:
        kind, data, label, boxes = writer.expected_sample(i)
        assert (sample.kind, sample.label, sample.timestamp) == (kind, label, float(i))
        np.testing.assert_array_equal(sample.data, data)
        np.testing.assert_array_equal(sample.boxes, boxes)

    with writer.open_store(str(db)) as s:
        for sid, i in acknowledged:
            sample = s.get(sid)
            assert sample is not None, f"acknowledged sample {sid} (i={i}) lost"
            check(sample, i)
        # nothing torn either: every stored sample (the unacknowledged last one too) is whole
        held = s.ids()
        assert len(acknowledged) <= len(held) <= len(acknowledged) + 1
        for sid in held:
            sample = s.get(sid)
            assert sample is not None
            check(sample, int(sample.timestamp))
        last_i = s.get_meta("last_i")
        assert isinstance(last_i, int) and last_i >= acknowledged[-1][1]


def test_memory_store_for_emulated_fleets_needs_no_files() -> None:
    from edge_sdk.store import MEMORY

    with SampleStore.open(MEMORY, sample_shape=(1, 8, 8), n_classes=10) as mem:
        sid = mem.add(np.zeros((1, 8, 8), np.float32), 3)
        x, y = mem.arrays()
        assert mem.count() == 1 and y.tolist() == [3] and x.shape == (1, 1, 8, 8) and sid >= 1


# ---------------------------------------------------------------------- integrity at open


def test_random_bytes_are_a_corrupt_store_or_a_clean_restart(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edge_sdk.store import CorruptStore

    path = workdir / DEFAULT_FILENAME
    path.write_bytes(np.random.default_rng(3).bytes(64 * 1024))
    with pytest.raises(CorruptStore):
        open_store(path)
    assert path.read_bytes()[:4] != b"SQLi"  # refused without recover: nothing touched
    with caplog.at_level("WARNING", logger="edgeci.store"):
        s = open_store(workdir, recover=True)
    with s:
        assert s.recovered_from is not None and "not a database" in s.recovered_from["reason"]
        aside = Path(s.recovered_from["path"])
        assert aside.name.startswith(f"{DEFAULT_FILENAME}.corrupt-") and aside.stat().st_size == 64 * 1024
        assert any("corrupt" in r.getMessage() and str(aside) in r.getMessage() for r in caplog.records)
        assert len(s) == 0 and s.add(digit(1), 3) >= 1  # a clean, working store
    with open_store(workdir) as again:  # and it stays healthy
        assert again.recovered_from is None and len(again) == 1


def test_corrupt_pages_keep_the_counters_that_can_be_read(workdir: Path) -> None:
    path = workdir / DEFAULT_FILENAME
    with open_store(path) as s:
        for i in range(300):
            s.add(digit(i), i % N_CLASSES)
        s.set_meta_many({"next_seq": 41, "trained_upto": 250})
        added = s.stats().added
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the newest pages (sample payloads) are overwritten
        f.seek(size - 16 * 4096)
        f.write(np.random.default_rng(0).bytes(12 * 4096))
    with open_store(path, recover=True) as s:
        assert s.recovered_from is not None, "quick_check must catch the damaged pages"
        assert s.get_meta("next_seq") == 41 and s.get_meta("trained_upto") == 250
        assert s.stats().added == added and len(s) == 0
        assert s.add(digit(999), 1) > 300  # ids are never reused either


def test_counters_survive_a_store_that_is_all_garbage(workdir: Path) -> None:
    path = workdir / DEFAULT_FILENAME
    with open_store(path) as s:
        for i in range(5):
            s.add(digit(i), 1)
        s.set_meta_many({"next_seq": 77, "trained_upto": 5, "name": "kept only in SQLite"})
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))
    with open_store(path, recover=True) as s:
        assert s.recovered_from is not None
        assert s.get_meta("next_seq") == 77 and s.get_meta("trained_upto") == 5
        assert s.get_meta("name") is None  # unreadable, and not an integer counter
        assert s.stats().added == 5 and s.add(digit(9), 2) == 6  # totals and ids carry on too


def test_a_failing_counters_mirror_warns_once_per_streak_and_leaves_no_tmp(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A full disk fails the mirror's fsync on every save: one WARNING until a write succeeds
    (there was one per save), the half-written tmp removed (it held space), the previous
    mirror kept, and a note when it is mirrored again."""
    import edge_sdk.store as store_mod

    path = workdir / DEFAULT_FILENAME
    mirror = path.with_name(path.name + ".counters")
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".counters.tmp"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    with open_store(path) as s:
        s.set_meta("next_seq", 5)
        assert json.loads(mirror.read_text())["meta"]["next_seq"] == 5
        monkeypatch.setattr(store_mod.os, "fsync", full)
        with caplog.at_level(logging.WARNING, logger=store_mod.log.name):
            for seq in range(6, 11):
                s.set_meta("next_seq", seq)
            assert s.get_meta("next_seq") == 10  # the database holds the truth
            assert json.loads(mirror.read_text())["meta"]["next_seq"] == 5  # the last mirror that was written
            assert not list(workdir.glob(".*.tmp")), "a failed write must not leave its tmp on a full disk"
            failing = [r for r in caplog.records if "could not mirror" in r.getMessage()]
            assert len(failing) == 1 and "No space left" in failing[0].getMessage()
            monkeypatch.setattr(store_mod.os, "fsync", real_fsync)
            s.set_meta("next_seq", 11)
            assert json.loads(mirror.read_text())["meta"]["next_seq"] == 11
            assert any("mirrored to" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)
            monkeypatch.setattr(store_mod.os, "fsync", full)  # a new streak warns again
            s.set_meta("next_seq", 12)
            assert len([r for r in caplog.records if "could not mirror" in r.getMessage()]) == 2


def test_counters_below_their_mirror_are_raised_at_open(workdir: Path) -> None:
    """helper-104: a recovery whose clean store could not take the salvaged counters (a full
    disk) left a valid empty store; the next start read next_seq from it (None: seqs from 0,
    acked as duplicates and never applied), since the mirror was read only when recovering.
    Every open now raises counters below the mirror's (here: the database file deleted)."""
    path = workdir / DEFAULT_FILENAME
    with open_store(path, counters=("next_seq", "trained_upto")) as s:
        ids = [s.add(digit(i), 1) for i in range(30)]
        s.set_meta_many({"next_seq": 500, "trained_upto": 30})
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    with open_store(path, counters=("next_seq", "trained_upto")) as s:
        assert s.get_meta("next_seq") == 500 and s.get_meta("trained_upto") == 30
        assert s.add(digit(99), 2) > max(ids)  # sample ids are not reused either
    with open_store(path, counters=("next_seq", "trained_upto")) as s:  # caught up once: nothing to say again
        assert s.get_meta("next_seq") == 500


def test_a_new_store_is_never_opened_in_the_full_disk_mode(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """helper-104: the first attempt creates the file, so "it exists" was true for a new store
    on a nearly full disk, which then opened in exclusive mode; and a locked or corrupt store
    was opened twice. The fallback is for a store that existed before, on a full disk only."""
    import edge_sdk.store as store_mod

    calls: list[bool] = []

    def failing(cls: type, db_path: Path, settings: Any, counters: Any, *, exclusive: bool) -> Any:
        calls.append(exclusive)
        db_path.write_bytes(b"")  # what SQLite's attempt leaves behind
        raise store_mod.StorageError("cannot use it: disk I/O error")

    monkeypatch.setattr(store_mod.SampleStore, "_connect", classmethod(failing))
    monkeypatch.setattr(store_mod, "_full_disk_hint", lambda path: " (its disk is full)")
    with pytest.raises(store_mod.StorageError, match="disk I/O error"):
        open_store(workdir / "new.sqlite3")
    assert calls == [False]


# ---------------------------------------------------------------------- guards without a test (helper-116)
# Each test below fails with its guard removed from edge_sdk/store.py (checked one at a time).


def test_an_empty_file_next_to_a_counters_mirror_is_a_corrupt_store(workdir: Path) -> None:
    """A store truncated to 0 bytes: SQLite would quietly make a new store of it. The mirror says
    it held one, so it is corrupt (moved aside with recover=True, counters carried over)."""
    path = workdir / DEFAULT_FILENAME
    with open_store(path, counters=("next_seq",)) as s:
        s.add(digit(1), 1)
        s.set_meta("next_seq", 9)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    path.write_bytes(b"")
    with pytest.raises(CorruptStore, match="is empty"):
        open_store(path, counters=("next_seq",))
    with open_store(path, counters=("next_seq",), recover=True) as s:
        assert s.recovered_from is not None and "is empty" in s.recovered_from["reason"]
        assert s.get_meta("next_seq") == 9 and s.add(digit(2), 2) == 2


def _edit(path: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Change a closed store's rows behind its back (bit rot, another writer, an old bug)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for sql, args in statements:
            conn.execute(sql, args)
        conn.commit()


NAN_F4 = np.full(SHAPE, np.nan, np.float32).tobytes()


@pytest.mark.parametrize(("column", "value"), [
    ("data", b"\x00" * 12),          # bytes that do not make the declared shape
    ("data", NAN_F4),                # values add() refuses
    ("encoding", "f8"),              # an encoding this store never writes for arrays
    ("shape", "{not json"),          # an unreadable shape
    ("shape", "[1, 4, 4]"),          # another shape than the store's
    ("boxes", b"\x00" * 7),          # box bytes that are not whole rows
    ("label", 99),                   # a class beyond n_classes
])
def test_a_damaged_stored_sample_is_a_storage_error_and_left_out_of_training(db: Path, column: str, value: object) -> None:
    """Every stored row is checked as add() checked it: get() raises StorageError (not a bare
    ValueError, nor NaN handed back), snapshot() leaves the row out (said once) and trains on the others."""
    with open_store(db) as s:
        ids = [s.add(digit(i), i) for i in range(3)]
    table = "sample_data" if column in ("data", "boxes") else "samples"
    _edit(db, (f"UPDATE {table} SET {column} = ? WHERE id = ?", (value, ids[1])))
    with open_store(db) as s:
        snap = s.snapshot()
        if column != "boxes":  # (arrays train without their boxes)
            assert snap.ids.tolist() == [ids[0], ids[2]] and np.isfinite(snap.x).all() and s.unreadable == {ids[1]}
        if column not in ("shape", "label") or value == "{not json":  # (get() reads any shape and the raw label)
            with pytest.raises(StorageError):
                s.get(ids[1])


@pytest.mark.parametrize(("column", "value"), [
    ("data", b"not zlib at all"),
    ("encoding", "jpeg"),
    ("shape", "[9, 9, 3]"),
])
def test_a_damaged_stored_frame_is_a_storage_error_and_skipped(db: Path, column: str, value: object) -> None:
    with open_store(db, frame_encoding="npy") as s:
        ids = [s.add_frame(frame(i), np.zeros((0, 5), np.float32)) for i in range(3)]
    table = "sample_data" if column == "data" else "samples"
    _edit(db, (f"UPDATE {table} SET {column} = ? WHERE id = ?", (value, ids[1])))
    with open_store(db, frame_encoding="npy") as s:
        assert len(list(s.frames())) == 2 and s.unreadable == {ids[1]}
        with pytest.raises(StorageError):
            s.get(ids[1])


@pytest.mark.parametrize(("sql", "args"), [
    ("UPDATE settings SET value = ? WHERE key = 'n_classes'", ("{not json",)),
    ("UPDATE settings SET value = ? WHERE key = 'n_classes'", ('"ten"',)),
    ("UPDATE settings SET value = ? WHERE key = 'sample_shape'", ("[0, 8]",)),
    ("UPDATE totals SET n = ?", (-3,)),
    ("DELETE FROM totals WHERE one = ?", (1,)),
    ("UPDATE meta SET value = ? WHERE key = 'next_seq'", ("seven",)),
    ("INSERT INTO settings (key, value) VALUES ('later', ?)", ("{not json",)),
])
def test_settings_totals_and_counters_this_module_never_wrote_are_a_corrupt_store(db: Path, sql: str, args: tuple[Any, ...]) -> None:
    with open_store(db, counters=("next_seq",)) as s:
        s.add(digit(1), 1)
        s.set_meta("next_seq", 4)
    _edit(db, (sql, args))
    with pytest.raises(CorruptStore):
        open_store(db, counters=("next_seq",))
    with open_store(db, counters=("next_seq",), recover=True) as s:  # a recovery keeps what is a counter
        assert s.recovered_from is not None and s.get_meta("next_seq") == 4
    with open_store(db, counters=("next_seq",)) as s:  # and the clean store opens as it is
        assert s.recovered_from is None and s.get_meta("next_seq") == 4


def test_a_counters_mirror_with_values_that_are_not_counters_is_ignored(workdir: Path) -> None:
    path = workdir / DEFAULT_FILENAME
    with open_store(path, counters=("next_seq",)) as s:
        s.add(digit(1), 1)
        s.set_meta("next_seq", 4)
    path.with_name(path.name + ".counters").write_text(json.dumps({"added": -5, "last_id": "x", "meta": {"next_seq": "abc"}}))
    with open_store(path, counters=("next_seq",)) as s:
        assert s.get_meta("next_seq") == 4 and s.add(digit(2), 2) == 2


def test_a_write_that_fails_midway_is_rolled_back_and_the_store_goes_on(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_store(db, quota_samples=5) as s:
        s.add(digit(1), 1)

        def broken(*args: object, **kwargs: object) -> int:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(SampleStore, "_evict", broken)
        with pytest.raises(StorageError):  # (raised in the transaction, after the sample's rows went in)
            s.add(digit(2), 2)
        monkeypatch.undo()
        assert len(s) == 1 and s.stats().added == 1 and s.ids() == [1]
        s.add(digit(3), 3)  # no transaction left open
        assert len(s) == 2 and s.stats().added == 2


def test_sqlite_errors_on_reads_are_storage_errors(store: SampleStore) -> None:
    class Failing:
        def execute(self, *args: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

    real, store._conn = store._conn, Failing()  # type: ignore[assignment]
    try:
        with pytest.raises(StorageError, match="disk I/O error"):
            store.count()
    finally:
        store._conn = real


def test_a_store_on_a_file_system_without_wal_is_refused(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_sdk.store as store_mod

    class NoWal(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            if sql.startswith("PRAGMA journal_mode"):
                return super().execute("SELECT 'delete'")
            return super().execute(sql, *args)

    real = sqlite3.connect
    monkeypatch.setattr(store_mod.sqlite3, "connect", lambda *a, **k: real(*a, factory=NoWal, **k))
    with pytest.raises(ConfigError, match="refused WAL"):
        open_store(db)


def test_an_existing_store_on_a_full_disk_opens_in_exclusive_mode(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite cannot make the -shm of a store that existed before the disk filled: it opens in
    exclusive mode (no -shm) and serves reads; the disk-full error was all a start said."""
    import edge_sdk.store as store_mod

    path = workdir / DEFAULT_FILENAME
    with open_store(path) as s:
        s.add(digit(1), 1)
    real = store_mod.SampleStore._connect.__func__  # type: ignore[attr-defined]

    def no_shm(cls: type, db_path: Path, settings: Any, counters: Any, *, exclusive: bool) -> Any:
        if not exclusive:
            raise store_mod.StorageError("cannot use it: disk I/O error")
        return real(cls, db_path, settings, counters, exclusive=True)

    monkeypatch.setattr(store_mod.SampleStore, "_connect", classmethod(no_shm))
    monkeypatch.setattr(store_mod, "_full_disk_hint", lambda path: " (its disk is full)")
    with open_store(path) as s:
        assert s.full_at_open and len(s) == 1 and s.snapshot().ids.tolist() == [1]


def test_a_damaged_page_that_opening_does_not_read_is_caught_by_the_integrity_check(db: Path) -> None:
    """Only ``PRAGMA quick_check`` reads every page at open: a rotten leaf of the payload table
    would otherwise fail training later, one snapshot at a time, instead of a recovery now."""
    with open_store(db) as s:
        for i in range(200):
            s.add(digit(i), i % N_CLASSES)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [p for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name = 'sample_data' AND pagetype = 'leaf'")]
    assert len(pages) > 4
    with open(db, "r+b") as f:
        f.seek((pages[len(pages) // 2] - 1) * page_size + 8)  # the cells, behind an intact page header
        f.write(np.random.default_rng(0).bytes(page_size - 8))
    with pytest.raises(CorruptStore, match="integrity check"):
        open_store(db)


def test_a_recovery_without_a_mirror_carries_over_only_counters_that_are_counters(db: Path) -> None:
    """A counter that holds a non-count ('seven') is what made the store corrupt: salvaged as it
    was, the clean store would hold it too and be corrupt again at the next open."""
    with open_store(db, counters=("next_seq",)) as s:
        s.add(digit(1), 1)
        s.set_meta_many({"next_seq": 4, "note": "kept"})
    db.with_name(db.name + ".counters").unlink()
    _edit(db, ("UPDATE meta SET value = ? WHERE key = 'next_seq'", ("seven",)))
    with open_store(db, counters=("next_seq",), recover=True) as s:
        assert s.recovered_from is not None and s.get_meta("next_seq") is None and s.get_meta("note") == "kept"
    with open_store(db, counters=("next_seq",)) as s:
        assert s.recovered_from is None
