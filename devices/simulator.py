"""Discrete-event fleet simulator: the real cores on a virtual clock and an in-memory broker.

Theory of operation
-------------------
The simulator is a *driver*: it owns one real :class:`~coordinator.core.CoordinatorCore`
and one real :class:`~edge_sdk.core.device.DeviceCore` per device, feeds them events
and performs their actions exactly as the MQTT drivers do — only time and the network
are emulated:

* **Clock, events, network** come from :mod:`devices.engine`: a
  :class:`~devices.engine.VirtualClock` that only moves forward, an
  :class:`~devices.engine.EventQueue` ordered by ``(time, sequence number)`` (a run is a pure
  function of scenario, strategy and seed) and a :class:`~devices.engine.LinkNetwork`
  (per-device links through one broker, every byte counted, nothing dropped).
* **Devices** (:class:`EmulatedDevice`). Labels arrive at the scenario's Poisson times
  (``SampleAdded``). ``StartTraining`` really runs ``Task.local_update`` on the device's
  samples so far — accuracy is real — and ``TrainingFinished`` is delivered after the
  profile's *virtual* duration. While a device is offline (night, dropout) nothing
  happens on it: its messages and timers wait until it is back, its training pauses.
* **Coordinator.** ``PersistUpdate`` / ``CommitVersion`` go to an in-memory registry
  (commit times give each version's deployment time); the status is not built on its
  schedule (``status_payload=False``: nobody subscribes) — ``coordinator.status()`` on demand.
* **Metrics.** Every ``eval_every_s`` the deployed (latest committed) model is evaluated
  on the task's held-out split — only when the version changed since the last
  evaluation — together with bytes, versions, updates and staleness — and so is the
  *release* (``release_accuracy``: what devices predict with).
* **Release gate** (``[coordinator] gate = true``): ``EvaluateCandidate`` is scored on the
  validation set carved out of the pool (``scenario.holdout``: no device labels it) and
  ``CandidateEvaluated`` is fed back ``gate_delay_s`` virtual seconds later; ``RecordRelease``
  decisions are kept in ``Simulation.releases``. **Attackers** (``[attack]``,
  :mod:`devices.attacks`) change only what the emulated app feeds its honest device core.

Speed: a local update of the digits CNN is the hot path (~1 ms); keep torch at one
thread (``edge_sdk.trainer.configure_threads(1)``), and evaluate on the schedule, not
per event.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

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
    Snapshot,
    UpdateConverted,
    VersionLoaded,
)
from coordinator.gate import GateConfig
from coordinator.methods import make_method
from coordinator.peering import Peering
from coordinator.strategies import Strategy
from coordinator.strategies.base import BufferedUpdate
from coordinator.validation import Scored, compare
from coordinator.validation import score as validation_score
from devices.attacks import Attack, assign
from devices.engine import Driver, Kind, LinkNetwork, job_seed, train_config
from devices.scenario import DevicePlan, RunSpec, Settings, holdout, materialise
from devices.stragglers import Stragglers
from edge_sdk.core.device import DeviceConfig, DeviceCore
from edge_sdk.core.events import (
    DeployModel,
    MessageReceived,
    Notify,
    PersistDeviceState,
    Publish,
    SampleAdded,
    ScheduleTimer,
    StartTraining,
    TimerFired,
    TrainingFailed,
    TrainingFinished,
    TrainingJob,
)
from edge_sdk.errors import EdgeciError, LocalProtocolError
from edge_sdk.tasks.base import Split, Task, TrainConfig, TrainResult

__all__ = [
    "REGION",
    "EmulatedDevice",
    "LinkNetwork",
    "RunResult",
    "Simulation",
    "run_spec",
    "time_to_target",
]

REGION = "sim"
COORDINATOR_ID = "coordinator"

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
    trainings: int = 0
    train_seconds: float = 0.0
    attack: Attack | None = None
    """An attacker's behaviour (:mod:`devices.attacks`); None: an honest device."""

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
        seconds = self.plan.instance.train_seconds(n, cfg.epochs)
        self.trainings += 1
        self.train_seconds += seconds
        return result, seconds


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
    """One run: a fleet drawn from ``settings`` and ``seed``, a coordinator with ``strategy``."""

    def __init__(
        self,
        task: Task,
        settings: Settings,
        strategy: Strategy,
        *,
        seed: int,
        peering: Peering | None = None,
        label: str = "",
        params: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.task = task
        self.settings = settings
        self.strategy = strategy
        self.seed = seed
        self.label = label or strategy.name
        self.params = dict(params or {})
        self.progress = progress
        super().__init__()  # the engine's loop on a virtual clock
        s = settings
        data = task.data()
        pool = data.pool
        self.plans = materialise(s, seed, pool.y)
        spec = task.spec
        self.initial = task.pretrained(seed=seed)
        hints = {"epochs": float(s.epochs), "batch_size": float(s.batch_size), "lr": float(s.lr)}
        # The coordinator's validation set: pool samples no device labels (scenario.holdout).
        val_idx, _ = holdout(s, seed, len(pool.y))
        self.validation: Split | None = Split(x=pool.x[val_idx], y=pool.y[val_idx]) if len(val_idx) else None
        ccfg = CoordinatorConfig(
            region=REGION, coordinator_id=COORDINATOR_ID, spec=spec,
            encoding=s.encoding,  # type: ignore[arg-type]
            hints=hints, keep_versions=s.keep_versions,
            gate=GateConfig(margin=s.gate_margin, rollback_margin=s.rollback_margin) if s.gate else None,
            status_payload=False,  # nobody here reads the retained status: build it only on demand
        )
        self.coordinator = CoordinatorCore(ccfg, strategy, Snapshot(version=0, weights=self.initial), rng=random.Random(f"{seed}:coordinator"),
                                           peering=peering)
        defaults = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr)
        n_classes = int(max(int(pool.y.max()), int(data.test.y.max()))) + 1
        self.attacks = assign(s.attack, len(self.plans), n_classes, seed) if s.attack.active else {}
        self.devices: list[EmulatedDevice] = []
        for plan in self.plans:
            dcfg = DeviceConfig(
                device_id=plan.device_id, region=REGION, spec=spec, min_samples=s.min_samples,
                request_timeout_s=s.request_timeout_s, max_backoff_s=max(300.0, s.request_timeout_s),
                reannounce_s=s.reannounce_s,
                encoding=s.encoding,  # type: ignore[arg-type]
                # One trusted process: signatures are exercised by the unit and broker tests;
                # a serving pull at start would add events the published results never had.
                require_signature=False, serve_on_start=False,
            )
            core = DeviceCore(dcfg, rng=random.Random(f"{seed}:core:{plan.index}"))
            attack = self.attacks.get(plan.index)
            y = pool.y[plan.samples]
            self.devices.append(
                EmulatedDevice(plan=plan, core=core, x=np.ascontiguousarray(pool.x[plan.samples]),
                               y=np.ascontiguousarray(attack.labels(y) if attack is not None else y), seed=seed,
                               defaults=defaults, attack=attack)
            )
        self.broker = LinkNetwork([p.device_id for p in self.plans], [p.instance.link for p in self.plans], region=REGION)
        self._coord = len(self.devices)
        self._coord_timer: float | None = None
        self.commit_times: dict[int, float] = {0: 0.0}
        self.persisted: dict[tuple[str, int], BufferedUpdate] = {}
        self.coord_notes: Counter[str] = Counter()
        self.device_notes: Counter[str] = Counter()
        self.labels = 0
        self.rows: list[dict[str, float]] = []
        self._eval_cache: tuple[int, dict[str, float]] | None = None
        self._index = {p.device_id: p.index for p in self.plans}
        self._integrated = [0] * len(self.plans)
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
        self._take_requests: Callable[[], Sequence[str]] | None = getattr(strategy, "take_update_requests", None)
        self.update_requests_served = 0
        """PORT's push-pull: trainings cut short at the coordinator's request."""

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunResult:
        """Play the whole run (once) and return its metrics."""
        if self.events or self.rows:
            raise LocalProtocolError("a Simulation runs once; make a new one for another run")
        started = time.perf_counter()
        s = self.settings
        # Every label is known in advance: preloaded (first at equal times, in this order).
        at: list[float] = []
        targets: list[int] = []
        totals: list[int] = []
        for dev in self.devices:
            if s.continuous:  # every sample from the start; the device retrains after each ack
                if dev.y.shape[0]:
                    at.append(0.0)
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
            self.push(k * s.eval_every_s, Kind.EVAL, self._coord, None)
        if n_evals * s.eval_every_s < s.duration_s:
            self.push(s.duration_s, Kind.EVAL, self._coord, None)
        self._coordinator_actions(self.coordinator.start(0.0))

        while self.step(s.duration_s) is not None:
            pass
        wall = time.perf_counter() - started
        return self._result(wall)

    def halted(self) -> bool:
        """A delay experiment ends at its last report version (``[delay] report_versions``)."""
        return self.stragglers is not None and self.stragglers.finished(self.coordinator.version)

    def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
        if target == self._coord:
            self._coordinator_event(now, kind, data)
        else:
            self._device_event(now, kind, target, data)

    # ------------------------------------------------------------------ coordinator

    def _coordinator_event(self, now: float, kind: Kind, data: Any) -> None:
        if kind == Kind.MSG:
            topic, payload = data
            self.broker.delivered(self._coord, len(payload))
            self._coordinator_actions(self.coordinator.handle(MessageReceived(now=now, topic=topic, payload=payload)))
        elif kind == Kind.TIMER:
            if self._coord_timer != data:
                return  # replaced by a later ScheduleTimer
            self._coord_timer = None
            self._coordinator_actions(self.coordinator.handle(TimerFired(now=now)))
        elif kind == Kind.EVAL:
            self._evaluate(now)
        elif kind == Kind.GATE:
            self._coordinator_actions(self.coordinator.handle(data(now)))

    def _coordinator_actions(self, actions: Sequence[object]) -> None:
        now = self.clock.now
        for a in actions:
            if isinstance(a, Publish):
                self._publish(self._coord, a, now)
            elif isinstance(a, ScheduleTimer):
                self._coord_timer = a.at
                self.push(max(a.at, now), Kind.TIMER, self._coord, a.at)
            elif isinstance(a, PersistUpdate):
                self.persisted[a.update.key] = a.update
            elif isinstance(a, CommitVersion):
                self.commit_times[a.version] = now
                for key in a.consumed:
                    update = self.persisted.pop(key, None)
                    if update is not None:
                        self._integrate(update, now)
                if self.stragglers is not None:
                    self._release_held(a.version, a.weights, now)
            elif isinstance(a, Notify):
                self.coord_notes[a.kind] += 1
            elif isinstance(a, EvaluateCandidate):
                self._score_candidate(a, now)
            elif isinstance(a, RecordRelease):
                self.releases.append({"t_s": now, "release": a.release, **a.event})
            elif isinstance(a, ConvertUpdate):
                self._convert(a, now)
            elif isinstance(a, LoadVersion):  # operator rollback / pin: the emulator keeps no old versions
                self.push(now, Kind.GATE, self._coord, lambda t, a=a: VersionLoaded(
                    now=t, version=a.version, weights=None, command=a.command, detail="the emulator keeps no registry"))
        if self._take_requests is not None:
            for device in self._take_requests():
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

    def _score_candidate(self, job: EvaluateCandidate, now: float) -> None:
        """What ``coordinator.validation.Validator`` does, on the virtual clock: score now,
        answer ``CandidateEvaluated`` after ``gate_delay_s``."""
        release = self._score(job.release_version, job.release_weights)
        candidate = self._score(job.version, job.weights)

        def evaluated(t: float) -> CandidateEvaluated:
            return CandidateEvaluated(now=t, version=job.version, candidate_metric=candidate[0], release_metric=release[0],
                                      release_version=job.release_version, paired=compare(candidate, release))

        self.push(now + self.settings.gate_delay_s, Kind.GATE, self._coord, evaluated)

    def _integrate(self, update: BufferedUpdate, now: float) -> None:
        """Label-to-model latency: the labels this update trained on that no earlier
        aggregated update of its device covered are now in the deployed model."""
        i = self._index[update.device]
        times = self.devices[i].plan.label_times
        done = self._integrated[i]
        if update.n_samples > done:
            self.latencies.extend(now - float(t) for t in times[done : update.n_samples])
            self._integrated[i] = update.n_samples

    # ------------------------------------------------------------------ devices

    def _device_event(self, now: float, kind: Kind, i: int, data: Any) -> None:
        dev = self.devices[i]
        offline = dev.plan.instance.offline
        if kind in (Kind.MSG, Kind.TIMER) and offline.offline_at(now):
            self.push(offline.next_online(now), kind, i, data)  # waits at the broker / sleeps
            return
        core = dev.core
        if kind == Kind.MSG:
            topic, payload = data
            self.broker.delivered(i, len(payload))
            actions = core.handle(MessageReceived(now=now, topic=topic, payload=payload))
        elif kind == Kind.TIMER:
            if dev.timer_at != data:
                return
            dev.timer_at = None
            actions = core.handle(TimerFired(now=now))
        elif kind == Kind.SAMPLE:
            self.labels += 1
            actions = core.handle(SampleAdded(now=now, total=data))
        elif kind == Kind.TRAINED:
            job_id, result, seconds = data
            live = self._training.get(i)
            if live is None or live[3] is not result:
                return  # superseded: the coordinator asked for this training's work early
            del self._training[i]
            actions = core.handle(TrainingFinished(
                now=now, job_id=job_id, weights=result.weights, n_samples=result.n_samples,
                loss=result.loss, seconds=seconds,
            ))
        elif kind == Kind.TRAIN_FAILED:
            job_id, error = data
            actions = core.handle(TrainingFailed(now=now, job_id=job_id, error=error))
        else:  # pragma: no cover - kinds are private
            raise LocalProtocolError(f"unknown event kind {kind}")
        self._device_actions(dev, actions, now)

    def _device_actions(self, dev: EmulatedDevice, actions: Sequence[object], now: float) -> None:
        i = dev.plan.index
        for a in actions:
            if isinstance(a, Publish):
                self._publish(i, a, now)
            elif isinstance(a, ScheduleTimer):
                dev.timer_at = a.at
                self.push(max(a.at, now), Kind.TIMER, i, a.at)
            elif isinstance(a, StartTraining):
                self._start_training(dev, a.job, now)
            elif isinstance(a, DeployModel):
                dev.deployed_version = a.version
            elif isinstance(a, Notify):
                self.device_notes[a.kind] += 1
                if self.settings.continuous and a.kind in ("update_acked", "update_rejected"):
                    self.push(now, Kind.SAMPLE, i, dev.core.state.total + 1)  # retrain on the next model
            elif isinstance(a, PersistDeviceState):
                pass  # in-memory devices never restart

    def _start_training(self, dev: EmulatedDevice, job: TrainingJob, now: float) -> None:
        i = dev.plan.index
        try:
            result, seconds = dev.train(self.task, job)
        except EdgeciError as exc:
            self.push(now, Kind.TRAIN_FAILED, i, (job.job_id, str(exc)[:200]))
            return
        self._trainings += 1  # == sum(d.trainings for d in self.devices), without the scan
        finish = dev.plan.instance.offline.after_online(now, seconds)
        self._training[i] = (job, now, seconds, result)
        self.push(finish, Kind.TRAINED, i, (job.job_id, result, seconds))

    def _publish(self, sender: int, action: Publish, now: float) -> None:
        if self.stragglers is not None and self.stragglers.hold(sender, action, self.coordinator.version):
            return  # a delayed device's update waits in its link until τ versions have passed
        routed = self.broker.route(sender, action.topic, action.payload, action.retain, now)
        if routed is not None:
            receiver, at = routed
            self.push(at, Kind.MSG, receiver, (action.topic, action.payload))

    def _release_held(self, version: int, weights: Any, now: float) -> None:
        """A commit: record class-c accuracy; send the delayed updates whose τ has passed."""
        assert self.stragglers is not None
        self.stragglers.committed(self.task, version, weights, now)
        for sender, action in self.stragglers.due(version):
            routed = self.broker.route(sender, action.topic, action.payload, action.retain, now)
            if routed is not None:
                self.push(routed[1], Kind.MSG, routed[0], (action.topic, action.payload))

    def _convert(self, job: ConvertUpdate, now: float) -> None:
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

        self.push(done, Kind.GATE, self._coord, converted)

    # ------------------------------------------------------------------ metrics

    def _evaluate(self, now: float) -> None:
        c = self.coordinator
        version = c.version
        if self._eval_cache is None or self._eval_cache[0] != version:
            with np.errstate(over="ignore", invalid="ignore"):  # an attacked model's logits may overflow
                self._eval_cache = (version, self.task.evaluate(c.weights))
        metrics = self._eval_cache[1]
        release_version, release_weights = c.release
        if release_version == version:
            release_metrics = metrics
        else:
            if self._release_eval is None or self._release_eval[0] != release_version:
                with np.errstate(over="ignore", invalid="ignore"):
                    self._release_eval = (release_version, self.task.evaluate(release_weights))
            release_metrics = self._release_eval[1]
        counters = c.counters
        hist = c.staleness_hist
        n_stale = sum(hist.values())
        row = {
            "t_s": now,
            "version": float(version),
            "committed_at_s": self.commit_times.get(version, now),
            "accuracy": float(metrics["accuracy"]),
            "release_version": float(release_version),
            "release_accuracy": float(release_metrics["accuracy"]),
            "bytes_up": float(self.broker.device_bytes_up),
            "bytes_down": float(self.broker.device_bytes_down),
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
            row["class_accuracy"] = self.stragglers.class_accuracy(self.task, version, c.weights)
        self.rows.append(row)
        if self.progress is not None:
            self.progress(now, row)

    def _devices_online(self, now: float) -> int:
        """Devices not inside an offline window at ``now`` (windows are disjoint per device)."""
        offline = int(np.searchsorted(self._offline_starts, now, side="right")) - int(np.searchsorted(self._offline_ends, now, side="right"))
        return len(self.devices) - offline

    def _result(self, wall_s: float) -> RunResult:
        s = self.settings
        c = self.coordinator
        rows = self.rows
        result = RunResult(label=self.label, strategy=self.strategy.name, params=self.params, seed=self.seed,
                           target_accuracy=s.target_accuracy, rows=rows)
        ttt = result.time_to_target
        accs = [r["accuracy"] for r in rows]
        release_accs = [r["release_accuracy"] for r in rows]
        trainings = sum(d.trainings for d in self.devices)
        lat = np.array(self.latencies) if self.latencies else None
        result.summary = {
            "time_to_target_s": ttt,
            "initial_accuracy": accs[0] if accs else None,
            "final_accuracy": accs[-1] if accs else None,
            "initial_release_accuracy": release_accs[0] if release_accs else None,
            "min_release_accuracy": min(release_accs) if release_accs else None,
            "final_release_accuracy": release_accs[-1] if release_accs else None,
            "release_version": c.release[0],
            "gate": {k: int(c.counters[k]) for k in ("gate_promoted", "gate_held", "gate_rejected", "gate_superseded",
                                                      "rejected_devices", "rolled_back_updates")} if s.gate else None,
            "gate_decisions": self.releases,
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
            "bytes_up": self.broker.device_bytes_up,
            "bytes_down": self.broker.device_bytes_down,
            "messages": self.broker.messages,
            "staleness_histogram": {str(k): v for k, v in sorted(c.staleness_hist.items())},
            "events": self.events,
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


def run_spec(task: Task, run: RunSpec, seed: int, *, progress: Progress | None = None) -> RunResult:
    """Run one scenario line (strategy + settings) for one seed."""
    method = make_method(run.strategy, params=run.params, coordinator_id=COORDINATOR_ID)
    return Simulation(task, run.settings, method.strategy, peering=method.peering, seed=seed, label=run.label,
                      params=run.params, progress=progress).run()

