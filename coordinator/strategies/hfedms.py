"""HFedMS-S (002, §III-B/C): sequential-to-parallel training (STP) over inter-cluster groups (ICG).

**ICG** (Algorithm 3). Every ``regroup_every`` = T rounds the waiting devices are put into
M = f(r) groups, f the paper's growth function at r = kT (k = 1, 2, … the regroup index):

    log     f = β ⌊α ln(r/T) + 1⌋        (the paper's choice, α = 2, β = 10)
    linear  f = β ⌊α (r/T − 1) + 1⌋
    exp     f = β ⌊(1 + α)^(r/T − 1)⌋

capped at the number of devices. The devices are clustered into L = ⌊K/M⌋ clusters of
(near-)equal size by their label mix — balanced k-means (greedy capacity-constrained
assignment; the paper solves the same assignment as a min-cost flow) — and each group takes
one device from every cluster (leftovers round-robin), then is shuffled. κ·M of the groups
(at least one) are drawn to train for the next T rounds.

*What the strategy knows of a device's label mix*: devices report no label counts, and the
brief keeps them unchanged, so the mix is estimated from what every device already sends,
its update: the change of the classifier's bias, Δb_c ∝ Σ_i (y_ic − p_ic) for softmax
cross-entropy, is positive for the classes the device holds more of than the model
predicts. Each device's latest Δb (unit norm) is its clustering vector; a device that has
not reported yet clusters as the zero vector (groups are then random, as at the very first
regroup). Never raw data.

**STP** (Algorithm 2). Inside a group the model travels: the first device trains the round's
global model, the next continues from its result, …; the last device's model is the group's
result; the round's model is the sample-weighted mean of the group results (``weighted =
false``: the paper's plain 1/(κM) mean). The coordinator core serves exactly one training line
(the current version) to every pull, and devices stay unchanged, so the chain is carried by
the training line itself: each chain step is committed as a version (the next device of the
chain is invited only once its predecessor's update is in, and is served that version), and
at a chain's end the line is reset to the round's start model for the next group. Groups
therefore run one after another, not side by side — the model sequence (and so accuracy per
round, the paper's metric) is exactly STP's, but virtual time is the serial sum of every
step. ``describe()`` reports both that serial time and the time the same steps would take
with the groups in parallel (per round, the longest chain). Versions between round ends are
intermediate chain models; ``describe()["round_versions"]`` lists the round-end versions
(the newest :data:`ROUNDS_LISTED`, as ``groups_per_round`` does: ``describe()`` is part of the
retained status every device reads). Only those are candidates (:meth:`HFedMSStrategy.candidate`):
what a gate judges, and what the emulator scores (the paper's global model is the round's; a chain
step only goes on to the chain's next device). Without a gate the core still makes every commit
the release, chain steps included (helper-172 proposed the core's check). A rollback or an operator's pin while a round is open
restarts that round, same groups, from the restored model (:meth:`HFedMSStrategy.on_line_replaced`).

**Liveness** (helper-167). A chain waits for one device at a time; a step that does not come back
stalled it for ever. The invited device back in the waiting set without its update accepted (the
core refused it: a seq jump, the sample cap, a wrong shape, NaN; or its invitation was lost) is
invited again ``step_retries`` times; a step refused again, or not in within ``step_timeout_s``
(default: 10 × the longest step seen, at least :data:`STEP_TIMEOUT_FLOOR_S`; the next device not
waiting counts too), goes to another waiting device. Counted in ``describe()`` (``reinvited``,
``timed_out``, ``reassigned``); the late update of a step given away is consumed, not applied.
**Restarts**: the open round (its groups, position, start model and group results) is in the
checkpoint each commit carries, so a restarted coordinator resumes it from the line it left.

``population`` gates each regroup until that many devices, and all devices seen, wait (as
``fedopt``'s); ``rounds`` stops after R
rounds (the paper reports accuracy after R = 500 rounds).
"""

from __future__ import annotations

import base64
import binascii
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan, Strategy
from coordinator.strategies.draws import Draws
from edge_sdk.errors import ConfigError
from edge_sdk.spec import FULL, ModelSpec, Vector

__all__ = ["HFedMSConfig", "HFedMSStrategy", "group_count", "head_signal", "inter_cluster_groups"]

GROWTH = ("log", "linear", "exp")
GROUPING = ("icg", "random")
ROUNDS_LISTED = 64
STEP_TIMEOUT_FLOOR_S = 300.0
"""The least a chain step is waited for when ``step_timeout_s`` is not set (and no step was seen)."""
STEP_TIMEOUT_FACTOR = 10.0
"""Without ``step_timeout_s``: a step is waited for this many times the longest step seen."""
"""Rounds whose end version and group count ``describe()`` lists (the newest): at ~9 B a round,
10,000 rounds made a 90 KB status, past the 64 KiB a device reads (``MAX_STATUS_BYTES``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HFedMSConfig:
    alpha: float = 2.0
    beta: int = 10
    growth: str = "log"
    regroup_every: int = 1
    """T. HFedMS-S (STP + ICG, no SCC/LASP) regroups every round (the paper: "HFedMS-D with
    T = 1 is actually HFedMS-S")."""
    kappa: float = 0.3
    """Share of the groups drawn to train."""
    grouping: str = "icg"
    """``icg`` (clusters by label mix) or ``random`` (the ablation: random groups)."""
    weighted: bool = True
    """Average group results by their samples (False: plain mean, Algorithm 2 line 19)."""
    population: int | None = None
    """Regroup only when this many devices wait (None: whoever waits, at least one)."""
    rounds: int | None = None
    cluster_iters: int = 10
    head_group: str = "classifier"
    """The layer group whose 1-D parameter (the bias) gives the label-mix signal."""
    step_timeout_s: float | None = None
    """How long a chain step (its device's invitation, or the next device's pull) is waited for
    before it goes to another device. None: 10 × the longest step seen, at least 300 s."""
    step_retries: int = 1
    """Times a step whose device came back without its update (refused, invitation lost) is
    invited again before it goes to another device."""

    def __post_init__(self) -> None:
        if self.growth not in GROWTH:
            raise ConfigError(f"growth must be one of {GROWTH}, got {self.growth!r}")
        if self.grouping not in GROUPING:
            raise ConfigError(f"grouping must be one of {GROUPING}, got {self.grouping!r}")
        if not self.alpha >= 0 or self.beta < 1 or self.regroup_every < 1 or not 0 < self.kappa <= 1:
            raise ConfigError("need alpha >= 0, beta >= 1, regroup_every >= 1 and 0 < kappa <= 1")
        if self.population is not None and self.population < 1:
            raise ConfigError("population must be >= 1 (or None)")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError("rounds must be >= 1 (or None)")
        if self.cluster_iters < 1:
            raise ConfigError("cluster_iters must be >= 1")
        if self.step_timeout_s is not None and not 0 < self.step_timeout_s < math.inf:
            raise ConfigError("step_timeout_s must be > 0 and finite (or None)")
        if self.step_retries < 0:
            raise ConfigError("step_retries must be >= 0")


def group_count(regroup_index: int, *, alpha: float, beta: int, growth: str = "log", devices: int | None = None) -> int:
    """M = f(r) at the ``regroup_index``-th regroup (r/T = index, 1-based), in [1, devices]."""
    if regroup_index < 1:
        raise ConfigError("regroup_index is 1-based")
    x = float(regroup_index)
    if growth == "log":
        m = beta * math.floor(alpha * math.log(x) + 1.0)
    elif growth == "linear":
        m = beta * math.floor(alpha * (x - 1.0) + 1.0)
    elif growth == "exp":
        m = beta * math.floor((1.0 + alpha) ** min(x - 1.0, 60.0))
    else:
        raise ConfigError(f"growth must be one of {GROWTH}, got {growth!r}")
    m = max(1, m)
    return min(m, devices) if devices is not None else m


def head_signal(spec: ModelSpec, head_group: str, before: Vector, after: Vector) -> npt.NDArray[np.float64] | None:
    """The unit-norm change of ``head_group``'s 1-D parameter (the classifier bias), or None
    when the model has no such parameter or nothing changed."""
    bias = [p for p in spec.params if p.group == head_group and len(p.shape) == 1]
    if not bias:
        return None
    p = bias[-1]
    sl = slice(p.offset, p.offset + p.size)
    d = np.asarray(after[sl], dtype=np.float64) - np.asarray(before[sl], dtype=np.float64)
    norm = float(np.linalg.norm(d))
    if not math.isfinite(norm) or norm == 0.0:
        return None
    return d / norm


def _balanced_assign(x: npt.NDArray[np.float64], centroids: npt.NDArray[np.float64], sizes: Sequence[int]) -> list[int]:
    """Each point to a cluster, cluster c taking exactly ``sizes[c]`` points: greedy over
    (distance, point, cluster) ascending."""
    d = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    order = np.lexsort((np.arange(d.size) % d.shape[1], np.arange(d.size) // d.shape[1], d.ravel()))
    room = list(sizes)
    out = [-1] * x.shape[0]
    left = x.shape[0]
    for flat in order:
        i, c = divmod(int(flat), d.shape[1])
        if out[i] < 0 and room[c] > 0:
            out[i] = c
            room[c] -= 1
            left -= 1
            if not left:
                break
    return out


def inter_cluster_groups(
    devices: Sequence[str], features: Mapping[str, npt.NDArray[np.float64]], m: int, rng: random.Random, *, iters: int = 10
) -> list[list[str]]:
    """ICG: ``m`` groups of ``devices``, each one device from every label-mix cluster.

    L = ⌊K/m⌋ clusters of sizes ⌊K/L⌋ or ⌈K/L⌉ (≥ m each) by balanced k-means on ``features``
    (missing → zeros); group j takes member j of every cluster, leftovers round-robin; every
    group is shuffled. Group sizes differ by at most one."""
    devs = list(devices)
    rng.shuffle(devs)
    k = len(devs)
    if k == 0:
        return []
    m = max(1, min(m, k))
    n_clusters = max(1, k // m)
    dim = max((len(v) for v in features.values()), default=1)
    x = np.zeros((k, dim), dtype=np.float64)
    for i, d in enumerate(devs):
        v = features.get(d)
        if v is not None and len(v) == dim:
            x[i] = v
    sizes = [k // n_clusters + (1 if c < k % n_clusters else 0) for c in range(n_clusters)]
    centroids = x[rng.sample(range(k), n_clusters)].copy()
    assign = _balanced_assign(x, centroids, sizes)
    for _ in range(iters):
        for c in range(n_clusters):
            idx = [i for i, a in enumerate(assign) if a == c]
            centroids[c] = x[idx].mean(axis=0) if idx else centroids[c]
        new = _balanced_assign(x, centroids, sizes)
        if new == assign:
            break
        assign = new
    clusters = [[devs[i] for i, a in enumerate(assign) if a == c] for c in range(n_clusters)]
    groups: list[list[str]] = [[] for _ in range(m)]
    spill = 0
    for members in clusters:
        rng.shuffle(members)
        for j, d in enumerate(members):
            if j < m:
                groups[j].append(d)
            else:
                groups[spill % m].append(d)
                spill += 1
    for g in groups:
        rng.shuffle(g)
    return groups


class HFedMSStrategy(Strategy):
    """STP over ICG groups, serialised on the core's training line. See the module docstring."""

    name: ClassVar[str] = "hfedms"

    def __init__(self, config: HFedMSConfig | None = None) -> None:
        self.config = config or HFedMSConfig()
        self.round = 0
        """Completed rounds."""
        self.regroups = 0
        self.groups: list[list[str]] = []
        self.selected: list[list[str]] = []
        """The drawn groups (chains) of this regroup period."""
        self.features: dict[str, npt.NDArray[np.float64]] = {}
        self.in_round = False
        self._chain = 0
        self._pos = 0
        self._chain_samples = 0
        self._start: Vector | None = None
        self._results: list[tuple[Vector, int]] = []
        self.expecting: str | None = None
        self._invited_at = 0.0
        self._invite_version = -1
        self._chain_s = 0.0
        self._round_parallel_s = 0.0
        self.serial_s = 0.0
        """Virtual seconds of every chain step, end to end (how this strategy runs)."""
        self.parallel_s = 0.0
        """The same steps with the groups in parallel: Σ over rounds of the longest chain."""
        self.round_versions: list[int] = []
        """The newest :data:`ROUNDS_LISTED` round-end versions."""
        self._round_ended = False
        self.group_sizes: list[int] = []
        """Groups per round (M), for the growth curve: the newest :data:`ROUNDS_LISTED` rounds."""
        self.chain_breaks = 0
        """Chain steps whose update was not built on the version served for it (must stay 0)."""
        self.ignored = 0
        self.partial_steps = 0
        """Chain steps taken from one group's slice (put onto the served model); see aggregate."""
        self.restarts = 0
        """Rounds restarted from a restored model (a rollback or an operator's pin): see on_line_replaced."""
        self._reinvite = False
        """The step in flight was invited before the line was replaced: invite its device again if it
        comes back uninvited (its update, trained from the replaced line, was refused)."""
        self._due_at: float | None = None
        """When the next step's device (not yet invited) became due: a timeout counts from here."""
        self._retried = 0
        self._failed: str | None = None
        """The device whose step failed (counted): the step waits for another device to take it."""
        self._longest_step = 0.0
        self.reinvited = 0
        """Steps invited again: their device came back without its update (refused, invitation lost)."""
        self.timed_out = 0
        """Steps not in within the step timeout (the invited device's update, or the next device's pull)."""
        self.reassigned = 0
        """Steps given to another device (after a timeout, or refused again)."""
        self.restore_refused = 0
        """Parts of the checkpoint that did not fit (not resumed): the open round, the draws' state, a signal."""
        self.draws = Draws()
        """The generator the groups are drawn from, kept with each commit (helper-175: a restart drew
        its next groups from ``random.Random(seed)`` again, as the run's first regroup)."""
        self._open: dict[str, Any] | None = None
        """A round state restored from the checkpoint, resumed at the first plan (which knows the spec)."""
        self._start_b64 = ""
        self._results_b64: list[list[Any]] = []
        self._step_invited_at: float | None = None
        """When the step due was invited, if right at the last commit (see on_aggregated)."""

    # ------------------------------------------------------------------ hooks

    def devices_per_round(self) -> tuple[int, str] | None:
        return (self.config.population, "population") if self.config.population is not None else None

    def serve_pull(self, view: CoordinatorView, device: str, now: float) -> bool:
        return False  # only an invitation serves: the chain decides who trains on what

    def selects(self) -> bool:
        return True

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        if update.device == self.expecting:
            if update.base_version != self._invite_version:
                self.chain_breaks += 1
            self._count_step(max(0.0, now - self._invited_at))

    def _count_step(self, step: float) -> None:
        self._chain_s += step
        self.serial_s += step
        self._longest_step = max(self._longest_step, step)

    def done(self) -> bool:
        return self.config.rounds is not None and self.round >= self.config.rounds and not self.in_round

    def step_timeout(self) -> float:
        """Seconds a chain step is waited for: ``step_timeout_s``, else 10 × the longest seen (≥ 300)."""
        t = self.config.step_timeout_s
        return t if t is not None else max(STEP_TIMEOUT_FLOOR_S, STEP_TIMEOUT_FACTOR * self._longest_step)

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        rng = self.draws.rng(rng)
        if self._open is not None:
            self._resume(view)
        buffer = view.buffer
        if (buffer and self.expecting is None and not self.in_round and not self.done()
                and any(u.base_version == view.version for u in buffer)):
            # Trained from the line with no round open: accepted before a restart, in a round drawn
            # after the last commit (not in its checkpoint). That round is drawn again, from the same
            # draws and signals (restored) and the same devices: under ``population`` every device seen
            # was waiting at the draw, so it is drawn at once from them (waiting for them to pull
            # again delayed every later step, and the samples they trained on); else from those
            # waiting now. The update is then its step if it is due. Consumed unapplied at once, as
            # before, the step's work was lost and the next version differed from the run's (helper-175).
            waiting = dict.fromkeys(view.devices_seen, now) if self.config.population is not None else view.deferred
            if not self._start_round(view, waiting, rng):
                return Plan()  # not enough devices wait yet: the update waits with them
        if buffer and self.expecting is None and self.in_round:
            # An update of the step due, accepted before a restart (persisted, replayed) and
            # trained from the line: the step, not a stranger's.
            due = self.selected[self._chain][self._pos]
            replayed = [u for u in buffer if u.device == due and u.base_version == view.version]
            if replayed:
                self.expecting, self._invite_version, self._invited_at = due, view.version, now
                if self._step_invited_at is not None:  # its invitation's time is known: the step counted as it ran
                    self._count_step(max(0.0, max(u.arrived_at for u in replayed) - self._step_invited_at))
                    self._step_invited_at = None
        if buffer and (self.expecting is None or any(u.device == self.expecting for u in buffer)):
            return Plan(aggregate=True)
        deferred = view.deferred
        if self.expecting is not None and self._reinvite and self.expecting in deferred:
            self._invited_at = now  # served the replaced line, refused (base_rejected), pulled again
            self._invite_version = view.version
            self._reinvite = False
            return Plan(invite=(self.expecting,))
        if self.expecting is not None:
            return self._waiting(view, now)
        if self._failed is not None:
            return self._give_away(view, now)  # nobody waited when it failed: whoever pulled takes it
        if self.done():
            return Plan()
        if not self.in_round and not self._start_round(view, deferred, rng):
            return Plan()
        device = self.selected[self._chain][self._pos]
        if device not in deferred:
            # Its pull (after its previous update's ack) is on the way; a device gone before its turn
            # holds the chain up to the step timeout, then the step goes to another.
            if self._due_at is None:
                self._due_at = now
            deadline = self._due_at + self.step_timeout()
            if now < deadline:
                return Plan(wake_at=deadline)
            self._failed = device
            self.timed_out += 1
            return self._give_away(view, now)
        return self._invite(view, now, device)

    def _invite(self, view: CoordinatorView, now: float, device: str) -> Plan:
        self._step_invited_at = None
        self.expecting = device
        self._invited_at = now
        self._invite_version = view.version
        self._due_at = None
        return Plan(invite=(device,))

    def _waiting(self, view: CoordinatorView, now: float) -> Plan:
        """The invited device's update is not in: it came back without it (invite it again, or give
        the step away), its time is up (give it away), or wait, at most until the timeout."""
        device = self.expecting
        assert device is not None
        if device in view.deferred:
            # Its update was refused (or its invitation lost): it pulled again, uninvited.
            if self._retried < self.config.step_retries:
                self._retried += 1
                self.reinvited += 1
                return self._invite(view, now, device)
        else:
            deadline = self._invited_at + self.step_timeout()
            if now < deadline:
                return Plan(wake_at=deadline)
            self.timed_out += 1
        self._failed = device
        return self._give_away(view, now)

    def _give_away(self, view: CoordinatorView, now: float) -> Plan:
        """The failed step to another waiting device: one with no step left in this round first,
        else any other; the failed device itself only when nobody else waits. Nobody: the next pull
        plans again. An update the failed device still sends is consumed, not applied (``ignored``)."""
        failed = self._failed
        deferred = view.deferred
        later = {d for chain in self.selected[self._chain:] for d in chain}
        others = sorted(d for d in deferred if d != failed)
        pick = [d for d in others if d not in later] or others or ([failed] if failed is not None and failed in deferred else [])
        if not pick:
            self.expecting = None  # nobody waits: whoever pulls first (a pull plans again) takes it
            return Plan()
        self.reassigned += 1
        self._failed = None
        self._retried = 0
        return self._invite(view, now, pick[0])

    def _start_round(self, view: CoordinatorView, deferred: Mapping[str, float], rng: random.Random) -> bool:
        cfg = self.config
        if self.round % cfg.regroup_every == 0 or not self.selected:
            need = cfg.population if cfg.population is not None else 1
            if len(deferred) < need or (cfg.population is not None and len(deferred) < len(view.devices_seen)):
                return False
            self.regroups += 1
            waiting = sorted(deferred)
            m = group_count(self.regroups, alpha=cfg.alpha, beta=cfg.beta, growth=cfg.growth, devices=len(waiting))
            feats = self.features if cfg.grouping == "icg" else {}
            self.groups = [g for g in inter_cluster_groups(waiting, feats, m, rng, iters=cfg.cluster_iters) if g]
            n_sel = max(1, min(len(self.groups), round(cfg.kappa * len(self.groups))))
            self.selected = [self.groups[i] for i in sorted(rng.sample(range(len(self.groups)), n_sel))]
        _append_newest(self.group_sizes, len(self.groups))
        self.in_round = True
        self._chain = 0
        self._pos = 0
        self._chain_samples = 0
        self._chain_s = 0.0
        self._round_parallel_s = 0.0
        self._results = []
        self._results_b64 = []
        self._set_start(view.weights)
        self._due_at = None
        return True

    def _set_start(self, weights: Vector) -> None:
        self._start = np.array(weights, dtype=np.float32, copy=True)
        self._start_b64 = _encode(self._start)

    # ------------------------------------------------------------------ the chain

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        current = np.array(view.weights, dtype=np.float32, copy=True)
        mine = [u for u in updates if u.device == self.expecting]
        self.ignored += len(updates) - len(mine)
        if not mine or self._start is None:
            return current  # nothing of the chain arrived: the line stays where it is
        u = max(mine, key=lambda b: b.seq)
        # The step's model. A group's slice (a device that trained only its head: one still told to
        # under LASP before a restart, or a misbehaving one) goes onto the model served for the step
        # (the current version: the chain does not move while it waits). Ignoring it, as before,
        # committed the unchanged model and left the chain waiting for ever on a device whose update
        # was consumed (no other device invited). LASP itself is refused with this strategy
        # (coordinator.methods.check_lasp): its partial versions would break the chain's resets.
        if u.group == FULL:
            trained = np.array(u.weights, dtype=np.float32, copy=True)
        else:
            trained = current.copy()
            trained[view.spec.group_slice(u.group)] = u.weights
            self.partial_steps += 1
        base = view.weights_at(u.base_version)
        sig = head_signal(view.spec, self.config.head_group, current if base is None else base, trained)
        if sig is not None:
            self.features[u.device] = sig
        self.expecting = None
        self._reinvite = False
        self._retried = 0
        self._failed = None
        self._due_at = None
        self._chain_samples += max(int(u.n_samples), 0)
        self._pos += 1
        chain = self.selected[self._chain]
        if self._pos < len(chain):
            return trained  # the next device continues from here
        self._results.append((trained, self._chain_samples))
        self._results_b64.append([_encode(trained), self._chain_samples])
        self._round_parallel_s = max(self._round_parallel_s, self._chain_s)
        self._chain += 1
        self._pos = 0
        self._chain_samples = 0
        self._chain_s = 0.0
        if self._chain < len(self.selected):
            return self._start.copy()  # the next group starts from the round's model
        self.in_round = False
        self.round += 1
        self.parallel_s += self._round_parallel_s
        self._round_ended = True  # its version is numbered by the commit (on_aggregated)
        return _mean(self._results, weighted=self.config.weighted)

    def on_aggregated(self, view: CoordinatorView, now: float) -> None:
        """Record the round-end version as committed: not ``version + 1`` at aggregation, which
        a restart past versions the registry could not read numbers above."""
        if self._round_ended:
            self._round_ended = False
            _append_newest(self.round_versions, view.version)
        # The step due is invited right after this commit (this event's plan) if its device waits:
        # kept with the round, so an update it sends before a restart that loses its commit is timed
        # from there when replayed (its step's time was lost from serial_s: helper-175).
        due = self.selected[self._chain][self._pos] if self.in_round and self.expecting is None else None
        self._step_invited_at = now if due is not None and due in view.deferred and not self.done() else None

    def candidate(self, view: CoordinatorView) -> bool:
        """Only a round's model: a chain step is one device's continuation of another's (on
        Dirichlet(0.1) shards, one or two classes' worth), and a chain's end puts back the round's
        start, a copy of a version already judged. Neither is a model to release, and a rejected
        step only restarts the round (helper-166)."""
        return bool(self.round_versions) and self.round_versions[-1] == view.version

    def on_line_replaced(self, view: CoordinatorView, now: float, *, restored: int) -> None:
        """An open round starts again from the restored model, with the same groups: its start
        model and the group results it had collected go (either may hold the replaced line's
        model), and so does the chain's position. helper-166: kept, the chain's end reset the line
        to the round's start (a rejected round-end model of 26.5s came back as the next version
        after a rollback to 0s) and the round's mean took the rejected line's group results (15.25s
        where the honest chains made 2s). The device invited for the step in flight: the first
        step's stays invited (if it was already served the replaced line its update is refused,
        ``base_rejected``, and it is invited again when it pulls; before, the chain waited for it
        for ever); another's update, if it comes, is ignored (counted). Rounds and regroups counted
        stay (``round`` numbers the completed ones)."""
        if not self.in_round or not self.selected:
            return  # between rounds: the next one starts from the line, the restored model
        self.restarts += 1
        self._step_invited_at = None  # (the step due is invited again from the restored line, if at all)
        self._set_start(view.weights)
        self._results = []
        self._results_b64 = []
        self._retried, self._failed, self._due_at = 0, None, None
        self._chain = self._pos = self._chain_samples = 0
        self._chain_s = self._round_parallel_s = 0.0
        if self.expecting is not None and self.expecting == self.selected[0][0]:
            self._invite_version = view.version  # an unused invitation is served the restored version
            self._reinvite = True
        else:
            self.expecting, self._reinvite = None, False

    def checkpoint(self) -> dict[str, Any]:
        """Rounds and regroups; while a round is open, the round too (its groups, the chain's
        position, the start model and the group results, float32 in base64): the line a restart
        resumes from is the version this checkpoint is committed with, the chain's model there.
        helper-175: also what steers the next rounds and what ``describe()`` reports, each only once
        it is set (a checkpoint from before is restored as it was): the draws' generator, the
        devices' label-mix signals (float64 in base64: ICG clusters on them), the longest step (the
        default step timeout), the serial and parallel times, the round lists and the counters."""
        state: dict[str, Any] = {"round": self.round, "regroups": self.regroups}
        due = self.selected[self._chain][self._pos] if self.in_round and self.selected else None
        # When the step due was invited: in flight (its device invited, its update not in), or right at this commit.
        invited_at = self._invited_at if self.expecting is not None and self.expecting == due else self._step_invited_at
        if self.in_round and self._start is not None:
            state["open"] = {
                "selected": [list(chain) for chain in self.selected], "chain": self._chain,
                "pos": self._pos, "chain_samples": self._chain_samples, "start": self._start_b64,
                "results": [list(r) for r in self._results_b64], "chain_s": self._chain_s,
                "round_parallel_s": self._round_parallel_s,
                **({"invited_at": invited_at} if invited_at is not None else {}),
            }
        if self.config.regroup_every > 1 and self.selected:  # the period's groups train T rounds
            state["period"] = {"groups": [list(g) for g in self.groups], "selected": [list(c) for c in self.selected]}
        draws = self.draws.checkpoint()
        if draws is not None:
            state["draws"] = draws
        if self.features:
            state["features"] = {d: _encode64(v) for d, v in sorted(self.features.items())}
        times = {"serial_s": self.serial_s, "parallel_s": self.parallel_s, "longest_step_s": self._longest_step}
        state.update({k: v for k, v in times.items() if v})
        if self.round_versions:
            state["round_versions"] = list(self.round_versions)
        if self.group_sizes:
            state["groups_per_round"] = list(self.group_sizes)
        counts = {k: getattr(self, k) for k in _COUNTED}
        if any(counts.values()):
            state["counts"] = {k: v for k, v in counts.items() if v}
        return state

    def restore_state(self, state: Mapping[str, Any]) -> None:
        for key in ("round", "regroups"):
            v = state.get(key)
            if isinstance(v, int) and v >= 0:
                setattr(self, key, v)
        counts = state.get("counts", {})
        counts_ok = isinstance(counts, Mapping) and all(type(counts.get(k, 0)) is int and counts.get(k, 0) >= 0 for k in _COUNTED)
        if counts_ok:
            assert isinstance(counts, Mapping)
            for key in _COUNTED:
                setattr(self, key, counts.get(key, 0))
        for key, attr in (("serial_s", "serial_s"), ("parallel_s", "parallel_s"), ("longest_step_s", "_longest_step")):
            v = state.get(key, 0.0)
            if type(v) in (int, float) and 0 <= v < math.inf:
                setattr(self, attr, float(v))
            else:
                self.restore_refused += 1
        if not counts_ok:
            self.restore_refused += 1  # (after the counters: the count it restored is not overwritten)
        for key, attr in (("round_versions", "round_versions"), ("groups_per_round", "group_sizes")):
            values = state.get(key, [])
            if _ints(values):
                setattr(self, attr, list(values)[-ROUNDS_LISTED:])
            else:
                self.restore_refused += 1
        if "draws" in state and not self.draws.restore(state["draws"]):
            self.restore_refused += 1  # (drawn from the core's generator, as before)
        features = state.get("features", {})
        if isinstance(features, Mapping):
            for device, text in features.items():
                v = _decode64(text)
                if isinstance(device, str) and v is not None:
                    self.features[device] = v
                else:
                    self.restore_refused += 1
        period = state.get("period")
        if period is not None:
            groups, selected = (period.get(k) for k in ("groups", "selected")) if isinstance(period, Mapping) else (None, None)
            if _chains_ok(groups) and _chains_ok(selected):
                assert isinstance(groups, list) and isinstance(selected, list)
                self.groups, self.selected = [list(g) for g in groups], [list(c) for c in selected]
            else:
                self.restore_refused += 1
        opened = state.get("open")
        if opened is None:
            return
        if _open_round_ok(opened):
            self._open = dict(opened)
        else:
            self.restore_refused += 1

    def _resume(self, view: CoordinatorView) -> None:
        """The restored round, once the spec is known: its vectors must be the model's size."""
        opened, self._open = self._open, None
        assert opened is not None
        start = _decode(opened["start"], view.spec.size)
        results = [(_decode(w, view.spec.size), n) for w, n in opened["results"]]
        if start is None or any(w is None for w, _n in results):
            self.restore_refused += 1
            return
        self.selected = [list(chain) for chain in opened["selected"]]
        if not self.groups:  # (kept with the period when T > 1; else the others are not needed again: a regroup draws anew)
            self.groups = [list(chain) for chain in self.selected]
        self._chain, self._pos, self._chain_samples = opened["chain"], opened["pos"], opened["chain_samples"]
        self._set_start(start)
        self._results = [(w, n) for w, n in results if w is not None]
        self._results_b64 = [list(r) for r in opened["results"]]
        self._chain_s, self._round_parallel_s = float(opened["chain_s"]), float(opened["round_parallel_s"])
        self.in_round, self.expecting, self._due_at = True, None, None
        self._step_invited_at = float(opened["invited_at"]) if "invited_at" in opened else None

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": self.name, "alpha": c.alpha, "beta": c.beta, "growth": c.growth, "regroup_every": c.regroup_every,
            "kappa": c.kappa, "grouping": c.grouping, "weighted": c.weighted, "population": c.population,
            "rounds": c.rounds, "round": self.round, "regroups": self.regroups, "groups_per_round": list(self.group_sizes),
            "round_versions": list(self.round_versions), "serial_s": self.serial_s, "parallel_s": self.parallel_s,
            "chain_breaks": self.chain_breaks, "ignored": self.ignored, "devices_with_signal": len(self.features),
            **({"partial_steps": self.partial_steps} if self.partial_steps else {}),  # (published outputs as they were)
            **({"restarts": self.restarts} if self.restarts else {}),
            **{k: v for k, v in (("reinvited", self.reinvited), ("timed_out", self.timed_out), ("reassigned", self.reassigned),
                                 ("restore_refused", self.restore_refused)) if v},
            **({"step_timeout_s": c.step_timeout_s} if c.step_timeout_s is not None else {}),
        }


_COUNTED = ("chain_breaks", "ignored", "partial_steps", "restarts", "reinvited", "timed_out", "reassigned", "restore_refused")
"""Counters ``describe()`` reports, kept in the checkpoint (only those not 0)."""
SIGNAL_MAX = 4096
"""The longest label-mix signal a checkpoint may restore (a classifier's bias: one value per class)."""


def _encode64(v: npt.NDArray[np.float64]) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f8").tobytes()).decode("ascii")


def _decode64(text: object) -> npt.NDArray[np.float64] | None:
    """A checkpointed label-mix signal: finite float64s, at most :data:`SIGNAL_MAX`, or None."""
    if not isinstance(text, str) or not 0 < len(text) <= 4 * ((8 * SIGNAL_MAX + 2) // 3):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw or len(raw) % 8:
        return None
    v = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    return v if bool(np.all(np.isfinite(v))) else None


def _ints(values: object) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def _encode(w: Vector) -> str:
    return base64.b64encode(np.asarray(w, dtype="<f4").tobytes()).decode("ascii")


def _decode(text: object, size: int) -> Vector | None:
    """A checkpointed vector of ``size`` finite float32s, or None."""
    if not isinstance(text, str) or len(text) != 4 * ((4 * size + 2) // 3):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 4 * size:
        return None
    w = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return w if bool(np.all(np.isfinite(w))) else None


def _chains_ok(chains: object) -> bool:
    """Whether a checkpointed list of groups is one: non-empty lists of device ids."""
    return isinstance(chains, list) and bool(chains) and all(
        isinstance(c, list) and c and all(isinstance(d, str) for d in c) for c in chains)


def _open_round_ok(opened: object) -> bool:
    """Whether a checkpointed round is well formed (its vectors are checked against the spec later)."""
    if not isinstance(opened, Mapping):
        return False
    sel, chain, pos, n = opened.get("selected"), opened.get("chain"), opened.get("pos"), opened.get("chain_samples")
    if not _chains_ok(sel):
        return False
    assert isinstance(sel, list)
    ints = (chain, pos, n)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        return False
    assert isinstance(chain, int) and isinstance(pos, int)
    if chain >= len(sel) or pos >= len(sel[chain]):
        return False
    results = opened.get("results")
    if not (isinstance(results, list) and len(results) == chain and all(
            isinstance(r, list) and len(r) == 2 and isinstance(r[1], int) and r[1] >= 0 for r in results)):
        return False
    times = (opened.get("chain_s"), opened.get("round_parallel_s"), opened.get("invited_at", 0.0))
    return all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < math.inf for t in times)


def _append_newest(kept: list[int], value: int) -> None:
    """Append ``value`` and keep the newest :data:`ROUNDS_LISTED` (one entry per round for as long
    as a daemon ran grew the retained status past what devices read: helper-150)."""
    kept.append(value)
    if len(kept) > ROUNDS_LISTED:
        del kept[: len(kept) - ROUNDS_LISTED]


def _mean(results: Sequence[tuple[Vector, int]], *, weighted: bool) -> Vector:
    total = sum(n for _w, n in results)
    acc = np.zeros(results[0][0].shape, dtype=np.float64)
    for w, n in results:
        acc += np.asarray(w, dtype=np.float64) * ((n / total) if weighted and total > 0 else 1.0 / len(results))
    return acc.astype(np.float32)
