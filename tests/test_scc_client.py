"""SCC inside EdgeClient (``scc=SccConfig(...)``): samples age out of the store into the
feature cache, the cache survives a restart (with the extractor it belongs to), a new
extractor shifts each cached class by its Δ_c, classifier-only rounds calibrate on current +
cached features, a corrupt cache is dropped with a warning, it is off by default, and the
SCC stream scenario runs EdgeClient devices through the emulation engine (devices/scc_fleet.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edge_sdk.client import EdgeClient
from edge_sdk.core.events import TrainingJob
from edge_sdk.errors import ConfigError
from edge_sdk.scc import DeviceScc, SccConfig
from edge_sdk.spec import FULL, Vector
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.tasks.digits import DigitsTask
from edge_sdk.tasks.linear_head import HeadLayout, fit_head

HEAD = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=3, group="classifier")


pytest_plugins = ("tests.scc_fixtures",)  # task, w_old, w_new
pytest.register_assert_rewrite("tests.scc_fixtures")
from tests.scc_fixtures import of_classes  # noqa: E402


def xy(task: DigitsTask, classes: list[int], per_class: int, offset: int = 0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    split = of_classes(task, classes, per_class, offset)
    return split.x, split.y


def client(tmp_path: Path, task: DigitsTask, scc: bool | SccConfig = False) -> EdgeClient:
    return EdgeClient(broker="mqtt://127.0.0.1:9", device_id="scc", data_dir=tmp_path / "dev", task=task, scc=scc)  # never started


def add(c: EdgeClient, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> None:
    for xi, yi in zip(x, y):
        c.add_sample(xi, int(yi))


def job(weights: Vector, group: str = "classifier") -> TrainingJob:
    return TrainingJob(job_id=1, base_version=0, weights=weights, n_samples=1, group=group)


def test_off_by_default(tmp_path: Path, task: DigitsTask, w_old: Vector) -> None:
    c = client(tmp_path, task)
    try:
        assert c.scc is None
        x, y = xy(task, [0, 1], 5)
        add(c, x, y)
        result, ids = c.run_training_job(job(w_old), HEAD)
        assert result.n_samples == 10 and len(ids) == 10
        assert c.store.count() == 10  # nothing ages out
        assert c.store.get_meta(DeviceScc.META_KEY) is None
    finally:
        c.stop()


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        SccConfig(capacity=0)
    with pytest.raises(ConfigError):
        SccConfig(keep_raw=-1)
    with pytest.raises(ConfigError):
        SccConfig(fallback="mean")  # type: ignore[arg-type]


def test_samples_age_out_into_the_cache_and_it_survives_a_restart(tmp_path: Path, task: DigitsTask, w_old: Vector) -> None:
    x, y = xy(task, [0, 1, 2], 4)
    c = client(tmp_path, task, SccConfig(capacity=6, keep_raw=4))
    try:
        add(c, x, y)
        all_ids = c.store.ids("array")
        c.run_training_job(job(w_old, FULL), TrainConfig(epochs=1, batch_size=8, lr=0.01, seed=0))
        assert c.store.ids("array") == all_ids[-4:]  # the newest keep_raw stay raw
        assert c.store.stats().evicted == 8
        scc = c.scc
        assert scc is not None and len(scc.cache) == 6  # capacity Q of the 8 aged out
        assert set(scc.cache.ids.tolist()) <= set(all_ids[:8])
        assert scc.cache.class_counts() == {0: 3, 1: 3}  # class-balanced over the aged-out (class 2 is the newest 4)
        rows = [all_ids.index(int(i)) for i in scc.cache.ids]
        np.testing.assert_allclose(scc.cache.features.astype(np.float32), task.features(w_old, x[rows]), rtol=2e-3, atol=2e-3)
        assert scc.is_current(w_old)
        before = (scc.cache.features.copy(), scc.cache.labels.copy(), scc.cache.ids.copy(), scc.cache.tag)
    finally:
        c.stop()
    c = client(tmp_path, task, SccConfig(capacity=6, keep_raw=4))
    try:
        scc = c.scc
        assert scc is not None and scc.dropped is None
        np.testing.assert_array_equal(scc.cache.features, before[0])
        np.testing.assert_array_equal(scc.cache.labels, before[1])
        np.testing.assert_array_equal(scc.cache.ids, before[2])
        assert scc.cache.tag == before[3] and scc.is_current(w_old)
    finally:
        c.stop()


def _cache_under(tmp_path: Path, task: DigitsTask, w_old: Vector) -> None:
    """A stopped client whose cache holds classes 0, 1, 2 under w_old's extractor."""
    c = client(tmp_path, task, SccConfig(capacity=30, keep_raw=0))
    try:
        add(c, *xy(task, [0, 1, 2], 5))
        c.run_training_job(job(w_old), HEAD)
        assert c.scc is not None and len(c.scc.cache) == 15 and c.store.count() == 0
    finally:
        c.stop()


def test_new_extractor_shifts_each_cached_class_by_its_delta_after_a_restart(
    tmp_path: Path, task: DigitsTask, w_old: Vector, w_new: Vector
) -> None:
    _cache_under(tmp_path, task, w_old)
    c = client(tmp_path, task, SccConfig(capacity=30, keep_raw=100))  # restarted; nothing ages out now
    try:
        scc = c.scc
        assert scc is not None and not scc.is_current(w_new)
        before = scc.cache.features.astype(np.float32)
        labels = scc.cache.labels.copy()
        x, y = xy(task, [0, 1], 6, offset=10)  # current samples; no class 2
        add(c, x, y)
        drift = task.features(w_new, x) - task.features(w_old, x)
        deltas = {0: drift[y == 0].mean(axis=0), 1: drift[y == 1].mean(axis=0), 2: drift.mean(axis=0)}  # 2: global fallback
        assert min(float(np.abs(d).mean()) for d in deltas.values()) > 0.05  # the extractor really moved
        result, _ = c.run_training_job(job(w_new), HEAD)
        after = scc.cache.features.astype(np.float32)
        for cls, delta in deltas.items():
            np.testing.assert_allclose(after[labels == cls], before[labels == cls] + delta, rtol=2e-3, atol=4e-3)
        assert scc.is_current(w_new)
        assert result.extra["cached_rows"] == 15 and result.n_samples == 12
    finally:
        c.stop()


def test_without_compensation_the_cache_is_carried_over_unchanged(
    tmp_path: Path, task: DigitsTask, w_old: Vector, w_new: Vector
) -> None:
    _cache_under(tmp_path, task, w_old)
    c = client(tmp_path, task, SccConfig(capacity=30, keep_raw=100, compensate=False))
    try:
        scc = c.scc
        assert scc is not None
        before = scc.cache.features.copy()
        add(c, *xy(task, [0, 1], 6, offset=10))
        c.run_training_job(job(w_new), HEAD)
        np.testing.assert_array_equal(scc.cache.features, before)
        assert scc.is_current(w_new)
    finally:
        c.stop()


def test_calibration_fits_the_head_on_current_plus_cached_features(
    tmp_path: Path, task: DigitsTask, w_old: Vector, w_new: Vector
) -> None:
    _cache_under(tmp_path, task, w_old)
    c = client(tmp_path, task, SccConfig(capacity=30, keep_raw=100))
    try:
        scc = c.scc
        assert scc is not None
        x, y = xy(task, [3, 4], 5)
        add(c, x, y)
        scc.prepare(w_new, x, y)  # what the job does first; a second prepare is a no-op
        z = np.concatenate([task.features(w_new, x), scc.cache.features.astype(np.float32)])
        zy = np.concatenate([y, scc.cache.labels])
        result, _ = c.run_training_job(job(w_new), HEAD)
        h = HeadLayout.of(task.spec)
        kw: dict[str, Any] = {"epochs": HEAD.epochs, "batch_size": HEAD.batch_size, "lr": HEAD.lr, "seed": HEAD.seed}
        w_all, b_all, _ = fit_head(z, zy, w_new[h.weight].reshape(h.n_classes, h.feature_dim), w_new[h.bias], **kw)
        np.testing.assert_allclose(result.weights[h.weight], w_all.reshape(-1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.weights[h.bias], b_all, rtol=1e-5, atol=1e-6)
        w_cur, _, _ = fit_head(task.features(w_new, x), y, w_new[h.weight].reshape(h.n_classes, h.feature_dim), w_new[h.bias], **kw)
        assert np.abs(result.weights[h.weight] - w_cur.reshape(-1)).max() > 1e-3  # the cache mattered
        ext = task.spec.group_slice("extractor")
        np.testing.assert_array_equal(result.weights[ext], w_new[ext])  # extractor frozen
        assert result.n_samples == 10 and result.extra["cached_rows"] == 15
    finally:
        c.stop()


@pytest.mark.parametrize("damage", ["garbage", "flipped", "wrong_extractor"])
def test_a_corrupt_cache_is_dropped_with_a_warning(
    tmp_path: Path, task: DigitsTask, w_old: Vector, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _cache_under(tmp_path, task, w_old)
    c = client(tmp_path, task)  # SCC off: the blob is left alone
    try:
        blob = c.store.get_meta(DeviceScc.META_KEY)
        assert isinstance(blob, bytes) and len(blob) > 100
        if damage == "garbage":
            blob = b"not a cache"
        elif damage == "flipped":
            raw = bytearray(blob)
            raw[len(raw) // 3] ^= 0xFF  # inside the features: the zip CRC no longer matches
            blob = bytes(raw)
        else:
            from edge_sdk.scc import FeatureCache

            cache, extra = FeatureCache.loads(blob, capacity=30, extra=("extractor",))
            blob = cache.dumps(extractor=extra["extractor"] + np.float32(1.0))
        c.store.set_meta(DeviceScc.META_KEY, blob)
    finally:
        c.stop()
    with caplog.at_level(logging.WARNING, logger="edgeci.scc"):
        c = client(tmp_path, task, SccConfig(capacity=30))
    try:
        assert c.scc is not None and c.scc.dropped is not None
        assert len(c.scc.cache) == 0
        assert any("dropping it" in r.getMessage() for r in caplog.records)
        assert c.store.get_meta(DeviceScc.META_KEY) == b""
    finally:
        c.stop()
    c = client(tmp_path, task, SccConfig(capacity=30))  # dropped for good: opens clean
    try:
        assert c.scc is not None and c.scc.dropped is None and len(c.scc.cache) == 0
    finally:
        c.stop()


# --------------------------------------------------------------------------- the stream fleet

SMALL_STREAM = """
name = "scc-small"
task = "digits"
seeds = [0]
[fleet]
devices = 3
mix = { laptop = 1.0 }
[training]
epochs = 2
batch_size = 8
lr = 0.05
[stream]
rounds = 7            # a full sync at version 5, then calibration rounds
capacity = 50
arms = ["lasp", "cache", "scc"]
"""


def test_stream_scenario_runs_edge_clients_through_the_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``edgeci emulate`` on a ``[stream]`` scenario: EdgeClient devices (SCC in the client)
    and the coordinator core exchange real, signed messages over the engine's network; every
    round closes; the compensated cache moved with each new extractor, the uncompensated one
    did not; the report has the per-seed and the mean ± std table for all three arms."""
    import json

    from demos.cli import main

    scenario = tmp_path / "small.toml"
    scenario.write_text(SMALL_STREAM)
    assert main(["emulate", str(scenario), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    for arm in ("lasp", "cache", "scc"):
        assert f"| {arm} (" in printed  # the mean ± std row
    assert "| seed | lasp | cache | scc | scc − cache |" in printed and "| scc minus |" in printed
    runs = {r["arm"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]}
    assert set(runs) == {"lasp", "cache", "scc"}
    for arm, run in runs.items():
        sm, counts = run["summary"], run["summary"]["counts"]
        assert sm["versions"] == 7 and [r["version"] for r in run["rows"]] == list(range(8))  # a version per round
        assert sm["min_device_version"] >= 5, arm  # every device's core deployed versions that came over the network
        assert counts["device:key_pinned"] == 3  # the coordinator's signed models, verified by each device
        assert counts["jobs:full"] >= 3 and counts["jobs:classifier"] >= 3  # LASP: both kinds of round
        assert "unfinished_rounds" not in counts and "device:message_rejected" not in counts
        assert run["rows"][-1]["bytes"] > 0
    assert "compensations" not in runs["lasp"]["summary"]["counts"]
    cache, scc = runs["cache"]["summary"]["counts"], runs["scc"]["summary"]["counts"]
    assert cache["compensations"] >= 3 and cache.get("shifted", 0) == 0  # carried over unchanged
    assert scc["compensations"] >= 3 and scc["shifted"] == scc["compensations"]  # shifted by Δ_c each time
    assert [r["accuracy"] for r in runs["scc"]["rows"]] != [r["accuracy"] for r in runs["cache"]["rows"]]


def test_scc_stream_command_runs_its_scenario_as_emulate_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``edgeci scc-stream --scenario S`` is ``edgeci emulate S``: the same three arms and
    files (it raised AttributeError on an option emulate gained and it did not pass)."""
    import json

    from demos.cli import main

    scenario = tmp_path / "small.toml"
    scenario.write_text(SMALL_STREAM)
    assert main(["scc-stream", "--scenario", str(scenario), "--seeds", "0", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "| seed | lasp | cache | scc | scc − cache |" in capsys.readouterr().out
    runs = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    assert {r["arm"] for r in runs} == {"lasp", "cache", "scc"} and all(r["summary"]["versions"] == 7 for r in runs)


def test_stream_scenarios_are_validated() -> None:
    import tomllib

    from demos.scc_stream import SCENARIO
    from devices.scc_fleet import parse_scc_scenario
    from devices.scenario import ScenarioError, read_toml

    shipped = parse_scc_scenario(read_toml(SCENARIO), source=str(SCENARIO))
    quick = shipped.quick()
    assert (quick.settings.devices, quick.stream.rounds, quick.settings.seeds) == (4, 19, (0, 1, 2))
    assert set(quick.stream.arms) == {"lasp", "cache", "scc"}
    raw = tomllib.loads(SMALL_STREAM)
    for bad in ({"arms": ["scc", "oracle"]}, {"arms": []}, {"timeout_s": 40.0, "round_s": 60.0}, {"rounds": 0},
                {"capacity": 0}, {"fallback": "mean"}, {"roundz": 3}):
        with pytest.raises(ScenarioError):
            parse_scc_scenario({**raw, "stream": {**raw["stream"], **bad}})


@pytest.mark.broker
def test_scc_client_on_a_real_broker_compensates_across_full_syncs(tmp_path: Path, task: DigitsTask, mosquitto: Any) -> None:
    """A started EdgeClient with SCC against mosquitto and a coordinator with LASP
    (full sync every 2 versions): its trainer thread ages samples out into the cache, the
    cache follows each new extractor, and every job succeeds."""
    import threading
    import time

    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    pool = task.data().pool
    tags: list[str] = []
    failed: list[dict[str, Any]] = []
    lock = threading.Lock()
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=mosquitto.url, region="scc", state_dir=tmp_path / "c",
                           strategy_params={"k": 1, "timeout_s": 5.0}, full_sync_every=2),
        task=task,
    )
    with daemon, EdgeClient(broker=mosquitto.url, device_id="scc", region="scc", task=task, data_dir=tmp_path / "d",
                            min_samples=2, train=TrainConfig(epochs=1), inference="torch",
                            scc=SccConfig(capacity=50, keep_raw=2)) as c:
        scc = c.scc
        assert scc is not None

        def on_trained(kind: str, info: dict[str, Any]) -> None:
            with lock:
                if kind == "trained":
                    tags.append(scc.cache.tag)  # the trainer thread is done with the cache by now
                else:
                    failed.append(info)

        c.on("trained", on_trained)
        c.on("training_failed", on_trained)
        for i in range(8):
            c.add_sample(pool.x[i], int(pool.y[i]))
            if i >= 1:  # from D_min = 2 on, every new label yields one update → one version (K = 1)
                deadline = time.monotonic() + 60
                while daemon.core.version < i:
                    assert time.monotonic() < deadline, f"no version {i}"
                    time.sleep(0.05)
        deadline = time.monotonic() + 60
        while len(tags) < 7:
            assert time.monotonic() < deadline, tags
            time.sleep(0.05)
        assert not failed
        assert c.store.count() <= 3 and len(scc.cache) >= 5  # older samples live on as features
        assert len(set(tags[1:])) >= 3  # the cache followed the extractor of versions 0, 2, 4, 6
        weights = c.weights
        assert weights is not None and scc.is_current(weights)


_LEAN_SCC = r"""
import json
import numpy as np
from edge_sdk.client import EdgeClient
from edge_sdk.core.events import TrainingJob
from edge_sdk.scc import SccConfig
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.tasks.registry import DeclaredTask

d = np.load(sys.argv[1])
head = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=3, group="classifier")
c = EdgeClient(broker="mqtt://127.0.0.1:9", device_id="lean", data_dir=sys.argv[2], task="digits",
               scc=SccConfig(capacity=20, keep_raw=0))  # never started
assert isinstance(c.task, DeclaredTask), type(c.task)
for x, y in zip(d["x1"], d["y1"]):
    c.add_sample(x, int(y))
c.run_training_job(TrainingJob(job_id=1, base_version=0, weights=d["w_old"], n_samples=6, group="classifier"), head)
before = c.scc.cache.features.astype(np.float32)
for x, y in zip(d["x2"], d["y2"]):
    c.add_sample(x, int(y))
result, _ = c.run_training_job(TrainingJob(job_id=2, base_version=1, weights=d["w_new"], n_samples=4, group="classifier"), head)
c.stop()
print(json.dumps({"cached_rows": result.extra["cached_rows"], "device": result.extra["device"],
                  "shift": float(np.abs(c.scc.cache.features.astype(np.float32)[:6] - before).mean()),
                  "weights": result.weights.tolist()}))
"""


def test_scc_runs_on_a_device_install_without_torch(tmp_path: Path, task: DigitsTask, w_old: Vector, w_new: Vector) -> None:
    """A ``[device]`` install (torch and scikit-learn blocked) compensates with onnxruntime
    features and calibrates in numpy — the same head as a torch install, to float precision."""
    import json

    from tests.test_lean_sdk import _lean

    x1, y1 = xy(task, [0, 1], 3)
    x2, y2 = xy(task, [0, 1], 2, offset=5)
    np.savez(tmp_path / "in.npz", x1=x1, y1=y1, x2=x2, y2=y2, w_old=w_old, w_new=w_new)
    proc = _lean(_LEAN_SCC, tmp_path, str(tmp_path / "in.npz"), str(tmp_path / "lean"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lean = json.loads(proc.stdout.strip().splitlines()[-1])
    assert lean["cached_rows"] == 6 and lean["device"] == "numpy" and lean["shift"] > 0.05
    c = client(tmp_path, task, SccConfig(capacity=20, keep_raw=0))  # the same steps with torch features
    try:
        add(c, x1, y1)
        c.run_training_job(job(w_old), HEAD)
        add(c, x2, y2)
        result, _ = c.run_training_job(job(w_new), HEAD)
    finally:
        c.stop()
    np.testing.assert_allclose(np.array(lean["weights"], dtype=np.float32), result.weights, atol=1e-3)


def test_a_diverging_head_fit_returns_what_the_update_check_refuses_without_a_warning(task: DigitsTask, w_new: Vector) -> None:
    """fit_head with an lr far too large: the weights go to inf/NaN under the suite's
    warnings-as-errors without a RuntimeWarning, and the update check refuses them (typed)."""
    from edge_sdk.errors import NonFiniteWeights, WeightsOutOfRange

    h = HeadLayout.of(task.spec)
    x, y = xy(task, [3, 4], 20)
    z = task.features(w_new, x) * np.float32(1e10)  # with lr 1e30 the logits overflow: inf - inf is NaN
    w, b, loss = fit_head(z, y, w_new[h.weight].reshape(h.n_classes, h.feature_dim), w_new[h.bias],
                          epochs=5, batch_size=8, lr=1e30, seed=0)
    assert not (np.isfinite(w).all() and np.isfinite(b).all()) and np.isnan(loss)
    candidate = w_new.copy()
    candidate[h.weight], candidate[h.bias] = w.reshape(-1), b
    with pytest.raises((NonFiniteWeights, WeightsOutOfRange)):
        task.spec.check_update(candidate)
