"""README: "a file value that a stronger layer replaces is named in a WARNING at start". It was
for top-level keys only: with the shipped example's ``[strategy] k = 10`` and ``timeout_s = 30.0``,
``EDGECI_K=7`` and ``--timeout 5`` ran k 7 and timeout 5 with no word about either file value.
A ``[strategy]`` value that a flag, the environment or ``--param`` replaces with another value
is now named too; an equal value is not (as for a top-level key)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest

from coordinator import cli as coordinator_cli
from coordinator.config import Layered, resolve

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "edgeci-coordinator.toml.example"
TABLE = '[strategy]\nname = "spin"\nk = 10\ntimeout_s = 30.0\ncombine = "models"\n'


def layered(argv: list[str], env: dict[str, str] | None = None, toml: str = TABLE) -> Layered:
    """The coordinator's options resolved from flags, ``env`` and a config file ``c.toml`` holding ``toml``."""
    from demos.cli import build_parser

    parser = build_parser(["coordinator"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["coordinator"]
    argv = ["coordinator", "--state-dir", "s", *argv, "--config", "c.toml"]
    return resolve(parser, argv, env or {}, options_parser=sub, read_text=lambda _: toml)


def overridden(argv: list[str], env: dict[str, str] | None = None, toml: str = TABLE) -> tuple[list[str], dict[str, Any]]:
    """What start warns of (after the options are built, as :func:`coordinator.cli._serve` does) and the strategy's parameters."""
    got = layered(argv, env, toml)
    params = dict(coordinator_cli.options_from(got.args, got).strategy_params)
    return got.overridden, params


def test_the_environment_beats_the_file_s_strategy_k() -> None:
    lines, params = overridden([], {"EDGECI_K": "7"})
    assert params["k"] == 7
    assert lines == ["[strategy] k = 10 in c.toml: EDGECI_K wins (7)"]


def test_a_flag_beats_the_file_s_strategy_timeout() -> None:
    lines, params = overridden(["--timeout", "5"])
    assert params["timeout_s"] == 5.0
    assert lines == ["[strategy] timeout_s = 30.0 in c.toml: --timeout wins (5.0)"]
    lines, params = overridden(["--combine", "deltas", "--k", "3"])
    assert lines == ["[strategy] k = 10 in c.toml: --k wins (3)", "[strategy] combine = 'models' in c.toml: --combine wins ('deltas')"]


@pytest.mark.parametrize(("argv", "env", "line", "param", "value"), [
    (["--param", "k=3"], {}, "[strategy] k = 10 in c.toml: --param wins (3)", "k", 3),
    ([], {"EDGECI_PARAM": "combine=deltas"}, "[strategy] combine = 'models' in c.toml: EDGECI_PARAM wins ('deltas')",
     "combine", "deltas"),
    (["--param", "timeout_s=none"], {}, "[strategy] timeout_s = 30.0 in c.toml: --param wins (None)", "timeout_s", None),
    # --param beats a weaker own flag (the environment's) and the file: the winner is named, once
    (["--param", "k=3"], {"EDGECI_K": "7"}, "[strategy] k = 10 in c.toml: --param wins (3)", "k", 3),
    # the flag's item beats the environment's, and the flag's value is named
    (["--param", "timeout_s=2"], {"EDGECI_PARAM": "timeout_s=9"}, "[strategy] timeout_s = 30.0 in c.toml: --param wins (2)",
     "timeout_s", 2),
])
def test_a_param_item_beats_the_file_s_strategy_value(argv: list[str], env: dict[str, str], line: str, param: str,
                                                      value: object) -> None:
    lines, params = overridden(argv, env)
    assert params[param] == value
    assert lines == [line]


def test_an_equal_value_is_not_named_but_a_different_one_beside_it_is() -> None:
    """The top-level rule: the same value given twice is not reported (30 == 30.0 too)."""
    lines, params = overridden(["--timeout", "30", "--param", "combine=models"], {"EDGECI_K": "10"})
    assert (params["k"], params["timeout_s"], params["combine"]) == (10, 30.0, "models")
    assert lines == []
    lines, _ = overridden(["--timeout", "30", "--param", "combine=deltas"], {"EDGECI_K": "10"})
    assert lines == ["[strategy] combine = 'models' in c.toml: --param wins ('deltas')"]


def test_a_top_level_key_still_warns_beside_the_strategy_table_and_twice_built_options_warn_once() -> None:
    toml = "metrics_port = 9464\nk = 10\n[strategy]\ntimeout_s = 30.0\n"
    got = layered(["--metrics-port", "9465", "--timeout", "5"], {"EDGECI_K": "7"}, toml)
    coordinator_cli.options_from(got.args, got)
    coordinator_cli.options_from(got.args, got)  # e.g. a check before start: still one line each
    assert got.overridden == ["k = 10 in c.toml: EDGECI_K wins (7)",  # top-level: the options' order
                              "metrics_port = 9464 in c.toml: --metrics-port wins (9465)",
                              "[strategy] timeout_s = 30.0 in c.toml: --timeout wins (5.0)"]


class _Stop(Exception):
    pass


def test_the_shipped_example_warns_at_start(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The operator's case end to end: the shipped example, EDGECI_K=7 and --timeout 5, through
    the coordinator's start (stopped before the daemon is built)."""
    got = layered(["--timeout", "5"], {"EDGECI_K": "7"}, EXAMPLE.read_text())

    def stop(options: Any, layered: Layered) -> Any:
        assert options.strategy_params["k"] == 7 and options.strategy_params["timeout_s"] == 5.0
        raise _Stop

    monkeypatch.setattr(coordinator_cli, "start_daemon", stop)
    with caplog.at_level(logging.INFO, logger="edgeci.coordinator"), pytest.raises(_Stop):
        coordinator_cli._serve(got.args, got, None, lambda level, fmt: None, -1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["config file value overridden: state_dir = '/var/lib/edgeci' in c.toml: --state-dir wins ('s')",
                        "config file value overridden: [strategy] k = 10 in c.toml: EDGECI_K wins (7)",
                        "config file value overridden: [strategy] timeout_s = 30.0 in c.toml: --timeout wins (5.0)"]


def test_lr_sets_lr_init_for_spyker_only() -> None:
    """--lr is a device hint for every strategy and spyker's η_init too: with spin a leftover
    [strategy] lr_init reaches spin's config, which refuses it, instead of --lr silently dropping it."""
    from edge_sdk.errors import ConfigError

    got = layered(["--lr", "0.01"], toml='[strategy]\nname = "spin"\nlr_init = 0.05\n')
    options = coordinator_cli.options_from(got.args, got)
    assert options.strategy_params["lr_init"] == 0.05 and got.overridden == []
    with pytest.raises(ConfigError, match="lr_init"):
        coordinator_cli.check_method(options)  # (what the start runs before writing anything)
    lines, params = overridden(["--lr", "0.01"], toml='[strategy]\nname = "spyker"\nlr_init = 0.05\n')
    assert params["lr_init"] == 0.01 and lines == ["[strategy] lr_init = 0.05 in c.toml: --lr wins (0.01)"]


@pytest.mark.parametrize(("argv", "env", "key", "file_value", "winner", "value"), [
    (["--eta", "0.3"], {}, "eta", 0.5, "--eta", 0.3),  # a strategy flag outside spin's set
    ([], {"EDGECI_DECAY_BETA": "0.01"}, "decay_beta", 0.2, "EDGECI_DECAY_BETA", 0.01),
    (["--h-inter", "9"], {}, "h_inter", 4, "--h-inter", 9.0),  # a peering parameter in the table
])
def test_every_strategy_and_peering_flag_beats_the_file_s_table(argv: list[str], env: dict[str, str], key: str,
                                                                file_value: float, winner: str, value: float) -> None:
    """Flags outside spin's k / timeout / combine / robust set lost to the file's [strategy]
    table: ``--eta 0.3`` with ``[strategy] eta = 0.5`` ran 0.5, and a peering parameter's flag
    lost the same way. Flag > environment > file holds for all of them now."""
    got = layered(argv, env, f'[strategy]\nname = "spyker"\n{key} = {file_value}\n')
    options = coordinator_cli.options_from(got.args, got)
    assert {**options.strategy_params, **options.peering_params}[key] == value
    assert got.overridden == [f"[strategy] {key} = {file_value!r} in c.toml: {winner} wins ({value!r})"]


def test_sigterm_while_the_coordinator_starts_stops_it_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A coordinator read SIGTERM only once it was up: `kill` (or systemd's stop) during a first
    start's pretraining waited minutes (helper-87). Until it is up a signal now ends the start."""
    import os
    import signal
    import threading
    import time

    from demos.cli import main

    entered = threading.Event()

    def slow(options: Any, layered: Layered) -> Any:  # what pretraining a first model looks like from here
        entered.set()
        for _ in range(600):
            time.sleep(0.05)
        raise AssertionError("the signal did not stop the start")

    monkeypatch.setattr(coordinator_cli, "start_daemon", slow)
    threading.Thread(target=lambda: entered.wait(10) and os.kill(os.getpid(), signal.SIGTERM), daemon=True).start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="edgeci.coordinator"), pytest.raises(SystemExit) as exit_:
        main(["coordinator", "--broker", "mqtt://127.0.0.1:1", "--region", "r", "--state-dir", str(tmp_path / "s")])
    assert exit_.value.code == 128 + signal.SIGTERM and time.monotonic() - started < 10
    assert "signal SIGTERM during the start: stopped before the coordinator was up" in caplog.text


@pytest.mark.parametrize("param, key, expected", [
    ("staleness=none", "staleness", "none"),  # a policy called none: the word, not a null
    ("max_staleness=none", "max_staleness", None),  # an optional number: none is None
    ("timeout_s=none", "timeout_s", None),
])
def test_none_on_the_command_line_is_the_word_for_a_string_parameter(param: str, key: str, expected: Any) -> None:
    """`--param staleness=none` was refused ("expects a string, got None"): the parser reads none
    as a null, which a string parameter now takes as the word (helper-89)."""
    from coordinator.cli import parse_params
    from coordinator.methods import make_method

    params = parse_params([param])
    method = make_method("spin", params=params)
    config = method.strategy.config
    assert getattr(config, key) == expected


@pytest.mark.parametrize("env, text, needle", [
    ({"EDGECI_SEED": "-1"}, "", "EDGECI_SEED: must be at least 0, got -1"),
    ({"EDGECI_CONVERSION_DEADLINE": "-5"}, "", "EDGECI_CONVERSION_DEADLINE: must be above 0, got -5"),
    ({}, "seed = -1\n", "seed: must be at least 0, got -1"),
])
def test_a_checked_flag_out_of_range_in_the_environment_or_file_is_one_line(
        env: dict[str, str], text: str, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A value that a flag's checked type refuses raised argparse.ArgumentTypeError as a traceback
    when it came from EDGECI_* or the --config file (helper-89's --conversion-deadline trial)."""
    from demos.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["coordinator", "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s")]
    if text:
        (tmp_path / "c.toml").write_text(text)
        argv += ["--config", str(tmp_path / "c.toml")]
    assert main(argv) == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--canary", "2"], "--canary must be a fraction in [0, 1] (0 = off), got 2.0"),
    (["--canary", "0.5", "--canary-min-reports", "1"], "canary min_reports must be >= 2"),
    (["--canary", "0.5", "--canary-samples", "0"], "canary samples must be in [1, "),
])
def test_canary_settings_out_of_range_are_exit_2_before_the_broker(flags: list[str], needle: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`edgeci coordinator --canary 2` was refused only after connecting to the broker, with exit 1
    (the systemd unit restarts that for good); with the broker down it said only that."""
    from demos.cli import main

    argv = ["coordinator", "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s"), *flags]
    assert main(argv) == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_missing_operator_keys_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--operator-keys /mistyped` started a coordinator that obeyed no operator's command, silently."""
    from demos.cli import main

    argv = ["coordinator", "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s"),
            "--operator-keys", str(tmp_path / "nope")]
    assert main(argv) == 1 and f"--operator-keys {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


def test_a_config_file_not_there_is_exit_1_one_that_does_not_parse_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The unit (EDGECI_CONFIG=/etc/edgeci/coordinator.toml) retries "a file not there yet" (exit 1)
    and not a value wrong on its face (2); a missing config file exited 2, never retried."""
    from demos.cli import main

    argv = ["coordinator", "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s")]
    monkeypatch.setenv("EDGECI_CONFIG", str(tmp_path / "not-yet.toml"))
    assert main(argv) == 1
    # (the prefix every other error of a command has: `edgeci coordinator: error:`, not `edgeci: error:`)
    assert capsys.readouterr().err == f"edgeci coordinator: error: cannot read config file {tmp_path / 'not-yet.toml'}: No such file or directory\n"
    (tmp_path / "not-yet.toml").write_text("k = \n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeci coordinator: error: ") and "not valid TOML" in err, err
    assert not (tmp_path / "s").exists()
