"""Scenarios: one TOML file says which fleet, which data, which strategies, how long.

A scenario is validated completely when it is loaded (every run, with its overrides), so
a typo fails in the first second with the file, the key and what was expected — not an
hour into a sweep. Layout (every table but ``[[runs]]`` is optional)::

    name = "headline"                     # defaults to the file name
    description = "…"
    task = "digits"                       # edge_sdk task name
    duration_s = 3600                     # virtual seconds per run
    eval_every_s = 30                     # accuracy of the deployed model on this schedule
    target_accuracy = 0.90                # for the time-to-target table
    seeds = [0, 1, 2]

    [fleet]
    devices = 100
    mix = { headset = 0.5, phone = 0.3, camera = 0.2 }   # shares of device profiles (normalised: they need not add up to 1);
                                          # `python -m devices.profiles` lists every built-in name below

    [profiles.headset]                    # override a built-in profile, or define one
    compute = { sample_epoch_s = 0.4 }    # a name from devices.profiles.COMPUTE or a table
    link = "wifi"                         # a name from LINKS or a table
    availability = "night"                # a name from AVAILABILITY or a table

    [data]
    partition = "dirichlet"               # iid | dirichlet | labels
    alpha = 1.0                           # Dirichlet concentration
    labels_each = 2                       # for partition = "labels"
    arrival_rate_per_h = 20               # λ: labels per device per hour (Poisson)
    order = "shuffled"                    # shuffled | by-class | given
    initial_samples = 0                   # labels each device already holds at t = 0

    [device]
    min_samples = 4                       # D_min
    request_timeout_s = 10.0
    reannounce_s = 600.0

    [training]
    epochs = 5
    batch_size = 16
    lr = 0.05
    mu = 0.0                              # FedProx proximal weight (a training hint; 0 = none)

    [coordinator]
    keep_versions = 32                    # global versions kept for staleness-aware strategies
    encoding = "f4"                       # f4 | f2 | i1 (model and update payloads)
    validation_size = 0                   # pool samples kept at the coordinator (no device labels them)
    gate = false                          # release gate: promote candidates only if not worse on validation
    gate_margin = 0.02                    # promote when candidate >= release - margin
    rollback_margin = 0.10                # reject (roll the training line back) below release - this
    gate_delay_s = 0.0                    # virtual seconds from a commit to its validation score
    pull_refill_s = 0.5                   # per-device pull token bucket (default: the coordinator's; 0 = no limit)
    pull_burst = 8

    [attack]                              # attacker devices (devices.attacks); disjoint fractions
    label_flip = 0.0                      # fraction training on flipped labels
    flip = "shift"                        # shift: y' = (y + 1) mod C | permutation: a fixed derangement
    scale = 0.0                           # fraction sending base + scale_factor * (trained - base)
    scale_factor = 1000.0
    huge_samples = 0.0                    # fraction claiming claimed_samples samples
    claimed_samples = 1000000

    reference = "honest"                  # a run label: the release report compares every run with it

    task_options = { size = [12000, 2000] }   # keyword arguments of the task (procdigits: train/test images)
    # [device] continuous = true: every sample from the start, a new round as soon as an update is acked

    [delay]                               # devices.stragglers (issue 15): late uploads of the class-c holders
    devices = 10                          # the devices holding the most samples of class c; 0 = off
    versions = 20                         # τ: their updates are held until the coordinator is τ versions past the base
    class = 8                             # class c (its accuracy is recorded for every committed version)
    report_versions = [25, 35]            # the report reads accuracy here; the run stops at the last one
    class_target = 0.5                    # time to this class-c accuracy

    [inversion]                           # coordinator.inversion.InversionConfig for gradient-inversion
    iterations = 100

    [quick]                               # what --quick changes (dotted keys)
    duration_s = 900
    seeds = [0]

    [[runs]]
    strategy = "spin"                     # a name from coordinator.strategies
    label = "SPIN K=10 π=20s"             # defaults to the strategy name; must be unique
    params = { k = 10, timeout_s = 20.0 }
    overrides = { "data.arrival_rate_per_h" = 40 }   # per-run changes to the settings above

A *regional* scenario (several coordinators, :class:`Regions`) has ``[multiregion]`` and
``[[methods]]`` instead of ``[[runs]]`` (both kinds of line are a :class:`RunSpec`)::

    [multiregion]
    regions = ["hongkong", "paris"]       # default: the Spyker paper's four
    latency_ms = [[1.4, 194.9], [194.9, 0.9]]   # one-way, region × region
    bandwidth_mbps = 100
    device_counts = [100, 200]            # one run per fleet size (device i in region i mod R)
    single_server_region = "paris"        # where a method without peering runs its one server
    train_delay_s = { mean = 0.15, sd = 0.0075 }   # virtual seconds per local update
    stop_at_target = true

    [multiregion.cost]                    # optional: a cost model (summaries then report cost)
    resources = ["a100", "rtx4090"]       # what a device may train on (NebulaFL's resources)
    speed = [2.0, 1.0]                    # × the device's train_delay_s speed
    price_per_s = [[3e-4, 1e-4], [3.3e-4, 1.1e-4]]   # per compute second: region × resource (or one row for all)
    transfer_per_gb = 0.02                # per GB moved between regions (or a region × region matrix)
    default_resource = "rtx4090"          # a device's resource when its coordinator sends no ``resource`` hint

    [[methods]]
    label = "Spyker"
    kind = "spyker"                       # spyker | nebula | hierfavg (a coordinator per region) | single
    strategy = ""                         # default: the kind's own (single: fedasync)
    strategy_params = { eta = 0.6 }
    peering_params = { beacon_s = 1.0 }
    service_ms = 2                        # coordinator CPU per committed version
    msg_ms = 0.05                         # coordinator CPU per event

:func:`materialise` (:func:`materialise_regions`) turns settings + a seed into the concrete
fleet (profiles drawn, data partitioned, labelling times drawn) that a driver — the
virtual-clock fleet runner :mod:`devices.simulator`, or a real-MQTT fleet — then plays.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import random
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from coordinator.canary import CanaryConfig
from coordinator.gate import GateConfig
from coordinator.inversion import InversionConfig
from coordinator.methods import make_method
from coordinator.peering import PEERINGS
from coordinator.strategies import COMPANIONS, Strategy, strategy_names
from coordinator.strategies.params import did_you_mean
from devices.attacks import AttackPlan
from devices.labelling import STREAM_ORDERS, arrival_times, stream_order
from devices.partition import partition
from devices.profiles import (
    AVAILABILITY,
    COMPUTE,
    LINKS,
    PROFILES,
    Availability,
    ComputeProfile,
    DeviceInstance,
    DeviceProfile,
    LinkProfile,
    OfflineWindows,
    fleet_counts,
)
from devices.stragglers import DelayPlan
from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import TaskData, TrainConfig
from edge_sdk.tasks.registry import default_train_config, sample_kind_of
from edge_sdk.wire import topics

__all__ = [
    "PAPER_LATENCY_MS",
    "PAPER_REGIONS",
    "CostModel",
    "DevicePlan",
    "Method",
    "Regions",
    "RunSpec",
    "Scenario",
    "ScenarioError",
    "Settings",
    "Topology",
    "check_task_fits",
    "gate_config",
    "holdout",
    "load_scenario",
    "materialise",
    "materialise_regions",
    "method_stem",
    "parse_cost",
    "parse_scenario",
    "slug",
]


class ScenarioError(ConfigError):
    """A scenario file is missing, unreadable or has an invalid value (message says where).
    The CLI exits with :attr:`exit_code`, 2 as for an option wrong on its face (argparse's usage
    error, and ``python -m devices.multiregion``'s): running it again fails the same way."""

    exit_code = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a run needs besides its strategy: validated, immutable."""

    task: str = "digits"
    duration_s: float = 3600.0
    eval_every_s: float = 30.0
    target_accuracy: float = 0.9
    seeds: tuple[int, ...] = (0,)
    devices: int = 100
    mix: Mapping[str, float] = field(default_factory=lambda: {"phone": 1.0})
    profiles: Mapping[str, DeviceProfile] = field(default_factory=lambda: dict(PROFILES))
    partition: str = "dirichlet"
    alpha: float = 1.0
    labels_each: int = 2
    arrival_rate_per_h: float = 20.0
    order: str = "shuffled"
    initial_samples: int = 0
    """Labels each device already holds at t = 0 (the SPIN paper's clients own their partition)."""
    min_samples: int = 4
    request_timeout_s: float = 10.0
    reannounce_s: float = 600.0
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.05
    mu: float = 0.0
    """FedProx proximal weight sent to devices as the ``mu`` hint (0: none, no hint)."""
    keep_versions: int = 32
    encoding: str = "f4"
    validation_size: int = 0
    gate: bool = False
    gate_margin: float = 0.02
    rollback_margin: float = 0.10
    gate_delay_s: float = 0.0
    gate_z: float = 1.0
    """The gate's paired one-sided bound z (``GateConfig.paired_z``; the daemon's ``--gate-z``)."""
    canary: float = 0.0
    """Canary cohort fraction (federated test-then-train evaluation; 0: off)."""
    canary_samples: int = 20
    canary_min_reports: int = 3
    canary_deadline_s: float = 600.0
    pull_limits: Mapping[str, float] = field(default_factory=dict)
    """``pull_burst`` / ``pull_refill_s`` for the coordinators when the scenario sets them."""
    attack: AttackPlan = field(default_factory=AttackPlan)
    task_options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of the task (e.g. procdigits ``size = [train, test]``)."""
    continuous: bool = False
    """Devices hold all their samples from the start and pull again as soon as an update is acked."""
    delay: DelayPlan = field(default_factory=DelayPlan)
    inversion: Mapping[str, Any] = field(default_factory=dict)
    """``coordinator.inversion.InversionConfig`` fields for the gradient-inversion converter."""

    @property
    def arrival_rate_per_s(self) -> float:
        return self.arrival_rate_per_h / 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """One line of a comparison: a strategy with its parameters, on (possibly overridden)
    settings — a ``[[runs]]`` table, or a ``[[methods]]`` table of a regional scenario."""

    label: str
    strategy: str
    params: Mapping[str, Any]
    settings: Settings
    overrides: Mapping[str, Any] = field(default_factory=dict)
    peering: str | None = None
    """Regional scenarios: one coordinator per region joined by this peering (``spyker``,
    ``nebula``, ``hierfavg``); None: one coordinator for every device."""
    peering_params: Mapping[str, Any] = field(default_factory=dict)
    service_ms: float = 0.0
    """Coordinator CPU per committed version (virtual ms); 0: a coordinator is never busy."""
    msg_ms: float = 0.0
    """Coordinator CPU per handled event (virtual ms)."""
    regional: bool = False
    """A ``[[methods]]`` line: runs on the scenario's regions (:class:`Regions`)."""

    @property
    def kind(self) -> str:
        """``spyker`` | ``nebula`` | ``hierfavg`` (one coordinator per region) | ``single``."""
        return self.peering or "single"

    def coordinator_params(self, devices_served: int, *, cost: CostModel | None = None, region: int = 0) -> dict[str, Any]:
        """The strategy's parameters in a regional run, with the defaults that depend on
        the fleet: Spyker's η_init is the scenario's lr; a synchronous round (``hierfavg``,
        ``fedavg``) waits for every device the coordinator serves; NebulaFL's cost-aware
        resource choice gets the cost model's catalogue (speeds, ``region``'s prices)."""
        params = dict(self.params)
        if self.strategy == "nebula" and params.get("resources") == "cost" and cost is not None:
            params.setdefault("resource_speeds", cost.speed)
            params.setdefault("resource_prices", cost.price_per_s[region])
        if self.strategy == "spyker":
            params.setdefault("lr_init", self.settings.lr)
        if self.strategy in ("hierfavg", "fedavg"):
            params.setdefault("select", devices_served)
            params.setdefault("min_devices", devices_served)
        return params


def check_devices_per_round(where: str, strategy: Strategy, coordinator: str, devices: int) -> None:
    """ScenarioError when ``strategy`` waits for more devices than ``coordinator`` serves (the
    run went to its end with 0 versions and 0 updates, reported as a result)."""
    need = strategy.devices_per_round()
    if need is not None and need[0] > devices:
        raise ScenarioError(f"{where}: {strategy.name} starts a round only once {need[0]} devices wait with new data "
                            f"({need[1]} = {need[0]}), but {coordinator} serves {devices}: it would never make a version; "
                            f"set params.{need[1]} to at most {devices}")


Method = RunSpec
"""A regional scenario's ``[[methods]]`` line (the same type as a ``[[runs]]`` line)."""

PAPER_REGIONS = ("hongkong", "paris", "sydney", "california")
PAPER_LATENCY_MS = (
    (1.41, 194.9, 132.28, 155.13),
    (194.9, 0.9, 278.83, 142.25),
    (132.28, 278.83, 2.56, 138.47),
    (155.13, 142.25, 138.47, 2.14),
)
"""Spyker's Table 4 (upper triangle, made symmetric), one-way milliseconds."""


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
        if not all(x >= 0 and math.isfinite(x) for row in self.latency_ms for x in row):
            raise ConfigError("latencies must be finite and >= 0")
        if not self.bandwidth_mbps > 0:
            raise ConfigError("bandwidth_mbps must be > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Regions:
    """``[multiregion]``: where devices and coordinators live and how the fleet trains.

    Devices are spread evenly (device ``i`` in region ``i mod R``), hold their partition
    from the start and train continuously, ``train_delay_s`` per local update; a run with
    a peering runs one coordinator per region, one without runs a single coordinator in
    ``single_server_region``; a run stops ``2 × eval_every_s`` after it reaches the target
    when ``stop_at_target``."""

    topology: Topology
    device_counts: tuple[int, ...]
    single_server_region: str
    train_delay_mean_s: float = 0.15
    train_delay_sd_s: float = 0.0075
    stop_at_target: bool = True
    cost: CostModel | None = None
    """``[multiregion.cost]``: what compute and inter-region transfer cost (None: not modelled)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """``[multiregion.cost]``: resources a device may train on (a speed factor each), their
    price per compute second in each region, and the price per GB moved between regions.
    A device trains ``train_s / speed`` on its resource: the one its coordinator names in the
    ``resource`` training hint (NebulaFL's cost-aware assignment), else ``default_resource``.
    Compute is charged when a training starts (its whole duration: the resource is rented for
    it); transfer per message that crosses regions, by size."""

    resources: tuple[str, ...]
    speed: tuple[float, ...]
    price_per_s: tuple[tuple[float, ...], ...]
    """Region × resource."""
    transfer_per_gb: tuple[tuple[float, ...], ...]
    """Region × region (the diagonal is free: only traffic between regions is charged)."""
    default_resource: int = 0

    def resource(self, hints: Mapping[str, float]) -> int:
        """The resource a job runs on: its ``resource`` hint if it names one, else the default."""
        raw = hints.get("resource")
        if raw is None or not float(raw).is_integer() or not 0 <= int(raw) < len(self.resources):
            return self.default_resource
        return int(raw)

    def compute(self, region: int, resource: int, seconds: float) -> float:
        return seconds * self.price_per_s[region][resource]

    def transfer(self, src: int, dst: int, size: int) -> float:
        return 0.0 if src == dst else size / 1e9 * self.transfer_per_gb[src][dst]


def parse_cost(raw: Any, n_regions: int, where: str) -> CostModel:
    """Validate a ``[multiregion.cost]`` table for ``n_regions`` regions."""
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where} must be a table")
    _check_keys(raw, {"resources", "speed", "price_per_s", "transfer_per_gb", "default_resource"}, where, "keys")
    names = raw.get("resources")
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise ScenarioError(f"{where}: resources must be a non-empty list of distinct names")
    k = len(names)

    def numbers(value: Any, what: str, lo_open: bool) -> tuple[float, ...]:
        if not isinstance(value, list) or not all(_is_number(x) for x in value):  # (not "2", nor true)
            raise ScenarioError(f"{where}: {what} must be numbers, got {value!r}")
        out = tuple(float(x) for x in value)
        if not all(math.isfinite(x) and (x > 0 if lo_open else x >= 0) for x in out):
            raise ScenarioError(f"{where}: {what} must be finite and {'> 0' if lo_open else '>= 0'}")
        return out

    def matrix(value: Any, what: str, cols: int) -> tuple[tuple[float, ...], ...]:
        if isinstance(value, int | float):
            one = numbers([value], what, False)[0]
            return tuple((one,) * cols for _ in range(n_regions))
        if isinstance(value, list) and value and not isinstance(value[0], list):
            value = [value] * n_regions
        if not isinstance(value, list) or len(value) != n_regions:
            raise ScenarioError(f"{where}: {what} must have one row per region ({n_regions})")
        rows = tuple(numbers(row, what, False) for row in value)
        if any(len(row) != cols for row in rows):
            raise ScenarioError(f"{where}: each row of {what} needs {cols} entries")
        return rows

    speed = numbers(raw.get("speed", [1.0] * k), "speed", True)
    if len(speed) != k:
        raise ScenarioError(f"{where}: speed needs one entry per resource ({k})")
    if "price_per_s" not in raw:
        raise ScenarioError(f"{where}: price_per_s is required")
    default = str(raw.get("default_resource", names[0]))
    if default not in names:
        raise ScenarioError(f"{where}: default_resource {default!r} is not one of {names}")
    return CostModel(resources=tuple(map(str, names)), speed=speed, price_per_s=matrix(raw["price_per_s"], "price_per_s", k),
                     transfer_per_gb=matrix(raw.get("transfer_per_gb", 0.0), "transfer_per_gb", n_regions),
                     default_resource=names.index(default))


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    description: str
    settings: Settings
    runs: tuple[RunSpec, ...]
    raw: Mapping[str, Any]
    source: str = "<string>"
    reference: str = ""
    """A run label the release report compares every run with ("" = no release report)."""
    regions: Regions | None = None
    """A regional scenario's ``[multiregion]`` (None: one region, one coordinator)."""

    @property
    def methods(self) -> tuple[RunSpec, ...]:
        return self.runs

    def _regions(self) -> Regions:
        if self.regions is None:
            raise ScenarioError(f"{self.source}: not a regional scenario (no [multiregion])")
        return self.regions

    topology = property(lambda self: self._regions().topology)
    device_counts = property(lambda self: self._regions().device_counts)

    def quick(self) -> Scenario:
        """The ``[quick]`` variant (shorter, fewer seeds) of this scenario."""
        return parse_scenario(with_quick(self.raw, source=self.source), source=f"{self.source} (quick)")

    def with_overrides(self, overrides: Mapping[str, Any]) -> Scenario:
        """This scenario with dotted-key overrides applied to every run (validated again)."""
        raw = _apply_overrides(self.raw, overrides, f"{self.source}: overrides")
        names = [r.label for r in self.runs]
        return parse_scenario(raw, source=self.source).select(names)

    def with_seeds(self, seeds: Sequence[int]) -> Scenario:
        return self.with_overrides({"seeds": list(seeds)})

    def with_device_counts(self, counts: Sequence[int]) -> Scenario:
        return dataclasses.replace(self, regions=dataclasses.replace(self._regions(), device_counts=tuple(counts)))

    def names_in(self, text: str) -> list[str]:
        """Split a comma-separated ``--strategies`` / ``--methods`` value into names, where a run
        label may itself hold commas ("SPIN, λ=5/h"): at each piece the longest run of pieces that
        names a run wins; an unknown piece stays alone (for :meth:`select` to name it)."""
        known = {r.label for r in self.runs} | {r.strategy for r in self.runs} | ({r.kind for r in self.runs} if self.regions else set())
        pieces = text.split(",")
        out: list[str] = []
        i = 0
        while i < len(pieces):
            j = next((j for j in range(len(pieces), i, -1) if ",".join(pieces[i:j]).strip() in known), i + 1)
            if name := ",".join(pieces[i:j]).strip():
                out.append(name)
            i = j
        return out

    def select(self, names: Sequence[str]) -> Scenario:
        """Only the runs whose label, strategy or kind is in ``names`` (order of ``names``)."""
        chosen: list[RunSpec] = []
        for name in names:
            hits = [r for r in self.runs if name in (r.label, r.strategy, r.kind if self.regions else r.label) and r not in chosen]
            if not hits:
                known = sorted({r.label for r in self.runs} | {r.strategy for r in self.runs})
                what = "method" if self.regions else "run"
                raise ScenarioError(f"{self.source}: no {what} named {name!r}; {what}s: {', '.join(known)}")
            chosen.extend(hits)
        return dataclasses.replace(self, runs=tuple(chosen))


# --------------------------------------------------------------------------- loading


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file. Raises :class:`ScenarioError` with the location."""
    return parse_scenario(read_toml(path), source=str(Path(path)))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A scenario file's table (``name`` defaults to the file's stem); every scenario
    flavour (single- and multi-region) reads its file through here."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"scenario file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from exc
    raw.setdefault("name", p.stem)
    return raw


def parse_settings(raw: Mapping[str, Any], *, source: str = "<string>") -> Settings:
    """The fleet, data, device, training and coordinator settings shared by every scenario
    flavour (a multi-region scenario has no ``[[runs]]``)."""
    _check_keys(raw, _TOP, source, "top level")
    return _settings(raw, source)


def with_quick(raw: Mapping[str, Any], *, source: str = "<string>") -> dict[str, Any]:
    """``raw`` with its ``[quick]`` dotted-key overrides applied (and the table removed). The
    description, written for the full run ("5 seeds × 1 virtual hour"), is prefixed with what
    the quick form changes, unless ``[quick]`` gives its own."""
    quick = raw.get("quick", {})
    out = _apply_overrides(raw, quick, f"{source}: [quick]")
    out.pop("quick", None)
    if isinstance(quick, Mapping) and quick and "description" not in quick and out.get("description"):
        changes = "; ".join(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in quick.items())
        out["description"] = f"Quick form ({changes}) of this scenario; the rest describes the full run:\n{out['description']}"
    return out


_TOP = {"name", "description", "task", "duration_s", "eval_every_s", "target_accuracy", "seeds",
        "fleet", "profiles", "data", "device", "training", "coordinator", "attack", "quick", "runs",
        "task_options", "delay", "inversion",
        "reference", "multiregion", "methods"}
_RUN_KEYS = {"strategy", "label", "params", "overrides"}
_SCENARIO_WIDE = {"seeds", "name", "description", "reference", "multiregion", "methods"}
"""Top-level keys a ``[[runs]]`` line's overrides may not change: the scenario's, not a run's."""
_BOTH_KINDS = ("{source}: has both [[runs]] and [[methods]] / [multiregion]: a one-region scenario has [[runs]], a regional one "
               "[multiregion] and [[methods]] (the other tables would be ignored)")


def slug(label: str) -> str:
    """A run label or scenario name as a file name: a ``[[runs]]`` line's runs are stored as
    ``runs/<slug>__seed<k>.json`` / ``.csv``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"


def method_stem(label: str) -> str:
    """A ``[[methods]]`` line's label in its run files' names (``<stem>__<devices>__seed<k>``)."""
    return label.replace(" ", "-").replace("/", "-")


def _one_file_name_each(stems: dict[str, str], label: str, stem: str, where: str) -> None:
    """Refuse a label whose run files would be another label's (``stems``: stem → label so far)."""
    if stem in stems:
        raise ScenarioError(f"{where}: labels {stems[stem]!r} and {label!r} both name their run files {stem!r} (in runs/): "
                            "make them differ in a letter or digit")
    stems[stem] = label


def parse_scenario(raw: Mapping[str, Any], *, source: str = "<string>") -> Scenario:
    """Validate a scenario given as the dict a TOML file parses to: ``[[runs]]`` (one region,
    one coordinator), or ``[multiregion]`` with ``[[methods]]`` (regions, see :class:`Regions`)."""
    settings = parse_settings(raw, source=source)
    if "multiregion" in raw or "methods" in raw:
        return _parse_regional(raw, settings, source)
    runs_raw = raw.get("runs")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise ScenarioError(f"{source}: needs at least one [[runs]] table (strategy = \"spin\", …)")
    runs: list[RunSpec] = []
    labels: set[str] = set()
    stems: dict[str, str] = {}
    for i, run in enumerate(runs_raw):
        where = f"{source}: [[runs]] #{i + 1}"
        if not isinstance(run, dict):
            raise ScenarioError(f"{where}: must be a table")
        _check_keys(run, _RUN_KEYS, source, f"[[runs]] #{i + 1}")
        strategy = run.get("strategy")
        if not isinstance(strategy, str):
            raise ScenarioError(f"{where}: strategy must be one of {', '.join(strategy_names())}")
        params = run.get("params", {})
        if not isinstance(params, dict):
            raise ScenarioError(f"{where}: params must be a table")
        try:
            built = make_method(strategy, params=params)  # validates names, parameter names, ranges and pairing
        except ConfigError as exc:
            raise ScenarioError(f"{where}: {exc}") from None
        label = run.get("label", strategy)
        if not isinstance(label, str) or not label:
            raise ScenarioError(f"{where}: label must be a non-empty string")
        if label in labels:
            raise ScenarioError(f"{where}: duplicate label {label!r} (give each run its own label)")
        labels.add(label)
        _one_file_name_each(stems, label, f"{slug(label)}__seed<k>", where)
        overrides = run.get("overrides", {})
        if not isinstance(overrides, dict):
            raise ScenarioError(f"{where}: overrides must be a table of dotted keys")
        for dotted in overrides:
            if dotted.split(".")[0] in _SCENARIO_WIDE:  # (the run would have run with the scenario's)
                raise ScenarioError(f"{where}: overrides: {dotted!r} is the scenario's, not a run's: every run has the scenario's "
                                    f"{', '.join(sorted(_SCENARIO_WIDE))} (a run overrides its settings: task, duration_s, "
                                    "[fleet], [data], [training], …)")
        run_settings = settings
        if overrides:
            patched = _apply_overrides(raw, overrides, f"{where}: overrides")
            run_settings = parse_settings(patched, source=f"{where} (with overrides)")  # a misspelled key too
        check_devices_per_round(where, built.strategy, "the coordinator", run_settings.devices)
        runs.append(RunSpec(label=label, strategy=strategy, params=dict(params), settings=run_settings, overrides=dict(overrides)))
    name = raw.get("name", "scenario")
    description = raw.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise ScenarioError(f"{source}: name and description must be strings")
    _check_quick(raw, source)
    reference = raw.get("reference", "")
    if not isinstance(reference, str) or (reference and reference not in labels):
        raise ScenarioError(f"{source}: reference must be one of the run labels ({', '.join(sorted(labels))}), got {reference!r}")
    return Scenario(name=name, description=description, settings=settings, runs=tuple(runs), raw=copy.deepcopy(dict(raw)), source=source,
                    reference=reference)


def _check_quick(raw: Mapping[str, Any], source: str, *, regional: bool = False) -> None:
    """``[quick]``, checked whether or not --quick is asked for: its settings (the runs' own
    overrides were checked on the full form), or a regional scenario's whole quick form."""
    if "quick" in raw:
        if not isinstance(raw["quick"], dict):
            raise ScenarioError(f"{source}: [quick] must be a table of dotted keys")
        if regional:
            parse_scenario(with_quick(raw, source=source), source=f"{source}: [quick]")
        else:
            parse_settings(_apply_overrides(raw, raw["quick"], f"{source}: [quick]"), source=f"{source}: [quick]")


_MR_KEYS = {"regions", "latency_ms", "bandwidth_mbps", "device_counts", "single_server_region", "train_delay_s", "stop_at_target", "cost"}
_METHOD_KEYS = {"label", "kind", "strategy", "strategy_params", "peering_params", "service_ms", "msg_ms"}
KINDS = (*(p for p in PEERINGS if p != "none"), "single")
"""A regional method's ``kind``: a peering (a coordinator per region), or ``single`` (one server)."""


def _parse_regional(raw: Mapping[str, Any], settings: Settings, source: str) -> Scenario:
    mr = raw.get("multiregion", {})
    if not isinstance(mr, dict):
        raise ScenarioError(f"{source}: [multiregion] must be a table")
    if "runs" in raw:
        raise ScenarioError(_BOTH_KINDS.format(source=source))
    if "reference" in raw:
        raise ScenarioError(f"{source}: reference is for [[runs]] scenarios (the release report); a regional scenario has none")
    _check_keys(mr, _MR_KEYS, source, "[multiregion]")
    where = f"{source}: [multiregion]"
    regions = mr.get("regions", list(PAPER_REGIONS))
    if not isinstance(regions, list) or not regions or not all(isinstance(r, str) for r in regions):
        raise ScenarioError(f"{where}: regions must be a non-empty list of region names, got {regions!r}")
    latency_raw = mr.get("latency_ms", [list(row) for row in PAPER_LATENCY_MS])
    n = len(regions)
    if (not isinstance(latency_raw, list) or len(latency_raw) != n
            or not all(isinstance(row, list) and len(row) == n and all(_is_number(x) for x in row) for row in latency_raw)):
        raise ScenarioError(f"{where}: latency_ms must be a {n}×{n} matrix of numbers (one row per region), got {latency_raw!r}")
    bandwidth = _num(mr, "bandwidth_mbps", 100.0, where, lo=0, lo_open=True)
    try:
        topology = Topology(regions=tuple(regions), latency_ms=tuple(tuple(float(x) for x in row) for row in latency_raw),
                            bandwidth_mbps=bandwidth)
    except ConfigError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    counts = mr.get("device_counts", [settings.devices])
    if not isinstance(counts, list) or not counts or not all(_is_int(c) for c in counts):
        raise ScenarioError(f"{where}: device_counts must be a list of fleet sizes (integers), got {counts!r}")
    if any(c < n for c in counts):
        raise ScenarioError(f"{where}: device_counts must each be >= the number of regions ({n}), got {counts}")
    if repeated := sorted({c for c in counts if counts.count(c) > 1}):
        raise ScenarioError(f"{where}: device_counts: {', '.join(map(str, repeated))} given more than once")
    server = _choice(mr, "single_server_region", regions[-1], where, options=regions)
    delay = mr.get("train_delay_s", {"mean": 0.15, "sd": 0.0075})
    if not isinstance(delay, dict):
        raise ScenarioError(f"{where}: train_delay_s must be a table {{ mean = …, sd = … }} (virtual seconds per local update), "
                            f"got {delay!r}")
    _check_keys(delay, {"mean", "sd"}, source, "[multiregion] train_delay_s")
    if "mean" not in delay:
        raise ScenarioError(f"{where} train_delay_s: needs mean (virtual seconds per local update)")
    delay_mean = _num(delay, "mean", 0.15, f"{where} train_delay_s", lo=0, lo_open=True)
    delay_sd = _num(delay, "sd", 0.0, f"{where} train_delay_s", lo=0)
    stop_at_target = _bool(mr, "stop_at_target", True, where)
    cost = parse_cost(mr["cost"], n, f"{source}: [multiregion.cost]") if "cost" in mr else None
    methods_raw = raw.get("methods")
    if not isinstance(methods_raw, list) or not methods_raw:
        raise ScenarioError(f"{source}: needs at least one [[methods]] table")
    methods: list[RunSpec] = []
    stems: dict[str, str] = {}
    for i, m in enumerate(methods_raw):
        where = f"{source}: [[methods]] #{i + 1}"
        if not isinstance(m, dict):
            raise ScenarioError(f"{where}: must be a table (keys: {', '.join(sorted(_METHOD_KEYS))})")
        _check_keys(m, _METHOD_KEYS, source, f"[[methods]] #{i + 1}")
        kind = _choice(m, "kind", "", where, options=KINDS)
        peering = None if kind == "single" else kind
        strategy = m.get("strategy", "")
        if not isinstance(strategy, str):
            raise ScenarioError(f"{where}: strategy must be a strategy name such as \"fedasync\", got {strategy!r}")
        strategy = strategy or ("fedasync" if peering is None else peering)
        if strategy == peering and COMPANIONS.get(peering) != peering:  # e.g. a peering that works with any strategy
            raise ScenarioError(f"{where}: kind {kind!r} has no strategy of its own: name one (strategy = \"fedasync\", …)")
        label = m.get("label", kind)
        if not isinstance(label, str) or not label:
            raise ScenarioError(f"{where}: label must be a non-empty string, got {label!r}")
        tables = {}
        for key in ("strategy_params", "peering_params"):
            tables[key] = m.get(key, {})
            if not isinstance(tables[key], dict):
                raise ScenarioError(f"{where}: {key} must be a table of parameters, got {tables[key]!r}")
        if label not in {m.label for m in methods}:  # (a repeated label: said below)
            _one_file_name_each(stems, label, f"{method_stem(label)}__<devices>__seed<k>", where)
        method = RunSpec(
            label=label, strategy=strategy, params=dict(tables["strategy_params"]), settings=settings, peering=peering, regional=True,
            peering_params=dict(tables["peering_params"]), service_ms=_num(m, "service_ms", 2.0, where, lo=0),
            msg_ms=_num(m, "msg_ms", 0.05, where, lo=0),
        )
        try:  # validate names and parameters now, not an hour into a sweep
            make_method(method.strategy, peering=peering, coordinator_id=regions[0], ring=tuple(regions) if peering else (),
                        peering_params=method.peering_params, strategy_params=method.coordinator_params(1, cost=cost))
        except ConfigError as exc:
            raise ScenarioError(f"{where}: {exc}") from None
        methods.append(method)
    if len({m.label for m in methods}) != len(methods):
        raise ScenarioError(f"{source}: method labels must be unique")
    name, description = raw.get("name", "multiregion"), raw.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise ScenarioError(f"{source}: name and description must be strings")
    _check_quick(raw, source, regional=True)
    return Scenario(
        name=name, description=description, settings=settings,
        runs=tuple(methods), raw=copy.deepcopy(dict(raw)), source=source,
        regions=Regions(topology=topology, device_counts=tuple(counts), single_server_region=server,
                        train_delay_mean_s=delay_mean, train_delay_sd_s=delay_sd, stop_at_target=stop_at_target, cost=cost),
    )


def _is_number(value: Any) -> bool:
    """An int or float as TOML reads them (not a bool, which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(table: Mapping[str, Any], allowed: set[str], source: str, where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; allowed: {', '.join(sorted(allowed))}"
            raise ScenarioError(f"{source}: {where}: unknown key {key!r}{extra}")


def _apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A deep copy of ``raw`` with ``{"section.key": value}`` (or nested tables) applied."""
    out: dict[str, Any] = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        if isinstance(value, dict) and dotted in _SECTIONS:
            for k, v in value.items():
                out.setdefault(dotted, {})[k] = v
            continue
        parts = dotted.split(".")
        if parts[0] in ("runs", "quick"):
            raise ScenarioError(f"{where}: cannot override {dotted!r}")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ScenarioError(f"{where}: {dotted!r}: {part!r} is not a table")
            node = child
        node[parts[-1]] = value
    return out


def _num(table: Mapping[str, Any], key: str, default: float, where: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    value = table.get(key, default)
    if not _is_number(value) or not math.isfinite(value):
        raise ScenarioError(f"{where}: {key} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ScenarioError(f"{where}: {key} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ScenarioError(f"{where}: {key} must be <= {hi}, got {value}")
    return float(value)


def _int(table: Mapping[str, Any], key: str, default: int, where: str, *, lo: int = 0) -> int:
    value = table.get(key, default)
    if not _is_int(value):
        raise ScenarioError(f"{where}: {key} must be an integer, got {value!r}")
    if value < lo:
        raise ScenarioError(f"{where}: {key} must be >= {lo}, got {value}")
    return value


def _choice(table: Mapping[str, Any], key: str, default: str, where: str, *, options: Sequence[str]) -> str:
    value = table.get(key, default)
    if value not in options:
        raise ScenarioError(f"{where}: {key} must be one of {', '.join(options)}, got {value!r}")
    return str(value)


def _bool(table: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ScenarioError(f"{where}: {key} must be true or false, got {value!r}")
    return value


Spec = Mapping[str, tuple[Callable[..., Any], Mapping[str, Any]]]
"""Keys of a table in the order they are checked, each with its reader and the reader's bounds."""
_POSITIVE: Mapping[str, Any] = {"lo": 0, "lo_open": True}
_SHARE: Mapping[str, Any] = {"lo": 0, "hi": 1}


def _fields(table: Mapping[str, Any], where: str, spec: Spec, defaults: object) -> dict[str, Any]:
    """``spec``'s keys read from ``table`` in order, a missing one as the attribute of ``defaults``
    (a key ``defaults`` lacks is read only when given)."""
    out = {}
    for key, (read, bounds) in spec.items():
        default = getattr(defaults, key, None)
        if default is not None or key in table:
            out[key] = read(table, key, default, where, **bounds)
    return out


_SPECS: dict[str, Spec] = {
    "": {"duration_s": (_num, _POSITIVE), "eval_every_s": (_num, _POSITIVE), "target_accuracy": (_num, {**_POSITIVE, "hi": 1})},
    "data": {"partition": (_choice, {"options": ("iid", "dirichlet", "labels")}), "alpha": (_num, _POSITIVE),
             "labels_each": (_int, {"lo": 1}), "arrival_rate_per_h": (_num, {"lo": 0}),
             "order": (_choice, {"options": STREAM_ORDERS}), "initial_samples": (_int, {})},
    "device": {"min_samples": (_int, {"lo": 1}), "request_timeout_s": (_num, _POSITIVE), "reannounce_s": (_num, _POSITIVE),
               "continuous": (_bool, {})},
    "training": {"epochs": (_int, {"lo": 1}), "batch_size": (_int, {"lo": 1}), "lr": (_num, _POSITIVE), "mu": (_num, {"lo": 0})},
    "coordinator": {"keep_versions": (_int, {"lo": 1}), "encoding": (_choice, {"options": ("f4", "f2", "i1")}),
                    "validation_size": (_int, {}), "gate": (_bool, {}), "gate_margin": (_num, _SHARE),
                    "rollback_margin": (_num, _SHARE), "gate_delay_s": (_num, {"lo": 0}),
                    "pull_burst": (_num, {"lo": 1}), "pull_refill_s": (_num, {"lo": 0}),  # (only when given)
                    "gate_z": (_num, {"lo": 0, "hi": 10}), "canary": (_num, _SHARE), "canary_samples": (_int, {"lo": 1}),
                    "canary_min_reports": (_int, {"lo": 2}), "canary_deadline_s": (_num, _POSITIVE)},
    "attack": {"claimed_samples": (_int, {"lo": 1}), "label_flip": (_num, _SHARE),
               "flip": (_choice, {"options": ("shift", "permutation")}), "scale": (_num, _SHARE), "scale_factor": (_num, {}),
               "huge_samples": (_num, _SHARE)},
}
_SECTIONS: dict[str, set[str]] = {
    **{name: set(spec) for name, spec in _SPECS.items() if name},
    "fleet": {"devices", "mix"},
    "delay": {"devices", "versions", "class", "report_versions", "class_target"},
    "inversion": {f.name for f in dataclasses.fields(InversionConfig)},
}


def _section(raw: Mapping[str, Any], name: str, source: str) -> Mapping[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ScenarioError(f"{source}: [{name}] must be a table")
    _check_keys(table, _SECTIONS[name], source, f"[{name}]")
    return table


def _settings(raw: Mapping[str, Any], source: str) -> Settings:
    d = Settings()
    task = raw.get("task", d.task)
    if not isinstance(task, str) or not task:
        raise ScenarioError(f"{source}: task must be a task name such as 'digits'")
    seeds = raw.get("seeds", list(d.seeds))
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise ScenarioError(f"{source}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if repeated := sorted({s for s in seeds if seeds.count(s) > 1}):  # (each would count twice in every mean)
        raise ScenarioError(f"{source}: seeds: seed{'s' if len(repeated) > 1 else ''} {', '.join(map(str, repeated))} "
                            "given more than once")
    f: dict[str, Any] = {"task": task, "seeds": tuple(int(s) for s in seeds), **_fields(raw, source, _SPECS[""], d)}

    fleet = _section(raw, "fleet", source)
    where = f"{source}: [fleet]"
    f["devices"] = _int(fleet, "devices", d.devices, where, lo=1)
    f["profiles"] = profiles = _profiles(raw.get("profiles", {}), source)
    mix_raw = fleet.get("mix", dict(d.mix))
    if isinstance(mix_raw, str):
        mix_raw = {mix_raw: 1.0}
    if not isinstance(mix_raw, dict) or not mix_raw:
        raise ScenarioError(f"{where}: mix must be a table of profile = share")
    f["mix"] = mix = {}
    for name in mix_raw:
        if name not in profiles:
            raise ScenarioError(f"{where}: mix names unknown profile {name!r}; known: {', '.join(sorted(profiles))}")
        mix[name] = _num(mix_raw, name, 0.0, where + " mix", lo=0)
    if sum(mix.values()) <= 0:
        raise ScenarioError(f"{where}: mix shares must add up to more than 0")

    td = default_train_config(task, TrainConfig(epochs=d.epochs, batch_size=d.batch_size, lr=d.lr))  # the task's own
    training = dataclasses.replace(d, epochs=td.epochs, batch_size=td.batch_size, lr=td.lr)
    for name in ("data", "device", "training", "coordinator"):
        f |= _fields(_section(raw, name, source), f"{source}: [{name}]", _SPECS[name], training if name == "training" else d)
    where = f"{source}: [coordinator]"
    if "rollback_margin" not in raw.get("coordinator", {}):
        f["rollback_margin"] = max(d.rollback_margin, f["gate_margin"])  # never below the gate margin
    f["pull_limits"] = {k: f.pop(k) for k in ("pull_burst", "pull_refill_s") if k in f}
    if f["gate"]:
        if f["validation_size"] < 1 and not f["canary"]:
            raise ScenarioError(f"{where}: gate = true needs validation_size >= 1 (the coordinator's validation set) or canary > 0")
        try:
            gate_config(Settings(**f))
        except ConfigError as exc:
            raise ScenarioError(f"{where}: {exc}") from None

    where = f"{source}: [attack]"
    attack = AttackPlan(**_fields(_section(raw, "attack", source), where, _SPECS["attack"], AttackPlan()))
    if attack.claimed_samples >= 2**63:
        raise ScenarioError(f"{where}: claimed_samples must fit in a signed 64-bit integer")
    if attack.label_flip + attack.scale + attack.huge_samples > 1:
        raise ScenarioError(f"{where}: label_flip + scale + huge_samples must be <= 1")

    settings = Settings(**f, attack=attack, **_staleness_settings(raw, source))
    if settings.arrival_rate_per_h == 0 and not settings.initial_samples and not settings.continuous:
        raise ScenarioError(f"{source}: [data]: arrival_rate_per_h = 0 with no initial_samples and no [device] continuous: "
                            "no device would ever hold a sample")
    if settings.delay.active and settings.delay.devices > settings.devices:
        raise ScenarioError(f"{source}: [delay]: devices = {settings.delay.devices} but [fleet] devices = {settings.devices}")
    part, order = settings.partition, settings.order
    if sample_kind_of(task) == "frame":  # a frame shows several classes: nothing may need one label per sample
        by_label = {f'[data] partition = "{part}"': part != "iid", f'[data] order = "{order}"': order == "by-class",
                    "[attack] label_flip": attack.label_flip > 0, "[delay] devices": settings.delay.active,
                    # devices score each new label for a canary round; a frame's devices send no report (helper-182)
                    "[coordinator] canary": settings.gate and settings.canary > 0}
        bad = [key for key, used in by_label.items() if used]
        if bad:
            raise ScenarioError(f"{source}: {bad[0]} needs one class label per sample, but task {task!r} has frames with boxes "
                                '(use partition = "iid", order = "shuffled" or "given", no label flips, [delay] or canary '
                                "evaluation: gate on validation_size)")
    return settings


def check_task_fits(settings: Settings, data: Callable[[], TaskData], where: str) -> None:
    """What a run's settings ask of its task's data (classes, pool size), checked before the
    first run starts; ``data`` (the task's ``data``) is called only when a setting needs it."""
    if settings.partition == "labels" and settings.labels_each > (n := data().n_classes):
        raise ScenarioError(f"{where}: [data] labels_each = {settings.labels_each} but task {settings.task!r} has {n} classes")
    if settings.delay.active and settings.delay.target_class >= (n := data().n_classes):
        raise ScenarioError(f"{where}: [delay] class = {settings.delay.target_class} but task {settings.task!r} has classes 0 to {n - 1}")
    if settings.validation_size and settings.validation_size > (n := len(data().pool.y)) // 4:
        raise ScenarioError(f"{where}: [coordinator] validation_size = {settings.validation_size} is over a quarter of task "
                            f"{settings.task!r}'s {n}-sample pool")


def _staleness_settings(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``task_options``, ``[delay]`` and ``[inversion]`` (the staleness experiments, issue 15)."""
    options = raw.get("task_options", {})
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ScenarioError(f"{source}: task_options must be a table of keyword arguments for the task")
    dl = _section(raw, "delay", source)
    where = f"{source}: [delay]"
    versions = dl.get("report_versions", [])
    if not isinstance(versions, list) or not all(_is_int(v) for v in versions):
        raise ScenarioError(f"{where}: report_versions must be a list of versions, got {versions!r}")
    fields: dict[str, Any] = {"devices": _int(dl, "devices", 0, where), "versions": _int(dl, "versions", 10, where, lo=1),
              "target_class": _int(dl, "class", 0, where), "report_versions": tuple(versions),
              "class_target": _num(dl, "class_target", 0.8, where, lo=0, hi=1, lo_open=True)}
    try:
        delay = DelayPlan(**fields)
    except ConfigError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    inv = _section(raw, "inversion", source)
    try:
        InversionConfig(**inv)
    except (TypeError, ConfigError) as exc:
        raise ScenarioError(f"{source}: [inversion]: {exc}") from None
    return {"task_options": dict(options), "delay": delay, "inversion": dict(inv)}


def _part(value: Any, catalogue: Mapping[str, Any], base: Any, cls: type, where: str, name: str) -> Any:
    """A profile part given as a catalogue name or a table of fields over ``base``."""
    if isinstance(value, str):
        if value not in catalogue:
            raise ScenarioError(f"{where}: unknown name {value!r}; known: {', '.join(sorted(catalogue))}")
        return catalogue[value]
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: must be a name or a table")
    fields = dict(value)
    if "base" in fields and fields["base"] not in catalogue:  # (it fell back to the profile's own part)
        raise ScenarioError(f"{where}: unknown base {fields['base']!r}; known: {', '.join(sorted(catalogue))}")
    start = catalogue.get(fields.pop("base", ""), base)
    known = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "name"]
    unknown = sorted(set(fields) - set(known) - {"name"})
    if unknown:  # (not the dataclass's TypeError: "__init__() got an unexpected keyword argument")
        raise ScenarioError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], known)}; known: {', '.join(known)}")
    for key in known:  # every field but the name is a number (not "'>' not supported between 'str' and 'int'", nor nan)
        if key in fields:
            _num(fields, key, 0.0, where)
    if start is None:
        fields.setdefault("name", name)
    try:
        return cls(**fields) if start is None else dataclasses.replace(start, **fields)
    except (TypeError, ConfigError) as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _profiles(raw: Any, source: str) -> dict[str, DeviceProfile]:
    out = dict(PROFILES)
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: [profiles] must be a table of profile tables")
    for name, table in raw.items():
        where = f"{source}: [profiles.{name}]"
        if not isinstance(table, dict):
            raise ScenarioError(f"{where}: must be a table")
        _check_keys(table, {"base", "compute", "link", "availability"}, source, f"[profiles.{name}]")
        base_name = str(table.get("base", name))
        base = PROFILES.get(base_name)
        if base is None and base_name != name:
            raise ScenarioError(f"{where}: unknown base profile {base_name!r}; known: {', '.join(sorted(PROFILES))}")
        if base is None and not {"compute", "link"} <= set(table):
            raise ScenarioError(f"{where}: a new profile needs compute and link (or base = one of {', '.join(sorted(PROFILES))})")
        compute: ComputeProfile = _part(table.get("compute", base.compute if base else None), COMPUTE, base.compute if base else None, ComputeProfile, f"{where} compute", name)
        link: LinkProfile = _part(table.get("link", base.link if base else None), LINKS, base.link if base else None, LinkProfile, f"{where} link", name)
        avail_default = base.availability if base else AVAILABILITY["always"]
        availability: Availability = _part(table.get("availability", avail_default), AVAILABILITY, avail_default, Availability, f"{where} availability", name)
        out[name] = DeviceProfile(name=name, compute=compute, link=link, availability=availability)
    return out


# --------------------------------------------------------------------------- materialising


@dataclass(frozen=True, slots=True, kw_only=True)
class DevicePlan:
    """One concrete device for one seed: who it is, what it will label, and when."""

    index: int
    instance: DeviceInstance
    samples: npt.NDArray[np.int64]
    """Pool indices in the order the user labels them."""
    label_times: npt.NDArray[np.float64]
    """Virtual times of the labels (``len(label_times) <= len(samples)``)."""
    region: int = 0
    """Index of the device's home region (:class:`Topology`; 0 in a one-region scenario)."""
    train_s: float | None = None
    """A fixed virtual duration per local update (regional fleets); None: the profile's."""
    start_s: float = 0.0
    """When a continuously training device starts (it holds all its samples then)."""

    @property
    def device_id(self) -> str:
        return self.instance.device_id


def device_id(index: int) -> str:
    return f"d{index:04d}"


def materialise(settings: Settings, seed: int, pool_labels: npt.NDArray[np.int64]) -> list[DevicePlan]:
    """Draw the fleet for ``seed``: profile per device, its speed and offline windows, its
    data partition, streaming order and labelling times. Pure function of its arguments."""
    counts = fleet_counts(settings.devices, settings.mix)
    names = [name for name in sorted(counts) for _ in range(counts[name])]
    random.Random(f"{seed}:profiles").shuffle(names)
    _, label_idx = holdout(settings, seed, len(pool_labels))
    parts = [label_idx[p] for p in partition(
        pool_labels[label_idx], settings.devices, settings.partition,
        seed=seed, alpha=settings.alpha, labels_each=settings.labels_each,
    )]
    plans: list[DevicePlan] = []
    for i, (name, part) in enumerate(zip(names, parts)):
        instance = settings.profiles[name].instantiate(device_id(i), settings.duration_s, random.Random(f"{seed}:device:{i}"))
        rng = np.random.default_rng([seed, 7, i])
        order = stream_order(part, pool_labels, settings.order, rng)
        times = arrival_times(settings.arrival_rate_per_s, settings.duration_s, instance.offline, rng, limit=int(order.shape[0]))
        if settings.initial_samples:
            held = min(settings.initial_samples, int(order.shape[0]))
            times = np.concatenate([np.zeros(held), times[: int(order.shape[0]) - held]])
        plans.append(DevicePlan(index=i, instance=instance, samples=order, label_times=times))
    return plans


_REGIONAL = DeviceProfile(name="regional", compute=COMPUTE["paper"], link=LINKS["lan"], availability=AVAILABILITY["always"])
"""Nominal profile of a regional fleet's devices: always online; the training time is the
plan's ``train_s`` and the network is the region latency matrix."""


def materialise_regions(settings: Settings, regions: Regions, n_devices: int, seed: int,
                        pool_labels: npt.NDArray[Any]) -> list[DevicePlan]:
    """Draw a regional fleet for ``seed``: device ``i`` in region ``i mod R`` holds its
    partition from the start (no labelling), trains ``train_delay_s`` (N(mean, sd), at
    least 10 ms) per local update and starts within the first 50 ms."""
    _, label_idx = holdout(settings, seed, len(pool_labels))
    parts = [label_idx[p] for p in partition(pool_labels[label_idx], n_devices, settings.partition,
                                             seed=seed, alpha=settings.alpha, labels_each=settings.labels_each)]
    rng, jitter = random.Random(f"{seed}:multiregion"), random.Random(f"{seed}:start")
    n_regions = len(regions.topology.regions)
    plans = []
    for i, part in enumerate(parts):
        train_s = max(0.01, rng.gauss(regions.train_delay_mean_s, regions.train_delay_sd_s))
        instance = DeviceInstance(device_id=device_id(i), profile=_REGIONAL, speed_factor=1.0, offline=OfflineWindows())
        plans.append(DevicePlan(index=i, instance=instance, samples=part, label_times=np.zeros(0), region=i % n_regions,
                                train_s=train_s, start_s=jitter.uniform(0, 0.05)))
    return plans


def gate_config(settings: Settings) -> GateConfig:
    """The release gate of a scenario's coordinators: validation when ``validation_size`` > 0,
    a canary cohort when ``canary`` > 0 (federated test-then-train evaluation)."""
    s = settings
    canary = (CanaryConfig(fraction=s.canary, samples=s.canary_samples, min_reports=s.canary_min_reports,
                           deadline_s=s.canary_deadline_s) if s.canary > 0 else None)
    return GateConfig(margin=s.gate_margin, rollback_margin=s.rollback_margin, paired_z=s.gate_z,
                      validation=s.validation_size > 0, canary=canary)


def holdout(settings: Settings, seed: int, n_pool: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(validation, labelled)`` pool indices: ``validation_size`` samples kept at the
    coordinator (drawn from the seed; no device ever labels them) and the rest, in order.
    With ``validation_size = 0`` the whole pool is labelled, exactly as before."""
    everything = np.arange(n_pool, dtype=np.int64)
    n_val = settings.validation_size
    if n_val == 0:
        return everything[:0], everything
    if n_val > n_pool // 4:
        raise ScenarioError(f"validation_size {n_val} is over a quarter of the {n_pool}-sample pool")
    order = np.random.default_rng([seed, 11]).permutation(n_pool)
    return np.sort(order[:n_val]).astype(np.int64), np.sort(order[n_val:]).astype(np.int64)
