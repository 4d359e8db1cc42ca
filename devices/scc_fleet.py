"""The SCC stream experiment (HFedMS setting) as a fleet on the emulation engine.

Setting
-------
Every device sees each of its samples exactly once, in a stream that drifts over the
classes: each seed draws an order of the classes; class c is "in season" around
t_c = (rank(c) + ½) / C of the run, and every pool sample of class c arrives in round
⌊(t_c + ε)·R⌋ (ε ~ N(0, σ²), clipped to the run). The pool is split over the devices by a
Dirichlet(α) label skew (``[data]``), so devices hold different label mixes and together
follow the same drift. A device trains on its batch of the round and then forgets the raw
samples; only a feature cache may remember them.

Theory of operation
-------------------
A :class:`StreamFleet` is an engine :class:`~devices.engine.Driver` (virtual clock, event
queue, :class:`~devices.engine.LinkNetwork` with the ``[fleet]`` profiles' links). Nothing
is hand-built: every message is a real core's action, encoded, signed and routed.

* **Devices** are :class:`~edge_sdk.client.EdgeClient` objects, never connected; the driver
  is their actor. Round r's batch goes in with ``add_sample`` at ``r · round_s`` and the
  client's :class:`~edge_sdk.core.device.DeviceCore` gets ``SampleAdded`` (D_min = 1), so it
  pulls; ``StartTraining`` runs ``EdgeClient.run_training_job`` (the trainer thread's code:
  with SCC, compensation by Δ_c on a new extractor, numpy head calibration on current +
  cached features, age-out of the batch into the cache, ``SccConfig(keep_raw=0)``) with the
  seed ``job_seed(seed, device, round)``; ``TrainingFinished`` follows after the profile's
  virtual duration. Devices without a cache delete their batch after training.
* **Coordinator**: the real :class:`~coordinator.core.CoordinatorCore`, SPIN with K = all
  devices and π = ``timeout_s`` (closes rounds where some devices had no labels), LASP
  ``full_sync_every = T``: between full syncs devices are sent, train and return only the
  classifier (``ModelMsg.train_group``). It signs its models; devices pin its key.
* **Metrics**: at the end of every round the coordinator's model is evaluated on the test
  split and on the test samples of the *early classes* (the first ``early_classes`` in the
  season order). "learned" = the round by which 95 % of the early-class samples arrived;
  forgetting = early-class accuracy then − at the end.

With equal device speeds a round's updates reach the coordinator in device order and the
results are bit-identical to the former standalone runner (which hand-built the messages);
with the profile's spread only that fold order differs (final accuracy ± 0.3–0.7 pp per seed).

Arms (same streams, same seeds): ``fedavg`` (full model every round, no cache), ``lasp``
(no cache), ``cache`` (``SccConfig(compensate=False)``), ``scc`` (compensated cache).

    edgeci emulate demos/scenarios/scc-stream.toml [--quick] [--seeds 0-19]
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
from coordinator.strategies import make_strategy
from devices.engine import Driver, Kind, LinkNetwork, job_seed, train_config
from devices.partition import dirichlet, iid
from devices.profiles import DeviceInstance, OfflineWindows, fleet_counts
from devices.scenario import (
    _POSITIVE,
    ScenarioError,
    Settings,
    Spec,
    _check_keys,
    _choice,
    _fields,
    _int,
    _num,
    parse_settings,
    with_quick,
)
from edge_sdk.client import EdgeClient
from edge_sdk.core.device import Phase
from edge_sdk.core.events import (
    DeployModel,
    MessageReceived,
    Notify,
    Publish,
    SampleAdded,
    ScheduleTimer,
    StartTraining,
    TimerFired,
    TrainingFinished,
    TrainingJob,
)
from edge_sdk.scc import SccConfig
from edge_sdk.signing import Signer
from edge_sdk.spec import FULL, Vector
from edge_sdk.tasks.base import Split, TrainConfig
from edge_sdk.trainer import ClassifierTask

__all__ = ["ARMS", "ArmRun", "SccScenario", "StreamFleet", "StreamSettings", "Streams", "format_report", "make_streams",
           "paired", "parse_scc_scenario", "run_scenario", "summarise"]

ARMS: dict[str, str] = {
    "fedavg": "FedAvg, full model every round, no cache",
    "lasp": "LASP, no cache",
    "cache": "LASP + cached features, no compensation",
    "scc": "LASP + SCC (compensated cache)",
}
REGION = "scc"
LEARNED_FRACTION = 0.95


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSettings:
    """The ``[stream]`` table: the drift, the rounds and the cache."""

    rounds: int = 29
    round_s: float = 60.0
    timeout_s: float = 20.0
    """π: closes a round in which not every device labelled (K = all devices)."""
    full_sync_every: int = 5
    drift_noise: float = 0.05
    early_classes: int = 3
    capacity: int = 50
    fallback: str = "global"
    calib_epochs: int = 2
    calib_batch_size: int = 16
    calib_lr: float = 0.05
    arms: tuple[str, ...] = ("lasp", "cache", "scc")


@dataclass(frozen=True, slots=True, kw_only=True)
class SccScenario:
    name: str
    description: str
    settings: Settings
    stream: StreamSettings
    raw: Mapping[str, Any]
    source: str

    def quick(self) -> SccScenario:
        return parse_scc_scenario(with_quick(self.raw, source=self.source), source=f"{self.source} (quick)")

    def with_seeds(self, seeds: Sequence[int]) -> SccScenario:
        return parse_scc_scenario({**self.raw, "seeds": list(seeds)}, source=self.source)


_STREAM: Spec = {
    "rounds": (_int, {"lo": 1}), "round_s": (_num, _POSITIVE), "timeout_s": (_num, _POSITIVE), "full_sync_every": (_int, {"lo": 1}),
    "drift_noise": (_num, {"lo": 0}), "early_classes": (_int, {"lo": 1}), "capacity": (_int, {"lo": 1}),
    "fallback": (_choice, {"options": ("global", "none")}), "calib_epochs": (_int, {"lo": 1}),
    "calib_batch_size": (_int, {"lo": 1}), "calib_lr": (_num, _POSITIVE),
}
"""The ``[stream]`` keys (``arms`` apart), in the order they are checked."""


def parse_scc_scenario(raw: Mapping[str, Any], *, source: str = "<string>") -> SccScenario:
    """A scenario with a ``[stream]`` table: the shared sections (task, seeds, ``[fleet]``,
    ``[data]``, ``[training]``, ``[quick]``) as every scenario, plus the stream's own."""
    table = raw.get("stream")
    if not isinstance(table, dict):
        raise ScenarioError(f"{source}: [stream] must be a table")
    for key, what in (("runs", "[[runs]]"), ("methods", "[[methods]]"), ("multiregion", "[multiregion]"), ("reference", "reference")):
        if key in raw:  # (read by the other kinds of scenario: here it would be ignored)
            raise ScenarioError(f"{source}: a [stream] scenario has no {what}: its arms are [stream] arms")
    settings = parse_settings({k: v for k, v in raw.items() if k != "stream"}, source=source)
    where = f"{source}: [stream]"
    _check_keys(table, set(StreamSettings.__dataclass_fields__), source, "[stream]")
    d = StreamSettings()
    arms = table.get("arms", list(d.arms))
    if not isinstance(arms, list) or not arms or any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
        raise ScenarioError(f"{where}: arms must be a list of distinct names from {', '.join(ARMS)}, got {arms!r}")
    s = StreamSettings(**_fields(table, where, _STREAM, d), arms=tuple(arms))
    if s.timeout_s >= s.round_s / 2:
        raise ScenarioError(f"{where}: timeout_s must be < round_s / 2 so every round closes before the next")
    name, description = raw.get("name", "scc-stream"), raw.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise ScenarioError(f"{source}: name and description must be strings")
    if "quick" in raw:  # checked whether or not --quick is asked for
        if not isinstance(raw["quick"], dict):
            raise ScenarioError(f"{source}: [quick] must be a table of dotted keys")
        parse_scc_scenario(with_quick(raw, source=source), source=f"{source}: [quick]")
    return SccScenario(name=name, description=description, settings=settings, stream=s, raw=dict(raw), source=source)


# --------------------------------------------------------------------------- streams


@dataclass(frozen=True, slots=True, kw_only=True)
class Streams:
    """Which pool samples each device sees in each round, and the early-class facts."""

    batches: list[list[npt.NDArray[np.int64]]]
    """``batches[device][round]``: pool indices arriving at that device in that round."""
    class_order: tuple[int, ...]
    early: tuple[int, ...]
    learned_round: int


def make_streams(labels: npt.NDArray[np.int64], n_classes: int, settings: Settings, s: StreamSettings, seed: int) -> Streams:
    """Seasonal class drift over ``s.rounds`` rounds, split over the devices (module docstring)."""
    rng = np.random.default_rng([seed, 0x5CC])
    if s.early_classes >= n_classes:
        raise ScenarioError(f"early_classes must be < {n_classes}")
    order = rng.permutation(n_classes)
    season = np.empty(n_classes)
    season[order] = (np.arange(n_classes) + 0.5) / n_classes
    t = season[labels] + rng.normal(0.0, s.drift_noise, labels.shape[0])
    arrival = np.clip(np.floor(t * s.rounds), 0, s.rounds - 1).astype(np.int64)
    n = settings.devices
    parts = iid(labels, n, seed=seed) if settings.partition == "iid" else dirichlet(labels, n, alpha=settings.alpha, seed=seed)
    batches = [[part[arrival[part] == r] for r in range(s.rounds)] for part in parts]
    early = tuple(int(c) for c in order[: s.early_classes])
    early_arrivals = np.sort(arrival[np.isin(labels, early)])
    learned = int(early_arrivals[math.ceil(LEARNED_FRACTION * early_arrivals.shape[0]) - 1])
    return Streams(batches=batches, class_order=tuple(int(c) for c in order), early=early, learned_round=learned)


# --------------------------------------------------------------------------- the fleet


@dataclass(slots=True)
class ArmRun:
    arm: str
    seed: int
    rows: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class StreamFleet(Driver):
    """One arm on one seed's streams: EdgeClient devices and a coordinator core on the engine."""

    def __init__(self, task: ClassifierTask, settings: Settings, s: StreamSettings, arm: str, seed: int,
                 streams: Streams, *, initial: Vector) -> None:
        if arm not in ARMS:
            raise ScenarioError(f"unknown arm {arm!r}; use one of {', '.join(ARMS)}")
        super().__init__()
        self.task, self.settings, self.stream, self.arm, self.seed, self.streams = task, settings, s, arm, seed, streams
        n = settings.devices
        ccfg = CoordinatorConfig(region=REGION, coordinator_id="coordinator", spec=task.spec,
                                 full_sync_every=0 if arm == "fedavg" else s.full_sync_every, signer=Signer.generate())
        self.coordinator = CoordinatorCore(ccfg, make_strategy("spin", k=n, timeout_s=s.timeout_s),
                                           Snapshot(version=0, weights=initial), rng=random.Random(seed))
        scc: SccConfig | bool = False
        if arm in ("cache", "scc"):
            scc = SccConfig(capacity=s.capacity, keep_raw=0, compensate=arm == "scc",
                            fallback="none" if s.fallback == "none" else "global")
        self.clients = [EdgeClient(broker="mqtt://127.0.0.1:1", device_id=f"d{i:03d}", region=REGION, task=task,
                                   durable=False, seed=seed, min_samples=1, scc=scc, refresh_s=None)  # the paper's pulls only
                        for i in range(n)]
        self.instances = _instances(settings, seed, s.rounds * s.round_s)
        self.network = LinkNetwork([c.core.config.device_id for c in self.clients], [d.link for d in self.instances],
                                   region=REGION)
        self._coord = n
        self._timers: list[float | None] = [None] * (n + 1)
        self._added = [0] * n
        self.full_cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr)
        self.head_cfg = TrainConfig(epochs=s.calib_epochs, batch_size=s.calib_batch_size, lr=s.calib_lr)
        self.counts: Counter[str] = Counter()
        """What happened: jobs per group, compensations (a cache meeting a new extractor),
        shifted (compensations that moved the cached features), notes, unfinished rounds."""
        self.deployed: list[list[int]] = [[] for _ in range(n)]
        """Per device: the versions its DeviceCore deployed (each arrived through the network)."""
        early = np.isin(task.data().test.y, streams.early)
        self._result = ArmRun(arm=arm, seed=seed)
        self._early = Split(x=task.data().test.x[early], y=task.data().test.y[early])

    def run(self) -> ArmRun:
        s, result = self.stream, self._result
        if self.events or result.rows:
            raise ScenarioError("a StreamFleet runs once; make a new one for another run")
        for r in range(s.rounds):
            for i in range(len(self.clients)):
                if self.streams.batches[i][r].shape[0]:
                    self.push(r * s.round_s, Kind.SAMPLE, i, r)
            self.push((r + 1) * s.round_s, Kind.EVAL, self._coord, r)
        self._evaluate(-1, result)
        self._coordinator_actions(self.coordinator.start(0.0), 0.0)
        try:
            self.run_until(s.rounds * s.round_s)
        finally:
            for client in self.clients:
                client.stop()
        result.summary = _summary(result.rows, self.streams, s)
        result.summary.update({"counts": dict(sorted(self.counts.items())), "versions": self.coordinator.version,
                               "messages": self.network.messages,
                               "min_device_version": min((v[-1] if v else -1) for v in self.deployed)})
        return result

    def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
        if kind == Kind.EVAL:
            self._evaluate(int(data), self._result)
            return
        if kind == Kind.TIMER:
            if self._timers[target] != data:
                return  # replaced by a later ScheduleTimer
            self._timers[target] = None
            event: Any = TimerFired(now=now)
        elif kind == Kind.MSG:
            topic, payload = data
            self.network.delivered(target, len(payload))
            event = MessageReceived(now=now, topic=topic, payload=payload)
        elif kind == Kind.TRAINED:
            job_id, result, seconds = data
            event = TrainingFinished(now=now, job_id=job_id, weights=result.weights, n_samples=result.n_samples,
                                     loss=result.loss, seconds=seconds)
        elif kind == Kind.SAMPLE:
            self._add_batch(now, target, int(data))
            return
        else:  # pragma: no cover - kinds are private
            raise ScenarioError(f"unexpected event kind {kind}")
        if target == self._coord:
            self._coordinator_actions(self.coordinator.handle(event), now)
        else:
            self._device_actions(target, self.clients[target].core.handle(event), now)

    def _add_batch(self, now: float, i: int, r: int) -> None:
        """Round r's labels reach device i: stored by its app, one ``SampleAdded`` each."""
        client, pool = self.clients[i], self.task.data().pool
        for k in self.streams.batches[i][r]:
            client.add_sample(pool.x[k], int(pool.y[k]))
            self._added[i] += 1
            self._device_actions(i, client.core.handle(SampleAdded(now=now, total=self._added[i])), now)

    def _coordinator_actions(self, actions: Sequence[object], now: float) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self._publish(self._coord, a, now)
            elif isinstance(a, ScheduleTimer):
                self._timer(self._coord, a.at, now)
            elif isinstance(a, Notify):
                self.counts[f"coordinator:{a.kind}"] += 1

    def _device_actions(self, i: int, actions: Sequence[object], now: float) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self._publish(i, a, now)
            elif isinstance(a, ScheduleTimer):
                self._timer(i, a.at, now)
            elif isinstance(a, StartTraining):
                self._train(i, a.job, now)
            elif isinstance(a, DeployModel):
                self.deployed[i].append(a.version)
            elif isinstance(a, Notify) and a.kind in ("message_rejected", "training_failed", "retry", "key_pinned"):
                self.counts[f"device:{a.kind}"] += 1
            # PersistDeviceState, PinKey: in-memory devices never restart

    def _train(self, i: int, job: TrainingJob, now: float) -> None:
        """What the client's trainer thread runs, at once; done after the virtual duration."""
        client = self.clients[i]
        defaults = self.full_cfg if job.group == FULL else self.head_cfg
        cfg = train_config(job.hints, defaults, seed=job_seed(self.seed, i, int(now // self.stream.round_s)),
                           group=job.group)
        scc = client.scc
        stale = scc is not None and len(scc.cache) > 0 and not scc.is_current(job.weights)
        before = dict(zip(scc.cache.ids.tolist(), np.array(scc.cache.features))) if stale and scc is not None else None
        result, ids = client.run_training_job(job, cfg)
        self.counts[f"jobs:{job.group}"] += 1
        if scc is None:
            client.store.remove(ids)  # a streaming app forgets the batch it trained on
        elif before is not None:  # did the cached rows that stayed move with the extractor?
            self.counts["compensations"] += 1
            kept = [(before[k], z) for k, z in zip(scc.cache.ids.tolist(), scc.cache.features) if k in before]
            self.counts["shifted"] += int(any(not np.array_equal(a, b) for a, b in kept))
        seconds = self.instances[i].train_seconds(result.n_samples, cfg.epochs)
        self.push(now + seconds, Kind.TRAINED, i, (job.job_id, result, seconds))

    def _timer(self, target: int, at: float, now: float) -> None:
        self._timers[target] = at
        self.push(max(at, now), Kind.TIMER, target, at)

    def _publish(self, sender: int, action: Publish, now: float) -> None:
        routed = self.network.route(sender, action.topic, action.payload, now)
        if routed is not None:
            self.push(routed[1], Kind.MSG, routed[0], (action.topic, action.payload))

    def _evaluate(self, round_: int, result: ArmRun) -> None:
        if any(c.core.state.phase is not Phase.IDLE for c in self.clients):
            self.counts["unfinished_rounds"] += 1  # a device still mid-cycle when its round ended
        w = self.coordinator.weights
        result.rows.append({
            "round": float(round_), "version": float(self.coordinator.version),
            "accuracy": self.task.evaluate(w)["accuracy"], "early_accuracy": self.task.evaluate(w, self._early)["accuracy"],
            "bytes": float(self.network.device_bytes_up + self.network.device_bytes_down),
        })


def _instances(settings: Settings, seed: int, horizon_s: float) -> list[DeviceInstance]:
    """The devices' links and speeds from the ``[fleet]`` mix; always online (a round-based
    stream has no night)."""
    out: list[DeviceInstance] = []
    for name, count in fleet_counts(settings.devices, settings.mix).items():
        profile = settings.profiles[name]
        for _ in range(count):
            k = len(out)
            inst = profile.instantiate(f"d{k:03d}", horizon_s, random.Random(f"{seed}:profile:{k}"))
            out.append(replace(inst, offline=OfflineWindows()))
    return out


def _summary(rows: list[dict[str, float]], streams: Streams, s: StreamSettings) -> dict[str, Any]:
    by_round = {int(row["round"]): row for row in rows}
    learned = by_round[streams.learned_round]["early_accuracy"]
    final = rows[-1]
    return {
        "initial_accuracy": rows[0]["accuracy"], "final_accuracy": final["accuracy"],
        "last_T_mean_accuracy": float(np.mean([row["accuracy"] for row in rows[-s.full_sync_every:]])),
        "early_accuracy_learned": learned, "early_accuracy_final": final["early_accuracy"],
        "forgetting": learned - final["early_accuracy"], "bytes": final["bytes"],
        "learned_round": streams.learned_round, "early_classes": list(streams.early),
    }


# --------------------------------------------------------------------------- experiment


def run_scenario(sc: SccScenario, *, progress: Callable[[ArmRun], None] | None = None) -> list[ArmRun]:
    """Every arm on every seed (one stream per seed, shared by its arms)."""
    from devices.report import load_task

    task = load_task(sc.settings.task, sc.settings.task_options)
    if not isinstance(task, ClassifierTask):
        raise ScenarioError(f"task {sc.settings.task!r} is not a classification task with a feature extractor")
    data = task.data()
    runs: list[ArmRun] = []
    for seed in sc.settings.seeds:
        streams = make_streams(data.pool.y, data.n_classes, sc.settings, sc.stream, seed)
        initial = task.pretrained(seed=seed)
        for arm in sc.stream.arms:
            run = StreamFleet(task, sc.settings, sc.stream, arm, seed, streams, initial=initial).run()
            runs.append(run)
            if progress is not None:
                progress(run)
    return runs


COLUMNS = (("final_accuracy", "final acc"), ("early_accuracy_learned", "early acc (learned)"),
           ("early_accuracy_final", "early acc (final)"), ("forgetting", "forgetting"))


def summarise(runs: Sequence[ArmRun]) -> dict[str, dict[str, Any]]:
    """Mean and std (ddof 1) over seeds of every summary number, per arm."""
    out: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        mine = [r for r in runs if r.arm == arm]
        stats: dict[str, Any] = {"seeds": [r.seed for r in mine], "label": ARMS[arm]}
        for key in ("final_accuracy", "last_T_mean_accuracy", "early_accuracy_learned", "early_accuracy_final",
                    "forgetting", "bytes"):
            v = np.array([r.summary[key] for r in mine], dtype=np.float64)
            stats[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        out[arm] = stats
    return out


def paired(runs: Sequence[ArmRun], arm: str, baseline: str, key: str) -> dict[str, float]:
    """``arm`` − ``baseline`` on ``key``, paired by seed: mean, std, wins (> 0), losses (< 0), n."""
    a = {r.seed: r.summary[key] for r in runs if r.arm == arm}
    b = {r.seed: r.summary[key] for r in runs if r.arm == baseline}
    diff = np.array([a[k] - b[k] for k in sorted(a.keys() & b.keys())], dtype=np.float64)
    if diff.size == 0:
        return {"mean": math.nan, "std": math.nan, "wins": 0.0, "losses": 0.0, "n": 0.0}
    return {"mean": float(diff.mean()), "std": float(diff.std(ddof=1)) if diff.size > 1 else 0.0,
            "wins": float((diff > 0).sum()), "losses": float((diff < 0).sum()), "n": float(diff.size)}


def format_report(runs: Sequence[ArmRun]) -> str:
    """Markdown: final accuracy (%) per seed and arm, mean ± std per arm, SCC paired by seed."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    by = {(r.arm, r.seed): r.summary for r in runs}
    seeds = sorted({r.seed for r in runs})
    diff = "scc" in arms and "cache" in arms  # the compensation's own effect, per seed
    lines = ["| seed | " + " | ".join(arms) + (" | scc − cache |" if diff else " |"), "|---|" + "---|" * (len(arms) + diff)]
    for k in seeds:
        cells = [f"{100 * by[a, k]['final_accuracy']:.1f}" for a in arms]
        cells += [f"{100 * (by['scc', k]['final_accuracy'] - by['cache', k]['final_accuracy']):+.1f}"] if diff else []
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | " + " | ".join(t for _, t in COLUMNS) + " | MB moved |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    for arm, st in summarise(runs).items():
        cells = [f"{100 * st[k]['mean']:.1f} ± {100 * st[k]['std']:.1f}" for k, _ in COLUMNS]
        lines.append(f"| {arm} ({st['label']}) | " + " | ".join(cells) + f" | {st['bytes']['mean'] / 1e6:.2f} |")
    if "scc" in arms and len(arms) > 1:
        lines += ["", "| scc minus | final acc (pp) | scc higher | forgetting (pp) | scc forgets less |", "|---|---|---|---|---|"]
        for other in (a for a in arms if a != "scc"):
            acc, fgt = paired(runs, "scc", other, "final_accuracy"), paired(runs, "scc", other, "forgetting")
            lines.append(f"| {other} | {100 * acc['mean']:+.1f} ± {100 * acc['std']:.1f} | {acc['wins']:.0f}/{acc['n']:.0f} "
                         f"| {100 * fgt['mean']:+.1f} ± {100 * fgt['std']:.1f} | {fgt['losses']:.0f}/{fgt['n']:.0f} |")
    return "\n".join(lines)


def run_cli(sc: SccScenario, out: Path, *, quiet: bool = False) -> int:
    """``edgeci emulate`` for a stream scenario: run, print and write the report."""
    from devices.report import output_dir

    st, se = sc.settings, sc.stream
    output_dir(out)
    print(f"scenario {sc.name}: {len(se.arms)} arm(s) × {len(st.seeds)} seed(s) → {out}", file=sys.stderr)

    def progress(r: ArmRun) -> None:
        if not quiet:
            sm = r.summary
            print(f"seed {r.seed} {r.arm:>6}: final {100 * sm['final_accuracy']:.1f} %  early "
                  f"{100 * sm['early_accuracy_learned']:.1f} → {100 * sm['early_accuracy_final']:.1f} %", file=sys.stderr, flush=True)

    runs = run_scenario(sc, progress=progress)
    split = "IID split" if st.partition == "iid" else f"Dirichlet α={st.alpha}"
    note = (f"{st.task}: {st.devices} EdgeClient devices on the emulator, {se.rounds} rounds, LASP T={se.full_sync_every}, "
            f"{split}, cache Q={se.capacity}; {len(st.seeds)} seeds. Accuracy in %; forgetting = early-class accuracy "
            f"when learned − at the end (pp; early classes = the first {se.early_classes} of each seed's season order).\n\n")
    report = note + format_report(runs) + "\n"
    from devices.report import write_text_atomic

    write_text_atomic(out / "scc_stream.md", report)
    write_text_atomic(out / "summary.json", json.dumps({
        "settings": {"stream": asdict(se), "devices": st.devices, "seeds": list(st.seeds), "alpha": st.alpha},
        "stats": summarise(runs),
        "runs": [{"arm": r.arm, "seed": r.seed, "summary": r.summary, "rows": r.rows} for r in runs],
    }, indent=1))
    print(report)
    print(f"wrote {out / 'scc_stream.md'}, {out / 'summary.json'}", file=sys.stderr)
    return 0
