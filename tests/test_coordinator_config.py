"""The coordinator's configuration surface: strategy parameters by name and type, flags that
do not apply, the state dir, and checks that run before anything is written."""

from __future__ import annotations

import re

import pytest

from coordinator.methods import make_method
from coordinator.strategies import make_strategy
from edge_sdk.errors import ConfigError

# ---------------------------------------------------------------------- strategy parameters


@pytest.mark.parametrize(("strategy", "params", "needle"), [
    ("spin", {"k": 2.5}, "strategy 'spin': parameter k expects an integer, got 2.5"),
    ("spin", {"k": True}, "strategy 'spin': parameter k expects an integer, got True"),
    ("spin", {"k": "ten"}, "strategy 'spin': parameter k expects an integer, got 'ten'"),
    ("spin", {"timeout_s": "abc"}, "parameter timeout_s expects a finite number or none, got 'abc'"),
    ("spin", {"timeout_s": float("inf")}, "parameter timeout_s expects a finite number or none, got inf"),
    ("fedopt", {"server_lr": "abc"}, "strategy 'fedopt': parameter server_lr expects a finite number, got 'abc'"),
    ("fedbuff", {"late_join": 1}, "parameter late_join expects true or false, got 1"),
    ("nebula", {"resource_prices": [1, "x"]}, "parameter resource_prices expects a list of finite numbers"),
    ("spin", {"timeout": 30}, "strategy 'spin': unknown parameter 'timeout'; known parameters: "),
])
def test_strategy_parameters_are_checked_by_name_and_type(strategy: str, params: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        make_strategy(strategy, **params)
    if "unknown" in needle:
        assert "timeout_s" in str(err.value)  # the known keys are listed


def test_well_typed_parameters_are_converted_not_refused() -> None:
    spin = make_strategy("spin", k=3, timeout_s=5, combine="deltas")
    assert spin.describe()["timeout_s"] == 5.0 and isinstance(spin.describe()["timeout_s"], float)
    assert make_strategy("spin", timeout_s=None).describe()["timeout_s"] is None
    nebula = make_strategy("nebula", resource_speeds=[1, 2.5], resource_prices=[1, 1])
    assert nebula.config.resource_speeds == (1.0, 2.5)  # type: ignore[attr-defined]


def test_peering_parameters_are_checked_by_type() -> None:
    with pytest.raises(ConfigError, match=re.escape("peering 'hierfavg': parameter kappa2 expects an integer, got 'two'")):
        make_method("hierfavg", params={"kappa2": "two"})
    with pytest.raises(ConfigError, match=re.escape("peering 'spyker': parameter phi expects a finite number, got True")):
        make_method("spyker", params={"phi": True})


def test_live_spin_reconfiguration_checks_types() -> None:
    spin = make_strategy("spin")
    with pytest.raises(ConfigError, match="parameter k expects an integer"):
        spin.reconfigure(k="x")  # type: ignore[attr-defined]
    assert spin.describe()["k"] == 10
