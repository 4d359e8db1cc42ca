"""Who the devices are and how a fleet of them behaves: profiles (compute, link,
availability), human labelling (Poisson arrivals, streaming order), data partitions, and
the fleet emulator (scenario files, discrete-event simulator on a virtual clock).

Public names are imported lazily so that ``import devices.headless`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DeviceProfile": "devices.profiles",
    "PROFILES": "devices.profiles",
    "arrival_times": "devices.labelling",
    "Scenario": "devices.scenario",
    "ScenarioError": "devices.scenario",
    "load_scenario": "devices.scenario",
    "parse_scenario": "devices.scenario",
    "materialise": "devices.scenario",
    "Simulation": "devices.simulator",
    "RunResult": "devices.simulator",
    "run_spec": "devices.simulator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'devices' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
