"""Delayed devices for the staleness experiments (paper 001, issue 15): the devices holding
the most samples of one class upload τ versions late; class-c accuracy is tracked per version.

Theory of operation. The ``[delay]`` table of a scenario (:class:`DelayPlan`) picks class c
and the ``devices`` devices whose partitions hold the most samples of c. Their *uplink* is
slow in versions: an update they publish is held in the link until the coordinator has
committed ``versions`` (τ) versions past the update's base, then it travels as any other
message (its bytes and link time are counted at release). Nothing else about the device
changes — it pulls, trains and retries as usual, so the staleness the coordinator measures
(``staleness_hist``) is the real one: τ for these updates (one more if a commit lands while
the released message is in flight). A retry of a held update replaces the held copy
(the coordinator would only count it as a duplicate).

Metrics: class-c accuracy of every committed version (a forward pass over the test split's
class-c samples, cached per version), overall accuracy at ``report_versions``, and the
commit time at which class c first reaches ``class_target``.

:class:`Stragglers` is driver-side bookkeeping; :class:`devices.simulator.Simulation` calls
it when it publishes, commits and evaluates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk.core.events import Publish
from edge_sdk.errors import ConfigError, EdgeciError
from edge_sdk.tasks.base import Split, Task
from edge_sdk.wire import decode, topics
from edge_sdk.wire.messages import Update

__all__ = ["DelayPlan", "Stragglers", "delayed_devices"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DelayPlan:
    """``[delay]``: which devices upload late, by how many versions, and what to report."""

    devices: int = 0
    """How many devices are delayed (the ones holding the most class-c samples); 0 = off."""
    versions: int = 10
    """τ: an update is held until the coordinator is this many versions past its base."""
    target_class: int = 0
    """Class c (TOML key ``class``)."""
    report_versions: tuple[int, ...] = ()
    """Versions at which the report reads class-c and overall accuracy."""
    class_target: float = 0.8
    """Class-c accuracy whose first commit time is the time-to-target."""

    def __post_init__(self) -> None:
        if self.devices < 0 or self.versions < 1 or self.target_class < 0:
            raise ConfigError("[delay]: need devices >= 0, versions >= 1 and class >= 0")
        if not 0 < self.class_target <= 1:
            raise ConfigError("[delay]: class_target must be in (0, 1]")
        if any(v < 1 for v in self.report_versions) or list(self.report_versions) != sorted(set(self.report_versions)):
            raise ConfigError("[delay]: report_versions must be increasing versions >= 1")

    @property
    def active(self) -> bool:
        return self.devices > 0


def delayed_devices(partitions: Sequence[npt.NDArray[np.int64]], pool_y: npt.NDArray[np.int64], target_class: int, n: int) -> list[int]:
    """Indices of the ``n`` devices whose partitions hold the most samples of
    ``target_class`` (ties: lower index first), most first."""
    counts = [int(np.count_nonzero(pool_y[p] == target_class)) for p in partitions]
    return sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:n]


class Stragglers:
    """The held uplinks and the class-c metrics of one run."""

    def __init__(self, plan: DelayPlan, partitions: Sequence[npt.NDArray[np.int64]], pool_y: npt.NDArray[np.int64],
                 device_ids: Sequence[str], region: str, test: Split) -> None:
        if plan.devices > len(partitions):
            raise ConfigError(f"[delay]: devices = {plan.devices} but the fleet has {len(partitions)}")
        mask = test.y == plan.target_class
        if not mask.any():
            raise ConfigError(f"[delay]: class {plan.target_class} has no test samples")
        self.plan = plan
        self.delayed = delayed_devices(partitions, pool_y, plan.target_class, plan.devices)
        self.class_samples = {i: int(np.count_nonzero(pool_y[partitions[i]] == plan.target_class)) for i in self.delayed}
        total_c = int(np.count_nonzero(pool_y == plan.target_class))
        self.class_share = sum(self.class_samples.values()) / total_c if total_c else 0.0
        """Share of the pool's class-c samples that the delayed devices hold."""
        self._update_topic = {i: topics.device_topic(region, device_ids[i], "update") for i in self.delayed}
        self._test_c = Split(x=test.x[mask], y=test.y[mask])
        self._held: dict[int, tuple[int, int, Publish]] = {}  # sender -> (release at version, base, message)
        self.held = 0
        self.released = 0
        self.released_staleness: list[int] = []
        """Versions between each released update's base and the version current at its release."""
        self.per_version: list[dict[str, float]] = []
        self._class_acc: dict[int, float] = {}

    def hold(self, sender: int, action: Publish, version: int) -> bool:
        """Take ``action`` into the link if it is a delayed device's update (True), else
        leave it to the network (False). ``version`` is the coordinator's current one."""
        if self._update_topic.get(sender) != action.topic:
            return False
        try:
            msg = decode(action.payload)
        except EdgeciError:
            return False  # not ours to judge: the coordinator rejects it on arrival
        if not isinstance(msg, Update):
            return False
        release = msg.base_version + self.plan.versions
        if release <= version:
            return False
        self._held[sender] = (release, msg.base_version, action)
        self.held += 1
        return True

    def due(self, version: int) -> list[tuple[int, Publish]]:
        """Held messages whose release version has been reached (by sender index)."""
        out = []
        for sender in sorted(s for s, (at, _, _) in self._held.items() if at <= version):
            _, base, action = self._held.pop(sender)
            self.released += 1
            self.released_staleness.append(version - base)
            out.append((sender, action))
        return out

    def finished(self, version: int) -> bool:
        """The last report version has been committed (the run may stop)."""
        return bool(self.plan.report_versions) and version >= self.plan.report_versions[-1]

    def class_accuracy(self, task: Task, version: int, weights: Any) -> float:
        """Accuracy on the test split's class-c samples (cached per version)."""
        if version not in self._class_acc:
            with np.errstate(over="ignore", invalid="ignore"):
                self._class_acc[version] = float(task.evaluate(np.asarray(weights, dtype=np.float32), self._test_c)["accuracy"])
        return self._class_acc[version]

    def committed(self, task: Task, version: int, weights: Any, now: float) -> None:
        """Record class-c accuracy (and overall accuracy at the report versions) of a commit."""
        row = {"version": float(version), "t_s": now, "class_accuracy": self.class_accuracy(task, version, weights)}
        if version in self.plan.report_versions:
            with np.errstate(over="ignore", invalid="ignore"):
                row["accuracy"] = float(task.evaluate(np.asarray(weights, dtype=np.float32))["accuracy"])
        self.per_version.append(row)

    def summary(self) -> dict[str, Any]:
        target = self.plan.class_target
        reached = next((r["t_s"] for r in self.per_version if r["class_accuracy"] >= target), None)
        return {
            "class": self.plan.target_class,
            "tau": self.plan.versions,
            "delayed_devices": list(self.delayed),
            "delayed_class_samples": [self.class_samples[i] for i in self.delayed],
            "delayed_class_share": self.class_share,
            "held": self.held,
            "released": self.released,
            "released_staleness": self.released_staleness,
            "class_target": target,
            "class_time_to_target_s": reached,
            "per_version": self.per_version,
        }
