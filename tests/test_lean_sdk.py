"""The device role without the training stack: EdgeClient with torch, scikit-learn, onnx,
amqtt, OpenCV and ultralytics unimportable (``sys.modules[name] = None`` in a fresh
interpreter) stores, validates, serves with the shipped ONNX graph and follows new
versions; the README's SDK snippet runs as written."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk._extras import missing, require
from edge_sdk.errors import ConfigError, MissingExtra
from edge_sdk.modelio import save_model
from edge_sdk.tasks.digits import DigitsTask

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "sklearn", "scipy", "onnx", "onnxscript", "amqtt", "cv2",
           "ultralytics", "matplotlib", "prometheus_client")
"""What a ``pip install edgeci`` (the ``[device]`` role) does not have."""
PRELUDE = f"import sys\nfor _m in {BLOCKED!r}:\n    sys.modules[_m] = None\n"


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask(device="cpu")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECI_")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path / "home"), EDGECI_HOME=str(tmp_path / "edgeci"),
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return env


def _lean(script: str, tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    (tmp_path / "home").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-W", "error", "-c", PRELUDE + script, *args], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


_OFFLINE_DEVICE = r"""
import json
import numpy as np
from edge_sdk.client import EdgeClient
from edge_sdk.errors import InvalidSample, MissingExtra
from edge_sdk.paths import device_dir
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.tasks.registry import DeclaredTask

x = np.load(sys.argv[1])
client = EdgeClient(broker="mqtt://127.0.0.1:9", device_id="lean", task="digits")  # never started
assert isinstance(client.task, DeclaredTask), type(client.task)
report = {"version": client.version, "min_samples": client.core.config.min_samples,
          "data_dir": str(client.data_dir), "rejected": []}
client.add_sample(x[0, 0], 3)          # (8, 8): the documented convenience
client.add_sample(x[1], 5)             # (1, 8, 8): the contract
for bad in (x[2] * 16, x[2][:, :4], (x[2] > 0.5).astype(np.int64), np.full((1, 8, 8), np.nan)):
    try:
        client.add_sample(bad, 1)
    except InvalidSample as exc:
        report["rejected"].append(str(exc))
report["stored"] = client.store.count()
report["labels"] = client.predict(x).tolist()
report["labels_compact"] = client.predict(x[:, 0]).tolist()
report["one"] = client.predict(x[0, 0]).tolist()
try:
    client.task.local_update(client.weights, x[:2], np.array([3, 5]), TrainConfig())
except MissingExtra as exc:
    report["train_error"] = str(exc)
client.stop()
report["loaded"] = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("torch", "sklearn", "onnx"))
report["onnxruntime"] = "onnxruntime" in sys.modules
print(json.dumps(report))
"""


def test_device_role_stores_validates_and_predicts_without_torch(tmp_path: Path, digits: DigitsTask) -> None:
    weights = digits.pretrained(seed=0)
    x = digits.data().test.x[:40]
    np.save(tmp_path / "x.npy", x)
    # a model the device already holds (deployed.npz in its data dir under $EDGECI_HOME)
    save_model(tmp_path / "edgeci" / "devices" / "lean" / "deployed.npz", digits.spec, weights, {"version": 4})

    proc = _lean(_OFFLINE_DEVICE, tmp_path, str(tmp_path / "x.npy"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    assert report["version"] == 4 and report["min_samples"] == 8
    assert report["data_dir"] == str(tmp_path / "edgeci" / "devices" / "lean")
    assert report["stored"] == 2
    assert len(report["rejected"]) == 4
    assert "values in [0, 1]" in report["rejected"][0] and "got values in [0" in report["rejected"][0]
    assert "got shape (1, 4, 8)" in report["rejected"][1]
    assert "dtype int64" in report["rejected"][2] and "NaN" in report["rejected"][3]
    expected = np.argmax(digits.logits(weights, x), axis=1).tolist()
    assert report["labels"] == expected == report["labels_compact"]
    assert report["one"] == expected[:1]
    assert "pip install 'edgeci[train]'" in report["train_error"]
    assert report["loaded"] == [] and report["onnxruntime"]


_TORCH_INFERENCE = r"""
import json, os
from edge_sdk.client import EdgeClient
from edge_sdk.errors import MissingExtra
try:
    EdgeClient(broker="mqtt://127.0.0.1:9", device_id="lean", task="digits", inference="torch")
    out = {"error": None}
except MissingExtra as exc:
    out = {"error": str(exc)}
out["data_dir"] = os.path.exists(os.path.join(os.environ["EDGECI_HOME"], "devices", "lean"))
print(json.dumps(out))
"""


def test_torch_inference_without_torch_is_refused_at_construction(tmp_path: Path) -> None:
    """helper-97: ``EdgeClient(inference="torch")`` on a ``[device]`` install was accepted, and
    every ``predict`` raised ``AttributeError: 'DeclaredTask' object has no attribute 'logits'``."""
    proc = _lean(_TORCH_INFERENCE, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] is not None and "inference='torch'" in out["error"], out
    assert "pip install 'edgeci[train]'" in out["error"]
    assert out["data_dir"] is False  # refused before anything touched the disk


_IMPORT_ERRORS = r"""
import json
out = {}
try:
    import edge_sdk.trainer
except ImportError as exc:
    out["trainer"] = [type(exc).__name__, str(exc)]
try:
    from edge_sdk.tasks import get_task
    get_task("gestures")
except ImportError as exc:
    out["gestures"] = [type(exc).__name__, str(exc)]
try:
    import edge_sdk.tasks.detection
except ImportError as exc:
    out["detection"] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""


def test_missing_extras_name_what_to_install(tmp_path: Path) -> None:
    proc = _lean(_IMPORT_ERRORS, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["trainer"] == ["MissingExtra", out["trainer"][1]]
    assert "pip install 'edgeci[train]'" in out["trainer"][1] and "torch" in out["trainer"][1]
    assert "pip install 'edgeci[train]'" in out["gestures"][1]
    assert "pip install 'edgeci[detection]'" in out["detection"][1]


def test_missing_extra_is_an_import_error_and_tells_broken_from_absent() -> None:
    absent = missing("torch", cause=ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert isinstance(absent, ImportError) and isinstance(absent, ConfigError)
    assert "not installed" in str(absent) and "edgeci[train]" in str(absent)
    broken = missing("torch", cause=ImportError("libcudnn.so.9: cannot open shared object file", name="libcudnn"))
    assert "installed but failed to import" in str(broken) and "libcudnn" in str(broken)
    with pytest.raises(MissingExtra, match=r"edgeci\[emulate\]"):
        require("matplotlib_that_is_not_there", "emulate")
    assert require("json").dumps([1]) == "[1]"


# --------------------------------------------------------------------------- with a broker


class _Lines:
    """A subprocess's stdout lines, waited for by pattern (the reader thread never blocks the test)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out waiting for {pattern!r}; saw {self.seen[-10:]}") from None
            if line is None:
                raise AssertionError(f"process ended before {pattern!r}; saw {self.seen[-10:]}")
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m


_ONLINE_DEVICE = r"""
import json
import threading
import numpy as np
from edge_sdk.client import EdgeClient

x, y = np.load(sys.argv[2]), np.load(sys.argv[3])
cond = threading.Condition()
notes = []

def note(kind, data):
    with cond:
        notes.append(kind)
        cond.notify_all()

def wait_note(kind, count):
    with cond:
        assert cond.wait_for(lambda: notes.count(kind) >= count, 60), (kind, count, notes)

with EdgeClient(broker=sys.argv[1], region="lean", device_id="headset", task="digits",
                request_timeout_s=5.0) as client:
    client.on("*", note)
    assert client.wait_for_version(0, timeout=60), "no model served on connect"   # before any label
    print("serving", client.version, client.store.count(), json.dumps(client.predict(x[:16]).tolist()), flush=True)
    for i in range(client.core.config.min_samples):
        client.add_sample(x[i, 0], int(y[i]))
    wait_note("update_acked", 1)                  # version 0 -> 1 is classifier-only: trained in numpy
    client.add_sample(x[20, 0], int(y[20]))       # a new label: the next pull brings version 1
    assert client.wait_for_version(1, timeout=60), "version 1 never arrived"
    print("serving", client.version, client.store.count(), json.dumps(client.predict(x[:16]).tolist()), flush=True)
    wait_note("update_acked", 2)                  # 1 -> 2 classifier-only again
    client.add_sample(x[21, 0], int(y[21]))
    assert client.wait_for_version(2, timeout=60), "version 2 never arrived"
    wait_note("training_unavailable", 1)          # 2 -> 3 is a full sync: needs [train], skipped
    print("notes", json.dumps(sorted(set(notes))), flush=True)
print("loaded", json.dumps(sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("torch", "sklearn"))), flush=True)
"""


@pytest.fixture
def digits_coordinator(mosquitto: MosquittoProcess, tmp_path: Path, digits: DigitsTask) -> Iterator[CoordinatorDaemon]:
    """K = 1 (every update is a version), LASP with a full sync every 3rd version."""
    options = CoordinatorOptions(broker=mosquitto.url, region="lean", state_dir=tmp_path / "coordinator",
                                 strategy_params={"k": 1, "timeout_s": 5.0}, full_sync_every=3)
    with CoordinatorDaemon(options, task=digits) as daemon:
        yield daemon


@pytest.mark.broker
def test_lean_device_serves_labels_and_trains_the_head_over_mqtt(
    tmp_path: Path, mosquitto: MosquittoProcess, digits_coordinator: CoordinatorDaemon, digits: DigitsTask
) -> None:
    """A [device]-level process against a real mosquitto and coordinator: it serves from
    connect (before any label) what torch would predict, labels, takes part in
    classifier-only rounds (head trained in numpy), skips the full round, and picks up each
    new version."""
    from coordinator.registry import Registry

    pool = digits.data().pool
    np.save(tmp_path / "x.npy", pool.x[:40])
    np.save(tmp_path / "y.npy", pool.y[:40])
    (tmp_path / "home").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-W", "error", "-c", PRELUDE + _ONLINE_DEVICE, mosquitto.url,
         str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        cwd=tmp_path, env=_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )
    lines = _Lines(proc)
    try:
        first = lines.expect(r"^serving (\d+) (\d+) (.*)$", timeout=90)
        assert (int(first[1]), int(first[2])) == (0, 0)  # served on connect, before any label
        expected = np.argmax(digits.logits(digits.pretrained(seed=0), pool.x[:16]), axis=1)
        np.testing.assert_array_equal(json.loads(first[3]), expected)  # onnxruntime == torch
        second = lines.expect(r"^serving (\d+) (\d+) (.*)$", timeout=90)
        assert int(second[1]) == 1
        notes = json.loads(lines.expect(r"^notes (.*)$", timeout=120)[1])
        assert {"model", "update_acked", "training_unavailable"} <= set(notes)
        assert json.loads(lines.expect(r"^loaded (.*)$", timeout=30)[1]) == []
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    # the lean device's updates changed only the head (versions 1 and 2 are classifier-only)
    assert digits_coordinator.core.version == 2
    registry = Registry(tmp_path / "coordinator", digits.spec)
    extractor = digits.spec.group_slice("extractor")
    for version in (1, 2):
        before, after = registry.read_version(version - 1)[0], registry.read_version(version)[0]
        np.testing.assert_array_equal(after[extractor], before[extractor])
        assert not np.array_equal(after, before)


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"In an app[^\n]*\n+```python\n(.*?)```", text, re.S)
    assert m, "README has no 'In an app' python snippet"
    return m[1]


@pytest.mark.broker
def test_readme_sdk_snippet_runs_as_written(
    tmp_path: Path, mosquitto: MosquittoProcess, digits: DigitsTask
) -> None:
    """The snippet, with only the broker address pointed at the test's mosquitto, against a
    coordinator of its region: it labels, gets the model and prints predictions."""
    snippet = _readme_snippet()
    address = re.search(r'broker="(mqtt://[^"]+)"', snippet)
    assert address, "the snippet names no broker"
    region = re.search(r'region="([^"]+)"', snippet)
    options = CoordinatorOptions(broker=mosquitto.url, region=region[1] if region else "default",
                                 state_dir=tmp_path / "coordinator", strategy_params={"k": 1, "timeout_s": 5.0})
    (tmp_path / "home").mkdir()
    with CoordinatorDaemon(options, task=digits):
        proc = subprocess.run([sys.executable, "-W", "error", "-c", snippet.replace(address[1], mosquitto.url)],
                              cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "now serving version 0" in proc.stdout
    assert re.search(r"\[\d( \d)*\]", proc.stdout), proc.stdout  # the printed labels
    devices = tmp_path / "edgeci" / "devices"
    assert [p.name for p in devices.iterdir()] and all((p / "samples.sqlite3").is_file() for p in devices.iterdir())


def test_edge_client_trains_with_the_task_s_own_defaults(tmp_path: Path) -> None:
    """A device app that passes no TrainConfig gets its task's defaults (detection declares
    AdamW 1e-3), with the client's seed; classifiers keep the generic ones."""
    from edge_sdk.client import EdgeClient
    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.base import TrainConfig

    digits = EdgeClient(broker="mqtt://127.0.0.1:9", device_id="d", task="digits", data_dir=tmp_path / "a", seed=7)
    digits.stop()
    assert digits.train_config == TrainConfig(seed=7)
    task = get_task("digits")
    own = TrainConfig(epochs=3, batch_size=8, lr=1e-3)
    task.default_train = own  # type: ignore[attr-defined]  # a fresh instance: nothing else sees it
    client = EdgeClient(broker="mqtt://127.0.0.1:9", device_id="e", task=task, data_dir=tmp_path / "b", seed=7)
    client.stop()
    assert (client.train_config.epochs, client.train_config.lr, client.train_config.seed) == (3, 1e-3, 7)
