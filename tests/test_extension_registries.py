"""The registries a new peering or scenario kind goes through (helper-99 added a strategy, a
staleness policy, a peering and a task by the README's recipe): a half-registered name, an
unknown parameter or a kind without a strategy of its own is a clear error."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

import coordinator.peering as peering_pkg
from coordinator import cli
from devices import scenario
from devices.scenario import ScenarioError
from edge_sdk.errors import ConfigError


@dataclass(frozen=True)
class ToyPeerConfig:
    every: int = 1


def test_a_peering_registered_without_a_builder_is_a_config_error_not_a_hierfavg(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_peering fell through to HierPeering for any configured name it had no branch for:
    AttributeError "'ToyPeerConfig' object has no attribute 'cloud'" (or, with a strategy, a
    hierfavg peering under another name)."""
    monkeypatch.setitem(peering_pkg._CONFIGS, "toy", ToyPeerConfig)
    monkeypatch.setattr(peering_pkg, "PEERINGS", (*peering_pkg.PEERINGS, "toy"))
    with pytest.raises(ConfigError, match="toy"):
        peering_pkg.make_peering("toy", coordinator_id="a", ring=("a", "b"))


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def test_peers_without_a_peering_names_every_peering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "PEERINGS", (*cli.PEERINGS, "toy"))
    with pytest.raises(ConfigError, match=r"--peers needs --peering .*toy"):
        cli.options_from(_parse(["--state-dir", "/tmp/x", "--peers", "coord-default,b"]))


def test_a_misspelled_peering_parameter_lists_the_peering_parameters() -> None:
    """``--peering spyker --param phii=2`` said "strategy 'spin': unknown parameter 'phii'" and
    listed only spin's parameters: the peering's (phi, eta_a, …) were not named."""
    args = _parse(["--state-dir", "/tmp/x", "--peering", "spyker", "--peers", "coord-default,b", "--param", "phii=2"])
    with pytest.raises(ConfigError, match=r"phii.*did you mean 'phi'.*eta_a"):
        cli.check_method(cli.options_from(args))


def test_a_regional_kind_without_its_own_strategy_asks_for_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``kind = "<a peering>"`` without ``strategy`` defaulted to a strategy named like the
    peering: "unknown strategy 'broadcast-latest'" for a peering that works with any."""
    monkeypatch.setattr(scenario, "KINDS", (*scenario.KINDS, "toy"))
    path = tmp_path / "r.toml"
    path.write_text('task = "digits"\n[multiregion]\nregions = ["a", "b"]\nlatency_ms = [[1, 2], [2, 1]]\n'
                    '[[methods]]\nkind = "toy"\n', encoding="utf-8")
    with pytest.raises(ScenarioError, match="has no strategy of its own"):
        scenario.load_scenario(path)
