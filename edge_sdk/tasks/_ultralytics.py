"""Import ultralytics offline, with every file it writes inside the SDK's data dir.

Plain ``import ultralytics`` does three things a device SDK must not do: it creates
``~/.config/Ultralytics/settings.json``, it resolves two public DNS names to decide
whether it is "online", and with ``sync=True`` it may send usage events. Its settings
dir, its online flag and its auto-install switch are all read from the environment
*once, at import*, so :func:`import_ultralytics` sets them first and pre-writes the
settings file (datasets/weights/runs dirs under the data dir, sync and every
third-party logger off) before ultralytics ever loads.

onnxruntime 1.32 has the same habit (a device id and an event database under
``~/.cache/Microsoft/DeveloperTools``); ``ORT_DISABLE_TELEMETRY=1`` stops it, but only if
set before onnxruntime is first imported — :func:`disable_onnxruntime_telemetry`.

The settings dir is process-global in ultralytics: the first data dir to import it wins
and later calls with another data dir only re-assert the offline settings. Code here
never uses the paths ultralytics would write to (no ``YOLO().train``/``val``/``predict``,
which create ``runs/``); the detection task drives the model and the loss itself.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_sdk._extras import require
from edge_sdk.paths import edgeci_home

_SUBDIR = "ultralytics"

# Settings that would make ultralytics talk to the network or to a third-party logger.
_OFFLINE_SETTINGS: dict[str, Any] = {
    "sync": False,
    "api_key": "",
    "openai_api_key": "",
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
}


def disable_onnxruntime_telemetry() -> bool:
    """Stop onnxruntime (1.32 on Linux) from writing a device id and an event database to
    ``~/.cache/Microsoft/DeveloperTools``. Its switch is read when onnxruntime is first
    imported, so this only helps before that; returns whether it was in time."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    return "onnxruntime" not in sys.modules


def default_data_dir() -> Path:
    """``$EDGECI_HOME`` if set, else ``~/.edgeci``."""
    return edgeci_home()


def ultralytics_home(data_dir: Path | str | None = None) -> Path:
    """The folder under ``data_dir`` that holds everything ultralytics may write."""
    return Path(data_dir if data_dir is not None else default_data_dir()).expanduser() / _SUBDIR


def _settings_values(home: Path) -> dict[str, Any]:
    return {
        "settings_version": "0.0.8",
        "datasets_dir": str(home / "datasets"),
        "weights_dir": str(home / "weights"),
        "runs_dir": str(home / "runs"),
        "uuid": "",
        **_OFFLINE_SETTINGS,
    }


def _prewrite_settings(config_dir: Path, values: dict[str, Any]) -> None:
    """Write ``settings.json`` where ultralytics will look, merged over any existing file,
    so its first load neither creates defaults pointing elsewhere nor turns sync on."""
    path = config_dir / "Ultralytics" / "settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            current = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            current = {}
    merged = {**current, **values}
    if merged != current:
        path.write_text(json.dumps(merged, indent=2), encoding="utf-8")


def prepare_environment(data_dir: Path | str | None = None) -> bool:
    """Set the variables ultralytics reads at import (settings dir under ``data_dir``,
    offline, no auto-install, quiet) without importing it or writing anything.

    Importing :mod:`edge_sdk.tasks.detection` calls this with the default data dir, so
    even code that imports ultralytics itself afterwards stays offline and out of
    ``~/.config``; a later call with the real data dir, still before the import, wins.
    Returns False (and changes nothing) once ultralytics is imported: too late.
    """
    disable_onnxruntime_telemetry()
    if "ultralytics" in sys.modules:
        return False
    os.environ["YOLO_CONFIG_DIR"] = str(ultralytics_home(data_dir) / "config")
    os.environ["YOLO_OFFLINE"] = "1"  # skips the DNS probe; ONLINE=False gates events, hub, sentry
    os.environ["YOLO_AUTOINSTALL"] = "0"  # never pip-install a missing requirement
    os.environ.setdefault("YOLO_VERBOSE", "0")
    return True


def import_ultralytics(data_dir: Path | str | None = None) -> ModuleType:
    """Import ultralytics offline with its settings dir under ``data_dir``; idempotent.

    Call this (the detection task does) before anything else imports ultralytics; if
    something already did, the offline settings are still enforced but its settings dir
    stays where that first import put it (ultralytics' ``USER_CONFIG_DIR``).
    """
    if prepare_environment(data_dir):
        config_dir = ultralytics_home(data_dir) / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        _prewrite_settings(config_dir, _settings_values(ultralytics_home(data_dir)))
    ultralytics = require("ultralytics", "detection", purpose="the YOLOv8 detection task")

    settings: Any = importlib.import_module("ultralytics.utils").SETTINGS  # untyped upstream

    # Re-assert on every call: a settings file that predates us, or an earlier import by
    # other code, must not re-enable sync. ``update`` validates keys and saves to disk.
    wanted = {k: v for k, v in _OFFLINE_SETTINGS.items() if k in settings.defaults}
    if any(settings.get(k) != v for k, v in wanted.items()):
        settings.update(wanted)
    return ultralytics
