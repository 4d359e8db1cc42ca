"""SCC (edge_sdk.scc): the feature cache's selection, float16 storage and durability,
per-class drift compensation, classifier-only calibration, and that SCC recovers old
classes after a drift better than no cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError, InvalidSample, LocalProtocolError
from edge_sdk.scc import (
    FeatureCache,
    SemanticCache,
    balanced_quotas,
    extractor_digest,
    select_representatives,
)
from edge_sdk.spec import Vector
from edge_sdk.tasks.base import Split, TrainConfig
from edge_sdk.tasks.digits import DigitsTask

pytest_plugins = ("tests.scc_fixtures",)  # task, w_old, w_new
pytest.register_assert_rewrite("tests.scc_fixtures")
from tests.scc_fixtures import of_classes  # noqa: E402

# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("counts", "capacity", "quotas"),
    [
        ([10, 10, 10], 9, [3, 3, 3]),
        ([1, 10, 10], 9, [1, 4, 4]),  # a small class hands its spare share on
        ([10, 10, 10], 10, [4, 3, 3]),  # the odd slot goes to the lowest class index
        ([2, 2], 10, [2, 2]),  # everything fits
        ([5, 0, 5], 4, [2, 0, 2]),
        ([3, 3, 3, 3], 2, [1, 1, 0, 0]),
    ],
)
def test_balanced_quotas(counts: list[int], capacity: int, quotas: list[int]) -> None:
    assert balanced_quotas(np.array(counts), capacity).tolist() == quotas


def _check_selection(
    cache: FeatureCache,
    candidates: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    ids: npt.NDArray[np.int64],
) -> None:
    """The cache holds, per class, its balanced share of the candidates, and every kept row
    is at least as close to its class's candidate mean as every dropped row."""
    n = labels.shape[0]
    assert len(cache) == min(cache.capacity, n)
    assert cache.features.dtype == np.float16
    classes, counts = np.unique(labels, return_counts=True)
    quotas = dict(zip(classes.tolist(), balanced_quotas(counts, cache.capacity).tolist()))
    kept_ids = set(cache.ids.tolist())
    assert len(kept_ids) == len(cache)
    for c in classes.tolist():
        members = labels == c
        assert cache.class_counts().get(c, 0) == quotas[c]
        rows = candidates[members].astype(np.float64)
        dist = np.linalg.norm(rows - rows.mean(axis=0), axis=1)
        kept = np.array([i in kept_ids for i in ids[members]])
        if kept.all() or not kept.any():
            continue
        assert dist[kept].max() <= dist[~kept].min() + 1e-9
    # what is stored is exactly the candidate rows that were kept
    by_id = {int(i): k for k, i in enumerate(ids)}
    order = [by_id[int(i)] for i in cache.ids]
    np.testing.assert_array_equal(cache.features, candidates[order].astype(np.float16))
    np.testing.assert_array_equal(cache.labels, labels[order])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 24),
    batches=st.lists(
        st.lists(
            st.tuples(st.integers(0, 3), st.lists(st.integers(-8, 8), min_size=3, max_size=3)),
            min_size=0,
            max_size=20,
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_cache_keeps_the_balanced_per_class_closest_to_mean(
    capacity: int, batches: list[list[tuple[int, list[int]]]]
) -> None:
    cache = FeatureCache(capacity=capacity, feature_dim=3)
    next_id = 0
    for batch in batches:
        # candidates = what the cache held + this batch (small ints: exact in float16)
        prev_z = cache.features.astype(np.float32)
        prev_y = np.array(cache.labels)
        prev_ids = np.array(cache.ids)
        z = np.array([v for _, v in batch], dtype=np.float32).reshape(-1, 3)
        y = np.array([c for c, _ in batch], dtype=np.int64)
        ids = np.arange(next_id, next_id + y.shape[0], dtype=np.int64)
        next_id += y.shape[0]
        cache.add(z, y, ids)
        _check_selection(
            cache,
            np.concatenate([prev_z, z]),
            np.concatenate([prev_y, y]),
            np.concatenate([prev_ids, ids]),
        )


def test_select_representatives_keeps_all_when_it_fits() -> None:
    z = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert select_representatives(z, np.array([0, 1, 0, 1]), 4).tolist() == [0, 1, 2, 3]


def test_a_class_with_spread_features_is_not_evicted() -> None:
    """A global closest-to-mean ranking would drop class 1 (spread wide) entirely."""
    rng = np.random.default_rng(0)
    tight = rng.normal(0, 0.01, (20, 4))
    wide = rng.normal(0, 10.0, (20, 4))
    cache = FeatureCache(capacity=10)
    cache.add(np.concatenate([tight, wide]), np.repeat([0, 1], 20))
    assert cache.class_counts() == {0: 5, 1: 5}


# --------------------------------------------------------------------------- storage


def test_features_are_stored_as_float16() -> None:
    cache = FeatureCache(capacity=4)
    z = np.array([[0.1, 1.0 / 3.0], [1000.5, -2.2]], dtype=np.float32)
    cache.add(z, np.array([0, 1]))
    assert cache.features.dtype == np.float16 and cache.feature_dim == 2
    np.testing.assert_array_equal(cache.features, z.astype(np.float16))
    assert not cache.features.flags.writeable
    with pytest.raises(InvalidSample):
        cache.add(np.array([[7e4, 0.0]], dtype=np.float32), np.array([0]))  # > float16 max
    with pytest.raises(InvalidSample):
        cache.add(np.zeros((1, 3), dtype=np.float32), np.array([0]))  # wrong width
    assert len(cache) == 2  # rejected adds change nothing


def test_cache_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "dev" / "features.npz"
    cache = FeatureCache(capacity=6, path=path)
    rng = np.random.default_rng(1)
    cache.add(rng.normal(size=(10, 5)).astype(np.float32), np.arange(10) % 3, np.arange(10))
    cache.shift({0: np.ones(5, dtype=np.float32)})
    cache.retag("abc123")
    again = FeatureCache(capacity=6, path=path)
    assert again.tag == "abc123" and again.feature_dim == 5
    np.testing.assert_array_equal(again.features, cache.features)
    np.testing.assert_array_equal(again.labels, cache.labels)
    np.testing.assert_array_equal(again.ids, cache.ids)
    with np.load(path, allow_pickle=False) as z:
        assert z["features"].dtype == np.float16
    assert [p.name for p in path.parent.iterdir()] == ["features.npz"]  # no temp file left
    smaller = FeatureCache(capacity=3, path=path)  # a smaller capacity re-selects on open
    assert len(smaller) == 3 and smaller.class_counts() == {0: 1, 1: 1, 2: 1}
    assert len(FeatureCache(capacity=6, path=path)) == 3


def test_a_corrupt_cache_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "features.npz"
    path.write_bytes(b"not an npz")
    with pytest.raises(ConfigError):
        FeatureCache(path=path)


def test_semantic_cache_reopens_with_its_tag(
    tmp_path: Path, task: DigitsTask, w_old: Vector
) -> None:
    path = tmp_path / "scc.npz"
    batch = of_classes(task, [0, 1], 5)
    scc = SemanticCache(task, capacity=8, path=path)
    assert scc.observe(w_old, batch.x, batch.y) == 8
    restarted = SemanticCache(task, capacity=8, path=path)
    assert restarted.is_current(w_old) and len(restarted.cache) == 8
    np.testing.assert_array_equal(restarted.cache.features, scc.cache.features)


# --------------------------------------------------------------------------- compensation


def test_compensation_shifts_each_class_by_its_drift(
    task: DigitsTask, w_old: Vector, w_new: Vector
) -> None:
    scc = SemanticCache(task, capacity=30)
    past = of_classes(task, [0, 1, 2], 8)
    scc.observe(w_old, past.x, past.y)
    scc.hold_extractor(w_old)
    assert scc.holding_extractor and not scc.is_current(w_new)
    before = scc.cache.features.astype(np.float32)
    labels = np.array(scc.cache.labels)
    current = of_classes(task, [0, 1, 5], 4, offset=20)  # class 2 absent now

    comp = scc.compensate(None, w_new, current.x, current.y)

    drift = task.features(w_new, current.x) - task.features(w_old, current.x)
    expected = {
        0: drift[current.y == 0].mean(axis=0),
        1: drift[current.y == 1].mean(axis=0),
        2: drift.mean(axis=0),  # class-agnostic fallback (eq. 12)
    }
    assert sorted(comp.deltas) == [0, 1, 2] and comp.fallback_classes == (2,)
    for c, delta in expected.items():
        np.testing.assert_allclose(comp.deltas[c], delta, rtol=1e-5, atol=1e-6)
        assert np.abs(delta).max() > 1e-3  # the extractor really moved
        shifted = (before[labels == c] + comp.deltas[c]).astype(np.float16)
        np.testing.assert_array_equal(scc.cache.features[labels == c], shifted)
    assert scc.is_current(w_new) and not scc.holding_extractor  # old extractor dropped
    assert scc.cache.tag == extractor_digest(task.spec, w_new)


def test_fallback_none_leaves_absent_classes_alone(
    task: DigitsTask, w_old: Vector, w_new: Vector
) -> None:
    scc = SemanticCache(task, capacity=30, fallback="none")
    past = of_classes(task, [0, 2], 5)
    scc.observe(w_old, past.x, past.y)
    before = np.array(scc.cache.features)
    current = of_classes(task, [0], 4, offset=20)
    comp = scc.compensate(w_old, w_new, current.x, current.y)
    assert comp.uncompensated_classes == (2,) and sorted(comp.deltas) == [0]
    two = np.array(scc.cache.labels) == 2
    np.testing.assert_array_equal(scc.cache.features[two], before[two])
    assert not np.array_equal(scc.cache.features[~two], before[~two])


def test_stale_features_are_never_mixed_silently(
    task: DigitsTask, w_old: Vector, w_new: Vector
) -> None:
    scc = SemanticCache(task, capacity=10)
    past = of_classes(task, [3], 4)
    scc.observe(w_old, past.x, past.y)
    with pytest.raises(LocalProtocolError):
        scc.observe(w_new, past.x, past.y)
    with pytest.raises(LocalProtocolError):
        scc.calibrate(w_new, past.x, past.y, TrainConfig(group="classifier"))
    with pytest.raises(LocalProtocolError):
        scc.compensate(None, w_new, past.x, past.y)  # nothing held
    with pytest.raises(LocalProtocolError):
        scc.hold_extractor(w_new)  # not the extractor the features belong to
    before = np.array(scc.cache.features)
    scc.skip_compensation(w_new)  # the no-compensation ablation, explicitly
    assert scc.is_current(w_new)
    np.testing.assert_array_equal(scc.cache.features, before)


def test_reextract_is_exact(task: DigitsTask, w_old: Vector, w_new: Vector) -> None:
    scc = SemanticCache(task, capacity=6)
    past = of_classes(task, [4, 6], 5)
    scc.observe(w_old, past.x, past.y, ids=np.arange(10))
    scc.reextract(w_new, past.x[np.array(scc.cache.ids)])
    exact = task.features(w_new, past.x[np.array(scc.cache.ids)]).astype(np.float16)
    np.testing.assert_array_equal(scc.cache.features, exact)
    assert scc.is_current(w_new)


# --------------------------------------------------------------------------- calibration


def test_calibration_changes_only_the_classifier(task: DigitsTask, w_old: Vector) -> None:
    scc = SemanticCache(task, capacity=20)
    past = of_classes(task, [0, 1, 2], 6)
    scc.observe(w_old, past.x, past.y)
    current = of_classes(task, [7, 8], 5, offset=10)
    result = scc.calibrate(
        w_old, current.x, current.y, TrainConfig(epochs=2, lr=0.1, group="classifier")
    )
    ext, head = task.spec.group_slice("extractor"), task.spec.group_slice("classifier")
    np.testing.assert_array_equal(result.weights[ext], w_old[ext])  # bit-identical
    assert not np.array_equal(result.weights[head], w_old[head])
    assert result.n_samples == 10 and result.extra["cached_rows"] == 18
    assert np.isfinite(result.loss)
    # the cache alone is enough to calibrate on; a full-model group is refused
    empty = current.x[:0]
    alone = scc.calibrate(w_old, empty, current.y[:0], TrainConfig(group="classifier"))
    np.testing.assert_array_equal(alone.weights[ext], w_old[ext])
    with pytest.raises(ConfigError):
        scc.calibrate(w_old, current.x, current.y, TrainConfig(group="extractor"))


def test_scc_recovers_old_classes_better_than_no_cache(task: DigitsTask, w_old: Vector) -> None:
    """A device learns classes 0–4, its stream drifts to 5–9 (a few old stragglers), a full
    local update moves the extractor and the head forgets; then one calibration round."""
    pool, test = task.data().pool, task.data().test
    old_classes = np.isin(pool.y, np.arange(5))
    old_test = np.isin(test.y, np.arange(5))
    old_split = Split(x=test.x[old_test], y=test.y[old_test])
    margins = []
    for seed in (0, 1, 2):
        rng = np.random.default_rng(seed)
        old_idx = rng.permutation(np.flatnonzero(old_classes))
        new_idx = rng.permutation(np.flatnonzero(~old_classes))
        past, cur = old_idx[:100], np.concatenate([new_idx[:100], old_idx[100:105]])
        learned = task.local_update(
            w_old, pool.x[past], pool.y[past], TrainConfig(epochs=5, seed=seed)
        ).weights
        drifted = task.local_update(
            learned, pool.x[cur], pool.y[cur], TrainConfig(epochs=10, seed=seed)
        ).weights
        head = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=seed, group="classifier")

        no_cache = task.local_update(drifted, pool.x[cur], pool.y[cur], head).weights
        scc = SemanticCache(task, capacity=60)
        scc.observe(learned, pool.x[past], pool.y[past])  # the past stream, before forgetting
        scc.hold_extractor(learned)
        scc.compensate(None, drifted, pool.x[cur], pool.y[cur])
        with_scc = scc.calibrate(drifted, pool.x[cur], pool.y[cur], head).weights

        acc_no_cache = task.evaluate(no_cache, old_split)["accuracy"]
        acc_scc = task.evaluate(with_scc, old_split)["accuracy"]
        margins.append(acc_scc - acc_no_cache)
        assert task.evaluate(with_scc)["accuracy"] > task.evaluate(no_cache)["accuracy"]
    # measured: +0.15, +0.20, +0.18 on the old classes
    assert min(margins) > 0.08 and float(np.mean(margins)) > 0.12, margins


# --------------------------------------------------------------------------- the stream


def test_stream_sees_each_sample_once_in_its_classs_season(task: DigitsTask) -> None:
    from devices.scc_fleet import StreamSettings, make_streams
    from devices.scenario import Settings

    s = StreamSettings(rounds=7, drift_noise=0.0)
    pool = task.data().pool
    streams = make_streams(pool.y, 10, Settings(devices=3), s, seed=0)
    assert len(streams.batches) == 3 and all(len(b) == s.rounds for b in streams.batches)
    seen = np.concatenate([b for device in streams.batches for b in device])
    assert np.array_equal(np.sort(seen), np.arange(pool.y.shape[0]))  # every sample once
    assert len(streams.early) == 3 and streams.early == streams.class_order[:3]
    # without noise a class arrives in one round, and in season order
    first = [int(min(r for d in streams.batches for r in range(s.rounds) if (pool.y[d[r]] == c).any()))
             for c in streams.class_order]
    assert first == sorted(first) and first[0] == 0 and first[-1] == s.rounds - 1
    assert 0 <= streams.learned_round < s.rounds
