"""Partitions, labelling processes and device profiles: exact cover, determinism, skew."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.labelling import arrival_times, poisson_arrivals, stream_order
from devices.partition import dirichlet, iid, label_skew, labels_per_device, partition
from devices.profiles import PROFILES, Availability, OfflineWindows, fleet_counts
from edge_sdk.errors import ConfigError

labels_st = st.lists(st.integers(0, 9), min_size=1, max_size=400).map(lambda xs: np.array(xs, dtype=np.int64))


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert joined.shape[0] == n, "every sample belongs to exactly one device"
    assert np.array_equal(np.sort(joined), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(labels=labels_st, n_devices=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_iid_is_a_balanced_exact_cover(labels: np.ndarray, n_devices: int, seed: int) -> None:
    parts = iid(labels, n_devices, seed=seed)
    assert len(parts) == n_devices
    assert_exact_cover(parts, labels.shape[0])
    sizes = [p.shape[0] for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(labels=labels_st, n_devices=st.integers(1, 30), seed=st.integers(0, 2**16), alpha=st.floats(0.01, 100.0))
def test_dirichlet_is_a_deterministic_exact_cover(labels: np.ndarray, n_devices: int, seed: int, alpha: float) -> None:
    parts = dirichlet(labels, n_devices, alpha=alpha, seed=seed)
    assert len(parts) == n_devices
    assert_exact_cover(parts, labels.shape[0])
    again = dirichlet(labels, n_devices, alpha=alpha, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=60, deadline=None)
@given(labels=labels_st, n_devices=st.integers(1, 30), seed=st.integers(0, 2**16), labels_each=st.integers(1, 3))
def test_labels_per_device_holds_at_most_l_classes(labels: np.ndarray, n_devices: int, seed: int, labels_each: int) -> None:
    n_classes = np.unique(labels).shape[0]
    if n_devices * labels_each < n_classes or labels_each > n_classes:
        with pytest.raises(ConfigError):
            labels_per_device(labels, n_devices, labels_each=labels_each, seed=seed)
        return
    parts = labels_per_device(labels, n_devices, labels_each=labels_each, seed=seed)
    assert_exact_cover(parts, labels.shape[0])
    assert all(np.unique(labels[p]).shape[0] <= labels_each for p in parts)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n_devices=st.integers(5, 20))
def test_dirichlet_skew_grows_as_alpha_shrinks(seed: int, n_devices: int) -> None:
    labels = np.repeat(np.arange(10), 100)
    skews = [label_skew(labels, dirichlet(labels, n_devices, alpha=a, seed=seed)) for a in (100.0, 1.0, 0.01)]
    assert skews[0] < skews[1] < skews[2]
    assert label_skew(labels, iid(labels, n_devices, seed=seed)) < skews[1]


def test_partition_dispatch_and_errors() -> None:
    y = np.arange(20) % 4
    assert_exact_cover(partition(y, 3, "labels", seed=1, labels_each=2), 20)
    with pytest.raises(ConfigError):
        partition(y, 3, "zipf", seed=0)
    with pytest.raises(ConfigError):
        dirichlet(y, 3, alpha=0.0, seed=0)
    with pytest.raises(ConfigError):
        iid(y, 0, seed=0)


# ------------------------------------------------------------------ labelling


def test_poisson_arrivals_have_the_right_rate_and_stay_in_range() -> None:
    t = poisson_arrivals(2.0, 5000.0, np.random.default_rng(0))
    assert np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < 5000.0
    assert abs(t.shape[0] / 5000.0 - 2.0) < 0.1
    assert poisson_arrivals(2.0, 5000.0, np.random.default_rng(0), limit=7).shape == (7,)
    assert poisson_arrivals(0.0, 100.0, np.random.default_rng(0)).shape == (0,)


def test_nobody_labels_while_the_device_is_offline() -> None:
    offline = OfflineWindows.merge([(100.0, 400.0), (900.0, 1000.0)])
    t = arrival_times(0.5, 2000.0, offline, np.random.default_rng(3))
    assert t.size > 100
    assert not any(offline.offline_at(float(x)) for x in t)


@pytest.mark.parametrize(("order", "check"), [
    ("given", lambda idx, out, y: np.array_equal(idx, out)),
    ("shuffled", lambda idx, out, y: sorted(idx) == sorted(out)),
    ("by-class", lambda idx, out, y: np.count_nonzero(np.diff(y[out])) == np.unique(y[idx]).shape[0] - 1),
])
def test_stream_orders(order: str, check: object) -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3], dtype=np.int64)
    idx = np.arange(10)
    out = stream_order(idx, y, order, np.random.default_rng(0))
    assert check(idx, out, y)  # type: ignore[operator]


# ------------------------------------------------------------------ profiles


@pytest.mark.parametrize(("n", "mix", "expected"), [
    (100, {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 50, "b": 30, "c": 20}),
    (10, {"a": 1, "b": 1, "c": 1}, {"a": 4, "b": 3, "c": 3}),
    (1, {"a": 1, "b": 3}, {"a": 0, "b": 1}),
    (0, {"a": 1}, {"a": 0}),
])
def test_fleet_counts_add_up(n: int, mix: dict[str, float], expected: dict[str, int]) -> None:
    assert fleet_counts(n, mix) == expected


def test_offline_windows_queries() -> None:
    w = OfflineWindows.merge([(10.0, 20.0), (15.0, 30.0), (50.0, 60.0)])
    assert (w.starts, w.ends) == ((10.0, 50.0), (30.0, 60.0))
    assert [w.offline_at(t) for t in (9.9, 10.0, 29.9, 30.0, 55.0)] == [False, True, True, False, True]
    assert w.next_online(12.0) == 30.0 and w.next_online(40.0) == 40.0
    # 25 s of work from t = 0: 10 s, pause until 30, 15 more s → 45; across the second window too.
    assert w.after_online(0.0, 25.0) == pytest.approx(45.0)
    assert w.after_online(0.0, 40.0) == pytest.approx(70.0)


def test_night_window_follows_the_clock() -> None:
    night = Availability(name="n", night_start_h=23.0, night_hours=8.0, tz_jitter_h=0.0, start_h=22.0)
    w = night.windows(2 * 86_400.0, random.Random(0))
    assert w.starts[0] == pytest.approx(3600.0) and w.ends[0] == pytest.approx(9 * 3600.0)
    mid = Availability(name="m", night_start_h=23.0, night_hours=8.0, tz_jitter_h=0.0, start_h=2.0)
    assert mid.windows(3600.0, random.Random(0)).offline_at(0.0)  # the run starts at 2 am


def test_device_instances_differ_but_are_reproducible() -> None:
    prof = PROFILES["phone"]
    a = [prof.instantiate(f"d{i}", 86_400.0, random.Random(i)).speed_factor for i in range(20)]
    b = [prof.instantiate(f"d{i}", 86_400.0, random.Random(i)).speed_factor for i in range(20)]
    assert a == b and len(set(a)) == 20
    inst = prof.instantiate("d0", 100.0, random.Random(0))
    c = prof.compute
    assert inst.train_seconds(10, 5) == pytest.approx(inst.speed_factor * (c.overhead_s + c.sample_epoch_s * 50))
