"""The words match the behaviour: what ``--help``, the environment and the shipped config
example say is what the parsers and the config loader do (helper-173's audit)."""

from __future__ import annotations

import argparse
import re

import pytest

from demos.cli import build_parser, main, resolve_args
from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import HINT_BOUNDS


def coordinator_args(*flags: str, env: dict[str, str] | None = None) -> argparse.Namespace:
    argv = ["coordinator", "--state-dir", "s", *flags]
    return resolve_args(build_parser(argv), argv, env or {})


# ---------------------------------------------------------------------- ranges the help names


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--full-sync-every", "-3", "must be 0 (off) or a number of versions"),
    ("--epochs", "0", "must be at least 1"),
    ("--epochs", "101", "must be at most 100"),
    ("--epochs", "inf", "finite"),
    ("--lr", "0", "must be above 0"),
    ("--lr", "-0.1", "must be above 0"),
    ("--lr", "11", "must be at most 10"),
])
def test_coordinator_refuses_what_devices_would_clamp_or_ignore(flag: str, value: str, words: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``--epochs`` / ``--lr`` are hints every device clamps into HINT_BOUNDS: ``--lr 0`` (or -1)
    was accepted and made every device train with lr 0, learning nothing, without an error;
    ``--full-sync-every -3`` passed the parser and failed later, at the core's start (exit 1, retried)."""
    with pytest.raises(SystemExit) as exit_:
        main(["coordinator", "--state-dir", "s", flag, value])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        coordinator_args(env={"EDGECI_" + flag[2:].upper().replace("-", "_"): value})


def test_coordinator_hint_bounds_are_the_devices() -> None:
    """The bounds in the help are the ones devices clamp to (one table, edge_sdk.tasks.base.HINT_BOUNDS)."""
    lo, hi = HINT_BOUNDS["epochs"]
    assert coordinator_args("--epochs", f"{lo:g}", "--lr", f"{HINT_BOUNDS['lr'][1]:g}").epochs == lo
    assert coordinator_args("--epochs", f"{hi:g}").epochs == hi
    sub = next(a for a in build_parser(["coordinator"])._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub.choices["coordinator"]._actions}
    assert f"{lo:g}-{hi:g}" in helps["epochs"] and f"at most {HINT_BOUNDS['lr'][1]:g}" in helps["lr"]


# ---------------------------------------------------------------------- the environment each --help names

ENV_SAMPLES = {"broker": "mqtt://127.0.0.1:1", "region": "r1", "state_dir": "/x", "bundle": "/b", "ca": "/ca.pem",
               "cert": "/c.pem", "key": "/k.pem", "username": "u", "password_file": "/p", "log_level": "debug",
               "log_format": "json", "threads": "2"}
"""A valid value for each option the environment-only commands read."""


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser([name])
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _named_env(text: str) -> list[str]:
    return sorted(set(re.findall(r"EDGECI_[A-Z_]+[A-Z]", text)))


@pytest.mark.parametrize("command", [c for c in __import__("demos.cli").cli.COMMANDS if c != "coordinator"])
def test_each_help_names_the_environment_variables_it_reads(command: str) -> None:
    """Every EDGECI_* a subcommand's help names sets that option, and every one that does is named
    (status / rollback / versions read EDGECI_BROKER, EDGECI_REGION, EDGECI_STATE_DIR, …, and no help said so)."""
    import importlib

    from coordinator.config import OTHER_ENV, env_values, options_of
    from demos.cli import COMMANDS, layered_dests

    sub = _sub(command)
    epilog = sub.epilog or ""
    named = _named_env(epilog)
    assert "EDGECI_LOG_LEVEL" in named and "EDGECI_LOG_FORMAT" in named, epilog
    options = options_of(sub, layered_dests(importlib.import_module(COMMANDS[command][0])))  # what resolve_args layers
    for name in named:
        dest = name.removeprefix("EDGECI_").lower()
        got = env_values(options, {name: ENV_SAMPLES[dest]})
        assert dest in got, f"edgeci {command} --help names {name}, which it does not read"
    for other in ("EDGECI_TIMEOUT", "EDGECI_K"):  # the coordinator's own: never named where not read
        assert other not in named or other in OTHER_ENV


def test_every_option_of_an_environment_only_command_read_from_the_environment_is_named() -> None:
    import importlib

    from coordinator.config import options_of
    from demos.cli import COMMANDS, layered_dests

    for command, (module, _) in COMMANDS.items():
        if command == "coordinator":
            continue
        sub = _sub(command)
        read = {o.env for o in options_of(sub, layered_dests(importlib.import_module(module)))}
        assert read <= set(_named_env(sub.epilog or "")), command


def test_coordinator_help_states_the_environment_and_file_rule_it_follows() -> None:
    from coordinator.config import options_of

    epilog = " ".join((_sub("coordinator").epilog or "").split())
    assert "EDGECI_<OPTION>" in epilog and "--state-dir is EDGECI_STATE_DIR" in epilog and "EDGECI_CONFIG" in epilog
    options = options_of(_sub("coordinator"))
    assert {o.env for o in options} >= {"EDGECI_STATE_DIR", "EDGECI_K", "EDGECI_PARAM", "EDGECI_INVERSION"}
    args = coordinator_args(env={"EDGECI_K": "7", "EDGECI_PARAM": "phi=2,eta_a=0.5", "EDGECI_METRICS_PORT": "9"})
    assert (args.k, args.param, args.metrics_port) == (7, ["phi=2", "eta_a=0.5"], 9)
    argv = ["coordinator"]
    assert resolve_args(build_parser(argv), argv, {"EDGECI_STATE_DIR": "/s"}).state_dir is not None


def test_top_level_help_names_every_variable_read_outside_the_options() -> None:
    """``edgeci --help`` lists EDGECI_HOME, EDGECI_DEVICE, … (EDGECI_DEVICE was read by every
    training and named nowhere); each it lists is one the code reads (OTHER_ENV)."""
    from coordinator.config import OTHER_ENV

    text = build_parser([]).format_help()
    table = text.split("Environment (", 1)[1]
    listed = set(_named_env(table)) - {"EDGECI_LOG_LEVEL", "EDGECI_LOG_FORMAT"}
    assert listed == set(OTHER_ENV), listed ^ set(OTHER_ENV)


@pytest.mark.parametrize("command", ["versions", "new-epoch"])
def test_state_dir_from_the_environment_is_taken_where_the_help_says_so(command: str, tmp_path: object,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """cli_control reads EDGECI_STATE_DIR (ENV_OPTIONS), but argparse's required=True refused
    ``edgeci versions`` with it set ("the following arguments are required: --state-dir", exit 2)
    before the environment was read. Neither given: still exit 2, naming both."""
    from pathlib import Path

    state = Path(str(tmp_path))
    (state / "versions").mkdir()
    monkeypatch.setenv("EDGECI_STATE_DIR", str(state))
    rc = main([command])
    out = capsys.readouterr()
    assert "required" not in out.err, out.err
    if command == "versions":
        assert rc == 0 and "release:" in out.out
    else:  # got as far as reading the state dir (no spec.json in this bare one)
        assert rc == 1 and "spec.json" in out.err and str(state) in out.err
    monkeypatch.delenv("EDGECI_STATE_DIR")
    assert main([command]) == 2
    assert "--state-dir is required (or EDGECI_STATE_DIR)" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "error"), [
    (["run", "--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    (["label", "--zoom", "0"], "argument --zoom: must be 0.1..8, got 0"),
    (["label", "--zoom", "9"], "argument --zoom: must be 0.1..8, got 9"),
    (["label", "--zoom", "nan"], "argument --zoom: must be 0.1..8, got nan"),
    (["label", "--size", "20"], "argument --size: must be 64..1024 pixels, got 20"),
    (["label", "--size", "2000"], "argument --size: must be 64..1024 pixels, got 2000"),
])
def test_ranges_the_help_names_are_the_parser_s(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`run --seed -1` ended in numpy's "expected non-negative integer" traceback (helper-89 fixed
    pretrain's and the coordinator's, not run's); `label --zoom` said "0.1..8" and took 0 (a
    ValueError traceback from label_ui.View) or 9 (refused only as a too-big window, after the
    source opened); `label --size` was refused at 64..1024 only when the synthetic source was built,
    and its help named no range."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and error in capsys.readouterr().err
    helps = {a.dest: a.help or "" for a in _sub(argv[0])._actions}
    assert {"zoom": "0.1..8", "size": "64..1024", "seed": ">= 0"}[argv[1][2:]] in helps[argv[1][2:]]


@pytest.mark.parametrize("command", ["run", "pretrain", "device"])
def test_a_task_option_s_help_says_it_takes_an_app_s_task(command: str) -> None:
    """task_arg takes an app's package.module:Name (the README's `edgeci pretrain --model
    acme_vision.tasks:AcmeCnn`); run's and pretrain's --model help named only the built-in tasks."""
    from coordinator.config import task_arg

    actions = [a for a in _sub(command)._actions if a.type is task_arg]
    assert actions
    for action in actions:
        assert "package.module:Name" in (action.help or "") and "edgeci.tasks entry point" in (action.help or "")


def _start_checks(*flags: str) -> None:
    """The option checks `edgeci coordinator` runs before it writes anything (gate, canary)."""
    from coordinator import cli as coordinator_cli
    from coordinator.daemon import canary_config

    args = coordinator_args(*flags)
    options = coordinator_cli.options_from(args, args._layered)
    coordinator_cli._check_gate(options, args._layered)
    canary_config(options)


@pytest.mark.parametrize(("flag", "words", "inside", "outside"), [
    ("--gate-margin", "in [0, 1)", ["0", "0.99"], ["1", "-0.01"]),
    ("--rollback-margin", "in [0, 1)", ["0.5"], ["1"]),
    ("--gate-z", "at most 10", ["0", "10"], ["10.5", "-1"]),
    ("--canary-samples", "1-10000", ["1", "10000"], ["0", "10001"]),
    ("--canary-max-per-device", "--canary-samples to 10000", ["0", "20", "10000"], ["19", "10001"]),
    ("--canary-min-reports", "3-64", ["3", "64"], ["2", "65"]),
    ("--canary-deadline", "at most 86400", ["0.5", "86400"], ["0", "86401"]),
])
def test_the_ranges_the_coordinator_enforces_are_in_its_help(flag: str, words: str, inside: list[str],
                                                             outside: list[str]) -> None:
    """The release gate's and the canary's checks refused values the help gave no range for
    (--canary-samples 10001, --canary-min-reports 65, --canary-deadline 86401, --gate-margin 1)."""
    helps = {a.option_strings[0]: " ".join((a.help or "").split()) for a in _sub("coordinator")._actions if a.option_strings}
    assert words in helps[flag], helps[flag]
    canary = [] if flag in ("--gate-margin", "--rollback-margin", "--gate-z") else ["--canary", "0.5"]
    for value in inside:
        _start_checks(*canary, flag, value)
    for value in outside:
        with pytest.raises(ConfigError):
            _start_checks(*canary, flag, value)


def test_metrics_port_range_in_help_and_check(tmp_path: object) -> None:
    from pathlib import Path

    from coordinator import cli as coordinator_cli

    helps = {a.option_strings[0]: a.help or "" for a in _sub("coordinator")._actions if a.option_strings}
    assert "(1-65535); 0 = off" in helps["--metrics-port"]
    args = coordinator_args("--metrics-port", "65536")
    args.state_dir = Path(str(tmp_path)) / "st"
    options = coordinator_cli.options_from(args, args._layered)
    with pytest.raises(ConfigError, match="1-65535"):
        coordinator_cli.check_before_start(options, args._layered)


@pytest.mark.parametrize("dest", ["k", "combine", "combiner", "clip_multiplier", "max_staleness", "sample_weight_cap"])
def test_a_strategy_flag_s_help_names_every_strategy_that_takes_it(dest: str) -> None:
    """``--k`` said "(SPIN, FedBuff)" and the robust group "(spin, fedbuff, port, fedavg, hierfavg)",
    while spin-notimeout and port take --k, spin-notimeout the robust flags, and fedasync, spyker and
    nebula --max-staleness: a flag given for a strategy that has no such parameter is refused
    (coordinator.cli._check_applies), so the help must say which do."""
    from coordinator.cli import strategy_flag_users

    sub = _sub("coordinator")
    action = next(a for a in sub._actions if a.dest == dest and a.option_strings)
    group = next(g for g in sub._action_groups if action in g._group_actions)
    text = " ".join(f"{group.title} {action.help}".split()).replace("- ", "-")
    missing = [name for name in strategy_flag_users()[dest][1] if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.I)]
    assert not missing, (missing, text)
