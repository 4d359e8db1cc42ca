"""Optional dependencies by role, and one clear error when one is missing.

edgeci installs by role (``pyproject.toml``): the base install is what a device needs
(numpy, msgpack, paho-mqtt, onnxruntime, cryptography); ``[train]`` adds torch for local
fine-tuning, ``[detection]`` ultralytics and OpenCV, ``[coordinator]`` the daemon's broker
and metrics, ``[emulate]`` plots and progress bars. A module that needs an optional
package imports it through :func:`require` (or raises :func:`missing` from its own
``except ImportError``), so a lean install fails with the command that fixes it instead
of a bare ``ModuleNotFoundError: No module named 'torch'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edge_sdk.errors import MissingExtra

__all__ = ["EXTRA_OF", "missing", "require"]

EXTRA_OF: dict[str, str] = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "sklearn": "coordinator",
    "amqtt": "coordinator",
    "prometheus_client": "coordinator",
    "ultralytics": "detection",
    "cv2": "detection",
    "torchvision": "detection",
    "matplotlib": "emulate",
    "tqdm": "emulate",
}
"""The extra that installs each optional top-level module."""


def missing(
    module: str, extra: str | None = None, *, purpose: str = "", cause: ImportError | None = None
) -> MissingExtra:
    """The error for an absent optional ``module``: what needs it and what to install.

    For ``except ImportError as exc: raise missing("torch", cause=exc) from exc``: when
    ``cause`` is about another module (torch is there but one of *its* libraries is
    broken), the message says so instead of claiming torch is not installed.
    """
    top = module.split(".", 1)[0]
    extra = extra or EXTRA_OF.get(top, "all")
    why = f" for {purpose}" if purpose else ""
    fix = f"pip install 'edgeci[{extra}]'"
    failed = (getattr(cause, "name", None) or top).split(".", 1)[0] if cause is not None else top
    if failed != top:
        return MissingExtra(f"{top} is installed but failed to import ({cause}); reinstall it with: {fix}", name=top)
    return MissingExtra(f"{top} is needed{why} but is not installed; install it with: {fix}", name=top)


def require(module: str, extra: str | None = None, *, purpose: str = "") -> ModuleType:
    """Import ``module``, or raise :class:`~edge_sdk.errors.MissingExtra` naming the extra
    that provides it (default: from :data:`EXTRA_OF`)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing(module, extra, purpose=purpose, cause=exc) from exc
