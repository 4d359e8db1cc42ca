"""Model files: ``.npz`` holding the flat float32 weights, the spec and metadata (no pickle)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.errors import ConfigError
from edge_sdk.spec import ModelSpec, Vector


def save_model(path: str | Path, spec: ModelSpec, weights: Vector, meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                weights=spec.check(np.ascontiguousarray(weights, dtype=np.float32)),
                spec=np.frombuffer(json.dumps(spec.to_dict()).encode(), dtype=np.uint8),
                meta=np.frombuffer(json.dumps(meta or {}).encode(), dtype=np.uint8),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: the half-written file would keep the space the device needs
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_model(path: str | Path, expect: ModelSpec | None = None) -> tuple[ModelSpec, Vector, dict[str, Any]]:
    """Load a model file; with ``expect``, refuse a model of another architecture."""
    path = Path(path)
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # (np.load leaves its own file open when it fails)
            spec = ModelSpec.from_dict(json.loads(z["spec"].tobytes()))
            weights = np.ascontiguousarray(z["weights"], dtype=np.float32)
            meta = json.loads(z["meta"].tobytes()) if "meta" in z else {}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # (a truncated or foreign file)
        raise ConfigError(f"{path} is not an edgeci model file (.npz with weights + spec): {exc}") from exc
    spec.check(weights)
    if expect is not None and spec.fingerprint != expect.fingerprint:
        raise ConfigError(f"{path} holds {spec.model_id!r} ({spec.fingerprint}), expected {expect.model_id!r} ({expect.fingerprint})")
    return spec, weights, meta
