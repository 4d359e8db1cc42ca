"""HFedMS-S (STP + ICG, paper 002) and the FedOpt/FedProx baselines it is compared with (issue 16)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.methods import make_method
from coordinator.strategies import make_strategy
from coordinator.strategies.base import BufferedUpdate, StaticView
from coordinator.strategies.fedopt import (
    FedOptConfig,
    FedOptStrategy,
    fedadam_step,
    pseudo_gradient,
)
from coordinator.strategies.hfedms import (
    HFedMSConfig,
    HFedMSStrategy,
    group_count,
    head_signal,
    inter_cluster_groups,
)
from edge_sdk.errors import ConfigError
from edge_sdk.spec import ModelSpec
from edge_sdk.tasks.base import TrainConfig

SCENARIO = Path(__file__).resolve().parent.parent / "demos" / "scenarios" / "paper-hfedms.toml"

# A toy model: a 2-value "extractor" and a 3-class classifier (weight 3x2, bias 3).
SPEC = ModelSpec.build("toy", [("f.w", (2,), "extractor"), ("c.w", (3, 2), "classifier"), ("c.b", (3,), "classifier")])


# ------------------------------------------------------------------ f(r)


def test_group_count_follows_the_papers_log_growth() -> None:
    # f(r) = β⌊α ln(r/T) + 1⌋, α = 2, β = 10, evaluated at r = kT.
    got = [group_count(k, alpha=2.0, beta=10) for k in (1, 2, 3, 4, 5, 8, 20, 100)]
    want = [10 * math.floor(2 * math.log(k) + 1) for k in (1, 2, 3, 4, 5, 8, 20, 100)]
    assert got == want == [10, 20, 30, 30, 40, 50, 60, 100]
    assert group_count(100, alpha=2.0, beta=10, devices=50) == 50  # capped at the devices
    assert group_count(3, alpha=2.0, beta=10, growth="linear") == 50
    assert group_count(3, alpha=2.0, beta=10, growth="exp") == 90
    with pytest.raises(ConfigError):
        group_count(0, alpha=2.0, beta=10)
    with pytest.raises(ConfigError):
        HFedMSConfig(growth="cubic")


# ------------------------------------------------------------------ ICG


def _label_mix_features(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n devices in 5 label-mix types (one dominant class each), as unit vectors."""
    feats = {}
    for i in range(n):
        v = rng.normal(0, 0.05, 10)
        v[i % 5] += 1.0
        feats[f"d{i:02d}"] = v / np.linalg.norm(v)
    return feats


def test_icg_puts_one_device_of_every_label_mix_cluster_into_each_group() -> None:
    feats = _label_mix_features(40, np.random.default_rng(0))
    groups = inter_cluster_groups(sorted(feats), feats, 8, random.Random(1))
    assert len(groups) == 8
    assert sorted(d for g in groups for d in g) == sorted(feats)  # a partition
    for g in groups:
        assert len(g) == 5
        assert sorted(int(d[1:]) % 5 for d in g) == [0, 1, 2, 3, 4]  # one of each type
    # Random groups (no label-mix signal) are much less balanced on the same devices.
    rand = inter_cluster_groups(sorted(feats), {}, 8, random.Random(1))
    assert sum(len({int(d[1:]) % 5 for d in g}) for g in rand) < 40


def test_icg_sizes_differ_by_at_most_one_and_handles_few_devices() -> None:
    feats = _label_mix_features(23, np.random.default_rng(2))
    groups = inter_cluster_groups(sorted(feats), feats, 5, random.Random(3))
    assert sorted(d for g in groups for d in g) == sorted(feats)
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert inter_cluster_groups(["a", "b"], {}, 10, random.Random(0)) in ([["a"], ["b"]], [["b"], ["a"]])
    assert inter_cluster_groups([], {}, 3, random.Random(0)) == []


def test_head_signal_is_the_unit_bias_change() -> None:
    before = np.zeros(SPEC.size, dtype=np.float32)
    after = before.copy()
    after[-3:] = [3.0, 0.0, -4.0]
    after[0] = 100.0  # the extractor moving does not matter
    sig = head_signal(SPEC, "classifier", before, after)
    assert sig is not None
    np.testing.assert_allclose(sig, np.array([0.6, 0.0, -0.8]))
    assert head_signal(SPEC, "classifier", before, before) is None
    assert head_signal(SPEC, "nope", before, after) is None


# ------------------------------------------------------------------ the sequential chain


def _upd(device: str, weights: np.ndarray, base: int, version: int, n: int = 10, seq: int = 1) -> BufferedUpdate:
    return BufferedUpdate(device=device, seq=seq, base_version=base, staleness=version - base, n_samples=n,
                          weights=weights.astype(np.float32))


def test_stp_chains_devices_inside_a_group_and_averages_groups() -> None:
    """2 groups of 2 (β = 2, κ = 1): device 2 of a group is served device 1's result, the next
    group starts again from the round's model, and the round ends on the weighted group mean."""
    s = HFedMSStrategy(HFedMSConfig(beta=2, kappa=1.0, population=4, rounds=1))
    w0 = np.zeros(SPEC.size, dtype=np.float32)
    view = StaticView(spec=SPEC, version=0, weights=w0, deferred={d: 0.0 for d in "abcd"}, devices_seen=tuple("abcd"))
    rng = random.Random(0)
    served: list[tuple[str, np.ndarray]] = []
    results = {}
    for step in range(4):
        plan = s.plan(view, float(step), rng)
        assert not plan.aggregate and len(plan.invite) == 1
        device = plan.invite[0]
        served.append((device, view.weights.copy()))
        view.deferred.pop(device)
        trained = view.weights + np.float32(step + 1)  # what the device's training made of it
        results[device] = trained
        u = _upd(device, trained, view.version, view.version, n=10 * (step + 1))
        s.on_update(view, u, step + 0.5)
        view.buffer = (u,)
        assert s.plan(view, step + 0.5, rng).aggregate
        new = s.aggregate(view, view.buffer)
        view.history[view.version] = view.weights
        view.version += 1
        view.weights = new
        view.buffer = ()
        view.deferred[device] = step + 0.6
    chains = s.selected
    assert sorted(len(c) for c in chains) == [2, 2]
    order = [d for c in chains for d in c]
    assert [d for d, _ in served] == order
    np.testing.assert_array_equal(served[0][1], w0)  # chain 1 starts from the round's model
    np.testing.assert_array_equal(served[1][1], results[order[0]])  # device 2 continues device 1
    np.testing.assert_array_equal(served[2][1], w0)  # chain 2 starts again from the round's model
    np.testing.assert_array_equal(served[3][1], results[order[2]])
    n1, n2 = 10 + 20, 30 + 40
    want = (results[order[1]] * n1 + results[order[3]] * n2) / (n1 + n2)
    np.testing.assert_allclose(view.weights, want, rtol=1e-6)
    assert s.round == 1 and s.chain_breaks == 0 and s.done()
    assert s.plan(view, 10.0, rng).invite == ()  # R rounds done: nobody else is invited
    assert set(s.features) == set("abcd")  # every device's label-mix signal was recorded


def test_stp_waits_for_the_next_device_and_ignores_strangers() -> None:
    s = HFedMSStrategy(HFedMSConfig(beta=1, kappa=1.0, population=2))
    w0 = np.zeros(SPEC.size, dtype=np.float32)
    view = StaticView(spec=SPEC, version=0, weights=w0, deferred={"a": 0.0}, devices_seen=("a", "b"))
    rng = random.Random(0)
    assert s.plan(view, 0.0, rng).invite == ()  # only one of two devices waits: no regroup yet
    view.deferred["b"] = 0.1
    first = s.plan(view, 0.2, rng).invite
    assert len(first) == 1
    other = ({"a", "b"} - set(first)).pop()
    view.deferred.pop(first[0])
    view.deferred.pop(other)  # the second device is still away when its turn comes
    stranger = _upd("z", w0 + 5, 0, 0)
    view.buffer = (stranger,)
    assert not s.plan(view, 0.3, rng).aggregate  # not the device the chain waits for
    mine = _upd(first[0], w0 + 1, 0, 0)
    s.on_update(view, mine, 0.4)
    view.buffer = (stranger, mine)
    assert s.plan(view, 0.4, rng).aggregate
    new = s.aggregate(view, view.buffer)
    np.testing.assert_array_equal(new, w0 + 1)  # the chain's model, the stranger ignored
    assert s.ignored == 1
    view.buffer, view.version, view.weights = (), 1, new
    assert s.plan(view, 0.5, rng).invite == ()  # its successor has not pulled yet
    view.deferred[other] = 0.6
    assert s.plan(view, 0.6, rng).invite == (other,)


# ------------------------------------------------------------------ FedAdam / FedProx


def test_fedadam_step_matches_reddi_et_al() -> None:
    w = np.array([1.0, -2.0], dtype=np.float32)
    m = np.zeros(2, dtype=np.float32)
    v = np.zeros(2, dtype=np.float32)
    delta = np.array([0.5, -0.1], dtype=np.float32)
    w1, m1, v1 = fedadam_step(w, delta, m, v, lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    np.testing.assert_allclose(m1, 0.1 * delta, rtol=1e-6)
    np.testing.assert_allclose(v1, 0.01 * delta**2, rtol=1e-6)
    np.testing.assert_allclose(w1, w + 0.01 * (0.1 * delta) / (np.sqrt(0.01 * delta**2) + 1e-3), rtol=1e-6)
    # The pseudo-gradient is the sample-weighted mean change.
    base = np.zeros(2, dtype=np.float32)
    pg = pseudo_gradient(base, [(np.array([1.0, 0.0], dtype=np.float32), 1), (np.array([0.0, 4.0], dtype=np.float32), 3)])
    np.testing.assert_allclose(pg, [0.25, 3.0])
    with pytest.raises(ConfigError):
        pseudo_gradient(base, [(base, 0)])


def test_fedopt_sgd_with_lr_1_is_fedavg_and_rounds_stop() -> None:
    s = FedOptStrategy(FedOptConfig(select=2, population=2, rounds=1))
    w0 = np.zeros(SPEC.size, dtype=np.float32)
    view = StaticView(spec=SPEC, version=0, weights=w0, deferred={"a": 0.0, "b": 0.0}, devices_seen=("a", "b"))
    rng = random.Random(0)
    assert sorted(s.plan(view, 0.0, rng).invite) == ["a", "b"]
    view.deferred.clear()
    ua, ub = _upd("a", w0 + 1, 0, 0, n=1), _upd("b", w0 + 3, 0, 0, n=3)
    s.on_update(view, ua, 1.0)
    view.buffer = (ua,)
    assert not s.plan(view, 1.0, rng).aggregate  # b is still training
    s.on_update(view, ub, 2.0)
    view.buffer = (ua, ub)
    assert s.plan(view, 2.0, rng).aggregate
    np.testing.assert_allclose(s.aggregate(view, view.buffer), w0 + 2.5)
    view.buffer = ()
    view.deferred.update({"a": 3.0, "b": 3.0})
    assert s.plan(view, 3.0, rng).invite == ()  # R = 1 round done
    adam = make_strategy("fedadam")
    assert adam.describe()["server_opt"] == "adam" and adam.describe()["server_lr"] == 0.01
    with pytest.raises(ConfigError):
        make_strategy("fedopt", server_opt="yogi")


def test_fedprox_term_pulls_towards_the_received_model() -> None:
    from edge_sdk.tasks import get_task

    task = get_task("digits")
    w = task.pretrained(seed=0)
    data = task.data()
    x, y = data.pool.x[:40], data.pool.y[:40]
    plain = task.local_update(w, x, y, TrainConfig(epochs=3, batch_size=8, lr=0.05, seed=1))
    prox = task.local_update(w, x, y, TrainConfig(epochs=3, batch_size=8, lr=0.05, seed=1, mu=5.0))
    zero = task.local_update(w, x, y, TrainConfig(epochs=3, batch_size=8, lr=0.05, seed=1, mu=0.0))
    np.testing.assert_array_equal(plain.weights, zero.weights)  # mu = 0 changes nothing
    assert np.linalg.norm(prox.weights - w) < 0.9 * np.linalg.norm(plain.weights - w)
    with pytest.raises(ConfigError):
        task.local_update(w, x, y, TrainConfig(mu=-1.0))
    # The emulator's devices take mu from the coordinator's hints (FedProx as a training hint).
    from devices.engine.training import train_config

    assert train_config({"mu": 0.01}, TrainConfig(), seed=0, group="full").mu == 0.01
    assert train_config({}, TrainConfig(), seed=0, group="full").mu == 0.0


# ------------------------------------------------------------------ the quick scenario


@pytest.fixture(scope="module")
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGECI_HOME", str(tmp_path_factory.mktemp("edgeci-home")))
        yield


def test_paper_hfedms_quick_runs_every_arm(isolated_home: None) -> None:
    from devices.report import load_task
    from devices.scenario import load_scenario
    from devices.simulator import Simulation

    scenario = load_scenario(SCENARIO).quick()
    assert [r.strategy for r in scenario.runs] == ["hfedms", "hfedms", "fedopt", "fedopt", "fedadam", "hfedms", "fedadam", "fedadam"]
    assert scenario.runs[3].settings.mu > 0 and scenario.runs[2].settings.mu == 0
    task = load_task(scenario.settings.task, scenario.settings.task_options)
    for run in (scenario.runs[0], scenario.runs[3], scenario.runs[4]):  # HFedMS-S, FedProx (mu hint), FedAdam
        method = make_method(run.strategy, params=run.params)
        result = Simulation(task, run.settings, method.strategy, seed=0, label=run.label).run()
        st = result.summary["strategy"]
        assert st["round"] >= 1, run.label
        assert result.summary["best_accuracy"] > result.summary["initial_accuracy"], run.label
        if run.strategy == "hfedms":
            assert st["chain_breaks"] == 0 and st["devices_with_signal"] > 0
            assert st["groups_per_round"][0] == 10  # f(T) = β
            assert 0 < st["parallel_s"] < st["serial_s"]
            # helper-172: the curve scores round models only (the old emulator scored the line: the
            # chain steps of β = 10, versions 10 and 17, and at the end 25, mid-round 2)
            assert {int(r["version"]) for r in result.rows} <= {0, *st["round_versions"]}
            assert result.rows[-1]["version"] == st["round_versions"][-1]


# ------------------------------------------------------------------ HFedMS and LASP / head-only updates


def _hfedms_core(full_sync_every: int) -> tuple[object, HFedMSStrategy]:
    from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot

    strategy = make_strategy("hfedms", beta=1, kappa=1.0, population=2)
    assert isinstance(strategy, HFedMSStrategy)
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=full_sync_every)
    core = CoordinatorCore(cfg, strategy, Snapshot(version=0, weights=np.zeros(SPEC.size, np.float32)), rng=random.Random(0))
    return core, strategy


def test_hfedms_with_lasp_is_refused_at_configuration() -> None:
    """Between LASP's full syncs the core keeps only the head of what a strategy returns: HFedMS's
    chain would go on from the last step's extractor instead of the round's model (and at the first
    partial version, before the fix below, the chain stalled for ever). Refused where the method is
    built and where the core is, whichever a driver calls; T = 0 and 1 (every version full) run."""
    with pytest.raises(ConfigError, match="full_sync_every = 2"):
        _hfedms_core(2)
    with pytest.raises(ConfigError, match="LASP"):
        make_method("hfedms", full_sync_every=5)
    for t in (0, 1):
        _hfedms_core(t)
    assert make_method("hfedms", full_sync_every=1).strategy.name == "hfedms"
    assert make_method("spin", full_sync_every=5).strategy.name == "spin"


def test_a_head_only_chain_step_goes_onto_the_served_model_instead_of_stalling_the_chain() -> None:
    """The invited device sends one group's slice (a device told to train the head before a restart
    switched LASP off, or a misbehaving one). The old strategy ignored it: the core committed the
    unchanged model, consumed the update, and the chain waited for ever for that device (nobody
    else invited, the device not served again). Now the step's model is the served one with that
    slice trained, and the chain goes on."""
    from edge_sdk.core.events import MessageReceived, Publish
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import decode, encode
    from edge_sdk.wire.messages import Invite, Pull, Update

    core, strategy = _hfedms_core(0)

    def handle(device: str, msg: object) -> list[object]:
        leaf = "update" if isinstance(msg, Update) else "pull"
        return core.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", device, leaf), payload=encode(msg)))  # type: ignore[attr-defined, arg-type, no-any-return]

    def invited(actions: list[object]) -> list[tuple[str, Invite]]:
        out = []
        for a in actions:
            if isinstance(a, Publish) and a.topic.endswith("/invite"):
                m = decode(a.payload)
                assert isinstance(m, Invite)
                out.append((topics.parse(a.topic).device, m))
        return out

    acts = handle("d1", Pull(device="d1", seq=1, model_id="toy")) + handle("d2", Pull(device="d2", seq=1, model_id="toy"))
    ((first, invite),) = invited(acts)
    second = ({"d1", "d2"} - {first}).pop()
    handle(first, Pull(device=first, seq=2, model_id="toy", invite_round=invite.round))
    head = SPEC.group_slice("classifier")
    step = Update(device=first, seq=3, model_id="toy", base_version=0, n_samples=1,
                  weights=np.full(SPEC.group_size("classifier"), 2.0, np.float32), group="classifier")
    acts = handle(first, step)
    (commit,) = [a for a in acts if type(a).__name__ == "CommitVersion"]
    np.testing.assert_array_equal(commit.weights[head], 2.0)  # the old code: 0 (ignored)
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("extractor")], 0.0)
    assert strategy.ignored == 0 and strategy.partial_steps == 1 and strategy.expecting == second
    assert [d for d, _ in invited(acts)] == [second]  # the old code: nobody, ever


def test_a_round_end_version_is_the_number_the_commit_gets() -> None:
    """Resumed from version 2 with 3-5 unreadable (the registry skips them, the next commit is 6):
    the round's model is version 6. The old code recorded version + 1 at aggregation: 3."""
    from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
    from edge_sdk.core.events import MessageReceived, Publish
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import decode, encode
    from edge_sdk.wire.messages import Invite, Pull, Update

    strategy = make_strategy("hfedms", beta=1, kappa=1.0, population=1)
    assert isinstance(strategy, HFedMSStrategy)
    snap = Snapshot(version=2, weights=np.zeros(SPEC.size, np.float32), version_floor=5)
    core = CoordinatorCore(CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC), strategy, snap, rng=random.Random(0))
    pull = Pull(device="d1", seq=1, model_id="toy", have_version=2)
    acts = core.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", "d1", "pull"), payload=encode(pull)))
    (invite,) = [decode(a.payload) for a in acts if isinstance(a, Publish) and a.topic.endswith("/invite")]
    assert isinstance(invite, Invite)
    pull = Pull(device="d1", seq=2, model_id="toy", have_version=2, invite_round=invite.round)
    core.handle(MessageReceived(now=1.0, topic=topics.device_topic("r1", "d1", "pull"), payload=encode(pull)))
    update = Update(device="d1", seq=3, model_id="toy", base_version=2, n_samples=1, weights=np.ones(SPEC.size, np.float32))
    acts = core.handle(MessageReceived(now=2.0, topic=topics.device_topic("r1", "d1", "update"), payload=encode(update)))
    (commit,) = [a for a in acts if type(a).__name__ == "CommitVersion"]
    assert commit.version == 6 and strategy.round == 1
    assert strategy.round_versions == [6]  # the old code: [3]


def test_the_round_lists_in_the_status_keep_the_newest_rounds_only() -> None:
    """helper-150: ``round_versions`` and ``groups_per_round`` gained an entry per round for the
    daemon's life, and ``describe()`` is part of the retained status: 10,000 rounds made a 90 KB
    status, past the 64 KiB a device reads. Now the newest ROUNDS_LISTED of each."""
    from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
    from edge_sdk.core.events import MessageReceived, Publish
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import decode, encode, status_json
    from edge_sdk.wire.messages import Invite, Pull, Update

    listed = 64  # (coordinator.strategies.hfedms.ROUNDS_LISTED, written out, the old code has none)
    strategy = make_strategy("hfedms", beta=1, kappa=1.0, population=1)
    assert isinstance(strategy, HFedMSStrategy)
    core = CoordinatorCore(CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC), strategy,
                           Snapshot(version=0, weights=np.zeros(SPEC.size, np.float32)), rng=random.Random(0))
    rng = np.random.default_rng(0)
    seq, now, sizes = 0, 0.0, {}

    def send(leaf: str, msg: object) -> list[object]:
        nonlocal seq, now
        seq, now = seq + 1, now + 1.0
        return list(core.handle(MessageReceived(now=now, topic=topics.device_topic("r1", "d1", leaf), payload=encode(msg))))

    for r in range(1, 3 * listed + 1):
        acts = send("pull", Pull(device="d1", seq=seq + 1, model_id="toy", have_version=core.version))
        (invite,) = [decode(a.payload) for a in acts if isinstance(a, Publish) and a.topic.endswith("/invite")]
        assert isinstance(invite, Invite)
        send("pull", Pull(device="d1", seq=seq + 1, model_id="toy", have_version=core.version, invite_round=invite.round))
        weights = rng.standard_normal(SPEC.size).astype(np.float32)
        send("update", Update(device="d1", seq=seq + 1, model_id="toy", base_version=core.version, n_samples=1, weights=weights))
        if r in (2 * listed, 3 * listed):
            sizes[r] = len(status_json(core.status()))
    assert strategy.round == 3 * listed
    described = strategy.describe()
    assert described["round_versions"] == list(range(2 * listed + 1, 3 * listed + 1))  # one version a round
    assert described["groups_per_round"] == [1] * listed
    assert sizes[3 * listed] <= sizes[2 * listed] + 64  # (the counts' digits may grow; the lists do not)
