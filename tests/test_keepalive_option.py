"""The MQTT keepalive is a setting: ``edgeci coordinator --keepalive`` (with ``EDGECI_KEEPALIVE`` and the
config file's ``keepalive``, through coordinator/config.py's layers), ``edgeci device --keepalive`` and
``EdgeClient(keepalive_s=...)``, 5 to 3600 s; it was a fixed 30 s."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from coordinator import cli as coordinator_cli
from coordinator.config import resolve
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from demos.cli import build_parser, main
from edge_sdk.client import EdgeClient
from edge_sdk.errors import ConfigError

NOWHERE = "mqtt://127.0.0.1:1"


def coordinator_options(argv: list[str], env: dict[str, str] | None = None, toml: str = "") -> CoordinatorOptions:
    parser = build_parser(["coordinator"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["coordinator"]
    argv = ["coordinator", "--state-dir", "s", *argv, "--config", "c.toml"]
    got = resolve(parser, argv, env or {}, options_parser=sub, read_text=lambda _: toml)
    return coordinator_cli.options_from(got.args, got)


def test_the_coordinator_keepalive_comes_from_its_flag_the_environment_or_the_file() -> None:
    assert coordinator_options([]).keepalive_s == 30
    assert coordinator_options([], toml="keepalive = 20\n").keepalive_s == 20
    assert coordinator_options([], {"EDGECI_KEEPALIVE": "45"}, toml="keepalive = 20\n").keepalive_s == 45
    assert coordinator_options(["--keepalive", "60"], {"EDGECI_KEEPALIVE": "45"}, toml="keepalive = 20\n").keepalive_s == 60


@pytest.mark.parametrize("argv, env, toml, needle", [
    (["--keepalive", "4"], {}, "", "argument --keepalive: must be a whole number of seconds from 5 to 3600, got 4"),
    (["--keepalive", "3601"], {}, "", "argument --keepalive: must be a whole number of seconds from 5 to 3600, got 3601"),
    (["--keepalive", "7.5"], {}, "", "argument --keepalive: expected an integer, got '7.5'"),
    ([], {"EDGECI_KEEPALIVE": "0"}, "", "EDGECI_KEEPALIVE: must be a whole number of seconds from 5 to 3600, got 0"),
    ([], {}, "keepalive = 100000\n", "keepalive: must be a whole number of seconds from 5 to 3600, got 100000"),
])
def test_a_coordinator_keepalive_out_of_range_is_exit_2_naming_where_it_came_from(
        argv: list[str], env: dict[str, str], toml: str, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = ["coordinator", "--broker", NOWHERE, "--state-dir", str(tmp_path / "s"), *argv]
    if toml:
        (tmp_path / "c.toml").write_text(toml)
        args += ["--config", str(tmp_path / "c.toml")]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage error
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert "Traceback" not in err and not (tmp_path / "s").exists()


def test_the_help_says_what_the_keepalive_trades(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("coordinator", "device"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--keepalive S" in text and "about 1.5 keepalives" in text and "metered link" in text, command


def test_the_device_keepalive_reaches_its_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import devices.headless

    built: list[dict[str, Any]] = []

    class Built(Exception):
        pass

    def client(**kwargs: Any) -> None:
        built.append(kwargs)
        raise Built

    monkeypatch.setattr(devices.headless, "EdgeClient", client)
    with pytest.raises(Built):
        main(["device", "--device-id", "d1", "--broker", NOWHERE, "--data-dir", str(tmp_path / "d"), "--keepalive", "90"])
    assert built[0]["keepalive_s"] == 90
    with pytest.raises(SystemExit) as exit_:
        main(["device", "--device-id", "d1", "--broker", NOWHERE, "--data-dir", str(tmp_path / "d"), "--keepalive", "2"])
    assert exit_.value.code == 2
    assert "argument --keepalive: must be a whole number of seconds from 5 to 3600, got 2" in capsys.readouterr().err


def test_edge_client_and_the_daemon_hand_their_keepalive_to_the_transport(tmp_path: Path) -> None:
    client = EdgeClient(broker=NOWHERE, device_id="d1", data_dir=tmp_path / "d", durable=False, keepalive_s=120)
    assert client.transport._keepalive == 120
    assert EdgeClient(broker=NOWHERE, device_id="d2", durable=False).transport._keepalive == 30
    for bad in (4, 3601, 30.0, True, "30"):
        with pytest.raises(ConfigError, match="keepalive_s must be a whole number of seconds from 5 to 3600"):
            EdgeClient(broker=NOWHERE, device_id="d3", durable=False, keepalive_s=bad)
    daemon = CoordinatorDaemon(CoordinatorOptions(broker=NOWHERE, region="r", state_dir=tmp_path / "c", keepalive_s=7))
    try:
        assert daemon.transport._keepalive == 7
    finally:
        daemon.registry.close()
    with pytest.raises(ConfigError, match="--keepalive must be a whole number"):
        CoordinatorDaemon(CoordinatorOptions(broker=NOWHERE, region="r", state_dir=tmp_path / "c2", keepalive_s=4))
    assert not (tmp_path / "c2").exists()
