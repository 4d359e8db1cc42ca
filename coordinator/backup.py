"""``edgeci backup``: a verified copy of a coordinator's state dir, taken while it runs or not.

The registry is written so that whatever a crash leaves on disk loads (a torn last log record
is cut, an unreadable newer version is skipped). A backup of a running coordinator is not one
instant of that disk, so the copy is made in the order that keeps it loadable and complete as of
the moment it began:

1. ``pending/`` first (the log segments): every update acknowledged before the copy began is in
   them, or in a version; a segment the coordinator deletes meanwhile held only updates a version
   had applied already (a checkpointed base), and that version is copied later, in step 3.
2. The files beside them (``spec.json``, ``epoch``, ``region``, ``release.json``, the canary and
   selection rounds, the refused commands, the signing key, the strategy's arrays), never the
   ``lock``: no release they name is newer than the versions copied next.
3. ``versions/``, oldest first: a version's base (the full copy a later one is stored against) is
   copied before the versions built on it, and pruning only deletes versions no kept one needs.

Updates a version copied in step 3 applied are not pending in the copy; updates that arrived after
step 1 and no copied version applied are not in it at all — they are after the backup's moment.

The copy is then **verified**: opened as a coordinator would open it (:meth:`Registry.load`, under
the copy's own lock). A load that had to skip an unreadable version (one caught mid-write, or a
file deleted under the copy) does not count: the copy is made again (``attempts`` in all). Only a
verified copy is renamed to ``out``; every file and directory of it is fsynced first.

``edgeci restore`` (:func:`restore`) puts a backup back, the coordinator stopped: it holds the state
dir's lock throughout (a coordinator started meanwhile is refused), copies the backup beside it,
gives the copy a new epoch above both the backup's and the replaced state dir's (the fleet has seen
the version numbers that followed the backup: devices take the new numbering, fetch the release and
train their updates in flight again), checks that it loads, and only then swaps it in; the state
dir it replaces is kept beside it, renamed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from coordinator.core import Snapshot
from coordinator.registry import Registry, RegistryError, StateDirLocked, _fsync_dir, read_epoch
from edge_sdk.errors import BadOption, ConfigError, EdgeciError
from edge_sdk.spec import ModelSpec

__all__ = ["BackupError", "BackupResult", "RestoreResult", "backup", "check_paths", "restore"]

SKIPPED = frozenset({"lock", ".storage-probe"})
"""Files of the state dir not copied: the running coordinator's flock file and its storage probe's scratch file."""


class BackupError(EdgeciError):
    """The copy could not be made or did not verify (a runtime failure: exit 1)."""


@dataclass(frozen=True)
class BackupResult:
    out: Path
    version: int
    """The newest version the copy loads."""
    release: int
    epoch: int | None
    pending: int
    """Updates acknowledged and not yet applied, in the copy (a restart replays them)."""
    files: int
    bytes: int
    attempts: int
    seconds: float
    damaged: tuple[str, ...] = ()
    """What the state dir itself cannot load (the same in the last two copies): the coordinator skips it too."""


def _copy_file(src: Path, dst: Path) -> int:
    """Copy one file with its mode and times, fsynced; its size, or -1 if it vanished first (pruned)."""
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        return -1
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dst.stat().st_size


def _listing(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except FileNotFoundError:
        return []


def _copy(src: Path, dst: Path, tick: Callable[[int], None]) -> None:
    """The state dir's files into ``dst`` (which must not exist), in the order the module
    docstring gives."""

    def one(s: Path, d: Path) -> bool:
        n = _copy_file(s, d)
        if n >= 0:
            tick(n)
        return n >= 0

    dst.mkdir(parents=True)
    (dst / "pending").mkdir()
    for s in _listing(src / "pending"):  # 1. the log
        if s.is_file():
            one(s, dst / "pending" / s.name)
    _fsync_dir(dst / "pending")
    for s in _listing(src):  # 2. the files beside it (and any folder but the two of steps 1 and 3)
        if s.name in SKIPPED or s.name in ("pending", "versions"):
            continue
        if s.is_file():
            one(s, dst / s.name)
        elif s.is_dir():
            with contextlib.suppress(FileNotFoundError):
                shutil.copytree(s, dst / s.name, copy_function=lambda a, b: one(Path(a), Path(b)))
    (dst / "versions").mkdir()
    versions = [p for p in _listing(src / "versions") if p.name.isdigit()]  # (not a crashed write's temp dir)
    for vdir in sorted(versions, key=lambda p: int(p.name)):  # 3. oldest first
        target = dst / "versions" / vdir.name
        target.mkdir()
        whole = all(one(s, target / s.name) for s in _listing(vdir) if s.is_file())
        if not whole or not any(target.iterdir()):  # pruned under the copy: not kept half
            shutil.rmtree(target)
        else:
            _fsync_dir(target)
    _fsync_dir(dst / "versions")
    _fsync_dir(dst)


class _ThisThread(logging.Filter):
    """Drops the registry's records from this thread: loading a running coordinator's copy says
    "version N restored from the pending log" for each version not yet written out as a directory
    (normal: the log is ahead of the directories), and what it skips is reported by the result."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


@contextlib.contextmanager
def _opened(copy: Path, spec: ModelSpec) -> Iterator[Registry]:
    """The copy's registry, locked, its records from this thread kept quiet; closed and its lock
    file removed after (a backup carries no lock)."""
    registry = Registry(copy, spec)
    quiet = _ThisThread()
    logger = logging.getLogger("edgeci.registry")
    logger.addFilter(quiet)
    try:
        registry.acquire_lock()
        yield registry
    finally:
        logger.removeFilter(quiet)
        registry.close()
        with contextlib.suppress(FileNotFoundError):
            (copy / "lock").unlink()


def _spec_of(path: Path) -> ModelSpec:
    try:
        return ModelSpec.from_dict(json.loads((path / "spec.json").read_text()))
    except (OSError, ValueError, EdgeciError) as exc:
        raise BackupError(f"{path / 'spec.json'} is unreadable: {exc}") from exc


def _release_of(snapshot: Snapshot) -> int:
    return snapshot.release_version if snapshot.release_version >= 0 else snapshot.version


def _verify(copy: Path) -> tuple[int, int, int, list[str]]:
    """Load the copy as a coordinator would: ``(version, release, pending, skipped)``."""
    try:
        with _opened(copy, _spec_of(copy)) as registry:
            snapshot = registry.load()
    except RegistryError as exc:
        return -1, -1, 0, [str(exc)]
    if snapshot is None:
        return -1, -1, 0, ["no version in it"]
    return snapshot.version, _release_of(snapshot), len(snapshot.buffer), list(snapshot.recovered_from)


def check_paths(state_dir: Path, out: Path) -> None:
    """Refuse what cannot be a backup: a path that is not there (exit 1, as for the other state-dir
    commands) or one wrong on its face (exit 2)."""
    if not (state_dir / "versions").is_dir() or not (state_dir / "spec.json").is_file():
        raise ConfigError(f"{state_dir} is not a coordinator state dir (no versions/ or spec.json)")
    if out.exists():
        raise BadOption(f"{out} exists: a backup goes to a new path (move the old one aside, or pick another name)")
    src, dst = state_dir.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise BadOption(f"{out} is inside the state dir {state_dir}: put the backup elsewhere")
    if not dst.parent.is_dir():
        raise ConfigError(f"{out.parent} does not exist: make it first")


def backup(state_dir: Path, out: Path, *, attempts: int = 3, progress: Callable[[int], None] | None = None) -> BackupResult:
    """Copy ``state_dir`` to ``out`` and verify it (see the module docstring).

    Raises :class:`~edge_sdk.errors.ConfigError` for paths that cannot work, :class:`BackupError`
    when no attempt verified or a write failed (a full disk: nothing is left at ``out``)."""
    check_paths(state_dir, out)
    started = time.monotonic()
    tick = progress or (lambda n: None)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    problems: list[str] = []
    before: list[str] | None = None
    try:
        for attempt in range(1, attempts + 1):
            shutil.rmtree(partial, ignore_errors=True)
            _copy(state_dir, partial, tick)
            version, release, pending, skipped = _verify(partial)
            # Skipped in the last two copies alike: the state dir's own damage, not a write caught
            # mid-way. A copy that loads as the coordinator loads the original is still a backup.
            damaged = attempt == attempts and version >= 0 and skipped == before
            if not skipped or damaged:
                kept = [f for f in partial.rglob("*") if f.is_file()]
                files, total = len(kept), sum(f.stat().st_size for f in kept)
                os.rename(partial, out)
                _fsync_dir(out.parent)
                return BackupResult(out=out, version=version, release=release, epoch=read_epoch(out), pending=pending,
                                    files=files, bytes=total, attempts=attempt, seconds=time.monotonic() - started,
                                    damaged=tuple(skipped))
            problems.append(f"attempt {attempt}: {'; '.join(skipped)[:300]}")
            before = skipped
    except OSError as exc:
        raise BackupError(f"copying {state_dir} to {out.parent} failed: {exc.strerror or exc}"
                          f"{' (' + exc.filename + ')' if exc.filename else ''}; nothing was kept") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    raise BackupError(f"no copy of {state_dir} loaded cleanly in {attempts} attempts ({' | '.join(problems)}); nothing was kept. "
                      "Is the state dir damaged? `edgeci versions --state-dir` shows what it holds")



@dataclass(frozen=True)
class RestoreResult:
    state_dir: Path
    kept: Path | None
    """Where the state dir the backup replaced now is (None: there was none)."""
    version: int
    release: int
    pending: int
    old_epoch: int
    """The newer of the backup's and the replaced state dir's epochs."""
    new_epoch: int
    damaged: tuple[str, ...] = ()


def _is_state_dir(path: Path) -> bool:
    return (path / "versions").is_dir() and (path / "spec.json").is_file()


@contextlib.contextmanager
def _held(state_dir: Path) -> Iterator[None]:
    """The state dir's lock, the registry's own (the one a coordinator holds while it runs), held throughout."""
    try:
        registry = Registry(state_dir, _spec_of(state_dir))
        registry.acquire_lock()
    except StateDirLocked as exc:
        raise ConfigError(f"{state_dir} is in use by a running coordinator: stop it first, then restore ({exc})") from exc
    except RegistryError as exc:
        raise ConfigError(f"{state_dir} cannot be replaced: {exc}") from exc
    try:
        yield
    finally:
        registry.close()


def _unused(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, … when it exists (two restores in one second keep both dirs)."""
    n = 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def restore(backup_dir: Path, state_dir: Path, *, now: float | None = None) -> RestoreResult:
    """Put ``backup_dir`` (an ``edgeci backup``) in place of ``state_dir`` (see the module docstring)."""
    if not _is_state_dir(backup_dir):
        raise ConfigError(f"{backup_dir} is not a backup of a state dir (no versions/ or spec.json)")
    src, dst = backup_dir.resolve(), state_dir.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise BadOption(f"--from {backup_dir} and --state-dir {state_dir} overlap: restore into another path")
    if state_dir.exists() and not _is_state_dir(state_dir) and any(state_dir.iterdir()):
        raise BadOption(f"{state_dir} is not a coordinator state dir and not empty: refusing to replace it")
    if not dst.parent.is_dir():
        raise ConfigError(f"{state_dir.parent} does not exist: make it first")
    spec = _spec_of(backup_dir)
    staging = state_dir.parent / f".{state_dir.name}.restoring-{os.getpid()}"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    replaces = _is_state_dir(state_dir)
    with _held(state_dir) if replaces else contextlib.nullcontext():
        old = max(read_epoch(backup_dir) or 0, (read_epoch(state_dir) or 0) if replaces else 0)
        try:
            shutil.rmtree(staging, ignore_errors=True)
            _copy(backup_dir, staging, lambda n: None)
            with _opened(staging, spec) as registry:
                _, new = registry.renew_epoch(above=old)
                snapshot = registry.load()
            if snapshot is None:
                raise BackupError(f"{backup_dir} holds no version: nothing restored")
            kept = None
            if replaces:
                kept = _unused(state_dir.parent / f"{state_dir.name}.before-restore-{stamp}")
                os.rename(state_dir, kept)
            elif state_dir.exists():
                state_dir.rmdir()  # (empty: checked above)
            try:
                os.rename(staging, state_dir)
            except OSError:
                if kept is not None:
                    os.rename(kept, state_dir)  # put it back: the restore did not happen
                raise
            _fsync_dir(state_dir.parent)
        except (OSError, RegistryError) as exc:
            raise BackupError(f"restoring {backup_dir} into {state_dir} failed: {exc}; {state_dir} is as it was") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return RestoreResult(state_dir=state_dir, kept=kept, version=snapshot.version, release=_release_of(snapshot), pending=len(snapshot.buffer),
                         old_epoch=old, new_epoch=new, damaged=tuple(snapshot.recovered_from))
