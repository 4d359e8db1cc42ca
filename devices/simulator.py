"""The fleet runner: the real cores on a virtual clock, one region or several.

    edgeci emulate demos/scenarios/digits-headline.toml --quick          # one region ([[runs]])
    python -m devices.multiregion demos/scenarios/multiregion/digits-4regions.toml --quick   # [[methods]]

Theory of operation
-------------------
A :class:`Simulation` is a *driver* on :mod:`devices.engine`: it owns real
:class:`~coordinator.core.CoordinatorCore` objects and one real
:class:`~edge_sdk.core.device.DeviceCore` per device, feeds them events and performs their
actions exactly as the MQTT drivers do — only time and the network are emulated. A
one-region scenario is the case of one coordinator on per-device links; a regional one
(``[multiregion]``, :class:`~devices.scenario.Regions`) has several. Endpoints are devices
``0..n-1``, then coordinators ``n..n+C-1``.

* **Clock, events, network** come from the engine: a :class:`~devices.engine.VirtualClock`
  that only moves forward, an :class:`~devices.engine.EventQueue` ordered by ``(time,
  sequence number)`` (a run is a pure function of scenario, strategy and seed) and a network
  model — one region: :class:`~devices.engine.LinkNetwork` (per-device links through one
  broker, every byte counted); regions: :class:`~devices.engine.RegionNetwork` (the region
  latency matrix; a message reaches the receiver's side as a ``HOP``, then queues on its
  downlink in arrival order). Nothing is dropped. Frames travel in-process by default
  (:meth:`Simulation.run`): each has its exact size, and its receiver gets the message the
  sender built and validated instead of parsing the bytes (signed frames are parsed); the
  results are those of ``transport="codec"``, which builds and parses every frame.
* **Devices** (:class:`EmulatedDevice`). Labels arrive at the scenario's Poisson times
  (``SampleAdded``); a continuous device (``[device] continuous``, every regional fleet) holds
  all its samples from its start and pulls again as soon as an update is acked.
  ``StartTraining`` really runs ``Task.local_update`` — accuracy is real — and
  ``TrainingFinished`` comes after the *virtual* duration (the profile's, or a regional
  device's fixed ``train_s``). While a device is offline (night, dropout) nothing happens on
  it: its messages and timers wait until it is back, its training pauses.
* **Coordinators.** One, or one per region (the run's peering joins them; a regional run
  without a peering has one server in ``single_server_region``), each built by
  :func:`coordinator.methods.make_method`. A coordinator's CPU costs ``msg_ms`` per event
  plus ``service_ms`` per committed version (a regional method's; 0 in one region): events
  queue while it is busy and its messages leave when the work is done. ``PersistUpdate`` /
  ``CommitVersion`` go to memory (commit times give each version's deployment time); the
  status is built only on demand (``status_payload=False``).
* **Metrics.** Every ``eval_every_s`` each coordinator's deployed model is evaluated on the
  task's held-out split (only when its version changed; while the training line holds a version
  its strategy says is no candidate, an HFedMS chain step, the newest that was): one region records the release too
  (``release_accuracy``), bytes, staleness and label latency; regions record the mean,
  minimum and maximum over coordinators and their CPU use, and may stop
  ``2 × eval_every_s`` after the target.
* **Release gate** (``[coordinator] gate = true``): ``EvaluateCandidate`` is scored on the
  validation set carved out of the pool (``scenario.holdout``: no device labels it) and
  ``CandidateEvaluated`` is fed back ``gate_delay_s`` virtual seconds later. **Attackers**
  (``[attack]``, :mod:`devices.attacks`) change only what the emulated app feeds its honest
  core. **Delayed devices** (``[delay]``, :mod:`devices.stragglers`) and **conversions** of
  stale updates (charged on the virtual clock, one at a time) are the staleness experiment's.

Speed: a local update of the digits CNN is the hot path (~1 ms); keep torch at one
thread (``edge_sdk.trainer.configure_threads(1)``), and evaluate on the schedule, not
per event.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from coordinator.core import (
    CandidateEvaluated,
    CommitVersion,
    ConvertUpdate,
    CoordinatorConfig,
    CoordinatorCore,
    EvaluateCandidate,
    LoadVersion,
    PersistUpdate,
    RecordRelease,
    RecordSelectionRound,
    Snapshot,
    UpdateConverted,
    VersionLoaded,
)
from coordinator.methods import make_method
from coordinator.peering import Peering
from coordinator.strategies import Strategy
from coordinator.strategies.base import BufferedUpdate, StaticView
from coordinator.validation import Scored, compare
from coordinator.validation import score as validation_score
from devices.attacks import Attack, assign
from devices.engine import Driver, Kind, LinkNetwork, RegionNetwork, job_seed, train_config
from devices.engine.rng import SeededOnUse
from devices.profiles import OfflineWindows
from devices.scenario import (
    CostModel,
    DevicePlan,
    Regions,
    RunSpec,
    Scenario,
    ScenarioError,
    Settings,
    check_devices_per_round,
    gate_config,
    holdout,
    materialise,
    materialise_regions,
)
from devices.stragglers import Stragglers
from edge_sdk.core.device import DeviceConfig, DeviceCore
from edge_sdk.core.events import (
    CanaryScored,
    DeployModel,
    MessageReceived,
    Notify,
    PersistDeviceState,
    Publish,
    SampleAdded,
    ScheduleTimer,
    StartCanary,
    StartTraining,
    StopCanary,
    TimerFired,
    TrainingFailed,
    TrainingFinished,
    TrainingJob,
)
from edge_sdk.errors import EdgeciError, LocalProtocolError
from edge_sdk.signing import Signer
from edge_sdk.tasks.base import Split, Task, TrainConfig, TrainResult
from edge_sdk.wire import topics
from edge_sdk.wire.codec import carry_decoded

__all__ = [
    "REGION",
    "TRANSPORTS",
    "EmulatedCoordinator",
    "EmulatedDevice",
    "LinkNetwork",
    "RunResult",
    "Simulation",
    "run_regional",
    "run_spec",
    "time_to_target",
]

REGION = "sim"
COORDINATOR_ID = "coordinator"
TRANSPORTS = ("in-process", "codec")
"""How frames travel inside the emulator (:meth:`Simulation.run`)."""
SINGLE_ID, SINGLE_REGION = "server", "global"
"""A regional run without a peering: its one coordinator's id and topic region."""
_MSG, _TIMER, _SAMPLE, _TRAINED, _TRAIN_FAILED, _EVAL, _KICK, _HOP, _GATE = (
    Kind.MSG, Kind.TIMER, Kind.SAMPLE, Kind.TRAINED, Kind.TRAIN_FAILED, Kind.EVAL, Kind.KICK, Kind.HOP, Kind.GATE)
"""The event kinds as module constants (the dispatch compares them on every event)."""
_WAITS_ONLINE = frozenset({Kind.MSG, Kind.TIMER})
"""What waits while a device is offline (at the broker / asleep)."""
_DEVICE_ACTIONS = frozenset({PersistDeviceState, Notify, Publish, ScheduleTimer, StartTraining, DeployModel, StartCanary, StopCanary})
_COORDINATOR_ACTIONS = frozenset({Publish, Notify, PersistUpdate, ScheduleTimer, CommitVersion, EvaluateCandidate, RecordRelease,
                                  ConvertUpdate, LoadVersion, RecordSelectionRound})
"""(RecordSelectionRound: nothing to do, the emulated coordinator never restarts; listed so it is not looked up by its bases.)"""


def _known_base(t: type, known: frozenset[type]) -> type:
    """The first of ``known`` among ``t``'s bases: actions are dispatched by class, a subclass
    as the class it extends (``t`` itself when none: an action the emulator has no use for)."""
    return next((b for b in t.__mro__ if b in known), t)

COMPACT_MIN = 512
"""Dead device timers are dropped from the event heap when it reaches this size (and again
each time it doubles): below it they cost too little to be worth a pass."""


@dataclass(slots=True)
class EmulatedDevice:
    """What a device app does around its core: label samples, train when told.

    Clock- and transport-free, so a real-MQTT fleet can drive the same objects.
    """

    plan: DevicePlan
    core: DeviceCore
    x: npt.NDArray[Any]
    y: npt.NDArray[np.int64]
    seed: int
    defaults: TrainConfig
    timer_at: float | None = None
    deployed_version: int = -1
    deployed_weights: Any = None
    """The weights it predicts with (the release it was last given: ``DeployModel``)."""
    canary: tuple[int, int, Any] | None = None
    """While scoring a canary request: (candidate, release, candidate weights)."""
    trainings: int = 0
    train_seconds: float = 0.0
    attack: Attack | None = None
    """An attacker's behaviour (:mod:`devices.attacks`); None: an honest device."""
    offline: OfflineWindows | None = field(init=False, default=None)
    """``plan.instance.offline``, or None for a device that is never offline: read on every
    message and timer of the device (one attribute instead of three objects to follow)."""

    def __post_init__(self) -> None:
        windows = self.plan.instance.offline
        self.offline = windows if windows.starts else None

    def training_config(self, job: TrainingJob) -> TrainConfig:
        """Hyper-parameters for ``job``: the coordinator's hints, else the scenario's."""
        return train_config(job.hints, self.defaults, seed=job_seed(self.seed, self.plan.index, job.job_id), group=job.group)

    def train(self, task: Task, job: TrainingJob) -> tuple[TrainResult, float]:
        """Run the local update for real; return it with its *virtual* duration."""
        cfg = self.training_config(job)
        n = min(job.n_samples, int(self.y.shape[0]))  # a continuous device claims one more each round
        result = task.local_update(job.weights, self.x[:n], self.y[:n], cfg)
        if self.attack is not None:
            result = self.attack.result(job.weights, result)
        fixed = self.plan.train_s
        seconds = fixed if fixed is not None else self.plan.instance.train_seconds(n, cfg.epochs)
        self.trainings += 1
        self.train_seconds += seconds
        return result, seconds


@dataclass(slots=True)
class EmulatedCoordinator:
    """A coordinator core with what the driver keeps for it: its timer, its CPU, its commits."""

    core: CoordinatorCore
    region: int
    """Index of its region in the topology (0 in one region)."""
    timer_at: float | None = None
    busy_until: float = 0.0
    busy_s: float = 0.0
    queued: dict[int, int] = field(default_factory=dict)
    """Events waiting for the CPU (by ``id`` of their data: a re-deferred event counts once)."""
    queue_len: int = 0
    queue_area: float = 0.0
    queue_t: float = 0.0
    queue_max: int = 0
    commit_times: dict[int, float] = field(default_factory=lambda: {0: 0.0})
    take_requests: Callable[[], Sequence[str]] | None = None
    """PORT's push-pull: the devices whose in-progress work the strategy asks for now."""
    evaluated: tuple[int, dict[str, float]] | None = None
    model: tuple[int, Any] | None = None
    """The newest version its strategy stands by (``Strategy.candidate``), or a rollback's or an
    operator's: what the metrics score while ``off_line``. Set when the core is built."""
    off_line: bool = False
    """The newest commit is no candidate (HFedMS's chain steps and resets: one device's continuation
    of another's, never the paper's global model): score ``model``, not the training line."""


def time_to_target(rows: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """Virtual time at which the first model reaching ``target`` accuracy was deployed
    (its commit time), from the evaluation schedule; None if never reached."""
    for row in rows:
        if row["accuracy"] >= target:
            return float(row["committed_at_s"])
    return None


@dataclass(slots=True)
class RunResult:
    """Metrics of one run: the evaluation rows and a summary."""

    label: str
    strategy: str
    params: Mapping[str, Any]
    seed: int
    target_accuracy: float
    rows: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def time_to_target(self) -> float | None:
        return time_to_target(self.rows, self.target_accuracy)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "strategy": self.strategy,
            "params": dict(self.params),
            "seed": self.seed,
            "target_accuracy": self.target_accuracy,
            "time_to_target_s": self.time_to_target,
            "summary": self.summary,
            "rows": self.rows,
        }


Progress = Callable[[float, Mapping[str, float]], None]


class Simulation(Driver):
    """One run. One region: a fleet drawn from ``settings`` and ``seed``, one coordinator with
    ``strategy`` (and ``peering``). Regions (``regions``, ``method``, ``devices``; see
    :meth:`regional`): ``devices`` devices spread over the regions and the method's
    coordinators."""

    transport: str = "in-process"
    """:meth:`run`'s transport (in the run's summary)."""

    def __init__(
        self,
        task: Task,
        settings: Settings,
        strategy: Strategy | None = None,
        *,
        seed: int,
        peering: Peering | None = None,
        label: str = "",
        params: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
        regions: Regions | None = None,
        method: RunSpec | None = None,
        devices: int | None = None,
    ) -> None:
        if (strategy is None) == (regions is None or method is None):
            raise LocalProtocolError("give a strategy (one region), or regions and a method")
        self.task, self.settings, self.seed, self.progress = task, settings, seed, progress
        self.regions, self.method = regions, method
        self.label = label or (method.label if method is not None else strategy.name if strategy is not None else "")
        self.params = dict(params or {})
        super().__init__()  # the engine's loop on a virtual clock
        s = settings
        data = task.data()
        pool = data.pool
        spec = task.spec
        self.initial = task.pretrained(seed=seed)
        self.plans = (materialise(s, seed, pool.y) if regions is None else
                      materialise_regions(s, regions, devices or s.devices, seed, pool.y))
        self.n = n = len(self.plans)
        hints = {"epochs": float(s.epochs), "batch_size": float(s.batch_size), "lr": float(s.lr)}
        if s.mu:
            hints["mu"] = float(s.mu)  # FedProx (HFedMS comparison, issue 16)
        # The coordinator's validation set: pool samples no device labels (scenario.holdout).
        val_idx, _ = holdout(s, seed, len(pool.y))
        self.validation: Split | None = Split(x=pool.x[val_idx], y=pool.y[val_idx]) if len(val_idx) else None
        # Coordinators: (id, topic region, region index) and their strategy + peering.
        served = Counter({0: n})  # devices per coordinator
        if regions is None:
            assert strategy is not None
            places, methods = [(COORDINATOR_ID, REGION, 0)], [(strategy, peering)]
        else:
            assert method is not None
            names = regions.topology.regions
            if method.peering is not None:
                places = [(r, r, k) for k, r in enumerate(names)]
                served = Counter(plan.region for plan in self.plans)
            else:
                places = [(SINGLE_ID, SINGLE_REGION, names.index(regions.single_server_region))]
            ring = [p[0] for p in places]
            built = [make_method(method.strategy, peering=method.peering, coordinator_id=name, ring=ring,
                                 peering_params=method.peering_params,
                                 strategy_params=method.coordinator_params(served[k], cost=regions.cost, region=places[k][2]))
                     for k, name in enumerate(ring)]
            methods = [(b.strategy, b.peering) for b in built]
        for k, ((name, _, _), (strat, _)) in enumerate(zip(places, methods, strict=True)):
            check_devices_per_round(repr(self.label), strat, name, served[k])  # (--devices, a region's share)
        self.strategy = methods[0][0]
        self.coords: list[EmulatedCoordinator] = []
        for (name, topic_region, region), (strat, peer) in zip(places, methods, strict=True):
            ccfg = CoordinatorConfig(
                region=topic_region, coordinator_id=name, spec=spec,
                encoding=s.encoding,  # type: ignore[arg-type]
                hints=hints, keep_versions=s.keep_versions,
                gate=gate_config(s) if s.gate else None,
                status_payload=False,  # nobody here reads the retained status: build it only on demand
                signer=Signer.generate() if regions is not None else None,  # peers verify each other's messages
                **s.pull_limits,  # type: ignore[arg-type]
            )
            rng = random.Random(f"{seed}:coordinator" if regions is None else f"{seed}:coordinator:{name}")
            core = CoordinatorCore(ccfg, strat, Snapshot(version=0, weights=self.initial), rng=rng, peering=peer)
            self.coords.append(EmulatedCoordinator(core=core, region=region, take_requests=getattr(strat, "take_update_requests", None),
                                                   model=(core.version, core.weights)))
        # Devices, each served by the coordinator of its region (or the only one).
        serving = {c.region: k for k, c in enumerate(self.coords)} if len(self.coords) > 1 else {}
        self._serving = [serving.get(p.region, 0) for p in self.plans]
        defaults = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr)
        self.attacks = assign(s.attack, n, data.n_classes, seed) if s.attack.active else {}
        self.devices: list[EmulatedDevice] = []
        self.continuous = s.continuous or regions is not None
        # A core draws (a request's jitter, a nonce) only once it has samples. A device that will
        # never label (a third of the 100,000-device benchmark's fleet) gets a generator built on
        # its first draw instead: the same draws, without 2.5 KB of Mersenne Twister state each.
        # The others are seeded here, so the seeding stays out of the timed loop.
        core_seed = f"{seed}:core:"
        for plan in self.plans:
            dcfg = DeviceConfig(
                device_id=plan.device_id, region=self.coords[self._serving[plan.index]].core.config.region, spec=spec,
                min_samples=s.min_samples if regions is None else 1,  # a regional device holds its data from the start
                request_timeout_s=s.request_timeout_s, max_backoff_s=max(300.0 if regions is None else 60.0, s.request_timeout_s),
                reannounce_s=s.reannounce_s,
                encoding=s.encoding,  # type: ignore[arg-type]
                # One trusted process: signatures are exercised by the unit and broker tests;
                # a serving pull at start would add events the published results never had.
                require_signature=False, serve_on_start=False,
                **s.pull_limits,  # type: ignore[arg-type]  # the coordinator's limit on pulls, which the device paces itself to
            )
            attack = self.attacks.get(plan.index)
            y = pool.y[plan.samples]
            labels = self.continuous or plan.label_times.shape[0] > 0
            rng = random.Random(f"{core_seed}{plan.index}") if labels else cast(random.Random, SeededOnUse(core_seed, plan.index))
            self.devices.append(EmulatedDevice(
                plan=plan, core=DeviceCore(dcfg, rng=rng),
                x=np.ascontiguousarray(pool.x[plan.samples]), y=np.ascontiguousarray(attack.labels(y) if attack is not None else y),
                seed=seed, defaults=defaults, attack=attack))
        # The network: per-device links through one broker, or the region latency matrix.
        self._endpoint_region = [p.region for p in self.plans] + [c.region for c in self.coords]
        self.links: LinkNetwork | None = None
        self.network: RegionNetwork | None = None
        if regions is None:
            self.links = LinkNetwork([p.device_id for p in self.plans], [p.instance.link for p in self.plans], region=REGION)
        else:
            topo = regions.topology
            self.network = network = RegionNetwork(self._endpoint_region, topo.latency_ms, topo.bandwidth_mbps * 1e6)
            for dev in self.devices:
                r = dev.core.config.region
                for leaf in topics.UPSTREAM:
                    network.subscribe(topics.device_topic(r, dev.plan.device_id, leaf), [n + self._serving[dev.plan.index]])
                for leaf in topics.DOWNSTREAM:
                    network.subscribe(topics.device_topic(r, dev.plan.device_id, leaf), [dev.plan.index])
        self.bytes_device = 0
        self.bytes_peer = 0
        """Regions: bytes on device links and between coordinators (one region: ``links``)."""
        self.cost: CostModel | None = regions.cost if regions is not None else None
        """The regional cost model (``[multiregion.cost]``); None: nothing is charged."""
        self.bytes_inter_region = 0
        self.cost_compute = 0.0
        self.cost_transfer = 0.0
        self.compute_s = 0.0
        self.resource_use: Counter[str] = Counter()
        self.aggregated_updates = 0
        self.done_at: float | None = None
        """When the (mean) accuracy first reached the target on the evaluation schedule."""
        self.persisted: dict[tuple[str, int], BufferedUpdate] = {}
        self.coord_notes: Counter[str] = Counter()
        self.device_notes: Counter[str] = Counter()
        self.labels = 0
        self.canary_scored = 0
        """Labels scored for a canary request (release and candidate) before joining training."""
        self.rows: list[dict[str, float]] = []
        self._index = {p.device_id: p.index for p in self.plans}
        self._integrated = [0] * n
        # Evaluation rows without scans over the fleet: every offline window of every device,
        # sorted (devices offline at t = windows started by t - windows ended by t), and a
        # running count of trainings.
        self._offline_starts = np.sort(np.array([t for p in self.plans for t in p.instance.offline.starts], dtype=np.float64))
        self._offline_ends = np.sort(np.array([t for p in self.plans for t in p.instance.offline.ends], dtype=np.float64))
        self._trainings = 0
        self.latencies: list[float] = []
        """Per label: virtual seconds from labelling to the first deployed version built on it."""
        self.releases: list[dict[str, Any]] = []
        """The gate's decisions (``RecordRelease`` events) with their virtual times."""
        self._scores: dict[int, Scored] = {}
        self._release_eval: tuple[int, dict[str, float]] | None = None
        # Delayed uplinks and class-c metrics ([delay], devices.stragglers); conversions (issue 15).
        self.stragglers = (Stragglers(s.delay, [p.samples for p in self.plans], pool.y, [p.device_id for p in self.plans],
                                      REGION, data.test) if s.delay.active else None)
        if self.stragglers is not None:
            self.stragglers.committed(task, 0, self.initial, 0.0)
        self.converter: Callable[[ConvertUpdate], Any] | None = None
        """Runs a ``ConvertUpdate`` and returns an object with ``weights`` (default: gradient
        inversion, ``coordinator.inversion``, built on first use with ``settings.inversion``)."""
        self.conversion_clock: Callable[[], float] = time.process_time
        """Measures a conversion's compute (CPU seconds of this process: not inflated by other load)."""
        self.conversions: list[dict[str, Any]] = []
        self._convert_free_at = 0.0
        self._training: dict[int, tuple[TrainingJob, float, float, TrainResult]] = {}
        """Per device training now: (job, started at, virtual seconds, the result that counts)."""
        self.update_requests_served = 0
        """PORT's push-pull: trainings cut short at the coordinator's request."""
        self._acting = (0, 0.0)
        # Dead device timers leave the heap in batches (see _compact_timers).
        self._compact_at = COMPACT_MIN
        self._idle_timers_dead = not (s.gate and s.canary > 0)
        """No canary request can open on a device (the only way its core leaves the timer-idle
        state without a ScheduleTimer): a timer found idle stays a no-op until it fires."""

    @classmethod
    def regional(cls, task: Task, sc: Scenario, method: RunSpec, n_devices: int, seed: int,
                 progress: Progress | None = None) -> Simulation:
        """One method of a regional scenario with ``n_devices`` devices."""
        assert sc.regions is not None
        return cls(task, sc.settings, seed=seed, label=method.label, params=method.params, progress=progress,
                   regions=sc.regions, method=method, devices=n_devices)

    @property
    def coordinator(self) -> CoordinatorCore:
        """The first (in one region: the only) coordinator's core."""
        return self.coords[0].core

    @property
    def commit_times(self) -> dict[int, float]:
        return self.coords[0].commit_times

    @property
    def broker(self) -> LinkNetwork:
        """One region's network (per-device links through one broker)."""
        if self.links is None:
            raise LocalProtocolError("a regional run has no single broker (see .network)")
        return self.links

    # ------------------------------------------------------------------ the loop

    def run(self, *, transport: str = "in-process") -> RunResult:
        """Play the whole run (once) and return its metrics. ``transport``: ``"in-process"``
        (the default) hands receivers the message each unsigned frame was built from instead
        of parsing it — sizes stay exact, every check in the cores still runs, the results
        are the same (:func:`edge_sdk.wire.codec.carry_decoded`); ``"codec"`` builds and
        parses every frame, as between processes (``benchmarks/emulator_speed.py`` times both)."""
        if transport not in TRANSPORTS:
            raise LocalProtocolError(f"unknown transport {transport!r}; use one of {', '.join(TRANSPORTS)}")
        if self.events or self.rows:
            raise LocalProtocolError("a Simulation runs once; make a new one for another run")
        self.transport = transport  # in the summary: which one a stored run used
        with carry_decoded(transport == "in-process"):
            return self._play()

    def _play(self) -> RunResult:
        started = time.perf_counter()
        s = self.settings
        # Every label is known in advance: preloaded (first at equal times, in this order).
        at: list[float] = []
        targets: list[int] = []
        totals: list[int] = []
        for dev in self.devices:
            if self.continuous:  # every sample from the start; the device retrains after each ack
                if dev.y.shape[0]:
                    at.append(dev.plan.start_s)
                    targets.append(dev.plan.index)
                    totals.append(int(dev.y.shape[0]))
                continue
            n = len(dev.plan.label_times)
            at.extend(dev.plan.label_times.tolist())
            targets.extend([dev.plan.index] * n)
            totals.extend(range(1, n + 1))
        self.preload(Kind.SAMPLE, at, targets, totals)
        n_evals = int(np.floor(s.duration_s / s.eval_every_s))
        for k in range(n_evals + 1):
            self.push(k * s.eval_every_s, Kind.EVAL, self.n, None)
        if n_evals * s.eval_every_s < s.duration_s:
            self.push(s.duration_s, Kind.EVAL, self.n, None)
        for k in range(len(self.coords)):
            self._coordinator_event(k, 0.0, Kind.KICK, None)
        linger = 2 * s.eval_every_s

        def reached(kind: Kind) -> bool:  # a regional run may stop 2 evaluations after its target
            return kind == _EVAL and self.done_at is not None and self.clock.now >= self.done_at + linger

        self.run_until(s.duration_s, reached if self.regions is not None and self.regions.stop_at_target else None)
        wall = time.perf_counter() - started
        return self._result(wall)

    def halted(self) -> bool:
        """A delay experiment ends at its last report version (``[delay] report_versions``)."""
        return self.stragglers is not None and self.stragglers.finished(self.coordinator.version)

    def halt_check(self) -> Callable[[], bool] | None:
        return self.halted if self.stragglers is not None else None  # only a delay experiment halts

    def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
        if target < self.n and kind != _HOP and kind != _EVAL:  # the common case first
            self._device_event(now, kind, target, data)
        elif kind == _EVAL:
            self._evaluate(now)
        elif kind == _HOP:  # at the receiver's side of the network: queue on its downlink in arrival order
            assert self.network is not None
            self.push(self.network.arrive(target, len(data[1]), now), _MSG, target, data)
        else:
            self._coordinator_event(target - self.n, now, kind, data)

    # ------------------------------------------------------------------ coordinators

    def _coordinator_event(self, k: int, now: float, kind: Kind, data: Any) -> None:
        c = self.coords[k]
        if now < c.busy_until:  # the coordinator's CPU is busy: queue behind the current work
            if id(data) not in c.queued:  # a first deferral: the queue grows (time-weighted length kept)
                c.queue_area += c.queue_len * (now - c.queue_t)
                c.queue_t, c.queue_len = now, c.queue_len + 1
                c.queue_max = max(c.queue_max, c.queue_len)
                c.queued[id(data)] = 1
            self.push(c.busy_until, kind, self.n + k, data)
            return
        if c.queued and c.queued.pop(id(data), 0):  # a deferred event reaches the CPU: the queue shrinks
            c.queue_area += c.queue_len * (now - c.queue_t)
            c.queue_t, c.queue_len = now, c.queue_len - 1
        if kind == _MSG:
            topic, payload = data
            if self.links is not None:
                self.links.delivered(self.n + k, len(payload))
            actions = c.core.handle(MessageReceived(now=now, topic=topic, payload=payload))
        elif kind == _TIMER:
            if c.timer_at != data:
                return  # replaced by a later ScheduleTimer
            c.timer_at = None
            actions = c.core.handle(TimerFired(now=now))
        elif kind == _GATE:
            actions = c.core.handle(data(now))
        elif kind == _KICK:
            actions = c.core.start(now)
        else:  # pragma: no cover - kinds are private
            raise LocalProtocolError(f"unknown event kind {kind}")
        m = self.method
        if m is not None and (m.msg_ms or m.service_ms):  # the coordinator's CPU (regional methods)
            cost = (m.msg_ms + m.service_ms * sum(isinstance(a, CommitVersion) for a in actions)) / 1000.0
            now = c.busy_until = now + cost
            c.busy_s += cost
        self._acting = (k, now)
        self._coordinator_actions(actions)

    def _coordinator_actions(self, actions: Sequence[object]) -> None:
        """Carry out the acting coordinator's actions (``_acting``: its index, and the time
        its CPU is done with the event: now, or later when it was busy)."""
        k, now = self._acting
        c = self.coords[k]
        me = self.n + k
        for a in actions:
            t = type(a)  # by class, as _device_actions
            if t not in _COORDINATOR_ACTIONS:
                t = _known_base(t, _COORDINATOR_ACTIONS)
            if t is Publish:
                self._publish(me, a, now)  # type: ignore[arg-type]
            elif t is Notify:
                self.coord_notes[a.kind] += 1  # type: ignore[attr-defined]
            elif t is PersistUpdate:
                if self.regions is None:  # kept for label latency until a commit consumes it
                    self.persisted[a.update.key] = a.update  # type: ignore[attr-defined]
            elif t is ScheduleTimer:
                c.timer_at = a.at  # type: ignore[attr-defined]
                self.push(max(a.at, now), _TIMER, me, a.at)  # type: ignore[attr-defined]
            elif t is CommitVersion:
                assert isinstance(a, CommitVersion)
                c.commit_times[a.version] = now
                if a.metadata.get("source") in ("rollback", "operator") or c.core.strategy.candidate(
                        StaticView(spec=c.core.config.spec, version=a.version, weights=a.weights)):
                    c.model, c.off_line = (a.version, a.weights), False
                else:
                    c.off_line = True
                if a.metadata.get("source") == "aggregation":
                    self.aggregated_updates += int(a.metadata.get("n_updates", 0))
                for key in a.consumed:
                    update = self.persisted.pop(key, None)
                    if update is not None:
                        self._integrate(update, now)
                if self.stragglers is not None:  # record class-c accuracy; send the delayed updates whose τ has passed
                    self.stragglers.committed(self.task, a.version, a.weights, now)
                    for sender, held in self.stragglers.due(a.version):
                        self._send(sender, held, now)
            elif t is EvaluateCandidate:
                self._score_candidate(a, me, now)  # type: ignore[arg-type]
            elif t is RecordRelease:
                self.releases.append({"t_s": now, "release": a.release, **a.event})  # type: ignore[attr-defined]
            elif t is ConvertUpdate:
                self._convert(a, me, now)  # type: ignore[arg-type]
            elif t is LoadVersion:  # operator rollback / pin: the emulator keeps no old versions
                self.push(now, Kind.GATE, me, lambda t, a=a: VersionLoaded(
                    now=t, version=a.version, weights=None, command=a.command, detail="the emulator keeps no registry"))
        if c.take_requests is not None:
            for device in c.take_requests():
                self._request_update(self._index[device], now)

    def _request_update(self, i: int, now: float) -> None:
        """PORT's push-pull (PLATO's urgent update request): a device still training sends
        its model as of its last completed epoch now (after its first epoch at the earliest)."""
        live = self._training.get(i)
        if live is None:
            return  # not training yet (model in transit): nothing to cut short
        job, started, seconds, _ = live
        dev = self.devices[i]
        cfg = dev.training_config(job)
        done = int(cfg.epochs * (now - started) / seconds) if seconds > 0 else cfg.epochs
        if done >= cfg.epochs:
            return
        epochs = max(done, 1)
        try:
            result = self.task.local_update(job.weights, dev.x[:job.n_samples], dev.y[:job.n_samples], replace(cfg, epochs=epochs))
        except EdgeciError:
            return  # the full training goes on
        if dev.attack is not None:
            result = dev.attack.result(job.weights, result)
        at = max(now, started + seconds * epochs / cfg.epochs)
        dev.train_seconds -= seconds - (at - started)
        self._training[i] = (job, started, at - started, result)
        self.update_requests_served += 1
        self.push(at, Kind.TRAINED, i, (job.job_id, result, at - started))

    def _score(self, version: int, weights: Any) -> Scored:
        """Accuracy and per-sample correctness of a version on the coordinator's validation
        set (cached per version): ``coordinator.validation.score``, as the daemon computes it."""
        if version not in self._scores:
            assert self.validation is not None
            self._scores[version] = validation_score(self.task, weights, self.validation)
        return self._scores[version]

    def _score_candidate(self, job: EvaluateCandidate, me: int, now: float) -> None:
        """What ``coordinator.validation.Validator`` does, on the virtual clock: score now,
        answer ``CandidateEvaluated`` after ``gate_delay_s``."""
        release = self._score(job.release_version, job.release_weights)
        candidate = self._score(job.version, job.weights)

        def evaluated(t: float) -> CandidateEvaluated:
            return CandidateEvaluated(now=t, version=job.version, candidate_metric=candidate[0], release_metric=release[0],
                                      release_version=job.release_version, paired=compare(candidate, release))

        self.push(now + self.settings.gate_delay_s, Kind.GATE, me, evaluated)

    def _integrate(self, update: BufferedUpdate, now: float) -> None:
        """Label-to-model latency: the labels this update trained on that no earlier
        aggregated update of its device covered are now in the deployed model (a continuous
        device holds all its samples from its start: their latency counts from there)."""
        i = self._index[update.device]
        done = self._integrated[i]
        n = update.n_samples
        if n > done:
            plan = self.devices[i].plan
            times = plan.label_times
            if self.continuous:  # every sample was there from the device's start (its label times are not used)
                self.latencies.extend([now - plan.start_s] * (n - done))
            elif n == done + 1 and done < len(times):  # the common case: one new label (no slice, no generator)
                self.latencies.append(now - float(times[done]))
            else:
                self.latencies.extend(now - float(t) for t in times[done:n])
            self._integrated[i] = n

    def _convert(self, job: ConvertUpdate, me: int, now: float) -> None:
        """Convert a stale update for real, now; charge its measured compute on the virtual
        clock: the answer (``UpdateConverted``) arrives that much later, and conversions run
        one at a time, queued behind each other (the daemon's single worker)."""
        if self.converter is None:
            from coordinator.inversion import GradientInverter, InversionConfig

            self.converter = GradientInverter(self.task, self.task.spec, InversionConfig(**self.settings.inversion)).convert  # type: ignore[arg-type]
        started = self.conversion_clock()
        weights, detail, extra = None, "", {}
        try:
            result = self.converter(job)
            weights = result.weights
            extra = {k: getattr(result, k) for k in ("iterations", "l1_before", "l1_after", "warm") if hasattr(result, k)}
        except EdgeciError as exc:
            detail = str(exc)[:200]
        elapsed = max(0.0, self.conversion_clock() - started)
        done = max(now, self._convert_free_at) + elapsed
        self._convert_free_at = done
        self.conversions.append({"t_s": now, "done_s": done, "elapsed_s": elapsed, "device": job.device, "staleness": job.staleness,
                                 "ok": weights is not None, **extra})

        def converted(t: float) -> UpdateConverted:
            return UpdateConverted(now=t, ticket=job.ticket, weights=weights, elapsed_s=elapsed, detail=detail)

        self.push(done, Kind.GATE, me, converted)

    # ------------------------------------------------------------------ devices

    def _device_event(self, now: float, kind: Kind, i: int, data: Any) -> None:
        dev = self.devices[i]
        if kind in _WAITS_ONLINE:
            offline = dev.offline
            if offline is not None and offline.offline_at(now):  # (no call for a device that is never offline)
                self.push(offline.next_online(now), kind, i, data)  # waits at the broker / sleeps
                return
        core = dev.core
        if kind == _MSG:
            topic, payload = data
            if self.links is not None:
                self.links.delivered(i, len(payload))
            actions = core.handle(MessageReceived(now=now, topic=topic, payload=payload))
        elif kind == _TIMER:
            if dev.timer_at != data:
                return
            dev.timer_at = None
            if core.timer_is_idle():  # the core would answer [] and change nothing: skip the call
                return
            actions = core.handle(TimerFired(now=now))
        elif kind == _SAMPLE:
            self.labels += 1
            if dev.canary is not None and not self.continuous:  # test, then train: score the new label first
                self._canary_score(dev, int(data) - 1, now)
            actions = core.handle(SampleAdded(now=now, total=data))
        elif kind == _TRAINED:
            job_id, result, seconds = data
            live = self._training.get(i)
            if live is None or live[3] is not result:
                return  # superseded: the coordinator asked for this training's work early
            del self._training[i]
            actions = core.handle(TrainingFinished(
                now=now, job_id=job_id, weights=result.weights, n_samples=result.n_samples,
                loss=result.loss, seconds=seconds,
            ))
        elif kind == _TRAIN_FAILED:
            job_id, error = data
            actions = core.handle(TrainingFailed(now=now, job_id=job_id, error=error))
        else:  # pragma: no cover - kinds are private
            raise LocalProtocolError(f"unknown event kind {kind}")
        self._device_actions(dev, actions, now)

    def _device_actions(self, dev: EmulatedDevice, actions: Sequence[object], now: float) -> None:
        i = dev.plan.index
        for a in actions:
            t = type(a)  # by class, the common ones first (one identity test each); a subclass as its base
            if t not in _DEVICE_ACTIONS:
                t = _known_base(t, _DEVICE_ACTIONS)
            if t is PersistDeviceState:
                continue  # in-memory devices never restart
            if t is Notify:
                self.device_notes[a.kind] += 1  # type: ignore[attr-defined]
                if self.continuous and a.kind in ("update_acked", "update_rejected"):  # type: ignore[attr-defined]
                    self.push(now, Kind.SAMPLE, i, dev.core.state.total + 1)  # retrain on the next model
            elif t is Publish:
                self._publish(i, a, now)  # type: ignore[arg-type]
            elif t is ScheduleTimer:
                at = a.at  # type: ignore[attr-defined]
                dev.timer_at = at
                self.push(at if at >= now else now, _TIMER, i, at)  # max(at, now): the same float
                if len(self.queue._heap) >= self._compact_at:
                    self._compact_timers()
            elif t is StartTraining:
                self._start_training(dev, a.job, now)  # type: ignore[attr-defined]
            elif t is DeployModel:
                dev.deployed_version, dev.deployed_weights = a.version, a.weights  # type: ignore[attr-defined]
            elif t is StartCanary and callable(getattr(self.task, "logits", None)):  # per-label correctness (not detection)
                dev.canary = (a.candidate, a.release, np.asarray(a.weights, dtype=np.float32))  # type: ignore[attr-defined]
            elif t is StopCanary and dev.canary is not None and dev.canary[0] == a.candidate:  # type: ignore[attr-defined]
                dev.canary = None

    def _compact_timers(self) -> None:
        """Drop the device timers that will do nothing when they fire, and rebuild the heap.

        Most device timers die long before they fire (a pull's deadline once the model is
        there, an update's once it is acked): each would still be pushed, popped, counted as
        an event and dispatched only to be ignored. Dead are those a later ScheduleTimer
        replaced (``timer_at`` differs: :meth:`_device_event` ignores them), and — when no
        canary request can open on a device (``_idle_timers_dead``) — those whose core has no
        deadline: every deadline a core sets comes with a ScheduleTimer, which replaces this
        one, so at its time the timer finds the core idle and only clears ``timer_at`` (done
        here). The heap pops entries in (time, sequence) order, unique keys: the rest keep
        their order, so only the count of events changes. Runs when the heap has doubled
        since the last compaction (at least :data:`COMPACT_MIN` entries)."""
        heap = self.queue._heap
        devices, n, idle_dead = self.devices, self.n, self._idle_timers_dead
        kept = []
        for entry in heap:
            if entry[2] is _TIMER and entry[3] < n:
                dev = devices[entry[3]]
                if dev.timer_at != entry[4]:
                    continue
                if idle_dead and dev.core.timer_is_idle():
                    dev.timer_at = None
                    continue
            kept.append(entry)
        heap[:] = kept
        heapq.heapify(heap)
        self._compact_at = max(COMPACT_MIN, 2 * len(heap))

    def _canary_score(self, dev: EmulatedDevice, index: int, now: float) -> None:
        """What ``edge_sdk.client`` does with a new label while a canary request is open:
        predict it with the deployed release and with the candidate (argmax of the task's
        logits, one sample) and feed the two verdicts to the core, before the label is stored."""
        assert dev.canary is not None
        candidate, release, weights = dev.canary
        if dev.deployed_weights is None or dev.deployed_version != release or not 0 <= index < len(dev.y):
            return  # not holding the release the request names: this label is not scored (as the client)
        x = dev.x[index : index + 1]
        with np.errstate(over="ignore", invalid="ignore"):  # an attacked candidate's logits may overflow
            release_label = int(np.argmax(self.task.logits(np.asarray(dev.deployed_weights, dtype=np.float32), x), axis=1)[0])  # type: ignore[attr-defined]
            candidate_label = int(np.argmax(self.task.logits(weights, x), axis=1)[0])  # type: ignore[attr-defined]
        truth = int(dev.y[index])
        self.canary_scored += 1
        actions = dev.core.handle(CanaryScored(now=now, candidate=candidate, release=release,
                                               candidate_right=candidate_label == truth, release_right=release_label == truth))
        self._device_actions(dev, actions, now)

    def _start_training(self, dev: EmulatedDevice, job: TrainingJob, now: float) -> None:
        i = dev.plan.index
        try:
            result, seconds = dev.train(self.task, job)
        except EdgeciError as exc:
            self.push(now, Kind.TRAIN_FAILED, i, (job.job_id, str(exc)[:200]))
            return
        self._trainings += 1  # == sum(d.trainings for d in self.devices), without the scan
        cost = self.cost
        if cost is not None:  # the resource the job runs on: its speed and its price (charged now)
            r = cost.resource(job.hints)
            scaled = seconds / cost.speed[r]
            dev.train_seconds += scaled - seconds
            seconds = scaled
            self.compute_s += seconds
            self.cost_compute += cost.compute(dev.plan.region, r, seconds)
            self.resource_use[cost.resources[r]] += 1
        offline = dev.offline
        finish = now + seconds if offline is None else offline.after_online(now, seconds)  # (what after_online gives without windows)
        self._training[i] = (job, now, seconds, result)
        self.push(finish, Kind.TRAINED, i, (job.job_id, result, seconds))

    # ------------------------------------------------------------------ network

    def _publish(self, sender: int, action: Publish, now: float) -> None:
        if self.stragglers is not None and self.stragglers.hold(sender, action, self.coordinator.version):
            return  # a delayed device's update waits in its link until τ versions have passed
        self._send(sender, action, now)

    publish = _publish

    def _send(self, sender: int, action: Publish, now: float) -> None:
        """Into the network model: a delivery (``MSG``) per subscriber, or a ``HOP`` first
        across regions (retained status and stray topics: nobody listens here)."""
        if self.links is not None:
            topic, payload = action.topic, action.payload
            routed = self.links.route(sender, topic, payload, now)
            if routed is not None:
                self.push(routed[1], _MSG, routed[0], (topic, payload))
            return
        network = self.network
        assert network is not None
        size = len(action.payload)
        peer = action.topic.startswith(f"{topics.ROOT}/peer/")
        if peer and action.topic not in network.routes:  # a peer topic's first message: its recipient, or all
            to = topics.parse(action.topic).coordinator
            network.subscribe(action.topic, [self.n + k for k, c in enumerate(self.coords) if to in ("all", c.core.config.coordinator_id)])
        peer = peer and sender >= self.n
        regions_of, cost = self._endpoint_region, self.cost
        for receiver, at in network.send(sender, action.topic, size, now):
            if peer:
                self.bytes_peer += size
            else:
                self.bytes_device += size
            src, dst = regions_of[sender], regions_of[receiver]
            if src != dst:
                self.bytes_inter_region += size
                if cost is not None:
                    self.cost_transfer += cost.transfer(src, dst, size)
            self.push(at, _HOP, receiver, (action.topic, action.payload))

    # ------------------------------------------------------------------ metrics

    def _metrics(self, c: EmulatedCoordinator) -> dict[str, float]:
        """The task's metrics of ``c``'s deployed model (evaluated once per version): its training
        line, or while that holds no candidate (an HFedMS chain step), the newest one that was.
        helper-172: HFedMS's curves scored every chain step, a model no device is to predict with."""
        if c.off_line and c.model is not None:
            c.evaluated = self._evaluated(c.evaluated, *c.model)
        else:
            c.evaluated = self._evaluated(c.evaluated, c.core.version, c.core.weights)
        return c.evaluated[1]

    def _evaluated(self, cached: tuple[int, dict[str, float]] | None, version: int,
                   weights: Any) -> tuple[int, dict[str, float]]:
        """``cached`` if it holds ``version``'s metrics, else ``version`` with the task's metrics of ``weights``."""
        if cached is not None and cached[0] == version:
            return cached
        with np.errstate(over="ignore", invalid="ignore"):  # an attacked model's logits may overflow
            return version, self.task.evaluate(weights)

    def _evaluate(self, now: float) -> None:
        row = self._row(now) if self.regions is None else self._regions_row(now)
        self.rows.append(row)
        if self.progress is not None:
            self.progress(now, row)
        if self.done_at is None and row["accuracy"] >= self.settings.target_accuracy:
            self.done_at = now

    def _row(self, now: float) -> dict[str, float]:
        """One region's row: the deployed model and the release, traffic, staleness, labels."""
        c, first = self.coordinator, self.coords[0]
        metrics = self._metrics(first)
        assert first.evaluated is not None
        version = first.evaluated[0]  # the version scored: the line's, but while it holds no candidate
        release_version, release_weights = c.release
        if release_version == version:
            release_metrics = metrics
        else:  # its own cache: a release held back by the gate lags the deployed version
            self._release_eval = self._evaluated(self._release_eval, release_version, release_weights)
            release_metrics = self._release_eval[1]
        counters = c.counters
        hist = c.staleness_hist
        n_stale = sum(hist.values())
        links = self.broker
        row = {
            "t_s": now,
            "version": float(version),
            "committed_at_s": self.commit_times.get(version, now),
            "accuracy": float(metrics["accuracy"]),
            "release_version": float(release_version),
            "release_accuracy": float(release_metrics["accuracy"]),
            "bytes_up": float(links.device_bytes_up),
            "bytes_down": float(links.device_bytes_down),
            "updates": float(counters["accepted"]),
            "aggregations": float(counters["aggregations"]),
            "pulls_served": float(counters["pulls_served"]),
            "pulls_deferred": float(counters["pulls_deferred"]),
            "labels": float(self.labels),
            "labels_integrated": float(len(self.latencies)),
            "trainings": float(self._trainings),
            "mean_staleness": float(sum(k * v for k, v in hist.items()) / n_stale) if n_stale else 0.0,
            "devices_online": float(self._devices_online(now)),
        }
        if "loss" in metrics:
            row["loss"] = float(metrics["loss"])
        if self.stragglers is not None:
            row["class_accuracy"] = self.stragglers.class_accuracy(self.task, c.version, c.weights)
        return row

    def _regions_row(self, now: float) -> dict[str, float]:
        """Regions: mean, min and max over the coordinators' deployed models; the latest
        commit among them; traffic on device links and between coordinators; CPU use."""
        accs = [float(self._metrics(c)["accuracy"]) for c in self.coords]
        committed = max([0.0, *(c.commit_times.get(c.core.version, now) for c in self.coords)])
        costs = ({"bytes_inter_region": float(self.bytes_inter_region), "cost_compute": self.cost_compute,
                  "cost_transfer": self.cost_transfer, "cost": self.cost_compute + self.cost_transfer}
                 if self.cost is not None else {})
        return costs | {
            "t_s": now,
            "committed_at_s": committed,
            "accuracy": float(np.mean(accs)),
            "accuracy_min": float(np.min(accs)),
            "accuracy_max": float(np.max(accs)),
            "version": float(np.mean([c.core.version for c in self.coords])),
            "updates": float(self.aggregated_updates),
            "trainings": float(self._trainings),
            "bytes_device": float(self.bytes_device),
            "bytes_peer": float(self.bytes_peer),
            "coordinator_utilisation": float(np.mean([c.busy_s for c in self.coords]) / now) if now > 0 else 0.0,
            "coordinator_queue_mean": float(np.mean([c.queue_area + c.queue_len * (now - c.queue_t) for c in self.coords]) / now) if now > 0 else 0.0,
            "coordinator_queue_max": float(max(c.queue_max for c in self.coords)),
        }

    def _devices_online(self, now: float) -> int:
        """Devices not inside an offline window at ``now`` (windows are disjoint per device)."""
        offline = int(np.searchsorted(self._offline_starts, now, side="right")) - int(np.searchsorted(self._offline_ends, now, side="right"))
        return len(self.devices) - offline

    def _result(self, wall_s: float) -> RunResult:
        s = self.settings
        rows = self.rows
        method = self.method
        result = RunResult(label=self.label, strategy=self.strategy.name if method is None else method.kind, params=self.params,
                           seed=self.seed, target_accuracy=s.target_accuracy, rows=rows)
        accs = [r["accuracy"] for r in rows]
        trainings = sum(d.trainings for d in self.devices)
        if self.regions is not None:
            assert self.network is not None
            result.summary = {
                "devices": self.n,
                "coordinators": len(self.coords),
                "time_to_target_s": result.time_to_target,
                "initial_accuracy": float(self.task.evaluate(self.initial)["accuracy"]),
                "final_accuracy": accs[-1] if accs else None,
                "best_accuracy": max(accs) if accs else None,
                "virtual_s": self.clock.now,
                "updates": self.aggregated_updates,
                "trainings": trainings,
                "messages": self.network.messages,
                "bytes_device": self.bytes_device,
                "bytes_peer": self.bytes_peer,
                **{k: rows[-1][k] if rows else None for k in ("coordinator_utilisation", "coordinator_queue_mean", "coordinator_queue_max")},
                "peering": [c.core.peering.describe() for c in self.coords],
                "wall_s": wall_s,
                "events": self.events,
                "transport": self.transport,
            }
            if self.cost is not None:
                at_target = next((r for r in rows if r["accuracy"] >= s.target_accuracy), {})
                result.summary |= {
                    "bytes_inter_region": self.bytes_inter_region,
                    "compute_s": self.compute_s,
                    "cost_compute": self.cost_compute,
                    "cost_transfer": self.cost_transfer,
                    "cost_total": self.cost_compute + self.cost_transfer,
                    **{f"{k}_to_target": at_target.get(k) for k in ("cost", "bytes_inter_region")},
                    "resource_use": dict(sorted(self.resource_use.items())),
                    "strategies": [c.core.strategy.describe() for c in self.coords],
                }
            return result
        c = self.coordinator
        release_accs = [r["release_accuracy"] for r in rows]
        lat = np.array(self.latencies) if self.latencies else None
        links = self.broker
        result.summary = {
            "time_to_target_s": result.time_to_target,
            "initial_accuracy": accs[0] if accs else None,
            "final_accuracy": accs[-1] if accs else None,
            "initial_release_accuracy": release_accs[0] if release_accs else None,
            "min_release_accuracy": min(release_accs) if release_accs else None,
            "final_release_accuracy": release_accs[-1] if release_accs else None,
            "release_version": c.release[0],
            "gate": {k: int(c.counters[k]) for k in ("gate_promoted", "gate_held", "gate_rejected", "gate_superseded",
                                                      "rejected_devices", "rolled_back_updates")} if s.gate else None,
            "gate_decisions": self.releases,
            **({"canary": {k: int(v) for k, v in sorted(c.counters.items()) if k.startswith("canary")} | {"labels_scored": self.canary_scored}}
               if s.gate and s.canary > 0 else {}),
            "attackers": {kind: sum(1 for a in self.attacks.values() if a.kind == kind) for kind in ("flip", "scale", "claim")},
            "rejected_by_reason": {k.removeprefix("reject:"): int(v) for k, v in sorted(c.counters.items()) if k.startswith("reject:")},
            "best_accuracy": max(accs) if accs else None,
            "versions": c.version,
            "updates_accepted": c.counters["accepted"],
            "updates_rejected": c.counters["rejected"],
            "messages_rejected": c.counters["messages_rejected"] + self.device_notes["message_rejected"],
            "pulls_served": c.counters["pulls_served"],
            "pulls_deferred": c.counters["pulls_deferred"],
            "labels": self.labels,
            "trainings": trainings,
            "mean_train_s": (sum(d.train_seconds for d in self.devices) / trainings) if trainings else None,
            "labels_integrated": len(self.latencies),
            "label_latency_mean_s": float(lat.mean()) if lat is not None else None,
            "label_latency_p50_s": float(np.percentile(lat, 50)) if lat is not None else None,
            "label_latency_p90_s": float(np.percentile(lat, 90)) if lat is not None else None,
            "bytes_up": links.device_bytes_up,
            "bytes_down": links.device_bytes_down,
            "messages": links.messages,
            "staleness_histogram": {str(k): v for k, v in sorted(c.staleness_hist.items())},
            "events": self.events,
            "transport": self.transport,
            "virtual_s": s.duration_s,
            "wall_s": wall_s,
            "virtual_per_wall": s.duration_s / wall_s if wall_s > 0 else None,
            "device_notes": dict(sorted(self.device_notes.items())),
            "update_requests_served": self.update_requests_served,
            "strategy": self.strategy.describe(),
            "stragglers": self.stragglers.summary() if self.stragglers is not None else None,
            "conversions": self.conversions,
            "conversion_counters": {k: int(v) for k, v in sorted(c.counters.items()) if k.startswith("conversion")},
        }
        return result


def run_spec(task: Task, run: RunSpec, seed: int, *, progress: Progress | None = None, transport: str = "in-process") -> RunResult:
    """Run one scenario line (strategy + settings) for one seed (``transport``: :meth:`Simulation.run`'s)."""
    if run.regional:
        raise ScenarioError(f"{run.label!r} is a regional method: run its scenario with `python -m devices.multiregion`")
    method = make_method(run.strategy, params=run.params, coordinator_id=COORDINATOR_ID)
    return Simulation(task, run.settings, method.strategy, peering=method.peering, seed=seed, label=run.label,
                      params=run.params, progress=progress).run(transport=transport)


def run_regional(task: Task, sc: Scenario, method: RunSpec, n_devices: int, seed: int,
                 progress: Progress | None = None) -> RunResult:
    """Run one method of a regional scenario with ``n_devices`` devices for one seed."""
    return Simulation.regional(task, sc, method, n_devices, seed, progress).run()
