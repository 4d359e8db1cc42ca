"""Versioned model registry with durable checkpoints (the coordinator's state dir).

Layout::

    STATE_DIR/
      spec.json                         the ModelSpec (checked on every start)
      versions/000000007/weights.npy    one directory per committed version,
      versions/000000007/meta.json      written aside and renamed into place (atomic)
      pending/<device>.<seq>.upd        accepted updates not yet aggregated (msgpack)

Durability rules, which together give "no accepted update lost, none applied twice":

1. An update is written to ``pending/`` (tmp file, fsync, rename, fsync dir) *before* the
   coordinator acknowledges it.
2. A version directory holds the weights and the per-device ``applied_upto`` watermarks of
   every update folded into it; it appears atomically by ``rename``.
3. Only then are the consumed pending files deleted. A crash in between leaves files whose
   keys are at or below the watermark; the core drops those on restore.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from coordinator.core import CommitVersion, Snapshot
from coordinator.strategies.base import BufferedUpdate
from edge_sdk.errors import ConfigError, EdgeciError
from edge_sdk.spec import ModelSpec, Vector
from edge_sdk.wire.codec import decode_tensor, encode_tensor


class RegistryError(EdgeciError):
    """The state dir is unreadable or belongs to another model."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Registry:
    """Reads and writes one coordinator's state dir. Not thread-safe: one owner (the driver)."""

    def __init__(self, state_dir: str | Path, spec: ModelSpec, *, keep_versions: int = 20) -> None:
        if keep_versions < 1:
            raise ConfigError("keep_versions must be >= 1")
        self.root = Path(state_dir)
        self.spec = spec
        self.keep_versions = keep_versions
        self.versions_dir = self.root / "versions"
        self.pending_dir = self.root / "pending"
        for d in (self.root, self.versions_dir, self.pending_dir):
            d.mkdir(parents=True, exist_ok=True)
        spec_path = self.root / "spec.json"
        if spec_path.exists():
            stored = ModelSpec.from_dict(json.loads(spec_path.read_text()))
            if stored.fingerprint != spec.fingerprint:
                raise RegistryError(
                    f"{self.root} holds model {stored.model_id!r} (spec {stored.fingerprint}); "
                    f"this coordinator serves {spec.model_id!r} (spec {spec.fingerprint}). Use another --state-dir."
                )
        else:
            _write_atomic(spec_path, json.dumps(spec.to_dict(), indent=1).encode())

    # ------------------------------------------------------------------ versions

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
        d = self.versions_dir / f"{version:09d}"
        try:
            meta = json.loads((d / "meta.json").read_text())
            weights = np.load(d / "weights.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RegistryError(f"version {version} in {self.root} is unreadable: {exc}") from exc
        return self.spec.check(np.ascontiguousarray(weights, dtype=np.float32)), meta

    def write_version(self, version: int, weights: Vector, meta: dict[str, Any]) -> None:
        final = self.versions_dir / f"{version:09d}"
        if final.exists():
            raise RegistryError(f"version {version} already exists in {self.root}")
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=self.versions_dir))
        with open(tmp / "weights.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(weights, dtype=np.float32), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / "meta.json", "w") as f:
            json.dump({"version": version, **meta}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.versions_dir)
        self._prune()

    def _prune(self) -> None:
        for v in self.versions()[: -self.keep_versions]:
            shutil.rmtree(self.versions_dir / f"{v:09d}", ignore_errors=True)
        for p in self.versions_dir.glob(".v*"):  # leftovers of a crash mid-write
            shutil.rmtree(p, ignore_errors=True)

    def initialise(self, weights: Vector, *, now: float, source: str) -> None:
        """Write version 0 (the deployed model) into an empty state dir."""
        if self.latest() is not None:
            raise RegistryError(f"{self.root} already holds versions")
        self.write_version(0, self.spec.check(weights), {"created_at": now, "source": source, "applied_upto": {}})

    def commit(self, action: CommitVersion) -> None:
        meta = dict(action.metadata)
        meta["applied_upto"] = dict(action.applied_upto)
        meta["consumed"] = [[device, seq] for device, seq in action.consumed]
        self.write_version(action.version, action.weights, meta)
        for device, seq in action.consumed:
            self._pending_path(device, seq).unlink(missing_ok=True)
        _fsync_dir(self.pending_dir)

    # ------------------------------------------------------------------ pending updates

    def _pending_path(self, device: str, seq: int) -> Path:
        return self.pending_dir / f"{device}.{seq:020d}.upd"

    def persist_update(self, u: BufferedUpdate) -> None:
        body = {
            "device": u.device,
            "seq": u.seq,
            "base_version": u.base_version,
            "staleness": u.staleness,
            "n_samples": u.n_samples,
            "group": u.group,
            "arrived_at": u.arrived_at,
            "loss": u.loss,
            "weights": encode_tensor(u.weights, "f4"),
        }
        _write_atomic(self._pending_path(u.device, u.seq), msgpack.packb(body, use_bin_type=True))

    def pending(self) -> list[BufferedUpdate]:
        out = []
        for p in sorted(self.pending_dir.glob("*.upd")):
            try:
                body = msgpack.unpackb(p.read_bytes(), raw=False)
                weights = decode_tensor(body.pop("weights"))
                out.append(BufferedUpdate(weights=np.array(weights, dtype=np.float32), **body))
            except Exception as exc:
                raise RegistryError(f"pending update {p} is unreadable: {exc}") from exc
        return out

    # ------------------------------------------------------------------ restore

    def load(self) -> Snapshot | None:
        """The latest committed version plus pending updates, or None for an empty dir."""
        latest = self.latest()
        if latest is None:
            return None
        weights, meta = self.read_version(latest)
        return Snapshot(
            version=latest,
            weights=weights,
            applied_upto={str(k): int(v) for k, v in meta.get("applied_upto", {}).items()},
            buffer=self.pending(),
            devices_seen=list(meta.get("devices_seen", [])),
            last_aggregation_at=float(meta.get("created_at", 0.0)),
            counters={str(k): int(v) for k, v in meta.get("counters", {}).items()},
            last_full_version=int(meta.get("last_full_version", latest)),
            peer_state=dict(meta.get("peering", {})),
        )
