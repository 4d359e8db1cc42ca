"""Versioned model registry with durable checkpoints (the coordinator's state dir).

Layout::

    STATE_DIR/
      lock                              flock'ed by the running coordinator (pid, host inside)
      spec.json                         the ModelSpec (checked on every start)
      epoch                             the numbering's epoch (see below)
      release.json                      the release, the pin, the gate's decisions and operator commands
      canary.json                       the open canary round (see coordinator.canary: resumed after a restart)
      round.json                        the selection round last drawn (RecordSelectionRound: resumed by a restart at its version)
      refused.json                      verified operator commands that did not run (a replay is refused after a restart)
      versions/000000007/weights.npy    one directory per committed version,
      versions/000000007/meta.json      written aside and renamed into place (atomic)
      pending/000000000042.log          the write-ahead log in segments: accepted updates and
                                        committed versions (group commit, one fsync per batch)
      pending/<device>.<seq>.upd        the older one-file-per-update layout (still read)

Durability rules, which together give "no accepted update lost, none applied twice, no
version number reused":

1. Accepted updates are appended to the pending log and the log is fsynced *before* the
   coordinator acknowledges any of them. The driver appends a whole batch and fsyncs once
   (:meth:`Registry.append_updates`).
2. A version is a log record too (weights, the watermarks its commit raised, its metadata),
   appended after the updates it consumed and durable with the same fsync
   (:meth:`Registry.stage_version`, :meth:`Registry.flush`); updates of the same write that
   the version applies (seq at or below its watermarks) are not written at all: every restore
   would drop them, and they are acknowledged only after that fsync. Only then is the version
   published, and its directory put in place (written aside, renamed; not fsynced: the log
   holds it). Every ``CHECKPOINT_EVERY`` versions one is a *base* and its directory is fsynced
   (the checkpoint; by the pruning thread when the registry has one, so the committing thread
   never waits for it); a release (``record_release``) is fsynced when recorded, and so is the
   open canary round (``record_canary_round``: a file of its own, a few KB rewritten per accepted
   report, where ``release.json`` would rewrite the whole history, up to ~270 KB, each time),
   and the selection round last drawn (``record_selection_round``, before its invitations leave).
3. Log segments are deleted once every update in them is at or below the watermarks and
   every version in them is at or below the last checkpoint. Records left by a crash in
   between are dropped on restore (by :meth:`Registry.load` and again by the core); a
   version directory lost or torn by a crash is rewritten from its log record.
4. A version number is claimed before anything is written and never written again in this
   process (``version_floor``); a version that never reached the disk was never published.

Log record format: ``<u32 length><u32 crc32(body)><body>``, little-endian, ``body`` a
msgpack map (an update's fields, or ``kind: version``; weights as a raw f4 tensor). A
segment starts with an 8-byte magic. A torn or corrupt record ends the segment: it and
everything after it are ignored (and, when this registry holds the state-dir lock,
truncated away) with a warning. A failed append is cut back at once.

Watermarks: a commit costs O(devices it changed), not O(devices known). A version's meta
holds either the full cumulative ``applied_upto`` and ``devices_seen`` (a *base*: every
``CHECKPOINT_EVERY``-th version, the first one after a restart, version 0, and every version
written by older releases) or only ``parent`` (the version it was built on),
``applied_changed`` and ``devices_added``. The registry keeps the cumulative maps in memory;
a restore walks the parents back to a base (log records first, then directories) and
replays the changes. Pruning keeps every kept version's chain back to its base.

The peering's per-device counts (``CommitVersion.tallies``: Spyker's update counts, ~71 B a
device) ride on the same chain: a base holds the full map (``tallies``), any other version
only ``tallies_changed`` (or ``tallies`` again when the peering started its map afresh). A
base is the one place a full map is needed: chains are at most ``CHECKPOINT_EVERY`` long,
pruning never takes a base a kept version chains to, and the new value of a changed count is
never more than the full map. A version without either key holds no counts (older releases
kept them in the peering's metadata, which the snapshot still carries).

Epoch: the state dir's numbering (``ModelMsg.epoch``), microseconds since 1970 when it was
created, signed into every model, recall and canary request. A coordinator that lost its state
dir counts from version 0 again, but in a newer epoch: devices take that as a new numbering
instead of waiting for a version above the one they hold, and refuse an older epoch's models (a
replay). A state dir without the file (made by an older release) gets a new epoch at the next
start; so does one whose file holds no epoch. ``edgeci new-epoch`` (:meth:`Registry.renew_epoch`)
starts one above a given epoch: after restoring a state dir from a backup, whose numbers the fleet
has seen beyond. A new epoch costs the fleet only a re-fetch of the release and a second training
of updates in flight.

Recovery: :meth:`Registry.load` uses the newest *readable* version; an unreadable newer one
(truncated ``weights.npy``, bad ``meta.json``) is logged loudly and reported in the snapshot
(``recovered_from``), and ``version_floor`` keeps the next version number above it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import socket
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import msgpack
import numpy as np

from coordinator.core import CommitVersion, Snapshot, abandoned_by
from coordinator.strategies.base import BufferedUpdate
from edge_sdk.errors import ConfigError, EdgeciError
from edge_sdk.spec import ModelSpec, Vector
from edge_sdk.wire.codec import decode_tensor, encode_tensor

log = logging.getLogger("edgeci.registry")

SEGMENT_MAGIC = b"EDGLOG1\n"
_HEADER = struct.Struct("<II")
_MAX_RECORD = 1 << 30
SEGMENT_BYTES = 64 << 20
"""A new segment is started once the current one is this large."""
_UPDATE_FIELDS = tuple(f.name for f in dataclasses.fields(BufferedUpdate))
HISTORY_EVENTS = 200
"""Gate decisions and operator actions kept in ``release.json`` (the newest)."""
HISTORY_COMMANDS = 1000
"""Operator commands kept beyond those (each carries its nonce: a replay after a restart is refused)."""
HISTORY_REJECTS = 200
"""The gate's rejections kept beyond those too (as many as the core remembers for ``--force``: a
restart after 200 other decisions released a rejected version without it)."""
REFUSALS_KEPT = 256
"""Verified operator commands that did not run kept in ``refused.json`` (the newest): a file of their own,
so that a flood of them (an operator's script gone wrong) never pushes the gate's decisions or the
executed commands out of ``release.json``; beyond it the oldest are forgotten (a replay of one within
its window after a restart is refused or run again as the state then says, as before they were kept)."""
CHECKPOINT_EVERY = 16
"""Versions committed through the log between two checkpoints (fsync of the newest version dir)."""


_CHAIN_KEYS = ("applied_upto", "devices_seen", "parent", "tallies", "tallies_changed")
"""Metadata keys the registry writes for the cumulative state (never taken from a commit's metadata)."""
_TallyUndo = tuple[dict[str, int] | None, dict[str, int | None] | None]
"""How to undo one version's counts: (the previous map, None) when it replaced the map, else
(None, the changed counts' previous values)."""

RELEASE_FILE = "release.json"
EPOCH_FILE = "epoch"
CANARY_FILE = "canary.json"
ROUND_FILE = "round.json"
REFUSED_FILE = "refused.json"


def new_epoch() -> int:
    """An epoch for a numbering that starts now: the wall clock in microseconds."""
    return time.time_ns() // 1000


MAX_EPOCH = 2**63 - 1
EPOCH_CLOCK_SLACK_S = 86_400.0
"""How far ahead of this host's clock an epoch may be and still come from a coordinator (whose
clock was that far ahead when it made its state dir). Beyond it, an epoch a device claims —
unsigned — is most likely forged: ``edgeci new-epoch`` will not number above it without
``--force`` (every later epoch must be above it, and above ``MAX_EPOCH`` none is left)."""


def days_beyond_clock(epoch: object, now: float) -> float | None:
    """Days by which ``epoch`` (µs since 1970) is ahead of the wall-clock time ``now`` when that
    is more than ``EPOCH_CLOCK_SLACK_S`` (no coordinator made it: most likely forged); None for
    an epoch within reach of the clock (or not an int)."""
    if not isinstance(epoch, int):
        return None
    ahead_s = epoch / 1e6 - now
    return ahead_s / 86_400 if ahead_s > EPOCH_CLOCK_SLACK_S else None


def read_epoch(state_dir: str | Path) -> int | None:
    """The state dir's epoch; None when it has none (no file, or contents that are not one).
    Any other error reading it (EIO, EMFILE) is raised: a storage problem, not a missing epoch
    (which would start a new numbering for the whole fleet)."""
    try:
        text = (Path(state_dir) / EPOCH_FILE).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and 0 < int(text) <= MAX_EPOCH else None


def read_release_record(state_dir: str | Path) -> dict[str, Any]:
    """``release.json`` of a state dir (``{}`` when absent or unreadable)."""
    try:
        data = json.loads((Path(state_dir) / RELEASE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if _is_release_record(data) else {}


def _is_release_record(data: object) -> bool:
    """An object with the field types :meth:`Registry.record_release` writes: an object whose
    ``release`` was a string or whose ``history`` was a number stopped every start with a bare
    ValueError or TypeError (helper-116); it is unreadable, as one that is not an object."""
    if not isinstance(data, dict):
        return False
    release, pinned, history = data.get("release", 0), data.get("pinned", False), data.get("history", [])
    return (type(release) is int and release >= 0 and isinstance(pinned, bool)
            and isinstance(history, list) and all(isinstance(e, dict) for e in history))


def _read_round(path: Path, lost: str) -> dict[str, Any] | None:
    """A round record's JSON object (None when absent; unreadable: None, said with ``lost``, what
    the restart then does without it). Its reader checks what it holds."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): %s", path, exc, lost)
        return None
    return data if isinstance(data, dict) else None


def read_canary_round(state_dir: str | Path) -> dict[str, Any] | None:
    """``canary.json`` of a state dir (None when absent; unreadable: None, said). The core checks
    what it holds (:meth:`coordinator.canary.CanaryRound.from_record`): a damaged record only means a
    new round instead of the recorded one."""
    return _read_round(Path(state_dir) / CANARY_FILE, "the canary round open before the restart is not resumed; a new one opens")


def read_selection_round(state_dir: str | Path) -> dict[str, Any] | None:
    """``round.json`` of a state dir (None when absent; unreadable: None, said). The core takes it
    only when it was drawn at the restored version by the same strategy, and each strategy checks
    what it holds: a damaged record only means the round the newest commit holds, as before records."""
    return _read_round(Path(state_dir) / ROUND_FILE, "a selection round drawn after the newest version is not resumed")


def read_refusals(state_dir: str | Path) -> list[dict[str, Any]]:
    """``refused.json`` of a state dir (``[]`` when absent; unreadable: ``[]``, said). The core checks
    each entry's fields (a damaged one only loses that command's replay protection)."""
    try:
        data = json.loads((Path(state_dir) / REFUSED_FILE).read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): the operator commands refused before the restart could be replayed within "
                    "their window", Path(state_dir) / REFUSED_FILE, exc)
        return []
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


def _parses_as_object(path: Path) -> bool:
    try:
        return _is_release_record(json.loads(path.read_bytes()))
    except (OSError, ValueError):
        return False


HISTORY_VERSIONS = 7
"""Versions before the restored one handed to the core (its ``weights_at``): the daemon's core keeps 8
(a converting staleness policy's keeps more and asks :meth:`Registry.read_history` for them)."""


class RegistryError(EdgeciError):
    """The state dir is unreadable or belongs to another model."""


class StateDirLocked(RegistryError):
    """Another coordinator process holds this state dir."""


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # (a full disk: a partial temp file must not keep it full)
        raise
    _fsync_dir(path.parent)


def _write_file(path: str, chunks: Iterable[bytes | memoryview], *, durable: bool) -> None:
    """Create ``path`` with unbuffered writes (no Python file object), fsynced if ``durable``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _update_body(u: BufferedUpdate) -> bytes:
    body: dict[str, Any] = {name: getattr(u, name) for name in _UPDATE_FIELDS if name != "weights"}
    body["weights"] = encode_tensor(u.weights, "f4")
    return bytes(msgpack.packb(body, use_bin_type=True))


def _decoded(body: bytes) -> dict[str, Any]:
    fields = msgpack.unpackb(body, raw=False)
    if not isinstance(fields, dict) or not fields:
        raise ValueError("a record must be a non-empty map")
    return fields


def _update_from(body: bytes) -> BufferedUpdate:
    return _update_of(_decoded(body))


def _update_of(fields: dict[str, Any]) -> BufferedUpdate:
    weights = decode_tensor(fields.pop("weights"))
    known = {k: v for k, v in fields.items() if k in _UPDATE_FIELDS}
    return BufferedUpdate(weights=np.array(weights, dtype=np.float32), **known)


def encode_record(u: BufferedUpdate) -> bytes:
    """One log record: length, crc32 and the msgpack body."""
    body = _update_body(u)
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def _record(body: bytes) -> bytes:
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def _version_body(version: int, weights: Vector, meta_json: bytes) -> bytes:
    body = {"kind": "version", "version": version, "meta": meta_json, "weights": encode_tensor(weights, "f4")}
    return bytes(msgpack.packb(body, use_bin_type=True))


def _meta_json(version: int, meta: Mapping[str, Any]) -> bytes:
    # compact: with ``indent`` json falls back to its pure-Python encoder (ms per commit)
    return json.dumps({"version": version, **meta}, sort_keys=True).encode()


def _tallies_of(meta: Mapping[str, Any], before: dict[str, int] | None) -> dict[str, int] | None:
    """The counts at a version of a chain, from its metadata and the counts at its parent."""
    if "tallies" in meta:
        return {str(k): int(x) for k, x in meta["tallies"].items()}
    if "tallies_changed" not in meta:
        return None  # the peering kept none (or kept them in its own metadata: an older release)
    if before is None:
        raise ValueError("count changes without a full map before them")
    before.update({str(k): int(x) for k, x in meta["tallies_changed"].items()})
    return before


def _scan(data: bytes, pos: int = len(SEGMENT_MAGIC)) -> Iterator[tuple[int, bytes]]:
    """``(end offset, body)`` of each intact record from ``pos`` (after the magic); stops at the first bad one."""
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        start, end = pos + _HEADER.size, pos + _HEADER.size + length
        if length > _MAX_RECORD or end > len(data):
            return
        body = data[start:end]
        if zlib.crc32(body) != crc:
            return
        yield end, body
        pos = end


def _intact_after(data: bytes, pos: int) -> int | None:
    """Where intact records resume after a bad one at ``pos`` whose length field still reads
    true (media corruption inside a record): the next record checks out and decodes. None for
    a torn tail (nothing, zeros or garbage after it: the write that tore was the last)."""
    length = int(_HEADER.unpack_from(data, pos)[0])
    nxt = pos + _HEADER.size + length
    if length > _MAX_RECORD or nxt + _HEADER.size > len(data):
        return None
    for _, body in _scan(data, nxt):
        try:
            _decoded(body)
        except Exception:
            return None
        return nxt
    return None


class Registry:
    """Reads and writes one coordinator's state dir. Not thread-safe: one owner (the driver)."""

    def __init__(self, state_dir: str | Path, spec: ModelSpec, *, keep_versions: int = 20, background_prune: bool = False) -> None:
        """``background_prune``: old versions are deleted by a thread of the registry (the
        daemon's choice: the actor never waits for it); :meth:`close` stops it."""
        if keep_versions < 1:
            raise ConfigError("keep_versions must be >= 1")
        self.root = Path(state_dir)
        self.spec = spec
        self.keep_versions = keep_versions
        self.versions_dir = self.root / "versions"
        self.pending_dir = self.root / "pending"
        self._lock_file: IO[str] | None = None
        self._segment_path: Path | None = None
        """The segment appends go to (opened per batch: no handle outlives a call)."""
        self._segment_size = 0
        self._segment_keys: dict[Path, dict[str, int]] = {}
        """Per log segment: the highest seq of each device it holds (to know when it is applied)."""
        self._highest_written = -1
        """The highest version number this process tried to write (never reused, even on failure)."""
        self._listed_max: int | None = None
        """The newest version directory on disk when first listed under the lock (see :meth:`_disk_max`)."""
        self._prune_at = -2
        """List the versions to prune once ``_highest_written`` reaches this (a listing costs ~0.2 ms)."""
        self._segment_versions: dict[Path, int] = {}
        """Per log segment: the highest version record it holds."""
        self._staged: list[BufferedUpdate] = []
        """Updates to be appended with the next write (a commit writes them with its version)."""
        self.corrupt_records = 0
        """Records skipped inside log segments because they were corrupt with intact ones after them."""
        self._unsynced: list[int] = []
        """Versions committed through the log whose directories are not fsynced yet (until a later
        base is checkpointed: the log before it may then go, see :meth:`_checkpointed`)."""
        self._synced_dirs: set[int] = set()
        """Versions whose directory this process fsynced (written durably, a checkpoint, a release):
        only these are known durable as directories. A version that ``_unsynced`` forgot when a
        later base was checkpointed is not (its log record may be gone): a release must be synced."""
        self._durable_version = -1
        """The newest checkpointed base: its directory and everything the log held up to it are
        durable (a version before it is durable as a directory only if in ``_synced_dirs``)."""
        self._logged: dict[int, tuple[Vector, bytes]] = {}
        """Versions in the log (maybe not fsynced yet) whose directories are not written yet."""
        self._dirty_from: int | None = None
        """Size of the active segment at its last fsync, while appends after it are unsynced."""
        self._applied: dict[str, int] = {}
        """Cumulative watermarks at ``_state_version`` (the newest version staged or loaded)."""
        self._seen: dict[str, None] = {}
        """Cumulative devices seen at ``_state_version``, in the order first seen."""
        self._tallies: dict[str, int] | None = None
        """The peering's cumulative per-device counts at ``_state_version`` (None: none kept)."""
        self._state_version: int | None = None
        """The version whose state ``_applied`` and ``_seen`` hold; None until known."""
        self._base_every = min(CHECKPOINT_EVERY, keep_versions)
        """A base every this many versions: a chain never reaches below the kept versions."""
        self._since_base = self._base_every
        """Versions staged since the last base (a full one is due: the next is a base)."""
        self._bases: set[int] = set()
        """Bases staged and not checkpointed yet: committing one fsyncs its directory."""
        self._is_base: dict[int, bool] = {}
        """Known kinds of versions (base or not), for pruning without reading every meta."""
        self._undo: list[tuple[int | None, dict[str, int | None], int, int, bool, _TallyUndo]] = []
        """Per version staged since the last fsync, what to put back if that fsync fails."""
        self._outstanding: dict[Path, set[str]] = {}
        """Per log segment: devices with an update in it above their watermark (not applied)."""
        self._upd_files = True
        """Older one-file-per-update files may exist (until a commit finds none left)."""
        self._npy_header: bytes | None = None
        self._janitor: threading.Thread | None = None
        self._janitor_wake = threading.Event()
        self._janitor_stop = False
        self._pruning = threading.RLock()
        """Held while versions are deleted, and by the readers of version directories (read_version,
        load): the pruning thread deleted a directory under a read (helper-146: "version N is
        unreadable: ... weights.npy: No such file" for an operator's rollback to the oldest kept
        version, and load() "restored from the pending log" a version half deleted)."""
        self._commit_release: int | None = None
        """The release the newest commit's metadata names (without a gate it is not in release.json: an
        HFedMS round's model, behind its chain steps): kept by pruning and made durable like release.json's."""
        self._checkpoint_due = -1
        """With the pruning thread: the base it is to fsync next (the actor never waits for it)."""
        self._checkpoint_done = -1
        """With the pruning thread: the newest base it has fsynced (picked up by the next commit)."""
        for d in (self.root, self.versions_dir, self.pending_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise RegistryError(f"state dir {self.root}: not a directory ({exc.filename})") from exc
            except OSError as exc:
                raise RegistryError(f"state dir {self.root}: not writable: {exc.strerror or exc}") from exc
        spec_path = self.root / "spec.json"
        if spec_path.exists():
            try:
                stored = ModelSpec.from_dict(json.loads(spec_path.read_text()))
            except (OSError, ValueError) as exc:  # (bare JSONDecodeError, UnicodeDecodeError, IsADirectoryError before)
                raise RegistryError(f"{spec_path} is unreadable ({exc}): restore it, or use another --state-dir") from exc
            if stored.fingerprint != spec.fingerprint:
                raise RegistryError(
                    f"{self.root} holds model {stored.model_id!r} (spec {stored.fingerprint}); "
                    f"this coordinator serves {spec.model_id!r} (spec {spec.fingerprint}). Use another --state-dir."
                )
        else:
            _write_atomic(spec_path, json.dumps(spec.to_dict(), indent=1).encode())
        if background_prune:
            self._janitor = threading.Thread(target=self._janitor_loop, name=f"registry-prune-{self.root.name}", daemon=True)
            self._janitor.start()

    # ------------------------------------------------------------------ lock

    def acquire_lock(self) -> None:
        """Hold ``STATE_DIR/lock`` (flock, non-blocking) until :meth:`close`; refuse a second holder."""
        if self._lock_file is not None:
            return
        path = self.root / "lock"
        try:
            f = open(path, "a+")  # noqa: SIM115 - held for the registry's life
        except OSError as exc:
            raise RegistryError(f"state dir {self.root}: not writable: cannot open {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise StateDirLocked(
                    f"state dir {self.root} is in use by another coordinator ({holder}); "
                    "stop it first or use another --state-dir"
                ) from exc
            raise RegistryError(f"cannot lock {path}: {exc}") from exc
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._lock_file = f

    @property
    def locked(self) -> bool:
        return self._lock_file is not None

    def close(self) -> None:
        """Close the open log segment, stop the pruning thread and release the lock."""
        try:
            self.flush()
        except OSError as exc:
            log.warning("closing the registry: the last appends are not durable: %s", exc)
        self._close_segment()
        if self._janitor is not None:
            self._janitor_stop = True
            self._janitor_wake.set()
            self._janitor.join(30)
            self._janitor = None
        if self._lock_file is not None:
            f, self._lock_file = self._lock_file, None
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    def probe(self, nbytes: int) -> None:
        """Write, fsync and delete ``nbytes`` in the state dir: raises ``OSError`` while
        storage fails (the driver probes with at least one model's size)."""
        path = self.root / ".storage-probe"
        try:
            with open(path, "wb") as f:
                f.write(bytes(nbytes))
                f.flush()
                os.fsync(f.fileno())
        finally:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ versions

    def _version_dirs(self) -> list[int]:
        return sorted(int(p.name) for p in self.versions_dir.iterdir() if p.name.isdigit())

    def versions(self) -> list[int]:
        out = []
        for p in self.versions_dir.iterdir():
            if p.name.isdigit() and (p / "meta.json").exists():
                out.append(int(p.name))
        return sorted(out)

    def latest(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    def read_version(self, version: int) -> tuple[Vector, dict[str, Any]]:
        """Weights and metadata of a version directory; the metadata with the cumulative
        ``applied_upto`` and ``devices_seen`` at that version (when its chain is readable)."""
        with self._pruning:
            return self._read_version(version)

    def _read_version(self, version: int) -> tuple[Vector, dict[str, Any]]:
        weights, meta = self._read_dir(version)
        if "parent" in meta:
            try:
                meta["applied_upto"], meta["devices_seen"], tallies = self._state_of(version, meta, {})
                if tallies is not None:
                    meta["tallies"] = tallies
            except RegistryError as exc:
                log.debug("version %d: no cumulative watermarks (%s)", version, exc)
        return weights, meta

    def _read_dir(self, version: int) -> tuple[Vector, dict[str, Any]]:
        d = self.versions_dir / f"{version:09d}"
        if not d.exists() and (kept := self.versions()) and version < kept[0]:
            raise RegistryError(f"version {version} was pruned: the state dir keeps the newest {self.keep_versions} versions "
                                f"and the release (oldest kept: {kept[0]}; `edgeci versions` lists them)")
        path = d / "meta.json"
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("meta.json is not an object")
            path = d / "weights.npy"
            weights = np.load(path, allow_pickle=False)
            return self.spec.check(np.ascontiguousarray(weights, dtype=np.float32)), meta
        except (OSError, ValueError, EdgeciError) as exc:
            raise RegistryError(f"version {version} is unreadable: {path}: {exc}") from exc

    def write_version(self, version: int, weights: Vector, meta: dict[str, Any]) -> None:
        """Write a version directory durably (fsyncs), bypassing the log (``initialise``, tests)."""
        self._claim(version)
        self._materialise(version, weights, _meta_json(version, meta), durable=True)
        self._durable_version = max(self._durable_version, version)
        base = "parent" not in meta
        self._is_base[version] = base
        if base and version > (self._state_version if self._state_version is not None else -1):
            self._set_state(version, meta.get("applied_upto", {}), meta.get("devices_seen", []), meta.get("tallies"))
            self._since_base = 0
        self._prune()

    def _claim(self, version: int) -> None:
        if version <= self._highest_written or (
            version <= self._disk_max() and os.path.exists(f"{self.versions_dir}/{version:09d}")
        ):
            raise RegistryError(f"version {version} already exists in {self.root} (or was attempted)")
        self._highest_written = version  # attempted: never write this number again

    def _disk_max(self) -> float:
        """Above this no version directory exists that this process did not write: the newest
        on disk when the lock was taken (listed once; a stat per commit costs up to a ms while
        the pruning thread deletes in the same directory). Unlocked: unknown (another process
        may write), so every claim looks."""
        if not self.locked:
            return float("inf")
        if self._listed_max is None:
            self._listed_max = max(self._version_dirs(), default=-1)
        return self._listed_max

    def _materialise(self, version: int, weights: Vector, meta_json: bytes, *, durable: bool) -> None:
        """``versions/<n>/{weights.npy,meta.json}`` written aside and renamed into place; with
        ``durable`` every file and directory is fsynced (else the log record is the durable copy)."""
        root = str(self.versions_dir)  # str paths, a fixed temp name: this runs for every version
        final, tmp = f"{root}/{version:09d}", f"{root}/.v{version}.tmp"
        try:
            os.mkdir(tmp)
        except FileExistsError:  # left by a crash (or a failed write) of this very version
            shutil.rmtree(tmp, ignore_errors=True)
            os.mkdir(tmp)
        renamed = False
        try:
            w = np.ascontiguousarray(weights, dtype="<f4")
            _write_file(f"{tmp}/weights.npy", (self._weights_header(w), w.data.cast("B")), durable=durable)
            _write_file(f"{tmp}/meta.json", (meta_json,), durable=durable)
            if durable:
                _fsync_dir(tmp)
            os.rename(tmp, final)
            renamed = True
            if durable:
                _fsync_dir(self.versions_dir)
                self._synced_dirs.add(version)
        except BaseException:
            # Not durable: it must not be loaded (and served) by a restart of this process.
            shutil.rmtree(final if renamed else tmp, ignore_errors=True)
            raise

    def _sync_version(self, version: int) -> None:
        """fsync a version directory written without (a checkpoint, or the release)."""
        d = self.versions_dir / f"{version:09d}"
        for name in ("weights.npy", "meta.json"):
            fd = os.open(d / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(d)
        _fsync_dir(self.versions_dir)
        self._synced_dirs.add(version)

    def _weights_header(self, w: np.ndarray) -> bytes:
        """The ``.npy`` header of a weights vector (computed once: every version has the same)."""
        if self._npy_header is None or w.shape != (self.spec.size,):
            buf = io.BytesIO()
            np.save(buf, np.zeros(w.shape, dtype="<f4"), allow_pickle=False)
            header = buf.getvalue()[: len(buf.getvalue()) - w.nbytes]
            if w.shape != (self.spec.size,):
                return header
            self._npy_header = header
        return self._npy_header

    def _checkpoint(self, version: int) -> None:
        self._sync_version(version)
        self._checkpointed(version)

    def _checkpointed(self, version: int) -> None:
        """``version``'s directory is fsynced: the log before it may go (see :meth:`_drop_applied`)."""
        release = self._commit_release
        if release is not None and release < version and release not in self._synced_dirs \
                and (self.versions_dir / f"{release:09d}").is_dir():
            self._sync_version(release)  # its log record may go with the log before this base (as record_release)
        self._durable_version = max(self._durable_version, version)
        self._unsynced = [v for v in self._unsynced if v > version]
        self._bases = {v for v in self._bases if v > version}

    def _prune(self) -> None:
        if self._janitor is not None:
            self._janitor_wake.set()  # deleting directories costs as much as writing them
            return
        with self._pruning:
            self._prune_now()

    def _prune_now(self) -> None:
        """Delete versions beyond ``keep_versions`` (never the newest ones, never the release)."""
        step = self.keep_versions + max(1, self.keep_versions // 4)
        highest = self._highest_written
        if highest < self._prune_at:
            return  # no listing: too few versions written since the last one for a prune to delete any
        versions = self.versions()
        release = read_release_record(self.root).get("release")
        protected = (release, self._commit_release, self._durable_version)
        if len(versions) >= step:  # prune in steps
            keep_from = len(versions) - self.keep_versions
            while keep_from > 0 and not self._base_on_disk(versions[keep_from]):
                keep_from -= 1  # the oldest kept version's watermarks chain back to a base: keep it
            for v in versions[:keep_from]:
                if v in protected:
                    continue  # the release stays, however old: devices predict with it
                shutil.rmtree(self.versions_dir / f"{v:09d}", ignore_errors=True)
                self._is_base.pop(v, None)
                self._synced_dirs.discard(v)
            versions = [v for v in versions if v >= versions[keep_from] or v in protected]
        # A prune deletes something only with ``step`` versions and its oldest kept one (walked
        # down to a base) above a deletable one: at the first base with a deletable version
        # below it (or a base still to come). List again only once that can be so.
        nxt, deletable = len(versions), False
        for j, v in enumerate(versions):
            if deletable and self._base_on_disk(v):
                nxt = j
                break
            deletable = deletable or v not in protected
        self._prune_at = highest + max(1, max(step, self.keep_versions + nxt) - len(versions))

    def _base_on_disk(self, version: int) -> bool:
        """Whether a version directory holds full watermarks (an unreadable one counts as a
        base: no chain passes through it)."""
        known = self._is_base.get(version)
        if known is None:
            try:
                meta = json.loads((self.versions_dir / f"{version:09d}" / "meta.json").read_bytes())
                known = not isinstance(meta, dict) or "parent" not in meta
            except (OSError, ValueError):
                known = True
            self._is_base[version] = known
        return known

    def _janitor_loop(self) -> None:
        failed = -1
        while True:
            self._janitor_wake.wait()
            self._janitor_wake.clear()
            if self._janitor_stop:
                return
            due = self._checkpoint_due
            if due > self._checkpoint_done and due != failed:
                try:  # four fsyncs, off the committing thread: the log holds the version meanwhile
                    self._sync_version(due)
                    self._checkpoint_done = due
                except OSError as exc:
                    failed = due  # not retried: the next base is
                    log.warning("checkpoint of version %d: %s (the pending log is kept until a later one)", due, exc)
            try:
                with self._pruning:  # (not while a version is read: see _pruning)
                    self._prune_now()
            except OSError as exc:
                log.warning("pruning old versions: %s", exc)

    def _remove_leftovers(self) -> None:
        """Temp directories and files of a crash mid-write (only while nothing is being written)."""
        for p in self.versions_dir.glob(".v*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".strategy-arrays-*.npz.tmp"):  # (model-sized: a crash mid-write of the arrays)
            p.unlink(missing_ok=True)

    def initialise(self, weights: Vector, *, now: float, source: str) -> None:
        """Write version 0 (the deployed model) into an empty state dir."""
        if self._version_dirs():
            raise RegistryError(f"{self.root} already holds versions")
        self._write_epoch(new_epoch())
        self.write_version(0, self.spec.check(weights), {"created_at": now, "source": source, "applied_upto": {}})

    def _write_epoch(self, epoch: int) -> None:
        _write_atomic(self.root / EPOCH_FILE, f"{epoch}\n".encode())

    def renew_epoch(self, above: int = 0) -> tuple[int, int]:
        """Start a new numbering (``edgeci new-epoch``; the lock must be held): an epoch above the
        current one, ``above`` and the clock. Returns (old, new); old is 0 when there was none."""
        if not self.locked:
            raise RegistryError(f"{self.root} must be locked to change its epoch")
        old = read_epoch(self.root) or 0
        new = max(new_epoch(), old + 1, above + 1)
        if new > MAX_EPOCH:
            raise RegistryError(f"no epoch is left above {max(old, above)} (the largest is {MAX_EPOCH})")
        self._write_epoch(new)
        return old, new

    def _epoch(self) -> int:
        """The state dir's epoch; a missing or unreadable one is replaced by a new epoch when
        this registry holds the lock (else 0: a read-only look at a dir without one)."""
        epoch = read_epoch(self.root)
        if epoch is not None or not self.locked:
            return epoch or 0
        epoch = new_epoch()
        self._write_epoch(epoch)
        log.warning("%s had no readable %s file: its versions are numbered in a new epoch (%d) from now on; devices "
                    "fetch the release again and train the updates they had in flight again", self.root, EPOCH_FILE, epoch)
        return epoch

    def record_release(self, release: int, pinned: bool, event: Mapping[str, Any],
                       floor: Mapping[str, Any] | None = None) -> None:
        """Durably record a gate decision or operator action and the release it leaves
        (``release.json``: the release, the pin, the gate's best-release ``floor`` with the
        validation set it was scored on, the last :data:`HISTORY_EVENTS` events, and
        before them up to :data:`HISTORY_COMMANDS` older operator commands: a restart seeds its
        replay protection from them, and a busy gate writes 200 decisions inside a command's window;
        and up to :data:`HISTORY_REJECTS` older rejections: a restart seeds ``--force`` from them)."""
        if release not in self._synced_dirs:  # the release must survive a power cut as a directory: its
            self._sync_version(release)        # log record may be gone (a base after it was checkpointed)
        if release in self._unsynced:
            self._unsynced.remove(release)
        record = read_release_record(self.root)
        old = record.get("history", [])
        cut = max(0, len(old) - (HISTORY_EVENTS - 1))
        older = [e for e in old[:cut] if isinstance(e, dict)]
        commands = [e for e in older if "nonce" in e][-HISTORY_COMMANDS:]
        rejects = [e for e in older if "nonce" not in e and e.get("action") == "reject"][-HISTORY_REJECTS:]
        kept = {id(e) for e in (*commands, *rejects)}
        history = [*(e for e in older if id(e) in kept), *old[cut:], dict(event)]
        body: dict[str, Any] = {"release": release, "pinned": pinned, "history": history}
        if floor is not None:  # (none: the file holds none, and a restart starts without one)
            body["gate_floor"] = dict(floor)
        _write_atomic(self.root / RELEASE_FILE, json.dumps(body, indent=1).encode())

    def record_canary_round(self, record: Mapping[str, Any]) -> None:
        """Durably record the open canary round (``canary.json``, replaced whole: tmp, fsync, rename,
        fsync of the dir: 0.8 ms for a 64-device cohort, measured on ext4 on a virtual disk)."""
        _write_atomic(self.root / CANARY_FILE, json.dumps(dict(record)).encode())

    def record_selection_round(self, record: Mapping[str, Any]) -> None:
        """Durably record the selection round just drawn (``round.json``, replaced whole: tmp, fsync,
        rename, fsync of the dir), before its invitations leave."""
        _write_atomic(self.root / ROUND_FILE, json.dumps(dict(record)).encode())

    def record_refusal(self, event: Mapping[str, Any]) -> None:
        """Durably record a verified operator command that did not run (``refused.json``: the newest
        :data:`REFUSALS_KEPT`, rewritten whole: tmp, fsync, rename, fsync of the dir)."""
        kept = [*read_refusals(self.root), dict(event)][-REFUSALS_KEPT:]
        _write_atomic(self.root / REFUSED_FILE, json.dumps(kept).encode())

    def stage(self, updates: Iterable[BufferedUpdate]) -> None:
        """Updates to write with the next append or commit (same fsync). Not durable yet."""
        self._staged.extend(updates)

    def stage_version(self, action: CommitVersion) -> None:
        """Append the staged updates and the version to the log *without* fsync: the next
        :meth:`flush` (or :meth:`commit`) makes them durable together. Nothing that depends on
        them may leave before that (the driver holds it)."""
        self._ensure_state()
        meta = {k: v for k, v in action.metadata.items() if k not in _CHAIN_KEYS}
        changed = {str(d): int(seq) for d, seq in action.applied_changed.items()}
        added = [d for d in dict.fromkeys(action.devices_added) if d not in self._seen]
        base = self._since_base + 1 >= self._base_every
        if base:  # every so often the full maps (O(devices)): a chain's start, and a checkpoint
            meta["applied_upto"] = {**self._applied, **changed}
            meta["devices_seen"] = [*self._seen, *added]
        else:  # O(changed)
            meta["parent"] = self._state_version
            meta["applied_changed"] = changed
            meta["devices_added"] = added
        tallies = None
        if action.tallies is not None:
            tallies = {str(d): int(n) for d, n in action.tallies.changed.items()}
            if action.tallies.whole or self._tallies is None:
                meta["tallies"] = tallies  # started afresh: the full map, whatever the version
            elif base:
                meta["tallies"] = {**self._tallies, **tallies}
            else:  # O(changed)
                meta["tallies_changed"] = tallies
        meta["consumed"] = [[device, seq] for device, seq in action.consumed]
        version = action.version
        # A staged update at or below the watermarks this version leaves is applied by it: any
        # restore that reads this record drops it (``load`` keeps seq > applied_upto only), and
        # both become durable in the same write and fsync (the record after the updates, which
        # are acknowledged only after that fsync). Its record would be dead weight: not written.
        applied = self._applied
        staged = [u for u in self._staged if u.seq > changed.get(u.device, applied.get(u.device, -1))]
        self._staged = []
        self._claim(version)
        meta_json = _meta_json(version, meta)
        if type(action.metadata.get("release")) is int:
            self._commit_release = int(action.metadata["release"])
        weights = self.spec.check(np.ascontiguousarray(action.weights, dtype=np.float32))
        records = [encode_record(u) for u in staged] + [_record(_version_body(version, weights, meta_json))]
        if action.arrays:  # durable before the version's record: acknowledged with it, never after
            self._write_arrays(version, action.arrays)
        self._append(records, staged, version, sync=False)
        self._logged[version] = (weights, meta_json)
        whole = meta.get("tallies")
        self._advance(version, changed, added, base, tallies if whole is None else whole, whole=whole is not None)

    # ------------------------------------------------------------------ cumulative watermarks

    def watermarks(self) -> tuple[dict[str, int], list[str]]:
        """Copies of the cumulative ``applied_upto`` and ``devices_seen`` (O(devices))."""
        self._ensure_state()
        return dict(self._applied), list(self._seen)

    def _ensure_state(self) -> None:
        if self._state_version is None and self.load() is None:  # used without load(): resume as a restart would
            self._set_state(-1, {}, [], None)

    def _set_state(self, version: int, applied: Mapping[str, Any], seen: Iterable[Any], tallies: Mapping[str, Any] | None) -> None:
        self._applied = {str(k): int(v) for k, v in applied.items()}
        self._seen = dict.fromkeys(str(d) for d in seen)
        self._tallies = {str(k): int(v) for k, v in tallies.items()} if tallies is not None else None
        self._state_version = version
        self._undo.clear()
        self._bases.clear()
        self._outstanding = {
            path: {d for d, seq in keys.items() if seq > self._applied.get(d, -1)} for path, keys in self._segment_keys.items()
        }

    def _advance(self, version: int, changed: Mapping[str, int], added: list[str], base: bool,
                 tallies: dict[str, int] | None, *, whole: bool) -> None:
        """Apply a staged version to the cumulative state (undone if its fsync fails). ``tallies``:
        the counts it changed (with ``whole``: the full map it holds; None: it holds none)."""
        undo_tallies: _TallyUndo
        if tallies is not None and not whole and self._tallies is not None:
            undo_tallies = (None, {d: self._tallies.get(d) for d in tallies})
            self._tallies.update(tallies)
        else:  # replaced: the previous map is kept as it was (never changed in place from here on)
            undo_tallies = (self._tallies, None)
            self._tallies = tallies
        self._undo.append((self._state_version, {d: self._applied.get(d) for d in changed}, len(self._seen), self._since_base, base,
                           undo_tallies))
        self._applied.update(changed)
        for d in added:
            self._seen[d] = None
        self._state_version = version
        self._since_base = 0 if base else self._since_base + 1
        self._is_base[version] = base
        if base:
            self._bases.add(version)
        self._settle(changed)

    def _rollback_state(self) -> None:
        """The appends since the last fsync were cut away: so are their versions' changes."""
        while self._undo:
            previous, old, n_seen, since_base, base, (tallies, old_counts) = self._undo.pop()
            if old_counts is None:
                self._tallies = tallies
            elif self._tallies is not None:
                for d, n in old_counts.items():
                    if n is None:
                        self._tallies.pop(d, None)
                    else:
                        self._tallies[d] = n
            if base and self._state_version is not None:
                self._bases.discard(self._state_version)
            for d, seq in old.items():
                if seq is None:
                    self._applied.pop(d, None)
                else:
                    self._applied[d] = seq
            while len(self._seen) > n_seen:
                self._seen.popitem()
            self._state_version, self._since_base = previous, since_base
            self._settle(old)

    def _settle(self, devices: Iterable[str]) -> None:
        """Recheck which log segments still hold unapplied updates of ``devices``: O(changed)."""
        devices = list(devices)
        for path, outstanding in self._outstanding.items():
            keys = self._segment_keys.get(path, {})
            for d in devices:
                if keys.get(d, -1) > self._applied.get(d, -1):
                    outstanding.add(d)
                else:
                    outstanding.discard(d)

    def _meta_of(self, version: int, records: Mapping[int, bytes]) -> dict[str, Any]:
        """A version's metadata: its log record's, else its directory's."""
        try:
            if version in records:
                meta = json.loads(bytes(msgpack.unpackb(records[version], raw=False)["meta"]))
            else:
                meta = json.loads((self.versions_dir / f"{version:09d}" / "meta.json").read_bytes())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"version {version}'s metadata is unreadable: {exc}") from exc
        if not isinstance(meta, dict):
            raise RegistryError(f"version {version}'s metadata is not an object")
        return meta

    def _state_of(self, version: int, meta: Mapping[str, Any],
                  records: Mapping[int, bytes]) -> tuple[dict[str, int], list[str], dict[str, int] | None]:
        """Cumulative ``applied_upto``, ``devices_seen`` and tallies (None: none) at ``version``:
        back along the parents to a base, then the changes replayed. Raises ``RegistryError``
        when a link of the chain is unreadable (the version cannot be resumed from)."""
        chain: list[Mapping[str, Any]] = []
        v = version
        try:
            while "parent" in meta:
                chain.append(meta)
                parent = int(meta["parent"])
                if parent < 0:
                    meta = {}
                    break
                if parent >= v:
                    raise RegistryError(f"version {v} names parent {parent}, which is not older")
                v = parent
                meta = self._meta_of(v, records)
            applied = {str(k): int(x) for k, x in meta.get("applied_upto", {}).items()}
            seen = dict.fromkeys(str(d) for d in meta.get("devices_seen", []))
            tallies = _tallies_of(meta, None)
            for m in reversed(chain):
                applied.update({str(k): int(x) for k, x in m.get("applied_changed", {}).items()})
                seen.update(dict.fromkeys(str(d) for d in m.get("devices_added", [])))
                tallies = _tallies_of(m, tallies)
        except (AttributeError, TypeError, ValueError) as exc:
            raise RegistryError(f"version {version}: bad watermarks in its chain (at version {v}): {exc}") from exc
        return applied, list(seen), tallies

    @property
    def unflushed(self) -> bool:
        """Something was staged or appended without fsync."""
        return bool(self._staged) or self._dirty_from is not None

    def flush(self) -> None:
        """fsync what :meth:`stage_version` appended; on failure cut it away and raise."""
        path, start = self._segment_path, self._dirty_from
        if path is None or start is None:
            return
        fd = os.open(path, os.O_WRONLY)
        try:
            os.fsync(fd)
        except BaseException:
            self._logged.clear()
            self._rollback_state()
            self._cut(fd, path, start)
            raise
        finally:
            os.close(fd)
        self._dirty_from = None
        self._undo.clear()

    def commit(self, action: CommitVersion) -> None:
        """Make the version durable with one log append (and one fsync) together with the
        staged updates (unless :meth:`stage_version` and :meth:`flush` did), then put its
        directory in place (no fsync: the log holds it until a checkpoint), and drop log
        segments whose content is applied and checkpointed."""
        version = action.version
        if version not in self._logged:
            self.stage_version(action)
        self.flush()
        weights, meta_json = self._logged.pop(version)
        self._materialise(version, weights, meta_json, durable=False)  # durable from here on, by the log
        self._unsynced.append(version)
        if version in self._bases:
            if self._janitor is not None:  # fsynced by the pruning thread; picked up by a later commit
                self._checkpoint_due = version
            else:
                self._checkpoint(version)
        self._drop_arrays(keep=version)  # (also when this one has none: another strategy's are no use now)
        self._prune()
        self._drop_applied()

    # ------------------------------------------------------------------ the strategy's arrays

    def _arrays_path(self, version: int) -> Path:
        return self.root / f"strategy-arrays-{version:09d}.npz"

    def _write_arrays(self, version: int, arrays: Mapping[str, Vector]) -> None:
        """The strategy's model-sized state at ``version``, one .npz tagged with it, atomically
        (fsynced, then renamed into place). The one of the version before stays until this one's
        commit is durable (:meth:`_drop_arrays`)."""
        payload: dict[str, Any] = {str(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        payload["__version__"] = np.array(version, dtype=np.int64)
        buf = io.BytesIO()
        np.savez(buf, **payload)
        _write_atomic(self._arrays_path(version), buf.getvalue())

    def _drop_arrays(self, keep: int) -> None:
        """Delete the arrays of versions before ``keep`` (a later version's, staged in the same batch
        and committed next, stays: the daemon commits a batch's versions one after the other)."""
        for path in self.root.glob("strategy-arrays-*.npz"):
            number = path.name[len("strategy-arrays-"):-len(".npz")]
            if number.isdigit() and int(number) < keep:
                path.unlink(missing_ok=True)

    def _read_arrays(self, version: int) -> dict[str, Vector] | None:
        """The arrays kept with ``version``, or None (none, another version's, unreadable: said)."""
        path = self._arrays_path(version)
        if not path.exists():
            return None
        try:
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:  # (no file handle left open on a bad one)
                if "__version__" not in npz.files or int(npz["__version__"]) != version:
                    raise ValueError("tagged with another version")
                return {k: np.asarray(npz[k], dtype=np.float32) for k in npz.files if k != "__version__"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("RECOVERY: %s is unreadable (%s): the strategy's model-sized state starts afresh", path, exc)
            return None

    def read_history(self, version: int, n: int) -> dict[int, Vector]:
        """Up to ``n`` readable versions before ``version``, newest first (an unreadable one is
        skipped): more than :meth:`load` hands back, for a core that keeps more."""
        with self._pruning:
            return self._read_history(version, n)

    def _read_history(self, version: int, n: int) -> dict[int, Vector]:
        """Up to ``n`` readable versions before ``version``, newest first (an unreadable one is skipped)."""
        out: dict[int, Vector] = {}
        for older in sorted((v for v in self._version_dirs() if v < version), reverse=True)[:n]:
            try:
                out[older] = self._read_dir(older)[0]
            except RegistryError:
                continue
        return out

    def _drop_applied(self) -> None:
        """Delete log segments whose updates are all applied and whose versions are all at or
        below the last checkpoint: O(segments), the watermarks are tracked per segment."""
        if self._checkpoint_done > self._durable_version:  # the pruning thread fsynced a base
            self._checkpointed(self._checkpoint_done)
        for path in list(self._segment_keys):
            outstanding = self._outstanding.get(path)
            checkpointed = self._segment_versions.get(path, -1) <= self._durable_version
            if path != self._segment_path and outstanding is not None and not outstanding and checkpointed:
                path.unlink(missing_ok=True)  # a resurrected segment is dropped again on load
                del self._segment_keys[path]
                self._segment_versions.pop(path, None)
                self._outstanding.pop(path, None)
        active = self._segment_path
        if active is not None and self._segment_size >= SEGMENT_BYTES // 4 and self._outstanding.get(active) == set():
            self._since_base = self._base_every  # the next version is a base, checkpointed when committed
            self._close_segment()  # start afresh; the commit after that base deletes this one
        if self._upd_files:  # the older layout
            left = False
            for p in self.pending_dir.glob("*.upd"):
                device, _, seq = p.name[:-4].rpartition(".")
                if seq.isdigit() and int(seq) <= self._applied.get(device, -1):
                    p.unlink(missing_ok=True)
                else:
                    left = True
            self._upd_files = left

    # ------------------------------------------------------------------ pending updates (log)

    def _new_segment(self) -> Path:
        numbers = [int(p.stem) for p in self.pending_dir.glob("*.log") if p.stem.isdigit()]
        path = self.pending_dir / f"{max(numbers, default=0) + 1:012d}.log"
        try:
            with open(path, "xb") as f:
                f.write(SEGMENT_MAGIC)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.pending_dir)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._segment_path, self._segment_size = path, len(SEGMENT_MAGIC)
        self._segment_keys[path] = {}
        self._outstanding[path] = set()
        return path

    def _close_segment(self) -> None:
        """Appends go to a new segment from now on (after :meth:`flush`, or :meth:`_cut`)."""
        self._segment_path, self._segment_size, self._dirty_from = None, 0, None

    def append_updates(self, updates: Iterable[BufferedUpdate]) -> None:
        """Durably append accepted updates: one write and one fsync for all of them.

        On failure (``OSError``: ENOSPC, EIO, ...) the segment is cut back to where it was, so
        that no partial record stays in the middle of the log, and the error propagates: none
        of these updates may be acknowledged. Later appends go to a new segment.
        """
        batch = [*self._staged, *updates]
        self._staged = []
        if batch:
            self._append([encode_record(u) for u in batch], batch, None)
        else:
            self.flush()

    def _append(self, records: list[bytes], updates: list[BufferedUpdate], version: int | None, *, sync: bool = True) -> None:
        """One write of ``records`` and (``sync``) one fsync, which also covers earlier unsynced
        appends; on failure the segment is cut back to its last durable size (see above)."""
        data = b"".join(records)
        path = self._segment_path
        if path is None or self._segment_size >= SEGMENT_BYTES:
            self.flush()
            path = self._new_segment()
        start = self._segment_size
        durable_size = start if self._dirty_from is None else self._dirty_from
        fd = os.open(path, os.O_WRONLY)  # unbuffered: nothing is left to be written at close
        try:
            view, offset = memoryview(data), 0
            while offset < len(data):
                offset += os.pwrite(fd, view[offset:], start + offset)
            if sync:
                os.fsync(fd)
        except BaseException:
            self._logged.clear()
            self._rollback_state()
            self._cut(fd, path, durable_size)
            raise
        finally:
            os.close(fd)
        self._dirty_from = None if sync else durable_size
        if sync:
            self._undo.clear()
        self._segment_size = start + len(data)
        keys = self._segment_keys[path]
        outstanding = self._outstanding.setdefault(path, set())
        for u in updates:
            if u.seq > keys.get(u.device, -1):
                keys[u.device] = u.seq
            if u.seq > self._applied.get(u.device, -1):
                outstanding.add(u.device)
        if version is not None:
            self._segment_versions[path] = max(self._segment_versions.get(path, -1), version)

    def _cut(self, fd: int, path: Path, size: int) -> None:
        """After a failed append: truncate to ``size`` (best effort) and never append there again."""
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as exc:
            log.warning("could not cut %s back to %d bytes (%s); its torn tail is dropped on load", path, size, exc)
        self._close_segment()

    def persist_update(self, u: BufferedUpdate) -> None:
        """One update, durably (one fsync): :meth:`append_updates` of one."""
        self.append_updates([u])

    def persist_update_file(self, u: BufferedUpdate) -> None:
        """The older layout: one file per update (tmp, fsync, rename, fsync dir). Kept for the
        commit-throughput baseline and for tests of reading an old state dir."""
        device_seq = f"{u.device}.{u.seq:020d}.upd"
        _write_atomic(self.pending_dir / device_seq, _update_body(u))
        self._upd_files = True

    def _read_segment(self, path: Path) -> tuple[list[BufferedUpdate], list[tuple[int, bytes]]]:
        """The intact records of a segment: updates, and ``(version, body)`` of version records."""
        data = path.read_bytes()
        if len(data) < len(SEGMENT_MAGIC):
            if self.locked and path != self._segment_path:
                path.unlink(missing_ok=True)  # created, never written: a crash at creation
            return [], []
        if not data.startswith(SEGMENT_MAGIC):
            if data.startswith(SEGMENT_MAGIC[:6]):  # b"EDGLOG": ours, in a format this edgeci predates (a downgrade)
                found = data[6:].split(b"\n", 1)[0][:16]
                raise RegistryError(f"{path} is a pending-update log of format {found!r}, written by a newer edgeci than "
                                    f"this one (which reads {SEGMENT_MAGIC[6:-1]!r}): upgrade edgeci, and keep the file: "
                                    "it holds acknowledged updates")
            raise RegistryError(f"{path} is not an edgeci pending-update log")
        updates: list[BufferedUpdate] = []
        versions: list[tuple[int, bytes]] = []
        good = len(SEGMENT_MAGIC)
        while True:
            for end, body in _scan(data, good):
                try:
                    # The decoded map says what a record is: a version record has a "kind" key, an
                    # update has none (a byte search for "kind" also matched device ids like "kindle-7").
                    fields = _decoded(body)
                    if "kind" in fields:
                        if fields["kind"] != "version":
                            raise ValueError("unknown record kind")
                        versions.append((int(fields["version"]), body))
                    else:
                        updates.append(_update_of(fields))
                except Exception as exc:  # checksum fine but unusable: a bad record (see below)
                    log.warning("%s: unreadable record at byte %d: %s", path, good, exc)
                    break
                good = end
            resume = _intact_after(data, good) if good + _HEADER.size <= len(data) else None
            if resume is None:
                break
            # A bad record with intact ones after it is not a torn write (only the last write
            # tears): those after it were acknowledged. Skip it, read on, truncate nothing.
            log.error("%s: a corrupt record of %d bytes at byte %d with intact records after it (media "
                      "corruption?): it is skipped, the rest is read, the file is kept as it is",
                      path, resume - good, good)
            self.corrupt_records += 1
            good = resume
        if good < len(data):
            log.warning(
                "%s: ignoring a torn or corrupt tail of %d bytes after %d intact records%s",
                path, len(data) - good, len(updates) + len(versions), " (truncated)" if self.locked else "",
            )
            if self.locked and path != self._segment_path:
                with open(path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
        return updates, versions

    def _scan_log(self) -> tuple[list[BufferedUpdate], dict[int, bytes]]:
        """Every update in the log (and older per-update files), oldest first, each key once;
        and the version records, by version."""
        out: list[BufferedUpdate] = []
        records: dict[int, bytes] = {}
        seen: set[tuple[str, int]] = set()
        for p in sorted(self.pending_dir.glob("*.upd")):
            try:
                u = _update_from(p.read_bytes())
            except Exception as exc:
                raise RegistryError(f"pending update {p} is unreadable: {exc}") from exc
            if u.key not in seen:
                seen.add(u.key)
                out.append(u)
        segments = sorted((p for p in self.pending_dir.glob("*.log") if p.stem.isdigit()), key=lambda p: int(p.stem))
        for path in segments:
            keys = self._segment_keys.setdefault(path, {})
            updates, versions = self._read_segment(path)
            for u in updates:
                if u.seq > keys.get(u.device, -1):
                    keys[u.device] = u.seq
                if u.key not in seen:
                    seen.add(u.key)
                    out.append(u)
            for version, body in versions:
                records[version] = body
                self._segment_versions[path] = max(self._segment_versions.get(path, -1), version)
        return out, records

    def pending(self) -> list[BufferedUpdate]:
        """Every update in the log (and older per-update files), oldest first, each key once."""
        return self._scan_log()[0]

    def _from_record(self, body: bytes) -> tuple[Vector, dict[str, Any], bytes]:
        fields = msgpack.unpackb(body, raw=False)
        meta_json = bytes(fields["meta"])
        weights = np.array(decode_tensor(fields["weights"]), dtype=np.float32)
        meta = json.loads(meta_json)
        if not isinstance(meta, dict):
            raise RegistryError("a version record's meta is not an object")
        return self.spec.check(weights), meta, meta_json

    def _repair(self, records: dict[int, bytes]) -> None:
        """Put back (durably) version directories that a crash lost or tore but the log holds.
        A missing one older than the newest ``keep_versions`` present was pruned, not lost: it
        stays gone (restoring it logged a warning per version at every restart, and wrote them
        all again only for the next commit to prune them)."""
        known = sorted(set(self._version_dirs()) | set(records))
        floor = known[-self.keep_versions] if len(known) >= self.keep_versions else -1
        for version, body in sorted(records.items()):
            d = self.versions_dir / f"{version:09d}"
            if version < floor and not d.exists():
                continue
            if d.exists():
                try:
                    self.read_version(version)
                    continue
                except RegistryError:
                    pass
            if not self.locked:
                continue
            weights, _, meta_json = self._from_record(body)
            try:
                shutil.rmtree(d, ignore_errors=True)
                self._materialise(version, weights, meta_json, durable=True)
                log.warning("version %d restored from the pending log into %s", version, d)
            except OSError as exc:
                log.warning("could not restore version %d from the pending log into %s: %s", version, d, exc)

    # ------------------------------------------------------------------ restore

    def load(self) -> Snapshot | None:
        """The newest readable committed version plus pending updates, or None for an empty dir.

        An unreadable newer version is skipped with a warning; the snapshot then names it in
        ``recovered_from`` and its ``version_floor`` keeps the next version number above it.
        """
        with self._pruning:
            return self._load()

    def _load(self) -> Snapshot | None:
        updates, records = self._scan_log()
        if self.locked:
            self._remove_leftovers()
        self._repair(records)
        self._listed_max = None  # listed again at the next claim (repair may have written some)
        self._prune_at = -2  # and at the next prune
        present = self._version_dirs()
        if not present and not records:
            return None
        skipped: list[str] = []
        for version in sorted(set(present) | set(records), reverse=True):
            try:
                if version in records:  # the log's copy is checksummed: it wins over the directory
                    weights, meta, _ = self._from_record(records[version])
                else:
                    weights, meta = self._read_dir(version)
                applied_upto, devices_seen, tallies = self._state_of(version, meta, records)
            except RegistryError as exc:
                log.warning("RECOVERY: %s; falling back to an older version", exc)
                skipped.append(f"{version}: {exc}"[:300])
                continue
            break
        else:
            raise RegistryError(f"no readable version in {self.root}: {'; '.join(skipped)}")
        if skipped:
            log.warning("RECOVERY: resuming %s from version %d; %d newer version(s) unreadable", self.root, version, len(skipped))
        self._commit_release = int(meta["release"]) if type(meta.get("release")) is int else None
        self._set_state(version, applied_upto, devices_seen, tallies)
        self._since_base = self._base_every  # the next version is a base: chains stay short
        buffer = [u for u in updates if u.seq > applied_upto.get(u.device, -1)]
        # Release numbers only grow (a rollback releases a *new* version), so the newer of the
        # two records is the larger: release.json (gate decisions, operator commands) or the
        # newest commit's metadata (a version released on commit, without a gate).
        record = read_release_record(self.root)
        if not record and (self.root / RELEASE_FILE).exists() and not _parses_as_object(self.root / RELEASE_FILE):
            # Said, and kept aside: the next gate decision rewrites the file from {} (helper-98:
            # a damaged release.json silently lost the gate's history, and the pin with it).
            kept = self.root / f"{RELEASE_FILE}.unreadable"
            try:
                if self.locked:
                    shutil.copyfile(self.root / RELEASE_FILE, kept)
            except OSError:
                pass
            log.warning("RECOVERY: %s is unreadable: the gate's history and the pin are lost; the release is taken from the "
                        "newest version's metadata%s", self.root / RELEASE_FILE, f" (a copy is kept as {kept})" if self.locked else "")
            skipped.append(f"{RELEASE_FILE}: unreadable")
        meta_release = int(meta.get("release", version))
        newer_meta = meta_release > int(record.get("release", -1))
        release = meta_release if newer_meta else int(record["release"])
        pinned = bool(meta.get("pinned", False)) if newer_meta else bool(record.get("pinned", False))
        history = list(record.get("history", []))
        if newer_meta and meta.get("source") == "operator" and type(meta.get("nonce")) is int and isinstance(meta.get("operator"), str):
            # The operator's command is durable in its commit, its record was lost (a crash or a failed
            # write between the two): it is in the history again, so a replay of it is refused, the
            # CLI sees it done, and the core records it again.
            history.append({"at": float(meta.get("created_at", 0.0)), "action": str(meta.get("command")), "version": version,
                            "release": meta_release, "of": meta.get("of"), "operator": meta["operator"], "nonce": meta["nonce"],
                            **({"kid": meta["kid"]} if isinstance(meta.get("kid"), str) else {}), "recovered": True})
        release_weights = None
        if release != version:
            try:
                release_weights = self._read_dir(release)[0]
            except RegistryError as exc:
                # The newest readable *earlier* release (the gate promoted it, or an operator
                # released it), not the training line's head: that may be a candidate the gate
                # held or never scored, and making it the release would bypass the gate (helper-98).
                skipped.append(f"release {release}: {exc}"[:300])
                earlier = sorted({int(e["release"]) for e in record.get("history", []) if isinstance(e, dict)
                                  and isinstance(e.get("release"), int) and e["release"] < release}, reverse=True)
                # Not one a later decision abandoned (an operator's rollback past it, a rejection): the
                # unreadable release may be that very rollback's commit (helper-143).
                spans = [span for e in history if (span := abandoned_by(e, newest=release)) is not None]
                earlier = [v for v in earlier if not any(first <= v <= last for first, last in spans)]
                for older in earlier:
                    try:
                        release_weights = self._read_dir(older)[0]
                    except RegistryError:
                        continue
                    log.warning("RECOVERY: the release (version %d) is unreadable (%s): the release before it, version %d, "
                                "is the release again", release, exc, older)
                    release = older
                    break
                else:
                    log.warning("RECOVERY: the release (version %d) is unreadable (%s) and no earlier release is readable: "
                                "version %d, the training line (not necessarily gated), is the release", release, exc, version)
                    release = version
        return Snapshot(
            release_version=release,
            release_weights=release_weights,
            pinned=pinned,
            gate_history=history,  # (the core shows the last 20; operator commands in all)
            # A release the record does not know (an operator's command whose record was lost, or
            # versions released without the gate) is a new bar: the recorded floor is not its.
            gate_floor=None if newer_meta or not isinstance(record.get("gate_floor"), dict) else dict(record["gate_floor"]),
            canary_round=read_canary_round(self.root),
            selection_round=read_selection_round(self.root),
            round_devices=dict(meta["round"]) if isinstance(meta.get("round"), dict) else None,
            control_refused=read_refusals(self.root),
            version=version,
            weights=weights,
            applied_upto=applied_upto,
            buffer=buffer,
            devices_seen=devices_seen,
            last_aggregation_at=float(meta.get("created_at", 0.0)),
            counters={str(k): int(v) for k, v in meta.get("counters", {}).items()},
            staleness_hist={int(k): v for k, v in meta.get("staleness_hist", {}).items()
                            if isinstance(k, str) and k.isdigit() and type(v) is int and v >= 0},
            last_full_version=int(meta.get("last_full_version", version)),
            peer_state=dict(meta.get("peering", {})),
            peer_name=str(meta["peering_name"]) if isinstance(meta.get("peering_name"), str) else None,
            peer_tallies=tallies,  # (_set_state took its own copy)
            strategy_state=dict(meta["strategy_state"]) if isinstance(meta.get("strategy_state"), dict) else {},
            strategy_arrays=self._read_arrays(version),
            history=self._read_history(version, HISTORY_VERSIONS),
            strategy_name=str(meta["strategy"]) if isinstance(meta.get("strategy"), str) else None,
            conversion_state=dict(meta.get("conversion", {})),
            abandoned=[(int(r[0]), int(r[1])) for r in meta.get("abandoned", [])],
            recovered_from=tuple(skipped),
            epoch=self._epoch(),
            rejected=(meta["rejected"], version - 1) if meta.get("source") == "rollback" and type(meta.get("rejected")) is int else (),
            candidate_devices=tuple(d for d in meta["devices"] if isinstance(d, str)) if isinstance(meta.get("devices"), list) else (),
            version_floor=max(max(present, default=-1), max(records, default=-1), self._highest_written),
        )
