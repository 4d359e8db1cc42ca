"""A device app as a headset would run it, from the ``[device]``-only virtualenv.

Run by ``drive.py`` with the device venv's interpreter, isolated (``-I``: the working tree is
not on ``sys.path``), so it uses the installed ``edgeci``. Prints one line per milestone.
The coordinator runs LASP with a full sync every 3rd version and K = 1: versions 1 and 2
come from this device's classifier-only updates (head trained in numpy), version 3 would
need a full round, which this install skips (``training_unavailable``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np

import edge_sdk
from edge_sdk.client import EdgeClient
from edge_sdk.errors import InvalidSample

broker, data = sys.argv[1], Path(sys.argv[2])
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(edge_sdk.__file__).resolve().is_relative_to(site), f"not the installed SDK: {edge_sdk.__file__}"
absent = [m for m in ("torch", "sklearn", "scipy", "amqtt", "onnx", "cv2") if importlib.util.find_spec(m)]
assert not absent, f"the device venv has {absent}"
x, y = np.load(data / "x.npy"), np.load(data / "y.npy")
cond = threading.Condition()
notes: list[str] = []


def say(*parts: object) -> None:
    print(*parts, flush=True)


def note(kind: str, info: object) -> None:
    with cond:
        notes.append(kind)
        cond.notify_all()


def wait_note(kind: str, count: int) -> None:
    with cond:
        assert cond.wait_for(lambda: notes.count(kind) >= count, 60), f"no {kind} #{count}: {notes}"


with EdgeClient(broker=broker, region="ci", device_id="headset-ci", task="digits", data_dir=data / "device",
                request_timeout_s=5.0) as client:
    client.on("*", note)
    say("task", type(client.task).__name__, "D_min", client.core.config.min_samples)
    if hasattr(client, "ready"):  # serving request on connect: the model before any label
        assert client.wait_for_version(0, timeout=30), "no model served on connect"
        say("served before labelling: version", client.version, json.dumps(client.predict(x[:8, 0]).tolist()))
    try:
        client.add_sample(x[0] * 16, int(y[0]))
        raise AssertionError("raw 0-16 pixels were accepted")
    except InvalidSample as exc:
        say("rejected raw pixels:", exc)
    for i in range(client.core.config.min_samples):
        client.add_sample(x[i, 0], int(y[i]))  # (8, 8) images in [0, 1]
    assert client.wait_for_version(0, timeout=60), "the first pull was never answered"
    say("serving", client.version, json.dumps(client.predict(x[:16]).tolist()))
    wait_note("update_acked", 1)
    say("classifier-only update accepted")
    for version, i in ((1, 20), (2, 21)):
        client.add_sample(x[i, 0], int(y[i]))  # the next pull brings the new version
        assert client.wait_for_version(version, timeout=60), f"version {version} never arrived"
        say("serving", client.version, json.dumps(client.predict(x[:16]).tolist()))
        if version == 1:
            wait_note("update_acked", 2)
    wait_note("training_unavailable", 1)
    say("full round skipped; notifications", json.dumps(sorted(set(notes))))
say("done")
