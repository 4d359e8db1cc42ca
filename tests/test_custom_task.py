"""Bring your own model: an app's task in its own package, named by import path
``package.module:Name`` (or an ``edgeci.tasks`` entry point) wherever a task name is taken
(:func:`edge_sdk.tasks.resolve_task`). The package is written here into a temporary folder,
outside the repository, and put on ``sys.path`` (and ``PYTHONPATH`` for the subprocesses)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.validation import load_validation
from devices.report import load_task
from devices.scenario import parse_scenario
from devices.simulator import run_spec
from edge_sdk.client import EdgeClient
from edge_sdk.errors import ConfigError, InvalidSample, MissingExtra
from edge_sdk.inference import InferenceEngine
from edge_sdk.modelio import save_model
from edge_sdk.signing import load_signer
from edge_sdk.tasks import get_task, resolve_task, task_name
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.tasks.registry import (
    GRAPHS_DIR,
    DeclaredTask,
    default_min_samples,
    default_train_config,
    input_contract,
    sample_kind_of,
    task_info,
    write_graphs,
)
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import ModelMsg, Update
from tests.helpers import CoordinatorProcess, digits_scenario, wait_until

ROOT = Path(__file__).resolve().parents[1]
PKG = "acme_parts"
REF = f"{PKG}.tasks:PartsCnn"
INFO_REF = f"{PKG}.info:TASK"

FILES = {
    "__init__.py": "",
    # The declaration, importable without torch: what a [device] install names.
    "info.py": '''
        from dataclasses import replace
        from pathlib import Path

        from edge_sdk.tasks.base import TrainConfig
        from edge_sdk.tasks.registry import InputContract, TaskInfo

        TASK = TaskInfo(
            name="acme-parts", factory="acme_parts.tasks:PartsCnn", task_name="acme-parts",
            model_id="acme-parts-cnn", sample_kind="array", n_classes=3, min_samples=6,
            contract=InputContract(task="acme-parts", shape=(1, 12, 12), value_range=(0.0, 1.0),
                                   hint="grey pixels / 255"),
            class_names=("bar", "ring", "cross"),
            train=TrainConfig(epochs=3, batch_size=8, lr=0.05),
            graphs=Path(__file__).resolve().parent / "graphs",
        )
        NO_GRAPHS = replace(TASK, factory="acme_parts.tasks:Unshipped", graphs=Path(__file__).resolve().parent / "none")
    ''',
    # The torch half: a small CNN on images it makes itself.
    "tasks.py": '''
        import numpy as np
        from torch import nn

        from acme_parts.info import NO_GRAPHS, TASK
        from edge_sdk.tasks.base import TaskData, TrainConfig
        from edge_sdk.trainer import Affine, ClassifierTask, SplitModel, stratified_split, take


        def make_images(n, seed):
            """n noisy 12x12 images in [0, 1], each a bar, a ring or a cross somewhere."""
            rng = np.random.default_rng(seed)
            x = rng.uniform(0.0, 0.25, size=(n, 1, 12, 12)).astype(np.float32)
            y = rng.integers(0, 3, size=n)
            for i, label in enumerate(y):
                r, c = rng.integers(2, 9, size=2)
                if label == 0:
                    x[i, 0, r, c - 2 : c + 3] = 1.0
                elif label == 1:
                    x[i, 0, r - 1 : r + 2, c - 1 : c + 2] = 1.0
                    x[i, 0, r, c] = 0.0
                else:
                    x[i, 0, r, c - 1 : c + 2] = 1.0
                    x[i, 0, r - 1 : r + 2, c] = 1.0
            return np.clip(x, 0.0, 1.0), y.astype(np.int64)


        class PartsCnn(ClassifierTask):
            info = TASK
            name = "acme-parts"
            model_id = "acme-parts-cnn"
            input_shape = (1, 12, 12)
            n_classes = 3
            pretrain_config = TrainConfig(epochs=10, batch_size=8, lr=0.05)

            def build_module(self):
                extractor = nn.Sequential(
                    Affine(0.2, 3.0), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                    nn.Linear(16, 16), nn.ReLU(),
                )
                return SplitModel(extractor, nn.Linear(16, 3))

            def _make_data(self):
                x, y = make_images(600, seed=7)
                pretrain, pool, test = stratified_split(y, n_test=150, pretrain_per_class=3, seed=7)
                return TaskData(pretrain=take(x, y, pretrain), pool=take(x, y, pool), test=take(x, y, test), n_classes=3)


        class Unshipped(PartsCnn):  # no graphs folder: exported on first use where torch is
            info = NO_GRAPHS


        class Liar(PartsCnn):  # declares acme-parts, builds another model
            model_id = "acme-other"


        def no_info():
            return PartsCnn()
    ''',
    "plain.py": '''
        class Plain:  # a task class without a TaskInfo
            name = "plain"
    ''',
    "clash.py": '''
        from dataclasses import replace

        from acme_parts.info import TASK

        DIGITS = replace(TASK, model_id="digits-cnn")
    ''',
    "broken.py": '''
        import acme_not_installed_anywhere  # a dependency the app forgot
    ''',
    # Imported only if something named it: it leaves a mark.
    "spy.py": '''
        from pathlib import Path

        Path(__file__).with_name("SPY_IMPORTED").write_text("imported")

        class Spy:
            pass
    ''',
}


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder holding the app's package (and its entry point's dist-info), on ``sys.path``;
    its ONNX graphs and spec written by ``write_graphs``, as the app's build would."""
    root = tmp_path_factory.mktemp("app")
    pkg = root / PKG
    pkg.mkdir()
    for name, text in FILES.items():
        (pkg / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    dist = root / "acme_parts-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-parts\nVersion: 1.0\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text(f"[edgeci.tasks]\nacme-parts = {INFO_REF}\nacme-bad = not an import path\n"
                                           f"digits = {INFO_REF}\n",
                                           encoding="utf-8")
    sys.path.insert(0, str(root))
    try:
        written = write_graphs(None, (REF,))  # into its TaskInfo's graphs folder
        assert sorted(p.relative_to(pkg).as_posix() for p in written) == [
            "graphs/acme-parts-cnn.features.onnx", "graphs/acme-parts-cnn.onnx", "graphs/acme-parts-cnn.spec.json"]
        yield root
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def parts(acme: Path) -> Any:
    return get_task(REF, device="cpu")


def test_an_import_path_an_entry_point_and_the_taskinfo_itself_name_one_task(acme: Path, parts: Any) -> None:
    info = resolve_task(REF)
    assert resolve_task(INFO_REF) == info == resolve_task("acme-parts")  # the entry point names the TaskInfo
    assert (info.name, info.factory, info.model_id, info.graphs_dir) == ("acme-parts", REF, "acme-parts-cnn", acme / PKG / "graphs")
    assert type(get_task(INFO_REF, device="cpu")).__name__ == type(get_task("acme-parts", device="cpu")).__name__ == "PartsCnn"
    assert task_name(REF) == REF and task_name("gesture-cnn1d") == "gestures"  # the built-ins as before
    assert info.spec == parts.spec  # the spec shipped in its graphs folder is the torch task's
    # What the SDK, the gate and the emulator read of a task: the TaskInfo on the task itself.
    assert task_info(parts) is parts.info and task_info(REF) == info
    assert default_min_samples(parts) == 6 and default_min_samples(REF) == 6
    assert default_train_config(parts).epochs == 3 and default_train_config(REF).batch_size == 8
    assert input_contract(parts).value_range == (0.0, 1.0) and sample_kind_of(REF) == "array"


def test_a_task_object_given_to_the_sdk_brings_its_taskinfo(acme: Path, parts: Any, tmp_path: Path) -> None:
    """EdgeClient(task=obj): the task's own ``info`` gives D_min and the contract (before, an app's
    task got D_min 16 and any numeric array: raw 0-255 pixels were stored and trained on)."""
    client = EdgeClient(broker="mqtt://127.0.0.1:9", device_id="d1", task=parts, data_dir=tmp_path / "d1")
    try:
        assert client.core.config.min_samples == 6
        with pytest.raises(InvalidSample, match=r"with values in \[0, 1\] \(grey pixels / 255\); got values in \[200, 200\]"):
            client.add_sample(np.full((1, 12, 12), 200.0, np.float32), 1)
        with pytest.raises(InvalidSample, match="got dtype int64"):
            client.add_sample(np.zeros((12, 12), np.int64), 1)
        assert client.store.count() == 0
    finally:
        client.stop()


@pytest.mark.parametrize(("ref", "message"), [
    ("acme_parts.nothere:Task", "task 'acme_parts.nothere:Task': no module 'acme_parts.nothere'"),
    ("acme_parts.tasks:Nope", "module acme_parts.tasks has no 'Nope'"),
    ("acme_parts.plain:Plain", "acme_parts.plain:Plain has no TaskInfo: give it the class attribute `info = TaskInfo("),
    ("acme_parts.tasks:no_info", "acme_parts.tasks:no_info has no TaskInfo"),
    ("acme_parts.clash:DIGITS", "is the built-in task 'digits''s: give it its own"),
    ("acme_parts.broken:X", "importing acme_parts.broken failed: No module named 'acme_not_installed_anywhere'"),
    ("acme_parts.tasks:Liar", "acme_parts.tasks:Liar built a task unlike its TaskInfo: its spec's model id is 'acme-other'"),

    ("acme parts:X", "an import path is 'package.module:Name'"),
    ("acme-bad", "its edgeci.tasks entry point is 'not an import path'"),
    ("acme-nowhere", "unknown task 'acme-nowhere'; known tasks: detection, digits"),
])
def test_a_bad_task_reference_is_a_config_error_that_says_what_is_missing(acme: Path, ref: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        get_task(ref, device="cpu")
    assert message in str(exc.value)
    with pytest.raises(ConfigError) as exc:  # the SDK says the same, before anything is written
        EdgeClient(broker="mqtt://127.0.0.1:9", device_id="d1", task=ref, data_dir=tmp_path / "dev")
    assert message in str(exc.value)
    assert not (tmp_path / "dev").exists()


def _env(acme: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECI_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{acme}", EDGECI_HOME=str(tmp_path / "edgeci"), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def test_the_cli_refuses_a_bad_reference_as_a_usage_error(acme: Path, tmp_path: Path) -> None:
    for argv, flag in (
        (["coordinator", "--state-dir", str(tmp_path / "s"), "--model", "acme_parts.plain:Plain"], "edgeci coordinator: error:"),
        (["device", "--device-id", "d1", "--dataset", "acme_parts.plain:Plain"], "argument --dataset/--model:"),
    ):
        done = subprocess.run([sys.executable, "-m", "demos.cli", *argv], cwd=ROOT, env=_env(acme, tmp_path),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert flag in done.stderr and "acme_parts.plain:Plain has no TaskInfo" in done.stderr, done.stderr
    assert not (tmp_path / "s").exists()


def test_coordinator_and_two_devices_train_and_serve_the_apps_model(acme: Path, parts: Any, tmp_path: Path,
                                                                       mosquitto: MosquittoProcess) -> None:
    """The main flow over a real mosquitto: the coordinator (a subprocess, pretraining the app's
    model itself and gating on the app's validation set) and two EdgeClients that name the task
    by its import path, label, train, and predict with the new release. Then a model message
    signed by the coordinator's own key, and an update, whose model id names a module: refused,
    and nothing imports it."""
    data = parts.data()
    np.savez(tmp_path / "validation.npz", x=data.test.x, y=data.test.y)
    broker = f"mqtt://127.0.0.1:{mosquitto.port}"
    state = tmp_path / "state"
    coordinator = CoordinatorProcess("--broker", broker, "--region", "eu", "--state-dir", str(state), "--model", REF,
                                     "--validation", str(tmp_path / "validation.npz"), "--gate-margin", "0.5",
                                     "--k", "2", "--timeout", "3", env=_env(acme, tmp_path))
    clients: list[EdgeClient] = []
    try:
        assert "pretraining the deployed acme-parts model" in "".join(coordinator.lines)
        rejected: list[dict[str, Any]] = []
        for i in range(2):
            client = EdgeClient(broker=broker, region="eu", device_id=f"cam-{i}", task=REF, data_dir=tmp_path / f"cam-{i}")
            assert type(client.task).__name__ == "PartsCnn" and client.core.config.min_samples == 6  # the TaskInfo's D_min
            client.on("message_rejected", lambda kind, info: rejected.append(info))
            clients.append(client.start())
        for client in clients:
            assert client.wait_for_version(0, timeout=60), "no release to start from"
        acked: list[str] = []
        for i, client in enumerate(clients):
            client.on("update_acked", lambda kind, info, who=f"cam-{i}": acked.append(who))
        # A device learns of a release from its own pulls: label, train and push, then label again.
        for start in (0, 40):
            for i, client in enumerate(clients):
                for j in range(start + 20 * i, start + 20 * i + 20):
                    client.add_sample(data.pool.x[j], int(data.pool.y[j]))
            if start == 0:
                wait_until(lambda: {"cam-0", "cam-1"} <= set(acked), 120, "both devices' updates acknowledged")
        for client in clients:
            assert client.wait_for_version(1, timeout=120), "".join(coordinator.lines[-20:])
        for client in clients:  # predicts with the release it holds: the app's graph, its weights
            weights, version = client.weights, client.version
            assert weights is not None and version is not None and version >= 1
            labels = client.predict(data.test.x)
            agree = float((labels == parts.logits(weights, data.test.x).argmax(axis=1)).mean())
            assert agree >= 0.98, (version, agree)
        # Nothing on the wire selects a module: a model id naming one is only compared, and refused.
        signer = load_signer(state / "signing.key")
        spy = f"{PKG}.spy:Spy"
        forged = ModelMsg(model_id=spy, version=10**6, reply_to=-1, weights=parts.spec.zeros())
        update = Update(device="cam-0", seq=10**6, model_id=spy, base_version=0, n_samples=1, weights=parts.spec.zeros())
        import paho.mqtt.client as mqtt

        raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="forger")
        raw.connect("127.0.0.1", mosquitto.port)
        raw.loop_start()
        try:
            raw.publish(topics.device_topic("eu", "cam-0", "model"),
                        encode(forged, signer=signer, scope=topics.device_scope("eu", "model")), qos=1).wait_for_publish(10)
            raw.publish(topics.device_topic("eu", "cam-1", "update"), encode(update), qos=1).wait_for_publish(10)
        finally:
            raw.loop_stop()
            raw.disconnect()
        wait_until(lambda: any(r.get("reason") == "unknown_model" for r in rejected), 30, "the forged model refused")
        assert clients[0].version is not None and clients[0].version < 10**6  # the forged model was not deployed
        assert f"{PKG}.spy" not in sys.modules and not (acme / PKG / "SPY_IMPORTED").exists()
    finally:
        for client in clients:
            client.stop()
        coordinator.close()
    assert not (acme / PKG / "SPY_IMPORTED").exists(), "".join(coordinator.lines[-20:])
    log = "".join(coordinator.lines)
    assert "gate: promote version" in log and "Traceback" not in log, log[-3000:]


_LEAN = """
import sys
for _m in ("torch", "torchvision", "sklearn", "scipy", "onnx", "onnxscript"):
    sys.modules[_m] = None
import json
import numpy as np
from edge_sdk.client import EdgeClient
from edge_sdk.errors import ConfigError, MissingExtra
from edge_sdk.tasks.registry import DeclaredTask

out = {}
client = EdgeClient(broker="mqtt://127.0.0.1:9", device_id="lean", task=sys.argv[1])  # never started
out["declared"] = isinstance(client.task, DeclaredTask)
out["labels"] = client.predict(np.load(sys.argv[2])).tolist()
out["min_samples"] = client.core.config.min_samples
# A classifier-only (LASP) round as the client runs it: the head fitted in numpy on features from
# the .features.onnx in the TaskInfo's graphs folder.
from edge_sdk.tasks.base import TrainConfig

head = client.task.local_update(np.load(sys.argv[3]), np.load(sys.argv[4]), np.load(sys.argv[5]),
                                TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=7, group="classifier"))
np.save(sys.argv[6], head.weights)
out["head"] = [head.n_samples, head.loss, head.extra]
client.stop()
for ref in ("acme_parts.tasks:PartsCnn", "acme_parts.info:NO_GRAPHS"):
    try:
        EdgeClient(broker="mqtt://127.0.0.1:9", device_id="lean2", task=ref)
    except ConfigError as exc:
        out[ref] = f"{type(exc).__name__}: {exc}"
out["torch"] = "torch" in sys.modules and sys.modules["torch"] is not None
print(json.dumps(out))
"""


def test_a_device_without_torch_serves_the_app_model_with_the_graph_its_taskinfo_names(acme: Path, parts: Any,
                                                                                          tmp_path: Path) -> None:
    weights = parts.pretrained(seed=0)
    save_model(tmp_path / "edgeci" / "devices" / "lean" / "deployed.npz", parts.spec, weights, {"version": 3})
    x = parts.data().test.x
    pool = parts.data().pool
    arrays = {"x": x, "weights": weights, "pool_x": pool.x[:40], "pool_y": pool.y[:40]}
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    done = subprocess.run([sys.executable, "-W", "error", "-c", _LEAN, INFO_REF,
                           *(str(tmp_path / f"{name}.npy") for name in arrays), str(tmp_path / "head.npy")],
                          cwd=tmp_path, env=_env(acme, tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["declared"] and out["min_samples"] == 6 and not out["torch"]
    expected = parts.logits(weights, x).argmax(axis=1)
    assert float((np.asarray(out["labels"]) == expected).mean()) >= 0.98
    assert out[REF].startswith("MissingExtra: torch is needed for importing acme_parts.tasks"), out[REF]
    assert "name a TaskInfo in a module that does not import it" in out[REF]
    assert "no spec for 'acme-parts-cnn'" in out["acme_parts.info:NO_GRAPHS"]
    assert "--write-graphs --task REF --out" in out["acme_parts.info:NO_GRAPHS"]
    # Its classifier-only round is a torch device's: the head to float precision, the extractor
    # bit-identical. The features graph can only be the app's: the SDK ships none of this model.
    assert not (GRAPHS_DIR / "acme-parts-cnn.features.onnx").exists()
    assert (acme / PKG / "graphs" / "acme-parts-cnn.features.onnx").is_file()
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=7, group="classifier")
    expected = parts.local_update(weights, pool.x[:40], pool.y[:40], config)
    got, head = np.load(tmp_path / "head.npy"), parts.spec.group_slice("classifier")
    np.testing.assert_array_equal(got[: head.start], weights[: head.start])
    assert head.stop == len(weights) and not np.array_equal(got[head], weights[head])
    np.testing.assert_allclose(got[head], expected.weights[head], atol=2e-5)
    assert out["head"][0] == 40 and out["head"][1] == pytest.approx(expected.loss, rel=1e-4)
    assert out["head"][2] == {"device": "numpy", "group": "classifier"}


def _declared(acme: Path, folder: Path, spec: dict[str, Any] | None = None) -> DeclaredTask:
    """The app's task as a torch-less device declares it, its graphs folder ``folder`` holding
    the app's spec.json (or ``spec``) and nothing else."""
    folder.mkdir()
    shipped = acme / PKG / "graphs" / "acme-parts-cnn.spec.json"
    text = shipped.read_text(encoding="utf-8") if spec is None else json.dumps(spec)
    (folder / "acme-parts-cnn.spec.json").write_text(text, encoding="utf-8")
    return DeclaredTask(dataclasses.replace(resolve_task(INFO_REF), graphs=folder))


def test_a_lean_head_round_says_which_graph_it_lacks_and_leaves_a_deeper_head_to_torch(acme: Path, parts: Any,
                                                                                      tmp_path: Path) -> None:
    """A torch-less device's classifier-only round on an app's task: without the TaskInfo's
    .features.onnx the MissingExtra names that file and how to write it (before: "features
    without a shipped extractor graph"); a classifier group of two layers, which numpy cannot
    fit, is a MissingExtra too, so the client skips the round as ``training_unavailable``
    (before: a ConfigError, logged as a failed training with its traceback, every round)."""
    pool = parts.data().pool
    x, y = pool.x[:8], pool.y[:8]
    config = TrainConfig(group="classifier")
    lean = _declared(acme, tmp_path / "no-features")
    with pytest.raises(MissingExtra) as exc:
        lean.local_update(parts.pretrained(seed=0), x, y, config)
    assert f"the extractor graph {tmp_path / 'no-features' / 'acme-parts-cnn.features.onnx'}" in str(exc.value)
    assert "--write-graphs --task REF" in str(exc.value)

    entries = [*(e for e in parts.spec.to_dict()["params"] if e[2] == "extractor"),
               ["classifier.0.weight", [8, 16], "classifier"], ["classifier.0.bias", [8], "classifier"],
               ["classifier.2.weight", [3, 8], "classifier"], ["classifier.2.bias", [3], "classifier"]]
    deeper = _declared(acme, tmp_path / "deeper", {"model_id": "acme-parts-cnn", "opset": 18,
                                                   "spec": {"model_id": "acme-parts-cnn", "params": entries}})
    with pytest.raises(MissingExtra, match=r"training a classifier group that is not one linear layer .*edgeci\[train\]"):
        deeper.local_update(deeper.spec.zeros(), x, y, config)


def test_with_torch_a_task_without_graphs_exports_its_own_on_first_use(acme: Path) -> None:
    task = get_task(f"{PKG}.tasks:Unshipped", device="cpu")
    assert not task_info(task).graphs_dir.exists()  # type: ignore[union-attr]
    weights = task.pretrained(seed=0)
    engine = InferenceEngine(task, weights, version=1)  # type: ignore[arg-type]
    x = task.data().test.x
    assert (engine.predict(x).labels == task.logits(weights, x).argmax(axis=1)).mean() >= 0.98  # type: ignore[attr-defined]


def test_the_gate_checks_the_apps_validation_set_against_its_contract(acme: Path, parts: Any, tmp_path: Path) -> None:
    x, y = parts.data().test.x, parts.data().test.y
    np.savez(tmp_path / "raw.npz", x=x * 255, y=y)  # raw pixels: every candidate would score wrong
    with pytest.raises(ConfigError, match=r"the task's inputs lie in \[0, 1\] \(grey pixels / 255\)"):
        load_validation(tmp_path / "raw.npz", parts)
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    assert len(load_validation(tmp_path / "ok.npz", parts)) == len(y)


def test_an_emulator_scenario_runs_the_apps_task_with_its_training_defaults(acme: Path) -> None:
    raw = digits_scenario(duration_s=1800, devices=8, arrival_rate_per_h=120, device={"min_samples": 12})
    del raw["training"]  # the task's own defaults (its TaskInfo: 3 epochs, batches of 8)
    sc = parse_scenario({**raw, "task": REF})
    assert (sc.settings.epochs, sc.settings.batch_size) == (3, 8)
    task = load_task(REF)
    assert str(getattr(task, "device", "")) == "cpu"  # as the built-in tasks in the emulator
    s = run_spec(task, sc.runs[0], 0).summary
    assert s["updates_rejected"] == 0 and s["versions"] >= 3
    assert s["final_accuracy"] > s["initial_accuracy"] + 0.05, s


def test_a_coordinator_converting_stale_updates_inverts_the_apps_own_model(acme: Path, parts: Any, tmp_path: Path,
                                                                           mosquitto: MosquittoProcess,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``--staleness gradient-inversion`` built its inverter from the task's *name*
    (``get_task(task.name)``): an app's task named by its import path, without an entry point of
    that name (its package on PYTHONPATH, as examples/custom_task runs it), made the coordinator
    refuse to start (``unknown task 'acme-parts'``). The inverter is built from the task itself."""
    import edge_sdk.tasks
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    monkeypatch.setattr(edge_sdk.tasks, "entry_point_task", lambda name: None)  # (not installed: no entry point)

    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=f"mqtt://127.0.0.1:{mosquitto.port}", region="inv", state_dir=tmp_path / "coord", model=REF,
                           strategy_params={"k": 1, "timeout_s": None, "staleness": "gradient-inversion", "convert_beyond": 2},
                           inversion_params={"iterations": 2, "time_budget_s": 5.0}),
        task=parts,
    ).start()
    try:
        assert daemon.core.conversion_policy == "gradient-inversion"
        assert daemon.conversions is not None
        inverter = daemon.conversions.converter
        assert tuple(inverter.input_shape) == tuple(parts.input_shape) and inverter.n_classes == parts.n_classes
    finally:
        daemon.stop()


def _registry(acme: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_sdk.tasks.registry", *args], cwd=ROOT, env=_env(acme, tmp_path),
                          capture_output=True, text=True, timeout=120)


def test_the_registry_lists_installed_entry_points_and_shows_an_apps_declaration(acme: Path, tmp_path: Path) -> None:
    """``python -m edge_sdk.tasks.registry`` listed the four built-in tasks only: it lists the
    installed ``edgeci.tasks`` entry points too (one that does not resolve: said, exit 1), each
    line saying where the task came from; ``--task REF`` shows one task's declaration."""
    done = _registry(acme, tmp_path)
    lines = done.stdout.splitlines()
    assert lines[0].endswith("; 10 classes; D_min 8 (built-in: edge_sdk.tasks.digits:DigitsTask)"), lines
    assert lines[4:] == [
        "acme-bad: not loaded: ConfigError: task 'acme-bad': its edgeci.tasks entry point is 'not an import path', not "
        "'package.module:Name' (entry point acme-bad = not an import path, from acme-parts 1.0)",
        "acme-parts: float samples of shape (1, 12, 12) (or (12, 12)) with values in [0, 1] (grey pixels / 255); "
        "3 classes; D_min 6 (entry point acme-parts = acme_parts.info:TASK, from acme-parts 1.0)",
        # (resolve_task takes the built-in: an entry point of its name can never be named)
        "digits: ignored, the built-in task 'digits' has this name (entry point digits = acme_parts.info:TASK, "
        "from acme-parts 1.0)",
    ], done.stdout
    assert done.returncode == 1 and "2 edgeci.tasks entry point(s) not usable" in done.stderr, done.stderr

    done = _registry(acme, tmp_path, "--task", "acme-parts", "--task", REF)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split("\n\n")
    info_py, tasks_py = acme / PKG / "info.py", acme / PKG / "tasks.py"
    assert first.splitlines() == [
        "acme-parts",
        f"  from         edgeci.tasks entry point acme-parts = acme_parts.info:TASK, from acme-parts 1.0; module acme_parts.info ({info_py})",
        "  name         acme-parts (its task objects' name 'acme-parts')",
        "  factory      acme_parts.tasks:PartsCnn (training needs edgeci[train])",
        "  model id     acme-parts-cnn",
        "  samples      array: float samples of shape (1, 12, 12) (or (12, 12)) with values in [0, 1] (grey pixels / 255)",
        "  classes      3: bar, ring, cross",
        "  D_min        6",
        "  training     epochs 3, batch size 8, lr 0.05",
        f"  graphs       {acme / PKG / 'graphs'}: acme-parts-cnn.spec.json, acme-parts-cnn.onnx, acme-parts-cnn.features.onnx",
    ]
    assert second.splitlines()[1] == f"  from         import path {REF}; module acme_parts.tasks ({tasks_py})"
    done = _registry(acme, tmp_path, "--task", "acme_parts.info:NO_GRAPHS")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (f"  graphs       {acme / PKG / 'none'}: none; missing acme-parts-cnn.spec.json, "
                                            "acme-parts-cnn.onnx, acme-parts-cnn.features.onnx (`python -m "
                                            "edge_sdk.tasks.registry --write-graphs --task acme_parts.info:NO_GRAPHS`)")
    done = _registry(acme, tmp_path, "--task", "acme_parts.plain:Plain")
    assert done.returncode == 2 and done.stdout == "", done
    assert "python -m edge_sdk.tasks.registry: error: task 'acme_parts.plain:Plain'" in done.stderr, done.stderr


_INSTALLED = """
import sys
if sys.argv[1] == "lean":
    for _m in ("torch", "torchvision", "sklearn", "scipy", "onnx", "onnxscript"):
        sys.modules[_m] = None
import json
from importlib import metadata
import numpy as np
from edge_sdk.errors import ConfigError
from edge_sdk.inference import InferenceEngine
from edge_sdk.tasks import resolve_task
from edge_sdk.tasks.registry import DeclaredTask

try:
    info = resolve_task("acme-parts")
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0)
(ep,) = metadata.entry_points(group="edgeci.tasks", name="acme-parts")
task = DeclaredTask(info)
labels = InferenceEngine(task, task.spec.zeros(), version=0).predict(np.zeros((2, 1, 12, 12), np.float32)).labels
print(json.dumps({"name": info.name, "factory": info.factory, "module": sys.modules["acme_vision.info"].__file__,
                  "dist": [ep.dist.metadata["Name"], ep.dist.version], "graphs": str(info.graphs_dir),
                  "files": sorted(p.name for p in info.graphs_dir.iterdir()), "labels": labels.tolist(),
                  "torch": sys.modules.get("torch") is not None}))
"""


def test_the_examples_package_installed_by_pip_is_a_task_by_its_entry_point(tmp_path: Path) -> None:
    """A real install (the other tests put a hand-written dist-info on ``sys.path``): the example's
    package and its pyproject.toml (``[project.entry-points."edgeci.tasks"]``) copied here, its
    graphs written, ``pip install --no-deps --no-build-isolation --no-index --target`` (offline:
    setuptools builds it, nothing is fetched). A process with that folder on its path and torch
    blocked names the task ``acme-parts``: the installed module's TaskInfo, the graphs shipped
    as package data, served by onnxruntime. Without the install the name is unknown."""
    example, src, site = ROOT / "examples" / "custom_task", tmp_path / "src", tmp_path / "site"
    (src / "acme_vision").mkdir(parents=True)
    for path in [example / "pyproject.toml", *(example / "acme_vision").glob("*.py")]:
        (src / path.relative_to(example)).write_bytes(path.read_bytes())
    env = _env(tmp_path, tmp_path)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{src}"
    written = subprocess.run([sys.executable, "-m", "edge_sdk.tasks.registry", "--write-graphs", "--task",
                              "acme_vision.tasks:AcmeCnn"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert written.returncode == 0, written.stderr
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (site / "acme_vision-0.1.0.dist-info" / "entry_points.txt").read_text(encoding="utf-8").split() == [
        "[edgeci.tasks]", "acme-parts", "=", "acme_vision.info:TASK"]

    def run(path: str) -> dict[str, Any]:
        env["PYTHONPATH"] = path
        done = subprocess.run([sys.executable, "-W", "error", "-c", _INSTALLED, "lean"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        out: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
        return out

    out = run(f"{ROOT}{os.pathsep}{site}")
    assert out["module"] == str(site / "acme_vision" / "info.py")  # the installed copy, not the example's source
    assert (out["name"], out["factory"], out["dist"]) == ("acme-parts", "acme_vision.tasks:AcmeCnn", ["acme-vision", "0.1.0"])
    assert out["graphs"] == str(site / "acme_vision" / "graphs") and out["files"] == [
        "acme-parts-cnn.features.onnx", "acme-parts-cnn.onnx", "acme-parts-cnn.spec.json"]
    assert len(out["labels"]) == 2 and not out["torch"]
    assert "unknown task 'acme-parts'" in run(str(ROOT))["error"]  # the same process without the install


# --------------------------------------------------------------------------- SCC on an app's task

_LEAN_SCC = """
import sys
for _m in ("torch", "torchvision", "sklearn", "scipy", "onnx", "onnxscript"):
    sys.modules[_m] = None
import dataclasses
import json
from pathlib import Path
import numpy as np
from edge_sdk.client import EdgeClient
from edge_sdk.core.events import TrainingJob
from edge_sdk.errors import ConfigError, MissingExtra
from edge_sdk.scc import DeviceScc, SccConfig
from edge_sdk.tasks import resolve_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.tasks.registry import DeclaredTask

weights, x, y, home = np.load(sys.argv[1]), np.load(sys.argv[2]), np.load(sys.argv[3]), Path(sys.argv[4])
out = {}
client = EdgeClient(broker="mqtt://127.0.0.1:9", device_id="lean", task="acme_parts.info:TASK", data_dir=home / "one",
                    scc=SccConfig(keep_raw=8))  # never started
out["declared"] = isinstance(client.task, DeclaredTask)
for xi, yi in zip(x, y):
    client.add_sample(xi, int(yi))
config = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=7, group="classifier")
result, ids = client.run_training_job(TrainingJob(job_id=1, base_version=0, weights=weights, n_samples=len(y),
                                                  group="classifier"), config)
np.save(sys.argv[5], result.weights)
out["round"] = [result.n_samples, len(ids), client.store.count(), len(client.scc.cache)]
try:
    client.run_training_job(TrainingJob(job_id=2, base_version=0, weights=weights, n_samples=8),
                            dataclasses.replace(config, group="full"))
except MissingExtra as exc:
    out["full"] = str(exc)
client.stop()
for name in ("deeper", "no-features"):
    try:
        EdgeClient(broker="mqtt://127.0.0.1:9", device_id="lean", data_dir=home / name, scc=SccConfig(),
                   task=DeclaredTask(dataclasses.replace(resolve_task("acme_parts.info:TASK"), graphs=home / name)))
    except ConfigError as exc:
        out[name] = str(exc)
out["torch"] = sys.modules.get("torch") is not None
print(json.dumps(out))
"""

_DEEPER_ENTRIES = [["classifier.0.weight", [8, 16], "classifier"], ["classifier.0.bias", [8], "classifier"],
                   ["classifier.2.weight", [3, 8], "classifier"], ["classifier.2.bias", [3], "classifier"]]


def test_scc_on_a_device_without_torch_runs_the_apps_one_layer_head_and_refuses_at_start_what_it_cannot(
        acme: Path, parts: Any, tmp_path: Path) -> None:
    """``EdgeClient(task=..., scc=SccConfig(...))`` on a torch-less device, an app's task: with a
    head of one linear layer its classifier-only round is SCC's (the head fitted on the
    features of the app's .features.onnx, older samples aged out into the cache) and matches a
    torch device's SCC round; a full round is a MissingExtra (skipped as training_unavailable).
    Where SCC cannot run, the client refuses at construction, saying why and what to do: a head
    of two layers (before: ConfigError "group 'classifier' is not one linear layer", nothing
    about SCC), a graphs folder without the .features.onnx (before: accepted, then every
    classifier round skipped for the missing graph, SCC never running)."""
    weights = parts.pretrained(seed=0)
    pool = parts.data().pool
    x, y = pool.x[:40], pool.y[:40]
    for name, array in {"weights": weights, "x": x, "y": y}.items():
        np.save(tmp_path / f"{name}.npy", array)
    for name, spec in (("deeper", {"model_id": "acme-parts-cnn", "opset": 18, "spec": {"model_id": "acme-parts-cnn", "params": [
            *(e for e in parts.spec.to_dict()["params"] if e[2] == "extractor"), *_DEEPER_ENTRIES]}}), ("no-features", None)):
        _declared(acme, tmp_path / name, spec)
    done = subprocess.run([sys.executable, "-W", "error", "-c", _LEAN_SCC, *(str(tmp_path / f"{n}.npy") for n in ("weights", "x", "y")),
                           str(tmp_path), str(tmp_path / "head.npy")],
                          cwd=tmp_path, env=_env(acme, tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["declared"] and not out["torch"]
    assert out["round"][:3] == [40, 40, 8] and out["round"][3] > 0  # 32 aged out into the cache (capacity-bounded)
    assert "training group 'full'" in out["full"] and "edgeci[train]" in out["full"], out["full"]
    assert out["deeper"].startswith("SCC cannot run on acme-parts-cnn: it fits the 'classifier' group in numpy as one "
                                    "linear layer"), out["deeper"]
    assert "classifier.0.weight (8, 16), classifier.0.bias (8,), classifier.2.weight (3, 8)" in out["deeper"]
    assert "or run without scc" in out["deeper"]
    assert out["no-features"].startswith("SCC cannot run on acme-parts-cnn without torch: it caches features, and "
                                         f"features without the extractor graph {tmp_path / 'no-features' / 'acme-parts-cnn.features.onnx'}")
    assert "run without scc, or install edgeci[train]" in out["no-features"]

    # The same round on a torch device (its features from torch, not the graph): the same head.
    from edge_sdk.core.events import TrainingJob
    from edge_sdk.scc import SccConfig

    torch_client = EdgeClient(broker="mqtt://127.0.0.1:9", device_id="full", task=parts, data_dir=tmp_path / "full",
                              scc=SccConfig(keep_raw=8))
    try:
        for xi, yi in zip(x, y):
            torch_client.add_sample(xi, int(yi))
        config = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=7, group="classifier")
        expected, _ = torch_client.run_training_job(TrainingJob(job_id=1, base_version=0, weights=weights, n_samples=40,
                                                                group="classifier"), config)
        assert torch_client.store.count() == 8 and torch_client.scc is not None
        assert len(torch_client.scc.cache) == out["round"][3]
    finally:
        torch_client.stop()
    got, head = np.load(tmp_path / "head.npy"), parts.spec.group_slice("classifier")
    np.testing.assert_array_equal(got[: head.start], weights[: head.start])
    assert not np.array_equal(got[head], weights[head])
    np.testing.assert_allclose(got[head], expected.weights[head], atol=2e-5)


def _deeper(parts: Any, tmp_path: Path) -> Any:
    """The app's CNN with a classifier of two linear layers, built with torch."""
    from torch import nn

    from edge_sdk.trainer import SplitModel

    base = type(parts)

    class Deeper(base):  # type: ignore[misc, valid-type]
        info = dataclasses.replace(base.info, model_id="acme-parts-deeper", graphs=tmp_path / "none")
        model_id = "acme-parts-deeper"

        def build_module(self) -> Any:
            module = super().build_module()
            return SplitModel(module.extractor, nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)))

    return Deeper(device="cpu")


def test_scc_on_a_torch_device_refuses_a_head_of_two_layers_at_construction_saying_why(parts: Any, tmp_path: Path) -> None:
    """With torch too SCC fits the head in numpy (one linear layer): the client refuses a deeper
    head at construction, naming the layers, SCC and the ways out (before: "group 'classifier'
    is not one linear layer (weight, bias)"). Without scc the same task constructs."""
    from edge_sdk.scc import SccConfig

    deeper = _deeper(parts, tmp_path)
    with pytest.raises(ConfigError) as exc:
        EdgeClient(broker="mqtt://127.0.0.1:9", device_id="d", task=deeper, data_dir=tmp_path / "scc", scc=SccConfig())
    assert str(exc.value) == (
        "SCC cannot run on acme-parts-deeper: it fits the 'classifier' group in numpy as one linear layer (weight "
        "(classes, features), bias (classes,)), and this model's is classifier.0.weight (8, 16), classifier.0.bias (8,), "
        "classifier.2.weight (3, 8), classifier.2.bias (3,). Make the classifier one linear layer (the layers before it "
        "go at the end of the extractor), or run without scc")
    EdgeClient(broker="mqtt://127.0.0.1:9", device_id="d", task=deeper, data_dir=tmp_path / "plain").stop()


def test_scc_refused_at_construction_leaves_no_data_dir(parts: Any, tmp_path: Path) -> None:
    """EdgeClient's promise: a ConfigError leaves no data dir, store or model file behind."""
    from edge_sdk.scc import SccConfig

    with pytest.raises(ConfigError, match="SCC cannot run"):
        EdgeClient(broker="mqtt://127.0.0.1:9", device_id="d", task=_deeper(parts, tmp_path), data_dir=tmp_path / "dev",
                   scc=SccConfig())
    assert not (tmp_path / "dev").exists()


def test_a_relative_graphs_folder_is_refused_where_the_taskinfo_is_declared(acme: Path, tmp_path: Path) -> None:
    """A relative ``graphs`` was read from the current directory at run time: the app started in
    its package's folder found its graphs, started anywhere else it did not ("no spec for
    'acme-parts-cnn'"). A TaskInfo is a value (copied with replace(), a factory's class
    attribute, an entry point's re-export), so the module it belongs to is not knowable: a
    relative folder is a ConfigError where it is declared, saying how to name the one beside
    the module."""
    from edge_sdk.tasks.registry import TaskInfo

    (acme / PKG / "relative.py").write_text(textwrap.dedent('''
        from dataclasses import replace

        from acme_parts.info import TASK

        RELATIVE = replace(TASK, graphs="graphs")
    ''').lstrip(), encoding="utf-8")
    env = _env(acme, tmp_path)
    for cwd in (acme / PKG, tmp_path):  # the package's folder (where it used to work) and another
        done = subprocess.run([sys.executable, "-m", "edge_sdk.tasks.registry", "--task", f"{PKG}.relative:RELATIVE"],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == "", (cwd, done.stdout, done.stderr)
        assert ("task 'acme-parts': graphs='graphs' is a relative path, which would be read from the directory the app "
                "is started in; give an absolute one, e.g. graphs=Path(__file__).resolve().parent / \"graphs\"") in done.stderr
    with pytest.raises(ConfigError, match="is a relative path"):
        dataclasses.replace(resolve_task(INFO_REF), graphs=Path("graphs"))
    assert dataclasses.replace(resolve_task(INFO_REF), graphs=str(acme / PKG / "graphs")).spec == resolve_task(INFO_REF).spec
    assert TaskInfo(name="x", task_name="x", model_id="m", sample_kind="array", n_classes=2, min_samples=2,
                    contract=None).graphs_dir == GRAPHS_DIR
