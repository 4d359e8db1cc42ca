"""Gate configuration bounds no test checked (helper-158's mutation audit): gate.py:94 (a
``1`` -> ``2``) and gate.py:96 (``10`` -> ``11``) survived every unit test of the gate."""

from __future__ import annotations

import pytest

from coordinator.gate import GateConfig
from edge_sdk.errors import ConfigError


@pytest.mark.parametrize(
    "params",
    [{"margin": 1.0}, {"margin": 1.5, "rollback_margin": 1.5}, {"rollback_margin": 1.0},
     {"margin": 0.1, "rollback_margin": 1.2}, {"margin": -0.01}, {"paired_z": 10.5}, {"paired_z": -1.0},
     {"paired_z": float("nan")}],
    ids=["margin=1", "both 1.5", "rollback=1", "rollback 1.2", "margin<0", "z=10.5", "z<0", "z=nan"],
)
def test_a_gate_margin_of_one_or_more_or_a_z_over_10_is_refused(params: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        GateConfig(**params)  # type: ignore[arg-type]


def test_the_bounds_themselves_are_accepted() -> None:
    assert GateConfig(margin=0.99, rollback_margin=0.999).rollback_margin == 0.999
    assert GateConfig(paired_z=10.0).paired_z == 10.0
    assert GateConfig(paired_z=0.0, margin=0.0, rollback_margin=0.0).paired_z == 0.0
