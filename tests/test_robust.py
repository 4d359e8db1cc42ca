"""Fold-on-arrival aggregation and the robust defences (coordinator/strategies/robust.py).

The reference implementations are the pre-fold functions kept in
``coordinator/strategies/aggregate.py`` (``fedavg``, ``fedavg_deltas``, ``weighted_average``)
and ``port.port_weights``: the fold must give their results within float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core import CommitVersion, PersistUpdate, Snapshot
from coordinator.strategies import make_strategy
from coordinator.strategies.aggregate import fedavg, fedavg_deltas, weighted_average
from coordinator.strategies.base import BufferedUpdate, StaticView, Strategy
from coordinator.strategies.port import PortConfig, PortStrategy, port_weights
from coordinator.strategies.robust import (
    RobustAggregator,
    RobustConfig,
    coordinate_median,
    krum_select,
    sorting_network,
    trimmed_mean,
)
from coordinator.strategies.spin import SpinConfig, SpinStrategy
from edge_sdk.errors import ConfigError
from edge_sdk.spec import FULL, ModelSpec, Vector
from tests.helpers import SPEC, make_coordinator
from tests.test_coordinator_core import upd

OFF = {"clip_multiplier": 0.0, "sample_weight_cap": 0.0}
"""Robust defences off: the fold alone, comparable with the reference functions."""
BIG = ModelSpec.build("big", [("body.w", (2 * 65536 + 17,), "extractor"), ("head.w", (1000,), "classifier")])
"""Larger than two fold blocks, so the blocked loops' edges are exercised."""


def make_update(spec: ModelSpec, rng: np.random.Generator, i: int, *, group: str = FULL, base: int = 0,
                version: int = 0, n: int = 1, scale: float = 1.0) -> BufferedUpdate:
    sl = spec.group_slice(group)
    w = (rng.standard_normal(sl.stop - sl.start) * scale).astype(np.float32)
    return BufferedUpdate(device=f"d{i}", seq=i, base_version=base, staleness=version - base, n_samples=n, weights=w, group=group)


def folded(strategy: Strategy, view: StaticView, updates: Sequence[BufferedUpdate], *, refold: bool = False) -> Vector:
    """Deliver ``updates`` one by one (the core's on_update), then trigger on the fold
    (``refold``: the trigger must rebuild it exactly — an update clipped by far)."""
    for u in updates:
        strategy.on_update(view, u, 0.0)
    robust = getattr(strategy, "robust")  # noqa: B009 - every averaging strategy has one
    rebuilds = robust.rebuilds
    out = strategy.aggregate(view, updates)
    assert robust.rebuilds == rebuilds + refold, "the trigger used the fold built on arrival" if not refold else "no refold"
    return out


def narrowed(spec: ModelSpec, u: BufferedUpdate, group: str) -> BufferedUpdate:
    """What CoordinatorCore._partial hands the strategy on a LASP partial version."""
    if u.group == group:
        return u
    sl = spec.group_slice(group)
    return BufferedUpdate(device=u.device, seq=u.seq, base_version=u.base_version, staleness=u.staleness,
                          n_samples=u.n_samples, weights=u.weights[sl], group=group)


buffers = st.lists(
    st.tuples(st.sampled_from([FULL, FULL, "classifier", "extractor"]), st.integers(1, 10**6), st.integers(0, 4)),
    min_size=1,
    max_size=12,
)


def world(seed: int, version: int = 4) -> tuple[StaticView, np.random.Generator]:
    rng = np.random.default_rng(seed)
    history = {v: rng.standard_normal(SPEC.size).astype(np.float32) for v in range(version + 1)}
    return StaticView(spec=SPEC, version=version, weights=history[version], history=history), rng


# ------------------------------------------------------------------ fold == reference


@settings(max_examples=60, deadline=None)
@given(buffers, st.integers(0, 2**31), st.sampled_from(["spin", "fedbuff", "fedavg"]))
def test_models_fold_equals_weighted_average(items: list[tuple[str, int, int]], seed: int, name: str) -> None:
    view, rng = world(seed)
    updates = [make_update(SPEC, rng, i, group=g, n=n, base=4 - b, version=4) for i, (g, n, b) in enumerate(items)]
    out = folded(make_strategy(name, **OFF), view, updates)
    np.testing.assert_allclose(out, fedavg(view.weights, updates, SPEC), rtol=2e-6, atol=2e-6)


@settings(max_examples=60, deadline=None)
@given(buffers, st.integers(0, 2**31), st.sampled_from([1.0, 0.5]))
def test_deltas_fold_equals_fedavg_deltas(items: list[tuple[str, int, int]], seed: int, lr: float) -> None:
    view, rng = world(seed)
    del view.history[1]  # one base no longer retained: that share falls back to w_k − w
    updates = [make_update(SPEC, rng, i, group=g, n=n, base=4 - b, version=4) for i, (g, n, b) in enumerate(items)]
    strategy = SpinStrategy(SpinConfig(combine="deltas", server_lr=lr, **OFF))  # type: ignore[arg-type]
    expected = fedavg_deltas(view.weights, updates, SPEC, view.weights_at, lr)
    np.testing.assert_allclose(folded(strategy, view, updates), expected, rtol=2e-6, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(buffers, st.integers(0, 2**31))
def test_lasp_partial_version_narrows_the_fold_like_the_core(items: list[tuple[str, int, int]], seed: int) -> None:
    view, rng = world(seed)
    updates = [make_update(SPEC, rng, i, group=g, n=n, version=4, base=4) for i, (g, n, _) in enumerate(items) if g != "extractor"]
    if not updates:
        return
    strategy = make_strategy("spin", **OFF)
    for u in updates:  # folded as they arrived ...
        strategy.on_update(view, u, 0.0)
    used = [narrowed(SPEC, u, "classifier") for u in updates]  # ... then the version turned out partial
    np.testing.assert_allclose(strategy.aggregate(view, used), fedavg(view.weights, used, SPEC), rtol=2e-6, atol=2e-6)


@settings(max_examples=40, deadline=None)
@given(buffers, st.integers(0, 2**31))
def test_port_fold_equals_port_weights(items: list[tuple[str, int, int]], seed: int) -> None:
    view, rng = world(seed)
    del view.history[2]
    updates = [make_update(SPEC, rng, i, group=g, n=n, base=4 - b, version=4) for i, (g, n, b) in enumerate(items)]
    strategy = PortStrategy(PortConfig(**OFF))  # type: ignore[arg-type]
    bases = [view.history.get(u.base_version) for u in updates]
    p = port_weights(view.weights, view.version, updates, bases, SPEC)
    expected = weighted_average(view.weights, updates, p, SPEC)
    np.testing.assert_allclose(folded(strategy, view, updates), expected, rtol=1e-5, atol=1e-5)


def test_fold_on_a_large_model_matches_the_reference_and_the_float32_error_bound() -> None:
    """Float32 accumulation: |fold − exact| ≤ 2(K + 1)·2⁻²⁴·Σ p_k|w_k| / Σ p_k per coordinate."""
    rng = np.random.default_rng(7)
    current = rng.standard_normal(BIG.size).astype(np.float32)
    view = StaticView(spec=BIG, version=3, weights=current, history={2: current + np.float32(0.01)})
    ns = [1, 7, 300, 12, 5, 9999, 3, 40, 2, 64]
    updates = [make_update(BIG, rng, i, n=n, base=3 - i % 2, version=3, scale=1.0 + i) for i, n in enumerate(ns)]
    updates.append(make_update(BIG, rng, 99, group="classifier", n=50, base=3, version=3))
    out = folded(make_strategy("spin", **OFF), view, updates)
    full = [u for u in updates if u.group == FULL]
    p = np.array([u.n_samples for u in full], dtype=np.float64)
    exact = sum(pk * u.weights.astype(np.float64) for pk, u in zip(p, full, strict=True)) / p.sum()
    magnitude = sum(pk * np.abs(u.weights.astype(np.float64)) for pk, u in zip(p, full, strict=True)) / p.sum()
    body = BIG.group_slice("extractor")
    err = np.abs(out[body] - exact[body])
    assert np.all(err <= 2 * (len(full) + 1) * 2.0**-24 * magnitude[body] + 1e-30)
    assert float(err.max()) > 0.0, "float32 rounding is really there (the bound is not vacuous)"
    np.testing.assert_allclose(out, fedavg(current, updates, BIG), rtol=3e-6, atol=3e-6)
    deltas = SpinStrategy(SpinConfig(combine="deltas", **OFF))  # type: ignore[arg-type]
    np.testing.assert_allclose(folded(deltas, view, updates), fedavg_deltas(current, updates, BIG, view.weights_at),
                               rtol=3e-6, atol=3e-5)


def test_a_fold_that_does_not_match_the_buffer_is_rebuilt_at_the_trigger() -> None:
    view, rng = world(1)
    updates = [make_update(SPEC, rng, i, n=i + 1, base=4, version=4) for i in range(4)]
    strategy = make_strategy("spin", **OFF)
    assert isinstance(strategy, SpinStrategy)
    for u in updates[:2]:  # e.g. a core restored without the hook: half of the buffer folded
        strategy.on_update(view, u, 0.0)
    np.testing.assert_allclose(strategy.aggregate(view, updates), fedavg(view.weights, updates, SPEC), rtol=2e-6)
    assert strategy.robust.rebuilds == 1
    # a version committed in between (a peer merge): the fold is stale and rebuilt too
    for u in updates:
        strategy.on_update(view, u, 0.0)
    merged = StaticView(spec=SPEC, version=5, weights=np.ones(SPEC.size, np.float32), history=view.history)
    np.testing.assert_allclose(strategy.aggregate(merged, updates), fedavg(merged.weights, updates, SPEC), rtol=2e-6)
    assert strategy.robust.rebuilds == 2


def test_restart_rebuilds_the_fold_and_gives_the_same_next_version() -> None:
    def run(restart: bool) -> tuple[Vector, int]:
        c = make_coordinator(k=4, timeout_s=None)
        persisted: list[BufferedUpdate] = []
        for i, v in enumerate((1.0, 2.0, 3.0)):
            persisted += [a.update for a in c.handle(upd(f"d{i}", 0, v, n=i + 1)) if isinstance(a, PersistUpdate)]
        folded_before = 0
        if restart:
            snap = Snapshot(version=c.version, weights=c.weights.copy(), applied_upto=c.applied_upto, buffer=persisted)
            c = make_coordinator(k=4, timeout_s=None, snapshot=snap)
            assert isinstance(c.strategy, SpinStrategy)
            folded_before = c.strategy.robust.folded
        (commit,) = [a for a in c.handle(upd("d9", 0, 10.0, n=4)) if isinstance(a, CommitVersion)]
        return commit.weights, folded_before

    plain, _ = run(restart=False)
    restarted, folded_before = run(restart=True)
    assert folded_before == 3, "the core's restore hook refolds the pending updates"
    np.testing.assert_array_equal(plain, restarted)
    np.testing.assert_allclose(plain, (1 * 1 + 2 * 2 + 3 * 3 + 4 * 10) / 10, rtol=1e-6)


# ------------------------------------------------------------------ defences


def honest_then(strategy: Strategy, view: StaticView, rng: np.random.Generator, step: float = 0.0, rounds: int = 2, k: int = 5) -> None:
    """Warm the windows with honest rounds (changes of ``step`` + noise from the current model)."""
    for r in range(rounds):
        updates = [
            BufferedUpdate(device=f"h{i}", seq=r, base_version=view.version, staleness=0, n_samples=10 + i,
                           weights=view.weights + (step + 0.01 * rng.standard_normal(view.spec.size)).astype(np.float32))
            for i in range(k)
        ]
        folded(strategy, view, updates)


def test_clipping_bounds_a_x1000_update() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal(SPEC.size).astype(np.float32)
    results = {}
    for clip in (3.0, 0.0):
        view = StaticView(spec=SPEC, version=2, weights=base)
        strategy = make_strategy("spin", clip_multiplier=clip)
        honest_then(strategy, view, rng)
        honest = [base + (0.01 * rng.standard_normal(SPEC.size)).astype(np.float32) for _ in range(4)]
        attack = base + 1000 * (honest[0] - base)
        updates = [BufferedUpdate(device=f"x{i}", seq=9, base_version=2, staleness=0, n_samples=10, weights=w)
                   for i, w in enumerate([*honest, attack])]
        results[clip] = (folded(strategy, view, updates, refold=clip > 0), strategy.describe()["robust"]["counts"])
    clipped, counts = results[3.0]
    unclipped, _ = results[0.0]
    assert counts == {"clipped": 1}
    # the attacker's change is at most 3× the median honest norm (≈ 0.01·√9), shared by 5
    assert float(np.linalg.norm(clipped - base)) < 3 * 0.01 * 3 * 2
    assert float(np.linalg.norm(unclipped - base)) > 50 * float(np.linalg.norm(clipped - base))


def test_a_change_whose_float32_square_overflows_is_clipped_without_a_warning() -> None:
    """|Δ|² of a finite update near float32's range overflows in float32 (pytest turns the
    RuntimeWarning into an error): the norm is redone in float64 and the update clipped."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(SPEC.size).astype(np.float32)
    view = StaticView(spec=SPEC, version=2, weights=base)
    strategy = make_strategy("spin", clip_multiplier=3.0)
    honest_then(strategy, view, rng)
    honest = [base + (0.01 * rng.standard_normal(SPEC.size)).astype(np.float32) for _ in range(4)]
    attack = np.full(SPEC.size, 1e30, dtype=np.float32)  # finite; its square is not
    updates = [BufferedUpdate(device=f"x{i}", seq=9, base_version=2, staleness=0, n_samples=10, weights=w)
               for i, w in enumerate([*honest, attack])]
    clipped = folded(strategy, view, updates, refold=True)  # folded unclipped, 1e30 cancelled the honest sum away
    assert strategy.describe()["robust"]["counts"] == {"clipped": 1}
    assert np.isfinite(clipped).all() and float(np.linalg.norm(clipped - base)) < 3 * 0.01 * 3 * 2


def test_sample_cap_bounds_a_2_62_claim_without_non_finite_weights() -> None:
    rng = np.random.default_rng(4)
    view = StaticView(spec=SPEC, version=1, weights=np.zeros(SPEC.size, np.float32))
    strategy = make_strategy("spin")
    honest_then(strategy, view, rng, step=1.0)
    honest = [np.full(SPEC.size, 1.0, np.float32) for _ in range(4)]
    liar = np.full(SPEC.size, 2.0, np.float32)  # close enough not to be clipped: only its weight matters
    updates = [BufferedUpdate(device=f"x{i}", seq=9, base_version=1, staleness=0, n_samples=n, weights=w)
               for i, (w, n) in enumerate([(honest[0], 10), (honest[1], 11), (honest[2], 12), (honest[3], 13), (liar, 2**62)])]
    out = folded(strategy, view, updates)
    SPEC.check(out)  # finite: no NonFiniteWeights on the next pull
    # the liar weighs at most 4 × the median claim (≈ 12) against 46 honest samples
    assert float(out.max()) < 1.0 + 4 * 13 / (46 + 4 * 13) + 1e-6
    assert strategy.describe()["robust"]["counts"]["samples_clamped"] == 1
    uncapped = make_strategy("spin", sample_weight_cap=0.0, clip_multiplier=0.0)
    assert float(folded(uncapped, view, updates).min()) > 1.999


def test_max_staleness_drops_and_counts() -> None:
    view, rng = world(5, version=10)
    fresh = [make_update(SPEC, rng, i, base=10, version=10, n=2) for i in range(3)]
    stale = make_update(SPEC, rng, 7, base=3, version=10, n=1000)
    strategy = make_strategy("spin", max_staleness=5, **OFF)
    out = folded(strategy, view, [*fresh, stale])
    np.testing.assert_allclose(out, fedavg(view.weights, fresh, SPEC), rtol=2e-6)
    assert strategy.describe()["robust"]["counts"] == {"dropped_stale": 1}
    only_stale = make_strategy("spin", max_staleness=5)
    np.testing.assert_array_equal(folded(only_stale, view, [stale]), view.weights)


@pytest.mark.parametrize("combiner", ["median", "trimmed-mean", "krum", "multi-krum"])
def test_robust_combiners_resist_one_outlier(combiner: str) -> None:
    rng = np.random.default_rng(6)
    view = StaticView(spec=BIG, version=0, weights=np.zeros(BIG.size, np.float32))
    honest = [(1.0 + 0.1 * rng.standard_normal(BIG.size)).astype(np.float32) for _ in range(6)]
    outlier = np.full(BIG.size, 1e6, np.float32)
    updates = [BufferedUpdate(device=f"x{i}", seq=0, base_version=0, staleness=0, n_samples=10, weights=w)
               for i, w in enumerate([*honest[:3], outlier, *honest[3:]])]
    out = folded(make_strategy("spin", combiner=combiner, trim_fraction=0.2, **OFF), view, updates)
    assert float(out.min()) > 0.5 and float(out.max()) < 1.5
    mean = folded(make_strategy("spin", **OFF), view, updates)
    assert float(mean.min()) > 1e5


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 23), st.integers(0, 2**31), st.floats(0.0, 0.49))
def test_median_and_trimmed_mean_equal_numpy(k: int, seed: int, fraction: float) -> None:
    rows = np.random.default_rng(seed).standard_normal((k, 37)).astype(np.float32)
    rows[0, :5] = rows[-1, :5]  # ties
    np.testing.assert_allclose(coordinate_median(rows), np.median(rows, axis=0), rtol=1e-6, atol=1e-7)
    t = min(int(fraction * k), (k - 1) // 2)
    expected = np.sort(rows, axis=0)[t : k - t].mean(axis=0)
    np.testing.assert_allclose(trimmed_mean(rows, fraction), expected, rtol=1e-5, atol=1e-6)
    x = list(rows[:, 0])
    for i, j in sorting_network(k):
        if x[i] > x[j]:
            x[i], x[j] = x[j], x[i]
    assert x == sorted(x)


def test_krum_picks_from_the_honest_cluster() -> None:
    rng = np.random.default_rng(8)
    rows = rng.standard_normal((7, 50)).astype(np.float32) * 0.1
    rows[2] += 100.0
    rows[5] -= 100.0
    assert krum_select(rows, 2, multi=False)[0] not in (2, 5)
    assert set(krum_select(rows, 2, multi=True)).isdisjoint({2, 5})


def test_robust_combiners_with_lasp_groups_follow_the_overwrite_rule() -> None:
    view, rng = world(9)
    full = [make_update(SPEC, rng, i, version=4, base=4) for i in range(3)]
    head = [make_update(SPEC, rng, 10 + i, group="classifier", version=4, base=4) for i in range(3)]
    out = folded(make_strategy("spin", combiner="median", **OFF), view, [*full, *head])
    body, cls = SPEC.group_slice("extractor"), SPEC.group_slice("classifier")
    np.testing.assert_allclose(out[body], np.median([u.weights[body] for u in full], axis=0), rtol=1e-6)
    np.testing.assert_allclose(out[cls], np.median([u.weights for u in head], axis=0), rtol=1e-6)


def test_counters_by_reason_reach_the_status_and_are_counted_once() -> None:
    c = make_coordinator(k=50, timeout_s=None, max_staleness=0, min_known=3)
    for i in range(4):
        c.handle(upd(f"d{i}", 0, 1.0 + 0.01 * i, n=10))
    c.handle(upd("big", 0, 1000.0, n=10))  # clipped
    c.handle(upd("liar", 0, 1.0, n=10_000))  # clamped
    assert isinstance(c.strategy, SpinStrategy)
    counts = c.strategy.describe()["robust"]["counts"]
    assert counts == {"clipped": 1, "samples_clamped": 1}
    assert c.status().extra["strategy_params"]["robust"]["counts"] == counts
    strategy = c.strategy
    strategy.robust.combine(c, [*c.buffer][:-1])  # a mismatching trigger refolds: nothing counted twice
    assert strategy.describe()["robust"]["counts"] == counts


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("bad", [
    {"combiner": "mode"}, {"clip_multiplier": 0.5}, {"clip_multiplier": -1.0}, {"sample_weight_cap": 0.5},
    {"max_staleness": -1}, {"trim_fraction": 0.5}, {"krum_f": -1}, {"window": 0},
])
@pytest.mark.parametrize("name", ["spin", "spin-notimeout", "fedbuff", "port", "fedavg", "hierfavg"])
def test_every_averaging_strategy_validates_robust_parameters(name: str, bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        make_strategy(name, **bad)


def test_spin_notimeout_keeps_the_robust_parameters() -> None:
    s = make_strategy("spin-notimeout", combiner="median", max_staleness=3)
    assert s.describe()["robust"]["combiner"] == "median" and s.describe()["robust"]["max_staleness"] == 3


def test_cli_flags_reach_the_strategy() -> None:
    import argparse
    from pathlib import Path

    from coordinator.cli import add_arguments, options_from

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--state-dir", "st", "--combiner", "trimmed-mean", "--clip-multiplier", "0",
                         "--max-staleness", "4", "--sample-weight-cap", "8"])
    opts = options_from(args)
    assert opts.state_dir == Path("st")
    s = make_strategy(opts.strategy, **dict(opts.strategy_params))
    assert s.describe()["robust"] == {"combiner": "trimmed-mean", "clip_multiplier": 0.0, "max_staleness": 4,
                                      "sample_weight_cap": 8.0, "device_share": 0.2, "counts": {}}
    default = options_from(p.parse_args(["--state-dir", "st"]))
    assert make_strategy(default.strategy, **dict(default.strategy_params)).describe()["robust"]["clip_multiplier"] == 3.0


def test_robust_aggregator_is_usable_alone() -> None:
    agg = RobustAggregator(RobustConfig(combiner="median"), expected=1)  # grows past ``expected``
    view, rng = world(10)
    updates = [make_update(SPEC, rng, i, version=4, base=4) for i in range(5)]
    for u in updates:
        agg.observe(view, u)
    np.testing.assert_allclose(agg.combine(view, updates), np.median([u.weights for u in updates], axis=0), rtol=1e-6)
    assert agg.folded == 0, "the trigger consumes the fold"


def test_emulator_scenarios_pass_robust_parameters_to_the_strategy() -> None:
    from devices.scenario import ScenarioError, parse_scenario
    from tests.test_emulator import small_scenario

    robust = {"combiner": "median", "clip_multiplier": 2.0, "max_staleness": 3, "sample_weight_cap": 4.0}
    sc = parse_scenario(small_scenario(runs=[{"strategy": "fedbuff", "params": {"k": 3, **robust}}]))
    assert make_strategy(sc.runs[0].strategy, **sc.runs[0].params).describe()["robust"] == {**robust, "device_share": 0.2, "counts": {}}
    with pytest.raises((ScenarioError, ConfigError)):
        parse_scenario(small_scenario(runs=[{"strategy": "spin", "params": {"combiner": "mode"}}]))


def test_checkpointed_windows_make_a_restart_clip_exactly_like_no_restart() -> None:
    def run(restart: bool) -> tuple[Vector, dict[str, int]]:
        c = make_coordinator(k=3, timeout_s=None, min_known=3)
        for i in range(3):
            c.handle(upd(f"d{i}", 0, 1.0 + 0.1 * i, n=10))
        assert c.version == 1
        checkpoint = c.strategy.checkpoint()  # what a commit of version 1 would carry
        persisted: list[BufferedUpdate] = []
        for i, value in ((0, 1.5), (1, 1000.0)):
            persisted += [a.update for a in c.handle(upd(f"d{i}", 1, value, base=1, n=10)) if isinstance(a, PersistUpdate)]
        if restart:
            strategy = make_strategy("spin", k=3, timeout_s=None, min_known=3)
            strategy.restore_state(checkpoint)
            snap = Snapshot(version=1, weights=c.weights.copy(), applied_upto=c.applied_upto, buffer=persisted)
            c = make_coordinator(strategy, snapshot=snap)
        (commit,) = [a for a in c.handle(upd("d2", 1, 1.4, base=1, n=10)) if isinstance(a, CommitVersion)]
        return commit.weights, c.strategy.describe()["robust"]["counts"]

    plain, plain_counts = run(restart=False)
    restarted, restarted_counts = run(restart=True)
    assert plain_counts == restarted_counts == {"clipped": 1}
    np.testing.assert_array_equal(plain, restarted)
    assert float(plain.max()) < 5.0, "the ×1000 update was clipped"


def test_a_restart_through_the_registry_clips_exactly_like_no_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The test above hands the checkpoint over by hand; this one goes the real way: every action
    the core returns goes to a real Registry (updates appended, versions committed), and the
    restarted core is built from ``Registry.load()``, as the daemon does. Before the commit carried
    the strategy's checkpoint, the restarted windows held only the two pending updates (fewer than
    ``min_known``), so the ×1000 update went into version 2 unclipped (its max 334)."""
    from coordinator.registry import Registry
    from tests.helpers import toy_snapshot

    strategy, params = "spin", {"k": 3, "timeout_s": None, "min_known": 3}

    def run(restart: bool) -> tuple[Vector, dict[str, int]]:
        reg = Registry(tmp_path / f"{strategy}-{restart}", SPEC)
        reg.initialise(toy_snapshot().weights, now=0.0, source="test")

        def apply(actions: Sequence[object]) -> list[object]:
            for a in actions:
                if isinstance(a, PersistUpdate):
                    reg.append_updates([a.update])
                elif isinstance(a, CommitVersion):
                    reg.commit(a)
            return list(actions)

        snap = reg.load()
        assert snap is not None
        c = make_coordinator(strategy, snapshot=snap, **params)
        for i in range(3):
            apply(c.handle(upd(f"d{i}", 0, 1.0 + 0.1 * i, n=10)))
        assert c.version == 1
        for i, value in ((0, 1.5), (1, 1000.0)):
            apply(c.handle(upd(f"d{i}", 1, value, base=1, n=10)))
        if restart:
            reg.close()
            reg = Registry(tmp_path / f"{strategy}-{restart}", SPEC)
            snap = reg.load()
            assert snap is not None and snap.version == 1 and len(snap.buffer) == 2 and snap.strategy_name == strategy
            c = make_coordinator(strategy, snapshot=snap, **params)
        (commit,) = [a for a in apply(c.handle(upd("d2", 1, 1.4, base=1, n=10))) if isinstance(a, CommitVersion)]
        reg.close()
        return commit.weights, c.strategy.describe()["robust"]["counts"]

    plain, plain_counts = run(restart=False)
    restarted, restarted_counts = run(restart=True)
    assert plain_counts == restarted_counts == {"clipped": 1}
    np.testing.assert_array_equal(plain, restarted)
    assert float(restarted.max()) < 5.0, "the ×1000 update was clipped"


def test_a_state_dir_restarted_under_another_strategy_does_not_read_its_state_and_says_so() -> None:
    from coordinator.core import Notify

    state = {"robust": {"norms": {"full": [["d1", 0, 1.0]] * 1}, "counts": {"clipped": 7}}}
    snap = Snapshot(version=0, weights=np.zeros(SPEC.size, np.float32), strategy_state=state, strategy_name="fedbuff")
    other = make_coordinator("spin", snapshot=snap, k=3)
    assert other.strategy.describe()["robust"]["counts"] == {}
    said = [dict(a.data) for a in other.start(0.0) if isinstance(a, Notify) and a.kind == "strategy_changed"]
    assert said == [{"was": "fedbuff", "now": "spin"}]
    assert not [a for a in other.start(1.0) if isinstance(a, Notify) and a.kind == "strategy_changed"]  # said once
    same = make_coordinator("fedbuff", snapshot=snap, k=3)
    assert same.strategy.describe()["robust"]["counts"] == {"clipped": 7}


def test_restore_skips_malformed_checkpoint_entries() -> None:
    agg = RobustAggregator(RobustConfig())
    agg.restore({"claims": [["d", 1, 5.0], ["bad"], ["d", "x", 1.0], ["e", 2, float("nan")]], "norms": {"full": 3},
                 "counts": {"clipped": 2, "bogus": -1}})
    assert agg.checkpoint() == {"claims": [["d", 1, 5.0]], "norms": {"full": []}, "counts": {"clipped": 2}}


def test_live_reconfigure_switches_the_rule_and_rejects_bad_values() -> None:
    view, rng = world(11)
    updates = [make_update(SPEC, rng, i, n=i + 1, base=3, version=4) for i in range(3)]
    strategy = make_strategy("spin", **OFF)
    assert isinstance(strategy, SpinStrategy)
    for u in updates:
        strategy.on_update(view, u, 0.0)
    strategy.reconfigure(combine="deltas")  # mid-buffer (SIGHUP): the fold is rebuilt under the new rule
    expected = fedavg_deltas(view.weights, updates, SPEC, view.weights_at)
    np.testing.assert_allclose(strategy.aggregate(view, updates), expected, rtol=2e-6, atol=1e-6)
    with pytest.raises(ConfigError):
        strategy.reconfigure(combiner="mode")
    with pytest.raises(ConfigError):
        strategy.reconfigure(nonsense=1)
    assert strategy.config.combiner == "mean" and strategy.config.combine == "deltas"
    with pytest.raises(ConfigError):
        make_strategy("spin-notimeout").reconfigure(timeout_s=3.0)  # type: ignore[attr-defined]


def test_live_reconfigure_changes_the_staleness_policy_the_fold_applies() -> None:
    view, rng = world(12, version=6)
    stale = make_update(SPEC, rng, 0, base=1, version=6)  # 5 versions behind
    strategy = make_strategy("spin", staleness="none", **OFF)
    assert isinstance(strategy, SpinStrategy)
    strategy.reconfigure(staleness="drop-beyond", max_staleness=2)  # SIGHUP: from now on, drop it
    strategy.on_update(view, stale, 0.0)
    np.testing.assert_array_equal(strategy.aggregate(view, [stale]), view.weights)
    assert strategy.robust.counters["dropped_stale"] == 1


@pytest.mark.parametrize("combine", ["models", "deltas"])
def test_a_rebuild_after_a_far_clip_reuses_the_measured_norms_bit_for_bit(combine: str) -> None:
    """An update clipped by far makes the trigger rebuild the fold (same version, same
    updates): pass 1's Σd² measured on arrival stands, and the result is the very same
    float32 vector as a rebuild that rescans every update."""
    def run(reuse: bool) -> tuple[Vector, int]:
        view, rng = world(7)
        updates = [make_update(SPEC, rng, i, n=i + 1, base=4 - i % 3, version=4, scale=0.01) for i in range(8)]
        updates.append(make_update(SPEC, rng, 8, n=3, base=4, version=4, scale=1e4))  # clipped by far: inexact fold
        strategy = SpinStrategy(SpinConfig(combine=combine, min_known=2))  # type: ignore[arg-type]
        scans = 0
        scan = strategy.robust._scan

        def counted(*args: object) -> tuple[float, float, float]:
            nonlocal scans
            scans += 1
            return scan(*args)  # type: ignore[arg-type]

        strategy.robust._scan = counted  # type: ignore[method-assign]
        for u in updates:
            strategy.on_update(view, u, 0.0)
        if not reuse:
            for e in strategy.robust._entries:
                e.norm_of = None
        out = strategy.aggregate(view, updates)
        assert strategy.robust.rebuilds == 1, "a far clip makes the trigger rebuild the fold"
        return out, scans

    reused, scans_reused = run(True)
    rescanned, scans_rescanned = run(False)
    assert reused.tobytes() == rescanned.tobytes()
    assert (scans_reused, scans_rescanned) == (9, 18), "the rebuild measured nothing again"


# ------------------------------------------------------------------ one device's share


def flood(share: float, *, honest: int = 10, attacks: int = 40) -> tuple[float, float, dict[str, int], int]:
    """helper-100's red-team run on the core: ``honest`` devices push one small change each
    (SPIN, K = 10: one version), then one device pushes ``attacks`` updates, each 1,000 in
    one direction from the model it was served. Returns (the attack's displacement along
    that direction, the largest honest change norm, the robust counters, versions)."""
    from tests.test_coordinator_core import commits, upd

    c = make_coordinator(k=10, timeout_s=16.0, device_share=share)
    rng = np.random.default_rng(7)
    norms = []
    for i in range(honest):
        change = (0.05 * rng.standard_normal(SPEC.size)).astype(np.float32)
        norms.append(float(np.linalg.norm(change)))
        c.handle(upd(f"h{i}", 1, weights=np.asarray(c.weights) + change, base=c.version, now=float(i)))
    assert c.version == 1
    start = np.array(c.weights, copy=True)
    u = np.ones(SPEC.size, dtype=np.float32) / np.float32(np.sqrt(SPEC.size))
    for s in range(1, attacks + 1):
        commits(c.handle(upd("mallory", s, weights=np.asarray(c.weights) + 1000 * u, base=c.version, now=10.0 + 0.5 * s)))
    moved = float(np.dot(np.asarray(c.weights) - start, u))
    return moved, max(norms), c.strategy.describe()["robust"]["counts"], c.version


def test_one_device_cannot_fill_the_windows_it_is_clipped_against() -> None:
    """The clipping and sample-cap windows were the last 50 *updates*: one device's flood
    became their median and went through unclipped (helper-100: the line moved 4,000 along
    the attack over 5 versions). With a device's share of each window bounded, the honest
    median stands (an order statistic of the honest norms: at most the largest) and each
    version moves the line at most 3 × that along the attack."""
    moved, largest, counts, versions = flood(0.2)
    assert versions == 5  # all 40 accepted: clipped, never rejected
    assert counts["clipped"] == 40 and counts["over_share"] == 35  # (its first 5: the floor, min_known)
    assert 0 < moved <= 4 * 3 * largest * 1.001  # 4 versions of 10 clipped updates, all one way (1.9 here)
    unbounded, _, old_counts, _ = flood(1.0)  # the old window: the attack becomes the median after 10 updates
    assert unbounded > 1000 and old_counts.get("clipped", 0) < 40 and "over_share" not in old_counts


def test_a_device_holds_at_most_its_share_of_a_window_and_the_floor_keeps_small_fleets() -> None:
    from coordinator.strategies.robust import _Window

    w = _Window(50, share=0.2, floor=5)
    for s in range(30):  # one device alone: it keeps its last 5 (the floor), never more
        w.record(("a", s), float(s))
    assert list(w.values) == [("a", s) for s in range(25, 30)] and w.median(5) == 27.0
    for i in range(45):  # 45 others, one value each: the window fills to 50, "a" still 5 of them
        w.record((f"d{i}", 0), 1.0)
    assert len(w.values) == 50 and w.held["a"] == 5 and w.median(5) == 1.0
    for s in range(30, 60):  # "a" goes on: ⌊0.2 × 50⌋ = 10 of the 50, its newest
        w.record(("a", s), 1000.0)
    assert w.held["a"] == 10 and [k for k in w.values if k[0] == "a"] == [("a", s) for s in range(50, 60)]
    assert w.median(5) == 1.0 and len(w.values) == 50 and sorted(w.sorted) == w.sorted
    assert sum(w.held.values()) == len(w.values) == len(w.sorted)
    plain = _Window(50)  # share 1: the last 50 values, whoever sent them
    for s in range(60):
        plain.record(("a", s), float(s))
    assert list(plain.values) == [("a", s) for s in range(10, 60)]


def test_device_share_is_checked_and_changes_live() -> None:
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="device_share"):
            make_strategy("spin", device_share=bad)
    s = make_strategy("spin")
    s.on_update(StaticView(spec=SPEC, version=0, weights=np.zeros(SPEC.size, np.float32)),
                BufferedUpdate(device="d", seq=1, base_version=0, staleness=0, n_samples=1, weights=np.ones(SPEC.size, np.float32)), 0.0)
    s.reconfigure(device_share=1.0)  # SIGHUP: the windows keep their values, under the new share
    robust = getattr(s, "robust")  # noqa: B009
    assert robust._claims.share == 1.0 and all(w.share == 1.0 for w in robust._norms.values()) and len(robust._claims.values) == 1
    assert s.describe()["robust"]["device_share"] == 1.0
    with pytest.raises(ConfigError, match="device_share"):
        s.reconfigure(device_share=0.0)
    assert s.describe()["robust"]["device_share"] == 1.0


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.floats(0, 100, allow_nan=False)), max_size=300),
       st.integers(1, 60), st.sampled_from([0.1, 0.2, 0.5, 1.0]), st.integers(1, 8))
def test_a_window_keeps_its_invariants_whatever_arrives(items: list[tuple[int, float]], size: int, share: float,
                                                        floor: int) -> None:
    from coordinator.strategies.robust import _Window

    w = _Window(size, share=share, floor=floor)
    for seq, (d, v) in enumerate(items):
        w.record((f"d{d}", seq), v)
        n = len(w.values)
        assert n <= size and w.sorted == sorted(w.values.values())
        assert w.held == {dev: sum(1 for k in w.values if k[0] == dev) for dev in w.held} and sum(w.held.values()) == n
        assert all(c <= max(floor, int(share * n)) or c == 1 for c in w.held.values())
    again = list(w.values)
    for seq, (d, _) in enumerate(items):  # a rebuild observes the same updates again: nothing moves
        assert not w.record((f"d{d}", seq), -1.0)
    assert list(w.values) == again


def test_a_live_change_of_window_or_share_holds_at_once_and_a_restore_rebuilds_the_window() -> None:
    """helper-104: a SIGHUP lowering device_share left a device that filled the window holding
    40 of its 50 values (record drops at most one per value it takes), and a smaller ``window``
    never shrank it; a restore replayed values through record, judging each device's share
    against the count at replay, so a restart changed the window. Both now trim once."""
    view = StaticView(spec=SPEC, version=0, weights=np.zeros(SPEC.size, np.float32))

    def update(device: str, seq: int) -> BufferedUpdate:
        return BufferedUpdate(device=device, seq=seq, base_version=0, staleness=0, n_samples=1,
                              weights=np.full(SPEC.size, 1.0 if device == "m" else 0.01, np.float32))

    s = make_strategy("spin", device_share=1.0)
    robust = getattr(s, "robust")  # noqa: B009
    for i in range(10):
        s.on_update(view, update(f"h{i}", 1), 0.0)
    for seq in range(40):
        s.on_update(view, update("m", seq), 0.0)
    assert robust._claims.held["m"] == 40
    s.reconfigure(device_share=0.2)
    for w in (robust._claims, *robust._norms.values()):
        assert w.held["m"] == 5 and len(w.values) == 15  # ⌊0.2 × 15⌋ < 5: the floor (min_known)
        assert [k for k in w.values if k[0] == "m"] == [("m", seq) for seq in range(35, 40)]  # its newest
        assert sorted(w.values.values()) == w.sorted
    s.reconfigure(window=8)
    assert all(len(w.values) == 8 for w in (robust._claims, *robust._norms.values()))
    s.reconfigure(window=50)

    live = make_strategy("spin")
    for i in range(40):
        live.on_update(view, update(f"o{i}", 1), 0.0)
    for seq in range(10):
        live.on_update(view, update("a", seq), 0.0)
    for i in range(40, 80):
        live.on_update(view, update(f"o{i}", 1), 0.0)
    window = getattr(live, "robust")._claims  # noqa: B009
    assert window.held["a"] == 10 and len(window.values) == 50
    again = make_strategy("spin")
    again.restore_state(live.checkpoint())
    restored = getattr(again, "robust")._claims  # noqa: B009
    assert list(restored.values.items()) == list(window.values.items()) and restored.sorted == window.sorted
