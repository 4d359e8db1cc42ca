"""A device without torch: serve the model this device holds with the package's ONNX graph."""

import sys

for blocked in ("torch", "torchvision", "sklearn"):  # as on a `pip install edgeci` ([device]) install
    sys.modules[blocked] = None

import numpy as np  # noqa: E402 - after the block above

from edge_sdk.client import EdgeClient  # noqa: E402

validation = np.load("validation.npz")
client = EdgeClient(broker="mqtt://127.0.0.1:18842", region="eu", device_id=sys.argv[1], task="acme_vision.info:TASK")
labels = client.predict(validation["x"])  # onnxruntime on acme_vision/graphs/acme-parts-cnn.onnx, never started
print(f"{type(client.task).__name__}: model v{client.version}, accuracy on validation.npz "
      f"{(labels == validation['y']).mean():.1%}, torch imported: {sys.modules.get('torch') is not None}")
client.stop()
