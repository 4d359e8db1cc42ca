"""Multi-region emulation: one coordinator per region (or one server for all), real cores,
virtual clock, the Spyker paper's inter-region latencies.

    python -m devices.multiregion demos/scenarios/multiregion/digits-4regions.toml
    python -m devices.multiregion demos/scenarios/multiregion/digits-4regions.toml --quick

Theory of operation
-------------------
This driver runs on :mod:`devices.engine` (virtual clock, event queue, the
:class:`~devices.engine.RegionNetwork`, the training seed and hints) with the real
:class:`~edge_sdk.core.device.DeviceCore` and :class:`~coordinator.core.CoordinatorCore`
and real local training, in a fleet with **several coordinators** (strategy + peering per
coordinator from :func:`coordinator.methods.make_method`); tables and plots are
:mod:`devices.report`'s:

* **Regions.** Devices are spread evenly over the regions (device ``i`` lives in region
  ``i mod R``). A *multi-server* method (``spyker``, ``nebula``, ``hierfavg``) runs one
  coordinator per region, joined by its peering component; the *single-server* method
  runs one coordinator in ``single_server_region`` for every device (devices far away pay
  the long-haul latency on every request).
* **Network.** A message from endpoint a to b takes ``size / bandwidth`` on a's uplink
  (FIFO), the one-way latency between their regions (the diagonal for a device and its
  regional coordinator; the paper's Table 4), then ``size / bandwidth`` on b's downlink,
  which serves messages in the order they *arrive* (a nearby device's request does not
  queue behind a model still crossing an ocean). All links have ``bandwidth_mbps``
  (paper: 100 Mbit/s). Nothing is lost.
* **Coordinators have a CPU.** Every event a coordinator handles costs ``msg_ms`` plus
  ``service_ms`` per committed version (the paper's Table 3: 2 ms for an asynchronous
  aggregation or a server merge, 15 ms for a synchronous FedAvg aggregation); events
  queue while it is busy and its messages leave when the work is done. This is the
  bottleneck the paper's scaling experiment measures (a single asynchronous server
  saturates as clients grow).
* **Devices train continuously** (the paper's setting, not SPIN's sporadic labelling):
  every device holds its partition from the start, trains for a fixed per-device
  duration drawn from N(``train_delay_s.mean``, ``train_delay_s.sd``) on each model it
  pulls, and pulls again as soon as its update is acknowledged (the driver feeds a
  synthetic ``SampleAdded`` then — the samples are not changed). Training is real
  (``Task.local_update``), so accuracy is real; the learning rate comes from the model's
  hints (Spyker's per-client decay reaches the device that way).
* **Accuracy** of a multi-server method is the mean over the coordinators' deployed
  models on the held-out split (minimum and maximum are reported too); the time a
  target is reached is the latest commit time among the models evaluated.

Outputs (``--out``): ``time_to_target.md`` (the comparison at the base fleet size and the
scaling multipliers next to the paper's), ``accuracy.png``, ``scaling.png``, one JSON per
run and ``summary.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.core import (
    CommitVersion,
    CoordinatorConfig,
    CoordinatorCore,
    PersistUpdate,
    Snapshot,
)
from coordinator.methods import make_method
from devices.engine import Driver, Kind, RegionNetwork, job_seed, train_config
from devices.partition import partition
from devices.scenario import ScenarioError, Settings, parse_settings, read_toml, with_quick
from devices.simulator import RunResult
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
    TrainingFinished,
)
from edge_sdk.errors import ConfigError, LocalProtocolError
from edge_sdk.signing import Signer
from edge_sdk.tasks.base import Task, TrainConfig
from edge_sdk.wire import topics

__all__ = [
    "PAPER_LATENCY_MS",
    "PAPER_REGIONS",
    "Method",
    "MultiRegionScenario",
    "Topology",
    "load_multiregion",
    "main",
    "run_method",
]

PAPER_REGIONS = ("hongkong", "paris", "sydney", "california")
PAPER_LATENCY_MS = (
    (1.41, 194.9, 132.28, 155.13),
    (194.9, 0.9, 278.83, 142.25),
    (132.28, 278.83, 2.56, 138.47),
    (155.13, 142.25, 138.47, 2.14),
)
"""Spyker's Table 4 (upper triangle, made symmetric), one-way milliseconds."""
KINDS = ("spyker", "nebula", "single", "hierfavg")
SINGLE_ID = "server"
SINGLE_REGION = "global"

# --------------------------------------------------------------------------- scenario


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    regions: tuple[str, ...] = PAPER_REGIONS
    latency_ms: tuple[tuple[float, ...], ...] = PAPER_LATENCY_MS
    bandwidth_mbps: float = 100.0

    def __post_init__(self) -> None:
        n = len(self.regions)
        if n < 1 or len(set(self.regions)) != n:
            raise ConfigError("regions must be distinct and at least one")
        for r in self.regions:
            topics.check_id(r, "region")
        if len(self.latency_ms) != n or any(len(row) != n for row in self.latency_ms):
            raise ConfigError(f"latency_ms must be a {n}×{n} matrix")
        for i in range(n):
            for j in range(n):
                if not (self.latency_ms[i][j] >= 0 and math.isfinite(self.latency_ms[i][j])):
                    raise ConfigError("latencies must be finite and >= 0")
        if not self.bandwidth_mbps > 0:
            raise ConfigError("bandwidth_mbps must be > 0")

    def latency_s(self, a: int, b: int) -> float:
        return self.latency_ms[a][b] / 1000.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Method:
    label: str
    kind: str
    """``spyker`` | ``nebula`` | ``hierfavg`` (one coordinator per region) | ``single``."""
    strategy: str = ""
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    peering_params: Mapping[str, Any] = field(default_factory=dict)
    service_ms: float = 2.0
    msg_ms: float = 0.05

    @property
    def strategy_name(self) -> str:
        return self.strategy or {"single": "fedasync"}.get(self.kind, self.kind)


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiRegionScenario:
    name: str
    description: str
    settings: Settings
    topology: Topology
    methods: tuple[Method, ...]
    device_counts: tuple[int, ...]
    single_server_region: str
    train_delay_mean_s: float = 0.15
    train_delay_sd_s: float = 0.0075
    stop_at_target: bool = True
    source: str = "<string>"
    raw: Mapping[str, Any] = field(default_factory=dict)

    def select(self, labels: Sequence[str]) -> MultiRegionScenario:
        chosen: list[Method] = []
        for name in labels:
            hits = [m for m in self.methods if name in (m.label, m.kind) and m not in chosen]
            if not hits:
                raise ScenarioError(f"{self.source}: no method {name!r}; methods: {[m.label for m in self.methods]}")
            chosen += hits
        return _replace(self, methods=tuple(chosen))


def _replace(sc: MultiRegionScenario, **changes: Any) -> MultiRegionScenario:
    import dataclasses

    return dataclasses.replace(sc, **changes)


_MR_KEYS = {"regions", "latency_ms", "bandwidth_mbps", "device_counts", "single_server_region", "train_delay_s", "stop_at_target"}
_METHOD_KEYS = {"label", "kind", "strategy", "strategy_params", "peering_params", "service_ms", "msg_ms"}


def load_multiregion(path: str | Path, *, quick: bool = False) -> MultiRegionScenario:
    """Read a multi-region scenario: the usual sections (``task``, ``[fleet]``, ``[data]``,
    ``[training]``, …; see :mod:`devices.scenario`) plus ``[multiregion]`` and
    ``[[methods]]``; ``[quick]`` overrides apply with ``quick=True``."""
    raw = read_toml(path)
    return parse_multiregion(with_quick(raw, source=str(path)) if quick else raw, source=str(path))


def parse_multiregion(raw_in: Mapping[str, Any], *, source: str = "<string>") -> MultiRegionScenario:
    raw: dict[str, Any] = copy.deepcopy(dict(raw_in))
    mr = raw.pop("multiregion", {})
    methods_raw = raw.pop("methods", None)
    raw.pop("quick", None)
    if not isinstance(mr, dict):
        raise ScenarioError(f"{source}: [multiregion] must be a table")
    unknown = set(mr) - _MR_KEYS
    if unknown:
        raise ScenarioError(f"{source}: [multiregion]: unknown keys {sorted(unknown)}; allowed: {sorted(_MR_KEYS)}")
    settings = parse_settings(raw, source=source)
    try:
        regions = tuple(mr.get("regions", PAPER_REGIONS))
        latency = tuple(tuple(float(x) for x in row) for row in mr.get("latency_ms", PAPER_LATENCY_MS))
        topology = Topology(regions=regions, latency_ms=latency, bandwidth_mbps=float(mr.get("bandwidth_mbps", 100.0)))
    except (ConfigError, TypeError, ValueError) as exc:
        raise ScenarioError(f"{source}: [multiregion]: {exc}") from None
    counts = tuple(int(n) for n in mr.get("device_counts", [settings.devices]))
    if not counts or any(n < len(regions) for n in counts):
        raise ScenarioError(f"{source}: device_counts must each be >= the number of regions")
    server = str(mr.get("single_server_region", regions[-1]))
    if server not in regions:
        raise ScenarioError(f"{source}: single_server_region {server!r} is not one of {list(regions)}")
    delay = mr.get("train_delay_s", {"mean": 0.15, "sd": 0.0075})
    if not isinstance(delay, dict) or not float(delay.get("mean", 0)) > 0 or float(delay.get("sd", 0)) < 0:
        raise ScenarioError(f"{source}: train_delay_s must be {{ mean = > 0, sd = >= 0 }}")
    if not isinstance(methods_raw, list) or not methods_raw:
        raise ScenarioError(f"{source}: needs at least one [[methods]] table")
    methods: list[Method] = []
    for i, m in enumerate(methods_raw):
        where = f"{source}: [[methods]] #{i + 1}"
        if not isinstance(m, dict) or set(m) - _METHOD_KEYS:
            raise ScenarioError(f"{where}: allowed keys are {sorted(_METHOD_KEYS)}")
        kind = m.get("kind")
        if kind not in KINDS:
            raise ScenarioError(f"{where}: kind must be one of {KINDS}")
        method = Method(
            label=str(m.get("label", kind)), kind=kind, strategy=str(m.get("strategy", "")),
            strategy_params=dict(m.get("strategy_params", {})), peering_params=dict(m.get("peering_params", {})),
            service_ms=float(m.get("service_ms", 2.0)), msg_ms=float(m.get("msg_ms", 0.05)),
        )
        try:  # validate names and parameters now, not an hour into a sweep
            make_method(method.strategy_name, peering=None if kind == "single" else kind, coordinator_id=regions[0],
                        ring=regions if kind != "single" else (), peering_params=method.peering_params,
                        strategy_params=_strategy_params(method, settings, devices_per_region=1))
        except ConfigError as exc:
            raise ScenarioError(f"{where}: {exc}") from None
        methods.append(method)
    if len({m.label for m in methods}) != len(methods):
        raise ScenarioError(f"{source}: method labels must be unique")
    return MultiRegionScenario(
        name=str(raw.get("name", "multiregion")), description=str(raw.get("description", "")), settings=settings,
        topology=topology, methods=tuple(methods), device_counts=counts, single_server_region=server,
        train_delay_mean_s=float(delay["mean"]), train_delay_sd_s=float(delay.get("sd", 0.0)),
        stop_at_target=bool(mr.get("stop_at_target", True)), source=source, raw=raw,
    )


def _strategy_params(method: Method, settings: Settings, *, devices_per_region: int) -> dict[str, Any]:
    params = dict(method.strategy_params)
    name = method.strategy_name
    if name == "spyker":
        params.setdefault("lr_init", settings.lr)
    if name in ("hierfavg", "fedavg"):  # synchronous edge rounds over every device of the region
        params.setdefault("select", devices_per_region)
        params.setdefault("min_devices", devices_per_region)
    return params


# --------------------------------------------------------------------------- the run


@dataclass(slots=True)
class _Device:
    index: int
    device_id: str
    region: int
    core: DeviceCore
    x: npt.NDArray[Any]
    y: npt.NDArray[np.int64]
    train_s: float
    timer_at: float | None = None
    total: int = 0
    trainings: int = 0


@dataclass(slots=True)
class _Coordinator:
    name: str
    region: int
    core: CoordinatorCore
    busy_until: float = 0.0
    timer_at: float | None = None
    commit_times: dict[int, float] = field(default_factory=lambda: {0: 0.0})
    busy_s: float = 0.0


class MultiRegionRun(Driver):
    """One method, one fleet size, one seed."""

    def __init__(self, task: Task, sc: MultiRegionScenario, method: Method, n_devices: int, seed: int,
                 progress: Callable[[float, Mapping[str, float]], None] | None = None) -> None:
        self.task, self.sc, self.method, self.seed, self.progress = task, sc, method, seed, progress
        s = sc.settings
        topo = sc.topology
        super().__init__()  # the engine's loop on a virtual clock
        self.defaults = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr)
        regions = topo.regions
        multi = method.kind != "single"
        data = task.data()
        pool = data.pool
        parts = partition(pool.y, n_devices, s.partition, seed=seed, alpha=s.alpha, labels_each=s.labels_each)
        initial = task.pretrained(seed=seed)
        self.initial_accuracy = float(task.evaluate(initial)["accuracy"])
        rng = random.Random(f"{seed}:multiregion")
        per_region = Counter(i % len(regions) for i in range(n_devices))
        # Coordinators.
        self.coords: list[_Coordinator] = []
        names = list(regions) if multi else [SINGLE_ID]
        for k, name in enumerate(names):
            region_index = k if multi else regions.index(sc.single_server_region)
            built = make_method(method.strategy_name, peering=method.kind if multi else None, coordinator_id=name,
                                ring=names, peering_params=method.peering_params, strategy_params=_strategy_params(
                                    method, s, devices_per_region=per_region[k] if multi else n_devices))
            strategy, peering = built.strategy, built.peering
            cfg = CoordinatorConfig(
                region=name if multi else SINGLE_REGION, coordinator_id=name, spec=task.spec,
                encoding=s.encoding,  # type: ignore[arg-type]
                hints={"epochs": float(s.epochs), "batch_size": float(s.batch_size), "lr": float(s.lr)},
                keep_versions=s.keep_versions,
                signer=Signer.generate(),  # peers verify each other's messages
            )
            core = CoordinatorCore(cfg, strategy, Snapshot(version=0, weights=initial),
                                   rng=random.Random(f"{seed}:coordinator:{name}"), peering=peering)
            self.coords.append(_Coordinator(name=name, region=region_index, core=core))
        # Devices.
        self.devices: list[_Device] = []
        for i, idx in enumerate(parts):
            home = i % len(regions)
            topic_region = regions[home] if multi else SINGLE_REGION
            dcfg = DeviceConfig(device_id=f"d{i:04d}", region=topic_region, spec=task.spec, min_samples=1,
                                request_timeout_s=s.request_timeout_s, max_backoff_s=max(60.0, s.request_timeout_s),
                                encoding=s.encoding,  # type: ignore[arg-type]
                                require_signature=False, serve_on_start=False)  # one trusted process
            train_s = max(0.01, rng.gauss(sc.train_delay_mean_s, sc.train_delay_sd_s))
            self.devices.append(_Device(
                index=i, device_id=dcfg.device_id, region=home, core=DeviceCore(dcfg, rng=random.Random(f"{seed}:core:{i}")),
                x=np.ascontiguousarray(pool.x[idx]), y=np.ascontiguousarray(pool.y[idx]), train_s=train_s,
            ))
        # Endpoints: devices 0..N-1, coordinators N..N+C-1.
        self.n = len(self.devices)
        self.network = RegionNetwork([d.region for d in self.devices] + [c.region for c in self.coords],
                                     topo.latency_ms, topo.bandwidth_mbps * 1e6)
        coord_of = {c.core.config.region: self.n + k for k, c in enumerate(self.coords)}
        for d in self.devices:
            r = d.core.config.region
            for leaf in topics.UPSTREAM:
                self.network.subscribe(topics.device_topic(r, d.device_id, leaf), [coord_of[r]])
            for leaf in topics.DOWNSTREAM:
                self.network.subscribe(topics.device_topic(r, d.device_id, leaf), [d.index])
        for k, c in enumerate(self.coords):
            for kind in ("beat", "model", "token", "rotate", "edge", "global"):
                self.network.subscribe(topics.peer_topic(c.name, kind), [self.n + k])
                self.network.subscribe(topics.peer_topic("all", kind), [self.n + j for j in range(len(self.coords))])
        self.rows: list[dict[str, float]] = []
        self.eval_cache: dict[tuple[int, int], float] = {}
        self.bytes_device = 0
        self.bytes_peer = 0
        self.updates = 0
        self.done_at: float | None = None

    # ------------------------------------------------------------------ plumbing

    def publish(self, sender: int, action: Publish, now: float) -> None:
        """Send a core's publish into the network (retained status: nobody listens here)."""
        size = len(action.payload)
        peer = sender >= self.n and action.topic.startswith(f"{topics.ROOT}/peer/")
        for receiver, at_broker in self.network.send(sender, action.topic, size, now):
            if peer:
                self.bytes_peer += size
            else:
                self.bytes_device += size
            self.push(at_broker, Kind.HOP, receiver, (action.topic, action.payload))

    def hop(self, receiver: int, now: float, data: tuple[str, bytes]) -> None:
        """At the receiver's side of the network: queue on its downlink in arrival order."""
        self.push(self.network.arrive(receiver, len(data[1]), now), Kind.MSG, receiver, data)

    def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
        if kind == Kind.EVAL:
            self.evaluate(now)
        elif kind == Kind.HOP:
            self.hop(target, now, data)
        elif target >= self.n:
            self.coordinator_event(target - self.n, now, kind, data)
        else:
            self.device_event(target, now, kind, data)

    # ------------------------------------------------------------------ coordinators

    def coordinator_event(self, k: int, now: float, kind: Kind, data: Any) -> None:
        c = self.coords[k]
        if now < c.busy_until:  # the coordinator's CPU is busy: queue behind the current work
            self.push(c.busy_until, kind, self.n + k, data)
            return
        if kind == Kind.TIMER:
            if c.timer_at != data:
                return
            c.timer_at = None
            actions = c.core.handle(TimerFired(now=now))
        elif kind == Kind.KICK:
            actions = c.core.start(now)
        else:
            topic, payload = data
            actions = c.core.handle(MessageReceived(now=now, topic=topic, payload=payload))
        commits = sum(isinstance(a, CommitVersion) for a in actions)
        cost = (self.method.msg_ms + self.method.service_ms * commits) / 1000.0
        done = now + cost
        c.busy_until = done
        c.busy_s += cost
        for a in actions:
            if isinstance(a, Publish):
                self.publish(self.n + k, a, done)
            elif isinstance(a, ScheduleTimer):
                c.timer_at = a.at
                self.push(max(a.at, done), Kind.TIMER, self.n + k, a.at)
            elif isinstance(a, CommitVersion):
                c.commit_times[a.version] = done
                if a.metadata.get("source") == "aggregation":
                    self.updates += int(a.metadata.get("n_updates", 0))
            elif isinstance(a, PersistUpdate | Notify):
                pass

    # ------------------------------------------------------------------ devices

    def device_event(self, i: int, now: float, kind: Kind, data: Any) -> None:
        d = self.devices[i]
        if kind == Kind.MSG:
            topic, payload = data
            actions = d.core.handle(MessageReceived(now=now, topic=topic, payload=payload))
        elif kind == Kind.TIMER:
            if d.timer_at != data:
                return
            d.timer_at = None
            actions = d.core.handle(TimerFired(now=now))
        elif kind == Kind.TRAINED:
            job_id, result = data
            actions = d.core.handle(TrainingFinished(now=now, job_id=job_id, weights=result.weights,
                                                     n_samples=result.n_samples, loss=result.loss, seconds=d.train_s))
        elif kind == Kind.KICK:
            d.total = int(d.y.shape[0])
            actions = d.core.handle(SampleAdded(now=now, total=d.total))
        else:  # pragma: no cover - kinds are private
            raise LocalProtocolError(f"unknown event kind {kind}")
        self.device_actions(d, actions, now)

    def device_actions(self, d: _Device, actions: Sequence[object], now: float) -> None:
        again = False
        for a in actions:
            if isinstance(a, Publish):
                self.publish(d.index, a, now)
            elif isinstance(a, ScheduleTimer):
                d.timer_at = a.at
                self.push(max(a.at, now), Kind.TIMER, d.index, a.at)
            elif isinstance(a, StartTraining):
                job = a.job
                cfg = train_config(job.hints, self.defaults, seed=job_seed(self.seed, d.index, job.job_id), group=job.group)
                result = self.task.local_update(job.weights, d.x, d.y, cfg)
                d.trainings += 1
                self.push(now + d.train_s, Kind.TRAINED, d.index, (job.job_id, result))
            elif isinstance(a, Notify) and a.kind in ("update_acked", "update_rejected"):
                again = True
            elif isinstance(a, DeployModel | PersistDeviceState | Notify):
                pass
        if again:  # continuous training: the device asks for the next model at once
            d.total += 1
            self.device_actions(d, d.core.handle(SampleAdded(now=now, total=d.total)), now)

    # ------------------------------------------------------------------ metrics

    def evaluate(self, now: float) -> None:
        accs = []
        committed = 0.0
        for k, c in enumerate(self.coords):
            key = (k, c.core.version)
            if key not in self.eval_cache:
                self.eval_cache[key] = float(self.task.evaluate(c.core.weights)["accuracy"])
            accs.append(self.eval_cache[key])
            committed = max(committed, c.commit_times.get(c.core.version, now))
        row = {
            "t_s": now,
            "committed_at_s": committed,
            "accuracy": float(np.mean(accs)),
            "accuracy_min": float(np.min(accs)),
            "accuracy_max": float(np.max(accs)),
            "version": float(np.mean([c.core.version for c in self.coords])),
            "updates": float(self.updates),
            "trainings": float(sum(d.trainings for d in self.devices)),
            "bytes_device": float(self.bytes_device),
            "bytes_peer": float(self.bytes_peer),
            "coordinator_utilisation": float(np.mean([c.busy_s for c in self.coords]) / now) if now > 0 else 0.0,
        }
        self.rows.append(row)
        if self.progress is not None:
            self.progress(now, row)
        if self.done_at is None and row["accuracy"] >= self.sc.settings.target_accuracy:
            self.done_at = now

    def run(self) -> RunResult:
        started = time.perf_counter()
        s = self.sc.settings
        jitter = random.Random(f"{self.seed}:start")
        for k in range(len(self.coords)):
            self.push(0.0, Kind.KICK, self.n + k, None)
        for d in self.devices:
            self.push(jitter.uniform(0, 0.05), Kind.KICK, d.index, None)
        n_evals = int(s.duration_s // s.eval_every_s)
        for k in range(n_evals + 1):
            self.push(k * s.eval_every_s, Kind.EVAL, -1, None)
        end = s.duration_s
        linger = 2 * s.eval_every_s
        while (kind := self.step(end)) is not None:
            if kind == Kind.EVAL and self.sc.stop_at_target and self.done_at is not None \
                    and self.clock.now >= self.done_at + linger:
                break
        wall = time.perf_counter() - started
        result = RunResult(label=self.method.label, strategy=self.method.kind, params=dict(self.method.strategy_params),
                           seed=self.seed, target_accuracy=s.target_accuracy, rows=self.rows)
        accs = [r["accuracy"] for r in self.rows]
        result.summary = {
            "devices": self.n,
            "coordinators": len(self.coords),
            "time_to_target_s": result.time_to_target,
            "initial_accuracy": self.initial_accuracy,
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "virtual_s": self.clock.now,
            "updates": self.updates,
            "trainings": sum(d.trainings for d in self.devices),
            "messages": self.network.messages,
            "bytes_device": self.bytes_device,
            "bytes_peer": self.bytes_peer,
            "coordinator_utilisation": self.rows[-1]["coordinator_utilisation"] if self.rows else None,
            "peering": [c.core.peering.describe() for c in self.coords],
            "wall_s": wall,
            "events": self.events,
        }
        return result


def run_method(task: Task, sc: MultiRegionScenario, method: Method, n_devices: int, seed: int,
               progress: Callable[[float, Mapping[str, float]], None] | None = None) -> RunResult:
    return MultiRegionRun(task, sc, method, n_devices, seed, progress).run()


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devices.multiregion", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("scenario", type=Path)
    p.add_argument("--methods", default="", help="comma-separated method labels or kinds (default: all)")
    p.add_argument("--devices", default="", help="fleet sizes, e.g. 100,200,300 (default: the scenario's device_counts)")
    p.add_argument("--seeds", default="", help="seeds, e.g. 0,1 or 0-4 (default: the scenario's)")
    p.add_argument("--duration", type=float, help="virtual seconds per run (cap)")
    p.add_argument("--quick", action="store_true", help="the scenario's [quick] variant")
    p.add_argument("--out", type=Path, help="output directory (default: runs/multiregion/<name>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the table and plots from the run JSONs already in --out/runs (e.g. after parallel sweeps)")
    args = p.parse_args(argv)
    from devices.report import (
        json_default,
        load_region_runs,
        load_task,
        parse_seeds,
        write_region_report,
    )
    from edge_sdk.trainer import configure_threads

    sc = load_multiregion(args.scenario, quick=args.quick)
    if args.methods:
        sc = sc.select([m.strip() for m in args.methods.split(",") if m.strip()])
    if args.devices:
        sc = _replace(sc, device_counts=tuple(int(n) for n in args.devices.split(",")))
    if args.seeds or args.duration:
        import dataclasses

        settings = sc.settings
        if args.seeds:
            settings = dataclasses.replace(settings, seeds=tuple(parse_seeds(args.seeds)))
        if args.duration:
            settings = dataclasses.replace(settings, duration_s=float(args.duration))
        sc = _replace(sc, settings=settings)
    out: Path = args.out or Path("runs") / "multiregion" / sc.name
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return write_region_report(sc, load_region_runs(out / "runs", sc), out)
    configure_threads(1)
    task = load_task(sc.settings.task)
    results: list[RunResult] = []
    total = len(sc.methods) * len(sc.device_counts) * len(sc.settings.seeds)
    print(f"{sc.name}: {total} run(s) → {out}", file=sys.stderr)
    for n in sc.device_counts:
        for m in sc.methods:
            for seed in sc.settings.seeds:
                def progress(now: float, row: Mapping[str, float], m: Method = m, n: int = n, seed: int = seed) -> None:
                    if not args.no_progress and int(now) % 10 == 0 and now == int(now):
                        print(f"  {m.label} · {n} devices · seed {seed}: t={now:.0f}s acc {row['accuracy']:.3f} "
                              f"(min {row['accuracy_min']:.3f}) updates {row['updates']:.0f}", file=sys.stderr)

                r = run_method(task, sc, m, n, seed, progress)
                results.append(r)
                ttt = r.time_to_target
                print(f"{m.label} · {n} devices · seed {seed}: time to target "
                      f"{'—' if ttt is None else f'{ttt:.1f} s'}, final {r.summary['final_accuracy']:.3f}, "
                      f"wall {r.summary['wall_s']:.0f} s", file=sys.stderr)
                slug = f"{m.label}__{n}__seed{seed}".replace(" ", "-").replace("/", "-")
                (out / "runs" / f"{slug}.json").write_text(json.dumps(r.to_json(), indent=1, default=json_default), encoding="utf-8")
    return write_region_report(sc, results, out)


if __name__ == "__main__":
    sys.exit(main())
