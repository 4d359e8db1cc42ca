"""edge_sdk — what a device app embeds to keep a deployed model improving from its users' labels."""

import os as _os

# onnxruntime would otherwise write a device id and an event database under ~/.cache:
# nothing leaves the device, nothing is written outside the SDK's data dir.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
