"""The aggregation strategies under LASP (``full_sync_every`` = T >= 2), through the core.

At a partial version the core hands a strategy the head slice of each update and keeps only
the head of what it returns. A strategy must then step the head from those slices (FedOpt's
server optimizer included: its moments are whole-model shaped and only the head's may move),
the robust combiners must measure what is applied (the head), and a strategy whose versions
cannot follow LASP's schedule is refused at configuration (``coordinator.methods.NO_LASP``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from coordinator.core import CommitVersion, CoordinatorConfig, CoordinatorCore
from coordinator.methods import NO_LASP, make_method
from coordinator.strategies import make_strategy
from coordinator.strategies.fedopt import FedOptStrategy, fedadam_step, pseudo_gradient
from edge_sdk.core.events import MessageReceived, Publish, TimerFired
from edge_sdk.errors import ConfigError
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Invite, ModelMsg, Pull, Update
from tests.helpers import SPEC, toy_snapshot

EXT, HEAD = SPEC.group_slice("extractor"), SPEC.group_slice("classifier")


class Rounds:
    """A core under LASP and devices that pull, accept an invite, train what they are told
    (the whole model or the head) and send it: one round per :meth:`round`."""

    def __init__(self, strategy: str, t: int, **params: Any) -> None:
        self.strategy = make_strategy(strategy, **params)
        cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=t)
        self.core = CoordinatorCore(cfg, self.strategy, toy_snapshot(), rng=random.Random(0))
        self.seq: dict[str, int] = {}
        self.served: dict[str, ModelMsg] = {}
        self.invites: dict[str, Invite] = {}
        self.now = 0.0

    def _eat(self, actions: list[Any]) -> list[CommitVersion]:
        out = []
        for a in actions:
            if isinstance(a, CommitVersion):
                out.append(a)
            elif isinstance(a, Publish) and a.topic.rsplit("/", 1)[-1] in ("model", "invite"):
                m = decode(a.payload)
                if isinstance(m, ModelMsg):
                    self.served[topics.parse(a.topic).device] = m
                elif isinstance(m, Invite):
                    self.invites[topics.parse(a.topic).device] = m
        return out

    def _send(self, device: str, msg: Pull | Update) -> list[CommitVersion]:
        self.now += 0.01
        leaf = "update" if isinstance(msg, Update) else "pull"
        return self._eat(self.core.handle(MessageReceived(now=self.now, topic=topics.device_topic("r1", device, leaf),
                                                          payload=encode(msg))))

    def _next(self, device: str) -> int:
        self.seq[device] = self.seq.get(device, 0) + 1
        return self.seq[device]

    def round(self, values: dict[str, np.ndarray], *, whole: bool = False) -> tuple[list[str], list[CommitVersion]]:
        """Each device pulls (and pulls again when invited), then sends the part it was told to
        train, cut from ``values[device]`` (``whole``: the whole vector all the same). Returns the
        groups the devices were told to train and the commits."""
        commits = []
        for device in values:
            commits += self._send(device, Pull(device=device, seq=self._next(device), model_id="toy"))
        for device in list(self.invites):
            invite = self.invites.pop(device)
            commits += self._send(device, Pull(device=device, seq=self._next(device), model_id="toy",
                                               invite_round=invite.round))
        groups = []
        for device, value in values.items():
            served = self.served.pop(device)
            group = served.train_group
            sent = "full" if whole else group
            groups.append(group)
            commits += self._send(device, Update(device=device, seq=self._next(device), model_id="toy",
                                                 base_version=served.version, n_samples=1 + int(device[1:]),
                                                 weights=value[SPEC.group_slice(sent)].astype(np.float32), group=sent))
        self.now += 1e4
        commits += self._eat(self.core.handle(TimerFired(now=self.now)))
        return groups, commits


def _values(seed: int, devices: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"d{i}": rng.standard_normal(SPEC.size).astype(np.float32) for i in range(devices)}


def _expected_delta(base: np.ndarray, values: dict[str, np.ndarray], sl: slice) -> np.ndarray:
    return pseudo_gradient(base[sl], [(w[sl], 1 + int(d[1:])) for d, w in values.items()])


def test_fedopt_steps_the_head_at_a_partial_version() -> None:
    """The old FedOpt kept only whole-model updates: at every partial version it counted the
    heads 'ignored' and the core committed the unchanged model (T = 2: half the rounds' work
    lost; here version 1's head stayed 0 with ignored 3). With sgd and η = 1 the head is now
    the sample-weighted mean of the heads (FedAvg's), the extractor kept."""
    rig = Rounds("fedopt", 2, select=3)
    values = _values(0)
    groups, (commit,) = rig.round(values)
    assert groups == ["classifier"] * 3 and commit.version == 1 and not commit.metadata["full_sync"]
    expected = sum((1 + i) * values[f"d{i}"][HEAD] for i in range(3)) / 6
    np.testing.assert_allclose(commit.weights[HEAD], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(commit.weights[EXT], 0.0)
    assert isinstance(rig.strategy, FedOptStrategy) and rig.strategy.ignored == 0


def test_fedadam_under_lasp_moves_only_the_heads_moments_at_a_partial_version() -> None:
    """FedAdam's m and v are whole-model shaped. At a partial version Δ is the head's: the head's
    moments step and the extractor's stay as they were (neither decayed by a zero Δ nor stepped
    with a part the core drops); a full sync steps every coordinate. The old code stepped nothing
    at a partial version (head unchanged, heads 'ignored')."""
    rig = Rounds("fedadam", 2, select=3)
    strategy = rig.strategy
    assert isinstance(strategy, FedOptStrategy)
    cfg = strategy.config
    step = {"lr": cfg.server_lr, "beta1": cfg.beta1, "beta2": cfg.beta2, "tau": cfg.tau}
    w = np.zeros(SPEC.size, np.float32)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for r, full in enumerate((False, True, False, True)):
        values = _values(r)
        groups, (commit,) = rig.round(values)
        assert groups == ["full" if full else "classifier"] * 3 and commit.metadata["full_sync"] == full
        sl = slice(0, SPEC.size) if full else HEAD
        w_sl, m_sl, v_sl = fedadam_step(w[sl], _expected_delta(w, values, sl), m[sl], v[sl], **step)
        w, m, v = w.copy(), m.copy(), v.copy()
        w[sl], m[sl], v[sl] = w_sl, m_sl, v_sl
        np.testing.assert_array_equal(commit.weights, w)
        assert strategy._m is not None and strategy._v is not None
        np.testing.assert_array_equal(strategy._m, m)
        np.testing.assert_array_equal(strategy._v, v)
    assert strategy.ignored == 0
    assert not np.array_equal(m[HEAD], m[EXT][: HEAD.stop - HEAD.start])  # the lazy step really differs


def test_fedopt_whole_model_rounds_are_as_before() -> None:
    """Without LASP the step is the one the strategy always took (w + η Δ, bit for bit)."""
    rig = Rounds("fedopt", 0, select=3, server_lr=0.5)
    values = _values(7)
    groups, (commit,) = rig.round(values)
    assert groups == ["full"] * 3
    base = np.zeros(SPEC.size, np.float32)
    delta = pseudo_gradient(base, [(w, 1 + int(d[1:])) for d, w in values.items()])
    np.testing.assert_array_equal(commit.weights, (base + np.float32(0.5) * delta).astype(np.float32))


@pytest.mark.parametrize("t", [2, 5])
def test_fedasync_with_lasp_is_refused_at_configuration(t: int) -> None:
    """FedAsync makes a version of every update, so an update seldom lands on the version its
    device was told to train for (a probe, 10 devices of random speed, T = 5, 400 updates taken:
    3 of 80 full syncs moved the extractor, 697 updates refused base_rejected). Refused where a
    driver builds it (make_method) and where every driver meets it (the core); T = 0 and 1 run."""
    with pytest.raises(ConfigError, match=r"fedasync.*LASP"):
        make_method("fedasync", full_sync_every=t)
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=t)
    with pytest.raises(ConfigError, match=r"fedasync.*LASP"):
        CoordinatorCore(cfg, make_strategy("fedasync"), toy_snapshot(), rng=random.Random(0))
    for ok in (0, 1):
        make_method("fedasync", full_sync_every=ok)
    assert "fedasync" in NO_LASP and "spin" not in NO_LASP


@pytest.mark.parametrize("combine", ["models", "deltas"])
def test_krum_at_a_partial_version_chooses_among_the_heads(combine: str) -> None:
    """Krum's distances are taken over what the version applies. Five whole models reach partial
    version 1 (accepted: trained from the current extractor; a device may send the whole model
    when told to train the head): over the whole vectors Krum picks the row with head 5.0 (its
    extractor agrees with two others), over the heads the cluster at 5.1 wins. Folded whole on
    arrival, the core hands over the heads and commits 5.1, the extractor kept."""
    rig = Rounds("spin", 2, k=5, timeout_s=None, combiner="krum", krum_f=1, combine=combine,
                 clip_multiplier=0.0, sample_weight_cap=0.0)
    rows = {}
    for i, (ext, head) in enumerate(((0.0, 1.0), (0.0, 5.0), (0.0, 9.0), (50.0, 5.1), (50.0, 5.2))):
        w = np.empty(SPEC.size, np.float32)
        w[EXT], w[HEAD] = ext, head
        rows[f"d{i}"] = w
    groups, (commit,) = rig.round(rows, whole=True)
    assert groups == ["classifier"] * 5 and commit.version == 1 and not commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights[EXT], 0.0)
    np.testing.assert_allclose(commit.weights[HEAD], 5.1, rtol=1e-6)
    strategy = make_strategy("spin", k=5, timeout_s=None, combiner="krum", krum_f=1, combine=combine,
                             clip_multiplier=0.0, sample_weight_cap=0.0)
    from coordinator.strategies.base import BufferedUpdate, StaticView

    view = StaticView(spec=SPEC, version=0, weights=np.zeros(SPEC.size, np.float32))
    whole = [BufferedUpdate(device=d, seq=1, base_version=0, staleness=0, n_samples=1, weights=w) for d, w in rows.items()]
    np.testing.assert_allclose(strategy.aggregate(view, whole)[HEAD], 5.0, rtol=1e-6)  # what the whole rows choose


@pytest.mark.parametrize("combiner", ["mean", "median", "krum"])
def test_deltas_equal_models_on_a_buffer_mixing_whole_and_head_only_updates(combiner: str) -> None:
    """aggregate.fedavg_deltas: "equal to fedavg when every update starts from the current version
    and η = 1". With whole and head-only updates in one buffer (the core no longer hands a strategy
    one: a full sync with whole models leaves heads out) deltas added both groups' mean changes to
    the head: the head stepped twice. Now a group's slice-only updates give that slice in both
    rules (models' overwrite), the fold and the reference alike."""
    from coordinator.strategies.aggregate import fedavg, fedavg_deltas
    from coordinator.strategies.base import BufferedUpdate, StaticView

    rng = np.random.default_rng(7)
    current = rng.standard_normal(SPEC.size).astype(np.float32)
    view = StaticView(spec=SPEC, version=3, weights=current)

    def update(device: str, n: int, group: str) -> BufferedUpdate:
        size = SPEC.size if group == "full" else SPEC.group_size(group)
        w = (current[SPEC.group_slice(group)] + rng.standard_normal(size)).astype(np.float32)
        return BufferedUpdate(device=device, seq=1, base_version=3, staleness=0, n_samples=n, weights=w, group=group)

    updates = [update("a", 1, "full"), update("h", 2, "classifier"), update("b", 3, "full")]
    out = {}
    for combine in ("models", "deltas"):
        s = make_strategy("spin", combine=combine, combiner=combiner, clip_multiplier=0.0, sample_weight_cap=0.0)
        for u in updates:
            s.on_update(view, u, 0.0)
        out[combine] = s.aggregate(view, updates)
    head = updates[1].weights  # the one head-only update: its slice, in every combiner
    np.testing.assert_allclose(out["models"][HEAD], head, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["deltas"][HEAD], head, rtol=0, atol=1e-6)  # old: head + the whole models' change
    np.testing.assert_allclose(out["deltas"], out["models"], rtol=0, atol=1e-5)
    if combiner == "mean":
        reference = fedavg(current, updates, SPEC)
        np.testing.assert_allclose(out["models"], reference, rtol=0, atol=1e-6)
        np.testing.assert_allclose(fedavg_deltas(current, updates, SPEC, view.weights_at), reference, rtol=0, atol=1e-6)


def test_a_whole_model_at_a_partial_version_is_clipped_and_counted_by_its_head() -> None:
    """At a partial version only a whole model's head is applied, but the fold on arrival measured
    the whole change: a huge extractor change with an ordinary head was counted ``clipped`` and its
    norm went into the whole models' window (the median later updates are clipped against), while
    the head went in unclipped. The hooks now see the head at a partial version: counts and windows
    describe what is applied. (A huge head is still clipped: the second half.)"""
    from tests.test_coordinator_core import upd

    strategy = make_strategy("spin", k=1, timeout_s=None, min_known=2, clip_multiplier=3.0, sample_weight_cap=0.0)
    core = CoordinatorCore(CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=3),
                           strategy, toy_snapshot(), rng=random.Random(0))

    def send(device: str, seq: int, ext_step: float, head_step: float) -> CommitVersion:
        w = core.weights.copy()
        w[EXT] += ext_step
        w[HEAD] += head_step
        (commit,) = [a for a in core.handle(upd(device, seq, weights=w, base=core.version)) if isinstance(a, CommitVersion)]
        return commit

    for seq in range(1, 7):  # versions 1-6: whole models with ordinary steps (3 and 6 are full syncs)
        send(f"d{seq % 3}", seq, 0.1, 0.1)
    assert core.version == 6 and not core.next_version_is_full()
    before = core.weights.copy()
    commit = send("x", 1, 1000.0, 0.1)
    assert commit.version == 7 and not commit.metadata["full_sync"]
    np.testing.assert_allclose(commit.weights[HEAD] - before[HEAD], 0.1, rtol=1e-5)  # the head, unclipped
    np.testing.assert_array_equal(commit.weights[EXT], before[EXT])
    robust = strategy.describe()["robust"]["counts"]
    norms = strategy.checkpoint()["robust"]["norms"]
    assert robust.get("clipped", 0) == 0  # old: 1
    assert [d for d, _, _ in norms["full"]] == ["d0", "d0"]  # the full syncs' (3, 6); old: every whole model's, x's 2449 too
    assert ["x", 1] in [row[:2] for row in norms["classifier"]]
    commit = send("y", 1, 0.1, 1000.0)  # version 8, partial: a huge head is clipped, and counted
    assert np.all(commit.weights[HEAD] - before[HEAD] < 2.0)
    assert strategy.describe()["robust"]["counts"]["clipped"] == 1
