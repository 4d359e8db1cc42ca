"""The discrete-event emulation engine every fleet driver runs on.

==============  ===================================================================
``clock``       :class:`VirtualClock` (only moves forward) and :class:`ScaledWallClock`
                (the same interface over real time, for live fleets)
``events``      :class:`Kind` (what an event is) and :class:`EventQueue` (the heap,
                ordered by ``(time, sequence)`` so runs are pure functions of their seed)
``network``     :class:`LinkNetwork` (per-device links through one broker) and
                :class:`RegionNetwork` (a region latency matrix, links of equal bandwidth)
``loop``        :class:`Driver`: the one loop (pop, advance the clock, dispatch) every
                driver subclasses
``training``    the per-device training seed and hints → ``TrainConfig``, written once
``rng``         :class:`SeededOnUse`: a device core's ``random.Random``, built on its first draw
==============  ===================================================================

Drivers (``devices.simulator``, the one fleet runner for one region or several;
``devices.scc_fleet``; ``devices.live``) own the cores and decide what each event means;
the engine owns time, ordering, the network and the training plumbing. Reporting is ``devices.report``.
"""

from __future__ import annotations

from devices.engine.clock import ScaledWallClock, VirtualClock
from devices.engine.events import EventQueue, Kind
from devices.engine.loop import Driver
from devices.engine.network import LinkNetwork, RegionNetwork
from devices.engine.training import job_seed, train_config

__all__ = ["Driver", "EventQueue", "Kind", "LinkNetwork", "RegionNetwork", "ScaledWallClock", "VirtualClock", "job_seed", "train_config"]
