"""deploy/edgeci-coordinator.toml.example through the coordinator's real config loader: every key
(the commented-out ones too) parses, is accepted and means what its comment says."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from coordinator import cli as coordinator_cli
from demos.cli import build_parser, resolve_args
from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import KEEPALIVE_MAX_S, KEEPALIVE_MIN_S

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "edgeci-coordinator.toml.example"
SERVICE = ROOT / "deploy" / "edgeci-coordinator.service"


def load(path: Path, *flags: str, env: dict[str, str] | None = None) -> argparse.Namespace:
    """What ``edgeci coordinator --config PATH FLAGS`` resolves (flags > env > file > defaults)."""
    argv = ["coordinator", "--config", str(path), *flags]
    return resolve_args(build_parser(argv), argv, env or {})


def commented_settings(text: str) -> dict[str, str]:
    """The example's commented-out settings: ``# key = value`` lines and `` `key = value` `` in comments."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"#\s*([a-z_]+)\s*=\s*(\"[^\"]*\"|[^\s#]+)", line.strip())
        if m:
            found[m.group(1)] = m.group(2)
        for key, value in re.findall(r"`([a-z_]+) = (\"[^\"]*\"|[^`\s]+)`", line if line.lstrip().startswith("#") else ""):
            found[key] = value
    return found


def coordinator_parser() -> argparse.ArgumentParser:
    parser = build_parser(["coordinator"])
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["coordinator"]


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def test_every_key_of_the_example_is_taken_from_the_file_with_its_value() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    args = load(EXAMPLE)
    layered = args._layered
    for key, value in data.items():
        if key == "strategy":
            continue
        dest = {"id": "coordinator_id"}.get(key, key)
        assert layered.sources[dest] == "file", key
        assert _plain(getattr(args, dest)) == value, key
    options = coordinator_cli.options_from(args, layered)
    table = dict(data["strategy"])
    assert options.strategy == table.pop("name")
    assert {k: options.strategy_params[k] for k in table} == table
    coordinator_cli.check_method(options)  # the strategy and its parameters, as the start checks them
    assert options.broker == data["broker"] and options.coordinator_id == data["id"] and options.region == data["region"]


def test_the_commented_out_settings_are_accepted_too(tmp_path: Path) -> None:
    """``# keepalive = 30``, ``# init = …``, ``# signing_key = …`` and the bundle in the prose:
    an operator uncomments them as written."""
    text = EXAMPLE.read_text()
    extra = commented_settings(text)
    assert {"keepalive", "init", "signing_key", "bundle"} <= set(extra), extra
    path = tmp_path / "c.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in extra.items()) + text)  # (top-level keys: before [strategy])
    args = load(path)
    for key, raw in extra.items():
        assert args._layered.sources[key] == "file", key
        assert _plain(getattr(args, key)) == tomllib.loads(f"v = {raw}")["v"], key


def test_what_the_comments_say_of_the_values() -> None:
    text = EXAMPLE.read_text()
    actions = {a.option_strings[-1][2:].replace("-", "_"): a for a in coordinator_parser()._actions if a.option_strings}
    # keepalive: "5-3600 s"
    assert f"{KEEPALIVE_MIN_S}-{KEEPALIVE_MAX_S} s" in text
    # log_level = "info"  # debug | info | warning | error ; log_format  # text | json
    levels = re.search(r'^log_level = "\w+"\s*#\s*(.+)$', text, re.M)
    formats = re.search(r'^log_format = "\w+"\s*#\s*(.+)$', text, re.M)
    assert levels and formats
    assert [w.strip() for w in levels.group(1).split("|")] == list(actions["log_level"].choices or ())
    assert [w.strip() for w in formats.group(1).split("|")] == list(actions["log_format"].choices or ())
    # metrics_port "0 = off": the default is 0 and nothing is served
    assert "0 = off" in text and actions["metrics_port"].default == 0


def test_the_precedence_and_naming_the_example_states(tmp_path: Path) -> None:
    """"Keys are the flags' names (state_dir or state-dir)"; "flags > EDGECI_* > this file > defaults";
    "An unknown key is an error that lists the valid ones"; the keepalive comment's EDGECI_KEEPALIVE."""
    text = EXAMPLE.read_text()
    assert "Precedence: flags > EDGECI_* environment variables" in text
    args = load(EXAMPLE, "--region", "flag", env={"EDGECI_REGION": "env", "EDGECI_KEEPALIVE": "60"})
    assert (args.region, args.keepalive) == ("flag", 60)
    assert load(EXAMPLE, env={"EDGECI_REGION": "env"}).region == "env"
    hyphen = tmp_path / "h.toml"
    hyphen.write_text('state-dir = "/srv/st"\n')
    assert load(hyphen).state_dir == Path("/srv/st")
    bad = tmp_path / "bad.toml"
    bad.write_text('stat_dir = "/srv/st"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'stat_dir'; valid keys: .*state_dir"):
        load(bad)


def test_the_parameters_the_example_says_sighup_applies_live_are_live() -> None:
    """"SPIN's parameters (k, timeout, combine, combiner, clip_multiplier, sample_weight_cap,
    max_staleness) apply live": each is changed on a running SPIN strategy by the reload's function."""
    from coordinator.strategies import make_strategy

    text = " ".join(EXAMPLE.read_text().replace("#", " ").split())
    listed = re.search(r"SPIN's parameters \(([^)]*)\) apply live", text)
    assert listed, "the example no longer says which parameters SIGHUP applies"
    names = [n.strip() for n in listed.group(1).split(",")]
    new = {"k": 3, "timeout_s": 7.0, "combine": "deltas", "combiner": "median", "clip_multiplier": 2.0,
           "sample_weight_cap": 5.0, "max_staleness": 4, "device_share": 0.5, "server_lr": 0.5}
    for name in names:
        param = coordinator_cli.STRATEGY_FLAG_PARAMS.get(name, name)
        spin = make_strategy("spin", k=10, timeout_s=30.0)
        coordinator_cli.reconfigure_strategy(spin, {param: new[param]})
        configs = [spin.config, getattr(spin, "robust", None) and spin.robust.config]  # type: ignore[attr-defined]
        assert any(c is not None and getattr(c, param, None) == new[param] for c in configs), name


def test_the_systemd_unit_runs_the_example_s_setup() -> None:
    """deploy/edgeci-coordinator.service: its ExecStart parses, and each Environment=EDGECI_* it
    sets is one the coordinator reads (a misspelt one is otherwise ignored)."""
    from coordinator.config import OTHER_ENV, options_of

    unit = SERVICE.read_text()
    exec_start = re.search(r"^ExecStart=\S*edgeci (.*)$", unit, re.M)
    assert exec_start
    argv = exec_start.group(1).split()
    env = dict(re.findall(r"^Environment=(EDGECI_\w+)=(\S+)$", unit, re.M))
    assert env, "the unit sets no EDGECI_* variable"
    read = {o.env for o in options_of(coordinator_parser())} | set(OTHER_ENV)
    assert set(env) <= read, set(env) - read
    args = resolve_args(build_parser(argv), argv, {k: v for k, v in env.items() if k != "EDGECI_CONFIG"})
    assert args.state_dir == Path(env["EDGECI_STATE_DIR"]) and args._layered.sources["state_dir"] == "env"


def test_the_example_says_what_is_insecure_where_it_sets_it() -> None:
    """A plain mqtt:// broker URL and the unauthenticated metrics endpoints: the lines that set
    them say so (the coordinator's --help did; the example, copied into /etc, did not)."""
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^(\w+) = [^#\n]*#(.*(?:\n\s+#.*)*)", EXAMPLE.read_text(), re.M)}
    data = tomllib.loads(EXAMPLE.read_text())
    if data["broker"].startswith("mqtt://"):
        assert "unencrypted" in lines["broker"] and "anyone" in lines["broker"], lines["broker"]
    assert "no authentication" in lines["metrics_host"], lines.get("metrics_host")
    helps = {a.dest: a.help or "" for a in coordinator_parser()._actions}
    assert "no authentication" in helps["metrics_host"] and helps["accept_unpulled_updates"].startswith("INSECURE")
