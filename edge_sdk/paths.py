"""Where edgeci keeps its files on a machine: one root, one environment variable.

``$EDGECI_HOME`` (default ``~/.edgeci``) holds everything: each device's samples, deployed
model and caches under ``devices/<device_id>`` (the SDK, ``edgeci device`` and the
labelling app all use it), ultralytics' settings under ``ultralytics/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_sdk.errors import ConfigError

__all__ = ["HOME_ENV", "device_dir", "edgeci_home"]

HOME_ENV = "EDGECI_HOME"


def edgeci_home() -> Path:
    """``$EDGECI_HOME`` if set (and not empty), else ``~/.edgeci``."""
    env = os.environ.get(HOME_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".edgeci"


def device_dir(device_id: str) -> Path:
    """A device's data dir: ``$EDGECI_HOME/devices/<device_id>``."""
    if not device_id or "/" in device_id or "\\" in device_id or device_id in (".", ".."):
        raise ConfigError(f"device id {device_id!r} cannot name a folder")
    return edgeci_home() / "devices" / device_id
