"""SampleStore — the device's durable store of labelled samples (SQLite, WAL mode).

Raw samples never leave the device, so this file *is* the device's training set: every
labelled sample, which update used it, and the device's protocol counters (``next_seq``,
``trained_upto``) in a small key/value table. It lives in the SDK's data dir
(:data:`DEFAULT_FILENAME` when :meth:`SampleStore.open` is given a directory).

Sample kinds
------------
* ``"array"``   — a float32 array of the fixed ``sample_shape`` declared at open (e.g. a
  digits image ``(1, 8, 8)``) and one class label.
* ``"frame"``   — an HxWx3 uint8 camera frame, stored losslessly encoded (PNG via OpenCV when
  ``cv2`` imports, else zlib-compressed ``.npy``), with zero or more boxes
  ``(class_id, x1, y1, x2, y2)`` in pixels: ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``.
* ``"gesture"`` — a float32 ``(T, D)`` sequence of the fixed ``gesture_shape`` declared at
  open and one class label. Apps resample variable-length recordings to T; the store does
  not guess a resampling policy.

Every sample has a timestamp chosen by the caller (the wall clock is read only at the API
boundary, when none is given); one more than :data:`MAX_FUTURE_S` (a day) ahead of the clock is
an :class:`~edge_sdk.errors.InvalidSample` (milliseconds for seconds, a wrong clock): eviction
goes oldest first, so it would outlive every label made after it. Ids are never reused, even
after eviction — within a store: after a recovery from a file whose pages are all garbage (below)
the ids and the ``added`` total come from the counters mirror, written at ``set_meta*``, so ids
handed out after its last write may be given again; nothing of the old store (samples, the SCC
features kept by id in its meta) is left for them to collide with (helper-144).

Durability
----------
Every mutating call commits before it returns, in WAL mode with ``synchronous=FULL`` (the
WAL is fsynced at each commit): once ``add*``, ``mark_*`` or ``set_meta*`` has returned,
the change survives a SIGKILL of the process and, as far as the disk honours fsync, a power
cut. A rejected call (typed error) changes nothing. A durable add therefore costs one
fsync of the WAL plus ~0.06 ms of CPU for a digits-sized sample (measured: 4.0 ms median
on a VM disk whose bare fsync takes 4.0 ms; 0.06 ms on tmpfs); a 640x480 frame adds
~10-20 ms of PNG encoding, done outside the lock. ``tests/test_store.py`` SIGKILLs a writer
mid-stream and checks every acknowledged sample.

Eviction policy
---------------
Quotas bound the number of samples (``quota_samples``) and their stored payload bytes
(``quota_bytes``: encoded data plus boxes, not SQLite's own overhead). When an add takes
the store over a quota, samples are evicted in the same transaction, in this order:

1. samples already used by an *acknowledged* update (their information has reached the
   coordinator), oldest timestamp first;
2. then any other sample, oldest timestamp first;

ties broken by the lower id. Within each of the two, a sample stamped more than
:data:`MAX_FUTURE_S` ahead of the store's clock goes first (by timestamp, then id): the clock
itself was ahead when it was labelled (a device booted with a wrong time, then NTP set it right),
and oldest-first would keep it past every label made after it (helper-153: quota 4, four such
labels, then four fresh ones kept one fresh label). The sample just added is never evicted; a sample that alone
exceeds ``quota_bytes`` is rejected with :class:`~edge_sdk.errors.InvalidSample` instead.
Quotas are runtime policy, not stored: reopening with lower quotas evicts at open, by the
same order.

"Used by an acknowledged update": :meth:`SampleStore.mark_used` records on each sample the
latest update (sequence number) that trained on it; :meth:`SampleStore.mark_acked` flags
every sample whose latest update is the acknowledged one, and the flag sticks. A sample
re-used by a newer update before the older update's ack arrives is flagged only when the
newer one is acknowledged — conservative: it may stay longer, it never leaves early.

Integrity
---------
:meth:`SampleStore.open` runs ``PRAGMA quick_check``, then checks what it cannot see: the
totals row, the settings and the caller's ``counters`` meta hold values this module writes.
A file SQLite can only read (its mode, a read-only mount) is a :class:`StorageError` at open,
not at the first add. A file that is not SQLite, is corrupt, or is empty (0 bytes) next to a counters mirror (see
below) raises :class:`CorruptStore`, unless ``recover=True`` (what the SDK client uses):
then the file (with its ``-wal``/``-shm``) is moved aside to
``samples.sqlite3.corrupt-<UTC time>``, the counters that can still be read are carried
over (the caller's meta such as ``next_seq``, the ``added`` total, the last sample id, so
no counter goes backwards; integer meta is also mirrored in ``samples.sqlite3.counters`` at
every ``set_meta*``, for a file whose every page is garbage), a WARNING says so, and the store starts clean;
``store.recovered_from`` describes what happened.

Threads
-------
One SQLite connection guarded by a lock, so any thread may call any method. Validation and
frame encoding/decoding run outside the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, TypeAlias, cast, get_args

import numpy as np
import numpy.typing as npt

from edge_sdk.errors import ConfigError, EdgeciError, InvalidSample, LocalProtocolError
from edge_sdk.tasks.base import MAX_BOXES

SampleKind = Literal["array", "frame", "gesture"]
KINDS: Final[tuple[str, ...]] = get_args(SampleKind)
FrameEncoding = Literal["auto", "png", "npy"]
MetaValue: TypeAlias = int | float | str | bytes

Boxes: TypeAlias = npt.NDArray[np.float32]
"""``(N, 5)`` float32 rows ``(class_id, x1, y1, x2, y2)``, pixel coordinates."""

SCHEMA_VERSION: Final = 1
DEFAULT_FILENAME: Final = "samples.sqlite3"
MEMORY: Final = ":memory:"
"""Open with this path for a non-durable in-memory store (fleet emulation only)."""
DEFAULT_MAX_FRAME_BYTES: Final = 1920 * 1080 * 3
DEFAULT_QUOTA_BYTES: Final = 512 * 1024 * 1024
_INT64_MAX: Final = 2**63 - 1
_MAX_BOX_CLASS: Final = 2**24  # box class ids travel as float32, exact up to 2**24
_NO_BOXES: Final = b""
MAX_FUTURE_S: Final = 86_400.0
"""How far ahead of the store's clock a caller's timestamp may be (clock skew, time zones)."""


class SchemaVersionError(ConfigError):
    """The database was written by a newer edgeci (its ``user_version`` is above ours)."""


class StorageError(EdgeciError):
    """The database could not be read or written: not SQLite, corrupt, disk full, I/O error."""


class CorruptStore(StorageError):
    """The file is not an SQLite database, or SQLite's integrity check fails."""


log = logging.getLogger("edgeci.store")


class StoreClosed(LocalProtocolError):
    """A method was called on a store after :meth:`SampleStore.close`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredSample:
    """One sample as stored: decoded data plus its bookkeeping."""

    id: int
    kind: SampleKind
    timestamp: float
    label: int | None
    """Class label; ``None`` for frames (their classes are in ``boxes``)."""
    data: npt.NDArray[Any]
    """float32 for arrays and gestures, HxWx3 uint8 for frames."""
    boxes: Boxes
    """``(N, 5)``; empty for arrays and gestures."""
    nbytes: int
    """Payload bytes counted against ``quota_bytes``."""
    used_seq: int | None
    """The latest update that trained on this sample, ``None`` if none has."""
    acked: bool
    """Some update that used this sample has been acknowledged."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """All samples of one labelled kind, in insertion (id) order, read in one transaction."""

    ids: npt.NDArray[np.int64]
    timestamps: npt.NDArray[np.float64]
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStats:
    count: int
    nbytes: int
    unused: int
    added: int
    """Samples ever accepted (monotonic, unlike ``count``, which eviction lowers)."""
    evicted: int


@dataclass(frozen=True, slots=True)
class _Row:
    """A validated, encoded sample ready to insert."""

    kind: SampleKind
    timestamp: float
    label: int | None
    shape: tuple[int, ...]
    encoding: str
    data: bytes
    boxes: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.boxes)


_SCHEMA_V1: Final = """
CREATE TABLE samples (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused
    kind     TEXT    NOT NULL CHECK (kind IN ('array', 'frame', 'gesture')),
    ts       REAL    NOT NULL,
    label    INTEGER,                            -- NULL for frames
    shape    TEXT    NOT NULL,                   -- JSON list, checked again on decode
    encoding TEXT    NOT NULL,                   -- 'f4' | 'png' | 'npy.zlib'
    nbytes   INTEGER NOT NULL CHECK (nbytes >= 0),
    used_seq INTEGER,                            -- latest update that trained on it
    acked    INTEGER NOT NULL DEFAULT 0 CHECK (acked IN (0, 1))
);
-- payloads apart, so counting, eviction scans and mark_used touch only small rows
CREATE TABLE sample_data (
    id    INTEGER PRIMARY KEY,
    data  BLOB NOT NULL,
    boxes BLOB NOT NULL
);
CREATE INDEX samples_by_kind ON samples (kind, id);
CREATE INDEX samples_by_eviction ON samples (acked DESC, ts, id);
CREATE INDEX samples_by_update ON samples (used_seq);  -- also counts used_seq IS NULL
CREATE TABLE acked_updates (seq INTEGER PRIMARY KEY);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- the store's own
CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);           -- the caller's
CREATE TABLE totals (
    one     INTEGER PRIMARY KEY CHECK (one = 1),
    n       INTEGER NOT NULL,
    nbytes  INTEGER NOT NULL,
    added   INTEGER NOT NULL,
    evicted INTEGER NOT NULL
);
INSERT INTO totals VALUES (1, 0, 0, 0, 0);
CREATE TRIGGER samples_inserted AFTER INSERT ON samples BEGIN
    UPDATE totals SET n = n + 1, nbytes = nbytes + NEW.nbytes, added = added + 1;
END;
-- samples leave only by eviction
CREATE TRIGGER samples_deleted AFTER DELETE ON samples BEGIN
    UPDATE totals SET n = n - 1, nbytes = nbytes - OLD.nbytes, evicted = evicted + 1;
    DELETE FROM sample_data WHERE id = OLD.id;
END;
"""

_MIGRATIONS: Final[dict[int, str]] = {0: _SCHEMA_V1}
"""Script that takes ``user_version`` k to k + 1."""


@functools.cache
def _cv2() -> Any:
    """OpenCV if it imports (it is an optional dependency), else ``None``; imported lazily."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def png_available() -> bool:
    """Whether frames can be PNG-encoded here (OpenCV imports)."""
    return _cv2() is not None


class SampleStore:
    """Durable, thread-safe store of a device's labelled samples. Build with :meth:`open`."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        sample_shape: tuple[int, ...] | None,
        gesture_shape: tuple[int, ...] | None,
        n_classes: int | None,
        max_frame_bytes: int,
        quota_samples: int | None,
        quota_bytes: int | None,
        frame_encoding: FrameEncoding,
        clock: Callable[[], float],
        task: str | None = None,
    ) -> None:
        """Private: use :meth:`open`, which validates the arguments and prepares ``conn``."""
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._lock = threading.RLock()
        self._shapes: dict[str, tuple[int, ...] | None] = {
            "array": sample_shape,
            "gesture": gesture_shape,
        }
        self._n_classes = n_classes
        self._max_frame_bytes = max_frame_bytes
        self._quota_samples = quota_samples
        self._quota_bytes = quota_bytes
        self._frame_encoding = frame_encoding
        self._clock = clock
        self._task = task
        self._said_untrained = False
        self._latest_ts: float | None = None
        """At least every stored timestamp (None: not read yet): eviction looks for samples stamped
        ahead of the clock only when this is."""
        self.unreadable: set[int] = set()
        """Ids of stored samples that no longer decode (bit-rot: bad bytes, NaN, a label out of
        range): left out of :meth:`snapshot` and :meth:`frames`, each logged once, so one bad
        row does not fail every training round. They stay until evicted."""
        self.recovered_from: dict[str, Any] | None = None
        """Set when :meth:`open` found the file corrupt and started clean (``recover=True``):
        where the old file went, why, and which counters were carried over."""
        self.full_at_open = False
        """Opened on a full disk (SQLite's exclusive mode: locked to this process until closed);
        writes raise StorageError until there is room."""

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        sample_shape: Sequence[int] | None = None,
        gesture_shape: Sequence[int] | None = None,
        n_classes: int | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        quota_samples: int | None = None,
        quota_bytes: int | None = DEFAULT_QUOTA_BYTES,
        frame_encoding: FrameEncoding = "auto",
        clock: Callable[[], float] = time.time,
        recover: bool = False,
        counters: Sequence[str] = (),
        task: str | None = None,
    ) -> SampleStore:
        """Open (creating if needed) the store at ``path``: the database file, or an
        existing directory (the SDK's data dir) to hold :data:`DEFAULT_FILENAME`.

        ``sample_shape``, ``gesture_shape`` and ``n_classes`` are remembered in the file:
        omit them to reuse the stored ones; a different shape is a :class:`ConfigError`
        (it would be another task), ``n_classes`` may only grow. ``max_frame_bytes``
        bounds a frame's raw pixels (H*W*3). ``None`` disables a quota. ``frame_encoding``
        ``"auto"`` is PNG when OpenCV imports, else ``"npy"``; decoding follows each
        stored sample's own encoding. ``clock`` supplies default timestamps.
        ``recover``: a corrupt file is moved aside and the store starts clean, keeping the
        counters it can read (see *Integrity* above) instead of raising :class:`CorruptStore`.
        ``counters``: meta keys that, where set, must hold an int >= 0 (the caller's protocol
        counters, e.g. ``next_seq``): any other value there means the file is corrupt.
        ``task``: the task whose samples the store holds (the SDK client's), remembered in the
        file; a store of another task is a :class:`ConfigError`, found before anything is
        written. A store from before tasks were remembered counts as another task's when it
        holds or declares samples of a kind the caller does not declare.
        """
        sample_shape_t = _check_shape("sample_shape", sample_shape, ndim=None)
        gesture_shape_t = _check_shape("gesture_shape", gesture_shape, ndim=2)
        check_quota("n_classes", n_classes)
        check_quota("quota_samples", quota_samples)
        check_quota("quota_bytes", quota_bytes)
        check_quota("max_frame_bytes", max_frame_bytes)
        if frame_encoding not in get_args(FrameEncoding):
            raise ConfigError(f"frame_encoding must be one of {get_args(FrameEncoding)}")
        if frame_encoding == "png" and not png_available():
            raise ConfigError("frame_encoding='png' needs OpenCV (cv2), which does not import")

        db_path = Path(path)
        if str(path) == MEMORY:
            pass  # non-durable, for emulated fleets: no files, no fsync
        elif db_path.is_dir():
            db_path = db_path / DEFAULT_FILENAME
        else:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = dict(
            sample_shape=sample_shape_t,
            gesture_shape=gesture_shape_t,
            n_classes=n_classes,
            max_frame_bytes=max_frame_bytes,
            quota_samples=quota_samples,
            quota_bytes=quota_bytes,
            frame_encoding=frame_encoding,
            clock=clock,
            task=task,
        )
        counter_keys = tuple(_check_meta_key(k) for k in counters)
        try:
            opened = cls._open_file(db_path, settings, counter_keys)
        except CorruptStore as exc:
            if not recover or str(path) == MEMORY:
                raise
            reason = str(exc)
        else:
            if str(path) != MEMORY:
                try:
                    opened._catch_up(counter_keys)
                except BaseException:
                    opened.close()
                    raise
            return opened
        aside = _move_aside(db_path)
        salvaged = _salvage(aside, counter_keys)
        mirrored = _read_counters(db_path)  # never below the mirrored counters
        meta = salvaged.setdefault("meta", {})
        for key, value in mirrored.get("meta", {}).items():
            if not isinstance(meta.get(key, 0), int) or value > meta.get(key, 0):
                meta[key] = value
        for key in ("added", "last_id"):
            salvaged[key] = max(int(salvaged.get(key, 0)), int(mirrored.get(key, 0)))
        log.warning(
            "sample store %s was corrupt (%s): moved it aside to %s and started a clean store; "
            "kept counters %s; its samples are lost to training",
            db_path, reason, aside, salvaged.get("meta", {}),
        )
        store = cls._open_file(db_path, settings, counter_keys)
        try:
            store._carry_over(salvaged)
        except BaseException:  # (a full disk: the connection, in exclusive mode, would hold the file locked)
            store.close()
            raise
        store.recovered_from = {"path": str(aside), "reason": reason, "salvaged": salvaged}
        return store

    @classmethod
    def _open_file(cls, db_path: Path, settings: dict[str, Any], counters: tuple[str, ...]) -> SampleStore:
        size = db_path.stat().st_size if str(db_path) != MEMORY and db_path.is_file() else None
        if size == 0 and _read_counters(db_path):
            # SQLite would make a new store of it, and counters would go backwards, ids be reused
            raise CorruptStore(f"{db_path} is empty, but its counters mirror says it held a store")
        existed = bool(size)  # (before the attempt, which makes the file)
        try:
            return cls._connect(db_path, settings, counters, exclusive=False)
        except CorruptStore:
            raise
        except StorageError as exc:
            if not existed or "locked" in str(exc) or not _full_disk_hint(db_path):
                raise
            first = exc
        # A store that exists, on a disk that filled while it was closed: SQLite cannot make its
        # -shm to open it, but in exclusive locking mode it keeps that index in memory. The store
        # opens; every write fails (StorageError, as on a disk that fills while open) until there
        # is room again, and the device can serve its saved model meanwhile.
        try:
            store = cls._connect(db_path, settings, counters, exclusive=True)
        except StorageError:
            raise first from None
        store.full_at_open = True
        log.warning("sample store %s opened on a full disk (%s bytes free): labels are refused until there is room; "
                    "it is locked to this process meanwhile (SQLite's exclusive mode: no -shm file)",
                    db_path, _free_bytes(db_path))
        return store

    @classmethod
    def _connect(cls, db_path: Path, settings: dict[str, Any], counters: tuple[str, ...], *, exclusive: bool) -> SampleStore:
        try:
            conn = sqlite3.connect(
                str(db_path), timeout=10.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {db_path}: {exc}{_full_disk_hint(db_path)}") from exc
        try:
            if exclusive:
                conn.execute("PRAGMA locking_mode = EXCLUSIVE")  # before the first WAL access: no -shm
            _prepare(conn, db_path)
            _check_integrity(conn, db_path)
            _check_contents(conn, db_path, counters)
            _check_writable(conn, db_path, full_ok=exclusive)
            store = cls(conn, db_path, **settings)
            with store._write() as c:
                store._reconcile_settings(c)
                store._evict(c, protect=None)
        except BaseException:
            conn.close()
            raise
        return store

    def _catch_up(self, counters: tuple[str, ...]) -> None:
        """Counters below their mirror mean the database lost what it held — a recovery whose
        clean store could not take the salvaged counters (a full disk), a file replaced:
        raise them to the mirror's (sequence numbers and sample ids are never reused)."""
        mirrored = _read_counters(self._path)
        meta = mirrored.get("meta", {})
        held = {key: self.get_meta(key) for key in counters}
        behind: dict[str, MetaValue] = {}
        for key, now in held.items():
            value = meta.get(key)
            if isinstance(value, int) and (not isinstance(now, int) or value > now):
                behind[key] = value
        with self._read() as c:
            row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'samples'").fetchone()
        last_id, mirrored_id = int(row[0]) if row else 0, int(mirrored.get("last_id", 0))
        if not behind and mirrored_id <= last_id:
            return
        log.warning("sample store %s: counters %s below their mirror %s (the database lost them): raised to the mirror's",
                    self._path, {k: held[k] for k in behind}, behind)
        with self._write() as c:
            _set_counters(c, behind, mirrored_id if mirrored_id > last_id else 0)

    def _carry_over(self, salvaged: Mapping[str, Any]) -> None:
        """After a recovery: counters never go backwards (meta, added total, sample ids)."""
        meta = {str(k): v for k, v in salvaged.get("meta", {}).items()}
        added, last_id = int(salvaged.get("added", 0)), int(salvaged.get("last_id", 0))
        with self._write() as c:
            _set_counters(c, meta, last_id)
            c.execute("UPDATE totals SET added = ?, evicted = ?", (added, added))

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the connection (idempotent). Everything returned before is already durable."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.close()
                _MIRROR_FAILING.discard(str(_counters_path(self._path)))  # a store opened again warns afresh

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return self.count()

    # ------------------------------------------------------------------ adding

    def add(self, x: npt.NDArray[Any], label: int, *, timestamp: float | None = None) -> int:
        """Durably add a class-labelled float32 array of the declared ``sample_shape``."""
        ts = self._timestamp(timestamp)
        shape = self._declared_shape("array")
        data = _encode_values(x, shape, "array")
        row = _Row("array", ts, self._check_label(label, "label"), shape, "f4", data, _NO_BOXES)
        return self._insert(row)

    def add_gesture(
        self, seq: npt.NDArray[Any], label: int, *, timestamp: float | None = None
    ) -> int:
        """Durably add a class-labelled float32 (T, D) sequence of the declared ``gesture_shape``."""
        ts = self._timestamp(timestamp)
        shape = self._declared_shape("gesture")
        data = _encode_values(seq, shape, "gesture")
        row = _Row("gesture", ts, self._check_label(label, "label"), shape, "f4", data, _NO_BOXES)
        return self._insert(row)

    def add_frame(
        self,
        image: npt.NDArray[Any],
        boxes: npt.ArrayLike | None = (),
        *,
        timestamp: float | None = None,
    ) -> int:
        """Durably add an HxWx3 uint8 frame with ``(class_id, x1, y1, x2, y2)`` pixel boxes.

        ``boxes`` is ``(N, 5)`` array-like (``()`` or ``None`` for none); class ids are integers
        (integral floats pass), below ``n_classes`` when set; corners satisfy ``0 <= x1 < x2 <= W``
        and ``0 <= y1 < y2 <= H``, with ``x2 - x1`` and ``y2 - y1`` at least one pixel (normalised
        corners are refused), checked after conversion to the stored float32.
        """
        ts = self._timestamp(timestamp)
        if not isinstance(image, np.ndarray) or isinstance(image, np.ma.MaskedArray):
            raise InvalidSample(f"frame must be a numpy array (not masked), got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise InvalidSample(f"frame must be uint8, got {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise InvalidSample(f"frame must be HxWx3, got shape {image.shape}")
        if image.nbytes > self._max_frame_bytes:  # (helper-182: named only max_frame_bytes, which EdgeClient does not take)
            bound = ("1920x1080" if self._max_frame_bytes == DEFAULT_MAX_FRAME_BYTES
                     else f"{self._max_frame_bytes // 3:,}-pixel")
            raise InvalidSample(
                f"a {image.shape[1]}x{image.shape[0]} frame ({image.nbytes:,} bytes) is over the {bound} RGB frames "
                f"this store takes (max_frame_bytes={self._max_frame_bytes}): downscale it and its boxes by the same "
                "factor first (training and detect() letterbox every frame to the detector's input size, 96 px by "
                "default, so nothing is lost)"
            )
        height, width = int(image.shape[0]), int(image.shape[1])
        box_bytes = self._check_boxes(() if boxes is None else boxes, width=width, height=height)
        encoding, data = self._encode_frame(image)
        row = _Row("frame", ts, None, (height, width, 3), encoding, data, box_bytes)
        return self._insert(row)

    def add_sample(
        self,
        kind: str,
        data: npt.NDArray[Any],
        label: Any = None,
        *,
        timestamp: float | None = None,
    ) -> int:
        """Add by kind name: ``label`` is the class for arrays/gestures, the boxes for frames."""
        if kind == "array":
            return self.add(data, label, timestamp=timestamp)
        if kind == "gesture":
            return self.add_gesture(data, label, timestamp=timestamp)
        if kind == "frame":
            return self.add_frame(data, () if label is None else label, timestamp=timestamp)
        raise InvalidSample(f"unknown sample kind {kind!r}; expected one of {KINDS}")

    # ------------------------------------------------------------------ reading

    def count(self, kind: str | None = None) -> int:
        """Samples held now, of one kind or all."""
        if kind is None:
            with self._read() as c:
                return int(c.execute("SELECT n FROM totals").fetchone()[0])
        _check_kind(kind)
        with self._read() as c:
            return int(
                c.execute("SELECT COUNT(*) FROM samples WHERE kind = ?", (kind,)).fetchone()[0]
            )

    def unused_count(self) -> int:
        """Samples no update has trained on yet."""
        with self._read() as c:
            return int(
                c.execute("SELECT COUNT(*) FROM samples WHERE used_seq IS NULL").fetchone()[0]
            )

    def stats(self) -> StoreStats:
        """Counters in one consistent read: held, bytes, unused, ever added, evicted."""
        with self._read() as c:  # one statement, so one snapshot even with other writers
            n, nbytes, added, evicted, unused = c.execute(
                "SELECT n, nbytes, added, evicted, "
                "(SELECT COUNT(*) FROM samples WHERE used_seq IS NULL) FROM totals"
            ).fetchone()
        return StoreStats(
            count=int(n),
            nbytes=int(nbytes),
            unused=int(unused),
            added=int(added),
            evicted=int(evicted),
        )

    def ids(self, kind: str | None = None, *, unused_only: bool = False) -> list[int]:
        """Ids held now, in insertion order (to pass to :meth:`mark_used` after training)."""
        where, params = [], []
        if kind is not None:
            _check_kind(kind)
            where.append("kind = ?")
            params.append(kind)
        if unused_only:
            where.append("used_seq IS NULL")
        sql = "SELECT id FROM samples" + (" WHERE " + " AND ".join(where) if where else "")
        with self._read() as c:
            return [int(r[0]) for r in c.execute(sql + " ORDER BY id", params)]

    def snapshot(self, kind: str = "array") -> Snapshot:
        """Every sample of a labelled kind (``"array"`` or ``"gesture"``) with ids, in id order."""
        _check_kind(kind)
        if kind == "frame":
            raise InvalidSample("frames carry boxes, not one label: iterate frames() instead")
        with self._read() as c:
            rows = c.execute(
                "SELECT s.id, s.ts, s.label, s.shape, s.encoding, d.data "
                "FROM samples AS s JOIN sample_data AS d ON d.id = s.id "
                "WHERE s.kind = ? ORDER BY s.id",
                (kind,),
            ).fetchall()
            shape = self._shapes[kind]
        n = len(rows)
        x = np.empty((n, *(shape or ())), dtype=np.float32)
        ids = np.empty(n, dtype=np.int64)
        timestamps = np.empty(n, dtype=np.float64)
        y = np.empty(n, dtype=np.int64)
        kept = 0
        for sid, ts, label, shape_text, encoding, data in rows:
            try:
                x[kept] = _decode_values(sid, shape_text, encoding, data, shape)
                y[kept] = self._stored_label(sid, label)
                timestamps[kept] = float(ts)
            except (StorageError, TypeError, ValueError) as exc:
                self._skip_unreadable(sid, exc)
                continue
            ids[kept] = sid
            kept += 1
        return Snapshot(ids=ids[:kept], timestamps=timestamps[:kept], x=x[:kept], y=y[:kept])

    def arrays(self, kind: str = "array") -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``(X, y)`` over ALL local samples of ``kind`` (what SPIN trains on), in id order."""
        snap = self.snapshot(kind)
        return snap.x, snap.y

    def gestures(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``(X, y)`` over all gestures: X is ``(N, T, D)`` float32."""
        return self.arrays("gesture")

    def frames(
        self, ids: Iterable[int] | None = None
    ) -> Iterator[tuple[npt.NDArray[np.uint8], Boxes]]:
        """Yield ``(image, boxes)`` for the frames held now (or for ``ids``), in id order.

        Frames are read one at a time, so the lock is not held between items; ids that
        are absent (evicted meanwhile) or not frames are skipped.
        """
        wanted = self.ids("frame") if ids is None else sorted({_check_id(i) for i in ids})
        for sid in wanted:
            with self._read() as c:
                row = c.execute(
                    "SELECT s.shape, s.encoding, d.data, d.boxes "
                    "FROM samples AS s JOIN sample_data AS d ON d.id = s.id "
                    "WHERE s.id = ? AND s.kind = 'frame'",
                    (sid,),
                ).fetchone()
            if row is not None:
                shape_text, encoding, data, boxes = row
                try:
                    frame = _decode_frame(sid, shape_text, encoding, data), _decode_boxes(sid, boxes)
                except StorageError as exc:
                    self._skip_unreadable(sid, exc)
                    continue
                yield frame

    def get(self, sample_id: int) -> StoredSample | None:
        """One sample by id, decoded, or ``None`` if it is not (or no longer) held."""
        sid = _check_id(sample_id)
        with self._read() as c:
            row = c.execute(
                "SELECT s.kind, s.ts, s.label, s.shape, s.encoding, s.nbytes, s.used_seq, "
                "s.acked, d.data, d.boxes "
                "FROM samples AS s JOIN sample_data AS d ON d.id = s.id WHERE s.id = ?",
                (sid,),
            ).fetchone()
        if row is None:
            return None
        kind, ts, label, shape_text, encoding, nbytes, used_seq, acked, data, boxes = row
        decoded: npt.NDArray[Any]
        if kind == "frame":
            decoded = _decode_frame(sid, shape_text, encoding, data)
        else:
            decoded = _decode_values(sid, shape_text, encoding, data, None)
        return StoredSample(
            id=sid,
            kind=kind,
            timestamp=float(ts),
            label=None if label is None else int(label),
            data=decoded,
            boxes=_decode_boxes(sid, boxes),
            nbytes=int(nbytes),
            used_seq=None if used_seq is None else int(used_seq),
            acked=bool(acked),
        )

    # ------------------------------------------------------------------ updates

    def mark_used(self, ids: Iterable[int], update_seq: int) -> int:
        """Record that update ``update_seq`` trained on ``ids``; returns how many are held.

        Ids evicted meanwhile are ignored. A sample keeps the highest sequence number that
        used it, and counts as acknowledged at once if ``update_seq`` already was.
        """
        seq = _check_seq(update_seq)
        unique = sorted({_check_id(i) for i in ids})
        with self._write() as c:
            acked = c.execute("SELECT 1 FROM acked_updates WHERE seq = ?", (seq,)).fetchone()
            cur = c.executemany(
                "UPDATE samples SET used_seq = MAX(COALESCE(used_seq, ?1), ?1), "
                "acked = MAX(acked, ?2) WHERE id = ?3",
                [(seq, 1 if acked else 0, sid) for sid in unique],
            )
            return max(cur.rowcount, 0)

    def mark_acked(self, update_seq: int) -> int:
        """Record that the coordinator acknowledged update ``update_seq``.

        Its samples become first in line for eviction. Returns how many were newly flagged.
        """
        seq = _check_seq(update_seq)
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO acked_updates (seq) VALUES (?)", (seq,))
            cur = c.execute("UPDATE samples SET acked = 1 WHERE used_seq = ? AND acked = 0", (seq,))
            return max(cur.rowcount, 0)

    def remove(self, ids: Iterable[int]) -> int:
        """Delete samples on purpose (e.g. aged out into SCC's feature cache); they count as
        evicted. Ids not held are ignored. Returns how many were removed."""
        unique = sorted({_check_id(i) for i in ids})
        with self._write() as c:
            cur = c.executemany("DELETE FROM samples WHERE id = ?", [(sid,) for sid in unique])
            return max(cur.rowcount, 0)

    # ------------------------------------------------------------------ metadata

    def get_meta(self, key: str, default: MetaValue | None = None) -> MetaValue | None:
        """A durable value set by :meth:`set_meta`, or ``default``."""
        _check_meta_key(key)
        with self._read() as c:
            row = c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else cast(MetaValue, row[0])

    def set_meta(self, key: str, value: MetaValue) -> None:
        """Durably set one value (int, float, str or bytes; it reads back with its type)."""
        self.set_meta_many({key: value})

    def set_meta_many(self, items: Mapping[str, MetaValue]) -> None:
        """Durably set several values in one transaction (e.g. ``next_seq`` with ``trained_upto``)."""
        checked = [(_check_meta_key(k), _check_meta_value(k, v)) for k, v in items.items()]
        with self._write() as c:
            c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", checked)
            meta = {str(k): v for k, v in c.execute("SELECT key, value FROM meta") if type(v) is int}
            last_id = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'samples'").fetchone()
            counters = {"meta": meta, "added": int(c.execute("SELECT added FROM totals").fetchone()[0]),
                        "last_id": int(last_id[0]) if last_id else 0}
        if str(self._path) != MEMORY:
            _write_counters(self._path, counters)

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with SQLite errors turned into StorageError."""
        with self._lock:
            if self._conn is None:
                raise StoreClosed(f"sample store {self._path} is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StorageError(f"{self._path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (and fsynced) on exit, rolled back on any error."""
        with self._read() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

    def _insert(self, row: _Row) -> int:
        if self._quota_bytes is not None and row.nbytes > self._quota_bytes:
            raise InvalidSample(
                f"{row.kind} of {row.nbytes} stored bytes alone exceeds quota_bytes={self._quota_bytes}"
            )
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO samples (kind, ts, label, shape, encoding, nbytes) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    row.kind,
                    row.timestamp,
                    row.label,
                    json.dumps(list(row.shape)),
                    row.encoding,
                    row.nbytes,
                ),
            )
            sid = cur.lastrowid
            assert sid is not None
            c.execute(
                "INSERT INTO sample_data (id, data, boxes) VALUES (?, ?, ?)",
                (sid, row.data, row.boxes),
            )
            if self._latest_ts is not None:
                self._latest_ts = max(self._latest_ts, row.timestamp)
            self._evict(c, protect=sid)
        return int(sid)

    def _evict(self, c: sqlite3.Connection, *, protect: int | None) -> int:
        """Delete samples in policy order until both quotas hold; never ``protect``."""
        n, nbytes = c.execute("SELECT n, nbytes FROM totals").fetchone()
        over_n = n - self._quota_samples if self._quota_samples is not None else 0
        over_bytes = nbytes - self._quota_bytes if self._quota_bytes is not None else 0
        if over_n <= 0 and over_bytes <= 0:
            return 0
        victims: list[tuple[int]] = []
        untrained = 0
        # Within each class, a sample stamped more than MAX_FUTURE_S ahead of the clock goes first: a
        # clock that was ahead when it was labelled (then corrected) would keep it past every fresh
        # label. Range scans on (acked, ts), so samples_by_eviction serves each; only when some
        # sample may be that far ahead (the usual store has none: one scan, as before the fix).
        cutoff = float(self._clock()) + MAX_FUTURE_S
        if self._latest_ts is None:
            self._latest_ts = max((ts for (ts,) in c.execute(
                "SELECT MAX(ts) FROM samples WHERE acked = 1 UNION ALL SELECT MAX(ts) FROM samples WHERE acked = 0")
                if ts is not None), default=-math.inf)
        columns = "SELECT id, nbytes, used_seq FROM samples"
        scans: list[tuple[str, tuple[Any, ...]]]
        if self._latest_ts > cutoff:
            scans = [(f"{columns} WHERE acked = ? AND ts {op} ? AND id IS NOT ? ORDER BY ts, id", (acked, cutoff, protect))
                     for acked in (1, 0) for op in (">", "<=")]
            self._latest_ts = None  # read again at the next eviction: exact once these are gone
        else:
            scans = [(f"{columns} WHERE id IS NOT ? ORDER BY acked DESC, ts, id", (protect,))]
        for sql, args in scans:
            if over_n <= 0 and over_bytes <= 0:
                break
            cur = c.execute(sql, args)
            try:
                for sid, size, used_seq in cur:
                    if over_n <= 0 and over_bytes <= 0:
                        break
                    victims.append((sid,))
                    untrained += used_seq is None
                    over_n -= 1
                    over_bytes -= size
            finally:
                cur.close()
        c.executemany("DELETE FROM samples WHERE id = ?", victims)
        if untrained and not self._said_untrained:  # a label lost to training: said once per store
            self._said_untrained = True
            log.warning("sample store %s: over its quota (quota_samples=%s, quota_bytes=%s), evicting %d label(s) no "
                        "update has trained on yet, oldest first (is the device offline, or the quota small for its "
                        "labelling rate?); said once, stats().evicted counts all", self._path, self._quota_samples,
                        self._quota_bytes, untrained)
        return len(victims)

    def _reconcile_settings(self, c: sqlite3.Connection) -> None:
        """Adopt stored shapes / n_classes, or store the declared ones; refuse a different task."""
        stored = _stored_settings(c, self._path)
        if self._task is not None:  # first: nothing below may be written into another task's store
            owner = stored.get("task")
            if owner is None and (others := self._kinds_of_another_task(c, stored)):
                owner = f"another task ({', '.join(others)} samples)"
            if owner is not None and owner != self._task:
                raise ConfigError(f"{self._path} holds the samples of {owner if 'task' not in stored else repr(owner)}, "
                                  f"not of task {self._task!r}: a store serves one task, give each its own data_dir")
            if "task" not in stored:
                c.execute("INSERT INTO settings (key, value) VALUES ('task', ?)", (json.dumps(self._task),))
        for kind, key in (("array", "sample_shape"), ("gesture", "gesture_shape")):
            declared = self._shapes[kind]
            if key in stored:
                previous = stored[key]
                if declared is not None and declared != previous:
                    raise ConfigError(
                        f"{self._path} holds {kind} samples of shape {previous}, not {declared}: "
                        "a different shape is a different task, use another store"
                    )
                self._shapes[kind] = previous
            elif declared is not None:
                c.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?)",
                    (key, json.dumps(list(declared))),
                )
        previous_n = stored.get("n_classes")
        if previous_n is not None:
            if self._n_classes is None:
                self._n_classes = int(previous_n)
            elif self._n_classes < previous_n:
                raise ConfigError(
                    f"{self._path} was opened with n_classes={previous_n}; it may grow, not shrink "
                    f"to {self._n_classes}"
                )
        if self._n_classes is not None and self._n_classes != previous_n:
            c.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('n_classes', ?)",
                (json.dumps(self._n_classes),),
            )

    def _kinds_of_another_task(self, c: sqlite3.Connection, stored: Mapping[str, Any]) -> list[str]:
        """The kinds of sample a store without a remembered task holds or declares that this
        caller does not declare (declaring no shape: frames)."""
        mine = {kind for kind, shape in self._shapes.items() if shape is not None} or {"frame"}
        held = {str(kind) for (kind,) in c.execute("SELECT DISTINCT kind FROM samples")}
        held |= {kind for kind, key in (("array", "sample_shape"), ("gesture", "gesture_shape")) if key in stored}
        return sorted(held - mine)

    def _stored_label(self, sid: int, label: object) -> int:
        """A stored class label, checked as :meth:`add` checked it; else StorageError."""
        if type(label) is not int or label < 0 or (self._n_classes is not None and label >= self._n_classes):
            raise StorageError(f"sample {sid}: stored label {label!r:.40} is not a class of this store")
        return label

    def _skip_unreadable(self, sid: int, exc: Exception) -> None:
        """Leave a sample that no longer decodes out of training, with a WARNING once per sample."""
        with self._lock:
            if sid in self.unreadable:
                return
            self.unreadable.add(sid)
            count = len(self.unreadable)
        log.warning("sample store %s: leaving sample %d out, it no longer decodes (%s); %d such sample(s)",
                    self._path, sid, exc, count)

    def _declared_shape(self, kind: str) -> tuple[int, ...]:
        shape = self._shapes[kind]
        if shape is None:
            option = "sample_shape" if kind == "array" else "gesture_shape"
            raise ConfigError(f"declare {option} at SampleStore.open before adding {kind} samples")
        return shape

    def check_timestamp(self, timestamp: object) -> float:
        """The timestamp :meth:`add` would store for ``timestamp`` (``None``: the clock's now),
        or the InvalidSample it would raise: not a finite number, or more than
        :data:`MAX_FUTURE_S` ahead of the clock."""
        return self._timestamp(timestamp)

    def _timestamp(self, timestamp: object) -> float:
        value = self._clock() if timestamp is None else timestamp
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise InvalidSample(f"timestamp must be a number, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise InvalidSample(f"timestamp must be finite, got {value!r}")
        if timestamp is not None and float(value) > (now := float(self._clock())) + MAX_FUTURE_S:
            # Eviction goes oldest first: a sample from the future would outlive every label made
            # after it, and a quota full of them evicted each fresh label at the next add.
            raise InvalidSample(f"timestamp {float(value):.6g} is {(float(value) - now) / 86_400:.4g} days ahead of the "
                                "clock: give seconds since the epoch as time.time() does (milliseconds?), or none for now")
        return float(value)

    def check_label(self, label: object) -> int:
        """The class label :meth:`add` would store for ``label``, or the InvalidSample it
        would raise (for callers that act on a label before storing it)."""
        return self._check_label(label, "label")

    def _check_label(self, label: object, what: str) -> int:
        if isinstance(label, bool) or not isinstance(label, int | np.integer):
            raise InvalidSample(f"{what} must be an integer, got {type(label).__name__} {label!r}")
        value = int(label)
        if value < 0 or value > _INT64_MAX:
            raise InvalidSample(f"{what} must be >= 0, got {value}")
        if self._n_classes is not None and value >= self._n_classes:
            raise InvalidSample(f"{what} {value} out of range for n_classes={self._n_classes}")
        return value

    def _check_boxes(self, boxes: npt.ArrayLike, *, width: int, height: int) -> bytes:
        """Validate ``(N, 5)`` boxes inside a ``width`` x ``height`` frame; float32 bytes."""
        try:
            arr = np.asarray(boxes)
        except (TypeError, ValueError) as exc:  # ragged rows
            raise InvalidSample(f"boxes must be an (N, 5) numeric array: {exc}") from exc
        if arr.shape in ((0,), (0, 5)):
            return _NO_BOXES
        if arr.dtype.kind not in "iuf":
            raise InvalidSample(f"boxes must be numeric, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != 5:
            raise InvalidSample(
                f"boxes must be (N, 5) rows of class_id, x1, y1, x2, y2; got {arr.shape}"
            )
        if arr.shape[0] > MAX_BOXES:
            raise InvalidSample(f"{arr.shape[0]} boxes; a frame has at most {MAX_BOXES} boxes")
        classes = arr[:, 0].astype(np.float64)
        if not (np.isfinite(classes).all() and (classes == np.floor(classes)).all()):
            raise InvalidSample("box class ids must be integers")
        for class_id in classes:
            if class_id > _MAX_BOX_CLASS:
                raise InvalidSample(f"box class id {int(class_id)} is too large")
            self._check_label(int(class_id), "box class id")
        # validate exactly what will be stored
        coords = arr[:, 1:].astype(np.float32)
        if not np.isfinite(coords).all():
            raise InvalidSample("box coordinates must be finite")
        x1, y1, x2, y2 = coords.T
        bad = np.flatnonzero((x2 <= x1) | (y2 <= y1))
        if bad.size:
            raise InvalidSample(f"degenerate box {bad[0]}: need x1 < x2 and y1 < y2 (rows are class_id, x1, y1, x2, y2 "
                                "corners in the frame's pixels, not YOLO's normalised cx, cy, w, h)")
        if (x1 < 0).any() or (y1 < 0).any() or (x2 > width).any() or (y2 > height).any():
            raise InvalidSample(f"box outside the {width}x{height} frame")
        # (helper-182) Under a pixel is no object: normalised corners, which training dropped, the frame then
        # trained on as background. (Subtracted in float64: float32 could round a 1-pixel box below 1.)
        w, h = x2.astype(np.float64) - x1, y2.astype(np.float64) - y1
        small = np.flatnonzero((w < 1) | (h < 1))
        if small.size:
            i = int(small[0])
            raise InvalidSample(f"box {i} is {w[i]:.3g}x{h[i]:.3g} pixels: a box is at least one pixel wide and high, in "
                                f"the {width}x{height} frame's pixels, not normalised to [0, 1] (multiply x by the "
                                "width and y by the height)")
        out = np.empty((arr.shape[0], 5), dtype="<f4")
        out[:, 0] = classes
        out[:, 1:] = coords
        return out.tobytes()

    def _encode_frame(self, image: npt.NDArray[np.uint8]) -> tuple[str, bytes]:
        encoding = self._frame_encoding
        if encoding == "auto":
            encoding = "png" if png_available() else "npy"
        if encoding == "png":
            ok, buf = _cv2().imencode(".png", np.ascontiguousarray(image))
            if not ok:
                raise StorageError("OpenCV failed to PNG-encode a frame")
            return "png", bytes(buf)
        raw = io.BytesIO()
        np.save(raw, np.ascontiguousarray(image), allow_pickle=False)
        return "npy.zlib", zlib.compress(raw.getvalue(), 6)


# ---------------------------------------------------------------------- module helpers


WAL_PAGES = 256
"""Checkpoint the write-ahead log every this many pages (1 MiB of 4 KiB pages; measured: about
+5 % per add_sample against SQLite's 1,000, where 64 pages cost +45 %)."""
WAL_BYTES = 1024 * 1024
"""Size the write-ahead log file is truncated back to after a checkpoint."""


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Check the schema version, switch to WAL + synchronous=FULL, create or migrate."""
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{path} has sample-store schema version {version}, but this edgeci reads "
                f"versions up to {SCHEMA_VERSION}: upgrade edgeci (never downgrade a device's store)"
            )
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(path) == MEMORY:
            pass
        elif str(mode).lower() != "wal":
            raise ConfigError(f"{path}: SQLite refused WAL mode (got {mode!r}); use a local disk")
        conn.execute("PRAGMA synchronous = FULL")
        # A small WAL: SQLite's default lets it grow to ~4 MB (1,000 pages) and keeps the file at
        # that size, so on a device's small partition the store reported "disk full" holding a few
        # dozen samples (review hB: 68 digits on 2 MB). Checkpoint every WAL_PAGES pages and
        # truncate the file back to WAL_BYTES after a checkpoint.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_BYTES}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])  # re-read, locked
            if version == 0 and conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                raise ConfigError(f"{path} is an SQLite database but not an edgeci sample store")
            while version < SCHEMA_VERSION:
                for statement in _split_sql(_MIGRATIONS[version]):
                    conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        error = CorruptStore if _is_corruption(exc) else StorageError
        raise error(f"cannot use {path} as a sample store: {exc}{_full_disk_hint(path)}") from exc


def _set_counters(c: sqlite3.Connection, meta: Mapping[str, MetaValue], last_id: int) -> None:
    """Write counter meta values and, when ``last_id`` > 0, the samples' id sequence (the next
    id is above it): a recovery's carry-over and an open's catch-up with the mirror."""
    c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
    if last_id > 0:
        c.execute("DELETE FROM sqlite_sequence WHERE name = 'samples'")
        c.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('samples', ?)", (last_id,))


def _full_disk_hint(path: Path) -> str:
    """What to say after SQLite's error when the store's disk is (nearly) full: SQLite makes its
    ``-shm`` (32 KiB) and ``-wal`` at open, and says "disk I/O error" when it cannot."""
    free = _free_bytes(path) if str(path) != MEMORY else None
    if free is None or free >= WAL_BYTES:
        return ""
    return f" (its disk is full: {free} bytes free; SQLite needs room for its -shm and -wal files to open it)"


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return None


def _is_corruption(exc: sqlite3.Error) -> bool:
    """Not a database / malformed image, as opposed to a full disk, I/O error or a lock."""
    name = getattr(exc, "sqlite_errorname", "")
    if name:
        return str(name) in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or str(name).startswith("SQLITE_CORRUPT_")
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _stored_settings(c: sqlite3.Connection, path: Path) -> dict[str, Any]:
    """The settings table, checked: shapes as tuples of ints >= 1, ``n_classes`` an int >= 1;
    anything else (bad JSON, wrong types) is CorruptStore: we never wrote it."""
    stored: dict[str, Any] = {}
    for key, text in c.execute("SELECT key, value FROM settings"):
        try:
            value = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise CorruptStore(f"{path}: setting {key!r} is not JSON: {text!r:.60}") from exc
        if key == "n_classes":
            ok = _is_count(value) and value >= 1
        elif key in ("sample_shape", "gesture_shape"):
            ok = isinstance(value, list) and bool(value) and all(_is_count(v) and v >= 1 for v in value)
            value = tuple(value) if ok else value
        elif key == "task":
            ok = isinstance(value, str) and bool(value)
        else:
            ok = True
        if not ok:
            raise CorruptStore(f"{path}: setting {key!r} holds {text!r:.60}")
        stored[key] = value
    return stored


def _check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """``PRAGMA quick_check`` (O(size), no index cross-check): raise CorruptStore unless ok."""
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc) or not isinstance(exc, sqlite3.OperationalError):
            raise CorruptStore(f"{path} failed its integrity check: {exc}") from exc
        raise StorageError(f"{path}: {exc}") from exc
    if [tuple(r) for r in rows] != [("ok",)]:
        problems = "; ".join(str(r[0]) for r in rows[:3])
        raise CorruptStore(f"{path} failed its integrity check: {problems[:300]}")


def _check_contents(conn: sqlite3.Connection, path: Path, counters: tuple[str, ...]) -> None:
    """What ``quick_check`` cannot see: the totals row and the caller's ``counters`` hold
    what this module writes there; else CorruptStore."""
    marks = ", ".join("?" * len(counters))
    try:
        totals = conn.execute("SELECT n, nbytes, added, evicted FROM totals").fetchall()
        meta = conn.execute(f"SELECT key, value FROM meta WHERE key IN ({marks})", counters).fetchall()
    except sqlite3.Error as exc:
        raise StorageError(f"{path}: {exc}") from exc
    if len(totals) != 1 or not all(_is_count(v) for v in totals[0]):
        raise CorruptStore(f"{path}: its totals row is missing or damaged ({totals[:2]!r:.100})")
    for key, value in meta:
        if not _is_count(value):
            raise CorruptStore(f"{path}: meta {key!r} holds {value!r:.60}, not a counter")


def _check_writable(conn: sqlite3.Connection, path: Path, *, full_ok: bool = False) -> None:
    """StorageError if SQLite opened the file read-only: it does so without a word when the file
    may not be written (its mode, a read-only mount, ``chattr +i``), and every add failed later
    instead. The probe is a write in a transaction rolled back: nothing reaches the disk.
    ``full_ok``: a full disk passes (SQLITE_FULL: writable once there is room)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("UPDATE totals SET n = n")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        if full_ok and (str(getattr(exc, "sqlite_errorname", "")) == "SQLITE_FULL" or "disk is full" in str(exc)):
            return
        if str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_READONLY") or "readonly" in str(exc):
            raise StorageError(f"{path} cannot be written ({exc}): a sample store must be; check the file's "
                               "and its folder's owner and mode, and that the disk is mounted read-write") from exc
        raise StorageError(f"{path}: {exc}") from exc


def _salvage(path: Path, counters: tuple[str, ...]) -> dict[str, Any]:
    """Whatever counters a corrupt store still yields, read-only, each table on its own
    (a ``counters`` meta key only with a valid value)."""
    out: dict[str, Any] = {}
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return out
    queries = {
        "meta": "SELECT key, value FROM meta",
        "added": "SELECT added FROM totals",
        "last_id": "SELECT seq FROM sqlite_sequence WHERE name = 'samples'",
    }
    try:
        for key, sql in queries.items():
            try:
                rows = conn.execute(sql).fetchall()
            except sqlite3.Error:
                continue
            if key == "meta":
                meta = {}
                for k, v in rows:
                    if k in counters and not _is_count(v):
                        continue
                    try:
                        meta[_check_meta_key(k)] = _check_meta_value(str(k), v)
                    except EdgeciError:
                        continue
                out[key] = meta
            elif rows and isinstance(rows[0][0], int) and rows[0][0] >= 0:
                out[key] = int(rows[0][0])
    finally:
        conn.close()
    return out


def _counters_path(path: Path) -> Path:
    return path.with_name(path.name + ".counters")


_MIRROR_FAILING: set[str] = set()
"""Mirrors whose last write failed: one WARNING per failing streak, not one per save."""


def _write_counters(path: Path, counters: Mapping[str, Any]) -> None:
    """Mirror the integer meta (``next_seq``...) outside SQLite, so that even a store whose
    every page is garbage can hand its counters over (tmp, fsync, rename). A write that
    fails (a full disk) leaves the previous mirror and no tmp behind; the mirror only ever
    raises the counters read back (:meth:`SampleStore.open` takes the larger), so an older
    one loses nothing the database holds."""
    target = _counters_path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(dict(counters), f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:  # the database holds the truth; the mirror is a fallback
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # (a half-written tmp would hold space on a full disk)
        if str(target) not in _MIRROR_FAILING:
            _MIRROR_FAILING.add(str(target))
            log.warning("could not mirror the store's counters to %s: %s (the database still holds them; "
                        "said once until a write succeeds)", target, exc)
        return
    if _MIRROR_FAILING and str(target) in _MIRROR_FAILING:
        _MIRROR_FAILING.discard(str(target))
        log.warning("the store's counters are mirrored to %s again", target)


def _read_counters(path: Path) -> dict[str, Any]:
    """The mirrored counters: ``{"meta": {key: int}, "added": int, "last_id": int}`` (those readable)."""
    try:
        data = json.loads(_counters_path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {k: data[k] for k in ("added", "last_id") if _is_count(data.get(k))}
    meta = data.get("meta")
    if isinstance(meta, dict):
        out["meta"] = {str(k): v for k, v in meta.items() if _is_count(v)}
    return out


def _is_count(value: object) -> bool:
    """A counter as this store writes them: an int in [0, 2**63)."""
    return type(value) is int and 0 <= value <= _INT64_MAX


def _move_aside(path: Path) -> Path:
    """Rename the database and its -wal / -shm to ``<name>.corrupt-<UTC time>[-wal|-shm]``."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            os.replace(extra, aside.with_name(aside.name + suffix))
    os.replace(path, aside)
    return aside


def _split_sql(script: str) -> list[str]:
    """Split a schema script into statements (``executescript`` would commit our transaction)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                statements.append(pending.strip())
            pending = ""
    if pending.strip() and not pending.strip().startswith("--"):
        raise AssertionError(f"incomplete statement in schema: {pending!r}")
    return statements


def _check_shape(
    name: str, shape: Sequence[int] | None, *, ndim: int | None
) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a sequence of ints, got {shape!r}") from exc
    if not dims or any(d < 1 for d in dims) or any(isinstance(s, bool) for s in shape):
        raise ConfigError(f"{name} must be positive ints, got {shape!r}")
    if ndim is not None and len(dims) != ndim:
        raise ConfigError(f"{name} must have {ndim} dimensions, got {shape!r}")
    return dims


def check_quota(name: str, value: int | None) -> None:
    """ConfigError unless ``value`` is None (no quota) or a positive int."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int or None, got {value!r}")


def _check_kind(kind: object) -> None:
    if kind not in KINDS:
        raise InvalidSample(f"unknown sample kind {kind!r}; expected one of {KINDS}")


def _check_id(sample_id: object) -> int:
    if isinstance(sample_id, bool) or not isinstance(sample_id, int | np.integer):
        raise LocalProtocolError(f"sample ids are ints, got {type(sample_id).__name__}")
    value = int(sample_id)
    if not 0 <= value <= _INT64_MAX:
        raise LocalProtocolError(f"sample id out of range: {value}")
    return value


def _check_seq(update_seq: object) -> int:
    if isinstance(update_seq, bool) or not isinstance(update_seq, int | np.integer):
        raise LocalProtocolError(f"update_seq must be an int, got {type(update_seq).__name__}")
    value = int(update_seq)
    if not 0 <= value <= _INT64_MAX:
        raise LocalProtocolError(f"update_seq must be >= 0, got {value}")
    return value


def _check_meta_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise LocalProtocolError(f"meta keys are non-empty strings, got {key!r}")
    return key


def _check_meta_value(key: str, value: object) -> MetaValue:
    # bool would read back as int and NaN as NULL: refuse both rather than change them
    if isinstance(value, bool) or not isinstance(value, int | float | str | bytes):
        raise LocalProtocolError(
            f"meta {key!r}: value must be int, float, str or bytes, got {value!r}"
        )
    if isinstance(value, int) and not -(2**63) <= value <= _INT64_MAX:
        raise LocalProtocolError(f"meta {key!r}: int {value} does not fit in 64 bits")
    if isinstance(value, float) and math.isnan(value):
        raise LocalProtocolError(f"meta {key!r}: NaN cannot be stored")
    return value


def _encode_values(x: object, shape: tuple[int, ...], kind: str) -> bytes:
    """Validate a float32 array of exactly ``shape``, all finite; its little-endian bytes."""
    if not isinstance(x, np.ndarray) or isinstance(x, np.ma.MaskedArray):  # a mask would be dropped, what it hides stored
        raise InvalidSample(f"{kind} sample must be a numpy array (not masked), got {type(x).__name__}")
    if x.dtype != np.float32:
        raise InvalidSample(f"{kind} sample must be float32, got {x.dtype}")
    if x.ndim != len(shape):
        raise InvalidSample(
            f"{kind} sample must have {len(shape)} dimensions {shape}, got {x.shape}"
        )
    if x.shape != shape:
        raise InvalidSample(f"{kind} sample must have shape {shape}, got {x.shape}")
    if not np.isfinite(x).all():
        raise InvalidSample(f"{kind} sample contains NaN or Inf")
    return x.astype("<f4", copy=False).tobytes()


def _stored_shape(sid: int, shape_text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in json.loads(shape_text))
    except (TypeError, ValueError) as exc:
        raise StorageError(f"sample {sid}: unreadable shape {shape_text!r}") from exc


def _decode_values(
    sid: int, shape_text: str, encoding: str, data: bytes, expected: tuple[int, ...] | None
) -> npt.NDArray[np.float32]:
    shape = _stored_shape(sid, shape_text)
    if encoding != "f4" or (expected is not None and shape != expected):
        raise StorageError(f"sample {sid}: {encoding} {shape} is not an f4 {expected} array")
    if len(data) != 4 * math.prod(shape):
        raise StorageError(f"sample {sid}: {len(data)} bytes do not make an f4 array of {shape}")
    values = np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(shape)
    if not np.isfinite(values).all():  # add() stores finite values only
        raise StorageError(f"sample {sid}: stored values contain NaN or Inf")
    return values


def _decode_frame(sid: int, shape_text: str, encoding: str, data: bytes) -> npt.NDArray[np.uint8]:
    shape = _stored_shape(sid, shape_text)
    image: Any
    if encoding == "png":
        cv2 = _cv2()
        if cv2 is None:
            raise StorageError(f"frame {sid} is PNG-encoded and OpenCV (cv2) does not import")
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    elif encoding == "npy.zlib":
        try:
            image = np.load(io.BytesIO(zlib.decompress(data)), allow_pickle=False)
        except (zlib.error, ValueError, OSError) as exc:
            raise StorageError(f"frame {sid}: cannot decode npy: {exc}") from exc
    else:
        raise StorageError(f"frame {sid}: unknown encoding {encoding!r}")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != shape:
        raise StorageError(f"frame {sid}: decoded data is not a uint8 frame of shape {shape}")
    return image


def _decode_boxes(sid: int, data: bytes) -> Boxes:
    if len(data) % 20:
        raise StorageError(f"sample {sid}: {len(data)} box bytes are not whole (N, 5) f4 rows")
    return np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(-1, 5)
