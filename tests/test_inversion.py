"""Gradient-inversion conversion of stale updates (paper 001, coordinator/inversion.py).

One known synthetic case on the digits CNN: a real local set D (32 pool samples), a real
LocalUpdate′ from ``base`` to ``stale`` (5 full-batch SGD steps, lr 0.01, momentum 0.5, by
the trainer's own ``fit``, not by the inverter), a ``target`` that moved on (the base
trained on 200 other samples), and the true fresh update LocalUpdate′(target; D).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from coordinator import inversion  # noqa: E402
from coordinator.core import ConvertUpdate  # noqa: E402
from coordinator.inversion import (  # noqa: E402
    ConversionResult,
    GradientInverter,
    InversionConfig,
    make_inverter,
)
from edge_sdk.errors import (  # noqa: E402
    ConfigError,
    MalformedMessage,
    MissingExtra,
    NonFiniteWeights,
    ShapeMismatch,
)
from edge_sdk.tasks import get_task  # noqa: E402
from edge_sdk.tasks.base import TrainConfig  # noqa: E402
from edge_sdk.trainer import ClassifierTask, fit  # noqa: E402

N_LOCAL = 32
RECIPE = TrainConfig(epochs=5, batch_size=N_LOCAL, lr=0.01, seed=1)  # full batch: LocalUpdate′
HINTS = {"epochs": 5.0, "lr": 0.01}


class Case:
    def __init__(self) -> None:
        task = get_task("digits")
        assert isinstance(task, ClassifierTask)
        self.task = task
        pool = task.data().pool
        self.x, self.y = pool.x[:N_LOCAL], pool.y[:N_LOCAL]
        self.base = task.pretrained(seed=0)
        self.stale = self.train(self.base, self.x, self.y, RECIPE, momentum=0.5)
        moved = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=2)
        self.target = self.train(self.base, pool.x[500:800], pool.y[500:800], moved, momentum=0.0)
        self.fresh = self.train(self.target, self.x, self.y, RECIPE, momentum=0.5)

    def train(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *, momentum: float) -> np.ndarray:
        return fit(self.task.build_module(), self.task.spec, w, x, y, cfg, momentum=momentum).weights

    def request(self, device: str = "dev-1", **changes: Any) -> ConvertUpdate:
        fields: dict[str, Any] = dict(
            ticket=1, device=device, kind="gradient-inversion", stale_weights=self.stale, base_version=3,
            base_weights=self.base, target_version=23, target_weights=self.target, n_samples=N_LOCAL,
            staleness=20, hints=HINTS, deadline=100.0,
        )
        fields.update(changes)
        return ConvertUpdate(**fields)

    def inverter(self, **config: Any) -> GradientInverter:
        config.setdefault("time_budget_s", 60.0)
        return GradientInverter(self.task, self.task.spec, InversionConfig(**config))


@pytest.fixture(scope="module")
def case() -> Case:
    return Case()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def converted(case: Case) -> ConversionResult:
    """One cold conversion of 60 iterations (|D_rec| = 16), shared by the quality tests."""
    return case.inverter(iterations=60).convert(case.request())


def test_inversion_lowers_the_l1_disparity(case: Case, converted: ConversionResult) -> None:
    zero_l1 = float(np.abs(case.stale - case.base).sum())  # what an empty D_rec leaves
    # Measured: l1 33.2 -> 6.5 (a random set starts far off), an empty set leaves 17.0.
    assert converted.weights is not None
    assert converted.iterations == 60 and not converted.warm
    assert converted.l1_after < 0.25 * converted.l1_before
    assert converted.l1_after < 0.5 * zero_l1
    assert converted.weights.dtype == np.float32 and converted.weights.shape == (case.task.spec.size,)


def test_converted_update_points_like_the_fresh_one(case: Case, converted: ConversionResult) -> None:
    assert converted.weights is not None
    fresh_change = case.fresh - case.target
    got = cosine(converted.weights - case.target, fresh_change)
    stale_model = cosine(case.stale - case.target, fresh_change)  # aggregating the stale weights
    stale_delta = cosine(case.stale - case.base, fresh_change)  # the stale change re-applied (deltas)
    # Measured (seed 0, 60 iterations): converted 0.63, stale model 0.03, stale delta 0.65.
    # Against re-applying the stale *delta* the conversion is only on par in this case
    # (0.58-0.84 over seeds and budgets); it is not asserted to win there.
    assert got > stale_model + 0.4
    assert got > 0.5
    assert got > stale_delta - 0.15


def test_deterministic_given_the_seed(case: Case) -> None:
    a = case.inverter(iterations=10, seed=7).convert(case.request())
    b = case.inverter(iterations=10, seed=7).convert(case.request())
    c = case.inverter(iterations=10, seed=8).convert(case.request())
    assert a.weights is not None and b.weights is not None and c.weights is not None
    assert np.array_equal(a.weights, b.weights) and a.l1_after == b.l1_after
    assert not np.array_equal(a.weights, c.weights)


def test_time_budget_is_respected(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake clock, not the machine's: every unroll (a pass's, and the final retraining's)
    takes 1/64 s. The loop stops with room for that last unroll inside the budget, and not
    much earlier."""
    now = [0.0]
    monkeypatch.setattr(inversion, "perf_counter", lambda: now[0])

    def timed(inverter: inversion.GradientInverter) -> inversion.GradientInverter:
        unroll = inverter._unroll

        def slow_unroll(*args: Any, **kwargs: Any) -> Any:
            now[0] += 1 / 64
            return unroll(*args, **kwargs)

        monkeypatch.setattr(inverter, "_unroll", slow_unroll)
        return inverter

    result = timed(case.inverter(iterations=100_000, time_budget_s=0.3)).convert(case.request())
    assert result.elapsed_s <= 0.3
    assert 15 <= result.iterations < 100_000  # 0.3 s holds 19 unrolls: it stops a pass or two early
    generous = timed(case.inverter(iterations=100_000, time_budget_s=0.6)).convert(case.request())
    assert generous.elapsed_s <= 0.6 and generous.iterations >= 2 * result.iterations - 2  # the budget stopped it



def test_warm_start_beats_cold_under_the_same_budget(case: Case) -> None:
    inverter = case.inverter(iterations=10)
    cold = inverter.convert(case.request())
    warm = inverter.convert(case.request())
    assert not cold.warm and warm.warm
    assert warm.l1_before == pytest.approx(cold.l1_after, rel=1e-5)  # continues where it left
    assert warm.l1_after < cold.l1_after
    # A different device starts cold from its own random set.
    other = inverter.convert(case.request(device="dev-2"))
    assert not other.warm and other.l1_before > warm.l1_before


def test_warm_start_adapts_to_a_new_sample_count(case: Case) -> None:
    inverter = case.inverter(iterations=3)
    inverter.convert(case.request())
    grown = inverter.convert(case.request(n_samples=2 * N_LOCAL))
    shrunk = inverter.convert(case.request(n_samples=N_LOCAL // 2))
    assert grown.warm and shrunk.warm
    kept = inverter._state_for_tests("dev-1")
    assert kept is not None and kept[0].shape[0] == N_LOCAL // 4  # half the claimed count


def test_forget_drops_the_state(case: Case) -> None:
    inverter = case.inverter(iterations=3, max_devices=2)
    for device in ("a", "b"):
        inverter.convert(case.request(device=device))
    assert inverter.devices() == ["a", "b"]
    inverter.forget("a")
    inverter.forget("never-seen")
    assert inverter.devices() == ["b"] and inverter._state_for_tests("a") is None
    assert not inverter.convert(case.request(device="a")).warm
    inverter.convert(case.request(device="c"))  # bounded: the least recent ("b") goes
    assert inverter.devices() == ["a", "c"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"stale_weights": np.zeros(10, dtype=np.float32)}, ShapeMismatch),
        ({"target_weights": np.zeros(10, dtype=np.float32)}, ShapeMismatch),
        ({"base_weights": "base"}, ShapeMismatch),
        ({"stale_weights": "nan"}, NonFiniteWeights),
        ({"base_weights": "inf"}, NonFiniteWeights),
        ({"stale_weights": "float64"}, ShapeMismatch),
        ({"n_samples": 0}, MalformedMessage),
        ({"n_samples": True}, MalformedMessage),
        ({"hints": {"epochs": 0.0}}, ConfigError),
        ({"hints": {"epochs": 2.5}}, ConfigError),
        ({"hints": {"lr": float("nan")}}, ConfigError),
        ({"hints": {"momentum": 1.0}}, ConfigError),
    ],
)
def test_bad_input_raises_a_typed_error_and_keeps_nothing(case: Case, change: dict[str, Any], error: type) -> None:
    for key, value in change.items():
        if isinstance(value, str):  # vectors derived from the case's own
            bad = case.stale.copy()
            if value in ("nan", "inf"):
                bad[5] = math.nan if value == "nan" else math.inf
            change[key] = {"float64": case.stale.astype(np.float64), "base": case.base[:-1]}.get(value, bad)
    inverter = case.inverter(iterations=2)
    with pytest.raises(error):
        inverter.convert(case.request(**change))
    assert inverter.devices() == []


def test_a_process_stopping_its_worker_mid_conversion_exits_cleanly(tmp_path: Path) -> None:
    # Observed: SIGTERM to `edgeci coordinator` while a conversion ran logged "stopped cleanly",
    # then "terminate called without an active exception" and died of SIGABRT (exit -6, a core
    # dump; systemd marks the unit failed): torch still ran on the worker's daemon thread at exit.
    import subprocess

    script = """
import threading, time, numpy as np
from coordinator.conversion_worker import ConversionWorker
from tests.test_inversion import Case
case = Case()
inverter = case.inverter(iterations=1_000_000, time_budget_s=120.0)
answers = []
worker = ConversionWorker(inverter, answers.append, time.monotonic).start()
worker.submit(case.request(deadline=time.monotonic() + 600))
time.sleep(1.0)
t0 = time.monotonic()
worker.stop()
print("stopped in", round(time.monotonic() - t0, 2), "answers", len(answers), "alive", worker._thread.is_alive())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "alive False" in done.stdout, done.stdout


def test_a_full_conversion_queue_warns_once_per_spell(case: Case, caplog: pytest.LogCaptureFixture) -> None:
    from coordinator.conversion_worker import ConversionWorker

    answers: list[Any] = []
    worker = ConversionWorker(case.inverter(), answers.append, lambda: 0.0, max_queue=1)  # not started: the queue only fills
    requests = [case.request() for _ in range(6)]
    with caplog.at_level(logging.WARNING, logger="edgeci.coordinator"):
        for r in requests[:5]:  # one queued, four refused: one warning
            worker.submit(r)
        assert worker.failed == 4 and len(answers) == 4
        assert [m for m in caplog.messages if "queue full" in m] == [caplog.messages[0]] and len(caplog.messages) == 1
        worker._queue.get_nowait()  # room again: the next is queued and the spell is summed up
        worker.submit(requests[5])
    assert "4 update(s) were applied damped" in caplog.messages[-1] and len(caplog.messages) == 2


def test_cancel_ends_a_running_conversion_with_no_weights(case: Case) -> None:
    import threading
    import time

    inverter = case.inverter(iterations=1_000_000, time_budget_s=120.0)
    threading.Timer(0.5, inverter.cancel).start()
    t0 = time.monotonic()
    result = inverter.convert(case.request())
    assert result.weights is None and time.monotonic() - t0 < 30
    assert inverter.convert(case.request()).iterations == 0  # for good: stopping


def test_an_unusable_inversion_returns_no_weights(case: Case) -> None:
    # Zero iterations from a random set: it explains less than an empty set would.
    inverter = case.inverter(iterations=0)
    result = inverter.convert(case.request())
    assert isinstance(result, ConversionResult)
    assert result.weights is None and result.iterations == 0
    assert result.l1_after == result.l1_before > float(np.abs(case.stale - case.base).sum())
    assert inverter.devices() == ["dev-1"]  # kept all the same: the next start is warm


def test_config_and_factory_checks(case: Case) -> None:
    with pytest.raises(ConfigError):
        InversionConfig(epochs=0)
    with pytest.raises(ConfigError):
        InversionConfig(momentum=1.5)
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) no_such_field; known: .*iterations"):
        make_inverter("digits", case.task.spec, no_such_field=1)
    for bad in ("ten", 2.5, True):  # the type named, not a TypeError from inside (or a float count accepted)
        with pytest.raises(ConfigError, match=r"inversion: parameter iterations expects an integer"):
            make_inverter("digits", case.task.spec, iterations=bad)
    with pytest.raises(ConfigError):
        make_inverter("procdigits", case.task.spec)  # spec of another model
    inverter = make_inverter("digits", case.task.spec, iterations=5)
    assert inverter.config == replace(InversionConfig(), iterations=5)


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch, case: Case) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(MissingExtra, match=r"edgeci\[train\]"):
        GradientInverter(case.task, case.task.spec)


def test_gestures_invert_from_their_samples_scale_not_the_input_guard() -> None:
    """helper-95: gestures' input contract refuses values beyond ±64 (a guard: the samples lie
    within ±8); the inverter took that range for where samples lie, started D_rec there and every
    conversion came out unusable (L1 914 → 392), so gradient-inversion quietly became damped."""
    task = get_task("gestures")
    assert isinstance(task, ClassifierTask)
    pool = task.data().pool
    x, y = pool.x[:N_LOCAL], pool.y[:N_LOCAL]

    def train(w: np.ndarray, xs: np.ndarray, ys: np.ndarray, cfg: TrainConfig, momentum: float) -> np.ndarray:
        return fit(task.build_module(), task.spec, w, xs, ys, cfg, momentum=momentum).weights

    base = task.pretrained(seed=0)
    stale = train(base, x, y, RECIPE, 0.5)
    target = train(base, pool.x[500:800], pool.y[500:800], TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=2), 0.0)
    inverter = GradientInverter(task, task.spec, InversionConfig(iterations=60, time_budget_s=60.0))
    assert inverter._value_range is None  # not the ±64 guard
    result = inverter.convert(ConvertUpdate(
        ticket=1, device="dev-1", kind="gradient-inversion", stale_weights=stale, base_version=3, base_weights=base,
        target_version=23, target_weights=target, n_samples=N_LOCAL, staleness=20, hints=HINTS, deadline=100.0))
    assert result.weights is not None and result.l1_after < result.l1_before, (result.l1_before, result.l1_after)
